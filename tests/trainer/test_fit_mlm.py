"""`trainer fit` on a masked-LM cache (format 1.3): a BERT student, the loss at the masked
positions only, one view per epoch, and the refusals of a student of the other kind. The CLI
runs in real subprocesses on a real cache dumped from a real (tiny) BERT teacher."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import logitcache
from logitcache.testing import mlm
from tests.cli import cli_env
from trainer.dataset import IGNORE_INDEX, CacheDataset
from trainer.recipe import FitConfig, fit

FIT = ["--batch-size", 8, "--lr", 3e-3, "--eval-fraction", 0.2, "--no-progress"]


def trainer(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainer", *map(str, args)],
        capture_output=True, text=True, env=cli_env(), timeout=300, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def bert_student(tmp_path_factory, tiny_mlm_teacher_dir) -> Path:
    """A 1-layer, 32-wide BERT masked-LM config with the tiny teacher's vocabulary."""
    path = tmp_path_factory.mktemp("bert_student") / "student.json"
    config = mlm.build_mlm_student_config(tiny_mlm_teacher_dir, n_layer=1, hidden=32)
    path.write_text(config.to_json_string(), encoding="utf-8")
    return path


def test_labels_are_the_replaced_tokens_at_masked_positions_only(tiny_mlm_cache):
    cache = logitcache.open(tiny_mlm_cache)
    ds = CacheDataset(cache, batch_size=4, split="all", shuffle=False)
    batch = next(iter(ds))
    for row, index in enumerate(batch["index"].tolist()):
        seq = cache[index]
        n = len(seq.input_ids)
        want = torch.where(seq.labels >= 0, seq.labels, IGNORE_INDEX)
        assert torch.equal(batch["labels"][row, :n], want)
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        masked = seq.labels >= 0
        assert (seq.input_ids[masked] != seq.labels[masked]).float().mean() > 0.5  # mostly [MASK]


def test_one_view_per_epoch_and_views_held_out_together(tiny_mlm_cache):
    cache = logitcache.open(tiny_mlm_cache)
    views = cache.manifest.masking.views
    assert views == 2
    train = CacheDataset(cache, batch_size=4, split="train", eval_fraction=0.3, seed=1)
    held = CacheDataset(cache, batch_size=4, split="eval", eval_fraction=0.3)
    shown = []
    for epoch in range(2):
        order = train.storage_index(train.epoch_order(epoch))
        assert (order % views == epoch % views).all()
        shown.append(set((order // views).tolist()))
    assert shown[0] == shown[1]  # every data sequence once per epoch, in another masking
    held_out = held.storage_index(held.epoch_order(0))
    assert len(held_out) == 2 * len(set((held_out // views).tolist()))  # both views
    assert not set((held_out // views).tolist()) & shown[0]
    assert train.num_sequences() + len(held_out) // views == len(cache) // views


def test_fit_distils_at_masked_positions(tmp_path, tiny_mlm_cache, bert_student):
    """alpha 0 (pure KD, on the bucketed tail that the held-out KL measures: the tiny teacher is
    far from peaked) ends closer to the teacher than alpha 1 (masked-LM CE only), at the same
    steps, on the held-out masked positions, and only those are evaluated; `trainer eval` (the
    CLI) reports the same metrics for the saved student."""
    runs = {}
    for alpha in (0.0, 1.0):
        config = FitConfig(
            cache=str(tiny_mlm_cache), student=str(bert_student), out=str(tmp_path / f"a{alpha}"),
            steps=40, alpha=alpha, tail="bucket", batch_size=8, lr=3e-3, eval_fraction=0.2,
            progress=False,
        )  # fmt: skip
        runs[alpha] = fit(config)["final"]["eval"]
    kd, ce = runs[0.0], runs[1.0]
    assert kd["kl"] < ce["kl"]
    assert np.isfinite(kd["ce"]) and np.isfinite(ce["ce"])
    cache = logitcache.open(tiny_mlm_cache)
    held = CacheDataset(cache, batch_size=8, split="eval", eval_fraction=0.2, shuffle=False)
    index = held.storage_index(held.epoch_order(0))
    assert kd["tokens"] == sum(int((cache[int(i)].labels >= 0).sum()) for i in index)
    proc = trainer("eval", "--cache", tiny_mlm_cache, "--student", tmp_path / "a0.0", "--json")
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["positions"] == "masked" and shown["tokens"] == kd["tokens"]
    assert shown["ce"] == pytest.approx(kd["ce"], rel=1e-4)


def test_a_student_of_the_other_kind_is_refused(
    tmp_path, tiny_mlm_cache, tiny_cache, bert_student, tiny_student_config
):
    for cache, student, phrases in (
        (
            tiny_mlm_cache,
            tiny_student_config,
            ["is a causal LM", "is a masked LM", "BertForMaskedLM"],
        ),
        (tiny_cache, bert_student, ["is a masked LM", "is a causal LM", "next token"]),
    ):
        out = tmp_path / "run"
        proc = trainer("fit", "--cache", cache, "--student", student, "--out", out,
                       "--steps", 2, *FIT)  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        text = " ".join(proc.stderr.split())
        assert "model mismatch" in text and "Traceback" not in text
        for phrase in phrases:
            assert phrase in text, text
        assert not out.exists()


def test_hf_trainer_items_carry_the_masked_labels(tiny_mlm_cache):
    from trainer import CacheSequences, collate_sequences

    items = CacheSequences(tiny_mlm_cache, split="all", shuffle=False)
    batch = collate_sequences([items[0], items[1]])
    ds = CacheDataset(tiny_mlm_cache, batch_size=2, split="all", shuffle=False)
    assert torch.equal(batch["labels"], next(iter(ds))["labels"])
    assert (batch["labels"] != IGNORE_INDEX).sum() < batch["attention_mask"].sum() / 3
