"""trainer.fused: the chunked output layer + sparse KD + CE equals `distillation_loss` on the
full logits (forward and gradients w.r.t. hidden states, weight and bias), and `fit
--fused-loss` trains the same student, refusing what it cannot fuse."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from logitcache import LogitCacheError
from tests.trainer.test_loss_variants import make_targets
from trainer import fused
from trainer.fused import FusedDistillationLoss, fused_distillation_loss
from trainer.losses import (
    LOSSES,
    TAIL_MODES,
    DistillationLoss,
    distillation_loss,
    hard_label_loss,
)
from trainer.recipe import FitConfig, fit
from trainer.student import fused_head

H = 7


def head(vocab: int, width: int = H, seed: int = 1, dtype=torch.float64):
    """Hidden states (2, 6, width), weight (vocab, width), bias (vocab,): what the student's
    output layer would see, scaled so that the logits are spread like a real student's."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 6, width, generator=g, dtype=dtype)
    weight = torch.randn(vocab, width, generator=g, dtype=dtype) / math.sqrt(width) * 2.0
    bias = 0.5 * torch.randn(vocab, generator=g, dtype=dtype)
    return hidden, weight, bias


def both(kw, hidden, weight, bias, labels, ids, logp, chunk_size=5):
    """(unfused parts, their gradients), (fused parts, their gradients) w.r.t. the head."""
    results = []
    for fn in ("unfused", "fused"):
        leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight, bias)]
        if fn == "unfused":
            parts = distillation_loss(F.linear(*leaves), labels, ids, logp, **kw)
        else:
            parts = fused_distillation_loss(*leaves, labels, ids, logp, chunk_size=chunk_size, **kw)
        results.append((parts, torch.autograd.grad(parts.loss, leaves)))
    return results


def assert_same(a, b, **tol):
    (pa, ga), (pb, gb) = a, b
    for x, y in zip(pa, pb, strict=True):
        torch.testing.assert_close(x, y, **tol)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, **tol)


# ---------------------------------------------------------------------------------------------
# Equal to the unfused loss


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("tail", TAIL_MODES)
@pytest.mark.parametrize("case", ["topk", "sampled"])
def test_equals_the_unfused_loss_in_float64(case, tail, loss, temperature):
    # make_targets: masked positions, -inf padding slots with junk ids, a fully padded
    # position, labels among and outside the ids; 12 positions in chunks of 5, 5, 2
    student, _, labels, ids, logp = make_targets(case)
    hidden, weight, bias = head(student.shape[-1])
    kw = {"alpha": 0.3, "temperature": temperature, "tail": tail, "loss": loss, "beta": 0.3}
    unfused, fused_ = both(kw, hidden, weight, bias, labels, ids, logp)
    assert_same(fused_, unfused, atol=1e-12, rtol=1e-10)
    assert fused_[0].loss.requires_grad and not fused_[0].ce.requires_grad


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("tail", TAIL_MODES)
def test_equals_the_unfused_loss_in_float32(tail, temperature):
    g = torch.Generator().manual_seed(3)
    b, t, v, k, width = 2, 40, 1000, 16, 32
    hidden = torch.randn(b, t, width, generator=g)
    weight = torch.randn(v, width, generator=g) / math.sqrt(width) * 3.0
    bias = torch.randn(v, generator=g)
    logp, ids = torch.log_softmax(3.0 * torch.randn(b, t, v, generator=g), -1).topk(k, -1)
    labels = torch.randint(v, (b, t), generator=g)
    labels[:, ::3] = -100
    labels[0, 1] = ids[0, 1, 2]
    logp[1, 5, -3:] = -math.inf  # padding
    kw = {"alpha": 0.5, "temperature": temperature, "tail": tail}
    unfused, fused_ = both(kw, hidden, weight, bias, labels, ids, logp, chunk_size=7)
    assert fused_[0].loss.dtype == torch.float32
    assert_same(fused_, unfused, atol=2e-6, rtol=1e-4)


def test_chunk_size_does_not_change_the_result():
    student, _, labels, ids, logp = make_targets("topk")
    hidden, weight, bias = head(student.shape[-1])
    kw = {"tail": "bucket", "temperature": 2.0}
    results = [both(kw, hidden, weight, bias, labels, ids, logp, chunk_size=c)[1] for c in
               (1, 7, 12, None)]  # fmt: skip
    for other in results[1:]:
        assert_same(other, results[0], atol=1e-13, rtol=1e-12)


