"""`dump`: stream a dataset through the teacher once and write its soft targets.

The whole algorithm, in order:

1. `prepare` (`logitcache.dumping.prepare`): check the options, resolve and fingerprint the
   data, load the teacher, build the manifest template;
2. open the cache (new, or resume: committed parts are skipped without running the teacher);
3. `run`: for each batch of packed sequences (`batches`), logits on the device (for a causal LM
   with a plain linear head, a few time steps at a time from the final hidden states:
   `logitcache.dumping.chunked`), then the targets on the device
   (`logitcache.dumping.targets`): top-k, ``topk(logits) -
   logsumexp(logits)`` in float32 (log-probs normalised over the FULL vocabulary, so the tail
   mass is known) cast or quantised there; or N draws per position, reproducible from (seed,
   sequence index, position), reduced to distinct ids and counts; copied to pinned host memory
   without blocking;
4. a writer thread takes finished batches from a bounded queue and a `PartAssembler` assembles
   parts, compresses and commits them, so the teacher never waits for the disk and memory stays
   bounded by the queue plus one part.

With --shard I/N, or under torchrun, `dump` hands one slice of the data to
`logitcache.dumping.sharding`, which runs the same `run` on it.
"""

from __future__ import annotations

import collections
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from logitcache.dumping import chunked, sharding, targets
from logitcache.dumping.options import DumpOptions, DumpSummary
from logitcache.dumping.prepare import Prepared, prepare
from logitcache.dumping.teacher import Teacher
from logitcache.errors import LogitCacheError
from logitcache.format.manifest import TargetInfo
from logitcache.progress import Bar, progress_bar
from logitcache.storage import stores
from logitcache.write.remote_writer import open_writer
from logitcache.write.writer import CacheWriter

__all__ = [
    "QUEUE_BATCHES",
    "BatchTargets",
    "DumpOptions",
    "DumpSummary",
    "PartAssembler",
    "batches",
    "dump",
    "input_ids",
    "run",
]

QUEUE_BATCHES = 4  # batches in flight between the device and the writer: bounds host memory

#: What computes a batch's targets on its device (`targets.device_targets`; bench_dump swaps it).
TargetsFn = chunked.TargetsFn


def dump(opts: DumpOptions, *, loop: sharding.Loop | None = None) -> DumpSummary:
    """Run the teacher over `opts.data` and write (or finish) the cache at `opts.out`.

    With `opts.shard` ("I/N"), or launched by torchrun, dump one slice of the data instead
    (`logitcache.dumping.sharding`: the same steps, on a slice of the parts). `loop` replaces
    `run` (bench_dump times it, or runs it without a stage); None is `run`."""
    loop = loop or run
    shard = sharding.from_options(opts.shard)
    if shard is not None:
        return sharding.dump_sharded(opts, shard, loop)
    start = time.perf_counter()
    job = prepare(opts)
    documents = job.template.data.documents
    total = documents if documents >= 0 else None
    with progress_bar("dump", total=total, unit="docs", enabled=opts.progress) as bar:
        sequences = job.sequences(bar)  # before touching --out: empty data leaves nothing behind
        with open_writer(
            opts.out, job.template, overwrite=opts.overwrite, license=opts.license
        ) as writer:
            resumed = writer.committed
            if not writer.manifest.complete:
                loop(job, sequences, writer, bar)
                writer.finish()
            manifest = writer.manifest
    size = stores.disk_usage(opts.out)
    wall = time.perf_counter() - start
    return DumpSummary(
        manifest,
        resumed,
        size,
        wall,
        placement=job.teacher.placement,
        logits=job.logits.describe(),
    )


def run(
    job: Prepared,
    sequences: Iterator[np.ndarray],
    writer: CacheWriter,
    bar: Bar,
    first_part: int = 0,
    *,
    targets_fn: TargetsFn = targets.device_targets,
    sink: Callable[[BatchTargets], None] | None = None,
) -> None:
    """Device work on this thread, host work (assembly, compression, commit) on the writer's.

    `sequences` start at part `first_part` of the whole data (a shard's first part).
    `targets_fn` computes a batch's targets on the device, and `sink` is what the writer thread
    does with each batch (default: a `PartAssembler` that writes the parts); bench_dump replaces
    them to time the dump without one stage."""
    manifest = writer.manifest
    per_part = manifest.layout.sequences_per_part
    spec = targets.TargetSpec.of(manifest.targets)
    sink = sink or PartAssembler(writer, manifest.targets, manifest.codec.gaps).add
    # the global index of the next sequence: every committed part but the last is full
    next_sequence = (first_part + writer.committed) * per_part
    pipe: queue.Queue[BatchTargets | None] = queue.Queue(maxsize=QUEUE_BATCHES)
    failure: list[BaseException] = []

    def write_loop() -> None:
        while (item := pipe.get()) is not None:
            if not failure:
                try:
                    sink(item)
                except BaseException as exc:  # re-raised on the main thread below
                    failure.append(exc)

    thread = threading.Thread(target=write_loop, name="logitcache-writer", daemon=True)
    thread.start()
    try:
        for batch, ends_part in batches(sequences, per_part, job.opts.batch_size, writer.committed):
            if failure:
                break
            pipe.put(
                _teacher_targets(
                    job.teacher, batch, spec, next_sequence, ends_part, targets_fn, job.logits
                )
            )
            next_sequence += len(batch)
            bar.add_tokens(sum(len(s) for s in batch))
    finally:
        pipe.put(None)
        thread.join()
    if failure:
        raise failure[0]


