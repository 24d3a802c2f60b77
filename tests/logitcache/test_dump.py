"""End-to-end tests of `logitcache dump`, the on-disk format and the CLIs.

Everything is real: the tiny GPT-2 teacher from ``tests/conftest.py`` loaded with
``from_pretrained``, real Zarr and Parquet stores, and real ``python -m logitcache`` subprocesses
for everything a user runs from a shell (errors, SIGKILL and resume, verify, info, help).

Subprocesses dominate the cost (each imports torch, most import transformers: 2 to 4
CPU-seconds before doing anything), so the CLI runs of all selected tests are set up when the
module starts and run two at a time in the background while the in-process tests run; each CLI
test then waits only for its own result (see `background`). Cases that fail the same way
whatever the teacher use a teacher factory that starts in half the time.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import logitcache
from logitcache.dumping.pipeline import DumpOptions, dump
from logitcache.errors import LogitCacheError
from tests.cli import REPO, cli_env, reaped

FORMAT_DOC = REPO / "docs" / "FORMAT.md"

#: float16 rounding (docs/FORMAT.md, section 3): relative bound in the normal range, absolute
#: bound for subnormals.
FP16_REL = 2.0**-11
FP16_SUB = 2.0**-25
#: Allowed float32 disagreement between the dump's batched, right-padded forward and the
#: test's one-sequence forward of the same teacher (0 on one CPU thread; BLAS may differ).
FORWARD_NOISE = 1e-5

VOCAB = 512  # the tiny teacher's
NAN_TEACHER = "tests.logitcache.nan_teacher:build"
CHEAP_TEACHER = "tests.logitcache.nan_teacher:build_uniform"
MAX_POSITIONS = 256
SMALL = {"top_k": 4, "seq_len": 64, "part_tokens": 256}  # settings of the small caches


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------


def cli_command(*args: object) -> list[str]:
    command = [sys.executable, "-m", "logitcache", *map(str, args)]
    if args and args[0] == "dump":
        command += ["--no-progress", "--device", "cpu"]
    return command


def run_cli(*args: object, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `logitcache ARGS` (dump gets --no-progress --device cpu) and capture its output."""
    return subprocess.run(
        cli_command(*args),
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=REPO,
        timeout=timeout,
        check=False,
    )


