"""Caches in object stores: move whole files between a cache URL and local disk.

A cache location is a local path or a URL (``s3://``, ``gs://``, ``az://``, ``memory://``, any
protocol fsspec knows). The format code never sees a URL: writers stage each part on local disk
exactly as for a local cache and upload it (`logitcache.write.remote_writer`), and readers fetch the
files of a part into a bounded local cache before the backends open them (`PartMirror`). This
module does the moving, with retries and exponential backoff on transient errors and one clear
`LogitCacheError` after the last try.

Credentials come from the standard places through fsspec (for S3: ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_PROFILE`` / ``~/.aws``, ``AWS_ENDPOINT_URL`` for S3-compatible
servers; for GCS and Azure the gcsfs/adlfs defaults). Environment:

``LOGITCACHE_ANON=1``
    anonymous access (public buckets); or append ``?anon`` to the URL.
``LOGITCACHE_STORAGE_OPTIONS``
    a JSON object of extra fsspec options, e.g. ``{"endpoint_url": "https://..."}``.
``LOGITCACHE_CACHE_DIR``
    where fetched parts are kept (default ``~/.cache/logitcache``).
``LOGITCACHE_CACHE_SIZE``
    the local cache's size limit, e.g. ``"10GB"`` (default), ``"500MiB"``; least recently used
    parts are evicted beyond it.
``LOGITCACHE_RETRIES`` / ``LOGITCACHE_RETRY_WAIT``
    retries after a transient error (default 5) and the first wait in seconds (default 0.5,
    doubled each time, at most 30 s).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from logitcache.errors import CorruptCacheError, LogitCacheError
from logitcache.format.manifest import PARTS_DIR, PartInfo

T = TypeVar("T")

DEFAULT_CACHE_SIZE = "10GB"
#: Extras that provide each protocol (pip install "logitcache[EXTRA]").
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure"}
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+)://")
#: Errors that a retry may cure, by class name anywhere in the exception's MRO (botocore and
#: aiohttp errors do not derive from OSError).
_TRANSIENT_NAMES = {
    "ConnectionError", "EndpointConnectionError", "HTTPClientError", "ReadTimeoutError",
    "ConnectTimeoutError", "IncompleteReadError", "ResponseStreamingError", "ClientPayloadError",
    "ServerDisconnectedError", "ClientConnectorError", "ClientOSError", "ServerTimeoutError",
    "FSTimeoutError", "TimeoutError",
}  # fmt: skip
_PERMANENT_OS_ERRORS = (
    FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError,
)  # fmt: skip

#: Fetches made by this process (tests and benchmarks read it): files and bytes downloaded.
FETCH_STATS = {"files": 0, "bytes": 0}


def is_remote(location: str | os.PathLike[str]) -> bool:
    """True for a URL with a protocol other than ``file://``; False for a local path."""
    match = _URL.match(str(location))
    return bool(match) and match.group(1).lower() not in ("file", "local")


def local_path(location: str | os.PathLike[str]) -> Path:
    """A local location as a Path (``file://`` stripped)."""
    text = str(location)
    return Path(text[len("file://") :] if text.lower().startswith("file://") else text)


def _env_options(protocol: str, anon: bool) -> dict[str, Any]:
    # Not fsspec's shared instance, which ignores the environment it was made from (endpoint,
    # credentials): `RemoteStore.fs` keeps its own, keyed on that environment too.
    options: dict[str, Any] = {"skip_instance_cache": True}
    if protocol in ("s3", "s3a"):
        # Our retry loop owns retries: the client tries once, so failures surface quickly.
        options["config_kwargs"] = {"retries": {"max_attempts": 1}}
    raw = os.environ.get("LOGITCACHE_STORAGE_OPTIONS")
    if raw:
        try:
            extra = json.loads(raw)
        except ValueError as exc:
            raise LogitCacheError(
                f"LOGITCACHE_STORAGE_OPTIONS is not valid JSON ({exc}); give a JSON object of "
                'fsspec options, e.g. {"endpoint_url": "https://..."}.'
            ) from exc
        if not isinstance(extra, dict):
            raise LogitCacheError("LOGITCACHE_STORAGE_OPTIONS must be a JSON object.")
        options.update(extra)
    if anon:
        if protocol in ("gs", "gcs"):
            options["token"] = "anon"
        elif protocol != "memory":
            options["anon"] = True
    return options


