"""`fit`: train a student from a logitcache cache, without ever loading the teacher.

One recipe, read top to bottom: `FitConfig` (every knob, with defaults) -> `fit`: setup (run
directory, cache, datasets, student, optimizer, schedule, resume) -> train (forward,
`distillation_loss`, clip, step, log, eval, checkpoint) -> cleanup (final checkpoint,
``save_pretrained``, summary.json).

A run directory holds::

    metrics.jsonl       one JSON object per line: {"kind": "train", step, epoch, lr, loss, ce,
                        kd, tokens, tokens_per_s, elapsed_s} and {"kind": "eval", step, epoch,
                        eval_ce, eval_ppl, eval_kl, eval_top1, eval_tokens}
    checkpoint/         state.pt (model, optimizer, scheduler, RNG, dataset position, step) and
                        config.json; replaced atomically (written aside, then renamed)
    model/              the final student (save_pretrained, safetensors)
    summary.json        cache identity, hyper-parameters, final metrics

Resuming (``resume=True``) restores everything, RNG and dataset position included, so on CPU a
resumed run ends with exactly the weights of an uninterrupted one. SIGINT/SIGTERM stop the run
at the next step boundary with a checkpoint.

Under ``torchrun --nproc-per-node N -m trainer fit ...`` the same recipe runs data-parallel
(DDP): `batch_size` is the global batch, split over the ranks; every rank reads its share of
each global batch from the cache; only rank 0 writes the run directory. The checkpoint's data
position counts global batches, so a run may resume with another number of processes and
continues with the same sequences in the same order (docs/SCALING.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError

import logitcache
from logitcache.errors import LogitCacheError
from trainer import distributed
from trainer.dataset import CacheDataset
from trainer.evaluate import autocast, evaluate_model
from trainer.losses import TAIL_MODES, distillation_loss
from trainer.student import RUN_MODEL_DIR as MODEL_DIR
from trainer.student import build_student, config_to_dict

LOSSES = ("forward_kl",)
PRECISIONS = ("fp32", "bf16")
CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "fit_config.json"
#: Everything a run writes; starting a run (fresh or --overwrite) clears these.
RUN_ARTIFACTS = (
    CHECKPOINT_DIR, MODEL_DIR, METRICS_FILE, SUMMARY_FILE, CONFIG_FILE, "curves.png",
    ".checkpoint.tmp", ".checkpoint.old",
)  # fmt: skip
#: What makes a directory hold a run worth keeping: progress or results.
RUN_OUTPUTS = (CHECKPOINT_DIR, ".checkpoint.old", MODEL_DIR, SUMMARY_FILE)
#: Settings that may change when resuming: they do not change the weights (device changes
#: the numerics only, and is allowed so that a run can move between machines).
RESUMABLE_CHANGES = frozenset(
    {
        "cache", "student", "tokenizer", "out", "resume", "overwrite", "progress", "num_workers",
        "eval_every", "eval_batches", "checkpoint_every", "log_every", "stop_at", "device",
        "check_files", "cache_dir",
    }
)  # fmt: skip


@dataclass
class FitConfig:
    """Everything a run depends on. Steps count optimizer steps of `batch_size` sequences."""

    cache: str  # the cache directory (`logitcache dump --out`)
    student: str  # config JSON, directory with config.json, or saved model directory
    out: str = "run"  # the run directory
    tokenizer: str | None = None  # if given, checked against the cache's tokenizer fingerprint
    # objective: loss = alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T)
    alpha: float = 0.5  # 1.0: hard labels only (the targets are not used)
    temperature: float = 1.0
    loss: str = "forward_kl"
    # how the teacher's mass outside the top-k is handled (TAIL_MODES): renorm gave the lowest
    # held-out KL at every k in benchmarks/bench_fidelity.py, and it is the cheapest
    tail: str = "renorm"
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


class Interrupted(KeyboardInterrupt):
    """The run stopped on SIGINT/SIGTERM after checkpointing at `step`."""

    def __init__(self, step: int, run_dir: Path) -> None:
        super().__init__(f"interrupted at step {step}")
        self.step, self.run_dir = step, run_dir


# --------------------------------------------------------------------------------------------
# fit


def fit(config: FitConfig) -> dict[str, Any]:
    """Train `config.student` on `config.cache`; returns the summary (also in summary.json).

    Launched by torchrun (``WORLD_SIZE`` > 1), every process runs this with the same config:
    data-parallel training (DDP), `batch_size` being the global batch; only rank 0 writes into
    the run directory (docs/SCALING.md)."""
    _check_config(config)
    d, device = distributed.init(config.device)
    try:
        return _fit(config, d, device)
    except dist.DistError as exc:
        raise distributed.lost_peer(d, exc) from exc
    except RuntimeError as exc:
        if d.enabled and _is_collective_failure(exc):
            raise distributed.lost_peer(d, exc) from exc
        raise
    finally:
        distributed.shutdown(d)


def _is_collective_failure(exc: RuntimeError) -> bool:
    text = str(exc).lower()
    return any(w in text for w in ("gloo", "nccl", "connection", "peer", "timed out"))


def _fit(config: FitConfig, d: distributed.Dist, device: torch.device) -> dict[str, Any]:
    run_dir = Path(config.out)
    main = d.is_main
    progress = config.progress and main

    # ---- setup: data, checkpoint, student (a failure on any rank stops every rank) -------------
    def setup():
        _check_run_dir(run_dir, config)
        cache = logitcache.open(config.cache, cache_dir=config.cache_dir)
        if len(cache) == 0:
            raise LogitCacheError(
                f"the cache {cache.root} holds no sequences: nothing to train on. Dump data into it."
            )
        if cache.manifest.tokens == cache.manifest.sequences:  # refused now, not after training
            raise LogitCacheError(
                f"every sequence of the cache {cache.root} is one token long (seq_len "
                f"{cache.manifest.layout.seq_len}): no position has a next token to learn. "
                "Dump it again with --seq-len 2 or more."
            )
        # the student before the splits: a missing or mismatched student is the first thing to fix
        checkpoint = _load_checkpoint(run_dir) if config.resume else None
        if checkpoint is not None:
            _check_resume(config, checkpoint, cache.manifest)
        model, source = build_student(
            config.student, cache.manifest, tokenizer=config.tokenizer, seed=config.seed,
            config_dict=None if checkpoint is None else checkpoint["student_config"],
        )  # fmt: skip
        train_ds = CacheDataset(
            cache, batch_size=config.batch_size, split="train",
            eval_fraction=config.eval_fraction, seed=config.seed, shuffle=True,
            shuffle_window=config.shuffle_window, rank=d.rank, world_size=d.world_size,
            check_files=config.check_files,
        )  # fmt: skip
        eval_ds = None
        if config.eval_fraction > 0:
            eval_ds = CacheDataset(
                cache, batch_size=config.batch_size, split="eval",
                eval_fraction=config.eval_fraction, seed=config.seed, shuffle=False,
                rank=d.rank, world_size=d.world_size, check_files=config.check_files,
            )  # fmt: skip
        return cache, train_ds, eval_ds, checkpoint, model, source

    cache, train_ds, eval_ds, checkpoint, model, source = distributed.agree(d, setup)
    per_epoch = train_ds.batches_per_epoch()
    total_steps = config.steps or max(1, math.ceil(config.epochs * per_epoch))
    warmup = _warmup_steps(config, total_steps)
    model.to(device)
    if checkpoint is None and main:
        with _writing(run_dir, "creating it"):
            _clear_run_dir(run_dir)  # only now: a bad cache or student leaves an old run intact
    optimizer = _optimizer(model, config, device)
    schedule = partial(
        _lr_factor, warmup=warmup, total=total_steps, min_ratio=config.min_lr / config.lr
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    step = 0
    if checkpoint is None:
        _seed_everything(config.seed)
        metrics_mode = "w"
    else:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        train_ds.load_state_dict(checkpoint["dataset"])
        ranks = checkpoint.get("rng_ranks") or []
        _set_rng_state(ranks[d.rank] if len(ranks) == d.world_size else checkpoint["rng"])
        step = int(checkpoint["step"])
        if main:
            with _writing(run_dir, METRICS_FILE):
                _truncate_metrics(run_dir / METRICS_FILE, step)
        metrics_mode = "a"
    net: torch.nn.Module = model
    if d.enabled:  # gradients averaged over ranks; the loss is scaled so that this is exact
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    n_params = sum(p.numel() for p in model.parameters())
    if main:
        with _writing(run_dir, CONFIG_FILE):
            _write_json(run_dir / CONFIG_FILE, dataclasses.asdict(config))
    ranks_note = f" x {d.world_size} processes" if d.enabled else ""
    _log(
        f"{'resuming at step ' + str(step) if step else 'training'} {type(model).__name__} "
        f"({n_params / 1e6:.2f}M params, {source.kind} {source.spec}) on {cache.root}: "
        f"{total_steps} steps of {config.batch_size} sequences ({per_epoch} per epoch), "
        f"alpha {config.alpha}, T {config.temperature}, tail {config.tail}, {device}"
        f"{ranks_note}, {config.precision}",
        progress,
    )

    # ---- train -----------------------------------------------------------------------------------
    metrics = None
    if main:
        with _writing(run_dir, METRICS_FILE):
            metrics = (run_dir / METRICS_FILE).open(metrics_mode, encoding="utf-8")
    state = _LoopState(config, run_dir, total_steps, per_epoch, metrics)
    if checkpoint is not None:
        state.resume(checkpoint, device)
    hard_only = config.alpha == 1.0
    stop = _StopFlag()
    stopped = False
    samples = _SampleLog.from_env(d)
    last_saved = step

    def save() -> None:
        rngs = distributed.all_gather(d, _rng_state())  # each rank's RNG, for an exact resume
        if main:
            with _writing(run_dir, "the checkpoint"):
                _save_checkpoint(
                    run_dir, model, optimizer, scheduler, train_ds, step, config, state,
                    rngs if d.enabled else None,
                )  # fmt: skip

    try:
        with stop, _ProgressBar(progress, total_steps, step) as bar:
            while step < total_steps:
                epoch = train_ds.state_dict()["epoch"]
                for batch in _batches(train_ds, config, epoch, stop, device.type == "cuda"):
                    b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                    with autocast(device, config.precision):
                        logits = net(
                            input_ids=b["input_ids"], attention_mask=b["attention_mask"]
                        ).logits
                    parts = _loss(logits, b, config, hard_only)
                    loss = parts.loss
                    tokens = (b["attention_mask"] * (b["index"] >= 0)[:, None]).sum()
                    if d.enabled:
                        loss, parts, tokens = _reduce_step(d, parts, b["labels"], tokens)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if config.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                    lr = optimizer.param_groups[0]["lr"]  # the rate this update uses
                    optimizer.step()
                    scheduler.step()
                    train_ds.advance()
                    step += 1
                    samples.write(step, epoch, batch["index"])
                    state.record(parts, tokens)
                    if step % config.log_every == 0 or step == total_steps:
                        state.log_train(step, train_ds, lr, bar)
                    if eval_ds is not None and config.eval_every and step % config.eval_every == 0:
                        with state.paused():
                            state.log_eval(step, train_ds, _eval(model, eval_ds, config, device, d))
                    if config.checkpoint_every and step % config.checkpoint_every == 0:
                        with state.paused():
                            save()
                        last_saved = step
                    bar.update(step)
                    stopped = distributed.any_rank(d, stop.is_set())  # all ranks stop together
                    if step >= total_steps or stopped or step == config.stop_at:
                        break
                if stopped or step == config.stop_at:
                    break
                if step < total_steps:
                    train_ds.set_epoch(epoch + 1)
    except BaseException:
        if metrics is not None:
            metrics.close()
        samples.close()
        raise
    samples.close()
    if step != last_saved:
        save()
    if step < total_steps:  # interrupted or stopped early: resumable, no final model
        if metrics is not None:
            metrics.close()
        if stopped:
            raise Interrupted(step, run_dir)
        _log(f"stopped at step {step} of {total_steps}; continue with --resume", progress)
        return {"stopped": True, "step": step, "total_steps": total_steps, "run_dir": str(run_dir)}

    # ---- cleanup: final eval, model, summary -------------------------------------------------------
    final_eval = None
    if eval_ds is not None:
        if state.last_eval.get("step") == step:
            final_eval = state.last_eval_result
        else:
            final_eval = _eval(model, eval_ds, config, device, d)
            state.log_eval(step, train_ds, final_eval)
    if metrics is not None:
        metrics.close()
    summary = _summary(
        config, cache, source, n_params, step, total_steps, warmup, state, final_eval
    )
    if d.enabled:
        summary["world_size"] = d.world_size
    if main:
        with _writing(run_dir, "the final model", partial=run_dir / MODEL_DIR):
            model.save_pretrained(run_dir / MODEL_DIR, safe_serialization=True)
        with _writing(run_dir, SUMMARY_FILE):
            _write_json(run_dir / SUMMARY_FILE, summary)
    return summary


def _reduce_step(
    d: distributed.Dist, parts: _Parts, labels: torch.Tensor, tokens: torch.Tensor
) -> tuple[torch.Tensor, _Parts, torch.Tensor]:
    """Data-parallel step: the loss to backpropagate, the step's global loss parts (for
    logging) and its global token count.

    Each rank's loss is a mean over its own labelled positions, and DDP averages gradients over
    ranks; scaling rank r's loss by ``world * n_r / n`` (n the positions of all ranks) makes
    that average the gradient of the mean over all n positions: the gradient one process would
    compute from the whole global batch (up to floating-point summation order). A padding batch
    (n_r = 0) contributes nothing."""
    n = (labels != -100).sum().double()
    stats = torch.stack(
        [n, parts.loss.detach().double() * n, parts.ce.double() * n, parts.kd.double() * n,
         tokens.double()]
    )  # fmt: skip
    distributed.all_sum(d, stats)
    total = stats[0].clamp(min=1.0)
    scale = (n * d.world_size / total).to(parts.loss.dtype)
    logged = _Parts(stats[1] / total, stats[2] / total, stats[3] / total)
    return parts.loss * scale, logged, stats[4]


# --------------------------------------------------------------------------------------------
# Setup helpers


def _check_config(c: FitConfig) -> None:
    # NaN fails every comparison below but inf passes "> 0": every float must be finite first
    problems = [
        f"--{f.name.replace('_', '-')} must be a finite number, got {getattr(c, f.name)}"
        for f in dataclasses.fields(c)
        if f.type == "float" and not math.isfinite(getattr(c, f.name))
    ]
    if c.loss not in LOSSES:
        problems.append(f"--loss must be one of {', '.join(LOSSES)}, got {c.loss!r}")
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


def _check_run_dir(run_dir: Path, config: FitConfig) -> None:
    """Refuse to start over an existing run unless resuming or overwriting. A run that failed
    before its first checkpoint has nothing to keep, and is replaced silently."""
    present = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if config.resume:
        if not any((run_dir / n).is_dir() for n in (CHECKPOINT_DIR, ".checkpoint.old")):
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


def _clear_run_dir(run_dir: Path) -> None:
    for name in RUN_ARTIFACTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def _warmup_steps(config: FitConfig, total: int) -> int:
    if config.warmup_steps is not None:
        return config.warmup_steps
    return min(100, total // 20)


def _lr_factor(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for the update after `step` updates: linear warmup, cosine."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _optimizer(model: torch.nn.Module, c: FitConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (embeddings, linear weights) only."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": c.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=c.lr, betas=(c.beta1, c.beta2), fused=fused or None)


def _loss(logits: torch.Tensor, b: dict[str, torch.Tensor], c: FitConfig, hard_only: bool):
    if hard_only:  # hard labels only: the cached targets are never read into the loss
        labels = b["labels"]
        total = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        ce = total / (labels != -100).sum().clamp(min=1)  # 0, not NaN, if all are masked
        return _Parts(ce, ce.detach(), torch.zeros((), device=logits.device))
    return distillation_loss(
        logits, b["labels"], b["target_ids"], b["target_logprobs"],
        alpha=c.alpha, temperature=c.temperature, tail=c.tail,
    )  # fmt: skip


@dataclass
class _Parts:
    loss: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor


def _batches(
    ds: CacheDataset, c: FitConfig, epoch: int, stop: _StopFlag, pin: bool
) -> Iterator[dict[str, torch.Tensor]]:
    """The rest of `epoch` from the dataset's position. The loader gets its own generator, so
    creating it (at an epoch start or on resume) never draws from the global RNG."""
    ds.set_epoch(epoch)
    generator = torch.Generator().manual_seed(c.seed * 100_003 + epoch)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=c.num_workers, generator=generator,
        pin_memory=pin,
    )  # fmt: skip
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except LogitCacheError as exc:
            raise type(exc)(_worker_message(exc)) from None
        except RuntimeError:
            if stop.is_set():  # a worker died of the same Ctrl-C; the batch was not consumed
                return
            raise
        yield batch


def _worker_message(exc: LogitCacheError) -> str:
    """A DataLoader worker's error re-raised in the main process carries the worker's traceback
    in its message; keep only the original message."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    cls = type(exc)
    for marker in (f"\n{cls.__module__}.{cls.__qualname__}: ", f"\n{cls.__qualname__}: "):
        cut = text.rfind(marker)
        if cut >= 0:
            return text[cut + len(marker) :].strip()
    return text.strip().splitlines()[-1]


