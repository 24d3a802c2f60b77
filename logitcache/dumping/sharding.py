"""One dump over many processes: `torchrun -m logitcache dump` ranks and `--shard I/N` jobs.

**The slice.** The data is tokenized and packed exactly as for a single-process dump, so its
parts (groups of `sequences_per_part` sequences) are the same; a counting pass gives their
number P. Shard I of N takes the contiguous parts ``[I * P // N, (I + 1) * P // N)`` (counts
differ by at most one). Its sequences are the single-process dump's sequences of those parts,
its targets too (sampled targets are seeded by the global sequence index), so its parts are
byte for byte the single-process dump's parts of that range.

**--shard I/N** (no torch.distributed: SLURM arrays, separate machines) writes an ordinary,
complete cache of its parts into --out; its data record is the whole data's, marked with the
shard (``source`` gets `` [shard I/N]``, ``fingerprint`` is hashed with it, ``documents`` is
-1). ``logitcache merge OUT SHARD0 SHARD1 ...`` (in shard order) joins them: the merged cache
holds exactly the single-process dump's parts, in the same order, with the same files.

**torchrun** (``WORLD_SIZE`` > 1): rank 0 opens --out first (settings check, lock, resume) and
counts the parts; every rank r writes the cache ``--shard r/N`` would write, at
``OUT/ranks/rank-RRRRR-of-NNNNN`` (a local directory or a URL under --out); after a barrier,
rank 0 links (copies, in an object store) their parts into ``OUT/parts`` under their global
names, commits one manifest (the single-process dump's manifest, but `created`) and removes
``OUT/ranks``. The process group is gloo (CPU only: it carries a count, a barrier and errors,
whatever device the teacher runs on), with a long timeout since ranks finish at different times.

**Faults.** A killed job or rank is rerun with the same command and resumes its own cache from
its last committed part; ranks that had finished redo nothing. A rank's cache is exactly a
``--shard r/N`` cache, so one rank can also be finished alone with
``logitcache dump ... --shard r/N --out OUT/ranks/rank-RRRRR-of-NNNNN``, then the torchrun
command rerun to join.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from logitcache.dumping.options import DumpOptions, DumpSummary
from logitcache.dumping.prepare import Prepared, prepare
from logitcache.errors import LogitCacheError
from logitcache.format.manifest import Manifest, diff_settings, part_name
from logitcache.format.shards import Shard, shard_data
from logitcache.progress import Bar, progress_bar
from logitcache.read import reader
from logitcache.runtime import agree_on_errors, torchrun_world_size
from logitcache.storage import stores
from logitcache.write.remote_writer import open_writer
from logitcache.write.writer import CacheWriter, Writer

RANKS_DIR = "ranks"
#: How long a rank waits for the others (they finish at different times): a week by default.
TIMEOUT_ENV = "LOGITCACHE_DIST_TIMEOUT"


def from_options(shard: str | None) -> Shard | None:
    """The slice this process dumps: --shard I/N, torchrun's RANK/WORLD_SIZE, or None."""
    world = torchrun_world_size()
    if shard is not None:
        if world > 1:
            raise LogitCacheError(
                "--shard and torchrun are two ways to split a dump: use one. Under torchrun "
                "every rank takes its slice by itself (RANK of WORLD_SIZE)."
            )
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
        if not match or not 0 <= int(match[1]) < int(match[2]):
            raise LogitCacheError(
                f"--shard must be I/N with 0 <= I < N (job I of N, counted from 0), got {shard!r}."
            )
        return Shard(int(match[1]), int(match[2]))
    if world > 1:
        return Shard(int(os.environ.get("RANK", "0")), world, torchrun=True)
    return None


def part_range(total: int, shard: Shard) -> tuple[int, int]:
    """[first, stop) of the parts shard `shard` dumps, out of `total`."""
    return shard.index * total // shard.count, (shard.index + 1) * total // shard.count


def rank_location(out: str | Path, shard: Shard) -> str | Path:
    name = f"{RANKS_DIR}/rank-{shard.index:05d}-of-{shard.count:05d}"
    if stores.is_remote(out):
        return f"{str(out).rstrip('/')}/{name}"
    return stores.local_path(out) / name


def select(sequences: Iterator[np.ndarray], per_part: int, first: int, stop: int):
    """The sequences of parts [first, stop) of the stream."""
    return itertools.islice(sequences, first * per_part, stop * per_part)


# --------------------------------------------------------------------------------------------
# torchrun: the process group, rank 0's cache at --out, and the join


