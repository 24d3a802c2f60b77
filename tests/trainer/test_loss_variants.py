"""The divergences of `trainer.losses.LOSSES` (``--loss``) against dense references built here.

The reference is independent of the implementation: per position it writes down the teacher's
categories as a dense float64 vector (over the vocabulary for renorm and label, over the K ids
plus the tail bucket for bucket), the student's full distribution in the same space, and
applies the textbook formula. The one documented deviation, reverse KL's student conditioned on
the teacher's support, is written out explicitly.
"""

from __future__ import annotations

import math

import pytest
import torch

from trainer.losses import (
    DEFAULT_BETA,
    DEFAULT_LOSS,
    LOSSES,
    TAIL_FLOOR,
    TAIL_MODES,
    DistillationLoss,
    dense_divergence,
    dense_kd_loss,
    distillation_loss,
    sparse_kd_loss,
)

IGNORE = -100
V, K, N_SAMPLES = 40, 6, 16
BETA = 0.3  # asymmetric: a swapped gjsd convention gives another number
TEMPERATURES = (0.5, 1.0, 2.0)


# ---------------------------------------------------------------------------------------------
# Targets: top-k with padding slots and a fully padded position, or sampled counts / N


def make_targets(case: str, seed: int = 0):
    """float64 (student logits, teacher logits, labels, target ids, target log-probs).

    Both cases mask two positions, pad every position with ``-inf`` slots whose ids are junk
    (-1, beyond the vocabulary, a copy of a real id), shuffle the slots, and take labels both
    among the target ids (odd positions) and outside them (even positions)."""
    g = torch.Generator().manual_seed(seed)
    b, t = 2, 6
    student = 2.0 * torch.randn(b, t, V, generator=g, dtype=torch.float64)
    teacher = 3.0 * torch.randn(b, t, V, generator=g, dtype=torch.float64)
    full = torch.log_softmax(teacher, -1)  # (B, T, V)
    if case == "topk":
        logp, ids = full.topk(K, dim=-1)  # (B, T, K)
        real = [[ids[i, j].tolist() for j in range(t)] for i in range(b)]
        slots = [[list(zip(real[i][j], logp[i, j].tolist(), strict=True)) for j in range(t)]
                 for i in range(b)]  # fmt: skip
    else:  # sampled: N draws from the teacher, distinct ids with log(count / N)
        slots = []
        for i in range(b):
            row = []
            for j in range(t):
                draws = torch.multinomial(full[i, j].exp(), N_SAMPLES, True, generator=g)
                found, counts = draws.unique(return_counts=True)
                row.append([(int(v), math.log(c / N_SAMPLES)) for v, c in
                            zip(found.tolist(), counts.tolist(), strict=True)])  # fmt: skip
            slots.append(row)
    width = max(len(s) for row in slots for s in row) + 3
    ids = torch.zeros(b, t, width, dtype=torch.long)
    logprobs = torch.full((b, t, width), -math.inf, dtype=torch.float64)
    labels = torch.empty(b, t, dtype=torch.long)
    for i in range(b):
        for j in range(t):
            real = slots[i][j]
            if case == "topk" and (i, j) == (1, 4):
                real = []  # a fully padded, unmasked position: no support at all
            pad = [(-1, -math.inf), (V + 5, -math.inf), (slots[i][j][0][0], -math.inf)]
            cells = real + pad + [(-1, -math.inf)] * (width - len(real) - len(pad))
            order = torch.randperm(width, generator=g).tolist()
            for slot, k in enumerate(order):
                ids[i, j, slot], logprobs[i, j, slot] = cells[k]
            taken = {v for v, _ in slots[i][j]}
            if j % 2:
                labels[i, j] = slots[i][j][-1][0]
            else:
                labels[i, j] = next(v for v in range(V) if v not in taken)
    labels[:, 0] = IGNORE
    labels[1, 3] = IGNORE
    return student, teacher, labels, ids, logprobs


# ---------------------------------------------------------------------------------------------
# The reference


