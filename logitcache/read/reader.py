"""Reading a cache: `logitcache.open(path)` and the `Cache` it returns.

The reader trusts only the manifest: it lists the committed parts, and nothing else under the
cache root is ever opened. Before a part is decoded, every file it lists must be a regular file
inside the cache root, and the backend checks the part's array metadata (shapes, types, chunk
sizes) against the manifest, so nothing is allocated from unchecked sizes. It imports no writer
and no teacher code, so a trainer can depend on it alone.

A cache may also live in an object store (``s3://...``, see `logitcache.storage.stores`): the manifest
is fetched, and each part's files are fetched on first use into a bounded local cache,
sha256-checked against the manifest, and read from there.
"""

from __future__ import annotations

import bisect
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from logitcache.errors import CorruptCacheError, LogitCacheError
from logitcache.format.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    PARTS_DIR,
    RAGGED_KINDS,
    DataInfo,
    Manifest,
    PartArrays,
    array_names,
    expected_arrays,
)
from logitcache.format.parse import parse_manifest
from logitcache.format.shards import covers
from logitcache.read.decoded import (
    TOKEN_ARRAYS,
    CacheSequence,
    decode,
    split_sequences,
    to_sequence,
)
from logitcache.storage import files, stores
from logitcache.storage.backend import get_backend
from logitcache.storage.mirror import PartMirror
from logitcache.storage.paths import link_problem, link_under, refuse_links

if TYPE_CHECKING:
    import datasets

#: (path, size, mtime) of the local part files whose sha256 this process has checked.
_HASHED: set[tuple[str, int, int]] = set()


def open(
    path: str | Path, *, allow_partial: bool = False, cache_dir: str | Path | None = None
) -> Cache:
    """Open the cache at `path` (a directory, or a URL such as ``s3://bucket/cache``).

    A cache whose dump has not finished is refused unless `allow_partial` (then only its
    committed parts are visible). For a URL, fetched parts are kept under `cache_dir` (default:
    ``LOGITCACHE_CACHE_DIR`` or ``~/.cache/logitcache``), see `logitcache.storage.stores`.
    """
    if stores.is_remote(path):
        return _open_remote(str(path), allow_partial, cache_dir)
    root = stores.local_path(path)
    manifest_path = root / MANIFEST_NAME
    if not root.exists():
        raise LogitCacheError(f"no cache at {root}: the path does not exist. Check the cache path.")
    refuse_links(root)  # before the manifest is opened: a link there leads elsewhere
    if not manifest_path.is_file():
        raise LogitCacheError(
            f"{root} is not a logitcache cache (no {MANIFEST_NAME}). "
            "Point to the directory that `logitcache dump --out` wrote."
        )
    with manifest_path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_MANIFEST_BYTES:  # refused unread (read(n) would allocate n bytes first)
            raise CorruptCacheError(
                f"{manifest_path} is {size} bytes, over the {MAX_MANIFEST_BYTES} limit."
            )
        text = f.read(size + 1)
    manifest = parse_manifest(text, str(manifest_path))
    _check_complete(manifest, root, allow_partial)
    return Cache(root, manifest)


def _open_remote(url: str, allow_partial: bool, cache_dir: str | Path | None) -> Cache:
    store = stores.RemoteStore(url)
    text = store.read_bytes(MANIFEST_NAME, limit=MAX_MANIFEST_BYTES + 1)
    if text is None:
        raise LogitCacheError(
            f"no cache at {store.url}: it holds no {MANIFEST_NAME}. Check the URL (and, for an "
            "S3-compatible server, AWS_ENDPOINT_URL)."
        )
    manifest = parse_manifest(text, store.describe(MANIFEST_NAME))
    _check_complete(manifest, store.url, allow_partial)
    return Cache(store.url, manifest, mirror=PartMirror(store, cache_dir))


def completeness_problem(manifest: Manifest, where: object) -> str | None:
    """Why a reader refuses the cache at `where` as unfinished, or None when its dump finished.

    One text for `open` and `logitcache verify`, so that verify fails on exactly what a reader
    refuses (an interrupted dump, or the 0-part directory a failed one leaves) and says why."""
    if manifest.complete:
        return None
    return (
        f"{where} is an unfinished dump ({len(manifest.parts)} parts committed). Rerun the same "
        "`logitcache dump` command to finish it."
    )


