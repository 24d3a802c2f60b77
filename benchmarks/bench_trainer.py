"""Benchmark `trainer fit` from a cache against the same student trained on hard labels alone.

    python benchmarks/bench_trainer.py            # default run (~25 min on 2 CPU cores)
    python benchmarks/bench_trainer.py --quick    # smoke run
    python benchmarks/bench_trainer.py --device cuda --precision bf16 --steps 200

Two figures, measured side by side in one run on one cache of the embedded default teacher:

* **step time ratio**: the real `trainer.fit.fit` recipe, same student init, same batches, same
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
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent


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
    args = p.parse_args(argv)
    if args.quick:
        args.files, args.steps, args.repeats = 30, 12, 1
    return args


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
    from trainer.fit import FitConfig, fit

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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from logitcache.testing import toy
    from trainer.fit import FitConfig

    args.work.mkdir(parents=True, exist_ok=True)
    teacher_dir = common.ensure_teacher(args.quick, args.work)
    cache = build_cache(args, teacher_dir)
    if args.check_cost:
        check_cost(args, cache)
        return
    default_tail, default_loss = FitConfig.tail, FitConfig.loss
    tails = list(dict.fromkeys([default_tail, *args.tails.split(",")]))
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
