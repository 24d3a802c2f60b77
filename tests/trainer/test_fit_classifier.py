"""`trainer fit --task classification`: the loss is the textbook one on full-distribution
targets, few-label masking, and a real run end to end through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.cli import REPO, cli_env
from trainer.classify import IGNORE, classifier_loss, keep_labels
from trainer.config import clear_run_dir


def textbook(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, alpha: float,
             t: float) -> torch.Tensor:  # fmt: skip
    """alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T))."""
    p = F.softmax(teacher / t, -1)
    kl = (p * (torch.log(p) - F.log_softmax(student / t, -1))).sum(-1).mean()
    return alpha * F.cross_entropy(student, labels) + (1 - alpha) * t**2 * kl


@pytest.mark.parametrize("t", [1.0, 4.0, 8.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9])
def test_full_distribution_loss_is_the_textbook_formula(t: float, alpha: float) -> None:
    g = torch.Generator().manual_seed(int(t * 10 + alpha * 100))
    student = torch.randn(32, 10, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(32, 10, generator=g, dtype=torch.float64) * 5
    labels = torch.randint(0, 10, (32,), generator=g)
    # what a --targets full cache holds: every class id, its log-prob at T = 1 (float32)
    ids = torch.arange(10).expand(32, 10)
    stored = F.log_softmax(teacher, -1).float()
    got = classifier_loss(student.float(), labels, ids, stored, alpha=alpha, temperature=t)
    want = textbook(student, teacher, labels, alpha, t)
    assert torch.allclose(got.loss.double(), want, rtol=1e-5, atol=1e-6)
    # stored in any order (the decoded view is descending), the loss is the same
    perm = stored.argsort(-1, descending=True)
    again = classifier_loss(student.float(), labels, ids.gather(-1, perm), stored.gather(-1, perm),
                            alpha=alpha, temperature=t)  # fmt: skip
    assert torch.allclose(again.loss, got.loss, rtol=1e-6)


def test_rows_without_labels_get_the_kl_but_no_ce() -> None:
    student, teacher = torch.randn(8, 5), torch.randn(8, 5)
    labels = torch.tensor([1, IGNORE, 2, IGNORE, IGNORE, 0, IGNORE, 4])
    ids, stored = torch.arange(5).expand(8, 5), F.log_softmax(teacher, -1)
    got = classifier_loss(student, labels, ids, stored, alpha=0.5, temperature=2.0)
    kept = labels != IGNORE
    want_ce = F.cross_entropy(student[kept], labels[kept])
    assert torch.allclose(got.ce, want_ce)
    assert torch.allclose(got.loss.double(), textbook(student.double(), teacher.double(), labels.clamp(min=0), 0.0, 2.0) * 0.5 + 0.5 * want_ce.double(), atol=1e-5)  # fmt: skip
    none = classifier_loss(
        student, torch.full((8,), IGNORE), ids, stored, alpha=1.0, temperature=1.0
    )
    assert float(none.loss) == 0.0


def test_keep_labels_keeps_a_seeded_share_of_examples_with_all_their_views() -> None:
    example = torch.arange(100).repeat_interleave(3)
    labels = example % 7
    kept = keep_labels(labels, example, 0.1, seed=5)
    by_example = (kept != IGNORE).view(100, 3)
    assert by_example.all(1).sum() == 10 and (by_example.all(1) == by_example.any(1)).all()
    assert torch.equal(kept, keep_labels(labels, example, 0.1, seed=5))
    assert not torch.equal(kept, keep_labels(labels, example, 0.1, seed=6))


def test_fit_classification_end_to_end_through_the_cli(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "train.npz", inputs=images[:32], labels=np.arange(32) % 4)
    np.savez(tmp_path / "test.npz", inputs=images[32:], labels=np.arange(8) % 4)
    factory = "tests.logitcache.classifiers:cnn"

    def run(*args: object) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True,
                              text=True, env=cli_env(), cwd=REPO, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return proc

    common = ("dump", "--task", "classification", "--teacher-factory", factory, "--no-progress")
    run("logitcache", *common, "--data", tmp_path / "train.npz", "--out", tmp_path / "c",
        "--views", "2", "--crop-scale", "0.5,1")  # fmt: skip
    run("logitcache", *common, "--data", tmp_path / "test.npz", "--out", tmp_path / "t")
    proc = run("trainer", "fit", "--task", "classification", "--cache", tmp_path / "c",
               "--data", tmp_path / "train.npz", "--student", factory, "--out", tmp_path / "run",
               "--eval-cache", tmp_path / "t", "--eval-data", tmp_path / "test.npz",
               "--epochs", "2", "--batch-size", "16", "--temperature", "4", "--no-progress",
               "--label-fraction", "0.5")  # fmt: skip
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["rows"] == 64 and len(summary["epochs"]) == 2
    assert set(summary["eval"]) == {"accuracy", "ce", "kl", "agreement"}
    assert summary["config"]["temperature"] == 4.0 and summary["config"]["label_fraction"] == 0.5
    assert "held-out agreement" in proc.stdout and (tmp_path / "run/model.pt").is_file()
    # the trainer refuses data the cache was not dumped from, in one line
    bad = subprocess.run([sys.executable, "-m", "trainer", "fit", "--task", "classification",
                          "--cache", tmp_path / "c", "--data", tmp_path / "test.npz", "--student",
                          factory, "--out", tmp_path / "run2", "--no-progress"],
                         capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "is not the data" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr


def test_starting_over_clears_what_a_classifier_run_wrote_and_nothing_else(tmp_path) -> None:
    """--overwrite clears the earlier run's model.pt with its metrics and summary, so a new run
    stopped before its end never leaves the old weights beside its own checkpoint."""
    for name in ("model.pt", "metrics.jsonl", "summary.json", "notes.txt"):
        (tmp_path / name).write_text(name)
    clear_run_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
