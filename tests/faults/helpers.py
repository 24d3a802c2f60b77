"""What the fault-injection tests share: the CLI environment, one small dump, cache comparison."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli import REPO, cli_env

#: A dump of 6 stdlib files with these settings: ~10.7k tokens in 43 parts of 4 sequences, so
#: that a kill lands between many commits (about 0.1 s of teacher work per part).
OPTIONS = {"targets": "topk", "top_k": 8, "seq_len": 64, "part_tokens": 256, "batch_size": 2}
FILES = 6


def dump_command(teacher: Path, data: Path, out: Path, *extra: object) -> list[str]:
    args = [sys.executable, "-m", "logitcache", "dump", "--teacher", str(teacher),
            "--data", str(data), "--out", str(out), "--device", "cpu", "--no-progress"]  # fmt: skip
    for key, value in OPTIONS.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args + [str(e) for e in extra]


def run(command: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, capture_output=True, text=True, env=cli_env(**env), cwd=REPO, timeout=timeout
    )


def popen(command: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=cli_env(**env), cwd=REPO,
    )  # fmt: skip


def flat(text: str) -> str:
    return " ".join(text.split())


def describe(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text(encoding="utf-8"))


def committed_parts(root: Path) -> int:
    """Parts listed in the manifest now (-1 while there is none, or it is being replaced)."""
    try:
        return len(manifest(root)["parts"])
    except (OSError, ValueError, KeyError):
        return -1


def assert_same_cache(got: Path, want: Path) -> None:
    """Byte for byte the same cache: the manifest (but `created`), every file under parts/, the
    card; and nothing else left over (no orphan part, temporary file or lock)."""
    a, b = manifest(got), manifest(want)
    a.pop("created"), b.pop("created")
    assert a == b, "manifests differ"
    assert a["complete"]

    def files(root: Path) -> dict[str, bytes]:
        return {
            p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", "README.md")
        }

    fa, fb = files(got), files(want)
    assert sorted(fa) == sorted(fb), f"file sets differ: {sorted(set(fa) ^ set(fb))[:10]}"
    different = [rel for rel in fa if fa[rel] != fb[rel]]
    assert not different, f"files differ: {different[:10]}"
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())


def run_main(main, argv: list[object], capsys) -> tuple[int, str, str]:
    """Run a CLI entry point (`logitcache.cli.commands.main`, `trainer.cli.main`) in this process, as the
    shell would: argument parsing, the error handler, the exit code. (exit code, stdout, stderr)"""
    import torch

    old, threads = sys.argv, torch.get_num_threads()
    sys.argv = [str(a) for a in argv]
    torch.set_num_threads(1)  # like OMP_NUM_THREADS=1 in the subprocesses
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def mount(*args: str) -> subprocess.CompletedProcess:
    """`mount ARGS...` (a remount to resize or make read-only a tmpfs of `small_tmpfs`)."""
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=60)


@contextlib.contextmanager
def small_tmpfs(mountpoint: Path, size: str, covered_by: str) -> Iterator[Path]:
    """A real size-limited tmpfs at `mountpoint` for the block, unmounted after; the test is
    skipped, naming `covered_by` (the test that checks the same handler without a mount), where
    this machine cannot mount one (not root, no mount command, no permission)."""
    mountpoint.mkdir()
    if os.geteuid() != 0:
        pytest.skip(f"mounting a tmpfs needs root; {covered_by}")
    try:
        proc = mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint))
    except FileNotFoundError:
        pytest.skip(f"no mount command here; {covered_by}")
    if proc.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({proc.stderr.strip()}); {covered_by}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], capture_output=True, timeout=60)


def checkpoint_step(run: Path) -> int:
    """The step of a trainer run's last committed checkpoint, -1 before the first."""
    try:
        return json.loads((run / "checkpoint" / "config.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def wait_for_checkpoint(victim: subprocess.Popen, run: Path, step: int, poll: float) -> None:
    """Return once `victim` (a trainer writing `run`) has checkpointed `step` or later: the
    moment a fault test strikes. Fails if the run ends first or takes over 5 minutes."""
    deadline = time.monotonic() + 300
    while checkpoint_step(run) < step:
        assert victim.poll() is None, f"the run ended before the fault: {victim.communicate()}"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(poll)
