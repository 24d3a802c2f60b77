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

import math
import os
import struct
from pathlib import Path

import crc32c

from logitcache.errors import LogitCacheError
from logitcache.format.manifest import PARTS_DIR
from logitcache.format.parse import load_json
from logitcache.read.reader import Cache

_EMPTY = (1 << 64) - 1


def structure_problems(cache: Cache) -> list[str]:
    """One message per damaged part (naming the part and the file); empty when all look fine.
    Local caches only (a remote cache's files are checked against their sha256 when fetched)."""
    problems = []
    if cache.is_remote:
        return problems
    for index, info in enumerate(cache.manifest.parts):
        try:
            cache.part_path(index)  # files present and inside the root, metadata vs manifest
        except LogitCacheError as exc:
            problems.append(str(exc))
            continue
        if cache.manifest.backend == "zarr":
            base = Path(cache.root) / PARTS_DIR
            for rel in info.files:
                if "/c/" in rel:
                    problem = _shard_index_problem(base, rel)
                    if problem:
                        problems.append(f"{info.name} of {cache.root}: {PARTS_DIR}/{rel} {problem}")
    return problems


def _shard_index_problem(base: Path, rel: str) -> str | None:
    """Why the shard file `rel` (under `base`) has a damaged index, or None."""
    array_dir = base / rel.split("/c/")[0]
    try:
        meta = load_json((array_dir / "zarr.json").read_text(encoding="utf-8"))
        (codec,) = [c for c in meta["codecs"] if c.get("name") == "sharding_indexed"]
        config = codec["configuration"]
        outer = meta["chunk_grid"]["configuration"]["chunk_shape"]
        inner = config["chunk_shape"]
        checksummed = any(c.get("name") == "crc32c" for c in config.get("index_codecs", []))
        at_end = config.get("index_location", "end") == "end"
    except (OSError, ValueError, KeyError, TypeError):
        return None  # metadata problems are the reader's check's to report
    chunks = math.prod(math.ceil(o / i) for o, i in zip(outer, inner, strict=True))
    size = chunks * 16 + (4 if checksummed else 0)
    path = base / rel
    try:
        length = os.path.getsize(path)
        if length < size:
            return f"is truncated ({length} bytes, shorter than its {size}-byte chunk index)"
        with open(path, "rb") as f:
            f.seek(length - size if at_end else 0)
            index = f.read(size)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    body = index[: chunks * 16]
    if checksummed and struct.unpack("<I", index[-4:])[0] != crc32c.crc32c(body):
        return "has a damaged chunk index (its CRC-32C does not match): truncated or corrupted"
    data_end = length - size if at_end else length
    data_start = 0 if at_end else size
    for offset, nbytes in struct.iter_unpack("<QQ", body):
        if (offset, nbytes) == (_EMPTY, _EMPTY):
            continue
        if offset < data_start or offset + nbytes > data_end:
            return "is truncated or corrupted (its index points past the end of the data)"
    return None