def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum a log(a / b) over a > 0 (0 log 0 = 0)."""
    m = a > 0
    return (a[m] * (a[m].log() - b[m].log())).sum()


def textbook(p: torch.Tensor, q: torch.Tensor, loss: str, beta: float) -> torch.Tensor:
    """D(p, q) for two distributions over the same categories, each summing to 1."""
    if loss == "forward_kl" or (loss == "gjsd" and beta == 0.0):
        return kl(p, q)
    if loss == "reverse_kl" or (loss == "gjsd" and beta == 1.0):
        on_support = q * (p > 0)  # documented: the student conditioned on the support
        return kl(on_support / on_support.sum(), p)
    if loss == "tvd":
        return 0.5 * (p - q).abs().sum()
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def reference(student_logits, labels, ids, logprobs, *, loss, beta, temperature, tail):
    """Mean over unmasked positions of `textbook` on the dense teacher of each position."""
    q_all = torch.softmax(student_logits / temperature, dim=-1)  # (B, T, V) float64
    total, n = q_all.new_zeros(()), 0
    for i in range(labels.shape[0]):
        for j in range(labels.shape[1]):
            y = int(labels[i, j])
            if y == IGNORE:
                continue
            n += 1
            probs = {
                int(v): math.exp(lp)
                for v, lp in zip(ids[i, j].tolist(), logprobs[i, j].tolist(), strict=True)
                if lp != -math.inf
            }
            rest = 1.0 - sum(probs.values())
            rest = rest if rest > TAIL_FLOOR else 0.0  # the documented floor
            q = q_all[i, j]
            if tail == "bucket":
                cats = list(probs)
                off = torch.ones(V, dtype=torch.bool)
                off[cats] = False
                p1 = torch.tensor([*probs.values(), rest], dtype=torch.float64)
                qc = torch.cat([q[cats], q[off].sum()[None]])  # (K+1,) the partition
            else:
                if tail == "label" and rest > 0:
                    probs[y] = probs.get(y, 0.0) + rest
                p1 = torch.zeros(V, dtype=torch.float64)
                for v, p in probs.items():
                    p1[v] = p
                qc = q  # (V,) zero teacher mass off the categories
            if not p1.any():
                continue  # no target at this position: contributes 0
            p = p1 ** (1.0 / temperature)  # re-tempered over the support
            total = total + textbook(p / p.sum(), qc, loss, beta)
    return total / max(n, 1)


def grad_of(value, x):
    (g,) = torch.autograd.grad(value, x)
    return g


# ---------------------------------------------------------------------------------------------
# Every loss x tail x temperature x kind of target


@pytest.mark.parametrize("case", ["topk", "sampled"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("tail", TAIL_MODES)
@pytest.mark.parametrize("loss", LOSSES)
def test_sparse_matches_dense_reference(loss, tail, temperature, case):
    student, _, labels, ids, logprobs = make_targets(case, seed=len(loss) + len(tail))
    student.requires_grad_(True)
    kw = {"loss": loss, "beta": BETA, "temperature": temperature, "tail": tail}

    got = sparse_kd_loss(student, labels, ids, logprobs, **kw)
    want = reference(student, labels, ids, logprobs, **kw)

    assert got.dtype == torch.float64 and torch.isfinite(got)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)
    g_got, g_want = grad_of(got, student), grad_of(want, student)
    assert torch.isfinite(g_got).all()
    torch.testing.assert_close(g_got, g_want, atol=1e-10, rtol=1e-7)
    assert torch.all(g_got[labels == IGNORE] == 0)


@pytest.mark.parametrize("tail", TAIL_MODES)
def test_each_loss_is_its_own(tail):
    # Guards against a loss silently falling back to another one (and against a test case in
    # which they would all agree).
    student, _, labels, ids, logprobs = make_targets("topk", seed=3)
    values = {
        name: sparse_kd_loss(student, labels, ids, logprobs, loss=name, beta=BETA, tail=tail).item()
        for name in LOSSES
    }
    assert len({round(v, 8) for v in values.values()}) == len(LOSSES), values


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_support_equals_dense_divergence(loss, temperature):
    # K = V (ids in a random order): every tail mode is the dense divergence.
    student, teacher, labels, _, _ = make_targets("topk", seed=4)
    b, t, v = student.shape
    ids = torch.argsort(torch.rand(b, t, v, generator=torch.Generator().manual_seed(5)), dim=-1)
    logprobs = torch.log_softmax(teacher, -1).gather(-1, ids)
    student.requires_grad_(True)
    dense = dense_divergence(student, teacher, labels, loss=loss, beta=BETA,
                             temperature=temperature)  # fmt: skip
    dense_grad = grad_of(dense, student)
    for tail in TAIL_MODES:
        sparse = sparse_kd_loss(student, labels, ids, logprobs, loss=loss, beta=BETA,
                                temperature=temperature, tail=tail)  # fmt: skip
        torch.testing.assert_close(sparse, dense, atol=1e-10, rtol=1e-8)
        torch.testing.assert_close(grad_of(sparse, student), dense_grad, atol=1e-10, rtol=1e-7)


# ---------------------------------------------------------------------------------------------
# gjsd: TRL's convention, its endpoints and its limits


def trl_gjsd(student_logits, teacher_logits, labels, beta, temperature):
    """The generalised JSD as TRL's GKDTrainer defines it, written out densely."""
    q = torch.softmax(student_logits / temperature, -1)
    p = torch.softmax(teacher_logits / temperature, -1)
    m = beta * p + (1 - beta) * q
    d = beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    keep = labels != IGNORE
    return d[keep].mean()


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_dense_gjsd_is_trls(beta):
    student, teacher, labels, _, _ = make_targets("topk", seed=6)
    for temperature in TEMPERATURES:
        got = dense_divergence(student, teacher, labels, loss="gjsd", beta=beta,
                               temperature=temperature)  # fmt: skip
        torch.testing.assert_close(got, trl_gjsd(student, teacher, labels, beta, temperature))


