"""Training data: the embedded corpus, sentencepiece tokenizers, megatron-core indexed datasets,
and the deterministic distributed batch loader."""
