"""Benchmark `logitcache dump` against the bare teacher forward it wraps.

    python benchmarks/bench_dump.py            # default run (see --help; ~10 min on 2 CPU cores)
    python benchmarks/bench_dump.py --quick    # smoke run (< 2 min once the teacher exists)
    python benchmarks/bench_dump.py --device cuda --dtype bfloat16 --tokens 2000000
    python benchmarks/bench_dump.py --vocab-rss  # only the peak RSS at vocabulary 131072 (~3 min)

What it measures, side by side in one process and on the same packed sequences:

* **bare**: ``Teacher.logits(ids)`` over every batch of the dataset, nothing else: the batches
  are formed exactly as `dump` forms them (``seq_len`` packing, ``batch_size`` sequences, no
  batch across a part boundary) and turned into tensors before the clock starts.
* **dump steady**: the wall time of ``logitcache.dumping.pipeline.run``, the loop that tokenizes, runs the
  teacher, takes log-softmax top-k, and assembles, compresses, checksums and commits every
  part (the writer thread is joined before the clock stops).
* **dump total**: the whole ``logitcache.dumping.pipeline.dump()`` call: on top of the loop, loading the
  teacher (weights hash included), fingerprinting the data and sizing the cache on disk.

Each repetition loads nothing new for the bare side (its teacher is loaded once, untimed) and
runs one full dump; bare and dump alternate (bare first on even repetitions, dump first on odd
ones) after an untimed warm-up of both, and the table reports medians and every value.
CPU seconds (``time.process_time``: all threads of this process) are reported next to the wall
times, because on a shared machine they are far less sensitive to other processes.

Then the cache of the last dump is sized (every file on disk, manifest included), and dumps
of two datasets ten times apart run each in a fresh subprocess that reports its own peak RSS
(``VmHWM``), alternating small and large, ``--rss-runs`` times each. The large dataset is the
small one's documents ten times over, so the two differ in length only (not in their largest
document, which sets how much the tokenizer holds at once), and ``--rss-part-tokens`` makes
the small one span several parts, so "memory does not grow with the dataset" is really tested.

``--vocab-rss`` runs only one more measurement, at a large vocabulary, where the logits are
the memory peak: a random-initialised GPT-2 (2 x 64, vocabulary ``--vocab``, 131072 by default,
nothing downloaded) over ``--rss-batches`` batches of ``--batch-size`` (2) random-id sequences
of ``--seq-len`` (2048), each of these in a fresh process that reports its peak RSS: the
teacher loaded and nothing else; the bare forward of the same batches; the dump (top-k, the
chunked logits of `logitcache.dumping.chunked`); the dump of every batch's full logits
(``logits_chunk_tokens=-1``, what every dump did before). It writes its own section,
``bench_dump_vocab``.

Full runs (not ``--quick``) write their section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import (
    DEFAULT_SHAPE,
    RESULTS,
    WORK,
    command_line,
    ensure_teacher,
    fill_defaults,
    git_revision,
    loadavg,
    machine,
    markdown_table,
    now_utc,
    teacher_settings,
    update_results,
    write_token_corpus,
)

# --------------------------------------------------------------------------------------------
# Corpora and cache sizes
# --------------------------------------------------------------------------------------------


def repeat_corpus(src: Path, dest: Path, times: int) -> None:
    """`dest`: the documents of `src`, `times` times over, in that order (reused if done)."""
    stamp = dest / ".repeat.json"
    wanted = {"src": str(src), "times": times, "files": sorted(p.name for p in src.glob("*.txt"))}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for r in range(times):
        for name in wanted["files"]:
            shutil.copyfile(src / name, dest / f"r{r:02d}_{name}")
    stamp.write_text(json.dumps(wanted))


def disk_breakdown(cache: Path) -> dict[str, int]:
    """Bytes on disk under `cache`, by array name (zarr.json metadata counted with its array),
    plus the manifest."""
    sizes: dict[str, int] = {}
    for f in cache.rglob("*"):
        if not f.is_file():
            continue
        rel = f.relative_to(cache).parts
        key = rel[2] if len(rel) >= 4 and rel[0] == "parts" else rel[-1]
        if len(rel) == 3 and rel[0] == "parts":  # a part group's own zarr.json
            key = "group metadata"
        sizes[key] = sizes.get(key, 0) + f.stat().st_size
    return sizes


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    wall: float
    cpu: float
    others: float = float("nan")  # share of the machine's CPU that other processes used


def _machine_busy() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat), or NaN."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class Clock:
    """Wall and CPU time of this process, and how busy the rest of the machine was meanwhile:
    on a shared machine, a run during which other processes took CPU is not a clean one."""

    def __init__(self) -> None:
        self.wall, self.cpu, self.busy = time.perf_counter(), time.process_time(), _machine_busy()

    def stop(self) -> Timing:
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        others = (_machine_busy() - self.busy - cpu) / (wall * (os.cpu_count() or 1))
        return Timing(wall, cpu, max(0.0, others))


def wait_until_quiet(limit_s: float, share: float = 0.1, settle_s: float = 3.0) -> float:
    """Wait (at most `limit_s`) until other processes have used under `share` of the machine's
    CPU for `settle_s` seconds in a row; returns the seconds waited."""
    start = quiet_since = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        busy, t = _machine_busy(), time.perf_counter()
        time.sleep(0.5)
        used = (_machine_busy() - busy) / ((time.perf_counter() - t) * (os.cpu_count() or 1))
        if not used < share:  # NaN (no /proc/stat) ends the wait below
            quiet_since = time.perf_counter()
            if used != used:
                break
        elif time.perf_counter() - quiet_since >= settle_s:
            break
    return time.perf_counter() - start


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bare_batches(corpus: Path, teacher, seq_len: int, batch_size: int, part_tokens: int):
    """The batches `dump` would form for `corpus`, as (batch, time) int64 tensors on the device."""
    import torch

    from logitcache.dumping import data, pipeline

    source = data.resolve(str(corpus))
    tokens = data.tokenize(data.iter_documents(source), teacher.tokenizer, source.pretokenized)
    sequences = data.pack(tokens, seq_len, teacher.tokenizer_info.eos_token_id, True)
    per_part = max(1, part_tokens // seq_len)
    return [
        torch.from_numpy(pipeline.input_ids(batch)).to(teacher.device)
        for batch, _ in pipeline.batches(sequences, per_part, batch_size, 0)
    ]


def time_bare(teacher, batches, device: str) -> Timing:
    _sync(device)
    clock = Clock()
    for ids in batches:
        teacher.logits(ids)
    _sync(device)
    return clock.stop()


def time_dump(opts, **stand_ins) -> tuple[Timing, Timing, object]:
    """(steady-state loop, whole call, summary) of one `dump`; `stand_ins` go to
    `pipeline.run` (the breakdown's replacements for a stage, see `_without`)."""
    from logitcache.dumping import pipeline

    loop: list[Timing] = []

    def timed_run(*args, **kw):
        clock = Clock()
        try:
            return pipeline.run(*args, **kw, **stand_ins)
        finally:
            loop.append(clock.stop())

    shutil.rmtree(opts.out, ignore_errors=True)
    clock = Clock()
    summary = pipeline.dump(opts, loop=timed_run)
    total = clock.stop()
    return loop[0], total, summary


def dump_options(args, teacher_dir: Path, corpus: Path, out: Path):
    from logitcache.dumping.options import DumpOptions

    return DumpOptions(
        data=str(corpus),
        out=out,
        teacher=str(teacher_dir),
        targets="topk",  # the stages and sizes below are those of top-k targets
        top_k=args.top_k,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        part_tokens=args.part_tokens,
        progress=False,
        overwrite=True,
    )


# --------------------------------------------------------------------------------------------
# Where the extra time goes (--breakdown)
# --------------------------------------------------------------------------------------------


def _without(parts: tuple[str, ...]) -> dict[str, object]:
    """`pipeline.run` arguments that leave stages out of a dump (for the breakdown only; the
    cache is then wrong): "writer" (batches are dropped instead of assembled, compressed and
    committed) or "targets" (the log-softmax top-k of one position per row, repeated along
    the row)."""
    from logitcache.dumping import targets

    def one_position(logits, spec, sequences, *, first_position=0):
        small = targets.device_targets(
            logits[:, :1], spec, sequences, first_position=first_position
        )
        shape = logits.shape[:2]
        return {k: v.expand(*shape, *v.shape[2:]).contiguous() for k, v in small.items()}

    stand_ins: dict[str, object] = {}
    if "writer" in parts:
        stand_ins["sink"] = lambda batch: None
    if "targets" in parts:
        stand_ins["targets_fn"] = one_position
    return stand_ins


def breakdown(args, teacher, teacher_dir: Path, corpus: Path) -> tuple[str, int]:
    """CPU seconds, at one torch thread, of the bare forward and of dumps with and without
    their writer and their log-softmax top-k: the split of the dump's extra work."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    batches = bare_batches(corpus, teacher, args.seq_len, args.batch_size, args.part_tokens)
    opts = dump_options(args, teacher_dir, corpus, args.work / "cache-breakdown")
    variants: dict[str, tuple[str, ...] | None] = {
        "bare forward": None,
        "dump": (),
        "dump without the writer": ("writer",),
        "dump without log-softmax top-k": ("targets",),
        "dump without either": ("writer", "targets"),
    }
    runs: dict[str, list[Timing]] = {name: [] for name in variants}
    try:
        for rep in range(args.repeats):
            names = list(variants)
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                skipped = variants[name]
                if skipped is None:
                    runs[name].append(time_bare(teacher, batches, args.device))
                else:
                    runs[name].append(time_dump(opts, **_without(skipped))[0])
                print(f"[bench_dump] breakdown {rep + 1}/{args.repeats}: {name}", file=sys.stderr)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(opts.out, ignore_errors=True)
    base = statistics.median(t.cpu for t in runs["bare forward"])
    rows = [
        [
            name,
            f"{statistics.median(t.cpu for t in ts):.2f}",
            ", ".join(f"{t.cpu:.2f}" for t in ts),
            f"{statistics.median(t.cpu for t in ts) / base:.3f}",
            ", ".join(f"{t.others:.0%}" for t in ts),
        ]
        for name, ts in runs.items()
    ]
    table = markdown_table(
        ["one torch thread", "CPU s (median)", "CPU s, each run", "CPU / bare",
         "other processes' CPU share"],
        rows,
    )  # fmt: skip
    return table, sum(int(b.numel()) for b in batches)


# --------------------------------------------------------------------------------------------
# Peak RSS in a fresh process
# --------------------------------------------------------------------------------------------


def _child_dump(spec: str) -> None:
    """Run one dump (options as JSON) and print this process's peak RSS as JSON.

    The peak is ``VmHWM`` of /proc/self/status: ``ru_maxrss`` (of this process, or of the
    parent's RUSAGE_CHILDREN) is no use here, because Linux carries the parent's peak across
    fork and execve into it, so every child would report the benchmark process's own peak."""
    from logitcache.dumping.pipeline import DumpOptions, dump

    kw = json.loads(spec)
    kw["out"] = Path(kw["out"])
    summary = dump(DumpOptions(**kw))
    hwm = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
    print(
        json.dumps(
            {
                "vmhwm": hwm,
                "tokens": summary.manifest.tokens,
                "parts": len(summary.manifest.parts),
                "wall": summary.wall_seconds,
                "logits": summary.logits,
            }
        )
    )


def _vmhwm() -> int:
    """This process's peak RSS in bytes (``VmHWM``; see `_child_dump` for why not ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _child_bare(spec: str) -> None:
    """Load the teacher and, unless ``forward`` is false, run the bare forward (`time_bare`) of
    the batches `dump` would form for ``data``; print the peak RSS and the wall time as JSON."""
    from logitcache.dumping.teacher import load_teacher

    kw = json.loads(spec)
    teacher = load_teacher(kw["teacher"], device=kw["device"], dtype=kw["dtype"])
    batches = bare_batches(Path(kw["data"]), teacher, kw["seq_len"], kw["batch_size"], 1 << 30)
    wall = time_bare(teacher, batches, kw["device"]).wall if kw["forward"] else 0.0
    print(json.dumps({"vmhwm": _vmhwm(), "wall": wall, "batches": len(batches)}))


def _in_child(flag: str, spec: dict) -> dict:
    """Run this script with `flag` and `spec` (JSON) in a fresh process; its JSON line back."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), flag, json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"child {flag} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rss_of_dump(opts) -> dict:
    spec = dataclasses.asdict(opts)
    spec["out"] = str(spec["out"])
    shutil.rmtree(opts.out, ignore_errors=True)
    result = _in_child("--_child-dump", spec)
    shutil.rmtree(opts.out, ignore_errors=True)
    return result


# --------------------------------------------------------------------------------------------
# Peak RSS at a large vocabulary (--vocab-rss)
# --------------------------------------------------------------------------------------------


def vocab_teacher(work: Path, vocab: int, positions: int) -> Path:
    """A random-initialised GPT-2 (2 x 64) over `vocab` ids, with a small word-level tokenizer
    (its ids are a subset of the model's: the data is ids, not text), saved once under `work`."""
    out = work / f"teacher-vocab{vocab}-{positions}"
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=64, n_layer=2, n_head=2,
                        eos_token_id=1, bos_token_id=1)  # fmt: skip
    GPT2LMHeadModel(config).eval().save_pretrained(out)
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="w1", unk_token="w0")
    tok.save_pretrained(out)
    return out


