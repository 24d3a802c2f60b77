"""The dump's overlap: a pool of writers gives the cache one writer gives, commits in order
whichever part finishes first, and `--profile` accounts for every stage of the journey."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from logitcache.dumping import pipeline
from logitcache.dumping.options import DumpOptions
from logitcache.dumping.prepare import prepare
from logitcache.dumping.profile import STAGES, Profile, render
from logitcache.progress import progress_bar
from logitcache.write.writer import CacheWriter
from tests.logitcache.dump_helpers import describe, dump_in_process, manifest_json, run_cli

#: Several parts (16 sequences of 64 each), so that a pool of 3 has parts in flight at once.
SETTINGS = {"targets": "sample", "samples": 16, "seq_len": 64, "part_tokens": 1024}


def _parts(cache) -> list[dict]:
    return manifest_json(cache)["parts"]


@pytest.mark.parametrize("threads", [2, 5])
def test_a_pool_of_writers_writes_the_bytes_one_writer_writes(
    tmp_path, tiny_teacher_dir, dump_corpus, threads
):
    one = dump_in_process(tiny_teacher_dir, dump_corpus, tmp_path / "one", **SETTINGS)
    pool = dump_in_process(
        tiny_teacher_dir, dump_corpus, tmp_path / "pool", writer_threads=threads, **SETTINGS
    )
    assert len(_parts(one)) >= 6
    assert _parts(pool) == _parts(one)  # names, counts and every file's sha256, in order
    assert not [p.name for p in (pool / "parts").iterdir() if p.name.startswith(".tmp-")]


class _LateFirstWriter(CacheWriter):
    """A real writer whose early parts take longest to stage, so that the pool finishes them
    out of order; records the order of commits."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.commits: list[int] = []
        self.concurrent = 0
        self.most_concurrent = 0
        self._counting = threading.Lock()

    def stage_part(self, arrays, index):
        with self._counting:
            self.concurrent += 1
            self.most_concurrent = max(self.most_concurrent, self.concurrent)
        try:
            time.sleep(0.15 if index % 3 == 0 else 0.0)
            return super().stage_part(arrays, index)
        finally:
            with self._counting:
                self.concurrent -= 1

    def commit_staged(self, staged):
        self.commits.append(staged.index)
        return super().commit_staged(staged)


def test_parts_are_committed_in_order_when_later_ones_finish_first(
    tmp_path, tiny_teacher_dir, dump_corpus
):
    reference = dump_in_process(tiny_teacher_dir, dump_corpus, tmp_path / "ref", **SETTINGS)
    opts = DumpOptions(
        data=str(dump_corpus), out=tmp_path / "cache", teacher=str(tiny_teacher_dir),
        device="cpu", progress=False, writer_threads=3, **SETTINGS,
    )  # fmt: skip
    job = prepare(opts)
    with (
        progress_bar("dump", total=None, unit="docs", enabled=False) as bar,
        _LateFirstWriter(opts.out, job.template) as late,
    ):
        pipeline.run(job, job.sequences(bar), late, bar)
        late.finish()
    assert late.commits == list(range(len(late.commits))) and len(late.commits) >= 6
    assert late.most_concurrent >= 2  # the pool really staged parts side by side
    assert _parts(tmp_path / "cache") == _parts(reference)


def test_the_writer_pool_is_one_thread_beside_a_cpu_teacher():
    assert pipeline.writer_threads(0, torch.device("cpu")) == 1
    assert pipeline.writer_threads(3, torch.device("cpu")) == 3
    assert 1 <= pipeline.writer_threads(0, torch.device("cuda", 0)) <= 4


def test_profile_covers_every_stage_and_no_thread_exceeds_the_wall(
    tmp_path, tiny_teacher_dir, dump_corpus
):
    summary = pipeline.dump(
        DumpOptions(
            data=str(dump_corpus), out=tmp_path / "cache", teacher=str(tiny_teacher_dir),
            device="cpu", progress=False, profile=True, writer_threads=2, **SETTINGS,
        )
    )  # fmt: skip
    report = summary.profile
    assert report is not None
    rows = {(r["thread"], r["stage"]): r["seconds"] for r in report["stages"]}
    assert set(rows) == {(thread, stage) for thread, stage, _ in STAGES}  # no device rows on CPU
    for busy in [("teacher", "forward"), ("teacher", "targets"), ("pool", "encode")]:
        assert rows[busy] > 0, busy
    parts = len(summary.manifest.parts)
    assert report["batches"] == sum(
        -(-p.sequences // 8) for p in summary.manifest.parts
    )  # every batch landed once (batch size 8, batches never span parts)
    assert parts >= 6
    for thread in ("teacher", "writer"):  # one thread's stages never overlap each other
        spent = sum(s for (t, _), s in rows.items() if t == thread)
        assert spent <= report["wall_seconds"] * 1.01, (thread, spent, report["wall_seconds"])


def test_without_profile_nothing_is_timed(tmp_path, tiny_teacher_dir, dump_corpus):
    summary = pipeline.dump(
        DumpOptions(
            data=str(dump_corpus), out=tmp_path / "cache", teacher=str(tiny_teacher_dir),
            device="cpu", progress=False, **SETTINGS,
        )
    )  # fmt: skip
    assert summary.profile is None


def test_render_names_each_stage_with_its_share():
    profile = Profile(enabled=True, device=torch.device("cpu"))
    profile.add("teacher", "forward", 3.0)
    profile.add("pool", "encode", 1.0)
    text = render(profile.report(wall_seconds=4.0))
    assert "4.00 s wall" in text
    assert any("forward" in line and "75.0%" in line for line in text.splitlines())
    assert any("encode" in line and "25.0%" in line for line in text.splitlines())


def test_the_cli_prints_the_profile_and_refuses_a_negative_pool(
    tmp_path, tiny_teacher_dir, dump_corpus
):
    common = ["--teacher", tiny_teacher_dir, "--data", dump_corpus, "--seq-len", 64]
    proc = run_cli("dump", *common, "--out", tmp_path / "cache", "--profile")
    assert proc.returncode == 0, describe(proc)
    assert "where the time went (--profile)" in proc.stdout, describe(proc)
    for thread, stage, _ in STAGES:
        assert any(thread in line and f" {stage} " in line for line in proc.stdout.splitlines())
    proc = run_cli("dump", *common, "--out", tmp_path / "bad", "--writer-threads", -1)
    assert proc.returncode == 2, describe(proc)
    assert "--writer-threads must be 0 (auto) or at least 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "bad").exists()