class Group:
    """gloo process group of a torchrun dump (host-side only: counts, barriers, errors)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.owned = False
        if not dist.is_initialized():
            seconds = float(os.environ.get(TIMEOUT_ENV, 7 * 24 * 3600))
            try:
                dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=seconds))
            except (RuntimeError, ValueError) as exc:
                raise LogitCacheError(
                    f"cannot join the torchrun process group ({exc}). Launch with torchrun, or "
                    "use --shard I/N for independent jobs."
                ) from exc
            self.owned = True
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        self.dist.barrier()

    def close(self) -> None:
        if self.owned and self.dist.is_initialized():
            self.dist.destroy_process_group()


def agreed(group: Group, fn: Callable[[], Any]) -> Any:
    """`fn()` on rank 0, its result (or its error) on every rank."""

    def gather(obj: str | None) -> list[str | None]:
        out: list[str | None] = [None] * group.world
        group.dist.all_gather_object(out, obj)
        return out

    mine = agree_on_errors(gather, lambda: fn() if group.rank == 0 else None, name_the_rank=True)
    return group.broadcast(mine)


def remove_ranks(out: str | Path) -> None:
    """Delete OUT/ranks (the ranks' caches, once joined, or of an --overwrite)."""
    if stores.is_remote(out):
        store = stores.RemoteStore(str(out))
        store.remove(sorted(store.list_files(RANKS_DIR)))
    else:
        shutil.rmtree(stores.local_path(out) / RANKS_DIR, ignore_errors=True)


def join(top: Writer, out: str | Path, shards: list[Shard], total: int) -> Manifest:
    """Rank 0, after the barrier: every rank's parts into OUT under their global names (hard
    links, copies where links are not possible, server-side copies in an object store), then
    one manifest commits them all (the single-process dump's manifest, but `created`)."""
    parts = []
    for shard in shards:
        first, stop = part_range(total, shard)
        if first == stop:
            continue
        location = rank_location(out, shard)
        cache = reader.open(location)
        if cache.num_parts != stop - first:
            raise LogitCacheError(
                f"{location} holds {cache.num_parts} parts, rank {shard.index} should have "
                f"written {stop - first}: rerun the same command."
            )
        for index, part in enumerate(cache.manifest.parts):
            new = part.renamed(part_name(len(parts)))
            for rel, digest in part.files.items():  # a hard link, or a copy
                top.put_file(cache, index, rel, part.file_as(rel, new.name), digest)
            parts.append(new)
    manifest = top.commit_parts(parts)  # one manifest write (or upload), then the card
    remove_ranks(out)
    return manifest


# --------------------------------------------------------------------------------------------
# The dump of one shard (and, under torchrun, the whole job's commit)


class Loop(Protocol):
    """The dump loop a shard runs on its slice: `logitcache.dumping.pipeline.run`, passed in by
    `pipeline.dump` (which imports this module to hand a sharded dump over)."""

    def __call__(
        self,
        job: Prepared,
        sequences: Iterator[np.ndarray],
        writer: CacheWriter,
        bar: Bar,
        first_part: int = 0,
    ) -> None: ...


def dump_sharded(opts: DumpOptions, shard: Shard, loop: Loop) -> DumpSummary:
    """`logitcache.dumping.pipeline.dump` for --shard I/N or a torchrun rank (see the module
    docstring): the same `prepare`, then `loop` over this shard's parts."""
    start = time.perf_counter()
    job = prepare(dataclasses.replace(opts, device=_device(opts.device, shard)))
    group = Group() if shard.torchrun else None
    try:
        if group is not None and (group.rank, group.world) != (shard.index, shard.count):
            raise LogitCacheError(f"RANK/WORLD_SIZE {shard.label} disagree with the process group.")
        summary = _dump_shard(job, shard, group, loop, start)
        return dataclasses.replace(summary, placement=job.teacher.placement)
    finally:
        if group is not None:
            group.close()


def _device(device: str, shard: Shard) -> str:
    """One GPU per torchrun process: cuda:LOCAL_RANK where --device leaves the GPU open."""
    if shard.torchrun and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def _dump_shard(
    job: Prepared, shard: Shard, group: Group | None, loop: Loop, start: float
) -> DumpSummary:
    opts, whole = job.opts, job.template
    top = None
    try:
        if group is None:
            total = job.count_parts()
        else:

            def open_top() -> int | None:
                nonlocal top  # rank 0 holds --out (and its lock) until the join
                top = open_writer(opts.out, whole, overwrite=opts.overwrite, license=opts.license)
                if opts.overwrite:
                    remove_ranks(opts.out)
                return None if top.manifest.complete else job.count_parts()

            total = agreed(group, open_top)
            theirs = group.broadcast(whole.settings())  # every rank must see the same job
            mine = whole.settings()
            if theirs != mine:
                raise LogitCacheError(
                    f"rank {shard.index} does not see what rank 0 sees (another --data, teacher or "
                    "tokenizer on this node?):\n  " + "\n  ".join(diff_settings(theirs, mine))
                )
            if total is None:  # a finished job, run again: nothing to do
                manifest = reader.open(opts.out).manifest
                return _summary(job, manifest, len(manifest.parts), opts.out, start)
        first, stop = part_range(total, shard)
        location = rank_location(opts.out, shard) if group is not None else opts.out
        template = dataclasses.replace(whole, data=shard_data(whole.data, shard))
        resumed = 0
        manifest = None
        if first < stop or group is None:
            show = opts.progress and shard.index == 0
            with progress_bar("dump", total=None, unit="docs", enabled=show) as bar:
                per_part = whole.layout.sequences_per_part
                sequences = select(job.sequences(bar), per_part, first, stop)
                with open_writer(
                    location, template, overwrite=opts.overwrite, license=opts.license
                ) as writer:
                    resumed = writer.committed
                    if not writer.manifest.complete:
                        if first < stop:
                            loop(job, sequences, writer, bar, first_part=first)
                        writer.finish()  # an empty shard (more jobs than parts): no parts
                    manifest = writer.manifest
        if group is None:
            return _summary(job, manifest, resumed, opts.out, start)
        group.barrier()  # every rank's cache is complete
        shards = [Shard(r, shard.count, torchrun=True) for r in range(shard.count)]
        manifest = agreed(group, lambda: join(top, opts.out, shards, total))
        return _summary(job, manifest, resumed, opts.out, start)
    finally:
        if top is not None:
            top.close()  # release --out's lock


def _summary(
    job: Prepared, manifest: Manifest, resumed: int, out: str | Path, start: float
) -> DumpSummary:
    size, wall = stores.disk_usage(out), time.perf_counter() - start
    return DumpSummary(
        manifest,
        resumed,
        size,
        wall,
        logits=job.logits.describe(),
        profile=job.profile.report(wall),
    )
