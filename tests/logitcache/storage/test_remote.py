"""Caches in an object store, against a real S3-protocol server on 127.0.0.1.

moto's standalone server runs as a subprocess (``tests/logitcache/s3server.py``); the CLIs run as
real subprocesses with the same environment (credentials, ``AWS_ENDPOINT_URL``), and talk to it
with the real client (s3fs) over real HTTP. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import logitcache
from logitcache.errors import CorruptCacheError, LogitCacheError
from logitcache.read.verify import verify
from logitcache.storage import mirror, stores
from logitcache.testing import toy
from logitcache.write.export import export
from logitcache.write.merge import merge
from tests.cli import REPO, cli_env, reaped
from tests.logitcache.s3server import environment, free_port, moto_server
from tests.synthetic import make_cache

pytest.importorskip("s3fs", reason="the S3 tests need s3fs (pip install -e '.[dev]')")
pytest.importorskip("moto", reason="the S3 tests need moto[server] (pip install -e '.[dev]')")

BUCKET = "caches"
#: Small, several parts (the unit of commit and resume), slow enough to be killed mid-run.
OPTIONS = {"targets": "topk", "top_k": 8, "seq_len": 64, "part_tokens": 1024, "batch_size": 2}


def command(tool: str, *args: object) -> list[str]:
    cmd = [sys.executable, "-m", tool, *map(str, args)]
    if tool == "logitcache" and args[0] == "dump":
        cmd += ["--no-progress", "--device", "cpu"]
    return cmd


def run(tool: str, *args: object, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(tool, *args), capture_output=True, text=True, env=cli_env(**env), cwd=REPO,
        timeout=300, check=False,
    )  # fmt: skip


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def dump_flags(teacher: Path, data: Path, out: str) -> list[object]:
    flags: list[object] = ["dump", "--teacher", teacher, "--data", data, "--out", out]
    for key, value in OPTIONS.items():
        flags += [f"--{key.replace('_', '-')}", value]
    return flags


def flat(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a free loopback port, a bucket, and the environment pointing at it
    (this process and every subprocess); a fresh local cache directory for fetched parts."""
    local_cache = tmp_path_factory.mktemp("local_cache")
    with moto_server() as server:
        env = {
            **server.env,
            "LOGITCACHE_CACHE_DIR": str(local_cache),
            "LOGITCACHE_RETRY_WAIT": "0.05",
        }
        with environment(env):
            stores.RemoteStore(f"s3://{BUCKET}").fs.mkdir(BUCKET)
            yield server


@pytest.fixture(scope="module")
def fs(s3):
    return stores.RemoteStore(f"s3://{BUCKET}").fs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, stdlib_corpus: Path) -> Path:
    """Five documents of the session corpus: about 8 parts with OPTIONS."""
    directory = tmp_path_factory.mktemp("remote_corpus")
    for f in sorted(stdlib_corpus.iterdir())[:5]:
        shutil.copy(f, directory / f.name)
    return directory


@pytest.fixture(scope="module")
def student_config(tmp_path_factory, tiny_teacher_dir: Path) -> Path:
    path = tmp_path_factory.mktemp("remote_student") / "student.json"
    config = toy.build_student_config(
        tiny_teacher_dir, n_layer=1, n_embd=32, n_head=2, n_positions=64
    )
    path.write_text(config.to_json_string(), encoding="utf-8")
    return path


REFERENCE = f"s3://{BUCKET}/reference"
KILLED = f"s3://{BUCKET}/killed"


def remote_manifest(fs, url: str) -> dict:
    return json.loads(fs.cat_file(url.removeprefix("s3://") + "/manifest.json"))


def remote_files(fs, url: str) -> set[str]:
    root = url.removeprefix("s3://")
    fs.invalidate_cache(root)
    return {name[len(root) + 1 :] for name in fs.find(root)}


