"""The fused loss: the student's output layer, CE and the sparse KD of `trainer.losses` in one
chunked pass that never builds the (B, T, V) logits (``trainer fit --fused-loss``).

Why. With a 128k-256k vocabulary the unfused step's memory peak is the logits and what their
loss keeps: the (B, T, V) logits, their float32 log-softmax (saved for the backward) and, in
the backward, their gradients; each is B*T*V floats, 1 GiB at 2048 positions x 131072. The
hidden states that the output layer reads are V / H times smaller.

How. `fused_distillation_loss(hidden, weight, bias, labels, target_ids, target_logprobs)`
equals `trainer.losses.distillation_loss(hidden @ weight.T + bias, labels, ...)`: every tail,
every ``--loss``, any temperature, the same masks and padding rules (tested equal, forward and
gradients, in tests/trainer/test_fused.py). The positions are taken a chunk of rows at a time:

1. logits = h @ W^T + b in float32, (chunk, V);
2. their log-softmax at the label, the target ids and, for ``bucket``, the tail, without a
   dense log-softmax (`trainer.losses._gather_log_softmax`, the function behind the unfused
   bucket tail too); at T != 1 also the label's at T=1;
3. CE and the divergence on those few columns, with `trainer.losses`' own code (`_targets`,
   `_divergence`), under a small autograd graph that gives d loss / d (gathered log-probs);
4. d loss / d logits analytically (`_gather_log_softmax_grad`), then grad_h = g @ W and
   grad_W += g^T @ h; the chunk is freed.

So the peak is O(chunk * V) (`DEFAULT_CHUNK_ELEMENTS` logits per chunk by default), not
O(B * T * V). The gradients are computed in the forward, as Liger-Kernel's fused linear losses
do: the loss is a scalar, so its backward only scales them by the incoming gradient (1, or
`fit`'s data-parallel rescaling). That is three matrix products per chunk, as unfused, and no
recomputation; the price is holding grad_W (the size of W) and grad_h (the size of the hidden
states) from the forward to the backward. Without gradients (``torch.no_grad``, or inputs that
need none) only the loss is computed. Liger's fused distillation losses take a teacher's
hidden states and head (a teacher in the loop); this one takes the cached sparse targets.

The head's product runs in float32 (float64 stays float64), whatever the hidden states' dtype
and any autocast: under ``--precision bf16`` the fused head is more precise than the unfused
bf16 one (and, on a GPU, slower).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.losses import (
    DEFAULT_BETA,
    DEFAULT_LOSS,
    DEFAULT_TAIL,
    LossParts,
    _check_alpha,
    _check_args,
    _divergence,
    _gather_log_softmax,
    _gather_log_softmax_grad,
    _Gathered,
    _student_support,
    _Targets,
    _targets,
)

#: Logits per chunk when no chunk size is given (64 MiB of float32): 128 rows at V = 131072.
DEFAULT_CHUNK_ELEMENTS = 2**24

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "FusedDistillationLoss", "fused_distillation_loss"]


@dataclass(frozen=True)
class FusedDistillationLoss:
    """`trainer.losses.DistillationLoss` computed inside the output layer: called with the
    student's last hidden states (B, T, H), its output layer's ``weight`` (V, H) and ``bias``
    (V,) or None, and the batch. ``alpha`` 1 is hard-label CE alone (the cached targets are then
    never read); ``chunk_size``: rows per chunk (None: `DEFAULT_CHUNK_ELEMENTS` logits). Invalid
    settings raise `ValueError` here, not at the first step."""

    alpha: float = 0.5
    temperature: float = 1.0
    tail: str = DEFAULT_TAIL
    loss: str = DEFAULT_LOSS
    beta: float = DEFAULT_BETA  # gjsd only
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        _check_args(self.tail, self.temperature, self.loss, self.beta)
        _check_alpha(self.alpha)
        _check_chunk(self.chunk_size)

    def __call__(
        self, hidden: Tensor, weight: Tensor, bias: Tensor | None, batch: Mapping[str, Tensor]
    ) -> LossParts:
        hard = self.alpha == 1.0
        return fused_distillation_loss(
            hidden, weight, bias, batch["labels"],
            None if hard else batch["target_ids"], None if hard else batch["target_logprobs"],
            alpha=self.alpha, temperature=self.temperature, tail=self.tail, loss=self.loss,
            beta=self.beta, chunk_size=self.chunk_size,
        )  # fmt: skip


def fused_distillation_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    target_ids: Tensor | None,
    target_logprobs: Tensor | None,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    tail: str = DEFAULT_TAIL,
    loss: str = DEFAULT_LOSS,
    beta: float = DEFAULT_BETA,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> LossParts:
    """``distillation_loss(F.linear(hidden, weight, bias), labels, target_ids, target_logprobs,
    ...)`` without the (B, T, V) logits (see the module docstring).

    hidden (B, T, H) any float dtype (any number of leading dims); weight (V, H); bias (V,) or
    None; labels (B, T) with ``ignore_index`` masking positions; target_ids and
    target_logprobs (B, T, K) as in `distillation_loss`, or both None: hard-label CE alone
    (``loss`` = CE, ``kd`` 0, as `hard_label_loss`). Gradients flow to ``hidden``, ``weight``
    and ``bias``, in their dtypes.
    """
    _check_args(tail, temperature, loss, beta)
    _check_alpha(alpha)
    _check_chunk(chunk_size)
    _check_shapes(hidden, weight, bias, labels, target_ids, target_logprobs)
    dtype = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
    width, vocab = hidden.shape[-1], weight.shape[0]
    rows = labels.numel()
    labels = labels.reshape(rows)
    mask = labels != ignore_index  # (N,)
    targets = None
    if target_ids is not None and target_logprobs is not None:
        targets = _targets(
            labels, target_ids.reshape(rows, -1), target_logprobs.reshape(rows, -1),
            temperature, tail, ignore_index, dtype,
        )  # fmt: skip
    grad = torch.is_grad_enabled()
    plan = _Plan(
        mask=mask, label=torch.where(mask, labels, 0).long().unsqueeze(-1), targets=targets,
        alpha=1.0 if targets is None else alpha, temperature=temperature, tail=tail, loss=loss, beta=beta, dtype=dtype,
        rows=chunk_size or max(1, DEFAULT_CHUNK_ELEMENTS // max(vocab, 1)),
        grad_hidden=grad and hidden.requires_grad, grad_weight=grad and weight.requires_grad,
        grad_bias=grad and bias is not None and bias.requires_grad,
    )  # fmt: skip
    total, ce, kd = _FusedLinearLoss.apply(hidden.reshape(rows, width), weight, bias, plan)
    return LossParts(loss=total, ce=ce, kd=kd)


# --------------------------------------------------------------------------------------------
# The algorithm


@dataclass(frozen=True)
class _Plan:
    """Everything a chunk needs besides its hidden states (N = every position)."""

    mask: Tensor  # (N,) bool: the positions that count
    label: Tensor  # (N, 1) the label, masked positions parked on id 0
    targets: _Targets | None  # None: hard-label CE only
    alpha: float
    temperature: float
    tail: str
    loss: str
    beta: float
    dtype: torch.dtype  # float32 or float64: what the head and the loss compute in
    rows: int  # positions per chunk
    grad_hidden: bool
    grad_weight: bool
    grad_bias: bool

    @property
    def grad(self) -> bool:
        return self.grad_hidden or self.grad_weight or self.grad_bias


class _FusedLinearLoss(torch.autograd.Function):
    """(hidden (N, H), weight (V, H), bias (V,) | None, plan) -> (loss, ce, kd), 0-dim; the
    gradients are computed in the forward (`_run`) and scaled in the backward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, plan: _Plan):
        with torch.autocast(hidden.device.type, enabled=False):
            (ce, kd), grads = _run(hidden, weight, bias, plan)
        total = plan.alpha * ce + (1.0 - plan.alpha) * plan.temperature**2 * kd
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(ce, kd)
        return total, ce, kd

    @staticmethod
    def backward(ctx, grad_total: Tensor, _ce: Tensor, _kd: Tensor):
        def scaled(g: Tensor | None) -> Tensor | None:
            return None if g is None else g * grad_total.to(g.dtype)

        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return scaled(grad_hidden), scaled(grad_weight), scaled(grad_bias), None


