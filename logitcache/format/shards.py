"""How a shard's cache records which slice of the data it holds (`logitcache dump --shard I/N`).

A shard's data record is the whole data's, marked with the shard: ``source`` gets
`` [shard I/N]``, ``fingerprint`` is hashed with it and ``documents`` is -1. The mark is part of
the format because two rooms read it: a resumed dump checks it is the same shard, and `merge`
(`logitcache.write.merge`) reads it back to keep shards of one dump in shard order. A
classification cache is trained against its whole data (`trainer fit --task classification
--data`), so a merge of every shard of one dump, in shard order, holds that data (`covers`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from logitcache.format.manifest import DataInfo

__all__ = ["Shard", "covers", "shard_data", "shard_of"]

_SHARD_SOURCE = re.compile(r"(?P<source>.*) \[shard (?P<index>\d+)/(?P<count>\d+)\]")


@dataclass(frozen=True)
class Shard:
    """Slice `index` of `count` (counted from 0) of one dump's parts."""

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


def shard_of(info: DataInfo) -> tuple[str, Shard] | None:
    """(the whole data's source, the shard) that `shard_data` marked `info` with, or None for
    the data record of a whole dump."""
    found = _SHARD_SOURCE.fullmatch(info.source)
    if found is None:
        return None
    return found["source"], Shard(int(found["index"]), int(found["count"]))


def covers(whole: DataInfo, inputs: Sequence[DataInfo]) -> bool:
    """Whether the data records `inputs` (a cache's own, or its `merged_from`, in order) are
    shards 0..N-1 of one dump of `whole`, in shard order: together, exactly `whole`."""
    count = len(inputs)
    return count > 0 and all(
        info.fingerprint == shard_data(whole, Shard(i, count)).fingerprint
        for i, info in enumerate(inputs)
    )
