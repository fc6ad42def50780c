"""The driver: specs in, shard plans, scheduling on Ray, commit and lifecycle of jobs."""
