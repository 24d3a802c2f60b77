"""Held-out evaluation of a student against a cache: CE, KL to the teacher, top-1 agreement.

All three are token averages over the positions that have a label: the next token, or for a
masked-LM cache (format 1.3) the masked positions, whose label is the token the masking replaced
(masked-token CE, KL and agreement):

``ce``
    cross-entropy of the student on the real next tokens (nats/token); ``ppl = exp(ce)``.
``kl``
    KL(teacher || student) at temperature 1 restricted to the cached top-k ids plus one tail
    bucket holding the rest of the vocabulary (both sides' tails summed): the exact KL between
    the two distributions coarsened to those k+1 categories, a lower bound on the full KL. For
    a sampled cache the teacher side is ``count / N`` on the drawn ids (no tail): the
    cross-entropy part is unbiased, the entropy part is not (the plug-in entropy of counts is
    low), so compare such numbers only between caches of the same N.
``top1``
    fraction of positions where the student's argmax is the teacher's most probable id.

The teacher is never loaded: its side comes from the cache only.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

import logitcache
from logitcache.errors import LogitCacheError
from logitcache.runtime import load_tokenizer, resolve_device
from trainer.align import StudentTokens
from trainer.dataset import SPLITS, CacheDataset, refuse_classification
from trainer.losses import ULD_LOSS, distillation_loss, hard_label_loss, uld_distance
from trainer.student import RUN_MODEL_DIR, build_student, max_positions


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast (weights and loss stay float32), or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    device: torch.device,
    precision: str = "fp32",
    max_batches: int = 0,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    uld: bool = False,
) -> dict[str, float]:
    """CE, KL (bucket tail, T=1) and top-1 agreement of `model` over `batches` (all if 0).

    `reduce`, if given, sums the per-process totals over processes (data-parallel evaluation:
    each rank evaluates its share of the batches; padding rows, ``index`` -1, count nothing).

    With `uld` (a student with another tokenizer: batches of `trainer.align.StudentTokens`),
    the teacher's ids are not the student's, so there is no KL or top-1 agreement: ``uld`` is
    the ULD distance (`trainer.losses.uld_distance`, T=1) in their place, and ``paired`` the
    share of the student's labelled positions that have a teacher position."""
    was_training = model.training
    model.eval()
    ce_sum = kl_sum = agree = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.int64, device=device)
    sequences = 0
    try:
        for i, batch in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast(device, precision):
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            mask = b["labels"] != -100  # (B, T)
            n = mask.sum()
            if uld:
                paired = mask & ~b["target_logprobs"][..., 0].isneginf()  # (B, T)
                ce_sum = ce_sum + hard_label_loss(logits, b["labels"]).ce.double() * n
                distance = uld_distance(logits, b["labels"], b["target_logprobs"])
                kl_sum = kl_sum + distance.double() * paired.sum()
                agree = agree + paired.sum()  # here: the positions with a ULD term
            else:
                parts = distillation_loss(
                    logits, b["labels"], b["target_ids"], b["target_logprobs"],
                    alpha=0.5, temperature=1.0, tail="bucket",
                )  # fmt: skip
                ce_sum = ce_sum + parts.ce.double() * n
                kl_sum = kl_sum + parts.kd.double() * n
                agree = agree + ((logits.argmax(-1) == b["target_ids"][..., 0]) & mask).sum()
            tokens = tokens + n
            sequences += int((b["index"] >= 0).sum()) if "index" in b else len(b["input_ids"])
    finally:
        model.train(was_training)
    if reduce is not None:
        totals = torch.stack([ce_sum, kl_sum, agree.double(), tokens.double()])
        totals = reduce(torch.cat([totals, totals.new_tensor([sequences])]))
        ce_sum, kl_sum, agree, tokens = totals[:4]
        sequences = int(totals[4])
    count = int(tokens)
    if count == 0:
        raise LogitCacheError("nothing to evaluate: the split has no positions with a label.")
    ce = float(ce_sum) / count
    teacher = (
        {"uld": float(kl_sum) / max(float(agree), 1.0), "paired": float(agree) / count}
        if uld
        else {"kl": float(kl_sum) / count, "top1": float(agree) / count}
    )
    return {
        "ce": ce,
        "ppl": math.exp(min(ce, 700.0)),
        **teacher,
        "tokens": count,
        "sequences": sequences,
    }


