"""Every setting of a dump (`DumpOptions`), what a dump returns (`DumpSummary`), and the checks
that refuse bad settings before anything is loaded or written.

The CLI's defaults are the defaults here (`logitcache.cli.dump` reads them from the dataclass),
so a default is written once.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from logitcache.errors import LogitCacheError
from logitcache.format.card import DEFAULT_LICENSE
from logitcache.format.manifest import (
    LOGPROB_DTYPES,
    MAX_SAMPLES,
    ORDERS,
    SHUFFLES,
    TARGET_KINDS,
    Manifest,
)
from logitcache.storage.paths import refuse_overlap

if TYPE_CHECKING:
    from logitcache.dumping.teacher import Teacher

__all__ = ["CLEVELS", "DumpOptions", "DumpSummary", "check_against_teacher", "check_options"]

#: --clevel ranges: Blosc's (zarr) levels, 0 (none) to 9; the Parquet backend's plain zstd
#: levels, 1 to 22 (0 means zstd's default there). Checked up front: out of range, Blosc fails
#: only when the first part is written, after --out was created.
CLEVELS = {"zarr": (0, 9), "parquet": (0, 22)}


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
    # positions whose logits are made at once (chunked path, logitcache.dumping.chunked): 0 is
    # auto (256 MiB of float32 logits), -1 the full logits of every batch
    logits_chunk_tokens: int = 0
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
    license: str = DEFAULT_LICENSE  # shown on the README.md card
    shard: str | None = None  # "I/N": dump only slice I of N (see logitcache.dumping.sharding)


@dataclass
class DumpSummary:
    manifest: Manifest
    resumed_parts: int
    bytes_on_disk: int
    wall_seconds: float
    logits: str = ""  # how the teacher's logits were computed: chunked or full, and why

    @property
    def bytes_per_token(self) -> float | None:
        """None for a dump without tokens (an empty shard): its metadata is no rate."""
        return self.bytes_on_disk / self.manifest.tokens if self.manifest.tokens else None


def check_options(opts: DumpOptions) -> None:
    """Refuse settings that are wrong whatever the teacher and the data are, and an --out that
    overlaps an input: before the teacher is loaded or --out is touched."""
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
    if opts.logits_chunk_tokens < -1:
        raise LogitCacheError(
            f"--logits-chunk-tokens must be -1 (full logits), 0 (auto) or a number of "
            f"positions, got {opts.logits_chunk_tokens}."
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


def check_against_teacher(opts: DumpOptions, teacher: Teacher) -> None:
    """Refuse settings the loaded teacher cannot serve (a k past its vocabulary, a tokenizer
    wider than its logits, sequences longer than its positions)."""
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
