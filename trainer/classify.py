"""`trainer fit --task classification`: a student classifier from a classification cache.

One self-contained recipe: `fit_classifier` -> `load_rows` (every target row of the cache, with
its example, label and view) -> `train_classifier` (shuffled rows; each batch's inputs are its
examples with the stored views replayed by the dump's own `apply_views`, bit for bit the
teacher's inputs) -> `evaluate_classifier` on held-out examples. The loss is the textbook one,

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(t / T) || softmax(s / T))

with CE over the rows that carry a label and KL over every row (`classifier_loss`; the KL is
`trainer.losses.sparse_kd_loss` on the stored classes). With full-distribution targets (every
class in float32) that KL is the dense one up to float32 rounding;
`tests/trainer/test_fit_classifier.py` checks it against the formula.

A run is resumable as the language-model recipe's is, through the same `trainer.checkpoint`
and `trainer.signals`: atomic checkpoints every `checkpoint_every` steps, SIGINT/SIGTERM
stopping it at a step boundary with one, and `resume` continuing with the same order and RNG,
so the final weights are an uninterrupted run's (`Checkpoints`).

`train_classifier` takes the batches from a function, so an online-distillation or hard-label
baseline (benchmarks/bench_digits.py) runs the very same loop and loss with other targets.

A text cache (`task.input` "text") is trained the same way: `cache_examples` tokenizes --data
with the cache's tokenizer (its fingerprint checked) to the dump's length, so each example is
the (2, seq_len) ids and attention mask the teacher read, and a sequence-classification student
(`build_classifier`) reads them through `logitcache.examples.text.TextInputs`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

import logitcache
from logitcache.errors import LogitCacheError
from logitcache.examples.load import Examples, Text, load_examples
from logitcache.examples.text import TextInputs
from logitcache.examples.views import apply_views
from logitcache.progress import progress_bar
from logitcache.runtime import load_tokenizer, resolve_device
from logitcache.storage.files import write_json_atomic
from trainer.checkpoint import (
    cache_identity,
    check_resume,
    load_checkpoint,
    rng_state,
    set_rng_state,
    write_checkpoint,
    writing,
)
from trainer.config import CLASSIFIER_MODEL_FILE, check_run_dir, clear_run_dir
from trainer.losses import LossParts, sparse_kd_loss
from trainer.signals import Interrupted, StopFlag

__all__ = [
    "Batch",
    "Checkpoints",
    "ClassifierConfig",
    "Rows",
    "build_classifier",
    "cache_examples",
    "classifier_loss",
    "evaluate_classifier",
    "fit_classifier",
    "load_rows",
    "train_classifier",
]

IGNORE = -100  # the label of a row without one (CE skips it, KL does not)


@dataclass
class ClassifierConfig:
    """Every setting of a classifier run (the `trainer fit --task classification` flags)."""

    cache: str
    data: str  # the examples the cache was dumped from (checked by fingerprint)
    student: str  # MODULE:FUNCTION returning a torch module, or an image-classifier config.json
    out: str = "run"
    alpha: float = 0.5  # weight of the hard-label CE
    temperature: float = 1.0  # as `trainer fit`; the textbook classifier KD uses 4 to 8
    #: the share of examples whose labels are used (seeded): the rest train on soft labels only
    label_fraction: float = 1.0
    batch_size: int = 64
    epochs: float = 10.0
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"
    eval_cache: str | None = None  # a classification cache of held-out examples (no views)
    eval_data: str | None = None  # its examples
    resize: tuple[int, int] | None = None  # as the dump's --resize
    progress: bool = True
    #: text caches: the tokenizer (default: the one the cache names), checked by fingerprint
    tokenizer: str | None = None
    input_field: str | None = None  # as the dump's --input-field (text: default the cache's)
    label_field: str | None = None  # as the dump's --label-field
    checkpoint_every: int = 500  # steps between checkpoints (0: only when a signal stops it)
    resume: bool = False  # continue the run in `out` from its checkpoint
    overwrite: bool = False  # replace a run in `out`

    def check(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise LogitCacheError(f"--alpha must be in [0, 1], got {self.alpha}.")
        if not 0 < self.temperature < math.inf:
            raise LogitCacheError(f"--temperature must be positive, got {self.temperature}.")
        if not 0.0 < self.label_fraction <= 1.0:
            raise LogitCacheError(f"--label-fraction must be in (0, 1], got {self.label_fraction}.")
        if self.batch_size < 1 or self.epochs <= 0 or self.lr <= 0:
            raise LogitCacheError("--batch-size, --epochs and --lr must be positive.")
        if (self.eval_cache is None) != (self.eval_data is None):
            raise LogitCacheError("--eval-cache and --eval-data go together (held-out targets).")
        if self.checkpoint_every < 0:
            raise LogitCacheError(
                f"--checkpoint-every must be 0 or more, got {self.checkpoint_every}."
            )
        if self.resume and self.overwrite:
            raise LogitCacheError("--resume and --overwrite contradict each other; choose one.")


#: What may change when a classifier run resumes: nothing that changes its weights.
RESUMABLE = frozenset(
    {"cache", "data", "out", "resume", "overwrite", "progress", "device", "checkpoint_every",
     "eval_cache", "eval_data", "tokenizer"}
)  # fmt: skip


@dataclass
class Checkpoints:
    """Where `train_classifier` checkpoints (every `checkpoint_every` steps of its config, and
    when SIGINT or SIGTERM stops it at a step boundary) and the checkpoint it continues from."""

    run_dir: Path
    identity: dict[str, Any]  # the cache's (`trainer.checkpoint.cache_identity`)
    resume: dict[str, Any] | None = None  # a loaded checkpoint


class Rows(NamedTuple):
    """Every target row of a classification cache, in storage order (R rows)."""

    example: torch.Tensor  # (R,) int64: the example's index in the data
    labels: torch.Tensor  # (R,) int64, IGNORE where the cache holds none
    views: torch.Tensor | None  # (R, 5) int32: (top, left, height, width, flip), or None
    target_ids: torch.Tensor  # (R, K) int64
    target_logprobs: torch.Tensor  # (R, K) float32, at the dump temperature; -inf padding


class Batch(NamedTuple):
    """What one step trains on: inputs (B, *shape), labels (B,), targets (B, K)."""

    inputs: torch.Tensor
    labels: torch.Tensor
    target_ids: torch.Tensor
    target_logprobs: torch.Tensor


def load_rows(cache: logitcache.Cache, examples: Examples) -> Rows:
    """The rows of `cache`, refused unless it is a classification cache of `examples`."""
    m = cache.manifest
    refuse_language_model(cache)
    if not cache.holds_data(examples.info) or examples.shape != m.task.shape:
        merged = (
            f" It merges {len(m.merged_from)} caches: only a merge of every --shard I/N cache "
            "of one dump, in shard order, trains against that dump's --data."
            if m.merged_from
            else ""
        )
        raise LogitCacheError(
            f"--data {examples.info.source} is not the data {cache.location} was dumped from "
            f"({m.data.source}, fingerprint {m.data.fingerprint[:12]}; this data has "
            f"{examples.info.fingerprint[:12]}, shape {examples.shape}). Pass that data (and "
            "the dump's --resize)." + merged
        )
    parts = [cache.read_decoded(i) for i in range(cache.num_parts)]
    example = [
        np.repeat(np.arange(*cache.part_span(i)), np.diff(p.seq_offsets))
        for i, p in enumerate(parts)
    ]
    rows = sum(len(e) for e in example)
    labels = (
        torch.from_numpy(np.concatenate([p.labels for p in parts]).astype(np.int64))
        if m.task.labels
        else torch.full((rows,), IGNORE, dtype=torch.int64)
    )
    views = torch.from_numpy(np.concatenate([p.views for p in parts])) if m.task.views else None
    return Rows(
        torch.from_numpy(np.concatenate(example)),
        labels,
        views,
        torch.from_numpy(np.concatenate([p.target_ids for p in parts]).astype(np.int64)),
        torch.from_numpy(np.concatenate([p.target_logprobs for p in parts]).astype(np.float32)),
    )


def refuse_language_model(cache: logitcache.Cache) -> None:
    """Refuse a causal- or masked-LM cache: its targets are per token, not per example."""
    m = cache.manifest
    if m.task is None:
        kind = "causal-LM" if m.masking is None else "masked-LM"
        raise LogitCacheError(
            f"{cache.location} is a {kind} cache (per-token targets, no examples); --task "
            "classification trains from a cache written by `logitcache dump --task "
            "classification`. Train a language model from it with `trainer fit` without "
            "--task classification."
        )


def cache_examples(cache: logitcache.Cache, data: str, config: ClassifierConfig) -> Examples:
    """The examples of `data` as the teacher of `cache` read them: images and arrays decoded as
    the dump decodes them; text tokenized with the cache's tokenizer (`config.tokenizer`, else
    the one the manifest names, refused unless its fingerprint is the cache's) to its length."""
    refuse_language_model(cache)  # before --data is read: a cache of the wrong kind comes first
    m = cache.manifest
    fields = {"input_field": config.input_field, "label_field": config.label_field}
    if m.task.input != "text":
        return load_examples(data, resize=config.resize, **fields)
    if config.tokenizer is None and not Path(m.tokenizer.name).exists():
        raise LogitCacheError(
            f"{cache.location} was tokenized with {m.tokenizer.name}, which is not on this "
            "machine: pass that tokenizer with --tokenizer (a directory or tokenizer.json)."
        )
    source = config.tokenizer or m.tokenizer.name
    flag = "--tokenizer" if config.tokenizer else None
    tok = load_tokenizer(source, flag=flag, local_only=True)
    if logitcache.tokenizer_fingerprint(tok) != m.tokenizer.fingerprint:
        raise LogitCacheError(
            f"the tokenizer {source} is not the one {cache.location} was dumped with (fingerprint "
            f"{logitcache.tokenizer_fingerprint(tok)[:12]} vs {m.tokenizer.fingerprint[:12]}): "
            "the student would read other token ids than the teacher. Pass the teacher's "
            "tokenizer with --tokenizer."
        )
    fields["input_field"] = config.input_field or m.data.text_field
    return load_examples(data, text=Text(tok, m.task.shape[0]), **fields)


