"""Where bytes live: the typed backend protocol and its Zarr and Parquet backends, object stores, the local mirror of fetched parts, file helpers and the cache lock."""
