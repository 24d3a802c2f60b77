"""Masked-LM teachers (format 1.3): the masking, the layout of targets at masked positions only,
the reader's view of it, and the refusals, through the real CLI and real Zarr stores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from transformers import AutoModelForMaskedLM, AutoTokenizer

import logitcache
from logitcache.dumping.masking import Masker
from logitcache.errors import CorruptCacheError
from logitcache.format.manifest import MaskingInfo
from tests.logitcache.dump_helpers import describe, flat, run_cli

SPECIALS = np.array([0, 1, 2, 3, 4])


def test_masking_is_bert_80_10_10_and_a_function_of_seed_and_index():
    info = MaskingInfo(prob=0.15, mask_token_id=4, seed=7)
    masker = Masker(info, SPECIALS, vocab_size=300)
    ids = np.random.default_rng(0).integers(5, 300, 200_000)
    ids[::50] = 3  # separators: never masked
    out = masker.mask(ids, index=11)
    chosen = out.positions
    assert (np.diff(chosen) > 0).all() and (ids[chosen] != 3).all()
    assert (out.labels == ids[chosen]).all()
    assert abs(len(chosen) / (ids != 3).sum() - 0.15) < 0.005
    became = out.input_ids[chosen]
    assert abs((became == 4).mean() - 0.8) < 0.01
    untouched = np.setdiff1d(np.arange(len(ids)), chosen)
    assert (out.input_ids[untouched] == ids[untouched]).all()
    kept = (became == ids[chosen]).mean()  # 10% unchanged, plus random draws that hit the same id
    assert abs(kept - 0.1) < 0.01
    again = masker.mask(ids, index=11)
    assert (again.input_ids == out.input_ids).all()
    other = masker.mask(ids, index=12)
    assert not np.array_equal(other.positions, chosen)


def test_every_sequence_gets_a_target():
    masker = Masker(MaskingInfo(prob=0.01, mask_token_id=4, seed=0), SPECIALS, vocab_size=50)
    for index in range(50):
        assert len(masker.mask(np.array([3, 9, 3]), index).positions) == 1  # the only eligible
    assert masker.mask(np.array([3, 3]), 0).positions.tolist() == [0]  # nothing eligible


def test_dump_stores_the_teacher_at_masked_positions_only(
    tmp_path, tiny_mlm_teacher_dir, stdlib_corpus
):
    out = tmp_path / "cache"
    proc = run_cli(
        "dump", "--teacher", tiny_mlm_teacher_dir, "--data", stdlib_corpus, "--out", out,
        "--seq-len", 64, "--targets", "topk", "--top-k", 4, "--mask-prob", 0.2, "--views", 2,
        "--part-tokens", 2048, "--seed", 3,
    )  # fmt: skip
    assert proc.returncode == 0, describe(proc)
    assert "bytes per masked token" in proc.stdout
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["format_version"] == "1.3" and raw["teacher"]["kind"] == "masked"
    assert raw["masking"] == {"prob": 0.2, "mask_token_id": 4, "seed": 3, "views": 2,
                              "replace_mask": 0.8, "replace_random": 0.1}  # fmt: skip
    cache = logitcache.open(out)
    m = cache.manifest
    assert m.sequences % 2 == 0 and 0.17 < m.masked / m.tokens < 0.23
    part = zarr.open_group(str(out / "parts" / "part-000000"), mode="r")
    positions, labels = part["target_positions"][...], part["target_labels"][...]
    assert part["target_positions"].dtype == np.uint32
    assert part["target_ids"].shape == (len(positions), 4) == (m.parts[0].masked, 4)
    # the two views of a sequence: the same text, masked differently
    first, second = cache[0], cache[1]
    at0, at1 = first.labels >= 0, second.labels >= 0
    assert not torch.equal(at0, at1)
    both_plain = ~at0 & ~at1
    assert torch.equal(first.input_ids[both_plain], second.input_ids[both_plain])
    assert torch.equal(first.labels[at0 & ~at1], second.input_ids[at0 & ~at1])
    # the stored targets are the teacher's on the masked input, at those positions
    teacher = AutoModelForMaskedLM.from_pretrained(tiny_mlm_teacher_dir).eval()
    with torch.no_grad():
        logprobs = teacher(first.input_ids[None]).logits[0].log_softmax(-1)
    top = logprobs[at0].topk(4, dim=-1)
    assert torch.equal(first.target_ids[at0], top.indices)
    assert torch.allclose(first.target_logprobs[at0], top.values, atol=2e-3)
    # rows without a target: the placeholder, probability 1 on id 0
    assert (first.target_logprobs[~at0, 0] == 0).all() and (first.target_ids[~at0] == 0).all()
    whole = cache.read_decoded(0)
    rows = slice(int(whole.seq_offsets[0]), int(whole.seq_offsets[1]))
    assert (whole.target_labels[rows] == first.labels.numpy()).all()
    assert (labels[: int(at0.sum())] == first.labels[at0].numpy()).all()
    assert logitcache.verify(cache).ok


def test_sampled_targets_at_masked_positions(tmp_path, tiny_mlm_teacher_dir, stdlib_corpus):
    out = tmp_path / "cache"
    proc = run_cli(
        "dump", "--teacher", tiny_mlm_teacher_dir, "--data", stdlib_corpus, "--out", out,
        "--seq-len", 64, "--samples", 16, "--part-tokens", 4096,
    )  # fmt: skip
    assert proc.returncode == 0, describe(proc)
    cache = logitcache.open(out)
    assert cache.manifest.masking.prob == 0.15  # BERT's default for a masked-LM teacher
    seq = cache[3]
    at = seq.labels >= 0
    mass = seq.target_logprobs[at].exp().sum(-1)
    assert torch.allclose(mass, torch.ones_like(mass))
    assert logitcache.verify(cache).ok
    stats = run_cli("stats", out)
    assert stats.returncode == 0, describe(stats)


def test_a_label_past_the_vocabulary_is_refused(tmp_path, tiny_mlm_cache):
    cache = logitcache.open(tiny_mlm_cache)
    arrays = cache.read_part(0)
    arrays.target_labels = arrays.target_labels.copy()
    arrays.target_labels[5] = cache.manifest.teacher.vocab_size
    from logitcache.read.decoded import decode

    with pytest.raises(CorruptCacheError, match="target label"):
        decode(cache.manifest, arrays, "part-000000")


@pytest.fixture(scope="module")
def causal_corpus(stdlib_corpus: Path, tmp_path_factory) -> Path:
    one = tmp_path_factory.mktemp("one_doc")
    path = sorted(stdlib_corpus.iterdir())[0]
    (one / path.name).write_bytes(path.read_bytes())
    return one


@pytest.mark.parametrize(
    ("teacher", "flags", "phrases"),
    [
        ("causal", ["--mask-prob", 0.15], ["--mask-prob", "is a causal LM", "Leave out"]),
        ("causal", ["--views", 2], ["--views", "is a causal LM"]),
        ("masked", ["--mask-prob", 1.5], ["--mask-prob must be in (0, 1)"]),
        ("masked", ["--views", -1], ["--views must be 0 or more"]),
        ("no-mask-token", [], ["has no mask token", "[MASK]"]),
    ],
)
def test_bad_masked_lm_input_exits_2_and_writes_nothing(
    tmp_path, tiny_teacher_dir, tiny_mlm_teacher_dir, causal_corpus, teacher, flags, phrases
):
    chosen = {"causal": tiny_teacher_dir}.get(teacher, tiny_mlm_teacher_dir)
    if teacher == "no-mask-token":  # the masked teacher with its tokenizer's mask token removed
        tok = AutoTokenizer.from_pretrained(tiny_mlm_teacher_dir)
        tok.mask_token = None
        flags = ["--tokenizer", tok.save_pretrained(tmp_path / "tok")[0].rsplit("/", 1)[0]]
    out = tmp_path / "out"
    proc = run_cli("dump", "--teacher", chosen, "--data", causal_corpus, "--out", out,
                   "--seq-len", 64, *flags)  # fmt: skip
    assert proc.returncode == 2, describe(proc)
    assert "Traceback" not in proc.stderr
    for phrase in phrases:
        assert phrase in flat(proc.stderr), describe(proc)
    assert not out.exists()


def test_axolotl_export_refuses_a_masked_cache(tmp_path, tiny_mlm_cache):
    """axolotl's KD dataset holds next-token targets at every position: no place for masks.
    (Parquet, merge and `to_hf_dataset` take masked caches:
    tests/logitcache/storage/test_parquet_masked_offsets.py.)"""
    out = tmp_path / "axolotl"
    proc = run_cli("export", tiny_mlm_cache, out, "--format", "axolotl")
    assert proc.returncode == 2, describe(proc)
    assert "does not take masked-LM caches" in flat(proc.stderr), describe(proc)
    assert "Traceback" not in proc.stderr and not out.exists()
    copy = tmp_path / "copy"
    proc = run_cli("export", tiny_mlm_cache, copy, "--format", "zarr")
    assert proc.returncode == 0, describe(proc)
    assert logitcache.verify(logitcache.open(copy)).ok
