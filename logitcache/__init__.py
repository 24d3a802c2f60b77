"""logitcache: run a teacher once, cache its soft targets, train students from the cache."""

from logitcache.errors import CorruptCacheError, LogitCacheError, SettingsMismatchError
from logitcache.format import FORMAT_VERSION, Manifest, PartArrays
from logitcache.reader import Cache, CacheSequence, open

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "Cache",
    "CacheSequence",
    "CorruptCacheError",
    "LogitCacheError",
    "Manifest",
    "PartArrays",
    "SettingsMismatchError",
    "__version__",
    "open",
]
