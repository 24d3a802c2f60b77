"""Benchmark a dump split over processes: 1 process against 2 under torchrun, on this machine.

    python benchmarks/bench_scale.py             # default run (~10 min on 2 CPU cores)
    python benchmarks/bench_scale.py --quick     # smoke run, no RESULTS.md

What it runs, each as a fresh command (interpreter start-up, teacher load, dump, commit), the
same data and settings every time, alternating the order over repetitions:

* ``logitcache dump`` in 1 process with 1 intra-op thread (OMP_NUM_THREADS=1);
* ``logitcache dump`` in 1 process with as many threads as usable cores (torch's default);
* ``torchrun --nproc-per-node 2 -m logitcache dump`` (gloo), 1 thread per process.

For each: the command's wall time, the dump's own tokens/s (as it prints it: from the start of
`dump()` to the commit, so without interpreter start-up), the CPU seconds and the peak RSS
(``VmHWM``, polled from /proc every 0.1 s) of every process, and the cache is checked to be
byte for byte the 1-process one. Then the cache layout is measured (files per part, manifest
bytes per part) and projected to a billion tokens at the default part size.

Full runs (not ``--quick``) write their section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

DEFAULT_PART_TOKENS = 1 << 20  # logitcache dump's default --part-tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run, no RESULTS.md")
    p.add_argument("--tokens", type=int, default=None, help="dataset size [80000; quick 4000]")
    p.add_argument("--repeats", type=int, default=None, help="runs of each setup [2; quick 1]")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--part-tokens", type=int, default=4096)
    args = p.parse_args(argv)
    args.tokens = args.tokens or (4000 if args.quick else 80000)
    args.repeats = args.repeats or (1 if args.quick else 2)
    return args


def _status(pid: int) -> dict[str, int]:
    """VmHWM (bytes) and CPU seconds (user + system, in ticks) of a live process."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out["hwm"] = int(line.split()[1]) * 1024
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        out["ticks"] = int(fields[11]) + int(fields[12])
        out["cmd"] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, ValueError, IndexError):
        return {}
    return out


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    kids = [int(x) for x in text.split()]
    return kids + [g for k in kids for g in _children(k)]


