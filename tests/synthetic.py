"""Small real caches with synthetic content, written through the real writer, for the tests that
need a cache but no teacher (merge, export, remote stores, hostile inputs, the trainer's reading
side) and for bench_remote: each takes milliseconds.

One module so that every such cache starts from the same manifest template and the same top-k
of random logits; the two builders differ only in what they vary (`make_cache`: random lengths
and ids, any backend or writer; `synthetic_cache`: known ids, many parts)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from logitcache.format.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    CodecInfo,
    DataInfo,
    LayoutInfo,
    Manifest,
    PartArrays,
    TargetInfo,
    TeacherInfo,
    TokenizerInfo,
    id_dtype_for,
)
from logitcache.write.remote_writer import open_writer
from logitcache.write.writer import CacheWriter

#: The vocabulary of `synthetic_cache` (its input ids are ``(s * 1000 + t) % VOCAB``).
VOCAB = 300


def template(
    *,
    backend: str = "zarr",
    vocab: int = 300,
    k: int = 4,
    seq_len: int = 16,
    per_part: int = 5,
    data: str = "d" * 64,
    source: str = "synthetic",
    teacher_sha: str = "0" * 64,
    teacher_name: str = "synthetic-teacher",
    teacher_config_sha: str = "c" * 64,
    n_positions: int = 64,
    tokenizer_name: str = "synthetic-tokenizer",
    data_sequences: int = 10,
    chunk_bytes: int = 1 << 10,
) -> Manifest:
    """An empty, incomplete manifest of a top-k float16 cache, ready for a writer."""
    return Manifest(
        format=FORMAT_NAME,
        format_version=FORMAT_VERSION,
        backend=backend,
        created="2026-01-01T00:00:00+00:00",
        teacher=TeacherInfo(
            teacher_name, teacher_config_sha, teacher_sha, "float32", vocab, n_positions
        ),
        tokenizer=TokenizerInfo(tokenizer_name, vocab, "f" * 64, 0),
        data=DataInfo(source, "npy", data, data_sequences),
        targets=TargetInfo("topk", k, 1.0, id_dtype_for(vocab), "float16"),
        layout=LayoutInfo(seq_len, True, per_part, chunk_bytes),
        codec=CodecInfo("blosc", "zstd", 3, "bitshuffle", "crc32c"),
        complete=False,
        sequences=0,
        tokens=0,
    )


def topk_part(input_ids: np.ndarray, logits: np.ndarray, lengths, k: int, id_dtype) -> PartArrays:
    """A part whose targets are the real top-k log-probs of `logits` (one row per token)."""
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    top = np.argsort(-logprobs, axis=-1)[:, :k]
    return PartArrays(
        input_ids=input_ids.astype(id_dtype),
        target_ids=top.astype(id_dtype),
        target_logprobs=np.take_along_axis(logprobs, top, -1).astype(np.float16),
        seq_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
    )


def make_cache(
    root: str | Path,
    *,
    sequences: int = 12,
    seed: int = 0,
    license: str = "unknown",
    tamper: Callable[[int, PartArrays], None] | None = None,
    finish: bool = True,
    **settings,
) -> str | Path:
    """Write `sequences` sequences (random lengths, real top-k of random logits) to `root`
    (a local path or a store URL); `settings` go to `template`.

    `tamper(index, arrays)` may change a part's arrays in place before it is written: the
    writer hashes what it writes, so the cache's bytes match their sha256 whatever the values.
    Without `finish` the dump is left unfinished (its parts committed, ``complete`` false)."""
    m = template(**settings)
    vocab, k, seq_len, per_part = (
        m.teacher.vocab_size, m.targets.k, m.layout.seq_len, m.layout.sequences_per_part,
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    with open_writer(root, m, license=license) as writer:
        for first in range(0, sequences, per_part):
            lengths = rng.integers(1, seq_len + 1, size=min(per_part, sequences - first))
            tokens = int(lengths.sum())
            logits = rng.normal(size=(tokens, vocab)) * 3
            input_ids = rng.integers(0, vocab, size=tokens)
            part = topk_part(input_ids, logits, lengths, k, m.targets.id_dtype)
            if tamper is not None:
                tamper(first // per_part, part)
            writer.write_part(part)
        if finish:
            writer.finish()
    return root


def synthetic_cache(
    root: Path, *, sequences: int, seq_len: int = 16, k: int = 4, per_part: int = 7
) -> Path:
    """Write `sequences` sequences (the last one shorter) in parts of `per_part` sequences;
    sequence s holds the input ids ``(s * 1000 + t) % VOCAB``, so readers can be checked."""
    m = template(
        vocab=VOCAB, k=k, seq_len=seq_len, per_part=per_part, teacher_name="synthetic",
        teacher_config_sha="0" * 64, n_positions=seq_len, tokenizer_name="synthetic",
        data_sequences=sequences, chunk_bytes=1 << 12,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    with CacheWriter(root, m) as writer:
        for first in range(0, sequences, per_part):
            lengths = [
                seq_len if s < sequences - 1 else seq_len // 2
                for s in range(first, min(first + per_part, sequences))
            ]
            ids = np.concatenate(
                [
                    (s * 1000 + np.arange(n)) % VOCAB
                    for s, n in zip(range(first, first + len(lengths)), lengths, strict=True)
                ]
            )
            logits = rng.normal(size=(len(ids), VOCAB))
            writer.write_part(topk_part(ids, logits, lengths, k, np.uint16))
        writer.finish()
    return root
