"""Zarr v3 backend: the only module that imports zarr.

A part is a Zarr v3 group with four arrays. Each array is ONE shard (one file per array per
part, so a billion tokens makes thousands of files, not millions) of ~`chunk_bytes` inner chunks
along the token axis; every inner chunk is Blosc-compressed and then crc32c-checksummed, and the
shard index carries its own crc32c, so any flipped bit is caught on read.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import struct
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import crc32c
import numpy as np
import zarr
import zarr.codecs as zc

from logitcache.format.manifest import ARRAY_NAMES, CodecInfo, PartArrays, PartInfo
from logitcache.format.parse import load_json

SUFFIX = ""  # a part is a directory


#: `warnings.catch_warnings` swaps the process's filters and puts them back, which two threads
#: doing it at once can leave wrong (the dump's writer pool stages parts side by side).
_QUIET_LOCK = threading.RLock()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The delta filter is numcodecs' ("numcodecs.delta"), which zarr flags on every use as not
    in the v3 specification; the format documents it (docs/FORMAT.md, section 5). One thread
    at a time: writes take it only for a cache with `--delta`, so the default's run in parallel."""
    with _QUIET_LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr")
        yield


def _chunk_rows(row_bytes: int, chunk_bytes: int, rows: int) -> int:
    """Rows per inner chunk: about `chunk_bytes` uncompressed, at least 1, at most `rows`."""
    return max(1, min(max(rows, 1), chunk_bytes // max(row_bytes, 1)))


def write_part(path: Path, arrays: PartArrays, codec: CodecInfo, chunk_bytes: int) -> None:
    """Write `arrays` as a new Zarr v3 group at `path` (which must not exist yet)."""
    with _quiet() if codec.delta else contextlib.nullcontext():
        _write_part(path, arrays, codec, chunk_bytes)


def _write_part(path: Path, arrays: PartArrays, codec: CodecInfo, chunk_bytes: int) -> None:
    group = zarr.open_group(str(path), mode="w-", zarr_format=3)
    for name, values in arrays.arrays().items():
        data = np.ascontiguousarray(values)
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
            filters=_delta(data.dtype) if name in codec.delta else None,
            compressors=compressors,
            fill_value=0,
            # every chunk is written, even all-zero ones: a part's file set is then fixed by its
            # shape alone, which the manifest's checksums and the reader's bounds checks rely on
            config={"write_empty_chunks": True},
        )
        array[...] = data


def _delta(dtype: np.dtype) -> list:
    """numcodecs' delta filter ("numcodecs.delta"): each inner chunk, flattened in C order,
    stored as its first value and then differences, wrapping around in the array's dtype."""
    from zarr.codecs.numcodecs import Delta

    return [Delta(dtype=dtype.str)]


MAX_METADATA_BYTES = 1 << 20  # a zarr.json is a few KB


def _metadata(path: Path) -> dict:
    with open(path / "zarr.json", "rb") as f:
        text = f.read(MAX_METADATA_BYTES + 1)
    if len(text) > MAX_METADATA_BYTES:
        raise ValueError(f"{path.name}/zarr.json is over {MAX_METADATA_BYTES} bytes")
    try:
        meta = load_json(text)
    except ValueError as exc:
        raise ValueError(f"{path.name}/zarr.json is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3:
        raise ValueError(f"{path.name}/zarr.json is not Zarr v3 metadata")
    return meta


def _bounded_shape(value: object, limit: tuple[int, ...], what: str) -> tuple[int, ...]:
    """A chunk shape: positive ints, one per dimension, each within `limit`."""
    if (
        not isinstance(value, list)
        or len(value) != len(limit)
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or not all(1 <= v <= lim for v, lim in zip(value, limit, strict=True))
    ):
        raise ValueError(f"{what} {value!r:.80} is not within {limit}")
    return tuple(value)


def check_part(
    path: Path, expected: dict[str, tuple[tuple[int, ...], str]], listed: set[str]
) -> None:
    """Check a part's zarr.json files against the manifest before zarr reads anything else.

    Shapes and data types must be the manifest's, chunk shapes bounded by the array (so no
    chunk buffer is larger than the part), no storage transformers, the default chunk key
    encoding, and every chunk file zarr would open listed in the manifest (zarr reads a missing
    chunk as fill values, so an unlisted or absent one must not be skipped silently).
    """
    group = _metadata(path)
    if group.get("node_type") != "group":
        raise ValueError("zarr.json is not a group")
    for name, (shape, dtype) in expected.items():
        meta = _metadata(path / name)
        where = f"{name}/zarr.json"
        if meta.get("node_type") != "array":
            raise ValueError(f"{where} is not an array")
        if meta.get("shape") != list(shape) or meta.get("data_type") != dtype:
            raise ValueError(
                f"{where} declares shape {meta.get('shape')!r:.80} of "
                f"{meta.get('data_type')!r:.40}, the manifest says {list(shape)} of {dtype!r}"
            )
        if meta.get("storage_transformers"):
            raise ValueError(f"{where} has storage transformers")
        if meta.get("chunk_key_encoding") != {
            "name": "default",
            "configuration": {"separator": "/"},
        }:
            raise ValueError(f"{where} does not use the default '/' chunk key encoding")
        grid = meta.get("chunk_grid") or {}
        if grid.get("name") != "regular":
            raise ValueError(f"{where} has no regular chunk grid")
        doubled = tuple(2 * max(n, 1) for n in shape)
        outer = _bounded_shape(
            (grid.get("configuration") or {}).get("chunk_shape"), doubled, f"{where} chunk shape"
        )
        codecs = meta.get("codecs")
        if not isinstance(codecs, list):
            raise ValueError(f"{where} has no codec list")
        for codec in codecs:
            if isinstance(codec, dict) and codec.get("name") == "sharding_indexed":
                config = codec.get("configuration") or {}
                _bounded_shape(config.get("chunk_shape"), outer, f"{where} inner chunk shape")
                inner = [c.get("name") for c in config.get("codecs", []) if isinstance(c, dict)]
                if "sharding_indexed" in inner:
                    raise ValueError(f"{where} nests sharding")
        counts = [math.ceil(n / c) for n, c in zip(shape, outer, strict=True)]
        if math.prod(counts) > len(listed):
            raise ValueError(f"{where} has more chunks than the manifest lists files")
        for index in itertools.product(*(range(c) for c in counts)):
            key = f"{name}/c/" + "/".join(map(str, index))
            if key not in listed:
                raise ValueError(f"{name} chunk file {key} is not listed in the manifest")


def read_part(path: Path, names: tuple[str, ...] = ARRAY_NAMES) -> PartArrays:
    """Read the arrays `names` of a part into memory (each decompressed once, chunk by chunk);
    the others are None."""
    with _quiet():
        group = zarr.open_group(str(path), mode="r", zarr_format=3)
        absent = {"input_ids": None, "target_logprobs": None}  # classification: no input ids
        return PartArrays(**absent | {name: group[name][...] for name in names})


def read_rows(path: Path, name: str, start: int, stop: int) -> np.ndarray:
    """Rows `start:stop` of one array, decompressing only the inner chunks they touch."""
    with _quiet():
        return zarr.open_array(str(path / name), mode="r", zarr_format=3)[start:stop]


def iter_chunks(path: Path, name: str) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (chunk index, data) for every inner chunk of one array; checksums are checked."""
    with _quiet():
        array = zarr.open_array(str(path / name), mode="r", zarr_format=3)
        rows = array.chunks[0]
        for index, start in enumerate(range(0, array.shape[0], rows)):
            yield index, array[start : start + rows]


def array_bytes(base: Path, part: PartInfo) -> dict[str, int]:
    """On-disk bytes by array: each array's directory, its zarr.json included; the group's
    zarr.json as "zarr metadata"."""
    sizes: dict[str, int] = {}
    for rel in part.files:
        pieces = rel.split("/")
        name = pieces[1] if len(pieces) >= 3 else "zarr metadata"
        sizes[name] = sizes.get(name, 0) + (base / rel).stat().st_size
    return sizes


# --------------------------------------------------------------------------------------------
# The shard index (the zarr v3 sharding codec): read without zarr, to see a truncated file

_EMPTY = (1 << 64) - 1  # an index entry of a chunk that was never written


def file_problems(base: Path, part: PartInfo) -> list[tuple[str, str]]:
    """(shard file, why) for each shard file of `part` whose chunk index is damaged: its
    CRC-32C, and every chunk it points to inside the file (a truncated file)."""
    found = []
    for rel in part.files:
        if "/c/" in rel:
            problem = _shard_index_problem(base, rel)
            if problem:
                found.append((rel, problem))
    return found


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
        return None  # metadata problems are `check_part`'s to report
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
