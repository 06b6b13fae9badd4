"""The export stage (best checkpoint + base -> RUN_DIR/model/, a Hugging Face dir that replaces the base)
and the UER-py <-> Hugging Face converter; both write through hf_dir. See docs/architecture.md."""