def _check_complete(manifest: Manifest, where: object, allow_partial: bool) -> None:
    problem = completeness_problem(manifest, where)
    if problem is not None and not allow_partial:
        raise LogitCacheError(problem)


class Cache:
    """A read-only view of a cache: `len()`, `cache[i]`, iteration in storage order.

    `root` is the cache directory (a Path), or the URL (a str) of a cache in an object store,
    whose parts `mirror` fetches into the local cache directory.
    """

    def __init__(
        self, root: Path | str, manifest: Manifest, mirror: PartMirror | None = None
    ) -> None:
        self.root = root
        self.manifest = manifest
        self.mirror = mirror
        self.backend = get_backend(manifest.backend)
        self._part_starts = np.cumsum([0] + [p.sequences for p in manifest.parts]).tolist()
        self._checked: set[tuple[str, int]] = set()

    def __getstate__(self) -> dict[str, Any]:  # picklable (spawned DataLoader workers)
        return self.__dict__ | {"backend": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.backend = get_backend(self.manifest.backend)

    @property
    def is_remote(self) -> bool:
        return self.mirror is not None

    @property
    def location(self) -> str:
        """The cache's URL, or its directory as an absolute path."""
        return self.root if isinstance(self.root, str) else str(Path(self.root).resolve())

    def __len__(self) -> int:
        return self.manifest.sequences

    def holds_data(self, data: DataInfo) -> bool:
        """Whether this cache holds the targets of `data`, whole and in its order: dumped from
        it, or merged from the caches of every `--shard I/N` of one dump of it, in shard order."""
        m = self.manifest
        inputs = [i.data for i in m.merged_from] or [m.data]
        return m.data.fingerprint == data.fingerprint or covers(data, inputs)

    @property
    def num_parts(self) -> int:
        return len(self.manifest.parts)

    def parts_dir(self, index: int, refresh: bool = False) -> Path:
        """The local directory under which part `index`'s files (the keys of its ``files``)
        are: the cache's parts/, or for a remote cache its entry in the local cache, fetched
        (again, with `refresh`) and sha256-checked first."""
        if self.mirror is None:
            return Path(self.root) / PARTS_DIR
        return self.mirror.ensure(self.manifest.parts[index], refresh)

    @contextlib.contextmanager
    def open_part(self, index: int) -> Iterator[Path]:
        """The local path of part `index`, its files and metadata checked; for a remote cache
        fetched first and kept from eviction until the block ends."""
        info = self.manifest.parts[index]
        if self.mirror is None:
            base = Path(self.root) / PARTS_DIR
            self._check_part(base, index)
            yield base / (info.name + self.backend.SUFFIX)
            return
        with self.mirror.using(info) as base:
            self._check_part(base, index)
            yield base / (info.name + self.backend.SUFFIX)

    def part_path(self, index: int) -> Path:
        """The local path of part `index` (checked; fetched first for a remote cache)."""
        with self.open_part(index) as path:
            return path

    def refuse_links(self) -> None:
        """Refuse a symbolic link anywhere on the path to a listed file, for every part at once:
        what a command that writes elsewhere checks of its inputs before it deletes or writes
        anything (`open` checks the manifest and parts/, each read checks its own part). A
        remote cache's files are fetched into the local cache, never linked: nothing to do."""
        if self.mirror is None:
            refuse_links(Path(self.root), self.manifest)

    def _check_part(self, base: Path, index: int) -> None:
        """Every listed file is a regular file under `base` reached through no symbolic link
        (manifest keys hold no ``..``, so it is inside the cache), and the backend's metadata
        agrees with the manifest: checked before anything of the part is decoded."""
        key = (str(base), index)
        if key in self._checked:
            return
        info = self.manifest.parts[index]
        for rel in info.files:
            link = link_under(base, rel)
            if link is not None:
                raise CorruptCacheError(f"{info.name} of {self.root}: {link_problem(link)}")
            if not (base / rel).is_file():
                raise CorruptCacheError(
                    f"{info.name} of {self.root}: {PARTS_DIR}/{rel} is missing. Run "
                    "`logitcache verify` on the cache."
                )
        path = base / (info.name + self.backend.SUFFIX)
        listed = {rel[len(path.name) + 1 :] for rel in info.files if "/" in rel}
        try:
            self.backend.check_part(path, expected_arrays(self.manifest, info), listed)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise CorruptCacheError(
                f"{info.name} of {self.root} does not match its manifest entry: {exc}. "
                "Run `logitcache verify` on it."
            ) from exc
        self._checked.add(key)

    def check_part_files(self, index: int) -> None:
        """Every file of part `index` exists and matches its sha256 in the manifest, or a
        `CorruptCacheError` naming the part and the file: what a trainer checks before it first
        decodes a part (a flipped byte, a truncated file or a manifest copied from another
        cache is reported, instead of trained on). A remote cache's part is fetched into the
        local cache if it is not there yet, and fetching checks every sha256. A local file this
        process already checked, unchanged since (same size and mtime), is not hashed again."""
        info = self.manifest.parts[index]
        if self.mirror is not None:
            self.mirror.ensure(info)
            return
        base = Path(self.root) / PARTS_DIR
        for rel, expected in info.files.items():
            link = link_under(base, rel)
            if link is not None:  # checked before hashing: never read through a link
                raise CorruptCacheError(f"{info.name} of {self.root}: {link_problem(link)}")
            path = base / rel
            try:
                st = os.stat(path)
            except OSError:
                raise CorruptCacheError(
                    f"{info.name} of {self.root}: {PARTS_DIR}/{rel} is missing. Run "
                    "`logitcache verify` on the cache."
                ) from None
            key = (str(path), st.st_size, st.st_mtime_ns)
            if key in _HASHED:
                continue
            if files.sha256_file(path) != expected:
                raise CorruptCacheError(
                    f"{info.name} of {self.root}: {PARTS_DIR}/{rel} does not match its sha256 in "
                    "the manifest (the file was changed, truncated or corrupted, or the manifest "
                    "belongs to another cache). Run `logitcache verify` on the cache."
                )
            _HASHED.add(key)

    def read_part(self, index: int) -> PartArrays:
        """Every array of part `index` as stored, checked against the manifest's counts (for
        training use `read_decoded`: the same view for every target kind and codec)."""
        info = self.manifest.parts[index]
        try:
            with self.open_part(index) as path:
                names = array_names(
                    self.manifest.targets.kind,
                    self.manifest.task,
                    self.manifest.layout.offsets,
                    masked=self.manifest.masking is not None,
                )
                arrays = self.backend.read_part(path, names)
        except (OSError, ValueError, RuntimeError) as exc:
            raise CorruptCacheError(
                f"cannot read {info.name} of {self.root}: {exc}. Run `logitcache verify` on it."
            ) from exc
        k = self.manifest.targets.k
        shapes = {
            name: shape
            for name, (shape, _) in expected_arrays(self.manifest, info).items()
            if name != "seq_offsets"
        }
        if (
            arrays.sequences != info.sequences
            or arrays.tokens != info.tokens
            or any(
                getattr(arrays, name) is None or getattr(arrays, name).shape != shape
                for name, shape in shapes.items()
            )
        ):
            raise CorruptCacheError(
                f"{info.name} of {self.root} does not match its manifest entry "
                f"({info.sequences} sequences, {info.tokens} tokens, k={k})."
            )
        if arrays.target_lengths is not None:  # Parquet stores no type for them: the manifest's
            dtype = np.dtype(self.manifest.targets.count_dtype)
            arrays.target_lengths = arrays.target_lengths.astype(dtype, copy=False)
        return arrays

    def read_decoded(self, index: int) -> PartArrays:
        """Part `index` in the uniform view: ``target_ids`` (tokens, w) and ``target_logprobs``
        (tokens, w) in decreasing order, ``-inf`` on unused slots (see `CacheSequence`)."""
        where = f"{self.manifest.parts[index].name} of {self.root}"
        return decode(self.manifest, self.read_part(index), where)

    def part_span(self, index: int) -> tuple[int, int]:
        """(first, stop): the global indices of part `index`'s sequences are first..stop-1."""
        return self._part_starts[index], self._part_starts[index + 1]

    def to_hf_dataset(self) -> datasets.IterableDataset:
        """The cache as a streaming `datasets.IterableDataset`, one shard per part, read in
        place (no copy): ``.shuffle(seed, buffer_size)`` and ``.set_epoch`` reshuffle parts and
        sequences; see `logitcache.read.hf` for the fields. Imports `datasets` on first use."""
        from logitcache.read.hf import to_hf_dataset

        return to_hf_dataset(self)

    def locate(self, index: int) -> tuple[int, int]:
        """(part index, sequence index within the part) of global sequence `index`."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"sequence {index} out of range for a cache of {len(self)}")
        index %= len(self)
        part = bisect.bisect_right(self._part_starts, index) - 1
        return part, index - self._part_starts[part]

    def __getitem__(self, index: int) -> CacheSequence:
        """One sequence, reading only the chunks it touches."""
        if self.manifest.task is not None:
            raise LogitCacheError(
                f"{self.root} is a classification cache: its sequences are examples with labels "
                "and views, read a part at a time with Cache.read_decoded(part)."
            )
        part, local = self.locate(index)
        read = self.backend.read_rows
        with self.open_part(part) as path:
            start, stop = (int(x) for x in read(path, "seq_offsets", local, local + 2))
            one = np.array([0, stop - start], dtype=np.int64)
            kind = self.manifest.targets.kind
            if self.manifest.masking is not None:
                rows = self._masked_rows(path, part, start, stop)
            elif kind in RAGGED_KINDS:  # the sequence's entries: from the lengths before it
                lengths = read(path, "target_lengths", 0, stop)
                first, last = (
                    int(lengths[:start].sum(dtype=np.int64)),
                    int(lengths.sum(dtype=np.int64)),
                )
                values = "target_counts" if kind == "sample" else "target_logprobs"
                rows = PartArrays(
                    **{"target_logprobs": None, values: read(path, values, first, last)},
                    input_ids=read(path, "input_ids", start, stop),
                    target_ids=read(path, "target_ids", first, last),
                    seq_offsets=one,
                    target_lengths=lengths[start:],
                )
            else:
                rows = PartArrays(*(read(path, n, start, stop) for n in TOKEN_ARRAYS), one)
        where = f"{self.manifest.parts[part].name} of {self.root}"
        decoded = decode(self.manifest, rows, where, first_sequence=local)
        return to_sequence(
            decoded.input_ids, decoded.target_ids, decoded.target_logprobs, decoded.target_labels
        )

    def _masked_rows(self, path: Path, part: int, start: int, stop: int) -> PartArrays:
        """Tokens `start:stop` of a masked-LM part (one sequence) as stored, with the target
        rows of its masked positions (found by a search in the part's `target_positions`)."""
        read = self.backend.read_rows
        masked = self.manifest.parts[part].masked
        positions = read(path, "target_positions", 0, masked).astype(np.int64)
        first, last = (int(i) for i in np.searchsorted(positions, [start, stop]))
        rows = PartArrays(
            input_ids=read(path, "input_ids", start, stop),
            target_ids=None,
            target_logprobs=None,
            seq_offsets=np.array([0, stop - start], dtype=np.int64),
            target_positions=positions[first:last] - start,
            target_labels=read(path, "target_labels", first, last),
        )
        if self.manifest.targets.kind == "topk":
            rows.target_ids = read(path, "target_ids", first, last)
            rows.target_logprobs = read(path, "target_logprobs", first, last)
            return rows
        lengths = read(path, "target_lengths", 0, last)
        a, b = int(lengths[:first].sum(dtype=np.int64)), int(lengths.sum(dtype=np.int64))
        rows.target_ids = read(path, "target_ids", a, b)
        rows.target_counts = read(path, "target_counts", a, b)
        rows.target_lengths = lengths[first:]
        return rows

    def iter_parts(self) -> Iterator[PartArrays]:
        """Every part's arrays as stored (`read_part`), in storage order."""
        for index in range(self.num_parts):
            yield self.read_part(index)

    def __iter__(self) -> Iterator[CacheSequence]:
        """Every sequence in storage order (uniform view), decompressing each part once."""
        for index in range(self.num_parts):
            yield from split_sequences(self.read_decoded(index))