def batches(
    sequences: Iterator[np.ndarray], per_part: int, batch_size: int, skip_parts: int
) -> Iterator[tuple[list[np.ndarray], bool]]:
    """(sequences, ends_part) per batch. A batch never spans two parts, so a resumed run forms
    exactly the batches an uninterrupted one does. Holds one part's input ids (8 bytes/token)."""
    for _ in range(skip_parts):
        collections.deque(itertools.islice(sequences, per_part), maxlen=0)
    while part := list(itertools.islice(sequences, per_part)):
        for start in range(0, len(part), batch_size):
            yield part[start : start + batch_size], start + batch_size >= len(part)


def input_ids(batch: list[np.ndarray]) -> np.ndarray:
    """The (batch, time) int64 teacher input of a batch, right-padded with 0 (harmless: the
    teacher is causal, and the padding's targets are never stored)."""
    ids = np.zeros((len(batch), max(len(s) for s in batch)), dtype=np.int64)
    for row, seq in enumerate(batch):
        ids[row, : len(seq)] = seq
    return ids


@dataclass
class BatchTargets:
    """One batch's results on their way to the host; `ready` fires when the copy has landed."""

    lengths: list[int]
    input_ids: np.ndarray  # (batch, time) host copy of the inputs
    arrays: dict[str, torch.Tensor]  # host copies of the targets' tensors (`TargetsFn`)
    ready: torch.cuda.Event | None
    ends_part: bool


def _teacher_targets(
    teacher: Teacher,
    batch: list[np.ndarray],
    spec: targets.TargetSpec,
    first_sequence: int,
    ends_part: bool,
    targets_fn: TargetsFn,
    plan: chunked.LogitsPlan,
) -> BatchTargets:
    """The batch's targets; `first_sequence` is the global index of its first sequence (what
    sampled targets are seeded by, so that they do not depend on batching). `plan` says
    whether they come from the full logits or a chunk of time steps at a time."""
    ids = input_ids(batch)
    device_ids = torch.from_numpy(ids).to(teacher.device)
    index = torch.arange(first_sequence, first_sequence + len(batch), device=teacher.device)
    if plan.split is not None:  # the head's width is the probed one (`chunked.split_head`)
        computed = chunked.chunked_targets(
            plan.split, device_ids, spec, index, targets_fn, plan.chunk_tokens
        )
    else:
        logits = teacher.logits(device_ids)  # (batch, time, vocab)
        if logits.shape[-1] != teacher.info.vocab_size:  # the width probed, in the manifest
            raise LogitCacheError(
                f"the teacher returned logits over {logits.shape[-1]} ids for a batch, but "
                f"{teacher.info.vocab_size} when probed (the vocab_size in the manifest): its "
                "ids would not match the cache's. Use a teacher whose output width does not "
                "depend on its input."
            )
        computed = targets_fn(logits, spec, index)
        del logits
    pinned = teacher.device.type == "cuda"
    host = {}
    for name, tensor in computed.items():
        host[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pinned)
        host[name].copy_(tensor, non_blocking=pinned)
    ready = None
    if pinned:
        ready = torch.cuda.Event()
        ready.record()
    return BatchTargets([len(s) for s in batch], ids, host, ready, ends_part)


class PartAssembler:
    """Collects batches into the next part and writes it; runs on the writer thread."""

    def __init__(
        self, writer: CacheWriter, target_info: TargetInfo, gaps: Sequence[str] = ()
    ) -> None:
        self.writer = writer
        self.targets = target_info
        self.gaps = tuple(gaps)  # the manifest's codec.gaps: arrays stored as per-position gaps
        self._inputs: list[np.ndarray] = []
        self._rows: list[dict[str, np.ndarray]] = []

    def add(self, batch: BatchTargets) -> None:
        if batch.ready is not None:
            batch.ready.synchronize()
        arrays = {name: t.numpy() for name, t in batch.arrays.items()}
        finite = arrays.pop("finite")
        for row, n in enumerate(batch.lengths):
            if not finite[row, :n].all():
                raise LogitCacheError(
                    f"the teacher produced non-finite logits (NaN or inf) in part {self.writer.committed}. "
                    "Check the model's weights and --dtype (float16 overflows easily; try bfloat16 or float32)."
                )
            self._inputs.append(batch.input_ids[row, :n])
            self._rows.append({name: a[row, :n] for name, a in arrays.items()})
        if batch.ends_part:
            self._write()

    def _write(self) -> None:
        arrays = targets.assemble(self.targets, self._inputs, self._rows, self.gaps)
        self._inputs, self._rows = [], []
        self.writer.write_part(arrays)
