"""demo.py: `--help` (fast) and a `--quick` end-to-end smoke run (slow)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "demo.py"


def test_help_lists_the_flags():
    proc = subprocess.run(
        [sys.executable, str(DEMO), "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    for flag in ("--quick", "--teacher-steps", "--steps", "--out", "--top-k"):
        assert flag in proc.stdout


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo-out"
    proc = subprocess.run(
        [sys.executable, str(DEMO), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = proc.stdout.split("== results on", 1)[1]
    cells = [
        re.split(r"\s{2,}", line.strip())
        for line in table.splitlines()
        if line.startswith(("distilled", "hard labels"))
    ]
    rows = {row[0]: row[1:] for row in cells}
    assert set(rows) == {"distilled (alpha 0.5)", "hard labels only (alpha 1)"}
    for values in rows.values():
        ce, kl, top1 = (float(v) for v in values[:3])
        assert math.isfinite(ce) and ce > 0 and kl >= 0 and 0 <= top1 <= 1
    for run in ("kd", "hard"):
        assert (out / "runs" / run / "model" / "model.safetensors").is_file()
        assert (out / "runs" / run / "summary.json").is_file()