def kill_after_first_commit(fs, teacher: Path, corpus: Path) -> dict:
    """Start `dump --out KILLED`, SIGKILL it once its manifest lists a part; then plant an
    orphan (an upload that never reached its commit). Returns the manifest after the kill."""
    root = KILLED.removeprefix("s3://")
    victim = subprocess.Popen(
        command("logitcache", *dump_flags(teacher, corpus, KILLED)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=REPO,
    )  # fmt: skip
    with reaped(victim):
        deadline = time.monotonic() + 240
        while True:
            try:
                if json.loads(fs.cat_file(f"{root}/manifest.json"))["parts"]:
                    break
            except (OSError, ValueError):
                pass  # not written yet
            assert victim.poll() is None, f"the dump ended first: {victim.communicate()}"
            assert time.monotonic() < deadline, "no part was committed in time"
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    after_kill = remote_manifest(fs, KILLED)
    fs.pipe_file(f"{root}/parts/part-000999/zarr.json", b"{}")
    return after_kill


@pytest.fixture(scope="module")
def runs(s3, fs, tiny_teacher_dir: Path, corpus: Path, student_config: Path, tmp_path_factory):
    """Every CLI run of this module, started as early as its inputs allow, two at a time:
    dump to S3 (the reference) and a dump killed mid-run; then info, verify and trainer fit on
    the reference and the rerun of the killed dump."""
    run_dir = tmp_path_factory.mktemp("remote_fit") / "run"
    fit_cache = tmp_path_factory.mktemp("fit_local_cache")
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=3)  # one mostly waits (kill)
    teacher = tiny_teacher_dir
    reference = pool.submit(
        run, "logitcache", *dump_flags(teacher, corpus, REFERENCE), "--license", "cc-by-4.0"
    )
    killed = pool.submit(kill_after_first_commit, fs, teacher, corpus)
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    unreachable = pool.submit(
        run, "logitcache", "info", REFERENCE,
        AWS_ENDPOINT_URL=closed, LOGITCACHE_RETRIES="2", LOGITCACHE_RETRY_WAIT="0.1",
    )  # fmt: skip

    def after_reference(*args: object):
        reference.result()
        return run(*args)

    def resume():
        killed.result()
        return run("logitcache", *dump_flags(teacher, corpus, KILLED), "--license", "cc-by-4.0")

    fit_flags = [
        "fit", "--cache", REFERENCE, "--student", student_config, "--out", run_dir,
        "--steps", 4, "--batch-size", 4, "--num-workers", 2, "--eval-fraction", 0.1,
        "--eval-every", 0, "--checkpoint-every", 0, "--log-every", 2, "--no-progress",
        "--cache-dir", fit_cache,
    ]  # fmt: skip
    futures = {
        "reference": reference,
        "killed": killed,
        "resume": pool.submit(resume),
        "info": pool.submit(after_reference, "logitcache", "info", REFERENCE, "--json"),
        "verify": pool.submit(after_reference, "logitcache", "verify", REFERENCE),
        "fit": pool.submit(after_reference, "trainer", *fit_flags),
        "run_dir": run_dir,
        "unreachable": (closed, unreachable),
    }
    yield futures
    pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def reference(runs) -> str:
    proc = runs["reference"].result()
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout.startswith(f"wrote {REFERENCE}")
    return REFERENCE


# --------------------------------------------------------------------------------------------
# dump to S3; info, verify, fit from it


def test_dump_to_s3_writes_a_complete_cache_with_its_card(fs, reference: str):
    manifest = remote_manifest(fs, reference)
    assert manifest["complete"] and len(manifest["parts"]) > 3
    listed = {f"parts/{rel}" for part in manifest["parts"] for rel in part["files"]}
    assert remote_files(fs, reference) == listed | {"manifest.json", "README.md"}
    card = fs.cat_file(f"{BUCKET}/reference/README.md").decode()
    assert "license: cc-by-4.0" in card and reference in card
    cache = logitcache.open(reference)
    assert cache.is_remote and cache.location == reference
    assert sum(len(s.input_ids) for s in cache) == manifest["tokens"]


def test_info_json_from_s3_exposes_the_compatibility_fields(runs, fs, reference: str):
    proc = runs["info"].result()
    assert proc.returncode == 0, describe(proc)
    info = json.loads(proc.stdout)
    manifest = remote_manifest(fs, reference)
    assert info["tokenizer"]["fingerprint"] == manifest["tokenizer"]["fingerprint"]
    assert info["tokenizer"]["vocab_size"] == manifest["tokenizer"]["vocab_size"] == 512
    assert info["teacher"]["vocab_size"] == 512
    for key in ("name", "config_sha256", "weights_sha256"):
        assert info["teacher"][key] == manifest["teacher"][key]
    assert info["data"]["fingerprint"] == manifest["data"]["fingerprint"]
    assert info["format_version"] == manifest["format_version"] == "1.1"
    assert info["size_bytes"] == sum(fs.du(f"{BUCKET}/reference", total=False).values())


def test_verify_from_s3(runs, fs, reference: str):
    proc = runs["verify"].result()
    assert proc.returncode == 0, describe(proc)
    files = sum(len(p["files"]) for p in remote_manifest(fs, reference)["parts"])
    assert proc.stdout.startswith("ok: ") and f"{files} files" in proc.stdout
    assert f"downloaded {files} files" in proc.stdout


