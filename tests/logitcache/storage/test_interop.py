"""Caches open in readers that are not ours: tensorstore reads every zarr array as zarr-python
does, pyarrow.dataset and Hugging Face datasets read every parquet part as our reader does.

A format for sharing between teams must open in every conforming reader, so each cache here is
a real dump of the tiny teacher (the library's `dump`, the code path of `logitcache dump`),
for every target kind and every codec option `dump` offers (`--shuffle`, `--clevel`,
`--logprob-dtype`, `--id-order`, `--targets`, `--samples`; Blosc's inner compressor is always
zstd, and there is no other compressor flag). `--delta` writes the numcodecs delta filter,
which is not in the Zarr v3 specification: tensorstore must refuse it, and `info` must say so.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.dataset
import pyarrow.parquet as pq
import pytest
import tensorstore as ts
import zarr
from typer.testing import CliRunner

import logitcache
from logitcache.cli.commands import app
from logitcache.format import codecs
from logitcache.format.manifest import array_names
from tests.logitcache.dump_helpers import dump_in_process

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"seq_len": 64, "part_tokens": 512, "chunk_bytes": 2048}  # a few parts, several chunks
#: name -> DumpOptions fields: every kind, value codec, order, shuffle and a spread of levels.
ZARR_CASES: dict[str, dict] = {
    "sample-default": {"targets": "sample", "samples": 16},
    "sample-uint16-counts-bitshuffle-clevel0": {
        "targets": "sample", "samples": 300, "shuffle": "bitshuffle", "clevel": 0,
    },
    "topk-default": {"targets": "topk", "top_k": 8},
    "topk-float32-descending-noshuffle-clevel9": {
        "targets": "topk", "top_k": 8, "logprob_dtype": "float32", "id_order": "descending",
        "shuffle": "noshuffle", "clevel": 9,
    },
    "topk-uint8-id-bitshuffle": {
        "targets": "topk", "top_k": 8, "logprob_dtype": "uint8", "shuffle": "bitshuffle",
    },
    "topk-uint8-descending-clevel1": {
        "targets": "topk", "top_k": 8, "logprob_dtype": "uint8", "id_order": "descending",
        "clevel": 1,
    },
    "topk-float16-descending-bitshuffle": {
        "targets": "topk", "top_k": 8, "id_order": "descending", "shuffle": "bitshuffle",
    },
}  # fmt: skip
#: `--delta`: the layout before format 1.2, with the non-spec numcodecs filter.
DELTA_CASES: dict[str, dict] = {
    "sample-delta": {"targets": "sample", "samples": 16, "delta": True},
    "topk-uint8-descending-delta": {
        "targets": "topk", "top_k": 8, "logprob_dtype": "uint8", "id_order": "descending",
        "delta": True,
    },
}  # fmt: skip
PARQUET_CASES: dict[str, dict] = {
    "sample-default": {"targets": "sample", "samples": 16},
    "sample-delta": {"targets": "sample", "samples": 16, "delta": True},
    "topk-float16-id": {"targets": "topk", "top_k": 8},
    "topk-float32-descending-clevel22": {
        "targets": "topk", "top_k": 8, "logprob_dtype": "float32", "id_order": "descending",
        "clevel": 22,
    },
    "topk-uint8-descending-delta": {
        "targets": "topk", "top_k": 8, "logprob_dtype": "uint8", "id_order": "descending",
        "delta": True,
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_teacher_dir: Path, small_corpus: Path) -> dict[str, Path]:
    """Every case dumped once for the module: "zarr/<case>" and "parquet/<case>"."""
    root = tmp_path_factory.mktemp("interop")
    out = {}
    for backend, cases in (("zarr", ZARR_CASES | DELTA_CASES), ("parquet", PARQUET_CASES)):
        for name, options in cases.items():
            out[f"{backend}/{name}"] = dump_in_process(
                tiny_teacher_dir, small_corpus, root / backend / name, backend=backend,
                seed=3, **SMALL, **options,
            )  # fmt: skip
    return out


def _ts_read(path: Path) -> np.ndarray:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
    return ts.open(spec, read=True).result().read().result()


@pytest.mark.parametrize("case", sorted(ZARR_CASES))
def test_tensorstore_reads_every_array_as_zarr_python_does(caches, case) -> None:
    cache = logitcache.open(caches[f"zarr/{case}"])
    m = cache.manifest
    assert len(m.parts) >= 2
    for part in m.parts:
        for name in array_names(m.targets.kind):
            path = cache.root / "parts" / part.name / name
            ours = np.asarray(zarr.open_array(str(path), mode="r", zarr_format=3)[...])
            theirs = _ts_read(path)
            assert theirs.dtype == ours.dtype and theirs.shape == ours.shape, (part.name, name)
            assert np.array_equal(theirs, ours), (part.name, name)
    # and the manifest says so: no filter outside the specification
    assert m.codec.delta == []
    info = CliRunner().invoke(app, ["info", str(cache.root)], env={"COLUMNS": "200"})
    assert info.exit_code == 0, info.output
    assert "spec-only: every Zarr v3 reader" in info.output and "warning" not in info.output


def test_gaps_read_by_tensorstore_decode_to_the_ids_of_a_delta_dump(caches) -> None:
    """The default sampled cache stores gaps; decoded from what tensorstore reads, they are the
    ids the same dump with --delta stores as they are (same teacher, data and seed)."""
    gapped = logitcache.open(caches["zarr/sample-default"])
    plain = logitcache.open(caches["zarr/sample-delta"])
    assert gapped.manifest.codec.gaps == ["target_ids"] and gapped.manifest.format_version == "1.2"
    assert plain.manifest.codec.gaps == [] and plain.manifest.codec.delta == ["target_ids"]
    for part in gapped.manifest.parts:
        where = gapped.root / "parts" / part.name
        gaps, lengths = _ts_read(where / "target_ids"), _ts_read(where / "target_lengths")
        expected = plain.read_part(gapped.manifest.parts.index(part)).target_ids
        assert not np.array_equal(gaps, expected)  # the stored values really are gaps
        assert np.array_equal(codecs.decode_gaps(gaps, lengths), expected)
    for a, b in zip(gapped, plain, strict=True):  # and our reader decodes them the same
        assert a.target_ids.equal(b.target_ids) and a.target_logprobs.equal(b.target_logprobs)


@pytest.mark.parametrize("case", sorted(DELTA_CASES))
def test_tensorstore_refuses_the_delta_filter_and_info_warns(caches, case) -> None:
    cache = logitcache.open(caches[f"zarr/{case}"])
    m = cache.manifest
    (filtered,) = m.codec.delta
    part = cache.root / "parts" / m.parts[0].name
    with pytest.raises(ValueError, match=r"numcodecs\.delta"):
        _ts_read(part / filtered)
    for name in set(array_names(m.targets.kind)) - {filtered}:  # the rest is spec-only
        assert np.array_equal(
            _ts_read(part / name), zarr.open_array(str(part / name), mode="r")[...]
        )
    info = CliRunner().invoke(app, ["info", str(cache.root)], env={"COLUMNS": "200"})
    assert info.exit_code == 0, info.output
    assert f"NOT spec-only: numcodecs.delta on {filtered}" in info.output
    assert "warning: this cache uses numcodecs.delta" in info.output
    doc = CliRunner().invoke(app, ["info", "--json", str(cache.root)]).stdout
    parsed = json.loads(doc[: doc.rindex("}") + 1])
    assert parsed["spec_only"] is False
    assert parsed["nonstandard_filters"] == [f"numcodecs.delta on {filtered}"]


def _flat(column, levels: int) -> np.ndarray:
    """A list<...> column flattened `levels` times, as numpy."""
    values = column.combine_chunks()
    for _ in range(levels):
        values = values.flatten()
    return values.to_numpy(zero_copy_only=False)


@pytest.mark.parametrize("case", sorted(PARQUET_CASES))
def test_pyarrow_dataset_and_datasets_read_every_part_as_our_reader(
    caches, case, tmp_path, monkeypatch
) -> None:
    import datasets

    cache = logitcache.open(caches[f"parquet/{case}"])
    m = cache.manifest
    files = [str(cache.root / "parts" / f"{p.name}.parquet") for p in m.parts]
    assert len(files) >= 2
    table = pyarrow.dataset.dataset(files, format="parquet").to_table()
    columns = [f.name for f in pq.read_schema(files[0])]
    assert table.column_names == columns and table.num_rows == m.sequences
    stored = [cache.read_part(i) for i in range(len(m.parts))]
    for name in columns:
        ours = np.concatenate([np.asarray(getattr(p, name)).reshape(-1) for p in stored])
        theirs = _flat(table.column(name), 1 if name == "input_ids" else 2)
        assert theirs.dtype == ours.dtype and np.array_equal(theirs, ours), name
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    loaded = datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "hf"))
    rows = loaded["train"].with_format("arrow")[:]
    assert rows.num_rows == m.sequences
    for name in columns:
        assert rows.column(name).to_pylist() == table.column(name).to_pylist(), name
