"""`torchrun -m trainer fit`: data-parallel training with gloo on the CPU, 2 processes.

One scenario, in real subprocesses: a 2-process run over one epoch and a bit (the epoch's last
global batch holds one sequence, so one rank trains on a padding batch), stopped at step 82 with
a checkpoint, then resumed with ONE process. The sample log (TRAINER_SAMPLE_LOG) shows what
every rank trained on at every step: the same global batches, in the same order, as a
1-process run, every training sequence once per epoch. The final weights match an
uninterrupted 1-process run up to floating-point summation order (the DDP loss is scaled so
that the gradient is the whole global batch's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.dataset import CacheDataset
from trainer.recipe import FitConfig, fit

SETTINGS = {
    "steps": 84,  # the epoch has 80 global batches of 6 (475 training sequences)
    "batch_size": 6,
    "lr": 3e-3,
    "min_lr": 3e-4,
    "eval_fraction": 0.1,
    "eval_every": 40,
    "checkpoint_every": 20,
    "log_every": 10,
}
STOP = 82


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e.pop("LOGITCACHE_DEBUG", None)
    e.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return e


def flags(cache: Path, student: Path, out: Path, **over) -> list[str]:
    args = ["fit", "--cache", cache, "--student", student, "--out", out, "--no-progress"]
    for name, value in {**SETTINGS, **over}.items():
        args += [f"--{name.replace('_', '-')}", value]
    return [str(a) for a in args]


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--standalone", "-m", "trainer"]  # fmt: skip


@pytest.fixture(scope="module")
def ddp_then_single(tmp_path_factory, tiny_cache, tiny_student_config) -> dict:
    """2 processes up to step 82, then --resume with 1; the 1-process reference meanwhile."""
    root = tmp_path_factory.mktemp("ddp")
    run, log = root / "run", root / "samples.jsonl"
    first = subprocess.Popen(
        [*torchrun(2), *flags(tiny_cache, tiny_student_config, run, stop_at=STOP)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env(TRAINER_SAMPLE_LOG=str(log)),
    )  # fmt: skip
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = root / "reference"
        fit(FitConfig(cache=str(tiny_cache), student=str(tiny_student_config), out=str(reference),
                      progress=False, **SETTINGS))  # fmt: skip
    finally:
        torch.set_num_threads(torch_threads)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, f"torchrun exited {first.returncode}:\n{out}\n{err}"
    state = torch.load(run / "checkpoint" / "state.pt", weights_only=True)
    second = subprocess.run(
        [sys.executable, "-m", "trainer",
         *flags(tiny_cache, tiny_student_config, run), "--resume"],
        capture_output=True, text=True, env=env(TRAINER_SAMPLE_LOG=str(log)), timeout=600,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    return {"run": run, "reference": reference, "rows": rows, "state": state,
            "first_stdout": out, "second_stdout": second.stdout}  # fmt: skip


def test_two_processes_split_every_global_batch_and_one_process_resumes(
    ddp_then_single, tiny_cache
):
    rows, state = ddp_then_single["rows"], ddp_then_single["state"]
    assert state["step"] == STOP and state["world_size"] == 2 and len(state["rng_ranks"]) == 2
    assert state["dataset"] == {"epoch": 1, "batches": STOP - 80, "batch_size": 6}

    # What a 1-process run trains on: the global batches of epochs 0 and 1.
    ds = CacheDataset(tiny_cache, batch_size=6, eval_fraction=0.1, seed=0)
    expected = ds.global_batches(0) + ds.global_batches(1)
    first = ds._part_firsts
    expected = [(first[b[:, 0]] + b[:, 1]).tolist() for b in expected][: SETTINGS["steps"]]
    assert len(ds.global_batches(0)) == 80 and len(expected[79]) == 1  # one rank pads

    by_step: dict[int, dict[int, list[int]]] = {}
    for row in rows:
        assert row["world_size"] == (2 if row["step"] <= STOP else 1), row
        by_step.setdefault(row["step"], {})[row["rank"]] = row["index"]
    assert sorted(by_step) == list(range(1, SETTINGS["steps"] + 1))
    for step, ranks in by_step.items():
        whole = expected[step - 1]
        if step <= STOP:  # rank r holds sequences r, r + 2, ... of the global batch
            assert ranks == {0: whole[0::2], 1: whole[1::2] or [-1]}, step
        else:
            assert ranks == {0: whole}, step
    assert by_step[80][1] == [-1]  # the padding batch of the epoch's last step

    # Every training sequence exactly once in epoch 0, across both ranks.
    epoch0 = [i for s in range(1, 81) for r in by_step[s].values() for i in r if i >= 0]
    assert sorted(epoch0) == sorted(int(i) for b in ds.global_batches(0) for i in
                                    first[b[:, 0]] + b[:, 1])  # fmt: skip
    assert len(epoch0) == len(set(epoch0)) == ds.num_sequences()


def test_only_rank_0_writes_and_the_weights_match_one_process(ddp_then_single):
    run, reference = ddp_then_single["run"], ddp_then_single["reference"]
    assert "stopped at step 82" in ddp_then_single["first_stdout"]
    assert ddp_then_single["first_stdout"].count("stopped at step") == 1  # rank 0 reports
    assert "trained" in ddp_then_single["second_stdout"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["kind"], r["step"]) for r in rows]
    assert keys == [(r["kind"], r["step"]) for r in ref_rows]  # no row twice, none missing
    for row, ref in zip(rows, ref_rows, strict=True):
        if row["kind"] == "train" and row["step"] > STOP:
            continue  # averages only the steps since the resume (as for any resume)
        for key in ("loss", "ce", "kd", "eval_ce", "eval_kl"):
            if key in row:
                assert row[key] == pytest.approx(ref[key], rel=1e-4), (row, ref)
        if "tokens" in row:
            assert row["tokens"] == ref["tokens"]  # global tokens, padding not counted
    got = load_file(run / "model" / "model.safetensors")
    want = load_file(reference / "model" / "model.safetensors")
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst < 1e-4, f"weights differ from the 1-process run by up to {worst}"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == SETTINGS["steps"]


def test_fused_loss_under_two_processes_matches_one_unfused_process(
    tmp_path, tiny_cache, tiny_student_config
):
    # --fused-loss runs the student through HiddenStates inside DDP and applies the output layer
    # in the loss, after DDP's forward: the output layer's gradients (here the tied embedding's)
    # must still be averaged over the ranks, or rank 0's weights would follow its half batch
    short = {**SETTINGS, "steps": 4, "eval_every": 0, "checkpoint_every": 0, "log_every": 1}
    run, reference = tmp_path / "run", tmp_path / "reference"
    argv = [*torchrun(2), *flags(tiny_cache, tiny_student_config, run, **short), "--fused-loss",
            "--tail", "bucket"]  # fmt: skip
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env())  # fmt: skip
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(FitConfig(cache=str(tiny_cache), student=str(tiny_student_config), out=str(reference),
                      progress=False, tail="bucket", **short))  # fmt: skip
    finally:
        torch.set_num_threads(torch_threads)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, f"torchrun exited {first.returncode}:\n{out}\n{err}"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    for row, ref in zip(rows, ref_rows, strict=True):
        for key in ("loss", "ce", "kd"):
            if key in row:
                assert row[key] == pytest.approx(ref[key], rel=1e-4), (row, ref)
    got = load_file(run / "model" / "model.safetensors")
    want = load_file(reference / "model" / "model.safetensors")
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst < 1e-4, f"weights differ from the 1-process unfused run by up to {worst}"