def vocab_rss(args: argparse.Namespace) -> str:
    """The peak RSS of each process of the large-vocabulary measurement, and its verdict."""
    import numpy as np

    from logitcache.dumping.options import DumpOptions

    args.work.mkdir(parents=True, exist_ok=True)
    teacher = vocab_teacher(args.work, args.vocab, args.seq_len)
    data = args.work / f"ids-vocab{args.vocab}-{args.seq_len}.npy"
    # one document per sequence: seq_len - 1 random ids, and the EOS packing adds
    rng = np.random.default_rng(0)
    rows = args.rss_batches * args.batch_size
    np.save(data, rng.integers(2, args.vocab, size=(rows, args.seq_len - 1)))
    out = args.work / "cache-vocab-rss"
    common = {"teacher": str(teacher), "device": args.device, "dtype": args.dtype,
              "seq_len": args.seq_len, "batch_size": args.batch_size, "data": str(data)}  # fmt: skip

    def dump_spec(chunk_tokens: int) -> dict:
        opts = DumpOptions(
            data=str(data), out=out, teacher=str(teacher), top_k=args.top_k,
            seq_len=args.seq_len, batch_size=args.batch_size, device=args.device,
            dtype=args.dtype, progress=False, overwrite=True, logits_chunk_tokens=chunk_tokens,
        )  # fmt: skip
        return {**dataclasses.asdict(opts), "out": str(out)}

    runs = {
        "teacher loaded, no forward": ("--_child-bare", {**common, "forward": False}),
        "bare forward (`Teacher.logits`)": ("--_child-bare", {**common, "forward": True}),
        "dump, chunked logits (default)": ("--_child-dump", dump_spec(0)),
        "dump, full logits (`logits_chunk_tokens=-1`)": ("--_child-dump", dump_spec(-1)),
    }
    results = {}
    for name, (flag, spec) in runs.items():
        print(f"[bench_dump] vocab {args.vocab:,} peak RSS: {name}", file=sys.stderr)
        shutil.rmtree(out, ignore_errors=True)
        results[name] = _in_child(flag, spec)
    shutil.rmtree(out, ignore_errors=True)
    mib = 2**20
    bare = results["bare forward (`Teacher.logits`)"]["vmhwm"]
    loaded = results["teacher loaded, no forward"]["vmhwm"]
    rows = [
        [name, f"{r['vmhwm'] / mib:,.0f}", f"{r['vmhwm'] / bare:.2f}",
         f"{(r['vmhwm'] - loaded) / mib:,.0f}", f"{r['wall']:.1f}", r.get("logits", "")]
        for name, r in results.items()
    ]  # fmt: skip
    table = markdown_table(
        ["process", "peak RSS MiB", "/ bare", "MiB over the loaded teacher",
         "s (bare: the forward; dump: the whole call)", "logits path"],
        rows,
    )  # fmt: skip
    ratio = results["dump, chunked logits (default)"]["vmhwm"] / bare
    full = results["dump, full logits (`logits_chunk_tokens=-1`)"]["vmhwm"] / bare
    logits_mib = args.batch_size * args.seq_len * args.vocab * 4 / mib
    info = machine()
    return "\n".join(
        [
            f"## bench_dump_vocab: peak RSS of a dump vs. a bare forward at vocabulary "
            f"{args.vocab:,}",
            "",
            f"- date: {now_utc()}",
            f"- command: `{command_line()}`",
            f"- machine: {info['cpu']}; {info['memory']}",
            f"- software: {info['software']}; logitcache at {git_revision()}",
            f"- teacher: GPT-2 2 x 64, vocabulary {args.vocab:,}, random-initialised "
            f"({args.dtype}, {args.device}); {args.rss_batches} batches of {args.batch_size} "
            f"sequences of {args.seq_len} random ids (one batch's float32 logits: "
            f"{logits_mib:,.0f} MiB); top-k {args.top_k}; each row a fresh process, peak RSS "
            "= its `VmHWM`",
            "",
            table,
            "",
            f"Target: the dump's peak RSS at most 0.6x the bare forward's: **{ratio:.2f}, "
            f"{'met' if ratio <= 0.6 else 'missed'}** (with every batch's full logits, as "
            f"before the chunked path: {full:.2f}).",
        ]
    )


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def rss_report(rss: dict[str, list[dict]], args: argparse.Namespace) -> list[str]:
    """The peak-RSS table and its verdict (no lines when no RSS runs were made)."""
    if not all(rss.values()):
        return []
    mib = 2**20
    peak = {label: statistics.median(r["vmhwm"] for r in runs) for label, runs in rss.items()}
    rows = [
        [
            label + (" (10x)" if label == "large" else ""),
            f"{runs[0]['tokens']:,}",
            str(runs[0]["parts"]),
            ", ".join(f"{r['vmhwm'] / mib:.1f}" for r in runs),
            f"{peak[label] / mib:.1f}",
            ", ".join(f"{r['wall']:.0f}" for r in runs),
        ]
        for label, runs in rss.items()
    ]
    table = markdown_table(
        ["dataset", "tokens", "parts", "peak RSS MiB, each run", "median", "dump s, each run"],
        rows,
    )
    growth = peak["large"] / peak["small"] - 1
    return [
        "",
        f"Peak RSS (VmHWM) of a dump in a fresh process, two datasets ten times apart (the "
        f"large one is the small one's documents ten times over), part_tokens="
        f"{args.rss_part_tokens}, {args.rss_runs} runs each, alternating:",
        "",
        table,
        "",
        f"Large vs. small median peak RSS: {growth:+.1%} (target: within 10%: "
        f"**{'met' if abs(growth) <= 0.10 else 'missed'}**).",
    ]


