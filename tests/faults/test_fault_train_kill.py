"""SIGKILL `trainer fit` at a random moment (seeded, printed), then `--resume`: the final weights
are bit for bit those of an uninterrupted run (on CPU), and the metrics have the same rows.

The kill lands after a random checkpoint plus a random delay: between steps, inside a step, or
while a checkpoint is being written (the checkpoint directory is replaced by two renames, and a
killed write leaves the previous one usable)."""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.cli import reaped
from tests.faults.helpers import popen, run_main, wait_for_checkpoint

SEED = int(os.environ.get("FAULT_SEED", "6029"))
SETTINGS = {
    "steps": 120, "batch_size": 8, "lr": 3e-3, "min_lr": 3e-4, "eval_fraction": 0.1,
    "eval_every": 0, "checkpoint_every": 5, "log_every": 5,
}  # fmt: skip


def kill_plan(seed: int, n: int = 3) -> list[tuple[int, float]]:
    """(checkpoint step to wait for, extra delay in seconds) per case."""
    rng = random.Random(seed + 1)
    return [(5 * rng.randint(1, 16), round(rng.uniform(0.0, 0.4), 3)) for _ in range(n)]


PLAN = kill_plan(SEED)
print(f"fault suite: training kill points from seed {SEED}: {PLAN}")


def flags(cache: Path, student: Path, out: Path) -> list[str]:
    args = ["fit", "--cache", cache, "--student", student, "--out", out, "--no-progress"]
    for name, value in SETTINGS.items():
        args += [f"--{name.replace('_', '-')}", value]
    return [str(a) for a in args]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_cache, tiny_student_config) -> Path:
    from trainer.recipe import FitConfig, fit

    out = tmp_path_factory.mktemp("train_reference") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(FitConfig(cache=str(tiny_cache), student=str(tiny_student_config), out=str(out),
                      progress=False, **SETTINGS))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return out


def kill_and_resume(case, tmp_path, tiny_cache, tiny_student_config, reference, capsys):
    from trainer.cli import main

    after_step, delay = case
    run = tmp_path / "run"
    args = flags(tiny_cache, tiny_student_config, run)
    victim = popen([sys.executable, "-m", "trainer", *args])
    with reaped(victim):
        wait_for_checkpoint(victim, run, after_step, poll=0.01)
        time.sleep(delay)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)
    print(f"killed after checkpoint {after_step} + {delay} s (seed {SEED}): "
          f"{sorted(p.name for p in run.iterdir())}")  # fmt: skip
    assert victim.returncode == -signal.SIGKILL
    assert not (run / "model").exists()
    code, _, err = run_main(main, ["trainer", *args, "--resume"], capsys)
    assert code == 0, err
    got = load_file(run / "model" / "model.safetensors")
    want = load_file(reference / "model" / "model.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), "weights differ"

    def rows(r: Path) -> list[tuple]:
        lines = (r / "metrics.jsonl").read_text().splitlines()
        return [(json.loads(line)["kind"], json.loads(line)["step"]) for line in lines]

    assert rows(run) == rows(reference)
    final = json.loads((run / "summary.json").read_text())["final"]["eval"]
    assert final == json.loads((reference / "summary.json").read_text())["final"]["eval"]


@pytest.mark.parametrize("case", PLAN[:1], ids=lambda c: f"after-step-{c[0]}+{c[1]}s")
def test_sigkill_during_training_then_resume_equals_the_uninterrupted_run(
    case, tmp_path, tiny_cache, tiny_student_config, reference, capsys
):
    kill_and_resume(case, tmp_path, tiny_cache, tiny_student_config, reference, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("case", PLAN[1:], ids=lambda c: f"after-step-{c[0]}+{c[1]}s")
def test_sigkill_during_training_at_more_points(
    case, tmp_path, tiny_cache, tiny_student_config, reference, capsys
):
    kill_and_resume(case, tmp_path, tiny_cache, tiny_student_config, reference, capsys)
