"""Ray actors and what runs inside them: storage access, shard readers, decoding, models, Parquet writers."""