def teacher_training(args: argparse.Namespace) -> dict:
    """How the benchmark teacher was trained (the shape is reported on its own)."""
    _, kw = teacher_settings(args.quick, args.teacher_shape)
    return {key: value for key, value in kw.items() if key.startswith("train")}


def targets_path(device: str) -> str:
    """Which code computes the targets: torch's operators, or the C kernel and its threads."""
    from logitcache.dumping import native

    if not device.startswith("cpu") or not native.available():
        return "torch's operators"
    threads = "torch's OpenMP workers" if native.openmp() else "a thread pool"
    return f"the C kernel (logitcache.dumping.native) on {threads}"


def section(args: argparse.Namespace) -> str:
    """The RESULTS.md section: one per teacher shape."""
    return (
        "bench_dump" if args.teacher_shape == DEFAULT_SHAPE else f"bench_dump_{args.teacher_shape}"
    )


# --------------------------------------------------------------------------------------------
# What the targets cost next to the forward (--targets-cost)
# --------------------------------------------------------------------------------------------

#: The target kinds timed by --targets-cost: (name, `TargetSpec` fields).
TARGET_COSTS = (
    ("sample64 (the default)", {"kind": "sample", "k": 64, "samples": 64, "order": "id"}),
    ("sample16", {"kind": "sample", "k": 16, "samples": 16, "order": "id"}),
    ("topk32", {"kind": "topk", "k": 32, "order": "id"}),
    ("topk64", {"kind": "topk", "k": 64, "order": "id"}),
)


