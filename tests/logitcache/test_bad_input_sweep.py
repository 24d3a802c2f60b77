"""Bad input to every command: exit 2, one message naming the problem, no traceback, nothing
left behind.

Each case runs the real CLI (`python -m logitcache ...` / `python -m trainer ...`) in its own
empty working directory, with its outputs pointed there; the directory is snapshotted (every
path and its bytes) before and after, and the shared inputs (teacher, caches, student) once for
the whole module. The cases run two at a time in a module fixture (each is a 2-5 s subprocess,
mostly start-up); the tests then check one result each. Cases owned by other tests are left
out: `tests/logitcache/cli/test_dump_bad_input.py::test_bad_input_exits_2_with_a_message_and_changes_nothing`
(dump's data and teacher errors), `tests/trainer/test_fit.py` (missing cache, vocabulary and
tokenizer mismatches), `tests/faults/test_sharded_dump.py` (--shard),
`tests/logitcache/dumping/test_device_map.py` (--device-map under torchrun or without
accelerate: they need their own environment).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from logitcache.write.merge import merge
from tests.cli import cli_env
from tests.synthetic import make_cache

#: Deeper than any JSON decoder's recursion limit, and still a small file.
DEEP = 100_000
BROKEN_TEACHER = "tests.logitcache.nan_teacher:build_broken"


@dataclass(frozen=True)
class Inputs:
    """What the cases read; built once, never written by a case."""

    root: Path
    teacher: Path  # the tiny teacher (vocabulary 512)
    corpus: Path
    cache: Path  # synthetic, vocabulary 300, 12 sequences of up to 16 tokens
    other_k: Path  # the same, but k=8
    shard0: Path  # "corpus [shard 0/2]"
    shard1: Path
    one_token: Path  # a cache whose every sequence is one token long
    deep_manifest: Path  # manifest.json nested DEEP levels
    deep_zarr_json: Path  # part-000000/target_ids/zarr.json nested DEEP levels
    student: Path  # a GPT-2 config matching `cache`
    model: Path  # a saved (untrained) model matching `cache`
    truncated_model: Path  # the same, model.safetensors cut in half


def deep_json(prefix: str) -> str:
    return prefix + "[" * DEEP + "]" * DEEP + "}"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_teacher_dir: Path, stdlib_corpus: Path) -> Inputs:
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("sweep-inputs")
    cache = make_cache(root / "cache")
    deep_manifest = shutil.copytree(cache, root / "deep-manifest")
    (deep_manifest / "manifest.json").write_text(deep_json('{"format": "logitcache", "x": '))
    deep_zarr = shutil.copytree(cache, root / "deep-zarr-json")
    meta = deep_zarr / "parts" / "part-000000" / "target_ids" / "zarr.json"
    meta.write_text(deep_json('{"zarr_format": 3, "attributes": '))
    config = GPT2Config(vocab_size=300, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    student = root / "student.json"
    student.write_text(config.to_json_string())
    GPT2LMHeadModel(config).save_pretrained(root / "model")
    truncated = shutil.copytree(root / "model", root / "truncated-model")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return Inputs(
        root=root, teacher=tiny_teacher_dir, corpus=stdlib_corpus, cache=cache,
        other_k=make_cache(root / "k8", k=8),
        shard0=make_cache(root / "shard0", source="corpus [shard 0/2]", data="a" * 64),
        shard1=make_cache(root / "shard1", source="corpus [shard 1/2]", data="b" * 64, seed=1),
        one_token=make_cache(root / "one-token", seq_len=1), deep_manifest=deep_manifest,
        deep_zarr_json=deep_zarr, student=student, model=root / "model",
        truncated_model=truncated,
    )  # fmt: skip


@dataclass
class Case:
    argv: list[object]  # after `python -m`: "logitcache ..." or "trainer ..."
    phrases: list[str]  # each must be in the message


#: A case: (inputs, its own working directory, where it may create input files) -> Case.
Build = Callable[[Inputs, Path], Case]


def dump(i: Inputs, tmp: Path, phrases: list[str], **flags: object) -> Case:
    """A dump into a new --out in the case's directory: the teacher and corpus, unless changed
    (None drops a flag)."""
    options: dict[str, object] = {"teacher": i.teacher, "data": i.corpus, "out": tmp / "cache",
                                  "device": "cpu", "seq_len": 64, "targets": "topk", "top_k": 4,
                                  **flags}  # fmt: skip
    argv: list[object] = ["logitcache", "dump", "--no-progress"]
    for key, value in options.items():
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", value]
    return Case(argv, phrases)


def text(tmp: Path, name: str, content: str) -> Path:
    (tmp / name).write_text(content, encoding="utf-8")
    return tmp / name


def npy(tmp: Path, array: np.ndarray) -> Path:
    np.save(tmp / "ids.npy", array)
    return tmp / "ids.npy"


def fit(i: Inputs, tmp: Path, phrases: list[str], *flags: object, **changes: object) -> Case:
    options: dict[str, object] = {"cache": i.cache, "student": i.student, "out": tmp / "run",
                                  "steps": 2, "batch_size": 2, **changes}  # fmt: skip
    argv: list[object] = ["trainer", "fit", "--no-progress", *flags]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", value]
    return Case(argv, phrases)


def evaluate(i: Inputs, phrases: list[str], *flags: object, **changes: object) -> Case:
    options: dict[str, object] = {"cache": i.cache, "student": i.model, "device": "cpu",
                                  **changes}  # fmt: skip
    argv: list[object] = ["trainer", "eval", *flags]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", value]
    return Case(argv, phrases)


NESTED = ["manifest.json", "nested too deeply"]
ZARR_NESTED = ["part-000000", "target_ids/zarr.json", "nested too deeply"]

CASES: dict[str, Build] = {
    # ---- dump: settings refused before the teacher is loaded or --out is touched ----
    "dump_clevel_99": lambda i, t: dump(i, t, ["--clevel must be in 0..9", "got 99"], clevel=99),
    "dump_clevel_negative": lambda i, t: dump(i, t, ["--clevel must be in 0..9"], clevel=-1),
    "dump_clevel_parquet_23": lambda i, t: dump(
        i, t, ["--clevel must be in 0..22 for --format parquet"], clevel=23, format="parquet"
    ),
    "dump_format_unknown": lambda i, t: dump(i, t, ["--format must be one of"], format="hdf5"),
    "dump_seq_len_1": lambda i, t: dump(i, t, ["--seq-len must be at least 2"], seq_len=1),
    "dump_targets_unknown": lambda i, t: dump(i, t, ["--targets must be one of"], targets="all"),
    "dump_logprob_dtype": lambda i, t: dump(
        i, t, ["--logprob-dtype must be one of"], logprob_dtype="int8"
    ),
    "dump_id_order": lambda i, t: dump(i, t, ["--id-order must be"], id_order="random"),
    "dump_temperature_zero": lambda i, t: dump(i, t, ["--temperature must be"], temperature=0),
    "dump_temperature_inf": lambda i, t: dump(i, t, ["--temperature must be"], temperature="inf"),
    "dump_seed_negative": lambda i, t: dump(i, t, ["--seed must be in"], seed=-1),
    "dump_samples_over_max": lambda i, t: dump(
        i, t, ["--samples must be at most"], targets="sample", top_k=None, samples=70000
    ),
    "dump_batch_size_zero": lambda i, t: dump(
        i, t, ["--batch-size must be at least 1"], batch_size=0
    ),
    "dump_part_tokens_zero": lambda i, t: dump(
        i, t, ["--part-tokens must be at least 1"], part_tokens=0
    ),
    "dump_data_format_unknown": lambda i, t: dump(
        i, t, ["unknown --data-format"], data_format="csv"
    ),
    "dump_dtype_unknown": lambda i, t: dump(i, t, ["unknown --dtype"], dtype="float8"),
    "dump_device_unknown": lambda i, t: dump(i, t, ["unknown device 'tpu'"], device="tpu"),
    "dump_teacher_and_factory": lambda i, t: dump(
        i, t, ["give exactly one of"], teacher_factory=BROKEN_TEACHER
    ),
    # ---- dump: --device-map, --max-memory, --attn (device=None: no --device cpu) ----
    "dump_attn_unknown": lambda i, t: dump(
        i, t, ["--attn must be one of", "'flash'"], attn="flash"
    ),
    "dump_attn_with_factory": lambda i, t: dump(
        i,
        t,
        ["--attn eager chooses the attention", "Leave out --attn"],
        attn="eager",
        teacher=None,
        teacher_factory=BROKEN_TEACHER,
        tokenizer=i.teacher,
    ),
    "dump_device_map_unknown": lambda i, t: dump(
        i,
        t,
        ["--device-map must be auto, balanced", "'everywhere' is neither (no such file)"],
        device_map="everywhere",
        device=None,
    ),
    "dump_device_map_with_device": lambda i, t: dump(
        i,
        t,
        ["--device cpu and --device-map auto contradict", "Leave out --device"],
        device_map="auto",
    ),
    "dump_device_map_with_factory": lambda i, t: dump(
        i,
        t,
        ["--device-map places the layers of a model loaded by from_pretrained"],
        device_map="auto",
        device=None,
        teacher=None,
        teacher_factory=BROKEN_TEACHER,
        tokenizer=i.teacher,
    ),
    "dump_device_map_not_json": lambda i, t: dump(
        i, t, ["map.json as JSON"], device_map=text(t, "map.json", "{not json"), device=None
    ),
    "dump_device_map_bad_device": lambda i, t: dump(
        i,
        t,
        ["'transformer' is mapped to 'gpu0'"],
        device=None,
        device_map=text(t, "map.json", '{"transformer": "gpu0", "lm_head": 0}'),
    ),
    "dump_device_map_missing_gpu": lambda i, t: dump(
        i,
        t,
        ["--device-map names GPU 7, but this machine has"],
        device=None,
        device_map=text(t, "map.json", '{"": 7}'),
    ),
    "dump_max_memory_not_a_size": lambda i, t: dump(
        i,
        t,
        ["--max-memory must be DEVICE=SIZE", "'lots' is not a size"],
        device_map="auto",
        max_memory="0=70GiB,cpu=lots",
        device=None,
    ),
    "dump_max_memory_unknown_device": lambda i, t: dump(
        i,
        t,
        ["'gpu0=1GiB' is not DEVICE=SIZE"],
        device_map="auto",
        max_memory="gpu0=1GiB",
        device=None,
    ),
    "dump_max_memory_twice": lambda i, t: dump(
        i,
        t,
        ["cpu is given twice"],
        device_map="auto",
        max_memory="cpu=1GiB,cpu=2GiB",
        device=None,
    ),
    "dump_max_memory_without_device_map": lambda i, t: dump(
        i, t, ["--max-memory sets the budgets of a --device-map placement"], max_memory="cpu=1GiB"
    ),
    "dump_max_memory_with_a_map_file": lambda i, t: dump(
        i,
        t,
        ["is a placement already"],
        max_memory="cpu=1GiB",
        device=None,
        device_map=text(t, "map.json", '{"": "cpu"}'),
    ),
    # ---- dump: the teacher factory and pre-tokenized ids ----
    "dump_factory_raises": lambda i, t: dump(
        i,
        t,
        ["--teacher-factory", "raised ValueError", "teacher.bin not found"],
        teacher=None,
        teacher_factory=BROKEN_TEACHER,
        tokenizer=i.teacher,
    ),
    "dump_factory_not_module_function": lambda i, t: dump(
        i,
        t,
        ["is not MODULE:FUNCTION"],
        teacher=None,
        teacher_factory="nocolon",
        tokenizer=i.teacher,
    ),
    "dump_factory_without_tokenizer": lambda i, t: dump(
        i, t, ["needs --tokenizer"], teacher=None, teacher_factory=BROKEN_TEACHER
    ),
    "dump_npy_negative_id": lambda i, t: dump(
        i,
        t,
        ["ids.npy: document 1 holds token id -3", "vocabulary 0..511"],
        data=npy(t, np.array([[1, 2, 3, 4], [5, 6, -3, 7]])),
    ),
    "dump_npy_id_over_vocab": lambda i, t: dump(
        i,
        t,
        ["ids.npy: document 0 holds token id 512", "vocabulary 0..511"],
        data=npy(t, np.array([[1, 512, 3, 4]] * 3)),
    ),
    "dump_npy_floats": lambda i, t: dump(
        i, t, ["must be a 2-D integer array"], data=npy(t, np.ones((3, 4)))
    ),
    # ---- info, stats, verify ----
    "info_missing": lambda i, t: Case(["logitcache", "info", t / "nowhere"], ["no cache at"]),
    "info_not_a_cache": lambda i, t: Case(["logitcache", "info", i.corpus], ["no manifest.json"]),
    "info_deep_manifest": lambda i, t: Case(["logitcache", "info", i.deep_manifest], NESTED),
    "info_deep_zarr_json": lambda i, t: Case(["logitcache", "info", i.deep_zarr_json], ZARR_NESTED),
    "stats_max_tokens_negative": lambda i, t: Case(
        ["logitcache", "stats", i.cache, "--max-tokens", -1], ["--max-tokens must be 0"]
    ),
    "stats_deep_manifest": lambda i, t: Case(["logitcache", "stats", i.deep_manifest], NESTED),
    "verify_deep_manifest": lambda i, t: Case(["logitcache", "verify", i.deep_manifest], NESTED),
    "verify_deep_zarr_json": lambda i, t: Case(  # verify hashes every file before reading it
        ["logitcache", "verify", i.deep_zarr_json],
        ["target_ids/zarr.json", "sha256 does not match"],
    ),
    # ---- merge, export ----
    "merge_shards_reversed": lambda i, t: Case(
        ["logitcache", "merge", t / "all", i.shard1, i.shard0],
        ["shard 0/2 of corpus", "comes after", "shard 1/2", "--any-order"],
    ),
    "merge_other_settings": lambda i, t: Case(
        ["logitcache", "merge", t / "all", i.cache, i.other_k],
        ["different settings", "targets.k"],
    ),
    "merge_same_data_twice": lambda i, t: Case(
        ["logitcache", "merge", t / "all", i.shard0, i.shard0], ["hold the same data"]
    ),
    "merge_deep_manifest": lambda i, t: Case(
        ["logitcache", "merge", t / "all", i.cache, i.deep_manifest], NESTED
    ),
    "export_format_unknown": lambda i, t: Case(
        ["logitcache", "export", i.cache, t / "out", "--format", "csv"], ["unknown format 'csv'"]
    ),
    "export_deep_manifest": lambda i, t: Case(
        ["logitcache", "export", i.deep_manifest, t / "out", "--format", "parquet"], NESTED
    ),
    # ---- trainer fit: settings, then what the cache or student cannot give ----
    "fit_grad_clip_negative": lambda i, t: fit(i, t, ["--grad-clip must be 0"], grad_clip=-1),
    "fit_lr_inf": lambda i, t: fit(i, t, ["--lr must be a finite number, got inf"], lr="inf"),
    "fit_temperature_inf": lambda i, t: fit(
        i, t, ["--temperature must be a finite number"], temperature="inf"
    ),
    "fit_beta2_one": lambda i, t: fit(i, t, ["--beta2 must be in [0, 1)"], beta2=1.0),
    "fit_weight_decay_negative": lambda i, t: fit(
        i, t, ["--weight-decay must be 0 or more"], weight_decay=-0.1
    ),
    "fit_out_inside_the_cache": lambda i, t: fit(
        i, t, ["lies inside the input", "choose an --out outside"], out=i.cache / "run"
    ),
    "fit_out_is_the_cache": lambda i, t: fit(
        i, t, ["is the input", "choose an --out outside"], "--overwrite", out=i.cache
    ),
    "fit_resume_and_overwrite": lambda i, t: fit(
        i, t, ["--resume and --overwrite contradict"], "--resume", "--overwrite"
    ),
    "fit_empty_eval_split": lambda i, t: fit(
        i,
        t,
        ["the eval split", "has no sequences", "larger --eval-fraction"],
        eval_fraction=1e-9,
    ),
    "fit_one_token_sequences": lambda i, t: fit(
        i, t, ["one token long", "--seq-len 2 or more"], cache=i.one_token
    ),
    "fit_student_missing": lambda i, t: fit(i, t, ["does not exist"], student=t / "nowhere"),
    # ---- trainer eval ----
    "eval_truncated_weights": lambda i, t: evaluate(
        i, ["truncated-model", "damaged"], student=i.truncated_model
    ),
    "eval_missing_model_before_split": lambda i, t: evaluate(
        i, ["--student", "nowhere", "does not exist"], student=t / "nowhere", eval_fraction=1e-9
    ),
    "eval_config_only": lambda i, t: evaluate(i, ["has no trained weights"], student=i.student),
    "eval_split_unknown": lambda i, t: evaluate(i, ["--split must be one of"], split="test"),
}


#: Cases that load the teacher, or a student and a cache in the trainer: 7-18 s each on a
#: 2-core machine, run with -m slow. The others fail in the CLI's own checks (5-8 s each, mostly
#: start-up), so the default run stays near two minutes.
SLOW = {
    "dump_factory_raises", "dump_npy_negative_id", "dump_npy_id_over_vocab", "dump_npy_floats",
    "fit_empty_eval_split", "fit_one_token_sequences", "fit_student_missing",
    "eval_truncated_weights", "eval_missing_model_before_split", "eval_config_only",
    "eval_split_unknown",
}  # fmt: skip


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root`, with the sha256 of each file's bytes ("dir" for directories)."""
    return {
        p.relative_to(root).as_posix(): (
            "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        )
        for p in sorted(root.rglob("*"))
    }


@dataclass
class Result:
    case: Case
    proc: subprocess.CompletedProcess
    before: dict[str, str]
    after: dict[str, str]
    seconds: float


def run_case(name: str, build: Build, inputs: Inputs, root: Path) -> Result:
    tmp = root / name
    tmp.mkdir()
    case = build(inputs, tmp)
    before = snapshot(tmp)
    start = time.perf_counter()
    prog, *args = case.argv
    proc = subprocess.run(
        [sys.executable, "-m", str(prog), *map(str, args)],
        capture_output=True, text=True, env=cli_env(), cwd=tmp, timeout=300,
    )  # fmt: skip
    return Result(case, proc, before, snapshot(tmp), time.perf_counter() - start)


@pytest.fixture(scope="module")
def shared_before(inputs: Inputs) -> dict[str, str]:
    return {**snapshot(inputs.root), **{f"teacher/{k}": v for k, v in
                                        snapshot(inputs.teacher).items()}}  # fmt: skip


@pytest.fixture(scope="module")
def results(request, tmp_path_factory, inputs: Inputs, shared_before) -> dict[str, Result]:
    """The cases this session selected, run two at a time (the test machine has 2 cores)."""
    selected = [
        item.callspec.params["name"]
        for item in request.session.items
        if item.originalname == "test_bad_input_is_exit_2_with_one_message_and_leaves_nothing"
    ]
    root = tmp_path_factory.mktemp("sweep")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {n: pool.submit(run_case, n, CASES[n], inputs, root) for n in selected}
        done = {name: future.result() for name, future in futures.items()}
    print("sweep seconds:", {n: round(r.seconds, 1) for n, r in done.items()})
    return done


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CASES]
)
def test_bad_input_is_exit_2_with_one_message_and_leaves_nothing(results, name: str):
    r = results[name]
    where = f"{name}: exit {r.proc.returncode}\n--- stdout\n{r.proc.stdout}\n--- stderr\n{r.proc.stderr}"
    assert r.proc.returncode == 2, where
    assert "Traceback" not in r.proc.stderr, where
    message = " ".join(r.proc.stderr.split())
    assert message.startswith(f"{r.case.argv[0]}: error: "), where
    for phrase in r.case.phrases:
        assert phrase in message, f"{phrase!r} not in the message\n{where}"
    assert r.after == r.before, f"{name} left {sorted(set(r.after) - set(r.before))} behind"


