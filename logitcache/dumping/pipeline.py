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
   parts; a pool of `--writer-threads` compresses, writes and hashes them (several parts at
   once where compression is the bottleneck), and the writer thread commits them in order. So
   the teacher never waits for the disk, and memory stays bounded by the queue plus the parts
   in the pool. `--profile` times each of these stages (`logitcache.dumping.profile`).

With --shard I/N, or under torchrun, `dump` hands one slice of the data to
`logitcache.dumping.sharding`, which runs the same `run` on it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from logitcache.dumping import chunked, data, masking, sharding, targets
from logitcache.dumping.options import DumpOptions, DumpSummary
from logitcache.dumping.prepare import Prepared, prepare
from logitcache.dumping.profile import DeviceMarks, Profile
from logitcache.dumping.teacher import Teacher
from logitcache.errors import LogitCacheError
from logitcache.format.manifest import PartArrays, TargetInfo
from logitcache.progress import Bar, progress_bar
from logitcache.storage import stores
from logitcache.write.remote_writer import open_writer
from logitcache.write.writer import CacheWriter, StagedPart, Writer

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
    "writer_threads",
]

QUEUE_BATCHES = 4  # batches in flight between the device and the writer: bounds host memory

#: What computes a batch's targets on its device (`targets.device_targets`; bench_dump swaps it).
TargetsFn = chunked.TargetsFn


def dump(opts: DumpOptions, *, loop: sharding.Loop | None = None) -> DumpSummary:
    """Run the teacher over `opts.data` and write (or finish) the cache at `opts.out`.

    With `opts.shard` ("I/N"), or launched by torchrun, dump one slice of the data instead
    (`logitcache.dumping.sharding`: the same steps, on a slice of the parts). `loop` replaces
    `run` (bench_dump times it, or runs it without a stage); None is `run`."""
    if opts.task == "classification":  # format 1.3: one row per example or view
        from logitcache.dumping.classify import dump_classifier

        return dump_classifier(opts)
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
        profile=job.profile.report(wall),
    )


