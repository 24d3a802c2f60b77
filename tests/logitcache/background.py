"""CLI subprocess jobs, started in the background when a test module's first CLI test starts.

Subprocesses dominate the cost of the CLI tests (each imports torch, most import transformers: 2
to 4 CPU-seconds before doing anything), so a module's CLI runs are not run one test at a time.
Each CLI test registers, with `@cli_jobs`, the background jobs it reads; the `background` fixture
(tests/logitcache/conftest.py, module scope) collects the jobs of the module's selected tests and
hands them to the module's `submit_background_jobs(jobs, wanted, root, request)`, which sets them
up and submits them, longest first, to two workers; each CLI test then waits only for its own
job's result.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable

import pytest

_JOBS_OF_TEST: dict[str, Callable[[dict], list[str]]] = {}


def cli_jobs(keys: Callable[[dict], list[str]]):
    """Declare the background jobs a test reads, as a function of its parameters."""

    def register(test):
        _JOBS_OF_TEST[test.__name__] = keys
        return test

    return register


def wanted_jobs(request: pytest.FixtureRequest) -> set[str]:
    """The jobs read by the selected tests of the requesting module."""
    selected = [i for i in request.session.items if getattr(i, "module", None) is request.module]
    wanted = set()
    for item in selected:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        wanted.update(_JOBS_OF_TEST.get(item.originalname, lambda _: [])(params))
    return wanted


class Background:
    def __init__(self, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        self.pool = pool
        self.jobs: dict[str, concurrent.futures.Future] = {}
        self.cleanups: list[Callable[[], None]] = []

    def submit(self, key: str, fn: Callable, *args: object) -> None:
        self.jobs[key] = self.pool.submit(fn, *args)

    def result(self, key: str):
        assert key in self.jobs, f"background job {key!r} was not started"
        return self.jobs[key].result(timeout=600)
