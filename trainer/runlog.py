"""What a run reports: metrics rows, the per-step sample log, messages and the summary.

``metrics.jsonl`` holds one JSON object per line::

    {"kind": "train", step, epoch, lr, loss, ce, kd, tokens, tokens_per_s, elapsed_s}
    {"kind": "eval", step, epoch, eval_ce, eval_ppl, eval_kl, eval_top1, eval_tokens}

A train row averages the steps since the previous one (the "window"). The window is saved with
every checkpoint, so a resumed run's first row covers the same steps, bit for bit, as the
uninterrupted run's; rows written after the checkpoint are dropped on resume
(`truncate_metrics`). Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch

from logitcache.errors import LogitCacheError
from trainer import distributed
from trainer.checkpoint import writing
from trainer.config import METRICS_FILE, MODEL_DIR, FitConfig
from trainer.losses import LossParts

if TYPE_CHECKING:
    from trainer.dataset import CacheDataset
    from trainer.student import StudentSource


def log_message(message: str, enabled: bool) -> None:
    """One ``[trainer]`` line on stderr (stdout stays for the command's result)."""
    if enabled:
        print(f"[trainer] {message}", file=sys.stderr, flush=True)


class RunLog:
    """Accumulates per-step values (as tensors: no device sync per step) and writes rows."""

    def __init__(self, run_dir: Path, per_epoch: int, metrics: IO[str] | None) -> None:
        self.run_dir, self.per_epoch, self.metrics = run_dir, per_epoch, metrics
        self.start = self.window_start = time.perf_counter()
        self.tokens_logged = 0  # tokens of the steps already written to metrics.jsonl
        self.last_train: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.last_eval_result: dict[str, float] = {}
        self._reset()

    @classmethod
    def open(cls, run_dir: Path, per_epoch: int, *, append: bool, enabled: bool) -> RunLog:
        """`enabled`: this process writes metrics.jsonl (rank 0); `append`: a resumed run."""
        metrics = None
        if enabled:
            with writing(run_dir, METRICS_FILE):
                metrics = (run_dir / METRICS_FILE).open("a" if append else "w", encoding="utf-8")
        return cls(run_dir, per_epoch, metrics)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()

    def _reset(self) -> None:
        self.sums = {"loss": 0.0, "ce": 0.0, "kd": 0.0}
        self.tokens: Any = 0
        self.n = 0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluation, checkpoints) does not count against tokens/s."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.window_start += time.perf_counter() - start

    def window(self) -> dict[str, Any]:
        """The steps since the last metrics row, for the checkpoint: a resumed run's first row
        then covers the same steps (and tokens, and averages, bit for bit) as the uninterrupted
        run's row."""
        as_tensor = lambda v: torch.as_tensor(v).detach().cpu()  # noqa: E731
        return {
            "sums": {k: as_tensor(v) for k, v in self.sums.items()},
            "tokens": as_tensor(self.tokens),
            "n": self.n,
            "seconds": time.perf_counter() - self.window_start,  # for the row's tokens/s
        }

    def resume(self, checkpoint: dict[str, Any], device: torch.device) -> None:
        """Continue the counts of `checkpoint`; one saved before "window" existed starts a new
        window (its first row then covers only the steps after the checkpoint)."""
        window = checkpoint.get("window")
        if window is not None:
            self.sums = {k: v.to(device) for k, v in window["sums"].items()}
            self.tokens, self.n = window["tokens"].to(device), int(window["n"])
            self.window_start -= float(window["seconds"])
        self.tokens_logged = int(checkpoint["tokens_seen"]) - int(self.tokens)

    def tokens_seen(self) -> int:
        """Input tokens trained on since step 0 (syncs with the device)."""
        return self.tokens_logged + int(self.tokens)

    def record(self, parts: LossParts, tokens: torch.Tensor) -> None:
        for key in self.sums:
            self.sums[key] = self.sums[key] + getattr(parts, key).detach().float()
        self.tokens = self.tokens + tokens
        self.n += 1

    def _epoch(self, ds: CacheDataset) -> float:
        s = ds.state_dict()
        return round(s["epoch"] + s["batches"] / max(1, self.per_epoch), 4)

    def log_train(self, step: int, ds: CacheDataset, lr: float) -> dict[str, Any]:
        """Write the window's row (and start a new window); a non-finite loss stops the run."""
        now = time.perf_counter()
        tokens = int(self.tokens)
        self.tokens_logged += tokens
        row = {
            "kind": "train",
            "step": step,
            "epoch": self._epoch(ds),
            "lr": lr,
            **{k: float(v) / max(1, self.n) for k, v in self.sums.items()},
            "tokens": tokens,
            "tokens_per_s": round(tokens / max(now - self.window_start, 1e-9), 1),
            "elapsed_s": round(now - self.start, 3),
        }
        if not math.isfinite(row["loss"]):
            raise LogitCacheError(
                f"the loss is {row['loss']} at step {step}: training diverged. Lower --lr, keep "
                "--grad-clip on, or use --precision fp32."
            )
        self._write(row)
        self.last_train = row
        self.window_start = now
        self._reset()
        return row

    def log_eval(self, step: int, ds: CacheDataset, result: dict[str, float]) -> None:
        row = {"kind": "eval", "step": step, "epoch": self._epoch(ds)}
        row |= {f"eval_{k}": v for k, v in result.items() if k != "sequences"}
        self._write(row)
        self.last_eval, self.last_eval_result = row, result

    def _write(self, row: dict[str, Any]) -> None:
        if self.metrics is None:  # not rank 0: only rank 0 writes the run directory
            return
        with writing(self.run_dir, METRICS_FILE):
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint a resumed run restarts from."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            continue  # a torn last line
    path.write_text("".join(f"{line}\n" for line in keep), encoding="utf-8")