def targets_cost(args: argparse.Namespace) -> str:
    """CPU seconds, on one torch thread, of the teacher's forward and of each target kind's
    `device_targets` on the same batches: the share of a dump's device work that is not the
    forward, free of the writer, the disk and other processes' noise (the median per batch)."""
    import torch

    from logitcache.dumping import native, targets
    from logitcache.dumping.teacher import load_teacher

    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    teacher_dir = args.teacher_dir or ensure_teacher(args.quick, args.work, args.teacher_shape)
    corpus = args.work / f"corpus-targets-{'quick' if args.quick else 'full'}"
    tokens = args.batch_size * args.seq_len * args.cost_batches
    write_token_corpus(corpus, teacher_dir, tokens, split="heldout")
    teacher = load_teacher(str(teacher_dir), device="cpu")
    batches = bare_batches(corpus, teacher, args.seq_len, args.batch_size, args.part_tokens)
    batches = [b for b in batches if b.shape[0] == args.batch_size][: args.cost_batches]
    # each kind on both paths where the C kernels build: theirs, then torch's operators
    paths = ("C", "torch") if native.available() else ("torch",)
    specs = [(f"{name}, {path}", targets.TargetSpec(**fields), path)
             for name, fields in TARGET_COSTS for path in paths]  # fmt: skip
    times: dict[str, list[float]] = {"forward": []} | {name: [] for name, _, _ in specs}
    with torch.inference_mode():
        for rep in range(args.repeats + 1):  # the first pass warms up, untimed
            for i, ids in enumerate(batches):
                start = time.process_time()
                logits = teacher.logits(ids)
                spent = {"forward": time.process_time() - start}
                index = torch.arange(i * len(ids), (i + 1) * len(ids))
                for name, spec, path in specs:
                    with native.torch_operators() if path == "torch" else contextlib.nullcontext():
                        start = time.process_time()
                        targets.device_targets(logits, spec, index)
                        spent[name] = time.process_time() - start
                if rep:
                    for name, seconds in spent.items():
                        times[name].append(seconds)
    forward = statistics.median(times["forward"])
    rows = [["teacher forward (bare)", f"{forward * 1000:.1f}", "1.000", "-", "-"]]
    for name, _, path in specs:
        t = statistics.median(times[name])
        torch_t = statistics.median(times[name.replace(", C", ", torch")])
        rows.append([f"targets: {name}", f"{t * 1000:.1f}", f"{t / forward:.3f}",
                     f"{(forward + t) / forward:.3f}",
                     f"{torch_t / t:.2f}x" if path == "C" else "-"])  # fmt: skip
    table = markdown_table(
        ["work per batch", "CPU ms (median)", "/ forward", "forward + targets, / forward",
         "C speed-up"], rows,
    )  # fmt: skip
    vocab = teacher.info.vocab_size
    return f"""## What the targets cost next to the forward (`bench_dump.py --targets-cost`)

- Command: `{command_line()}`
- Date: {now_utc()}; revision {git_revision()}
- Machine: {", ".join(f"{k} {v}" for k, v in machine().items())}; load average {loadavg()}
- Teacher: `{teacher_dir}` (vocabulary {vocab:,}); {len(batches)} batches of
  {args.batch_size} x {args.seq_len} held-out tokens, {args.repeats} timed passes after a warm-up,
  one torch thread (CPU seconds are the work done).

{table}

*forward + targets* is what a dump's device thread does per batch against a bare forward,
before the writer (which runs beside it) and the disk: the floor of dump/bare on a CPU. *C* is
`logitcache.dumping.native` (what a CPU dump uses where a C compiler is found), *torch* the
same targets from torch's operators (`LOGITCACHE_NATIVE=0`, and every GPU).
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run, no RESULTS.md")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--dtype", default="float32", help="teacher dtype: float32, bfloat16, float16")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=None, help="default 512 (quick: 256)")
    p.add_argument("--batch-size", type=int, default=None, help="default 8 (--vocab-rss: 2)")
    p.add_argument(
        "--tokens", type=int, default=None, help="timed dataset (default 131072; quick 20000)"
    )
    p.add_argument(
        "--rss-tokens",
        type=int,
        default=None,
        help="small RSS dataset; the large one is 10x (default 40000; quick 12000)",
    )
    p.add_argument(
        "--rss-part-tokens",
        type=int,
        default=None,
        help="tokens per part of the RSS dumps (default 16384; quick 4096)",
    )
    p.add_argument(
        "--rss-runs", type=int, default=2, help="peak RSS runs per dataset size (0: skip)"
    )
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also split the dump's extra work: CPU seconds at one torch thread of dumps "
        "without the writer and without the log-softmax top-k, on the timed dataset",
    )
    p.add_argument(
        "--part-tokens",
        type=int,
        default=None,
        help="tokens per part for every dump (default 32768; quick 4096)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions (default 3)")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="before each timed run, wait up to this many seconds for other processes to "
        "leave the CPU alone (default 20; 0: do not wait)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's own choice); with 1, CPU seconds are "
        "the work done, free of spin-waiting, which is the steadier ratio on a busy machine",
    )
    p.add_argument(
        "--teacher-shape",
        default=DEFAULT_SHAPE,
        help=f"teacher LAYERSxWIDTH (default {DEFAULT_SHAPE}, the toy teacher); another shape "
        "writes its own RESULTS.md section, bench_dump_LAYERSxWIDTH",
    )
    p.add_argument(
        "--vocab-rss",
        action="store_true",
        help="only the peak RSS of a dump vs. a bare forward at a large vocabulary (see above; "
        "its own RESULTS.md section)",
    )
    p.add_argument(
        "--targets-cost",
        action="store_true",
        help="only the CPU seconds of the forward and of each target kind on the same batches "
        "(its own RESULTS.md section, bench_dump_targets)",
    )
    p.add_argument(
        "--teacher-dir", type=Path, default=None,
        help="--targets-cost: a finished teacher to time (default: this benchmark's own)",
    )  # fmt: skip
    p.add_argument("--cost-batches", type=int, default=8, help="--targets-cost batches")
    p.add_argument("--vocab", type=int, default=131072, help="--vocab-rss vocabulary")
    p.add_argument("--rss-batches", type=int, default=2, help="--vocab-rss batches (default 2)")
    p.add_argument("--work", type=Path, default=WORK, help="reusable work directory")
    p.add_argument("--no-results", action="store_true", help="do not write RESULTS.md")
    p.add_argument("--_child-dump", help=argparse.SUPPRESS)
    p.add_argument("--_child-bare", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    q = args.quick
    v = args.vocab_rss
    defaults = {
        "seq_len": 2048 if v else 256 if q else 512,
        "batch_size": 2 if v else 8,
        "tokens": 20_000 if q else 131_072,
        "rss_tokens": 12_000 if q else 40_000,
        "rss_part_tokens": 4096 if q else 16384,
        "part_tokens": 4096 if q else 32768,
        "repeats": 3,
    }
    return fill_defaults(args, defaults)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._child_dump:
        _child_dump(args._child_dump)
        return
    if args._child_bare:
        _child_bare(args._child_bare)
        return
    # the single measurements, each with its own section
    for wanted, measure, name in ((args.vocab_rss, vocab_rss, "bench_dump_vocab"),
                                  (args.targets_cost, targets_cost, "bench_dump_targets")):  # fmt: skip
        if wanted:
            report = measure(args)
            print(report)
            if not args.quick and not args.no_results:  # a smoke run leaves RESULTS.md alone
                update_results(name, report)
                print(f"[bench_dump] wrote its section of {RESULTS}", file=sys.stderr)
            return
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    started, command, load_start = now_utc(), command_line(), loadavg()
    t0 = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    teacher_dir = ensure_teacher(args.quick, args.work, args.teacher_shape)
    tag = "quick" if args.quick else "full"
    corpus = args.work / f"corpus-dump-{tag}"
    n_tokens = write_token_corpus(corpus, teacher_dir, args.tokens)
    small = args.work / f"corpus-rss-small-{tag}"
    large = args.work / f"corpus-rss-large-{tag}"
    write_token_corpus(small, teacher_dir, args.rss_tokens)
    repeat_corpus(small, large, 10)
    out = args.work / f"cache-dump-{tag}"

    from logitcache.dumping.teacher import load_teacher

    teacher = load_teacher(str(teacher_dir), device=args.device, dtype=args.dtype)
    batches = bare_batches(corpus, teacher, args.seq_len, args.batch_size, args.part_tokens)
    opts = dump_options(args, teacher_dir, corpus, out)
    print(
        f"[bench_dump] {n_tokens:,} tokens in {len(batches)} batches; warming up", file=sys.stderr
    )
    time_bare(teacher, batches[:2], args.device)
    warm = args.work / f"corpus-warmup-{tag}"
    write_token_corpus(warm, teacher_dir, 2 * args.batch_size * args.seq_len)
    time_dump(dump_options(args, teacher_dir, warm, args.work / f"cache-warmup-{tag}"))

    bare: list[Timing] = []
    steady: list[Timing] = []
    total: list[Timing] = []
    summary = None
    for rep in range(args.repeats):
        order = ("bare", "dump") if rep % 2 == 0 else ("dump", "bare")
        for which in order:
            waited = wait_until_quiet(args.quiet_wait) if args.quiet_wait > 0 else 0.0
            if which == "bare":
                bare.append(time_bare(teacher, batches, args.device))
            else:
                loop, whole, summary = time_dump(opts)
                steady.append(loop)
                total.append(whole)
            print(
                f"[bench_dump] rep {rep + 1}/{args.repeats} {which}: "
                + (
                    f"{bare[-1].wall:.2f} s, others {bare[-1].others:.0%}"
                    if which == "bare"
                    else f"loop {steady[-1].wall:.2f} s, total {total[-1].wall:.2f} s, "
                    f"others {steady[-1].others:.0%}"
                )
                + f" (waited {waited:.0f} s for a quiet machine)",
                file=sys.stderr,
            )
    assert summary is not None
    sizes = disk_breakdown(out)
    bytes_on_disk = sum(sizes.values())
    tokens = summary.manifest.tokens

    rss_args = argparse.Namespace(**{**vars(args), "part_tokens": args.rss_part_tokens})
    rss: dict[str, list[dict]] = {"small": [], "large": []}
    for run in range(args.rss_runs):
        for label, corpus_dir in (("small", small), ("large", large)):
            print(f"[bench_dump] peak RSS: {label} dataset, run {run + 1}", file=sys.stderr)
            opts_rss = dump_options(rss_args, teacher_dir, corpus_dir, args.work / "cache-rss")
            rss[label].append(rss_of_dump(opts_rss))
    split = breakdown(args, teacher, teacher_dir, corpus) if args.breakdown else None
    finished, load_end = now_utc(), loadavg()
    shutil.rmtree(args.work / f"cache-warmup-{tag}", ignore_errors=True)

    def med(xs: list[Timing], attr: str) -> float:
        return statistics.median(getattr(x, attr) for x in xs)

    def each(xs: list[Timing], attr: str) -> str:
        return ", ".join(f"{getattr(x, attr):.2f}" for x in xs)

    b_wall, s_wall, t_wall = med(bare, "wall"), med(steady, "wall"), med(total, "wall")
    b_cpu, s_cpu, t_cpu = med(bare, "cpu"), med(steady, "cpu"), med(total, "cpu")

    def others(xs: list[Timing]) -> str:
        return ", ".join(f"{x.others:.0%}" for x in xs)

    timing_rows = [
        ["bare forward", f"{b_wall:.2f}", each(bare, "wall"), f"{tokens / b_wall:,.0f}",
         "1.000", f"{b_cpu:.2f}", "1.000", others(bare)],
        ["dump, steady state (`run`)", f"{s_wall:.2f}", each(steady, "wall"),
         f"{tokens / s_wall:,.0f}", f"**{s_wall / b_wall:.3f}**", f"{s_cpu:.2f}",
         f"{s_cpu / b_cpu:.3f}", others(steady)],
        ["dump, total (`dump()`)", f"{t_wall:.2f}", each(total, "wall"),
         f"{tokens / t_wall:,.0f}", f"{t_wall / b_wall:.3f}", f"{t_cpu:.2f}",
         f"{t_cpu / b_cpu:.3f}", others(total)],
    ]  # fmt: skip
    timing = markdown_table(
        ["", "wall s (median)", f"wall s (all {args.repeats})", "tokens/s", "wall / bare",
         "CPU s (median)", "CPU / bare", "other processes' CPU share, each run"],
        timing_rows,
    )  # fmt: skip
    size_rows = [
        [name, f"{size:,}", f"{size / tokens:.2f}"]
        for name, size in sorted(sizes.items(), key=lambda kv: -kv[1])
    ]
    size_rows.append(["**total**", f"**{bytes_on_disk:,}**", f"**{bytes_on_disk / tokens:.2f}**"])
    size_table = markdown_table(["on disk", "bytes", "bytes/token"], size_rows)
    ratio = s_wall / b_wall
    pairs = [d.wall / b.wall for d, b in zip(steady, bare, strict=True)]
    pair_cpu = [d.cpu / b.cpu for d, b in zip(steady, bare, strict=True)]
    info = machine()
    settings = (
        f"teacher: GPT-2 {teacher.info.vocab_size} vocab, {args.teacher_shape}, "
        f"{teacher_training(args)}"
        f" ({teacher.info.dtype}, {args.device}); k={args.top_k}, seq_len={args.seq_len}, "
        f"batch={args.batch_size}, part_tokens={args.part_tokens}, codec "
        f"{summary.manifest.codec.name}/{summary.manifest.codec.cname} level "
        f"{summary.manifest.codec.clevel} {summary.manifest.codec.shuffle}, chunk "
        f"{summary.manifest.layout.chunk_bytes:,} B, log-probs {summary.manifest.targets.logprob_dtype}"
        f"; {summary.logits}; targets by {targets_path(args.device)}"
    )
    lines = [
        f"## {section(args)}: dump vs. bare teacher forward ({args.teacher_shape} teacher)",
        "",
        f"- date: {started} to {finished}",
        f"- command: `{command}`",
        f"- machine: {info['cpu']}; {info['memory']}"
        + (f"; GPU {info['gpu']}" if "gpu" in info else ""),
        f"- software: {info['software']}; logitcache at {git_revision()}",
        f"- load average (1/5/15 min) at start: {load_start}; at end: {load_end}",
        f"- {settings}",
        f"- timed dataset: {tokens:,} tokens ({len(batches)} batches, "
        f"{len(summary.manifest.parts)} parts) of stdlib text; {args.repeats} repetitions, "
        "alternating bare/dump, after an untimed warm-up of both; before each run the "
        f"script waited up to {args.quiet_wait:.0f} s for other processes to leave the CPU "
        "(under 10% for 3 s)",
        "",
        "Wall and CPU seconds (CPU = `time.process_time`, every thread of the process); the "
        "last column is the share of the machine's CPU time that other processes used during "
        "each run (from /proc/stat), i.e. how clean the run was. "
        "*bare* = `Teacher.logits(ids)` over the same batches, nothing else; *steady state* = "
        "`logitcache.dumping.pipeline.run` (tokenize, forward, log-softmax top-k, assemble, compress, "
        "checksum, commit; writer thread joined); *total* = the whole `dump()` call (adds "
        "teacher load with weight hashing, data fingerprint, sizing the output).",
        "",
        timing,
        "",
        f"Target dump/bare <= 1.05 (steady state, ratio of the medians): **{ratio:.3f}, "
        f"{'met' if ratio <= 1.05 else 'missed'}**. Per repetition (each dump over the bare "
        f"run next to it): wall {', '.join(f'{x:.3f}' for x in pairs)}; CPU "
        f"{', '.join(f'{x:.3f}' for x in pair_cpu)}.",
        "",
        f"Cache size of the timed dump ({tokens:,} tokens, k={args.top_k}):",
        "",
        size_table,
        *rss_report(rss, args),
    ]
    if split is not None:
        lines += [
            "",
            f"Where the extra work goes (`--breakdown`): CPU seconds with one torch thread (no "
            f"spin-waiting, so the steadiest measure on a busy machine) over the timed dataset "
            f"(padded batches: {split[1]:,} positions), {args.repeats} runs each, rotating. "
            "*without the writer*: batches are dropped instead of assembled, compressed and "
            "committed; *without log-softmax top-k*: the targets of one position per row are "
            "computed and repeated along the row.",
            "",
            split[0],
        ]
    report = "\n".join(lines)
    print(report)
    print(f"\n[bench_dump] done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if not args.quick and not args.no_results:
        update_results(section(args), report)
        print(f"[bench_dump] wrote its section of {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