def popen_cli(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cli_command(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
        cwd=REPO,
    )


def dump_args(teacher: Path, data: Path, out: Path, **options: object) -> list[str]:
    """`dump` flags: --teacher, --data, --out, then OPTIONS as --flag-name value."""
    args = ["dump", "--teacher", teacher, "--data", data, "--out", out]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", value]
    return args


def flat(text: str) -> str:
    """Whitespace-normalised text, so a phrase matches across the CLI's line wrapping."""
    return " ".join(text.split())


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def dump_in_process(teacher: Path, data: Path, out: Path, **options: object) -> Path:
    """A dump through the library, not the CLI (no interpreter start-up, same code path)."""
    dump(
        DumpOptions(
            data=str(data),
            out=out,
            teacher=str(teacher),
            device="cpu",
            progress=False,
            **options,
        )
    )
    return out


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` (and `root` itself) with its bytes; None for directories."""
    if not root.exists() and not root.is_symlink():
        return {}
    if root.is_file():
        return {".": root.read_bytes()}
    entries: dict[str, bytes | None] = {".": None}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        entries[rel] = path.read_bytes() if path.is_file() else None
    return entries


def sequences_of(path: Path) -> list[logitcache.CacheSequence]:
    return list(logitcache.open(path))


def assert_same_sequences(a: list, b: list) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert torch.equal(x.input_ids, y.input_ids), f"sequence {i}: input_ids differ"
        assert torch.equal(x.target_ids, y.target_ids), f"sequence {i}: target_ids differ"
        assert torch.equal(x.target_logprobs, y.target_logprobs), f"sequence {i}: logprobs differ"


def manifest_json(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text(encoding="utf-8"))


def write_docs(directory: Path, docs: list[str]) -> Path:
    directory.mkdir(parents=True)
    for i, doc in enumerate(docs):
        (directory / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    return directory


# ------------------------------------------------------------------------------------------
# Fixtures: data and caches
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """In-process teacher forwards on one thread, like the CLI subprocesses (OMP_NUM_THREADS=1):
    on 2 shared cores, small matmuls on 2 threads are many times slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_docs(stdlib_corpus: Path) -> list[str]:
    """Six short documents (real Python source, first ~600 characters of each)."""
    files = sorted(stdlib_corpus.iterdir())[:6]
    return [f.read_text(encoding="utf-8")[:600] for f in files]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory, small_docs: list[str]) -> Path:
    return write_docs(tmp_path_factory.mktemp("small") / "corpus", small_docs)


@pytest.fixture(scope="module")
def small_caches(tmp_path_factory, tiny_teacher_dir: Path, small_corpus: Path) -> dict[str, Path]:
    """The small corpus dumped in both formats (several parts each): the 'existing caches'."""
    root = tmp_path_factory.mktemp("small_caches")
    return {
        backend: dump_in_process(
            tiny_teacher_dir, small_corpus, root / backend, backend=backend, **SMALL
        )
        for backend in ("zarr", "parquet")
    }


#: The main caches: the whole stdlib corpus, 8 ids per position, several parts, and zarr inner
#: chunks of 4 KiB so that the target shards hold several inner chunks each.
MAIN = {"top_k": 8, "seq_len": 128, "part_tokens": 2048, "chunk_bytes": 4096, "batch_size": 8}


@pytest.fixture(scope="module")
def main_caches(tmp_path_factory, tiny_teacher_dir: Path, stdlib_corpus: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("main_caches")
    return {
        backend: dump_in_process(
            tiny_teacher_dir, stdlib_corpus, root / backend, backend=backend, **MAIN
        )
        for backend in ("zarr", "parquet")
    }


# ------------------------------------------------------------------------------------------
# Content: the stored targets are the teacher's top-k, normalised over the full vocabulary
# ------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------
# Round trip through logitcache.open, and the two backends agree
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_round_trip_through_open(main_caches: dict[str, Path], backend: str):
    cache = logitcache.open(main_caches[backend])
    m = cache.manifest
    assert (m.format, m.format_version, m.backend, m.complete) == (
        "logitcache",
        "1.1",  # the default id order and delta filter are 1.1 features
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


# ------------------------------------------------------------------------------------------
# docs/FORMAT.md: its reading recipes, run without logitcache, give the same data
# ------------------------------------------------------------------------------------------

RECIPE_RUNNER = r"""
import importlib.abc
import sys

class _Forbid(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"logitcache", "torch", "transformers", "trainer"}:
            raise ImportError(f"reading a cache must not need {name}")
        return None

sys.meta_path.insert(0, _Forbid())

import numpy as np
from pathlib import Path

exec(compile(Path(sys.argv[1]).read_text(encoding="utf-8"), "FORMAT.md recipes", "exec"))
for root, out in zip(sys.argv[2::2], sys.argv[3::2]):
    check_files(root, read_manifest(root))
    seqs = list(iter_sequences(root))
    np.savez(
        out,
        lengths=np.array([len(s[0]) for s in seqs]),
        input_ids=np.concatenate([s[0] for s in seqs]),
        target_ids=np.concatenate([s[1] for s in seqs]),
        target_logprobs=np.concatenate([s[2] for s in seqs]),
    )
"""


def format_doc_recipes() -> str:
    """The Python code blocks of FORMAT.md's "Reading without logitcache" section, in order."""
    text = FORMAT_DOC.read_text(encoding="utf-8")
    start = text.index("## 10. Reading without logitcache")
    end = text.index("\n## ", start)  # the next section
    blocks = re.findall(r"```python\n(.*?)```", text[start:end], flags=re.DOTALL)
    assert len(blocks) >= 3
    return "\n\n".join(blocks)


def test_format_doc_keeps_its_sections():
    text = FORMAT_DOC.read_text(encoding="utf-8")
    assert "## Why these choices" in text
    assert "benchmarks/RESULTS.md" in text
    for phrase in ("seq_offsets", "manifest.json", "crc32c", "page_checksum", "2^-11"):
        assert phrase in text


def test_plain_zarr_and_pyarrow_read_the_same_data(main_caches: dict[str, Path], tmp_path: Path):
    recipes = tmp_path / "recipes.py"
    recipes.write_text(format_doc_recipes(), encoding="utf-8")
    runner = tmp_path / "runner.py"
    runner.write_text(RECIPE_RUNNER, encoding="utf-8")
    outputs = {backend: tmp_path / f"{backend}.npz" for backend in main_caches}
    args = [x for b in main_caches for x in (main_caches[b], outputs[b])]
    proc = subprocess.run(
        [sys.executable, runner, recipes, *map(str, args)],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, describe(proc)

    for backend, out in outputs.items():
        plain = np.load(out)
        assert plain["input_ids"].dtype == np.uint16 and plain["target_ids"].dtype == np.uint16
        assert plain["target_logprobs"].dtype == np.float16
        expected = sequences_of(main_caches[backend])
        assert plain["lengths"].tolist() == [len(s.input_ids) for s in expected]
        assert np.array_equal(
            plain["input_ids"], torch.cat([s.input_ids for s in expected]).numpy()
        )
        assert np.array_equal(
            plain["target_ids"], torch.cat([s.target_ids for s in expected]).numpy()
        )
        assert np.array_equal(
            plain["target_logprobs"].astype(np.float32),
            torch.cat([s.target_logprobs for s in expected]).numpy(),
        )


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
            delta = ["numcodecs.delta"] if array in manifest["codec"]["delta"] else []
            assert [c["name"] for c in config["codecs"]] == [*delta, "bytes", "blosc", "crc32c"]
            blosc = config["codecs"][len(delta) + 1]["configuration"]
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


# ------------------------------------------------------------------------------------------
# Input formats: each dumps, and the input ids read back are the expected tokenization
# ------------------------------------------------------------------------------------------


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

    out = dump_in_process(tiny_teacher_dir, data, tmp_path / "cache", top_k=3, seq_len=seq_len,
                          part_tokens=4 * seq_len, **options)  # fmt: skip
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


# ------------------------------------------------------------------------------------------
# CLI subprocess jobs, started in the background when the module starts
# ------------------------------------------------------------------------------------------
#
# Each CLI test below registers, with @cli_jobs, the background jobs it reads. The `background`
# fixture (autouse, module scope) sets up and submits the jobs of the tests that are selected,
# longest first, to two workers; the in-process tests above run meanwhile, and each CLI test
# then only waits for its own job's result.

_JOBS_OF_TEST: dict[str, Callable[[dict], list[str]]] = {}


def cli_jobs(keys: Callable[[dict], list[str]]):
    """Declare the background jobs a test reads, as a function of its parameters."""

    def register(test):
        _JOBS_OF_TEST[test.__name__] = keys
        return test

    return register


class Background:
    def __init__(self, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        self.pool = pool
        self.jobs: dict[str, concurrent.futures.Future] = {}
        self.cleanups: list[Callable[[], None]] = []

    def submit(self, key: str, fn: Callable, *args: object) -> None:
        self.jobs[key] = self.pool.submit(fn, *args)

    def result(self, key: str):
        assert key in self.jobs, f"background job {key!r} was not started"
        return self.jobs[key].result(timeout=600)


@pytest.fixture(scope="module", autouse=True)
def background(request: pytest.FixtureRequest, tmp_path_factory, one_torch_thread):
    selected = [i for i in request.session.items if getattr(i, "module", None) is request.module]
    wanted = set()
    for item in selected:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        wanted.update(_JOBS_OF_TEST.get(item.originalname, lambda _: [])(params))
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        jobs = Background(pool)
        if wanted:
            teacher = request.getfixturevalue("tiny_teacher_dir")
            corpus = request.getfixturevalue("stdlib_corpus")
            small_corpus = request.getfixturevalue("small_corpus")
            small_caches = request.getfixturevalue("small_caches")
            root = tmp_path_factory.mktemp("cli")
            # Longest first: the SIGKILL scenario is three dumps, two of them in sequence.
            if "kill" in wanted:
                jobs.submit("kill", sigkill_scenario, root / "kill", teacher, corpus)
            submit_bad_inputs(jobs, wanted, root / "bad", teacher, small_corpus, small_caches)
            submit_verify_runs(jobs, wanted, root / "verify", small_caches)
            for key, args in {
                "info": ["info", small_caches["zarr"], "--json"],
                "help": ["--help"],
                "dump_help": ["dump", "--help"],
            }.items():
                if key in wanted:
                    jobs.submit(key, run_cli, *args)
        try:
            yield jobs
        finally:
            for job in jobs.jobs.values():
                job.cancel()
    for cleanup in jobs.cleanups:
        cleanup()


# ------------------------------------------------------------------------------------------
# SIGKILL in the middle of a dump, then the same command again
# ------------------------------------------------------------------------------------------

KILL_OPTIONS = {"top_k": 8, "seq_len": 64, "part_tokens": 256, "batch_size": 2}


def sigkill_scenario(root: Path, teacher: Path, stdlib_corpus: Path) -> dict:
    """Start an uninterrupted dump and a victim side by side; SIGKILL the victim once its
    manifest lists a part; rerun the victim's command. Returns what the test checks."""
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    for f in sorted(stdlib_corpus.iterdir())[:8]:  # ~12k tokens: about 50 parts
        shutil.copy(f, corpus / f.name)
    reference, killed = root / "reference", root / "killed"
    ref_proc = popen_cli(*dump_args(teacher, corpus, reference, **KILL_OPTIONS))
    victim = popen_cli(*dump_args(teacher, corpus, killed, **KILL_OPTIONS))
    with reaped(victim):
        deadline = time.monotonic() + 300
        while True:
            try:
                if manifest_json(killed)["parts"]:
                    break
            except (OSError, ValueError):
                pass  # no manifest yet
            if victim.poll() is not None:
                raise AssertionError(
                    f"the dump ended before it could be killed: {victim.communicate()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError("no part was committed in time")
            time.sleep(0.01)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)
    after_kill = manifest_json(killed)
    try:
        logitcache.open(killed)
        refused = ""
    except LogitCacheError as exc:
        refused = str(exc)
    rerun = run_cli(*dump_args(teacher, corpus, killed, **KILL_OPTIONS))
    _, ref_stderr = ref_proc.communicate(timeout=300)
    return {
        "victim_returncode": victim.returncode,
        "after_kill": after_kill,
        "refused": refused,
        "rerun": rerun,
        "reference_returncode": ref_proc.returncode,
        "reference_stderr": ref_stderr,
        "reference": reference,
        "killed": killed,
    }


@cli_jobs(lambda _: ["kill"])
def test_sigkill_then_rerun_gives_the_uninterrupted_result(background: Background):
    run = background.result("kill")
    assert run["victim_returncode"] == -signal.SIGKILL
    assert not run["after_kill"]["complete"], "the kill landed after the dump had finished"
    committed = len(run["after_kill"]["parts"])
    assert "unfinished dump" in run["refused"]
    rerun = run["rerun"]
    assert rerun.returncode == 0, describe(rerun)
    assert f"resumed after {committed} committed parts" in flat(rerun.stdout)
    assert run["reference_returncode"] == 0, run["reference_stderr"]

    killed, reference = run["killed"], run["reference"]
    resumed_manifest, reference_manifest = manifest_json(killed), manifest_json(reference)
    assert len(reference_manifest["parts"]) > committed + 2, "the kill did not land mid-run"
    for m in (resumed_manifest, reference_manifest):
        m.pop("created")
    assert resumed_manifest == reference_manifest  # includes every file's sha256
    listed = {f for p in resumed_manifest["parts"] for f in p["files"]}
    files = {p for p in (killed / "parts").rglob("*") if p.is_file()}
    assert {p.relative_to(killed / "parts").as_posix() for p in files} == listed, "orphans left"
    assert not [p.name for p in killed.iterdir() if p.name.startswith(".")], "temporaries left"
    resumed_cache, reference_cache = logitcache.open(killed), logitcache.open(reference)
    for a, b in zip(resumed_cache.iter_parts(), reference_cache.iter_parts(), strict=True):
        for name in ("input_ids", "target_ids", "target_logprobs", "seq_offsets"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name


# ------------------------------------------------------------------------------------------
# verify: a flipped byte in any file is found and the file named
# ------------------------------------------------------------------------------------------

#: (backend, file relative to parts/) to flip a byte in. The zarr ones are in different parts of
#: ONE copy, so one `verify` run must name all five (it reports every problem, not the first).
CORRUPTIONS = [
    ("zarr", "part-000001/input_ids/c/0"),
    ("zarr", "part-000002/target_ids/c/0/0"),
    ("zarr", "part-000003/target_logprobs/c/0/0"),
    ("zarr", "part-000004/seq_offsets/c/0"),
    ("zarr", "part-000005/target_logprobs/zarr.json"),
    ("parquet", "part-000001.parquet"),
]


def submit_verify_runs(jobs: Background, wanted: set[str], root: Path, small_caches) -> None:
    """`logitcache verify` on an intact copy and on copies with flipped bytes."""
    if "verify:intact" in wanted:
        copy = shutil.copytree(small_caches["zarr"], root / "intact")
        jobs.submit("verify:intact", run_cli, "verify", copy)
    for backend in ("zarr", "parquet"):
        if f"verify:{backend}" in wanted:
            copy = shutil.copytree(small_caches[backend], root / f"flipped-{backend}")
            for rel in (rel for b, rel in CORRUPTIONS if b == backend):
                target = copy / "parts" / rel
                data = bytearray(target.read_bytes())
                data[len(data) // 2] ^= 0xFF
                target.write_bytes(bytes(data))
            jobs.submit(f"verify:{backend}", run_cli, "verify", copy)


@cli_jobs(lambda _: ["verify:intact"])
def test_verify_passes_an_intact_cache(background: Background, small_caches: dict[str, Path]):
    proc = background.result("verify:intact")
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout.startswith("ok: ")
    # The same checks, in process, on the parquet cache.
    from logitcache.read.verify import verify

    report = verify(logitcache.open(small_caches["parquet"]))
    assert report.ok, report.problems
    assert report.parts == report.files > 1


@cli_jobs(lambda p: [f"verify:{p['backend']}"])
@pytest.mark.parametrize(("backend", "rel"), CORRUPTIONS)
def test_verify_names_a_file_with_a_flipped_byte(background: Background, backend: str, rel: str):
    proc = background.result(f"verify:{backend}")
    assert proc.returncode == 2, describe(proc)
    assert "Traceback" not in proc.stderr
    message = flat(proc.stderr)
    assert "failed verification" in message
    assert f"parts/{rel}: sha256 does not match" in message
    flipped = sum(b == backend for b, _ in CORRUPTIONS)
    assert message.count("sha256 does not match") == flipped, message


# ------------------------------------------------------------------------------------------
# Bad input: exit 2, a message naming the problem, no traceback, nothing changed
# ------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One bad `dump` invocation: its flags, the phrases its message must hold, and the path
    (an existing cache, unless said otherwise) that must be left exactly as it was."""

    args: list[object]
    phrases: list[str]
    watch: Path
    fresh_out: bool = False  # --out did not exist: it must not become a usable cache
    then: list[object] | None = None  # a follow-up command, run after the snapshot


@dataclass
class Ctx:
    tmp: Path  # this case's own directory
    teacher: Path
    corpus: Path  # the small corpus; the existing cache was dumped from it with SMALL
    existing: Path  # a fresh copy of that cache, the default --out

    def args(self, **changes: object) -> list[object]:
        """Flags that would resume the existing cache, with CHANGES (None removes a flag)."""
        options: dict[str, object] = {
            "teacher": self.teacher,
            "data": self.corpus,
            "out": self.existing,
            **SMALL,
        }
        for key, value in changes.items():
            options.pop(key, None) if value is None else options.__setitem__(key, value)
        args: list[object] = ["dump"]
        for key, value in options.items():
            args += [f"--{key.replace('_', '-')}", value]
        return args

    def case(self, phrases: list[str], **changes: object) -> Case:
        return Case(self.args(**changes), phrases, self.existing)

    def cheap(self, **changes: object) -> dict[str, object]:
        """CHANGES plus a teacher that starts in half the time, for cases about the data or
        --out, which fail the same way whatever the teacher (before any forward pass)."""
        return {"teacher": None, "teacher_factory": CHEAP_TEACHER, "tokenizer": self.teacher,
                **changes}  # fmt: skip


def _file(path: Path, content: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def _bogus_teacher(c: Ctx) -> Case:
    teacher = c.tmp / "not-a-model"
    _file(teacher / "config.json", json.dumps({"model_type": "no-such-architecture"}))
    return c.case(["cannot load", "as a causal language model"], teacher=teacher)


def _jsonl(c: Ctx, lines: list[bytes]) -> Path:
    return _file(c.tmp / "data" / "docs.jsonl", b"\n".join(lines) + b"\n")


def _empty_dir(c: Ctx) -> Case:
    (c.tmp / "data").mkdir()
    return c.case(["is an empty directory"], data=c.tmp / "data")


def _empty_files(c: Ctx) -> Case:
    for i in range(3):
        _file(c.tmp / "data" / f"empty{i}.txt", "")
    return c.case(["holds no tokens"], **c.cheap(data=c.tmp / "data"))


def _not_utf8_text(c: Ctx) -> Case:
    _file(c.tmp / "data" / "a.txt", "def f():\n    return 1\n" * 20)
    _file(c.tmp / "data" / "b.txt", b"caf\xe9 \xff\xfe not utf-8\n")
    return c.case(["b.txt is not UTF-8"], **c.cheap(data=c.tmp / "data"))


def _corrupt_parquet(c: Ctx) -> Case:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = c.tmp / "data" / "docs.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"text": ["x = 1\n" * 50] * 4}), path)
    path.write_bytes(path.read_bytes()[:-40])  # truncated: the footer is gone
    return c.case(
        ["docs.parquet is not a readable Parquet file"], **c.cheap(data=path, text_field="text")
    )


def _parquet_without_field(c: Ctx) -> Case:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = c.tmp / "docs.parquet"
    pq.write_table(pa.table({"text": ["x = 1\n" * 50] * 4}), path)
    return c.case(
        ["has no column 'body'", "(columns: text)"], **c.cheap(data=path, text_field="body")
    )


def _nan_teacher(c: Ctx) -> Case:
    out = c.tmp / "new-cache"
    args = c.args(teacher=None, teacher_factory=NAN_TEACHER, tokenizer=c.teacher, out=out)
    return Case(args, ["non-finite logits"], out, fresh_out=True)


def _out_not_writable(c: Ctx) -> Case:
    if os.geteuid() != 0:
        parent = c.tmp / "read-only"
        parent.mkdir()
        parent.chmod(0o500)
    else:  # root writes through any permission bits; a regular file stops it anyway
        parent = _file(c.tmp / "a-regular-file", "not a directory\n")
    args = c.args(**c.cheap(out=parent / "cache"))
    return Case(args, ["cannot write to the output directory"], parent)


def _out_not_a_cache(c: Ctx) -> Case:
    out = c.tmp / "my-results"
    _file(out / "notes.txt", "important, not a cache\n")
    return Case(c.args(**c.cheap(out=out)), ["holds no logitcache manifest", "notes.txt"], out)


def _settings_differ(c: Ctx) -> Case:
    case = c.case(
        [
            "already holds a cache made with other settings",
            "targets.k: cache has 4, this run has 8",
            "--overwrite",
        ],
        top_k=8,
    )
    case.then = [*case.args, "--overwrite"]
    return case


#: name -> how to set the case up. Cases that fail before the teacher is loaded are cheap.
BAD_INPUTS: dict[str, Callable[[Ctx], Case]] = {
    "teacher_path_missing": lambda c: c.case(
        ["no-such-teacher does not exist"], teacher=c.tmp / "no-such-teacher"
    ),
    "teacher_not_a_causal_lm": _bogus_teacher,
    "top_k_zero": lambda c: c.case(["--top-k must be at least 1, got 0"], top_k=0),
    "top_k_over_vocab": lambda c: c.case(
        [f"--top-k {VOCAB + 1} is not in 1..{VOCAB}"], top_k=VOCAB + 1
    ),
    "shuffle_unknown": lambda c: c.case(
        ["--shuffle must be one of noshuffle, shuffle, bitshuffle, got 'zip'"], shuffle="zip"
    ),
    "data_missing": lambda c: c.case(["no such file"], data=c.tmp / "nowhere"),
    "data_empty_dir": _empty_dir,
    "data_only_empty_files": _empty_files,
    "jsonl_invalid_line": lambda c: c.case(
        ["docs.jsonl line 2 is not valid JSON"],
        **c.cheap(
            data=_jsonl(c, [b'{"text": "a = 1"}', b'{"text": "b = 2"', b'{"text": "c"}']),
            text_field="text",
        ),
    ),
    "jsonl_not_utf8": lambda c: c.case(
        ["docs.jsonl line 2 is not UTF-8"],
        **c.cheap(
            data=_jsonl(c, [b'{"text": "a = 1"}', b'{"text": "caf\xe9"}']), text_field="text"
        ),
    ),
    "text_not_utf8": _not_utf8_text,
    "parquet_corrupt": _corrupt_parquet,
    "jsonl_without_text_field": lambda c: c.case(
        ["say which field holds the text with --text-field"],
        data=_jsonl(c, [b'{"text": "a = 1"}']),
    ),
    "jsonl_field_missing": lambda c: c.case(
        ["line 1 has no field 'body'", "(has: id, text)"],
        **c.cheap(data=_jsonl(c, [b'{"id": 1, "text": "a = 1"}']), text_field="body"),
    ),
    "parquet_field_missing": _parquet_without_field,
    "seq_len_over_teacher": lambda c: c.case(
        [f"--seq-len 512 is longer than the teacher's maximum of {MAX_POSITIONS} positions"],
        seq_len=512,
    ),
    "teacher_logits_nan": _nan_teacher,
    "out_not_writable": _out_not_writable,
    "out_not_a_cache": _out_not_a_cache,
    "settings_differ": _settings_differ,
}
#: Variants beyond the required matrix, each another ~4 CPU-seconds: run with -m slow.
SLOW_BAD_INPUTS = {"data_missing", "jsonl_not_utf8", "parquet_field_missing"}


def bad_input_job(case: Case) -> tuple:
    """Run the case; snapshot what it must not have changed; then its follow-up, if any."""
    proc = run_cli(*case.args)
    after = snapshot(case.watch)
    then = run_cli(*case.then) if case.then else None
    return proc, after, then


def submit_bad_inputs(jobs: Background, wanted: set[str], root: Path, teacher, corpus, caches):
    for name, build in BAD_INPUTS.items():
        if f"bad:{name}" not in wanted:
            continue
        tmp = root / name
        existing = shutil.copytree(caches["zarr"], tmp / "cache")
        case = build(Ctx(tmp, teacher, corpus, existing))
        before = snapshot(case.watch)
        jobs.submit(
            f"bad:{name}", lambda case=case, before=before: (case, before, *bad_input_job(case))
        )
        if case.watch.is_dir():  # let pytest delete a read-only directory afterwards
            jobs.cleanups.append(lambda path=case.watch: path.chmod(0o700))


@cli_jobs(lambda p: [f"bad:{p['name']}"])
@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_BAD_INPUTS else n for n in BAD_INPUTS],
)
def test_bad_input_exits_2_with_a_message_and_changes_nothing(background: Background, name: str):
    case, before, proc, after, _ = background.result(f"bad:{name}")
    assert proc.returncode == 2, describe(proc)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""
    message = flat(proc.stderr)
    assert message.startswith("logitcache: error: "), message
    for phrase in case.phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    if case.fresh_out:
        # It stopped before committing anything: no part, nothing a reader would open.
        if after:
            assert json.loads(after["manifest.json"])["parts"] == []
            assert not json.loads(after["manifest.json"])["complete"]
            assert not [p for p in after if p.startswith("parts/")]
    else:
        assert after == before, f"{case.watch} was changed"


@cli_jobs(lambda _: ["bad:settings_differ"])
def test_overwrite_replaces_a_cache_with_other_settings(background: Background):
    case, _, proc, _, overwrite = background.result("bad:settings_differ")
    assert proc.returncode == 2
    assert overwrite.returncode == 0, describe(overwrite)
    assert "resumed" not in overwrite.stdout
    cache = logitcache.open(case.watch)
    assert cache.manifest.targets.k == 8
    assert cache.num_parts > 1
    assert all(s.target_ids.shape == (len(s.input_ids), 8) for s in cache)


# ------------------------------------------------------------------------------------------
# info and help
# ------------------------------------------------------------------------------------------


@cli_jobs(lambda _: ["info"])
def test_info_json(background: Background, small_caches: dict[str, Path]):
    proc = background.result("info")
    assert proc.returncode == 0, describe(proc)
    info = json.loads(proc.stdout)
    for key in ("teacher", "tokenizer", "data", "targets", "size_bytes"):
        assert key in info
    assert info["teacher"]["vocab_size"] == VOCAB
    assert info["targets"]["k"] == SMALL["top_k"]
    root = small_caches["zarr"]
    assert info["size_bytes"] == sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    assert info["tokens"] == logitcache.open(root).manifest.tokens


@cli_jobs(lambda p: [p["run"]])
@pytest.mark.parametrize(("run", "phrase"), [("help", "dump"), ("dump_help", "--top-k")])
def test_help_exits_0(background: Background, run: str, phrase: str):
    proc = background.result(run)
    assert proc.returncode == 0, describe(proc)
    assert "Usage" in proc.stdout and phrase in proc.stdout
