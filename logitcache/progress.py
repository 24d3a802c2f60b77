"""A progress bar on stderr (stdout stays parseable) showing documents, tokens/s and ETA."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")


class Bar:
    """Counts items (documents, steps) against a total and tokens for a throughput figure."""

    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self._progress, self._task = progress, task
        self.tokens = 0
        self._start = time.perf_counter()

    def counting(self, items: Iterable[T]) -> Iterator[T]:
        for item in items:
            yield item
            self.advance()

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def add_tokens(self, n: int) -> None:
        self.tokens += n
        if self._progress is not None:
            rate = self.tokens / max(time.perf_counter() - self._start, 1e-9)
            self._progress.update(self._task, tokens=f"{self.tokens:,} tok  {rate:,.0f} tok/s")


@contextmanager
def progress_bar(
    label: str, *, total: int | None, unit: str, enabled: bool = True
) -> Iterator[Bar]:
    if not enabled:
        yield Bar(None, None)
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn(
            "{task.completed}/{task.total} " + unit if total else "{task.completed} " + unit
        ),
        TextColumn("{task.fields[tokens]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(label, total=total, tokens="")
        yield Bar(progress, task)
