"""The uniform decoded view of a part, whatever its target kind and value codec, and the check of
its ids and values that every decode runs first.

A part's arrays as stored (top-k ids in id order or descending, float16/float32/uint8 log-probs;
sampled distinct ids and counts, ragged) become one shape that every consumer reads: per
position, target ids and log-probs in decreasing order, ``-inf`` (and id 0) in unused slots.
The reader (`logitcache.read.reader`) decodes through here; so does anything else that holds a
part's raw arrays.

A masked-LM cache (format 1.3) stores targets at its masked positions only; its view has a row
per token all the same (so every consumer indexes it as it does a causal cache's), with the
labels saying which rows carry a target: the others hold a placeholder, probability 1 on id 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from logitcache.errors import CorruptCacheError
from logitcache.format import codecs
from logitcache.format.manifest import RAGGED_KINDS, Manifest, PartArrays
from logitcache.read.texts import text_problems

__all__ = [
    "TOKEN_ARRAYS",
    "CacheSequence",
    "bad_views",
    "check_values",
    "decode",
    "split_sequences",
    "to_sequence",
]


@dataclass(frozen=True)
class CacheSequence:
    """One sequence in the uniform view of every target kind and codec: input ids (T,), target
    ids (T, w) and their log-probs (T, w) at the dump temperature, in decreasing order, with
    ``-inf`` (and id 0) in slots a position does not use. Top-k: w = k. Sampled targets:
    ``log(count / N)``, w the most distinct ids at one position of the part (of the sequence,
    for ``cache[i]``). A masked-LM cache: ``labels`` (T,) holds the id the masking replaced at
    each masked position and -1 elsewhere, where the target rows are a placeholder (id 0 at
    log-prob 0); None for a causal cache. Top-p: w the most ids at one position, likewise."""

    input_ids: torch.Tensor  # (T,) int64
    target_ids: torch.Tensor  # (T, k) int64
    target_logprobs: torch.Tensor  # (T, k) float32
    labels: torch.Tensor | None = None  # (T,) int64, masked-LM caches only


TOKEN_ARRAYS = ("input_ids", "target_ids", "target_logprobs")


#: What the decoded view's labels hold where a masked-LM cache has no target.
NO_TARGET = -1


def to_sequence(
    input_ids: np.ndarray, ids: np.ndarray, logprobs: np.ndarray, labels: np.ndarray | None = None
) -> CacheSequence:
    return CacheSequence(
        torch.from_numpy(input_ids.astype(np.int64)),
        torch.from_numpy(ids.astype(np.int64)),
        torch.from_numpy(logprobs.astype(np.float32)),
        None if labels is None else torch.from_numpy(labels.astype(np.int64)),
    )


def decode(
    manifest: Manifest, arrays: PartArrays, where: str = "a part", first_sequence: int = 0
) -> PartArrays:
    """A part's arrays as stored -> the uniform view (`CacheSequence`); float16 log-probs in
    decreasing order pass through without a copy.

    The ids and values are checked first (`check_values`; `where` names the part in its error,
    `first_sequence` is the part's sequence that `arrays` start with)."""
    arrays = ungapped(manifest, arrays, where)
    check_values(manifest, arrays, where, first_sequence)
    if arrays.text is not None:  # format 1.3, --offsets (a whole part; `cache[i]` reads none)
        for problem in text_problems(arrays):
            raise _bad_values(where, problem)
    t = manifest.targets
    if t.kind == "sample":
        ids, logprobs = codecs.decode_sample(
            arrays.target_ids, arrays.target_counts, arrays.target_lengths, t.samples
        )
    elif t.kind == "topp":
        ids, logprobs = codecs.decode_topp(
            arrays.target_ids, arrays.target_logprobs, arrays.target_lengths,
            t.logprob_dtype, t.logprob_scale, t.order,
        )  # fmt: skip
    else:
        ids, logprobs = codecs.decode_topk(
            arrays.target_ids, arrays.target_logprobs, t.logprob_dtype, t.logprob_scale, t.order
        )
    if manifest.masking is not None:
        return _spread(arrays, ids, logprobs)
    return PartArrays(
        arrays.input_ids, ids, logprobs, arrays.seq_offsets, labels=arrays.labels,
        views=arrays.views, text=arrays.text, text_offsets=arrays.text_offsets,
        token_offsets=arrays.token_offsets,
    )  # fmt: skip


def _spread(arrays: PartArrays, ids: np.ndarray, logprobs: np.ndarray) -> PartArrays:
    """A masked-LM part's decoded target rows (masked, w) spread to a row per token: the
    placeholder (id 0 at log-prob 0, -inf beyond) where a position has no target, and
    ``target_labels`` (tokens,) int64 with `NO_TARGET` there; the text arrays (--offsets) as
    they are."""
    tokens, width = len(arrays.input_ids), ids.shape[1]
    at = np.asarray(arrays.target_positions).astype(np.int64)
    dense_ids = np.zeros((tokens, width), dtype=ids.dtype)  # (T, w)
    dense_logprobs = np.full((tokens, width), -np.inf, dtype=logprobs.dtype)  # (T, w)
    dense_logprobs[:, 0] = 0.0
    dense_ids[at], dense_logprobs[at] = ids, logprobs
    labels = np.full(tokens, NO_TARGET, dtype=np.int64)  # (T,)
    labels[at] = arrays.target_labels
    return PartArrays(
        arrays.input_ids, dense_ids, dense_logprobs, arrays.seq_offsets,
        target_positions=at, target_labels=labels, text=arrays.text,
        text_offsets=arrays.text_offsets, token_offsets=arrays.token_offsets,
    )  # fmt: skip


def ungapped(manifest: Manifest, arrays: PartArrays, where: str = "a part") -> PartArrays:
    """`arrays` with the arrays that ``codec.gaps`` names (format 1.2: sampled ids stored as
    per-position gaps) turned back into ids; the others as they are. `arrays` must start at a
    position (every read does: a part, or a sequence's rows)."""
    if "target_ids" not in manifest.codec.gaps:
        return arrays
    lengths = np.asarray(arrays.target_lengths)
    stored = int(lengths.sum(dtype=np.int64))
    if stored != len(arrays.target_ids):
        raise _bad_values(
            where,
            f"its target_lengths add up to {stored}, not the {len(arrays.target_ids)} (id, count) "
            "entries stored",
        )
    ids = codecs.decode_gaps(arrays.target_ids, lengths)
    return dataclasses.replace(arrays, target_ids=ids)


def check_values(
    manifest: Manifest, arrays: PartArrays, where: str, first_sequence: int = 0
) -> None:
    """Raise a `CorruptCacheError` at the first id or value that no consumer can use.

    A part whose files match their sha256 can still hold such values (written by a buggy or
    mismatched dump, or by another tool): an id at or above the vocabulary size (an index error
    deep inside training, or a silent wrong gather on a GPU), a NaN or positive log-prob (a
    "diverged" loss that blames the learning rate), a sampled count of 0, lengths that do not
    add up. Checked on every decoded part, before decoding, with a few vectorised reductions
    (benchmarks/bench_trainer.py measures their share); only a failure pays for finding where.
    """
    vocab, t = manifest.teacher.vocab_size, manifest.targets
    # classification (1.3): the labels are class ids like the input ids of a causal LM
    inputs = arrays.input_ids if manifest.task is None else arrays.labels
    input_ids = np.zeros(0, np.int64) if inputs is None else np.asarray(inputs)
    target_ids = np.asarray(arrays.target_ids)
    if manifest.task is not None and arrays.views is not None:
        _check_views(manifest, np.asarray(arrays.views), arrays, where, first_sequence)
    if manifest.masking is not None:
        _check_masked(arrays, vocab, where, first_sequence)
    if t.kind in RAGGED_KINDS:
        lengths = np.asarray(arrays.target_lengths)
        stored = int(lengths.sum(dtype=np.int64))
        values = arrays.target_counts if t.kind == "sample" else arrays.target_logprobs
        if stored != len(target_ids) or len(values) != len(target_ids):
            raise _bad_values(
                where,
                f"its target_lengths add up to {stored}, not the {len(target_ids)} target "
                "entries stored",
            )
    if input_ids.size and input_ids.max() >= vocab:
        row = int(np.argmax(input_ids >= vocab))
        name = "input id" if manifest.task is None else "label"
        what = f"{name} {int(input_ids[row])} is >= the vocabulary size {vocab}"
    elif target_ids.size and target_ids.max() >= vocab:
        flat = target_ids.reshape(-1)
        entry = int(np.argmax(flat >= vocab))
        row = _row_of_entry(arrays, t.kind, entry)
        what = f"target id {int(flat[entry])} is >= the vocabulary size {vocab}"
    elif t.kind == "sample":
        counts = np.asarray(arrays.target_counts)
        if not counts.size or counts.min() >= 1:
            return
        row = _row_of_entry(arrays, t.kind, int(np.argmax(counts < 1)))
        what = "a stored sample count is 0"
    elif codecs.logprobs_valid(arrays.target_logprobs, t.logprob_dtype):
        return
    else:
        values = np.asarray(arrays.target_logprobs).reshape(-1)
        entry = int(np.argmax(codecs.invalid_logprobs(values)))
        row = _row_of_entry(arrays, t.kind, entry)
        what = f"log-prob {float(values[entry])} is not a finite value <= 0"
    raise _bad_row(arrays, where, first_sequence, row, what)


def _check_masked(arrays: PartArrays, vocab: int, where: str, first_sequence: int) -> None:
    """A masked-LM part's `target_positions` (strictly increasing, on the token axis) and
    `target_labels` (ids below `vocab`)."""
    at = np.asarray(arrays.target_positions).astype(np.int64)
    labels = np.asarray(arrays.target_labels)
    if len(at) and (at[0] < 0 or at[-1] >= len(arrays.input_ids) or (np.diff(at) <= 0).any()):
        raise _bad_values(
            where,
            f"its target_positions are not increasing positions below {len(arrays.input_ids)}",
        )
    if labels.size and labels.max() >= vocab:
        row = int(at[int(np.argmax(labels >= vocab))])
        what = f"target label {int(labels.max())} is >= the vocabulary size {vocab}"
        raise _bad_row(arrays, where, first_sequence, row, what)


def _bad_row(
    arrays: PartArrays, where: str, first_sequence: int, row: int, what: str
) -> CorruptCacheError:
    """The error for `what` at token row `row`, naming its sequence and position."""
    offsets = np.asarray(arrays.seq_offsets)
    sequence = int(np.searchsorted(offsets, row, side="right")) - 1
    position = row - int(offsets[sequence])
    return _bad_values(
        where, f"sequence {first_sequence + sequence} of the part, position {position}: {what}"
    )


def bad_views(views: np.ndarray, height: int, width: int) -> np.ndarray:
    """(rows,) bool: the (top, left, height, width, flip) rows that are not a box of positive
    size inside a `height` x `width` example with a flip of 0 or 1."""
    top, left, h, w, flip = (views[:, i].astype(np.int64) for i in range(views.shape[1]))
    bad = (top < 0) | (left < 0) | (h < 1) | (w < 1) | (top + h > height) | (left + w > width)
    return bad | ((flip != 0) & (flip != 1))


def _check_views(
    manifest: Manifest, views: np.ndarray, arrays: PartArrays, where: str, first_sequence: int
) -> None:
    """Every view's box inside the example (`task.shape`'s last two axes), of positive size,
    and a flip of 0 or 1: what `logitcache.examples.views.apply_views` slices with."""
    assert manifest.task is not None
    height, width = manifest.task.shape[-2:]
    bad = bad_views(views, height, width)
    if not bad.any():
        return
    row = int(np.argmax(bad))
    example = int(np.searchsorted(arrays.seq_offsets, row, side="right")) - 1
    raise _bad_values(
        where,
        f"example {first_sequence + example} of the part, view {row - int(arrays.seq_offsets[example])}: "
        f"(top, left, height, width, flip) {views[row].tolist()} is not a box inside its "
        f"{height}x{width} example",
    )


def _row_of_entry(arrays: PartArrays, kind: str, entry: int) -> int:
    """The position (token row) of target entry `entry`, counted in the flattened array (in a
    masked-LM part, through the target row's `target_positions`)."""
    if kind in RAGGED_KINDS:  # ragged: the entries of position i end at cumsum(lengths)[i]
        ends = np.cumsum(arrays.target_lengths, dtype=np.int64)
        row = int(np.searchsorted(ends, entry, side="right"))
    else:
        row = entry // arrays.target_ids.shape[-1]
    return row if arrays.target_positions is None else int(arrays.target_positions[row])


def _bad_values(where: str, what: str) -> CorruptCacheError:
    return CorruptCacheError(
        f"{where} holds values that no reader can use: {what}. The sha256 of its files cannot "
        "show this (they may have been written with these values): run `logitcache verify` on "
        "the cache, and re-dump the part (delete the cache and rerun the dump) or restore it "
        "from a copy."
    )


def split_sequences(arrays: PartArrays) -> Iterator[CacheSequence]:
    """The sequences of one part in the uniform view (`Cache.read_decoded`), in order."""
    offsets = arrays.seq_offsets
    for s in range(arrays.sequences):
        a, b = int(offsets[s]), int(offsets[s + 1])
        labels = None if arrays.target_labels is None else arrays.target_labels[a:b]
        yield to_sequence(
            arrays.input_ids[a:b], arrays.target_ids[a:b], arrays.target_logprobs[a:b], labels
        )
