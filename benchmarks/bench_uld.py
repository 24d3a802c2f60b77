"""A student with another tokenizer: ULD (`trainer fit --loss uld`) against the same student
trained on its own CE alone, both from one cache dumped with ``--offsets``.

    python benchmarks/bench_uld.py            # the rows of RESULTS.md (about 15 min on 2 cores)
    python benchmarks/bench_uld.py --steps 400 --weights 0.03,0.1,0.3,1
    python benchmarks/bench_uld.py --quick    # smoke run (a few minutes), no RESULTS.md

1. The teacher: ``--teacher DIR``, by default bench_fidelity's realistic teacher (GPT-2 4x256,
   byte-level BPE of 8192 ids, 3,000 annealed steps) where it has been trained, otherwise a
   smaller one of this script's own, built once under ``benchmarks/.work/uld``.
2. The student's tokenizer: a second byte-level BPE (`logitcache.testing.tokenizer`) with
   another vocabulary size, trained on the same training text.
3. One ``dump --offsets`` of the training text and one of held-out stdlib files (top-32).
4. The same student (GPT-2 1x64 over the student vocabulary, seed 0) trained for the same
   steps on the same sequences in the same order, in its own tokens: ``--uld-weight 0`` (the
   student's CE alone: the baseline, through exactly the same data path) and, once per lambda
   of ``--weights``, ``--uld-weight`` LAMBDA (CE + LAMBDA * ULD).
5. Both measured on the held-out cache in the student's own tokens (`trainer.evaluate` with
   ``tokenizer``): CE per student token, and per character of the text (comparable with the
   teacher's, whose tokens are others), and the ULD distance to the teacher.

The teacher's strength and peakedness are measured on the same held-out text with its full
distribution (CE, entropy, top-1 probability), so RESULTS.md says what regime the row is in.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    WORK,
    command_line,
    loadavg,
    machine_line,
    markdown_table,
    now_utc,
    update_results,
    write_token_corpus,
)

SECTION = "bench_uld"
#: bench_fidelity's realistic teacher, used where it exists (read only).
REALISTIC_TEACHER = WORK / "fidelity-realistic" / "teacher"
#: The fallback teacher (`toy.ensure_teacher`): much larger than the 1x64 student and annealed,
#: on a budget that fits a shared 2-core machine (8 minutes of training on 300 stdlib files).
OWN_TEACHER = {
    "vocab_size": 2048, "n_layer": 3, "n_embd": 128, "n_head": 4, "n_positions": 256,
    "seq_len": 128, "batch_size": 8, "lr": 2e-3, "lr_schedule": "cosine", "warmup_steps": 50,
    "seed": 0, "train_seconds": 480.0,
}  # fmt: skip
TEACHER_FILES = 300
STUDENT_VOCAB = 1024
STUDENT = {"n_layer": 1, "n_embd": 64, "n_head": 2, "n_positions": 512}
DUMP = {"targets": "topk", "top_k": 32, "seq_len": 128, "batch_size": 8}
BATCH = 8


def log(message: str) -> None:
    print(f"[bench_uld] {message}", file=sys.stderr, flush=True)


def teacher_dir(args: argparse.Namespace, work: Path) -> Path:
    """The teacher the row is measured with (see the module docstring)."""
    from logitcache.testing import toy

    if args.teacher:
        return Path(args.teacher)
    ready = all((REALISTIC_TEACHER / f).is_file() for f in ("config.json", "model.safetensors"))
    if ready and not args.quick:
        return REALISTIC_TEACHER
    settings = dict(OWN_TEACHER, train_seconds=20.0) if args.quick else OWN_TEACHER
    files = toy.stdlib_files("train", limit=TEACHER_FILES)
    return toy.ensure_teacher(work / "teacher", files=files, **settings)


def toy_info(teacher: Path) -> dict[str, Any] | None:
    from logitcache.testing import toy

    return toy.read_info(teacher)


def student_tokenizer(corpus: Path, work: Path) -> Path:
    """The second BPE, trained on the training text with `STUDENT_VOCAB` ids (reused)."""
    from logitcache.testing import toy

    out = work / f"student-tokenizer-{STUDENT_VOCAB}"
    if not (out / "tokenizer.json").is_file():
        files = sorted(p for p in corpus.iterdir() if p.is_file() and not p.name.startswith("."))
        toy.train_tokenizer(
            files, STUDENT_VOCAB, model_max_length=STUDENT["n_positions"]
        ).save_pretrained(out)
    return out


def dump_offsets(teacher: Path, corpus: Path, out: Path) -> float:
    """``dump --offsets`` of `corpus` (reused when complete); the seconds it took."""
    import logitcache

    if (out / "manifest.json").is_file() and logitcache.open(out).manifest.complete:
        return 0.0
    start = time.perf_counter()
    logitcache.dump(
        logitcache.DumpOptions(
            data=str(corpus), out=out, teacher=str(teacher), device="cpu", progress=False,
            offsets=True, overwrite=True, **DUMP,
        )
    )  # fmt: skip
    return time.perf_counter() - start


def teacher_stats(teacher: Path, heldout: Path) -> dict[str, float]:
    """The teacher's CE, entropy and top-1 probability per position on the held-out cache's
    sequences, with its full distribution; and its CE per character of their text."""
    import torch
    from transformers import AutoModelForCausalLM

    import logitcache

    model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32).eval()
    cache = logitcache.open(heldout)
    ce = entropy = top1 = 0.0
    positions = characters = 0
    with torch.no_grad():
        for index in range(cache.num_parts):
            part = cache.read_decoded(index)
            for s in range(part.sequences):
                a, b = int(part.seq_offsets[s]), int(part.seq_offsets[s + 1])
                ids = torch.from_numpy(part.input_ids[a:b].astype("int64"))[None]
                logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0, :-1]
                p = logp.exp()
                ce -= float(logp.gather(-1, ids[0, 1:, None]).sum())
                entropy -= float((p * logp).sum())
                top1 += float(p.max(-1).values.sum())
                positions += b - a - 1
                characters += len(logitcache.sequence_text(part, s))
    return {
        "ce": ce / positions, "entropy": entropy / positions, "top1_prob": top1 / positions,
        "ce_per_char": ce / characters, "tokens": positions, "characters": characters,
    }  # fmt: skip


def heldout_characters(heldout: Path) -> int:
    import logitcache

    cache = logitcache.open(heldout)
    total = 0
    for index in range(cache.num_parts):
        part = cache.read_decoded(index)
        total += sum(len(logitcache.sequence_text(part, s)) for s in range(part.sequences))
    return total


def train(
    name: str, weight: float, paths: dict[str, Path], steps: int, work: Path
) -> dict[str, Any]:
    """One student (reused when its row is stored) and its held-out measures."""
    from trainer import FitConfig, fit
    from trainer.evaluation import evaluate

    row_file = work / "rows" / f"{name}-s{steps}.json"
    if row_file.is_file():
        return json.loads(row_file.read_text())
    out = work / "runs" / f"{name}-s{steps}"
    config = FitConfig(
        cache=str(paths["train"]), student=str(paths["student"]), out=str(out),
        tokenizer=str(paths["tokenizer"]), loss="uld", uld_weight=weight, steps=steps,
        batch_size=BATCH, eval_fraction=0.0, progress=False, device="cpu", overwrite=True,
        checkpoint_every=0,
    )  # fmt: skip
    start = time.perf_counter()
    summary = fit(config)
    seconds = time.perf_counter() - start
    measured = evaluate(
        paths["heldout"], out, tokenizer=str(paths["tokenizer"]), split="all", device="cpu"
    )
    row = {
        "name": name, "weight": weight, "steps": steps, "seconds": seconds,
        "train_tokens": summary["tokens_seen"],
        **{k: measured[k] for k in ("ce", "ppl", "uld", "paired", "tokens", "sequences")},
    }  # fmt: skip
    row_file.parent.mkdir(parents=True, exist_ok=True)
    row_file.write_text(json.dumps(row, indent=2))
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--teacher", help="Teacher directory [bench_fidelity's realistic one, else own]."
    )
    p.add_argument("--steps", type=int, default=None, help="Steps per student [150; quick 10].")
    p.add_argument("--weights", default="0.1,1",
                   help="Comma-separated lambdas, one ULD row each [0.1,1].")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="Smoke run; RESULTS.md untouched.")
    args = p.parse_args(argv)
    steps = args.steps or (10 if args.quick else 150)
    work = WORK / ("uld-quick" if args.quick else "uld")
    work.mkdir(parents=True, exist_ok=True)
    started, load_before, t0 = now_utc(), loadavg(), time.perf_counter()
    teacher = teacher_dir(args, work)
    log(f"teacher {teacher}")
    # everything made from the teacher lives under its own key: another teacher, other rows
    key = json.dumps([str(teacher.resolve()), (toy_info(teacher) or {}).get("settings")])
    work = work / hashlib.sha1(key.encode()).hexdigest()[:10]
    work.mkdir(parents=True, exist_ok=True)
    train_tokens = steps * BATCH * DUMP["seq_len"]
    corpus, heldout_corpus = work / "train-text", work / "heldout-text"
    write_token_corpus(corpus, teacher, train_tokens, "train")
    write_token_corpus(heldout_corpus, teacher, 4096 if args.quick else 16_384, "heldout")
    tokenizer = student_tokenizer(corpus, work)
    caches = {"train": work / "cache-train", "heldout": work / "cache-heldout"}
    dump_seconds = {k: dump_offsets(teacher, c, caches[k]) for k, c in
                    (("train", corpus), ("heldout", heldout_corpus))}  # fmt: skip
    log(f"dumped ({dump_seconds})")
    from logitcache.testing import toy

    student = work / "student.json"
    config = toy.build_student_config(
        STUDENT_VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0, **STUDENT
    )
    student.write_text(config.to_json_string())
    paths = {**caches, "student": student, "tokenizer": tokenizer}
    weights = [float(w) for w in args.weights.split(",") if w.strip()]
    rows = [train("ce-only", 0.0, paths, steps, work)]
    rows += [train(f"uld-{w:g}", w, paths, steps, work) for w in weights]
    ts = teacher_stats(teacher, caches["heldout"])
    characters = heldout_characters(caches["heldout"])
    table = markdown_table(
        ["student", "loss", "held-out CE (nats/student token)", "ppl", "nats/char", "ULD to teacher",
         "paired positions", "train s"],
        [[r["name"], "CE" if r["weight"] == 0 else f"CE + {r['weight']:g} * ULD", f"{r['ce']:.4f}",
          f"{r['ppl']:.2f}", f"{r['ce'] * r['tokens'] / characters:.4f}", f"{r['uld']:.4f}",
          f"{r['paired']:.3f}", f"{r['seconds']:.0f}"] for r in rows],
    )  # fmt: skip
    print(table)
    minutes = (time.perf_counter() - t0) / 60
    import logitcache

    m = logitcache.open(caches["train"]).manifest
    info = toy_info(teacher) or {}
    shape = info.get("settings", {})
    body = "\n".join(
        [
            "## A student with another tokenizer: ULD vs CE only (`bench_uld.py`)",
            f"- date: {started}; {minutes:.1f} min (stored rows and caches are reused); load average "
            f"before {load_before}, after {loadavg()}\n- machine: {machine_line()}\n"
            f"- command: `{command_line()}`",
            f"**Teacher**: `{teacher.relative_to(WORK.parent) if teacher.is_relative_to(WORK.parent) else teacher}`"
            f", GPT-2 {shape.get('n_layer', '?')} x {shape.get('n_embd', '?')}, vocabulary "
            f"{m.tokenizer.vocab_size} ids (byte-level BPE), trained {info.get('train', {}).get('steps', '?')} "
            f"steps. On the held-out text, with its full distribution: **CE {ts['ce']:.3f} nats per "
            f"teacher token ({ts['ce_per_char']:.4f} per character), entropy {ts['entropy']:.3f} "
            f"nats, mean top-1 probability {ts['top1_prob']:.3f}**; "
            f"{rows[0]['ce'] * rows[0]['tokens'] / characters - ts['ce_per_char']:.3f} nats per "
            "character below the CE-only student.",
            f"**Cache**: `dump --offsets --targets topk --top-k 32 --seq-len {DUMP['seq_len']}` of {m.tokens:,} "
            f"training tokens ({dump_seconds['train']:.0f} s; 0 = reused); held-out "
            f"{logitcache.open(caches['heldout']).manifest.tokens:,} teacher tokens of stdlib files no "
            "one trained on, also dumped with --offsets.",
            f"**Students**: GPT-2 {STUDENT['n_layer']} x {STUDENT['n_embd']} over a second BPE of "
            f"{STUDENT_VOCAB} ids trained on the same text (the teacher's has {m.tokenizer.vocab_size}), "
            f"seed 0, {steps} steps of {BATCH} cached sequences (the same sequences in the same "
            "order, re-tokenized by the student's tokenizer), `trainer.fit` defaults otherwise (AdamW "
            "lr 3e-4 cosine, T 1). `ce-only` is `--loss uld --uld-weight 0`: the same data path "
            "without the ULD term. Held-out CE is in the student's own tokens; nats/char divides the "
            f"summed CE by the {characters:,} characters of the held-out text (the teacher's: "
            f"{ts['ce_per_char']:.4f}). ULD: the sorted-L1 distance (0..2) at the student positions "
            "paired with a teacher position (`paired`: their share; pairs are positions whose "
            "tokens end at the same character).",
            "",
            table,
            "",
            "ULD against CE only: "
            + "; ".join(
                f"lambda {r['weight']:g}: held-out CE {r['ce'] - rows[0]['ce']:+.4f} nats per "
                f"student token ({(r['ce'] - rows[0]['ce']) * rows[0]['tokens'] / characters:+.4f}"
                f" per character), ULD distance to the teacher {r['uld'] - rows[0]['uld']:+.4f}"
                for r in rows[1:]
            )
            + ". ULD matches the *shape* of the sorted distribution only, never which token is "
            "likely: it pulls the student's confidence towards the teacher's, not its choices, so "
            "it can transfer little of what the teacher knows.",
        ]
    )
    if args.quick:
        log("quick run: RESULTS.md left alone")
        return
    update_results(SECTION, body)
    log(f"wrote the {SECTION} section of RESULTS.md ({minutes:.1f} min)")


if __name__ == "__main__":
    main()