def keep_labels(
    labels: torch.Tensor, example: torch.Tensor, fraction: float, seed: int
) -> torch.Tensor:
    """`labels` with those of all but a seeded `fraction` of the examples set to IGNORE (every
    view of a kept example keeps its label): the few-labels setting."""
    if fraction >= 1.0:
        return labels
    n = int(example.max()) + 1 if len(example) else 0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    kept = torch.zeros(n, dtype=torch.bool)
    kept[order[: max(1, round(fraction * n))]] = True
    return torch.where(kept[example], labels, IGNORE)


def cached_batches(rows: Rows, examples: Examples) -> Callable[[torch.Tensor, int], Batch]:
    """Batches from the cache: the rows' examples with their stored views replayed."""

    def batch(index: torch.Tensor, epoch: int) -> Batch:
        inputs = examples.inputs[rows.example[index]]
        if rows.views is not None:
            inputs = apply_views(inputs, rows.views[index])
        return Batch(
            inputs, rows.labels[index], rows.target_ids[index], rows.target_logprobs[index]
        )

    return batch


def classifier_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
) -> LossParts:
    """``alpha * CE + (1 - alpha) * T^2 * KL``: logits (B, C), labels (B,) with IGNORE for
    rows without one (CE is their mean over labelled rows, 0 if none), targets (B, K) teacher
    log-probs on their ids (the KL is over every row, renormalised over the K stored classes,
    exact with all C stored)."""
    labelled = labels != IGNORE
    ce_sum = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")
    ce = ce_sum / labelled.sum().clamp(min=1)
    if alpha == 1.0:
        return LossParts(ce, ce.detach(), torch.zeros((), device=logits.device))
    every = torch.zeros_like(labels)[:, None]  # (B, 1): no row masked for the KL
    kd = sparse_kd_loss(
        logits[:, None], every, target_ids[:, None], target_logprobs[:, None],
        temperature=temperature,
    )  # fmt: skip
    total = alpha * ce + (1.0 - alpha) * temperature**2 * kd
    return LossParts(total, ce.detach(), kd.detach())


