"""The storage backends by name; each is a module with the same small set of functions.

A backend module provides ``SUFFIX`` (appended to a part's name: "" for a directory),
``write_part(path, arrays, codec, chunk_bytes)``, ``read_part(path, names)`` (the arrays to
read, `format.array_names` of the target kind),
``read_rows(path, name, start, stop)`` and ``iter_chunks(path, name)``. They are imported only
when used, so a zarr-only reader never loads pyarrow and the reverse.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from logitcache.errors import LogitCacheError
from logitcache.format.manifest import BACKENDS, PARTS_DIR

_MODULES = {
    "zarr": "logitcache.storage.zarr_backend",
    "parquet": "logitcache.storage.parquet_backend",
}


def get_backend(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise LogitCacheError(f"unknown format {name!r}; choose one of: {', '.join(BACKENDS)}.")
    return importlib.import_module(_MODULES[name])


def part_path(root: Path, backend: str, name: str) -> Path:
    """Where part `name` lives under cache `root`."""
    return root / PARTS_DIR / (name + get_backend(backend).SUFFIX)
