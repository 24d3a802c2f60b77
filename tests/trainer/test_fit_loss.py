"""`fit(config, loss_fn=...)`: the injected loss is the one that trains the student."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

import logitcache
from trainer import DistillationLoss, LossFn, LossParts
from trainer.fit import FitConfig, fit
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
