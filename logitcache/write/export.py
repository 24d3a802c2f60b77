"""`export`: convert a cache to the other backend (or copy it, e.g. from a directory to s3://).

Every part is read whole and written again through the ordinary writer, so the output is
committed part by part like a dump, resumes if interrupted (rerun the same command), and holds
exactly the source's parts, sequences and manifest records (teacher, tokenizer, data, targets,
layout, codec, merged_from); only `backend`, the file checksums and `tool_version` change.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from logitcache.format.card import DEFAULT_LICENSE
from logitcache.format.manifest import Manifest
from logitcache.read import reader
from logitcache.storage.backend import get_backend
from logitcache.storage.paths import refuse_overlap
from logitcache.version import __version__
from logitcache.write.remote_writer import open_writer


def export(
    cache: str | Path,
    out: str | Path,
    *,
    backend: str,
    overwrite: bool = False,
    license: str = DEFAULT_LICENSE,
    cache_dir: str | Path | None = None,
) -> Manifest:
    """Write the complete cache `cache` to `out` with `backend` ("zarr" or "parquet")."""
    get_backend(backend)  # an unknown name is refused before anything is read
    refuse_overlap(out, [cache], "OUT")
    source = reader.open(cache, cache_dir=cache_dir)
    source.refuse_links()  # all of it now: before the writer deletes an old OUT
    template = dataclasses.replace(
        source.manifest,
        backend=backend,
        parts=[],
        sequences=0,
        tokens=0,
        complete=False,
        tool_version=__version__,
    )
    with open_writer(out, template, overwrite=overwrite, license=license) as writer:
        if not writer.manifest.complete:
            for index in range(writer.committed, source.num_parts):
                writer.write_part(source.read_part(index))
            writer.finish()
        return writer.manifest
