"""Distil a student from a logitcache cache with Hugging Face `transformers.Trainer`.

    python examples/hf_trainer.py CACHE --student STUDENT --out OUT [--quick]

STUDENT is what `trainer fit --student` takes: a transformers config JSON (a fresh model), a
directory with config.json, or a model saved with ``save_pretrained`` (training continues from
its weights). Its vocabulary must be the cache's teacher's: the cached targets are teacher token
ids that index the student's logits.

The loss per batch is `trainer fit`'s (`trainer.DistillationLoss`: alpha * CE + (1 - alpha) *
T**2 * divergence on the cached targets); everything else is the Trainer's: gradient
accumulation, bf16, checkpoints every --save-steps in OUT/checkpoint-N, --resume from the last
one. OUT/model is the final student (``save_pretrained``; `trainer eval --student OUT/model`
reads it) and OUT/results.json the settings and the held-out numbers: the Trainer's eval loss
before and after training, and `trainer.evaluate`'s CE, KL to the teacher and top-1 agreement on
the held-out split (the sequences `--eval-fraction` holds out by the same hash as `trainer fit`).

--quick is a tiny smoke setting (20 steps of 2 x 4 sequences), a few seconds on a CPU for a small
student and cache. Copy this file and change what you need: it uses public names only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

import trainer
from logitcache import LogitCacheError

#: --quick: a smoke run; the fields are TrainingArguments' and ours.
QUICK = {"max_steps": 20, "batch_size": 4, "grad_accum": 2, "logging_steps": 5}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("cache", help="the cache: a directory or a URL logitcache.open reads")
    p.add_argument("--student", required=True, help="config JSON, config dir or saved model")
    p.add_argument("--out", required=True, type=Path, help="output directory (the Trainer's)")
    p.add_argument("--quick", action="store_true", help="a tiny smoke setting (see the docs)")
    p.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (-1: --epochs)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per device and micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--alpha", type=float, default=0.5, help="weight of hard-label CE")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--loss", choices=trainer.LOSSES, default="forward_kl")
    p.add_argument("--tail", choices=trainer.TAIL_MODES, default=trainer.DEFAULT_TAIL)
    p.add_argument("--beta", type=float, default=0.5, help="gjsd's interpolation")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="held-out share (0: none)")
    p.add_argument("--save-steps", type=int, default=500, help="a checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from OUT's last checkpoint")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (weights stay float32)")
    p.add_argument("--seed", type=int, default=0, help="student init and data order")
    p.add_argument("--logging-steps", type=int, default=10)
    args = p.parse_args(argv)
    if args.quick:  # its values become the defaults: flags given explicitly still win
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    return args


def run(a: argparse.Namespace) -> dict[str, Any]:
    """Build, train, save, evaluate; every refusal (cache, student, settings) comes first."""
    loss_fn = trainer.DistillationLoss(
        alpha=a.alpha, temperature=a.temperature, tail=a.tail, loss=a.loss, beta=a.beta
    )
    train_set = trainer.CacheSequences(a.cache, eval_fraction=a.eval_fraction, seed=a.seed)
    eval_set = None
    if a.eval_fraction > 0:
        eval_set = trainer.CacheSequences(
            train_set.cache, split="eval", eval_fraction=a.eval_fraction, shuffle=False
        )
    model, _ = trainer.build_student(a.student, train_set.manifest, seed=a.seed)
    args = TrainingArguments(
        output_dir=str(a.out),
        max_steps=a.max_steps,
        num_train_epochs=a.epochs,
        per_device_train_batch_size=a.batch_size,
        per_device_eval_batch_size=a.batch_size,
        gradient_accumulation_steps=a.grad_accum,
        learning_rate=a.lr,
        bf16=a.bf16,
        use_cpu=a.bf16 and not torch.cuda.is_available(),  # the Trainer's bf16 on CPU needs it
        save_strategy="steps",
        save_steps=a.save_steps,
        logging_steps=a.logging_steps,
        seed=a.seed,
        remove_unused_columns=False,  # keep target_ids / target_logprobs in the batches
        prediction_loss_only=True,  # eval needs the loss, not every (B, T, V) logits
        report_to="none",
    )
    hf = trainer.DistillationTrainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, loss_fn=loss_fn
    )
    before = hf.evaluate()["eval_loss"] if eval_set is not None and not a.resume else None
    hf.train(resume_from_checkpoint=True if a.resume else None)
    hf.save_model(str(a.out / "model"))
    results: dict[str, Any] = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "steps": hf.state.global_step,
        "train_loss": [row["loss"] for row in hf.state.log_history if "loss" in row],
    }
    if eval_set is not None:
        results["eval_loss_before"] = before
        results["eval_loss_after"] = hf.evaluate()["eval_loss"]
        results["held_out"] = trainer.evaluate(
            train_set.cache, a.out / "model", split="eval", eval_fraction=a.eval_fraction,
            batch_size=a.batch_size,
        )  # fmt: skip
    (a.out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        results = run(a)
    except (LogitCacheError, ValueError) as exc:  # a bad cache, student or setting
        print(f"hf_trainer: error: {exc}", file=sys.stderr)
        return 2
    held = results.get("held_out")
    if held is not None:
        before = results["eval_loss_before"]
        print(
            f"held-out: eval loss {'-' if before is None else f'{before:.4f}'} -> "
            f"{results['eval_loss_after']:.4f}, KL to the teacher {held['kl']:.4f}, "
            f"CE {held['ce']:.4f}, top-1 {held['top1']:.3f}"
        )
    print(f"{results['steps']} steps; the student is in {a.out / 'model'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
