"""A real dump's content: the stored targets are the tiny teacher's top-k, normalised over the
full vocabulary; `logitcache.open` reads them back; the zarr and parquet caches of one dump agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import logitcache
from tests.logitcache.dump_helpers import MAIN, VOCAB

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: float16 rounding (docs/FORMAT.md, section 3): relative bound in the normal range, absolute
#: bound for subnormals.
FP16_REL = 2.0**-11
FP16_SUB = 2.0**-25
#: Allowed float32 disagreement between the dump's batched, right-padded forward and the
#: test's one-sequence forward of the same teacher (0 on one CPU thread; BLAS may differ).
FORWARD_NOISE = 1e-5


def assert_same_sequences(a: list, b: list) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert torch.equal(x.input_ids, y.input_ids), f"sequence {i}: input_ids differ"
        assert torch.equal(x.target_ids, y.target_ids), f"sequence {i}: target_ids differ"
        assert torch.equal(x.target_logprobs, y.target_logprobs), f"sequence {i}: logprobs differ"


def test_stored_targets_are_the_teachers_top_k_within_the_float16_bound(
    main_caches: dict[str, Path], tiny_teacher_dir: Path
):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32).eval()
    cache = logitcache.open(main_caches["zarr"])
    k = cache.manifest.targets.k
    assert (cache.manifest.targets.k, cache.manifest.targets.temperature) == (MAIN["top_k"], 1.0)
    assert cache.manifest.targets.logprob_dtype == "float16"
    assert cache.manifest.targets.order == "id"  # the default; readers decode to descending
    positions = untied = 0
    with torch.inference_mode():
        for seq in cache:
            logits = model(seq.input_ids[None]).logits[0].float()  # (T, vocab), one sequence alone
            assert logits.shape == (len(seq.input_ids), VOCAB)
            logprobs = torch.log_softmax(logits, dim=-1)
            top = logprobs.topk(k + 1, dim=-1).values  # one more, to see ties at the boundary
            ref = top[:, :k]
            ids, stored = seq.target_ids, seq.target_logprobs
            positions += len(ids)

            # The stored ids are k distinct ids whose true log-probs are the top-k values.
            assert ((ids >= 0) & (ids < VOCAB)).all()
            assert (ids.sort(dim=-1).values.diff(dim=-1) > 0).all(), "an id is stored twice"
            true_at_ids = logprobs.gather(-1, ids)
            assert torch.allclose(
                true_at_ids.sort(dim=-1, descending=True).values, ref, rtol=0, atol=FORWARD_NOISE
            )
            # Where no two of the top k+1 values are within the noise, the ids are exactly the
            # top k (as sets: float16 rounding may tie two values and reorder them).
            clear = (top.diff(dim=-1).abs() > 2 * FORWARD_NOISE).all(dim=-1)
            ref_ids = logprobs.topk(k, dim=-1).indices
            assert torch.equal(ids[clear].sort(-1).values, ref_ids[clear].sort(-1).values)
            untied += int(clear.sum())

            # Values: log_softmax over the FULL vocabulary, rounded to float16, descending.
            bound = FP16_REL * true_at_ids.abs() + FP16_SUB + FORWARD_NOISE
            assert ((stored - true_at_ids).abs() <= bound).all()
            assert (stored.diff(dim=-1) <= 0).all()
            assert torch.equal(stored, stored.half().float()), "values are not float16"

            # Tail mass 1 - sum(exp) matches the teacher's mass outside its top k.
            tail_stored = 1 - stored.double().exp().sum(-1)
            tail_ref = 1 - ref.double().exp().sum(-1)
            tail_bound = (ref.double().exp() * torch.expm1(FP16_REL * ref.double().abs())).sum(-1)
            assert ((tail_stored - tail_ref).abs() <= tail_bound + k * FORWARD_NOISE).all()
            assert (tail_stored > -1e-2).all() and (tail_stored <= 1).all()
    assert positions == cache.manifest.tokens
    assert untied > 0.9 * positions, "too many near-ties for the exact id check to mean much"


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_round_trip_through_open(main_caches: dict[str, Path], backend: str):
    cache = logitcache.open(main_caches[backend])
    m = cache.manifest
    assert (m.format, m.format_version, m.backend, m.complete) == (
        "logitcache",
        "1.1",  # the default id order is a 1.1 feature (top-k: no gaps, so not 1.2)
        backend,
        True,
    )
    assert m.teacher.vocab_size == VOCAB and m.targets.id_dtype == "uint16"
    assert m.layout.sequences_per_part == MAIN["part_tokens"] // MAIN["seq_len"]
    assert cache.num_parts > 2
    assert all(p.sequences == m.layout.sequences_per_part for p in m.parts[:-1])
    assert len(cache) == m.sequences == sum(p.sequences for p in m.parts)

    sequences = list(cache)
    assert len(sequences) == len(cache)
    assert sum(len(s.input_ids) for s in sequences) == m.tokens
    for seq in sequences:
        assert 1 <= len(seq.input_ids) <= MAIN["seq_len"]
        assert (
            seq.target_ids.shape == seq.target_logprobs.shape == (len(seq.input_ids), m.targets.k)
        )
    # Random access: the first and last sequence of every part, and a stride through the rest
    # (each access opens the part again, so not every index).
    starts = np.cumsum([0] + [p.sequences for p in m.parts])
    probe = {*starts[:-1].tolist(), *(starts[1:] - 1).tolist(), *range(0, len(cache), 7)}
    for i in sorted(probe):
        got = cache[i]
        assert torch.equal(got.input_ids, sequences[i].input_ids), i
        assert torch.equal(got.target_ids, sequences[i].target_ids), i
        assert torch.equal(got.target_logprobs, sequences[i].target_logprobs), i
    assert torch.equal(cache[-1].input_ids, sequences[-1].input_ids)
    with pytest.raises(IndexError):
        cache[len(cache)]
    # Packing: every sequence but the last is full.
    assert all(len(s.input_ids) == MAIN["seq_len"] for s in sequences[:-1])


def test_zarr_and_parquet_caches_of_one_dump_are_equal(main_caches: dict[str, Path]):
    zarr_cache, parquet_cache = (logitcache.open(main_caches[b]) for b in ("zarr", "parquet"))
    a, b = zarr_cache.manifest.to_json(), parquet_cache.manifest.to_json()
    a, b = json.loads(a), json.loads(b)
    for m in (a, b):
        m.pop("backend"), m.pop("created")
        for part in m["parts"]:
            part.pop("files")
    assert a == b
    assert_same_sequences(list(zarr_cache), list(parquet_cache))
