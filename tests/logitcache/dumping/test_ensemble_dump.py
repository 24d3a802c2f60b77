"""`dump --teacher A --teacher B --ensemble MODE`: the targets of the teachers' average, equal
to the average computed directly from the two models; the manifest's ensemble record; the full
logits path in place of the chunked one; and what an ensemble refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import logitcache
from logitcache.dumping.ensemble import FULL_LOGITS_WHY
from logitcache.dumping.pipeline import DumpOptions, dump
from logitcache.errors import LogitCacheError
from logitcache.format.ensemble import ensemble_teacher
from tests.logitcache.dump_helpers import VOCAB, sequences_of
from tests.logitcache.ensemble_helpers import direct_average, load_models

#: Every id with float32 log-probs, so the cache holds the whole distribution to compare.
FULL = {"targets": "topk", "top_k": VOCAB, "logprob_dtype": "float32", "seq_len": 64,
        "part_tokens": 256, "device": "cpu", "progress": False}  # fmt: skip


def ensemble_dump(out: Path, teachers: list[Path], **options: object) -> logitcache.Manifest:
    opts = DumpOptions(data=options.pop("data"), out=out, teachers=[str(t) for t in teachers],
                       **(FULL | options))  # fmt: skip
    summary = dump(opts)
    assert summary.logits == f"full logits ({FULL_LOGITS_WHY})"  # never the chunked path
    return summary.manifest


@pytest.mark.parametrize(("mode", "temperature"), [("logits", 1.0), ("probs", 2.0)])
def test_ensemble_dump_equals_the_direct_average(
    mode, temperature, tmp_path, one_torch_thread, tiny_teacher_dir, second_teacher_dir,
    small_corpus,
):  # fmt: skip
    teachers = [tiny_teacher_dir, second_teacher_dir]
    m = ensemble_dump(
        tmp_path / "cache", teachers, data=str(small_corpus), ensemble=mode, weights=[3.0, 1.0],
        temperature=temperature,
    )  # fmt: skip
    assert m.format_version == "1.3" and m.ensemble is not None and m.ensemble.mode == mode
    assert [member.weight for member in m.ensemble.members] == [0.75, 0.25]
    assert [member.teacher.name for member in m.ensemble.members] == list(map(str, teachers))
    assert m.teacher == ensemble_teacher(mode, m.ensemble.members)
    assert (
        m.ensemble.members[0].teacher.weights_sha256 != m.ensemble.members[1].teacher.weights_sha256
    )
    models = load_models(teachers)
    worst = 0.0
    for seq in sequences_of(tmp_path / "cache"):
        want = direct_average(models, seq.input_ids, [0.75, 0.25], mode, temperature)
        got = torch.full_like(want, -torch.inf).scatter_(
            1, seq.target_ids, seq.target_logprobs.double()
        )
        worst = max(worst, float((got - want).abs().max()))
    assert worst < 2e-4, worst
    # and it is an average of two different teachers: each alone is far from it
    alone = direct_average(models[:1], seq.input_ids, [1.0], mode, temperature)
    assert float((alone - want).abs().max()) > 100 * worst


def test_ensemble_dump_resumes_and_a_changed_weight_is_another_cache(
    tmp_path, one_torch_thread, tiny_teacher_dir, second_teacher_dir, small_corpus
):
    """The ensemble record is part of the settings: rerunning resumes (the cache is complete),
    other weights are refused, as any other change of teacher would be."""
    teachers = [tiny_teacher_dir, second_teacher_dir]
    out = tmp_path / "cache"
    small = {"data": str(small_corpus), "top_k": 4, "logprob_dtype": "float16"}
    first = ensemble_dump(out, teachers, **small)
    again = ensemble_dump(out, teachers, **small)
    assert again.parts == first.parts and again.ensemble == first.ensemble
    with pytest.raises(logitcache.SettingsMismatchError, match="ensemble"):
        ensemble_dump(out, teachers, weights=[1.0, 2.0], **small)


@pytest.mark.parametrize(
    ("changes", "phrase"),
    [
        ({"weights": [1.0]}, "gives 1 weight for 2 teachers"),
        ({"weights": [1.0, -1.0]}, "must be positive numbers, got -1"),
        ({"weights": [1.0, 0.0]}, "must be positive numbers, got 0"),
        ({"ensemble": "mean"}, "--ensemble must be one of logits, probs"),
        ({"device_map": "auto"}, "the teachers of an ensemble each run whole"),
        ({"teacher_factory": "pkg.models:build"}, "a --teacher-factory cannot be one of them"),
    ],
)
def test_ensemble_settings_are_refused_before_any_teacher_loads(
    changes, phrase, tmp_path, small_corpus
):
    opts = DumpOptions(data=str(small_corpus), out=tmp_path / "out", teachers=["a", "b"],
                       **(FULL | changes))  # fmt: skip
    with pytest.raises(LogitCacheError, match=phrase):
        dump(opts)
    assert not (tmp_path / "out").exists()


def test_one_teacher_with_ensemble_flags_is_refused(tmp_path, tiny_teacher_dir, small_corpus):
    for changes in (
        {"ensemble": "probs"},
        {"weights": [1.0]},
        {"teachers": [str(tiny_teacher_dir)]},
    ):
        opts = DumpOptions(data=str(small_corpus), out=tmp_path / "out",
                           teacher=str(tiny_teacher_dir), **(FULL | changes))  # fmt: skip
        with pytest.raises(LogitCacheError, match="two or more"):
            dump(opts)
    assert not (tmp_path / "out").exists()


def test_teachers_with_other_tokenizers_are_refused(
    tmp_path, tiny_teacher_dir, other_tokenizer_teacher_dir, small_corpus
):
    with pytest.raises(LogitCacheError, match="has another tokenizer than"):
        ensemble_dump(
            tmp_path / "out", [tiny_teacher_dir, other_tokenizer_teacher_dir],
            data=str(small_corpus),
        )  # fmt: skip
    assert not (tmp_path / "out").exists()
