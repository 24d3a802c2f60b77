"""The shard marker of a data record: how the cache of one slice of a dump says which slice.

`logitcache dump --shard I/N` (and each torchrun rank) writes an ordinary cache whose data record
is the whole data's, marked with the shard (``source`` gets `` [shard I/N]``, ``fingerprint`` is
hashed with it, ``documents`` is -1); `logitcache merge` reads the mark back to refuse shards
listed out of order. Both sides use this module, so the mark is written and parsed in one place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass

from logitcache.format.manifest import DataInfo

__all__ = ["Shard", "shard_data", "shard_of"]


@dataclass(frozen=True)
class Shard:
    index: int
    count: int
    torchrun: bool = False  # a rank of a torchrun job, else an independent --shard job

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"


def shard_data(info: DataInfo, shard: Shard) -> DataInfo:
    """The data record of one shard's cache: the whole data's, marked with the shard (so that
    a resume checks it is the same shard, and `merge` sees different data)."""
    fingerprint = hashlib.sha256(f"{info.fingerprint}\nshard {shard.label}".encode()).hexdigest()
    return dataclasses.replace(
        info, source=f"{info.source} [shard {shard.label}]", fingerprint=fingerprint, documents=-1
    )


_SHARD_SOURCE = re.compile(r"(?P<source>.*) \[shard (?P<index>\d+)/(?P<count>\d+)\]")


def shard_of(info: DataInfo) -> tuple[str, Shard] | None:
    """(the whole data's source, the shard) that `shard_data` marked `info` with, or None for
    the data record of a whole dump."""
    found = _SHARD_SOURCE.fullmatch(info.source)
    if found is None:
        return None
    return found["source"], Shard(int(found["index"]), int(found["count"]))
