"""One writer per cache directory: a lock file, held with `flock` for as long as a dump runs.

A second `logitcache dump` into a directory that one is writing is refused with a message naming
the holder (host, pid, command, start time). The lock is the operating system's: it is released
when its holder exits, however it exits (even on SIGKILL or a crash), so a lock file left behind
by a process that died never blocks anyone. The file itself (`.logitcache.lock`, at the top of
the cache directory, not part of the format) holds the holder's description, is removed on a
clean exit, and is ignored by readers.

On a filesystem without working `flock` (some network filesystems return ENOLCK), the lock falls
back to creating the file exclusively: a file naming a process of this host that no longer runs
is stale and taken over; one naming another host is refused, with the path to delete if that
process is gone.

A cache at a URL (s3://...) has no lock: object stores have no lock primitive that every one of
them supports; run one dump per URL (docs/RELIABILITY.md).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from logitcache.errors import LogitCacheError
from logitcache.format.parse import load_json
from logitcache.storage.paths import link_problem

LOCK_NAME = ".logitcache.lock"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class CacheBusyError(LogitCacheError):
    """The cache is being written by another process (`holder` describes it)."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


def describe_self(what: str) -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": what,
        "argv": sys.argv[:8],
    }


class CacheLock:
    """`acquire()` or refuse; `release()` (also on `with` exit) removes the lock file."""

    def __init__(self, root: Path, what: str = "logitcache dump") -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self.what = what
        self._fd: int | None = None
        self._exclusive_file = False  # the fallback: we created the file with O_EXCL

    def __enter__(self) -> CacheLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._fd is not None or self._exclusive_file

    def acquire(self) -> None:
        for _ in range(20):  # retried only while other processes release and remove the file
            fd = self._open(os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise self._busy(holder) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in _NO_FLOCK:
                    self._acquire_exclusive()
                    return
                raise
            try:  # the holder before us may have removed the file it had locked: start over
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self._fd = fd
            _write(fd, describe_self(self.what))
            return
        raise LogitCacheError(f"could not take the lock {self.path}: it keeps changing.")

    def _open(self, flags: int) -> int:
        """The lock file, never through a symbolic link (the holder's details are written into
        it: a link could lead that write outside the cache)."""
        try:
            return os.open(self.path, flags | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise LogitCacheError(link_problem(self.path)) from None
            raise

    def _acquire_exclusive(self) -> None:
        """No flock here: create the file with O_EXCL; take over a stale one of this host."""
        for _ in range(3):
            try:
                fd = self._open(os.O_RDWR | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                with open(self.path, "rb") as f:
                    holder = _parse(f.read(65536))
                if holder.get("host") == socket.gethostname() and not _alive(holder.get("pid")):
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()  # stale: its process is gone
                    continue
                raise self._busy(holder, stale_hint=True) from None
            _write(fd, describe_self(self.what))
            os.close(fd)
            self._exclusive_file = True
            return
        raise LogitCacheError(f"could not take the lock {self.path}: it keeps changing.")

    def _busy(self, holder: dict[str, Any], stale_hint: bool = False) -> CacheBusyError:
        who = (
            f"{holder.get('command', 'a process')} (pid {holder.get('pid', '?')} on host "
            f"{holder.get('host', '?')}, started {holder.get('started', '?')})"
            if holder
            else "another process (which has not written its details yet)"
        )
        hint = (
            f" If that process is gone (this filesystem has no flock, so its lock outlives it), "
            f"delete {self.path}."
            if stale_hint
            else " Wait for it to finish, or stop it: a lock whose process died never blocks."
        )
        return CacheBusyError(
            f"{self.root} is being written by {who}; refusing to write into it at the same "
            f"time.{hint}",
            holder,
        )

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()  # while still holding it: nobody can lock this inode after
            os.close(self._fd)
            self._fd = None
        elif self._exclusive_file:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self._exclusive_file = False

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


def _read(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return _parse(os.read(fd, 65536))
    except OSError:
        return {}


def _parse(data: bytes) -> dict[str, Any]:
    try:
        doc = load_json(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _write(fd: int, doc: dict[str, Any]) -> None:
    data = (json.dumps(doc) + "\n").encode("utf-8")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except OSError:
        pass  # a full disk: the lock holds all the same, only the description is missing


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
