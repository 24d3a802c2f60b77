"""SIGKILL in the middle of a dump from the CLI, then the same command again: readers refuse the
unfinished cache, and the rerun resumes to the uninterrupted result, byte for byte."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import logitcache
from logitcache.errors import LogitCacheError
from tests.cli import REPO, cli_env, reaped
from tests.logitcache.background import Background, cli_jobs
from tests.logitcache.dump_helpers import cli_command, describe, flat, manifest_json, run_cli


def popen_cli(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cli_command(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
        cwd=REPO,
    )


def dump_args(teacher: Path, data: Path, out: Path, **options: object) -> list[str]:
    """`dump` flags: --teacher, --data, --out, then OPTIONS as --flag-name value."""
    args = ["dump", "--teacher", teacher, "--data", data, "--out", out]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", value]
    return args


KILL_OPTIONS = {"targets": "topk", "top_k": 8, "seq_len": 64, "part_tokens": 256, "batch_size": 2}


def sigkill_scenario(root: Path, teacher: Path, stdlib_corpus: Path) -> dict:
    """Start an uninterrupted dump and a victim side by side; SIGKILL the victim once its
    manifest lists a part; rerun the victim's command. Returns what the test checks."""
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    for f in sorted(stdlib_corpus.iterdir())[:8]:  # ~12k tokens: about 50 parts
        shutil.copy(f, corpus / f.name)
    reference, killed = root / "reference", root / "killed"
    ref_proc = popen_cli(*dump_args(teacher, corpus, reference, **KILL_OPTIONS))
    victim = popen_cli(*dump_args(teacher, corpus, killed, **KILL_OPTIONS))
    with reaped(victim):
        deadline = time.monotonic() + 300
        while True:
            try:
                if manifest_json(killed)["parts"]:
                    break
            except (OSError, ValueError):
                pass  # no manifest yet
            if victim.poll() is not None:
                raise AssertionError(
                    f"the dump ended before it could be killed: {victim.communicate()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError("no part was committed in time")
            time.sleep(0.01)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)
    after_kill = manifest_json(killed)
    try:
        logitcache.open(killed)
        refused = ""
    except LogitCacheError as exc:
        refused = str(exc)
    rerun = run_cli(*dump_args(teacher, corpus, killed, **KILL_OPTIONS))
    _, ref_stderr = ref_proc.communicate(timeout=300)
    return {
        "victim_returncode": victim.returncode,
        "after_kill": after_kill,
        "refused": refused,
        "rerun": rerun,
        "reference_returncode": ref_proc.returncode,
        "reference_stderr": ref_stderr,
        "reference": reference,
        "killed": killed,
    }


def submit_background_jobs(
    jobs: Background, wanted: set[str], root: Path, request: pytest.FixtureRequest
) -> None:
    if "kill" in wanted:
        teacher = request.getfixturevalue("tiny_teacher_dir")
        corpus = request.getfixturevalue("stdlib_corpus")
        jobs.submit("kill", sigkill_scenario, root / "kill", teacher, corpus)


@cli_jobs(lambda _: ["kill"])
def test_sigkill_then_rerun_gives_the_uninterrupted_result(background: Background):
    run = background.result("kill")
    assert run["victim_returncode"] == -signal.SIGKILL
    assert not run["after_kill"]["complete"], "the kill landed after the dump had finished"
    committed = len(run["after_kill"]["parts"])
    assert "unfinished dump" in run["refused"]
    rerun = run["rerun"]
    assert rerun.returncode == 0, describe(rerun)
    assert f"resumed after {committed} committed parts" in flat(rerun.stdout)
    assert run["reference_returncode"] == 0, run["reference_stderr"]

    killed, reference = run["killed"], run["reference"]
    resumed_manifest, reference_manifest = manifest_json(killed), manifest_json(reference)
    assert len(reference_manifest["parts"]) > committed + 2, "the kill did not land mid-run"
    for m in (resumed_manifest, reference_manifest):
        m.pop("created")
    assert resumed_manifest == reference_manifest  # includes every file's sha256
    listed = {f for p in resumed_manifest["parts"] for f in p["files"]}
    files = {p for p in (killed / "parts").rglob("*") if p.is_file()}
    assert {p.relative_to(killed / "parts").as_posix() for p in files} == listed, "orphans left"
    assert not [p.name for p in killed.iterdir() if p.name.startswith(".")], "temporaries left"
    resumed_cache, reference_cache = logitcache.open(killed), logitcache.open(reference)
    for a, b in zip(resumed_cache.iter_parts(), reference_cache.iter_parts(), strict=True):
        for name in ("input_ids", "target_ids", "target_logprobs", "seq_offsets"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
