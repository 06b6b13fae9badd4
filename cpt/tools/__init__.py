"""Commands around the pipeline that read its files: eval, probe, report, plan. They use the training
package's public parts (session, model, evaluate), never the loop's internals. See docs/architecture.md."""
