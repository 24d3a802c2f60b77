"""demo_classify.py: `--help` (fast) and a `--quick` end-to-end run through the CLIs (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli import REPO, cli_env

DEMO = REPO / "demo_classify.py"


def test_help_describes_the_steps() -> None:
    proc = subprocess.run([sys.executable, DEMO, "--help"], capture_output=True, text=True,
                          env=cli_env(), timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0 and "--views" in proc.stdout and "--quick" in proc.stdout


@pytest.mark.slow
def test_quick_run_prints_the_table(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, DEMO, "--quick", "--out", tmp_path],
                          capture_output=True, text=True, env=cli_env(), timeout=600, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "results on the 600 test digits" in proc.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    for name in ("distilled (cache)", "hard labels"):
        assert 0.0 <= results[name]["accuracy"] <= 1.0 and results[name]["kl"] >= 0
