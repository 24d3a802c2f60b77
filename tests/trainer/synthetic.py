"""A real cache on disk with synthetic content, for tests of the reading side that need many
parts and known values without running a teacher. Sequence s holds input ids s*1000+t % vocab."""

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
from logitcache.writer import CacheWriter

VOCAB = 300


def synthetic_cache(
    root: Path, *, sequences: int, seq_len: int = 16, k: int = 4, per_part: int = 7
) -> Path:
    """Write `sequences` sequences (the last one shorter) in parts of `per_part` sequences."""
    template = Manifest(
        format=FORMAT_NAME,
        format_version=FORMAT_VERSION,
        backend="zarr",
        created="2026-01-01T00:00:00+00:00",
        teacher=TeacherInfo("synthetic", "0" * 64, "0" * 64, "float32", VOCAB, seq_len),
        tokenizer=TokenizerInfo("synthetic", VOCAB, "f" * 64, 0),
        data=DataInfo("synthetic", "npy", "d" * 64, sequences),
        targets=TargetInfo("topk", k, 1.0, id_dtype_for(VOCAB), "float16"),
        layout=LayoutInfo(seq_len, True, per_part, 1 << 12),
        codec=CodecInfo("blosc", "zstd", 3, "bitshuffle", "crc32c"),
        complete=False,
        sequences=0,
        tokens=0,
    )
    rng = np.random.default_rng(0)
    with CacheWriter(root, template) as writer:
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
            logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            top = np.argsort(-logprobs, axis=-1)[:, :k]
            writer.write_part(
                PartArrays(
                    input_ids=ids.astype(np.uint16),
                    target_ids=top.astype(np.uint16),
                    target_logprobs=np.take_along_axis(logprobs, top, -1).astype(np.float16),
                    seq_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                )
            )
        writer.finish()
    return root
