"""The GPU job: a real-shape teacher's dump against its bare forward, and the fused loss, on CUDA.

    python benchmarks/bench_gpu.py                # on a GPU machine: ~5 minutes on an H200
    python benchmarks/bench_gpu.py --tiny --device cpu --no-results   # a smoke run anywhere

Made to run as one short job when a GPU machine is lent (benchmarks/gpu_job.sh installs what
that machine lacks and runs this). Nothing is downloaded: the teacher is a Llama-style model
built from a config and initialised at random (`--shape 1b`: hidden 2048, 16 layers, 32 heads
of which 8 key/value, MLP 8192, vocabulary 128,256, about 1.24e9 parameters, the shape of
Llama 3.2 1B), saved with `save_pretrained` and loaded by the dump through `from_pretrained` as
a user's teacher is; the data are random ids (`.npy`), so the timing is the model's, not a
tokenizer's. Random weights give near-uniform logits, which cost the top-k and the sampling the
same as peaked ones (both read every logit), so speed and memory are representative; the
targets' quality is not measured here (bench_fidelity does that).

What it measures, in one process and on the same batches:

* **bare**: `Teacher.logits(ids)` over every batch, the forward and nothing else (a
  synchronisation at the end); its peak device memory above the weights.
* **dump**: `logitcache.dumping.pipeline.run` on the same data (targets on the device, copies
  to pinned host memory, compression and commits on the writer thread and pool), with
  `--profile`, whose device rows (CUDA events) say how long the GPU itself worked per stage.
  Both the default sampled targets (64 draws) and top-k 32 are timed.
* bare and dump alternate, `--repeats` times after a warm-up; medians and every value.
* **the trainer**: `bench_trainer.py --fused-worker` in fresh processes, unfused and fused,
  in bfloat16 autocast at the teacher's vocabulary: step time and the allocator's peak.

Writes section `bench_gpu` of benchmarks/RESULTS.md (unless --no-results) and, with `--json`,
every figure to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_dump import bare_batches, time_bare, time_dump
from common import (
    WORK,
    command_line,
    fill_defaults,
    git_revision,
    machine,
    markdown_table,
    now_utc,
    update_results,
)

HERE = Path(__file__).resolve().parent

#: Llama-style shapes (hidden, layers, heads, key/value heads, MLP, vocabulary).
SHAPES = {
    "1b": (2048, 16, 32, 8, 8192, 128_256),  # Llama 3.2 1B's shape
    "tiny": (64, 2, 4, 2, 128, 4096),  # a smoke run on any machine
}

#: The dumps timed: (name, DumpOptions fields).
TARGETS = (
    ("sample64 (default)", {"targets": "sample", "samples": 64}),
    ("topk32", {"targets": "topk", "top_k": 32}),
)


def llama_teacher(work: Path, shape: str, positions: int) -> Path:
    """A random-initialised Llama-style model of `shape` and a word-level tokenizer, saved once
    under `work` (its ids are a subset of the model's: the data are ids, not text)."""
    out = work / f"llama-{shape}-{positions}"
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    hidden, layers, heads, kv_heads, mlp, vocab = SHAPES[shape]
    config = LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=mlp, vocab_size=vocab,
        max_position_embeddings=positions, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).eval().save_pretrained(out)
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="w1", unk_token="w0")
    tok.save_pretrained(out)
    return out


def random_ids(work: Path, rows: int, seq_len: int, vocab: int) -> Path:
    """`rows` documents of seq_len - 1 random ids (packing adds the EOS): one sequence each."""
    import numpy as np

    path = work / f"ids-{rows}x{seq_len}-v{vocab}.npy"
    if not path.exists():
        np.save(path, np.random.default_rng(0).integers(2, vocab, size=(rows, seq_len - 1)))
    return path


def _peak_start(on_cuda: bool) -> int:
    import torch

    if not on_cuda:
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _peak_above(base: int, on_cuda: bool) -> int:
    import torch

    return torch.cuda.max_memory_allocated() - base if on_cuda else 0


def time_bare_on_device(teacher, batches: list, device: str) -> tuple[float, int]:
    """bench_dump's bare forward over `batches`: wall seconds, and the peak device memory above
    the start."""
    on_cuda = device.startswith("cuda")
    base = _peak_start(on_cuda)
    wall = time_bare(teacher, batches, device).wall
    return wall, _peak_above(base, on_cuda)


