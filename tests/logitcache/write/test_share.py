"""Sharing caches: merge, export, the README.md card, format versions, memory:// URLs.

Inputs are small real caches written by the real writer (`tests/synthetic.py`); the CLI runs as
real subprocesses where exit codes and messages are what is tested.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pickle
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

import logitcache
from logitcache.errors import CorruptCacheError, LogitCacheError, SettingsMismatchError
from logitcache.format.parse import parse_manifest
from logitcache.read.verify import verify
from logitcache.write.export import export
from logitcache.write.merge import merge
from logitcache.write.remote_writer import open_writer
from tests.synthetic import make_cache, template

REPO = Path(__file__).resolve().parents[3]


def run_cli(*args: object) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    env.pop("LOGITCACHE_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "logitcache", *map(str, args)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120, check=False,
    )  # fmt: skip


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def flat(text: str) -> str:
    return " ".join(text.split())


def rows(path) -> list[tuple[list[int], list[list[int]], list[list[float]]]]:
    return [
        (s.input_ids.tolist(), s.target_ids.tolist(), s.target_logprobs.tolist())
        for s in logitcache.open(path)
    ]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Three caches of one teacher/settings and different data, plus odd ones out."""
    root = tmp_path_factory.mktemp("share_inputs")
    return {
        "a": make_cache(root / "a", sequences=12, seed=1, data="a" * 64, source="shard-a"),
        "b": make_cache(root / "b", sequences=7, seed=2, data="b" * 64, source="shard-b"),
        "c": make_cache(root / "c", sequences=9, seed=3, data="c" * 64, source="shard-c"),
        "other_k": make_cache(root / "k8", seed=4, data="e" * 64, k=8, teacher_sha="9" * 64),
        "parquet": make_cache(root / "pq", seed=5, data="f" * 64, backend="parquet"),
    }


@pytest.fixture(scope="module")
def cli_runs(inputs, tmp_path_factory):
    """The CLI cases, run once (each is a fresh interpreter)."""
    root = tmp_path_factory.mktemp("share_cli")
    out = root / "exported"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        mismatch = pool.submit(
            run_cli, "merge", root / "refused", inputs["a"], inputs["other_k"], inputs["parquet"]
        )
        exported = pool.submit(
            run_cli, "export", inputs["a"], out, "--format", "parquet", "--license", "cc-by-4.0"
        )
        return {
            "mismatch": (root / "refused", mismatch.result()),
            "export": (out, exported.result()),
        }


# --------------------------------------------------------------------------------------------
# merge


def test_merge_by_reference_reads_as_the_concatenation(inputs, tmp_path: Path):
    out = tmp_path / "merged"
    merged = merge(out, [inputs["a"], inputs["b"], inputs["c"]], license="mit")
    assert rows(out) == rows(inputs["a"]) + rows(inputs["b"]) + rows(inputs["c"])
    cache = logitcache.open(out)
    assert cache.manifest == merged and verify(cache).ok
    m = cache.manifest
    assert m.format_version == "1.1" and m.complete
    assert [(i.cache, i.data.source, i.data.fingerprint, i.parts, i.sequences) for i in
            m.merged_from] == [(str(inputs[n]), f"shard-{n}", n * 64,
                                logitcache.open(inputs[n]).num_parts, len(logitcache.open(inputs[n])))
                               for n in "abc"]  # fmt: skip
    assert m.data.source == "shard-a + shard-b + shard-c"
    assert m.data.fingerprint not in ("a" * 64, "b" * 64, "c" * 64)
    assert [p.name for p in m.parts] == [f"part-{i:06d}" for i in range(len(m.parts))]
    # By reference: every file is a hard link to the input's file (no data copied).
    first_b = logitcache.open(inputs["a"]).num_parts
    linked = out / "parts" / f"part-{first_b:06d}" / "target_ids" / "c" / "0" / "0"
    source = inputs["b"] / "parts" / "part-000000" / "target_ids" / "c" / "0" / "0"
    assert linked.stat().st_ino == source.stat().st_ino
    card = (out / "README.md").read_text()
    assert "license: mit" in card and "shard-b" in card and "Merged from" in card


