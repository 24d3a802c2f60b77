"""Value codecs of the cache format, their decoding into one uniform view, and their error bounds.

Both sides use this module: `dump` encodes with it, the reader decodes with it, `verify` checks
the bounds with it. It needs numpy only (torch tensors are accepted where noted).

What a target slot stores, by ``targets.kind`` and ``targets.logprob_dtype``:

``topk`` / ``float32``
    the float32 log-prob ``logit - logsumexp(logits)`` at the dump temperature. Error: none
    beyond the float32 computation itself.
``topk`` / ``float16``
    that value rounded to the nearest float16. Worst case ``|lp' - lp| <= 2**-11 * |lp'|``
    (``2**-25`` absolute below ``2**-14``): a relative error of the probability of at most
    ``exp(2**-11 |lp|) - 1`` (0.049% at lp = -1, 0.49% at lp = -10).
``topk`` / ``uint8`` (quantised log-probs, fixed scale S = ``targets.logprob_scale``, 16 by
    default): ``q = min(255, round(-lp * S))``, decoded ``lp' = -q / S``. Worst case
    ``|lp' - lp| <= 1 / (2 S)`` (1/32 nat: a relative probability error of at most
    ``exp(1/32) - 1 = 3.2%``) for ``lp >= -255 / S``; a value below ``-254.5 / S`` (p below
    1.2e-7 at S = 16) is stored as 255, so there only the probability bound ``p, p' <=
    exp(-254.5 / S)`` holds.
``sample`` (counts; ``logprob_dtype`` "none", ``count_dtype`` uint8 or uint16)
    the exact number of the N draws that hit each stored id; decoded ``lp' = log(count / N)``.
    Exact: no codec error (the estimate's own sampling error is ``sqrt(p (1 - p) / N)`` per id).

``topp`` (format 1.3; ragged: a position's ids and values end to end, ``target_lengths`` per
    position): the values of ``topk`` in the same three codecs, with the same errors.

The uniform view (`decode_topk`, `decode_sample`, `decode_topp`, what `logitcache.Cache` returns and the
trainer consumes): per position ``w`` ids and log-probs, sorted by decreasing log-prob (ties by
increasing id), with slots a position does not use holding id 0 and log-prob ``-inf``.
"""

from __future__ import annotations

import numpy as np

LOGPROB_DTYPES = ("float16", "float32", "uint8")
DEFAULT_Q8_SCALE = 16.0
Q8_MAX = 255
F16_REL = 2.0**-11
F16_ABS = 2.0**-25


def count_dtype_for(samples: int) -> str:
    """The narrowest unsigned type that holds a count of `samples` draws (N <= 65535)."""
    if samples <= 0xFF:
        return "uint8"
    if samples <= 0xFFFF:
        return "uint16"
    raise ValueError(f"at most 65535 samples per position are supported, got {samples}")


# --------------------------------------------------------------------------------------------
# Log-prob codecs


def quantize(logprobs, scale: float = DEFAULT_Q8_SCALE):
    """uint8 codes of float log-probs (numpy array or torch tensor, same kind returned)."""
    if hasattr(logprobs, "clamp"):  # torch
        import torch

        codes = torch.round(-logprobs.float() * scale).clamp_(0, Q8_MAX)
        return codes.to(torch.uint8)
    codes = np.clip(np.round(-np.asarray(logprobs, dtype=np.float32) * scale), 0, Q8_MAX)
    return codes.astype(np.uint8)


def dequantize(codes: np.ndarray, scale: float) -> np.ndarray:
    return -(np.asarray(codes).astype(np.float32) / np.float32(scale))


def decode_logprobs(values: np.ndarray, logprob_dtype: str, scale: float = 0.0) -> np.ndarray:
    """Stored top-k values -> log-probs (float16 stays float16; uint8 codes become float32)."""
    if logprob_dtype == "uint8":
        return dequantize(values, scale)
    return np.asarray(values)


def logprob_error_bound(decoded: np.ndarray, logprob_dtype: str, scale: float = 0.0) -> np.ndarray:
    """Worst-case ``|true log-prob - decoded|`` per value, from the decoded values alone.

    ``inf`` where the codec clamped (uint8 code 255): there only the probability bound holds.
    """
    lp = np.abs(np.asarray(decoded, dtype=np.float64))
    if logprob_dtype == "float32":
        return np.zeros_like(lp)
    if logprob_dtype == "float16":
        return np.maximum(F16_REL * lp, F16_ABS)
    if logprob_dtype == "uint8":
        clamped = lp >= (Q8_MAX - 0.5) / scale
        return np.where(clamped, np.inf, 0.5 / scale)
    raise ValueError(f"unknown logprob_dtype {logprob_dtype!r}")


