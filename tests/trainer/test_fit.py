"""`trainer fit / eval / plot` end to end on a real tiny cache (teacher run once by the fixture).

The CLI runs in real subprocesses (`python -m trainer`); the reference runs go through the
Python API in-process, which also checks that the two agree bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import logitcache
from logitcache import LogitCacheError
from logitcache.format.tokenizer_id import tokenizer_fingerprint
from logitcache.testing import toy
from trainer.recipe import FitConfig, fit
from trainer.student import build_student

STEPS = 12
#: Shared by the CLI runs and the in-process reference runs (flag name -> value).
SETTINGS = {
    "steps": STEPS,
    "batch_size": 8,
    "lr": 3e-3,
    "min_lr": 3e-4,
    "eval_fraction": 0.1,
    "eval_every": 4,
    "checkpoint_every": 4,
    "log_every": 3,
}


# --------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="session")
def cache_dir(tiny_cache) -> Path:
    """The tiny teacher's top-8 targets over the stdlib corpus: ~530 sequences of 64, 9 parts."""
    return tiny_cache


@pytest.fixture(scope="session")
def student_config(tiny_student_config) -> Path:
    return tiny_student_config


def api_fit(cache: Path, student: Path, out: Path, **over) -> dict:
    config = FitConfig(
        cache=str(cache), student=str(student), out=str(out), progress=False, **{**SETTINGS, **over}
    )
    return fit(config)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, cache_dir, student_config) -> Path:
    """An uninterrupted KD run (alpha 0.5) through the API."""
    out = tmp_path_factory.mktemp("reference") / "run"
    api_fit(cache_dir, student_config, out)
    return out


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LOGITCACHE_DEBUG", None)
    env["PYTHONWARNINGS"] = "ignore"
    return env


def cli(*args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", *map(str, args)],
        capture_output=True, text=True, env=cli_env(), timeout=300,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer {args} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def fit_flags(cache: Path, student: Path, out: Path, **over) -> list[str]:
    flags = ["fit", "--cache", cache, "--student", student, "--out", out, "--no-progress"]
    for name, value in {**SETTINGS, **over}.items():
        flags += [f"--{name.replace('_', '-')}", value]
    return flags


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"weights differ: {different}"


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# (a) resume


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(
    tmp_path, cache_dir, student_config, reference_run
):
    run = tmp_path / "run"
    flags = fit_flags(cache_dir, student_config, run)
    # Stop between checkpoints, with 2 DataLoader workers; resume with none.
    first = cli(*flags, "--stop-at", 7, "--num-workers", 2)
    assert "--resume" in first.stdout
    assert torch.load(run / "checkpoint" / "state.pt", weights_only=True)["step"] == 7
    assert not (run / "model").exists() and not (run / "summary.json").exists()

    cli(*flags, "--resume")
    assert_same_weights(run, reference_run)

    rows, ref_rows = metrics(run), metrics(reference_run)
    assert [(r["kind"], r["step"]) for r in rows] == [(r["kind"], r["step"]) for r in ref_rows]
    # Same weights at each evaluation, so the same held-out numbers.
    assert [r for r in rows if r["kind"] == "eval"] == [r for r in ref_rows if r["kind"] == "eval"]
    assert {"step", "epoch", "lr", "loss", "ce", "kd", "tokens_per_s"} <= set(rows[0])

    summary = json.loads((run / "summary.json").read_text())
    manifest = logitcache.open(cache_dir).manifest
    assert summary["manifest"]["teacher"]["weights_sha256"] == manifest.teacher.weights_sha256
    assert summary["manifest"]["tokenizer"]["fingerprint"] == manifest.tokenizer.fingerprint
    assert summary["manifest"]["data"]["fingerprint"] == manifest.data.fingerprint
    assert summary["steps"] == STEPS and summary["config"]["alpha"] == 0.5
    ref_summary = json.loads((reference_run / "summary.json").read_text())
    assert summary["final"]["eval"] == ref_summary["final"]["eval"]
    assert summary["tokens_seen"] == ref_summary["tokens_seen"]


def test_resume_refuses_other_settings_and_missing_checkpoints(tmp_path, cache_dir, student_config):
    run = tmp_path / "run"
    with pytest.raises(LogitCacheError, match="no checkpoint"):
        api_fit(cache_dir, student_config, run, resume=True)
    api_fit(cache_dir, student_config, run, stop_at=2)
    with pytest.raises(LogitCacheError, match=r"alpha: checkpoint has 0\.5, this run has 0\.7"):
        api_fit(cache_dir, student_config, run, resume=True, alpha=0.7)
    with pytest.raises(LogitCacheError, match="already holds a run"):
        api_fit(cache_dir, student_config, run)
    # --overwrite starts over.
    api_fit(cache_dir, student_config, run, overwrite=True, steps=2)
    assert json.loads((run / "summary.json").read_text())["steps"] == 2


def test_bf16_autocast_and_epochs(tmp_path, cache_dir, student_config):
    summary = api_fit(
        cache_dir, student_config, tmp_path / "run", precision="bf16", steps=0, epochs=0.05,
        eval_every=0, temperature=2.0, tail="renorm",
    )  # fmt: skip
    rows = metrics(tmp_path / "run")
    per_epoch = len(logitcache.open(cache_dir)) * 0.9 / SETTINGS["batch_size"]
    assert abs(summary["steps"] - 0.05 * per_epoch) <= 2
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in rows if r["kind"] == "train")
    assert rows[-1]["kind"] == "eval"  # the final evaluation always runs


