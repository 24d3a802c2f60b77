"""Knowledge-distillation losses computed from cached sparse teacher targets.

The cache stores, for every token position, K vocabulary ids and their teacher log-probabilities
at temperature 1, normalised over the *full* vocabulary: ``sum(exp(target_logprobs)) <= 1`` and
the leftover is the teacher's tail mass outside the K ids. These losses never build a dense
(B, T, V) teacher tensor; the only dense tensor is the student's own log-softmax, which
hard-label training computes anyway.

Everything here is forward KL(teacher_T || student_T) averaged over unmasked positions. The K
ids alone do not define a distribution, so ``tail`` picks how the missing mass is handled:

``"renorm"``
    Classic top-k KD. Teacher probabilities over the K ids are renormalised to sum to 1; the
    student keeps its full-vocabulary log-softmax. The student's mass off the K ids is only
    penalised through normalisation, and the teacher's tail mass is thrown away.
``"bucket"``
    The vocabulary is split into K+1 categories: the K ids plus one "tail" bucket holding
    everything else. Teacher tail = ``1 - sum p_k``; student tail = the student's probability
    summed over every id not among the K. Exact KL over that partition; with K = V it is dense
    KL.
``"label"``
    The teacher's tail mass is added to the hard label: to its slot if the label is among the K
    ids, otherwise as one more category at the label id. KL over that support.

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
must be distinct and in ``[0, V)``.

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
#: The tail mode when none is given: renorm gave the lowest held-out KL at every k in
#: benchmarks/bench_fidelity.py, and it is the cheapest (one gather on the CE log-softmax).
DEFAULT_TAIL = "renorm"

# Teacher tail masses at or below this are rounding noise of the stored log-probs (see above).
TAIL_FLOOR = 1e-5


class LossParts(NamedTuple):
    """``loss`` carries the graph; ``ce`` and ``kd`` are detached 0-dim tensors for logging.

    They stay tensors (not floats) so that logging does not force a device sync every step.
    ``kd`` is the KL at the distillation temperature, *before* the ``T**2`` factor.
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
    hard-label cross-entropy alone (the cached targets are then never read)."""

    alpha: float = 0.5
    temperature: float = 1.0
    tail: str = DEFAULT_TAIL

    def __call__(self, logits: Tensor, batch: Mapping[str, Tensor]) -> LossParts:
        if self.alpha == 1.0:
            return hard_label_loss(logits, batch["labels"])
        return distillation_loss(
            logits, batch["labels"], batch["target_ids"], batch["target_logprobs"],
            alpha=self.alpha, temperature=self.temperature, tail=self.tail,
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
    ignore_index: int = -100,
) -> Tensor:
    """Mean over unmasked positions of KL(teacher_T || student_T) on the support set by ``tail``.

    student_logits (B, T, V) any float dtype, computed in (at least) float32; labels (B, T)
    int64 with ``ignore_index`` masking positions; target_ids (B, T, K) int64; target_logprobs
    (B, T, K) teacher log-probs at T=1 over the full vocabulary (``-inf`` marks padding). For
    sampled targets pass ``log(counts / N)``: the tail mass is then zero and every mode agrees.

    Returns a 0-dim tensor; 0 (still attached to the graph) when every position is masked.
    Multiply by ``temperature**2`` yourself to keep gradient scale independent of T, or use
    :func:`distillation_loss`.
    """
    _check_args(tail, temperature)
    _check_shapes(student_logits, labels, target_ids, target_logprobs)
    student = _log_softmax_at(student_logits, temperature)  # (B, T, V)
    kl, _, mask = _sparse_kl(
        student, labels, target_ids, target_logprobs, temperature, tail, ignore_index
    )
    return _masked_mean(kl, mask)


def dense_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> Tensor:
    """Reference forward KL(softmax(teacher/T) || softmax(student/T)), mean over unmasked positions.

    Builds the full (B, T, V) teacher distribution: for tests and online-distillation baselines,
    not for training from the cache. The teacher is detached (it is a frozen target). ``-inf``
    teacher logits (e.g. padded vocabulary rows) are zero-probability and contribute nothing.
    """
    _check_args("renorm", temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    student = _log_softmax_at(student_logits, temperature)  # (B, T, V)
    teacher = _log_softmax_at(teacher_logits.detach(), temperature)  # (B, T, V)
    kl = _kl_terms(teacher, student).sum(-1)  # (B, T)
    return _masked_mean(kl, labels != ignore_index)


def distillation_loss(
    student_logits: Tensor,
    labels: Tensor,
    target_ids: Tensor,
    target_logprobs: Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    tail: str = DEFAULT_TAIL,
    ignore_index: int = -100,
) -> LossParts:
    """``loss = alpha * CE + (1 - alpha) * T**2 * KD`` from cached sparse targets.

    The T**2 factor keeps the KD gradient scale independent of T (Hinton et al., 2015). Cost is
    what matters here: training from the cache should be barely slower than hard-label
    training, whose loss is one float32 log-softmax over (B, T, V) plus a gather. So at T=1
    the log-softmax is computed once and shared, and the label is gathered in the same call
    as the K target ids; CE is read off that gather rather than calling ``F.cross_entropy``
    (which would redo the log-softmax). At T != 1 a second log-softmax (of logits / T) is
    unavoidable. Masking and the all-masked case (returns 0) behave as in ``sparse_kd_loss``.
    """
    _check_args(tail, temperature)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    _check_shapes(student_logits, labels, target_ids, target_logprobs)

    logprobs = _log_softmax_at(student_logits, 1.0)  # (B, T, V), the only one at T=1
    if temperature == 1.0:
        kl, label_logprob, mask = _sparse_kl(
            logprobs, labels, target_ids, target_logprobs, 1.0, tail, ignore_index
        )
    else:
        student_t = _log_softmax_at(student_logits, temperature)  # (B, T, V)
        kl, _, mask = _sparse_kl(
            student_t, labels, target_ids, target_logprobs, temperature, tail, ignore_index
        )
        safe_labels = torch.where(mask, labels, 0).long().unsqueeze(-1)  # (B, T, 1)
        label_logprob = logprobs.gather(-1, safe_labels).squeeze(-1)  # (B, T)
    ce = _masked_mean(-label_logprob, mask)
    kd = _masked_mean(kl, mask)
    loss = alpha * ce + (1.0 - alpha) * temperature**2 * kd
    return LossParts(loss=loss, ce=ce.detach(), kd=kd.detach())


# --------------------------------------------------------------------------------------------
# The algorithm


def _sparse_kl(
    student: Tensor,
    labels: Tensor,
    target_ids: Tensor,
    target_logprobs: Tensor,
    temperature: float,
    tail: str,
    ignore_index: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-position KL over the sparse support, the student's label log-prob, and the mask.

    ``student`` is the student's log-softmax at ``temperature`` (B, T, V). Returns kl (B, T),
    label_logprob (B, T) (the student's log-prob of the label, read from the same gather as the
    target ids; it is CE at T=1) and mask (B, T) bool.
    """
    mask = labels != ignore_index  # (B, T)
    label = torch.where(mask, labels, 0).long().unsqueeze(-1)  # (B, T, 1) always a valid index
    logp = target_logprobs.detach().to(student.dtype)  # (B, T, K) teacher at T=1
    present = ~logp.isneginf()  # (B, T, K) False on padding slots
    ids = torch.where(present, target_ids, 0).long()  # (B, T, K) junk padding ids -> 0

    # Student log-probs on the support: one gather for [label, ids] (and the tail, for bucket).
    gather_ids = torch.cat([label, ids], dim=-1)  # (B, T, 1+K)
    if tail == "bucket":
        leaves_tail = torch.cat([torch.zeros_like(label, dtype=torch.bool), present], dim=-1)
        gathered = _GatherWithTail.apply(student, gather_ids, leaves_tail)  # (B, T, 1+K+1)
        student_support = gathered[..., 1:]  # (B, T, K+1): ids, then tail
    else:
        gathered = student.gather(-1, gather_ids)  # (B, T, 1+K)
        # renorm: the K ids; label: [label, ids] (the label slot is used only if needed).
        student_support = gathered[..., 1:] if tail == "renorm" else gathered
    label_logprob = gathered[..., 0]  # (B, T)

    # Teacher log-probs at T=1 on the same support, in the same slot order.
    if tail == "renorm":
        teacher = logp  # (B, T, K)
    else:
        # float64: the tail is a small difference of O(1) numbers.
        rest = (1.0 - logp.double().exp().sum(-1, keepdim=True)).clamp_min(0.0)  # (B, T, 1)
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
    kl = _kl_terms(teacher, student_support).sum(-1)  # (B, T)
    return kl, label_logprob, mask


