"""Where a cache's committed bytes go: a local directory or an object store, behind one protocol.

Every way of writing a cache ends in the same few moves, whatever the destination: start a new
cache (an initial manifest listing nothing), place part files that already exist in another
cache under their new names (`merge`, the join of a sharded dump), commit a manifest (the commit
point: an atomic rename locally, one PUT in an object store), write the README.md card, and
give up cleanly. `Destination` names them; `LocalDestination` and `RemoteDestination` do them.
The commit protocol itself (parts first, then the manifest that lists them) is the writers'
(`logitcache.write.writer`) and merge's; a destination only moves bytes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from logitcache.errors import CorruptCacheError, LogitCacheError
from logitcache.format.card import CARD_NAME
from logitcache.format.manifest import MANIFEST_NAME, PARTS_DIR, Manifest
from logitcache.format.parse import parse_manifest
from logitcache.storage.files import remove, sha256_file, write_text_atomic
from logitcache.storage.paths import refuse_links
from logitcache.storage.stores import RemoteStore
from logitcache.write import faults

if TYPE_CHECKING:  # the reader (and torch) is not loaded to write a cache
    from logitcache.read.reader import Cache

__all__ = ["Destination", "FileMode", "LocalDestination", "RemoteDestination"]

#: How a local destination places another cache's part file: a hard link (an error where there
#: is none), a checked copy, or a hard link with a copy where links are not possible.
FileMode = Literal["link", "copy", "link-or-copy"]


class Destination(Protocol):
    """The moves every cache writer makes at its destination."""

    def start(self, initial: Manifest, overwrite: bool) -> None:
        """Begin a new cache with `initial` (listing no part): refuse an existing cache unless
        `overwrite` (then uncommit it first), refuse a location holding anything else."""
        ...

    def put_file(self, cache: Cache, index: int, rel: str, new_rel: str, digest: str) -> None:
        """File `rel` of part `index` of `cache` into this cache's parts/ as `new_rel`
        (`digest`: its sha256 in the manifest). Not committed until a manifest lists it."""
        ...

    def commit(self, manifest: Manifest) -> None:
        """Make `manifest` the cache's manifest, atomically: the commit point."""
        ...

    def write_card(self, text: str) -> None:
        """(Re)write README.md; not part of the commit."""
        ...

    def abort(self) -> None:
        """After a failure between `start` and the last `commit`: leave an uncommitted cache."""
        ...


def _manifest_staged() -> None:
    faults.point("manifest_staged")