@pytest.mark.slow
def test_sigint_checkpoints_at_a_step_boundary(tmp_path, cache_dir, student_config):
    run = tmp_path / "run"
    flags = fit_flags(cache_dir, student_config, run, steps=100_000, log_every=1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer", *map(str, flags)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted at step" in stderr and "--resume" in stderr
    assert "Traceback" not in stderr
    state = torch.load(run / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] >= 1 and state["dataset"]["batches"] == state["step"]


# --------------------------------------------------------------------------------------------
# (b) errors: exit code 2, one message, no traceback


def corrupt_copy(cache: Path, dest: Path) -> Path:
    shutil.copytree(cache, dest)
    chunk = next(p for p in sorted((dest / "parts" / "part-000001").rglob("*")) if p.is_file()
                 and "target_logprobs" in p.parts and p.name != "zarr.json")  # fmt: skip
    data = bytearray(chunk.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xFF
    chunk.write_bytes(bytes(data))
    return dest


def empty_copy(cache: Path, dest: Path) -> Path:
    dest.mkdir()
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest.update(parts=[], sequences=0, tokens=0)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def test_errors_exit_2_with_a_clear_message(tmp_path, cache_dir, student_config):
    wide = json.loads(student_config.read_text())
    wide["vocab_size"] = 600
    (tmp_path / "wide.json").write_text(json.dumps(wide))
    cases = {
        "missing cache": (
            fit_flags(tmp_path / "nowhere", student_config, tmp_path / "r1"),
            ["no cache at", "nowhere"],
        ),
        "vocabulary mismatch": (
            fit_flags(cache_dir, tmp_path / "wide.json", tmp_path / "r2"),
            ["vocabulary mismatch", "600", "512"],
        ),
        "empty cache": (
            fit_flags(empty_copy(cache_dir, tmp_path / "empty"), student_config, tmp_path / "r3"),
            ["holds no sequences"],
        ),
        "corrupted chunk": (
            fit_flags(corrupt_copy(cache_dir, tmp_path / "corrupt"), student_config,
                      tmp_path / "r5", steps=0, epochs=1, num_workers=2),
            ["part-000001", "logitcache verify"],
        ),
    }  # fmt: skip
    env = cli_env() | {"OMP_NUM_THREADS": "1"}  # several at once on a small machine
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "trainer", *map(str, flags)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name, (flags, _) in cases.items()
    }
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, f"{name}: exit {proc.returncode}\n{stderr}"
        assert "Traceback" not in stderr, f"{name}:\n{stderr}"
        assert stderr.startswith("trainer: error: "), f"{name}:\n{stderr}"
        message = " ".join(stderr.split())
        for expected in cases[name][1]:
            assert expected in message, f"{name}: {expected!r} not in:\n{stderr}"
    assert not (tmp_path / "r2" / "checkpoint").exists()  # refused before any training

    # The same errors through the API, and a split that leaves nothing to train on.
    with pytest.raises(LogitCacheError, match=r"train split .* no sequences"):
        api_fit(cache_dir, student_config, tmp_path / "r4", eval_fraction=0.9999999)
    from trainer.evaluation import evaluate

    with pytest.raises(LogitCacheError, match="no cache at"):
        evaluate(tmp_path / "nowhere", student_config)


def test_tokenizer_is_checked_against_the_cache(
    tmp_path, cache_dir, student_config, tiny_teacher_dir
):
    manifest = logitcache.open(cache_dir).manifest
    from transformers import AutoTokenizer

    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_teacher_dir)) == (
        manifest.tokenizer.fingerprint
    )
    build_student(student_config, manifest, tokenizer=str(tiny_teacher_dir))  # the same: fine
    other = toy.train_tokenizer(toy.stdlib_files("heldout", limit=3), 300)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(LogitCacheError, match="tokenizer mismatch") as info:
        build_student(student_config, manifest, tokenizer=str(tmp_path / "other"))
    assert manifest.tokenizer.fingerprint[:16] in str(info.value)
    assert tokenizer_fingerprint(other)[:16] in str(info.value)


