"""Classifier distillation from a cache, end to end on CPU, with nothing downloaded.

    python demo_classify.py            # about 3 minutes on 2 idle CPU cores
    python demo_classify.py --quick    # a ~1 minute smoke run

The textbook case of knowledge distillation, offline and FKD-style, on scikit-learn's 8x8
handwritten digits (shipped with scikit-learn):

1. writes the digits as train.npz (1,197 images) and test.npz (600), split by a seeded shuffle;
2. trains a CNN teacher (benchmarks/digits_models.py, 160k parameters) on random resized crops;
3. `logitcache dump --task classification --views N`: the teacher's full distribution over the
   10 classes on N seeded crops of every training image, each stored with its crop box, and on
   the test images as they are;
4. `trainer fit --task classification` twice from the cache, the teacher never loaded: a
   2,410-parameter MLP distilled (alpha 0.5, T 4) and on hard labels only (alpha 1), both on
   the replayed crops, same init, order and steps;
5. prints held-out accuracy, CE, KL to the teacher and agreement, and the cache's bytes per
   example. benchmarks/bench_digits.py measures the same against online KD, over seeds, and
   with 10% of the labels (benchmarks/RESULTS.md, section bench_digits).

Everything lands in --out (default demo-classify-out/).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PRESETS = {"full": {"teacher_epochs": 30, "views": 20, "epochs": 20},
           "quick": {"teacher_epochs": 2, "views": 2, "epochs": 2}}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("demo-classify-out"), help="Work dir.")
    parser.add_argument("--quick", action="store_true", help="A smoke run (tiny budgets).")
    return parser.parse_args(argv)


def run(*args: object, env: dict[str, str]) -> None:
    """One CLI command as a subprocess, echoed; a failure stops the demo with its output."""
    command = [sys.executable, "-m", *map(str, args)]
    print("$", " ".join(map(str, args)), flush=True)
    proc = subprocess.run(command, env=env, cwd=HERE, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"demo_classify: `{' '.join(map(str, args))}` failed:\n{proc.stderr}")
    print(proc.stdout.strip())


def write_digits(data: Path) -> None:
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(images))
    train, test = order[:-600], order[-600:]
    np.savez(data / "train.npz", inputs=images[train], labels=digits.target[train])
    np.savez(data / "test.npz", inputs=images[test], labels=digits.target[test])


def train_teacher(data: Path, path: Path, epochs: int) -> float:
    """The CNN teacher on fresh crops each epoch (the library's own loop); its test accuracy."""
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE / "benchmarks"))
    import digits_models

    from logitcache import ViewSpec, apply_views, draw_views, load_examples
    from trainer import ClassifierConfig, evaluate_classifier, train_classifier
    from trainer.classify import Batch

    train, test = load_examples(data / "train.npz"), load_examples(data / "test.npz")
    labels = torch.from_numpy(train.labels)

    def batch(index: torch.Tensor, epoch: int) -> Batch:
        spec = ViewSpec(1, (0.6, 1.0), (3 / 4, 4 / 3), flip=False, seed=epoch)
        views = torch.from_numpy(np.concatenate([draw_views(spec, int(i), 8, 8) for i in index]))
        none = torch.zeros(len(index), 1)
        return Batch(apply_views(train.inputs[index], views), labels[index], none.long(), none)

    model = digits_models.fresh_teacher(0)
    config = ClassifierConfig("", "", "", alpha=1.0, epochs=epochs, lr=2e-3, progress=False)
    train_classifier(model, batch, len(train), config, torch.device("cpu"))
    torch.save(model.state_dict(), path)
    return evaluate_classifier(model, test, torch.device("cpu"))["accuracy"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    preset = PRESETS["quick" if args.quick else "full"]
    out = args.out.resolve()
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, DIGITS_TEACHER=str(out / "teacher.pt"), PYTHONPATH=os.pathsep.join(
        [str(HERE), str(HERE / "benchmarks"), os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    start = time.perf_counter()
    write_digits(data)
    print(f"== training the CNN teacher ({preset['teacher_epochs']} epochs)", flush=True)
    teacher_accuracy = train_teacher(data, out / "teacher.pt", preset["teacher_epochs"])
    print(f"teacher test accuracy {teacher_accuracy:.4f}")
    dump = ("logitcache", "dump", "--task", "classification", "--teacher-factory",
            "digits_models:teacher", "--device", "cpu", "--no-progress", "--overwrite")  # fmt: skip
    run(*dump, "--data", data / "train.npz", "--out", out / "cache", "--views", preset["views"],
        "--crop-scale", "0.6,1", "--no-flip", env=env)  # fmt: skip
    run(*dump, "--data", data / "test.npz", "--out", out / "test-cache", env=env)
    rows = {}
    for name, alpha in (("distilled (cache)", 0.5), ("hard labels", 1.0)):
        run_dir = out / "runs" / ("kd" if alpha < 1 else "hard")
        run("trainer", "fit", "--task", "classification", "--cache", out / "cache", "--data",
            data / "train.npz", "--student", "digits_models:student", "--out", run_dir,
            "--eval-cache", out / "test-cache", "--eval-data", data / "test.npz",
            "--alpha", alpha, "--temperature", 4, "--epochs", preset["epochs"] / preset["views"],
            "--batch-size", 64, "--lr", 3e-3, "--weight-decay", 1e-4, "--device", "cpu",
            "--no-progress", "--overwrite", env=env)  # fmt: skip
        rows[name] = json.loads((run_dir / "summary.json").read_text())["eval"]
    size = sum(f.stat().st_size for f in (out / "cache").rglob("*") if f.is_file())
    print(f"\n== results on the 600 test digits ({time.perf_counter() - start:.0f} s)")
    print(f"{'model':<22}{'accuracy':>10}{'CE':>8}{'KL':>8}{'agreement':>11}")
    print(f"{'teacher (CNN)':<22}{teacher_accuracy:>10.4f}")
    for name, m in rows.items():
        print(
            f"{name:<22}{m['accuracy']:>10.4f}{m['ce']:>8.3f}{m['kl']:>8.3f}{m['agreement']:>11.4f}"
        )
    print(f"cache: {size / 1197:,.0f} bytes per training example ({preset['views']} views)")
    (out / "results.json").write_text(json.dumps({"teacher": teacher_accuracy, **rows}, indent=2))


if __name__ == "__main__":
    main()