def test_gjsd_endpoints_are_forward_and_reverse_kl_exactly():
    for case in ("topk", "sampled"):
        student, teacher, labels, ids, logprobs = make_targets(case, seed=7)
        for tail in TAIL_MODES:
            for temperature in TEMPERATURES:
                kw = {"tail": tail, "temperature": temperature}
                for beta, same in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
                    a = sparse_kd_loss(student, labels, ids, logprobs, loss="gjsd", beta=beta, **kw)
                    b = sparse_kd_loss(student, labels, ids, logprobs, loss=same, **kw)
                    assert torch.equal(a, b), (case, tail, temperature, beta)
        for beta, same in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
            a = dense_divergence(student, teacher, labels, loss="gjsd", beta=beta)
            assert torch.equal(a, dense_divergence(student, teacher, labels, loss=same))
    forward = dense_divergence(student, teacher, labels, loss="forward_kl")
    assert torch.equal(forward, dense_kd_loss(student, teacher, labels))


def test_gjsd_vanishes_towards_its_endpoints_as_trls_does():
    # The documented discontinuity: gjsd(beta) ~ beta * forward KL near 0 and ~ (1 - beta) *
    # reverse KL near 1 (the mixture is beta * teacher + (1 - beta) * student).
    student, teacher, labels, _, _ = make_targets("topk", seed=8)
    fwd = dense_divergence(student, teacher, labels, loss="forward_kl")
    rev = dense_divergence(student, teacher, labels, loss="reverse_kl")
    eps = 1e-7
    near0 = dense_divergence(student, teacher, labels, loss="gjsd", beta=eps)
    near1 = dense_divergence(student, teacher, labels, loss="gjsd", beta=1 - eps)
    torch.testing.assert_close(near0 / eps, fwd, rtol=1e-3, atol=0)
    torch.testing.assert_close(near1 / eps, rev, rtol=1e-3, atol=0)


