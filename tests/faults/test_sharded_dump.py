"""A dump split over processes equals the single-process dump of the same data.

* ``torchrun --nproc-per-node 2 -m logitcache dump`` (gloo, CPU): byte for byte the same cache
  (manifest but `created`, every part file), and nothing left of the ranks' own caches.
* ``--shard 0/2`` and ``--shard 1/2`` as independent jobs, the second SIGKILLed after its 3rd
  part and rerun alone (it resumes its own slice), then ``logitcache merge``: the same parts,
  sequence by sequence and file by file, in the same order.
* (slow) both torchrun ranks killed mid-run, the same torchrun command rerun: the same cache.
"""

from __future__ import annotations

import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import logitcache
from tests.faults.helpers import (
    assert_same_cache,
    describe,
    dump_command,
    flat,
    manifest,
    run,
    run_main,
)


def torchrun_dump(teacher: Path, data: Path, out: Path, **env: str):
    command = dump_command(teacher, data, out)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--standalone", "-m", "logitcache"]  # fmt: skip
    return run([*launcher, *command[3:]], timeout=600, **env)


@pytest.fixture(scope="module")
def split_dumps(tmp_path_factory, tiny_teacher_dir, dump_corpus) -> dict:
    """The torchrun dump and the two --shard jobs, all at once."""
    root = tmp_path_factory.mktemp("split")
    outs = {"torchrun": root / "torchrun", 0: root / "shard0", 1: root / "shard1"}
    with ThreadPoolExecutor(max_workers=3) as pool:
        jobs = {
            "torchrun": pool.submit(torchrun_dump, tiny_teacher_dir, dump_corpus, outs["torchrun"]),
            0: pool.submit(run, dump_command(tiny_teacher_dir, dump_corpus, outs[0], "--shard",
                                             "0/2")),
            1: pool.submit(run, dump_command(tiny_teacher_dir, dump_corpus, outs[1], "--shard",
                                             "1/2"), LOGITCACHE_FAULTS="kill@part_committed#3"),
        }  # fmt: skip
        return {"outs": outs, **{key: job.result() for key, job in jobs.items()}}


def test_a_two_process_torchrun_dump_equals_the_single_process_dump(split_dumps, dump_reference):
    proc, out = split_dumps["torchrun"], split_dumps["outs"]["torchrun"]
    assert proc.returncode == 0, describe(proc)
    assert flat(proc.stdout).count("wrote ") == 1  # rank 0 reports for the job
    assert_same_cache(out, dump_reference)  # ranks/ is gone, and so is the lock


