"""SIGKILL a dump at random points, rerun the same command: the final cache is byte for byte the
uninterrupted one (nothing lost, nothing duplicated, no orphan or temporary left).

The kill points come from a seeded generator (seed `SEED`, or FAULT_SEED from the environment)
and are printed. Half are steps of the commit protocol, reached exactly through
LOGITCACHE_FAULTS (the process SIGKILLs itself there: a part written but not renamed, renamed
but not listed, a manifest staged but not renamed over the old one, a part just committed);
half are a SIGKILL from outside after a random delay, wherever the dump happens to be (loading
the teacher, a teacher forward, compressing, hashing, fsync...). Two cases run by default, the
other eight with -m slow.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.cli import reaped
from tests.faults.helpers import (
    assert_same_cache,
    committed_parts,
    dump_command,
    flat,
    manifest,
    popen,
    run_main,
)

SEED = int(os.environ.get("FAULT_SEED", "6029"))
CASES = 10
DEFAULT = 2  # cases in the default run; the rest are slow
#: The protocol steps of the 5 point cases, in order (the first runs by default).
POINTS = ("manifest_staged", "part_renamed", "part_written", "part_committed", "manifest_staged")
PARTS = 43  # in the reference dump


def kill_plan(seed: int) -> list[dict]:
    """The kill points, alternating protocol steps and random delays."""
    rng = random.Random(seed)
    plan = []
    for i in range(CASES):
        if i % 2 == 0:
            point, nth = POINTS[i // 2], rng.randint(1, PARTS - 2)
            plan.append({"id": f"{i}-{point}#{nth}", "faults": f"kill@{point}#{nth}"})
        else:
            delay = round(rng.uniform(0.0, 3.0), 2)
            plan.append({"id": f"{i}-after-{delay}s", "delay": delay})
    return plan


PLAN = kill_plan(SEED)
print(f"fault suite: dump kill points from seed {SEED}: {[c['id'] for c in PLAN]}")


def kill_victim(case: dict, command: list[str], out: Path) -> dict:
    """Run the dump and SIGKILL it as the case says; what is on disk afterwards.

    A delay is an upper bound: on a fast, idle machine the whole dump can finish before it
    elapses, and then the case is run again from scratch with half the delay (at most 6 times),
    so that the kill still lands mid-run."""
    delay = case.get("delay")
    for _ in range(6):
        killed = _kill_once(case, command, out, delay)
        if delay is None or killed["returncode"] != 0:
            return killed
        delay /= 2
        shutil.rmtree(out)
    return killed


def _kill_once(case: dict, command: list[str], out: Path, delay: float | None) -> dict:
    victim = popen(command, **({"LOGITCACHE_FAULTS": case["faults"]} if "faults" in case else {}))
    with reaped(victim):
        if delay is not None:  # from outside: a delay after the dump has created its manifest
            deadline = time.monotonic() + 180
            while committed_parts(out) < 0 and victim.poll() is None:
                assert time.monotonic() < deadline, "the dump never started writing"
                time.sleep(0.02)
            time.sleep(delay)
            victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=300)
    stderr = victim.stderr.read() if victim.stderr else ""
    return {"returncode": victim.returncode, "stderr": stderr, "parts": committed_parts(out),
            "delay": delay}  # fmt: skip


def cases(default: bool) -> list:
    chosen = PLAN[:DEFAULT] if default else PLAN[DEFAULT:]
    return [pytest.param(c, id=c["id"]) for c in chosen]


@pytest.fixture(scope="module")
def victims(tmp_path_factory, tiny_teacher_dir, dump_corpus, request) -> dict:
    """The default cases' victims, two at a time (each is mostly interpreter start-up)."""
    selected = {
        item.callspec.params["case"]["id"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec")
    }
    root = tmp_path_factory.mktemp("kills")
    jobs = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        for case in PLAN:
            if case["id"] in selected:
                out = root / case["id"] / "cache"
                command = dump_command(tiny_teacher_dir, dump_corpus, out)
                jobs[case["id"]] = (out, command, pool.submit(kill_victim, case, command, out))
        return {key: (out, command, job.result()) for key, (out, command, job) in jobs.items()}


def check_case(case, victims, dump_reference, capsys) -> None:
    from logitcache.cli.commands import main

    out, command, killed = victims[case["id"]]
    print(f"case {case['id']} (seed {SEED}): {killed}")
    assert killed["returncode"] == -signal.SIGKILL, killed
    if "faults" in case:  # killed exactly there: the manifest lists what the point implies
        point, nth = case["faults"][len("kill@") :].split("#")
        committed = {"part_committed": int(nth), "manifest_staged": int(nth) - 2}.get(
            point, int(nth) - 1
        )  # the 1st manifest written lists no part: staging the n-th lists n - 2 parts
        assert killed["parts"] == committed, (case, killed)
        assert committed < 0 or not manifest(out)["complete"]
    code, stdout, stderr = run_main(main, ["logitcache", *command[3:]], capsys)
    assert code == 0, stderr
    if 0 < killed["parts"] < PARTS:
        assert f"resumed after {killed['parts']} committed parts" in flat(stdout), stdout
    assert_same_cache(out, dump_reference)


@pytest.mark.parametrize("case", cases(default=True))
def test_sigkill_at_a_random_point_then_rerun_equals_the_uninterrupted_dump(
    case, victims, dump_reference, capsys
):
    check_case(case, victims, dump_reference, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("case", cases(default=False))
def test_sigkill_at_more_random_points(case, victims, dump_reference, capsys):
    check_case(case, victims, dump_reference, capsys)