def _split_query(url: str) -> tuple[str, bool]:
    """(url without its query, anonymous?) — the only query understood is ``?anon``."""
    base, _, query = url.partition("?")
    anon = os.environ.get("LOGITCACHE_ANON", "").lower() in ("1", "true", "yes")
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        if key != "anon":
            raise LogitCacheError(
                f"{url}: unknown URL option {key!r}; the only one is ?anon (anonymous access)."
            )
        anon = value.lower() not in ("0", "false", "no")
    return base.rstrip("/"), anon


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, _PERMANENT_OS_ERRORS):
        return False
    if isinstance(exc, (OSError, TimeoutError)):
        return True
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "NoCredentialsError" in names or "PartialCredentialsError" in names:
        return False
    return bool(names & _TRANSIENT_NAMES) or type(exc).__module__.startswith("aiohttp")


def _retry_settings() -> tuple[int, float]:
    try:
        retries = int(os.environ.get("LOGITCACHE_RETRIES", "5"))
        wait = float(os.environ.get("LOGITCACHE_RETRY_WAIT", "0.5"))
    except ValueError as exc:
        raise LogitCacheError(
            f"LOGITCACHE_RETRIES / LOGITCACHE_RETRY_WAIT must be numbers ({exc})."
        ) from exc
    return max(0, retries), max(0.0, wait)


