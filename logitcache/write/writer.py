"""Writing a cache: parts first, each atomically, then the manifest that commits them.

A part is written under a temporary name, its files hashed, and then renamed into place; only
after that is the manifest rewritten (write, fsync, rename) to list it. A crash at any point
leaves either the old manifest (the part is an orphan, removed on resume) or the new one (the
part is complete). Readers trust only what the manifest lists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path

from logitcache.errors import LogitCacheError, SettingsMismatchError
from logitcache.format.card import CARD_NAME, DEFAULT_LICENSE, render_card
from logitcache.format.manifest import (
    MANIFEST_NAME,
    PARTS_DIR,
    Manifest,
    PartArrays,
    PartInfo,
    diff_settings,
    part_name,
)
from logitcache.format.parse import parse_manifest
from logitcache.storage.backend import get_backend, part_path
from logitcache.storage.lock import LOCK_NAME, CacheLock
from logitcache.storage.paths import refuse_links
from logitcache.write import faults


def sha256_file(path: Path, block: int = 1 << 22) -> str:
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


#: What `_write_atomic` and `_check_writable` leave behind when killed mid-write: theirs to remove.
_TEMPORARY = re.compile(r"^\.(write-probe-[0-9a-f]{32}|.+\.[0-9a-f]{32}\.tmp)$")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk: give back what was written
        raise
    if faults.ACTIVE and path.name == MANIFEST_NAME:
        faults.point("manifest_staged")
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _bytes_under(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):  # else removed on the next run (an orphan)
        _remove(path)


def _remove(path: Path) -> None:
    """Delete a file or a directory tree; a symbolic link is removed itself, never followed
    (rmtree does not follow the links inside a tree either)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def read_existing(root: Path) -> Manifest | None:
    """The manifest of the cache at `root`, or None where there is none; a symbolic link at
    the manifest, parts/, a part or a listed file is refused first, before anything is read
    (and so before a writer deletes anything)."""
    refuse_links(root)
    path = root / MANIFEST_NAME
    if not path.is_file():
        return None
    manifest = parse_manifest(path.read_bytes(), str(path))
    refuse_links(root, manifest)
    return manifest


def start_over(root: Path, initial: Manifest) -> None:
    """--overwrite: uncommit the old cache by replacing its manifest with `initial` (listing
    nothing) in one atomic rename, then delete its card and parts. A failure part way leaves a
    valid, empty cache whose next run deletes what is left as orphans: never a directory without
    a manifest. Call it only after `read_existing` has checked what is deleted."""
    _write_atomic(root / MANIFEST_NAME, initial.to_json())
    _remove(root / CARD_NAME)
    _remove(root / PARTS_DIR)


