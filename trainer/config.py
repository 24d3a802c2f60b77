"""`FitConfig`: every knob of a run, its validation, and what a run directory holds.

The settings are checked before anything is opened (`check_config`: every problem at once, in
flag names, so that the CLI and the API say the same thing), and the run directory before
anything is written (`check_run_dir`: an existing run is never replaced by accident).

A run directory holds::

    metrics.jsonl       one JSON object per line (see `trainer.runlog`)
    checkpoint/         state.pt and config.json, replaced atomically (see `trainer.checkpoint`)
    model/              the final student (save_pretrained, safetensors)
    summary.json        cache identity, hyper-parameters, final metrics
    fit_config.json     the resolved `FitConfig` of the run
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import logitcache
from logitcache.errors import LogitCacheError
from trainer.losses import (
    DEFAULT_BETA,
    DEFAULT_LOSS,
    DEFAULT_TAIL,
    DEFAULT_ULD_WEIGHT,
    LOSSES,
    TAIL_MODES,
    ULD_LOSS,
)
from trainer.student import RUN_MODEL_DIR as MODEL_DIR

PRECISIONS = ("fp32", "bf16")
CHECKPOINT_DIR = "checkpoint"
#: The next checkpoint while it is written, and the previous one while it is replaced.
CHECKPOINT_TMP = ".checkpoint.tmp"
CHECKPOINT_OLD = ".checkpoint.old"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "fit_config.json"
#: A classifier run's weights (`trainer.classify`: a state dict, not a model directory).
CLASSIFIER_MODEL_FILE = "model.pt"
#: Everything a run writes; starting a run (fresh or --overwrite) clears these.
RUN_ARTIFACTS = (
    CHECKPOINT_DIR, MODEL_DIR, METRICS_FILE, SUMMARY_FILE, CONFIG_FILE, "curves.png",
    CHECKPOINT_TMP, CHECKPOINT_OLD, CLASSIFIER_MODEL_FILE,
)  # fmt: skip
#: What makes a directory hold a run worth keeping: progress or results.
RUN_OUTPUTS = (CHECKPOINT_DIR, CHECKPOINT_OLD, MODEL_DIR, SUMMARY_FILE)
#: Settings that may change when resuming: they do not change the weights (device and
#: fused_loss change the numerics only; device is allowed so that a run can move between
#: machines, fused_loss so that a run can be continued with less memory).
RESUMABLE_CHANGES = frozenset(
    {
        "cache", "student", "tokenizer", "out", "resume", "overwrite", "progress", "num_workers",
        "eval_every", "eval_batches", "checkpoint_every", "log_every", "stop_at", "device",
        "check_files", "cache_dir", "fused_loss",
    }
)  # fmt: skip


@dataclass
class FitConfig:
    """Everything a run depends on. Steps count optimizer steps of `batch_size` sequences."""

    cache: str  # the cache directory (`logitcache dump --out`)
    student: str  # config JSON, directory with config.json, or saved model directory
    out: str = "run"  # the run directory
    # if given, checked against the cache's tokenizer fingerprint; with loss "uld", the
    # student's own tokenizer, which differs from the teacher's
    tokenizer: str | None = None
    # objective: loss = alpha * CE + (1 - alpha) * T^2 * D(teacher_T, student_T)
    alpha: float = 0.5  # 1.0: hard labels only (the targets are not used)
    temperature: float = 1.0
    # the divergence D (trainer.losses.LOSSES), or "uld": CE + uld_weight * ULD for a student
    # with another tokenizer (trainer.losses.ULDLoss; alpha and tail are not used)
    loss: str = DEFAULT_LOSS
    uld_weight: float = DEFAULT_ULD_WEIGHT
    beta: float = DEFAULT_BETA  # gjsd's interpolation: 0 = forward KL, 1 = reverse KL
    # how the teacher's mass outside the top-k is handled (TAIL_MODES): renorm gave the lowest
    # held-out KL at every k in benchmarks/bench_fidelity.py, and it is the cheapest
    tail: str = DEFAULT_TAIL
    # the loss computed chunk by chunk inside the output layer (trainer.fused): the same loss
    # without the (batch, time, vocab) logits, for large vocabularies
    fused_loss: bool = False
    # data
    batch_size: int = 8  # sequences per step
    eval_fraction: float = 0.01  # held-out share of the cache's sequences (fixed per cache)
    shuffle_window: int = 1  # parts shuffled together
    num_workers: int = 0  # DataLoader worker processes
    # length: `steps` if > 0, else `epochs` passes over the training split
    steps: int = 0
    epochs: float = 1.0
    # optimizer: AdamW, linear warmup then cosine decay from lr to min_lr
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int | None = None  # None: 5% of the steps, at most 100
    weight_decay: float = 0.1  # on matrices only (not biases, norms)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    # run
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"  # or "bf16" autocast
    eval_every: int = 200  # steps between held-out evaluations (0: only at the end)
    eval_batches: int = 0  # batches per evaluation (0: the whole held-out split)
    checkpoint_every: int = 500  # steps between checkpoints (0: only at the end)
    log_every: int = 10  # steps between metrics rows (averaged over the interval)
    resume: bool = False
    overwrite: bool = False
    stop_at: int = 0  # stop (with a checkpoint) after this global step, as if interrupted
    progress: bool = True
    check_files: bool = True  # sha256 of a part's files against the manifest before reading it
    cache_dir: str | None = None  # where a cache at a URL fetches its parts (`logitcache.open`)


def check_config(c: FitConfig) -> None:
    """Every invalid setting at once, named by its flag, as one `LogitCacheError`."""
    # NaN fails every comparison below but inf passes "> 0": every float must be finite first
    problems = [
        f"--{f.name.replace('_', '-')} must be a finite number, got {getattr(c, f.name)}"
        for f in dataclasses.fields(c)
        if f.type == "float" and not math.isfinite(getattr(c, f.name))
    ]
    if c.loss not in (*LOSSES, ULD_LOSS):
        problems.append(f"--loss must be one of {', '.join(LOSSES)}, {ULD_LOSS}, got {c.loss!r}")
    if c.loss == ULD_LOSS and c.tokenizer is None:
        problems.append("--loss uld needs --tokenizer: the student's own tokenizer")
    if c.loss == ULD_LOSS and c.fused_loss:
        problems.append("--loss uld computes its loss from the logits: drop --fused-loss")
    if not c.uld_weight >= 0:
        problems.append(f"--uld-weight must be 0 or more, got {c.uld_weight}")
    if not 0.0 <= c.beta <= 1.0:
        problems.append(
            f"--beta must be in [0, 1] (gjsd: 0 = forward KL, 1 = reverse KL), got {c.beta}"
        )
    if c.tail not in TAIL_MODES:
        problems.append(f"--tail must be one of {', '.join(TAIL_MODES)}, got {c.tail!r}")
    if c.precision not in PRECISIONS:
        problems.append(f"--precision must be one of {', '.join(PRECISIONS)}, got {c.precision!r}")
    if not 0.0 <= c.alpha <= 1.0:
        problems.append(f"--alpha must be in [0, 1], got {c.alpha}")
    if not c.temperature > 0:
        problems.append(f"--temperature must be positive, got {c.temperature}")
    if not 0.0 <= c.eval_fraction < 1.0:
        problems.append(f"--eval-fraction must be in [0, 1), got {c.eval_fraction}")
    for name in ("batch_size", "log_every", "shuffle_window"):
        if getattr(c, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("steps", "eval_every", "eval_batches", "checkpoint_every", "num_workers"):
        if getattr(c, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be 0 or more")
    if c.steps == 0 and not c.epochs > 0:
        problems.append("give --steps or a positive --epochs")
    if not c.lr > 0 or not 0 <= c.min_lr <= c.lr:
        problems.append(f"need 0 < --lr and 0 <= --min-lr <= --lr (got {c.lr}, {c.min_lr})")
    if not c.grad_clip >= 0:
        problems.append(f"--grad-clip must be 0 (off) or a positive norm, got {c.grad_clip}")
    if not c.weight_decay >= 0:
        problems.append(f"--weight-decay must be 0 or more, got {c.weight_decay}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(c, name) < 1:
            problems.append(f"--{name} must be in [0, 1), got {getattr(c, name)}")
    if c.warmup_steps is not None and c.warmup_steps < 0:
        problems.append("--warmup-steps must be 0 or more")
    if c.resume and c.overwrite:
        problems.append("--resume and --overwrite contradict each other; choose one")
    if problems:
        raise LogitCacheError("invalid settings: " + "; ".join(problems) + ".")


def has_checkpoint(run_dir: Path) -> bool:
    """A checkpoint to resume from (`.checkpoint.old`: a crash between the two renames)."""
    return any((run_dir / n).is_dir() for n in (CHECKPOINT_DIR, CHECKPOINT_OLD))


class RunSettings(Protocol):
    """What `check_run_dir` reads of a run's settings: a `FitConfig`, or the classifier's
    `trainer.classify.ClassifierConfig`, whose run directories follow the same rules."""

    cache: str
    resume: bool
    overwrite: bool


def check_run_dir(run_dir: Path, config: RunSettings) -> None:
    """Refuse to start over an existing run unless resuming or overwriting. A run that failed
    before its first checkpoint has nothing to keep, and is replaced silently."""
    logitcache.refuse_overlap(
        run_dir, [config.cache], "--out", may_contain=True,
        why="a cache's next dump deletes what its manifest does not list, the run with it",
    )  # fmt: skip
    present = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if config.resume:
        if not has_checkpoint(run_dir):
            raise LogitCacheError(
                f"--resume: {run_dir} has no checkpoint to resume from. Start the run without "
                "--resume."
            )
        if (run_dir / SUMMARY_FILE).exists():
            raise LogitCacheError(
                f"--resume: the run in {run_dir} already finished (summary.json exists). Use "
                "--overwrite to train again, or another --out."
            )
        return
    if present and not config.overwrite:
        raise LogitCacheError(
            f"{run_dir} already holds a run ({', '.join(present)}). Continue it with --resume, "
            "replace it with --overwrite, or choose another --out."
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise LogitCacheError(f"--out {run_dir} is a file, not a directory.")


def clear_run_dir(run_dir: Path) -> None:
    """Remove what an earlier run wrote (`RUN_ARTIFACTS` only: other files stay)."""
    for name in RUN_ARTIFACTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
