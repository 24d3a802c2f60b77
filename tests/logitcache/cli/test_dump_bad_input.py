"""Bad input to `logitcache dump`: exit 2, a message naming the problem, no traceback, nothing
changed."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import logitcache
from tests.logitcache.background import Background, cli_jobs
from tests.logitcache.dump_helpers import SMALL, VOCAB, describe, flat, run_cli

NAN_TEACHER = "tests.logitcache.nan_teacher:build"
CHEAP_TEACHER = "tests.logitcache.nan_teacher:build_uniform"
MAX_POSITIONS = 256


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
    # top-p: the coverage outside (0, 1], the clamps crossed or past the vocabulary
    "top_p_zero": lambda c: c.case(
        ["--top-p must be in (0, 1]", "got 0.0"], targets="topp", top_k=None, top_p=0
    ),
    "top_p_over_one": lambda c: c.case(
        ["--top-p must be in (0, 1]", "got 1.5"], targets="topp", top_k=None, top_p=1.5
    ),
    "min_k_over_max_k": lambda c: c.case(
        ["--min-k 9 and --max-k 8 must satisfy 1 <= min-k <= max-k"],
        targets="topp",
        top_k=None,
        max_k=8,
        min_k=9,
    ),
    "max_k_over_vocab": lambda c: c.case(
        [f"--max-k {VOCAB + 1} is not in 1..{VOCAB}"],
        targets="topp",
        top_k=None,
        max_k=VOCAB + 1,
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
SLOW_BAD_INPUTS = {"data_missing", "jsonl_not_utf8", "parquet_field_missing", "min_k_over_max_k"}


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


def submit_background_jobs(
    jobs: Background, wanted: set[str], root: Path, request: pytest.FixtureRequest
) -> None:
    teacher = request.getfixturevalue("tiny_teacher_dir")
    small_corpus = request.getfixturevalue("small_corpus")
    small_caches = request.getfixturevalue("small_caches")
    submit_bad_inputs(jobs, wanted, root / "bad", teacher, small_corpus, small_caches)


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
