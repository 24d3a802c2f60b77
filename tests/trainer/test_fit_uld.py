"""`trainer fit --loss uld` end to end through the real CLI: a student with another tokenizer
trains from a cache dumped with --offsets, `trainer eval --tokenizer` measures it in its own
tokens, and every bad input is one clear line with exit 2 and nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from logitcache import LogitCacheError
from tests.cli import REPO, cli_env, reaped
from tests.trainer.uld_helpers import (  # noqa: F401
    offsets_cache,
    student_tokenizer_dir,
    uld_student_config,
)
from trainer.recipe import FitConfig, fit


def trainer(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainer", *map(str, args)], capture_output=True, text=True,
        env=cli_env(), cwd=REPO, timeout=300, check=False,
    )  # fmt: skip


def uld_flags(
    cache: Path, student: Path, tokenizer: Path | None, out: Path, loss: str = "uld"
) -> list[object]:
    flags = ["fit", "--cache", cache, "--student", student, "--out", out, "--no-progress",
             "--steps", 6, "--batch-size", 4, "--eval-fraction", 0.1, "--log-every", 2,
             "--loss", loss]  # fmt: skip
    return flags + ([] if tokenizer is None else ["--tokenizer", tokenizer])


@pytest.mark.slow  # two interpreters with torch: ~40 s on the shared machine; fast twin below
def test_a_student_with_its_own_tokenizer_trains_and_evaluates(
    tmp_path,
    offsets_cache,  # noqa: F811
    student_tokenizer_dir,  # noqa: F811
    uld_student_config,  # noqa: F811
):
    out = tmp_path / "run"
    proc = trainer(*uld_flags(offsets_cache, uld_student_config, student_tokenizer_dir, out))
    assert proc.returncode == 0, proc.stderr
    assert "held-out CE" in proc.stdout and "ULD" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    final = summary["final"]["eval"]
    assert 0 < final["uld"] <= 2 and 0.3 < final["paired"] < 1 and final["ce"] > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert train and all(abs(r["loss"] - r["ce"] - r["kd"]) < 1e-4 for r in train)  # weight 1
    proc = trainer(
        "eval", "--cache", offsets_cache, "--student", out, "--tokenizer", student_tokenizer_dir,
        "--split", "all", "--max-batches", 4, "--json", "--device", "cpu",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    measured = json.loads(proc.stdout)
    assert measured["ce"] > 0 and 0 < measured["uld"] <= 2 and measured["sequences"] == 32


def test_the_same_path_through_the_api(
    tmp_path,
    offsets_cache,  # noqa: F811
    student_tokenizer_dir,  # noqa: F811
    uld_student_config,  # noqa: F811
):
    config = FitConfig(
        cache=str(offsets_cache), student=str(uld_student_config), out=str(tmp_path / "run"),
        tokenizer=str(student_tokenizer_dir), loss="uld", uld_weight=0.5, steps=4, batch_size=4,
        eval_fraction=0.1, log_every=1, progress=False, device="cpu",
    )  # fmt: skip
    summary = fit(config)
    final = summary["final"]["eval"]
    assert 0 < final["uld"] <= 2 and 0.3 < final["paired"] < 1
    row = summary["final"]["train"]
    assert abs(row["loss"] - row["ce"] - 0.5 * row["kd"]) < 1e-4
    from trainer.evaluation import evaluate

    # the run directory names its own tokenizer: no --tokenizer needed
    measured = evaluate(offsets_cache, tmp_path / "run", device="cpu", max_batches=2)
    assert measured["ce"] == pytest.approx(final["ce"], rel=0.2) and measured["sequences"] == 16
    assert 0 < measured["uld"] <= 2


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(
    tmp_path,
    offsets_cache,  # noqa: F811
    tiny_student_config,
    student_tokenizer_dir,  # noqa: F811
    uld_student_config,  # noqa: F811
):
    broken = tmp_path / "broken.json"
    broken.write_text("{ this is not a tokenizer", encoding="utf-8")
    cases = {
        "tokenizer file that does not load": (
            uld_flags(offsets_cache, uld_student_config, broken, tmp_path / "r1"),
            ["cannot load a tokenizer from --tokenizer", str(broken)],
        ),
        "other tokenizer, other loss": (
            uld_flags(offsets_cache, tiny_student_config, student_tokenizer_dir, tmp_path / "r2",
                      loss="forward_kl"),
            ["tokenizer mismatch", "--loss uld"],
        ),
    }  # fmt: skip
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "trainer", *map(str, flags)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
            cwd=REPO,
        )
        for name, (flags, _) in cases.items()
    }
    for name, proc in procs.items():
        with reaped(proc):
            _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, f"{name}: exit {proc.returncode}\n{stderr}"
        assert "Traceback" not in stderr, f"{name}:\n{stderr}"
        assert stderr.startswith("trainer: error: "), f"{name}:\n{stderr}"
        message = " ".join(stderr.split())
        for phrase in cases[name][1]:
            assert phrase in message, f"{name}: {phrase!r} not in:\n{stderr}"
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_bad_settings_are_refused_before_anything_is_written(
    tmp_path,
    offsets_cache,  # noqa: F811
    tiny_cache,
    student_tokenizer_dir,  # noqa: F811
    uld_student_config,  # noqa: F811
):
    broken_dir = tmp_path / "broken-dir"
    broken_dir.mkdir()
    (broken_dir / "tokenizer.json").write_text("[]", encoding="utf-8")
    narrow = tmp_path / "narrow.json"
    narrow.write_text(
        json.dumps(json.loads(uld_student_config.read_text()) | {"vocab_size": 100}),
        encoding="utf-8",
    )
    good = {"cache": str(offsets_cache), "student": str(uld_student_config), "loss": "uld",
            "tokenizer": str(student_tokenizer_dir), "steps": 2, "progress": False}  # fmt: skip
    cases = [
        ({"tokenizer": str(broken_dir)}, "cannot load a tokenizer from --tokenizer"),
        ({"tokenizer": None}, "--loss uld needs --tokenizer"),
        ({"fused_loss": True}, "drop --fused-loss"),
        ({"uld_weight": -1.0}, "--uld-weight must be 0 or more"),
        ({"cache": str(tiny_cache)}, "holds only token ids.*--offsets"),
        ({"student": str(narrow)}, "vocabulary mismatch.*100.*320"),
    ]
    for i, (change, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        with pytest.raises(LogitCacheError, match=message):
            fit(FitConfig(**good | change, out=str(out)))
        assert not out.exists(), change
