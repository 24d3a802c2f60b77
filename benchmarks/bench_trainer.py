"""Benchmark `trainer fit` from a cache against the same student trained on hard labels alone.

    python benchmarks/bench_trainer.py            # default run (~25 min on 2 CPU cores)
    python benchmarks/bench_trainer.py --quick    # smoke run
    python benchmarks/bench_trainer.py --device cuda --precision bf16 --steps 200
    python benchmarks/bench_trainer.py --fused    # --fused-loss vs unfused at V=131072 (~5 min)

Two figures, measured side by side in one run on one cache of the embedded default teacher:

* **step time ratio**: the real `trainer.recipe.fit` recipe, same student init, same batches, same
  steps, with ``alpha=0.5`` (CE + sparse KD at the cached ids) under each tail mode and with
  ``alpha=1`` (CE only; the batches still come from the cache), and under the default tail with
  each other ``--loss`` (``--losses``). The figure is the ratio of the
  training throughputs that `fit` logs (``tokens_per_s`` excludes eval and checkpoint time; the
  first logged interval is dropped as warm-up); the runs of a repetition go in a rotated order,
  medians over repetitions. Target, for the default tail: at most 1.05 (the KD term reuses the
  log-softmax that CE computes anyway).
* **reader headroom**: one `CacheDataset` iterated in the main process (one worker's work:
  decompression, collation) over the training split, in tokens/s, against the tokens/s the
  student consumes in the KD run. Target: at least 20 times.

``--check-cost`` measures instead, on the same cache, only what the reader's per-part check of
ids and values (`logitcache.read.decoded.check_values`) costs: every part decoded with the check
(`decoded.decode`) and the check alone, in alternating repetitions, against the whole reading
of a part (`Cache.read_decoded`: decompression, check, decode). Its figure goes to its own
section of RESULTS.md (``bench_trainer_check``, next to this script's), in the quick form too:
the full run takes about 25 minutes, the check's share a minute.

``--interleaved`` measures the same step time ratios in one process, robust to a busy machine:
one student per variant (hard labels, each tail; same init), fit's step recipe (forward, loss,
backward, clipping, AdamW) on the same cache batches, the variants taking turns step by step
(rotated order), so that the machine's drift hits every variant alike; the figure is the
median over rounds of each round's step-time ratio to hard labels. Separate `fit` runs (the
default mode) are the truer measure on a quiet machine; on a loaded one their ratios swing by
tens of percent from one repetition to the next. Its section is ``bench_trainer_interleaved``.

``--fused`` measures instead ``trainer fit --fused-loss`` (`trainer.fused`) against the unfused
loss where it matters, a large vocabulary (``--vocab``, 131072) and a small student (GPT-2,
2 layers x 64), so that the logits dominate: peak memory and step time. Each variant runs in a
fresh subprocess (peak RSS is the process's high-water mark, `getrusage`), with the same seeded
student and the same random batch (``--batch-size`` x ``--seq-len`` positions, top-``--top-k``
targets with 10% tail mass), ``--fused-steps`` steps of fit's own recipe (the forward, the
loss, backward, clipping, AdamW), the first one untimed. Target: the fused peak at most half
the unfused one, with equal losses. Its section of RESULTS.md is ``bench_trainer_fused``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent
#: --fused: the student's shape (GPT-2 layers x width, heads), small so that the logits dominate
FUSED_STUDENT = {"n_layer": 2, "n_embd": 64, "n_head": 2}
FUSED_VARIANTS = ("unfused", "fused")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, no RESULTS.md update")
    p.add_argument("--work", type=Path, default=HERE / ".work")
    p.add_argument("--files", type=int, default=200, help="stdlib files in the cache's corpus")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--tails", default="renorm,bucket,label", help="tail modes to time (comma-separated)"
    )
    p.add_argument(
        "--losses", default="reverse_kl,gjsd,tvd",
        help="divergences besides forward KL to time, at the default tail (comma-separated)",
    )  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument(
        "--check-cost", action="store_true", help="time only the reader's value check (above)"
    )
    p.add_argument(
        "--interleaved", action="store_true",
        help="only the step time ratios, variants taking turns in one process (above)",
    )  # fmt: skip
    p.add_argument("--rounds", type=int, default=40, help="--interleaved: steps per variant")
    p.add_argument("--fused", action="store_true", help="only --fused-loss vs unfused (above)")
    p.add_argument("--vocab", type=int, default=131072, help="--fused: the student's vocabulary")
    p.add_argument("--fused-steps", type=int, default=5, help="--fused: steps per variant")
    p.add_argument("--fused-tail", default="renorm", help="--fused: the tail mode")
    p.add_argument("--fused-worker", choices=FUSED_VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.files, args.steps, args.repeats = 30, 12, 1
        if args.fused:
            args.vocab, args.batch_size, args.seq_len, args.fused_steps = 16384, 2, 64, 3
        args.rounds = 4
    return args


def recipe_step(model, optimizer, loss, batch, head=None) -> float:
    """One update as `trainer.recipe._step` does it, without the data loading and logging: the
    forward (``model`` returns hidden states when ``head`` is given: the fused loss), the loss,
    backward, clipping at 1.0, the optimizer step; the loss value."""
    import torch

    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    parts = loss(out.logits, batch) if head is None else loss(out, head.weight, head.bias, batch)
    optimizer.zero_grad(set_to_none=True)
    parts.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return float(parts.loss.detach())


def build_cache(args, teacher_dir: Path) -> Path:
    from logitcache.dumping.pipeline import DumpOptions, dump
    from logitcache.testing import toy

    tag = f"{'quick' if args.quick else 'full'}-{args.files}-k{args.top_k}-s{args.seq_len}"
    cache = args.work / f"trainer-cache-{tag}"
    corpus = args.work / f"trainer-corpus-{args.files}"
    if not corpus.exists():
        toy.write_corpus(corpus, files=toy.stdlib_files("train", limit=args.files))
    dump(
        DumpOptions(
            data=str(corpus),
            out=cache,
            teacher=str(teacher_dir),
            targets="topk",  # the tail modes are what this measures
            top_k=args.top_k,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            device=args.device,
            progress=False,
        )
    )  # fmt: skip  (resumes, or returns at once if the cache is complete)
    return cache


def train_rate(
    args, cache: Path, student: Path, tail: str | None, out: Path, loss: str = "forward_kl"
) -> float:
    """Median logged training tokens/s of one `fit` run, warm-up interval dropped."""
    from trainer.recipe import FitConfig, fit

    fit(
        FitConfig(
            cache=str(cache), student=str(student), out=str(out),
            alpha=1.0 if tail is None else 0.5, tail=tail or "renorm", loss=loss,
            batch_size=args.batch_size, steps=args.steps, eval_every=0, eval_batches=1,
            checkpoint_every=0, log_every=max(args.steps // 6, 1), device=args.device,
            precision=args.precision, overwrite=True, progress=False, eval_fraction=0.01,
        )
    )  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if r.get("kind") == "train"][1:]
    return statistics.median(rates)


def reader_rate(args, cache: Path) -> tuple[float, int]:
    """Tokens/s of one reader (the main process) over the whole training split."""
    from trainer.dataset import CacheDataset

    ds = CacheDataset(cache, batch_size=args.batch_size, eval_fraction=0.01, seed=0)
    start, tokens = time.perf_counter(), 0
    for batch in ds:
        tokens += int(batch["attention_mask"].sum())
    return tokens / (time.perf_counter() - start), tokens


def check_cost(args, cache: Path) -> None:
    """Seconds per part of decoding with the value check, of the check alone and of the whole
    reading of a part; medians over alternating repetitions; written to RESULTS.md."""
    import logitcache
    from logitcache.read import decoded

    c = logitcache.open(cache)
    stored = [c.read_part(i) for i in range(c.num_parts)]  # decompressed once, outside the timing
    m, where = c.manifest, "bench"

    def seconds(step) -> float:
        start = time.perf_counter()
        for i, arrays in enumerate(stored):
            step(i, arrays)
        return time.perf_counter() - start

    steps = {
        "decode with the check": lambda i, a: decoded.decode(m, a, where),
        "the check alone": lambda i, a: decoded.check_values(m, a, where),
        "read_decoded (decompress, check, decode)": lambda i, a: c.read_decoded(i),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(max(args.repeats, 5)):
        for name, step in steps.items():
            times[name].append(seconds(step))
    median = {name: statistics.median(t) for name, t in times.items()}
    decode_s, check, whole = (median[n] for n in steps)
    tokens = m.tokens
    rows = [[name, f"{median[name] * 1e3:.2f}", f"{tokens / median[name]:,.0f}"] for name in steps]
    rows += [
        ["decode with / without the check", f"{decode_s / (decode_s - check):.3f}", ""],
        ["read_decoded with / without the check", f"{whole / (whole - check):.3f}", ""],
    ]
    table = common.markdown_table(["measure", "ms (median, all parts)", "tokens/s"], rows)
    info = common.machine()
    t = m.targets
    body = f"""## The reader's value check (`bench_trainer.py --check-cost`)