def build_classifier(spec: str, probe: torch.Tensor, classes: int, seed: int) -> torch.nn.Module:
    """The student: `MODULE:FUNCTION` returning a torch module, or a transformers image or
    sequence classifier config (a config.json file or a directory holding one; its
    "architectures" decide), initialised under `seed`; refused unless it maps `probe`
    (1, *shape) to (1, classes) logits. For text (an integer `probe`, ids over mask) the module
    is called as ``model(input_ids=..., attention_mask=...)``, through `TextInputs`."""
    torch.manual_seed(seed)
    if ":" in spec and not Path(spec).exists():
        module_name, _, fn_name = spec.partition(":")
        try:
            model = getattr(importlib.import_module(module_name), fn_name)()
        except (ImportError, AttributeError) as exc:
            raise LogitCacheError(f"cannot import --student {spec}: {exc}.") from exc
    else:
        model = _pretrained_student(spec, text=not probe.is_floating_point())
    if not isinstance(model, torch.nn.Module):
        raise LogitCacheError(f"--student {spec} did not give a torch module.")
    if not probe.is_floating_point() and not isinstance(model, TextInputs):
        model = TextInputs(model)
    check_vocabulary(model, probe, spec)
    with torch.no_grad():
        out = model(probe)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise LogitCacheError(
            f"--student {spec} returned {got} for one example; the cache has {classes} classes, "
            f"so a student returns (batch, {classes}) logits."
        )
    return model.float().train()