def _run(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, p: _Plan
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor | None, Tensor | None, Tensor | None]]:
    """(ce, kd) means over the unmasked positions, and d loss / d (hidden, weight, bias)."""
    w = weight.detach().to(p.dtype)  # (V, H)
    b = None if bias is None else bias.detach().to(p.dtype)  # (V,)
    h_all = hidden.detach()
    g_hidden = None
    if p.grad_hidden:
        g_hidden = torch.empty(h_all.shape, dtype=p.dtype, device=h_all.device)  # (N, H)
    g_weight = torch.zeros_like(w) if p.grad_weight else None
    g_bias = torch.zeros_like(b) if p.grad_bias and b is not None else None
    count = p.mask.sum().clamp(min=1).to(p.dtype)
    ce_sum = torch.zeros((), dtype=p.dtype, device=h_all.device)
    kd_sum = torch.zeros((), dtype=p.dtype, device=h_all.device)
    for lo in range(0, h_all.shape[0], p.rows):
        rows = slice(lo, lo + p.rows)
        h = h_all[rows].to(p.dtype)  # (c, H)
        logits = F.linear(h, w, b)  # (c, V), the chunk's only dense tensors: this ...
        ce, kd, g_logits = _chunk(logits, rows, count, p)  # ... and, at T != 1, one more
        ce_sum += ce
        kd_sum += kd
        if g_logits is None:
            continue
        if g_hidden is not None:
            torch.mm(g_logits, w, out=g_hidden[rows])
        if g_weight is not None:
            g_weight.addmm_(g_logits.t(), h)
        if g_bias is not None:
            g_bias += g_logits.sum(0)
    grads = (
        None if g_hidden is None else g_hidden.to(hidden.dtype),
        None if g_weight is None else g_weight.to(weight.dtype),
        None if g_bias is None or bias is None else g_bias.to(bias.dtype),
    )
    return (ce_sum / count, kd_sum / count), grads


