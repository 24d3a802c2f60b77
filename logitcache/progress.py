"""A progress bar on stderr (stdout stays parseable): items (documents, steps), a status text
(tokens and tokens/s, or the trainer's loss), elapsed time and ETA. The dump and the trainer
share it."""

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
            self.set_status(f"{self.tokens:,} tok  {rate:,.0f} tok/s")

    def set_status(self, text: str) -> None:
        """Replace the text after the count (e.g. the trainer's loss and tokens/s)."""
        if self._progress is not None:
            self._progress.update(self._task, status=text)


@contextmanager
def progress_bar(
    label: str, *, total: int | None, unit: str, enabled: bool = True, completed: int = 0
) -> Iterator[Bar]:
    """A bar counting `unit` up to `total` (None: no total), starting at `completed` (a
    resumed run); `enabled` False gives a bar that shows nothing."""
    if not enabled:
        yield Bar(None, None)
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn(
            "{task.completed}/{task.total} " + unit if total else "{task.completed} " + unit
        ),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(label, total=total, completed=completed, status="")
        yield Bar(progress, task)
