"""`logitcache.write.ensemble`: caches two teachers dumped separately, combined. Full caches
(k = vocabulary) give the direct average of the two models exactly in both modes; top-k caches
in probs mode stay within the bound docs/FORMAT.md (section 3c) states; sampled caches pool
their counts; whatever cannot be averaged is refused before OUT is touched."""

from __future__ import annotations

import json
import math

import pytest
import torch

import logitcache
from logitcache.errors import CorruptCacheError, LogitCacheError
from logitcache.format.ensemble import ensemble_teacher
from logitcache.format.parse import parse_manifest
from logitcache.read.verify import verify
from logitcache.write.ensemble import ensemble
from tests.logitcache.dump_helpers import VOCAB, sequences_of
from tests.logitcache.ensemble_helpers import direct_average, load_models


def test_full_caches_combine_to_the_direct_average_in_both_modes(
    ensemble_members, tmp_path, tiny_teacher_dir, second_teacher_dir
):
    models = load_models([tiny_teacher_dir, second_teacher_dir])
    for mode in ("logits", "probs"):
        m = ensemble(tmp_path / mode, ensemble_members["full"], mode=mode, weights=[2.0, 1.0])
        assert m.complete and m.format_version == "1.3" and m.targets.k == VOCAB
        assert m.ensemble is not None and m.ensemble.mode == mode
        assert [x.cache for x in m.ensemble.members] == list(map(str, ensemble_members["full"]))
        assert m.teacher == ensemble_teacher(mode, m.ensemble.members)
        assert not verify(logitcache.open(tmp_path / mode)).problems
        worst = 0.0
        for seq in sequences_of(tmp_path / mode):
            want = direct_average(models, seq.input_ids, [2 / 3, 1 / 3], mode)
            got = torch.full_like(want, -torch.inf)
            got.scatter_(1, seq.target_ids, seq.target_logprobs.double())
            worst = max(worst, float((got - want).abs().max()))
        assert worst < 2e-4, (mode, worst)


def test_topk_caches_in_probs_mode_stay_within_the_stated_bound(
    ensemble_members, tmp_path, tiny_teacher_dir, second_teacher_dir
):
    """Every stored probability is at most the true average and below it by at most
    sum_i w_i min(p_i(k), r_i) over the members that did not store the id; the union of the
    supports is used (ids only teacher B stored are there)."""
    weights = [0.5, 0.5]
    m = ensemble(tmp_path / "out", ensemble_members["top8"], mode="probs")
    assert m.targets.k == 8 and m.targets.order == "descending"
    models = load_models([tiny_teacher_dir, second_teacher_dir])
    member_seqs = [sequences_of(c) for c in ensemble_members["top8"]]
    from_b_only, loose, tight = 0, 0.0, 0.0
    for index, seq in enumerate(sequences_of(tmp_path / "out")):
        true = direct_average(models, seq.input_ids, weights, "probs").exp()  # (T, V)
        stored = seq.target_logprobs.double().exp()  # (T, k)
        truth = true.gather(1, seq.target_ids)
        bound = torch.zeros_like(stored)
        for w, member in zip(weights, member_seqs, strict=True):
            mine = member[index]
            kept = (seq.target_ids[:, :, None] == mine.target_ids[:, None, :]).any(-1)
            p_k = mine.target_logprobs[:, -1:].double().exp()  # smallest stored
            tail = 1 - mine.target_logprobs.double().exp().sum(-1, keepdim=True)
            bound += torch.where(kept, 0.0, w * torch.minimum(p_k, tail.clamp_min(0)))
        assert bool((stored <= truth + 1e-6).all())
        assert bool((truth - stored <= bound + 1e-6).all())
        loose = max(loose, float((truth - stored).max()))
        tight = max(tight, float(bound.max()))
        a_ids = member_seqs[0][index].target_ids
        from_b_only += int((~(seq.target_ids[:, :, None] == a_ids[:, None, :]).any(-1)).sum())
    assert from_b_only > 0 and 0 < loose <= tight  # the approximation is there, and bounded


def counts(seq: logitcache.CacheSequence, row: int, samples: int) -> dict[int, int]:
    """{id: count} of a sampled position, from the decoded view's log(count / samples)."""
    pairs = zip(seq.target_ids[row].tolist(), seq.target_logprobs[row].tolist(), strict=True)
    return {i: round(math.exp(lp) * samples) for i, lp in pairs if lp > -math.inf}