def test_merge_by_copy_and_of_a_merge(inputs, tmp_path: Path):
    ab = merge(tmp_path / "ab", [inputs["a"], inputs["b"]], copy=True)
    f = "parts/part-000000/input_ids/c/0"
    assert (tmp_path / "ab" / f).stat().st_ino != (inputs["a"] / f).stat().st_ino
    abc = merge(tmp_path / "abc", [tmp_path / "ab", inputs["c"]], copy=True)
    assert [i.data.source for i in abc.merged_from] == ["shard-a", "shard-b", "shard-c"]
    assert len(ab.merged_from) == 2
    assert rows(tmp_path / "abc") == rows(inputs["a"]) + rows(inputs["b"]) + rows(inputs["c"])
    assert verify(logitcache.open(tmp_path / "abc")).ok
    with pytest.raises(LogitCacheError, match="hold the same data"):
        merge(tmp_path / "twice", [tmp_path / "ab", inputs["b"]])
    with pytest.raises(LogitCacheError, match="already holds a cache"):
        merge(tmp_path / "ab", [inputs["a"], inputs["b"]])
    merge(tmp_path / "ab", [inputs["b"], inputs["a"]], overwrite=True)
    assert rows(tmp_path / "ab") == rows(inputs["b"]) + rows(inputs["a"])


def test_merge_refuses_different_settings_listing_what_differs(inputs, tmp_path: Path):
    with pytest.raises(SettingsMismatchError) as info:
        merge(tmp_path / "out", [inputs["a"], inputs["other_k"], inputs["parquet"]])
    message = str(info.value)
    a, k8, pq = (str(inputs[n]) for n in ("a", "other_k", "parquet"))
    assert f"targets.k: {a} has 4, {k8} has 8" in message
    assert f"teacher.weights_sha256: {a} has {'0' * 64!r}, {k8} has {'9' * 64!r}" in message
    assert f"backend: {a} has 'zarr', {pq} has 'parquet'" in message
    assert "data." not in message  # data may differ
    assert not (tmp_path / "out").exists()


def test_merge_cli_refusal_exits_2(cli_runs, inputs):
    out, proc = cli_runs["mismatch"]
    assert proc.returncode == 2, describe(proc)
    assert "Traceback" not in proc.stderr
    message = flat(proc.stderr)
    assert message.startswith("logitcache: error: cannot merge caches made with different")
    assert "targets.k" in message and "backend" in message
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# export


def test_export_converts_both_ways_exactly(inputs, tmp_path: Path):
    pq, zr = tmp_path / "pq", tmp_path / "zr"
    export(inputs["a"], pq, backend="parquet")
    export(pq, zr, backend="zarr")
    assert rows(pq) == rows(zr) == rows(inputs["a"])
    a, p, z = (logitcache.open(x).manifest for x in (inputs["a"], pq, zr))
    assert p.backend == "parquet" and z.backend == "zarr"
    assert z.parts == a.parts  # byte-identical files again (same sha256s)
    for field in ("teacher", "tokenizer", "data", "targets", "layout", "codec", "created"):
        assert getattr(p, field) == getattr(a, field)
    assert verify(logitcache.open(pq)).ok and verify(logitcache.open(zr)).ok
    # An interrupted export resumes; a finished one is left as it is.
    assert export(inputs["a"], pq, backend="parquet") == p


def test_export_cli_writes_a_card_and_parquet_that_datasets_and_pyarrow_load(
    cli_runs, inputs, tmp_path: Path, monkeypatch
):
    out, proc = cli_runs["export"]
    assert proc.returncode == 0, describe(proc)
    cache = logitcache.open(out)
    m = cache.manifest
    files = [str(out / "parts" / f"{p.name}.parquet") for p in m.parts]
    expected = rows(inputs["a"])

    import pyarrow.dataset as pads

    table = pads.dataset(files, format="parquet").to_table()
    assert table.num_rows == m.sequences == len(expected)
    assert table.column("input_ids").to_pylist() == [r[0] for r in expected]
    assert table.column("target_ids").to_pylist() == [r[1] for r in expected]
    assert table.schema.field("target_logprobs").type.value_type.list_size == m.targets.k

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)  # if imported earlier
    ds = datasets.load_dataset(
        "parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf")
    )
    assert ds.num_rows == m.sequences
    assert ds[0]["input_ids"] == expected[0][0]
    assert ds[len(expected) - 1]["target_ids"] == expected[-1][1]
    got = np.asarray(ds[3]["target_logprobs"], dtype=np.float32)
    assert np.array_equal(got, np.asarray(expected[3][2], dtype=np.float32))

    card = (out / "README.md").read_text()
    for phrase in ("license: cc-by-4.0", "synthetic-teacher", "synthetic-tokenizer", "k=4",
                   f"{m.tokens:,} tokens", "logitcache.open(", "pyarrow.dataset",
                   "datasets.load_dataset"):  # fmt: skip
        assert phrase in card, phrase
    assert verify(cache).ok  # the card is not in the manifest, and verify does not mind it