def test_bounds():
    # TVD in [0, 1], the symmetric JSD at most log 2, every divergence >= 0, also on the
    # support of the cache.
    student, _, labels, ids, logprobs = make_targets("topk", seed=9)
    for tail in TAIL_MODES:
        for scale in (1.0, 30.0):  # near-one-hot students push towards the bounds
            kw = {"tail": tail}
            tvd = sparse_kd_loss(scale * student, labels, ids, logprobs, loss="tvd", **kw)
            jsd = sparse_kd_loss(scale * student, labels, ids, logprobs, loss="gjsd", **kw)
            assert 0 <= tvd <= 1 and 0 <= jsd <= math.log(2)
            for loss in LOSSES:
                assert sparse_kd_loss(scale * student, labels, ids, logprobs, loss=loss, **kw) >= 0


# ---------------------------------------------------------------------------------------------
# Numerics: masking, padding, half precision, no dense teacher


@pytest.mark.parametrize("tail", TAIL_MODES)
@pytest.mark.parametrize("loss", LOSSES)
def test_all_masked_is_zero_attached_and_finite(loss, tail):
    student, _, labels, ids, logprobs = make_targets("topk", seed=10)
    student = student.float().requires_grad_(True)
    labels = torch.full_like(labels, IGNORE)
    value = sparse_kd_loss(student, labels, ids, logprobs.float(), loss=loss, tail=tail)
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert torch.all(student.grad == 0)
    parts = distillation_loss(student, labels, ids, logprobs.float(), loss=loss, tail=tail,
                              temperature=2.0)  # fmt: skip
    assert parts.loss.item() == parts.ce.item() == parts.kd.item() == 0.0
    parts.loss.backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("tail", TAIL_MODES)
@pytest.mark.parametrize("loss", LOSSES)
def test_padding_slots_equal_removing_them_in_float32(loss, tail):
    # float32, as in training: -inf slots (junk ids included) change nothing, bit for bit up
    # to summation order, and give no NaN gradient.
    student, _, labels, ids, logprobs = make_targets("topk", seed=11)
    student = student.float().requires_grad_(True)
    logprobs = logprobs.float()
    present = ~logprobs.isneginf()
    order = torch.argsort((~present).to(torch.int8), dim=-1, stable=True)  # real slots first
    ids_c, logprobs_c = ids.gather(-1, order)[..., :K], logprobs.gather(-1, order)[..., :K]
    keep = present.any(-1)  # drop the fully padded position from both (it would differ)
    labels_c = torch.where(keep, labels, IGNORE)
    kw = {"loss": loss, "beta": BETA, "tail": tail, "temperature": 2.0}
    got = sparse_kd_loss(student, labels_c, ids, logprobs, **kw)
    want = sparse_kd_loss(student, labels_c, ids_c, logprobs_c, **kw)
    torch.testing.assert_close(got, want)
    g = grad_of(got, student)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, grad_of(want, student))