def run_measured(command: list[str], env: dict[str, str]) -> dict:
    """Run `command`; its wall time, output, and per-process peak RSS and CPU seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip
    seen: dict[int, dict] = {}
    while proc.poll() is None:
        for pid in [proc.pid, *_children(proc.pid)]:
            status = _status(pid)
            if status:
                seen[pid] = {**seen.get(pid, {}), **status}
        time.sleep(0.1)
    wall = time.perf_counter() - start
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.stderr.write(err)
        raise SystemExit(f"{' '.join(command)} exited {proc.returncode}")
    tick = os.sysconf("SC_CLK_TCK")
    workers = [s for s in seen.values() if "torch.distributed.run" not in s.get("cmd", "")]
    launcher = [s for s in seen.values() if "torch.distributed.run" in s.get("cmd", "")]
    rate = re.search(r"\(([\d,]+) tokens/s\)", out)
    return {
        "wall": wall,
        "rate": int(rate.group(1).replace(",", "")) if rate else None,
        "workers": [{"hwm": s["hwm"], "cpu": s["ticks"] / tick} for s in workers],
        "launcher": [{"hwm": s["hwm"], "cpu": s["ticks"] / tick} for s in launcher],
        "stdout": out.strip(),
    }


def dump_args(args, teacher: Path, corpus: Path, out: Path) -> list[str]:
    return ["dump", "--teacher", str(teacher), "--data", str(corpus), "--out", str(out),
            "--targets", "topk", "--top-k", str(args.top_k), "--seq-len", str(args.seq_len),
            "--batch-size", str(args.batch_size), "--part-tokens", str(args.part_tokens),
            "--device", "cpu", "--no-progress"]  # fmt: skip


def same_files(a: Path, b: Path) -> bool:
    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes()
                for p in sorted((root / "parts").rglob("*")) if p.is_file()}  # fmt: skip

    ma, mb = (json.loads((r / "manifest.json").read_text()) for r in (a, b))
    ma.pop("created"), mb.pop("created")
    return ma == mb and files(a) == files(b)


def layout(cache: Path) -> dict:
    """Files per part, manifest bytes per part entry (as measured, and as the same manifest
    would be with one Parquet file per part), the fixed header, bytes per token."""
    manifest_text = (cache / "manifest.json").read_text()
    m = json.loads(manifest_text)
    parts = m["parts"]

    def size(doc: dict) -> int:  # the manifest's own formatting (2-space indented JSON)
        return len((json.dumps(doc, indent=2) + "\n").encode())

    header = size({**m, "parts": []})
    as_parquet = [{**p, "files": {f"{p['name']}.parquet": "0" * 64}} for p in parts]
    return {
        "parts": len(parts),
        "files_per_part": statistics.mean(len(p["files"]) for p in parts),
        "manifest_bytes": len(manifest_text.encode()),
        "emulated_bytes": size(m),
        "header_bytes": header,
        "entry_bytes": (size(m) - header) / max(1, len(parts)),
        "parquet_entry_bytes": (size({**m, "parts": as_parquet}) - header) / max(1, len(parts)),
        "bytes_per_token": sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
        / max(1, m["tokens"]),
        "tokens": m["tokens"],
    }


def counting_rate(teacher: Path, corpus: Path, seq_len: int) -> tuple[float, int]:
    """Tokens/s of the counting pass every shard makes (tokenize everything, count sequences),
    one thread, in this process; and the sequences counted."""
    import torch
    from transformers import AutoTokenizer

    from logitcache.dumping import data

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    source = data.resolve(str(corpus), "auto", None, None)
    docs = list(data.iter_documents(source))
    start = time.perf_counter()
    lengths = [len(ids) + 1 for ids in data.tokenize(iter(docs), tokenizer, False)]
    seconds = time.perf_counter() - start
    docs = iter([[0] * (n - 1) for n in lengths])
    count = data.count_sequences(docs, seq_len, tokenizer.eos_token_id, True)
    return sum(lengths) / seconds, count


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = common.now_utc()
    load_start = common.loadavg()
    info = common.machine()
    work = common.WORK / ("scale-quick" if args.quick else "scale")
    work.mkdir(parents=True, exist_ok=True)
    teacher = common.ensure_teacher(args.quick, common.WORK)
    corpus = work / "corpus"
    tokens = common.write_token_corpus(corpus, teacher, args.tokens)
    cores = len(os.sched_getaffinity(0))
    base_env = dict(os.environ)
    base_env.update(PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    base_env.pop("LOGITCACHE_FAULTS", None)
    one_thread = {**base_env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    all_threads = {k: v for k, v in base_env.items() if k not in ("OMP_NUM_THREADS",
                                                                   "MKL_NUM_THREADS")}  # fmt: skip
    py = [sys.executable, "-m"]
    torchrun = [*py, "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m"]
    setups = {
        "1 process, 1 thread": ([*py, "logitcache"], one_thread),
        f"1 process, {cores} threads": ([*py, "logitcache"], all_threads),
        "2 processes (torchrun), 1 thread each": ([*torchrun, "logitcache"], one_thread),
    }
    results: dict[str, list[dict]] = {name: [] for name in setups}
    reference = None
    for rep in range(args.repeats):
        order = list(setups) if rep % 2 == 0 else list(reversed(setups))
        for name in order:
            launcher, env = setups[name]
            out = work / f"cache-{len(results[name])}-{abs(hash(name)) % 10**6}"
            shutil.rmtree(out, ignore_errors=True)
            load = common.loadavg().split()[0]
            r = run_measured([*launcher, *dump_args(args, teacher, corpus, out)], env)
            r["load"] = load
            if reference is None:
                reference = work / "reference"
                shutil.rmtree(reference, ignore_errors=True)
                shutil.copytree(out, reference)
            r["identical"] = same_files(out, reference)
            results[name].append(r)
            print(f"{name}: {r['wall']:.1f} s, {r['rate']} tokens/s, "
                  f"identical={r['identical']}", flush=True)  # fmt: skip
            if name != "1 process, 1 thread" or rep < args.repeats - 1:
                shutil.rmtree(out, ignore_errors=True)
    lay = layout(reference)
    count_rate, _ = counting_rate(teacher, corpus, args.seq_len)
    finished = common.now_utc()
    load_end = common.loadavg()

    # ---- report --------------------------------------------------------------------------------
    base = int(statistics.median(r["rate"] for r in results["1 process, 1 thread"]))
    rows = []
    for name, runs in results.items():
        rate = int(statistics.median(r["rate"] for r in runs))
        wall = statistics.median(r["wall"] for r in runs)
        hwm = max(w["hwm"] for r in runs for w in r["workers"])
        cpu = statistics.median(sum(w["cpu"] for w in r["workers"]) for r in runs)
        launcher = max((w["hwm"] for r in runs for w in r["launcher"]), default=0)
        rows.append([
            name, f"{wall:.1f}", " / ".join(f"{r['wall']:.1f}" for r in runs), f"{rate:,}",
            f"{rate / base:.2f}", f"{cpu:.1f}", f"{tokens / cpu:,.0f}",
            mib(hwm) + (f" (launcher {mib(launcher)})" if launcher else ""),
            " / ".join(r["load"] for r in runs),
            "yes" if all(r["identical"] for r in runs) else "**NO**",
        ])  # fmt: skip
    table = common.markdown_table(
        ["setup", "wall s (median)", "wall s (all)", "dump tokens/s (median)",
         "vs 1 process, 1 thread", "CPU s, all processes (median)", "tokens per CPU s",
         "peak RSS per process, MiB (max)", "load avg at start (each run)", "cache identical"],
        rows,
    )  # fmt: skip
    parts_per_b = 1e9 / DEFAULT_PART_TOKENS
    files_per_b = parts_per_b * lay["files_per_part"] + 2  # + manifest.json and README.md
    manifest_per_b = lay["header_bytes"] + parts_per_b * lay["entry_bytes"]
    parquet_manifest_per_b = lay["header_bytes"] + parts_per_b * lay["parquet_entry_bytes"]
    assert abs(lay["emulated_bytes"] - lay["manifest_bytes"]) < 64, lay  # same formatting
    body = f"""