def _pretrained_student(spec: str, *, text: bool) -> torch.nn.Module:
    """A transformers classifier built from the config at `spec`: a sequence classifier for
    text (as `TextInputs`), an image classifier otherwise."""
    from transformers import (
        AutoConfig,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
    )

    what = "a sequence" if text else "an image"
    try:
        config = AutoConfig.from_pretrained(spec)
        if text:
            return TextInputs(AutoModelForSequenceClassification.from_config(config))
        return _Logits(AutoModelForImageClassification.from_config(config))
    except (OSError, ValueError, KeyError) as exc:
        raise LogitCacheError(
            f"cannot build {what} classifier from --student {spec} ({exc}). Pass "
            f"MODULE:FUNCTION or a transformers {what.split()[-1]}-classification config."
        ) from exc


def check_vocabulary(model: torch.nn.Module, inputs: torch.Tensor, spec: str) -> None:
    """Refuse a text student whose embedding is narrower than the ids of `inputs` (text
    examples, (N, 2, seq_len); images pass): it would fail on the first batch holding one."""
    if inputs.is_floating_point():
        return
    width = getattr(getattr(model, "config", None), "vocab_size", None)
    top = int(inputs[:, 0].max())
    if isinstance(width, int) and top >= width:
        raise LogitCacheError(
            f"--student {spec} embeds {width} token ids, but the examples hold id {top} (the "
            f"cache's tokenizer): give the student vocab_size {top + 1} or more, the teacher's "
            "tokenizer's size."
        )