def probability_mass_bound(
    decoded: np.ndarray, logprob_dtype: str, scale: float = 0.0
) -> np.ndarray:
    """A lower bound, per position, of the true teacher mass on the stored ids.

    The true mass is at most 1, so a row whose lower bound exceeds 1 (beyond float64 rounding)
    proves that a value is off by more than its codec's bound: `verify` checks exactly this.
    """
    lp = np.asarray(decoded, dtype=np.float64)
    err = logprob_error_bound(lp, logprob_dtype, scale)
    finite = np.isfinite(err) & np.isfinite(lp)
    return np.where(finite, np.exp(lp - np.where(finite, err, 0.0)), 0.0).sum(-1)


def logprobs_valid(values: np.ndarray, logprob_dtype: str) -> bool:
    """Whether every stored top-k value decodes to a finite log-prob <= 0: the reader's cheap
    per-part check (`invalid_logprobs` then finds where it fails).

    Every encoder keeps values <= 0: rounding to float16 or float32 keeps the sign (a value may
    be exactly 0, a top-1 of probability 1), and a uint8 code always decodes to -q / S, so any
    positive, NaN or infinite value is damage, with no rounding allowance. float16 is checked
    on its bit pattern, with two integer reductions (a float16 reduction in numpy is emulated,
    15x slower): +0 is 0x0000, the negative finite values (and -0) are 0x8000..0xFBFF; -inf
    and the negative NaNs lie above, and the positive values (+inf and NaNs included) below,
    where subtracting 1 (wrapping +0 to 0xFFFF) leaves them under 0x7FFF.
    """
    values = np.asarray(values)
    if logprob_dtype == "uint8" or values.size == 0:
        return True
    if logprob_dtype == "float16":
        bits = values.view(np.uint16)
        return bool(bits.max() <= 0xFBFF and (bits - np.uint16(1)).min() >= 0x7FFF)
    return bool(values.max() <= 0 and values.min() > -np.inf)  # a NaN fails both


def invalid_logprobs(values: np.ndarray) -> np.ndarray:
    """Mask of the stored float values that are not a finite log-prob <= 0 (any shape)."""
    v = np.asarray(values, dtype=np.float32)
    return ~(np.isfinite(v) & (v <= 0))


# --------------------------------------------------------------------------------------------
# The uniform view


def decode_topk(
    ids: np.ndarray, values: np.ndarray, logprob_dtype: str, scale: float, order: str
) -> tuple[np.ndarray, np.ndarray]:
    """(T, k) stored ids and values -> (ids, log-probs) in decreasing log-prob order."""
    ids, values = np.asarray(ids), np.asarray(values)
    if order != "descending" and values.shape[-1] > 1:
        ids, values = _descending(ids, values, logprob_dtype)
    return ids, decode_logprobs(values, logprob_dtype, scale)


def _descending(
    ids: np.ndarray, values: np.ndarray, logprob_dtype: str
) -> tuple[np.ndarray, np.ndarray]:
    """Rows stored by increasing id -> by decreasing log-prob, ties by increasing id."""
    if ids.dtype.itemsize <= 2 and logprob_dtype in ("float16", "uint8"):
        # One sort of packed 32-bit keys (2.5x faster than an argsort and two gathers, which
        # capped the trainer's reader): uint8 codes grow as the log-prob falls, and so does
        # the float16 bit pattern of a value <= 0 (sign-magnitude; adding +0.0 turns -0.0
        # into +0.0, so that both zeros tie and fall back to the id order).
        bits = values if logprob_dtype == "uint8" else (values + np.float16(0)).view(np.uint16)
        keys = np.sort((bits.astype(np.uint32) << 16) | ids.astype(np.uint32), axis=-1)
        high = (keys >> 16).astype(bits.dtype)
        return (keys & 0xFFFF).astype(ids.dtype), high.view(values.dtype)
    key = values if logprob_dtype == "uint8" else -values.astype(np.float32)
    perm = np.argsort(key, axis=-1, kind="stable")  # stable: ascending ids among ties
    return np.take_along_axis(ids, perm, -1), np.take_along_axis(values, perm, -1)


