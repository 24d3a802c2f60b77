"""Masked-LM caches and `--offsets` caches (format 1.3) in the Parquet backend: dumped, exported
both ways, merged from shards, read by pyarrow alone, by `Cache.to_hf_dataset`, and checked by
`verify`, `info` and `stats`, on real dumps of the tiny BERT and the tiny GPT-2."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import logitcache
from logitcache import sequence_text
from logitcache.format.manifest import PartArrays
from logitcache.storage import parquet_backend
from tests.logitcache.dump_helpers import describe, dump_in_process, flat, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: A masked-LM dump with text: two views per sequence, several parts.
MASKED = {"seq_len": 64, "views": 2, "part_tokens": 2048, "seed": 3, "offsets": True}
#: A causal dump with text, several parts.
OFFSETS = {"targets": "topk", "top_k": 8, "seq_len": 64, "part_tokens": 512, "offsets": True}


def assert_same_parts(a: logitcache.Cache, b: logitcache.Cache) -> None:
    """Every part of `a` and `b` holds the same arrays, as stored."""
    assert a.num_parts == b.num_parts and a.manifest.parts[0].masked == b.manifest.parts[0].masked
    for index in range(a.num_parts):
        one, two = a.read_part(index).arrays(), b.read_part(index).arrays()
        assert one.keys() == two.keys()
        for name, values in one.items():
            np.testing.assert_array_equal(values, two[name], err_msg=name)
            assert values.dtype == two[name].dtype or name == "target_lengths", name


@pytest.fixture(scope="module", params=["topk", "sample"])
def masked_pair(request, tmp_path_factory, tiny_mlm_teacher_dir, stdlib_corpus) -> dict[str, Path]:
    """The same masked-LM dump (with --offsets) in both backends."""
    root = tmp_path_factory.mktemp(f"masked_{request.param}")
    kind = {"topk": {"targets": "topk", "top_k": 8}, "sample": {"samples": 16}}[request.param]
    return {
        backend: dump_in_process(tiny_mlm_teacher_dir, stdlib_corpus, root / backend,
                                 backend=backend, **MASKED, **kind)
        for backend in ("zarr", "parquet")
    }  # fmt: skip


@pytest.fixture(scope="module")
def offsets_pair(tmp_path_factory, tiny_teacher_dir, small_corpus) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("offsets_pair")
    return {
        backend: dump_in_process(tiny_teacher_dir, small_corpus, root / backend, backend=backend,
                                 **OFFSETS)
        for backend in ("zarr", "parquet")
    }  # fmt: skip


def test_a_masked_dump_in_parquet_holds_what_zarr_holds(masked_pair, tmp_path):
    zarr_cache, parquet_cache = (logitcache.open(masked_pair[b]) for b in ("zarr", "parquet"))
    assert parquet_cache.manifest.backend == "parquet" and parquet_cache.manifest.masking
    assert parquet_cache.num_parts > 1
    assert_same_parts(zarr_cache, parquet_cache)
    for cache in (zarr_cache, parquet_cache):
        assert logitcache.verify(cache).ok
    for source, backend in ((masked_pair["zarr"], "parquet"), (masked_pair["parquet"], "zarr")):
        out = tmp_path / f"to-{backend}"
        proc = run_cli("export", source, out, "--format", backend)
        assert proc.returncode == 0, describe(proc)
        exported = logitcache.open(out)
        assert logitcache.verify(exported).ok
        assert_same_parts(zarr_cache, exported)


def test_pyarrow_alone_reads_a_masked_sequence(masked_pair):
    cache = logitcache.open(masked_pair["parquet"])
    table = pq.read_table(masked_pair["parquet"] / "parts" / "part-000000.parquet")
    assert table.column_names == ["input_ids", "target_ids", table.column_names[2],
                                  "target_positions", "target_labels", "text", "token_offsets"]  # fmt: skip
    assert table.schema.field("target_positions").type == pa.list_(pa.uint32())
    rows = table.to_pylist()
    for s, row in enumerate(rows):
        seq = cache[s]
        at = np.flatnonzero(seq.labels.numpy() >= 0)
        assert row["target_positions"] == at.tolist()  # within the sequence, increasing
        assert row["target_labels"] == seq.labels[at].tolist()
        assert len(row["target_ids"]) == len(at) == len(row[table.column_names[2]])
        assert row["input_ids"] == seq.input_ids.tolist()  # the masked input the teacher read
        assert len(row["token_offsets"]) == len(row["input_ids"])
    part = cache.read_part(0)
    assert [r["text"] for r in rows] == [sequence_text(part, s) for s in range(len(rows))]


def test_offsets_in_parquet_hold_what_zarr_holds_and_read_as_strings(offsets_pair, tmp_path):
    zarr_cache, parquet_cache = (logitcache.open(offsets_pair[b]) for b in ("zarr", "parquet"))
    assert_same_parts(zarr_cache, parquet_cache)
    assert logitcache.verify(parquet_cache).ok
    table = pq.read_table(offsets_pair["parquet"] / "parts" / "part-000001.parquet")
    assert table.schema.field("text").type == pa.string()
    assert table.schema.field("token_offsets").type == pa.list_(pa.list_(pa.uint32(), 2))
    part = parquet_cache.read_part(1)
    assert table.column("text").to_pylist() == [sequence_text(part, s)
                                                for s in range(part.sequences)]  # fmt: skip
    out = tmp_path / "back"
    proc = run_cli("export", offsets_pair["parquet"], out, "--format", "zarr")
    assert proc.returncode == 0, describe(proc)
    assert_same_parts(zarr_cache, logitcache.open(out))


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_merged_shards_of_a_masked_dump_with_text_equal_the_single_dump(
    backend, tmp_path, tiny_mlm_teacher_dir, stdlib_corpus
):
    options = MASKED | {"targets": "topk", "top_k": 4, "backend": backend}
    single = dump_in_process(tiny_mlm_teacher_dir, stdlib_corpus, tmp_path / "one", **options)
    shards = [
        dump_in_process(tiny_mlm_teacher_dir, stdlib_corpus, tmp_path / f"s{i}", shard=f"{i}/2",
                        **options)
        for i in range(2)
    ]  # fmt: skip
    proc = run_cli("merge", tmp_path / "merged", *shards)
    assert proc.returncode == 0, describe(proc)
    merged, one = logitcache.open(tmp_path / "merged"), logitcache.open(single)
    assert [p.files for p in merged.manifest.parts] == [p.files for p in one.manifest.parts]
    assert merged.manifest.masked == one.manifest.masked > 0
    assert_same_parts(one, merged)
    assert logitcache.verify(merged).ok


def test_to_hf_dataset_gives_masked_labels_and_texts(masked_pair, offsets_pair):
    for path in (masked_pair["parquet"], masked_pair["zarr"], offsets_pair["parquet"]):
        cache = logitcache.open(path)
        rows = list(cache.to_hf_dataset())
        assert [r["index"] for r in rows] == list(range(len(cache)))
        first = 0
        for index in range(cache.num_parts):
            part = cache.read_decoded(index)
            for s in range(part.sequences):
                row = rows[first + s]
                assert row["text"] == sequence_text(part, s)
                a, b = part.seq_offsets[s], part.seq_offsets[s + 1]
                np.testing.assert_array_equal(row["token_offsets"], part.token_offsets[a:b])
                np.testing.assert_array_equal(row["target_logprobs"], part.target_logprobs[a:b])
                if cache.manifest.masking is None:
                    assert "labels" not in row
                else:
                    np.testing.assert_array_equal(row["labels"], part.target_labels[a:b])
            first += part.sequences


def test_info_and_stats_on_a_masked_parquet_cache(masked_pair):
    info = run_cli("info", masked_pair["parquet"])
    assert info.returncode == 0, describe(info)
    assert "bytes per masked token" in flat(info.stdout) and "parquet" in info.stdout
    stats = run_cli("stats", masked_pair["parquet"])
    assert stats.returncode == 0, describe(stats)
    verify = run_cli("verify", masked_pair["parquet"])
    assert verify.returncode == 0, describe(verify)


def test_a_position_outside_its_sequence_is_refused(masked_pair, tmp_path):
    """Positions are stored within their sequence: one past its end, or a label in the row of
    another sequence, would move rows into the next sequence, so the backend refuses both."""
    source = masked_pair["parquet"] / "parts" / "part-000000.parquet"
    table = pq.read_table(source)
    rows = table.column("target_positions").to_pylist()
    rows[0][-1] = len(table.column("input_ids")[0])  # the first sequence's length
    bad = tmp_path / "bad.parquet"
    column = pa.array(rows, type=pa.list_(pa.uint32()))
    pq.write_table(table.set_column(3, "target_positions", column), bad)
    with pytest.raises(ValueError, match="not inside its sequence"):
        parquet_backend.read_part(bad)
    labels = table.column("target_labels").to_pylist()
    labels[1].insert(0, labels[0].pop())  # the same labels, one of them in the next row
    column = pa.array(labels, type=table.schema.field("target_labels").type)
    pq.write_table(table.set_column(4, "target_labels", column), bad)
    with pytest.raises(ValueError, match="target_labels are not one per masked position"):
        parquet_backend.read_part(bad)
    good = parquet_backend.read_part(source)
    assert isinstance(good, PartArrays) and good.target_positions.dtype == np.uint32


def test_text_that_is_not_utf8_is_not_written(offsets_pair, tmp_path):
    part = logitcache.open(offsets_pair["zarr"]).read_part(0)
    text = part.text.copy()
    text[0] = 0xFF
    cache = logitcache.open(offsets_pair["parquet"])
    with pytest.raises(pa.ArrowInvalid):
        parquet_backend.write_part(
            tmp_path / "p.parquet",
            dataclasses.replace(part, text=text),
            cache.manifest.codec,
            1 << 20,
        )
