"""`ensemble`: combine caches that several teachers dumped separately over the same data into
the cache of their average (format 1.3; docs/FORMAT.md, section 3c, states the approximation
and its bound).

The inputs must hold the same input ids (the same data fingerprint, layout and part sizes,
and per part the same ids) from the same tokenizer, with targets of one kind at one
temperature. What is exact and what is not:

* **top-k, ``probs``**: per position, the union of the members' stored ids, each with
  ``sum_i w_i p_i(id)`` where a member that did not store the id adds 0. So a stored value is
  never above the true average, and it is below it by at most ``sum_i w_i min(p_i(k_i), r_i)``
  over the members missing the id (``p_i(k_i)``: member i's smallest stored probability at
  that position, which bounds every id it left out; ``r_i``: its tail mass). The largest
  ``max(k_i)`` ids of the union are kept, normalised over the full vocabulary as in any top-k
  cache, so what the approximation loses is in the tail mass. Exact where every member stored
  every id (k = vocabulary).
* **top-k, ``logits``**: the weighted mean of the members' log-probabilities, renormalised
  (the mean of their logits, up to a constant per position that the normalisation removes).
  Only where every member stored the whole vocabulary: an id a member left out has an unknown
  log-probability with no lower bound, so no bound holds for the average. Refused otherwise.
* **sampled, ``probs``**: the members' counts pooled, id by id: ``N_1 + ... + N_n`` draws,
  ``N_i`` of them from member i, so the counts over the total estimate ``sum_i (N_i / N)
  p_i`` without bias. The weights must therefore be proportional to the members' --samples.
* **sampled, ``logits``**: refused: draws from each member are not draws from the
  renormalised geometric mean of their distributions, nor can they be made into them.

Written through the ordinary writer (`logitcache.write.remote_writer.open_writer`), part by
part like `export`: a killed combine leaves committed parts and a manifest that is not
complete, and rerunning the same command resumes it.

`mix` is the one definition of both averages, on the log-probabilities a cache holds here and
on a dump's logits (`logitcache.dumping.ensemble`).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from logitcache.errors import LogitCacheError
from logitcache.format import codecs
from logitcache.format.card import DEFAULT_LICENSE
from logitcache.format.ensemble import (
    MODES,
    WEIGHT_TOLERANCE,
    ensemble_teacher,
    normalized_weights,
)
from logitcache.format.manifest import (
    MAX_SAMPLES,
    EnsembleInfo,
    EnsembleMember,
    Manifest,
    PartArrays,
    version_for,
)
from logitcache.read import reader
from logitcache.read.decoded import check_values, ungapped
from logitcache.read.reader import Cache
from logitcache.storage.paths import refuse_overlap
from logitcache.version import __version__
from logitcache.write.remote_writer import open_writer

__all__ = ["check_combinable", "combine_part", "ensemble", "ensemble_manifest", "mix"]

#: Float32 values of the dense (positions, vocab) rows a top-k combine makes at once.
DENSE_BYTES = 64 << 20


def mix(terms: Iterable[torch.Tensor], weights: Sequence[float], mode: str) -> torch.Tensor:
    """The weighted average of `terms` (each (..., V), taken one at a time so that only the
    running average and one term exist at once): ``logits``, ``sum_i w_i x_i``; ``probs``,
    ``log sum_i w_i exp(x_i)`` of log-probabilities `x_i` (``-inf`` allowed), by logaddexp."""
    total: torch.Tensor | None = None
    for weight, x in zip(weights, terms, strict=True):
        if mode == "logits":
            total = x * weight if total is None else total.add_(x, alpha=weight)
        else:
            term = x + math.log(weight)
            total = term if total is None else torch.logaddexp(total, term, out=total)
    assert total is not None, "an ensemble has members"
    return total


def ensemble(
    out: str | Path,
    inputs: Sequence[str | Path],
    *,
    mode: str,
    weights: Sequence[float] | None = None,
    overwrite: bool = False,
    license: str = DEFAULT_LICENSE,
    cache_dir: str | Path | None = None,
) -> Manifest:
    """Write the cache of the average of the complete caches `inputs` (``mode`` "logits" or
    "probs", members weighted by `weights`, equally by default) to `out`; its manifest."""
    if len(inputs) < 2:
        raise LogitCacheError("ensemble needs at least two caches to average.")
    if mode not in MODES:
        raise LogitCacheError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}.")
    locations = [str(i) for i in inputs]
    refuse_overlap(out, locations, "OUT")
    caches = [reader.open(location, cache_dir=cache_dir) for location in locations]
    for cache in caches:
        cache.refuse_links()  # all of it now: before the writer deletes an old OUT
    shares = normalized_weights(weights, len(caches))
    check_combinable(locations, caches, mode, shares)
    template = ensemble_manifest(locations, caches, mode, shares)
    with open_writer(out, template, overwrite=overwrite, license=license) as writer:
        if not writer.manifest.complete:
            for index in range(writer.committed, caches[0].num_parts):
                writer.write_part(combine_part(template, caches, index))
            writer.finish()
        return writer.manifest


def check_combinable(
    locations: Sequence[str], caches: Sequence[Cache], mode: str, shares: Sequence[float]
) -> None:
    """Refuse caches that do not hold the same input ids from one tokenizer with targets of
    one kind and temperature, and an average that their targets cannot give (module doc)."""
    first, where = caches[0].manifest, locations[0]
    for location, cache in zip(locations[1:], caches[1:], strict=True):
        m = cache.manifest
        _check_same_task(location, m, where, first)
        if m.tokenizer.fingerprint != first.tokenizer.fingerprint:
            raise LogitCacheError(
                f"{location} was dumped with another tokenizer than {where} (fingerprint "
                f"{m.tokenizer.fingerprint[:12]} vs {first.tokenizer.fingerprint[:12]}): its "
                "input ids mean other text. Average caches of teachers that share a tokenizer."
            )
        if m.teacher.vocab_size != first.teacher.vocab_size:
            raise LogitCacheError(
                f"{location} has targets over {m.teacher.vocab_size} ids, {where} over "
                f"{first.teacher.vocab_size}: their teachers do not share a vocabulary."
            )
        if m.data.fingerprint != first.data.fingerprint or _shape(m) != _shape(first):
            raise LogitCacheError(
                f"{location} and {where} hold different data (data fingerprints "
                f"{m.data.fingerprint[:12]} and {first.data.fingerprint[:12]}, or other "
                "sequences or parts): an ensemble averages the teachers on the same input ids. "
                "Dump every teacher from the same --data with the same --seq-len, packing and "
                "--part-tokens."
            )
        if (m.targets.kind, m.targets.temperature) != (
            first.targets.kind,
            first.targets.temperature,
        ):
            raise LogitCacheError(
                f"{location} holds {m.targets.kind} targets at temperature "
                f"{m.targets.temperature:g}, {where} {first.targets.kind} at "
                f"{first.targets.temperature:g}: average caches of one target kind and "
                "temperature."
            )
    vocab = first.teacher.vocab_size
    if first.targets.kind == "sample":
        _check_pooled(locations, caches, mode, shares)
    elif mode == "logits":
        short = [
            f"{loc} (k={c.manifest.targets.k})"
            for loc, c in zip(locations, caches, strict=True)
            if c.manifest.targets.k < vocab
        ]
        if short:
            raise LogitCacheError(
                f"--mode logits averages every id's log-probability, but {', '.join(short)} "
                f"stored only the top k of {vocab} ids: the others' log-probabilities are "
                "unknown and unbounded below, so no average (nor a bound on it) follows. Use "
                "--mode probs (its approximation is bounded: docs/FORMAT.md, section 3c), dump "
                f"with --top-k {vocab}, or dump the ensemble in one pass (dump --teacher A "
                "--teacher B --ensemble logits)."
            )


def _task_name(m: Manifest) -> str:
    return "a causal-LM cache" if m.task is None else f"a {m.task.kind} cache ({m.task.input})"


def _check_same_task(location: str, m: Manifest, where: str, first: Manifest) -> None:
    """Refuse caches of different tasks, and classification caches whose label spaces (class
    count, class names) or views differ: their rows could not be averaged class by class."""
    if (m.task is None) != (first.task is None) or (
        m.task is not None and first.task is not None and m.task.input != first.task.input
    ):
        raise LogitCacheError(
            f"{location} is {_task_name(m)}, {where} {_task_name(first)}: an ensemble averages "
            "the targets of teachers of one task on the same inputs."
        )
    if m.task is None or first.task is None:
        return
    if m.teacher.vocab_size != first.teacher.vocab_size or (
        m.task.classes and first.task.classes and m.task.classes != first.task.classes
    ):
        raise LogitCacheError(
            f"{location} and {where} have different label spaces ({m.teacher.vocab_size} "
            f"classes {m.task.classes or '(unnamed)'} vs {first.teacher.vocab_size} "
            f"{first.task.classes or '(unnamed)'}): an ensemble averages classifiers class by "
            "class, so their teachers must share one label space."
        )
    if dataclasses.replace(m.task, classes=[]) != dataclasses.replace(first.task, classes=[]):
        raise LogitCacheError(
            f"{location} and {where} hold other rows per example (their task records differ: "
            "shape, labels or views): dump every classifier from the same --data with the same "
            "--views, --seed and crop settings."
        )


def _shape(m: Manifest) -> tuple[object, ...]:
    """How a cache cuts its data into sequences and parts (chunk sizes aside)."""
    layout = dataclasses.replace(m.layout, chunk_bytes=0)
    return layout, [(p.sequences, p.tokens) for p in m.parts]


def _check_pooled(
    locations: Sequence[str], caches: Sequence[Cache], mode: str, shares: Sequence[float]
) -> None:
    """Sampled caches: pooled counts, so --mode probs with weights proportional to --samples."""
    if mode == "logits":
        raise LogitCacheError(
            "sampled caches cannot be averaged with --mode logits: draws from each teacher are "
            "not draws from the average of their logits. Use --mode probs (the pooled draws "
            "sample the average of their probabilities), or dump the ensemble in one pass "
            "(dump --teacher A --teacher B --ensemble logits)."
        )
    samples = [c.manifest.targets.samples for c in caches]
    total = sum(samples)
    if any(abs(w - n / total) > WEIGHT_TOLERANCE for w, n in zip(shares, samples, strict=True)):
        counts = ", ".join(f"{loc}: {n}" for loc, n in zip(locations, samples, strict=True))
        raise LogitCacheError(
            "sampled caches are averaged by pooling their draws, so each one weighs as many "
            f"draws as it holds per position ({counts}), which --weights (or equal weights) "
            "contradicts. Leave out --weights with equal --samples, or dump the teachers with "
            "--samples in the ratio of the weights."
        )
    if total > MAX_SAMPLES:
        raise LogitCacheError(
            f"the pooled caches hold {total} draws per position, over the {MAX_SAMPLES} a cache "
            "can count; dump the teachers with fewer --samples."
        )


def ensemble_manifest(
    locations: Sequence[str], caches: Sequence[Cache], mode: str, shares: Sequence[float]
) -> Manifest:
    """The combined cache's manifest before any part: the first input's data, layout and
    codec; the ensemble's teacher record and targets (top-k: the largest k of the inputs;
    sampled: the pooled draws, seed 0, the members' seeds being in their own records)."""
    first = caches[0].manifest
    members = [
        EnsembleMember(c.manifest.teacher, w, loc, c.manifest.targets)
        for loc, c, w in zip(locations, caches, shares, strict=True)
    ]
    t = first.targets
    if t.kind == "sample":
        total = sum(c.manifest.targets.samples for c in caches)
        targets = dataclasses.replace(
            t, samples=total, k=min(total, first.teacher.vocab_size), seed=0,
            count_dtype=codecs.count_dtype_for(total),
        )  # fmt: skip
    else:
        targets = dataclasses.replace(t, k=max(c.manifest.targets.k for c in caches))
    manifest = dataclasses.replace(
        first,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        teacher=ensemble_teacher(mode, members),
        targets=targets,
        complete=False,
        sequences=0,
        tokens=0,
        parts=[],
        tool_version=__version__,
        ensemble=EnsembleInfo(mode, members),
    )
    return dataclasses.replace(manifest, format_version=version_for(manifest))


