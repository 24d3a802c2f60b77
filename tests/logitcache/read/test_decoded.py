"""The value check that every decode runs, on the arrays of a real sampled dump.

The fault suite (tests/faults/test_fault_content.py) covers top-k caches end to end; sampled
targets are ragged (distinct ids and their counts, `target_lengths` entries per position), so
their own failure modes are checked here: a count of 0, lengths that do not add up to the
entries stored, and an id outside the vocabulary, each named by sequence and position.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import logitcache
from logitcache.read.decoded import decode
from tests.logitcache.test_golden_bytes import TEACHER, VOCAB, write_fixed_input


@pytest.fixture(scope="module")
def sampled(tmp_path_factory) -> logitcache.Cache:
    root = tmp_path_factory.mktemp("sampled")
    tok, ids = write_fixed_input(root)
    out = root / "cache"
    logitcache.dump(
        logitcache.DumpOptions(
            data=str(ids),
            out=out,
            teacher_factory=TEACHER,
            tokenizer=str(tok),
            targets="sample",
            samples=16,
            seq_len=16,
            part_tokens=64,
            device="cpu",
            progress=False,
        )
    )
    return logitcache.open(out)


def _part(cache: logitcache.Cache):
    arrays = cache.read_part(1)
    return dataclasses.replace(
        arrays, **{name: np.array(value) for name, value in arrays.arrays().items()}
    )


def test_the_untouched_part_decodes(sampled) -> None:
    decoded = decode(sampled.manifest, _part(sampled), "part-000001")
    assert np.isfinite(decoded.target_logprobs[:, 0]).all()


def test_a_sampled_count_of_zero_is_named_by_position(sampled) -> None:
    arrays = _part(sampled)
    ends = np.cumsum(arrays.target_lengths)
    row = 20  # sequence 1, position 4 of this part's 16-token sequences
    arrays.target_counts[ends[row - 1]] = 0  # the first entry of that position
    with pytest.raises(logitcache.CorruptCacheError) as refused:
        decode(sampled.manifest, arrays, "part-000001")
    assert "sequence 1 of the part, position 4: a stored sample count is 0" in str(refused.value)


def test_lengths_that_do_not_add_up_are_refused_before_decoding(sampled) -> None:
    arrays = _part(sampled)
    arrays.target_lengths[3] += 1
    with pytest.raises(logitcache.CorruptCacheError, match="its target_lengths add up to"):
        decode(sampled.manifest, arrays, "part-000001")


def test_a_sampled_id_outside_the_vocabulary_is_named_by_position(sampled) -> None:
    arrays = _part(sampled)
    ends = np.cumsum(arrays.target_lengths)
    arrays.target_ids[ends[5]] = VOCAB + 3  # first entry of position 6 of sequence 0
    with pytest.raises(logitcache.CorruptCacheError) as refused:
        decode(sampled.manifest, arrays, "part-000001")
    message = str(refused.value)
    assert f"sequence 0 of the part, position 6: target id {VOCAB + 3}" in message, message


def test_the_fixture_is_a_sampled_cache(sampled) -> None:
    assert sampled.manifest.targets.kind == "sample" and sampled.num_parts > 1
    assert Path(sampled.root).is_dir()
