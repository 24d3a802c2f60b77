"""Local file habits every writer and checker shares: hashing, atomic writes, safe removal.

One place for them, so that the cache writer, merge, verify, the mirror of fetched parts and the
trainer hash the same way, leave the same temporary names behind when killed, and never follow a
symbolic link when they delete. Standard library only: the trainer imports this module too.

An atomic write is: write a temporary sibling (`temporary_sibling`), fsync it, rename it over the
target, fsync the directory. A crash leaves either the old file or the new one, plus perhaps a
temporary file whose name `is_temporary` recognises (its owner removes it on the next run).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "bytes_under",
    "fsync_dir",
    "hash_files",
    "is_temporary",
    "probe_writable",
    "remove",
    "remove_quietly",
    "sha256_file",
    "temporary_sibling",
    "write_json_atomic",
    "write_text_atomic",
]

#: What `write_text_atomic` and `probe_writable` leave behind when killed mid-write.
_TEMPORARY = re.compile(r"^\.(write-probe-[0-9a-f]{32}|.+\.[0-9a-f]{32}\.tmp)$")


def sha256_file(path: Path | str, block: int = 1 << 22) -> str:
    """Hex sha256 of a file, read `block` bytes at a time (bounded memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(path: Path, name: str) -> dict[str, str]:
    """sha256 of every file of the part at `path`, keyed by its path under parts/ once it is
    renamed to `name` (so the keys do not depend on the temporary name it was written under)."""
    if path.is_file():
        return {name: sha256_file(path)}
    files = sorted(f for f in path.rglob("*") if f.is_file())
    return {f"{name}/{f.relative_to(path).as_posix()}": sha256_file(f) for f in files}


def temporary_sibling(path: Path) -> Path:
    """A fresh temporary name next to `path` (``.NAME.<32 hex>.tmp``), for a write then rename."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def is_temporary(name: str) -> bool:
    """Whether a file name is one an atomic write or a write probe leaves when killed."""
    return _TEMPORARY.match(name) is not None


def probe_writable(directory: Path) -> None:
    """Create `directory` if needed and prove a file can be made in it (OSError if not)."""
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".write-probe-{uuid.uuid4().hex}"
    probe.touch()
    probe.unlink()


def write_text_atomic(
    path: Path, text: str, *, before_rename: Callable[[], None] | None = None
) -> None:
    """Replace `path` with `text` (UTF-8) atomically and durably. `before_rename` runs once the
    new content is fsynced under its temporary name (the fault-injection hook of the writer)."""
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk: give back what was written
        raise
    if before_rename is not None:
        before_rename()
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, doc: Any) -> None:
    """`write_text_atomic` of `doc` as indented JSON with a final newline."""
    write_text_atomic(path, json.dumps(doc, indent=2) + "\n")


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that a rename or a new entry in it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Delete a file or a directory tree; a symbolic link is removed itself, never followed
    (rmtree does not follow the links inside a tree either). A missing path is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def remove_quietly(path: Path) -> None:
    """`remove`, ignoring errors: what is left is an orphan, removed on the next run."""
    with contextlib.suppress(OSError):
        remove(path)


def bytes_under(path: Path) -> int:
    """Bytes of a file, or of every file under a directory."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
