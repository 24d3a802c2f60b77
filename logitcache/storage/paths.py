"""Which locations a command may read, write and delete: the two checks every command makes first.

* **An output is never an input.** Writing a cache starts by deleting what it replaces
  (``--overwrite``) or what its manifest does not list (a resumed dump's orphans), so an output
  that is, contains or lies inside one of the command's inputs would destroy the data being
  read. `refuse_overlap` compares resolved paths (symbolic links and ``..`` seen through) and
  normalised URLs, and refuses before anything is read or written.
* **A cache holds plain files and directories only.** A symbolic link at its manifest, its
  ``parts/`` directory, a part or a part's file could lead a reader outside the cache, and a
  writer's cleanup into deleting files elsewhere. Links are refused (`refuse_links`,
  `link_under`), never followed, by readers and writers alike.

The reader imports this module, so it imports no writer code.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from logitcache.errors import CorruptCacheError, LogitCacheError
from logitcache.format.manifest import MANIFEST_NAME, PARTS_DIR, Manifest
from logitcache.storage.stores import is_remote, local_path

#: URL schemes that name the same store (fsspec's aliases).
_SAME_SCHEME = {"s3a": "s3", "gcs": "gs", "abfs": "az"}


def location_key(location: str | os.PathLike[str]) -> tuple[str, ...]:
    """A location as comparable segments: ``("file", *resolved path)`` for a local path (so
    that links, ``..`` and relative paths compare by what they reach), ``(scheme, bucket,
    *key)`` for a URL (query, empty segments and trailing slashes dropped)."""
    if is_remote(location):
        scheme, _, rest = str(location).partition("://")
        scheme = scheme.lower()
        segments = [s for s in rest.partition("?")[0].split("/") if s]
        return (_SAME_SCHEME.get(scheme, scheme), *segments)
    return ("file", *local_path(location).resolve().parts)


def _show(key: tuple[str, ...]) -> str:
    if key[0] == "file":
        return str(Path(*key[1:]))
    return f"{key[0]}://{'/'.join(key[1:])}"


_WHY = (
    "writing a cache deletes what it replaces or does not list, which would destroy the input "
    "being read"
)


def refuse_overlap(
    out: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str]],
    flag: str,
    why: str = _WHY,
    *,
    may_contain: bool = False,
) -> None:
    """Refuse an output `out` that is, lies inside or (unless `may_contain`: an output that
    deletes only its own files) contains one of `inputs`, naming both, `why` that would lose
    data, and `flag` (how the user sets the output: "OUT", "--out")."""
    out_key = location_key(out)
    for item in inputs:
        key = location_key(item)
        if key == out_key:
            relation = "is"
        elif key[: len(out_key)] == out_key and not may_contain:
            relation = "contains"
        elif out_key[: len(key)] == key:
            relation = "lies inside"
        else:
            continue
        raise LogitCacheError(
            f"the output {out} ({_show(out_key)}) {relation} the input {item} ({_show(key)}): "
            f"{why}. Nothing was changed; choose an {flag} outside the inputs."
        )


def link_problem(link: Path) -> str:
    """The message for a symbolic link found in a cache: names the link and the fix."""
    try:
        target = f" (to {os.readlink(link)})"
    except OSError:
        target = ""
    return (
        f"{link} is a symbolic link{target}; a cache holds plain files only, and logitcache "
        "neither reads, writes nor deletes through links. Replace the link with a copy of what "
        "it points to (cp -rL), or remove it, then rerun."
    )


def link_under(base: Path, rel: str) -> Path | None:
    """The first component of ``base/rel`` below `base` that is a symbolic link, or None:
    one lstat per component. (`rel` is a manifest key: checked to hold no ``..``.)"""
    path = base
    for name in rel.split("/"):
        path = path / name
        if path.is_symlink():
            return path
    return None


def refuse_links(root: Path, manifest: Manifest | None = None) -> None:
    """Refuse (`CorruptCacheError`) a symbolic link at ``root/manifest.json``, ``root/parts``,
    any entry of ``parts/`` (a part, listed or orphan) and, given the cache's `manifest`, any
    component of a file it lists. Cheap: one directory listing (no stat per entry) and one
    lstat per listed file's component; a missing root or parts/ is not this check's to report."""
    for name in (MANIFEST_NAME, PARTS_DIR):
        if (root / name).is_symlink():
            raise CorruptCacheError(link_problem(root / name))
    parts = root / PARTS_DIR
    try:
        with os.scandir(parts) as entries:
            for entry in entries:
                if entry.is_symlink():
                    raise CorruptCacheError(link_problem(parts / entry.name))
    except (FileNotFoundError, NotADirectoryError):
        return
    for part in manifest.parts if manifest is not None else ():
        for rel in part.files:
            link = link_under(parts, rel)
            if link is not None:
                raise CorruptCacheError(link_problem(link))
