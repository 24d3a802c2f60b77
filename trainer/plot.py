"""`trainer plot RUN_DIR`: training and held-out curves from metrics.jsonl into curves.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from logitcache.errors import LogitCacheError

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl (a torn last line is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise LogitCacheError(
            f"{run_dir} has no {METRICS_FILE}: pass the --out directory of `trainer fit`."
        )
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw loss/CE/KD (train) and CE/KL/top-1 (held-out) against steps; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    if not train and not evals:
        raise LogitCacheError(f"{Path(run_dir) / METRICS_FILE} has no rows yet: nothing to plot.")
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (ax_train, ax_ce), (ax_kl, ax_top1) = axes
    steps = [r["step"] for r in train]
    for key, label in (("loss", "loss"), ("ce", "CE (hard labels)"), ("kd", "KD (--loss at T)")):
        ax_train.plot(steps, [r[key] for r in train], label=label)
    ax_train.set(title="training (interval means)", xlabel="step", ylabel="nats/token")
    ax_train.legend()
    eval_steps = [r["step"] for r in evals]
    panels = (
        (ax_ce, "eval_ce", "held-out CE", "nats/token"),
        (ax_kl, "eval_kl", "held-out KL(teacher || student), top-k + tail", "nats/token"),
        (ax_top1, "eval_top1", "held-out top-1 agreement with the teacher", "fraction"),
    )
    for ax, key, title, unit in panels:
        ax.plot(eval_steps, [r[key] for r in evals], "o-", color="C3")
        ax.set(title=title, xlabel="step", ylabel=unit)
        if not evals:
            ax.text(0.5, 0.5, "no held-out evaluations", ha="center", transform=ax.transAxes)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    path = Path(out) if out is not None else Path(run_dir) / CURVES_FILE
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