def combine_part(template: Manifest, caches: Sequence[Cache], index: int) -> PartArrays:
    """Part `index` of the combined cache `template` describes, from the same part of each
    input (refused if their input ids differ)."""
    assert template.ensemble is not None
    shares = [m.weight for m in template.ensemble.members]
    where = [f"{c.manifest.parts[index].name} of {c.location}" for c in caches]
    if template.targets.kind == "sample":
        parts = [
            ungapped(c.manifest, c.read_part(index), w) for c, w in zip(caches, where, strict=True)
        ]
        for cache, part, w in zip(caches, parts, where, strict=True):
            check_values(cache.manifest, part, w)
    else:
        parts = [c.read_decoded(index) for c in caches]
    for part, w in zip(parts[1:], where[1:], strict=True):
        if not all(
            np.array_equal(getattr(part, name), getattr(parts[0], name))
            for name in ("input_ids", "seq_offsets", "labels", "views")
        ):
            raise LogitCacheError(
                f"{w} and {where[0]} hold different inputs (input ids, or a classifier's labels "
                "or views), although their data records agree: one of the caches was not dumped "
                "from the data it names. Re-dump it."
            )
    if template.targets.kind == "sample":
        combined = _pooled(template, parts)
    else:
        combined = _union_topk(template, parts, shares, template.ensemble.mode)
    # a classification cache's labels and views are the inputs', the same in every member
    return dataclasses.replace(combined, labels=parts[0].labels, views=parts[0].views)


