"""Training data: the built-in prompt corpus, target regeneration into shards, and batching."""