- Command: `{common.command_line()}`
- Date: {common.now_utc()}
- Machine: {info["cpu"]}, {info["memory"]}; {info["software"]}; load average at the end {common.loadavg()}
- Cache: {tokens:,} tokens in {c.num_parts} part(s), top-{t.k} {t.logprob_dtype} in {t.order} order,
  ids {t.id_dtype}, vocabulary {m.teacher.vocab_size} (the `build_cache` cache of this script).
  {len(times["the check alone"])} alternating repetitions over every part; "without the check"
  is the time with it less the check's own.

{table}
"""
    print(body)
    common.update_results("bench_trainer_check", body)


def fused_worker(args) -> None:
    """One --fused variant in this (fresh) process: prints a JSON line with its step times,
    losses and memory high-water marks (on CUDA, the device's allocator peak as well).
    ``--device cuda --precision bf16`` runs it on a GPU under bfloat16 autocast (bench_gpu)."""
    import contextlib
    import resource

    import torch
    from transformers import AutoModelForCausalLM

    from logitcache.testing import toy
    from trainer.fused import FusedDistillationLoss
    from trainer.losses import DistillationLoss
    from trainer.student import HiddenStates, fused_head

    device = torch.device(args.device)
    b, t, k, v = args.batch_size, args.seq_len, args.top_k, args.vocab
    config = toy.build_student_config(v, n_positions=max(t, 8), **FUSED_STUDENT)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).train().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(v, (b, t), generator=g)
    labels = torch.cat([input_ids[:, 1:], torch.full((b, 1), -100)], dim=1)  # next tokens
    # K distinct ids per position (an odd stride is a bijection of Z / 2^n), 10% tail mass
    start = torch.randint(v, (b, t, 1), generator=g)
    target_ids = (start + 7919 * torch.arange(k)) % v  # (B, T, K)
    target_logprobs = torch.log_softmax(2.0 * torch.randn(b, t, k, generator=g), -1)
    target_logprobs = (target_logprobs + math.log(0.9)).sort(-1, descending=True).values
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "labels": labels, "target_ids": target_ids, "target_logprobs": target_logprobs}  # fmt: skip
    batch = {name: tensor.to(device) for name, tensor in batch.items()}
    kw = {"alpha": 0.5, "temperature": 1.0, "tail": args.fused_tail}
    if args.fused_worker == "fused":
        net, head, loss = HiddenStates(model), fused_head(model), FusedDistillationLoss(**kw)
    else:
        net, head, loss = model, None, DistillationLoss(**kw)
    on_cuda = device.type == "cuda"
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if args.precision == "bf16"
        else contextlib.nullcontext()
    )

    def rss() -> int:  # bytes resident now
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize(device)

    before, peak_before = rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    gpu_before = torch.cuda.memory_allocated(device) if on_cuda else 0
    times, losses = [], []
    for _ in range(args.fused_steps):
        sync()
        start_s = time.perf_counter()
        with autocast:
            losses.append(recipe_step(net, optimizer, loss, batch, head))  # .item(): synced
        times.append(time.perf_counter() - start_s)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gpu_peak = torch.cuda.max_memory_allocated(device) if on_cuda else 0
    print(json.dumps({"variant": args.fused_worker, "rss_before": before,
                      "peak_before": peak_before, "peak": peak, "times": times,
                      "losses": losses, "gpu_before": gpu_before, "gpu_peak": gpu_peak}))  # fmt: skip


def fused_comparison(args) -> None:
    """--fused: both variants, each in a fresh subprocess; the table, and RESULTS.md."""
    flags = ["--vocab", args.vocab, "--batch-size", args.batch_size, "--seq-len", args.seq_len,
             "--top-k", args.top_k, "--fused-steps", args.fused_steps, "--fused-tail",
             args.fused_tail]  # fmt: skip
    got = {}
    for variant in FUSED_VARIANTS:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--fused-worker", variant,
             *map(str, flags)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise SystemExit(f"the {variant} worker failed:\n{proc.stderr}")
        got[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{variant}: {got[variant]}", file=sys.stderr)
    un, fu = got["unfused"], got["fused"]
    gib = 2.0**30

    def timed(r) -> float:  # median step time, the first step dropped
        return statistics.median(r["times"][1:] or r["times"])

    peak_ratio = fu["peak"] / un["peak"]
    grow = {n: r["peak"] - r["rss_before"] for n, r in got.items()}
    time_ratio = timed(fu) / timed(un)
    worst = max(abs(a - b) / abs(b) for a, b in zip(fu["losses"], un["losses"], strict=True))
    logits_gib = args.batch_size * args.seq_len * args.vocab * 4 / gib
    chunk = min(fused_chunk(args.vocab), args.batch_size * args.seq_len)
    rows = [
        ["peak RSS, unfused (GiB)", f"{un['peak'] / gib:.2f}", "", ""],
        ["peak RSS, fused (GiB)", f"{fu['peak'] / gib:.2f}", "", ""],
        ["peak RSS fused / unfused", f"{peak_ratio:.3f}", "<= 0.5",
         "yes" if peak_ratio <= 0.5 else "no"],
        ["growth over the steps (peak - RSS before them), unfused / fused (GiB)",
         f"{grow['unfused'] / gib:.2f} / {grow['fused'] / gib:.2f}", "", ""],
        [f"step time (median of {len(un['times'][1:] or un['times'])}), unfused (s)",
         f"{timed(un):.2f}", "", ""],
        ["step time, fused (s)", f"{timed(fu):.2f}", "", ""],
        ["step time fused / unfused", f"{time_ratio:.3f}", "", ""],
        ["largest relative loss difference over the steps", f"{worst:.1e}", "", ""],
    ]  # fmt: skip
    table = common.markdown_table(["measure", "value", "target", "met"], rows)
    info = common.machine()
    shape = ", ".join(f"{k} {v}" for k, v in FUSED_STUDENT.items())
    body = f"""## --fused-loss vs the unfused loss at a large vocabulary (`bench_trainer.py --fused`)

- Command: `{common.command_line()}`
- Date: {common.now_utc()}
- Machine: {info["cpu"]}, {info["memory"]}; {info["software"]}; load average at the end {common.loadavg()}
- Setup: GPT-2 student ({shape}), vocabulary {args.vocab:,}; one random batch of
  {args.batch_size} x {args.seq_len} positions with top-{args.top_k} targets (10% tail mass), tail
  {args.fused_tail}, alpha 0.5, T 1; {args.fused_steps} steps of fit's recipe per variant
  (forward, loss, backward, clipping, AdamW), each variant in a fresh process; float32 on the CPU.
  The unfused logits alone are {logits_gib:.2f} GiB; a fused chunk's {chunk * args.vocab * 4 / gib:.3f} GiB
  ({chunk} positions).

{table}

Step times (s): unfused {", ".join(f"{x:.2f}" for x in un["times"])}; fused {", ".join(f"{x:.2f}" for x in fu["times"])}.
Losses: unfused {", ".join(f"{x:.6f}" for x in un["losses"])}; fused {", ".join(f"{x:.6f}" for x in fu["losses"])}.
"""
    print(body)
    if not args.quick:
        common.update_results("bench_trainer_fused", body)


def interleaved(args, cache: Path, teacher_dir: Path, tails: list[str]) -> None:
    """--interleaved: every variant's steps in turn in this process; RESULTS.md."""
    import torch
    from transformers import AutoModelForCausalLM

    from logitcache.testing import toy
    from trainer.dataset import CacheDataset
    from trainer.losses import DistillationLoss

    losses = {"hard labels": DistillationLoss(alpha=1.0)}
    losses.update({t: DistillationLoss(alpha=0.5, tail=t) for t in tails})
    config = toy.build_student_config(teacher_dir)
    runs = {}
    for name in losses:
        torch.manual_seed(0)  # the same init for every variant
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()
        runs[name] = (model, torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1))
    ds = CacheDataset(cache, batch_size=args.batch_size, eval_fraction=0.01, seed=0)
    batches = []
    for batch in ds:  # the first rounds + 1 batches, read once, outside the timing
        batches.append(batch)
        if len(batches) > args.rounds:
            break
    times: dict[str, list[float]] = {name: [] for name in losses}
    names = list(losses)
    for r, batch in enumerate(batches):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            model, optimizer = runs[name]
            start = time.perf_counter()
            recipe_step(model, optimizer, losses[name], batch)
            if r:  # round 0 is the warm-up
                times[name].append(time.perf_counter() - start)
    hard = times["hard labels"]
    rows = [["hard labels only: step time (s, median)", f"{statistics.median(hard):.3f}", "", ""]]
    for name in names[1:]:
        ratios = [t / h for t, h in zip(times[name], hard, strict=True)]
        ratio, q1, q3 = (statistics.median(ratios), *statistics.quantiles(ratios, n=4)[::2])
        target = name in ("renorm", "bucket")
        rows += [
            [f"tail {name}: step time (s, median)", f"{statistics.median(times[name]):.3f}", "",
             ""],
            [f"step time tail {name} / hard labels, median of {len(ratios)} rounds' ratios "
             f"(quartiles {q1:.3f} - {q3:.3f})", f"{ratio:.3f}", "<= 1.05" if target else "",
             ("yes" if ratio <= 1.05 else "no") if target else ""],
        ]  # fmt: skip
    table = common.markdown_table(["measure", "value", "target", "met"], rows)
    info = common.machine()
    body = f"""## Step time from the cache vs hard labels, interleaved (`bench_trainer.py --interleaved`)

- Command: `{common.command_line()}`
- Date: {common.now_utc()}
- Machine: {info["cpu"]}, {info["memory"]}; {info["software"]}; load average at the end {common.loadavg()}
- Setup: the cache and student of the default mode (top-{args.top_k}, seq_len {args.seq_len},
  batch {args.batch_size}); alpha 0.5 for the tails, 1 for hard labels; {args.rounds} rounds of
  one step per variant (the first round untimed), variants in rotated order, on the cache's
  first batches; device cpu, float32.

{table}
"""
    print(body)
    if not args.quick:
        common.update_results("bench_trainer_interleaved", body)