def test_without_targets_it_is_cross_entropy():
    student, _, labels, ids, logp = make_targets("topk")
    hidden, weight, bias = head(student.shape[-1])

    def ce(h, w, b):  # float64, as the fused loss computes for float64 inputs
        return F.cross_entropy(F.linear(h, w, b).flatten(0, 1), labels.flatten(), ignore_index=-100)

    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    parts = fused_distillation_loss(*leaves, labels, None, None, temperature=2.0, chunk_size=4)
    ref_leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    ref = ce(*ref_leaves)
    torch.testing.assert_close(parts.loss, ref)
    assert parts.kd.item() == 0.0
    got_grads = torch.autograd.grad(parts.loss, leaves)
    for a, b in zip(got_grads, torch.autograd.grad(ref, ref_leaves), strict=True):
        torch.testing.assert_close(a, b)

    # the LossFn pair: FusedDistillationLoss(alpha=1) is DistillationLoss(alpha=1), i.e.
    # `hard_label_loss` (which computes in float32)
    batch = {"labels": labels, "target_ids": ids, "target_logprobs": logp}
    got = FusedDistillationLoss(alpha=1.0)(hidden, weight, bias, batch)
    want = DistillationLoss(alpha=1.0)(F.linear(hidden, weight, bias), batch)
    torch.testing.assert_close(got.loss.float(), want.loss)
    torch.testing.assert_close(
        want.loss, hard_label_loss(F.linear(hidden, weight, bias), labels).loss
    )


@pytest.mark.parametrize("tail", TAIL_MODES)
def test_all_masked_is_zero_with_zero_gradients(tail):
    student, _, labels, ids, logp = make_targets("topk")
    hidden, weight, bias = head(student.shape[-1])
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    parts = fused_distillation_loss(*leaves, torch.full_like(labels, -100), ids, logp, tail=tail)
    assert parts.loss.item() == parts.ce.item() == parts.kd.item() == 0.0
    parts.loss.backward()
    assert all(torch.all(x.grad == 0) for x in leaves)


def test_backward_scales_with_the_incoming_gradient():
    # fit's data-parallel rescaling multiplies the loss; the gradients computed in the forward
    # must follow
    student, _, labels, ids, logp = make_targets("sampled")
    hidden, weight, bias = head(student.shape[-1])
    grads = []
    for factor in (1.0, 3.0):
        leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
        (factor * fused_distillation_loss(*leaves, labels, ids, logp).loss).backward()
        grads.append([x.grad for x in leaves])
    for one, three in zip(*grads, strict=True):
        torch.testing.assert_close(three, 3.0 * one)


def test_without_gradients_only_the_loss_is_computed():
    student, _, labels, ids, logp = make_targets("topk")
    hidden, weight, bias = head(student.shape[-1])
    want = distillation_loss(F.linear(hidden, weight, bias), labels, ids, logp, tail="label")
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    with torch.no_grad():
        got = fused_distillation_loss(*leaves, labels, ids, logp, tail="label", chunk_size=5)
    assert not got.loss.requires_grad
    torch.testing.assert_close(got.loss, want.loss)
    # only the weight trains (a frozen head's input): no gradient for the others
    w = weight.clone().requires_grad_()
    parts = fused_distillation_loss(hidden, w, None, labels, ids, logp)
    (g,) = torch.autograd.grad(parts.loss, [w])
    w_ref = weight.clone().requires_grad_()
    ref = distillation_loss(F.linear(hidden, w_ref), labels, ids, logp)
    torch.testing.assert_close(g, torch.autograd.grad(ref.loss, [w_ref])[0])


@pytest.mark.parametrize("tail", TAIL_MODES)
def test_gradcheck_float64(tail):
    student, _, labels, ids, logp = make_targets("topk")
    hidden, weight, bias = head(student.shape[-1], width=3)
    leaves = tuple(x.requires_grad_() for x in (hidden[:1, :4].clone(), weight, bias))
    assert torch.autograd.gradcheck(
        lambda h, w, b: fused_distillation_loss(
            h, w, b, labels[:1, :4], ids[:1, :4], logp[:1, :4], tail=tail, temperature=1.5,
            loss="gjsd", beta=0.3, chunk_size=3,
        ).loss,
        leaves,
    )  # fmt: skip


def test_half_precision_hidden_states_and_autocast_compute_in_float32():
    student, _, labels, ids, logp = make_targets("topk")
    hidden, weight, bias = head(student.shape[-1], dtype=torch.float32)
    logp = logp.float()
    want = fused_distillation_loss(hidden, weight, bias, labels, ids, logp, tail="bucket")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = fused_distillation_loss(hidden, weight, bias, labels, ids, logp,
                                                 tail="bucket")  # fmt: skip
    torch.testing.assert_close(under_autocast.loss, want.loss)  # the head was not autocast

    h16 = hidden.bfloat16().requires_grad_()
    parts = fused_distillation_loss(h16, weight, bias, labels, ids, logp, tail="bucket")
    assert parts.loss.dtype == torch.float32
    torch.testing.assert_close(
        parts.loss,
        fused_distillation_loss(h16.detach().float(), weight, bias, labels, ids, logp,
                                tail="bucket").loss,
    )  # fmt: skip
    parts.loss.backward()
    assert h16.grad is not None and h16.grad.dtype == torch.bfloat16


