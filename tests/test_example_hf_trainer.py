"""examples/hf_trainer.py as a user runs it: a real subprocess on the tiny cache, --quick."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from tests.cli import REPO, cli_env

EXAMPLE = REPO / "examples" / "hf_trainer.py"


def run_example(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *map(str, args)], capture_output=True, text=True,
        env=cli_env(), cwd=REPO, timeout=300, check=False,
    )  # fmt: skip


def test_the_quick_example_distils_and_saves_a_student(tmp_path, tiny_cache, tiny_student_config):
    out = tmp_path / "run"
    proc = run_example(tiny_cache, "--student", tiny_student_config, "--out", out, "--quick",
                       "--eval-fraction", "0.1", "--save-steps", "10")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 20 and len(results["train_loss"]) == 4
    assert results["eval_loss_after"] < results["eval_loss_before"]
    held = results["held_out"]
    assert math.isfinite(held["kl"]) and held["split"] == "eval" and held["tokens"] > 0
    assert (out / "model" / "config.json").is_file() and (out / "checkpoint-10").is_dir()
    assert "held-out: eval loss" in proc.stdout and "KL to the teacher" in proc.stdout

    # --resume continues from the last checkpoint: 10 more steps to a longer run's end
    proc = run_example(tiny_cache, "--student", tiny_student_config, "--out", out, "--quick",
                       "--eval-fraction", "0.1", "--max-steps", "30", "--resume")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["steps"] == 30 and resumed["train_loss"][:4] == results["train_loss"]


def test_a_student_of_another_vocabulary_exits_2_with_the_reason(
    tmp_path, tiny_cache, tiny_student_config
):
    wide = json.loads(tiny_student_config.read_text()) | {"vocab_size": 600}
    (tmp_path / "wide.json").write_text(json.dumps(wide))
    proc = run_example(
        tiny_cache, "--student", tmp_path / "wide.json", "--out", tmp_path / "r", "--quick"
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        proc.stderr.startswith("hf_trainer: error: vocabulary mismatch")
        and "Traceback" not in proc.stderr
    )
    assert not (tmp_path / "r").exists()