def _pooled(template: Manifest, parts: Sequence[PartArrays]) -> PartArrays:
    """The members' (id, count) entries summed id by id, in the ragged layout (ids increasing
    within a position, as a sampled dump stores them)."""
    vocab, t = template.teacher.vocab_size, template.targets
    tokens = parts[0].tokens
    keys = np.concatenate([
        codecs.row_of_entries(p.target_lengths) * vocab + np.asarray(p.target_ids, np.int64)
        for p in parts
    ])  # fmt: skip
    counts = np.concatenate([np.asarray(p.target_counts, np.int64) for p in parts])
    entries, inverse = np.unique(keys, return_inverse=True)  # by position, then by id
    pooled = np.bincount(inverse, weights=counts)  # float64: exact below 2**53
    lengths = np.bincount(entries // vocab, minlength=tokens)
    ids = (entries % vocab).astype(t.id_dtype)
    return PartArrays(
        input_ids=parts[0].input_ids,
        target_ids=codecs.encode_gaps(ids, lengths) if "target_ids" in template.codec.gaps else ids,
        target_logprobs=None,
        seq_offsets=parts[0].seq_offsets,
        target_counts=pooled.astype(t.count_dtype),
        target_lengths=lengths.astype(t.count_dtype),
    )


def _union_topk(
    template: Manifest, parts: Sequence[PartArrays], shares: Sequence[float], mode: str
) -> PartArrays:
    """The top k of the average over the union of the members' stored ids (module doc),
    computed on dense (rows, vocab) log-probabilities a few rows at a time."""
    vocab, t = template.teacher.vocab_size, template.targets
    tokens = parts[0].tokens
    ids = np.empty((tokens, t.k), dtype=np.int64)
    logprobs = np.empty((tokens, t.k), dtype=np.float32)
    step = max(1, DENSE_BYTES // (4 * vocab))
    for start in range(0, tokens, step):
        rows = slice(start, start + step)
        dense = (_dense(p.target_ids[rows], p.target_logprobs[rows], vocab) for p in parts)
        average = mix(dense, shares, mode)  # (rows, vocab)
        if mode == "logits":  # the mean of log-probs is the mean of logits minus a constant
            average -= torch.logsumexp(average, dim=-1, keepdim=True)
        values, top = average.topk(t.k, dim=-1)  # (rows, k), decreasing
        ids[rows], logprobs[rows] = top.numpy(), values.numpy()
    if t.order == "id":
        perm = np.argsort(ids, axis=-1)
        ids, logprobs = np.take_along_axis(ids, perm, -1), np.take_along_axis(logprobs, perm, -1)
    stored = (
        codecs.quantize(logprobs, t.logprob_scale)
        if t.logprob_dtype == "uint8"
        else logprobs.astype(t.logprob_dtype)
    )
    return PartArrays(
        input_ids=parts[0].input_ids,
        target_ids=ids.astype(t.id_dtype),
        target_logprobs=stored,
        seq_offsets=parts[0].seq_offsets,
    )


def _dense(ids: np.ndarray, logprobs: np.ndarray, vocab: int) -> torch.Tensor:
    """Decoded top-k rows (rows, k) as (rows, vocab) log-probs, -inf where not stored (the
    largest value where an id repeats: a -inf padding slot never hides a stored id 0)."""
    dense = torch.full((len(ids), vocab), -math.inf)
    return dense.scatter_reduce_(
        1,
        torch.from_numpy(np.asarray(ids, np.int64)),
        torch.from_numpy(np.asarray(logprobs, np.float32)),
        reduce="amax",
    )
