"""The embedded default teacher: a small GPT-2 trained on the Python standard library.

The demo, the tests and the benchmarks need a teacher model, but this project must work offline
(no model hub, no dataset downloads). This module builds one from the standard library's own
sources (`logitcache.testing.corpus`) and a locally trained byte-level BPE
(`logitcache.testing.tokenizer`): a GPT-2 teacher (random init, optionally trained for a few
seconds so that its soft targets are not uniform), saved with ``save_pretrained`` so that every
consumer loads it through the real code path: ``AutoModelForCausalLM.from_pretrained`` /
``AutoTokenizer.from_pretrained``; and the config of a student that shares its vocabulary.

Nothing here is meant to be a good language model; it is meant to be a *real* one (real
weights file, real tokenizer files, real, peaked output distributions) that costs seconds.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import random
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

# The corpus and tokenizer names are re-exported: `toy` stays the one module the tests, the demo
# and the benchmarks import for "a real teacher and its text".
from logitcache.testing.corpus import read_text, stdlib_files, stdlib_root, write_corpus
from logitcache.testing.tokenizer import EOS_TOKEN, train_tokenizer

__all__ = [
    "EOS_TOKEN",
    "INFO_FILE",
    "build_student_config",
    "build_teacher",
    "ensure_teacher",
    "read_info",
    "read_text",
    "stdlib_files",
    "stdlib_root",
    "train_tokenizer",
    "write_corpus",
]

#: Written last into a teacher directory; its presence means "build finished".
INFO_FILE = "toy_info.json"
#: Bump when the recipe changes so that ``ensure_teacher`` rebuilds cached teachers.
RECIPE_VERSION = 1
LR_SCHEDULES = ("constant", "cosine")
#: The loss of one packed (batch, seq_len) batch of ids under a model (`_train`).
LossOf = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def _log(msg: str, verbose: bool) -> None:
    if verbose:
        print(f"[toy] {msg}", file=sys.stderr, flush=True)


def _packed_batches(
    tokenizer: PreTrainedTokenizerFast,
    files: Sequence[Path],
    seq_len: int,
    batch_size: int,
    seed: int,
) -> Iterator[torch.Tensor]:
    """Endless ``[batch_size, seq_len]`` batches of documents joined with EOS.

    Files are tokenized lazily (in a seeded shuffled order, reshuffled per epoch) so that a
    two-second training run does not first tokenize the whole stdlib.
    """
    rng = random.Random(seed)
    eos = tokenizer.eos_token_id
    need = seq_len * batch_size
    buffer: list[int] = []
    order = list(files)
    while True:
        rng.shuffle(order)
        produced = False
        for path in order:
            text = read_text(Path(path))
            if text is None:
                continue
            produced = True
            buffer.extend(tokenizer.backend_tokenizer.encode(text).ids)
            buffer.append(eos)
            while len(buffer) >= need:
                chunk, buffer = buffer[:need], buffer[need:]
                yield torch.tensor(chunk, dtype=torch.long).view(batch_size, seq_len)
        if not produced:
            raise ValueError("no readable training text in the given files")


def _fingerprint_files(files: Sequence[Path] | None) -> str:
    """Short id of a training file list (names and sizes), for ``toy_info.json``."""
    if files is None:
        return "stdlib-train"
    h = hashlib.sha1()
    for path in files:
        p = Path(path)
        h.update(f"{p.as_posix()}\0{p.stat().st_size}\n".encode())
    return f"files:{len(files)}:{h.hexdigest()[:16]}"


def _fingerprint_tokenizer(tokenizer: PreTrainedTokenizerFast | None) -> str:
    if tokenizer is None:
        return "trained"
    digest = hashlib.sha1(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()
    return f"given:{digest[:16]}"


def _settings(args: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able settings that identify a teacher (what ``ensure_teacher`` compares)."""
    files = args["files"]
    return {
        "recipe_version": RECIPE_VERSION,
        "python": sysconfig.get_python_version(),
        "vocab_size": int(args["vocab_size"]),
        "n_layer": int(args["n_layer"]),
        "n_embd": int(args["n_embd"]),
        "n_head": int(args["n_head"]),
        "n_positions": int(args["n_positions"]),
        "train_seconds": float(args["train_seconds"]),
        "train_steps": int(args["train_steps"]),
        "seq_len": int(args["seq_len"]),
        "batch_size": int(args["batch_size"]),
        "lr": float(args["lr"]),
        "lr_schedule": str(args["lr_schedule"]),
        "warmup_steps": int(args["warmup_steps"]),
        "seed": int(args["seed"]),
        "data": _fingerprint_files(None if files is None else list(files)),
        "tokenizer": _fingerprint_tokenizer(args["tokenizer"]),
    }


