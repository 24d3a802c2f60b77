"""The local mirror of fetched parts: remote caches' parts on local disk, bounded in size.

A reader of a remote cache (`logitcache.storage.stores.RemoteStore`) opens each part from here:
fetched once, every file checked against its sha256 in the manifest, evicted least recently used
beyond a size limit, and shared safely by concurrent readers (DataLoader workers, several runs).
Environment:

``LOGITCACHE_CACHE_DIR``
    where fetched parts are kept (default ``~/.cache/logitcache``).
``LOGITCACHE_CACHE_SIZE``
    the local cache's size limit, e.g. ``"10GB"`` (default), ``"500MiB"``; least recently used
    parts are evicted beyond it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from logitcache.errors import CorruptCacheError, LogitCacheError
from logitcache.format.manifest import PARTS_DIR, PartInfo
from logitcache.storage.files import sha256_file, temporary_sibling
from logitcache.storage.stores import RemoteStore

__all__ = ["DEFAULT_CACHE_SIZE", "FETCH_STATS", "PartMirror", "default_cache_dir", "parse_size"]

DEFAULT_CACHE_SIZE = "10GB"

#: Fetches made by this process (tests and benchmarks read it): files and bytes downloaded.
FETCH_STATS = {"files": 0, "bytes": 0}


def parse_size(text: str) -> int:
    """Bytes in a size such as "10GB", "500MiB", "1.5 TB" or "123"."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)([bB]?)\s*", text)
    if not match:
        raise LogitCacheError(
            f"LOGITCACHE_CACHE_SIZE {text!r} is not a size; write it like 10GB or 500MiB."
        )
    number, unit, binary, _ = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(unit.upper() or " "))


