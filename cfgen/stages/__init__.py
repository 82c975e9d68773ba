"""The pipeline stages, each a shard-to-shard transform: invert -> guide -> pack."""