def _eval(
    model, ds: CacheDataset, c: FitConfig, device: torch.device, d: distributed.Dist
) -> dict[str, float]:
    """Held-out metrics; with several ranks each evaluates its share and the sums are combined."""
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=0)
    reduce = (lambda t: distributed.all_sum(d, t)) if d.enabled else None
    try:
        return evaluate_model(
            model, loader, device=device, precision=c.precision, max_batches=c.eval_batches,
            reduce=reduce,
        )  # fmt: skip
    except LogitCacheError as exc:
        raise type(exc)(_worker_message(exc)) from None


# --------------------------------------------------------------------------------------------
# Logging


class _LoopState:
    """Accumulates per-step values (as tensors: no device sync per step) and writes rows."""

    def __init__(self, c: FitConfig, run_dir: Path, total: int, per_epoch: int, metrics) -> None:
        self.c, self.run_dir, self.total, self.per_epoch = c, run_dir, total, per_epoch
        self.metrics = metrics
        self.start = self.window_start = time.perf_counter()
        self.tokens_logged = 0  # tokens of the steps already written to metrics.jsonl
        self.last_train: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.last_eval_result: dict[str, float] = {}
        self._reset()

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

    def record(self, parts, tokens: torch.Tensor) -> None:
        for key in self.sums:
            self.sums[key] = self.sums[key] + getattr(parts, key).detach().float()
        self.tokens = self.tokens + tokens
        self.n += 1

    def _epoch(self, ds: CacheDataset) -> float:
        s = ds.state_dict()
        return round(s["epoch"] + s["batches"] / max(1, self.per_epoch), 4)

    def log_train(self, step: int, ds: CacheDataset, lr: float, bar) -> None:
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
        bar.show(loss=row["loss"], rate=row["tokens_per_s"])
        self.window_start = now
        self._reset()

    def log_eval(self, step: int, ds: CacheDataset, result: dict[str, float]) -> None:
        row = {"kind": "eval", "step": step, "epoch": self._epoch(ds)}
        row |= {f"eval_{k}": v for k, v in result.items() if k != "sequences"}
        self._write(row)
        self.last_eval, self.last_eval_result = row, result

    def _write(self, row: dict[str, Any]) -> None:
        if self.metrics is None:  # not rank 0: only rank 0 writes the run directory
            return
        with _writing(self.run_dir, METRICS_FILE):
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()


