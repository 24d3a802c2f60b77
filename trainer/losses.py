"""Knowledge-distillation losses computed from cached sparse teacher targets.

The cache stores, for every token position, K vocabulary ids and their teacher log-probabilities
at temperature 1, normalised over the *full* vocabulary: ``sum(exp(target_logprobs)) <= 1`` and
the leftover is the teacher's tail mass outside the K ids. These losses never build a dense
(B, T, V) teacher tensor; the only dense tensor is the student's own log-softmax, which
hard-label training computes anyway.

Each loss is a divergence D(teacher_T, student_T) averaged over unmasked positions, computed on
a *support*: a few categories that carry the teacher's whole mass. The K ids alone do not define
a distribution, so ``tail`` picks how the missing mass is handled, i.e. what the categories are:

``"renorm"``
    Classic top-k KD. Teacher probabilities over the K ids are renormalised to sum to 1; the
    student keeps its full-vocabulary log-softmax. The student's mass off the K ids is only
    penalised through normalisation, and the teacher's tail mass is thrown away.
``"bucket"``
    The vocabulary is split into K+1 categories: the K ids plus one "tail" bucket holding
    everything else. Teacher tail = ``1 - sum p_k``; student tail = the student's probability
    summed over every id not among the K. Exact over that partition; with K = V it is dense.
``"label"``
    The teacher's tail mass is added to the hard label: to its slot if the label is among the K
    ids, otherwise as one more category at the label id.

The divergence (``loss``, `LOSSES`); p is the teacher on the categories (zero outside them), q
the student's probability of each category, taken from its full-vocabulary distribution:

``"forward_kl"``
    KL(p || q) = sum_c p_c log(p_c / q_c): mass-covering, the classic KD objective (Hinton et
    al.). Student mass outside the categories costs nothing directly (only through q_c).
``"reverse_kl"``
    KL(q || p): mode-seeking. It is infinite wherever the student has mass and the teacher has
    none, which off the categories is almost always (renorm, label, and every tail mode on
    sampled targets, whose teacher tail is 0), so the student is *conditioned on the support*:
    q is restricted to the categories where p > 0 and renormalised there. Where the categories
    partition the vocabulary with a teacher tail (bucket on top-k), that changes nothing. So
    reverse KL only shapes the student *within* the support; what puts its mass there is the
    CE term (``alpha``) or a tail bucket.
``"gjsd"``
    The generalised Jensen-Shannon divergence of TRL's ``GKDTrainer.generalized_jsd_loss``
    (GKD, Agarwal et al. 2024; axolotl's ``kd_beta`` is the same), with ``beta`` in [0, 1]:
    ``beta * KL(p || m) + (1 - beta) * KL(q || m)``, ``m = beta * p + (1 - beta) * q``;
    ``beta`` 0 is forward KL and 1 reverse KL *by definition* (computed exactly as those two).
    Note what this convention implies: the formula itself tends to 0 at both ends (about
    ``beta * KL(p || q)`` near 0 and ``(1 - beta) * KL(q || p)`` near 1), so the value jumps
    at the endpoints and near them ``beta`` scales the loss rather than choosing a direction.
    0.5 is the symmetric JSD, bounded by log 2. It is finite without conditioning, so the
    student is *not* conditioned: its mass outside the categories, q_off, has p = 0 and
    m = (1 - beta) q there, which contributes exactly ``(1 - beta) * log(1 / (1 - beta)) *
    q_off``: the divergence against the teacher the cache describes (zero off the support).
``"tvd"``
    Total variation ``0.5 * sum_v |p_v - q_v|`` over the whole vocabulary, the student's
    off-support mass included (it counts as ``0.5 * |0 - q_off|``): finite, in [0, 1], and it
    penalises mass outside the support as forward KL does. Computed as ``sum_c max(p_c - q_c,
    0)`` over the support, which is the same number (both sides sum to 1, and off the support
    p - q <= 0) without forming ``1 - sum q_c``.

The rule behind these choices: compare the teacher the cache describes (its probabilities on the
categories, zero elsewhere) with the student's real distribution; only where that is infinite
(reverse KL) is the student conditioned on the support instead. With K = V (and every tail mode)
each loss equals its dense version (`dense_divergence`).

All are combined as ``alpha * CE + (1 - alpha) * T**2 * D`` (`distillation_loss`). The T**2
factor is Hinton's correction for forward KL, whose gradient scales as 1/T**2; it is kept for
every loss so that ``--loss`` changes the divergence and nothing else. At high T reverse KL and
gjsd scale like forward KL (all are locally quadratic in the logit gap); TVD does not (its
gradient scales as 1/T), so for TVD the factor is merely a weight.

Temperature. Stored log-probs are at T=1. The teacher at T is rebuilt over the support by
dividing the T=1 log-probs by T and renormalising over the support. Over K ids this is exact
for the teacher restricted to those ids (``log p_k`` differs from the teacher's logits by a
constant), so ``"renorm"`` is exactly "teacher_T conditioned on the K ids". The tail bucket,
and the tail mass moved onto the label by ``"label"``, is re-tempered as one category of
probability r: it gets weight ``r**(1/T)`` where the true tempered teacher would give
``sum_{v in tail} p_v**(1/T)``. Those agree only when the tail is a single id or empty (K = V);
for T > 1 the lumped tail is *under*-weighted (x**(1/T) is subadditive), for T < 1 over-weighted.
The student side is always exact: its log-softmax at T over the full vocabulary, gathered.

Teacher tail masses below ``TAIL_FLOOR`` are treated as zero. ``1 - sum p_k`` is a difference
of O(1) numbers, so it carries the rounding of the stored log-probs: roughly eps * (|log Z| +
entropy), i.e. 1e-7 .. a few 1e-6 for float32 values (about 1e-3 for float16 values, which this
floor does not hide). Left alone, that noise becomes a spurious tail category which, when the
student's tail is empty or tiny (K = V, or sampled targets whose ids carry all the mass), costs
``r * log(r / q_tail)``: unbounded, and amplified by tempering (``r**(1/T)``).

Padding: target slots whose log-prob is ``-inf`` are absent (probability zero, no contribution,
no gradient, no NaN); their ids may be anything, including out of range. Ids of present slots
must be distinct and in ``[0, V)``. A position left with no support at all (renorm, every slot
padding) contributes 0 to every loss.

Shapes below are written for (B, T, ...) inputs; any number of leading dims works.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

TAIL_MODES = ("renorm", "bucket", "label")
#: The divergences (``--loss``); see the module docstring.
LOSSES = ("forward_kl", "reverse_kl", "gjsd", "tvd")
DEFAULT_LOSS = "forward_kl"
#: gjsd's interpolation when none is given: TRL's GKDConfig default, the symmetric JSD.
DEFAULT_BETA = 0.5
#: The tail mode when none is given: renorm gave the lowest held-out KL at every k in
#: benchmarks/bench_fidelity.py, and it is the cheapest (one gather on the CE log-softmax).
DEFAULT_TAIL = "renorm"

# Teacher tail masses at or below this are rounding noise of the stored log-probs (see above).
TAIL_FLOOR = 1e-5


class LossParts(NamedTuple):
    """``loss`` carries the graph; ``ce`` and ``kd`` are detached 0-dim tensors for logging.

    They stay tensors (not floats) so that logging does not force a device sync every step.
    ``kd`` is the chosen divergence at the distillation temperature, *before* the ``T**2``
    factor.
    """

    loss: Tensor
    ce: Tensor
    kd: Tensor


class LossFn(Protocol):
    """What `trainer.fit` calls every step: the student's logits and the batch -> the loss.

    ``logits`` (B, T, V) as the student returns them (any float dtype, possibly under bf16
    autocast); ``batch`` is the `CacheDataset` batch on the training device: ``input_ids``,
    ``attention_mask``, ``labels`` (B, T) (-100 masks), ``target_ids`` and ``target_logprobs``
    (B, T, K), ``index`` (B,). ``loss`` must be a mean over the labelled positions: under
    data-parallel training `fit` rescales it so that the gradient is the global batch's mean.
    """

    def __call__(self, logits: Tensor, batch: Mapping[str, Tensor]) -> LossParts: ...


@dataclass(frozen=True)
class DistillationLoss:
    """The default `LossFn`: `distillation_loss` on the cached targets, or, with ``alpha`` 1,
    hard-label cross-entropy alone (the cached targets are then never read). Invalid settings
    raise `ValueError` here, not at the first step."""

    alpha: float = 0.5
    temperature: float = 1.0
    tail: str = DEFAULT_TAIL
    loss: str = DEFAULT_LOSS
    beta: float = DEFAULT_BETA  # gjsd only

    def __post_init__(self) -> None:
        _check_args(self.tail, self.temperature, self.loss, self.beta)
        _check_alpha(self.alpha)

    def __call__(self, logits: Tensor, batch: Mapping[str, Tensor]) -> LossParts:
        if self.alpha == 1.0:
            return hard_label_loss(logits, batch["labels"])
        return distillation_loss(
            logits, batch["labels"], batch["target_ids"], batch["target_logprobs"],
            alpha=self.alpha, temperature=self.temperature, tail=self.tail, loss=self.loss,
            beta=self.beta,
        )  # fmt: skip


def hard_label_loss(logits: Tensor, labels: Tensor, *, ignore_index: int = -100) -> LossParts:
    """Cross-entropy on the labels (float32), mean over unmasked positions; 0 (not NaN) when
    every position is masked. ``kd`` is 0."""
    total = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=ignore_index,
        reduction="sum",
    )  # fmt: skip
    ce = total / (labels != ignore_index).sum().clamp(min=1)
    return LossParts(loss=ce, ce=ce.detach(), kd=torch.zeros((), device=logits.device))


def sparse_kd_loss(
    student_logits: Tensor,
    labels: Tensor,
    target_ids: Tensor,
    target_logprobs: Tensor,
    *,
    temperature: float = 1.0,
    tail: str = DEFAULT_TAIL,
    loss: str = DEFAULT_LOSS,
    beta: float = DEFAULT_BETA,
    ignore_index: int = -100,
) -> Tensor:
    """Mean over unmasked positions of D(teacher_T, student_T) on the support set by ``tail``:
    ``loss`` picks D (`LOSSES`; ``beta`` is gjsd's interpolation, 0 = forward KL, 1 = reverse
    KL), as the module docstring says.

    student_logits (B, T, V) any float dtype, computed in (at least) float32; labels (B, T)
    int64 with ``ignore_index`` masking positions; target_ids (B, T, K) int64; target_logprobs
    (B, T, K) teacher log-probs at T=1 over the full vocabulary (``-inf`` marks padding). For
    sampled targets pass ``log(counts / N)``: the tail mass is then zero and every mode agrees.

    Returns a 0-dim tensor; 0 (still attached to the graph) when every position is masked.
    Multiply by ``temperature**2`` yourself to keep gradient scale independent of T, or use
    :func:`distillation_loss`.
    """
    _check_args(tail, temperature, loss, beta)
    _check_shapes(student_logits, labels, target_ids, target_logprobs)
    t = _targets(
        labels, target_ids, target_logprobs, temperature, tail, ignore_index,
        _compute_dtype(student_logits),
    )  # fmt: skip
    if tail == "bucket":
        gathered = _TailGather.apply(student_logits, t.gather_ids, t.in_tail, temperature)
    else:
        gathered = _log_softmax_at(student_logits, temperature).gather(-1, t.gather_ids)
    div = _divergence(t.teacher, _student_support(gathered, tail), loss, beta)  # (B, T)
    return _masked_mean(div, t.mask)


def dense_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    loss: str = DEFAULT_LOSS,
    beta: float = DEFAULT_BETA,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> Tensor:
    """Reference D(softmax(teacher/T), softmax(student/T)) over the full vocabulary, mean over
    unmasked positions; ``loss`` and ``beta`` as in `sparse_kd_loss`.

    Builds the full (B, T, V) teacher distribution: for tests and online-distillation baselines,
    not for training from the cache. The teacher is detached (it is a frozen target). ``-inf``
    teacher logits (e.g. padded vocabulary rows) are zero-probability, outside the support by
    the same rule as the sparse losses (reverse KL conditions the student on the rest; with
    finite teacher logits every loss is its textbook definition, gjsd TRL's).
    """
    _check_args("renorm", temperature, loss, beta)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    student = _log_softmax_at(student_logits, temperature)  # (B, T, V)
    teacher = _log_softmax_at(teacher_logits.detach(), temperature)  # (B, T, V)
    div = _divergence(teacher, student, loss, beta)  # (B, T)
    return _masked_mean(div, labels != ignore_index)


def dense_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> Tensor:
    """Reference forward KL(softmax(teacher/T) || softmax(student/T)): `dense_divergence`."""
    return dense_divergence(
        student_logits, teacher_logits, labels, loss="forward_kl", temperature=temperature,
        ignore_index=ignore_index,
    )  # fmt: skip


def distillation_loss(
    student_logits: Tensor,
    labels: Tensor,
    target_ids: Tensor,
    target_logprobs: Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    tail: str = DEFAULT_TAIL,
    loss: str = DEFAULT_LOSS,
    beta: float = DEFAULT_BETA,
    ignore_index: int = -100,
) -> LossParts:
    """``loss = alpha * CE + (1 - alpha) * T**2 * KD`` from cached sparse targets, KD being the
    divergence ``loss`` (``beta``: gjsd's interpolation) as in `sparse_kd_loss`.

    The T**2 factor keeps the KD gradient scale independent of T (Hinton et al., 2015). Cost is
    what matters here: training from the cache should be barely slower than hard-label
    training, whose loss is one float32 log-softmax over (B, T, V) plus a gather. So at T=1
    the log-softmax is computed once and shared, and the label is gathered in the same call
    as the K target ids; CE is read off that gather rather than calling ``F.cross_entropy``
    (which would redo the log-softmax). At T != 1 a second log-softmax (of logits / T) is
    unavoidable. ``tail="bucket"`` needs the student's mass outside the K ids as well: it
    replaces the log-softmax and the gather by one function of the logits (`_TailGather`) that
    costs about what they do. Masking and the all-masked case (returns 0) behave as in
    ``sparse_kd_loss``.
    """
    _check_args(tail, temperature, loss, beta)
    _check_alpha(alpha)
    _check_shapes(student_logits, labels, target_ids, target_logprobs)

    t = _targets(
        labels, target_ids, target_logprobs, temperature, tail, ignore_index,
        _compute_dtype(student_logits),
    )  # fmt: skip
    logprobs = None  # (B, T, V) the log-softmax at T=1, if one is needed
    if tail == "bucket":
        gathered = _TailGather.apply(student_logits, t.gather_ids, t.in_tail, temperature)
    else:
        logprobs = _log_softmax_at(student_logits, 1.0)  # the only one at T=1
        student_t = logprobs if temperature == 1.0 else _log_softmax_at(student_logits, temperature)
        gathered = student_t.gather(-1, t.gather_ids)  # (B, T, 1+K)
    if temperature == 1.0:
        label_logprob = gathered[..., 0]  # (B, T)
    else:
        if logprobs is None:
            logprobs = _log_softmax_at(student_logits, 1.0)
        label_logprob = logprobs.gather(-1, t.gather_ids[..., :1]).squeeze(-1)  # (B, T)
    div = _divergence(t.teacher, _student_support(gathered, tail), loss, beta)  # (B, T)
    ce = _masked_mean(-label_logprob, t.mask)
    kd = _masked_mean(div, t.mask)
    total = alpha * ce + (1.0 - alpha) * temperature**2 * kd
    return LossParts(loss=total, ce=ce.detach(), kd=kd.detach())


# --------------------------------------------------------------------------------------------
# A student with another tokenizer: the Universal Logit Distillation loss

#: ``--loss uld``: not a divergence on shared ids (`LOSSES`) but `ULDLoss`, for a student whose
#: tokenizer differs from the teacher's.
ULD_LOSS = "uld"
#: lambda, the weight of the ULD term next to the student's CE, when none is given.
DEFAULT_ULD_WEIGHT = 1.0


@dataclass(frozen=True)
class ULDLoss:
    """``CE + weight * ULD``: the student's own cross-entropy on its tokens plus the Universal
    Logit Distillation term of Boizard et al. (2024), `uld_distance`, for a student whose
    vocabulary is not the teacher's. The batch is `CacheDataset`'s with ``student_tokens``
    (`trainer.align.StudentTokens`): student ids and labels, and at each student position the
    cached targets of the teacher position it is paired with. ``kd`` is the ULD term."""

    weight: float = DEFAULT_ULD_WEIGHT
    temperature: float = 1.0

    def __post_init__(self) -> None:
        _check_args(DEFAULT_TAIL, self.temperature)
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"weight must be a finite number >= 0, got {self.weight!r}")

    def __call__(self, logits: Tensor, batch: Mapping[str, Tensor]) -> LossParts:
        ce = hard_label_loss(logits, batch["labels"])
        uld = uld_distance(
            logits, batch["labels"], batch["target_logprobs"], temperature=self.temperature
        )
        return LossParts(loss=ce.loss + self.weight * uld, ce=ce.ce, kd=uld.detach())


def uld_distance(
    student_logits: Tensor,
    labels: Tensor,
    target_logprobs: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> Tensor:
    """Mean over the positions with a label and a teacher of the 1-D Wasserstein distance
    between the sorted teacher and student probability vectors (ULD, Boizard et al. 2024).

    Sorting makes the two vocabularies comparable without any id mapping: both distributions
    are sorted decreasing, the shorter padded with zeros, and the distance is the L1 norm of
    the difference. The teacher is its cached support, renormalised over it at ``temperature``
    (the mass outside its top-k is dropped, as ``tail="renorm"`` drops it; sampled targets have
    none) and zero beyond. Then only the student's K largest probabilities meet a non-zero
    teacher entry, and the rest of its vocabulary adds exactly its mass outside them:
    ``sum_j |t_(j) - s_(j)| + (1 - sum_j s_(j))`` over j < K, exact with no (B, T, V) sort.

    student_logits (B, T, V) any float dtype; labels (B, T) with ``ignore_index``;
    target_logprobs (B, T, K) the teacher log-probs at the student's positions, ``-inf`` for
    padding and for every slot of a position with no paired teacher (no ULD term there).
    Returns a 0-dim tensor in [0, 2]; 0 (attached to the graph) when no position counts.
    """
    _check_args(DEFAULT_TAIL, temperature)
    if tuple(student_logits.shape[:-1]) != tuple(labels.shape) or tuple(
        target_logprobs.shape[:-1]
    ) != tuple(labels.shape):
        raise ValueError(
            f"shape mismatch: expected student_logits (*L, V), labels (*L) and target_logprobs "
            f"(*L, K); got {tuple(student_logits.shape)}, {tuple(labels.shape)}, "
            f"{tuple(target_logprobs.shape)}"
        )
    teacher = target_logprobs.to(_compute_dtype(student_logits))
    mask = (labels != ignore_index) & ~teacher[..., 0].isneginf()  # (B, T); decreasing order
    teacher = _log_normalize(teacher / temperature).exp()  # (B, T, K), rows sum to 1 or 0
    teacher = teacher.sort(dim=-1, descending=True).values
    k = min(teacher.shape[-1], student_logits.shape[-1])
    student = _log_softmax_at(student_logits, temperature).exp()  # (B, T, V)
    top = student.topk(k, dim=-1).values  # (B, T, k) decreasing
    gap = (teacher[..., :k] - top).abs().sum(-1) + teacher[..., k:].sum(-1)  # (B, T)
    distance = gap + (1.0 - top.sum(-1)).clamp_min(0.0)
    return _masked_mean(distance, mask)


# --------------------------------------------------------------------------------------------
# The algorithm


class _Targets(NamedTuple):
    """The teacher's side of a batch, and where to read the student's (`_targets`)."""

    mask: Tensor  # (B, T) bool: the positions that count
    gather_ids: Tensor  # (B, T, 1+K): the label, then the target ids (padding parked on id 0)
    # (B, T, 1+K+1) bool, bucket only: the slots whose id is in the student's tail (the label,
    # padding), not the target ids, nor the tail's own last column (`_gather_log_softmax`)
    in_tail: Tensor | None
    teacher: Tensor  # (B, T, C) teacher log-probs at T on the categories (`_student_support`)


def _targets(
    labels: Tensor,
    target_ids: Tensor,
    target_logprobs: Tensor,
    temperature: float,
    tail: str,
    ignore_index: int,
    dtype: torch.dtype,
) -> _Targets:
    """The categories of each position, the teacher on them and the ids to gather the student at.

    The student's log-probs are gathered at ``gather_ids`` from its log-softmax at the
    temperature (bucket: plus its tail, `_TailGather`, with ``in_tail``); `_student_support`
    then lines them up with ``teacher``, slot by slot. ``dtype`` is the student's compute dtype (float32 or 64).
    """
    mask = labels != ignore_index  # (B, T)
    label = torch.where(mask, labels, 0).long().unsqueeze(-1)  # (B, T, 1) always a valid index
    logp = target_logprobs.detach().to(dtype)  # (B, T, K) teacher at T=1
    absent = logp.isneginf()  # (B, T, K) True on padding slots
    present = ~absent
    ids = torch.where(present, target_ids, 0).long()  # (B, T, K) junk padding ids -> 0
    gather_ids = torch.cat([label, ids], dim=-1)  # (B, T, 1+K)
    in_tail = None
    if tail == "bucket":
        edge = torch.ones_like(label, dtype=torch.bool)  # (B, T, 1)
        in_tail = torch.cat([edge, absent, ~edge], dim=-1)  # (B, T, 1+K+1)

    # Teacher log-probs at T=1 on the support, in the slot order of `_student_support`.
    if tail == "renorm":
        teacher = logp  # (B, T, K)
    else:
        # float64: the tail is a small difference of O(1) numbers.
        rest = 1.0 - logp.double().exp().sum(-1, keepdim=True)  # (B, T, 1)
        rest = torch.where(rest > TAIL_FLOOR, rest, 0.0).log().to(logp.dtype)  # -inf if none
        if tail == "bucket":
            teacher = torch.cat([logp, rest], dim=-1)  # (B, T, K+1)
        else:
            # (B, T, K) label among the stored ids? (`present &`: padding was parked on id 0)
            hit = present & (ids == label)
            logp = torch.where(hit, torch.logaddexp(logp, rest), logp)
            extra = rest.masked_fill(hit.any(-1, keepdim=True), -math.inf)  # (B, T, 1)
            teacher = torch.cat([extra, logp], dim=-1)  # (B, T, 1+K)

    if temperature != 1.0:
        teacher = teacher / temperature
    teacher = _log_normalize(teacher)  # renormalise over the support (re-tempering)
    return _Targets(mask, gather_ids, in_tail, teacher)


def _student_support(gathered: Tensor, tail: str) -> Tensor:
    """The student's log-probs of the teacher's categories, from the gather at ``gather_ids``
    (B, T, 1+K), or (B, T, 1+K+1) with the tail for bucket: renorm the K ids; bucket the K ids,
    then the tail; label [label, ids] (the label slot is used only if needed)."""
    return gathered if tail == "label" else gathered[..., 1:]


def _divergence(teacher: Tensor, student: Tensor, loss: str, beta: float) -> Tensor:
    """Per-position D(teacher, student) over the categories of the last dim, (..., C) -> (...).

    ``teacher``: log-probs normalised over the categories, -inf outside the support (padding, an
    empty tail, the label slot when unused). ``student``: the student's log-probs of the same
    categories, read from its full-vocabulary distribution, so they may sum to less than 1 (the
    rest is its mass off the support); junk where the teacher is -inf. Every term is formed on
    finite values and masked by ``where`` afterwards, so nothing outside the support reaches the
    forward or the gradient (no NaN from -inf slots or empty rows).
    """
    if loss == "forward_kl" or (loss == "gjsd" and beta == 0.0):
        return _kl_terms(teacher, student).sum(-1)  # today's code path, bit for bit
    on = ~teacher.isneginf()  # (..., C) the support
    student = student.masked_fill(~on, -math.inf)  # off-support slots hold junk
    if loss == "reverse_kl" or (loss == "gjsd" and beta == 1.0):
        # conditioned on the support: KL(q|S || p) is finite, KL(q || p) is not
        return _kl_terms(_log_normalize_on(student, on), teacher).sum(-1)
    if loss == "tvd":
        gap = teacher.exp() - student.exp()  # (..., C) p - q; 0 - 0 off the support
        return gap.clamp_min(0.0).sum(-1)
    assert loss == "gjsd", loss
    # log m = log(beta p + (1 - beta) q), on finite stand-ins off the support
    log_m = torch.logaddexp(
        torch.where(on, teacher, 0.0) + math.log(beta),
        torch.where(on, student, 0.0) + math.log1p(-beta),
    )  # (..., C)
    inside = beta * _kl_terms(teacher, log_m) + (1.0 - beta) * _kl_terms(student, log_m)
    # the student's mass off the support; none counted where there is no support at all (a
    # fully padded position: no target, no loss, as for the other divergences)
    q_off = (1.0 - student.exp().sum(-1)).clamp_min(0.0) * on.any(-1)
    return inside.sum(-1) + (1.0 - beta) * -math.log1p(-beta) * q_off


class _Gathered(NamedTuple):
    """What `_gather_log_softmax` computed and `_gather_log_softmax_grad` needs."""

    logq: Tensor  # (N, V) log-softmax of x over the tail (bucket), else over the vocabulary
    ids: Tensor  # (N, M) the gathered ids
    out: Tensor  # (N, M), with a tail: (N, M+1), the result
    stays: Tensor | None  # (N, M+1) bool: ``in_tail``, and every slot of a row with no tail
    whole: Tensor | None  # (N, 1) bool: rows whose excluded ids are the vocabulary (K >= V only)


def _gather_log_softmax(
    x: Tensor, ids: Tensor, in_tail: Tensor | None = None, *, inplace: bool = False
) -> _Gathered:
    """``log_softmax(x)`` at ``ids`` and, given ``in_tail``, the log of the student's *tail*: its
    probability summed over every id but the excluded ones (those of the slots not in the
    tail); no autograd.

    x (N, V) float32 or float64 (any leading dims work), overwritten if ``inplace``; ids (N, M)
    valid indices; in_tail (N, M+1) bool: the slots whose id stays in the tail, then False (the
    tail's own column). Excluded ids must be distinct; a slot in the tail (the label, padding
    parked on any id) may repeat one. Returns ``out`` (N, M), with ``in_tail`` (N, M+1)
    ``[log-probs at ids, tail]``, and what the gradient needs.

    The tail is summed over the tail itself: ``logq``, the log-softmax of x with the excluded
    ids at -inf (one masked copy, normalised in place), has for normaliser the tail's
    logsumexp, L_tail = max + (log-softmax at the max), and the full normaliser is the
    logsumexp of L_tail and of x at the excluded ids, a (N, M+1) reduction. Not
    ``log(1 - sum q_k)``: that subtracts ``sum q_k`` (known only to ~1e-7 absolute in float32)
    from 1, so once the student puts all but ~1e-6 of its mass on the teacher's ids -- exactly
    what distillation drives it towards -- the tail's log is garbage or -inf, and its gradient
    ``-q_k / q_tail`` is huge. Here the tail is exact to relative precision for any size, in
    log space (no underflow), and its gradient (`_gather_log_softmax_grad`) is bounded.

    Few operations on the (N, M) values, since on a busy CPU each one costs its thread pool's
    wake-up whatever its size. A row whose excluded ids cover the vocabulary (K >= V) has an
    empty tail (-inf, zero gradient) and is left unmasked, so that its log-softmax is not over
    nothing. A row whose every non-excluded id has logit -inf is not supported (NaN).
    """
    if in_tail is None:
        logq = torch.log_softmax(x, -1, out=x) if inplace else torch.log_softmax(x, -1)
        return _Gathered(logq, ids, logq.gather(-1, ids), None, None)
    whole, stays = None, in_tail
    if ids.shape[-1] >= x.shape[-1]:  # only then may a row's excluded ids be the vocabulary
        whole = (~in_tail[..., :-1]).sum(-1, keepdim=True) >= x.shape[-1]  # (N, 1)
        stays = in_tail | whole  # such rows are not masked
    picked = x.gather(-1, ids)  # (N, M) before x is overwritten
    # adding -inf is order-free, and a slot parked on an excluded id adds 0
    penalty = torch.where(stays[..., :-1], x.new_zeros(()), -math.inf)  # (N, M)
    masked = x.scatter_add_(-1, ids, penalty) if inplace else x.scatter_add(-1, ids, penalty)
    top, at = masked.max(-1, keepdim=True)  # (N, 1)
    logq = torch.log_softmax(masked, -1, out=masked)  # (N, V) over the tail, in place
    tail = top - logq.gather(-1, at)  # (N, 1) L_tail
    if whole is not None:
        tail = tail.masked_fill(whole, -math.inf)
    full = torch.cat([picked, tail], -1)  # (N, M+1)
    parts = full.masked_fill(in_tail, -math.inf)  # the partition: excluded ids, then the tail
    ref = parts.amax(-1, keepdim=True)  # (N, 1) finite: the tail's or an excluded id's
    lse = ref + (parts - ref).exp_().sum(-1, keepdim=True).log_()  # (N, 1) L
    return _Gathered(logq, ids, full - lse, stays, whole)


def _gather_log_softmax_grad(s: _Gathered, grad_out: Tensor, *, inplace: bool = False) -> Tensor:
    """d/dx from ``grad_out`` = d/d ``s.out``: (N, V), written over ``s.logq`` if ``inplace``.

    With q the softmax of x, a gathered log-prob's gradient is ``onehot(id) - q``, the tail's
    ``[v in tail] q_v / q_tail - q``. In the tail q_v = q_tail * exp(logq_v), so there the sum
    is ``exp(logq_v) * (g_tail - G q_tail)`` (G: the sum of ``grad_out``), one pass over
    ``logq``; the excluded ids (``exp(logq) = 0``) get ``g_c - G q_c`` from their own slots,
    the slots in the tail their ``g_c``: a scatter of (N, M) values. Every factor is at most G.
    """
    q = s.logq.exp_() if inplace else s.logq.exp()  # (N, V)
    total = grad_out.sum(-1, keepdim=True)  # (N, 1) G
    if s.stays is None:
        return q.mul_(-total).scatter_add_(-1, s.ids, grad_out)
    probs = s.out.exp().masked_fill_(s.stays, 0.0)  # (N, M+1) excluded ids' and tail's q
    own = torch.addcmul(grad_out, total, probs, value=-1.0)  # (N, M+1) g - G q
    coef = own[..., -1:]  # (N, 1) g_tail - G q_tail
    if s.whole is not None:  # an empty tail, left unmasked: q itself, and no tail term
        coef = torch.where(s.whole, grad_out[..., -1:] - total, coef)
    return q.mul_(coef).scatter_add_(-1, s.ids, own[..., :-1])


class _TailGather(torch.autograd.Function):
    """``[log_softmax(logits / T) at ids, log of the probability off the excluded ids]``
    (..., M+1), with its analytic gradient: `_gather_log_softmax`, for ``tail="bucket"``.

    One function of the logits, in place of a log-softmax, a gather and a tail, so that the
    bucket tail costs about what renorm does: forward, a masked copy of the logits normalised
    in place (the only (..., V) tensor, kept for the backward), a max and (..., M) work;
    backward, one pass over it and a scatter. Computed in float32 (float64 stays float64).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor, in_tail: Tensor, temperature: float) -> Tensor:
        x = logits.to(_compute_dtype(logits))
        owned = x is not logits  # a copy of our own may be overwritten
        if temperature != 1.0:
            x, owned = x / temperature, True
        s = _gather_log_softmax(x, ids, in_tail, inplace=owned)
        ctx.temperature, ctx.dtype = temperature, logits.dtype
        ctx.save_for_backward(s.logq, s.ids, s.out, s.stays, s.whole)
        return s.out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None, None]:
        logq, ids, out, stays, whole = ctx.saved_tensors
        grad = _gather_log_softmax_grad(_Gathered(logq, ids, out, stays, whole), grad_out)
        if ctx.temperature != 1.0:
            grad.div_(ctx.temperature)
        return grad.to(ctx.dtype), None, None, None


