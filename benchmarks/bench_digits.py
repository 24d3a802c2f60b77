"""Classifier distillation from a cache on data that ships offline: scikit-learn's 8x8 digits.

A CNN teacher (three seeds; their ensemble is reported too) is trained on two thirds of the 1,797
digits with random resized crops; `logitcache dump --task classification` stores the seed-0
teacher's full distribution over the 10 classes on `--views` seeded crops of every training
image (FKD); a 2,410-parameter MLP student is then trained the same number of steps

* from the cache (the stored crops replayed, the teacher never loaded),
* by online KD (the teacher run on fresh crops at every step),
* from the hard labels alone (fresh crops at every step),

all with the same loop and loss (`trainer.classify`: alpha * CE + (1 - alpha) * T^2 * KL, alpha
0.5), and once more with the labels of only 10% of the training images (soft labels on all of
them). Held-out accuracy is on the last third, never used to choose anything. T is 1: on a
validation split (the last 300 training images, students trained on the other 897; see
`VALIDATION`) T = 1 beat T = 2 and the textbook T = 4 at every alpha for this 60x smaller
student; the cached student at T = 4 is reported too. Each student runs under --seeds seeds.

    python benchmarks/bench_digits.py            # writes its section of benchmarks/RESULTS.md
    python benchmarks/bench_digits.py --quick    # a smoke run (1 seed, few epochs), no RESULTS.md
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import common
import digits_models as models
import numpy as np
import torch
import torch.nn.functional as F

import logitcache
from logitcache import DumpOptions, ViewSpec, apply_views, draw_views, dump, load_examples
from trainer import ClassifierConfig, evaluate_classifier, load_rows, train_classifier
from trainer.classify import IGNORE, Batch, cached_batches, keep_labels

WORK = models.WORK
SCALE = (0.6, 1.0)  # crop area fraction: digits survive it, 0.08 would cut them in pieces
RATIO = (3 / 4, 4 / 3)
TEACHER_SEEDS = (0, 1, 2)
TEACHER_EPOCHS = 60
TEMPERATURE = 1.0
#: Validation accuracy % (last 300 training images; cached KD on the other 897, 2 seeds, 40
#: epochs, 40 views) that chose TEMPERATURE, by T then alpha: the one selection made.
VALIDATION = {1.0: (94.67, 95.00, 95.17), 2.0: (93.50, 93.83, 94.50), 4.0: (92.33, 93.00, 93.33)}
VALIDATION_ALPHAS = (0.1, 0.5, 0.9)


def digits(work: Path) -> tuple[Path, Path]:
    """train.npz (1,197 images) and test.npz (600), uint8 (N, 8, 8), split by a seeded shuffle."""
    from sklearn.datasets import load_digits

    train, test = work / "train.npz", work / "test.npz"
    if not (train.exists() and test.exists()):
        data = load_digits()
        images = np.rint(data.images * (255 / 16)).astype(np.uint8)
        order = np.random.default_rng(0).permutation(len(images))
        cut = len(images) - 600
        np.savez(train, inputs=images[order[:cut]], labels=data.target[order[:cut]])
        np.savez(test, inputs=images[order[cut:]], labels=data.target[order[cut:]])
    return train, test


def fresh_crops(examples: logitcache.PartArrays, seed: int) -> Callable:
    """inputs(example indices, epoch): every image under a new seeded crop, per epoch."""

    def inputs(index: torch.Tensor, epoch: int) -> torch.Tensor:
        spec = ViewSpec(1, SCALE, RATIO, flip=False, seed=seed * 100_003 + epoch)
        views = np.concatenate([draw_views(spec, int(i), 8, 8) for i in index])
        return apply_views(examples.inputs[index], torch.from_numpy(views))

    return inputs


def no_targets(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(n, 1, dtype=torch.int64), torch.zeros(n, 1)


def hard_batches(examples, pool: torch.Tensor, seed: int) -> Callable[[torch.Tensor, int], Batch]:
    """Hard labels on fresh crops of the examples `pool` (row r is example pool[r])."""
    crops, labels = fresh_crops(examples, seed), torch.from_numpy(examples.labels)

    def batch(index: torch.Tensor, epoch: int) -> Batch:
        ex = pool[index]
        return Batch(crops(ex, epoch), labels[ex], *no_targets(len(ex)))

    return batch


def online_batches(examples, teacher, labels: torch.Tensor, seed: int) -> Callable:
    """Online KD: the teacher's full distribution on fresh crops, at every step."""
    crops, ids = fresh_crops(examples, seed), torch.arange(models.CLASSES)

    def batch(index: torch.Tensor, epoch: int) -> Batch:
        x = crops(index, epoch)
        with torch.no_grad():
            logprobs = F.log_softmax(teacher(x).float(), -1)
        return Batch(x, labels[index], ids.expand(len(index), -1), logprobs)

    return batch


