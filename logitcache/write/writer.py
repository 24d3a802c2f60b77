"""Writing a cache: parts first, each atomically, then the manifest that commits them.

A part is written under a temporary name, its files hashed, and then renamed into place; only
after that is the manifest rewritten (write, fsync, rename) to list it. A crash at any point
leaves either the old manifest (the part is an orphan, removed on resume) or the new one (the
part is complete). Readers trust only what the manifest lists.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from logitcache.errors import LogitCacheError, SettingsMismatchError
from logitcache.format.card import CARD_NAME, DEFAULT_LICENSE, render_card
from logitcache.format.manifest import (
    PARTS_DIR,
    Manifest,
    PartArrays,
    PartInfo,
    diff_settings,
    part_name,
)
from logitcache.storage.backend import get_backend, part_path
from logitcache.storage.files import (
    bytes_under,
    fsync_dir,
    hash_files,
    is_temporary,
    probe_writable,
    remove,
    remove_quietly,
)
from logitcache.storage.lock import LOCK_NAME, CacheLock
from logitcache.write import faults
from logitcache.write.destination import LocalDestination

if TYPE_CHECKING:  # the reader (and torch) is not loaded to write a cache
    from logitcache.read.reader import Cache

__all__ = ["CacheWriter", "StagedPart", "Writer"]


@dataclasses.dataclass(frozen=True)
class StagedPart:
    """A part written and hashed under a temporary name (`tmp`), not yet in the manifest.

    Staging is the expensive half of a part's write (compression, hashing) and touches nothing
    but its own directory, so several parts can be staged at once; committing (a rename and the
    manifest) is cheap and strictly in order, which keeps the commit protocol unchanged."""

    index: int
    tmp: Path
    final: Path
    info: PartInfo


class Writer(Protocol):
    """What every cache writer offers (`CacheWriter`, `RemoteCacheWriter`): a context manager
    that commits parts one by one, or adopts parts another cache holds (the sharded join)."""

    @property
    def manifest(self) -> Manifest: ...

    @property
    def committed(self) -> int:
        """The number of parts committed (already present when resuming)."""
        ...

    def write_part(self, arrays: PartArrays) -> PartInfo:
        """Write the next part and commit it."""
        ...

    def stage_part(self, arrays: PartArrays, index: int) -> StagedPart:
        """Write and hash part `index` under a temporary name, not committing it. Safe to call
        from several threads at once for different parts (the dump's writer pool)."""
        ...

    def commit_staged(self, staged: StagedPart) -> PartInfo:
        """Commit a staged part; parts are committed in order, one thread at a time."""
        ...

    def put_file(self, cache: Cache, index: int, rel: str, new_rel: str, digest: str) -> None:
        """Place a file of another cache's part under this cache's parts/ (`commit_parts`
        commits it)."""
        ...

    def commit_parts(self, parts: list[PartInfo]) -> Manifest:
        """Commit `parts`, placed with `put_file`, as the whole cache, and finish it."""
        ...

    def finish(self) -> Manifest:
        """Mark the cache complete, then write its card."""
        ...

    def close(self) -> None:
        """Let go of the destination (its lock, its staging directory)."""
        ...

    def __enter__(self) -> Writer: ...

    def __exit__(self, *exc: object) -> None: ...


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
        #: where committed bytes go; other caches' part files are linked in (copied where a
        #: filesystem has no hard links) for the join of a sharded dump
        self.destination = LocalDestination(self.root, files="link-or-copy")
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
        self.close()

    def close(self) -> None:
        """Remove what a failed write left, then release the lock."""
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
                self.destination.start_over(empty)
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
                self.destination.commit(empty)
            except OSError as exc:
                raise self._disk_error(exc, "creating the cache", committed=0) from exc
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
            probe_writable(self.root)
        except OSError as exc:
            raise LogitCacheError(
                f"cannot write to the output directory {self.root} ({exc.strerror}). "
                "Choose a directory you can write to with --out."
            ) from exc

    def _existing_manifest(self) -> Manifest | None:
        existing = self.destination.existing()
        if existing is not None:
            return existing
        foreign = [
            p.name for p in self.root.iterdir() if not is_temporary(p.name) and p.name != LOCK_NAME
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
            if is_temporary(entry.name) and entry.is_file():
                entry.unlink()
        listed = {p.name + self.backend.SUFFIX for p in manifest.parts}
        parts_dir = self.root / PARTS_DIR
        if parts_dir.is_dir():
            for entry in parts_dir.iterdir():
                if entry.name not in listed:
                    remove(entry)

    def write_part(self, arrays: PartArrays) -> PartInfo:
        """Write the next part and commit it in the manifest. A failed write (a full disk, an
        I/O error) raises a `LogitCacheError` and leaves the cache as it was (rerun resumes)."""
        return self.commit_staged(self.stage_part(arrays, self.committed))

    def stage_part(self, arrays: PartArrays, index: int) -> StagedPart:
        """Write part `index` under a temporary name in parts/ and hash its files. A failure
        removes what it wrote; a staged part never committed is an orphan that `close` (or the
        next resume) removes."""
        name = part_name(index)
        final = part_path(self.root, self.manifest.backend, name)
        tmp = final.with_name(f".tmp-{uuid.uuid4().hex}-{final.name}")
        try:
            self.backend.write_part(
                tmp, arrays, self.manifest.codec, self.manifest.layout.chunk_bytes
            )
            if faults.ACTIVE:
                faults.wrote(bytes_under(tmp), str(tmp))
                faults.point("part_written")
            entries = 0 if arrays.target_lengths is None else len(arrays.target_ids)  # ragged
            text_bytes = 0 if arrays.text is None else len(arrays.text)
            masked = 0 if arrays.target_positions is None else len(arrays.target_positions)
            info = PartInfo(
                name,
                arrays.sequences,
                arrays.tokens,
                hash_files(tmp, final.name),
                entries,
                text_bytes,
                masked,
            )
        except OSError as exc:
            remove_quietly(tmp)  # a full disk: free what the failed part took
            raise self._disk_error(exc, f"writing {name}") from exc
        return StagedPart(index, tmp, final, info)

    def commit_staged(self, staged: StagedPart) -> PartInfo:
        """Rename a staged part into place and commit it in the manifest (the next part only)."""
        if staged.index != self.committed:
            raise ValueError(f"part {staged.index} staged, but part {self.committed} is next")
        info = staged.info
        try:
            os.replace(staged.tmp, staged.final)
            fsync_dir(staged.final.parent)
            faults.point("part_renamed")
            manifest = dataclasses.replace(
                self.manifest,
                parts=[*self.manifest.parts, info],
                sequences=self.manifest.sequences + info.sequences,
                tokens=self.manifest.tokens + info.tokens,
            )
            self.destination.commit(manifest)
        except OSError as exc:
            remove_quietly(staged.tmp)
            raise self._disk_error(exc, f"writing {info.name}") from exc
        self.manifest = manifest
        faults.point("part_committed")
        return info

    def put_file(self, cache: Cache, index: int, rel: str, new_rel: str, digest: str) -> None:
        self.destination.put_file(cache, index, rel, new_rel, digest)

    def commit_parts(self, parts: list[PartInfo]) -> Manifest:
        """Commit `parts` (placed with `put_file`) as the cache's whole content and finish it:
        one manifest write, then the card (the join of a sharded dump)."""
        self.manifest = dataclasses.replace(
            self.manifest,
            parts=parts,
            sequences=sum(p.sequences for p in parts),
            tokens=sum(p.tokens for p in parts),
        )
        return self.finish()

    def finish(self) -> Manifest:
        manifest = dataclasses.replace(self.manifest, complete=True)
        try:
            self.destination.commit(manifest)
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

    def _disk_error(
        self, exc: OSError, doing: str, committed: int | None = None
    ) -> LogitCacheError:
        """A clear message for an OSError while writing (ENOSPC, EDQUOT, EIO, EROFS...).
        `committed` defaults to the manifest's parts; while the cache is being created there is
        no manifest yet (0)."""
        committed = self.committed if committed is None else committed
        reason = exc.strerror or str(exc)
        where = f" ({exc.filename})" if exc.filename else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = "The disk (or quota) is full: free space or choose another --out, then"
        else:
            fix = "Fix that, then"
        return LogitCacheError(
            f"cannot write to {self.root} while {doing}: {reason}{where}. {fix} rerun the same "
            f"command: it resumes after the last committed part ({committed} committed)."
        )

    def write_card(self) -> Path:
        """(Re)write README.md from the manifest; not part of the commit."""
        self.destination.write_card(render_card(self.manifest, self.location, self.license))
        return self.root / CARD_NAME
