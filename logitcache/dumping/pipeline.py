"""`dump`: stream a dataset through the teacher once and write its soft targets.

The whole algorithm, in order:

1. resolve and fingerprint the data, load the teacher, build the manifest template;
2. open the cache (new, or resume: committed parts are skipped without running the teacher);
3. for each batch of packed sequences: logits on the device, then the targets on the device
   (`logitcache.dumping.targets`): top-k, ``topk(logits) - logsumexp(logits)`` in float32 (log-probs
   normalised over the FULL vocabulary, so the tail mass is known) cast or quantised there; or
   N draws per position, reproducible from (seed, sequence index, position), reduced to
   distinct ids and counts; copied to pinned host memory without blocking;
4. a writer thread takes finished batches from a bounded queue, assembles parts, compresses and
   commits them, so the teacher never waits for the disk and memory stays bounded by the queue
   plus one part.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import glob
import itertools
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from logitcache.dumping import data, sharding, targets
from logitcache.dumping.teacher import Teacher, load_teacher
from logitcache.errors import LogitCacheError
from logitcache.format.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LOGPROB_DTYPES,
    MAX_SAMPLES,
    ORDERS,
    SHUFFLES,
    TARGET_KINDS,
    CodecInfo,
    DataInfo,
    LayoutInfo,
    Manifest,
    TargetInfo,
    version_for,
)
from logitcache.progress import Bar, progress_bar
from logitcache.storage import stores
from logitcache.storage.paths import refuse_overlap
from logitcache.version import __version__
from logitcache.write.remote_writer import open_writer
from logitcache.write.writer import CacheWriter

#: --clevel ranges: Blosc's (zarr) levels, 0 (none) to 9; the Parquet backend's plain zstd
#: levels, 1 to 22 (0 means zstd's default there). Checked up front: out of range, Blosc fails
#: only when the first part is written, after --out was created.
CLEVELS = {"zarr": (0, 9), "parquet": (0, 22)}
QUEUE_BATCHES = 4  # batches in flight between the device and the writer: bounds host memory


@dataclass
class DumpOptions:
    """Every setting of a dump; the CLI fills it from flags, Python callers directly."""

    data: str
    out: str | Path  # a directory, or a URL (s3://...): see logitcache.storage.stores
    teacher: str | None = None
    teacher_factory: str | None = None
    tokenizer: str | None = None
    trust_remote_code: bool = False
    data_format: str = "auto"
    text_field: str | None = None
    ids_field: str | None = None
    targets: str = "topk"  # or "sample"
    top_k: int = 32  # the smallest k within 1% of online KD in benchmarks/bench_fidelity.py
    samples: int = 64  # draws per position for targets="sample"
    temperature: float = 1.0
    seed: int = 0  # of the draws (targets="sample")
    id_order: str = "id"  # top-k: ids increasing within a position (smaller), or "descending"
    delta: bool = True  # delta-filter the arrays that increase along a position's row
    seq_len: int = 1024
    pack: bool = True
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "float32"
    backend: str = "zarr"
    logprob_dtype: str = "float16"
    part_tokens: int = 1 << 20
    chunk_bytes: int = 1 << 20
    clevel: int = 5
    shuffle: str = "shuffle"  # Blosc byte shuffle: smallest for id-ordered targets (FORMAT.md)
    overwrite: bool = False
    progress: bool = True
    license: str = "unknown"  # shown on the README.md card
    shard: str | None = None  # "I/N": dump only slice I of N (see logitcache.dumping.sharding)


@dataclass
class DumpSummary:
    manifest: Manifest
    resumed_parts: int
    bytes_on_disk: int
    wall_seconds: float

    @property
    def bytes_per_token(self) -> float | None:
        """None for a dump without tokens (an empty shard): its metadata is no rate."""
        return self.bytes_on_disk / self.manifest.tokens if self.manifest.tokens else None


def dump(opts: DumpOptions) -> DumpSummary:
    """Run the teacher over `opts.data` and write (or finish) the cache at `opts.out`.

    With `opts.shard` ("I/N"), or launched by torchrun, dump one slice of the data instead
    (`logitcache.dumping.sharding`: the same steps, on a slice of the parts)."""
    shard = sharding.from_options(opts.shard)
    if shard is not None:
        return sharding.dump_sharded(opts, shard)
    start = time.perf_counter()
    _check_options(opts)
    source = data.resolve(opts.data, opts.data_format, opts.text_field, opts.ids_field)
    teacher = load_teacher(
        opts.teacher,
        factory=opts.teacher_factory,
        tokenizer=opts.tokenizer,
        device=opts.device,
        dtype=opts.dtype,
        trust_remote_code=opts.trust_remote_code,
    )
    _check_against_teacher(opts, teacher)
    if source.pretokenized:  # before touching --out: a bad id must leave nothing behind
        data.check_ids(source, teacher.info.vocab_size)
    template = _manifest_template(opts, teacher, source)
    total = template.data.documents if template.data.documents >= 0 else None
    with progress_bar("dump", total=total, unit="docs", enabled=opts.progress) as bar:
        documents = bar.counting(data.iter_documents(source))
        tokens = data.tokenize(documents, teacher.tokenizer, source.pretokenized)
        sequences = data.pack(tokens, opts.seq_len, teacher.tokenizer_info.eos_token_id, opts.pack)
        first = next(sequences, None)  # before touching --out: empty data must leave nothing behind
        if first is None:
            raise LogitCacheError(f"--data {opts.data} holds no tokens: every document is empty.")
        with open_writer(
            opts.out, template, overwrite=opts.overwrite, license=opts.license
        ) as writer:
            resumed = writer.committed
            if not writer.manifest.complete:
                _run(opts, teacher, itertools.chain([first], sequences), writer, bar)
                writer.finish()
            manifest = writer.manifest
    size = stores.disk_usage(opts.out)
    return DumpSummary(manifest, resumed, size, time.perf_counter() - start)


def _check_options(opts: DumpOptions) -> None:
    for name in ("top_k", "samples", "batch_size", "part_tokens", "chunk_bytes"):
        if getattr(opts, name) < 1:
            raise LogitCacheError(
                f"--{name.replace('_', '-')} must be at least 1, got {getattr(opts, name)}."
            )
    if opts.seq_len < 2:  # a 1-token sequence has no next token: a student could not train
        raise LogitCacheError(
            f"--seq-len must be at least 2, got {opts.seq_len}: the student learns to predict "
            "each token from the ones before it, so a sequence needs at least two tokens."
        )
    if opts.backend not in CLEVELS:
        raise LogitCacheError(
            f"--format must be one of {', '.join(CLEVELS)}, got {opts.backend!r}."
        )
    low, high = CLEVELS[opts.backend]
    if not low <= opts.clevel <= high:
        raise LogitCacheError(
            f"--clevel must be in {low}..{high} for --format {opts.backend} (higher: smaller "
            f"and slower), got {opts.clevel}."
        )
    if opts.logprob_dtype not in LOGPROB_DTYPES:
        raise LogitCacheError(
            f"--logprob-dtype must be one of {', '.join(LOGPROB_DTYPES)}, got "
            f"{opts.logprob_dtype!r}."
        )
    if opts.targets not in TARGET_KINDS:
        raise LogitCacheError(
            f"--targets must be one of {', '.join(TARGET_KINDS)}, got {opts.targets!r}."
        )
    if opts.id_order not in ORDERS:
        raise LogitCacheError(f"--id-order must be descending or id, got {opts.id_order!r}.")
    if opts.shuffle not in SHUFFLES:
        raise LogitCacheError(
            f"--shuffle must be one of {', '.join(SHUFFLES)}, got {opts.shuffle!r}."
        )
    if opts.samples > MAX_SAMPLES:
        raise LogitCacheError(f"--samples must be at most {MAX_SAMPLES}, got {opts.samples}.")
    if not 0 < opts.temperature < float("inf"):
        raise LogitCacheError(f"--temperature must be a positive number, got {opts.temperature}.")
    if not 0 <= opts.seed < 1 << 63:
        raise LogitCacheError(f"--seed must be in 0..2**63-1, got {opts.seed}.")
    refuse_overlap(opts.out, _local_inputs(opts), "--out")


def _local_inputs(opts: DumpOptions) -> list[str]:
    """What a dump reads from local disk, for the --out check: --data (for a glob, the files
    it matches) and --teacher / --tokenizer where they are paths rather than hub names."""
    found = [opts.data] if Path(opts.data).exists() else glob.glob(opts.data, recursive=True)
    return found + [p for p in (opts.teacher, opts.tokenizer) if p and Path(p).exists()]


def _check_against_teacher(opts: DumpOptions, teacher: Teacher) -> None:
    vocab = teacher.info.vocab_size
    if opts.targets == "topk" and not 1 <= opts.top_k <= vocab:
        raise LogitCacheError(
            f"--top-k {opts.top_k} is not in 1..{vocab} (the teacher's vocabulary size)."
        )
    words = teacher.tokenizer_info.vocab_size
    if words > vocab:  # input ids up to words - 1: past the model's embedding, and any student's
        raise LogitCacheError(
            f"the tokenizer ({teacher.tokenizer_info.name}) has {words} ids but the teacher's "
            f"logits have {vocab}: ids {vocab}..{words - 1} are outside the model's vocabulary, "
            "and a cache of them would be refused by every reader. Pass the tokenizer the "
            f"teacher was trained with (--tokenizer; at most {vocab} ids), or a teacher whose "
            f"output covers all {words}."
        )
    limit = teacher.info.max_positions
    if limit is not None and opts.seq_len > limit:
        raise LogitCacheError(
            f"--seq-len {opts.seq_len} is longer than the teacher's maximum of {limit} positions. "
            f"Use --seq-len {limit} or less."
        )


def _manifest_template(opts: DumpOptions, teacher: Teacher, source: data.DataSource) -> Manifest:
    documents = data.count_documents(source)
    target_info = targets.target_info(
        kind=opts.targets, vocab_size=teacher.info.vocab_size, top_k=opts.top_k,
        samples=opts.samples, temperature=opts.temperature, logprob_dtype=opts.logprob_dtype,
        order=opts.id_order, seed=opts.seed,
    )  # fmt: skip
    manifest = Manifest(
        format=FORMAT_NAME,
        format_version=FORMAT_VERSION,  # the oldest version that describes it, set below
        backend=opts.backend,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        teacher=teacher.info,
        tokenizer=teacher.tokenizer_info,
        data=DataInfo(
            source=str(opts.data),
            format=source.format,
            fingerprint=data.fingerprint(source),
            documents=-1 if documents is None else documents,
            text_field=source.text_field if not source.pretokenized else source.ids_field,
        ),
        targets=target_info,
        layout=LayoutInfo(
            seq_len=opts.seq_len,
            packing=opts.pack,
            sequences_per_part=max(1, opts.part_tokens // opts.seq_len),
            chunk_bytes=opts.chunk_bytes,
        ),
        codec=CodecInfo(
            name="blosc",
            cname="zstd",
            clevel=opts.clevel,
            shuffle=opts.shuffle,
            checksum="crc32c",
            delta=targets.delta_arrays(target_info) if opts.delta else [],
        ),
        complete=False,
        sequences=0,
        tokens=0,
        tool_version=__version__,
    )
    return dataclasses.replace(manifest, format_version=version_for(manifest))


@dataclass
class _BatchTargets:
    """One batch's results on their way to the host; `ready` fires when the copy has landed."""

    lengths: list[int]
    input_ids: np.ndarray  # (batch, time) host copy of the inputs
    arrays: dict[str, torch.Tensor]  # host copies of `targets.device_targets`' tensors
    ready: torch.cuda.Event | None
    ends_part: bool


