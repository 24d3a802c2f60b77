"""`fit(config, loss_fn=...)`: the injected loss is the one that trains the student; the default
loss follows ``--loss`` and ``--beta``."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import logitcache
from logitcache import LogitCacheError
from trainer import LOSSES, DistillationLoss, LossFn, LossParts
from trainer.dataset import CacheDataset
from trainer.recipe import FitConfig, fit
from trainer.student import build_student

STEPS = 3


class ConstantLoss:
    """A `LossFn` with zero gradient and a recognisable value; it counts its calls."""

    def __init__(self, value: float) -> None:
        self.value, self.calls = value, 0

    def __call__(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> LossParts:
        self.calls += 1
        loss = (logits * 0.0).sum() + self.value  # attached to the graph, gradient 0
        return LossParts(loss=loss, ce=loss.detach(), kd=torch.zeros(()))


def config(cache: Path, student: Path, out: Path) -> FitConfig:
    return FitConfig(
        cache=str(cache), student=str(student), out=str(out), steps=STEPS, batch_size=4,
        eval_fraction=0.0, checkpoint_every=0, log_every=1, weight_decay=0.0, progress=False,
    )  # fmt: skip


def test_fit_trains_with_the_injected_loss(tmp_path, tiny_cache, tiny_student_config):
    loss_fn: LossFn = ConstantLoss(7.0)
    fit(config(tiny_cache, tiny_student_config, tmp_path / "run"), loss_fn=loss_fn)
    assert loss_fn.calls == STEPS

    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows if r["kind"] == "train"] == [7.0] * STEPS

    # Zero gradient and no weight decay: AdamW leaves every weight where the seeded init put it.
    manifest = logitcache.open(tiny_cache).manifest
    init = build_student(str(tiny_student_config), manifest, seed=0)[0].state_dict()
    saved = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert saved and all(torch.equal(saved[k], init[k]) for k in saved)


def test_the_default_loss_is_the_configs_distillation_loss(
    tmp_path, tiny_cache, tiny_student_config
):
    c = config(tiny_cache, tiny_student_config, tmp_path / "default")
    calls = []

    class Spy(DistillationLoss):
        def __call__(self, logits, batch):
            calls.append(self)
            return super().__call__(logits, batch)

    default = fit(c)
    spied = fit(
        config(tiny_cache, tiny_student_config, tmp_path / "explicit"),
        loss_fn=Spy(c.alpha, c.temperature, c.tail),
    )
    assert len(calls) == STEPS
    # The same loss through the argument: the same run, bit for bit.
    assert spied["final"]["train"]["loss"] == default["final"]["train"]["loss"]
    a = load_file(tmp_path / "default" / "model" / "model.safetensors")
    b = load_file(tmp_path / "explicit" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------
# --loss and --beta: each divergence trains, bad values are refused, old checkpoints resume

FIT_STEPS = 25


def fixed_batch(cache: Path) -> dict[str, torch.Tensor]:
    dataset = CacheDataset(cache, batch_size=8, shuffle=False)
    return next(iter(torch.utils.data.DataLoader(dataset, batch_size=None)))


@pytest.mark.parametrize("loss", LOSSES)
def test_fit_with_each_loss_lowers_that_loss(
    tmp_path, monkeypatch, tiny_cache, tiny_student_config, loss
):
    import trainer.recipe

    built = []

    class Recorded(DistillationLoss):
        def __post_init__(self):
            super().__post_init__()
            built.append(self)

    monkeypatch.setattr(trainer.recipe, "DistillationLoss", Recorded)
    c = dataclasses.replace(
        config(tiny_cache, tiny_student_config, tmp_path / "run"), loss=loss, beta=0.3,
        alpha=0.0, steps=FIT_STEPS, lr=3e-3,
    )  # fmt: skip
    fit(c)
    assert [(b.loss, b.beta, b.alpha) for b in built] == [(loss, 0.3, 0.0)]  # fit passed them

    # The divergence on a fixed batch, before and after: training on it lowered it.
    manifest = logitcache.open(tiny_cache).manifest
    batch = fixed_batch(tiny_cache)
    objective = DistillationLoss(alpha=0.0, loss=loss, beta=0.3)
    values = []
    for spec, seed in ((tiny_student_config, 0), (tmp_path / "run" / "model", 0)):
        model = build_student(str(spec), manifest, seed=seed)[0].eval()
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            values.append(objective(logits.logits, batch).kd.item())
    before, after = values
    assert after < 0.9 * before, (loss, before, after)  # TVD moves slowest: 0.98 -> 0.86
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kd = [r["kd"] for r in rows if r["kind"] == "train"]
    assert all(math.isfinite(x) and x >= 0 for x in kd) and kd[-1] < kd[0]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            ["--loss", "bogus"],
            ["--loss must be one of forward_kl, reverse_kl, gjsd, tvd", "'bogus'"],
        ),
        (["--beta", "2"], ["--beta must be in [0, 1]", "forward KL", "reverse KL", "got 2.0"]),
        (["--loss", "gjsd", "--beta", "-0.5"], ["--beta must be in [0, 1]", "got -0.5"]),
        (["--loss", "js", "--beta", "nan"], ["--loss must be one of", "--beta must be a finite"]),
    ],
)
def test_bad_loss_settings_exit_2_with_a_clear_message(tmp_path, capsys, flags, expected):
    from tests.faults.helpers import run_main
    from trainer.cli import main as trainer_main

    argv = ["trainer", "fit", "--cache", tmp_path / "nowhere", "--student", tmp_path / "s.json",
            "--out", tmp_path / "run", "--no-progress", *flags]  # fmt: skip
    code, _, err = run_main(trainer_main, argv, capsys)
    assert code == 2, err
    assert err.startswith("trainer: error: invalid settings: ") and "Traceback" not in err, err
    message = " ".join(err.split())
    for text in expected:
        assert text in message, (text, err)
    assert not (tmp_path / "run").exists()  # refused before anything was opened or written


def test_resume_treats_a_setting_newer_than_the_checkpoint_as_its_default(tmp_path):
    from tests.synthetic import synthetic_cache
    from trainer.checkpoint import cache_identity, check_resume

    manifest = logitcache.open(synthetic_cache(tmp_path / "cache", sequences=3)).manifest
    c = FitConfig(cache=str(tmp_path / "cache"), student="s.json")
    old = dataclasses.asdict(c)
    del old["beta"]  # a checkpoint written before --beta existed
    check_resume(c, {"config": old, "manifest": cache_identity(manifest)}, manifest)
    changed = dataclasses.replace(c, beta=0.3)
    with pytest.raises(LogitCacheError, match=r"beta: checkpoint has 0\.5, this run has 0\.3"):
        check_resume(changed, {"config": old, "manifest": cache_identity(manifest)}, manifest)
    with pytest.raises(LogitCacheError, match="loss: checkpoint has 'forward_kl'"):
        check_resume(dataclasses.replace(c, loss="tvd"), {"config": old, "manifest": {}}, manifest)
