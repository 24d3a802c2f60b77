"""`logitcache dump --teacher A --teacher B` and `logitcache ensemble` as real subprocesses: an
ensemble written, a combine killed half-way that leaves no usable cache and resumes to the same
one, and bad input: exit 2, one message naming the problem, no traceback, nothing written."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

import logitcache
from logitcache.errors import LogitCacheError
from logitcache.write.ensemble import ensemble
from tests.cli import REPO, cli_env
from tests.logitcache.dump_helpers import cli_command, describe, flat, run_cli

DUMP = ["--targets", "topk", "--top-k", "4", "--seq-len", "64", "--part-tokens", "256"]


def refused(proc: subprocess.CompletedProcess[str], phrase: str, out: Path) -> None:
    assert proc.returncode == 2, describe(proc)
    assert phrase in flat(proc.stderr), describe(proc)
    assert "Traceback" not in proc.stderr and flat(proc.stderr).count("error:") == 1
    assert not out.exists()


def test_ensemble_dump_cli_writes_the_ensemble_record(
    tmp_path, tiny_teacher_dir, second_teacher_dir, small_corpus
):
    out = tmp_path / "cache"
    proc = run_cli(
        "dump", "--teacher", tiny_teacher_dir, "--teacher", second_teacher_dir, "--ensemble",
        "probs", "--weights", "2,1", "--data", small_corpus, "--out", out, *DUMP,
    )  # fmt: skip
    assert proc.returncode == 0, describe(proc)
    assert "full logits (an ensemble" in proc.stdout
    doc = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert doc["format_version"] == "1.3" and doc["ensemble"]["mode"] == "probs"
    members = doc["ensemble"]["members"]
    assert [m["teacher"]["name"] for m in members] == [
        str(tiny_teacher_dir),
        str(second_teacher_dir),
    ]
    assert [m["weight"] for m in members] == pytest.approx([2 / 3, 1 / 3])
    assert "cache" not in members[0]  # a one-pass dump's members have no cache of their own
    assert logitcache.open(out).manifest.teacher.name.startswith("ensemble (probs) of ")
    info = run_cli("info", out)
    assert info.returncode == 0, describe(info)
    assert f"probs average of {tiny_teacher_dir} (0.667) + {second_teacher_dir} (0.333)" in flat(
        info.stdout
    )


@pytest.mark.parametrize(
    ("flags", "phrase"),
    [
        (["--weights", "1,2,3"], "--weights gives 3 weights for 2 teachers"),
        (["--weights", "1,-1"], "--weights must be positive numbers, got -1"),
        (["--weights", "1,x"], "--weights must be numbers separated by commas"),
        (["--ensemble", "median"], "--ensemble must be one of logits, probs"),
        (["--other-tokenizer"], "has another tokenizer than --teacher"),
        (["--one-teacher", "--ensemble", "probs"], "give --teacher two or more times"),
    ],
)
def test_ensemble_dump_cli_refuses_bad_input(
    flags, phrase, tmp_path, tiny_teacher_dir, second_teacher_dir, other_tokenizer_teacher_dir,
    small_corpus,
):  # fmt: skip
    second = other_tokenizer_teacher_dir if "--other-tokenizer" in flags else second_teacher_dir
    teachers = ["--teacher", tiny_teacher_dir]
    if "--one-teacher" not in flags:
        teachers += ["--teacher", second]
    flags = [f for f in flags if f not in ("--other-tokenizer", "--one-teacher")]
    out = tmp_path / "cache"
    proc = run_cli("dump", *teachers, *flags, "--data", small_corpus, "--out", out, *DUMP)
    refused(proc, phrase, out)


def test_killed_combine_leaves_no_usable_cache_and_resumes_to_the_same(ensemble_members, tmp_path):
    inputs = ensemble_members["top8"]
    out = tmp_path / "out"
    command = cli_command("ensemble", out, *inputs, "--mode", "probs", "--weights", "3,1")
    env = cli_env(LOGITCACHE_FAULTS="kill@part_committed#2")
    killed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=300, check=False)  # fmt: skip
    assert killed.returncode == -9, describe(killed)
    with pytest.raises(LogitCacheError, match=r"is an unfinished dump \(2 parts committed\)"):
        logitcache.open(out)
    resumed = subprocess.run(command, capture_output=True, text=True, env=cli_env(), cwd=REPO,
                             timeout=300, check=False)  # fmt: skip
    assert resumed.returncode == 0, describe(resumed)
    assert "the probs average of 2 caches (weights 0.75, 0.25)" in resumed.stdout
    whole = ensemble(tmp_path / "whole", inputs, mode="probs", weights=[3.0, 1.0])
    done, reference = logitcache.open(out), logitcache.open(tmp_path / "whole")
    assert len(done.manifest.parts) == len(whole.parts) > 2
    for index in range(done.num_parts):
        a, b = done.read_part(index), reference.read_part(index)
        for name, array in a.arrays().items():
            assert np.array_equal(array, b.arrays()[name]), (index, name)


@pytest.mark.parametrize(
    ("inputs", "flags", "phrase"),
    [
        (["top8", "other data"], ["--mode", "probs"], "hold different data"),
        (["top8", "other tokenizer"], ["--mode", "probs"], "was dumped with another tokenizer"),
        (["top8", "top8"], ["--mode", "logits"], "stored only the top k of 512 ids"),
        (["sampled", "sampled"], ["--mode", "logits"], "cannot be averaged with --mode logits"),
        (["top8", "top8"], ["--mode", "probs", "--weights", "1,-1"], "must be positive numbers"),
        (["top8", "top8"], ["--mode", "probs", "--weights", "1"], "gives 1 weight for 2"),
    ],
)
def test_ensemble_cli_refuses_bad_input(ensemble_members, tmp_path, inputs, flags, phrase):
    caches = [ensemble_members[kind][min(i, len(ensemble_members[kind]) - 1)]
              for i, kind in enumerate(inputs)]  # fmt: skip
    out = tmp_path / "out"
    refused(run_cli("ensemble", out, *caches, *flags), phrase, out)