def _batches(sequences: Iterator[np.ndarray], per_part: int, batch_size: int, skip_parts: int):
    """(sequences, ends_part) per batch. A batch never spans two parts, so a resumed run forms
    exactly the batches an uninterrupted one does. Holds one part's input ids (8 bytes/token)."""
    for _ in range(skip_parts):
        collections.deque(itertools.islice(sequences, per_part), maxlen=0)
    while part := list(itertools.islice(sequences, per_part)):
        for start in range(0, len(part), batch_size):
            yield part[start : start + batch_size], start + batch_size >= len(part)


# The top-k log-softmax (no vocab-sized temporary on a CPU) and the sampled targets are
# computed by `logitcache.dumping.targets.device_targets`, shared with the benchmarks.


def _teacher_targets(
    teacher: Teacher,
    batch: list[np.ndarray],
    spec: targets.TargetSpec,
    first_sequence: int,
    ends_part: bool,
) -> _BatchTargets:
    """The batch's targets; `first_sequence` is the global index of its first sequence (what
    sampled targets are seeded by, so that they do not depend on batching)."""
    lengths = [len(s) for s in batch]
    ids = np.zeros((len(batch), max(lengths)), dtype=np.int64)  # right padding: causal, so harmless
    for row, seq in enumerate(batch):
        ids[row, : len(seq)] = seq
    logits = teacher.logits(torch.from_numpy(ids).to(teacher.device))  # (batch, time, vocab)
    if logits.shape[-1] != teacher.info.vocab_size:  # the width probed, and in the manifest
        raise LogitCacheError(
            f"the teacher returned logits over {logits.shape[-1]} ids for a batch, but "
            f"{teacher.info.vocab_size} when probed (the vocab_size in the manifest): its ids "
            "would not match the cache's. Use a teacher whose output width does not depend on "
            "its input."
        )
    index = torch.arange(first_sequence, first_sequence + len(batch), device=teacher.device)
    computed = targets.device_targets(logits, spec, index)
    pinned = teacher.device.type == "cuda"
    host = {}
    for name, tensor in computed.items():
        host[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pinned)
        host[name].copy_(tensor, non_blocking=pinned)
    ready = None
    if pinned:
        ready = torch.cuda.Event()
        ready.record()
    return _BatchTargets(lengths, ids, host, ready, ends_part)