## bench_scale: one dump over 1 and 2 processes (`bench_scale.py`)

- date: {started} to {finished} (`date -u` at the end: {time.strftime("%a %b %d %H:%M:%S UTC %Y", time.gmtime())})
- command: `{common.command_line()}`
- machine: {info["cpu"]}; {info["memory"]}
- software: {info["software"]}
- load average (1/5/15 min) at start: {load_start}; at end: {load_end} (the machine is shared:
  other processes compete for the same cores, so compare CPU seconds as well as wall time)
- teacher: toy GPT-2 8192 vocab, 4x256 (float32, cpu); k={args.top_k}, seq_len={args.seq_len},
  batch={args.batch_size}, part_tokens={args.part_tokens}; data: {tokens:,} tokens of stdlib
  text ({lay["parts"]} parts); {args.repeats} runs of each setup, order alternating

Each run is a fresh command: interpreter start-up, teacher load, data fingerprint, dump, commit
(under torchrun: each rank writes its own cache under `OUT/ranks/`, rank 0 joins them with hard
links and commits one manifest). *dump tokens/s* is what the dump prints (from the start of
`dump()` to the final commit); *wall* includes the interpreter start-up. Every cache was checked
to be byte for byte the same as the first 1-process one. *CPU s* adds every process of the
command (user + system, torchrun's launcher excluded): unlike wall time it does not depend on
how many cores other work leaves free, so *tokens per CPU s* compares the setups' overheads
(two interpreters, two teacher loads, the counting pass and the join for torchrun) on a busy
machine.

{table}

Layout measured on the cache above (zarr): {lay["files_per_part"]:.0f} files per part,
{lay["entry_bytes"]:,.0f} manifest bytes per part entry, {lay["header_bytes"]:,} bytes of
manifest header, {lay["bytes_per_token"]:.1f} bytes/token on disk (k={args.top_k}). Projected to
10^9 tokens at the default `--part-tokens` {DEFAULT_PART_TOKENS:,} ({parts_per_b:,.0f} parts):

| per 10^9 tokens | zarr (default) | parquet |
|---|---|---|
| files | {files_per_b:,.0f} | {parts_per_b + 2:,.0f} |
| manifest.json | {manifest_per_b / 2**20:.2f} MiB | {parquet_manifest_per_b / 2**20:.2f} MiB |
| data on disk | {lay["bytes_per_token"] * 1e9 / 2**30:,.0f} GiB | about the same |

Counting pass (every `--shard` job, and rank 0 of a torchrun dump, tokenizes the whole data once
to count its parts; then each shard tokenizes the data again up to the end of its own slice):
{count_rate:,.0f} tokens/s with the fast tokenizer on one thread of this machine, against
{base:,} tokens/s for the 1-thread dump itself.

While a torchrun dump runs, each rank's cache adds its own `manifest.json` (listing only its
parts), a lock file and, at its end, a `README.md` card, under `OUT/ranks/`: N extra small files
and, all ranks together, one more manifest's worth of bytes; the join adds hard links, not data,
and removes `OUT/ranks/`.
"""
    print(body)
    if not args.quick:
        common.update_results("bench_scale", body)
        print(f"wrote the bench_scale section of {common.RESULTS}")


if __name__ == "__main__":
    main()