class _Logits(torch.nn.Module):
    """A transformers classifier as a module that returns its logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def train_classifier(
    model: torch.nn.Module,
    batches: Callable[[torch.Tensor, int], Batch],
    rows: int,
    config: ClassifierConfig,
    device: torch.device,
    checkpoints: Checkpoints | None = None,
) -> list[dict[str, float]]:
    """AdamW with a cosine schedule over `config.epochs` passes of `rows` rows, shuffled under
    `config.seed`; `batches(index, epoch)` gives each step's batch. Returns one metrics row per
    epoch (mean loss, CE, KD).

    With `checkpoints`, the run is resumable as the language-model recipe's is (the same
    `trainer.checkpoint` and `trainer.signals`): each checkpoint holds the model, optimizer and
    schedule, the step, the epoch's shuffle (the order generator's state before its draw), the
    epoch's sums so far, the finished epochs' rows and the RNG, so a resumed run ends with the
    weights and metrics of an uninterrupted one. SIGINT/SIGTERM stop it at the next step
    boundary with a checkpoint (`Interrupted`)."""
    model.to(device).train()
    per_epoch = math.ceil(rows / config.batch_size)
    total = max(1, round(config.epochs * per_epoch))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    order = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, float]] = []
    step, first_epoch, sums = 0, 0, torch.zeros(3)
    saved = checkpoints.resume if checkpoints is not None else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["scheduler"])
        order.set_state(saved["order"])
        step, first_epoch, sums = saved["step"], saved["epoch"], saved["sums"]
        history = list(saved["history"])
        set_rng_state(saved["rng"])
    stopping = StopFlag() if checkpoints is not None else contextlib.nullcontext()
    shown = progress_bar("fit", total=total, unit="steps", enabled=config.progress, completed=step)
    with stopping as stop, shown as bar:
        for epoch in range(first_epoch, math.ceil(total / per_epoch)):
            drawn_from = order.get_state()  # what a checkpoint of this epoch keeps
            perm = torch.randperm(rows, generator=order)
            if epoch != first_epoch or saved is None:
                sums = torch.zeros(3)
            done = (step - epoch * per_epoch) * config.batch_size  # > 0: a resumed epoch
            for start in range(done, rows, config.batch_size):
                if step == total:
                    break
                b = batches(perm[start : start + config.batch_size], epoch)
                parts = classifier_loss(
                    model(b.inputs.to(device)), b.labels.to(device), b.target_ids.to(device),
                    b.target_logprobs.to(device), alpha=config.alpha,
                    temperature=config.temperature,
                )  # fmt: skip
                optimizer.zero_grad(set_to_none=True)
                parts.loss.backward()
                optimizer.step()
                schedule.step()
                sums += torch.stack([p.detach().cpu() for p in parts])
                step += 1
                bar.advance()
                if checkpoints is None:
                    continue
                stopped = stop.is_set()
                every = config.checkpoint_every
                if stopped or (every and step % every == 0):
                    state = {
                        "step": step, "epoch": epoch, "order": drawn_from, "sums": sums.clone(),
                        "history": history, "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(),
                        "rng": rng_state(), "config": asdict(config),
                        "manifest": checkpoints.identity,
                    }  # fmt: skip
                    with writing(checkpoints.run_dir, "the checkpoint"):
                        write_checkpoint(checkpoints.run_dir, state)
                if stopped:
                    raise Interrupted(step, checkpoints.run_dir)
            n = max(1, min(per_epoch, step - epoch * per_epoch))
            history.append(dict(zip(("loss", "ce", "kd"), (sums / n).tolist(), strict=True)))
    return history


@torch.no_grad()
def evaluate_classifier(
    model: torch.nn.Module,
    examples: Examples,
    device: torch.device,
    teacher: Rows | None = None,
    batch_size: int = 512,
) -> dict[str, float]:
    """On held-out `examples` (the examples themselves, no views): accuracy and CE against their
    labels, and with `teacher` (the rows of a cache of them without views) the KL(teacher ||
    student) at T = 1 on the stored classes and the agreement of the two top classes."""
    model.to(device).eval()
    logits = torch.cat([model(examples.inputs[a : a + batch_size].to(device)).float().cpu()
                        for a in range(0, len(examples), batch_size)])  # fmt: skip
    model.train()
    out: dict[str, float] = {}
    if examples.labels is not None:
        labels = torch.from_numpy(examples.labels)
        out["accuracy"] = float((logits.argmax(-1) == labels).float().mean())
        out["ce"] = float(F.cross_entropy(logits, labels))
    if teacher is not None:
        if len(teacher.example) != len(examples) or teacher.views is not None:
            raise LogitCacheError(
                "--eval-cache must hold one row per held-out example (dumped without --views)."
            )
        every = torch.zeros(len(logits), 1, dtype=torch.int64)
        kl = sparse_kd_loss(logits[:, None], every, teacher.target_ids[:, None],
                            teacher.target_logprobs[:, None])  # fmt: skip
        top = teacher.target_ids.gather(-1, teacher.target_logprobs.argmax(-1, keepdim=True))
        out["kl"] = float(kl)
        out["agreement"] = float((logits.argmax(-1) == top.squeeze(-1)).float().mean())
    return out


def fit_classifier(config: ClassifierConfig) -> dict[str, Any]:
    """Train a student classifier from `config.cache` and write `config.out`: model.pt (the
    state dict), metrics.jsonl (one row per epoch) and summary.json (the config and the
    held-out metrics); checkpoint/ while it runs (`Checkpoints`). The run directory follows
    the language-model recipe's rules (`trainer.config.check_run_dir`): an existing run is
    continued with `resume` or replaced with `overwrite`, never by accident."""
    config.check()
    out = Path(config.out)
    check_run_dir(out, config)
    device = resolve_device(config.device)
    cache = logitcache.open(config.cache)
    checkpoint = load_checkpoint(out) if config.resume else None
    if checkpoint is not None:
        check_resume(config, checkpoint, cache.manifest, resumable=RESUMABLE)
    examples = cache_examples(cache, config.data, config)
    rows = load_rows(cache, examples)
    rows = rows._replace(
        labels=keep_labels(rows.labels, rows.example, config.label_fraction, config.seed)
    )
    classes = cache.manifest.teacher.vocab_size
    model = build_classifier(config.student, examples.inputs[:1], classes, config.seed)
    check_vocabulary(model, examples.inputs, config.student)
    if checkpoint is None:
        with writing(out, "creating it"):
            clear_run_dir(out)  # only now: a bad cache, data or student leaves an old run intact
    checkpoints = Checkpoints(out, cache_identity(cache.manifest), checkpoint)
    history = train_classifier(
        model, cached_batches(rows, examples), len(rows.example), config, device, checkpoints
    )
    held_out = {}
    if config.eval_cache is not None:
        eval_cache = logitcache.open(config.eval_cache)
        eval_examples = cache_examples(eval_cache, config.eval_data, config)
        eval_rows = load_rows(eval_cache, eval_examples)
        held_out = evaluate_classifier(model, eval_examples, device, eval_rows)
    torch.save(model.state_dict(), out / CLASSIFIER_MODEL_FILE)
    (out / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    summary = {
        "config": asdict(config),
        "parameters": sum(p.numel() for p in model.parameters()),
        "rows": len(rows.example),
        "epochs": history,
        "eval": held_out,
    }
    write_json_atomic(out / "summary.json", summary)
    return summary