def test_student_sources(tmp_path, cache_dir, student_config, reference_run):
    manifest = logitcache.open(cache_dir).manifest
    a, source = build_student(student_config, manifest, seed=3)
    assert source.kind == "config"
    config_dir = tmp_path / "config-only"
    config_dir.mkdir()
    shutil.copy(student_config, config_dir / "config.json")
    b, source = build_student(config_dir, manifest, seed=3)
    c, _ = build_student(config_dir, manifest, seed=4)
    assert source.kind == "config"
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # seeded init
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    # A saved model (or a run directory holding one) continues from its weights.
    for spec in (reference_run / "model", reference_run):
        model, source = build_student(spec, manifest)
        assert source.kind == "pretrained"
        saved = weights(reference_run)
        state = model.state_dict()
        assert all(torch.equal(state[k], saved[k]) for k in saved)
    with pytest.raises(LogitCacheError, match="does not exist"):
        build_student(tmp_path / "nope", manifest)


# --------------------------------------------------------------------------------------------
# (c) eval, (d) plot


def test_eval_prints_ce_kl_top1(cache_dir, reference_run):
    proc = cli("eval", "--cache", cache_dir, "--student", reference_run)
    final = json.loads((reference_run / "summary.json").read_text())["final"]["eval"]
    for label, key in (("CE", "ce"), ("KL", "kl"), ("top-1", "top1")):
        assert f"{label} " in proc.stdout
        assert f"{final[key]:.4f}" in proc.stdout  # the run's own held-out numbers

    from trainer.evaluation import evaluate

    held_out = evaluate(cache_dir, reference_run)  # the run's eval fraction, from summary.json
    rest = evaluate(cache_dir, reference_run, split="train")
    assert held_out["tokens"] == final["tokens"]
    manifest = logitcache.open(cache_dir).manifest
    # Every position but each sequence's last has a label.
    assert held_out["tokens"] + rest["tokens"] == manifest.tokens - manifest.sequences
    assert 0 <= rest["top1"] <= 1 and rest["kl"] >= 0 and rest["ce"] > 0


def test_plot_writes_a_png(reference_run):
    proc = cli("plot", reference_run)
    png = reference_run / "curves.png"
    assert str(png) in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# (e) KD against hard labels


def test_kd_is_closer_to_the_teacher_than_hard_labels(
    tmp_path, monkeypatch, cache_dir, student_config, reference_run
):
    import trainer.losses

    def no_targets(*args, **kwargs):
        raise AssertionError("alpha=1 must not compute a loss from the cached targets")

    monkeypatch.setattr(trainer.losses, "distillation_loss", no_targets)
    hard = api_fit(cache_dir, student_config, tmp_path / "hard", alpha=1.0)
    kd = json.loads((reference_run / "summary.json").read_text())
    # Same init, data order and steps; only the objective differs.
    kd_eval, hard_eval = kd["final"]["eval"], hard["final"]["eval"]
    assert kd_eval["kl"] < 0.9 * hard_eval["kl"], (kd_eval, hard_eval)
    rows = [r for r in metrics(tmp_path / "hard") if r["kind"] == "train"]
    assert all(r["kd"] == 0.0 and r["loss"] == r["ce"] for r in rows)


def test_fit_help_has_every_setting_and_examples():
    import dataclasses

    from typer.testing import CliRunner

    from trainer.cli import app

    result = CliRunner().invoke(app, ["fit", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for field in dataclasses.fields(FitConfig):
        flag = "--" + field.name.replace("_", "-")
        assert flag in text, flag
    assert "Examples" in text and "trainer fit --cache ./cache" in text


def test_the_trainer_never_imports_the_teacher_or_writer_side():
    code = (
        "import sys, trainer.cli, trainer.recipe, trainer.evaluation, trainer.plot, trainer.student; "
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('logitcache'))))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(proc.stdout.split())
    assert "logitcache.read.reader" in loaded
    assert not loaded & {
        "logitcache.dumping.pipeline",
        "logitcache.dumping.teacher",
        "logitcache.write.writer",
    }, loaded


def test_after_step_sees_every_step_and_the_final_weights(
    tmp_path, cache_dir, student_config, reference_run
):
    """`fit(after_step=...)` is called once per step, in order, with the live student; watching
    the run changes nothing: the final weights are the reference run's, bit for bit."""
    seen: list[tuple[int, bool, float]] = []

    def watch(step: int, model: torch.nn.Module) -> None:
        first = next(model.parameters())
        seen.append((step, model.training, float(first.detach().double().sum())))

    out = tmp_path / "watched"
    config = FitConfig(
        cache=str(cache_dir), student=str(student_config), out=str(out), progress=False,
        **SETTINGS,
    )  # fmt: skip
    fit(config, after_step=watch)
    assert [s for s, _, _ in seen] == list(range(1, STEPS + 1))
    assert all(training for _, training, _ in seen)
    assert len({value for _, _, value in seen}) == STEPS  # the weights moved every step
    assert_same_weights(out, reference_run)
