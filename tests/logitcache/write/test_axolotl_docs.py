"""examples/axolotl_export.md and README's "Train with your own stack" (its axolotl and datasets
subsections) run as written, so the documented commands cannot rot.

Each document's code blocks run in order in a directory holding ``./cache`` (a real dump of the
tiny teacher) and ``./teacher`` (its saved tokenizer and model): ``bash`` blocks through bash
with the installed ``logitcache`` command first on PATH, the ``python`` blocks as one script
(later blocks use earlier names), and ``yaml`` blocks parsed and checked against the export.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli import REPO, cli_env

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXAMPLE = REPO / "examples" / "axolotl_export.md"
README = REPO / "README.md"


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block of `text`, in order."""
    return re.findall(r"```(\w+)\n(.*?)```", text, flags=re.DOTALL)


def readme_section(*titles: str) -> str:
    """The README subsections `titles` of "## Train with your own stack", each up to the next
    heading of its level or above."""
    text = README.read_text(encoding="utf-8")
    start = text.index("## Train with your own stack")
    section = text[start : text.index("\n## ", start + 1)]
    parts = []
    for title in titles:
        at = section.index(f"### {title}\n")
        end = min(
            (i for i in (section.find("\n### ", at + 1), section.find("\n## ", at + 1)) if i > 0),
            default=len(section),
        )
        parts.append(section[at:end])
    return "\n".join(parts)


@pytest.fixture
def workdir(tmp_path: Path, small_caches, tiny_teacher_dir: Path) -> Path:
    shutil.copytree(small_caches["zarr"], tmp_path / "cache")
    shutil.copytree(tiny_teacher_dir, tmp_path / "teacher")
    return tmp_path


def run_blocks(text: str, where: Path) -> tuple[dict[str, list[str]], str]:
    """Run the bash and python blocks of `text` in `where`; return every block by language, and
    what the python blocks printed."""
    env = cli_env(HF_DATASETS_CACHE=str(where / ".hf"), TRL_EXPERIMENTAL_SILENCE="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    found: dict[str, list[str]] = {}
    for language, code in blocks(text):
        found.setdefault(language, []).append(code)
        if language == "bash":
            proc = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", code], cwd=where, env=env, capture_output=True,
                text=True, timeout=300, check=False,
            )  # fmt: skip
            assert proc.returncode == 0, f"{code}\n--- stdout\n{proc.stdout}\n--- {proc.stderr}"
    script = "\n\n".join(found.get("python", []))
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=where, env=env, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"{script}\n--- stdout\n{proc.stdout}\n--- {proc.stderr}"
    return found, proc.stdout


def test_the_axolotl_example_runs_as_written(workdir: Path):
    found, printed = run_blocks(EXAMPLE.read_text(encoding="utf-8"), workdir)
    assert len(found["bash"]) >= 1 and len(found["python"]) >= 2
    if importlib.util.find_spec("axolotl") is not None:  # the collator block ran
        assert "'target_logprobs': (2, " in printed, printed
    assert sorted(p.name for p in (workdir / "cache-axolotl").iterdir()) == [
        "data", "logitcache-axolotl.json",
    ]  # fmt: skip
    yaml = pytest.importorskip("yaml")
    (config,) = (yaml.safe_load(code) for code in found["yaml"])
    assert config["kd_trainer"] is True
    assert "axolotl.integrations.kd.KDPlugin" in config["plugins"]
    assert (workdir / config["datasets"][0]["path"]).is_dir()


def test_the_readme_sections_run_as_written(workdir: Path):
    found, _ = run_blocks(readme_section("axolotl", "datasets"), workdir)
    assert set(found) == {"bash", "python"}
    assert (workdir / "cache-axolotl" / "data").is_dir()
