"""./run, the README's two commands: usage, a refused command, a too-old Python; no venv is made.

Every case stops before any environment is created (`VENV` points into tmp_path and must stay
absent), so these run in a second.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "run"


def run(*args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    venv = tmp_path / "venv"
    proc = subprocess.run(
        [str(RUN), *args], capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "VENV": str(venv), **env},
    )  # fmt: skip
    assert not venv.exists(), "the test must not create a virtual environment"
    return proc


def test_help_shows_usage_and_examples(tmp_path):
    for flag in ("--help", "-h", "help"):
        proc = run(flag, tmp_path=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("Usage: ./run COMMAND")
        for example in ("./run demo", "./run demo --quick", "./run test", "./run test -m slow"):
            assert f"\n  {example} " in proc.stdout
        assert "torch==2.13.0" in proc.stdout


def test_an_unknown_command_exits_2_with_usage(tmp_path):
    proc = run("bogus", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "run: unknown command 'bogus'" in proc.stderr
    assert "Usage: ./run COMMAND" in proc.stderr
    assert proc.stdout == ""
    proc = run(tmp_path=tmp_path)  # no command at all
    assert proc.returncode == 2 and "Usage: ./run COMMAND" in proc.stderr


def test_a_python_older_than_pyproject_requires_is_refused(tmp_path):
    old = tmp_path / "python3.8"
    old.write_text(  # answers the version query with 3.8.10, fails the version check
        '#!/bin/sh\ncase "$2" in *"len(want)"*) exit 1;; *version_info*) echo 3.8.10;; esac\n'
    )
    old.chmod(0o755)
    proc = run("test", tmp_path=tmp_path, PYTHON=str(old))
    assert proc.returncode == 1
    assert "is Python 3.8.10, but this project needs Python 3.10 or newer" in proc.stderr
    proc = run("setup", tmp_path=tmp_path, PYTHON=str(tmp_path / "missing-python"))
    assert proc.returncode == 1 and "not found: install Python 3.10 or newer" in proc.stderr


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    first_lines = re.findall(r"```bash\n([^\n]*)", readme)
    assert [line.split("#")[0].strip() for line in first_lines[:2]] == ["./run demo", "./run test"]
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1] == "exec ./run test"
