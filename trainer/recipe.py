"""`fit`: train a student from a logitcache cache, without ever loading the teacher.

One recipe, read top to bottom: `fit` -> `_setup` (run directory, cache, datasets, student,
optimizer, schedule, resume) -> `_train` (`_step`: forward, the loss, clip, step; then log,
eval, checkpoint) -> `_finish` (final checkpoint and eval, ``save_pretrained``, summary.json).
The settings are `trainer.config.FitConfig`; the loss is a `trainer.losses.LossFn`, by default
`DistillationLoss` (KD on the cached targets mixed with hard-label CE); what the run directory
holds is described in `trainer.config`, `trainer.checkpoint` and `trainer.runlog`. With
``fused_loss`` the student runs without its output layer (`trainer.student.HiddenStates`) and
the same loss is computed inside that layer, chunk by chunk (`trainer.fused`), so that the
(batch, time, vocab) logits never exist.

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

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import logitcache
from logitcache.errors import LogitCacheError
from logitcache.progress import Bar, progress_bar
from logitcache.runtime import load_tokenizer
from logitcache.storage.files import write_json_atomic
from trainer import distributed
from trainer.align import StudentTokens
from trainer.checkpoint import (
    check_resume,
    load_checkpoint,
    restore_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    writing,
)
from trainer.config import (
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_DIR,
    SUMMARY_FILE,
    FitConfig,
    check_config,
    check_run_dir,
    clear_run_dir,
)
from trainer.dataset import CacheDataset, refuse_classification
from trainer.evaluation import autocast, evaluate_model
from trainer.fused import FusedDistillationLoss
from trainer.loader import epoch_batches, worker_message
from trainer.losses import ULD_LOSS, DistillationLoss, LossFn, LossParts, ULDLoss
from trainer.optim import lr_factor, make_optimizer, warmup_steps
from trainer.runlog import RunLog, SampleLog, log_message, summary, truncate_metrics
from trainer.signals import Interrupted, StopFlag
from trainer.student import (
    HiddenStates,
    StudentSource,
    build_student,
    fused_head,
    max_positions,
)

__all__ = ["FitConfig", "Interrupted", "fit"]


#: Called on rank 0 after every optimizer step with the step number and the student.
AfterStep = Callable[[int, torch.nn.Module], None]
#: What a step calls: a `LossFn` of the logits, or with ``fused_loss`` the fused loss of the
#: hidden states and the output layer.
StepLoss = LossFn | FusedDistillationLoss


def fit(
    config: FitConfig, loss_fn: LossFn | None = None, after_step: AfterStep | None = None
) -> dict[str, Any]:
    """Train `config.student` on `config.cache`; returns the summary (also in summary.json).

    `loss_fn` computes each step's loss from the student's logits and the batch; by default
    `DistillationLoss` with the config's alpha, temperature, tail, loss and beta. With
    `config.fused_loss` that default loss is computed inside the output layer instead
    (`trainer.fused.FusedDistillationLoss`), and a `loss_fn` is refused: it would need the
    logits that the fused loss never builds.
    `after_step(step, model)` lets a caller watch the run with its own measure (a benchmark's
    exact KL to a teacher on its own held-out text, say): it runs outside the timed window, so
    tokens/s stay the training's; it must leave the model as it found it (train mode, same
    weights).

    Launched by torchrun (``WORLD_SIZE`` > 1), every process runs this with the same config:
    data-parallel training (DDP), `batch_size` being the global batch; only rank 0 writes into
    the run directory (docs/SCALING.md)."""
    check_config(config)
    step_loss: StepLoss
    if config.fused_loss:
        if loss_fn is not None:
            raise LogitCacheError(
                "fused_loss computes the configured distillation loss inside the output layer, "
                f"without the logits that a loss_fn needs; got loss_fn={loss_fn!r}. Pass no "
                "loss_fn, or train with fused_loss=False."
            )
        step_loss = FusedDistillationLoss(
            alpha=config.alpha, temperature=config.temperature, tail=config.tail,
            loss=config.loss, beta=config.beta,
        )  # fmt: skip
    elif loss_fn is not None:
        step_loss = loss_fn
    elif config.loss == ULD_LOSS:
        step_loss = ULDLoss(weight=config.uld_weight, temperature=config.temperature)
    else:
        step_loss = DistillationLoss(
            alpha=config.alpha, temperature=config.temperature, tail=config.tail,
            loss=config.loss, beta=config.beta,
        )  # fmt: skip
    d, device = distributed.init(config.device)
    try:
        run = _setup(config, d, device)
        try:
            stopped = _train(run, step_loss, after_step)
            return _finish(run, stopped)
        finally:
            run.log.close()
            run.samples.close()
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


@dataclass
class _Run:
    """Everything the loop reads and advances; made by `_setup`."""

    config: FitConfig
    d: distributed.Dist
    device: torch.device
    cache: Any  # logitcache.Cache
    source: StudentSource
    model: torch.nn.Module
    net: torch.nn.Module  # the model, or its DDP wrapper (forward and backward go through it)
    head: torch.nn.Module | None  # fused_loss: the output layer (net returns hidden states)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_ds: CacheDataset
    eval_ds: CacheDataset | None
    total_steps: int
    warmup: int
    log: RunLog
    samples: SampleLog
    step: int
    last_saved: int  # the step of the last checkpoint written

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out)

    @property
    def shows_progress(self) -> bool:
        return self.config.progress and self.d.is_main


# --------------------------------------------------------------------------------------------
# setup


def _open(
    config: FitConfig, d: distributed.Dist
) -> tuple[Any, CacheDataset, CacheDataset | None, dict[str, Any] | None, Any, StudentSource]:
    """Cache, checkpoint, student and datasets; every refusal happens here, before any write."""
    check_run_dir(Path(config.out), config)
    cache = logitcache.open(config.cache, cache_dir=config.cache_dir)
    refuse_classification(cache)  # before the student, whose check would blame the vocabulary
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
    checkpoint = load_checkpoint(Path(config.out)) if config.resume else None
    if checkpoint is not None:
        check_resume(config, checkpoint, cache.manifest)
    uld = config.loss == ULD_LOSS  # a student with its own tokenizer (`trainer.align`)
    tokenizer = (
        load_tokenizer(config.tokenizer, flag="--tokenizer", local_only=True)
        if uld and config.tokenizer is not None
        else None
    )
    model, source = build_student(
        config.student, cache.manifest, tokenizer=config.tokenizer, seed=config.seed,
        config_dict=None if checkpoint is None else checkpoint["student_config"],
        student_tokenizer=tokenizer,
    )  # fmt: skip
    student_tokens = None
    if tokenizer is not None:
        student_tokens = StudentTokens(tokenizer, cache.manifest, max_positions(model.config))
    if config.fused_loss:  # before the seeding, so that its check forward changes no RNG
        fused_head(model, f"the student {config.student}")
    split = partial(
        CacheDataset, cache, batch_size=config.batch_size, eval_fraction=config.eval_fraction,
        seed=config.seed, rank=d.rank, world_size=d.world_size, check_files=config.check_files,
        student_tokens=student_tokens,
    )  # fmt: skip
    train_ds = split(split="train", shuffle=True, shuffle_window=config.shuffle_window)
    eval_ds = split(split="eval", shuffle=False) if config.eval_fraction > 0 else None
    return cache, train_ds, eval_ds, checkpoint, model, source


def _setup(config: FitConfig, d: distributed.Dist, device: torch.device) -> _Run:
    run_dir, main = Path(config.out), d.is_main
    # a failure on any rank stops every rank
    cache, train_ds, eval_ds, checkpoint, model, source = distributed.agree(
        d, partial(_open, config, d)
    )
    per_epoch = train_ds.batches_per_epoch()
    total_steps = config.steps or max(1, math.ceil(config.epochs * per_epoch))
    warmup = warmup_steps(config.warmup_steps, total_steps)
    model.to(device)
    if checkpoint is None and main:
        with writing(run_dir, "creating it"):
            clear_run_dir(run_dir)  # only now: a bad cache or student leaves an old run intact
    optimizer = make_optimizer(model, config, device)
    schedule = partial(
        lr_factor, warmup=warmup, total=total_steps, min_ratio=config.min_lr / config.lr
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    step = 0
    if checkpoint is None:
        seed_everything(config.seed)
    else:
        step = restore_checkpoint(
            checkpoint, model=model, optimizer=optimizer, scheduler=scheduler, dataset=train_ds,
            rank=d.rank, world_size=d.world_size,
        )  # fmt: skip
        if main:
            with writing(run_dir, METRICS_FILE):
                truncate_metrics(run_dir / METRICS_FILE, step)
    # fused_loss: the net stops at the hidden states, the loss applies the head; it still holds
    # the whole model, so DDP averages the head's gradients too (trainer.student.HiddenStates)
    net: torch.nn.Module = HiddenStates(model) if config.fused_loss else model
    head = model.get_output_embeddings() if config.fused_loss else None
    if d.enabled:  # gradients averaged over ranks; the loss is scaled so that this is exact
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    if main:
        with writing(run_dir, CONFIG_FILE):
            write_json_atomic(run_dir / CONFIG_FILE, dataclasses.asdict(config))
    n_params = sum(p.numel() for p in model.parameters())
    log_message(
        f"{'resuming at step ' + str(step) if step else 'training'} {type(model).__name__} "
        f"({n_params / 1e6:.2f}M params, {source.kind} {source.spec}) on {cache.root}: "
        f"{total_steps} steps of {config.batch_size} sequences ({per_epoch} per epoch), "
        f"{_objective_note(config)}, "
        f"{_targets_note(cache, config.tail)}{', fused loss' if config.fused_loss else ''}, "
        f"{device}"
        f"{f' x {d.world_size} processes' if d.enabled else ''}, {config.precision}",
        config.progress and main,
    )
    log = RunLog.open(run_dir, per_epoch, append=checkpoint is not None, enabled=main)
    if checkpoint is not None:
        log.resume(checkpoint, device)
    return _Run(
        config=config, d=d, device=device, cache=cache, source=source, model=model, net=net,
        head=head, optimizer=optimizer, scheduler=scheduler, train_ds=train_ds, eval_ds=eval_ds,
        total_steps=total_steps, warmup=warmup, log=log, samples=SampleLog.from_env(d),
        step=step, last_saved=step,
    )  # fmt: skip


def _objective_note(c: FitConfig) -> str:
    """The loss, for the start-up line: its own knobs only."""
    if c.loss == ULD_LOSS:
        return (
            f"T {c.temperature}, loss CE + {c.uld_weight} * ULD (student tokenizer {c.tokenizer})"
        )
    beta = f" (beta {c.beta})" if c.loss == "gjsd" else ""
    return f"alpha {c.alpha}, T {c.temperature}, loss {c.loss}{beta}"


def _targets_note(cache: logitcache.Cache, tail: str) -> str:
    """What the run distils from, for the start-up line: the tail mode matters to top-k only."""
    t = cache.manifest.targets
    if t.kind == "sample":  # log(counts / N) sums to 1 over the stored ids: every mode agrees
        return f"sampled targets N={t.samples}, no tail (counts / N carry all the mass)"
    if t.kind == "topp":  # the tail is exact, as for top-k
        return f"top-p targets p={t.top_p:g} ({t.min_k}..{t.k} ids), tail {tail}"
    return f"top-{t.k} targets, tail {tail}"


# --------------------------------------------------------------------------------------------
# train


def _train(run: _Run, loss_fn: StepLoss, after_step: AfterStep | None) -> bool:
    """Steps until the end, `stop_at` or a signal; True if a signal stopped the run."""
    c, stopped = run.config, False
    shown = progress_bar(
        "fit", total=run.total_steps, unit="steps", enabled=run.shows_progress, completed=run.step
    )
    with StopFlag() as stop, shown as bar:
        while run.step < run.total_steps:
            epoch = run.train_ds.state_dict()["epoch"]
            batches = epoch_batches(
                run.train_ds, epoch, seed=c.seed, num_workers=c.num_workers,
                pin=run.device.type == "cuda", stopping=stop.is_set,
            )  # fmt: skip
            for batch in batches:
                lr = _step(run, loss_fn, batch, epoch)
                _report(run, lr, bar)
                if after_step is not None and run.d.is_main:
                    with run.log.paused():
                        after_step(run.step, run.model)
                stopped = distributed.any_rank(run.d, stop.is_set())  # all ranks stop together
                if run.step >= run.total_steps or stopped or run.step == c.stop_at:
                    break
            if stopped or run.step == c.stop_at:
                break
            if run.step < run.total_steps:
                run.train_ds.set_epoch(epoch + 1)
    return stopped


def _step(run: _Run, loss_fn: StepLoss, batch: dict[str, torch.Tensor], epoch: int) -> float:
    """One optimizer update on `batch`; the learning rate it used."""
    b = {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
    with autocast(run.device, run.config.precision):
        out = run.net(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    if run.head is None:
        assert not isinstance(loss_fn, FusedDistillationLoss)
        parts = loss_fn(out.logits, b)  # logits (batch, time, vocab)
    else:  # fused: hidden states (batch, time, hidden) and the output layer
        assert isinstance(loss_fn, FusedDistillationLoss)
        parts = loss_fn(out, run.head.weight, run.head.bias, b)
    loss = parts.loss
    tokens = (b["attention_mask"] * (b["index"] >= 0)[:, None]).sum()  # padding rows: index -1
    if run.d.enabled:
        loss, parts, tokens = _reduce_step(run.d, parts, b["labels"], tokens)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if run.config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.config.grad_clip)
    lr = run.optimizer.param_groups[0]["lr"]  # the rate this update uses
    run.optimizer.step()
    run.scheduler.step()
    run.train_ds.advance()
    run.step += 1
    run.samples.write(run.step, epoch, batch["index"])
    run.log.record(parts, tokens)
    return lr


def _report(run: _Run, lr: float, bar: Bar) -> None:
    """After a step: the metrics row, the evaluation and the checkpoint that are due."""
    c, step = run.config, run.step
    if step % c.log_every == 0 or step == run.total_steps:
        row = run.log.log_train(step, run.train_ds, lr)
        bar.set_status(f"loss {row['loss']:.4f}  {row['tokens_per_s']:,.0f} tok/s")
    if run.eval_ds is not None and c.eval_every and step % c.eval_every == 0:
        with run.log.paused():
            run.log.log_eval(step, run.train_ds, _eval(run))
    if c.checkpoint_every and step % c.checkpoint_every == 0:
        with run.log.paused():
            _save(run)
    bar.advance()


def _reduce_step(
    d: distributed.Dist, parts: LossParts, labels: torch.Tensor, tokens: torch.Tensor
) -> tuple[torch.Tensor, LossParts, torch.Tensor]:
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
    logged = LossParts(stats[1] / total, stats[2] / total, stats[3] / total)
    return parts.loss * scale, logged, stats[4]


def _save(run: _Run) -> None:
    """A checkpoint of the current step (every rank's RNG state, written by rank 0)."""
    rngs = distributed.all_gather(run.d, rng_state())  # each rank's RNG, for an exact resume
    if run.d.is_main:
        with writing(run.run_dir, "the checkpoint"):
            save_checkpoint(
                run.run_dir, step=run.step, model=run.model, optimizer=run.optimizer,
                scheduler=run.scheduler, dataset=run.train_ds, config=run.config,
                tokens_seen=run.log.tokens_seen(), window=run.log.window(),
                rng_ranks=rngs if run.d.enabled else None,
            )  # fmt: skip
    run.last_saved = run.step


# --------------------------------------------------------------------------------------------
# finish


def _finish(run: _Run, stopped: bool) -> dict[str, Any]:
    """The last checkpoint; then, if the run reached its end, the final evaluation, the model
    and summary.json."""
    run.samples.close()
    if run.step != run.last_saved:
        _save(run)
    if run.step < run.total_steps:  # interrupted or stopped early: resumable, no final model
        if stopped:
            raise Interrupted(run.step, run.run_dir)
        log_message(
            f"stopped at step {run.step} of {run.total_steps}; continue with --resume",
            run.shows_progress,
        )
        return {"stopped": True, "step": run.step, "total_steps": run.total_steps,
                "run_dir": str(run.run_dir)}  # fmt: skip
    final_eval = None
    if run.eval_ds is not None:
        if run.log.last_eval.get("step") == run.step:
            final_eval = run.log.last_eval_result
        else:
            final_eval = _eval(run)
            run.log.log_eval(run.step, run.train_ds, final_eval)
    run.log.close()
    result = summary(
        run.config, run.cache, run.source, n_params=sum(p.numel() for p in run.model.parameters()),
        step=run.step, total=run.total_steps, warmup=run.warmup, log=run.log,
        final_eval=final_eval,
    )  # fmt: skip
    if run.d.enabled:
        result["world_size"] = run.d.world_size
    if run.d.is_main:
        run_dir = run.run_dir
        with writing(run_dir, "the final model", partial=run_dir / MODEL_DIR):
            run.model.save_pretrained(run_dir / MODEL_DIR, safe_serialization=True)
        with writing(run_dir, SUMMARY_FILE):
            write_json_atomic(run_dir / SUMMARY_FILE, result)
    return result


# --------------------------------------------------------------------------------------------
# evaluation


def _eval(run: _Run) -> dict[str, float]:
    """Held-out metrics; with several ranks each evaluates its share and the sums are combined."""
    assert run.eval_ds is not None
    loader = torch.utils.data.DataLoader(run.eval_ds, batch_size=None, num_workers=0)
    d = run.d
    reduce = (lambda t: distributed.all_sum(d, t)) if d.enabled else None
    try:
        return evaluate_model(
            run.model, loader, device=run.device, precision=run.config.precision,
            max_batches=run.config.eval_batches, reduce=reduce, uld=run.config.loss == ULD_LOSS,
        )  # fmt: skip
    except LogitCacheError as exc:
        raise type(exc)(worker_message(exc)) from None
