"""`Cache.to_hf_dataset()`: the cache as a streaming `datasets.IterableDataset`, on real dumps.

What a user of `datasets` relies on: every sequence once per epoch with the reader's values,
`shuffle(seed, buffer_size)` shuffling the parts (the shards) and the sequences, `set_epoch`
giving a new order that the same seed and epoch give again, DataLoader workers dividing the
parts, and `import logitcache` not importing `datasets`.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import logitcache
from tests.cli import REPO, cli_env


@pytest.fixture(scope="module")
def caches(small_caches, small_sampled_cache) -> dict[str, Path]:
    return {
        "topk-zarr": small_caches["zarr"],
        "topk-parquet": small_caches["parquet"],
        "sample-parquet": small_sampled_cache,
    }


def order(ds) -> list[int]:
    return [row["index"] for row in ds]


@pytest.mark.parametrize("kind", ["topk-zarr", "topk-parquet", "sample-parquet"])
def test_one_shard_per_part_with_the_readers_values(kind, caches):
    cache = logitcache.open(caches[kind])
    ds = cache.to_hf_dataset()
    assert ds.n_shards == cache.num_parts > 1
    reference = list(cache)  # storage order, the uniform view of `CacheSequence`
    rows = list(ds)
    assert [r["index"] for r in rows] == list(range(len(cache)))
    for row, seq in zip(rows, reference, strict=True):
        np.testing.assert_array_equal(row["input_ids"], seq.input_ids.numpy())
        np.testing.assert_array_equal(row["target_ids"], seq.target_ids.numpy())
        got = np.asarray(row["target_logprobs"], dtype=np.float32)
        np.testing.assert_array_equal(got, seq.target_logprobs.numpy())  # -inf slots included
    if kind.startswith("sample"):
        assert any(np.isneginf(np.asarray(r["target_logprobs"])).any() for r in rows)
    torch_row = next(iter(ds.with_format("torch")))
    assert torch_row["target_logprobs"].dtype == torch.float32
    assert torch_row["target_ids"].shape == reference[0].target_ids.shape


def test_shuffle_and_set_epoch_behave_as_datasets_users_expect(caches):
    cache = logitcache.open(caches["topk-zarr"])
    everything = list(range(len(cache)))
    shuffled = cache.to_hf_dataset().shuffle(seed=7, buffer_size=8)
    epochs = []
    for epoch in range(3):
        shuffled.set_epoch(epoch)
        epochs.append(order(shuffled))
        assert sorted(epochs[-1]) == everything  # each sequence exactly once per epoch
    assert len({tuple(e) for e in epochs}) == 3 and everything not in epochs
    again = cache.to_hf_dataset().shuffle(seed=7, buffer_size=8)
    again.set_epoch(1)
    assert order(again) == epochs[1]  # same seed and epoch: same order
    other = cache.to_hf_dataset().shuffle(seed=8, buffer_size=8)
    other.set_epoch(1)
    assert order(other) != epochs[1]


def test_buffer_of_one_shuffles_whole_parts(caches):
    """With no buffer to mix sequences (and, where `datasets` has `max_buffer_input_shards`, one part feeding it at a
    time), the order is the parts' in a new order, each part's sequences together and in
    storage order: the shards are what is shuffled."""
    cache = logitcache.open(caches["topk-zarr"])
    spans = [list(range(*cache.part_span(i))) for i in range(cache.num_parts)]
    ds = cache.to_hf_dataset()
    one_part = {}
    if "max_buffer_input_shards" in inspect.signature(ds.shuffle).parameters:
        one_part["max_buffer_input_shards"] = 1
    ds = ds.shuffle(seed=0, buffer_size=1, **one_part)
    orders = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        got = order(ds)
        pieces, at = [], 0
        while at < len(got):
            span = next(s for s in spans if s[0] == got[at])
            assert got[at : at + len(span)] == span
            pieces.append(spans.index(span))
            at += len(span)
        assert sorted(pieces) == list(range(cache.num_parts))
        orders.append(pieces)
    assert any(pieces != sorted(pieces) for pieces in orders)


def test_dataloader_workers_divide_the_parts(caches):
    cache = logitcache.open(caches["sample-parquet"])
    ds = cache.to_hf_dataset()
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    assert sorted(int(row["index"]) for row in loader) == list(range(len(cache)))


def test_import_logitcache_does_not_import_datasets(caches):
    code = (
        "import sys, logitcache\n"
        f"cache = logitcache.open({str(caches['topk-zarr'])!r})\n"
        "assert 'datasets' not in sys.modules, 'datasets imported by logitcache'\n"
        "ds = cache.to_hf_dataset()\n"
        "assert 'datasets' in sys.modules\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), cwd=REPO,
        timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