def _kl_terms(teacher: Tensor, student: Tensor) -> Tensor:
    """Elementwise ``p * (log p - log q)`` with p = 0 categories contributing exactly 0.

    Both ``where``s matter: the inner one keeps ``0 * inf`` out of the forward, the outer one
    gives zero gradient to absent categories even where the student's log-prob is -inf.
    """
    present = ~teacher.isneginf()
    log_p = torch.where(present, teacher, 0.0)
    return torch.where(present, log_p.exp() * (log_p - student), 0.0)


def _log_normalize(x: Tensor) -> Tensor:
    """``log_softmax`` over the last dim that maps an all -inf row to all -inf (not NaN)."""
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    return x - lse.masked_fill(lse.isneginf(), 0.0)


def _log_normalize_on(x: Tensor, on: Tensor) -> Tensor:
    """``x`` renormalised over the ``on`` entries of the last dim, -inf elsewhere; a row with no
    ``on`` entry is all -inf, with zero (not NaN) gradient."""
    any_on = on.any(-1, keepdim=True)
    x = torch.where(on, x, -math.inf).where(any_on, 0.0)  # empty rows: a finite stand-in
    return torch.where(on, x - torch.logsumexp(x, dim=-1, keepdim=True), -math.inf)


def _compute_dtype(logits: Tensor) -> torch.dtype:
    """float32, or float64 for float64 logits: the dtype every loss computes in."""
    return torch.promote_types(logits.dtype, torch.float32)