def build_teacher(
    out_dir: Path,
    *,
    vocab_size: int = 8192,
    n_layer: int = 4,
    n_embd: int = 256,
    n_head: int = 4,
    n_positions: int = 1024,
    train_seconds: float = 0,
    train_steps: int = 0,
    seq_len: int = 256,
    batch_size: int = 8,
    lr: float = 1e-3,
    lr_schedule: str = "constant",
    warmup_steps: int = 0,
    seed: int = 0,
    files: Sequence[Path] | None = None,
    tokenizer: PreTrainedTokenizerFast | None = None,
    verbose: bool = True,
) -> Path:
    """Build, optionally train, and save a GPT-2 teacher plus tokenizer into ``out_dir``.

    The model is seeded-random; training (AdamW, grad-clip 1.0, packed ``seq_len`` sequences
    from ``files``, default: the stdlib train split) runs until ``train_seconds`` of wall time
    or ``train_steps`` steps, whichever is reached first (0 disables a limit; both 0 means no
    training). ``lr_schedule`` "constant" keeps ``lr``; "cosine" warms up linearly over
    ``warmup_steps`` and then decays to ``lr / 10`` along the fraction of the budget spent, so a
    teacher trained "for as long as it takes" still ends annealed (a strong teacher needs it). Even a few seconds make the output
    distributions peaked rather than near-uniform, which is what a soft-target cache needs to
    be tested meaningfully. Without ``tokenizer`` one is trained on ``files`` with
    ``vocab_size``; the model's vocabulary is always ``len(tokenizer)`` (so a given tokenizer
    wins over ``vocab_size``). Dropout is 0 so the same weights always give the same logits.

    Writes ``config.json``, ``model.safetensors``, ``generation_config.json``, the tokenizer
    files, and finally ``toy_info.json`` (settings, sizes, loss curve): its presence marks a
    finished build. Returns ``out_dir``.
    """
    if seq_len > n_positions:
        raise ValueError(f"seq_len ({seq_len}) must be <= n_positions ({n_positions})")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    files = None if files is None else list(files)
    settings = _settings(dict(locals()))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / INFO_FILE).unlink(missing_ok=True)  # an interrupted rebuild must not look done
    t_start = time.perf_counter()

    train_files = files if files is not None else stdlib_files("train")
    if tokenizer is None:
        _log(f"training byte-level BPE (vocab {vocab_size}) on {len(train_files)} files", verbose)
        tokenizer = train_tokenizer(train_files, vocab_size, model_max_length=n_positions)
    else:
        tokenizer.model_max_length = n_positions
    t_tok = time.perf_counter() - t_start

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    _log(f"GPT-2 {n_layer}x{n_embd}, vocab {len(tokenizer)}: {n_params / 1e6:.2f}M params", verbose)

    curve = _train(
        model,
        tokenizer,
        train_files,
        train_seconds=train_seconds,
        train_steps=train_steps,
        seq_len=seq_len,
        batch_size=batch_size,
        lr=lr,
        lr_schedule=lr_schedule,
        warmup_steps=warmup_steps,
        seed=seed,
        verbose=verbose,
    )
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    info = {
        "settings": settings,
        "vocab_size_actual": len(tokenizer),
        "n_params": n_params,
        "n_train_files": len(train_files),
        "tokenizer_seconds": round(t_tok, 3),
        "train": {
            "steps": len(curve),
            "seconds": round(curve[-1][1], 3) if curve else 0.0,
            "tokens": len(curve) * seq_len * batch_size,
            "first_loss": curve[0][2] if curve else None,
            "final_loss": curve[-1][2] if curve else None,
            # [step, elapsed seconds, loss] per optimizer step
            "loss_curve": curve,
        },
        "build_seconds": round(time.perf_counter() - t_start, 3),
        "created_unix": int(time.time()),
    }
    (out_dir / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    _log(f"saved teacher to {out_dir} in {info['build_seconds']:.1f}s", verbose)
    return out_dir


#: Captured once so that ``ensure_teacher`` fills in the real defaults even if a caller (or a
#: test spy) replaces the module attribute ``build_teacher``.
_BUILD_SIGNATURE = inspect.signature(build_teacher)


def _train(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    files: Sequence[Path],
    *,
    train_seconds: float,
    train_steps: int,
    seq_len: int,
    batch_size: int,
    lr: float,
    lr_schedule: str,
    warmup_steps: int,
    seed: int,
    verbose: bool,
    loss_of: LossOf | None = None,
) -> list[list[float]]:
    """Train in place; returns the loss curve as ``[step, elapsed_s, loss]`` rows. The loss of
    a packed batch is `loss_of` (default: the causal LM's own next-token loss), so a masked LM
    (`logitcache.testing.mlm`) trains with this same loop."""
    if train_seconds <= 0 and train_steps <= 0:
        return []
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    batches = _packed_batches(tokenizer, files, seq_len, batch_size, seed)
    curve: list[list[float]] = []
    # Progress is measured in whichever budget is set; with both, in seconds.
    total = float(train_seconds) if train_seconds > 0 else float(train_steps)
    progress = Progress(
        TextColumn("\\[toy] training teacher"),
        BarColumn(),
        TextColumn("step {task.fields[step]} loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not verbose,
        transient=False,
    )
    t0 = time.perf_counter()
    with progress:
        task = progress.add_task("train", total=total, step=0, loss="-")
        while True:
            elapsed = time.perf_counter() - t0
            if train_seconds > 0 and elapsed >= train_seconds:
                break
            if train_steps > 0 and len(curve) >= train_steps:
                break
            spent = max(
                elapsed / train_seconds if train_seconds > 0 else 0.0,
                len(curve) / train_steps if train_steps > 0 else 0.0,
            )
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(lr, lr_schedule, warmup_steps, len(curve), spent)
            loss = (loss_of or _causal_loss)(model, next(batches))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"teacher training diverged at step {len(curve)}")
            elapsed = time.perf_counter() - t0
            curve.append([len(curve), round(elapsed, 3), round(value, 5)])
            done = elapsed if train_seconds > 0 else len(curve)
            progress.update(task, completed=min(done, total), step=len(curve), loss=f"{value:.3f}")
    model.eval()
    if curve:
        _log(f"trained {len(curve)} steps: loss {curve[0][2]:.3f} -> {curve[-1][2]:.3f}", verbose)
    return curve


def _causal_loss(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    # Packed sequences have no padding; an explicit mask silences the pad==eos warning.
    mask = torch.ones_like(input_ids)
    return model(input_ids=input_ids, attention_mask=mask, labels=input_ids).loss


def _lr_at(lr: float, schedule: str, warmup_steps: int, step: int, spent: float) -> float:
    """The learning rate at ``step``, ``spent`` (0..1) of the training budget gone."""
    if schedule == "constant":
        return lr
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(spent, 1.0))))