def fused_chunk(vocab: int) -> int:
    from trainer.fused import DEFAULT_CHUNK_ELEMENTS

    return max(1, DEFAULT_CHUNK_ELEMENTS // vocab)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.fused_worker:
        fused_worker(args)
        return
    if args.fused:
        fused_comparison(args)
        return
    from logitcache.testing import toy
    from trainer.recipe import FitConfig

    args.work.mkdir(parents=True, exist_ok=True)
    teacher_dir = common.ensure_teacher(args.quick, args.work)
    cache = build_cache(args, teacher_dir)
    if args.check_cost:
        check_cost(args, cache)
        return
    default_tail, default_loss = FitConfig.tail, FitConfig.loss
    tails = list(dict.fromkeys([default_tail, *args.tails.split(",")]))
    if args.interleaved:
        interleaved(args, cache, teacher_dir, tails)
        return
    losses = [x for x in dict.fromkeys(args.losses.split(",")) if x and x != default_loss]
    # run name -> (tail, loss); hard labels has no tail
    kinds: dict[str, tuple[str | None, str]] = {
        "hard labels": (None, default_loss),
        **{t: (t, default_loss) for t in tails},
        **{f"{default_tail} {loss}": (default_tail, loss) for loss in losses},
    }
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        student = Path(tmp) / "student.json"
        student.write_text(toy.build_student_config(teacher_dir).to_json_string())
        runs: dict[str, list[float]] = {name: [] for name in kinds}
        for rep in range(args.repeats):
            names = list(runs)
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                tail, loss = kinds[name]
                out = Path(tmp) / f"run-{name.replace(' ', '-')}"
                rate = train_rate(args, cache, student, tail, out, loss)
                runs[name].append(rate)
                print(f"repeat {rep}: {name} {rate:,.0f} tokens/s", file=sys.stderr)
        read, read_tokens = reader_rate(args, cache)

    rate = {name: statistics.median(rates) for name, rates in runs.items()}
    hard_rate, kd_rate = rate["hard labels"], rate[default_tail]
    headroom = read / kd_rate
    info = common.machine()
    rows = [["hard labels only: train tokens/s (median)", f"{hard_rate:,.0f}", "", ""]]
    for name, (tail, loss) in kinds.items():
        if tail is None:
            continue
        # each repetition's KD run against the hard-label run of the same repetition (paired,
        # so slow drifts of the machine cancel), then the median over repetitions
        pairs = [h / k for h, k in zip(runs["hard labels"], runs[name], strict=True)]
        ratio = statistics.median(pairs)
        target = name == default_tail
        what = f"tail {tail}" + ("" if loss == default_loss else f", loss {loss}")
        rows += [
            [f"KD, {what}{' (default)' if target else ''}: train tokens/s (median)",
             f"{rate[name]:,.0f}", "", ""],
            [f"step time KD ({what}) / hard labels, median of {len(pairs)} paired ratios "
             f"({', '.join(f'{x:.3f}' for x in pairs)})", f"{ratio:.3f}",
             "<= 1.05" if target else "", ("yes" if ratio <= 1.05 else "no") if target else ""],
        ]  # fmt: skip
    rows += [
        ["reader tokens/s (one worker)", f"{read:,.0f}", "", ""],
        [f"reader / student consumption (KD, {default_tail})", f"{headroom:.1f}x", ">= 20x",
         "yes" if headroom >= 20 else "no"],
    ]  # fmt: skip
    table = common.markdown_table(["measure", "value", "target", "met"], rows)
    each = "; ".join(f"{n}: {', '.join(f'{r:,.0f}' for r in rs)}" for n, rs in runs.items())
    body = f"""## Training from the cache vs hard labels (`bench_trainer.py`)

- Command: `{common.command_line()}`
- Date: {common.now_utc()}
- Machine: {info["cpu"]}, {info["memory"]}; {info["software"]}{"; GPU " + info["gpu"] if "gpu" in info else ""}; load average at the end {common.loadavg()}
- Setup: default teacher (`logitcache.testing.toy`), cache of {args.files} stdlib files, top-{args.top_k},
  seq_len {args.seq_len}; student `toy.build_student_config` (same vocabulary); batch
  {args.batch_size} sequences, {args.steps} steps per run, {args.repeats} repetitions, tails
  {", ".join(tails)} (default `{default_tail}`), other losses at the default tail
  {", ".join(losses) or "none"}, device {args.device}, precision {args.precision}. The reader pass read
  {read_tokens:,} tokens.

{table}

Each run, tokens/s: {each}.
"""
    print(body)
    if not args.quick:
        common.update_results("bench_trainer", body)


if __name__ == "__main__":
    main()
