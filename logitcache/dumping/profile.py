"""`dump --profile`: where a dump's time goes, on each of its threads and on the device.

A dump is three workers joined by bounded queues: the teacher thread (read the next batch, run
the teacher, compute the targets, start the copies to the host), the writer thread (wait for a
batch's copy, assemble parts, commit them in order) and the writer pool (compress, write and
hash parts, `--writer-threads`). Whichever worker is busiest sets the dump's speed, and the one
number that says whether the teacher's device is kept busy is how long the teacher thread waited
on a full queue ("queue full"): zero means the writer keeps up.

Host stages are timed with `time.perf_counter` where they run. On a GPU, kernels run
asynchronously, so the teacher thread's host times only say how long it took to *launch* the
work; the device's own time per stage comes from CUDA events recorded on the teacher's stream,
read on the writer thread once a batch's copy has landed (no synchronisation is added to the
teacher thread). Without `--profile` every hook is a no-op.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["DEVICE_STAGES", "STAGES", "DeviceMarks", "Profile", "render"]

#: (thread, stage, what it covers), in the order of a batch's journey; the report's rows.
STAGES = (
    ("teacher", "input", "reading, tokenizing and packing the next batch"),
    ("teacher", "forward", "the teacher's forward (to its logits, or its final hidden states)"),
    ("teacher", "targets", "the output head's chunks (chunked path), top-k or sampling"),
    ("teacher", "to host", "starting the copies of the targets to host memory"),
    ("teacher", "queue full", "waiting for the writer (0 when the writer keeps up)"),
    ("writer", "copy wait", "waiting for a batch's copy to land in host memory"),
    ("writer", "assemble", "cutting rows to their lengths and joining them into a part"),
    ("writer", "pool full", "waiting for the writer pool to finish the oldest part"),
    ("writer", "commit", "renaming a part into place and rewriting the manifest (uploads too)"),
    ("writer", "idle", "waiting for the teacher's next batch"),
    ("pool", "encode", "compressing, writing and hashing parts (summed over the pool's threads)"),
)

#: Device stages, measured with CUDA events between the teacher thread's marks.
DEVICE_STAGES = ("forward", "targets", "to host")


class DeviceMarks:
    """CUDA events around one batch's device stages, recorded on the teacher's stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.events: list[torch.cuda.Event] = []

    def mark(self) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        self.events.append(event)

    def seconds(self) -> list[float]:
        """Seconds between consecutive marks (call once the last mark's work has finished)."""
        return [a.elapsed_time(b) / 1000 for a, b in itertools.pairwise(self.events)]


class Profile:
    """Accumulated seconds per (thread, stage), plus the device's per stage on CUDA.

    Thread-safe: each stage is added under a lock, once per occurrence, which is a few
    microseconds against stages of milliseconds and more."""

    def __init__(self, enabled: bool, device: torch.device | None = None) -> None:
        self.enabled = enabled
        self.device = device
        self.on_cuda = enabled and device is not None and device.type == "cuda"
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.batches = 0
        self._lock = threading.Lock()

    @contextmanager
    def stage(self, thread: str, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(thread, name, time.perf_counter() - start)

    def add(self, thread: str, name: str, seconds: float) -> None:
        if self.enabled:
            with self._lock:
                self.seconds[(thread, name)] += seconds

    def marks(self) -> DeviceMarks | None:
        """Event marks for one batch on CUDA (None elsewhere: the host times are the device's)."""
        return DeviceMarks(self.device) if self.on_cuda else None

    def landed(self, marks: DeviceMarks | None) -> None:
        """A batch's copy has landed: add its device times (writer thread)."""
        with self._lock:
            self.batches += 1
        if marks is not None:
            for name, seconds in zip(DEVICE_STAGES, marks.seconds(), strict=True):
                self.add("device", name, seconds)

    def report(self, wall_seconds: float) -> dict | None:
        """The profile as plain data (`DumpSummary.profile`): seconds and share of the run's
        wall time per stage, per thread, in journey order; None without --profile."""
        if not self.enabled:
            return None
        wall = max(wall_seconds, 1e-9)
        rows = [(thread, name) for thread, name, _ in STAGES]
        if self.on_cuda:
            rows += [("device", name) for name in DEVICE_STAGES]
        return {
            "wall_seconds": round(wall_seconds, 4),
            "batches": self.batches,
            "device": str(self.device) if self.device is not None else None,
            "stages": [
                {
                    "thread": thread,
                    "stage": name,
                    "seconds": round(self.seconds.get((thread, name), 0.0), 4),
                    "share": round(self.seconds.get((thread, name), 0.0) / wall, 4),
                }
                for thread, name in rows
            ],
        }


def render(report: dict) -> str:
    """The profile as the table `dump --profile` prints."""
    what = {(thread, name): text for thread, name, text in STAGES}
    what.update({("device", n): f"the device's own time: {n}" for n in DEVICE_STAGES})
    lines = [
        f"where the time went (--profile): {report['wall_seconds']:.2f} s wall, "
        f"{report['batches']} batches"
    ]
    for row in report["stages"]:
        key = (row["thread"], row["stage"])
        lines.append(
            f"  {row['thread']:<8} {row['stage']:<11} {row['seconds']:9.3f} s "
            f"{100 * row['share']:5.1f}%  {what[key]}"
        )
    return "\n".join(lines)
