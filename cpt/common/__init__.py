"""What every stage shares and nothing else: files (the one atomic write, manifests, fingerprints),
runtime (the only reader of RANK / WORLD_SIZE, the console), metrics (the one metrics.jsonl reader and
writer), base_model and weights (a base model dir's config, tokenizer and weight files).
Imports nothing from the stages. See docs/architecture.md."""
