"""The `trainer` command: fit, eval, plot. Thin: parse flags, call the library, print."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from logitcache.cli.common import CacheDirOption, run_app
from trainer.fit import FitConfig

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Train students from a logitcache cache, without the teacher; evaluate and plot runs.",
)
D = FitConfig(cache="", student="")  # the defaults, in one place


@app.command()
def fit(
    cache: Annotated[
        str,
        typer.Option(
            help="Cache written by `logitcache dump`: a directory or a URL (s3://bucket/cache)."
        ),
    ],
    student: Annotated[
        str,
        typer.Option(
            help="Config JSON file or directory with config.json (fresh, seeded model), or a "
            "model saved with save_pretrained (continue from its weights)."
        ),
    ],
    out: Annotated[str, typer.Option(help="Run directory (metrics, checkpoint, model).")] = D.out,
    tokenizer: Annotated[
        str | None,
        typer.Option(help="Tokenizer directory or tokenizer.json; checked against the cache's."),
    ] = None,
    alpha: Annotated[
        float, typer.Option(help="Weight of hard-label CE; 1.0 = hard labels only (no KD).")
    ] = D.alpha,
    temperature: Annotated[float, typer.Option(help="Distillation temperature T.")] = D.temperature,
    loss: Annotated[
        str,
        typer.Option(
            help="Divergence D between teacher and student on the cached ids (and tail): "
            "forward_kl (KL(teacher || student), classic KD, mass-covering), reverse_kl "
            "(KL(student || teacher), mode-seeking; the student is renormalised over the ids "
            "the teacher gives mass), gjsd (generalised Jensen-Shannon, TRL's GKD: see "
            "--beta) or tvd (total variation, in [0, 1])."
        ),
    ] = D.loss,
    beta: Annotated[
        float,
        typer.Option(
            help="gjsd's interpolation, as TRL's GKD beta: 0 = forward KL, 1 = reverse KL, "
            "0.5 = symmetric JSD; ignored by the other losses (not AdamW's --beta1/--beta2)."
        ),
    ] = D.beta,
    tail: Annotated[
        str,
        typer.Option(
            help="Teacher mass outside the top-k: renorm (renormalise over the k ids: lowest "
            "held-out KL in bench_fidelity), bucket (one tail category) or label (added to "
            "the label). Sampled caches carry no tail: all three agree."
        ),
    ] = D.tail,
    fused_loss: Annotated[
        bool,
        typer.Option(
            help="Compute the loss inside the output layer, a chunk of positions at a time, "
            "never building the (batch, time, vocab) logits: the same loss with much less "
            "memory for large vocabularies. Needs logits that are a plain linear map of the "
            "student's last hidden state (checked).",
        ),
    ] = D.fused_loss,
    batch_size: Annotated[int, typer.Option(help="Sequences per step.")] = D.batch_size,
    steps: Annotated[int, typer.Option(help="Optimizer steps (0: use --epochs).")] = D.steps,
    epochs: Annotated[
        float, typer.Option(help="Passes over the training split when --steps is 0.")
    ] = D.epochs,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = D.lr,
    min_lr: Annotated[
        float, typer.Option(help="Learning rate at the end of the cosine.")
    ] = D.min_lr,
    warmup_steps: Annotated[
        int | None,
        typer.Option(help="Linear warmup steps [default: 5% of the steps, at most 100]."),
    ] = D.warmup_steps,
    weight_decay: Annotated[
        float, typer.Option(help="AdamW weight decay (matrices only).")
    ] = D.weight_decay,
    beta1: Annotated[float, typer.Option(help="AdamW beta1.")] = D.beta1,
    beta2: Annotated[float, typer.Option(help="AdamW beta2.")] = D.beta2,
    grad_clip: Annotated[
        float, typer.Option(help="Max global gradient norm; 0 disables.")
    ] = D.grad_clip,
    eval_fraction: Annotated[
        float, typer.Option(help="Share of the cache's sequences held out for evaluation.")
    ] = D.eval_fraction,
    eval_every: Annotated[
        int, typer.Option(help="Steps between held-out evaluations (0: only at the end).")
    ] = D.eval_every,
    eval_batches: Annotated[
        int, typer.Option(help="Batches per evaluation (0: the whole held-out split).")
    ] = D.eval_batches,
    checkpoint_every: Annotated[
        int, typer.Option(help="Steps between checkpoints (0: only at the end).")
    ] = D.checkpoint_every,
    log_every: Annotated[int, typer.Option(help="Steps between metrics rows.")] = D.log_every,
    shuffle_window: Annotated[
        int, typer.Option(help="Cache parts shuffled together (more: better mixing, more memory).")
    ] = D.shuffle_window,
    num_workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = D.num_workers,
    seed: Annotated[int, typer.Option(help="Seed of the init, data order and RNG.")] = D.seed,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = D.device,
    precision: Annotated[str, typer.Option(help="fp32, or bf16 autocast.")] = D.precision,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out from its last checkpoint.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Delete an existing run in --out and start over.")
    ] = False,
    stop_at: Annotated[
        int,
        typer.Option(help="Stop after this step with a checkpoint, as if interrupted (0: never)."),
    ] = D.stop_at,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
    check_files: Annotated[
        bool,
        typer.Option(
            help="Check each part's files against the manifest's sha256 before reading them."
        ),
    ] = D.check_files,
    cache_dir: CacheDirOption = None,
) -> None:
    """Train a student on a cache's soft targets: loss = alpha * CE + (1 - alpha) * T^2 * D,
    D the --loss divergence (forward KL by default).

    Writes metrics.jsonl, checkpoint/, model/ (save_pretrained) and summary.json into --out.
    Interrupted (Ctrl-C, SIGTERM)? It checkpoints; rerun the same command with --resume.

    A masked-LM cache (a BERT-style teacher, `logitcache dump --mask-prob`) takes a masked-LM
    student config ("architectures": ["BertForMaskedLM"]): CE and D at the masked positions only,
    one view of each sequence per epoch.

    Examples:

      trainer fit --cache ./cache --student ./student-config.json --out ./run --steps 2000

      trainer fit --cache ./cache --student ./student-config.json --out ./run --steps 2000 --resume

      trainer fit --cache ./cache --student ./student-config.json --out ./run-hard --alpha 1

      trainer fit --cache ./cache --student ./student-config.json --out ./run-gkd --loss gjsd --beta 0.5

      trainer fit --cache ./cache-128k --student ./student-config.json --out ./run --fused-loss

      trainer fit --cache ./cache --student ./pretrained-student --tokenizer ./tok --out ./run --epochs 3 --temperature 2 --precision bf16

      torchrun --nproc-per-node 8 -m trainer fit --cache ./cache --student ./student-config.json --out ./run --batch-size 64

      trainer fit --cache ./mlm-cache --student ./bert-student.json --out ./run-mlm --alpha 0.5

    Under torchrun, --batch-size is the global batch (split over the processes) and only rank 0
    writes --out; --resume works with another number of processes (docs/SCALING.md).
    """
    from trainer.fit import Interrupted
    from trainer.fit import fit as run_fit

    config = FitConfig(
        cache=cache, student=student, out=out, tokenizer=tokenizer, alpha=alpha,
        temperature=temperature, loss=loss, beta=beta, tail=tail, fused_loss=fused_loss,
        batch_size=batch_size,
        eval_fraction=eval_fraction, shuffle_window=shuffle_window, num_workers=num_workers,
        steps=steps, epochs=epochs, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps,
        weight_decay=weight_decay, beta1=beta1, beta2=beta2, grad_clip=grad_clip, seed=seed,
        device=device, precision=precision, eval_every=eval_every, eval_batches=eval_batches,
        checkpoint_every=checkpoint_every, log_every=log_every, resume=resume,
        overwrite=overwrite, stop_at=stop_at, progress=progress, check_files=check_files,
        cache_dir=None if cache_dir is None else str(cache_dir),
    )  # fmt: skip
    try:
        summary = run_fit(config)
    except Interrupted as exc:
        if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports for all
            raise typer.Exit(130) from None
        print(
            f"trainer: interrupted at step {exc.step}; checkpoint saved in "
            f"{exc.run_dir / 'checkpoint'}. Rerun the same command with --resume to continue.",
            file=sys.stderr,
        )
        raise typer.Exit(130) from None
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports for all
        return
    if summary.get("stopped"):
        print(
            f"stopped at step {summary['step']} of {summary['total_steps']}; checkpoint in "
            f"{Path(out) / 'checkpoint'}. Rerun the same command with --resume to continue."
        )
        return
    final = summary["final"]["eval"]
    held_out = (
        f"; held-out CE {final['ce']:.4f}, KL {final['kl']:.4f}, top-1 {final['top1']:.3f}"
        if final
        else ""
    )
    print(f"trained {out}: {summary['steps']} steps{held_out}; model in {summary['model_dir']}")


@app.command("eval")
def eval_(
    cache: Annotated[str, typer.Option(help="Cache directory or URL to evaluate on.")],
    student: Annotated[
        str, typer.Option(help="A run directory (`trainer fit --out`) or a saved model directory.")
    ],
    split: Annotated[
        str,
        typer.Option(
            help="eval: the run's held-out sequences; train: the rest; all: every sequence "
            "(for a separately dumped held-out cache)."
        ),
    ] = "eval",
    eval_fraction: Annotated[
        float | None,
        typer.Option(help="Held-out share defining the eval/train split [default: the run's]."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward.")] = 8,
    max_batches: Annotated[int, typer.Option(help="Stop after this many batches (0: all).")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32 or bf16.")] = "fp32",
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
    cache_dir: CacheDirOption = None,
) -> None:
    """Held-out CE, KL(teacher || student) on the cached ids + tail bucket, top-1 agreement
    (a masked-LM cache: at its masked positions, CE against the tokens the masking replaced).

    Examples:

      trainer eval --cache ./cache --student ./run

      trainer eval --cache ./heldout-cache --student ./run --split all --json
    """
    from trainer.evaluate import evaluate

    result = evaluate(
        cache, student, split=split, eval_fraction=eval_fraction, batch_size=batch_size,
        device=device, precision=precision, max_batches=max_batches, cache_dir=cache_dir,
    )  # fmt: skip
    if as_json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{result['student']} on {result['cache']} (split {split}, {result['sequences']:,} "
        f"sequences, {result['tokens']:,} {result['positions']} positions):\n"
        f"  CE     {result['ce']:.4f} nats/token (perplexity {result['ppl']:.2f})\n"
        f"  KL     {result['kl']:.4f} nats/token (teacher || student, cached ids + tail)\n"
        f"  top-1  {result['top1']:.4f} (student argmax == teacher's top id)"
    )


@app.command()
def plot(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (`trainer fit --out`).")],
    out: Annotated[
        Path | None, typer.Option(help="PNG to write [default: RUN_DIR/curves.png].")
    ] = None,
) -> None:
    """Draw the loss/CE/KD and held-out curves of a run into RUN_DIR/curves.png.

    Example: trainer plot ./run
    """
    from trainer.plot import plot_run

    print(f"wrote {plot_run(run_dir, out)}")


def main() -> None:
    run_app(app, "trainer")


if __name__ == "__main__":
    main()
