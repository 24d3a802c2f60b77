"""Input formats: each dumps, and the input ids read back are the expected tokenization."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import logitcache
from tests.logitcache.dump_helpers import dump_in_process, sequences_of, write_docs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _packed(docs: list[list[int]], seq_len: int, eos: int) -> list[list[int]]:
    stream = [t for ids in docs if ids for t in (*ids, eos)]
    return [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]


def _write_input(kind: str, directory: Path, docs: list[str], ids: list[list[int]]):
    """Write the documents in format `kind`; returns (data path, extra dump options)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir()
    if kind == "jsonl":
        path = directory / "docs.jsonl"
        lines = [json.dumps({"id": i, "text": d}) for i, d in enumerate(docs)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path, {"text_field": "text"}
    if kind == "parquet":
        path = directory / "docs.parquet"
        pq.write_table(pa.table({"id": list(range(len(docs))), "body": docs}), path)
        return path, {"text_field": "body"}
    if kind == "datasets":
        import datasets

        datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(directory / "ds"))
        return directory / "ds", {}
    if kind == "parquet_ids":
        path = directory / "ids.parquet"
        pq.write_table(pa.table({"ids": pa.array(ids, pa.list_(pa.int32()))}), path)
        return path, {"ids_field": "ids"}
    if kind == "npy":
        path = directory / "ids.npy"
        np.save(path, np.array(ids, dtype=np.int32))
        return path, {}
    if kind in ("text", "text_no_pack"):
        return write_docs(directory / "docs", docs), {"pack": kind == "text"}
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["jsonl", "parquet", "datasets", "parquet_ids", "npy", "text", "text_no_pack"]
)
def test_input_formats_dump_the_expected_token_ids(
    kind: str, small_docs: list[str], tiny_teacher_dir: Path, tmp_path: Path
):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    eos = tokenizer.eos_token_id
    seq_len = 48
    docs_ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in small_docs]
    pretokenized = kind in ("parquet_ids", "npy")
    if kind == "npy":  # a 2-D array: one row per document, all of one length
        width = min(len(ids) for ids in docs_ids) - 3
        docs_ids = [ids[:width] for ids in docs_ids]
    data, options = _write_input(kind, tmp_path / "input", small_docs, docs_ids)

    out = dump_in_process(tiny_teacher_dir, data, tmp_path / "cache", targets="topk", top_k=3,
                          seq_len=seq_len, part_tokens=4 * seq_len, **options)  # fmt: skip
    if kind == "text_no_pack":
        expected = [ids[:seq_len] for ids in docs_ids]
        assert max(len(ids) for ids in docs_ids) > seq_len  # truncation is exercised
    else:
        expected = _packed(docs_ids, seq_len, eos)
    got = [s.input_ids.tolist() for s in sequences_of(out)]
    assert got == expected
    m = logitcache.open(out).manifest
    assert m.layout.packing == (kind != "text_no_pack")
    assert m.data.format == {
        "parquet_ids": "parquet",
        "datasets": "arrow",
        "text_no_pack": "text",
    }.get(kind, kind)
    field = options.get("text_field") or options.get("ids_field")
    if kind == "datasets":
        field = "text"
    assert m.data.text_field == field
    if not pretokenized:
        assert m.data.documents in (len(small_docs), -1)
