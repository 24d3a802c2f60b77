"""Small real caches with synthetic content, written through the real writer, for the tests of
merge, export, remote stores and hostile inputs (no teacher needed: each takes milliseconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from logitcache.format import (
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
from logitcache.remote_writer import open_writer


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
) -> Manifest:
    return Manifest(
        format=FORMAT_NAME,
        format_version=FORMAT_VERSION,
        backend=backend,
        created="2026-01-01T00:00:00+00:00",
        teacher=TeacherInfo("synthetic-teacher", "c" * 64, teacher_sha, "float32", vocab, 64),
        tokenizer=TokenizerInfo("synthetic-tokenizer", vocab, "f" * 64, 0),
        data=DataInfo(source, "npy", data, 10),
        targets=TargetInfo("topk", k, 1.0, id_dtype_for(vocab), "float16"),
        layout=LayoutInfo(seq_len, True, per_part, 1 << 10),
        codec=CodecInfo("blosc", "zstd", 3, "bitshuffle", "crc32c"),
        complete=False,
        sequences=0,
        tokens=0,
    )


def make_cache(
    root: str | Path, *, sequences: int = 12, seed: int = 0, license: str = "unknown", **settings
) -> str | Path:
    """Write `sequences` sequences (random lengths, real top-k of random logits) to `root`."""
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
            logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            top = np.argsort(-logprobs, axis=-1)[:, :k]
            writer.write_part(
                PartArrays(
                    input_ids=rng.integers(0, vocab, size=tokens).astype(m.targets.id_dtype),
                    target_ids=top.astype(m.targets.id_dtype),
                    target_logprobs=np.take_along_axis(logprobs, top, -1).astype(np.float16),
                    seq_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                )
            )
        writer.finish()
    return root
