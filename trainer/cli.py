"""The `trainer` command: fit, eval, plot. Thin: parse flags, call the library, print."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from logitcache.cli.common import CacheDirOption, run_app
from logitcache.errors import LogitCacheError
from trainer.recipe import FitConfig

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
        typer.Option(
            help="Tokenizer directory or tokenizer.json; checked against the cache's. With "
            "--loss uld: the student's own tokenizer, another vocabulary than the teacher's."
        ),
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
            "--beta) or tvd (total variation, in [0, 1]). uld: a student with another "
            "tokenizer (--tokenizer), loss = CE + --uld-weight * ULD (the L1 distance between "
            "the sorted teacher and student probabilities, Boizard et al. 2024) at the student "
            "positions paired with the teacher's by character offsets; needs a cache dumped "
            "with --offsets; --alpha and --tail are not used."
        ),
    ] = D.loss,
    uld_weight: Annotated[
        float, typer.Option(help="--loss uld: lambda, the weight of the ULD term next to CE.")
    ] = D.uld_weight,
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
    task: Annotated[
        str,
        typer.Option(
            help="lm, or classification: a student classifier from a `dump --task "
            "classification` cache; --student is then MODULE:FUNCTION (a torch module) or an "
            "image- or sequence-classification config.json, and --data the examples the cache "
            "was dumped from (text: tokenized with the cache's tokenizer, or --tokenizer); "
            "--checkpoint-every, --resume and --overwrite work as for a language model."
        ),
    ] = "lm",
    data: Annotated[
        str | None, typer.Option(help="classification: the examples the cache was dumped from.")
    ] = None,
    eval_cache: Annotated[
        str | None,
        typer.Option(help="classification: a cache of held-out examples (dumped without views)."),
    ] = None,
    eval_data: Annotated[
        str | None, typer.Option(help="classification: the held-out examples of --eval-cache.")
    ] = None,
    label_fraction: Annotated[
        float,
        typer.Option(
            help="classification: the share of examples whose labels are used (seeded); the "
            "others train on the teacher's soft labels alone."
        ),
    ] = 1.0,
    resize: Annotated[
        str | None, typer.Option(help="classification: the dump's --resize HEIGHTxWIDTH.")
    ] = None,
    input_field: Annotated[
        str | None,
        typer.Option(help="classification: the dump's --input-field (text: default the cache's)."),
    ] = None,
    label_field: Annotated[
        str | None, typer.Option(help="classification: the dump's --label-field.")
    ] = None,
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

      trainer fit --cache ./cache-offsets --student ./other-vocab-config.json --tokenizer ./other-tok --loss uld --out ./run-uld

      trainer fit --cache ./cache --student ./pretrained-student --tokenizer ./tok --out ./run --epochs 3 --temperature 2 --precision bf16

      torchrun --nproc-per-node 8 -m trainer fit --cache ./cache --student ./student-config.json --out ./run --batch-size 64

      trainer fit --task classification --cache ./cache --data digits.npz --student mypkg.models:mlp --eval-cache ./test-cache --eval-data test.npz --alpha 0.5 --temperature 4 --epochs 30 --lr 3e-3 --out ./run

      trainer fit --task classification --cache ./text-cache --data train.parquet --student ./bert-small-config.json --eval-cache ./text-test-cache --eval-data test.parquet --out ./run-text

      trainer fit --cache ./mlm-cache --student ./bert-student.json --out ./run-mlm --alpha 0.5

    Under torchrun, --batch-size is the global batch (split over the processes) and only rank 0
    writes --out; --resume works with another number of processes (docs/SCALING.md).
    """
    if task == "classification":
        _fit_classifier(locals())
        return
    if task != "lm":
        raise LogitCacheError(f"--task must be lm or classification, got {task!r}.")
    from trainer.recipe import fit as run_fit

    config = FitConfig(
        cache=cache, student=student, out=out, tokenizer=tokenizer, alpha=alpha,
        temperature=temperature, loss=loss, uld_weight=uld_weight, beta=beta, tail=tail,
        fused_loss=fused_loss,
        batch_size=batch_size,
        eval_fraction=eval_fraction, shuffle_window=shuffle_window, num_workers=num_workers,
        steps=steps, epochs=epochs, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps,
        weight_decay=weight_decay, beta1=beta1, beta2=beta2, grad_clip=grad_clip, seed=seed,
        device=device, precision=precision, eval_every=eval_every, eval_batches=eval_batches,
        checkpoint_every=checkpoint_every, log_every=log_every, resume=resume,
        overwrite=overwrite, stop_at=stop_at, progress=progress, check_files=check_files,
        cache_dir=None if cache_dir is None else str(cache_dir),
    )  # fmt: skip
    with reporting_interrupts():
        summary = run_fit(config)
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports for all
        return
    if summary.get("stopped"):
        print(
            f"stopped at step {summary['step']} of {summary['total_steps']}; checkpoint in "
            f"{Path(out) / 'checkpoint'}. Rerun the same command with --resume to continue."
        )
        return
    print(f"trained {out}: {summary['steps']} steps{_held_out(summary['final']['eval'])}; "
          f"model in {summary['model_dir']}")  # fmt: skip


