"""A student with another tokenizer: the ULD loss against a dense reference, and the pairing of
its positions with the teacher's by character offsets (`trainer.losses.uld_distance`,
`trainer.align.StudentTokens`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import logitcache
from logitcache import LogitCacheError, sequence_text
from tests.logitcache.dump_helpers import dump_in_process
from tests.trainer.uld_helpers import offsets_cache, student_tokenizer_dir  # noqa: F401
from trainer.align import StudentTokens
from trainer.dataset import CacheDataset
from trainer.losses import ULDLoss, hard_label_loss, uld_distance


def dense_uld(student_logits, teacher_probs, mask) -> torch.Tensor:
    """The paper's definition on whole vectors: sort both, pad the shorter with zeros, L1."""
    s = torch.softmax(student_logits.double(), -1).sort(-1, descending=True).values
    t = teacher_probs.double().sort(-1, descending=True).values
    width = max(s.shape[-1], t.shape[-1])
    s = torch.nn.functional.pad(s, (0, width - s.shape[-1]))
    t = torch.nn.functional.pad(t, (0, width - t.shape[-1]))
    distance = (s - t).abs().sum(-1)
    return distance[mask].mean()


def cached_top_k(teacher_logits: torch.Tensor, k: int) -> torch.Tensor:
    """The teacher's top-k log-probs over its full vocabulary, as a cache stores them."""
    return torch.log_softmax(teacher_logits, -1).topk(k, -1).values


@pytest.mark.parametrize(("v_teacher", "v_student", "k"), [(50, 30, 8), (20, 12, 16), (9, 40, 9)])
def test_uld_matches_the_dense_sorted_l1(v_teacher, v_student, k):
    g = torch.Generator().manual_seed(v_teacher)
    teacher = torch.randn(2, 5, v_teacher, generator=g) * 3  # peaked
    student = torch.randn(2, 5, v_student, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v_student, (2, 5), generator=g)
    labels[1, 3:] = -100
    cached = cached_top_k(teacher, k)
    cached[0, 1] = -torch.inf  # a student position with no paired teacher position
    mask = (labels != -100) & ~cached[..., 0].isneginf()
    # the reference teacher: its cached support renormalised, zero elsewhere (the stated tail)
    support = torch.softmax(cached.double(), -1).nan_to_num(0.0)
    got = uld_distance(student, labels, cached)
    torch.testing.assert_close(got, dense_uld(student, support, mask), rtol=1e-9, atol=1e-12)
    # at temperature 2 both sides are re-tempered first
    got = uld_distance(student, labels, cached, temperature=2.0)
    support = torch.softmax(cached.double() / 2, -1).nan_to_num(0.0)
    torch.testing.assert_close(got, dense_uld(student / 2, support, mask), rtol=1e-9, atol=1e-12)


def test_uld_is_zero_on_equal_sorted_vectors_and_never_nan():
    probs = torch.tensor([0.6, 0.3, 0.1])
    teacher = probs.log().expand(1, 2, 3).clone()
    student = probs[[2, 0, 1]].log().expand(1, 2, 3).clone().requires_grad_()  # a permutation
    labels = torch.zeros(1, 2, dtype=torch.long)
    assert float(uld_distance(student, labels, teacher).detach()) == pytest.approx(0.0, abs=1e-6)
    nobody = torch.full((1, 2, 3), -torch.inf)
    loss = uld_distance(student, labels, nobody)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.isfinite(student.grad).all()
    parts = ULDLoss(weight=0.5)(student, {"labels": labels, "target_logprobs": teacher})
    torch.testing.assert_close(parts.loss, hard_label_loss(student, labels).loss + 0.5 * parts.kd)
    with pytest.raises(ValueError, match="weight"):
        ULDLoss(weight=-1.0)


@pytest.fixture(scope="module")
def student_tokens(offsets_cache, student_tokenizer_dir):  # noqa: F811
    tokenizer = AutoTokenizer.from_pretrained(student_tokenizer_dir)
    return StudentTokens(tokenizer, logitcache.open(offsets_cache).manifest, 256)


