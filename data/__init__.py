"""Training data: the embedded corpus, sentencepiece tokenizers (and training them on raw files),
`prepare` (raw jsonl/json/parquet/arrow/text -> megatron-core indexed datasets), blends of
prepared datasets with train/valid/test splits, and the deterministic distributed batch loader.
docs/data.md walks through it; data.build.build_loaders is what the trainer calls."""
