"""The dump: a teacher over a dataset into a cache (options, data, teacher, targets, sampling, the pipeline, sharding)."""
