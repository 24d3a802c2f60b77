"""Zarr v3 backend: the only module that imports zarr.

A part is a Zarr v3 group with four arrays. Each array is ONE shard (one file per array per
part, so a billion tokens makes thousands of files, not millions) of ~`chunk_bytes` inner chunks
along the token axis; every inner chunk is Blosc-compressed and then crc32c-checksummed, and the
shard index carries its own crc32c, so any flipped bit is caught on read.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zarr
import zarr.codecs as zc

from logitcache.format import ARRAY_NAMES, CodecInfo, PartArrays

SUFFIX = ""  # a part is a directory


def _chunk_rows(row_bytes: int, chunk_bytes: int, rows: int) -> int:
    """Rows per inner chunk: about `chunk_bytes` uncompressed, at least 1, at most `rows`."""
    return max(1, min(max(rows, 1), chunk_bytes // max(row_bytes, 1)))


def write_part(path: Path, arrays: PartArrays, codec: CodecInfo, chunk_bytes: int) -> None:
    """Write `arrays` as a new Zarr v3 group at `path` (which must not exist yet)."""
    group = zarr.open_group(str(path), mode="w-", zarr_format=3)
    for name in ARRAY_NAMES:
        data = np.ascontiguousarray(getattr(arrays, name))
        row_bytes = data.dtype.itemsize * int(np.prod(data.shape[1:], dtype=np.int64))
        rows = _chunk_rows(row_bytes, chunk_bytes, data.shape[0])
        chunks = (rows, *data.shape[1:])
        shard = (math.ceil(max(data.shape[0], 1) / rows) * rows, *data.shape[1:])
        compressors = [
            zc.BloscCodec(
                cname=codec.cname,
                clevel=codec.clevel,
                shuffle=zc.BloscShuffle[codec.shuffle],
                typesize=data.dtype.itemsize,
            ),
            zc.Crc32cCodec(),
        ]
        array = group.create_array(
            name,
            shape=data.shape,
            dtype=data.dtype,
            chunks=chunks,
            shards=shard,
            compressors=compressors,
            fill_value=0,
        )
        array[...] = data


def read_part(path: Path) -> PartArrays:
    """Read a whole part into memory (each array is decompressed once, chunk by chunk)."""
    group = zarr.open_group(str(path), mode="r", zarr_format=3)
    return PartArrays(*(group[name][...] for name in ARRAY_NAMES))


def read_rows(path: Path, name: str, start: int, stop: int) -> np.ndarray:
    """Rows `start:stop` of one array, decompressing only the inner chunks they touch."""
    return zarr.open_array(str(path / name), mode="r", zarr_format=3)[start:stop]


def iter_chunks(path: Path, name: str) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (chunk index, data) for every inner chunk of one array; checksums are checked."""
    array = zarr.open_array(str(path / name), mode="r", zarr_format=3)
    rows = array.chunks[0]
    for index, start in enumerate(range(0, array.shape[0], rows)):
        yield index, array[start : start + rows]
