"""Locations that would make a command destroy data: an output that is also an input, and
symbolic links inside a cache. Every command must refuse, with exit 2 and one paragraph naming
the location, before it deletes or writes anything; the tests compare every byte of the inputs
(and of whatever a link points to) before and after. The CLIs run as real subprocesses.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import logitcache
from logitcache.errors import LogitCacheError
from logitcache.write.export import export
from logitcache.write.merge import merge
from tests.faults.helpers import describe, flat, run
from tests.synthetic import make_cache

CLI = [sys.executable, "-m", "logitcache"]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every entry under `root` (a directory: None) with its bytes: what must not change."""
    return {
        p.relative_to(root).as_posix(): None if p.is_dir() else p.read_bytes()
        for p in sorted(root.rglob("*"))
    }


def assert_refused(proc, prog: str, *phrases: str) -> None:
    message = flat(proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, describe(proc)
    assert message.startswith(f"{prog}: error: "), describe(proc)
    for phrase in phrases:
        assert phrase in message, describe(proc)


# --------------------------------------------------------------------------------------------
# An output that is also an input


@pytest.fixture
def two_caches(tmp_path: Path) -> tuple[Path, Path]:
    """Two small complete caches of different data (so that they can be merged)."""
    x = make_cache(tmp_path / "x", sequences=8, data="a" * 64, source="x")
    y = make_cache(tmp_path / "y", sequences=8, data="b" * 64, source="y")
    return Path(x), Path(y)


@pytest.mark.parametrize("case", ["same", "same_copy", "alias", "inside"])
def test_merge_into_one_of_its_inputs_is_refused_and_changes_nothing(case, two_caches, tmp_path):
    """`merge X X Y --overwrite` used to delete X's parts and leave an empty unfinished cache
    (with --copy: a FileNotFoundError traceback); OUT spelled through a symbolic link, or
    inside X, is the same location."""
    x, y = two_caches
    alias = tmp_path / "alias"
    alias.symlink_to(x, target_is_directory=True)
    out, relation, extra = {
        "same": (x, "is the input", []),
        "same_copy": (x, "is the input", ["--copy"]),
        "alias": (alias, "is the input", []),
        "inside": (x / "merged", "lies inside the input", []),
    }[case]
    before = snapshot(x), snapshot(y)
    proc = run([*CLI, "merge", out, x, y, "--overwrite", *extra], timeout=120)
    assert_refused(proc, "logitcache", relation, str(x), "choose an OUT outside the inputs")
    assert (snapshot(x), snapshot(y)) == before


def test_export_onto_its_input_is_refused_and_changes_nothing(two_caches):
    """`export E E --format parquet --overwrite` used to delete E and then fail to read it."""
    x, _ = two_caches
    before = snapshot(x)
    proc = run([*CLI, "export", x, f"{x}/", "--format", "parquet", "--overwrite"], timeout=120)
    assert_refused(proc, "logitcache", "is the input", "choose an OUT outside the inputs")
    assert snapshot(x) == before


def test_urls_that_name_an_input_are_refused(tmp_path: Path):
    """The same check for object-store URLs (memory:// is a real fsspec store, in-process):
    trailing slashes do not make another location."""
    x = make_cache("memory://overlap/x", sequences=8, data="a" * 64, source="x")
    y = make_cache("memory://overlap/y", sequences=8, data="b" * 64, source="y")
    before = logitcache.open(x, cache_dir=tmp_path).manifest
    with pytest.raises(LogitCacheError, match="is the input memory://overlap/x"):
        merge("memory://overlap/x/", [x, y], copy=True, overwrite=True, cache_dir=tmp_path)
    with pytest.raises(LogitCacheError, match="lies inside the input"):
        export(x, "memory://overlap/x/parquet", backend="parquet", cache_dir=tmp_path)
    assert logitcache.open(x, cache_dir=tmp_path / "again").manifest == before


def test_dump_refuses_data_inside_its_out(tmp_path: Path, tiny_teacher_dir: Path, dump_corpus):
    """`--data` under `--out/parts` would be deleted by --overwrite (and, as an orphan, by a
    resume) while it is being read: refused before the teacher is even loaded."""
    cache = Path(make_cache(tmp_path / "cache", sequences=8))
    data = shutil.copytree(dump_corpus, cache / "parts" / "corpus")
    before = snapshot(cache)
    proc = run(
        [*CLI, "dump", "--teacher", tiny_teacher_dir, "--data", data, "--out", cache,
         "--overwrite", "--device", "cpu", "--no-progress"],
        timeout=120,
    )  # fmt: skip
    assert_refused(proc, "logitcache", "contains the input", "choose an --out outside")
    assert snapshot(cache) == before


# --------------------------------------------------------------------------------------------
# Symbolic links inside a cache


def link_parts_dir(cache: Path, outside: Path) -> Path:
    """parts/ -> a directory outside that holds the parts, an unlisted file and a part-like
    directory (what a resumed dump used to delete there as orphans)."""
    shutil.move(cache / "parts", outside / "parts")
    (outside / "parts" / "notes.txt").write_text("not part of any cache\n")
    (outside / "parts" / "part-000099").mkdir()
    (outside / "parts" / "part-000099" / "keep.txt").write_text("keep\n")
    (cache / "parts").symlink_to(outside / "parts", target_is_directory=True)
    return cache / "parts"


def link_manifest(cache: Path, outside: Path) -> Path:
    shutil.move(cache / "manifest.json", outside / "manifest.json")
    (cache / "manifest.json").symlink_to(outside / "manifest.json")
    return cache / "manifest.json"


def link_part_file(cache: Path, outside: Path) -> Path:
    link = cache / "parts" / "part-000001" / "input_ids" / "zarr.json"
    shutil.move(link, outside / "zarr.json")
    link.symlink_to(outside / "zarr.json")
    return link


def link_part_dir(cache: Path, outside: Path) -> Path:
    link = cache / "parts" / "part-000001"
    shutil.move(link, outside / "part-000001")
    (outside / "notes.txt").write_text("not part of any cache\n")
    link.symlink_to(outside / "part-000001", target_is_directory=True)
    return link


LINKS: dict[str, Callable[[Path, Path], Path]] = {
    "parts_dir": link_parts_dir,
    "manifest": link_manifest,
    "part_file": link_part_file,
    "part_dir": link_part_dir,
}


#: The commands that delete in their output, then those that read (each test runs 4-9 CLI
#: subprocesses, 30-90 s on 2 cores: all slow).
WRITERS = ("dump_resume", "dump_overwrite", "merge_onto", "export_onto")
READERS = ("merge_from", "export_from", "info", "verify", "fit")


def commands(ctx: dict[str, Path], cache: Path, work: Path) -> dict[str, tuple[str, list]]:
    """Every command, given the linked `cache` as its input or its output: (program, argv)."""
    dump = [*CLI, "dump", "--teacher", ctx["teacher"], "--data", ctx["corpus"], "--out", cache,
            "--targets", "topk", "--top-k", 8, "--seq-len", 64, "--part-tokens", 4096,
            "--device", "cpu", "--no-progress"]  # fmt: skip
    fit = [sys.executable, "-m", "trainer", "fit", "--cache", cache, "--student",
           ctx["student"], "--out", work / "run", "--batch-size", 32, "--epochs", 1,
           "--eval-fraction", 0, "--no-progress"]  # fmt: skip
    other = ctx["other"]
    return {
        "dump_resume": ("logitcache", dump),
        "dump_overwrite": ("logitcache", [*dump, "--overwrite"]),
        "merge_from": ("logitcache", [*CLI, "merge", work / "merged", cache]),
        "merge_onto": ("logitcache", [*CLI, "merge", cache, other, "--copy", "--overwrite"]),
        "export_from": ("logitcache", [*CLI, "export", cache, work / "pq", "--format", "parquet"]),
        "export_onto": (
            "logitcache",
            [*CLI, "export", other, cache, "--format", "zarr", "--overwrite"],
        ),
        "info": ("logitcache", [*CLI, "info", cache]),
        "verify": ("logitcache", [*CLI, "verify", cache]),
        "fit": ("trainer", fit),
    }


def run_linked(kind: str, names: tuple[str, ...], ctx: dict[str, Path], base: Path) -> list[str]:
    """Each command on its own copy of the cache, linked the `kind` way, 4 at a time; the
    problems found (empty: every command refused, naming the link, and changed nothing
    outside)."""
    jobs = {}
    for name in names:
        work = base / name
        cache = Path(shutil.copytree(ctx["cache"], work / "cache"))
        if name.startswith("dump"):  # a dump that was interrupted (all its parts committed)
            doc = json.loads((cache / "manifest.json").read_text())
            (cache / "manifest.json").write_text(json.dumps({**doc, "complete": False}))
        outside = work / "outside"
        outside.mkdir()
        (outside / "secret.txt").write_text("outside the cache\n")
        link = LINKS[kind](cache, outside)
        prog, argv = commands(ctx, cache, work)[name]
        jobs[name] = (prog, [str(a) for a in argv], link, outside, snapshot(outside))
    with ThreadPoolExecutor(4) as pool:
        procs = {name: pool.submit(run, job[1], 300) for name, job in jobs.items()}
    problems = []
    for name, (prog, _, link, outside, before) in jobs.items():
        proc = procs[name].result()
        message = flat(proc.stderr)
        if snapshot(outside) != before:
            problems.append(f"{name}: changed what the link points to")
        if not (
            proc.returncode == 2
            and "Traceback" not in proc.stderr
            and message.startswith(f"{prog}: error: ")
            and f"{link} is a symbolic link" in message
        ):
            problems.append(f"{name}: {describe(proc)}")
    return problems


@pytest.fixture(scope="module")
def ctx(tiny_cache, tiny_teacher_dir, stdlib_corpus, tiny_student_config, tmp_path_factory):
    other = make_cache(tmp_path_factory.mktemp("other") / "cache", sequences=8)
    return {"cache": tiny_cache, "teacher": tiny_teacher_dir, "corpus": stdlib_corpus,
            "student": tiny_student_config, "other": Path(other)}  # fmt: skip


SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    ("kind", "names"),
    [
        pytest.param("parts_dir", WRITERS, id="parts_dir-writers", marks=SLOW),
        pytest.param("parts_dir", READERS, id="parts_dir-readers", marks=SLOW),
        *(pytest.param(k, WRITERS + READERS, id=k, marks=SLOW) for k in list(LINKS)[1:]),
    ],
)
def test_a_symlink_in_a_cache_is_refused_by_every_command(kind, names, ctx, tmp_path):
    """parts/, manifest.json, a file of a part, a part directory: each a link to something
    outside the cache. dump (resume and --overwrite), merge and export (the cache as input and
    as output), info, verify and trainer fit all exit 2 naming the link, and what it points to
    is unchanged, byte for byte and entry for entry."""
    problems = run_linked(kind, names, ctx, tmp_path)
    assert not problems, "\n\n".join(problems)
