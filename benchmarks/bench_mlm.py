"""Masked-LM distillation from a cache (DistilBERT's setting): a cached-KD student against an
MLM-only student at the same steps, on held-out masked-token CE, KL and agreement.

The teacher is a BERT trained here with masked-LM loss on the stdlib train split
(`logitcache.testing.mlm`, built once under benchmarks/.work/); its own held-out masked-token CE
and entropy say how strong and how peaked it is. The training cache is dumped from the train
split with `--views` maskings per sequence (sampled targets, the default kind); the held-out
cache from the held-out split (other files) with top-k targets, one view. Both students are the
same small BERT, seed and batches; only alpha differs (0.5: half cached KD; 1: the masked-LM CE
alone). Writes the ``bench_mlm`` section of RESULTS.md.

    python benchmarks/bench_mlm.py            # about 10 minutes on 2 shared cores
    python benchmarks/bench_mlm.py --quick    # a tiny teacher, to check the script
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import common
import torch

import logitcache
from logitcache.dumping.pipeline import DumpOptions, dump
from logitcache.testing import mlm
from logitcache.testing.corpus import stdlib_files
from trainer import FitConfig, evaluate, fit

#: The benchmark teacher: a pre-LayerNorm BERT (Megatron's) 2x128, vocab 1024, 1200 masked-LM
#: steps of 16 x 64 tokens on TEACHER_FILES stdlib train files (tokenizer and model): what the
#: shared 2-core machine trains in minutes. (A post-LN BERT 4x256 stayed at the unigram
#: plateau, loss 6.6, after 600 steps of 16 x 128 at lr 1e-3; this one after 300 steps.)
TEACHER_KW = {"arch": "megatron-bert", "vocab_size": 1024, "n_layer": 2, "hidden": 128,
              "train_steps": 1200, "seq_len": 64, "batch_size": 16, "lr": 2e-3,
              "warmup_steps": 100}  # fmt: skip
TEACHER_FILES = 300
QUICK_TEACHER_KW = {"vocab_size": 512, "n_layer": 2, "hidden": 64, "train_steps": 40,
                    "seq_len": 64, "batch_size": 8, "lr": 3e-3, "warmup_steps": 4}  # fmt: skip


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny teacher and data; no RESULTS.md")
    p.add_argument("--train-tokens", type=int, help="tokens of the training data [40000]")
    p.add_argument("--heldout-tokens", type=int, help="tokens of the held-out data [8000]")
    p.add_argument("--views", type=int, default=2, help="maskings per training sequence")
    p.add_argument("--steps", type=int, help="student steps [150]")
    p.add_argument("--student", default="1x32", help="student BERT LAYERSxWIDTH")
    p.add_argument("--no-results", action="store_true", help="do not write RESULTS.md")
    args = p.parse_args()
    quick = {"train_tokens": 8000, "heldout_tokens": 3000, "steps": 20}
    full = {"train_tokens": 40_000, "heldout_tokens": 8_000, "steps": 150}
    return common.fill_defaults(args, quick if args.quick else full)


def teacher_strength(teacher_dir: Path, cache: logitcache.Cache) -> dict[str, float]:
    """The teacher's own masked-token CE and entropy (nats) on the held-out cache's masked
    inputs (what it read at dump time), over the masked positions."""
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(teacher_dir).eval()
    ce = entropy = 0.0
    count = 0
    with torch.inference_mode():
        for seq in cache:
            at = seq.labels >= 0
            logprobs = model(seq.input_ids[None]).logits[0, at].log_softmax(-1)  # (m, V)
            ce -= float(logprobs.gather(-1, seq.labels[at, None]).sum())
            entropy -= float((logprobs.exp() * logprobs).sum())
            count += int(at.sum())
    return {"ce": ce / count, "entropy": entropy / count, "tokens": count}


def regime(strength: dict[str, float], best_student_ce: float, vocab_size: int) -> str:
    """Whether the teacher is the realistic one (much stronger than the students: 0.5 nats of
    held-out CE below the better one; peaked: mean entropy under half of the uniform's)."""
    ce, entropy, uniform = strength["ce"], strength["entropy"], math.log(vocab_size)
    numbers = f"CE {ce:.3f} vs the better student's {best_student_ce:.3f}, entropy {entropy:.2f} of at most {uniform:.2f}"
    if ce < best_student_ce - 0.5 and entropy < uniform / 2:
        return f"much stronger than the students and peaked ({numbers})"
    return (
        f"NOT the realistic regime ({numbers}): it has not left the masked-LM unigram plateau, "
        "so these rows show the pipeline working, not what cached KD gains from a strong teacher"
    )


def dump_cache(teacher: Path, data: Path, out: Path, **options: object) -> tuple[float, float]:
    """Dump (from scratch) and return (bytes per token, bytes per masked token)."""
    shutil.rmtree(out, ignore_errors=True)
    summary = dump(DumpOptions(data=str(data), out=out, teacher=str(teacher), device="cpu",
                               progress=False, **options))  # fmt: skip
    m = summary.manifest
    return summary.bytes_on_disk / m.tokens, summary.bytes_on_disk / m.masked


def main() -> None:
    args = parse_args()
    work = common.WORK / ("mlm-quick" if args.quick else "mlm")
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    kw = QUICK_TEACHER_KW if args.quick else TEACHER_KW
    files = stdlib_files("train", limit=TEACHER_FILES)
    teacher = mlm.ensure_mlm_teacher(
        common.WORK / ("mlm-teacher-quick" if args.quick else "mlm-teacher"), files=files, **kw
    )
    seq_len = kw["seq_len"]
    train_data, held_data = work / "train-data", work / "heldout-data"
    common.write_token_corpus(train_data, teacher, args.train_tokens, "train")
    common.write_token_corpus(held_data, teacher, args.heldout_tokens, "heldout")
    train_cache, held_cache = work / "train-cache", work / "heldout-cache"
    sizes = {
        "train": dump_cache(teacher, train_data, train_cache, seq_len=seq_len, views=args.views,
                            seed=1),
        "heldout": dump_cache(teacher, held_data, held_cache, seq_len=seq_len, targets="topk",
                              top_k=64, seed=2),
    }  # fmt: skip
    held = logitcache.open(held_cache)
    strength = teacher_strength(teacher, held)
    layers, width = (int(x) for x in args.student.split("x"))
    student = work / "student.json"
    student.write_text(mlm.build_mlm_student_config(teacher, n_layer=layers, hidden=width)
                       .to_json_string(), encoding="utf-8")  # fmt: skip
    rows, results = [], {}
    for name, alpha in (("cached KD (alpha 0.5)", 0.5), ("MLM only (alpha 1)", 1.0)):
        out = work / f"run-alpha{alpha}"
        shutil.rmtree(out, ignore_errors=True)
        fit(FitConfig(cache=str(train_cache), student=str(student), out=str(out),
                      steps=args.steps, batch_size=16, lr=2e-3, alpha=alpha, eval_fraction=0.0,
                      seed=0, progress=False))  # fmt: skip
        r = evaluate(held, out, split="all", batch_size=16)
        results[name] = r
        rows.append([name, f"{r['ce']:.3f}", f"{math.exp(r['ce']):.1f}", f"{r['kl']:.3f}",
                     f"{r['top1']:.3f}"])  # fmt: skip
    rows.append(["teacher", f"{strength['ce']:.3f}", f"{math.exp(strength['ce']):.1f}", "-", "-"])
    table = common.markdown_table(
        [
            "model",
            "held-out masked-token CE (nats)",
            "ppl",
            "KL(teacher, student)",
            "top-1 agreement",
        ],
        rows,
    )
    train = logitcache.open(train_cache).manifest
    size_table = common.markdown_table(
        ["cache", "targets", "tokens", "masked positions", "bytes/token", "bytes/masked token"],
        [
            ["train", f"sample N={train.targets.samples}, {args.views} views", f"{train.tokens:,}",
             f"{train.masked:,}", f"{sizes['train'][0]:.2f}", f"{sizes['train'][1]:.2f}"],
            ["held-out", "topk k=64, 1 view", f"{held.manifest.tokens:,}",
             f"{held.manifest.masked:,}", f"{sizes['heldout'][0]:.2f}",
             f"{sizes['heldout'][1]:.2f}"],
        ],
    )  # fmt: skip
    verdict = regime(strength, min(r["ce"] for r in results.values()), kw["vocab_size"])
    wall = time.perf_counter() - start
    print(table)
    print()
    print(size_table)
    print(
        f"\nteacher entropy at held-out masked positions {strength['entropy']:.3f} nats; {wall:.0f} s"
    )
    print(f"the teacher is {verdict}")
    if args.quick or args.no_results:
        return
    info = common.machine()
    body = f"""## bench_mlm: masked-LM distillation from the cache (DistilBERT's setting)

- Command: `{common.command_line()}`
- Date: {common.now_utc()}
- Machine: {info["cpu"]}, {info["memory"]}; {info["software"]}; load average at the end {common.loadavg()}
- Revision: {common.git_revision()}; wall time {wall / 60:.1f} min
- Teacher: {kw.get("arch", "bert")} {kw["n_layer"]}x{kw["hidden"]} (vocab {kw["vocab_size"]}), trained here {kw["train_steps"]} masked-LM steps of {kw["batch_size"]} x {kw["seq_len"]} tokens on {TEACHER_FILES} stdlib train-split files (its tokenizer too). On the held-out masked positions ({strength["tokens"]:,}, other files): masked-token CE {strength["ce"]:.3f} nats, mean entropy {strength["entropy"]:.3f} nats (uniform would be {math.log(kw["vocab_size"]):.2f}). The teacher is {verdict}.
- Students: BERT {args.student} from the same seed, {args.steps} steps of 16 sequences, lr 2e-3, on the training cache ({args.views} maskings per sequence at p=0.15, 80/10/10; one view per epoch); cached KD is `alpha 0.5, T 1` (loss = 0.5 CE + 0.5 KL at the masked positions), MLM only is `alpha 1` (the cache's labels, no teacher).
- Evaluation: `trainer eval --split all` on the held-out cache (top-64 targets; KL over the 64 ids plus one tail bucket, a lower bound on the full KL).

{table}

{size_table}
"""
    common.update_results("bench_mlm", body)


if __name__ == "__main__":
    main()