class _GatherWithTail(torch.autograd.Function):
    """``[logprobs.gather(-1, ids), log(sum of exp(logprobs) outside the excluded ids)]``.

    The student's tail log-mass is computed as a logsumexp over a copy of its log-probs with the
    K ids set to -inf, not as ``log1p(-exp(logsumexp(q_k)))``. The latter subtracts
    ``sum q_k`` (known only to ~1e-7 absolute in float32) from 1, so once the student puts all
    but ~1e-6 of its mass on the teacher's ids -- exactly what distillation drives it towards --
    the tail's log is garbage or -inf. Its gradient is worse: d log q_tail / d log q_k =
    -q_k / q_tail is huge, and the log-softmax backward then cancels two such huge numbers. The
    masked logsumexp is exact to relative precision for any tail size, and its gradient
    ``exp(logprob_v - tail)`` is <= 1.

    The price is extra elementwise passes over (B, T, V): masked copy + logsumexp forward,
    recompute + exp backward (renorm/label need none). Being a custom Function buys: no
    second (B, T, V) tensor saved for backward (it is recomputed from the student log-probs,
    which the log-softmax already keeps alive), one dense gradient for gather and tail together
    instead of two plus a sum, and a zero (not NaN) gradient when the tail is empty (K = V).
    """

    @staticmethod
    def forward(ctx, logprobs: Tensor, ids: Tensor, exclude: Tensor) -> Tensor:
        # logprobs (B, T, V); ids (B, T, M); exclude (B, T, M) bool: ids that leave the tail
        penalty = torch.zeros(ids.shape, dtype=logprobs.dtype, device=logprobs.device)
        penalty.masked_fill_(exclude, -math.inf)  # (B, T, M); adding -inf is order-free
        masked = logprobs.scatter_add(-1, ids, penalty)  # (B, T, V), transient
        tail = torch.logsumexp(masked, dim=-1, keepdim=True)  # (B, T, 1)
        ctx.save_for_backward(logprobs, ids, penalty, tail)
        return torch.cat([logprobs.gather(-1, ids), tail], dim=-1)  # (B, T, M+1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None]:
        logprobs, ids, penalty, tail = ctx.saved_tensors
        tail = tail.masked_fill(tail.isneginf(), 0.0)  # empty tail: exp(-inf - 0) = 0, not NaN
        grad = logprobs.scatter_add(-1, ids, penalty)  # (B, T, V) masked copy, recomputed
        grad.sub_(tail).exp_().mul_(grad_out[..., -1:])  # d tail / d logprobs_v
        grad.scatter_add_(-1, ids, grad_out[..., :-1].contiguous())  # the gather's gradient
        return grad, None, None


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


def _log_softmax_at(logits: Tensor, temperature: float) -> Tensor:
    """float32 (float64 stays float64) log-softmax of ``logits / temperature`` over the vocab."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:
        x = x / temperature
    return torch.log_softmax(x, dim=-1)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over ``mask``; 0 (attached to the graph) when nothing is unmasked.

    Computed without indexing so that it never syncs with the device.
    """
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def _check_args(tail: str, temperature: float) -> None:
    if tail not in TAIL_MODES:
        raise ValueError(f"unknown tail mode {tail!r}; expected one of: {', '.join(TAIL_MODES)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")


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
