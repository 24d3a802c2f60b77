"""What both CLIs share: known errors become one paragraph on stderr and exit code 2 (set
LOGITCACHE_DEBUG=1 to see the traceback instead); and the option aliases and size formatting
the `logitcache` commands share.
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path
from typing import Annotated

import typer

from logitcache.errors import LogitCacheError
from logitcache.format.manifest import Manifest

#: ``--cache-dir``: where the parts of a cache at a URL are fetched to (`logitcache.open`).
CacheDirOption = Annotated[
    Path | None,
    typer.Option(
        envvar="LOGITCACHE_CACHE_DIR",
        help="Local cache of parts fetched from a URL [default: ~/.cache/logitcache]; size "
        "limit LOGITCACHE_CACHE_SIZE (default 10GB).",
    ),
]
LicenseOption = Annotated[
    str, typer.Option("--license", help="Licence of the cached data, shown on the README.md card.")
]


def run_app(app: typer.Typer, prog_name: str) -> None:
    """Run a Typer app, turning `LogitCacheError` into a message and its exit code."""
    try:
        app(prog_name=prog_name)
    except LogitCacheError as exc:
        if os.environ.get("LOGITCACHE_DEBUG"):
            raise
        message = "\n".join(
            # paths and flags stay whole: no break inside a word or at its hyphens
            textwrap.fill(line, 100, break_long_words=False, break_on_hyphens=False)
            for line in str(exc).splitlines()
        )
        print(f"{prog_name}: error: {message}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print(f"{prog_name}: interrupted; rerun the same command to resume.", file=sys.stderr)
        sys.exit(130)


def size_per_token(size: int, tokens: int) -> str:
    """ "SIZE = N.N bytes/token"; for a cache without tokens (an empty shard, an unfinished dump)
    only the size: the metadata's bytes over no tokens are no rate."""
    if not tokens:
        return f"{human_bytes(size)} (no tokens yet, so no bytes/token)"
    return f"{human_bytes(size)} = {size / tokens:.1f} bytes/token"


def cache_counts(m: Manifest) -> str:
    """What a cache holds, in its own units: tokens in sequences, or for a classification cache
    (format 1.3) examples and their target rows (one per view)."""
    if m.task is None:
        return f"{m.tokens:,} tokens in {m.sequences:,} sequences"
    return f"{m.sequences:,} examples, {m.tokens:,} target rows"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")