def _truncate_metrics(path: Path, step: int) -> None:
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


class _Bar:
    def __init__(self, progress, task) -> None:
        self.progress, self.task = progress, task

    def update(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def show(self, *, loss: float, rate: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, loss=f"{loss:.4f}", rate=f"{rate:,.0f}")


class _ProgressBar:
    """A rich progress bar on stderr: steps, loss, tokens/s, elapsed and ETA."""

    def __init__(self, enabled: bool, total: int, start: int) -> None:
        self.enabled, self.total, self.start = enabled, total, start
        self.progress = None

    def __enter__(self) -> _Bar:
        if not self.enabled:
            return _Bar(None, None)
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]fit"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps  loss {task.fields[loss]}  {task.fields[rate]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.progress.start()
        task = self.progress.add_task(
            "fit", total=self.total, completed=self.start, loss="-", rate="-"
        )
        return _Bar(self.progress, task)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()


def _log(message: str, enabled: bool) -> None:
    if enabled:
        print(f"[trainer] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Stopping on signals


class _SampleLog:
    """With ``TRAINER_SAMPLE_LOG=FILE``, every rank appends one JSON line per step to FILE:
    ``{"step", "epoch", "rank", "world_size", "index"}`` (the storage indices of the sequences
    it trained on; -1 is padding). For checking the data order of a run, e.g. across a resume
    with another number of processes (docs/SCALING.md). Off by default."""

    def __init__(self, path: str | None, d: distributed.Dist) -> None:
        self.d = d
        self.file = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115

    @classmethod
    def from_env(cls, d: distributed.Dist) -> _SampleLog:
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


class _StopFlag:
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

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# --------------------------------------------------------------------------------------------
# Checkpoints and RNG


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(
    run_dir, model, optimizer, scheduler, ds, step, config, state, rng_ranks=None
) -> None:
    """Write checkpoint/ atomically: into a temporary directory, then two renames. `rng_ranks`:
    every rank's RNG state, in a data-parallel run (the dataset position is in global batches,
    so the checkpoint is the same whatever the number of ranks)."""
    tmp, final, old = (run_dir / n for n in (".checkpoint.tmp", CHECKPOINT_DIR, ".checkpoint.old"))
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        _write_checkpoint_files(
            tmp, model, optimizer, scheduler, ds, step, config, state, rng_ranks
        )
    except BaseException:  # a full disk, a second Ctrl-C: no half-written checkpoint left
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(run_dir)
    if old.exists():
        shutil.rmtree(old)


def _write_checkpoint_files(
    tmp, model, optimizer, scheduler, ds, step, config, state, rng_ranks
) -> None:
    """state.pt and config.json into the new directory `tmp`, fsynced."""
    tmp.mkdir()
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "dataset": ds.state_dict(),
        "tokens_seen": state.tokens_seen(),
        "window": state.window(),
        "rng": _rng_state() if rng_ranks is None else rng_ranks[0],
        "rng_ranks": rng_ranks or [],
        "world_size": len(rng_ranks or [None]),
        "student_config": config_to_dict(model),
        "config": dataclasses.asdict(config),
        "manifest": _identity(ds.cache.manifest),
    }
    _torch_save(state, tmp / "state.pt")
    _write_json(tmp / "config.json", {"step": step, "config": state["config"]})
    _fsync_dir(tmp)