class SampleLog:
    """With ``TRAINER_SAMPLE_LOG=FILE``, every rank appends one JSON line per step to FILE:
    ``{"step", "epoch", "rank", "world_size", "index"}`` (the storage indices of the sequences
    it trained on; -1 is padding). For checking the data order of a run, e.g. across a resume
    with another number of processes (docs/SCALING.md). Off by default."""

    def __init__(self, path: str | None, d: distributed.Dist) -> None:
        self.d = d
        self.file = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115

    @classmethod
    def from_env(cls, d: distributed.Dist) -> SampleLog:
        return cls(os.environ.get("TRAINER_SAMPLE_LOG") or None, d)

    def write(self, step: int, epoch: int, index: torch.Tensor) -> None:
        if self.file is None:
            return
        row = {"step": step, "epoch": epoch, "rank": self.d.rank,
               "world_size": self.d.world_size, "index": index.tolist()}  # fmt: skip
        self.file.write(json.dumps(row) + "\n")  # one write per line: O_APPEND keeps it whole
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def summary(
    config: FitConfig,
    cache: Any,
    source: StudentSource,
    *,
    n_params: int,
    step: int,
    total: int,
    warmup: int,
    log: RunLog,
    final_eval: dict[str, float] | None,
) -> dict[str, Any]:
    """summary.json: where the run came from (cache identity, student, settings) and where it
    ended (steps, tokens, the last train row and the final evaluation)."""
    m = cache.manifest
    return {
        "cache": cache.location,  # an absolute path, or the URL
        "manifest": {
            "teacher": {
                "name": m.teacher.name,
                "weights_sha256": m.teacher.weights_sha256,
                "config_sha256": m.teacher.config_sha256,
                "vocab_size": m.teacher.vocab_size,
            },
            "tokenizer": {"name": m.tokenizer.name, "fingerprint": m.tokenizer.fingerprint},
            "data": {"source": m.data.source, "fingerprint": m.data.fingerprint},
            "targets": {"k": m.targets.k, "logprob_dtype": m.targets.logprob_dtype},
            "sequences": m.sequences,
            "tokens": m.tokens,
        },
        "student": {"source": source.spec, "kind": source.kind, "params": n_params},
        "config": dataclasses.asdict(config),
        "schedule": {"total_steps": total, "warmup_steps": warmup},
        "steps": step,
        "epochs": log.last_train.get("epoch"),
        "tokens_seen": log.tokens_seen(),
        "final": {"train": log.last_train, "eval": final_eval},
        "model_dir": str(Path(config.out) / MODEL_DIR),
    }
