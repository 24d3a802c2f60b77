"""A cache is data only: hostile manifests and metadata are refused before anything is read
outside the cache root or allocated beyond bounds.

Every case starts from a real, valid cache and changes one thing, the way an attacker who hands
out a cache (a tarball, a public bucket) could. Two instruments watch the reader:

* an audit hook (PEP 578) records every file the process opens, so "the sentinel outside the
  cache was never opened" is observed, not assumed;
* tracemalloc records peak allocation, so "refused before allocating" is measured.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

import logitcache
from logitcache.errors import CorruptCacheError, LogitCacheError
from logitcache.format.manifest import MAX_MANIFEST_BYTES
from logitcache.format.parse import parse_manifest
from logitcache.read.verify import verify
from tests.synthetic import make_cache

REPO = Path(__file__).resolve().parents[2]
#: Reading one small part legitimately peaks far below this; any allocation sized from a
#: hostile number (10**12 tokens, k = 10**9) would be far above it.
PEAK_LIMIT = 64 << 20

_opened: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and args and isinstance(args[0], (str, bytes)):
        _opened.append(args[0] if isinstance(args[0], str) else args[0].decode(errors="replace"))


sys.addaudithook(_audit)


@contextlib.contextmanager
def watch() -> Iterator[dict]:
    """Record files opened and peak bytes allocated inside the block."""
    global _opened
    _opened = []
    result: dict = {"opened": _opened}
    tracemalloc.start()
    try:
        yield result
    finally:
        result["peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        _opened = None


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("valid")
    return {
        backend: make_cache(root / backend, sequences=8, backend=backend, k=4)
        for backend in ("zarr", "parquet")
    }


@pytest.fixture
def case(tmp_path: Path, valid):
    """A fresh copy of a valid cache at tmp/cache, and a sentinel file beside it (outside)."""
    sentinel = tmp_path / "sentinel"
    sentinel.write_bytes(b"SECRET outside the cache root\n")

    def make(backend: str = "zarr") -> tuple[Path, Path]:
        return Path(shutil.copytree(valid[backend], tmp_path / "cache")), sentinel

    return make


def load(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def save(root: Path, doc: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(doc))


def read_everything(root: Path) -> None:
    cache = logitcache.open(root)
    cache[0]
    list(cache)


def assert_refused(root: Path, sentinel: Path, pattern: str, reader=read_everything) -> None:
    with watch() as seen, pytest.raises(LogitCacheError, match=pattern):
        reader(root)
    touched = [p for p in seen["opened"] if Path(p).name == sentinel.name]
    assert not touched, f"the sentinel outside the cache was opened: {touched}"
    assert not [p for p in seen["opened"] if not str(Path(p).resolve()).startswith(
        str(root.resolve())) and "site-packages" not in p and "/lib/python" not in p
    ], "a file outside the cache was opened"  # fmt: skip
    assert seen["peak"] < PEAK_LIMIT, f"peak allocation {seen['peak']:,} bytes"


# --------------------------------------------------------------------------------------------
# No pickle anywhere


def test_no_pickle_in_the_package():
    """Nothing a cache holds is ever unpickled: no pickle import, no np.load without
    allow_pickle=False, no torch.load without weights_only=True."""
    offenders = []
    for path in sorted((REPO / "logitcache").glob("*.py")) + sorted(
        (REPO / "trainer").glob("*.py")
    ):
        text = path.read_text(encoding="utf-8")
        for pattern in (r"^\s*(import|from)\s+(c?pickle|dill|joblib|shelve|marshal)\b",
                        r"allow_pickle\s*=\s*True", r"\bpickle\.loads?\("):  # fmt: skip
            offenders += [f"{path.name}: {m.group(0)}" for m in re.finditer(pattern, text, re.M)]
        offenders += [f"{path.name}: np.load without allow_pickle=False"
                      for call in re.findall(r"np\.load\([^)]*\)", text)
                      if "allow_pickle=False" not in call]  # fmt: skip
        offenders += [f"{path.name}: torch.load without weights_only=True"
                      for call in re.findall(r"torch\.load\([^)]*\)", text)
                      if "weights_only=True" not in call]  # fmt: skip
    assert not offenders


# --------------------------------------------------------------------------------------------
# The manifest's strict schema


MUTATIONS: dict[str, Callable[[dict], None]] = {
    "unknown top-level field": lambda d: d.update(exec_on_load="rm -rf /"),
    "unknown nested field": lambda d: d["teacher"].update(loader="pickle"),
    "unknown part field": lambda d: d["parts"][0].update(path="/etc/passwd"),
    "missing field": lambda d: d["targets"].pop("k"),
    "string for int": lambda d: d["targets"].update(k="4"),
    "bool for int": lambda d: d.update(tokens=True),
    "float for int": lambda d: d["parts"][0].update(tokens=1.5),
    "string for bool": lambda d: d.update(complete="yes"),
    "object for list": lambda d: d.update(parts={"0": d["parts"][0]}),
    "int for sha": lambda d: d["parts"][0]["files"].update({next(iter(d["parts"][0]["files"])): 7}),
    "not an object": lambda d: (
        d.clear() or d.update(format="logitcache", format_version="1.0", teacher=["a", "list"])
    ),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_manifest_schema_refuses_unknown_and_ill_typed_fields(valid, name: str):
    doc = load(valid["zarr"])
    MUTATIONS[name](doc)
    with pytest.raises(CorruptCacheError):
        parse_manifest(json.dumps(doc))


# --------------------------------------------------------------------------------------------
# Names cannot escape the cache root


def _escape_file_key(doc: dict) -> None:
    files = doc["parts"][0]["files"]
    files["part-000000/../../../sentinel"] = "0" * 64  # parts/part-000000/../../.. = beside root


ESCAPES: dict[str, tuple[Callable[[dict], None], str]] = {
    "dot-dot file name": (_escape_file_key, "unsafe file name"),
    "absolute file name": (
        lambda d: d["parts"][0]["files"].update({"/tmp/sentinel": "0" * 64}),
        "unsafe file name",
    ),
    "file of another part": (
        lambda d: d["parts"][0]["files"].update({"part-000001/zarr.json": "0" * 64}),
        "unsafe file name",
    ),
    "backslash": (
        lambda d: d["parts"][0]["files"].update({"part-000000\\..\\..\\sentinel": "0" * 64}),
        "unsafe file name",
    ),
    "dot-dot part name": (lambda d: d["parts"][0].update(name="../../sentinel"), "is named"),
}


@pytest.mark.parametrize("name", list(ESCAPES))
def test_names_that_escape_the_root_are_refused(case, name: str):
    root, sentinel = case()
    mutate, pattern = ESCAPES[name]
    doc = load(root)
    mutate(doc)
    save(root, doc)
    assert_refused(root, sentinel, pattern)


def test_a_symlink_out_of_the_cache_is_not_followed(case):
    root, sentinel = case()
    shard = root / "parts" / "part-000000" / "input_ids" / "c" / "0"
    shard.unlink()
    shard.symlink_to(sentinel)
    assert_refused(root, sentinel, "is a symbolic link")
    assert verify(logitcache.open(root)).problems  # verify reports it, does not crash


def test_a_symlinked_part_directory_is_not_followed(case, tmp_path: Path):
    root, _ = case()
    outside = tmp_path / "outside-part"
    shutil.move(root / "parts" / "part-000000", outside)
    (root / "parts" / "part-000000").symlink_to(outside, target_is_directory=True)
    with watch() as seen, pytest.raises(CorruptCacheError, match="is a symbolic link"):
        read_everything(root)
    assert not [p for p in seen["opened"] if str(outside) in p]


def test_a_missing_listed_file_is_an_error_not_zeros(case):
    """zarr reads a missing chunk as fill values (zeros): the reader must not let it."""
    root, _ = case()
    (root / "parts" / "part-000001" / "target_logprobs" / "c" / "0" / "0").unlink()
    cache = logitcache.open(root)
    cache.read_part(0)
    with pytest.raises(CorruptCacheError, match="target_logprobs/c/0/0 is missing"):
        cache.read_part(1)


# --------------------------------------------------------------------------------------------
# Sizes are bounded before anything is allocated


def _huge_part(doc: dict) -> None:
    doc["layout"].update(seq_len=1 << 24, sequences_per_part=1 << 20)
    part = doc["parts"][0]
    part.update(sequences=100_000, tokens=10**12)
    doc["sequences"] = sum(p["sequences"] for p in doc["parts"])
    doc["tokens"] = sum(p["tokens"] for p in doc["parts"])


def _huge_k(doc: dict) -> None:
    doc["teacher"]["vocab_size"] = 1 << 32
    doc["tokenizer"]["vocab_size"] = 1 << 32
    doc["targets"].update(k=10**9, id_dtype="uint32")


SIZES: dict[str, tuple[Callable[[dict], None], str]] = {
    "10**12 tokens in a part": (_huge_part, r"decode to \d+ bytes, over"),
    "k = 10**9": (_huge_k, r"k=1000000000 is not in"),
    "seq_len = 10**9": (lambda d: d["layout"].update(seq_len=10**9), "seq_len must be in"),
    "tokens above sequences * seq_len": (
        lambda d: d["parts"][0].update(tokens=10**6),
        "tokens is out of bounds",
    ),
    "vocab over 2**32": (lambda d: d["teacher"].update(vocab_size=1 << 40), "is not in 1..2"),
}


@pytest.mark.parametrize("name", list(SIZES))
def test_hostile_sizes_in_the_manifest_are_refused_before_allocating(case, name: str):
    root, sentinel = case()
    mutate, pattern = SIZES[name]
    doc = load(root)
    mutate(doc)
    save(root, doc)
    assert_refused(root, sentinel, pattern)


def test_an_oversized_manifest_is_refused_without_reading_it_whole(case):
    root, _ = case()
    with open(root / "manifest.json", "r+b") as f:
        f.truncate(4 * MAX_MANIFEST_BYTES)  # sparse: 256 MiB that are never read
    with watch() as seen, pytest.raises(CorruptCacheError, match="over the"):
        logitcache.open(root)
    assert seen["peak"] < 1 << 20  # nothing of it was read


# --------------------------------------------------------------------------------------------
# zarr.json and Parquet footers are checked against the manifest before data is read


def _zarr_meta(root: Path, array: str) -> tuple[Path, dict]:
    path = root / "parts" / "part-000000" / array / "zarr.json"
    return path, json.loads(path.read_text())


def _shape(meta: dict) -> None:
    meta["shape"][0] = 10**12


def _grid(meta: dict) -> None:
    meta["shape"][0] = 10**12
    meta["chunk_grid"]["configuration"]["chunk_shape"][0] = 10**12


def _inner(meta: dict) -> None:
    meta["codecs"][0]["configuration"]["chunk_shape"][0] = 10**9


def _many_chunks(meta: dict) -> None:
    meta["chunk_grid"]["configuration"]["chunk_shape"][0] = 1
    meta["codecs"][0]["configuration"]["chunk_shape"][0] = 1


def _key_encoding(meta: dict) -> None:
    meta["chunk_key_encoding"] = {"name": "v2", "configuration": {"separator": "."}}


def _dtype(meta: dict) -> None:
    meta["data_type"] = "float64"


ZARR_JSON: dict[str, tuple[Callable[[dict], None], str]] = {
    "shape of 10**12 rows": (_shape, "declares shape"),
    "shard of 10**12 rows": (_grid, "declares shape"),
    "inner chunk of 10**9 rows": (_inner, "inner chunk shape"),
    "chunk files not in the manifest": (_many_chunks, "more chunks than the manifest|not listed"),
    "other chunk key encoding": (_key_encoding, "chunk key encoding"),
    "other data type": (_dtype, "declares shape"),
}


@pytest.mark.parametrize("name", list(ZARR_JSON))
@pytest.mark.parametrize("array", ["target_ids", "seq_offsets"])
def test_hostile_zarr_json_is_refused_before_reading_data(case, name: str, array: str):
    root, sentinel = case()
    mutate, pattern = ZARR_JSON[name]
    path, meta = _zarr_meta(root, array)
    mutate(meta)
    path.write_text(json.dumps(meta))
    assert_refused(root, sentinel, pattern)
    shard = "c/0/0" if array == "target_ids" else "c/0"
    with watch() as seen, pytest.raises(CorruptCacheError):
        logitcache.open(root).read_part(0)
    assert not [p for p in seen["opened"] if p.endswith(f"part-000000/{array}/{shard}")]
    report = verify(logitcache.open(root))  # reported by name, no crash
    assert any(f"part-000000/{array}/zarr.json" in p for p in report.problems)


def test_hostile_parquet_footer_is_refused_before_reading_pages(case, tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, sentinel = case("parquet")
    part = root / "parts" / "part-000000.parquet"
    table = pq.read_table(part)
    wide = pa.table({
        "input_ids": table.column("input_ids"),
        "target_ids": pa.array([[[1] * 8] * len(r) for r in table.column("input_ids").to_pylist()],
                               pa.list_(pa.list_(pa.uint16(), 8))),
        "target_logprobs": table.column("target_logprobs"),
    })  # fmt: skip
    pq.write_table(wide, part)
    assert_refused(root, sentinel, "schema")
    pq.write_table(table.slice(0, 2), part)  # fewer rows than the manifest says
    assert_refused(root, sentinel, "holds 2 rows")


def test_valid_caches_pass_the_same_checks(valid):
    for root in valid.values():
        with watch() as seen:
            read_everything(root)
        assert seen["peak"] < PEAK_LIMIT
        assert verify(logitcache.open(root)).ok
        assert np.isfinite(logitcache.open(root)[0].target_logprobs.numpy()).all()


# --------------------------------------------------------------------------------------------
# JSON nested past the decoder's recursion limit (a few hundred KB of brackets)

DEEP = 100_000


@pytest.mark.parametrize("where", ["manifest.json", "zarr.json"])
def test_json_nested_too_deeply_is_refused_naming_the_file(case, where: str):
    """json.loads raises RecursionError on ``[[[[...``: refused as invalid metadata instead,
    by the reader, `info`'s structure check and `verify` alike."""
    from logitcache.read.health import structure_problems

    root, sentinel = case()
    nested = "[" * DEEP + "]" * DEEP
    if where == "manifest.json":
        (root / "manifest.json").write_text('{"format": "logitcache", "x": ' + nested + "}")
        assert_refused(root, sentinel, r"manifest\.json is not valid JSON .*nested too deeply")
        return
    path, _ = _zarr_meta(root, "target_ids")
    path.write_text('{"zarr_format": 3, "attributes": ' + nested + "}")
    assert_refused(root, sentinel, r"target_ids/zarr\.json is not valid JSON.*nested too deep")
    problems = structure_problems(logitcache.open(root))
    assert any("part-000000" in p and "nested too deeply" in p for p in problems), problems
    report = verify(logitcache.open(root))
    assert any("part-000000/target_ids/zarr.json" in p for p in report.problems)
