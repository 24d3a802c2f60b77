"""The streaming dataset: each sequence once per epoch, order from the seed, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import logitcache
from logitcache import LogitCacheError
from tests.synthetic import synthetic_cache
from trainer.dataset import CacheDataset

SEQUENCES = 53  # 8 parts of 7 (the last holds 4): uneven on purpose


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return synthetic_cache(tmp_path_factory.mktemp("synthetic") / "cache", sequences=SEQUENCES)


def stream(dataset: CacheDataset, workers: int, stop_after: int | None = None) -> list[int]:
    """Storage indices in the order the training loop sees them, advancing the state as it goes."""
    seen = []
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    for batch in loader:
        seen += batch["index"].tolist()
        dataset.advance()
        if stop_after is not None and dataset.state_dict()["batches"] == stop_after:
            break
    return seen


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_each_sequence_once_and_order_from_seed(cache_dir, workers):
    reference = stream(CacheDataset(cache_dir, batch_size=4, seed=7), workers=0)
    assert sorted(reference) == list(range(SEQUENCES))
    assert stream(CacheDataset(cache_dir, batch_size=4, seed=7), workers=workers) == reference
    assert stream(CacheDataset(cache_dir, batch_size=4, seed=8), workers=workers) != reference


def test_epochs_differ_and_repeat(cache_dir):
    ds = CacheDataset(cache_dir, batch_size=5, seed=1)
    first = stream(ds, workers=0)
    ds.set_epoch(1)
    second = stream(ds, workers=0)
    assert first != second and sorted(second) == list(range(SEQUENCES))
    again = CacheDataset(cache_dir, batch_size=5, seed=1)
    again.set_epoch(1)
    assert stream(again, workers=2) == second


@pytest.mark.parametrize("workers", [0, 2])
def test_two_resumes_give_the_uninterrupted_order(cache_dir, workers):
    reference = stream(CacheDataset(cache_dir, batch_size=3, seed=3), workers=0)
    ds = CacheDataset(cache_dir, batch_size=3, seed=3)
    seen = stream(ds, workers=workers, stop_after=4)
    state = ds.state_dict()
    ds = CacheDataset(cache_dir, batch_size=3, seed=3)  # a new process: only the state survives
    ds.load_state_dict(state)
    seen += stream(ds, workers=workers, stop_after=11)
    state = ds.state_dict()
    ds = CacheDataset(cache_dir, batch_size=3, seed=3)
    ds.load_state_dict(state)
    seen += stream(ds, workers=workers)
    assert seen == reference


def test_ranks_partition_the_epoch(cache_dir):
    per_rank = [
        stream(CacheDataset(cache_dir, batch_size=4, seed=5, rank=r, world_size=3), workers=2)
        for r in range(3)
    ]
    flat = sorted(i for seen in per_rank for i in seen if i >= 0)
    assert flat == list(range(SEQUENCES))


def steps(dataset: CacheDataset, stop_after: int | None = None) -> list[list[int]]:
    """Per step (global batch), the storage indices this rank trained on (padding: [-1])."""
    seen = []
    for batch in DataLoader(dataset, batch_size=None, num_workers=0):
        seen.append(batch["index"].tolist())
        dataset.advance()
        if stop_after is not None and dataset.state_dict()["batches"] == stop_after:
            break
    return seen


@pytest.mark.parametrize("world", [2, 3, 5])
def test_every_rank_takes_the_same_steps_and_padding_carries_no_labels(cache_dir, world):
    """53 sequences in global batches of 5: the last holds 3, so with 5 ranks two of them get
    a padding batch (index -1, all labels -100); every rank takes 11 steps."""
    datasets = [
        CacheDataset(cache_dir, batch_size=5, seed=4, rank=r, world_size=world)
        for r in range(world)
    ]
    per_rank = [steps(ds) for ds in datasets]
    assert all(
        len(s) == 11 == ds.batches_per_epoch() for s, ds in zip(per_rank, datasets, strict=True)
    )
    reference = steps(CacheDataset(cache_dir, batch_size=5, seed=4))
    for step, whole in enumerate(reference):
        assert [per_rank[r][step] for r in range(world)] == [
            whole[r::world] or [-1] for r in range(world)
        ]
    if world == 5:
        fresh = CacheDataset(cache_dir, batch_size=5, seed=4, rank=4, world_size=5)
        padding = list(DataLoader(fresh, batch_size=None))[-1]
        assert padding["index"].tolist() == [-1]
        assert (padding["labels"] == -100).all() and padding["attention_mask"].sum() > 0


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 3), (3, 2)])
def test_resume_with_another_number_of_ranks_continues_the_same_order(cache_dir, before, after):
    reference = steps(CacheDataset(cache_dir, batch_size=6, seed=2))
    got: dict[int, list[int]] = {}
    states = []
    for r in range(before):
        ds = CacheDataset(cache_dir, batch_size=6, seed=2, rank=r, world_size=before)
        for step, index in enumerate(steps(ds, stop_after=4)):
            got.setdefault(step, []).extend(i for i in index if i >= 0)
        states.append(ds.state_dict())
    assert all(s == {"epoch": 0, "batches": 4, "batch_size": 6} for s in states)
    for r in range(after):
        ds = CacheDataset(cache_dir, batch_size=6, seed=2, rank=r, world_size=after)
        ds.load_state_dict(states[0])
        for step, index in enumerate(steps(ds), start=4):
            got.setdefault(step, []).extend(i for i in index if i >= 0)
    assert [sorted(got[s]) for s in range(len(reference))] == [sorted(b) for b in reference]
    with pytest.raises(LogitCacheError, match="resume with --batch-size 6"):
        CacheDataset(cache_dir, batch_size=4, seed=2).load_state_dict(states[0])


def test_eval_split_is_fixed_disjoint_and_never_trained_on(cache_dir):
    train = stream(CacheDataset(cache_dir, batch_size=4, eval_fraction=0.25, seed=0), workers=0)
    held = stream(
        CacheDataset(cache_dir, batch_size=4, eval_fraction=0.25, seed=9, split="eval"), workers=0
    )
    assert set(train).isdisjoint(held) and sorted(train + held) == list(range(SEQUENCES))
    assert 0.1 < len(held) / SEQUENCES < 0.45
    other_seed = stream(
        CacheDataset(cache_dir, batch_size=4, eval_fraction=0.25, seed=1, split="eval"), workers=0
    )
    assert sorted(other_seed) == sorted(held)


def test_batches_hold_the_cached_content(cache_dir):
    cache = logitcache.open(cache_dir)
    batch = next(iter(CacheDataset(cache, batch_size=6, seed=2)))
    for row, index in enumerate(batch["index"].tolist()):
        seq = cache[index]
        n = len(seq.input_ids)
        assert torch.equal(batch["input_ids"][row, :n], seq.input_ids)
        assert torch.equal(batch["labels"][row, : n - 1], seq.input_ids[1:])
        assert (batch["labels"][row, n - 1 :] == -100).all()
        assert torch.equal(batch["target_ids"][row, :n], seq.target_ids)
        assert torch.equal(batch["target_logprobs"][row, :n], seq.target_logprobs)
        assert batch["attention_mask"][row].sum() == n


def test_memory_is_bounded_by_the_window(cache_dir, monkeypatch):
    """The reader holds at most 2 * shuffle_window decoded parts, whatever the cache size."""
    cache = logitcache.open(cache_dir)
    reads = []
    original = cache.read_part
    monkeypatch.setattr(cache, "read_part", lambda i: reads.append(i) or original(i))
    stream(CacheDataset(cache, batch_size=4, seed=0, shuffle_window=1), workers=0)
    assert sorted(reads) == list(range(cache.num_parts))  # each part decoded exactly once


def test_an_empty_split_is_refused(cache_dir):
    with pytest.raises(LogitCacheError, match="no sequences"):
        CacheDataset(cache_dir, batch_size=4, rank=99, world_size=100)
    with pytest.raises(LogitCacheError, match="eval-fraction"):
        CacheDataset(cache_dir, batch_size=4, eval_fraction=1.0)
    assert np.isfinite(CacheDataset(cache_dir, batch_size=4).batches_per_epoch())
