"""The toy masked-LM teacher's ModernBERT architecture (what bench_mlm trains): built, trained
at another masking rate, saved, loaded by `logitcache dump` through AutoModelForMaskedLM, and
its cached targets the full logits' although its training computed the output layer at the
masked positions only."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForMaskedLM

import logitcache
from logitcache.testing import mlm
from tests.logitcache.dump_helpers import dump_in_process

TINY = {"vocab_size": 400, "n_layer": 2, "hidden": 64, "positions": 128, "seq_len": 64,
        "batch_size": 4, "train_steps": 6, "lr": 3e-3, "arch": "modernbert", "mask_prob": 0.3}  # fmt: skip


@pytest.fixture(scope="module")
def modernbert_teacher(tmp_path_factory, stdlib_small_files):
    out = tmp_path_factory.mktemp("modernbert")
    return mlm.ensure_mlm_teacher(out, files=stdlib_small_files, verbose=False, **TINY)


def test_a_modernbert_teacher_is_saved_and_recorded(modernbert_teacher, stdlib_small_files):
    config = json.loads((modernbert_teacher / "config.json").read_text())
    assert config["architectures"] == ["ModernBertForMaskedLM"]
    assert (config["pad_token_id"], config["cls_token_id"], config["sep_token_id"]) == (0, 2, 3)
    info = json.loads((modernbert_teacher / "toy_info.json").read_text())
    assert info["settings"]["mask_prob"] == 0.3 and info["train"]["steps"] == 6
    again = mlm.ensure_mlm_teacher(
        modernbert_teacher, files=stdlib_small_files, verbose=False, **TINY
    )
    assert again == modernbert_teacher
    assert json.loads((again / "toy_info.json").read_text()) == info  # reused, not rebuilt
    student = mlm.build_mlm_student_config(modernbert_teacher)
    assert student.architectures == ["BertForMaskedLM"] and student.vocab_size == 400


@pytest.mark.usefixtures("one_torch_thread")
def test_its_cache_holds_the_full_logits_at_the_masked_positions(
    modernbert_teacher, stdlib_corpus, tmp_path
):
    out = dump_in_process(modernbert_teacher, stdlib_corpus, tmp_path / "c", targets="topk",
                          top_k=4, seq_len=64, part_tokens=4096)  # fmt: skip
    cache = logitcache.open(out)
    assert cache.manifest.teacher.kind == "masked" and logitcache.verify(cache).ok
    model = AutoModelForMaskedLM.from_pretrained(modernbert_teacher).eval()
    seq = cache[2]
    at = seq.labels >= 0
    with torch.inference_mode():
        logits = model(seq.input_ids[None]).logits[0]  # (T, V): every position, no labels
    top = logits.log_softmax(-1).topk(4)
    assert torch.equal(top.indices[at], seq.target_ids[at])
    assert torch.allclose(top.values[at], seq.target_logprobs[at], atol=1e-2)
