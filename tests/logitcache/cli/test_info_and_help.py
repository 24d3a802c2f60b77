"""`logitcache info --json` describes a cache; `--help` and `dump --help` exit 0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import logitcache
from logitcache.dumping.options import DEFAULT_TARGETS, DEFAULT_TOP_K
from tests.logitcache.background import Background, cli_jobs
from tests.logitcache.dump_helpers import SMALL, VOCAB, describe, run_cli


def submit_background_jobs(
    jobs: Background, wanted: set[str], root: Path, request: pytest.FixtureRequest
) -> None:
    for key, args in {
        "info": ["info", request.getfixturevalue("small_caches")["zarr"], "--json"],
        "help": ["--help"],
        "dump_help": ["dump", "--help"],
    }.items():
        if key in wanted:
            jobs.submit(key, run_cli, *args)


@cli_jobs(lambda _: ["info"])
def test_info_json(background: Background, small_caches: dict[str, Path]):
    proc = background.result("info")
    assert proc.returncode == 0, describe(proc)
    info = json.loads(proc.stdout)
    for key in ("teacher", "tokenizer", "data", "targets", "size_bytes"):
        assert key in info
    assert info["teacher"]["vocab_size"] == VOCAB
    assert info["targets"]["k"] == SMALL["top_k"]
    root = small_caches["zarr"]
    assert info["size_bytes"] == sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    assert info["tokens"] == logitcache.open(root).manifest.tokens


@cli_jobs(lambda p: [p["run"]])
@pytest.mark.parametrize(("run", "phrase"), [("help", "dump"), ("dump_help", "--top-k")])
def test_help_exits_0(background: Background, run: str, phrase: str):
    proc = background.result(run)
    assert proc.returncode == 0, describe(proc)
    assert "Usage" in proc.stdout and phrase in proc.stdout


@cli_jobs(lambda _: ["dump_help"])
def test_dump_help_shows_the_default_targets_and_how_to_ask_for_top_k(background: Background):
    proc = background.result("dump_help")
    text = " ".join(proc.stdout.replace("\u2502", " ").split())  # less the table's borders
    assert f"Default {DEFAULT_TARGETS}, or the kind of the target options given" in text
    assert f"fully supported (--targets topk --top-k {DEFAULT_TOP_K})" in text
    assert "--targets topp --top-p 0.95 --max-k 128" in text  # an example of adaptive k