def _torch_save(obj: Any, path: Path) -> None:
    """`torch.save` through a Python file, so that a failed write (a full disk) surfaces as the
    OSError it is: torch's writer reports it as a RuntimeError ("unexpected pos ..."), keeping
    the file's OSError only as that error's context."""
    with open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as exc:
            cause = exc.__context__
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__context__
            if cause is None:
                raise
            raise cause from exc


def _load_checkpoint(run_dir: Path) -> dict[str, Any]:
    for name in (CHECKPOINT_DIR, ".checkpoint.old"):  # .old: a crash between the two renames
        path = run_dir / name / "state.pt"
        if path.is_file():
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise LogitCacheError(
                    f"cannot read the checkpoint {path}: {exc}. Start over with --overwrite."
                ) from exc
    raise LogitCacheError(f"--resume: {run_dir} has no checkpoint/state.pt to resume from.")


def _check_resume(config: FitConfig, checkpoint: dict[str, Any], manifest) -> None:
    saved = checkpoint["config"]
    now = dataclasses.asdict(config)
    diffs = [
        f"{key}: checkpoint has {saved.get(key)!r}, this run has {now[key]!r}"
        for key in now
        if key not in RESUMABLE_CHANGES and saved.get(key) != now[key]
    ]
    identity = _identity(manifest)
    for key, value in checkpoint["manifest"].items():
        if identity.get(key) != value:
            diffs.append(
                f"cache {key}: checkpoint has {value!r}, this cache has {identity.get(key)!r}"
            )
    if diffs:
        raise LogitCacheError(
            "--resume with different settings than the checkpoint's:\n"
            + "\n".join(f"  {d}" for d in diffs)
            + "\nRerun with the original settings, or start a new run (--overwrite or another --out)."
        )


