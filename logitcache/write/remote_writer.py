"""Writing a cache to an object store: stage each part locally, upload it, then the manifest.

The commit protocol is the local one (`logitcache.write.writer`, docs/FORMAT.md section 8) with the
object store as the cache root:

1. **Start.** Fetch the remote ``manifest.json``. None: the location must be empty, and an
   initial manifest (no parts) is uploaded. One: its settings must equal this run's; every
   object under ``parts/`` that it does not list (an upload interrupted before its commit) is
   deleted, and the dump resumes after its last part. ``--overwrite`` deletes the manifest first,
   then everything else.
2. **Each part.** Written and hashed in a local staging directory exactly as for a local cache,
   its files uploaded, then the manifest listing it uploaded (one PUT: atomic in S3, GCS and
   Azure), then the staged files deleted (local disk holds at most one part).
3. **Finish.** The manifest with ``complete: true``, then the README.md card.

A reader sees the last uploaded manifest: every part it lists was fully uploaded before it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from logitcache.errors import LogitCacheError, SettingsMismatchError
from logitcache.format.card import CARD_NAME, DEFAULT_LICENSE
from logitcache.format.manifest import (
    MANIFEST_NAME,
    PARTS_DIR,
    Manifest,
    PartArrays,
    PartInfo,
)
from logitcache.format.parse import parse_manifest
from logitcache.storage.mirror import default_cache_dir
from logitcache.storage.stores import is_remote, local_path
from logitcache.write.destination import RemoteDestination
from logitcache.write.writer import CacheWriter, StagedPart, Writer

if TYPE_CHECKING:  # the reader (and torch) is not loaded to write a cache
    from logitcache.read.reader import Cache

__all__ = ["RemoteCacheWriter", "open_writer", "staging_root"]


def open_writer(
    location: str | Path,
    template: Manifest,
    *,
    overwrite: bool = False,
    license: str = DEFAULT_LICENSE,
) -> Writer:
    """A writer for the cache at `location`: a local directory or a URL."""
    if is_remote(location):
        return RemoteCacheWriter(str(location), template, overwrite=overwrite, license=license)
    return CacheWriter(local_path(location), template, overwrite=overwrite, license=license)


def staging_root() -> Path:
    return default_cache_dir() / "staging"


STALE_SECONDS = 24 * 3600


def _remove_stale(root: Path) -> None:
    """Staging directories of killed uploads: a running one changes at every part it writes."""
    now = time.time()
    for entry in root.glob("upload-*"):
        with contextlib.suppress(OSError):
            if now - entry.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)


class RemoteCacheWriter:
    """A `Writer` for a cache in an object store: parts are staged by a local `CacheWriter`,
    then uploaded to its `RemoteDestination`."""

    def __init__(
        self,
        url: str,
        template: Manifest,
        *,
        overwrite: bool = False,
        license: str = DEFAULT_LICENSE,
    ) -> None:
        self.destination = RemoteDestination(url)
        self.store = self.destination.store
        self.uploaded_bytes = 0
        existing = self.store.read_bytes(MANIFEST_NAME)
        if existing is not None and overwrite:
            empty = dataclasses.replace(template, parts=[], sequences=0, tokens=0, complete=False)
            self.destination.start_over(empty)  # then resumed: a cache of no parts
            existing = empty.to_json().encode("utf-8")
        if existing is None:
            found = sorted(self.store.list_files())
            if found:
                raise LogitCacheError(
                    f"{self.store.url} is not empty and holds no logitcache manifest (found: "
                    f"{', '.join(found[:5])}). Refusing to write into it; choose a new or empty "
                    "location with --out."
                )
        else:
            parse_manifest(existing, self.store.describe(MANIFEST_NAME))
        root = staging_root()
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale(root)
        self.staging = Path(tempfile.mkdtemp(prefix="upload-", dir=root))
        try:
            if existing is not None:
                (self.staging / MANIFEST_NAME).write_bytes(existing)
            try:
                self.local = CacheWriter(
                    self.staging, template, license=license, location=self.store.url
                )
            except SettingsMismatchError as exc:
                raise SettingsMismatchError(
                    str(exc).replace(str(self.staging), self.store.url)
                ) from None
            if existing is None:
                self._upload_manifest()
            else:
                self._remove_orphans()
        except BaseException:
            shutil.rmtree(self.staging, ignore_errors=True)
            raise

    @property
    def manifest(self) -> Manifest:
        return self.local.manifest

    @property
    def committed(self) -> int:
        return self.local.committed

    def __enter__(self) -> RemoteCacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Delete the staging directory (what is uploaded stays)."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def _upload_manifest(self) -> None:
        self.destination.commit(self.manifest)

    def _remove_orphans(self) -> None:
        listed = {f"{PARTS_DIR}/{rel}" for part in self.manifest.parts for rel in part.files}
        orphans = [rel for rel in self.store.list_files(PARTS_DIR) if rel not in listed]
        self.store.remove(sorted(orphans))

    def write_part(self, arrays: PartArrays) -> PartInfo:
        """Stage, upload and commit the next part."""
        return self.commit_staged(self.stage_part(arrays, self.committed))

    def stage_part(self, arrays: PartArrays, index: int) -> StagedPart:
        """Write and hash part `index` in the staging directory (`CacheWriter.stage_part`)."""
        return self.local.stage_part(arrays, index)

    def commit_staged(self, staged: StagedPart) -> PartInfo:
        """Commit a staged part locally, then upload it and the manifest listing it."""
        info = self.local.commit_staged(staged)
        self.upload_part(info)
        return info

    def upload_part(self, info: PartInfo) -> None:
        """Upload a part committed in the staging directory, then the manifest listing it."""
        for rel in info.files:
            path = self.staging / PARTS_DIR / rel
            self.store.put_file(path, f"{PARTS_DIR}/{rel}")
            self.uploaded_bytes += path.stat().st_size
        self._upload_manifest()  # the commit point
        for rel in info.files:
            (self.staging / PARTS_DIR / rel).unlink()
        for entry in (self.staging / PARTS_DIR).iterdir():
            if entry.is_dir():
                shutil.rmtree(entry)

    def put_file(self, cache: Cache, index: int, rel: str, new_rel: str, digest: str) -> None:
        self.destination.put_file(cache, index, rel, new_rel, digest)

    def commit_parts(self, parts: list[PartInfo]) -> Manifest:
        """Commit `parts` (placed with `put_file`) as the whole cache and finish it: the staged
        manifest lists them, then it and the card are uploaded."""
        self.local.commit_parts(parts)
        return self._publish()

    def finish(self) -> Manifest:
        self.local.finish()
        return self._publish()

    def _publish(self) -> Manifest:
        """Upload the finished staged manifest (the commit), then the card."""
        self._upload_manifest()
        self.store.put_file(self.staging / CARD_NAME, CARD_NAME)
        return self.manifest
