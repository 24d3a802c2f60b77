"""The storage backends: one typed interface (`Backend`), and the registry that finds them by name.

A backend is a module (`logitcache.storage.zarr_backend`, `logitcache.storage.parquet_backend`)
whose constant and functions satisfy `Backend`; the registry returns the module typed as the
protocol, so every caller is checked against one interface and nothing probes a module for
optional functions. Backends are imported only when used, so a zarr-only reader never loads
pyarrow and the reverse.

Paths: a part is at ``parts/NAME + SUFFIX`` (a directory for zarr, one file for parquet); a
part's files are named by their paths under ``parts/`` (the keys of `PartInfo.files`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from logitcache.errors import LogitCacheError
from logitcache.format.manifest import BACKENDS, PARTS_DIR, CodecInfo, PartArrays, PartInfo

__all__ = ["Backend", "get_backend", "part_path"]


class Backend(Protocol):
    """How one storage format writes, reads and checks a part."""

    #: Appended to a part's name: "" for a directory.
    SUFFIX: str

    def write_part(
        self, path: Path, arrays: PartArrays, codec: CodecInfo, chunk_bytes: int
    ) -> None:
        """Write `arrays` as a new part at `path` (which must not exist yet)."""
        ...

    def read_part(self, path: Path, names: tuple[str, ...]) -> PartArrays:
        """The arrays `names` of a part (`format.array_names` of its target kind)."""
        ...

    def read_rows(self, path: Path, name: str, start: int, stop: int) -> np.ndarray:
        """Rows `start:stop` of one array."""
        ...

    def iter_chunks(self, path: Path, name: str) -> Iterator[tuple[int, np.ndarray]]:
        """(chunk index, data) of every stored chunk of one array, checksums checked."""
        ...

    def check_part(
        self, path: Path, expected: dict[str, tuple[tuple[int, ...], str]], listed: set[str]
    ) -> None:
        """Raise ValueError (or OSError) where the part's own metadata disagrees with the
        manifest's `expected` {array: (shape, dtype)}; `listed` are its files, relative to it."""
        ...

    def file_problems(self, base: Path, part: PartInfo) -> list[tuple[str, str]]:
        """(file, why) for each file of `part` (under the parts directory `base`) whose own
        structure is damaged, reading a few bytes per file, never the data (`logitcache info`)."""
        ...

    def array_bytes(self, base: Path, part: PartInfo) -> dict[str, int]:
        """On-disk bytes of `part` (under `base`) by array, metadata under its own name."""
        ...


def _zarr() -> Backend:
    from logitcache.storage import zarr_backend

    return zarr_backend


def _parquet() -> Backend:
    from logitcache.storage import parquet_backend

    return parquet_backend


_REGISTRY: dict[str, Callable[[], Backend]] = {"zarr": _zarr, "parquet": _parquet}
assert tuple(_REGISTRY) == BACKENDS, "the registry must know exactly the format's backends"


def get_backend(name: str) -> Backend:
    """The backend called `name`; an unknown name is an error listing the known ones."""
    if name not in _REGISTRY:
        raise LogitCacheError(f"unknown format {name!r}; choose one of: {', '.join(BACKENDS)}.")
    return _REGISTRY[name]()


def part_path(root: Path, backend: str, name: str) -> Path:
    """Where part `name` lives under cache `root`."""
    return root / PARTS_DIR / (name + get_backend(backend).SUFFIX)
