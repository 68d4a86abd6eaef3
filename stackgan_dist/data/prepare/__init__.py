"""`stackgan prepare`: shard writer, synthetic data, the authors' release, caption folders, shards indexed in
place."""