@pytest.mark.parametrize("loss", LOSSES)
def test_fully_padded_position_contributes_zero(loss):
    # No target at all (renorm, every slot padding): zero divergence, zero finite gradient.
    student, _, labels, ids, logprobs = make_targets("topk", seed=12)
    student = student.float().requires_grad_(True)
    only = torch.full_like(labels, IGNORE)
    only[1, 4] = labels[1, 4]  # the fully padded position
    value = sparse_kd_loss(student, only, ids, logprobs.float(), loss=loss, tail="renorm")
    assert value.item() == 0.0
    g = grad_of(value, student)
    assert torch.isfinite(g).all() and torch.all(g == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss", LOSSES)
def test_half_precision_logits_compute_in_float32(loss, dtype):
    student, _, labels, ids, logprobs = make_targets("sampled", seed=13)
    student = student.to(dtype).requires_grad_(True)
    kw = {"loss": loss, "tail": "bucket", "temperature": 2.0}
    value = sparse_kd_loss(student, labels, ids, logprobs.float(), **kw)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    torch.testing.assert_close(
        value, sparse_kd_loss(student.float(), labels, ids, logprobs.float(), **kw)
    )
    g = grad_of(value, student)
    assert g.dtype == dtype and torch.isfinite(g).all()


def dense_saved_for_backward(fn) -> int:
    """How many distinct (B, T, V)-sized tensors `fn`'s graph keeps for its backward."""
    storages = set()

    def pack(x):
        if x.dim() == 3 and x.shape[-1] == V:
            storages.add(x.untyped_storage().data_ptr())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return len(storages)


@pytest.mark.parametrize("tail", TAIL_MODES)
def test_no_dense_teacher_is_kept(tail):
    # Each divergence keeps exactly what forward KL keeps: the student's log-softmax.
    student, _, labels, ids, logprobs = make_targets("topk", seed=14)
    student = student.float().requires_grad_(True)
    logprobs = logprobs.float()
    counts = {
        loss: dense_saved_for_backward(
            lambda loss=loss: sparse_kd_loss(student, labels, ids, logprobs, loss=loss, tail=tail)
        )
        for loss in LOSSES
    }
    assert counts == dict.fromkeys(LOSSES, 1), counts


# ---------------------------------------------------------------------------------------------
# distillation_loss, DistillationLoss and the arguments


@pytest.mark.parametrize("loss", LOSSES)
def test_distillation_loss_mixes_the_chosen_divergence(loss):
    student, _, labels, ids, logprobs = make_targets("topk", seed=15)
    student = student.float().requires_grad_(True)
    logprobs = logprobs.float()
    kw = {"loss": loss, "beta": BETA, "tail": "bucket", "temperature": 2.0}
    parts = distillation_loss(student, labels, ids, logprobs, alpha=0.25, **kw)
    kd = sparse_kd_loss(student, labels, ids, logprobs, **kw)
    torch.testing.assert_close(parts.kd, kd.detach())
    torch.testing.assert_close(parts.loss, 0.25 * parts.ce + 0.75 * 4.0 * kd)
    batch = {"labels": labels, "target_ids": ids, "target_logprobs": logprobs}
    via_module = DistillationLoss(alpha=0.25, **kw)(student, batch)
    assert torch.equal(via_module.loss, parts.loss)


@pytest.mark.parametrize("beta", [-0.1, 1.5, float("nan"), float("inf")])
def test_beta_outside_the_unit_interval_is_refused(beta):
    student, teacher, labels, ids, logprobs = make_targets("topk")
    calls = [
        lambda: sparse_kd_loss(student, labels, ids, logprobs, loss="gjsd", beta=beta),
        lambda: distillation_loss(student, labels, ids, logprobs, loss="gjsd", beta=beta),
        lambda: dense_divergence(student, teacher, labels, loss="gjsd", beta=beta),
        lambda: DistillationLoss(loss="gjsd", beta=beta),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"beta must be in \[0, 1\].*forward KL.*reverse KL"):
            call()


def test_unknown_loss_is_refused_with_the_known_ones():
    student, teacher, labels, ids, logprobs = make_targets("topk")
    calls = [
        lambda: sparse_kd_loss(student, labels, ids, logprobs, loss="js"),
        lambda: distillation_loss(student, labels, ids, logprobs, loss="js"),
        lambda: dense_divergence(student, teacher, labels, loss="js"),
        lambda: DistillationLoss(loss="js"),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="unknown loss 'js'") as info:
            call()
        assert all(name in str(info.value) for name in LOSSES)


def test_one_default_loss_and_beta_everywhere():
    import inspect

    from trainer import FitConfig
    from trainer import config as trainer_config

    assert (DEFAULT_LOSS, DEFAULT_BETA) == ("forward_kl", 0.5)
    assert trainer_config.LOSSES is LOSSES  # one definition
    c = FitConfig(cache="", student="")
    assert (c.loss, c.beta) == (DEFAULT_LOSS, DEFAULT_BETA)
    assert (DistillationLoss().loss, DistillationLoss().beta) == (DEFAULT_LOSS, DEFAULT_BETA)
    for fn in (sparse_kd_loss, distillation_loss, dense_divergence):
        params = inspect.signature(fn).parameters
        assert params["loss"].default == DEFAULT_LOSS and params["beta"].default == DEFAULT_BETA
