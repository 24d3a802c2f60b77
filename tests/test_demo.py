"""demo.py: `--help` and the results table (fast), and a `--quick` end-to-end run (slow)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "demo.py"


def _demo_module():
    spec = importlib.util.spec_from_file_location("demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_table(stdout: str) -> dict[str, list[float]]:
    """{row label: [CE, KL, top-1]} from the demo's results table."""
    table = stdout.split("== results on", 1)[1]
    rows = {}
    for line in table.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] in ("teacher", "distilled", "hard labels"):
            rows[cells[0]] = [float(v) for v in cells[1:4]]
    return rows


def check_rows(rows: dict[str, list[float]]) -> None:
    assert list(rows) == ["teacher", "distilled", "hard labels"]
    for ce, kl, top1 in rows.values():
        assert math.isfinite(ce) and ce > 0 and kl >= 0 and 0 <= top1 <= 1


def test_help_lists_the_flags():
    proc = subprocess.run(
        [sys.executable, str(DEMO), "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    for flag in ("--quick", "--teacher-steps", "--epochs", "--steps", "--out", "--targets",
                 "--samples", "--top-k", "--train-files"):  # fmt: skip
        assert flag in proc.stdout


def test_report_prints_the_table_setting_and_margin(tmp_path):
    demo = _demo_module()
    results = {
        "teacher": {"ce": 4.5, "kl": 0.00001, "top1": 1.0},
        "distilled": {"ce": 5.25, "kl": 0.6, "top1": 0.55},
        "hard labels": {"ce": 5.75, "kl": 1.2, "top1": 0.4},
    }
    record = {
        "preset": "full",
        "settings": {"teacher_dir": "teacher"},
        "setting": {
            "teacher": "GPT-2 3x192", "teacher_tokens": 1_228_800, "teacher_files": 698,
            "student": "GPT-2 2x128", "slice_files": 100, "slice_tokens": 150_000,
            "epochs": 4.0, "steps": 292, "targets": "sampled targets (64 draws per position)",
            "cache_bytes_per_token": 53.8, "alpha": 0.5,
        },
        "heldout": {"tokens": 59_000, "files": 36},
        "results": results,
        "margin_ce": results["distilled"]["ce"] - results["hard labels"]["ce"],
        "phases_seconds": {"teacher build": 250.0, "fit: distilled": 80.0},
        "total_seconds": 330.0,
        "total_cpu_seconds": 600.0,
        "load_average": {"before": [0.1, 0, 0], "after": [2.0, 0, 0]},
        "cpus": 2,
    }  # fmt: skip
    text = demo.report(record, tmp_path / "demo-out")
    rows = parse_table(text)
    check_rows(rows)
    assert rows["teacher"] == [4.5, 0.0, 1.0]
    assert rows["hard labels"] == [5.75, 1.2, 0.4]
    assert "Setting: data-limited distillation" in text
    assert "8x the text either student sees" in text
    assert "= -0.5000 nats/token (distillation better; -8.7%)" in text
    assert "teacher build 250 s" in text
    assert f"Everything is in {tmp_path / 'demo-out'}/: teacher/, data/" in text


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo-out"
    proc = subprocess.run(
        [sys.executable, str(DEMO), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = parse_table(proc.stdout)
    check_rows(rows)
    assert "Margin: distilled minus hard-label held-out CE" in proc.stdout
    record = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert set(record["results"]) == set(rows)
    assert record["results"]["teacher"]["kl"] < 1e-3  # the teacher against its own targets
    for run in ("kd", "hard"):
        assert (out / "runs" / run / "model" / "model.safetensors").is_file()
        assert (out / "runs" / run / "summary.json").is_file()