def read_info(teacher_dir: Path) -> dict[str, Any] | None:
    """The ``toy_info.json`` of a finished teacher build, or None if absent/unreadable."""
    path = Path(teacher_dir) / INFO_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def ensure_teacher(out_dir: Path, **kw: Any) -> Path:
    """Return ``out_dir`` if it already holds a teacher built with these settings, else build.

    "Same settings" means ``toy_info.json`` records exactly the settings that
    ``build_teacher(out_dir, **kw)`` would record (all arguments with their defaults filled
    in, plus the recipe and Python versions); the weights and tokenizer files must also be
    present. This is what lets the demo and the benchmarks reuse a teacher across runs.
    """
    if kw.get("files") is not None:
        kw["files"] = list(kw["files"])  # fingerprinting must not consume an iterator
    bound = _BUILD_SIGNATURE.bind(out_dir, **kw)
    bound.apply_defaults()
    wanted = _settings(bound.arguments)
    out_dir = Path(out_dir)
    info = read_info(out_dir)
    have_files = all(
        (out_dir / name).is_file()
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    )
    if info is not None and have_files and info.get("settings") == wanted:
        _log(f"reusing teacher in {out_dir}", bool(bound.arguments["verbose"]))
        return out_dir
    return build_teacher(out_dir, **kw)


def build_student_config(
    teacher: Path | str | int,
    *,
    n_layer: int = 2,
    n_embd: int = 128,
    n_head: int = 4,
    n_positions: int = 1024,
    **overrides: Any,
) -> GPT2Config:
    """Config for a small GPT-2 student sharing the teacher's vocabulary.

    ``teacher`` is a teacher directory (its ``config.json`` supplies vocab size and special
    token ids) or a plain vocab size. Distillation from cached top-k targets indexes the
    student's logits by the teacher's token ids, so the vocabularies must match exactly.
    Dropout defaults to 0 like the teacher's; pass ``overrides`` for anything else.
    """
    if isinstance(teacher, int):
        vocab_size, special = teacher, {}
    else:
        teacher_cfg = GPT2Config.from_pretrained(teacher)
        vocab_size = teacher_cfg.vocab_size
        special = {
            "bos_token_id": teacher_cfg.bos_token_id,
            "eos_token_id": teacher_cfg.eos_token_id,
            "pad_token_id": teacher_cfg.pad_token_id,
        }
    params: dict[str, Any] = {
        "vocab_size": vocab_size,
        "n_layer": n_layer,
        "n_embd": n_embd,
        "n_head": n_head,
        "n_positions": n_positions,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        **special,
    }
    params.update(overrides)
    return GPT2Config(**params)
