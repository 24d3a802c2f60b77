"""logitcache: run a teacher once, cache its soft targets, train students from the cache.

The public API. Reading names (`open`, `Cache`, the format and the errors) are imported at once
and stay light; the teacher side (`dump`, `DumpOptions`) and the sharing tools (`merge`,
`ensemble`, `export`, `verify`) are imported on first use, so a trainer that only reads never loads the
teacher code, transformers or a writer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from logitcache.errors import CorruptCacheError, LogitCacheError, SettingsMismatchError
from logitcache.format.manifest import FORMAT_VERSION, Manifest, PartArrays
from logitcache.format.tokenizer_id import tokenizer_fingerprint
from logitcache.read.decoded import CacheSequence
from logitcache.read.reader import Cache, open
from logitcache.read.texts import sequence_text
from logitcache.storage.paths import refuse_overlap
from logitcache.version import __version__

__all__ = [
    "FORMAT_VERSION",
    "Cache",
    "CacheSequence",
    "CorruptCacheError",
    "DumpOptions",
    "DumpSummary",
    "LogitCacheError",
    "Manifest",
    "PartArrays",
    "SettingsMismatchError",
    "ViewSpec",
    "__version__",
    "apply_views",
    "draw_views",
    "dump",
    "ensemble",
    "export",
    "load_examples",
    "merge",
    "open",
    "refuse_overlap",
    "sequence_text",
    "tokenizer_fingerprint",
    "verify",
]

_HOME = {
    "dump": "logitcache.dumping.pipeline",
    "DumpOptions": "logitcache.dumping.options",
    "DumpSummary": "logitcache.dumping.options",
    "merge": "logitcache.write.merge",
    "ensemble": "logitcache.write.ensemble",
    "export": "logitcache.write.export",
    "verify": "logitcache.read.verify",
    "load_examples": "logitcache.examples.load",
    "ViewSpec": "logitcache.examples.views",
    "apply_views": "logitcache.examples.views",
    "draw_views": "logitcache.examples.views",
}

if TYPE_CHECKING:
    from logitcache.dumping.options import DumpOptions, DumpSummary
    from logitcache.dumping.pipeline import dump
    from logitcache.examples.load import load_examples
    from logitcache.examples.views import ViewSpec, apply_views, draw_views
    from logitcache.read.verify import verify
    from logitcache.write.ensemble import ensemble
    from logitcache.write.export import export
    from logitcache.write.merge import merge


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'logitcache' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
