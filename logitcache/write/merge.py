"""`merge`: combine caches dumped by separate jobs into one logical cache.

The inputs must agree on everything that decides what a target means and how it is stored:
backend, teacher (weights and config hashes, dtype, vocabulary; the name may differ), tokenizer
(fingerprint; the name may differ), targets, layout and codec. Their data differ: the merged
manifest records each input's location and data record in ``merged_from`` (format 1.1), and its
own ``data`` combines them (sources joined with " + ", a fingerprint over the inputs'
fingerprints in order).

The merged cache's parts are the inputs' parts in order, renumbered. Their files are either
**hard links** to the inputs' files (the default: no data is copied, and the merged cache is a
complete, self-contained cache; needs the inputs and the output on one local filesystem), or
copies (``copy=True``: any mix of local paths and URLs; a server-side copy when input and
output are in the same object store). File contents, hence sha256s, are unchanged: only the
part prefix of each file name changes.

A classification merge (format 1.3 `task`) that holds shards of a dump holds all of them
(`check_every_shard`): its student is trained against the dump's whole data.

Commit order as for a dump: an initial manifest listing nothing, the parts' files, then the
final manifest (the commit point), then the README.md card.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
from pathlib import Path
from typing import Any

from logitcache.errors import LogitCacheError, SettingsMismatchError
from logitcache.format.card import DEFAULT_LICENSE, render_card
from logitcache.format.manifest import (
    DataInfo,
    Manifest,
    MergedInput,
    part_name,
    version_for,
)
from logitcache.format.shards import shard_of
from logitcache.read import reader
from logitcache.read.reader import Cache
from logitcache.storage.paths import refuse_overlap
from logitcache.storage.stores import is_remote, local_path
from logitcache.version import __version__
from logitcache.write.destination import Destination, LocalDestination, RemoteDestination

__all__ = [
    "check_compatible", "check_every_shard", "check_shard_order", "merge", "merged_manifest",
]  # fmt: skip

#: Identity fields that may differ between inputs (how a teacher or tokenizer was named).
_NAMES = ("teacher.name", "tokenizer.name")


def merge(
    out: str | Path,
    inputs: list[str | Path],
    *,
    copy: bool = False,
    overwrite: bool = False,
    license: str = DEFAULT_LICENSE,
    cache_dir: str | Path | None = None,
    any_order: bool = False,
) -> Manifest:
    """Merge the complete caches `inputs` into a new cache at `out`; returns its manifest.

    Shards of one dump (`--shard I/N`) must come in shard order unless `any_order`: in another
    order the merged cache would hold the data in another order than the single dump."""
    if not inputs:
        raise LogitCacheError("merge needs at least one input cache.")
    locations = [str(i) for i in inputs]
    refuse_overlap(out, locations, "OUT")
    caches = [reader.open(i, cache_dir=cache_dir) for i in locations]
    for cache in caches:
        cache.refuse_links()  # all of it now: before `start` deletes an old OUT
    check_compatible(locations, caches)
    if not any_order:
        check_shard_order(locations, caches)
    if caches[0].manifest.task is not None:
        check_every_shard(locations, caches)
    manifest = merged_manifest(locations, caches)
    remote_in = [loc for loc in locations if is_remote(loc)]
    if not copy and (is_remote(out) or remote_in):
        where = str(out) if is_remote(out) else remote_in[0]
        raise LogitCacheError(
            f"a merge by reference makes hard links, which {where} (an object store) does not "
            "have: inputs and output must be local directories on one filesystem. Pass --copy "
            "to copy the data (server-side within one object store)."
        )
    dest: Destination = (
        RemoteDestination(str(out))
        if is_remote(out)
        else LocalDestination(local_path(out), "copy" if copy else "link")
    )
    dest.start(dataclasses.replace(
        manifest, parts=[], sequences=0, tokens=0, complete=False, merged_from=[]
    ), overwrite)  # fmt: skip
    try:
        new_parts = iter(manifest.parts)
        for cache in caches:
            for index, part in enumerate(cache.manifest.parts):
                new = next(new_parts)
                for rel, digest in part.files.items():
                    dest.put_file(cache, index, rel, part.file_as(rel, new.name), digest)
        dest.commit(manifest)
    except BaseException:
        dest.abort()
        raise
    dest.write_card(render_card(manifest, str(out), license))
    return manifest


def _flat(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    items: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            items |= _flat(value, f"{prefix}{key}.")
        else:
            items[f"{prefix}{key}"] = value
    return items


def check_compatible(locations: list[str], caches: list[Cache]) -> None:
    """Refuse inputs that differ in anything but their data (and names), listing each
    difference; refuse the same data twice."""
    first = _flat(caches[0].manifest.settings())
    problems = []
    for location, cache in zip(locations[1:], caches[1:], strict=True):
        other = _flat(cache.manifest.settings())
        for key in sorted(set(first) | set(other)):
            if key.startswith("data.") or key in _NAMES:
                continue
            if first.get(key) != other.get(key):
                problems.append(
                    f"{key}: {locations[0]} has {first.get(key)!r}, {location} has "
                    f"{other.get(key)!r}"
                )
    if problems:
        raise SettingsMismatchError(
            "cannot merge caches made with different settings:\n  "
            + "\n  ".join(problems)
            + "\nOnly caches of the same teacher, tokenizer, targets, layout, codec and backend "
            "can be merged (re-dump or `logitcache export` the odd ones out)."
        )
    seen: dict[str, str] = {}
    for location, cache in zip(locations, caches, strict=True):
        for item in _inputs_of(location, cache):
            fingerprint = item.data.fingerprint
            if fingerprint in seen:
                raise LogitCacheError(
                    f"{seen[fingerprint]} and {item.cache} hold the same data (fingerprint "
                    f"{fingerprint[:16]}); merging would repeat it. Leave one of them out."
                )
            seen[fingerprint] = item.cache


def check_shard_order(locations: list[str], caches: list[Cache]) -> None:
    """Refuse shards of the same data (`logitcache dump --shard I/N`) listed out of order."""
    last: dict[tuple[str, int], tuple[int, str]] = {}  # (source, N) -> (index, location)
    for location, cache in zip(locations, caches, strict=True):
        for item in _inputs_of(location, cache):
            found = shard_of(item.data)
            if found is None:
                continue
            source, shard = found
            key = (source, shard.count)
            if key in last and shard.index < last[key][0]:
                index, before = last[key]
                raise LogitCacheError(
                    f"{item.cache} (shard {shard.label} of {source}) comes after {before} "
                    f"(shard {index}/{shard.count}): the merged cache would hold the data in "
                    "another order than a single dump. List the shards in shard order, or pass "
                    "--any-order to merge them in the order given."
                )
            last[key] = (shard.index, item.cache)


def check_every_shard(locations: list[str], caches: list[Cache]) -> None:
    """Refuse a classification merge that holds some shards of a dump but not all: such a
    cache is trained against its dump's whole --data (`Cache.holds_data`), so a merge of part
    of its shards could never be trained from."""
    found: dict[tuple[str, int], set[int]] = {}  # (source, N) -> the shard indices given
    for location, cache in zip(locations, caches, strict=True):
        for item in _inputs_of(location, cache):
            marked = shard_of(item.data)
            if marked is not None:
                found.setdefault((marked[0], marked[1].count), set()).add(marked[1].index)
    for (source, count), indices in found.items():
        missing = sorted(set(range(count)) - indices)
        if missing:
            names = ", ".join(f"{i}/{count}" for i in missing)
            raise LogitCacheError(
                f"shard {names} of {source} is missing from this merge: a classification cache "
                f"is trained against its whole --data, so a merge of its shards holds all "
                f"{count}. Add the missing shard's cache (`logitcache dump ... --shard "
                f"{missing[0]}/{count}`), in shard order."
            )


def _inputs_of(location: str, cache: Cache) -> list[MergedInput]:
    """What `cache` contributes to merged_from: its own entries if it is itself a merge."""
    m = cache.manifest
    if m.merged_from:
        return list(m.merged_from)
    return [MergedInput(location, m.created, m.data, len(m.parts), m.sequences, m.tokens)]


def merged_manifest(locations: list[str], caches: list[Cache]) -> Manifest:
    first = caches[0].manifest
    merged_from = [i for loc, c in zip(locations, caches, strict=True) for i in _inputs_of(loc, c)]
    datas = [i.data for i in merged_from]
    formats = {d.format for d in datas}
    fields = {d.text_field for d in datas}
    fingerprint = hashlib.sha256("\n".join(d.fingerprint for d in datas).encode()).hexdigest()
    data = DataInfo(
        source=" + ".join(d.source for d in datas),
        format=formats.pop() if len(formats) == 1 else "mixed",
        fingerprint=fingerprint,
        documents=-1 if any(d.documents < 0 for d in datas) else sum(d.documents for d in datas),
        text_field=fields.pop() if len(fields) == 1 else None,
    )
    parts = []
    for cache in caches:
        for part in cache.manifest.parts:
            parts.append(part.renamed(part_name(len(parts))))
    merged = dataclasses.replace(
        first,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        data=data,
        complete=True,
        sequences=sum(p.sequences for p in parts),
        tokens=sum(p.tokens for p in parts),
        parts=parts,
        tool_version=__version__,
        merged_from=merged_from,
    )
    # 1.1 for merged_from, or newer where the inputs' codec needs it (1.2: gaps)
    return dataclasses.replace(merged, format_version=version_for(merged))
