"""`dump`: stream a dataset through the teacher once and write its top-k soft targets.

The whole algorithm, in order:

1. resolve and fingerprint the data, load the teacher, build the manifest template;
2. open the cache (new, or resume: committed parts are skipped without running the teacher);
3. for each batch of packed sequences: logits on the device, ``topk(logits) - logsumexp(logits)``
   in float32 (log-probs normalised over the FULL vocabulary, so the tail mass is known), cast
   on the device, copied to pinned host memory without blocking;
4. a writer thread takes finished batches from a bounded queue, assembles parts, compresses and
   commits them, so the teacher never waits for the disk and memory stays bounded by the queue
   plus one part.
"""

from __future__ import annotations

import collections
import datetime
import itertools
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from logitcache import __version__, data, stores
from logitcache.errors import LogitCacheError
from logitcache.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    CodecInfo,
    DataInfo,
    LayoutInfo,
    Manifest,
    PartArrays,
    TargetInfo,
    id_dtype_for,
)
from logitcache.progress import Bar, progress_bar
from logitcache.remote_writer import open_writer
from logitcache.teacher import Teacher, load_teacher
from logitcache.writer import CacheWriter

QUEUE_BATCHES = 4  # batches in flight between the device and the writer: bounds host memory


@dataclass
class DumpOptions:
    """Every setting of a dump; the CLI fills it from flags, Python callers directly."""

    data: str
    out: str | Path  # a directory, or a URL (s3://...): see logitcache.stores
    teacher: str | None = None
    teacher_factory: str | None = None
    tokenizer: str | None = None
    trust_remote_code: bool = False
    data_format: str = "auto"
    text_field: str | None = None
    ids_field: str | None = None
    top_k: int = 64
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
    overwrite: bool = False
    progress: bool = True
    license: str = "unknown"  # shown on the README.md card


@dataclass
class DumpSummary:
    manifest: Manifest
    resumed_parts: int
    bytes_on_disk: int
    wall_seconds: float

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_on_disk / max(self.manifest.tokens, 1)


def dump(opts: DumpOptions) -> DumpSummary:
    """Run the teacher over `opts.data` and write (or finish) the cache at `opts.out`."""
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
    for name in ("top_k", "seq_len", "batch_size", "part_tokens", "chunk_bytes"):
        if getattr(opts, name) < 1:
            raise LogitCacheError(
                f"--{name.replace('_', '-')} must be at least 1, got {getattr(opts, name)}."
            )
    if opts.logprob_dtype not in ("float16", "float32"):
        raise LogitCacheError(
            f"--logprob-dtype must be float16 or float32, got {opts.logprob_dtype!r}."
        )


def _check_against_teacher(opts: DumpOptions, teacher: Teacher) -> None:
    vocab = teacher.info.vocab_size
    if not 1 <= opts.top_k <= vocab:
        raise LogitCacheError(
            f"--top-k {opts.top_k} is not in 1..{vocab} (the teacher's vocabulary size)."
        )
    limit = teacher.info.max_positions
    if limit is not None and opts.seq_len > limit:
        raise LogitCacheError(
            f"--seq-len {opts.seq_len} is longer than the teacher's maximum of {limit} positions. "
            f"Use --seq-len {limit} or less."
        )


