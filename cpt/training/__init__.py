"""The train stage: shards -> RUN_DIR/checkpoints/step-N/, best.json, metrics.jsonl. loop.py is the loop;
the rest are its parts (session, step, masking, batches, checkpoint, evaluate, model, ...). Never imports
export, tools or the CLI. See docs/architecture.md."""
