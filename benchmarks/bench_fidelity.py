"""Fidelity per byte: students distilled from caches of every target kind, against online KD.

    python benchmarks/bench_fidelity.py                      # default (~65 min on 2 CPU cores)
    python benchmarks/bench_fidelity.py --teacher-seconds 3600 --student-tokens 2000000
    python benchmarks/bench_fidelity.py --quick              # smoke run (minutes), no RESULTS.md

On real text that every machine has (the Python standard library's sources, split by file into
train and held-out by `logitcache.testing.toy`), with a byte-level BPE of 8192 ids trained locally:

1. a GPT-2 teacher (3 x 192, 1.33M non-embedding parameters, 6x the student's) trained for
   ``--teacher-seconds`` of wall time, saved and reused by later runs with the same settings
   (``benchmarks/.work/fidelity/teacher``);
2. one ``logitcache dump`` of the training text per target setting (top-k k in {8, 32, 64},
   sampled N in {16, 64}, plus codec variants), each cache's bytes/token measured on disk,
   everything included (input ids, offsets, metadata, manifest);
3. students from the same initialisation (seed), on the same sequences in the same order, for
   the same number of steps with the same hyper-parameters (`trainer.fit` defaults except the
   step count): hard labels only (alpha 1); online KD with the teacher in the loop and the full
   distribution (`trainer.losses.dense_divergence`, this script's `loss_fn` for `trainer.fit`;
   the trainer package never imports a teacher); and from every cache under each tail mode
   (top-k) or as is (sampled: counts / N carries all the mass, the tail modes coincide);
   every row with forward KL, and for each other `--loss` (reverse_kl, gjsd at beta 0.5, tvd)
   one online row and the cached rows of `CacheSpec.loss_tails` (topk32 renorm and bucket,
   sample64), so that each divergence is compared with its own online version;
4. each student evaluated on held-out files against the **full** teacher distribution: CE on
   the real next tokens, exact KL(teacher || student) over the whole vocabulary, expected
   calibration error of the student's top-1 (15 equal-width confidence bins), and top-1
   agreement with the teacher's argmax; train tokens/s from the run's own metrics.

Full runs write ``benchmarks/RESULTS.md`` (section ``bench_fidelity``) and
``benchmarks/fidelity.png`` (held-out KL and CE against cache bytes/token).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    RESULTS,
    command_line,
    loadavg,
    machine_line,
    markdown_table,
    now_utc,
    update_results,
)

from trainer.losses import DEFAULT_BETA, DEFAULT_LOSS, DEFAULT_TAIL, LOSSES

HERE = Path(__file__).resolve().parent
PLOT = HERE / "fidelity.png"
WORK = HERE / ".work" / "fidelity"

#: The teacher: `logitcache.testing.toy.ensure_teacher` settings (train_seconds comes from the flag).
TEACHER = {
    "vocab_size": 8192,
    "n_layer": 3,
    "n_embd": 192,
    "n_head": 4,
    "n_positions": 256,
    "seq_len": 256,
    "batch_size": 8,
    "lr": 2e-3,
    "seed": 0,
}
#: The student: `toy.build_student_config` settings (vocabulary from the teacher).
STUDENT = {"n_layer": 2, "n_embd": 96, "n_head": 2, "n_positions": 256}
SEQ_LEN = 256
BATCH = 8  # sequences per step, for every student
QUICK = {"teacher_seconds": 60.0, "student_tokens": 40_960, "heldout_tokens": 8_192}


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """One cache: a name, the `DumpOptions` fields that differ from the defaults, the tail
    modes its forward-KL students use, and those on which every other `--loss` is run too."""

    name: str
    options: dict[str, Any]
    tails: tuple[str, ...] = ("renorm", "bucket", "label")
    loss_tails: tuple[str, ...] = ()


#: The divergences besides forward KL that get rows of their own (gjsd at `DEFAULT_BETA`).
OTHER_LOSSES = tuple(x for x in LOSSES if x != DEFAULT_LOSS)


def cache_specs(quick: bool) -> list[CacheSpec]:
    specs = [
        CacheSpec(
            f"topk{k}", {"targets": "topk", "top_k": k, "logprob_dtype": "float16"},
            loss_tails=("renorm", "bucket") if k == 32 else (),
        )
        for k in (8, 32, 64)
    ]  # fmt: skip
    specs.append(
        CacheSpec(
            "topk64-q8",
            {"targets": "topk", "top_k": 64, "logprob_dtype": "uint8"},
            ("renorm", "bucket"),
        )
    )
    specs += [
        CacheSpec(
            f"sample{n}", {"targets": "sample", "samples": n}, ("bucket",),
            loss_tails=("bucket",) if n == 64 else (),
        )
        for n in (16, 64)
    ]  # fmt: skip
    if quick:  # one row per loss on each of the two caches
        specs = [
            dataclasses.replace(s, loss_tails=s.tails[:1])
            for s in specs
            if s.name in ("topk8", "sample16")
        ]
    return specs


# --------------------------------------------------------------------------------------------
# Teacher and text (bench_storage.py uses them too)
# --------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def ensure_teacher(teacher_seconds: float, work: Path = WORK) -> Path:
    from logitcache.testing import toy

    return toy.ensure_teacher(work / "teacher", train_seconds=teacher_seconds, **TEACHER)


def _stable_order(paths: list[Path]) -> list[Path]:
    """A fixed pseudo-random file order (hash of the path): a prefix mixes many packages."""
    return sorted(paths, key=lambda p: hashlib.sha1(p.as_posix().encode()).hexdigest())


def write_corpus(dest: Path, teacher_dir: Path, split: str, tokens: int) -> int:
    """A ``--data`` directory of whole stdlib documents of `split` holding at least `tokens`
    tokens (one EOS per document counted, as packing does); reused when already there."""
    from transformers import AutoTokenizer

    from logitcache.testing import toy

    stamp = dest / ".tokens.json"
    wanted = {"tokens": tokens, "split": split, "teacher": str(teacher_dir)}
    if stamp.is_file() and json.loads(stamp.read_text()).get("wanted") == wanted:
        return int(json.loads(stamp.read_text())["count"])
    shutil.rmtree(dest, ignore_errors=True)
    backend = AutoTokenizer.from_pretrained(str(teacher_dir)).backend_tokenizer
    chosen, count = [], 0
    for path in _stable_order(toy.stdlib_files(split)):
        text = toy.read_text(path)
        if text is None:
            continue
        chosen.append(path)
        count += len(backend.encode(text).ids) + 1
        if count >= tokens:
            break
    if count < tokens:
        raise SystemExit(f"the stdlib {split} split has only {count} tokens; ask for fewer.")
    toy.write_corpus(dest, files=chosen)
    stamp.write_text(json.dumps({"wanted": wanted, "count": count}))
    return count


def heldout_sequences(teacher_dir: Path, tokens: int, seq_len: int = SEQ_LEN):
    """(n, seq_len) int64 tensor: held-out documents joined with EOS, cut into sequences."""
    import torch
    from transformers import AutoTokenizer

    from logitcache.testing import toy

    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    ids: list[int] = []
    for path in _stable_order(toy.stdlib_files("heldout")):
        text = toy.read_text(path)
        if text is None:
            continue
        ids += [*tok.backend_tokenizer.encode(text).ids, tok.eos_token_id]
        if len(ids) >= tokens:
            break
    n = min(len(ids), tokens) // seq_len
    if n == 0:
        raise SystemExit("the held-out split is empty")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


# --------------------------------------------------------------------------------------------
# Caches
# --------------------------------------------------------------------------------------------


def dump_cache(spec: CacheSpec, teacher_dir: Path, corpus: Path, work: Path) -> dict[str, Any]:
    from logitcache.dumping.pipeline import DumpOptions, dump
    from logitcache.read.reader import open as open_cache
    from logitcache.read.stats import bytes_by_array

    out = work / "caches" / spec.name
    opts = DumpOptions(
        data=str(corpus), out=out, teacher=str(teacher_dir), seq_len=SEQ_LEN, batch_size=8,
        device="cpu", part_tokens=1 << 16, progress=False, **spec.options,
    )  # fmt: skip
    done = out / "manifest.json"
    t0 = time.perf_counter()
    summary = dump(dataclasses.replace(opts, overwrite=not done.is_file()))
    seconds = time.perf_counter() - t0
    by_array = bytes_by_array(open_cache(out))
    return {
        "path": out,
        "tokens": summary.manifest.tokens,
        "bytes_per_token": summary.bytes_per_token,
        "by_array": {k: v / summary.manifest.tokens for k, v in by_array.items()},
        "dump_seconds": seconds,
    }


# --------------------------------------------------------------------------------------------
# Students
# --------------------------------------------------------------------------------------------


class OnlineTeacher:
    """The teacher in the loop, full distribution: `loss_fn` gives `trainer.fit` its loss."""

    def __init__(self, teacher_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32)
        self.model.eval()

    def loss_fn(
        self, alpha: float, temperature: float, loss: str = DEFAULT_LOSS, beta: float = DEFAULT_BETA
    ):
        """A `trainer.LossFn`: CE on the labels mixed with the dense divergence `loss` against
        this teacher."""
        import torch

        from trainer.losses import LossParts, dense_divergence, hard_label_loss

        def loss_fn(logits, b) -> LossParts:
            with torch.no_grad():
                teacher = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            labels = b["labels"]
            ce = hard_label_loss(logits, labels).loss
            kd = dense_divergence(
                logits, teacher.logits, labels, loss=loss, beta=beta, temperature=temperature
            )
            total = alpha * ce + (1.0 - alpha) * temperature**2 * kd
            return LossParts(loss=total, ce=ce.detach(), kd=kd.detach())

        return loss_fn


def train_student(
    name: str, cache: Path, student_cfg: Path, steps: int, work: Path, *, alpha: float,
    tail: str = DEFAULT_TAIL, loss: str = DEFAULT_LOSS, online: OnlineTeacher | None = None,
) -> dict[str, Any]:  # fmt: skip
    from trainer.fit import FitConfig, fit

    out = work / "runs" / name
    config = FitConfig(
        cache=str(cache), student=str(student_cfg), out=str(out), alpha=alpha, tail=tail,
        loss=loss, batch_size=BATCH, steps=steps, eval_fraction=0.0, eval_every=0,
        checkpoint_every=0, log_every=10, device="cpu", progress=False, overwrite=True, seed=0,
    )  # fmt: skip
    loss_fn = None
    if online is not None:
        loss_fn = online.loss_fn(config.alpha, config.temperature, config.loss, config.beta)
    cpu = time.process_time()
    fit(config, loss_fn=loss_fn)
    cpu = time.process_time() - cpu
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    train = [r for r in rows if r.get("kind") == "train"]
    tokens = sum(r["tokens"] for r in train)
    seconds = train[-1]["elapsed_s"] if train else float("nan")
    return {
        "model": out / "model",
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "tokens_per_cpu_s": tokens / cpu,
    }


def evaluate(model_dir: Path, teacher, heldout, batch: int = 8) -> dict[str, float]:
    """Held-out CE, exact KL(teacher || student), ECE (15 bins) and top-1 agreement."""
    import torch
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    bins = 15
    conf_sum = torch.zeros(bins, dtype=torch.float64)
    acc_sum = torch.zeros(bins, dtype=torch.float64)
    n_bin = torch.zeros(bins, dtype=torch.float64)
    ce = kl = agree = 0.0
    count = 0
    with torch.no_grad():
        for start in range(0, len(heldout), batch):
            ids = heldout[start : start + batch]
            t = torch.log_softmax(teacher(input_ids=ids).logits.float(), -1)[:, :-1]
            s = torch.log_softmax(student(input_ids=ids).logits.float(), -1)[:, :-1]
            labels = ids[:, 1:]
            ce += float(-s.gather(-1, labels[..., None]).sum())
            kl += float((t.exp() * (t - s)).sum())
            conf, pred = s.max(-1)
            agree += float((pred == t.argmax(-1)).sum())
            conf = conf.exp().flatten().double()
            right = (pred == labels).flatten().double()
            which = (conf * bins).long().clamp(max=bins - 1)
            conf_sum += torch.zeros(bins, dtype=torch.float64).index_add_(0, which, conf)
            acc_sum += torch.zeros(bins, dtype=torch.float64).index_add_(0, which, right)
            n_bin += torch.bincount(which, minlength=bins).double()
            count += labels.numel()
    ece = float((conf_sum - acc_sum).abs().sum()) / count
    return {"ce": ce / count, "kl": kl / count, "ece": ece, "top1": agree / count}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    markers = {"renorm": "v", "bucket": "o", "label": "s", "-": "D"}
    for ax, key, label in ((axes[0], "kl", "held-out KL(teacher || student), nats/token"),
                           (axes[1], "ce", "held-out CE, nats/token")):  # fmt: skip
        for row in rows:
            forward = row["loss"] == DEFAULT_LOSS
            text = row["name"] if forward else f"{row['name']} {row['loss']}"
            if row["bytes_per_token"] is None:
                online = row["name"] == "online KD"
                style = ("--" if forward else "-.") if online else ":"
                color = ("black" if forward else "tab:gray") if online else "tab:red"
                ax.axhline(row[key], linestyle=style, color=color, label=text)
                continue
            kind = "tab:blue" if row["name"].startswith("topk") else "tab:green"
            ax.scatter(row["bytes_per_token"], row[key], color=kind, alpha=1 if forward else 0.5,
                       marker=markers.get(row["tail"], "o"))  # fmt: skip
            ax.annotate(f"{text} {row['tail']}", (row["bytes_per_token"], row[key]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")  # fmt: skip
        ax.set_xscale("log")
        ax.set(xlabel="cache bytes/token (all included)", ylabel=label)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def targets_report(rows: list[dict[str, Any]], caches: dict[str, dict]) -> list[str]:
    """The issue's targets, each met or missed with the measured figure (forward KL, as the
    targets were set), then each other loss's best cached row against its own online row."""
    forward = [r for r in rows if r["loss"] == DEFAULT_LOSS]
    online = next(r for r in forward if r["name"] == "online KD")
    hard = next(r for r in rows if r["name"] == "hard labels")
    cached = [r for r in forward if r["bytes_per_token"] is not None]
    best = min(cached, key=lambda r: r["kl"])
    kl_gap = best["kl"] / online["kl"] - 1
    ce_gap = best["ce"] / online["ce"] - 1
    met = kl_gap <= 0.01 and ce_gap <= 0.01 and best["kl"] < hard["kl"] and best["ce"] < hard["ce"]
    lines = [
        f"- Best cached kind within 1% of online KD on held-out KL and CE: "
        f"**{'met' if met else 'missed'}**: {best['name']} ({best['tail']}) KL {best['kl']:.4f} "
        f"({kl_gap:+.1%} vs online {online['kl']:.4f}), CE {best['ce']:.4f} ({ce_gap:+.1%} vs "
        f"{online['ce']:.4f}); hard labels KL {hard['kl']:.4f}, CE {hard['ce']:.4f}."
    ]
    if "sample64" in caches:
        b = caches["sample64"]["bytes_per_token"]
        lines.append(
            f"- Sampled N=64 at most 40 B/token all included: **{'met' if b <= 40 else 'missed'}**"
            f": {b:.1f} B/token."
        )
    for name in ("topk64", "topk64-q8"):
        if name in caches:
            b = caches[name]["bytes_per_token"]
            lines.append(
                f"- Top-k k=64 ({name}) at most 96 B/token all included: "
                f"**{'met' if b <= 96 else 'missed'}**: {b:.1f} B/token."
            )
    for loss in OTHER_LOSSES:
        own = [r for r in rows if r["loss"] == loss]
        on = next((r for r in own if r["name"] == "online KD"), None)
        kept = [r for r in own if r["bytes_per_token"] is not None]
        if on is None or not kept:
            continue
        b = min(kept, key=lambda r: r["kl"])
        lines.append(
            f"- `--loss {loss}` (reported; no target set): best cached {b['name']} ({b['tail']}) KL "
            f"{b['kl']:.4f} ({b['kl'] / on['kl'] - 1:+.1%} vs its online {on['kl']:.4f}), CE "
            f"{b['ce']:.4f} ({b['ce'] / on['ce'] - 1:+.1%} vs {on['ce']:.4f})."
        )
    return lines


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--teacher-seconds", type=float, default=900.0,
                   help="Teacher training wall time when it must be built [900].")  # fmt: skip
    p.add_argument("--student-tokens", type=int, default=819_200,
                   help="Training tokens per student (steps of 8 x 256 tokens) [819200].")  # fmt: skip
    p.add_argument("--heldout-tokens", type=int, default=32_768,
                   help="Held-out tokens for the evaluation [32768].")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="Smoke run; RESULTS.md untouched.")
    p.add_argument("--work", type=Path, default=WORK, help="Work directory (gitignored).")
    p.add_argument("--only", default="",
                   help="Comma-separated rows to run: a name (all its tails and losses), "
                        "name/tail or name/tail/loss.")  # fmt: skip
    p.add_argument("--teacher-from", type=Path,
                   help="Use this finished teacher directory as is (no training).")  # fmt: skip
    p.add_argument("--section", default="bench_fidelity",
                   help="RESULTS.md marker section (and PNG name) to write [bench_fidelity].")  # fmt: skip
    p.add_argument("--no-write", action="store_true", help="Do not touch RESULTS.md / the PNG.")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
        args.work = args.work.with_name(args.work.name + "-quick")
        args.no_write = True
    return args