def writer_threads(requested: int, device: torch.device) -> int:
    """The writer pool's size: `requested`, or for 0 (auto) 1 beside a CPU teacher (its
    forward already uses every core; compressing in parallel would only slow it) and, beside a
    GPU, up to 4 threads but no more than a quarter of the cores (torchrun runs one dump per
    GPU on the same host)."""
    if requested > 0:
        return requested
    if device.type == "cpu":
        return 1
    return max(1, min(4, (os.cpu_count() or 1) // 4))


def run(
    job: Prepared,
    sequences: Iterator[data.Packed],
    writer: CacheWriter,
    bar: Bar,
    first_part: int = 0,
    *,
    targets_fn: TargetsFn = targets.device_targets,
    sink: Callable[[BatchTargets], None] | None = None,
) -> None:
    """Device work on this thread, host work (assembly, commits) on the writer's, compression
    in the writer pool.

    `sequences` start at part `first_part` of the whole data (a shard's first part).
    `targets_fn` computes a batch's targets on the device, and `sink` is what the writer thread
    does with each batch (default: a `PartAssembler` that writes the parts); bench_dump replaces
    them to time the dump without one stage."""
    manifest = writer.manifest
    per_part = manifest.layout.sequences_per_part
    spec = targets.TargetSpec.of(manifest.targets)
    profile = job.profile
    assembler = None
    if sink is None:
        threads = writer_threads(job.opts.writer_threads, job.teacher.device)
        assembler = PartAssembler(
            writer, manifest.targets, manifest.codec.gaps, threads=threads, profile=profile
        )
        sink = assembler.add
    # the global index of the next sequence: every committed part but the last is full
    next_sequence = (first_part + writer.committed) * per_part
    pipe: queue.Queue[BatchTargets | None] = queue.Queue(maxsize=QUEUE_BATCHES)
    failure: list[BaseException] = []

    def write_loop() -> None:
        while True:
            with profile.stage("writer", "idle"):
                item = pipe.get()
            if item is None:
                break
            if not failure:
                try:
                    sink(item)
                except BaseException as exc:  # re-raised on the main thread below
                    failure.append(exc)
        if assembler is not None and not failure:
            try:
                assembler.flush()  # the parts still in the pool, committed in order
            except BaseException as exc:
                failure.append(exc)

    thread = threading.Thread(target=write_loop, name="logitcache-writer", daemon=True)
    thread.start()
    try:
        stream = batches(sequences, per_part, job.opts.batch_size, writer.committed)
        while not failure:
            with profile.stage("teacher", "input"):
                item = next(stream, None)
            if item is None:
                break
            batch, ends_part = item
            result = _teacher_targets(
                job.teacher, batch, spec, next_sequence, ends_part, targets_fn, job.logits,
                profile, job.masker,
            )  # fmt: skip
            with profile.stage("teacher", "queue full"):
                pipe.put(result)
            next_sequence += len(batch)
            bar.add_tokens(sum(len(s) for s in batch))
    finally:
        pipe.put(None)
        thread.join()
        if assembler is not None:
            assembler.close()  # before the writer's close removes what was staged
    if failure:
        raise failure[0]


def batches(
    sequences: Iterator[data.Packed], per_part: int, batch_size: int, skip_parts: int
) -> Iterator[tuple[list[data.Packed], bool]]:
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
    marks: DeviceMarks | None = None  # --profile on CUDA: the device's time per stage
    texts: list[data.Spanned] | None = None  # --offsets: each sequence's text and spans
    #: A masked-LM dump: each sequence's masking; only its positions' targets are kept.
    masked: list[masking.Masked] | None = None


def _teacher_targets(
    teacher: Teacher,
    batch: list[data.Packed],
    spec: targets.TargetSpec,
    first_sequence: int,
    ends_part: bool,
    targets_fn: TargetsFn,
    plan: chunked.LogitsPlan,
    profile: Profile,
    masker: masking.Masker | None = None,
) -> BatchTargets:
    """The batch's targets; `first_sequence` is the global index of its first sequence (what
    sampled targets and maskings are seeded by, so that they do not depend on batching). `plan`
    says whether they come from the full logits or a chunk of time steps at a time. With
    `masker` (a masked-LM teacher) the teacher reads each sequence masked, with an attention
    mask when the batch is padded."""
    masked = None
    if masker is not None:
        masked = [masker.mask(data.ids_of(s), first_sequence + i) for i, s in enumerate(batch)]
        batch = [data.with_ids(s, m.input_ids) for s, m in zip(batch, masked, strict=True)]
    ids = input_ids([data.ids_of(s) for s in batch])
    device_ids = torch.from_numpy(ids).to(teacher.device)
    attention = None
    if masker is not None and min(map(len, batch)) < ids.shape[1]:
        lengths = torch.tensor([len(s) for s in batch], device=teacher.device)
        attention = (torch.arange(ids.shape[1], device=teacher.device) < lengths[:, None]).long()
    index = torch.arange(first_sequence, first_sequence + len(batch), device=teacher.device)
    marks = profile.marks()
    mark = marks.mark if marks is not None else lambda: None
    mark()
    if plan.split is not None:  # the head's width is the probed one (`chunked.split_head`)
        with profile.stage("teacher", "forward"):
            hidden = plan.split.hidden(device_ids)
        mark()
        with profile.stage("teacher", "targets"):
            computed = chunked.chunked_targets(
                plan.split, hidden, spec, index, targets_fn, plan.chunk_tokens
            )
        del hidden
    else:
        with profile.stage("teacher", "forward"):
            logits = teacher.logits(device_ids, attention)  # (batch, time, vocab)
        mark()
        if logits.shape[-1] != teacher.info.vocab_size:  # the width probed, in the manifest
            raise LogitCacheError(
                f"the teacher returned logits over {logits.shape[-1]} ids for a batch, but "
                f"{teacher.info.vocab_size} when probed (the vocab_size in the manifest): its "
                "ids would not match the cache's. Use a teacher whose output width does not "
                "depend on its input."
            )
        with profile.stage("teacher", "targets"):
            computed = targets_fn(logits, spec, index)
        del logits
    mark()
    pinned = teacher.device.type == "cuda"
    host = {}
    with profile.stage("teacher", "to host"):
        for name, tensor in computed.items():
            host[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pinned)
            host[name].copy_(tensor, non_blocking=pinned)
    mark()
    ready = None
    if pinned:  # on the stream the copies were queued on, which need not be the default one
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(teacher.device))
    texts = [s for s in batch if isinstance(s, data.Spanned)] or None
    return BatchTargets([len(s) for s in batch], ids, host, ready, ends_part, marks, texts, masked)


class PartAssembler:
    """Collects batches into parts on the writer thread; a pool of `threads` stages them
    (compresses, writes, hashes: `Writer.stage_part`) and the writer thread commits them in
    order, at most `threads` parts being staged at once (what bounds memory).

    With one thread a part is staged and committed inline, as it is assembled. `close` must be
    called once done (it waits for the pool), before the writer removes orphaned stages."""

    def __init__(
        self,
        writer: Writer,
        target_info: TargetInfo,
        gaps: Sequence[str] = (),
        *,
        threads: int = 1,
        profile: Profile | None = None,
    ) -> None:
        self.writer = writer
        self.targets = target_info
        self.gaps = tuple(gaps)  # the manifest's codec.gaps: arrays stored as per-position gaps
        self.threads = threads
        self.profile = profile or Profile(enabled=False)
        self._inputs: list[np.ndarray] = []
        self._rows: list[dict[str, np.ndarray]] = []
        self._texts: list[data.Spanned] = []
        self._masked: list[masking.Masked] = []
        self._pool = (
            concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="logitcache-encode")
            if threads > 1
            else None
        )
        self._staging: collections.deque[concurrent.futures.Future[StagedPart]] = (
            collections.deque()
        )

    def add(self, batch: BatchTargets) -> None:
        with self.profile.stage("writer", "copy wait"):
            if batch.ready is not None:
                batch.ready.synchronize()
        self.profile.landed(batch.marks)
        with self.profile.stage("writer", "assemble"):
            arrays = {name: t.numpy() for name, t in batch.arrays.items()}
            finite = arrays.pop("finite")
            for row, n in enumerate(batch.lengths):
                if not finite[row, :n].all():
                    raise LogitCacheError(
                        f"the teacher produced non-finite logits (NaN or inf) in part {self._next_part}. "
                        "Check the model's weights and --dtype (float16 overflows easily; try bfloat16 or float32)."
                    )
                self._inputs.append(batch.input_ids[row, :n])
                if batch.masked is None:
                    self._rows.append({name: a[row, :n] for name, a in arrays.items()})
                    continue
                at = batch.masked[row].positions  # a masked LM: the masked positions' rows
                self._rows.append({name: a[row, at] for name, a in arrays.items()})
                self._masked.append(batch.masked[row])
            self._texts += batch.texts or []
        if batch.ends_part:
            self._end_part()

    @property
    def _next_part(self) -> int:
        """The index of the part being assembled: after the committed and the staging ones."""
        return self.writer.committed + len(self._staging)

    def flush(self) -> None:
        """Commit every part still being staged, in order."""
        while self._staging:
            self._commit_oldest()

    def close(self) -> None:
        """Stop the pool: parts not yet started are dropped, running ones finish (their stages
        are orphans the writer removes)."""
        if self._pool is not None:
            for future in self._staging:
                future.cancel()
            self._pool.shutdown(wait=True)
            self._staging.clear()

    def _end_part(self) -> None:
        with self.profile.stage("writer", "assemble"):
            arrays = targets.assemble(self.targets, self._inputs, self._rows, self.gaps)
            if self._texts:
                arrays = data.with_texts(arrays, self._texts)
            if self._masked:
                arrays = targets.with_masking(arrays, self._masked, self.targets.id_dtype)
        self._inputs, self._rows, self._texts, self._masked = [], [], [], []
        index = self._next_part
        if self._pool is None:
            staged = self._stage(arrays, index)
            with self.profile.stage("writer", "commit"):
                self.writer.commit_staged(staged)
            return
        while len(self._staging) >= self.threads:
            self._commit_oldest()
        self._staging.append(self._pool.submit(self._stage, arrays, index))

    def _stage(self, arrays: PartArrays, index: int) -> StagedPart:
        with self.profile.stage("pool", "encode"):
            return self.writer.stage_part(arrays, index)

    def _commit_oldest(self) -> None:
        with self.profile.stage("writer", "pool full"):
            staged = self._staging[0].result()  # raises the stage's failure, in part order
        self._staging.popleft()
        with self.profile.stage("writer", "commit"):
            self.writer.commit_staged(staged)
