"""The files a dump writes are laid out as docs/FORMAT.md says: one zarr shard per array with the
documented codecs, one parquet row per sequence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.logitcache.dump_helpers import manifest_json

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_zarr_layout_is_one_shard_per_array_with_the_documented_codecs(
    main_caches: dict[str, Path],
):
    root = main_caches["zarr"]
    manifest = manifest_json(root)
    k, chunk_bytes = manifest["targets"]["k"], manifest["layout"]["chunk_bytes"]
    for part in manifest["parts"]:
        name = part["name"]
        files = sorted(
            p.relative_to(root / "parts").as_posix()
            for p in (root / "parts" / name).rglob("*")
            if p.is_file()
        )
        assert files == sorted(part["files"])
        assert set(files) == {
            f"{name}/zarr.json",
            *(f"{name}/{a}/zarr.json" for a in ("input_ids", "target_ids", "target_logprobs")),
            f"{name}/seq_offsets/zarr.json",
            f"{name}/input_ids/c/0",
            f"{name}/seq_offsets/c/0",
            f"{name}/target_ids/c/0/0",
            f"{name}/target_logprobs/c/0/0",
        }
        for array, dtype, width in (
            ("input_ids", "uint16", None),
            ("target_ids", "uint16", k),
            ("target_logprobs", "float16", k),
            ("seq_offsets", "int64", None),
        ):
            meta = json.loads((root / "parts" / name / array / "zarr.json").read_text())
            length = part["sequences"] + 1 if array == "seq_offsets" else part["tokens"]
            assert meta["data_type"] == dtype
            assert meta["shape"] == ([length] if width is None else [length, width])
            (codec,) = meta["codecs"]
            assert codec["name"] == "sharding_indexed"
            config = codec["configuration"]
            item = np.dtype(dtype).itemsize
            rows = max(1, min(length, chunk_bytes // (item * (width or 1))))
            assert config["chunk_shape"][0] == rows
            assert meta["chunk_grid"]["configuration"]["chunk_shape"][0] >= length
            # spec-only (docs/FORMAT.md, section 5): no numcodecs.delta unless dumped with --delta
            assert "delta" not in manifest["codec"]
            assert [c["name"] for c in config["codecs"]] == ["bytes", "blosc", "crc32c"]
            blosc = config["codecs"][1]["configuration"]
            assert (blosc["cname"], blosc["shuffle"], blosc["typesize"]) == (
                "zstd",
                "shuffle",
                item,
            )
            assert [c["name"] for c in config["index_codecs"]] == ["bytes", "crc32c"]
            assert config["index_location"] == "end"


def test_parquet_layout_is_one_row_per_sequence(main_caches: dict[str, Path]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = main_caches["parquet"]
    manifest = manifest_json(root)
    k = manifest["targets"]["k"]
    assert sorted(p.name for p in (root / "parts").iterdir()) == [
        f"{p['name']}.parquet" for p in manifest["parts"]
    ]
    for part in manifest["parts"]:
        file = pq.ParquetFile(root / "parts" / f"{part['name']}.parquet")
        assert list(part["files"]) == [f"{part['name']}.parquet"]
        assert file.schema_arrow == pa.schema(
            [
                ("input_ids", pa.list_(pa.uint16())),
                ("target_ids", pa.list_(pa.list_(pa.uint16(), k))),
                ("target_logprobs", pa.list_(pa.list_(pa.float16(), k))),
            ]
        )
        assert file.metadata.num_rows == part["sequences"]
        assert file.metadata.row_group(0).column(0).compression == "ZSTD"
