"""Reading and writing checkpoints: safetensors headers, sources (local or hub), shards."""