def row_of_entries(lengths: np.ndarray) -> np.ndarray:
    """(E,) position index of each entry of a ragged layout with per-position `lengths` (T,)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)


def decode_sample(
    ids: np.ndarray,
    counts: np.ndarray,
    lengths: np.ndarray,
    samples: int,
    width: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Ragged sampled targets -> (T, w) ids and float32 ``log(count / N)``, -inf padded.

    ids, counts (E,) in the stored order (ascending id within a position); lengths (T,).
    ``w`` is `width`, or the largest length (at least 1).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    tokens = len(lengths)
    w = max(1, int(lengths.max(initial=0))) if width is None else width
    rows = row_of_entries(lengths)
    counts = np.asarray(counts)
    # by position, then decreasing count, then increasing id (stored order within a count)
    order = np.lexsort((-counts.astype(np.int64), rows))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    cols = np.arange(len(rows), dtype=np.int64) - starts[rows]
    out_ids = np.zeros((tokens, w), dtype=np.asarray(ids).dtype)
    out_lp = np.full((tokens, w), -np.inf, dtype=np.float32)
    out_ids[rows, cols] = np.asarray(ids)[order]
    logp = np.log(counts[order].astype(np.float64) / samples).astype(np.float32)
    out_lp[rows, cols] = logp
    return out_ids, out_lp


def decode_topp(
    ids: np.ndarray,
    values: np.ndarray,
    lengths: np.ndarray,
    logprob_dtype: str,
    scale: float,
    order: str,
    width: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Ragged top-p targets -> (T, w) ids and float32 log-probs in decreasing order (ties by
    increasing id), -inf padded; ``w`` is `width`, or the largest length (at least 1).

    ids, values (E,) in the stored `order`; lengths (T,). The padded rows are the top-k layout
    with -inf in unused slots, which sort last, so `decode_topk`'s ordering applies as is."""
    lengths = np.asarray(lengths, dtype=np.int64)
    w = max(1, int(lengths.max(initial=0))) if width is None else width
    rows = row_of_entries(lengths)
    cols = np.arange(len(rows), dtype=np.int64) - _starts(lengths)[rows]
    out_ids = np.zeros((len(lengths), w), dtype=np.asarray(ids).dtype)
    out_lp = np.full((len(lengths), w), -np.inf, dtype=np.float32)
    out_ids[rows, cols] = np.asarray(ids)
    out_lp[rows, cols] = decode_logprobs(values, logprob_dtype, scale)
    return decode_topk(out_ids, out_lp, "float32", 0.0, order)


# --------------------------------------------------------------------------------------------
# Gaps: increasing ids stored as differences, in plain integers every reader reads


def encode_gaps(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Ragged ids (E,), increasing within each position of `lengths` (T,) -> their gaps: a
    position's first id as is, each next one minus the one before it (same dtype, never
    negative). Why: sorted ids are close together, their gaps small numbers whose high bytes
    are zero, which Blosc's byte shuffle and zstd store in a fraction of the space; unlike the
    numcodecs delta filter, the gaps are the array's values, so every Zarr v3 and Parquet reader
    reads them, and a position decodes on its own (random access stays cheap)."""
    ids = np.asarray(ids)
    gaps = np.diff(ids.astype(np.int64), prepend=np.int64(0))
    starts = _starts(lengths)
    gaps[starts[starts < len(gaps)]] = ids[starts[starts < len(gaps)]]
    return gaps.astype(ids.dtype)


def decode_gaps(gaps: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The inverse of `encode_gaps`: a running sum restarted at each position (docs/FORMAT.md,
    section 3a). A damaged array whose sums leave the dtype wraps around; the value checks that
    follow (ids below the vocabulary, increasing) catch it."""
    gaps = np.asarray(gaps)
    lengths = np.asarray(lengths, dtype=np.int64)
    total = np.cumsum(gaps, dtype=np.int64)  # (E,) sum of every gap so far
    ends = np.cumsum(lengths)  # one past each position's last entry
    if len(total) != (int(ends[-1]) if len(ends) else 0):
        raise ValueError(f"{len(total)} gaps for {int(lengths.sum())} entries")
    before = np.concatenate([[0], total])[ends - lengths]  # (T,) the gaps before a position
    return (total - np.repeat(before, lengths)).astype(gaps.dtype)


def _starts(lengths: np.ndarray) -> np.ndarray:
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


def encode_ragged(
    ids: np.ndarray, counts: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Padded (T, W) ids and counts (or top-p log-probs), the first `lengths` (T,) slots of each
    position used -> ragged (E,) arrays."""
    used = np.arange(ids.shape[-1])[None, :] < np.asarray(lengths)[:, None]
    return ids[used], counts[used]


__all__ = [
    "DEFAULT_Q8_SCALE",
    "LOGPROB_DTYPES",
    "count_dtype_for",
    "decode_gaps",
    "decode_logprobs",
    "decode_sample",
    "decode_topk",
    "decode_topp",
    "dequantize",
    "encode_gaps",
    "encode_ragged",
    "invalid_logprobs",
    "logprob_error_bound",
    "logprobs_valid",
    "probability_mass_bound",
    "quantize",
    "row_of_entries",
]