def test_sampled_caches_pool_their_counts(ensemble_members, tmp_path):
    out = ensemble(tmp_path / "out", ensemble_members["sampled"], mode="probs")
    assert out.targets.samples == 32 and out.targets.seed == 0
    assert out.codec.gaps == ["target_ids"]  # stored like a sampled dump's
    assert not verify(logitcache.open(tmp_path / "out")).problems
    combined = sequences_of(tmp_path / "out")
    inputs = [sequences_of(c) for c in ensemble_members["sampled"]]
    pooled_from_members = 0
    for index, seq in enumerate(combined):
        assert torch.equal(seq.input_ids, inputs[0][index].input_ids)
        for row in range(len(seq.input_ids)):
            want: dict[int, int] = {}
            for member in inputs:
                for i, n in counts(member[index], row, 16).items():
                    want[i] = want.get(i, 0) + n
            got = counts(seq, row, 32)
            assert got == want
            pooled_from_members += len(want) > len(inputs[0][index].target_ids[row].unique())
    assert pooled_from_members > 0


def test_combined_cache_resumes_like_any_cache(ensemble_members, tmp_path):
    """Rerun with the same inputs: complete already, nothing rewritten; other weights are
    another cache (refused without --overwrite)."""
    first = ensemble(tmp_path / "out", ensemble_members["top8"], mode="probs")
    again = ensemble(tmp_path / "out", ensemble_members["top8"], mode="probs")
    assert again.parts == first.parts
    with pytest.raises(logitcache.SettingsMismatchError, match="ensemble"):
        ensemble(tmp_path / "out", ensemble_members["top8"], mode="probs", weights=[1.0, 2.0])


@pytest.mark.parametrize(
    ("kind", "mode", "weights", "phrase"),
    [
        ("top8", "logits", None, "stored only the top k of 512 ids"),
        ("sampled", "logits", None, "cannot be averaged with --mode logits"),
        ("sampled", "probs", [2.0, 1.0], "each one weighs as many draws as it holds"),
        ("top8", "probs", [1.0], "gives 1 weight for 2 teachers"),
        ("top8", "probs", [1.0, -2.0], "must be positive numbers, got -2"),
        ("top8", "median", None, "--mode must be one of logits, probs"),
        ("mixed kinds", "probs", None, "average caches of one target kind"),
        ("other data", "probs", None, "hold different data"),
        ("one", "probs", None, "at least two caches"),
        ("other tokenizer", "probs", None, "was dumped with another tokenizer"),
    ],
)
def test_what_cannot_be_averaged_is_refused_before_out_is_touched(
    ensemble_members, tmp_path, kind, mode, weights, phrase
):
    inputs = {
        "mixed kinds": [ensemble_members["top8"][0], ensemble_members["sampled"][1]],
        "other data": [ensemble_members["top8"][0], ensemble_members["other data"][0]],
        "other tokenizer": [ensemble_members["top8"][0], ensemble_members["other tokenizer"][0]],
        "one": ensemble_members["top8"][:1],
    }.get(kind) or ensemble_members[kind]
    with pytest.raises(LogitCacheError, match=phrase):
        ensemble(tmp_path / "out", inputs, mode=mode, weights=weights)
    assert not (tmp_path / "out").exists()


def test_a_tampered_ensemble_record_is_refused_by_the_parser(ensemble_members, tmp_path):
    """The record a reader trusts: weights that are a mixture, two or more members, the
    teacher record their identity, format 1.3. Each edit below makes the manifest corrupt."""
    m = ensemble(tmp_path / "out", ensemble_members["top8"], mode="probs", weights=[3.0, 1.0])
    doc = json.loads(m.to_json())
    assert parse_manifest(json.dumps(doc)) == m

    def edited(change) -> str:
        copy = json.loads(json.dumps(doc))
        change(copy)
        return json.dumps(copy)

    cases = {
        "weights must be positive and sum to 1": lambda d: d["ensemble"]["members"][0].update(
            weight=0.5
        ),
        "at least two members": lambda d: d["ensemble"]["members"].pop(),
        "is not one of": lambda d: d["ensemble"].update(mode="median"),
        "not the identity of the ensemble's members": lambda d: d["teacher"].update(
            weights_sha256="0" * 64
        ),
        "ensemble needs format_version 1.3": lambda d: d.update(format_version="1.2"),
    }
    for phrase, change in cases.items():
        with pytest.raises(CorruptCacheError, match=phrase):
            parse_manifest(edited(change))