# --------------------------------------------------------------------------------------------
# memory:// (fsspec's in-process store): the same code path as any object store


def test_memory_url_round_trip(inputs, tmp_path: Path):
    base = f"memory://share-{uuid.uuid4().hex[:8]}"
    export(inputs["a"], f"{base}/a", backend="zarr")
    make_cache(f"{base}/b", sequences=7, seed=2, data="b" * 64, source="shard-b")
    assert rows(f"{base}/a") == rows(inputs["a"])
    assert rows(f"{base}/b") == rows(inputs["b"])
    merge(f"{base}/ab", [f"{base}/a", f"{base}/b"], copy=True, cache_dir=tmp_path)
    cache = logitcache.open(f"{base}/ab", cache_dir=tmp_path)
    assert verify(cache).ok
    assert rows(f"{base}/ab") == rows(inputs["a"]) + rows(inputs["b"])
    with pytest.raises(LogitCacheError, match="not empty and holds no logitcache manifest"):
        make_cache(f"{base}/ab/parts")
    # A remote cache survives pickling (spawned DataLoader workers get a copy of the dataset).
    clone = pickle.loads(pickle.dumps(cache))
    assert [s.input_ids.tolist() for s in clone] == [r[0] for r in rows(f"{base}/ab")]
    # Resuming a remote cache with other settings is refused, naming the URL; --overwrite works.
    with pytest.raises(SettingsMismatchError, match=f"{base}/b already holds a cache") as info:
        make_cache(f"{base}/b", sequences=7, seed=2, data="b" * 64, source="shard-b", k=8)
    assert "targets.k: cache has 4, this run has 8" in str(info.value)
    assert "staging" not in str(info.value)
    m = template(k=8, data="b" * 64)
    with open_writer(f"{base}/b", m, overwrite=True) as writer:
        writer.finish()
    assert logitcache.open(f"{base}/b").manifest.targets.k == 8
    assert len(logitcache.open(f"{base}/b")) == 0


# --------------------------------------------------------------------------------------------
# Format versions


def _manifest(inputs) -> dict:
    return json.loads((inputs["a"] / "manifest.json").read_text())


def test_reader_refuses_a_newer_major_and_reads_the_versions_it_knows(inputs, tmp_path: Path):
    doc = _manifest(inputs)
    assert parse_manifest(json.dumps(doc)).format_version == "1.0"
    newer = dict(doc, format_version="2.0")
    with pytest.raises(LogitCacheError, match=r"cache format 2\.0, newer .* Upgrade logitcache"):
        parse_manifest(json.dumps(newer))
    # A newer minor that adds a field: the same advice, not a schema error.
    minor = dict(doc, format_version="1.7", shard_index={"x": 1})
    with pytest.raises(LogitCacheError, match=r"cache format 1\.7, newer .* Upgrade") as info:
        parse_manifest(json.dumps(minor))
    assert not isinstance(info.value, CorruptCacheError)
    # A newer minor without new fields reads (minors only add optional things).
    assert parse_manifest(json.dumps(dict(doc, format_version="1.3"))).tokens == doc["tokens"]
    older = dict(doc, format_version="0.9")
    with pytest.raises(LogitCacheError, match=r"format 0\.9, older than any"):
        parse_manifest(json.dumps(older))
    for bad in ("1", "one.zero", 1.0, None):
        with pytest.raises(CorruptCacheError, match=r"not MAJOR\.MINOR"):
            parse_manifest(json.dumps(dict(doc, format_version=bad)))
    # merged_from is 1.1: in a manifest that claims 1.0 it is refused
    merged = merge(tmp_path / "m", [inputs["a"], inputs["b"]])
    doc = json.loads(merged.to_json())
    parse_manifest(json.dumps(doc))
    with pytest.raises(CorruptCacheError, match=r"1\.1"):  # merged_from needs 1.1
        parse_manifest(json.dumps(dict(doc, format_version="1.0")))
    # and a dump's manifest has no merged_from at all (old readers still read it)
    assert "merged_from" not in _manifest(inputs)


def test_crafted_newer_cache_is_refused_through_open(inputs, tmp_path: Path):
    import shutil

    root = shutil.copytree(inputs["a"], tmp_path / "future")
    doc = _manifest(inputs)
    doc["format_version"] = "3.0"
    doc["parts"] = {"not": "a list any more"}
    (root / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(LogitCacheError, match="Upgrade logitcache"):
        logitcache.open(root)
