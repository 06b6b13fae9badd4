"""The data stages: prepare (raw corpus -> RUN_DIR/corpus/), tokenize (-> RUN_DIR/shards/), the replay
corpus (RUN_DIR/replay/) and the vocabulary extension (RUN_DIR/tokenizer/). Never imports training or
export: its outputs are files, read by training. See docs/architecture.md."""
