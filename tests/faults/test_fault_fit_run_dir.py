"""`trainer fit` whose run directory cannot be written (a full disk, a read-only filesystem, a
file size limit): exit 2 naming the directory and the operating system's reason, and no
half-written checkpoint (`.checkpoint.tmp`) left behind; and a run stopped between two metrics
rows whose `--resume` writes the same rows as an uninterrupted run.

The full and read-only filesystems are real mounts (a tmpfs; skipped where mounting is not
permitted). The file size limit (RLIMIT_FSIZE, with SIGXFSZ ignored) makes the kernel fail the
checkpoint's write with a real OSError(EFBIG) everywhere, through the same handler."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli import REPO, cli_env
from tests.faults.helpers import flat, mount, small_tmpfs

#: A checkpoint of the tiny student (state.pt: weights and two AdamW moments) is ~350 KB.
SETTINGS = ["--steps", "6", "--batch-size", "4", "--checkpoint-every", "3", "--eval-every", "0",
            "--eval-fraction", "0.1", "--no-progress"]  # fmt: skip


def fit(cache: Path, student: Path, out: Path, *extra: str, fsize: int | None = None):
    def limit() -> None:  # in the child: writes past `fsize` bytes fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(
        [sys.executable, "-m", "trainer", "fit", "--cache", str(cache), "--student",
         str(student), "--out", str(out), *SETTINGS, *extra],
        capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=300,
        preexec_fn=limit if fsize is not None else None,
    )  # fmt: skip


def check_refused(proc: subprocess.CompletedProcess, run: Path, reason: str, what: str) -> None:
    message = flat(proc.stderr)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert message.startswith(f"trainer: error: cannot write to the run directory {run} "), message
    assert what in message and reason in message and "another --out" in message, message
    assert not (run / ".checkpoint.tmp").exists(), "a half-written checkpoint was left behind"
    assert not (run / "model").exists() and not (run / "summary.json").exists()


@pytest.fixture
def tmpfs(tmp_path) -> Iterator[Path]:
    """A 256 KiB tmpfs: too small for a checkpoint of the tiny student."""
    with small_tmpfs(tmp_path / "disk", "256k", "the RLIMIT_FSIZE test covers the handler") as disk:
        yield disk


def test_a_full_filesystem_then_the_same_command_after_freeing_space(
    tmpfs, tiny_cache, tiny_student_config
):
    run = tmpfs / "run"
    proc = fit(tiny_cache, tiny_student_config, run)
    check_refused(proc, run, "No space left on device", "(the checkpoint)")
    assert "rerun the same command." in flat(proc.stderr)  # no checkpoint yet: no --resume
    assert mount("-o", "remount,size=8m", str(tmpfs)).returncode == 0  # space is freed
    again = fit(tiny_cache, tiny_student_config, run)
    assert again.returncode == 0, again.stderr
    assert (run / "model" / "model.safetensors").is_file()


def test_a_read_only_filesystem(tmpfs, tiny_cache, tiny_student_config):
    assert mount("-o", "remount,ro", str(tmpfs)).returncode == 0
    run = tmpfs / "run"
    proc = fit(tiny_cache, tiny_student_config, run)
    check_refused(proc, run, "Read-only file system", "(creating it)")
    assert not run.exists()


def test_a_file_size_limit_fails_the_checkpoint_write_without_leaving_it(
    tmp_path, tiny_cache, tiny_student_config
):
    run = tmp_path / "run"
    proc = fit(tiny_cache, tiny_student_config, run, fsize=100_000)
    check_refused(proc, run, "File too large", "(the checkpoint)")
    assert not (run / "checkpoint").exists()


def test_resume_between_two_rows_writes_the_rows_of_an_uninterrupted_run(
    tmp_path, tiny_cache, tiny_student_config
):
    """Rows every 3 steps, stopped at step 4 (in the middle of the row of step 6): after
    --resume that row covers steps 4-6 as in the uninterrupted run: same tokens, same means."""
    from trainer.recipe import FitConfig
    from trainer.recipe import fit as api_fit

    def run(out: Path, **over) -> list[dict]:
        import json

        config = dict(cache=str(tiny_cache), student=str(tiny_student_config), out=str(out),
                      steps=9, batch_size=4, log_every=3, checkpoint_every=0, eval_every=0,
                      eval_fraction=0.1, progress=False)  # fmt: skip
        api_fit(FitConfig(**{**config, **over}))
        timing = ("tokens_per_s", "elapsed_s")
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in lines]

    reference = run(tmp_path / "reference")
    run(tmp_path / "resumed", stop_at=4)
    resumed = run(tmp_path / "resumed", resume=True)
    assert [r["step"] for r in resumed if r["kind"] == "train"] == [3, 6, 9]
    assert resumed == reference
