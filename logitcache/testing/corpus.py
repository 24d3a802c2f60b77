"""The embedded default corpus: the Python standard library's own sources, as plain text.

Every Python installation ships the same kind of real, varied text, so the demo, the tests and
the benchmarks get their documents here, offline. This module imports the standard library only
(no torch, no transformers: `logitcache.testing.toy` builds the teacher on top of it). The split
is by *file*, so train and held-out never share a file and held-out numbers measure
generalisation rather than memorisation.
"""

from __future__ import annotations

import functools
import hashlib
import sysconfig
from collections.abc import Sequence
from pathlib import Path

__all__ = ["SPLITS", "read_text", "stdlib_files", "stdlib_root", "write_corpus"]


#: Percent of stdlib files that go to the "heldout" split.
HELDOUT_PERCENT = 5
SPLITS = ("train", "heldout")
#: Directory names skipped when walking the stdlib: installed packages and test suites (the
#: latter hold deliberately odd files: bad encodings, huge generated data, broken syntax).
_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)


def stdlib_root() -> Path:
    """Directory holding the running interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def _hash_int(text: str) -> int:
    """Stable (unsalted, cross-process) integer hash; Python's ``hash`` is randomised."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")


def _split_of(rel_path: str) -> str:
    return "heldout" if _hash_int(rel_path) % 100 < HELDOUT_PERCENT else "train"


def _walk(root: Path) -> tuple[tuple[str, Path, str], ...]:
    """All candidate ``(relative posix path, path, split)`` under ``root``, sorted."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts[:-1]) or not path.is_file():
            continue
        rel_posix = rel.as_posix()
        found.append((rel_posix, path, _split_of(rel_posix)))
    return tuple(found)


@functools.cache
def _walk_stdlib() -> tuple[tuple[str, Path, str], ...]:
    """Cached walk of the stdlib: it costs ~0.3 s and never changes within a process."""
    return _walk(stdlib_root())


def stdlib_files(
    split: str = "train", *, limit: int | None = None, root: Path | None = None
) -> list[Path]:
    """Stdlib ``*.py`` files of one split, sorted by path.

    The split is decided per file from a hash of its path relative to the stdlib root, so it
    is the same on every run and machine (for a given Python version) and ``train`` and
    ``heldout`` are disjoint by construction. ``limit`` keeps a deterministic pseudo-random
    subset (the files whose path hashes lowest) instead of the alphabetically first ones, so a
    small sample still covers many packages rather than only ``__future__`` and ``_aix...``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    candidates = _walk_stdlib() if root is None else _walk(Path(root))
    chosen = [(rel, path) for rel, path, s in candidates if s == split]
    if limit is not None:
        chosen.sort(key=lambda item: (_hash_int("limit:" + item[0]), item[0]))
        chosen = chosen[:limit]
    chosen.sort(key=lambda item: item[0])
    return [path for _, path in chosen]


def read_text(path: Path, max_bytes: int | None = None) -> str | None:
    """File contents as UTF-8, or None if undecodable/empty.

    With ``max_bytes`` the document is cut to at most that many UTF-8 bytes, at the last line
    break when there is one, so truncated documents still end on a whole line.
    """
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if max_bytes is not None and len(data) > max_bytes:
        text = data[:max_bytes].decode("utf-8", errors="ignore")
        cut = text.rfind("\n")
        if cut > 0:
            text = text[: cut + 1]
    return text if text.strip() else None


def _doc_name(index: int, path: Path) -> str:
    """A flat, unique, readable file name for a document (``00007_json__decoder.txt``)."""
    try:
        rel = path.relative_to(stdlib_root()).as_posix()
    except ValueError:
        rel = path.name
    stem = rel.removesuffix(".py").replace("/", "__")
    return f"{index:05d}_{stem}.txt"


def write_corpus(
    dest: Path,
    split: str = "train",
    *,
    limit: int | None = None,
    max_bytes: int | None = None,
    files: Sequence[Path] | None = None,
) -> Path:
    """Write stdlib files as plain-text documents into ``dest`` (the ``--data`` directory).

    One UTF-8 ``.txt`` document per source file, named ``NNNNN_<module path>.txt`` so that
    sorted order is the stdlib order. Undecodable and empty files are skipped. ``max_bytes``
    caps each document (cut at a line break), which keeps test corpora small. ``files``
    overrides the selection (``split``/``limit`` are then ignored). Returns ``dest``.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    chosen = list(files) if files is not None else stdlib_files(split, limit=limit)
    written = 0
    for path in chosen:
        text = read_text(path, max_bytes)
        if text is None:
            continue
        (dest / _doc_name(written, Path(path))).write_text(text, encoding="utf-8")
        written += 1
    return dest