def _log_softmax_at(logits: Tensor, temperature: float) -> Tensor:
    """float32 (float64 stays float64) log-softmax of ``logits / temperature`` over the vocab."""
    x = logits.to(_compute_dtype(logits))
    if temperature != 1.0:
        x = x / temperature
    return torch.log_softmax(x, dim=-1)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over ``mask``; 0 (attached to the graph) when nothing is unmasked.

    Computed without indexing so that it never syncs with the device.
    """
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def _check_args(
    tail: str, temperature: float, loss: str = DEFAULT_LOSS, beta: float = DEFAULT_BETA
) -> None:
    if tail not in TAIL_MODES:
        raise ValueError(f"unknown tail mode {tail!r}; expected one of: {', '.join(TAIL_MODES)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of: {', '.join(LOSSES)}")
    if not 0.0 <= beta <= 1.0:  # NaN fails too
        raise ValueError(
            f"beta must be in [0, 1] (gjsd: 0 is forward KL, 1 reverse KL), got {beta!r}"
        )


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")


def _check_shapes(
    student_logits: Tensor, labels: Tensor, target_ids: Tensor, target_logprobs: Tensor
) -> None:
    lead = tuple(labels.shape)
    if (
        tuple(student_logits.shape[:-1]) != lead
        or tuple(target_ids.shape[:-1]) != lead
        or target_ids.shape != target_logprobs.shape
    ):
        raise ValueError(
            "shape mismatch: expected student_logits (*L, V), labels (*L), target_ids and "
            f"target_logprobs (*L, K); got {tuple(student_logits.shape)}, {lead}, "
            f"{tuple(target_ids.shape)}, {tuple(target_logprobs.shape)}"
        )
