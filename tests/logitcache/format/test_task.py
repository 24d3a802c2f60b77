"""The format 1.3 `task` record: a classification manifest is checked for consistency when it is
parsed, and its labels and views when a part is decoded."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

import logitcache
from logitcache import DumpOptions, dump
from logitcache.errors import CorruptCacheError
from logitcache.format.parse import parse_manifest
from logitcache.read.decoded import check_values


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> logitcache.Cache:
    root = tmp_path_factory.mktemp("task")
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8), dtype=np.uint8)
    np.savez(root / "d.npz", inputs=images, labels=np.array([0, 1, 2, 3]))
    dump(DumpOptions(data=str(root / "d.npz"), out=str(root / "c"), task="classification",
                     teacher_factory="tests.logitcache.classifiers:cnn", targets="full",
                     views=2, crop_scale=(0.5, 1.0), progress=False, device="cpu"))  # fmt: skip
    return logitcache.open(root / "c")


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        (lambda d: d["task"].update(views=3), "does not match layout.seq_len"),
        (lambda d: d["layout"].update(packing=True), "stored unpacked"),
        (lambda d: d.update(format_version="1.2"), "needs format_version 1.3"),
        (lambda d: d["task"].update(scale=[0.0, 1.0]), "task.scale"),
        (lambda d: d["task"].update(augment=""), "must be 'crop' with views"),
        (lambda d: d["task"].update(kind="regression"), "is not one of"),
        (lambda d: d["parts"][0].update(tokens=7), "rows is not one per view of each example"),
        (lambda d: d["task"].update(shape=[]), "task.shape"),
    ],
)
def test_inconsistent_task_records_are_refused(cache: logitcache.Cache, change, phrase) -> None:
    doc = json.loads(cache.manifest.to_json())
    bad = copy.deepcopy(doc)
    change(bad)
    with pytest.raises(CorruptCacheError, match="inconsistent") as info:
        parse_manifest(json.dumps(bad))
    assert phrase in str(info.value)
    assert parse_manifest(json.dumps(doc)).task == cache.manifest.task


def test_labels_and_views_are_checked_before_any_use(cache: logitcache.Cache) -> None:
    part = cache.read_part(0)
    check_values(cache.manifest, part, "part 0")
    labels = part.labels.copy()
    labels[3] = 4  # a class id past the 4 classes
    with pytest.raises(CorruptCacheError, match="label 4 is >= the vocabulary size 4"):
        check_values(
            cache.manifest, logitcache.PartArrays(**{**part.__dict__, "labels": labels}), "p"
        )
    views = part.views.copy()
    views[5] = [6, 0, 4, 8, 0]  # runs past the bottom of the 8x8 image
    with pytest.raises(CorruptCacheError, match="example 2 of the part, view 1"):
        check_values(
            cache.manifest, logitcache.PartArrays(**{**part.__dict__, "views": views}), "p"
        )