def default_cache_dir() -> Path:
    configured = os.environ.get("LOGITCACHE_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "logitcache"


@contextlib.contextmanager
def _flock(path: Path, mode: int, blocking: bool = True) -> Iterator[bool]:
    """Hold an flock on `path` (created if needed); yields False if non-blocking and busy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, mode | (0 if blocking else fcntl.LOCK_NB))
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN) and not blocking:
                yield False
                return
            raise
        yield True
    finally:
        os.close(fd)


class PartMirror:
    """Fetched parts of remote caches, on local disk, bounded in size (least recently used out).

    Layout under the cache directory::

        parts/<key>/<files of the part, at their paths under the cache's parts/>
        parts/<key>/.complete      written once every file is fetched and its sha256 checked;
                                   its mtime is the entry's last use, its content the size
        locks/<key>.lock           fetchers hold it exclusively, readers shared: no eviction
                                   under a reader's feet, no part fetched twice at once

    ``key`` is a hash of the part's name and its files' sha256s in the manifest, so an entry is
    valid for exactly that content whatever the URL, and a re-dumped cache never reads a stale
    file. Files are trusted once their sha256 matched: a second epoch reads them without a
    download or a rehash.
    """

    def __init__(
        self, store: RemoteStore, cache_dir: str | Path | None = None, size_limit: int | None = None
    ) -> None:
        self.store = store
        self.dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        if size_limit is None:
            size_limit = parse_size(os.environ.get("LOGITCACHE_CACHE_SIZE", DEFAULT_CACHE_SIZE))
        self.size_limit = size_limit

    @staticmethod
    def key(part: PartInfo) -> str:
        doc = json.dumps([part.name, sorted(part.files.items())], separators=(",", ":"))
        return hashlib.sha256(doc.encode()).hexdigest()[:40]

    def entry(self, part: PartInfo) -> Path:
        return self.dir / PARTS_DIR / self.key(part)

    @contextlib.contextmanager
    def using(self, part: PartInfo, refresh: bool = False) -> Iterator[Path]:
        """The local directory holding `part`'s files (keys of ``part.files`` below it),
        fetched if needed (always, with `refresh`: `verify` checks the store, not a local
        copy); not evicted while the block runs (its lock is held shared)."""
        entry = self.entry(part)
        lock = self.dir / "locks" / f"{entry.name}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fetched = False
            while True:
                fcntl.flock(fd, fcntl.LOCK_SH)
                if not refresh and self._touch(entry):
                    break
                fcntl.flock(fd, fcntl.LOCK_UN)
                fcntl.flock(fd, fcntl.LOCK_EX)  # one fetcher per part; readers wait for it
                if refresh or not self._touch(entry):
                    refresh = False
                    self._fetch(part, entry)
                    fetched = True
                fcntl.flock(fd, fcntl.LOCK_SH)  # not atomic: check it was not evicted meanwhile
                if self._touch(entry):
                    break
            if fetched:
                self.evict()  # skips every entry in use, this one included
            yield entry
        finally:
            os.close(fd)

    def ensure(self, part: PartInfo, refresh: bool = False) -> Path:
        """Fetch `part` if needed; its local directory (may be evicted later by others)."""
        with self.using(part, refresh) as entry:
            return entry

    @staticmethod
    def _touch(entry: Path) -> bool:
        marker = entry / ".complete"
        try:
            os.utime(marker)
        except FileNotFoundError:
            return False
        return True

    def _fetch(self, part: PartInfo, entry: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            (entry / ".complete").unlink()
        if entry.exists():
            shutil.rmtree(entry)  # an interrupted fetch, or a refresh
        size = 0
        for rel, expected in part.files.items():
            dest = entry / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = temporary_sibling(dest)
            where = self.store.describe(f"{PARTS_DIR}/{rel}")
            try:
                self.store.get_file(f"{PARTS_DIR}/{rel}", tmp)
            except FileNotFoundError as exc:
                shutil.rmtree(entry, ignore_errors=True)
                raise CorruptCacheError(
                    f"{where}: missing (listed in the manifest but not in the store). The cache "
                    "is damaged: re-upload it, or re-dump the part."
                ) from exc
            actual = sha256_file(tmp)
            if actual != expected:
                shutil.rmtree(entry, ignore_errors=True)
                raise CorruptCacheError(
                    f"{where}: sha256 does not match the manifest (the object was changed or "
                    "corrupted). Re-upload the cache or re-dump the part."
                )
            os.replace(tmp, dest)
            nbytes = dest.stat().st_size
            size += nbytes
            FETCH_STATS["files"] += 1
            FETCH_STATS["bytes"] += nbytes
        marker = entry / ".complete"
        entry.mkdir(parents=True, exist_ok=True)
        tmp_marker = entry / f".complete.{uuid.uuid4().hex}.tmp"
        tmp_marker.write_text(json.dumps({"size": size, "url": self.store.url}), encoding="utf-8")
        os.replace(tmp_marker, marker)

    def evict(self, keep: str | None = None) -> None:
        """Remove least recently used entries until the total is within the size limit."""
        parts_dir = self.dir / PARTS_DIR
        with _flock(self.dir / "locks" / "evict.lock", fcntl.LOCK_EX):
            entries = []
            for entry in parts_dir.iterdir() if parts_dir.is_dir() else ():
                marker = entry / ".complete"
                try:
                    stat = marker.stat()
                    size = int(json.loads(marker.read_text(encoding="utf-8"))["size"])
                except (OSError, ValueError, KeyError, TypeError):
                    self._drop(entry)  # an interrupted fetch, unless one is running
                    continue
                entries.append((stat.st_mtime, size, entry))
            total = sum(size for _, size, _ in entries)
            for _, size, entry in sorted(entries, key=lambda e: e[0]):
                if total <= self.size_limit:
                    break
                if entry.name != keep and self._drop(entry):
                    total -= size

    def _drop(self, entry: Path) -> bool:
        with _flock(
            self.dir / "locks" / f"{entry.name}.lock", fcntl.LOCK_EX, blocking=False
        ) as free:
            if not free:
                return False  # being fetched or read
            with contextlib.suppress(FileNotFoundError):
                (entry / ".complete").unlink()
            shutil.rmtree(entry, ignore_errors=True)
            return True