def train_teacher(seed: int, train, epochs: int) -> torch.nn.Module:
    path = WORK / f"teacher-{seed}.pt"
    model = models.fresh_teacher(seed)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    config = ClassifierConfig("", "", "", alpha=1.0, epochs=epochs, lr=2e-3, seed=seed,
                              batch_size=64, progress=False)  # fmt: skip
    everything = torch.arange(len(train))
    train_classifier(
        model, hard_batches(train, everything, seed), len(train), config, torch.device("cpu")
    )
    torch.save(model.state_dict(), path)
    return model.eval()


def validate(rows, train, epochs: int, seeds: int, held: int = 300) -> None:
    """Cached-KD students on all but the last `held` training images, scored on those: the
    grid of T and alpha that chose TEMPERATURE (the test images play no part)."""
    n = len(train) - held
    keep = rows.example < n
    sub = rows._replace(**{f: getattr(rows, f)[keep] for f in
                           ("example", "labels", "views", "target_ids", "target_logprobs")})  # fmt: skip
    held_out = dataclasses.replace(train, inputs=train.inputs[n:], labels=train.labels[n:])
    steps = epochs * math.ceil(n / 64)
    for t in VALIDATION:
        scores = []
        for alpha in VALIDATION_ALPHAS:
            accs = []
            for seed in range(seeds):
                config = ClassifierConfig("", "", "", alpha=alpha, temperature=t, batch_size=64,
                                          epochs=steps / math.ceil(len(sub.example) / 64),
                                          lr=3e-3, seed=seed, progress=False)  # fmt: skip
                torch.manual_seed(seed)
                student = models.student()
                train_classifier(student, cached_batches(sub, train), len(sub.example), config,
                                 torch.device("cpu"))  # fmt: skip
                accs.append(evaluate_classifier(student, held_out, torch.device("cpu"))["accuracy"])
            scores.append(f"{100 * statistics.mean(accs):.2f}")
        print(
            f"T = {t:g}: validation accuracy % at alpha {VALIDATION_ALPHAS}: {' / '.join(scores)}"
        )