def _identity(manifest) -> dict[str, Any]:
    """What identifies a cache's content, independent of where it lives."""
    return {
        "teacher_name": manifest.teacher.name,
        "teacher_weights_sha256": manifest.teacher.weights_sha256,
        "teacher_vocab_size": manifest.teacher.vocab_size,
        "tokenizer_fingerprint": manifest.tokenizer.fingerprint,
        "data_fingerprint": manifest.data.fingerprint,
        "sequences": manifest.sequences,
        "tokens": manifest.tokens,
        "top_k": manifest.targets.k,
        "seq_len": manifest.layout.seq_len,
    }


def _summary(config, cache, source, n_params, step, total, warmup, state, final_eval) -> dict:
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
        "epochs": state.last_train.get("epoch"),
        "tokens_seen": state.tokens_seen(),
        "final": {"train": state.last_train, "eval": final_eval},
        "model_dir": str(Path(config.out) / MODEL_DIR),
    }


def _write_json(path: Path, doc: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _writing(run_dir: Path, what: str, partial: Path | None = None) -> Iterator[None]:
    """Writes into the run directory: an OSError (a full disk, a read-only filesystem, a
    missing permission) becomes a `LogitCacheError` naming the directory, what was being
    written and how to go on; `partial`, what the failed write leaves half-written, is removed
    (the checkpoint and JSON writers clean up their own temporary files)."""
    try:
        yield
    except (OSError, SafetensorError) as exc:  # safetensors: the final model's weights
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        resumable = any((run_dir / n).is_dir() for n in (CHECKPOINT_DIR, ".checkpoint.old"))
        again = (
            "then rerun the same command with --resume: it continues from the last checkpoint"
            if resumable
            else "then rerun the same command"
        )
        raise LogitCacheError(
            f"cannot write to the run directory {run_dir} ({what}): "
            f"{getattr(exc, 'strerror', None) or exc}. Free space on its filesystem or make it writable, or "
            f"choose another --out; {again}."
        ) from exc


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
