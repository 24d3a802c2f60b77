"""Classification caches split and joined: `dump --task classification --shard I/N` jobs merged
in shard order are the whole dump (parts, decoded targets, labels and views), verified and
trainable against the whole --data; `merge` of classification caches keeps the task record and
refuses caches of other settings or teachers, a missing shard and shards out of order; torchrun
is refused with the way to split a classification dump instead. A shard job killed mid-run
resumes its own slice when rerun."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

import logitcache
from logitcache.examples.load import load_examples
from tests.cli import REPO, cli_env
from tests.logitcache.dump_helpers import cli_command, describe, flat, run_cli
from tests.logitcache.dumping.test_classify import CNN
from tests.logitcache.dumping.test_classify import classify as dump_classifier
from trainer.classify import load_rows

#: 10 examples, 2 views each, 3 examples per part: 4 parts, so 3 shards get 1, 1 and 2 parts.
SETTINGS = {"views": 2, "part_tokens": 6, "crop_ratio": (0.5, 2.0)}
DECODED = ("target_ids", "target_logprobs", "labels", "views", "seq_offsets")


def classify(data: Path, out: Path, **options: object) -> logitcache.Cache:
    return dump_classifier(data, out, **SETTINGS | options)


def examples(path: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, inputs=rng.integers(0, 256, (n, 8, 8), dtype=np.uint8),
             labels=rng.integers(0, 4, n))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def dumps(tmp_path_factory) -> dict[str, Path]:
    """The whole dump of d.npz, its three --shard caches (the last one killed and resumed), and
    a whole dump of other data."""
    root = tmp_path_factory.mktemp("cls_shards")
    data = examples(root / "d.npz", 10, 0)
    out = {"data": data, "whole": root / "whole", "other": root / "other"}
    classify(data, out["whole"])
    for i in range(3):
        out[f"s{i}"] = root / f"s{i}"
    for i in range(2):
        classify(data, out[f"s{i}"], shard=f"{i}/3")
    # the last shard (2 parts) as a real job, SIGKILLed after its first part, then rerun
    command = cli_command("dump", "--task", "classification", "--teacher-factory", CNN,
                          "--targets", "full", "--views", "2", "--part-tokens", "6",
                          "--crop-ratio", "0.5,2", "--data",
                          data, "--out", out["s2"], "--shard", "2/3")  # fmt: skip
    killed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300,
                            env=cli_env(LOGITCACHE_FAULTS="kill@part_committed#1"))  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, describe(killed)
    assert logitcache.open(out["s2"], allow_partial=True).num_parts == 1
    again = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300,
                           env=cli_env())  # fmt: skip
    assert again.returncode == 0 and "resumed after 1" in flat(again.stdout), describe(again)
    classify(examples(root / "e.npz", 6, 1), out["other"])
    return out


def test_shards_merged_in_order_are_the_whole_dump(dumps, tmp_path):
    whole = logitcache.open(dumps["whole"])
    shards = [logitcache.open(dumps[f"s{i}"]) for i in range(3)]
    assert [s.num_parts for s in shards] == [1, 1, 2]
    assert [s.manifest.data.source for s in shards] == [
        f"{dumps['data']} [shard {i}/3]" for i in range(3)
    ]
    proc = run_cli("merge", tmp_path / "m", *(dumps[f"s{i}"] for i in range(3)))
    assert proc.returncode == 0, describe(proc)
    assert "10 examples, 20 target rows, 4 parts" in flat(proc.stdout)
    merged = logitcache.open(tmp_path / "m")
    m, w = merged.manifest, whole.manifest
    assert m.parts == w.parts  # names, counts and every file's sha256
    assert (m.sequences, m.tokens, m.task, m.teacher, m.targets) == (
        w.sequences, w.tokens, w.task, w.teacher, w.targets,
    )  # fmt: skip
    for got, want in zip(merged.iter_parts(), whole.iter_parts(), strict=True):
        for name in DECODED:
            assert np.array_equal(getattr(got, name), getattr(want, name)), name
    assert logitcache.verify(merged).problems == []
    # the merge holds the whole data: its rows are the whole dump's, example for example
    data = load_examples(str(dumps["data"]))
    assert merged.holds_data(data.info) and not shards[0].holds_data(data.info)
    got, want = load_rows(merged, data), load_rows(whole, data)
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(a.numpy(), b.numpy())


def test_a_shard_missing_or_out_of_order_is_refused(dumps, tmp_path):
    missing = run_cli("merge", tmp_path / "m", dumps["s0"], dumps["s2"])
    assert missing.returncode == 2, describe(missing)
    assert "shard 1/3 of" in flat(missing.stderr) and "is missing" in flat(missing.stderr)
    swapped = run_cli("merge", tmp_path / "m", dumps["s1"], dumps["s0"], dumps["s2"])
    assert swapped.returncode == 2 and "in shard order" in flat(swapped.stderr), swapped.stderr
    assert not (tmp_path / "m").exists()


def test_shards_of_other_settings_or_another_teacher_are_refused(dumps, tmp_path):
    views = classify(dumps["data"], tmp_path / "views3", shard="1/3", views=3)
    teacher = classify(dumps["data"], tmp_path / "teacher", shard="1/3",
                       teacher_factory="tests.logitcache.classifiers:other_cnn")  # fmt: skip
    for odd, difference in ((views, "task.views: "), (teacher, "teacher.weights_sha256: ")):
        proc = run_cli("merge", tmp_path / "m", dumps["s0"], odd.root, dumps["s2"])
        assert proc.returncode == 2, describe(proc)
        assert "cannot merge caches made with different settings" in flat(proc.stderr)
        assert difference in flat(proc.stderr), proc.stderr
        assert "Traceback" not in proc.stderr


def test_merge_of_two_classification_caches_of_other_data(dumps, tmp_path):
    proc = run_cli("merge", tmp_path / "m", dumps["whole"], dumps["other"])
    assert proc.returncode == 0, describe(proc)
    merged = logitcache.open(tmp_path / "m")
    a, b = logitcache.open(dumps["whole"]), logitcache.open(dumps["other"])
    m = merged.manifest
    assert (m.sequences, m.tokens, m.task) == (16, 32, a.manifest.task)
    assert m.data.documents == 16 and [i.cache for i in m.merged_from] == [
        str(dumps["whole"]),
        str(dumps["other"]),
    ]
    for name in ("labels", "views", "target_logprobs"):
        got = np.concatenate([getattr(p, name) for p in merged.iter_parts()])
        want = np.concatenate([getattr(p, name) for c in (a, b) for p in c.iter_parts()])
        assert np.array_equal(got, want), name
    assert logitcache.verify(merged).problems == []
    # it holds neither data whole, and the trainer says so
    with pytest.raises(logitcache.LogitCacheError, match="It merges 2 caches"):
        load_rows(merged, load_examples(str(dumps["data"])))
    # a cache of other task settings (no views) is refused, naming the difference
    classify(dumps["data"], tmp_path / "plain", views=0)
    proc = run_cli("merge", tmp_path / "m2", dumps["other"], tmp_path / "plain")
    assert proc.returncode == 2 and "task.views: " in flat(proc.stderr), proc.stderr


def test_torchrun_is_refused_with_the_way_to_shard(dumps, tmp_path):
    command = cli_command("dump", "--task", "classification", "--teacher-factory", CNN, "--data",
                          dumps["data"], "--out", tmp_path / "c")  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=cli_env(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0"))  # fmt: skip
    assert proc.returncode == 2, describe(proc)
    assert "does not run under torchrun" in flat(proc.stderr) and "--shard I/N" in flat(proc.stderr)
    assert not (tmp_path / "c").exists()
