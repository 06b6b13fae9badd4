"""The train stage: shards -> RUN_DIR/checkpoints/step-N/, best.json, metrics.jsonl. loop.py is the loop;
the rest are its parts: session (model, optimizer, precision, data, built once), step (one optimizer step),
resume (run record, --resume, best pointer), monitor (signals, --max-time, log windows), head_warmup,
masking, batches, checkpoint, evaluate, model, unpadded, cpu (the CPU-only speed-ups), ... Never imports
export, tools or the CLI. See docs/architecture.md."""
