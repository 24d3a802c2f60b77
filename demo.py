"""Offline knowledge distillation end to end, on CPU, with nothing downloaded.

    python demo.py            # about 8 minutes on 2 idle CPU cores (teacher build included)
    python demo.py --quick    # a ~1 minute smoke run (tiny teacher and student)

The setting is the classic case where soft targets pay: *data efficiency*. The teacher is
trained on much more text than the students see; each student gets only a small slice of the
training text, for several epochs. Trained on hard labels, a student learns only what the slice
shows, one token per position; distilled, it also learns the teacher's whole next-token
distribution at every position, which carries what the teacher learned from the rest of the text.

1. builds the embedded default teacher if missing (a GPT-2 and a byte-level BPE tokenizer,
   trained locally on the Python standard library's training split, a fixed number of steps
   with a cosine schedule; reused on later runs);
2. writes the students' training slice (a few stdlib training files) and a held-out corpus
   (stdlib files that no model trains on: the split is by file);
3. `logitcache dump`: runs the teacher once over each: sampled targets (64 draws per position)
   for training, the exact top-64 log-probs for evaluation;
4. `trainer fit` twice from the training cache, same student init, data order and steps:
   distilled (alpha 0.5) and hard labels only (alpha 1);
5. `trainer eval` of the teacher and both students on the held-out cache, and the table.

Everything lands in --out (default demo-out/): teacher/, data/, cache/, heldout-cache/, runs/,
and results.json (settings, phase times, the table).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

#: Settings of the full demo and of --quick. `teacher` goes to `logitcache.testing.toy.ensure_teacher`
#: (with `teacher_steps` as its `train_steps`; `files_limit` keeps that many training files
#: instead of all), `student` to `toy.build_student_config`. Chosen by reasoning about the
#: setting and the time budget, never against the held-out files:
#: - teacher: 3x192 rather than the 4x256 default, since at this compute (~1e13 FLOPs) a smaller
#:   model that sees more tokens is the better teacher, and it forwards twice as fast; 600 steps
#:   of 8 x 256 tokens (1.2M tokens drawn from all 698 training files, ~40% of the split) with a
#:   cosine schedule so it ends annealed; a step count, not a time budget, so a busy machine
#:   builds the same teacher (only later);
#: - students: 100 training files cut at 8000 bytes (~150k tokens, 5% of the split, an eighth of
#:   what the teacher saw), 4 epochs: data-limited.
PRESETS = {
    "full": {
        "teacher_dir": "teacher",
        "teacher": {"n_layer": 3, "n_embd": 192, "n_head": 4, "seq_len": 256, "batch_size": 8,
                    "lr": 1e-3, "lr_schedule": "cosine", "warmup_steps": 30},
        "teacher_steps": 600,
        "train_files": 100,
        "heldout_files": None,  # all of them (36 files)
        "doc_bytes": 8000,
        "targets": "sample",
        "samples": 64,
        "top_k": 64,
        "seq_len": 256,
        "epochs": 4.0,
        "steps": 0,
        "batch_size": 8,
        "student": {"n_layer": 2, "n_embd": 128, "n_head": 4},
    },
    "quick": {
        "teacher_dir": "teacher-quick",
        "teacher": {"vocab_size": 1024, "n_layer": 2, "n_embd": 64, "n_head": 2,
                    "n_positions": 256, "seq_len": 128, "lr_schedule": "cosine",
                    "warmup_steps": 4, "files_limit": 60},
        "teacher_steps": 40,
        "train_files": 20,
        "heldout_files": 10,
        "doc_bytes": 4000,
        "targets": "sample",
        "samples": 16,
        "top_k": 16,
        "seq_len": 64,
        "epochs": 1.0,
        "steps": 0,
        "batch_size": 8,
        "student": {"n_layer": 1, "n_embd": 64, "n_head": 2},
    },
}  # fmt: skip

#: The rows of the results table, in order (the test parses them).
ROWS = ("teacher", "distilled", "hard labels")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build a teacher on the stdlib's training text, cache its soft targets once "
        "over a small slice of that text, train a student from the cache with and without "
        "distillation, and compare teacher and students on held-out files. Offline, CPU only.",
        epilog="Examples:\n  python demo.py\n  python demo.py --quick\n"
        "  python demo.py --targets topk --top-k 32        # top-k instead of sampled targets\n"
        "  python demo.py --train-files 400 --epochs 1     # a student that is not data-limited",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    full = PRESETS["full"]
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="Working directory.")
    parser.add_argument(
        "--quick", action="store_true", help="A ~1 minute smoke run with tiny models."
    )
    parser.add_argument(
        "--teacher-steps",
        type=int,
        help=f"Teacher training steps if it must be built [{full['teacher_steps']}].",
    )
    parser.add_argument(
        "--train-files",
        type=int,
        help=f"Stdlib training files in the students' slice [{full['train_files']}].",
    )
    parser.add_argument(
        "--doc-bytes", type=int, help=f"Cap per document, in bytes [{full['doc_bytes']}]."
    )
    parser.add_argument(
        "--targets",
        choices=("sample", "topk"),
        help=f"Soft targets of the training cache [{full['targets']}].",
    )
    parser.add_argument(
        "--samples", type=int, help=f"Draws per position (--targets sample) [{full['samples']}]."
    )
    parser.add_argument(
        "--top-k",
        type=int,
        help="Teacher ids per position in the held-out cache, and in the training cache with "
        f"--targets topk [{full['top_k']}].",
    )
    parser.add_argument("--seq-len", type=int, help=f"Tokens per sequence [{full['seq_len']}].")
    parser.add_argument(
        "--epochs", type=float, help=f"Student passes over its slice [{full['epochs']:g}]."
    )
    parser.add_argument(
        "--steps", type=int, help="Student optimizer steps instead of --epochs [0: use epochs]."
    )
    parser.add_argument(
        "--batch-size", type=int, help=f"Sequences per student step [{full['batch_size']}]."
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="CE weight of the KD run.")
    return parser.parse_args(argv)


def settings(args: argparse.Namespace) -> dict:
    chosen = dict(PRESETS["quick" if args.quick else "full"])
    for key in ("teacher_steps", "train_files", "doc_bytes", "targets", "samples", "top_k",
                "seq_len", "epochs", "steps", "batch_size", "alpha"):  # fmt: skip
        if getattr(args, key) is not None:
            chosen[key] = getattr(args, key)
    return chosen


def run(label: str, tool: str, *args, capture: bool = False) -> str:
    """Run `tool` (logitcache or trainer) in a subprocess, showing the command; exit on failure."""
    shown = shlex.join([tool, *map(str, args)])
    print(f"\n== {label}\n$ {shown}", flush=True)
    proc = subprocess.run(
        [sys.executable, "-m", tool, *map(str, args)],
        stdout=subprocess.PIPE if capture else None,
        text=True,
    )
    if proc.returncode != 0:
        sys.exit(f"demo: `{shown}` failed with exit code {proc.returncode}")
    return proc.stdout or ""


class Phases:
    """Wall and CPU time (this process and its children) per phase, in the order they ran.

    CPU time tells what a phase costs on a busy machine too: on 2 idle cores, wall time is about
    half of it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self._start, self._cpu = time.perf_counter(), self._cpu_now()

    @staticmethod
    def _cpu_now() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def done(self, name: str) -> None:
        now, cpu = time.perf_counter(), self._cpu_now()
        self.seconds[name] = round(now - self._start, 1)
        self.cpu_seconds[name] = round(cpu - self._cpu, 1)
        self._start, self._cpu = now, cpu

    def total(self) -> float:
        return round(sum(self.seconds.values()), 1)


