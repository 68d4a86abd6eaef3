"""Data: shard writers (prepare) and the streaming shard reader (training)."""