def run_config(student: str | Path) -> dict[str, Any] | None:
    """The training config of a trainer run directory (None for a plain model directory)."""
    path = Path(student)
    for candidate in (path / "summary.json", path.parent / "summary.json"):
        if path.is_dir() and candidate.is_file():
            try:
                return json.loads(candidate.read_text(encoding="utf-8")).get("config")
            except (OSError, ValueError):
                return None
    return None


def evaluate(
    cache: str | Path | logitcache.Cache,
    student: str | Path,
    *,
    split: str = "eval",
    eval_fraction: float | None = None,
    batch_size: int = 8,
    device: str = "auto",
    precision: str = "fp32",
    max_batches: int = 0,
    num_workers: int = 0,
    cache_dir: str | Path | None = None,
    tokenizer: str | None = None,
) -> dict[str, Any]:
    """Evaluate a saved student (a model directory or a trainer run directory) on a cache split.

    ``split`` "eval" is the held-out split that training left out; its ``eval_fraction``
    defaults to the run's own (read from the run's summary.json), else 0.01. "train" is the
    rest, "all" every sequence (use it for a separately dumped held-out cache). `cache_dir` is
    where the parts of a cache at a URL are fetched to (see `logitcache.open`). `tokenizer` is
    the student's own tokenizer when it differs from the teacher's (a ``--loss uld`` student, on
    a cache dumped with ``--offsets``): CE is then in the student's tokens, with the ULD
    distance in place of KL and top-1 (`evaluate_model`); a ``--loss uld`` run directory
    brings its own by default. Returns the metrics of
    `evaluate_model` plus the split, cache and student.
    """
    if split not in SPLITS:
        raise LogitCacheError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}.")
    if precision not in ("fp32", "bf16"):
        raise LogitCacheError(f"--precision must be fp32 or bf16, got {precision!r}.")
    is_open = isinstance(cache, logitcache.Cache)
    c = cache if is_open else logitcache.open(cache, cache_dir=cache_dir)
    refuse_classification(c)
    trained = run_config(student) or {}
    if eval_fraction is None:
        eval_fraction = float(trained.get("eval_fraction", 0.01))
    if tokenizer is None and trained.get("loss") == ULD_LOSS:  # a run's own tokenizer
        tokenizer = trained.get("tokenizer")
    if split == "eval" and eval_fraction <= 0:
        raise LogitCacheError(
            "the run held out nothing (eval fraction 0), so there is no eval split; "
            "use --split all on a separately dumped held-out cache."
        )
    torch_device = resolve_device(device)
    # the model before the split: a missing or untrained student is the first thing to fix
    own = (
        None
        if tokenizer is None
        else load_tokenizer(tokenizer, flag="--tokenizer", local_only=True)
    )
    model, source = build_student(student, c.manifest, student_tokenizer=own)
    if source.kind != "pretrained":
        raise LogitCacheError(
            f"--student {student} has no trained weights (only a config). Pass a trainer run "
            f"directory (with {RUN_MODEL_DIR}/) or a model saved with save_pretrained."
        )
    ds = CacheDataset(
        c, batch_size=batch_size, split=split,
        eval_fraction=0.0 if split == "all" else eval_fraction, shuffle=False,
        student_tokens=None if own is None else StudentTokens(own, c.manifest, max_positions(model.config)),
    )  # fmt: skip
    model.to(torch_device)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers)
    metrics = evaluate_model(
        model, loader, device=torch_device, precision=precision, max_batches=max_batches,
        uld=own is not None,
    )  # fmt: skip
    return {
        "split": split,
        "eval_fraction": eval_fraction if split != "all" else 0.0,
        "cache": str(c.root),
        "student": str(source.path),
        # a masked-LM cache's labels are the tokens its masking replaced, nothing else
        "positions": "masked" if c.manifest.masking is not None else "next-token",
        **metrics,
    }
