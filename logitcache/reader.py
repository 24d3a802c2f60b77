"""Reading a cache: `logitcache.open(path)` and the `Cache` it returns.

The reader trusts only the manifest: it lists the committed parts, and nothing else under the
cache root is ever opened. It imports no writer and no teacher code, so a trainer can depend on
it alone.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from logitcache.backends import get_backend, part_path
from logitcache.errors import CorruptCacheError, LogitCacheError
from logitcache.format import MANIFEST_NAME, Manifest, PartArrays, parse_manifest


@dataclass(frozen=True)
class CacheSequence:
    """One sequence: input ids (T,), target ids (T, k) and their log-probs (T, k) at T=1."""

    input_ids: torch.Tensor  # (T,) int64
    target_ids: torch.Tensor  # (T, k) int64
    target_logprobs: torch.Tensor  # (T, k) float32


def open(path: str | Path, *, allow_partial: bool = False) -> Cache:
    """Open the cache at `path` for reading.

    A cache whose dump has not finished is refused unless `allow_partial` (then only its
    committed parts are visible).
    """
    root = Path(path)
    manifest_path = root / MANIFEST_NAME
    if not root.exists():
        raise LogitCacheError(f"no cache at {root}: the path does not exist. Check --cache.")
    if not manifest_path.is_file():
        raise LogitCacheError(
            f"{root} is not a logitcache cache (no {MANIFEST_NAME}). "
            "Point to the directory that `logitcache dump --out` wrote."
        )
    manifest = parse_manifest(manifest_path.read_bytes(), str(manifest_path))
    if not manifest.complete and not allow_partial:
        raise LogitCacheError(
            f"{root} is an unfinished dump ({len(manifest.parts)} parts committed). Rerun the same "
            "`logitcache dump` command to finish it."
        )
    return Cache(root, manifest)


class Cache:
    """A read-only view of a cache: `len()`, `cache[i]`, iteration in storage order."""

    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root = root
        self.manifest = manifest
        self.backend = get_backend(manifest.backend)
        self._part_starts = np.cumsum([0] + [p.sequences for p in manifest.parts]).tolist()

    def __len__(self) -> int:
        return self.manifest.sequences

    @property
    def num_parts(self) -> int:
        return len(self.manifest.parts)

    def part_path(self, index: int) -> Path:
        return part_path(self.root, self.manifest.backend, self.manifest.parts[index].name)

    def read_part(self, index: int) -> PartArrays:
        """Every array of part `index`, checked against the manifest's counts."""
        info = self.manifest.parts[index]
        try:
            arrays = self.backend.read_part(self.part_path(index))
        except (OSError, ValueError, RuntimeError) as exc:
            raise CorruptCacheError(
                f"cannot read {info.name} of {self.root}: {exc}. Run `logitcache verify` on it."
            ) from exc
        k = self.manifest.targets.k
        if (
            arrays.sequences != info.sequences
            or arrays.tokens != info.tokens
            or arrays.input_ids.shape != (info.tokens,)
            or arrays.target_ids.shape != (info.tokens, k)
            or arrays.target_logprobs.shape != (info.tokens, k)
        ):
            raise CorruptCacheError(
                f"{info.name} of {self.root} does not match its manifest entry "
                f"({info.sequences} sequences, {info.tokens} tokens, k={k})."
            )
        return arrays

    def locate(self, index: int) -> tuple[int, int]:
        """(part index, sequence index within the part) of global sequence `index`."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"sequence {index} out of range for a cache of {len(self)}")
        index %= len(self)
        part = bisect.bisect_right(self._part_starts, index) - 1
        return part, index - self._part_starts[part]

    def __getitem__(self, index: int) -> CacheSequence:
        """One sequence, reading only the chunks it touches."""
        part, local = self.locate(index)
        path = self.part_path(part)
        start, stop = self.backend.read_rows(path, "seq_offsets", local, local + 2)
        rows = [self.backend.read_rows(path, n, int(start), int(stop)) for n in _TOKEN_ARRAYS]
        return _to_sequence(*rows)

    def iter_parts(self) -> Iterator[PartArrays]:
        for index in range(self.num_parts):
            yield self.read_part(index)

    def __iter__(self) -> Iterator[CacheSequence]:
        """Every sequence in storage order, decompressing each part once."""
        for arrays in self.iter_parts():
            yield from split_sequences(arrays)


_TOKEN_ARRAYS = ("input_ids", "target_ids", "target_logprobs")


def _to_sequence(input_ids: np.ndarray, ids: np.ndarray, logprobs: np.ndarray) -> CacheSequence:
    return CacheSequence(
        torch.from_numpy(input_ids.astype(np.int64)),
        torch.from_numpy(ids.astype(np.int64)),
        torch.from_numpy(logprobs.astype(np.float32)),
    )


def split_sequences(arrays: PartArrays) -> Iterator[CacheSequence]:
    """The sequences of one part, in order."""
    offsets = arrays.seq_offsets
    for s in range(arrays.sequences):
        a, b = int(offsets[s]), int(offsets[s + 1])
        yield _to_sequence(
            arrays.input_ids[a:b], arrays.target_ids[a:b], arrays.target_logprobs[a:b]
        )
