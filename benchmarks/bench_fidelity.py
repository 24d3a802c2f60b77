"""Fidelity per byte: students distilled from caches of every target kind, against online KD.

    python benchmarks/bench_fidelity.py                       # the realistic regime (~90 min, 2 cores)
    python benchmarks/bench_fidelity.py --regime long         # realistic, students to convergence
    python benchmarks/bench_fidelity.py --regime weak         # the earlier weak-teacher regime
    python benchmarks/bench_fidelity.py --quick               # smoke run (minutes), no RESULTS.md
    python benchmarks/bench_fidelity.py --report              # rewrite RESULTS.md from stored rows

Three regimes on the same real text (the Python standard library's sources, split by file into
train and held-out by `logitcache.testing.toy`), with a byte-level BPE of 8192 ids:

``realistic`` (section ``bench_fidelity_realistic``): the regime users live in. A GPT-2 4x256
teacher trained for 3,000 cosine-annealed steps, much stronger than the 2x96 students (held-out
CE more than 1 nat below the hard-label student's) and peaked like a real LM (about 3 nats of
entropy per position). Every row at alpha 0 (pure KD, where the bias of a target kind shows)
and at the trainer's default alpha 0.5; the loss variants as rows of their own.
``long`` (section ``bench_fidelity_long``): the realistic regime's teacher, text and caches, with
students trained four times as long (four epochs over the cached text, lr 1e-3): the rows whose
400-step gaps decide the defaults, run until their KL trajectories flatten.
``weak`` (section ``bench_fidelity``): the 3x192 teacher of the first benchmark (900 s of
training, about 5 nats of entropy), alpha 0.5 only; kept as the second section.

For each regime:

1. the teacher is trained once, saved and reused by later runs with the same settings
   (``benchmarks/.work/fidelity-<regime>/teacher``);
2. one ``logitcache dump`` of the training text per target setting, bytes/token measured on
   disk with everything included (input ids, offsets, metadata, manifest), CPU-seconds timed;
3. students from the same initialisation (seed), on the same sequences in the same order, for
   the same steps (`trainer.fit` defaults except alpha, tail, loss and the step count): hard
   labels only (alpha 1); online KD with the teacher in the loop and the full distribution (this
   script's `loss_fn` for `trainer.fit`; the trainer package never imports a teacher); and one
   per cache, tail mode and loss;
4. each student measured on held-out files against the teacher's **full** distribution
   (`fidelity_eval.HeldOut`): CE on the real next tokens, exact KL(teacher || student), ECE of
   the student's top-1 (15 bins) and top-1 agreement; also every ``probe_every`` steps along the
   run (the KL trajectory), outside the timed window.

Rows are stored one JSON file each under the work directory as they finish, so an interrupted
run continues where it stopped and ``--report`` rewrites the section from what is there. Full
runs write ``benchmarks/RESULTS.md``, ``benchmarks/fidelity_<regime>.json`` (the rows, their KL
trajectories and the caches' sizes, under the settings' fingerprint) and
``benchmarks/fidelity.png`` (quality against bytes/token, every regime run). A row or cache missing
from the work directory (a fresh checkout) is taken from that committed JSON when the
fingerprint matches, so adding a cache and running ``--only`` its rows trains nothing else and
the report still holds every row.
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
from fidelity_eval import HeldOut, load_model, non_embedding_params

HERE = Path(__file__).resolve().parent
PLOT = HERE / "fidelity.png"
WORK_ROOT = HERE / ".work"
SEQ_LEN = 256
BATCH = 8  # sequences per step, for every student
#: Bump when what a stored row means changes (its measures, its training), so old rows rerun.
ROW_VERSION = 2
#: How far a committed JSON's teacher measures (held-out CE, entropy, ...) may be from this
#: teacher's for its rows to count as this teacher's: float rounding of the evaluation, not of
#: the training (another machine's teacher differs by ~5e-3 nats).
TEACHER_TOLERANCE = 1e-3

#: The weak regime's teacher (`toy.ensure_teacher` settings); also what bench_storage reads.
TEACHER = {
    "vocab_size": 8192, "n_layer": 3, "n_embd": 192, "n_head": 4, "n_positions": 256,
    "seq_len": 256, "batch_size": 8, "lr": 2e-3, "seed": 0,
}  # fmt: skip
#: The realistic regime's teacher: deeper and wider, and annealed, so it ends strong and peaked.
STRONG_TEACHER = {
    "vocab_size": 8192, "n_layer": 4, "n_embd": 256, "n_head": 4, "n_positions": 256,
    "seq_len": 256, "batch_size": 8, "lr": 1.5e-3, "lr_schedule": "cosine",
    "warmup_steps": 200, "seed": 0, "train_steps": 3000,
}  # fmt: skip
#: The student of both regimes: `toy.build_student_config` settings (vocabulary from the teacher).
STUDENT = {"n_layer": 2, "n_embd": 96, "n_head": 2, "n_positions": 256}


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """One cache: a name, the `DumpOptions` fields that differ from the defaults, and the tail
    modes its students train with (sampled targets: one, since counts / N carry all the mass
    and the modes coincide)."""

    name: str
    options: dict[str, Any]
    tails: tuple[str, ...] = ("renorm", "bucket", "label")


def topk(k: int, dtype: str = "float16") -> CacheSpec:
    return CacheSpec(f"topk{k}", {"targets": "topk", "top_k": k, "logprob_dtype": dtype})


def sample(n: int, tail: str = "renorm") -> CacheSpec:
    return CacheSpec(f"sample{n}", {"targets": "sample", "samples": n}, (tail,))


def topp(p: float, max_k: int) -> CacheSpec:
    """Top-p targets: per position the fewest ids reaching `p`, at most `max_k`; the tail is
    exact, as for top-k, so the first (cheapest) tail mode is the one run by default."""
    return CacheSpec(f"topp{p:g}-max{max_k}",
                     {"targets": "topp", "top_p": p, "max_k": max_k, "min_k": 1})  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Run:
    """One student: which cache feeds it, with what objective."""

    name: str  # "hard labels", "online KD" or the cache's name
    cache: str  # the cache it reads (the baselines read only its ids and labels)
    alpha: float
    tail: str = "-"
    loss: str = "forward_kl"
    beta: float = 0.5
    online: bool = False

    @property
    def is_cached(self) -> bool:
        return self.name not in ("hard labels", "online KD")

    @property
    def objective(self) -> str:
        return f"gjsd b{self.beta:g}" if self.loss == "gjsd" else self.loss

    @property
    def key(self) -> str:
        return f"{self.name}-{self.tail}-{self.objective}-a{self.alpha:g}".replace(" ", "_")


@dataclasses.dataclass(frozen=True)
class Regime:
    name: str
    section: str  # RESULTS.md section
    teacher: dict[str, Any]  # `toy.ensure_teacher` settings, budget included
    steps: int  # per student, of BATCH x SEQ_LEN tokens
    alphas: tuple[float, ...]
    caches: tuple[CacheSpec, ...]
    losses: tuple[tuple[str, float], ...]  # (loss, beta) rows on `loss_cache`, every alpha
    loss_cache: str
    heldout_tokens: int
    probe_every: int
    #: Steps' worth of training text (None: `steps`); fewer than `steps` means several epochs
    #: over the same cache, which is how a cache is used once it exists.
    text_steps: int | None = None
    #: The students' peak learning rate (None: `trainer.fit`'s default); cosine to a tenth.
    lr: float | None = None
    #: The regime whose work directory (teacher, text, caches) this one shares, so that the
    #: same caches feed both; its rows are kept apart, under ``rows-NAME/``.
    shares: str | None = None

    def runs(self) -> list[Run]:
        """Every student, the ones a decision rests on first: the baselines and each kind at
        its cheapest tail at every alpha; then, alpha by alpha, the loss variants and the
        other tails."""
        base = self.caches[0].name
        runs = [Run("hard labels", base, 1.0)]
        for alpha in self.alphas:
            runs.append(Run("online KD", base, alpha, online=True))
            runs += [Run(c.name, c.name, alpha, c.tails[0]) for c in self.caches]
        tail = next(c.tails[0] for c in self.caches if c.name == self.loss_cache)
        for alpha in self.alphas:
            runs += [Run(self.loss_cache, self.loss_cache, alpha, tail, loss, beta)
                     for loss, beta in self.losses]  # fmt: skip
            runs += [Run(c.name, c.name, alpha, t) for c in self.caches for t in c.tails[1:]]
        return runs


REGIMES = {
    "realistic": Regime(
        name="realistic", section="bench_fidelity_realistic", teacher=STRONG_TEACHER,
        steps=400, alphas=(0.0, 0.5),
        caches=(sample(64), sample(32), sample(16), topk(32), topk(64), topk(8),
                topp(0.5, 64), topp(0.7, 128)),
        losses=(("reverse_kl", 0.5), ("gjsd", 0.5), ("tvd", 0.5)), loss_cache="sample64",
        heldout_tokens=16_384, probe_every=50,
    ),
    "weak": Regime(
        name="weak", section="bench_fidelity", teacher={**TEACHER, "train_seconds": 900.0},
        steps=400, alphas=(0.5,),
        caches=(topk(8), topk(32), topk(64),
                dataclasses.replace(topk(64, "uint8"), name="topk64-q8", tails=("renorm", "bucket")),
                sample(16, "bucket"), sample(64, "bucket")),
        losses=(), loss_cache="sample64", heldout_tokens=32_768, probe_every=100,
    ),
    # The realistic regime's teacher, text and caches, with students trained four times as
    # long (four epochs over the same cached text) at a higher learning rate, so that their
    # trajectories flatten: do the gaps of the 400-step rows survive training to convergence?
    "long": Regime(
        name="long", section="bench_fidelity_long", teacher=STRONG_TEACHER,
        steps=1600, alphas=(0.0,),
        caches=(sample(64), dataclasses.replace(topk(64), tails=("bucket", "renorm"))),
        losses=(), loss_cache="sample64", heldout_tokens=16_384, probe_every=200,
        text_steps=400, lr=1e-3, shares="realistic",
    ),
}  # fmt: skip


def quick(regime: Regime) -> Regime:
    """A smoke run of `regime`: a tiny teacher budget, its first and last caches, few steps."""
    teacher = {k: v for k, v in regime.teacher.items() if k not in ("train_steps", "train_seconds")}
    caches = (regime.caches[0], regime.caches[-1])
    steps = 20
    return dataclasses.replace(
        regime, name=regime.name + "-quick", teacher={**teacher, "train_steps": 30},
        steps=steps, caches=caches, loss_cache=caches[0].name, heldout_tokens=4_096,
        probe_every=10, shares=regime.shares and regime.shares + "-quick",
        text_steps=regime.text_steps and regime.text_steps * steps // regime.steps,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Teacher and text (bench_storage.py uses them too)
# --------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def ensure_teacher(teacher_seconds: float, work: Path = WORK_ROOT / "fidelity") -> Path:
    """The weak regime's teacher with a wall-time budget (bench_storage's teacher)."""
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
    """Dump (or reuse) one cache; its size and the CPU-seconds its dump took."""
    from logitcache.dumping.pipeline import DumpOptions, dump
    from logitcache.read.reader import open as open_cache
    from logitcache.read.stats import bytes_by_array

    out = work / "caches" / spec.name
    stamp = work / "caches" / f"{spec.name}.dump.json"
    wanted = {"options": spec.options, "teacher": str(teacher_dir), "corpus": str(corpus)}
    if (out / "manifest.json").is_file() and stamp.is_file():
        done = json.loads(stamp.read_text())
        if done.get("wanted") == wanted:
            return {**done["result"], "path": out}
    opts = DumpOptions(
        data=str(corpus), out=out, teacher=str(teacher_dir), seq_len=SEQ_LEN, batch_size=8,
        device="cpu", part_tokens=1 << 16, progress=False, overwrite=True, **spec.options,
    )  # fmt: skip
    wall, cpu = time.perf_counter(), time.process_time()
    summary = dump(opts)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    tokens = summary.manifest.tokens
    by_array = bytes_by_array(open_cache(out))
    result = {
        "tokens": tokens,
        "bytes_per_token": summary.bytes_per_token,
        "by_array": {k: v / tokens for k, v in by_array.items()},
        "dump_seconds": wall,
        "dump_cpu_seconds": cpu,
    }
    stamp.write_text(json.dumps({"wanted": wanted, "result": result}, indent=1))
    return {**result, "path": out}


# --------------------------------------------------------------------------------------------
# Students
# --------------------------------------------------------------------------------------------


class OnlineTeacher:
    """The teacher in the loop, full distribution: `loss_fn` gives `trainer.fit` its loss."""

    def __init__(self, teacher_dir: Path) -> None:
        self.model = load_model(teacher_dir)

    def loss_fn(self, alpha: float, temperature: float):
        """A `trainer.LossFn`: CE on the labels mixed with dense KL against this teacher."""
        import torch

        from trainer.losses import LossParts, dense_kd_loss, hard_label_loss

        def loss(logits, b) -> LossParts:
            with torch.no_grad():
                teacher = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            labels = b["labels"]
            ce = hard_label_loss(logits, labels).loss
            kd = dense_kd_loss(logits, teacher.logits, labels, temperature=temperature)
            total = alpha * ce + (1.0 - alpha) * temperature**2 * kd
            return LossParts(loss=total, ce=ce.detach(), kd=kd.detach())

        return loss


def train_student(
    run: Run, cache: Path, student_cfg: Path, regime: Regime, work: Path, heldout: HeldOut,
    teacher_dir: Path,
) -> dict[str, Any]:  # fmt: skip
    """Train one student, measuring it every `probe_every` steps; its final measures, its
    trajectory and its training cost (wall and CPU seconds, the probes' own time excluded)."""
    from trainer.recipe import FitConfig, fit

    steps, probe_every = regime.steps, regime.probe_every
    out = work / "runs" / run.key
    variant = {} if run.loss == "forward_kl" else {"loss": run.loss, "beta": run.beta}
    if regime.lr is not None:
        variant |= {"lr": regime.lr, "min_lr": regime.lr / 10}
    config = FitConfig(
        cache=str(cache), student=str(student_cfg), out=str(out), alpha=run.alpha,
        tail=run.tail if run.is_cached else "renorm", batch_size=BATCH, steps=steps,
        eval_fraction=0.0, eval_every=0, checkpoint_every=0, log_every=10, device="cpu",
        progress=False, overwrite=True, seed=0, **variant,
    )  # fmt: skip
    online = OnlineTeacher(teacher_dir) if run.online else None
    loss_fn = None if online is None else online.loss_fn(config.alpha, config.temperature)
    trajectory: list[dict[str, float]] = []
    probe_wall = probe_cpu = 0.0

    def probe(step: int, model) -> None:
        nonlocal probe_wall, probe_cpu
        if step % probe_every and step != steps:
            return
        wall, cpu = time.perf_counter(), time.process_time()
        trajectory.append({"step": step, **heldout.measure(model)})
        probe_wall += time.perf_counter() - wall
        probe_cpu += time.process_time() - cpu

    wall, cpu = time.perf_counter(), time.process_time()
    fit(config, loss_fn=loss_fn, after_step=probe)
    wall = time.perf_counter() - wall - probe_wall
    cpu = time.process_time() - cpu - probe_cpu
    tokens = steps * BATCH * SEQ_LEN
    return {
        **{k: v for k, v in trajectory[-1].items() if k != "step"},
        "trajectory": trajectory,
        "tokens": tokens,
        "train_seconds": wall,
        "train_cpu_seconds": cpu,
        "tokens_per_s": tokens / wall,
    }


# --------------------------------------------------------------------------------------------
# The decision and the economics
# --------------------------------------------------------------------------------------------


def gaps(row: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[float, float] | None:
    """(CE, KL) of `row` relative to online KD at the same alpha: +0.01 is 1% worse."""
    online = next((r for r in rows if r["name"] == "online KD" and r["alpha"] == row["alpha"]),
                  None)  # fmt: skip
    if online is None:
        return None
    return row["ce"] / online["ce"] - 1, row["kl"] / online["kl"] - 1


def choose_default(rows: list[dict[str, Any]], alphas: tuple[float, ...]) -> dict[str, Any]:
    """The README's rule: the smallest cache whose student (forward KL, the kind's cheapest
    tail) comes within 1% of online KD on held-out CE and KL at every alpha; if none does, the
    one whose worst gap per byte is smallest. Returns the cache, its gaps and whether it met."""
    by_cache: dict[tuple[str, str], dict[float, dict[str, Any]]] = {}
    for r in rows:
        if r["kind"] == "cache" and r["loss"] == "forward_kl":
            by_cache.setdefault((r["name"], r["tail"]), {})[r["alpha"]] = r
    candidates = []
    for (name, tail), per_alpha in by_cache.items():
        if set(per_alpha) != set(alphas):
            continue
        worst = max(max(gaps(r, rows) or (math.inf, math.inf)) for r in per_alpha.values())
        size = next(iter(per_alpha.values()))["bytes_per_token"]
        candidates.append({"cache": name, "tail": tail, "worst_gap": worst,
                           "bytes_per_token": size, "met": worst <= 0.01})  # fmt: skip
    if not candidates:
        return {}
    met = [c for c in candidates if c["met"]]
    if met:
        return min(met, key=lambda c: c["bytes_per_token"])
    return min(candidates, key=lambda c: max(c["worst_gap"], 1e-6) * c["bytes_per_token"])


def economics(rows: list[dict[str, Any]], caches: dict[str, dict], choice: dict, alpha: float):
    """CPU-seconds of one dump, one cached student and one online student, and the number of
    students from which dump + S cached students cost less than S online students."""
    cached = next((r for r in rows if r["kind"] == "cache" and r["name"] == choice.get("cache")
                   and r["tail"] == choice.get("tail") and r["alpha"] == alpha
                   and r["loss"] == "forward_kl"), None)  # fmt: skip
    online = next((r for r in rows if r["name"] == "online KD" and r["alpha"] == alpha), None)
    hard = next((r for r in rows if r["name"] == "hard labels"), None)
    if cached is None or online is None or choice.get("cache") not in caches:
        return None
    dump_cpu = caches[choice["cache"]]["dump_cpu_seconds"]
    saved = online["train_cpu_seconds"] - cached["train_cpu_seconds"]
    return {
        "cache": choice["cache"],
        "dump_cpu": dump_cpu,
        "cached_cpu": cached["train_cpu_seconds"],
        "online_cpu": online["train_cpu_seconds"],
        "hard_cpu": hard["train_cpu_seconds"] if hard else None,
        "break_even": math.floor(dump_cpu / saved) + 1 if saved > 0 else None,
        "ratio": cached["train_cpu_seconds"] / online["train_cpu_seconds"],
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def row_label(r: dict[str, Any]) -> str:
    return r["name"] if r["objective"] == "forward_kl" else f"{r['name']} {r['objective']}"


def results_table(rows: list[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        g = gaps(r, rows) if r["kind"] != "hard" else None
        body.append([
            row_label(r), r["tail"], f"{r['alpha']:g}", f"{r['ce']:.4f}",
            "-" if g is None else f"{g[0]:+.1%}", f"{r['kl']:.4f}",
            "-" if g is None else f"{g[1]:+.1%}", f"{r['ece']:.4f}", f"{r['top1']:.3f}",
            "-" if r["bytes_per_token"] is None else f"{r['bytes_per_token']:.1f}",
            f"{r['tokens_per_s']:,.0f}", f"{r['train_cpu_seconds']:,.0f}",
        ])  # fmt: skip
    return markdown_table(
        ["student", "tail", "alpha", "held-out CE", "CE vs online", "held-out KL",
         "KL vs online", "ECE", "top-1 agr.", "cache B/token", "train tok/s", "train CPU-s"],
        body,
    )  # fmt: skip


def trajectory_table(rows: list[dict[str, Any]]) -> str:
    """Held-out KL along the run of the baselines and each kind's cheapest-tail student."""
    shown = [r for r in rows if r["loss"] == "forward_kl" and r.get("first_tail", True)]
    steps = [p["step"] for p in shown[0]["trajectory"]] if shown else []
    return markdown_table(
        ["student", "alpha", *[f"KL @ {s}" for s in steps]],
        [[row_label(r), f"{r['alpha']:g}", *[f"{p['kl']:.3f}" for p in r["trajectory"]]]
         for r in shown],
    )  # fmt: skip


def cache_table(caches: dict[str, dict], specs: tuple[CacheSpec, ...]) -> str:
    return markdown_table(
        ["cache", "dump options", "B/token", "dump CPU-s", "by array (B/token)"],
        [[s.name, json.dumps(s.options), f"{c['bytes_per_token']:.1f}",
          f"{c['dump_cpu_seconds']:,.0f}",
          ", ".join(f"{k} {v:.1f}" for k, v in sorted(c["by_array"].items(), key=lambda x: -x[1]))]
         for s in specs if (c := caches.get(s.name))],
    )  # fmt: skip


def plot(regimes: list[tuple[str, list[dict[str, Any]]]], path: Path) -> None:
    """Held-out KL and CE against bytes/token, one row of panels per regime."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(regimes), 2, figsize=(12, 4.6 * len(regimes)), squeeze=False)
    markers = {"renorm": "v", "bucket": "o", "label": "s"}
    for (title, rows), pair in zip(regimes, axes, strict=True):
        alphas = sorted({r["alpha"] for r in rows if r["kind"] != "hard"})
        for ax, key, what in ((pair[0], "kl", "held-out KL(teacher || student)"),
                              (pair[1], "ce", "held-out CE")):  # fmt: skip
            for r in rows:
                filled = r["alpha"] == alphas[0]
                if r["bytes_per_token"] is None:
                    style = {"hard": ":", "online": "--"}[r["kind"]]
                    color = "tab:red" if r["kind"] == "hard" else ("black" if filled else "gray")
                    ax.axhline(r[key], linestyle=style, color=color,
                               label=f"{r['name']} (alpha {r['alpha']:g})")  # fmt: skip
                    continue
                color = {"topk": "tab:blue", "topp": "tab:orange"}.get(r["name"][:4], "tab:green")
                if r["loss"] != "forward_kl":
                    color = "tab:purple"
                ax.scatter(r["bytes_per_token"], r[key], marker=markers.get(r["tail"], "o"),
                           facecolors=color if filled else "none", edgecolors=color)  # fmt: skip
                ax.annotate(f"{row_label(r)} {r['tail']} a{r['alpha']:g}",
                            (r["bytes_per_token"], r[key]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")  # fmt: skip
            ax.set_xscale("log")
            ax.set(xlabel="cache bytes/token (all included)", ylabel=f"{what}, nats/token",
                   title=title)  # fmt: skip
            ax.title.set_fontsize(8)
            ax.legend(fontsize=7)
    fig.suptitle("filled: alpha 0 (pure KD) where both run; hollow: alpha 0.5", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def epochs_note(regime: Regime) -> str:
    """How many passes the students make over the cached text, when more than one."""
    if regime.text_steps is None or regime.text_steps >= regime.steps:
        return ""
    return f", {regime.steps / regime.text_steps:g} epochs over {regime.text_steps} steps' text"


def write_report(regime: Regime, rows, caches, context: dict[str, Any]) -> None:
    """The RESULTS.md section, the rows' JSON next to it, and the plot of every regime."""
    from logitcache.testing import toy
    from trainer.config import FitConfig

    info = toy.read_info(context["teacher_dir"]) or {}
    train = info.get("train", {})
    ts, hard = context["teacher_stats"], next((r for r in rows if r["kind"] == "hard"), None)
    choice = choose_default(rows, regime.alphas)
    alpha = regime.alphas[-1]
    econ = economics(rows, caches, choice, alpha) if choice else None
    missing = [r.key for r in regime.runs() if r.key not in {x["key"] for x in rows}]
    lr = regime.lr or FitConfig.lr
    lines = [
        f"## Fidelity per byte, {regime.name} regime (`bench_fidelity.py --regime {regime.name}`)",
        f"- date: {context['started']}; {context['minutes']:.1f} min in this invocation (rows "
        f"already stored are reused); load average before {context['load_before']}, after "
        f"{loadavg()}\n- machine: {machine_line()}\n- command: `{command_line()}`",
        f"**Teacher**: GPT-2 {regime.teacher['n_layer']} x {regime.teacher['n_embd']} "
        f"({context['teacher_params'] / 1e6:.2f}M non-embedding parameters), byte-level BPE of "
        f"{info.get('vocab_size_actual')} ids, trained once for {train.get('steps')} steps "
        f"({train.get('tokens', 0):,} tokens, {train.get('seconds', 0) / 60:.1f} min on this "
        f"machine) to training loss {train.get('final_loss')}. On the held-out text: **CE "
        f"{ts['ce']:.3f} nats, mean entropy {ts['entropy']:.3f} nats per position**, mean top-1 "
        f"probability {ts['top1_prob']:.3f}; its top 8 / 32 / 64 ids hold {ts['mass_top8']:.3f} "
        f"/ {ts['mass_top32']:.3f} / {ts['mass_top64']:.3f} of the mass"
        + (
            f"; the hard-label student's CE is {hard['ce']:.3f}, {hard['ce'] - ts['ce']:.2f} "
            "nats above the teacher's."
            if hard
            else "."
        ),
        f"**Students**: GPT-2 {STUDENT['n_layer']} x {STUDENT['n_embd']} "
        f"({context['student_params'] / 1e6:.2f}M non-embedding), seed 0, {regime.steps} steps of "
        f"{BATCH} x {SEQ_LEN} tokens ({regime.steps * BATCH * SEQ_LEN:,} tokens, the same "
        f"sequences in the same order{epochs_note(regime)}), `trainer.fit` defaults otherwise "
        f"(AdamW lr {lr:g} cosine to {lr / 10:g}, T 1). Held-out: "
        f"{context['heldout_tokens']:,} tokens of stdlib files that no cache and no training "
        "saw; KL is exact over the full vocabulary. *vs online* is relative to online KD at "
        "the same alpha (+1.0% = 1% worse).",
        results_table(rows),
        "Held-out KL along each run (every student's measure at that step; the baselines and "
        "each kind at its cheapest tail):",
        trajectory_table(rows),
        "Caches (one `dump` each over the same training text; bytes/token counts every file, "
        "manifest included; CPU-seconds of the whole dump, teacher forward included):",
        cache_table(caches, regime.caches),
    ]
    if choice:
        verdict = "met" if choice["met"] else "not met by any cache"
        lines.append(
            f"**The rule** (the smallest cache whose student comes within 1% of online KD on "
            f"held-out CE and KL at alpha {' and '.join(f'{a:g}' for a in regime.alphas)}): "
            f"**{verdict}**: {choice['cache']} ({choice['tail']}), "
            f"{choice['bytes_per_token']:.1f} B/token, worst gap {choice['worst_gap']:+.1%}."
        )
    if econ:
        lines.append(
            f"**Economics** (CPU-seconds on this machine, alpha {alpha:g}, {choice['cache']}): "
            f"one dump {econ['dump_cpu']:,.0f}; one cached student {econ['cached_cpu']:,.0f}; "
            f"one online-KD student {econ['online_cpu']:,.0f}"
            + (f" (hard labels {econ['hard_cpu']:,.0f})" if econ["hard_cpu"] else "")
            + f". A cached student costs {econ['ratio']:.0%} of an online one; dump + S cached "
            f"students cost less than S online students from **S = {econ['break_even']}** on. "
            "On a GPU box the teacher's forward is a smaller share of both, so these ratios are "
            "this CPU's, not a GPU's."
        )
    if missing:
        lines.append("Rows not run yet (rerun the command to add them): " + ", ".join(missing))
    lines.append(f"![quality against bytes/token]({PLOT.name})")
    update_results(regime.section, "\n\n".join(lines))
    table = committed_path(regime)
    sizes = {name: {k: v for k, v in c.items() if k != "path"} for name, c in caches.items()}
    table.write_text(
        json.dumps(
            {
                "regime": regime.name,
                "fingerprint": context["fingerprint"],
                "teacher": ts,
                "caches": sizes,
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    drawn = [(f"{n} regime", json.loads((HERE / f"fidelity_{n}.json").read_text())["rows"])
             for n in REGIMES if (HERE / f"fidelity_{n}.json").is_file()]  # fmt: skip
    plot(drawn, PLOT)
    log(f"wrote {RESULTS}, {table.name} and {PLOT.name}")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def committed_path(regime: Regime) -> Path:
    return HERE / f"fidelity_{regime.name}.json"


def committed(
    regime: Regime, fingerprint: str, teacher_stats: dict[str, float]
) -> tuple[dict[str, dict], dict[str, dict]]:
    """({row key: row}, {cache name: its size and dump cost}) of the committed
    ``fidelity_<regime>.json`` if its rows were measured under `fingerprint` with this very
    teacher, else empty: what a work directory without them (a fresh checkout) reuses instead
    of training again.

    The same settings do not make the same teacher on another CPU: its float rounding differs,
    and 3,000 steps carry the difference into the weights (trained on an AMD EPYC, the
    realistic teacher's held-out CE is 2.913 where the committed rows' was 2.908). Rows of
    two teachers must never share a table, so the teacher's held-out measures must agree too;
    where they do not, the script says so and reuses nothing."""
    path = committed_path(regime)
    doc = json.loads(path.read_text()) if path.is_file() else {}
    if doc.get("fingerprint") != fingerprint:
        return {}, {}
    theirs = doc.get("teacher", {})
    if any(abs(theirs.get(k, math.inf) - v) > TEACHER_TOLERANCE for k, v in teacher_stats.items()):
        log(
            f"{path.name} was measured with another teacher (held-out CE "
            f"{theirs.get('ce', float('nan')):.4f}, this one {teacher_stats['ce']:.4f}): none of "
            "its rows is reused; every row is trained again with this teacher (or pass "
            "--teacher-from the original teacher)"
        )
        return {}, {}
    return {r["key"]: r for r in doc["rows"]}, doc.get("caches", {})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--regime", choices=sorted(REGIMES), default="realistic",
                   help="Which regime to run [realistic].")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="Smoke run; RESULTS.md untouched.")
    p.add_argument("--report", action="store_true",
                   help="Train nothing: rewrite the section from the rows already stored.")  # fmt: skip
    p.add_argument("--only", default="",
                   help="Comma-separated row keys or names to run (see the work dir's rows/).")  # fmt: skip
    p.add_argument("--teacher-from", type=Path,
                   help="Use this finished teacher directory as is (no training).")  # fmt: skip
    p.add_argument("--work", type=Path, help="Work directory [benchmarks/.work/fidelity-REGIME].")
    p.add_argument("--no-write", action="store_true", help="Do not touch RESULTS.md / the PNG.")
    args = p.parse_args(argv)
    args.no_write = args.no_write or args.quick
    return args


def main(argv: list[str] | None = None) -> None:
    import torch

    from logitcache.testing import toy

    args = parse_args(argv)
    regime = REGIMES[args.regime]
    if args.quick:
        regime = quick(regime)
    work: Path = args.work or WORK_ROOT / f"fidelity-{regime.shares or regime.name}"
    if regime.name == "weak" and args.work is None:
        work = WORK_ROOT / "fidelity"  # where the first benchmark kept it (bench_storage too)
    rows_dir = work / ("rows" if regime.shares is None else f"rows-{regime.name}")
    started, t_start, load_before = now_utc(), time.perf_counter(), loadavg()
    rows_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    log(f"teacher ({regime.name} regime; trained only if missing)")
    teacher_dir = args.teacher_from or toy.ensure_teacher(work / "teacher", **regime.teacher)
    corpus = work / "corpus-train"
    text_steps = regime.text_steps or regime.steps
    write_corpus(corpus, teacher_dir, "train", (text_steps + 1) * BATCH * SEQ_LEN)
    teacher = load_model(teacher_dir)
    heldout = HeldOut.build(teacher, heldout_sequences(teacher_dir, regime.heldout_tokens))
    teacher_stats = heldout.teacher_stats()
    log("teacher on held-out: " + ", ".join(f"{k} {v:.3f}" for k, v in teacher_stats.items()))
    student_cfg = work / "student.json"
    student_cfg.write_text(toy.build_student_config(teacher_dir, **STUDENT).to_json_string())
    fingerprint = hashlib.sha1(json.dumps(
        [ROW_VERSION, regime.teacher, STUDENT, regime.steps, regime.heldout_tokens,
         regime.probe_every, (toy.read_info(teacher_dir) or {}).get("settings"),
         *([regime.text_steps, regime.lr] if regime.shares else [])],
        sort_keys=True, default=str).encode()).hexdigest()[:16]  # fmt: skip

    only = {x.strip() for x in args.only.split(",") if x.strip()}
    specs = {c.name: c for c in regime.caches}
    caches: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    old_rows, old_caches = committed(regime, fingerprint, teacher_stats)
    for run in regime.runs():
        stored = rows_dir / f"{run.key}.json"
        row = json.loads(stored.read_text()) if stored.is_file() else old_rows.get(run.key)
        wanted = not only or run.key in only or run.name in only
        if (row is None or row.get("fingerprint") != fingerprint) and wanted and not args.report:
            if run.cache not in caches:
                log(f"dump {run.cache}")
                caches[run.cache] = dump_cache(specs[run.cache], teacher_dir, corpus, work)
                log(f"  {caches[run.cache]['bytes_per_token']:.1f} B/token")
            log(f"student {run.key}")
            trained = train_student(run, caches[run.cache]["path"], student_cfg, regime,
                                    work, heldout, teacher_dir)  # fmt: skip
            spec = specs[run.cache]
            row = {
                "key": run.key, "fingerprint": fingerprint, "name": run.name,
                "kind": "cache" if run.is_cached else ("online" if run.online else "hard"),
                "tail": run.tail, "alpha": run.alpha, "loss": run.loss, "beta": run.beta,
                "objective": run.objective, "first_tail": run.tail in ("-", spec.tails[0]),
                "bytes_per_token": caches[run.cache]["bytes_per_token"] if run.is_cached else None,
                **trained,
            }  # fmt: skip
            stored.write_text(json.dumps(row, indent=1))
            log(f"  CE {row['ce']:.4f} KL {row['kl']:.4f} top1 {row['top1']:.3f} "
                f"({row['train_seconds']:.0f} s)")  # fmt: skip
        if row is not None and row.get("fingerprint") == fingerprint:
            rows.append(row)
    for name in specs:  # sizes and dump costs of caches dumped in earlier runs
        stamp = work / "caches" / f"{name}.dump.json"
        if name not in caches and stamp.is_file():
            caches[name] = json.loads(stamp.read_text())["result"]
        elif name not in caches and name in old_caches:
            caches[name] = old_caches[name]

    print(results_table(rows))
    print(trajectory_table(rows))
    print(cache_table(caches, regime.caches))
    choice = choose_default(rows, regime.alphas)
    print(json.dumps({"choice": choice,
                      "economics": economics(rows, caches, choice, regime.alphas[-1])}))  # fmt: skip
    if args.no_write:
        return
    context = {
        "started": started, "minutes": (time.perf_counter() - t_start) / 60,
        "load_before": load_before, "teacher_dir": teacher_dir, "teacher_stats": teacher_stats,
        "fingerprint": fingerprint,
        "teacher_params": non_embedding_params(teacher), "heldout_tokens": heldout.labels.numel(),
        "student_params": non_embedding_params(_student(student_cfg)),
    }  # fmt: skip
    write_report(regime, rows, caches, context)


def _student(config_path: Path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(config_path)))


if __name__ == "__main__":
    main()