def test_trainer_fit_from_s3_with_two_workers(runs, reference: str):
    proc = runs["fit"].result()
    assert proc.returncode == 0, describe(proc)
    run_dir = runs["run_dir"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["cache"] == reference
    assert summary["steps"] == 4
    assert (run_dir / "model" / "model.safetensors").is_file()


# --------------------------------------------------------------------------------------------
# Kill a dump to S3 and resume it


def test_killed_dump_to_s3_resumes_to_the_uninterrupted_content(runs, fs, reference: str):
    after_kill = runs["killed"].result()
    assert not after_kill["complete"], "the kill landed after the dump had finished"
    committed = len(after_kill["parts"])
    rerun = runs["resume"].result()
    assert rerun.returncode == 0, describe(rerun)
    assert f"resumed after {committed} committed parts" in flat(rerun.stdout)

    resumed, uninterrupted = remote_manifest(fs, KILLED), remote_manifest(fs, reference)
    assert len(uninterrupted["parts"]) > committed + 2, "the kill did not land mid-run"
    for m in (resumed, uninterrupted):
        m.pop("created")
    assert resumed == uninterrupted  # every part's every file's sha256 included
    listed = {f"parts/{rel}" for part in resumed["parts"] for rel in part["files"]}
    assert remote_files(fs, KILLED) == listed | {"manifest.json", "README.md"}, "orphans left"
    for a, b in zip(logitcache.open(KILLED), logitcache.open(reference), strict=True):
        assert torch.equal(a.target_ids, b.target_ids)
        assert torch.equal(a.target_logprobs, b.target_logprobs)


def test_an_unfinished_remote_dump_is_refused_unless_partial_is_allowed(reference: str):
    url = f"s3://{BUCKET}/unfinished"
    doc = json.loads(stores.RemoteStore(reference).read_bytes("manifest.json"))
    doc.update(complete=False)
    stores.RemoteStore(url).write_bytes("manifest.json", json.dumps(doc).encode())
    with pytest.raises(LogitCacheError, match="unfinished dump"):
        logitcache.open(url)
    assert len(logitcache.open(url, allow_partial=True)) == doc["sequences"]


# --------------------------------------------------------------------------------------------
# The local cache of fetched parts


def test_second_read_uses_the_local_cache(reference: str, tmp_path: Path):
    local = tmp_path / "fetched"
    listed = sum(len(p.files) for p in logitcache.open(reference).manifest.parts)
    before = mirror.FETCH_STATS["files"]
    first = list(logitcache.open(reference, cache_dir=local))
    assert mirror.FETCH_STATS["files"] - before == listed  # every file downloaded once
    again = mirror.FETCH_STATS["files"]
    second = list(logitcache.open(reference, cache_dir=local))  # a new epoch, a new process view
    assert mirror.FETCH_STATS["files"] == again, "the second epoch downloaded again"
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.target_ids, b.target_ids)


def test_local_cache_is_bounded_least_recently_used_first(reference: str, tmp_path: Path):
    local = tmp_path / "small"
    cache = logitcache.open(reference, cache_dir=local)
    limit = 3 * max(sum(cache.mirror.store.list_files(f"parts/{p.name}").values())
                    for p in cache.manifest.parts)  # fmt: skip
    cache.mirror.size_limit = limit
    expected = list(logitcache.open(reference))
    assert [s.input_ids.tolist() for s in cache] == [s.input_ids.tolist() for s in expected]
    entries = [d for d in (local / "parts").iterdir()]
    sizes = [sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) for d in entries]
    assert sum(sizes) <= limit + max(sizes) and len(entries) < cache.num_parts
    # the most recently used parts are the ones kept
    keep = {cache.mirror.key(p) for p in cache.manifest.parts[-len(entries) :]}
    assert {d.name for d in entries} == keep


def test_a_changed_object_is_refused_by_sha256_and_named_by_verify(
    fs, reference: str, tmp_path: Path
):
    url = f"s3://{BUCKET}/tampered"
    fs.copy(f"{BUCKET}/reference", f"{BUCKET}/tampered", recursive=True)
    rel = "parts/part-000001/target_logprobs/c/0/0"
    data = bytearray(fs.cat_file(f"{BUCKET}/tampered/{rel}"))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(f"{BUCKET}/tampered/{rel}", bytes(data))
    # A fresh local cache: the one of this module holds a good copy of the same content (its
    # entries are keyed by the manifest's sha256s), which a reader would rightly use.
    cache = logitcache.open(url, cache_dir=tmp_path)
    with pytest.raises(CorruptCacheError, match="sha256 does not match"):
        cache.read_part(1)
    report = verify(cache)
    assert [p for p in report.problems if "sha256" in p] == [
        f"{url}/{rel}: sha256 does not match the manifest (the object was changed or "
        "corrupted). Re-upload the cache or re-dump the part."
    ]


