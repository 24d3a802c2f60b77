"""Checkpoints: what a run needs to continue exactly where it stopped, written atomically.

``checkpoint/state.pt`` holds the model, optimizer and scheduler states, every rank's RNG
states, the dataset position (in global batches, so a run may resume with another number of
processes), the metrics window (the steps since the last metrics row), the run's config and the
identity of its cache; ``checkpoint/config.json`` repeats the step and config for people. The
directory is written aside (``.checkpoint.tmp``) and then renamed into place, so a crash leaves
the previous checkpoint or the new one, never half of one.

Every write into the run directory goes through `writing`, which turns a full disk or a
read-only filesystem into one clear message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError

from logitcache.errors import LogitCacheError
from logitcache.storage.files import fsync_dir, write_json_atomic
from trainer.config import (
    CHECKPOINT_DIR,
    CHECKPOINT_OLD,
    CHECKPOINT_TMP,
    RESUMABLE_CHANGES,
    FitConfig,
    has_checkpoint,
)
from trainer.student import config_to_dict

if TYPE_CHECKING:
    from trainer.dataset import CacheDataset

STATE_FILE = "state.pt"


# --------------------------------------------------------------------------------------------
# RNG


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch and CUDA generator states (`torch.load`-safe)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Save, load, restore


def save_checkpoint(
    run_dir: Path,
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    dataset: CacheDataset,
    config: FitConfig,
    tokens_seen: int,
    window: dict[str, Any],
    rng_ranks: list[dict[str, Any]] | None = None,
) -> None:
    """Write checkpoint/ atomically (`write_checkpoint`). `rng_ranks`: every rank's RNG state,
    in a data-parallel run (the dataset position is in global batches, so the checkpoint is the
    same whatever the number of ranks)."""
    write_checkpoint(run_dir, {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "dataset": dataset.state_dict(),
        "tokens_seen": tokens_seen,
        "window": window,
        "rng": rng_state() if rng_ranks is None else rng_ranks[0],
        "rng_ranks": rng_ranks or [],
        "world_size": len(rng_ranks or [None]),
        "student_config": config_to_dict(model),
        "config": dataclasses.asdict(config),
        "manifest": cache_identity(dataset.cache.manifest),
    })  # fmt: skip


def write_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Write checkpoint/ holding `state` (its "step" and "config" repeated in config.json)
    atomically: into a temporary directory, then two renames. Any recipe's state: the
    language-model recipe's (`save_checkpoint`) or the classifier's (`trainer.classify`)."""
    tmp, final, old = (run_dir / n for n in (CHECKPOINT_TMP, CHECKPOINT_DIR, CHECKPOINT_OLD))
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        _write_checkpoint_files(tmp, state)
    except BaseException:  # a full disk, a second Ctrl-C: no half-written checkpoint left
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    fsync_dir(run_dir)
    if old.exists():
        shutil.rmtree(old)


def _write_checkpoint_files(tmp: Path, state: dict[str, Any]) -> None:
    """state.pt and config.json into the new directory `tmp`, fsynced."""
    tmp.mkdir()
    _torch_save(state, tmp / STATE_FILE)
    write_json_atomic(tmp / "config.json", {"step": state["step"], "config": state["config"]})
    fsync_dir(tmp)


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


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    for name in (CHECKPOINT_DIR, CHECKPOINT_OLD):  # .old: a crash between the two renames
        path = run_dir / name / STATE_FILE
        if path.is_file():
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise LogitCacheError(
                    f"cannot read the checkpoint {path}: {exc}. Start over with --overwrite."
                ) from exc
    raise LogitCacheError(f"--resume: {run_dir} has no checkpoint/state.pt to resume from.")


def restore_checkpoint(
    checkpoint: dict[str, Any],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    dataset: CacheDataset,
    rank: int,
    world_size: int,
) -> int:
    """Load the saved states into the live objects and this rank's RNG; the step to resume at.
    A checkpoint of another number of processes gives every rank rank 0's RNG state."""
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    dataset.load_state_dict(checkpoint["dataset"])
    ranks = checkpoint.get("rng_ranks") or []
    set_rng_state(ranks[rank] if len(ranks) == world_size else checkpoint["rng"])
    return int(checkpoint["step"])


def check_resume(
    config: Any,
    checkpoint: dict[str, Any],
    manifest: Any,
    resumable: frozenset[str] = RESUMABLE_CHANGES,
) -> None:
    """Refuse to resume with settings (outside `resumable`) or a cache that differ from the
    checkpoint's: the resumed run would not be the run that was started. A setting newer than
    the checkpoint (``beta``, say) counts as its default: what that run did. `config` is the
    run's settings dataclass (a `FitConfig`, or the classifier's `ClassifierConfig`)."""
    saved = {f.name: f.default for f in dataclasses.fields(config)} | checkpoint["config"]
    now = dataclasses.asdict(config)
    diffs = [
        f"{key}: checkpoint has {saved.get(key)!r}, this run has {now[key]!r}"
        for key in now
        if key not in resumable and saved.get(key) != now[key]
    ]
    identity = cache_identity(manifest)
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


def cache_identity(manifest: Any) -> dict[str, Any]:
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


# --------------------------------------------------------------------------------------------
# Writing into the run directory


@contextlib.contextmanager
def writing(run_dir: Path, what: str, partial: Path | None = None) -> Iterator[None]:
    """Writes into the run directory: an OSError (a full disk, a read-only filesystem, a
    missing permission) becomes a `LogitCacheError` naming the directory, what was being
    written and how to go on; `partial`, what the failed write leaves half-written, is removed
    (the checkpoint and JSON writers clean up their own temporary files)."""
    try:
        yield
    except (OSError, SafetensorError) as exc:  # safetensors: the final model's weights
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        again = (
            "then rerun the same command with --resume: it continues from the last checkpoint"
            if has_checkpoint(run_dir)
            else "then rerun the same command"
        )
        raise LogitCacheError(
            f"cannot write to the run directory {run_dir} ({what}): "
            f"{getattr(exc, 'strerror', None) or exc}. Free space on its filesystem or make it writable, or "
            f"choose another --out; {again}."
        ) from exc