def cache_bytes_per_token(cache: Path) -> float:
    """Bytes per token as `logitcache info` reports them: the cache directory's size / tokens."""
    manifest = json.loads((cache / "manifest.json").read_text(encoding="utf-8"))
    size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    return size / manifest["tokens"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    s = settings(args)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    phases = Phases()

    from logitcache.testing import toy

    # 1. Teacher (reused when --out already holds one built with the same settings).
    print(f"== teacher: {out / s['teacher_dir']}", flush=True)
    started = time.time()
    teacher_kw = dict(s["teacher"])
    files_limit = teacher_kw.pop("files_limit", None)
    if files_limit is not None:
        teacher_kw["files"] = toy.stdlib_files("train", limit=files_limit)
    teacher = toy.ensure_teacher(
        out / s["teacher_dir"], train_steps=s["teacher_steps"], **teacher_kw
    )
    info = toy.read_info(teacher) or {}
    phases.done(
        "teacher build" if info.get("created_unix", 0) >= int(started) else "teacher (reused)"
    )
    student_config = toy.build_student_config(teacher, **s["student"])
    (out / "student.json").write_text(student_config.to_json_string(), encoding="utf-8")

    # 2. Corpora: the students' slice of the training split, and held-out files (disjoint:
    # the split is by file path hash, and no model trains on held-out files).
    data = out / "data"
    for split, limit in (("train", s["train_files"]), ("heldout", s["heldout_files"])):
        dest = data / split
        if dest.exists():
            for old in dest.glob("*.txt"):
                old.unlink()
        toy.write_corpus(dest, split, limit=limit, max_bytes=s["doc_bytes"])
    n_docs = {split: len(list((data / split).glob("*.txt"))) for split in ("train", "heldout")}
    print(
        f"   corpora: {n_docs['train']} training and {n_docs['heldout']} held-out documents "
        f"in {data}",
        flush=True,
    )
    phases.done("corpora")

    # 3. Run the teacher once per corpus: the training cache holds the targets the student
    # learns from; the held-out cache holds the teacher's exact top-k log-probs, against which
    # KL and agreement are measured (a sampled cache's plug-in KL is biased low).
    dump = ["dump", "--teacher", teacher, "--seq-len", s["seq_len"], "--device", "cpu",
            "--overwrite"]  # fmt: skip
    if s["targets"] == "sample":
        train_targets = ["--targets", "sample", "--samples", s["samples"]]
        targets_text = f"sampled targets ({s['samples']} draws per position)"
    else:
        train_targets = ["--targets", "topk", "--top-k", s["top_k"]]
        targets_text = f"top-{s['top_k']} targets"
    run(f"dump the teacher's {targets_text} over the students' slice", "logitcache",
        *dump, *train_targets, "--data", data / "train", "--out", out / "cache")  # fmt: skip
    phases.done("dump (training slice)")
    run(f"dump the teacher's top-{s['top_k']} log-probs over the held-out files", "logitcache",
        *dump, "--targets", "topk", "--top-k", s["top_k"], "--data", data / "heldout",
        "--out", out / "heldout-cache")  # fmt: skip
    phases.done("dump (held-out)")

    # 4. Two students from the same cache: distillation and hard labels only.
    manifest = json.loads((out / "cache" / "manifest.json").read_text(encoding="utf-8"))
    slice_tokens = manifest["tokens"]
    steps_estimate = s["steps"] or round(s["epochs"] * manifest["sequences"] / s["batch_size"])
    length = ["--steps", s["steps"]] if s["steps"] else ["--epochs", s["epochs"]]
    fit = ["fit", "--cache", out / "cache", "--student", out / "student.json", *length,
           "--batch-size", s["batch_size"], "--lr", 1e-3, "--min-lr", 1e-4,
           "--eval-every", max(10, steps_estimate // 5), "--overwrite"]  # fmt: skip
    runs = {
        "distilled": (out / "runs" / "kd", ["--alpha", s["alpha"]]),
        "hard labels": (out / "runs" / "hard", ["--alpha", 1]),
    }
    for label, (run_dir, extra) in runs.items():
        alpha = extra[1]
        run(f"train a student: {label} (alpha {alpha})", "trainer",
            *fit, "--out", run_dir, *extra)  # fmt: skip
        phases.done(f"fit: {label}")

    # 5. The teacher and both students on the held-out cache.
    results = {}
    for label, model in (("teacher", teacher), *((k, v[0]) for k, v in runs.items())):
        text = run(f"evaluate on held-out data: {label}", "trainer", "eval",
                   "--cache", out / "heldout-cache", "--student", model, "--split", "all",
                   "--json", capture=True)  # fmt: skip
        results[label] = json.loads(text)
    phases.done("evaluate (3 models)")

    summary = json.loads((out / "runs" / "kd" / "summary.json").read_text(encoding="utf-8"))
    teacher_config = json.loads((teacher / "config.json").read_text(encoding="utf-8"))
    setting = {
        "teacher": f"GPT-2 {teacher_config['n_layer']}x{teacher_config['n_embd']}",
        "teacher_tokens": info.get("train", {}).get("tokens"),
        "teacher_files": info.get("n_train_files"),
        "student": f"GPT-2 {s['student']['n_layer']}x{s['student']['n_embd']}",
        "slice_files": n_docs["train"],
        "slice_tokens": slice_tokens,
        "epochs": s["epochs"] if not s["steps"] else None,
        "steps": summary.get("steps", steps_estimate),
        "targets": targets_text,
        "cache_bytes_per_token": round(cache_bytes_per_token(out / "cache"), 1),
        "alpha": s["alpha"],
    }
    heldout = {"tokens": results["teacher"]["tokens"], "files": n_docs["heldout"]}
    margin = results["distilled"]["ce"] - results["hard labels"]["ce"]
    record = {
        "preset": "quick" if args.quick else "full",
        "settings": s,
        "setting": setting,
        "heldout": heldout,
        "results": {label: results[label] for label in ROWS},
        "margin_ce": margin,
        "phases_seconds": phases.seconds,
        "phases_cpu_seconds": phases.cpu_seconds,
        "total_seconds": phases.total(),
        "total_cpu_seconds": round(sum(phases.cpu_seconds.values()), 1),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "cpus": os.cpu_count(),
    }
    (out / "results.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(report(record, out))


def format_table(results: dict[str, dict], notes: dict[str, str] | None = None) -> str:
    """The results table: one row per model in `ROWS` order (CE, KL, top-1, a note)."""
    notes = notes or {}
    header = ("model", "held-out CE", "KL to teacher", "top-1 agreement", "trained on")
    rows = [
        (label, f"{r['ce']:.4f}", f"{r['kl']:.4f}", f"{r['top1']:.4f}", notes.get(label, ""))
        for label, r in ((label, results[label]) for label in ROWS)
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells) -> str:
        middle = [c.rjust(w) for c, w in zip(cells[1:-1], widths[1:-1], strict=True)]
        return "  ".join([cells[0].ljust(widths[0]), *middle, cells[-1]]).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def _tokens(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def report(record: dict, out: Path) -> str:
    """The closing text: table, setting, margin, phase times and where everything is."""
    st, results, heldout = record["setting"], record["results"], record["heldout"]
    epochs = st["epochs"]
    length = f"{epochs:g} epoch{'' if epochs == 1 else 's'}" if epochs else f"{st['steps']} steps"
    steps = f" ({st['steps']} steps)" if epochs else ""
    notes = {
        "teacher": f"{_tokens(st['teacher_tokens'])} tokens from {st['teacher_files']} files",
        "distilled": f"{_tokens(st['slice_tokens'])} tokens x {length}, {st['targets']}",
        "hard labels": f"the same {_tokens(st['slice_tokens'])} tokens x {length}, labels only",
    }
    margin = record["margin_ce"]
    verdict = "distillation better" if margin < 0 else "distillation NOT better"
    ratio = (st["teacher_tokens"] or 0) / max(1, st["slice_tokens"])
    phase_text = ", ".join(f"{name} {sec:.0f} s" for name, sec in record["phases_seconds"].items())
    load = record["load_average"]
    lines = [
        f"\n== results on {heldout['tokens']:,} held-out tokens ({heldout['files']} stdlib files "
        "that no model trained on)\n",
        format_table(results, notes),
        "",
        f"Setting: data-limited distillation. The teacher ({st['teacher']}) trained on "
        f"{_tokens(st['teacher_tokens'])} tokens of the stdlib training split, {ratio:.0f}x the "
        f"text either student sees: a {_tokens(st['slice_tokens'])}-token slice "
        f"({st['slice_files']} files) for {length}{steps}. Same student "
        f"({st['student']}), init, data order and steps; the distilled one (alpha {st['alpha']}) "
        "also learns the teacher's next-token distribution at every position.",
        f"Margin: distilled minus hard-label held-out CE = {margin:+.4f} nats/token "
        f"({verdict}; {100 * margin / results['hard labels']['ce']:+.1f}%).",
        "",
        "CE: nats/token on the real next token (lower is better). KL: KL(teacher || student) on "
        "the teacher's top-k\nplus one tail bucket (lower: closer to the teacher). top-1: the "
        "model's argmax is the teacher's. The\nteacher row is the teacher evaluated the same "
        "way: its own CE, KL 0 and agreement 1 up to float16 rounding.",
        "",
        f"Phases (wall): {phase_text}; total {record['total_seconds'] / 60:.1f} min on "
        f"{record['cpus']} CPUs, {record['total_cpu_seconds'] / 60:.1f} CPU-min (load average "
        f"{load['before'][0]:.1f} before, {load['after'][0]:.1f} after).",
        f"Everything is in {out}/: {record['settings']['teacher_dir']}/, data/, cache/ "
        f"({st['cache_bytes_per_token']} "
        "bytes/token), heldout-cache/, runs/kd, runs/hard, results.json (settings, phases, "
        f"table). Curves: trainer plot {out / 'runs' / 'kd'}",
    ]
    if record["preset"] == "quick":
        lines.append("(--quick: a smoke run of tiny models; its numbers show nothing.)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
