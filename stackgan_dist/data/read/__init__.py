"""Reading shards: dataset.json checks, the tar reader, sample decoding, the epoch plan and cursor (slots), the
training loader and the sequential reader for evaluation."""