def test_shard_jobs_one_killed_and_rerun_then_merge_equal_the_single_process_dump(
    split_dumps, dump_reference, tiny_teacher_dir, dump_corpus, tmp_path, capsys
):
    from logitcache.cli.commands import main
    from logitcache.write.merge import merge

    outs = split_dumps["outs"]
    assert split_dumps[0].returncode == 0, describe(split_dumps[0])
    killed = split_dumps[1]
    assert killed.returncode == -signal.SIGKILL, describe(killed)
    assert len(manifest(outs[1])["parts"]) == 3
    # The dead job alone, the same command again: it resumes its own slice.
    command = dump_command(tiny_teacher_dir, dump_corpus, outs[1], "--shard", "1/2")
    code, stdout, stderr = run_main(main, ["logitcache", *command[3:]], capsys)
    assert code == 0, stderr
    assert "resumed after 3 committed parts" in flat(stdout)

    reference = logitcache.open(dump_reference)
    shards = [logitcache.open(outs[i]) for i in (0, 1)]
    assert [len(s.manifest.parts) for s in shards] == [21, 22]  # 43 parts, contiguous halves
    for i, s in enumerate(shards):
        assert s.manifest.data.source == f"{dump_corpus} [shard {i}/2]"
        assert s.manifest.data.fingerprint != reference.manifest.data.fingerprint

    merged = merge(tmp_path / "merged", [outs[0], outs[1]])
    assert [p for p in merged.parts] == reference.manifest.parts  # names, counts, every sha256
    assert (merged.sequences, merged.tokens) == (reference.manifest.sequences,
                                                 reference.manifest.tokens)  # fmt: skip
    got = logitcache.open(tmp_path / "merged")
    for a, b in zip(got.iter_parts(), reference.iter_parts(), strict=True):
        for name in ("input_ids", "target_ids", "target_logprobs", "seq_offsets"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
    for part in reference.manifest.parts:
        for rel in part.files:
            assert (tmp_path / "merged" / "parts" / rel).read_bytes() == (
                dump_reference / "parts" / rel
            ).read_bytes()


def test_bad_shard_specifications_are_refused(tiny_teacher_dir, dump_corpus, tmp_path, capsys):
    from logitcache.cli.commands import main

    for spec in ("2/2", "1", "-1/3", "a/b"):
        command = dump_command(tiny_teacher_dir, dump_corpus, tmp_path / "c", "--shard", spec)
        code, _, stderr = run_main(main, ["logitcache", *command[3:]], capsys)
        assert code == 2 and "--shard must be I/N with 0 <= I < N" in flat(stderr), stderr
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_torchrun_ranks_killed_then_the_same_command_again(
    tmp_path, tiny_teacher_dir, dump_corpus, dump_reference
):
    out = tmp_path / "cache"
    first = torchrun_dump(
        tiny_teacher_dir, dump_corpus, out, LOGITCACHE_FAULTS="kill@part_committed#4"
    )
    assert first.returncode != 0, describe(first)
    ranks = sorted((out / "ranks").iterdir())
    committed = [len(manifest(r)["parts"]) for r in ranks]
    assert max(committed) == 4, committed  # the first to die; torchrun then stops the other
    assert manifest(out)["parts"] == []  # nothing committed at the top yet
    again = torchrun_dump(tiny_teacher_dir, dump_corpus, out)
    assert again.returncode == 0, describe(again)
    assert_same_cache(out, dump_reference)


@pytest.mark.slow
def test_an_empty_shard_is_an_empty_cache_that_merges(
    tmp_path, tiny_teacher_dir, dump_corpus, dump_reference, capsys
):
    """More jobs than parts: the extra jobs write complete caches with no part."""
    from logitcache.cli.commands import main

    command = dump_command(tiny_teacher_dir, dump_corpus, tmp_path / "c", "--shard", "0/64")
    code, _, stderr = run_main(main, ["logitcache", *command[3:]], capsys)
    assert code == 0, stderr
    m = manifest(tmp_path / "c")
    assert m["complete"] and m["parts"] == []


@pytest.mark.slow
def test_a_torchrun_dump_to_an_object_store(
    tmp_path, tiny_teacher_dir, dump_corpus, dump_reference
):
    """--out s3://... (a real S3 server on 127.0.0.1): the ranks' caches are uploaded under
    ranks/, joined by server-side copies, and removed; the parts are the single-process ones."""
    import json

    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    import s3fs

    from tests.logitcache.s3server import moto_server

    with moto_server() as server:
        fs = s3fs.S3FileSystem(
            key="testing", secret="testing", client_kwargs={"endpoint_url": server.endpoint}
        )
        fs.mkdir("scale")
        proc = torchrun_dump(tiny_teacher_dir, dump_corpus, "s3://scale/cache", **server.env)
        assert proc.returncode == 0, describe(proc)
        got = json.loads(fs.cat("scale/cache/manifest.json"))
        assert not fs.exists("scale/cache/ranks")
        for rel in ("parts/part-000000/input_ids/c/0", "parts/part-000042/zarr.json"):
            assert fs.cat(f"scale/cache/{rel}") == (dump_reference / rel).read_bytes()
    want = manifest(dump_reference)
    got.pop("created"), want.pop("created")
    assert got == want
