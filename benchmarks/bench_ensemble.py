"""Ensembles of two toy teachers: what averaging buys on held-out text, what it costs in the
dump, and how close `logitcache ensemble` comes to the exact average from top-k caches.

    python benchmarks/bench_ensemble.py           # default run (mostly training the two teachers)
    python benchmarks/bench_ensemble.py --quick   # smoke run (untrained teachers, no RESULTS.md)

Two GPT-2 teachers (2x128, vocabulary 2048, the same byte-level BPE) are trained on the stdlib
train split with the same recipe and different seeds (`logitcache.testing.toy`), so they are
about equally strong and disagree where a single model is unsure: the case ensembles are for.
On held-out stdlib text (the heldout split) the script measures

* the next-token cross-entropy and top-1 accuracy of each teacher alone and of their equal
  average in both modes (`logitcache.dumping.ensemble.ensemble_logits`, the function the dump
  uses), with the mean probability of the top id (how peaked the distributions are);
* the seconds of `dump --targets topk --top-k 32` with one teacher and with the ensemble of two
  (full logits, one member after the other);
* `logitcache ensemble --mode probs` of the two teachers' top-32 caches against the exact
  probs average: how much probability the stored ids miss (the approximation of
  docs/FORMAT.md section 3c), against its stated bound, and how often the stored ids are the
  exact average's top 32.

Full runs (not ``--quick``) write their section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

import logitcache
from logitcache.dumping.ensemble import ensemble_logits

#: The two teachers: the same shape, data and recipe; seeds 0 and 1.
TEACHER = {"vocab_size": 2048, "n_layer": 2, "n_embd": 128, "n_head": 2, "n_positions": 256,
           "seq_len": 128, "batch_size": 16, "lr": 1e-3, "lr_schedule": "cosine",
           "warmup_steps": 60}  # fmt: skip
TRAIN_FILES = 400
K = 32


def teachers(work: Path, steps: int) -> list[Path]:
    """The two teachers, built once under `work` and reused (the second with the first's
    tokenizer, so that they share it as an ensemble must)."""
    from transformers import AutoTokenizer

    from logitcache.testing import toy

    files = toy.stdlib_files("train", limit=TRAIN_FILES)
    kw = TEACHER | {"train_steps": steps, "files": files, "verbose": True}
    first = toy.ensure_teacher(work / f"ensemble-a-{steps}", seed=0, **kw)
    tokenizer = AutoTokenizer.from_pretrained(first)
    second = toy.ensure_teacher(work / f"ensemble-b-{steps}", seed=1, tokenizer=tokenizer, **kw)
    return [first, second]


def timed_dump(out: Path, data: Path, **options: object) -> tuple[logitcache.Manifest, float]:
    summary = logitcache.dump(logitcache.DumpOptions(
        data=str(data), out=out, targets="topk", top_k=K, logprob_dtype="float32",
        id_order="descending", seq_len=128, device="cpu", progress=False, overwrite=True,
        **options,
    ))  # fmt: skip
    return summary.manifest, summary.wall_seconds


@torch.inference_mode()
def quality(models: list, cache: Path, weights: list[float]) -> dict[str, dict[str, float]]:
    """{row: {ce, top1, peak}} over every next token of the held-out sequences of `cache`."""
    rows = {"teacher A alone": ("A",), "teacher B alone": ("B",), "ensemble, logits": "logits",
            "ensemble, probs": "probs"}  # fmt: skip
    sums = {name: [0.0, 0.0, 0.0] for name in rows}
    count = 0
    members = [lambda ids, m=m: m(ids).logits for m in models]
    for seq in logitcache.open(cache):
        ids = seq.input_ids[None]
        target = seq.input_ids[1:]
        outputs = {
            "teacher A alone": members[0](ids),
            "teacher B alone": members[1](ids),
            "ensemble, logits": ensemble_logits(members, ids, weights, "logits", 1.0),
            "ensemble, probs": ensemble_logits(members, ids, weights, "probs", 1.0),
        }
        for name, logits in outputs.items():
            logp = torch.log_softmax(logits[0, :-1].double(), -1)  # (T - 1, V)
            sums[name][0] += float(-logp.gather(1, target[:, None]).sum())
            sums[name][1] += float((logp.argmax(-1) == target).sum())
            sums[name][2] += float(logp.max(-1).values.exp().sum())
        count += len(target)
    return {n: {"ce": s[0] / count, "top1": s[1] / count, "peak": s[2] / count}
            for n, s in sums.items()}  # fmt: skip


@torch.inference_mode()
def combine_fidelity(models: list, members: list[Path], combined: Path) -> dict[str, float]:
    """The combined top-k cache against the exact probs average: per position, the
    probability its stored ids miss (sum of true minus stored) and the bound of FORMAT.md 3c
    summed over the stored ids; the largest single-id shortfall and bound; the share of
    positions whose stored ids are the exact top k."""
    deficit = bound = worst = worst_bound = same = positions = 0.0
    inputs = [list(logitcache.open(m)) for m in members]
    for index, seq in enumerate(logitcache.open(combined)):
        probs = [torch.softmax(m(seq.input_ids[None]).logits[0].double(), -1) for m in models]
        true = (probs[0] + probs[1]) / 2  # (T, V)
        stored = seq.target_logprobs.double().exp()  # (T, k)
        gap = true.gather(1, seq.target_ids) - stored
        limit = torch.zeros_like(stored)
        for member in (inputs[0][index], inputs[1][index]):
            kept = (seq.target_ids[:, :, None] == member.target_ids[:, None, :]).any(-1)
            p_k = member.target_logprobs[:, -1:].double().exp()
            tail = (1 - member.target_logprobs.double().exp().sum(-1, keepdim=True)).clamp_min(0)
            limit += torch.where(kept, 0.0, 0.5 * torch.minimum(p_k, tail))
        deficit += float(gap.sum())
        bound += float(limit.sum())
        worst, worst_bound = max(worst, float(gap.max())), max(worst_bound, float(limit.max()))
        exact = true.topk(seq.target_ids.shape[1], -1).indices.sort(-1).values
        same += float((exact == seq.target_ids.sort(-1).values).all(-1).sum())
        positions += len(seq.input_ids)
    return {"deficit": deficit / positions, "bound": bound / positions, "worst": worst,
            "worst_bound": worst_bound, "same": same / positions}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="Untrained teachers, little text.")
    p.add_argument("--steps", type=int, default=None, help="Training steps per teacher [600].")
    p.add_argument("--tokens", type=int, default=None, help="Held-out tokens [32768].")
    p.add_argument("--work", type=Path, default=common.WORK, help="Reusable work directory.")
    args = p.parse_args()
    common.fill_defaults(args, {"steps": 0 if args.quick else 600,
                                "tokens": 4096 if args.quick else 32768})  # fmt: skip
    torch.set_num_threads(2)
    started, t0, load_before = common.now_utc(), time.perf_counter(), common.loadavg()
    work = args.work
    dirs = teachers(work, args.steps)
    data = work / f"ensemble-heldout-{args.tokens}"
    tokens = common.write_token_corpus(data, dirs[0], args.tokens, split="heldout")
    caches = work / "ensemble-caches"
    timed_dump(caches / "a", data, teacher=str(dirs[0]))  # warm-up: the first imports and loads
    single, single_s = timed_dump(caches / "a", data, teacher=str(dirs[0]))
    _, single_b_s = timed_dump(caches / "b", data, teacher=str(dirs[1]))
    _, both_s = timed_dump(caches / "ab", data, teachers=[str(d) for d in dirs], ensemble="probs")
    combine_t = time.perf_counter()
    logitcache.ensemble(
        caches / "combined", [caches / "a", caches / "b"], mode="probs", overwrite=True
    )
    combine_s = time.perf_counter() - combine_t
    from transformers import AutoModelForCausalLM

    models = [AutoModelForCausalLM.from_pretrained(d).eval() for d in dirs]
    rows = quality(models, caches / "a", [0.5, 0.5])
    fid = combine_fidelity(models, [caches / "a", caches / "b"], caches / "combined")
    table = common.markdown_table(
        ["teacher", "held-out CE (nats)", "top-1 accuracy", "mean top-1 probability"],
        [[n, f"{r['ce']:.3f}", f"{r['top1']:.3f}", f"{r['peak']:.3f}"] for n, r in rows.items()],
    )
    cost = common.markdown_table(
        ["step", "seconds", "tokens/s"],
        [[name, f"{s:.1f}", f"{single.tokens / s:,.0f}"] for name, s in (
            ("dump, teacher A", single_s), ("dump, teacher B", single_b_s),
            ("dump, ensemble of A and B (probs)", both_s),
            ("logitcache ensemble of the A and B caches (probs)", combine_s),
        )],
    )  # fmt: skip
    body = "\n\n".join([
        "## Ensembles of two teachers (`bench_ensemble.py`)",
        f"- date: {started}; {(time.perf_counter() - t0) / 60:.1f} min; load average "
        f"{load_before} before\n- machine: {common.machine_line()}\n- command: "
        f"`{common.command_line()}`",
        f"Two GPT-2 teachers ({TEACHER['n_layer']}x{TEACHER['n_embd']}, vocabulary "
        f"{TEACHER['vocab_size']}, one tokenizer), each trained {args.steps} cosine-annealed "
        f"steps on {TRAIN_FILES} stdlib train files, seeds 0 and 1; measured on {tokens:,} "
        f"held-out stdlib tokens ({single.sequences} sequences of 128). Equal weights.",
        table,
        f"Dump cost (top-{K}, float32 log-probs, one CPU process, 2 threads; the ensemble "
        "runs both teachers, full logits):",
        cost,
        f"`logitcache ensemble --mode probs` of the two top-{K} caches against the exact "
        f"probs average: the stored ids miss on average {fid['deficit']:.2e} of probability "
        f"per position (stated bound, summed over the stored ids: {fid['bound']:.2e}); the "
        f"largest shortfall of one id is {fid['worst']:.2e} (its bound at most "
        f"{fid['worst_bound']:.2e}); the stored ids are exactly the average's top {K} at "
        f"{100 * fid['same']:.1f}% of positions.",
    ])  # fmt: skip
    print(body)
    if not args.quick:
        common.update_results("bench_ensemble", body)
        print(f"[bench_ensemble] wrote its section of {common.RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