def test_positions_are_paired_where_both_have_read_the_same_text(
    offsets_cache,  # noqa: F811
    student_tokenizer_dir,  # noqa: F811
    student_tokens,
):
    cache = logitcache.open(offsets_cache)
    tokenizer = AutoTokenizer.from_pretrained(student_tokenizer_dir)
    eos, teacher_eos = tokenizer.eos_token_id, cache.manifest.tokenizer.eos_token_id
    assert len(tokenizer) != cache.manifest.tokenizer.vocab_size
    pairs_seen = boundaries = tokens = 0
    for index in range(cache.num_parts):
        part = cache.read_decoded(index)
        for s in range(part.sequences):
            a, b = int(part.seq_offsets[s]), int(part.seq_offsets[s + 1])
            text, teacher_ids = sequence_text(part, s), part.input_ids[a:b]
            ids, pairs = student_tokens.tokenize(text, teacher_ids, part.token_offsets[a:b])
            # the student's own tokenization of the same text, with EOS where the teacher has it
            words = ids != eos
            assert tokenizer.decode(ids[words].tolist()) == text
            assert (ids == eos).sum() == (teacher_ids == teacher_eos).sum()
            boundaries += int((ids == eos).sum())
            # a pair has read the same text: the student's prefix decodes to the teacher's
            for j in np.flatnonzero(pairs >= 0)[:: 7 if s % 5 else 1]:
                i = int(pairs[j])
                assert (ids[j] == eos) == (teacher_ids[i] == teacher_eos)
                student_read = tokenizer.decode(ids[: j + 1][words[: j + 1]].tolist())
                assert student_read == text[: int(part.token_offsets[a + i, 1])]
            # the last token is always paired: both texts end at the same character
            assert pairs[-1] >= 0
            pairs_seen += int((pairs >= 0).sum())
            tokens += len(ids)
            # the gathered targets are the paired teacher positions', -inf rows elsewhere
            _, target_ids, target_logprobs, _ = student_tokens(part, s)
            paired = pairs >= 0
            np.testing.assert_array_equal(target_ids[paired], part.target_ids[a:b][pairs[paired]])
            assert np.isneginf(target_logprobs[~paired]).all()
    assert boundaries > 0  # the cache joins documents: EOS pairs were checked
    assert 0.3 * tokens < pairs_seen < tokens  # most positions have a pair, not all


def test_batches_are_in_the_students_tokens(offsets_cache, student_tokens):  # noqa: F811
    ds = CacheDataset(
        offsets_cache, batch_size=4, split="all", shuffle=False, student_tokens=student_tokens
    )
    batch = next(iter(ds))
    assert int(batch["input_ids"].max()) < len(student_tokens.backend.get_vocab())
    assert (
        batch["input_ids"].shape[1] > logitcache.open(offsets_cache).manifest.layout.seq_len
    )  # smaller vocabulary, more tokens
    labelled = batch["labels"] != -100
    torch.testing.assert_close(
        batch["labels"][:, :-1][labelled[:, :-1]], batch["input_ids"][:, 1:][labelled[:, :-1]]
    )


def test_a_cache_without_offsets_is_refused(tiny_cache, student_tokenizer_dir):  # noqa: F811
    tokenizer = AutoTokenizer.from_pretrained(student_tokenizer_dir)
    with pytest.raises(LogitCacheError, match="--offsets"):
        StudentTokens(tokenizer, logitcache.open(tiny_cache).manifest, 256)


def test_a_masked_lm_cache_is_refused(
    tmp_path,
    tiny_mlm_teacher_dir,
    stdlib_corpus,
    student_tokenizer_dir,  # noqa: F811
):
    """A masked-LM dump can hold the text (--offsets), but its targets are not next-token ones."""
    out = dump_in_process(tiny_mlm_teacher_dir, stdlib_corpus, tmp_path / "c", offsets=True,
                          targets="topk", top_k=4, seq_len=64, part_tokens=4096)  # fmt: skip
    manifest = logitcache.open(out).manifest
    assert manifest.layout.offsets and manifest.masking is not None
    tokenizer = AutoTokenizer.from_pretrained(student_tokenizer_dir)
    with pytest.raises(LogitCacheError, match="is a masked LM"):
        StudentTokens(tokenizer, manifest, 256)
