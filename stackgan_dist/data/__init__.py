"""Data, in three rooms around one format (format.py): prepare/ writes shards and dataset.json, read/ streams
them to training and evaluation, text/ turns captions into embeddings."""
