"""Tests for trainer.losses: sparse KD against explicit dense references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.losses import (
    TAIL_MODES,
    dense_kd_loss,
    distillation_loss,
    sparse_kd_loss,
)

IGNORE = -100


def make_batch(b=2, t=6, v=50, k=8, seed=0, dtype=torch.float32):
    """Student logits, teacher logits, top-k targets, and labels that exercise every case.

    Position 0 of each row is masked; odd positions take a label among the K ids, even ones a
    label outside them (so ``tail="label"`` hits both of its branches).
    """
    g = torch.Generator().manual_seed(seed)
    student = (2.0 * torch.randn(b, t, v, generator=g)).to(dtype)
    teacher = 3.0 * torch.randn(b, t, v, generator=g)
    full = torch.log_softmax(teacher, -1)  # (B, T, V)
    logp, ids = full.topk(k, dim=-1)  # (B, T, K)
    labels = torch.empty(b, t, dtype=torch.long)
    for i in range(b):
        for j in range(t):
            if j % 2:
                labels[i, j] = ids[i, j, int(torch.randint(k, (1,), generator=g))]
            else:
                outside = [x for x in range(v) if x not in set(ids[i, j].tolist())]
                labels[i, j] = outside[int(torch.randint(len(outside), (1,), generator=g))]
    labels[:, 0] = IGNORE
    return student, teacher, ids, logp, labels


def reference_kd(student_logits, labels, ids, logprobs, *, temperature, tail):
    """Independent float64 reference: builds each position's target categories explicitly.

    Teacher probabilities come from ``exp(logprob)``; the tail is ``1 - sum``; the student's
    tail is a dense sum of its probabilities off the ids. Re-tempering is ``p**(1/T)``
    renormalised over the categories. Differentiable w.r.t. ``student_logits``.
    """
    q = torch.softmax(student_logits.double() / temperature, dim=-1)  # (B, T, V)
    v = q.shape[-1]
    total = q.new_zeros(())
    n = 0
    for i in range(labels.shape[0]):
        for j in range(labels.shape[1]):
            y = int(labels[i, j])
            if y == IGNORE:
                continue
            n += 1
            qv = q[i, j]
            probs = {}
            for idx, lp in zip(ids[i, j].tolist(), logprobs[i, j].double().tolist(), strict=True):
                if lp != -math.inf:
                    probs[idx] = math.exp(lp)
            rest = max(0.0, 1.0 - sum(probs.values()))
            cats = [(p, qv[idx]) for idx, p in probs.items()]  # (teacher p at T=1, student q)
            if tail == "bucket":
                off = torch.ones(v, dtype=torch.bool)
                off[list(probs)] = False
                cats.append((rest, qv[off].sum()))
            elif tail == "label":
                probs[y] = probs.get(y, 0.0) + rest
                cats = [(p, qv[idx]) for idx, p in probs.items()]
            weights = [p ** (1.0 / temperature) for p, _ in cats]
            z = sum(weights)
            for w, (_, qc) in zip(weights, cats, strict=True):
                if w > 0:
                    total = total + (w / z) * (math.log(w / z) - torch.log(qc))
    return total / max(n, 1)


def grad_of(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


# ---------------------------------------------------------------------------------------------
# K = V: every mode is dense KL


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("tail", TAIL_MODES)
def test_full_support_equals_dense(tail, temperature):
    student, teacher, _, _, labels = make_batch(v=60, seed=1)
    b, t, v = student.shape
    ids = torch.argsort(torch.rand(b, t, v, generator=torch.Generator().manual_seed(2)), dim=-1)
    logp = torch.log_softmax(teacher, -1).gather(-1, ids)  # (B, T, V) in permuted order
    student.requires_grad_(True)

    dense = dense_kd_loss(student, teacher, labels, temperature=temperature)
    sparse = sparse_kd_loss(student, labels, ids, logp, temperature=temperature, tail=tail)

    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        grad_of(sparse, student), grad_of(dense, student), atol=1e-6, rtol=1e-4
    )


def test_dense_matches_kl_div():
    student, teacher, _, _, labels = make_batch(seed=3)
    n = (labels != IGNORE).sum()
    for temperature in (1.0, 3.0):
        want = (
            F.kl_div(
                torch.log_softmax(student / temperature, -1),
                torch.log_softmax(teacher / temperature, -1),
                log_target=True,
                reduction="none",
            )
            .sum(-1)[labels != IGNORE]
            .sum()
            / n
        )
        got = dense_kd_loss(student, teacher, labels, temperature=temperature)
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------
# K < V: each mode against an explicit reference


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("tail", TAIL_MODES)
def test_topk_matches_reference(tail, temperature):
    student, _, ids, logp, labels = make_batch(seed=4)
    student.requires_grad_(True)

    got = sparse_kd_loss(student, labels, ids, logp, temperature=temperature, tail=tail)
    want = reference_kd(student, labels, ids, logp, temperature=temperature, tail=tail)

    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        grad_of(got, student), grad_of(want, student).float(), atol=1e-6, rtol=1e-4
    )


def test_tail_modes_differ_when_tail_is_heavy():
    # Guards against a mode silently falling back to another one.
    student, _, ids, logp, labels = make_batch(seed=5, k=3)
    losses = [sparse_kd_loss(student, labels, ids, logp, tail=m) for m in TAIL_MODES]
    assert len({round(x.item(), 6) for x in losses}) == len(TAIL_MODES)


@pytest.mark.parametrize("tail", TAIL_MODES)
def test_gradcheck_float64(tail):
    student, _, ids, logp, labels = make_batch(b=1, t=4, v=9, k=3, seed=6)
    logp = logp.double()
    logp[0, 2, 1] = -math.inf  # one padding slot
    student = student.double().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: sparse_kd_loss(s, labels, ids, logp, temperature=1.5, tail=tail), (student,)
    )


def test_bucket_is_stable_when_student_tail_underflows_one_minus_sum():
    # The student puts all but ~1e-16 of its mass on the K ids while the teacher keeps 20% in
    # the tail. 1 - sum(q_k) is 0 in float32, so a log1p(-exp(.)) tail would give inf / NaN.
    v, k = 50, 8
    ids = torch.arange(k).expand(1, 2, k)
    logp = torch.full((1, 2, k), math.log(0.1))  # teacher: 0.1 on each id, 0.2 tail
    labels = torch.tensor([[3, 20]])
    student = torch.zeros(1, 2, v)
    student[..., :k] = 40.0
    student.requires_grad_(True)
    for temperature in (1.0, 2.0):
        got = sparse_kd_loss(student, labels, ids, logp, temperature=temperature, tail="bucket")
        want = reference_kd(student, labels, ids, logp, temperature=temperature, tail="bucket")
        assert torch.isfinite(got)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
        g = grad_of(got, student)
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, grad_of(want, student).float(), atol=1e-6, rtol=1e-4)


def test_bucket_tail_is_exact_far_below_float32_underflow():
    # The student's tail is ~exp(-190): zero as a float32 probability, but the bucket tail is
    # summed in log space, so the loss and its gradient stay finite and exact.
    v, k = 50, 8
    ids = torch.arange(k).expand(1, 2, k)
    logp = torch.full((1, 2, k), math.log(0.1))  # teacher: 0.1 on each id, 0.2 tail
    labels = torch.tensor([[3, 20]])
    student = torch.zeros(1, 2, v)
    student[..., :k] = 200.0
    student.requires_grad_(True)
    got = sparse_kd_loss(student, labels, ids, logp, tail="bucket")
    want = reference_kd(student, labels, ids, logp, temperature=1.0, tail="bucket")
    assert 30 < got.item() < 50
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-6)
    g = grad_of(got, student)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, grad_of(want, student).float(), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_targets_have_no_tail(temperature):
    # log(counts / N): the ids carry all the mass, so every mode is the same KL.
    g = torch.Generator().manual_seed(7)
    student = torch.randn(2, 5, 40, generator=g)
    counts = torch.randint(1, 10, (2, 5, 6), generator=g).float()
    ids = torch.stack([torch.randperm(40, generator=g)[:6] for _ in range(10)]).view(2, 5, 6)
    logp = torch.log(counts / counts.sum(-1, keepdim=True))
    labels = ids[..., 0].clone()
    labels[0, 1] = 39 if 39 not in ids[0, 1] else 38
    losses = [
        sparse_kd_loss(student, labels, ids, logp, temperature=temperature, tail=m)
        for m in TAIL_MODES
    ]
    for other in losses[1:]:
        torch.testing.assert_close(other, losses[0], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Masking and padding


@pytest.mark.parametrize("tail", TAIL_MODES)
def test_masked_positions_do_not_count(tail):
    student, _, ids, logp, labels = make_batch(seed=8)
    labels[1, 3] = IGNORE
    keep = labels != IGNORE
    student.requires_grad_(True)

    loss = sparse_kd_loss(student, labels, ids, logp, tail=tail, temperature=2.0)
    only_kept = sparse_kd_loss(
        student[keep][None],
        labels[keep][None],
        ids[keep][None],
        logp[keep][None],
        tail=tail,
        temperature=2.0,
    )
    torch.testing.assert_close(loss, only_kept)

    grad = grad_of(loss, student)
    assert torch.all(grad[~keep] == 0)

    scrambled = student.detach().clone()
    scrambled[~keep] = 100.0 * torch.randn_like(scrambled[~keep])
    torch.testing.assert_close(
        sparse_kd_loss(scrambled, labels, ids, logp, tail=tail, temperature=2.0), loss
    )


@pytest.mark.parametrize("tail", TAIL_MODES)
def test_all_masked_is_zero_and_backward_works(tail):
    student, _, ids, logp, labels = make_batch(seed=9)
    labels = torch.full_like(labels, IGNORE)
    student.requires_grad_(True)

    loss = sparse_kd_loss(student, labels, ids, logp, tail=tail)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(student.grad == 0)

    parts = distillation_loss(student, labels, ids, logp, tail=tail, temperature=2.0)
    assert parts.loss.item() == 0.0 and parts.ce.item() == 0.0 and parts.kd.item() == 0.0
    parts.loss.backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("tail", TAIL_MODES)
def test_neg_inf_padding_equals_removing_the_slots(tail, temperature):
    student, _, ids, logp, labels = make_batch(seed=10)
    b, t, k = ids.shape
    # Label 0 among the real ids: padding ids are parked on 0 internally, so they must not
    # count as the label.
    if 0 not in ids[0, 3]:
        ids[0, 3, -1] = 0
    labels[0, 3] = 0
    v = student.shape[-1]
    # Padding slots: a copy of a real id, an id not among the real ones, the label (among the
    # real ids or not), and junk ids below and beyond the vocabulary.
    pad_ids = torch.stack(
        [
            ids[..., 2],
            (ids.max(-1).values + 1) % v,
            labels.clamp(min=0),
            torch.full((b, t), -1),
            torch.full((b, t), v + 7),
        ],
        dim=-1,
    )
    n_pad = pad_ids.shape[-1]
    padded_ids = torch.cat([ids, pad_ids], -1)
    padded_logp = torch.cat([logp, torch.full((b, t, n_pad), -math.inf)], -1)
    order = torch.argsort(torch.rand(b, t, k + n_pad, generator=torch.Generator().manual_seed(0)))
    padded_ids, padded_logp = padded_ids.gather(-1, order), padded_logp.gather(-1, order)
    student.requires_grad_(True)

    kw = {"tail": tail, "temperature": temperature}
    got = sparse_kd_loss(student, labels, padded_ids, padded_logp, **kw)
    want = sparse_kd_loss(student, labels, ids, logp, **kw)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad_of(got, student), grad_of(want, student))


@pytest.mark.parametrize("tail", TAIL_MODES)
def test_fully_padded_position_is_finite(tail):
    student, _, ids, logp, labels = make_batch(seed=11)
    logp[1, 2] = -math.inf
    ids[1, 2] = -1
    student.requires_grad_(True)
    loss = sparse_kd_loss(student, labels, ids, logp, tail=tail, temperature=2.0)
    assert torch.isfinite(loss)
    assert torch.isfinite(grad_of(loss, student)).all()


# ---------------------------------------------------------------------------------------------
# distillation_loss


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_alpha_one_is_cross_entropy(temperature):
    student, _, ids, logp, labels = make_batch(seed=12)
    student.requires_grad_(True)
    parts = distillation_loss(student, labels, ids, logp, alpha=1.0, temperature=temperature)
    ce = F.cross_entropy(student.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    torch.testing.assert_close(parts.loss, ce)
    torch.testing.assert_close(parts.ce, ce.detach())
    torch.testing.assert_close(grad_of(parts.loss, student), grad_of(ce, student))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("tail", TAIL_MODES)
def test_alpha_zero_is_scaled_kd(tail, temperature):
    student, _, ids, logp, labels = make_batch(seed=13)
    student.requires_grad_(True)
    kw = {"tail": tail, "temperature": temperature}
    parts = distillation_loss(student, labels, ids, logp, alpha=0.0, **kw)
    kd = sparse_kd_loss(student, labels, ids, logp, **kw)
    torch.testing.assert_close(parts.loss, temperature**2 * kd)
    torch.testing.assert_close(parts.kd, kd.detach())
    torch.testing.assert_close(grad_of(parts.loss, student), grad_of(temperature**2 * kd, student))


def test_mixed_alpha_and_detached_parts():
    student, _, ids, logp, labels = make_batch(seed=14)
    student.requires_grad_(True)
    parts = distillation_loss(student, labels, ids, logp, alpha=0.3, temperature=2.0)
    assert not parts.ce.requires_grad and not parts.kd.requires_grad
    assert parts.ce.dim() == 0 and parts.kd.dim() == 0
    torch.testing.assert_close(parts.loss.detach(), 0.3 * parts.ce + 0.7 * 4.0 * parts.kd)
    ce = F.cross_entropy(student.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    torch.testing.assert_close(parts.ce, ce.detach())


@pytest.mark.parametrize("tail", TAIL_MODES)
@pytest.mark.parametrize(("temperature", "calls"), [(1.0, 1), (2.0, 2)])
def test_log_softmax_is_shared_at_temperature_one(monkeypatch, temperature, calls, tail):
    # bucket too: its tail comes from the same (masked) log-softmax, not from a second pass
    student, _, ids, logp, labels = make_batch(seed=15)
    student.requires_grad_(True)
    count = 0
    real = torch.log_softmax

    def counting(*args, **kwargs):
        nonlocal count
        count += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "log_softmax", counting)
    parts = distillation_loss(student, labels, ids, logp, temperature=temperature, tail=tail)
    parts.loss.backward()
    assert count == calls


# ---------------------------------------------------------------------------------------------
# Arguments and dtypes


def test_unknown_tail_raises_with_allowed_values():
    student, _, ids, logp, labels = make_batch()
    for fn in (sparse_kd_loss, distillation_loss):
        with pytest.raises(ValueError, match="renorm") as info:
            fn(student, labels, ids, logp, tail="topk")
        assert all(mode in str(info.value) for mode in TAIL_MODES)
        assert "'topk'" in str(info.value)


def test_bad_arguments_raise():
    student, teacher, ids, logp, labels = make_batch()
    with pytest.raises(ValueError, match="temperature"):
        sparse_kd_loss(student, labels, ids, logp, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        dense_kd_loss(student, teacher, labels, temperature=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(student, labels, ids, logp, alpha=1.5)
    with pytest.raises(ValueError, match="shape"):
        sparse_kd_loss(student, labels, ids, logp[..., :-1])
    with pytest.raises(ValueError, match="shape"):
        sparse_kd_loss(student[:, :-1], labels, ids, logp)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tail", TAIL_MODES)
def test_half_precision_student_logits(dtype, tail):
    student, _, ids, logp, labels = make_batch(seed=16, dtype=dtype)
    student.requires_grad_(True)
    kw = {"tail": tail, "temperature": 2.0}

    loss = sparse_kd_loss(student, labels, ids, logp, **kw)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # Same values upcast by hand: the half-precision path must compute in float32.
    torch.testing.assert_close(loss, sparse_kd_loss(student.float(), labels, ids, logp, **kw))
    grad = grad_of(loss, student)
    assert grad.dtype == dtype and torch.isfinite(grad).all()

    parts = distillation_loss(student, labels, ids, logp.to(dtype), **kw)
    assert parts.loss.dtype == torch.float32 and torch.isfinite(parts.loss)
    parts.loss.backward()
    assert torch.isfinite(student.grad).all()


def test_one_default_tail_everywhere():
    import inspect

    from trainer import FitConfig
    from trainer.losses import DEFAULT_TAIL, DistillationLoss

    assert DEFAULT_TAIL == "renorm"
    assert FitConfig(cache="", student="").tail == DEFAULT_TAIL
    assert DistillationLoss().tail == DEFAULT_TAIL
    for fn in (sparse_kd_loss, distillation_loss):
        assert inspect.signature(fn).parameters["tail"].default == DEFAULT_TAIL