# --------------------------------------------------------------------------------------------
# Errors: unreachable store, empty location, merge by reference


def test_unreachable_store_fails_after_retries_with_exit_2(runs):
    closed, future = runs["unreachable"]
    proc = future.result()
    assert proc.returncode == 2, describe(proc)
    assert "Traceback" not in proc.stderr
    message = flat(proc.stderr)
    assert message.startswith(f"logitcache: error: cannot read {REFERENCE}/manifest.json")
    assert "after 3 attempts" in message and closed in message


def test_anonymous_read_of_a_public_bucket(fs, reference: str, tmp_path: Path):
    """`?anon` (or LOGITCACHE_ANON=1): unsigned requests, which a public bucket accepts and a
    private one refuses with a message that says what to do."""
    import boto3

    fs.mkdir("public")
    public = "s3://public/cache"
    fs.copy(f"{BUCKET}/reference", "public/cache", recursive=True)
    boto3.client("s3").put_bucket_policy(Bucket="public", Policy=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": "*",
                       "Action": ["s3:GetObject", "s3:ListBucket"],
                       "Resource": ["arn:aws:s3:::public", "arn:aws:s3:::public/*"]}],
    }))  # fmt: skip
    cache = logitcache.open(f"{public}?anon", cache_dir=tmp_path)
    assert cache.mirror.store.options.get("anon") is True and cache.root == public
    assert [s.input_ids.tolist() for s in cache] == [
        s.input_ids.tolist() for s in logitcache.open(reference)
    ]
    with environment({"LOGITCACHE_ANON": "1"}):
        assert len(logitcache.open(public, cache_dir=tmp_path)) == len(cache)
        with pytest.raises(LogitCacheError, match=r"was refused .* LOGITCACHE_ANON=1"):
            logitcache.open(reference, cache_dir=tmp_path)  # private: anonymous is refused
    with pytest.raises(LogitCacheError, match="unknown URL option 'region'"):
        logitcache.open(f"{reference}?region=x")


def test_no_cache_at_url_and_merge_by_reference_to_s3_are_refused(s3, reference: str):
    with pytest.raises(LogitCacheError, match="no cache at s3://caches/nothing-here"):
        logitcache.open(f"s3://{BUCKET}/nothing-here")
    with pytest.raises(LogitCacheError, match="Pass --copy"):
        merge(f"s3://{BUCKET}/merged-ref", [reference])


def test_merge_and_export_within_s3(s3, tmp_path: Path):
    """Caches written to S3 by the remote writer, merged with --copy (server-side copies in the
    bucket), verified there, and exported to a local Parquet cache."""
    a, b = f"s3://{BUCKET}/shard-a", f"s3://{BUCKET}/shard-b"
    make_cache(a, sequences=9, seed=1, data="a" * 64, source="shard-a")
    make_cache(b, sequences=6, seed=2, data="b" * 64, source="shard-b")
    merged_url = f"s3://{BUCKET}/merged"
    merge(merged_url, [a, b], copy=True, cache_dir=tmp_path / "fetched")
    merged = logitcache.open(merged_url, cache_dir=tmp_path / "fetched")
    assert [i.cache for i in merged.manifest.merged_from] == [a, b]
    assert verify(merged).ok
    exported = tmp_path / "exported"
    export(merged_url, exported, backend="parquet", cache_dir=tmp_path / "fetched")
    expected = [s.target_ids.tolist() for s in (*logitcache.open(a), *logitcache.open(b))]
    assert [s.target_ids.tolist() for s in logitcache.open(exported)] == expected


@pytest.mark.slow
def test_transient_outage_is_survived_by_retries(s3):
    """The store is down at first and comes up during the retries: the read succeeds."""
    port = free_port()
    started, done = concurrent.futures.Future(), threading.Event()

    def late_server() -> None:
        time.sleep(2.0)
        with moto_server(port) as server:
            started.set_result(server)
            done.wait(120)  # outlives the read below

    thread = concurrent.futures.ThreadPoolExecutor(1)
    thread.submit(late_server)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "LOGITCACHE_RETRIES": "12",
           "LOGITCACHE_RETRY_WAIT": "0.2"}  # fmt: skip
    t0 = time.monotonic()
    try:
        with environment(env):
            store = stores.RemoteStore(f"s3://{BUCKET}/late")
            assert store.read_bytes("manifest.json") is None  # reached, after failed attempts
        assert time.monotonic() - t0 >= 2.0 and started.done()
    finally:
        done.set()
    thread.shutdown(wait=True)
