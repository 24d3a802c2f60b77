"""`logitcache ensemble OUT CACHE...` over classification caches: full distributions average
exactly (the same targets as the one-pass ensemble dump, labels kept); caches of another task
or another label space are refused, and so is an OUT that is or lies inside an input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import logitcache
from logitcache import DumpOptions, dump
from logitcache.errors import LogitCacheError
from tests.logitcache.dump_helpers import describe, flat, run_cli
from tests.logitcache.textcls_helpers import SEQ_LEN, TextTask, build_text_task

FULL = {"task": "classification", "targets": "full", "seq_len": SEQ_LEN, "progress": False,
        "device": "cpu", "part_tokens": 7}  # fmt: skip


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory, one_torch_thread) -> TextTask:
    return build_text_task(tmp_path_factory.mktemp("textcls"), per_class=6)


@pytest.fixture(scope="module")
def caches(task: TextTask, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One cache per teacher over the same snippets."""
    root = tmp_path_factory.mktemp("caches")
    teachers = {"a": task.teacher, "b": task.other_seed, "renamed": task.other_names}
    for name, teacher in teachers.items():
        dump(DumpOptions(data=str(task.train), out=str(root / name), teacher=str(teacher), **FULL))
    return {name: root / name for name in teachers}


def rows(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(rows, classes) log-probs in class order, and the labels."""
    cache = logitcache.open(path)
    parts = [cache.read_decoded(i) for i in range(cache.num_parts)]
    ids = np.concatenate([p.target_ids for p in parts])
    out = np.empty(ids.shape, dtype=np.float64)
    np.put_along_axis(out, ids, np.concatenate([p.target_logprobs for p in parts]), axis=-1)
    return out, np.concatenate([p.labels for p in parts])


def log_normalized(x: np.ndarray) -> np.ndarray:
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_combined_classification_caches_are_the_exact_average(
    caches: dict[str, Path], task: TextTask, tmp_path: Path, mode: str
) -> None:
    m = logitcache.ensemble(tmp_path / "e", [caches["a"], caches["b"]], mode=mode,
                            weights=[3, 1])  # fmt: skip
    assert m.task is not None and m.task.input == "text" and m.ensemble is not None
    (a, labels), (b, _) = rows(caches["a"]), rows(caches["b"])
    if mode == "logits":
        want = log_normalized(0.75 * a + 0.25 * b)
    else:
        want = np.log(0.75 * np.exp(a) + 0.25 * np.exp(b))
    got, got_labels = rows(tmp_path / "e")
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got_labels.tolist() == labels.tolist()
    assert logitcache.verify(logitcache.open(tmp_path / "e")).problems == []
    # the same targets as the teachers' ensemble dumped in one pass
    dump(DumpOptions(data=str(task.train), out=str(tmp_path / "one"), ensemble=mode,
                     teachers=[str(task.teacher), str(task.other_seed)], weights=[3, 1], **FULL))  # fmt: skip
    np.testing.assert_allclose(rows(tmp_path / "one")[0], got, atol=1e-5)


def test_caches_of_another_label_space_or_task_are_refused(
    caches: dict[str, Path], small_caches: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(LogitCacheError, match="different label spaces") as exc:
        logitcache.ensemble(tmp_path / "x", [caches["a"], caches["renamed"]], mode="probs")
    assert "'asyncio'" in str(exc.value) and "'other0'" in str(exc.value)
    proc = run_cli("ensemble", tmp_path / "y", caches["a"], small_caches["zarr"], "--mode", "probs")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, describe(proc)
    assert "is a causal-LM cache" in flat(proc.stderr) and "classification cache" in flat(
        proc.stderr
    )
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_an_out_that_is_or_lies_inside_an_input_is_refused(caches: dict[str, Path]) -> None:
    before = sorted(p.name for p in caches["a"].iterdir())
    for out, relation in ((caches["a"], " is the input"), (caches["a"] / "sub", "lies inside")):
        proc = run_cli("ensemble", out, caches["a"], caches["b"], "--mode", "probs", "--overwrite")
        assert proc.returncode == 2 and relation in flat(proc.stderr), describe(proc)
    assert sorted(p.name for p in caches["a"].iterdir()) == before
    assert logitcache.verify(logitcache.open(caches["a"])).problems == []
