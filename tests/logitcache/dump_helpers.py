"""What the dump tests share: the settings of the caches they dump, a dump through the library,
and the real `python -m logitcache` subprocess with its output made easy to assert on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import logitcache
from logitcache.dumping.pipeline import DumpOptions, dump
from tests.cli import REPO, cli_env

VOCAB = 512  # the tiny teacher's
#: Settings of the small caches. Both kinds of cache are top-k whatever the dump's default
#: target kind (`logitcache.dumping.options.DEFAULT_TARGETS`): their tests read log-probs.
SMALL = {"targets": "topk", "top_k": 4, "seq_len": 64, "part_tokens": 256}
#: The main caches: the whole stdlib corpus, 8 ids per position, several parts, and zarr inner
#: chunks of 4 KiB so that the target shards hold several inner chunks each.
MAIN = {"targets": "topk", "top_k": 8, "seq_len": 128, "part_tokens": 2048, "chunk_bytes": 4096,
        "batch_size": 8}  # fmt: skip


def cli_command(*args: object) -> list[str]:
    command = [sys.executable, "-m", "logitcache", *map(str, args)]
    if args and args[0] == "dump":
        command += ["--no-progress", "--device", "cpu"]
    return command


def run_cli(*args: object, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `logitcache ARGS` (dump gets --no-progress --device cpu) and capture its output."""
    return subprocess.run(
        cli_command(*args),
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=REPO,
        timeout=timeout,
        check=False,
    )


def flat(text: str) -> str:
    """Whitespace-normalised text, so a phrase matches across the CLI's line wrapping."""
    return " ".join(text.split())


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def dump_in_process(teacher: Path, data: Path, out: Path, **options: object) -> Path:
    """A dump through the library, not the CLI (no interpreter start-up, same code path)."""
    dump(
        DumpOptions(
            data=str(data),
            out=out,
            teacher=str(teacher),
            device="cpu",
            progress=False,
            **options,
        )
    )
    return out


def sequences_of(path: Path) -> list[logitcache.CacheSequence]:
    return list(logitcache.open(path))


def manifest_json(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text(encoding="utf-8"))


def write_docs(directory: Path, docs: list[str]) -> Path:
    directory.mkdir(parents=True)
    for i, doc in enumerate(docs):
        (directory / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    return directory