def time_dump_on_device(opts, weights: int, on_cuda: bool) -> tuple[float, int, dict]:
    """One dump's loop: wall seconds, peak device memory above the start less the `weights`
    of the dump's own copy of the teacher, and its --profile report."""
    base = _peak_start(on_cuda)
    loop, _, summary = time_dump(opts)
    return loop.wall, max(0, _peak_above(base, on_cuda) - weights), summary.profile


def dump_vs_bare(args: argparse.Namespace, teacher_dir: Path, data: Path) -> list[dict]:
    """Per target kind: bare and dump timings (alternating), tokens/s, device memory, profile."""
    import torch

    from logitcache.dumping.options import DumpOptions
    from logitcache.dumping.prepare import prepare

    on_cuda = args.device.startswith("cuda")
    results = []
    for name, fields in TARGETS:
        opts = DumpOptions(
            data=str(data), out=args.work / "cache-gpu", teacher=str(teacher_dir),
            device=args.device, dtype=args.dtype, seq_len=args.seq_len,
            batch_size=args.batch_size, part_tokens=args.part_tokens, progress=False,
            overwrite=True, profile=True, **fields,
        )  # fmt: skip
        job = prepare(opts)  # the bare side's teacher, loaded once
        batches = bare_batches(data, job.teacher, args.seq_len, args.batch_size, args.part_tokens)
        tokens = sum(int(b.numel()) for b in batches)

        weights = sum(p.numel() * p.element_size() for p in job.teacher.model.parameters())

        time_bare_on_device(
            job.teacher, batches, args.device
        )  # warm-up: kernels chosen, caches filled
        time_dump_on_device(opts, weights, on_cuda)
        bares, dumps, peaks, profiles = [], [], {"bare": [], "dump": []}, []
        for rep in range(args.repeats):
            order = ("bare", "dump") if rep % 2 == 0 else ("dump", "bare")
            for side in order:
                if side == "bare":
                    wall, peak = time_bare_on_device(job.teacher, batches, args.device)
                    bares.append(wall)
                else:
                    wall, peak, profile = time_dump_on_device(opts, weights, on_cuda)
                    dumps.append(wall)
                    profiles.append(profile)
                peaks[side].append(peak)
            print(f"[bench_gpu] {name} {rep + 1}/{args.repeats}: bare {bares[-1]:.2f} s, "
                  f"dump {dumps[-1]:.2f} s", file=sys.stderr, flush=True)  # fmt: skip
        results.append({
            "targets": name, "tokens": tokens, "bare_s": bares, "dump_s": dumps,
            "ratio": statistics.median(dumps) / statistics.median(bares),
            "bare_tok_s": tokens / statistics.median(bares),
            "dump_tok_s": tokens / statistics.median(dumps),
            "bare_peak_bytes": max(peaks["bare"]), "dump_peak_bytes": max(peaks["dump"]),
            "profile": profiles[-1],
        })  # fmt: skip
        if on_cuda:
            torch.cuda.empty_cache()
    return results