def main(argv: list[str] | None = None) -> None:
    import torch

    from logitcache.testing import toy

    args = parse_args(argv)
    started, t_start = now_utc(), time.perf_counter()
    load_before = loadavg()
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    if args.teacher_from:
        teacher_dir = args.teacher_from
    else:
        log(f"teacher ({args.teacher_seconds:.0f} s budget if it must be trained)")
        teacher_dir = ensure_teacher(args.teacher_seconds, work)
    info = toy.read_info(teacher_dir) or {}
    steps = max(1, args.student_tokens // (BATCH * SEQ_LEN))
    corpus_tokens = steps * BATCH * SEQ_LEN + SEQ_LEN * BATCH
    corpus = work / "corpus-train"
    write_corpus(corpus, teacher_dir, "train", corpus_tokens)
    heldout = heldout_sequences(teacher_dir, args.heldout_tokens)
    student_cfg = work / "student.json"
    student_cfg.write_text(toy.build_student_config(teacher_dir, **STUDENT).to_json_string())

    runs: list[tuple[str, str, str, dict[str, Any]]] = [
        ("hard labels", "-", "topk8", {"alpha": 1.0, "loss": DEFAULT_LOSS}),
        *[("online KD", "-", "topk8", {"alpha": 0.5, "online": True, "loss": loss})
          for loss in LOSSES],
    ]  # fmt: skip
    for spec in cache_specs(args.quick):
        runs += [(spec.name, tail, spec.name, {"alpha": 0.5, "tail": tail, "loss": DEFAULT_LOSS})
                 for tail in spec.tails]  # fmt: skip
        runs += [(spec.name, tail, spec.name, {"alpha": 0.5, "tail": tail, "loss": loss})
                 for loss in OTHER_LOSSES for tail in spec.loss_tails]  # fmt: skip
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    runs = [
        r for r in runs
        if not only or {r[0], f"{r[0]}/{r[1]}", f"{r[0]}/{r[1]}/{r[3]['loss']}"} & only
    ]  # fmt: skip

    caches: dict[str, dict[str, Any]] = {}
    for spec in cache_specs(args.quick):
        if any(r[2] == spec.name for r in runs):
            log(f"dump {spec.name}")
            caches[spec.name] = dump_cache(spec, teacher_dir, corpus, work)
            log(f"  {caches[spec.name]['bytes_per_token']:.1f} B/token")

    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    rows = []
    for name, tail, cache_name, kw in runs:
        loss = kw["loss"]
        log(f"student {name} ({tail}, {loss})")
        online = OnlineTeacher(teacher_dir) if kw.pop("online", False) else None
        cache = caches[cache_name]["path"]
        suffix = "" if loss == DEFAULT_LOSS else f"-{loss}"  # forward-KL runs keep their names
        run_name = f"{name}-{tail}{suffix}".replace(" ", "_")
        trained = train_student(run_name, cache, student_cfg, steps, work, online=online, **kw)
        metrics = evaluate(trained["model"], teacher, heldout)
        is_cache = name not in ("hard labels", "online KD")
        rows.append(
            {
                "name": name,
                "tail": tail,
                "loss": loss,
                **metrics,
                "bytes_per_token": caches[cache_name]["bytes_per_token"] if is_cache else None,
                "tokens_per_s": trained["tokens_per_s"],
                "tokens_per_cpu_s": trained["tokens_per_cpu_s"],
                "tokens": trained["tokens"],
            }
        )
        log(f"  CE {metrics['ce']:.4f} KL {metrics['kl']:.4f} top1 {metrics['top1']:.3f}")

    total_minutes = (time.perf_counter() - t_start) / 60
    table = markdown_table(
        [
            "student",
            "tail",
            "loss",
            "held-out CE",
            "held-out KL",
            "ECE",
            "top-1 agr.",
            "cache B/token",
            "train tok/s",
            "train tok/CPU-s",
        ],
        [
            [
                r["name"],
                r["tail"],
                r["loss"],
                f"{r['ce']:.4f}",
                f"{r['kl']:.4f}",
                f"{r['ece']:.4f}",
                f"{r['top1']:.3f}",
                "-" if r["bytes_per_token"] is None else f"{r['bytes_per_token']:.1f}",
                f"{r['tokens_per_s']:,.0f}",
                f"{r['tokens_per_cpu_s']:,.0f}",
            ]
            for r in rows
        ],
    )
    cache_table = markdown_table(
        ["cache", "dump options", "B/token", "by array (B/token)"],
        [
            [
                name,
                json.dumps(spec.options),
                f"{c['bytes_per_token']:.1f}",
                ", ".join(
                    f"{k} {v:.1f}" for k, v in sorted(c["by_array"].items(), key=lambda x: -x[1])
                ),
            ]
            for spec in cache_specs(args.quick)
            if spec.name in caches
            for name, c in [(spec.name, caches[spec.name])]
        ],
    )
    print(table)
    print(cache_table)
    if not all(n in {r["name"] for r in rows if r["loss"] == DEFAULT_LOSS}
               for n in ("online KD", "hard labels")):  # fmt: skip
        return
    verdicts = targets_report(rows, caches)
    print("\n".join(verdicts))
    if args.no_write:
        return
    train_info = info.get("train", {})
    title = (
        f"bench_fidelity {started}: teacher {TEACHER['n_layer']}x{TEACHER['n_embd']} "
        f"({train_info.get('seconds', 0):.0f} s, final loss {train_info.get('final_loss')}), "
        f"student {STUDENT['n_layer']}x{STUDENT['n_embd']}, {steps} steps x {BATCH} x {SEQ_LEN}"
    )
    png = PLOT.with_name(f"{args.section.removeprefix('bench_')}.png")
    plot(rows, png, title)
    body = "\n\n".join(
        [
            "## Fidelity per byte (`bench_fidelity.py`)",
            f"- date: {started}; total {total_minutes:.1f} min; load average before "
            f"{load_before}, after {loadavg()}\n- machine: {machine_line()}\n- command: "
            f"`{command_line()}`",
            f"Teacher: GPT-2 {TEACHER['n_layer']} x {TEACHER['n_embd']} (non-embedding "
            f"{_non_embedding(teacher) / 1e6:.2f}M parameters), byte-level BPE of "
            f"{info.get('vocab_size_actual')} ids, trained {train_info.get('steps')} steps "
            f"({train_info.get('seconds')} s, {train_info.get('tokens')} tokens) on the stdlib "
            f"train split to loss {train_info.get('final_loss')}. Student: GPT-2 "
            f"{STUDENT['n_layer']} x {STUDENT['n_embd']} ({_student_non_embedding(student_cfg) / 1e6:.2f}M "
            f"non-embedding). Every student: seed 0, {steps} steps of {BATCH} x {SEQ_LEN} "
            f"tokens ({steps * BATCH * SEQ_LEN:,} tokens, same sequences in the same order), "
            "`trainer.fit` defaults otherwise (AdamW lr 3e-4 cosine to 3e-5, alpha 0.5, T 1, "
            f"loss forward KL; gjsd rows at beta {DEFAULT_BETA}). "
            f"Held-out: {heldout.numel():,} tokens of stdlib files that no cache and no "
            "training saw; KL is exact over the full vocabulary against the teacher.",
            table,
            "Caches (one `dump` each over the same training text; bytes/token counts every "
            "file, manifest included):",
            cache_table,
            "Targets:\n\n" + "\n".join(verdicts),
            f"![quality against bytes/token]({png.name})",
        ]
    )
    update_results(args.section, body)
    log(f"wrote {RESULTS} and {png}")


def _non_embedding(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "wte" not in n and "wpe" not in n)


def _student_non_embedding(config_path: Path) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(config_path)))
    return _non_embedding(model)


if __name__ == "__main__":
    main()

_ = math  # used in formulas of derived scripts