class RemoteStore:
    """One cache's location in an object store; every operation retried on transient errors.

    Paths are relative to the cache root, with ``/`` separators (``manifest.json``,
    ``parts/part-000000/zarr.json``). Picklable, and safe across fork: each process makes its own
    client on first use (a DataLoader worker cannot reuse its parent's event loop).
    """

    def __init__(self, url: str) -> None:
        self.url, self.anon = _split_query(str(url))
        self.protocol = _URL.match(self.url).group(1).lower()  # type: ignore[union-attr]
        self.options = _env_options(self.protocol, self.anon)
        self._fs: Any = None
        self._root = ""
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_fs": None, "_pid": -1}

    def __repr__(self) -> str:
        return f"RemoteStore({self.url!r})"

    @property
    def fs(self) -> Any:
        if self._fs is None or self._pid != os.getpid():
            import fsspec

            try:
                cls = fsspec.get_filesystem_class(self.protocol)
                kwargs = {**cls._get_kwargs_from_urls(self.url), **self.options}
                key = (self.protocol, repr(sorted(kwargs.items())), _client_env(), os.getpid())
                if key not in _FILESYSTEMS:
                    _FILESYSTEMS[key] = cls(**kwargs)
                self._fs = _FILESYSTEMS[key]
                self._root = cls._strip_protocol(self.url)
            except ImportError as exc:
                extra = _EXTRAS.get(self.protocol)
                hint = f' (pip install "logitcache[{extra}]")' if extra else ""
                raise LogitCacheError(f"cannot open {self.url}: {exc}{hint}.") from exc
            except ValueError as exc:
                raise LogitCacheError(f"cannot open {self.url}: {exc}.") from exc
            if self.protocol in ("s3", "s3a"):
                self._fs.retries = 1  # s3fs's own retry loop: ours (`_call`) owns retries
            self._root = self._root.rstrip("/")
            self._pid = os.getpid()
        return self._fs

    def path(self, rel: str = "") -> str:
        """The store path of `rel` (relative to the cache root)."""
        fs = self.fs
        del fs  # resolves self._root
        return f"{self._root}/{rel}" if rel else self._root

    def describe(self, rel: str = "") -> str:
        return f"{self.url}/{rel}" if rel else self.url

    def _call(self, what: str, rel: str, fn: Callable[[], T]) -> T:
        """`fn()`, retried with exponential backoff and jitter while the error is transient."""
        retries, wait = _retry_settings()
        for attempt in range(retries + 1):
            try:
                return fn()
            except LogitCacheError:
                raise
            except Exception as exc:
                if isinstance(exc, FileNotFoundError):
                    raise
                names = {cls.__name__ for cls in type(exc).__mro__}
                if isinstance(exc, PermissionError) or "NoCredentialsError" in names:
                    raise LogitCacheError(
                        f"access to {self.describe(rel)} was refused ({_short(exc)}). Check the "
                        "credentials (for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or "
                        "AWS_PROFILE), or set LOGITCACHE_ANON=1 (or add ?anon to the URL) for a "
                        "public bucket."
                    ) from exc
                if not _is_transient(exc):
                    raise LogitCacheError(
                        f"cannot {what} {self.describe(rel)}: {_short(exc)}."
                    ) from exc
                if attempt == retries:
                    raise LogitCacheError(
                        f"cannot {what} {self.describe(rel)} after {attempt + 1} attempts: "
                        f"{_short(exc)}. Check the network and the endpoint (AWS_ENDPOINT_URL "
                        "for S3-compatible servers), then rerun: finished work is kept."
                    ) from exc
                time.sleep(min(30.0, wait * 2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    # ---- operations -----------------------------------------------------------------------
    def read_bytes(self, rel: str, limit: int | None = None) -> bytes | None:
        """The object (at most its first `limit` bytes), or None if it does not exist."""
        try:
            return self._call(
                "read", rel, lambda: self.fs.cat_file(self.path(rel), start=0, end=limit)
            )
        except FileNotFoundError:
            return None

    def write_bytes(self, rel: str, data: bytes) -> None:
        self._call("write", rel, lambda: self.fs.pipe_file(self.path(rel), data))

    def get_file(self, rel: str, dest: Path) -> None:
        """Download `rel` to the local file `dest` (FileNotFoundError if it does not exist)."""
        self._call("download", rel, lambda: self.fs.get_file(self.path(rel), str(dest)))

    def put_file(self, src: Path, rel: str) -> None:
        self._call("upload to", rel, lambda: self.fs.put_file(str(src), self.path(rel)))

    def copy_within(self, other: RemoteStore, src_rel: str, rel: str) -> None:
        """Server-side copy of `other`'s `src_rel` to `rel` (both in this same filesystem)."""
        self._call("copy to", rel, lambda: self.fs.copy(other.path(src_rel), self.path(rel)))

    def same_filesystem(self, other: RemoteStore) -> bool:
        return self.protocol == other.protocol and self.options == other.options

    def list_files(self, rel: str = "") -> dict[str, int]:
        """{path relative to the cache root: size} of every object under `rel`."""
        root = self.path(rel)

        def find() -> dict[str, int]:
            self.fs.invalidate_cache(root)
            try:
                found = self.fs.find(root, detail=True)
            except FileNotFoundError:
                return {}
            return {
                name: int(entry.get("size") or 0)
                for name, entry in found.items()
                if entry.get("type", "file") == "file"
            }

        base = self.path()
        files = self._call("list", rel, find)
        return {name[len(base) + 1 :]: size for name, size in files.items()}

    def remove(self, rels: list[str]) -> None:
        """Delete objects (missing ones are fine)."""
        for rel in rels:
            with contextlib.suppress(FileNotFoundError):
                self._call("delete", rel, lambda r=rel: self.fs.rm_file(self.path(r)))


#: One client per (protocol, options, credential environment, process): reused by every store
#: made with them (a new client costs ~0.2 s, mostly loading the service description), and a
#: new one when the environment that configured it (endpoint, credentials) has changed.
_FILESYSTEMS: dict[tuple, Any] = {}
_CLIENT_ENV = ("AWS_", "BOTO", "GOOGLE_", "GCS", "AZURE_", "FSSPEC_")


def _client_env() -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_CLIENT_ENV)))


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) < 300 else text[:300] + "..."


def disk_usage(location: str | os.PathLike[str]) -> int:
    """Bytes stored at a cache location: every file under it (local or remote)."""
    if is_remote(location):
        return sum(RemoteStore(str(location)).list_files().values())
    root = local_path(location)
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def display(location: str | os.PathLike[str]) -> str:
    """A location for messages: a URL without its query, or the path as given."""
    return _split_query(str(location))[0] if is_remote(location) else str(location)


# --------------------------------------------------------------------------------------------
# The local cache of fetched parts


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


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


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
            tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
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