def accuracy(logits: torch.Tensor, labels: np.ndarray) -> float:
    return float((logits.argmax(-1) == torch.from_numpy(labels)).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--views", type=int, default=None, help="crops per image in the cache")
    parser.add_argument("--epochs", type=int, default=None, help="student epochs (online)")
    parser.add_argument("--seeds", type=int, default=None, help="student seeds")
    parser.add_argument("--quick", action="store_true", help="a smoke run; RESULTS.md untouched")
    parser.add_argument("--validate", action="store_true",
                        help="print the validation grid that chose TEMPERATURE, then stop")  # fmt: skip
    args = common.fill_defaults(
        parser.parse_args(),
        {"views": 4, "epochs": 4, "seeds": 1} if parser.parse_args().quick
        else {"views": 40, "epochs": 40, "seeds": 5},
    )  # fmt: skip
    started, command, load_start = common.now_utc(), common.command_line(), common.loadavg()
    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_path, test_path = digits(WORK)
    train, test = load_examples(train_path), load_examples(test_path)
    cpu = torch.device("cpu")

    # teachers: three seeds, each trained once and kept under benchmarks/.work/digits
    teachers = [train_teacher(s, train, TEACHER_EPOCHS) for s in TEACHER_SEEDS]
    with torch.no_grad():
        test_logits = [t(test.inputs) for t in teachers]
    probs = F.softmax(test_logits[0], -1)
    ensemble = torch.stack([F.softmax(x, -1) for x in test_logits]).mean(0).log()
    peaked = {
        "max_prob": float(probs.max(-1).values.mean()),
        "entropy": float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()),
    }

    # the caches: the seed-0 teacher on --views crops of each training image, and on the test
    # images as they are (the held-out KL and agreement)
    factory = "digits_models:teacher"
    dump_s = time.perf_counter()
    views_dump = dump(DumpOptions(
        data=str(train_path), out=str(WORK / f"cache-v{args.views}"), teacher_factory=factory,
        task="classification", targets="full", views=args.views, crop_scale=SCALE,
        crop_ratio=RATIO, flip=False, overwrite=True, progress=False, device="cpu",
    ))  # fmt: skip
    dump_s = time.perf_counter() - dump_s
    topk_dump = dump(DumpOptions(
        data=str(train_path), out=str(WORK / f"cache-top3-v{args.views}"),
        teacher_factory=factory, task="classification", targets="topk", top_k=3,
        views=args.views, crop_scale=SCALE, crop_ratio=RATIO, flip=False, overwrite=True,
        progress=False, device="cpu",
    ))  # fmt: skip
    dump(DumpOptions(data=str(test_path), out=str(WORK / "cache-test"), teacher_factory=factory,
                     task="classification", targets="full", overwrite=True, progress=False,
                     device="cpu"))  # fmt: skip
    cache = logitcache.open(WORK / f"cache-v{args.views}")
    rows = load_rows(cache, train)
    test_rows = load_rows(logitcache.open(WORK / "cache-test"), test)
    if args.validate:
        validate(rows, train, args.epochs, seeds=2)
        return

    # students: the same loop, loss and number of steps in every regime
    n = len(train)
    steps = args.epochs * math.ceil(n / 64)
    labels_all = torch.from_numpy(train.labels)
    results: dict[str, list[dict[str, float]]] = {}

    def run(name: str, batches: Callable, nrows: int, seed: int, alpha: float,
            temperature: float = TEMPERATURE) -> None:  # fmt: skip
        config = ClassifierConfig("", "", "", alpha=alpha, temperature=temperature, batch_size=64,
                                  epochs=steps / math.ceil(nrows / 64), lr=3e-3, seed=seed,
                                  progress=False)  # fmt: skip
        torch.manual_seed(seed)
        student = models.student()
        train_classifier(student, batches, nrows, config, cpu)
        results.setdefault(name, []).append(evaluate_classifier(student, test, cpu, test_rows))

    for seed in range(args.seeds):
        few = keep_labels(labels_all, torch.arange(n), 0.1, seed)  # the same 10% in each regime
        labelled = torch.nonzero(few != IGNORE).squeeze(-1)
        cached_few = rows._replace(labels=keep_labels(rows.labels, rows.example, 0.1, seed))
        run("cached KD", cached_batches(rows, train), len(rows.example), seed, 0.5)
        run("online KD", online_batches(train, teachers[0], labels_all, seed), n, seed, 0.5)
        run("hard labels", hard_batches(train, torch.arange(n), seed), n, seed, 1.0)
        run("cached KD at T = 4", cached_batches(rows, train), len(rows.example), seed, 0.5, 4.0)
        run(
            "10% labels: cached KD", cached_batches(cached_few, train), len(rows.example), seed, 0.5
        )
        run("10% labels: online KD", online_batches(train, teachers[0], few, seed), n, seed, 0.5)
        run(
            "10% labels: hard labels", hard_batches(train, labelled, seed), len(labelled), seed, 1.0
        )
    wall = time.perf_counter() - t0

    def mean_sd(name: str, key: str, scale: float = 1.0) -> str:
        values = [r[key] * scale for r in results[name]]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {sd:.2f}"

    teacher_params = sum(p.numel() for p in teachers[0].parameters())
    student_params = sum(p.numel() for p in models.student().parameters())
    table_rows = [
        ["teacher (CNN, seed 0)", f"{teacher_params:,}", f"{100 * accuracy(test_logits[0], test.labels):.2f}", "", "", "", "1"],
        ["teachers, seeds 1 and 2", f"{teacher_params:,} each", " / ".join(f"{100 * accuracy(x, test.labels):.2f}" for x in test_logits[1:]), "", "", "", "1"],
        ["ensemble of the three (mean probs)", f"{3 * teacher_params:,}", f"{100 * accuracy(ensemble, test.labels):.2f}", "", "", "", "1"],
    ]  # fmt: skip
    for name in results:
        table_rows.append([f"student MLP: {name}", f"{student_params:,}",
                           mean_sd(name, "accuracy", 100), mean_sd(name, "ce"),
                           mean_sd(name, "kl"), mean_sd(name, "agreement", 100),
                           str(len(results[name]))])  # fmt: skip
    header = ["model", "parameters", "test accuracy %", "test CE", "KL(teacher‖student)",
              "agreement %", "seeds"]  # fmt: skip
    table = common.markdown_table(header, table_rows)
    gap = statistics.mean(r["accuracy"] for r in results["online KD"]) - statistics.mean(
        r["accuracy"] for r in results["cached KD"]
    )
    full_b = views_dump.bytes_on_disk / n
    top_b = topk_dump.bytes_on_disk / n
    print(table)
    print(f"cached - online accuracy: {-100 * gap:+.2f} points; cache {full_b:,.0f} B/example "
          f"(full, {args.views} views), top-3 float16 {top_b:,.0f} B/example; {wall:.0f} s")  # fmt: skip
    if args.quick:
        return
    finished, load_end = common.now_utc(), common.loadavg()
    validation = "; ".join(f"T = {t:g}: {' / '.join(f'{a:.2f}' for a in accs)}"
                           for t, accs in VALIDATION.items())  # fmt: skip
    body = f"""## bench_digits: classifier distillation from a cache (scikit-learn digits)

- machine: {common.machine_line()}
- command: `{command}` (revision {common.git_revision()}); started {started}, finished {finished}
  ({wall:.0f} s), load average {load_start} -> {load_end}
- data: the 1,797 8x8 digits of `sklearn.datasets.load_digits` (no download), scaled to uint8,
  split by a seeded shuffle into 1,197 training and 600 test images; the test images were used
  for nothing but these numbers (T was chosen on a validation split of the training images, below).
- teacher: a CNN ({teacher_params:,} parameters) trained {TEACHER_EPOCHS} epochs on the training
  images with random resized crops (area {SCALE[0]}-{SCALE[1]}, no flip); on the test images it is
  peaked: mean top-1 probability {peaked["max_prob"]:.3f}, mean entropy {peaked["entropy"]:.3f}
  nats at T = 1 (uniform: 2.303), against a {student_params:,}-parameter student 60x smaller.
- cache: `logitcache dump --task classification --targets full --views {args.views}
  --crop-scale {SCALE[0]},{SCALE[1]} --no-flip` of the seed-0 teacher over the training images:
  {n * args.views:,} rows, **{full_b:,.0f} bytes per example** on disk ({full_b / args.views:.1f}
  per view: 10 float32 log-probs, 10 uint8 ids, the label and the 5 int32 view fields, zstd);
  `--targets topk --top-k 3` (float16) would take {top_b:,.0f}. Dump: {dump_s:.1f} s.
- students: the MLP 64-32-10, {steps} steps of 64 (= {args.epochs} epochs of the training
  images; the cached run sees each of the {args.views} stored crops once), AdamW lr 3e-3 with a
  cosine schedule, loss alpha * CE + (1 - alpha) * T^2 * KL with alpha 0.5 and T = {TEMPERATURE:g}
  (hard labels: alpha 1); online KD and hard labels draw fresh crops of the same distribution at
  every step. T was the one setting chosen, on a validation split (the last 300 training
  images; cached-KD students trained on the other 897, 2 seeds, 40 epochs, 40 views:
  `python benchmarks/bench_digits.py --validate`), never on the test images:
  validation accuracy % at alpha {" / ".join(map(str, VALIDATION_ALPHAS))}: {validation}; the
  smaller the student, the less it gains from matching the teacher's flattened tail (the
  textbook T = 4 is the "cached KD at T = 4" row).
  "10% labels": the labels of a seeded 10% of the training images ({len(labelled)}), the same
  images in the three regimes; the KD students see every image with the teacher's soft labels,
  the hard-label student only the labelled ones (for the same number of steps).
- mean ± standard deviation over {args.seeds} student seeds (initialisation, order, the 10%):

{table}

Cached KD - online KD: **{-100 * gap:+.2f} accuracy points**; KL and agreement are measured
against the teacher's stored distribution on the test images (T = 1).
"""
    common.update_results("bench_digits", body)


if __name__ == "__main__":
    main()
