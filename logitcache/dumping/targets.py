"""What `dump` computes per position from the teacher's logits, and how a part is assembled.

Two kinds (``targets.kind`` in the manifest; docs/FORMAT.md section 3):

``topk``
    the k most probable ids at the dump temperature with their log-probs normalised over the
    full vocabulary, stored as float16, float32 or 8-bit codes (`logitcache.format.codecs`), in
    decreasing-probability order or in increasing id order.
``sample``
    N draws per position from the teacher distribution (`logitcache.dumping.sampling`), stored as the
    distinct ids (increasing) with their counts, in a ragged layout: ``target_ids`` and
    ``target_counts`` hold every position's entries end to end, ``target_lengths`` how many
    belong to each position.
``topp`` (format 1.3)
    per position the fewest most probable ids whose probabilities reach ``top_p`` (at least
    ``min_k``, at most ``k``), with their log-probs as for ``topk``: ragged like ``sample``,
    ``target_ids`` and ``target_logprobs`` end to end, ``target_lengths`` per position. On the
    device it is a top-k of the most ids a position may hold, the cumulative sum of its
    probabilities and a count per row (fixed shapes, no sync); the host keeps each row's first
    ``count`` entries.

`device_targets` runs on the teacher's device and returns fixed-shape tensors (one sync-free
kernel sequence per batch); `assemble` runs on the host (the writer thread) and builds the
part's arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from logitcache.dumping import native, sampling
from logitcache.dumping.masking import Masked
from logitcache.format import codecs
from logitcache.format.manifest import POSITION_DTYPE, PartArrays, TargetInfo


@dataclass(frozen=True)
class TargetSpec:
    """The settings `device_targets` needs (all from the manifest's `targets` record)."""

    kind: str = "topk"
    k: int = 64
    samples: int = 0
    temperature: float = 1.0
    logprob_dtype: str = "float16"
    logprob_scale: float = 0.0
    order: str = "descending"
    seed: int = 0
    top_p: float = 0.0  # topp: the coverage, with k the most ids and min_k the fewest
    min_k: int = 0

    @classmethod
    def of(cls, targets: TargetInfo) -> TargetSpec:
        return cls(
            kind=targets.kind,
            k=targets.k,
            samples=targets.samples,
            temperature=targets.temperature,
            logprob_dtype=targets.logprob_dtype,
            logprob_scale=targets.logprob_scale,
            order=targets.order,
            seed=targets.seed,
            top_p=targets.top_p,
            min_k=targets.min_k,
        )


_TORCH_VALUES = {"float16": torch.float16, "float32": torch.float32}

#: Rows of logits exponentiated at a time on a CPU: a fresh vocab-sized temporary per batch (what
#: `torch.logsumexp` allocates) costs page faults and a trip to memory; a 16 MiB one stays in cache.
CPU_EXP_BYTES = 16 << 20


def topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k log-probs, their ids) of float32 `logits` (..., vocab), normalised over the
    whole vocabulary: ``topk(x) - logsumexp(x)``, taken as ``(topk(x) - max) - log(sum of
    exp(x - max))``, so that the log-probs keep float32's precision when the logits are far
    from 0. On a CPU, the C pass of `logitcache.dumping.native` where it builds (each row read
    once; a third of the cost of torch's operators); otherwise with logsumexp's own arithmetic,
    except that the row maximum is the top-1 value already found, and that on a CPU the
    exponentials are taken a few rows at a time (on one core, 85 instead of 155 ms for
    4096 x 8192 logits)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and native.available():
        return native.topk_logprobs(logits, k)
    values, indices = logits.topk(k, dim=-1, sorted=True)  # (..., k)
    top = values[..., :1]  # the row maximum, which logsumexp subtracts before exp
    if logits.device.type != "cpu":
        return (values - top).sub_((logits - top).exp_().sum(-1, keepdim=True).log_()), indices
    vocab = logits.shape[-1]
    rows, tops = logits.reshape(-1, vocab), top.reshape(-1, 1)
    sums = torch.empty_like(tops)
    step = max(1, CPU_EXP_BYTES // (vocab * logits.element_size()))
    buffer = torch.empty(min(step, len(rows)), vocab, dtype=logits.dtype)
    for start in range(0, len(rows), step):
        stop = min(start + step, len(rows))
        part = torch.sub(rows[start:stop], tops[start:stop], out=buffer[: stop - start]).exp_()
        torch.sum(part, dim=-1, keepdim=True, out=sums[start:stop])
    return (values - top).sub_(sums.log_().view(top.shape)), indices


def topp_lengths(logprobs: torch.Tensor, top_p: float, min_k: int) -> torch.Tensor:
    """(..., k) float32 log-probs, most probable first -> (...,) int64: the fewest leading ids
    whose probabilities sum to at least `top_p` (float32 cumulative sum), clamped to
    ``min_k..k`` (k where the k ids do not reach it). Ties do not change the count: the sums of
    a sorted row are the same whichever of two equal values comes first."""
    below = (logprobs.exp().cumsum(-1) < top_p).sum(-1)  # the prefixes short of the coverage
    return (below + 1).clamp_(min_k, logprobs.shape[-1])


@torch.inference_mode()
def device_targets(
    logits: torch.Tensor, spec: TargetSpec, sequences: torch.Tensor, *, first_position: int = 0
) -> dict[str, torch.Tensor]:
    """Targets of a (B, T, V) batch on its device; `sequences` (B,) global sequence indices,
    `first_position` the position of the logits' first time step in its sequences (a chunk's,
    `logitcache.dumping.chunked`: what sampled draws are keyed by, with the sequence).

    Returns ``finite`` (B, T) bool (False where the teacher's logits hold NaN or +inf, or are
    all -inf, or a stored log-prob overflows its dtype) and, for top-k, ``target_ids`` (B, T, k)
    int32 and ``target_logprobs`` (B, T, k) in the stored dtype; for top-p the same (B, T, k)
    arrays, each row's first ``target_lengths`` (B, T) int64 slots used; for sampled,
    ``target_ids`` (B, T, N) int32 ascending, ``target_counts`` (B, T, N) (0 on padding slots)
    and ``target_lengths`` (B, T) int64.
    """
    x = logits.float()
    if spec.temperature != 1.0:
        x = x / spec.temperature
    if spec.kind in ("topk", "topp"):
        logprobs, ids = topk_logprobs(x, spec.k)  # (B, T, k), most probable first
        used = None
        if spec.kind == "topp":
            lengths = topp_lengths(logprobs, spec.top_p, spec.min_k)  # (B, T)
            used = torch.arange(spec.k, device=x.device) < lengths[..., None]  # (B, T, k)
        if spec.order == "id":  # unused slots sort after the used ones: their key is past any id
            ids, perm = (ids if used is None else ids.where(used, x.shape[-1])).sort(dim=-1)
            logprobs = logprobs.gather(-1, perm)
        if spec.logprob_dtype == "uint8":
            finite = torch.isfinite(logprobs)
            stored = codecs.quantize(logprobs.nan_to_num(0.0), spec.logprob_scale)
        else:
            stored = logprobs.to(_TORCH_VALUES[spec.logprob_dtype])
            finite = torch.isfinite(stored)
        out = {"target_ids": ids.to(torch.int32), "target_logprobs": stored}
        if used is None:
            return {"finite": finite.all(-1), **out}
        # an unused slot's value is never stored, so it cannot make a row non-finite
        return {"finite": (finite | ~used).all(-1), **out, "target_lengths": lengths}
    # the row maximum is NaN with a NaN, +inf with a +inf and -inf when every logit is: what
    # makes a row's softmax undefined, found in one pass instead of a log-sum-exp's two
    finite = torch.isfinite(x.amax(dim=-1))  # (B, T)
    keys = sampling.position_keys(
        spec.seed, sequences.to(logits.device), logits.shape[1], first_position
    )
    # rows with NaN are refused on the host; they draw from zeros meanwhile. On a CPU the copy
    # is skipped when every row is finite (no device to keep from waiting on the check).
    if x.device.type != "cpu" or not bool(finite.all()):
        x = torch.where(finite[..., None], x, 0.0)
    draws = sampling.draw(x, keys, spec.samples)  # temperature already applied
    count_type = torch.uint8 if spec.samples <= 255 else torch.int32
    ids, counts, lengths = sampling.distinct_counts(draws, count_type)
    return {"finite": finite, "target_ids": ids, "target_counts": counts, "target_lengths": lengths}


def assemble(
    targets: TargetInfo,
    input_ids: list[np.ndarray],
    rows: list[dict[str, np.ndarray]],
    gaps: Sequence[str] = (),
) -> PartArrays:
    """One part from its sequences: `input_ids[s]` (n,), `rows[s]` the host targets of sequence
    s cut to its n positions (the arrays `device_targets` returns, as numpy). The arrays named
    in `gaps` (the manifest's ``codec.gaps``) are stored as per-position gaps."""
    id_dtype = np.dtype(targets.id_dtype)
    lengths = [len(ids) for ids in input_ids]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    inputs = np.concatenate(input_ids).astype(id_dtype)
    if targets.kind == "topk":
        return PartArrays(
            input_ids=inputs,
            target_ids=np.concatenate([r["target_ids"] for r in rows]).astype(id_dtype),
            target_logprobs=np.concatenate([r["target_logprobs"] for r in rows]).astype(
                np.dtype(targets.logprob_dtype)
            ),
            seq_offsets=offsets,
        )
    count_dtype = np.dtype(targets.count_dtype)
    values = "target_counts" if targets.kind == "sample" else "target_logprobs"
    padded_ids = np.concatenate([r["target_ids"] for r in rows])
    padded_values = np.concatenate([r[values] for r in rows])
    widths = np.concatenate([r["target_lengths"] for r in rows])
    ids, kept = codecs.encode_ragged(padded_ids, padded_values, widths)
    ids = ids.astype(id_dtype)
    value_dtype = count_dtype if targets.kind == "sample" else np.dtype(targets.logprob_dtype)
    return PartArrays(
        **{"target_logprobs": None, values: kept.astype(value_dtype)},
        input_ids=inputs,
        target_ids=codecs.encode_gaps(ids, widths) if "target_ids" in gaps else ids,
        seq_offsets=offsets,
        target_lengths=widths.astype(count_dtype),
    )


def with_masking(arrays: PartArrays, masked: Sequence[Masked], id_dtype: str) -> PartArrays:
    """A masked-LM part: `arrays` (`assemble` of the masked positions' rows) with the two arrays
    that say where each row belongs, ``target_positions`` on the part's token axis (uint32) and
    ``target_labels``, the ids the masking replaced (`Masked`)."""
    starts = arrays.seq_offsets[:-1]
    positions = np.concatenate(
        [m.positions + start for m, start in zip(masked, starts, strict=True)]
    )
    if arrays.tokens >= 1 << 32:
        raise ValueError(f"a part of {arrays.tokens} tokens is past uint32 positions")
    labels = np.concatenate([m.labels for m in masked]).astype(np.dtype(id_dtype))
    return dataclasses.replace(
        arrays, target_positions=positions.astype(POSITION_DTYPE), target_labels=labels
    )


def target_info(
    *,
    kind: str,
    vocab_size: int,
    top_k: int = 64,
    samples: int = 64,
    temperature: float = 1.0,
    logprob_dtype: str = "float16",
    order: str = "descending",
    seed: int = 0,
    logprob_scale: float = codecs.DEFAULT_Q8_SCALE,
    top_p: float = 1.0,
    min_k: int = 1,
) -> TargetInfo:
    """The manifest's `targets` record for these dump settings (validated by the manifest
    schema's own checks when it is parsed or written)."""
    from logitcache.format.manifest import id_dtype_for

    ids = id_dtype_for(vocab_size)
    if kind == "sample":
        return TargetInfo(
            kind="sample",
            k=min(samples, vocab_size),
            temperature=float(temperature),
            id_dtype=ids,
            logprob_dtype="none",
            order="id",
            samples=samples,
            count_dtype=codecs.count_dtype_for(samples),
            seed=seed,
        )
    topp = kind == "topp"  # top_k is then the most ids a position holds (--max-k)
    return TargetInfo(
        kind=kind,
        k=top_k,
        temperature=float(temperature),
        id_dtype=ids,
        logprob_dtype=logprob_dtype,
        order=order,
        count_dtype=codecs.count_dtype_for(top_k) if topp else "",
        logprob_scale=float(logprob_scale) if logprob_dtype == "uint8" else 0.0,
        top_p=float(top_p) if topp else 0.0,
        min_k=min_k if topp else 0,
    )


def gap_arrays(targets: TargetInfo) -> list[str]:
    """The arrays a dump stores as per-position gaps (``codec.gaps``, format 1.2): the ragged
    ids of sampled targets. Measured on real dumps (docs/FORMAT.md, "Why these choices"), the
    gaps make sampled caches 12-24% smaller with byte shuffle and zstd, more than the numcodecs
    delta filter did, while top-k ids in id order gain under 3% and uint8 codes nothing, so
    those stay plain: every reader reads them without a decoding step."""
    return ["target_ids"] if targets.kind == "sample" else []


def delta_arrays(targets: TargetInfo) -> list[str]:
    """The integer arrays whose values increase along each position's row, which `--delta`
    puts through a delta filter before compression: ids in id order, uint8 codes in descending
    order. Off by default: in the zarr backend that filter is numcodecs', which is not in the
    Zarr v3 specification (tensorstore and other readers refuse it)."""
    names = []
    if targets.order == "id":
        names.append("target_ids")
    if (
        targets.kind in ("topk", "topp")
        and targets.order == "descending"
        and targets.logprob_dtype == "uint8"
    ):
        names.append("target_logprobs")
    return names
