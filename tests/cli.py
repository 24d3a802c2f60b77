"""How the tests start the project's command-line tools as real subprocesses: one environment
for all of them, and a guard that never leaves a victim process running after a failed check."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cli_env(**extra: str) -> dict[str, str]:
    """Offline, one thread per process (the machine is small and shared), the repository
    importable, and no debug, fault-injection or sample-log setting inherited from the caller."""
    env = dict(os.environ)
    for name in ("LOGITCACHE_DEBUG", "LOGITCACHE_FAULTS", "TRAINER_SAMPLE_LOG"):
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )  # fmt: skip
    env.update(extra)
    return env


@contextlib.contextmanager
def reaped(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """Yield `proc`; if the block leaves it running (a check failed before the kill), kill it
    and wait for it, so that no dump or training outlives its test."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
