"""Fault injection for the fault-injection test suite (tests/faults/); inert unless asked.

``LOGITCACHE_FAULTS`` holds comma-separated faults, read once when this module is imported:

``kill@POINT`` or ``kill@POINT#N``
    SIGKILL this process the N-th time (default: the first) it reaches POINT.
``pause@POINT`` or ``pause@POINT#N``
    Sleep there until killed (a process that is surely mid-run, for lock tests).
``enospc=BYTES``
    Once more than BYTES bytes of part files have been written by this process, the next part
    write fails with a real ``OSError(ENOSPC)`` raised in the writer (a full disk at a chosen
    moment, without needing a size-limited filesystem).

POINTs, in the order of the commit protocol (docs/FORMAT.md, section 8): ``part_written`` (a
part's files are complete under their temporary name), ``part_renamed`` (renamed into place,
not yet in the manifest), ``manifest_staged`` (the new manifest is written and fsynced under
its temporary name, not yet renamed over manifest.json), ``part_committed`` (the manifest
lists the part).

Nothing here runs unless the variable is set: each hook is one check of a module constant.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections import Counter

ENV = "LOGITCACHE_FAULTS"


def _parse(text: str) -> tuple[dict[str, tuple[str, int]], int | None]:
    actions: dict[str, tuple[str, int]] = {}
    enospc = None
    for item in filter(None, (x.strip() for x in text.split(","))):
        if item.startswith("enospc="):
            enospc = int(item.split("=", 1)[1])
            continue
        action, _, where = item.partition("@")
        point, _, nth = where.partition("#")
        if action not in ("kill", "pause") or not point:
            raise ValueError(f"{ENV}: cannot parse {item!r}")
        actions[point] = (action, int(nth or 1))
    return actions, enospc


_ACTIONS, _ENOSPC_AFTER = _parse(os.environ.get(ENV, ""))
ACTIVE = bool(_ACTIONS) or _ENOSPC_AFTER is not None
_seen: Counter[str] = Counter()
_written = 0


def point(name: str) -> None:
    """Reached `name`: kill or pause here if asked to."""
    if not ACTIVE or name not in _ACTIONS:
        return
    _seen[name] += 1
    action, nth = _ACTIONS[name]
    if _seen[name] != nth:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    while True:  # pause
        time.sleep(3600)


def wrote(nbytes: int, what: str) -> None:
    """`nbytes` more bytes were written (for `what`); past the ``enospc`` budget, fail."""
    global _written
    if _ENOSPC_AFTER is None:
        return
    _written += nbytes
    if _written > _ENOSPC_AFTER:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by {ENV})", what)