class LocalDestination:
    """A cache directory. Manifests are written atomically (temporary file, fsync, rename,
    fsync of the directory), with the ``manifest_staged`` fault hook before the rename."""

    def __init__(self, root: Path, files: FileMode = "link") -> None:
        self.root, self.files = root, files
        self.created = False

    def existing(self) -> Manifest | None:
        """The manifest of the cache here, or None where there is none; a symbolic link at
        the manifest, parts/, a part or a listed file is refused first, before anything is read
        (and so before anything is deleted)."""
        refuse_links(self.root)
        path = self.root / MANIFEST_NAME
        if not path.is_file():
            return None
        manifest = parse_manifest(path.read_bytes(), str(path))
        refuse_links(self.root, manifest)
        return manifest

    def start_over(self, initial: Manifest) -> None:
        """--overwrite: uncommit the old cache by replacing its manifest with `initial` (listing
        nothing) in one atomic rename, then delete its card and parts. A failure part way leaves
        a valid, empty cache whose next run deletes what is left as orphans: never a directory
        without a manifest. Call it only after `existing` has checked what is deleted."""
        self.commit(initial)
        remove(self.root / CARD_NAME)
        remove(self.root / PARTS_DIR)

    def start(self, initial: Manifest, overwrite: bool) -> None:
        root = self.root
        if self.existing() is not None:
            if not overwrite:
                raise LogitCacheError(
                    f"{root} already holds a cache. Choose another output, or pass --overwrite "
                    "to replace it."
                )
            self.start_over(initial)
        elif root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise LogitCacheError(
                f"{root} is not empty and holds no logitcache manifest. Refusing to write into "
                "it; choose a new or empty directory."
            )
        try:
            (root / PARTS_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LogitCacheError(f"cannot create {root} ({exc.strerror}).") from exc
        self.created = True
        self.commit(initial)

    def put_file(self, cache: Cache, index: int, rel: str, new_rel: str, digest: str) -> None:
        src = cache.parts_dir(index) / rel  # a remote input's part is fetched and checked
        dst = self.root / PARTS_DIR / new_rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if self.files == "link-or-copy":
            dst.unlink(missing_ok=True)  # placed by an interrupted run
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)  # a filesystem without hard links
        elif self.files == "link":
            try:
                os.link(src, dst)
            except OSError as exc:
                raise LogitCacheError(
                    f"cannot hard-link {src} into {self.root} ({exc.strerror}): a merge by "
                    "reference needs the inputs and the output on one local filesystem that "
                    "supports hard links. Pass --copy to copy the data instead."
                ) from exc
        else:
            shutil.copyfile(src, dst)
            if sha256_file(dst) != digest:
                raise CorruptCacheError(
                    f"{cache.root}: {PARTS_DIR}/{rel} does not match its sha256 in the manifest; "
                    "not merging a damaged cache. Run `logitcache verify` on it."
                )

    def commit(self, manifest: Manifest) -> None:
        write_text_atomic(
            self.root / MANIFEST_NAME, manifest.to_json(), before_rename=_manifest_staged
        )

    def write_card(self, text: str) -> None:
        write_text_atomic(self.root / CARD_NAME, text)

    def abort(self) -> None:
        if self.created:  # leave an empty, uncommitted cache: rerun with --overwrite
            remove(self.root / PARTS_DIR)


class RemoteDestination:
    """A cache in an object store. A manifest is one PUT (atomic in S3, GCS and Azure); part
    files are copied server-side from a cache in the same store, else uploaded."""

    def __init__(self, url: str) -> None:
        self.store = RemoteStore(url)

    def start_over(self, initial: Manifest) -> None:
        """--overwrite: uncommit the old cache by replacing its manifest with `initial` (listing
        nothing) in one PUT, then delete every other object. A failure part way leaves a valid,
        empty cache whose next run deletes the rest as orphans."""
        self.commit(initial)
        store = self.store
        store.remove(sorted(rel for rel in store.list_files() if rel != MANIFEST_NAME))

    def start(self, initial: Manifest, overwrite: bool) -> None:
        store = self.store
        if store.read_bytes(MANIFEST_NAME) is not None:
            if not overwrite:
                raise LogitCacheError(
                    f"{store.url} already holds a cache. Choose another output, or pass "
                    "--overwrite to replace it."
                )
            self.start_over(initial)
            return
        if store.list_files():
            raise LogitCacheError(
                f"{store.url} is not empty and holds no logitcache manifest. Refusing to write "
                "into it; choose a new or empty location."
            )
        self.commit(initial)

    def put_file(self, cache: Cache, index: int, rel: str, new_rel: str, digest: str) -> None:
        del digest  # checked when fetched (remote input) or by `verify`
        mirror = cache.mirror
        if mirror is not None and mirror.store.same_filesystem(self.store):
            self.store.copy_within(mirror.store, f"{PARTS_DIR}/{rel}", f"{PARTS_DIR}/{new_rel}")
            return
        self.store.put_file(cache.parts_dir(index) / rel, f"{PARTS_DIR}/{new_rel}")

    def commit(self, manifest: Manifest) -> None:
        self.store.write_bytes(MANIFEST_NAME, manifest.to_json().encode("utf-8"))

    def write_card(self, text: str) -> None:
        self.store.write_bytes(CARD_NAME, text.encode("utf-8"))

    def abort(self) -> None:
        pass  # the initial manifest lists nothing: uploaded files are orphans
