"""SIGTERM a real `trainer fit --task classification` in the middle of its run, then `--resume`:
it stops at a step boundary with a checkpoint (exit 130), and the resumed run ends with the
weights (bit for bit, on CPU), per-epoch metrics and held-out metrics of an uninterrupted run.
A run directory holding a run is not started over by accident, nor resumed with other settings."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import logitcache
from logitcache import DumpOptions, dump
from tests.cli import REPO, cli_env, reaped
from tests.faults.helpers import checkpoint_step, describe, flat, popen, wait_for_checkpoint

CNN = "tests.logitcache.classifiers:cnn"
#: 48 rows (24 examples, 2 views) in batches of 8: 6 steps per epoch, 240 steps of >= 5 ms.
SETTINGS = {"epochs": 40, "batch_size": 8, "lr": 3e-3, "temperature": 4, "checkpoint_every": 5,
            "label_fraction": 0.5}  # fmt: skip
STOP_AFTER = 100  # the checkpoint to wait for before the SIGTERM (mid-epoch: 100 = 16 * 6 + 4)


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cls_resume")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 8, 8), dtype=np.uint8)
    np.savez(root / "train.npz", inputs=images[:24], labels=np.arange(24) % 4)
    np.savez(root / "test.npz", inputs=images[24:], labels=np.arange(8) % 4)
    common = {"task": "classification", "teacher_factory": CNN, "targets": "full",
              "progress": False, "device": "cpu"}  # fmt: skip
    dump(DumpOptions(data=str(root / "train.npz"), out=str(root / "c"), views=2, **common))
    dump(DumpOptions(data=str(root / "test.npz"), out=str(root / "t"), **common))
    return {"root": root, "cache": root / "c", "test": root / "t"}


def command(caches: dict[str, Path], out: Path, *extra: str) -> list[str]:
    root = caches["root"]
    args = [sys.executable, "-m", "trainer", "fit", "--task", "classification",
            "--cache", caches["cache"], "--data", root / "train.npz",
            "--student", "tests.logitcache.classifiers:slow_cnn", "--out", out,
            "--eval-cache", caches["test"], "--eval-data", root / "test.npz", "--no-progress"]  # fmt: skip
    for name, value in SETTINGS.items():
        args += [f"--{name.replace('_', '-')}", value]
    return [str(a) for a in [*args, *extra]]


def trainer(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, env=cli_env(), cwd=REPO,
                          timeout=600, check=False)  # fmt: skip


def test_sigterm_then_resume_equals_the_uninterrupted_run(caches, tmp_path):
    reference = trainer(command(caches, tmp_path / "reference"))
    assert reference.returncode == 0, describe(reference)

    run = tmp_path / "run"
    victim = popen(command(caches, run))
    with reaped(victim):
        wait_for_checkpoint(victim, run, STOP_AFTER, poll=0.005)
        victim.send_signal(signal.SIGTERM)
        _, err = victim.communicate(timeout=120)
    assert victim.returncode == 130, err
    stopped = checkpoint_step(run)
    assert STOP_AFTER <= stopped < 240, stopped  # at a step boundary, before the end
    assert f"interrupted at step {stopped}" in flat(err) and "--resume" in flat(err), err
    assert "Traceback" not in err and not (run / "model.pt").exists()

    # the same command again, without --resume: refused, the checkpoint kept
    again = trainer(command(caches, run))
    assert again.returncode == 2 and "already holds a run" in flat(again.stderr), again.stderr
    # with another setting that changes the weights: refused, naming it
    other = trainer([*command(caches, run, "--resume"), "--lr", "1e-3"])
    assert other.returncode == 2 and "lr: checkpoint has 0.003" in flat(other.stderr), other.stderr

    resumed = trainer(command(caches, run, "--resume"))
    assert resumed.returncode == 0, describe(resumed)
    got = torch.load(run / "model.pt", weights_only=True)
    want = torch.load(tmp_path / "reference" / "model.pt", weights_only=True)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), "weights differ"
    assert (run / "metrics.jsonl").read_text() == (
        tmp_path / "reference" / "metrics.jsonl"
    ).read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert (
        summary["eval"] == json.loads((tmp_path / "reference" / "summary.json").read_text())["eval"]
    )
    assert len(summary["epochs"]) == 40

    # a finished run is not resumed
    done = trainer(command(caches, run, "--resume"))
    assert done.returncode == 2 and "already finished" in flat(done.stderr), done.stderr
    assert logitcache.open(caches["cache"]).manifest.complete
