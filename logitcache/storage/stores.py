"""Caches in object stores: move whole files between a cache URL and local disk.

A cache location is a local path or a URL (``s3://``, ``gs://``, ``az://``, ``memory://``, any
protocol fsspec knows). The format code never sees a URL: writers stage each part on local disk
exactly as for a local cache and upload it (`logitcache.write.remote_writer`), and readers fetch the
files of a part into a bounded local cache before the backends open them
(`logitcache.storage.mirror`). This module does the moving, with retries and exponential backoff on transient errors and one clear
`LogitCacheError` after the last try.

Credentials come from the standard places through fsspec (for S3: ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_PROFILE`` / ``~/.aws``, ``AWS_ENDPOINT_URL`` for S3-compatible
servers; for GCS and Azure the gcsfs/adlfs defaults). Environment:

``LOGITCACHE_ANON=1``
    anonymous access (public buckets); or append ``?anon`` to the URL.
``LOGITCACHE_STORAGE_OPTIONS``
    a JSON object of extra fsspec options, e.g. ``{"endpoint_url": "https://..."}``.
``LOGITCACHE_RETRIES`` / ``LOGITCACHE_RETRY_WAIT``
    retries after a transient error (default 5) and the first wait in seconds (default 0.5,
    doubled each time, at most 30 s).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from logitcache.errors import LogitCacheError
from logitcache.storage.files import bytes_under

__all__ = ["RemoteStore", "disk_usage", "display", "is_remote", "local_path"]

T = TypeVar("T")

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
    return bytes_under(local_path(location))


def display(location: str | os.PathLike[str]) -> str:
    """A location for messages: a URL without its query, or the path as given."""
    return _split_query(str(location))[0] if is_remote(location) else str(location)
