"""A cache of the wrong kind for the trainer command: the language-model paths (`trainer fit`,
`trainer eval`, `CacheDataset`) refuse a classification cache, and `fit --task classification`
refuses a causal-LM cache, each in one message that names the way out (exit 2, no traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import logitcache
from logitcache import DumpOptions, dump
from tests.cli import REPO, cli_env
from tests.logitcache.dump_helpers import describe, flat

CNN = "tests.logitcache.classifiers:cnn"


@pytest.fixture(scope="module")
def classification_cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cls")
    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8), dtype=np.uint8)
    np.savez(root / "d.npz", inputs=images, labels=np.arange(10) % 4)
    dump(DumpOptions(data=str(root / "d.npz"), out=str(root / "c"), task="classification",
                     teacher_factory=CNN, targets="full", views=2, progress=False,
                     device="cpu"))  # fmt: skip
    return root / "c"


@pytest.fixture(scope="module")
def lm_student(tmp_path_factory) -> Path:
    """A saved 4-token GPT-2 (the classification cache's 4 classes as its vocabulary): a
    student the language-model paths would otherwise accept."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("lm_student")
    config = GPT2Config(vocab_size=4, n_positions=8, n_layer=1, n_embd=8, n_head=1,
                        bos_token_id=0, eos_token_id=0)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(out / "model")
    return out / "model"


def trainer(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trainer", *map(str, args)], capture_output=True,
                          text=True, env=cli_env(), cwd=REPO, timeout=300, check=False)  # fmt: skip


def assert_refused(proc: subprocess.CompletedProcess[str], *phrases: str) -> None:
    assert proc.returncode == 2, describe(proc)
    assert "Traceback" not in proc.stderr, proc.stderr
    for phrase in phrases:
        assert phrase in flat(proc.stderr), proc.stderr


def test_fit_without_task_classification_refuses_a_classification_cache(
    classification_cache, lm_student, tmp_path
):
    proc = trainer("fit", "--cache", classification_cache, "--student", lm_student / "config.json",
                   "--out", tmp_path / "run", "--steps", "2", "--eval-fraction", "0",
                   "--no-progress")  # fmt: skip
    assert_refused(proc, "is a classification cache", "trainer fit --task classification")
    assert not (tmp_path / "run").exists()


def test_eval_refuses_a_classification_cache(classification_cache, lm_student):
    proc = trainer("eval", "--cache", classification_cache, "--student", lm_student,
                   "--split", "all")  # fmt: skip
    assert_refused(proc, "is a classification cache", "--eval-cache")


def test_cache_dataset_refuses_a_classification_cache(classification_cache):
    from trainer import CacheDataset

    with pytest.raises(logitcache.LogitCacheError, match="--task classification"):
        CacheDataset(logitcache.open(classification_cache), batch_size=2)


def test_fit_task_classification_refuses_a_causal_lm_cache(tiny_cache, tmp_path):
    images = np.zeros((4, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", inputs=images, labels=np.arange(4))
    proc = trainer("fit", "--task", "classification", "--cache", tiny_cache, "--data",
                   tmp_path / "d.npz", "--student", CNN, "--out", tmp_path / "run",
                   "--no-progress")  # fmt: skip
    assert_refused(proc, "is a causal-LM cache", "without --task classification")
    assert not (tmp_path / "run").exists()
