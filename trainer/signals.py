"""Stopping on SIGINT/SIGTERM at a step boundary, with a checkpoint, instead of mid-step."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any


class Interrupted(KeyboardInterrupt):
    """The run stopped on SIGINT/SIGTERM after checkpointing at `step`."""

    def __init__(self, step: int, run_dir: Path) -> None:
        super().__init__(f"interrupted at step {step}")
        self.step, self.run_dir = step, run_dir


class StopFlag:
    """While active, SIGINT/SIGTERM only set a flag: the loop checkpoints at the next step
    boundary and raises `Interrupted`. A second signal interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}

    def is_set(self) -> bool:
        return self._event.is_set()

    def _handle(self, signum, frame) -> None:
        if self._event.is_set():
            raise KeyboardInterrupt
        self._event.set()

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