def fused_vs_unfused(args: argparse.Namespace, vocab: int) -> dict[str, dict]:
    """bench_trainer's --fused workers, each in a fresh process, on this device."""
    got = {}
    for variant in ("unfused", "fused"):
        command = [sys.executable, str(HERE / "bench_trainer.py"), "--fused-worker", variant,
                   "--device", args.device, "--precision", args.precision, "--vocab", str(vocab),
                   "--batch-size", str(args.train_batch), "--seq-len", str(args.train_seq),
                   "--top-k", "32", "--fused-steps", str(args.train_steps)]  # fmt: skip
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"the {variant} worker failed:\n{proc.stderr[-4000:]}")
        got[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    return got


def report(args, dumps: list[dict], fused: dict[str, dict], device_name: str) -> str:
    gib = 2.0**30
    rows = []
    for r in dumps:
        device = {s["stage"]: s["seconds"] for s in r["profile"]["stages"]
                  if s["thread"] == "device"}  # fmt: skip
        queue = next(s["seconds"] for s in r["profile"]["stages"] if s["stage"] == "queue full")
        rows.append([
            r["targets"], f"{r['bare_tok_s']:,.0f}", f"{r['dump_tok_s']:,.0f}",
            f"**{r['ratio']:.3f}**", f"{r['bare_peak_bytes'] / gib:.2f}",
            f"{r['dump_peak_bytes'] / gib:.2f}",
            " / ".join(f"{device.get(n, 0):.2f}" for n in ("forward", "targets", "to host")),
            f"{queue:.2f}",
        ])  # fmt: skip
    table = markdown_table(
        ["targets", "bare tok/s", "dump tok/s", "dump/bare (median)",
         "bare peak above weights (GiB)", "dump peak above weights (GiB)",
         "device s: forward / targets / to host (last dump)", "queue full s"],
        rows,
    )  # fmt: skip

    def step(r) -> float:
        return statistics.median(r["times"][1:] or r["times"])

    un, fu = fused["unfused"], fused["fused"]
    peak = "gpu_peak" if un.get("gpu_peak") else "peak"
    train = markdown_table(
        ["loss", "step (s, median)", "peak memory (GiB)", "loss after the steps"],
        [["unfused", f"{step(un):.3f}", f"{un[peak] / gib:.2f}", f"{un['losses'][-1]:.4f}"],
         ["fused (--fused-loss)", f"{step(fu):.3f}", f"{fu[peak] / gib:.2f}",
          f"{fu['losses'][-1]:.4f}"]],
    )  # fmt: skip
    hidden, layers, heads, kv, mlp, vocab = SHAPES[args.shape]
    info = {**machine(), "device": device_name}
    return f"""## The GPU job (`bench_gpu.py`)

- Command: `{command_line()}`
- Date: {now_utc()}; revision {git_revision()}
- Machine: {", ".join(f"{k} {v}" for k, v in info.items())}
- Teacher: Llama-style, random weights (speed and memory only), hidden {hidden}, {layers} layers,
  {heads} heads ({kv} key/value), MLP {mlp}, vocabulary {vocab:,}, {args.dtype}; batches of
  {args.batch_size} x {args.seq_len} random ids, {dumps[0]["tokens"]:,} tokens per pass,
  {args.repeats} alternating repetitions after a warm-up.

{table}

The device columns are the GPU's own time per stage from CUDA events (`dump --profile`); "queue
full" is how long the teacher thread waited for the writer (0: the device never waited for the
host).

Trainer, precision {args.precision}, vocabulary {vocab:,}, batch {args.train_batch} x {args.train_seq},
top-32 targets, {args.train_steps} steps (the first dropped from the median):

{train}
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tiny", action="store_true", help="the tiny shape and small sizes: a smoke run"
    )
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default 1b (tiny: tiny)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--precision", default="bf16", help="the trainer workers' precision")
    p.add_argument("--seq-len", type=int, default=None, help="default 4096 (tiny: 64)")
    p.add_argument("--batch-size", type=int, default=None, help="default 4 (tiny: 2)")
    p.add_argument("--sequences", type=int, default=None, help="default 256 (tiny: 8)")
    p.add_argument("--part-tokens", type=int, default=None, help="default 262144 (tiny: 256)")
    p.add_argument("--repeats", type=int, default=None, help="default 3 (tiny: 1)")
    p.add_argument("--train-batch", type=int, default=None, help="default 4 (tiny: 2)")
    p.add_argument("--train-seq", type=int, default=None, help="default 2048 (tiny: 32)")
    p.add_argument("--train-steps", type=int, default=None, help="default 6 (tiny: 2)")
    p.add_argument("--work", type=Path, default=WORK / "gpu")
    p.add_argument("--json", type=Path, default=None, help="also write every figure here")
    p.add_argument("--no-results", action="store_true", help="do not write RESULTS.md")
    args = p.parse_args(argv)
    tiny = args.tiny
    defaults = {
        "shape": "tiny" if tiny else "1b", "seq_len": 64 if tiny else 4096,
        "batch_size": 2 if tiny else 4, "sequences": 8 if tiny else 256,
        "part_tokens": 256 if tiny else 262_144, "repeats": 1 if tiny else 3,
        "train_batch": 2 if tiny else 4, "train_seq": 32 if tiny else 2048,
        "train_steps": 2 if tiny else 6,
    }  # fmt: skip
    return fill_defaults(args, defaults)


def main(argv: list[str] | None = None) -> None:
    import torch

    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    on_cuda = args.device.startswith("cuda")
    device_name = torch.cuda.get_device_name() if on_cuda else "cpu"
    vocab = SHAPES[args.shape][-1]
    teacher_dir = llama_teacher(args.work, args.shape, args.seq_len)
    data = random_ids(args.work, args.sequences, args.seq_len, vocab)
    dumps = dump_vs_bare(args, teacher_dir, data)
    fused = fused_vs_unfused(args, vocab)
    body = report(args, dumps, fused, device_name)
    print(body)
    if args.json is not None:
        args.json.write_text(json.dumps({"dumps": dumps, "fused": fused}, indent=1) + "\n")
    if not args.no_results:
        update_results("bench_gpu", body)
    print(f"[bench_gpu] done in {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