class CacheWriter:
    """Creates or resumes a cache at `root` with the settings of `template`.

    Use as a context manager; `committed` is the number of parts already present, `write_part`
    commits the next one, `finish` marks the cache complete and writes the README.md card
    (`location` and `license` are shown on it). From opening to the end of the `with` block it
    holds the directory's lock (`logitcache.storage.lock`): a second writer is refused.
    """

    def __init__(
        self,
        root: Path,
        template: Manifest,
        *,
        overwrite: bool = False,
        license: str = DEFAULT_LICENSE,
        location: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.license = license
        self.location = str(root) if location is None else location
        self.backend = get_backend(template.backend)
        self._lock = CacheLock(self.root)
        try:
            self.manifest = self._open(template, overwrite)
        except BaseException:
            self._lock.release()
            raise

    @property
    def committed(self) -> int:
        return len(self.manifest.parts)

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._remove_orphans()
        finally:
            self._lock.release()

    def _open(self, template: Manifest, overwrite: bool) -> Manifest:
        self._check_writable()
        self._lock.acquire()  # before anything is read or changed
        existing = self._existing_manifest()
        empty = dataclasses.replace(template, parts=[], sequences=0, tokens=0, complete=False)
        if existing is not None and overwrite:
            try:
                start_over(self.root, empty)
            except OSError as exc:
                raise LogitCacheError(
                    f"cannot delete the cache at {self.root} that --overwrite replaces: "
                    f"{exc.strerror or exc} ({exc.filename}). It is uncommitted now (its "
                    "manifest lists no part); fix that, then rerun the same command."
                ) from exc
            existing = None
        if existing is None:
            try:
                (self.root / PARTS_DIR).mkdir(parents=True, exist_ok=True)
                _write_atomic(self.root / MANIFEST_NAME, empty.to_json())
            except OSError as exc:
                raise self._disk_error(exc, "creating the cache") from exc
            return empty
        differences = diff_settings(existing.settings(), template.settings())
        if differences:
            raise SettingsMismatchError(
                f"{self.root} already holds a cache made with other settings:\n  "
                + "\n  ".join(differences)
                + "\nRerun with the original settings to resume it, choose another --out, "
                "or pass --overwrite to start over."
            )
        self._remove_orphans(existing)
        return existing

    def _check_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-probe-{uuid.uuid4().hex}"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            raise LogitCacheError(
                f"cannot write to the output directory {self.root} ({exc.strerror}). "
                "Choose a directory you can write to with --out."
            ) from exc

    def _existing_manifest(self) -> Manifest | None:
        existing = read_existing(self.root)
        if existing is not None:
            return existing
        foreign = [
            p.name
            for p in self.root.iterdir()
            if not _TEMPORARY.match(p.name) and p.name != LOCK_NAME
        ]
        if foreign:
            raise LogitCacheError(
                f"{self.root} is not empty and holds no logitcache manifest "
                f"(found: {', '.join(sorted(foreign)[:5])}). Refusing to write into it; "
                "choose a new or empty directory with --out."
            )
        return None

    def _remove_orphans(self, manifest: Manifest | None = None) -> None:
        """Delete anything under parts/ that the manifest does not list (a crashed write), and
        the temporary files of an atomic write that was killed."""
        manifest = manifest or self.manifest
        for entry in self.root.iterdir():
            if _TEMPORARY.match(entry.name) and entry.is_file():
                entry.unlink()
        listed = {p.name + self.backend.SUFFIX for p in manifest.parts}
        parts_dir = self.root / PARTS_DIR
        if parts_dir.is_dir():
            for entry in parts_dir.iterdir():
                if entry.name not in listed:
                    _remove(entry)

    def write_part(self, arrays: PartArrays) -> PartInfo:
        """Write the next part and commit it in the manifest. A failed write (a full disk, an
        I/O error) raises a `LogitCacheError` and leaves the cache as it was (rerun resumes)."""
        name = part_name(self.committed)
        final = part_path(self.root, self.manifest.backend, name)
        tmp = final.with_name(f".tmp-{uuid.uuid4().hex}-{final.name}")
        try:
            self.backend.write_part(
                tmp, arrays, self.manifest.codec, self.manifest.layout.chunk_bytes
            )
            if faults.ACTIVE:
                faults.wrote(_bytes_under(tmp), str(tmp))
                faults.point("part_written")
            entries = 0 if arrays.target_counts is None else len(arrays.target_counts)
            info = PartInfo(
                name, arrays.sequences, arrays.tokens, hash_files(tmp, final.name), entries
            )
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            faults.point("part_renamed")
            manifest = dataclasses.replace(
                self.manifest,
                parts=[*self.manifest.parts, info],
                sequences=self.manifest.sequences + info.sequences,
                tokens=self.manifest.tokens + info.tokens,
            )
            _write_atomic(self.root / MANIFEST_NAME, manifest.to_json())
        except OSError as exc:
            _remove_quietly(tmp)  # a full disk: free what the failed part took
            raise self._disk_error(exc, f"writing {name}") from exc
        self.manifest = manifest
        faults.point("part_committed")
        return info

    def finish(self) -> Manifest:
        manifest = dataclasses.replace(self.manifest, complete=True)
        try:
            _write_atomic(self.root / MANIFEST_NAME, manifest.to_json())
        except OSError as exc:
            raise self._disk_error(exc, "marking the cache complete") from exc
        self.manifest = manifest
        try:
            self.write_card()
        except OSError as exc:
            raise self._disk_error(
                exc, f"writing {CARD_NAME} (the cache itself is complete)"
            ) from exc
        return self.manifest

    def _disk_error(self, exc: OSError, doing: str) -> LogitCacheError:
        """A clear message for an OSError while writing (ENOSPC, EDQUOT, EIO, EROFS...)."""
        reason = exc.strerror or str(exc)
        where = f" ({exc.filename})" if exc.filename else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = "The disk (or quota) is full: free space or choose another --out, then"
        else:
            fix = "Fix that, then"
        return LogitCacheError(
            f"cannot write to {self.root} while {doing}: {reason}{where}. {fix} rerun the same "
            f"command: it resumes after the last committed part ({self.committed} committed)."
        )

    def write_card(self) -> Path:
        """(Re)write README.md from the manifest; not part of the commit."""
        path = self.root / CARD_NAME
        _write_atomic(path, render_card(self.manifest, self.location, self.license))
        return path