def test_the_shared_inputs_are_unchanged(results, inputs: Inputs, shared_before):
    assert len(CASES) >= 40
    now = {**snapshot(inputs.root), **{f"teacher/{k}": v for k, v in
                                       snapshot(inputs.teacher).items()}}  # fmt: skip
    assert now == shared_before


def test_shards_in_order_merge_and_any_order_merges_as_given(tmp_path, inputs: Inputs):
    """The refusal of `merge_shards_reversed` is about order only: in shard order the same two
    caches merge, and --any-order keeps the order given."""
    forward = merge(tmp_path / "forward", [inputs.shard0, inputs.shard1])
    reverse = merge(tmp_path / "reverse", [inputs.shard1, inputs.shard0], any_order=True)
    assert [i.data.source for i in forward.merged_from] == [
        "corpus [shard 0/2]", "corpus [shard 1/2]"
    ]  # fmt: skip
    assert [i.data.source for i in reverse.merged_from] == [
        "corpus [shard 1/2]", "corpus [shard 0/2]"
    ]  # fmt: skip
    json.loads((tmp_path / "reverse" / "manifest.json").read_text())  # committed


def test_info_of_a_cache_without_tokens_gives_no_bytes_per_token(tmp_path):
    """An empty shard's cache is metadata only: its size over "max(tokens, 1)" printed as
    "1360.0 bytes/token" was no rate."""
    empty = make_cache(tmp_path / "empty", sequences=0)

    def info(*flags: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "logitcache", "info", str(empty), *flags],
            capture_output=True, text=True, env=cli_env(), timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    text = " ".join(info().split())
    assert "no tokens yet, so no bytes/token" in text and " = " not in text.split("size")[-1]
    assert json.loads(info("--json"))["bytes_per_token"] is None