class _PartAssembler:
    """Collects batches into the next part and writes it; runs on the writer thread."""

    def __init__(self, writer: CacheWriter, target_info: TargetInfo) -> None:
        self.writer = writer
        self.targets = target_info
        self._inputs: list[np.ndarray] = []
        self._rows: list[dict[str, np.ndarray]] = []

    def add(self, batch: _BatchTargets) -> None:
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
        arrays = targets.assemble(self.targets, self._inputs, self._rows)
        self._inputs, self._rows = [], []
        self.writer.write_part(arrays)


def _run(
    opts: DumpOptions,
    teacher: Teacher,
    sequences: Iterator[np.ndarray],
    writer: CacheWriter,
    bar: Bar,
    first_part: int = 0,
) -> None:
    """Device work on this thread, host work (assembly, compression, commit) on the writer's.
    `sequences` start at part `first_part` of the whole data (a shard's first part)."""
    manifest = writer.manifest
    per_part = manifest.layout.sequences_per_part
    batches = _batches(sequences, per_part, opts.batch_size, writer.committed)
    spec = targets.TargetSpec.of(manifest.targets)
    assembler = _PartAssembler(writer, manifest.targets)
    # the global index of the next sequence: every committed part but the last is full
    next_sequence = (first_part + writer.committed) * per_part
    pipe: queue.Queue[_BatchTargets | None] = queue.Queue(maxsize=QUEUE_BATCHES)
    failure: list[BaseException] = []

    def write_loop() -> None:
        while (item := pipe.get()) is not None:
            if not failure:
                try:
                    assembler.add(item)
                except BaseException as exc:  # re-raised on the main thread below
                    failure.append(exc)

    thread = threading.Thread(target=write_loop, name="logitcache-writer", daemon=True)
    thread.start()
    try:
        for batch, ends_part in batches:
            if failure:
                break
            pipe.put(_teacher_targets(teacher, batch, spec, next_sequence, ends_part))
            next_sequence += len(batch)
            bar.add_tokens(sum(len(s) for s in batch))
    finally:
        pipe.put(None)
        thread.join()
    if failure:
        raise failure[0]
