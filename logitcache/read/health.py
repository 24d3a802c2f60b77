"""A quick structural check of a cache: what `logitcache info` can afford on every call.

For every part listed in the manifest: each listed file exists as a regular file inside the
cache (a deleted file), the part's metadata agrees with the manifest (zarr.json shapes and types,
Parquet footers: the reader's own checks), and each zarr shard file's index is intact (its
CRC-32C, and every chunk it points to inside the file: a truncated file). This reads metadata
and a few hundred bytes per file, never the data itself, so it does not see a flipped byte
inside a compressed chunk, nor a manifest copied from another cache whose parts have the same
shapes: `logitcache verify` (every sha256 and chunk) and the trainer (every sha256, before it
reads a part) do.
"""

from __future__ import annotations

from pathlib import Path

from logitcache.errors import LogitCacheError
from logitcache.format.manifest import PARTS_DIR
from logitcache.read.reader import Cache


def structure_problems(cache: Cache) -> list[str]:
    """One message per damaged part (naming the part and the file); empty when all look fine.
    Local caches only (a remote cache's files are checked against their sha256 when fetched)."""
    problems = []
    if cache.is_remote:
        return problems
    base = Path(cache.root) / PARTS_DIR
    for index, info in enumerate(cache.manifest.parts):
        try:
            cache.part_path(index)  # files present and inside the root, metadata vs manifest
        except LogitCacheError as exc:
            problems.append(str(exc))
            continue
        for rel, problem in cache.backend.file_problems(base, info):
            problems.append(f"{info.name} of {cache.root}: {PARTS_DIR}/{rel} {problem}")
    return problems
