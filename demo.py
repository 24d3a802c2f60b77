"""Offline knowledge distillation end to end, on CPU, with nothing downloaded.

    python demo.py            # about 5-10 minutes on 2 CPU cores
    python demo.py --quick    # a ~1 minute smoke run (tiny teacher and student)

1. builds the embedded default teacher if missing (a GPT-2 and a byte-level BPE tokenizer,
   trained locally on the Python standard library's sources; reused on later runs);
2. writes a training corpus and a held-out corpus (disjoint stdlib files);
3. `logitcache dump`: runs the teacher once over each corpus and caches its top-k soft targets;
4. `trainer fit` twice from the training cache, same student init, data order and steps:
   knowledge distillation (alpha 0.5) and hard labels only (alpha 1);
5. `trainer eval` of both on the held-out cache, and a comparison table.

Everything lands in --out (default demo-out/): teacher/, data/, cache/, heldout-cache/, runs/.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

#: Settings of the full demo and of --quick. `teacher` goes to `logitcache.testing.toy.ensure_teacher`
#: (empty: the embedded default teacher), `student` to `toy.build_student_config`.
PRESETS = {
    "full": {
        "teacher_dir": "teacher",
        "teacher": {},
        "teacher_steps": 250,  # about 2.5 minutes on 2 idle cores; a step count, not a time
        # budget, so that a busy machine builds the same teacher (only later)
        "train_files": 100,
        "heldout_files": None,  # all of them (36 files)
        "doc_bytes": 8000,
        "top_k": 32,
        "seq_len": 128,
        "steps": 150,
        "batch_size": 8,
        "student": {"n_layer": 2, "n_embd": 128, "n_head": 4},
    },
    "quick": {
        "teacher_dir": "teacher-quick",
        "teacher": {"vocab_size": 1024, "n_layer": 2, "n_embd": 64, "n_head": 2,
                    "n_positions": 256, "seq_len": 128, "files_limit": 60},
        "teacher_steps": 40,
        "train_files": 20,
        "heldout_files": 10,
        "doc_bytes": 4000,
        "top_k": 16,
        "seq_len": 64,
        "steps": 40,
        "batch_size": 8,
        "student": {"n_layer": 1, "n_embd": 64, "n_head": 2},
    },
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Dump a teacher's top-k targets once, train a student from the cache with and "
        "without distillation, and compare them on held-out data. Offline, CPU only.",
        epilog="Examples:\n  python demo.py\n  python demo.py --quick\n"
        "  python demo.py --teacher-steps 1000 --steps 600   # longer, better numbers",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="Working directory.")
    parser.add_argument(
        "--quick", action="store_true", help="A ~1 minute smoke run with tiny models."
    )
    parser.add_argument(
        "--teacher-steps", type=int, help="Teacher training steps if it must be built [250]."
    )
    parser.add_argument("--steps", type=int, help="Student optimizer steps per run [150].")
    parser.add_argument(
        "--train-files", type=int, help="Stdlib files in the training corpus [100]."
    )
    parser.add_argument("--doc-bytes", type=int, help="Cap per document, in bytes [8000].")
    parser.add_argument("--top-k", type=int, help="Teacher ids cached per position [32].")
    parser.add_argument("--seq-len", type=int, help="Tokens per sequence [128].")
    parser.add_argument("--batch-size", type=int, help="Sequences per student step [8].")
    parser.add_argument("--alpha", type=float, default=0.5, help="CE weight of the KD run.")
    return parser.parse_args(argv)


def settings(args: argparse.Namespace) -> dict:
    chosen = dict(PRESETS["quick" if args.quick else "full"])
    for key in ("teacher_steps", "steps", "train_files", "doc_bytes", "top_k", "seq_len",
                "batch_size"):  # fmt: skip
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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    s = settings(args)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    from logitcache.testing import toy

    # 1. Teacher (reused when demo-out already holds one built with the same settings).
    print(f"== teacher: {out / s['teacher_dir']}", flush=True)
    teacher_kw = dict(s["teacher"])
    files_limit = teacher_kw.pop("files_limit", None)
    if files_limit is not None:
        teacher_kw["files"] = toy.stdlib_files("train", limit=files_limit)
    teacher = toy.ensure_teacher(
        out / s["teacher_dir"], train_steps=s["teacher_steps"], **teacher_kw
    )
    student_config = toy.build_student_config(teacher, **s["student"])
    (out / "student.json").write_text(student_config.to_json_string(), encoding="utf-8")

    # 2. Corpora: disjoint stdlib files (split by file path hash).
    data = out / "data"
    for split, limit in (("train", s["train_files"]), ("heldout", s["heldout_files"])):
        dest = data / split
        if dest.exists():
            for old in dest.glob("*.txt"):
                old.unlink()
        toy.write_corpus(dest, split, limit=limit, max_bytes=s["doc_bytes"])
    print(
        f"   corpora: {len(list((data / 'train').glob('*.txt')))} training and "
        f"{len(list((data / 'heldout').glob('*.txt')))} held-out documents in {data}",
        flush=True,
    )

    # 3. Run the teacher once per corpus.
    dump = ["dump", "--teacher", teacher, "--targets", "topk", "--top-k", s["top_k"],
            "--seq-len", s["seq_len"], "--device", "cpu", "--overwrite"]  # fmt: skip
    run("dump the teacher's top-k targets (training corpus)", "logitcache",
        *dump, "--data", data / "train", "--out", out / "cache")  # fmt: skip
    run("dump the teacher's top-k targets (held-out corpus)", "logitcache",
        *dump, "--data", data / "heldout", "--out", out / "heldout-cache")  # fmt: skip

    # 4. Two students from the same cache: distillation and hard labels only.
    fit = ["fit", "--cache", out / "cache", "--student", out / "student.json",
           "--steps", s["steps"], "--batch-size", s["batch_size"], "--lr", 1e-3, "--min-lr", 1e-4,
           "--eval-every", max(10, s["steps"] // 5), "--overwrite"]  # fmt: skip
    runs = {
        f"distilled (alpha {args.alpha})": (out / "runs" / "kd", ["--alpha", args.alpha]),
        "hard labels only (alpha 1)": (out / "runs" / "hard", ["--alpha", 1]),
    }
    for label, (run_dir, extra) in runs.items():
        run(f"train a student: {label}", "trainer", *fit, "--out", run_dir, *extra)

    # 5. Both on the held-out cache.
    results = {}
    for label, (run_dir, _) in runs.items():
        text = run(f"evaluate on held-out data: {label}", "trainer", "eval",
                   "--cache", out / "heldout-cache", "--student", run_dir, "--split", "all",
                   "--json", capture=True)  # fmt: skip
        results[label] = json.loads(text)
    # Bytes per token as `logitcache info` reports them: the cache directory's size / tokens.
    manifest = json.loads((out / "cache" / "manifest.json").read_text(encoding="utf-8"))
    size = sum(f.stat().st_size for f in (out / "cache").rglob("*") if f.is_file())
    id_bytes = {"uint8": 1, "uint16": 2, "uint32": 4}[manifest["targets"]["id_dtype"]]
    storage = {
        f"distilled (alpha {args.alpha})": f"{size / manifest['tokens']:.1f} (top-{s['top_k']} cache)",
        "hard labels only (alpha 1)": f"{id_bytes:.1f} (token ids only)",
    }
    heldout_tokens = next(iter(results.values()))["tokens"]
    print_table(results, storage, heldout_tokens, time.perf_counter() - start, out)


def print_table(results: dict, storage: dict, tokens: int, seconds: float, out: Path) -> None:
    header = ("student", "held-out CE", "KL to teacher", "top-1 agreement", "bytes/token")
    rows = [
        (label, f"{r['ce']:.4f}", f"{r['kl']:.4f}", f"{r['top1']:.4f}", storage[label])
        for label, r in results.items()
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))])

    print(f"\n== results on {tokens:,} held-out tokens (files never seen in training)\n")
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))
    print(
        "\nCE: nats/token on the real next token (lower is better). KL: KL(teacher || student) on "
        "the teacher's\ncached top-k plus a tail bucket (lower: closer to the teacher). top-1: "
        "student argmax == teacher's.\nbytes/token: training data on disk per token.\n"
        f"\nDone in {seconds / 60:.1f} min. Runs, metrics and curves: trainer plot {out / 'runs' / 'kd'}"
    )


if __name__ == "__main__":
    main()