def test_bad_arguments_raise():
    student, _, labels, ids, logp = make_targets("topk")
    hidden, weight, bias = head(student.shape[-1])
    with pytest.raises(ValueError, match="chunk_size"):
        FusedDistillationLoss(chunk_size=0)
    with pytest.raises(ValueError, match="renorm"):
        FusedDistillationLoss(tail="topk")
    with pytest.raises(ValueError, match="weight"):
        fused_distillation_loss(hidden, weight[:, :-1], None, labels, ids, logp)
    with pytest.raises(ValueError, match="bias"):
        fused_distillation_loss(hidden, weight, bias[:-1], labels, ids, logp)
    with pytest.raises(ValueError, match="both"):
        fused_distillation_loss(hidden, weight, bias, labels, ids, None)
    with pytest.raises(ValueError, match="hidden"):
        fused_distillation_loss(hidden[:, :-1], weight, bias, labels, ids, logp)


# ---------------------------------------------------------------------------------------------
# fit --fused-loss


def config(cache: Path, student: Path, out: Path, **over) -> FitConfig:
    return FitConfig(
        cache=str(cache), student=str(student), out=str(out), steps=4, batch_size=4,
        eval_fraction=0.0, checkpoint_every=0, log_every=1, progress=False, lr=3e-3, **over,
    )  # fmt: skip


@pytest.mark.parametrize(("tail", "temperature"), [("renorm", 1.0), ("bucket", 2.0)])
def test_fit_with_the_fused_loss_trains_the_same_student(
    tmp_path, monkeypatch, tiny_cache, tiny_student_config, tail, temperature
):
    monkeypatch.setattr(fused, "DEFAULT_CHUNK_ELEMENTS", 512 * 50)  # chunks of 50 positions
    runs = {}
    for name, on in (("unfused", False), ("fused", True)):
        c = config(tiny_cache, tiny_student_config, tmp_path / name, fused_loss=on, tail=tail,
                   temperature=temperature)  # fmt: skip
        fit(c)
        rows = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        runs[name] = ([json.loads(r) for r in rows],
                      load_file(tmp_path / name / "model" / "model.safetensors"))  # fmt: skip
    (rows, weights), (ref_rows, ref_weights) = runs["fused"], runs["unfused"]
    for row, ref in zip(rows, ref_rows, strict=True):
        for key in ("loss", "ce", "kd"):
            if key in row:
                assert row[key] == pytest.approx(ref[key], rel=1e-5), (key, row, ref)
    worst = max(float((weights[k] - ref_weights[k]).abs().max()) for k in ref_weights)
    assert worst < 1e-5, f"weights differ from the unfused run by up to {worst}"
    saved = json.loads((tmp_path / "fused" / "fit_config.json").read_text())
    assert saved["fused_loss"] is True


def test_fit_refuses_a_loss_fn_with_the_fused_loss(tmp_path, tiny_cache, tiny_student_config):
    c = config(tiny_cache, tiny_student_config, tmp_path / "run", fused_loss=True)
    with pytest.raises(LogitCacheError, match="Pass no loss_fn, or train with fused_loss=False"):
        fit(c, loss_fn=DistillationLoss())
    assert not (tmp_path / "run").exists()


def test_fused_head_refuses_logits_that_are_not_a_plain_linear_map():
    from transformers import AutoModelForCausalLM, GPT2Config

    def tiny():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(
            GPT2Config(vocab_size=50, n_layer=1, n_embd=8, n_head=2, n_positions=16,
                       bos_token_id=0, eos_token_id=0)
        )  # fmt: skip

    model = tiny()
    assert fused_head(model) is model.lm_head and model.training  # train mode restored

    scaled = tiny()
    forward = scaled.forward

    def times_two(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    scaled.forward = times_two
    with pytest.raises(LogitCacheError, match="not the output layer's output"):
        fused_head(scaled)

    wrapped = tiny()
    wrapped.lm_head = torch.nn.Sequential(wrapped.lm_head)
    with pytest.raises(LogitCacheError, match=r"Sequential, not a torch\.nn\.Linear"):
        fused_head(wrapped)


def test_cli_fused_loss_refuses_a_soft_capped_student_with_exit_2(
    tmp_path, capsys, tiny_cache, tiny_teacher_dir
):
    from transformers import Gemma2Config, GPT2Config

    from tests.faults.helpers import run_main
    from trainer.cli import main as trainer_main

    vocab = GPT2Config.from_pretrained(tiny_teacher_dir).vocab_size
    student = tmp_path / "gemma2.json"
    student.write_text(
        Gemma2Config(
            vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
        ).to_json_string()
    )  # fmt: skip
    argv = ["trainer", "fit", "--cache", tiny_cache, "--student", student, "--out",
            tmp_path / "run", "--no-progress", "--steps", "2", "--fused-loss"]  # fmt: skip
    code, _, err = run_main(trainer_main, argv, capsys)
    assert code == 2, err
    message = " ".join(err.split())
    assert "--fused-loss cannot train the student" in message and "Gemma2ForCausalLM" in message
    assert "Train this student without --fused-loss" in message and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_resume_may_switch_the_fused_loss(tmp_path, tiny_cache, tiny_student_config):
    c = config(tiny_cache, tiny_student_config, tmp_path / "run", stop_at=2)
    fit(c)
    done = fit(dataclasses.replace(c, stop_at=0, resume=True, fused_loss=True))
    assert done["steps"] == 4