@contextlib.contextmanager
def reporting_interrupts() -> Iterator[None]:
    """A run stopped by SIGINT/SIGTERM (`trainer.signals.Interrupted`, after its checkpoint):
    one line saying how to continue, and exit 130."""
    from trainer.signals import Interrupted

    try:
        yield
    except Interrupted as exc:
        if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports for all
            raise typer.Exit(130) from None
        print(
            f"trainer: interrupted at step {exc.step}; checkpoint saved in "
            f"{exc.run_dir / 'checkpoint'}. Rerun the same command with --resume to continue.",
            file=sys.stderr,
        )
        raise typer.Exit(130) from None


def _held_out(final: dict | None) -> str:
    """The final held-out metrics for the last line: KL and top-1, or for a student with its
    own tokenizer (--loss uld) the ULD distance."""
    if not final:
        return ""
    if "uld" in final:
        return f"; held-out CE {final['ce']:.4f}, ULD {final['uld']:.4f}"
    return f"; held-out CE {final['ce']:.4f}, KL {final['kl']:.4f}, top-1 {final['top1']:.3f}"


def _fit_classifier(flags: dict) -> None:
    """`fit --task classification`: the flags that apply, into `trainer.classify`."""
    from logitcache.cli.dump import pair
    from trainer.classify import ClassifierConfig, fit_classifier

    if flags["data"] is None:
        raise LogitCacheError("--task classification needs --data (the examples of the cache).")
    names = ("cache", "student", "out", "alpha", "temperature", "label_fraction", "batch_size",
             "epochs", "lr", "weight_decay", "seed", "device", "eval_cache", "eval_data",
             "progress", "data", "tokenizer", "input_field", "label_field", "checkpoint_every",
             "resume", "overwrite")  # fmt: skip
    resize = flags["resize"]
    config = ClassifierConfig(
        **{n: flags[n] for n in names},
        resize=None if resize is None else pair(resize, "--resize", int, "x"),
    )
    with reporting_interrupts():
        summary = fit_classifier(config)
    held_out = "; ".join(f"held-out {k} {v:.4f}" for k, v in summary["eval"].items())
    print(f"trained {config.out}: {summary['parameters']:,} parameters, {summary['rows']:,} rows"
          f"{'; ' + held_out if held_out else ''}; model in {Path(config.out) / 'model.pt'}")  # fmt: skip


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
    tokenizer: Annotated[
        str | None,
        typer.Option(
            help="The student's own tokenizer, for a --loss uld student (another vocabulary "
            "than the teacher's, on a cache dumped with --offsets): CE in its tokens, and ULD."
        ),
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

      trainer eval --cache ./heldout-offsets --student ./run-uld --tokenizer ./other-tok --split all
    """
    from trainer.evaluation import evaluate

    result = evaluate(
        cache, student, split=split, eval_fraction=eval_fraction, batch_size=batch_size,
        device=device, precision=precision, max_batches=max_batches, cache_dir=cache_dir,
        tokenizer=tokenizer,
    )  # fmt: skip
    if as_json:
        print(json.dumps(result, indent=2))
        return
    if "uld" in result:
        print(
            f"{result['student']} on {result['cache']} (split {split}, {result['sequences']:,} "
            f"sequences, {result['tokens']:,} student tokens):\n"
            f"  CE     {result['ce']:.4f} nats/token (perplexity {result['ppl']:.2f})\n"
            f"  ULD    {result['uld']:.4f} (sorted teacher vs student probabilities, L1)\n"
            f"  paired {result['paired']:.4f} (student positions with a teacher position)"
        )
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