def _manifest_template(opts: DumpOptions, teacher: Teacher, source: data.DataSource) -> Manifest:
    documents = data.count_documents(source)
    return Manifest(
        format=FORMAT_NAME,
        format_version=FORMAT_VERSION,
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
        targets=TargetInfo(
            kind="topk",
            k=opts.top_k,
            temperature=1.0,
            id_dtype=id_dtype_for(teacher.info.vocab_size),
            logprob_dtype=opts.logprob_dtype,
        ),
        layout=LayoutInfo(
            seq_len=opts.seq_len,
            packing=opts.pack,
            sequences_per_part=max(1, opts.part_tokens // opts.seq_len),
            chunk_bytes=opts.chunk_bytes,
        ),
        codec=CodecInfo(
            name="blosc", cname="zstd", clevel=opts.clevel, shuffle="bitshuffle", checksum="crc32c"
        ),
        complete=False,
        sequences=0,
        tokens=0,
        tool_version=__version__,
    )


@dataclass
class _BatchTargets:
    """One batch's results on their way to the host; `ready` fires when the copy has landed."""

    lengths: list[int]
    input_ids: np.ndarray  # (batch, time) host copy of the inputs
    target_ids: torch.Tensor  # (batch, time, k) int32, host
    target_logprobs: torch.Tensor  # (batch, time, k) float16/32, host
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


#: Rows of logits exponentiated at a time on a CPU: a fresh vocab-sized temporary per batch (what
#: `torch.logsumexp` allocates) costs page faults and a trip to memory; a 16 MiB one stays in cache.
CPU_EXP_BYTES = 16 << 20


def _topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k log-probs, their ids) of float32 `logits` (..., vocab), normalised over the
    whole vocabulary: ``topk(x) - logsumexp(x)`` with logsumexp's own arithmetic, except that
    the row maximum is the top-1 value already found, and that on a CPU the exponentials are
    taken a few rows at a time (on one core, 85 instead of 155 ms for 4096 x 8192 logits)."""
    values, indices = logits.topk(k, dim=-1, sorted=True)  # (..., k)
    top = values[..., :1]  # the row maximum, which logsumexp subtracts before exp
    if logits.device.type != "cpu":
        return values - (logits - top).exp_().sum(-1, keepdim=True).log_().add_(top), indices
    vocab = logits.shape[-1]
    rows, tops = logits.reshape(-1, vocab), top.reshape(-1, 1)
    sums = torch.empty_like(tops)
    step = max(1, CPU_EXP_BYTES // (vocab * logits.element_size()))
    buffer = torch.empty(min(step, len(rows)), vocab, dtype=logits.dtype)
    for start in range(0, len(rows), step):
        stop = min(start + step, len(rows))
        part = torch.sub(rows[start:stop], tops[start:stop], out=buffer[: stop - start]).exp_()
        torch.sum(part, dim=-1, keepdim=True, out=sums[start:stop])
    return values - sums.log_().add_(tops).view(top.shape), indices


@torch.inference_mode()
def _teacher_targets(
    teacher: Teacher, batch: list[np.ndarray], k: int, value_dtype: torch.dtype, ends_part: bool
) -> _BatchTargets:
    lengths = [len(s) for s in batch]
    ids = np.zeros((len(batch), max(lengths)), dtype=np.int64)  # right padding: causal, so harmless
    for row, seq in enumerate(batch):
        ids[row, : len(seq)] = seq
    logits = teacher.logits(
        torch.from_numpy(ids).to(teacher.device)
    ).float()  # (batch, time, vocab)
    values, indices = _topk_logprobs(logits, k)  # (batch, time, k)
    values = values.to(value_dtype)
    indices = indices.to(torch.int32)
    pinned = teacher.device.type == "cuda"
    host_values = torch.empty(values.shape, dtype=values.dtype, pin_memory=pinned)
    host_indices = torch.empty(indices.shape, dtype=indices.dtype, pin_memory=pinned)
    host_values.copy_(values, non_blocking=pinned)
    host_indices.copy_(indices, non_blocking=pinned)
    ready = None
    if pinned:
        ready = torch.cuda.Event()
        ready.record()
    return _BatchTargets(lengths, ids, host_indices, host_values, ready, ends_part)


class _PartAssembler:
    """Collects batches into the next part and writes it; runs on the writer thread."""

    def __init__(self, writer: CacheWriter, id_dtype: str, logprob_dtype: str) -> None:
        self.writer = writer
        self.id_dtype = np.dtype(id_dtype)
        self.logprob_dtype = np.dtype(logprob_dtype)
        self._pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._lengths: list[int] = []

    def add(self, batch: _BatchTargets) -> None:
        if batch.ready is not None:
            batch.ready.synchronize()
        values, indices = batch.target_logprobs.numpy(), batch.target_ids.numpy()
        for row, n in enumerate(batch.lengths):
            if not np.isfinite(values[row, :n]).all():
                raise LogitCacheError(
                    f"the teacher produced non-finite logits (NaN or inf) in part {self.writer.committed}. "
                    "Check the model's weights and --dtype (float16 overflows easily; try bfloat16 or float32)."
                )
            self._pieces.append((batch.input_ids[row, :n], indices[row, :n], values[row, :n]))
            self._lengths.append(n)
        if batch.ends_part:
            self._write()

    def _write(self) -> None:
        inputs, ids, values = zip(*self._pieces, strict=True)
        arrays = PartArrays(
            input_ids=np.concatenate(inputs).astype(self.id_dtype),
            target_ids=np.concatenate(ids).astype(self.id_dtype),
            target_logprobs=np.concatenate(values).astype(self.logprob_dtype),
            seq_offsets=np.concatenate([[0], np.cumsum(self._lengths)]).astype(np.int64),
        )
        self._pieces, self._lengths = [], []
        self.writer.write_part(arrays)


def _run(
    opts: DumpOptions,
    teacher: Teacher,
    sequences: Iterator[np.ndarray],
    writer: CacheWriter,
    bar: Bar,
) -> None:
    """Device work on this thread, host work (assembly, compression, commit) on the writer's."""
    manifest = writer.manifest
    value_dtype = {"float16": torch.float16, "float32": torch.float32}[opts.logprob_dtype]
    batches = _batches(
        sequences, manifest.layout.sequences_per_part, opts.batch_size, writer.committed
    )
    assembler = _PartAssembler(writer, manifest.targets.id_dtype, manifest.targets.logprob_dtype)
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
            pipe.put(_teacher_targets(teacher, batch, opts.top_k, value_dtype, ends_part))
            bar.add_tokens(sum(len(s) for s in batch))
    finally:
        pipe.put(None)
        thread.join()
    if failure:
        raise failure[0]