def _chunk(
    logits: Tensor, rows: slice, count: Tensor, p: _Plan
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One chunk's CE and divergence sums and d loss / d logits (None without gradients).

    ``logits`` (c, V) is overwritten (it becomes the gradient)."""
    t, temp = p.targets, p.temperature
    mask = p.mask[rows]  # (c,)
    if t is None:  # CE only: the label's log-prob
        ids, in_tail = p.label[rows], None
    else:
        ids = t.gather_ids[rows]  # (c, 1+K)
        in_tail = None if t.in_tail is None else t.in_tail[rows]  # (c, 1+K+1)
    at_one = None  # the label's log-softmax at T=1, when the rest is at T
    if t is not None and temp != 1.0:
        at_one = _gather_log_softmax(logits, p.label[rows])  # its own (c, V) buffer
        logits.div_(temp)
    s = _gather_log_softmax(logits, ids, in_tail, inplace=True)  # (c, V) overwritten

    with torch.enable_grad():
        out = s.out.detach().requires_grad_(p.grad)  # (c, 1+K[+1]) gathered log-probs
        one = None if at_one is None else at_one.out.detach().requires_grad_(p.grad)
        label_logprob = (out if one is None else one)[:, 0]  # (c,)
        ce = torch.where(mask, -label_logprob, 0.0).sum()
        kd = torch.zeros((), dtype=ce.dtype, device=ce.device)
        if t is not None:
            div = _divergence(t.teacher[rows], _student_support(out, p.tail), p.loss, p.beta)
            kd = torch.where(mask, div, 0.0).sum()
        if not p.grad:
            return ce.detach(), kd.detach(), None
        total = (p.alpha * ce + (1.0 - p.alpha) * temp**2 * kd) / count
        wrt = [out] if one is None else [out, one]
        grads = torch.autograd.grad(total, wrt, allow_unused=True)
    g_logits = _grad(s, grads[0], out)
    if one is not None:
        assert at_one is not None
        g_logits.div_(temp).add_(_grad(at_one, grads[1], one))
    return ce.detach(), kd.detach(), g_logits


def _grad(s: _Gathered, g: Tensor | None, out: Tensor) -> Tensor:
    """d loss / d logits of one gather, over its own buffer."""
    return _gather_log_softmax_grad(s, torch.zeros_like(out) if g is None else g, inplace=True)


def _check_chunk(chunk_size: int | None) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size!r}")


def _check_shapes(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    target_ids: Tensor | None,
    target_logprobs: Tensor | None,
) -> None:
    lead = tuple(labels.shape)
    problems = []
    if tuple(hidden.shape[:-1]) != lead:
        problems.append(f"hidden {tuple(hidden.shape)} must be labels' shape {lead} plus (H,)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        problems.append(f"weight {tuple(weight.shape)} must be (V, H={hidden.shape[-1]})")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        problems.append(f"bias {tuple(bias.shape)} must be (V={weight.shape[0]},)")
    if (target_ids is None) != (target_logprobs is None):
        problems.append("target_ids and target_logprobs must both be given or both be None")
    elif (
        target_ids is not None
        and target_logprobs is not None
        and (tuple(target_ids.shape[:-1]) != lead or target_ids.shape != target_logprobs.shape)
    ):
        problems.append(
            f"target_ids {tuple(target_ids.shape)} and target_logprobs "
            f"{tuple(target_logprobs.shape)} must both be labels' shape {lead} plus (K,)"
        )
    if problems:
        raise ValueError("shape mismatch: " + "; ".join(problems))
