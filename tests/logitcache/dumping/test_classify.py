"""`dump --task classification`: classifier caches from arrays, image folders and Parquet, their
views replayed exactly by the trainer, and the bad inputs a classification dump refuses."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import logitcache
from logitcache import DumpOptions, dump
from logitcache.examples.load import load_examples
from logitcache.examples.views import ViewSpec, apply_views, draw_views
from tests.logitcache.classifiers import CLASSES, cnn, rgb_cnn
from tests.logitcache.dump_helpers import describe, flat, run_cli
from trainer.classify import cached_batches, load_rows

CNN = "tests.logitcache.classifiers:cnn"


def pixels(n: int = 6, seed: int = 0, size: tuple[int, int] = (8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *size), dtype=np.uint8)


def classify(data: Path, out: Path, **options: object) -> logitcache.Cache:
    opts = {"teacher_factory": CNN, "targets": "full", "progress": False, "device": "cpu"}
    dump(DumpOptions(data=str(data), out=str(out), task="classification", **opts | options))
    return logitcache.open(out)


def teacher_logprobs(images: np.ndarray, model: torch.nn.Module | None = None) -> np.ndarray:
    """log_softmax of the teacher on (N, H, W) or (N, C, H, W) uint8 images, directly."""
    x = torch.from_numpy(images).float() / 255
    x = x[:, None] if x.dim() == 3 else x
    with torch.no_grad():
        return torch.log_softmax((model or cnn())(x).float(), -1).numpy()


def rows(cache: logitcache.Cache) -> logitcache.PartArrays:
    parts = [cache.read_decoded(i) for i in range(cache.num_parts)]
    return logitcache.PartArrays(
        None, np.concatenate([p.target_ids for p in parts]),
        np.concatenate([p.target_logprobs for p in parts]),
        np.zeros(1), labels=None if parts[0].labels is None else np.concatenate([p.labels for p in parts]),
    )  # fmt: skip


def full_distribution(arrays: logitcache.PartArrays) -> np.ndarray:
    """(rows, classes) log-probs in class order from the decoded (descending) view."""
    out = np.empty_like(arrays.target_logprobs)
    np.put_along_axis(out, arrays.target_ids, arrays.target_logprobs, axis=-1)
    return out


def test_arrays_dump_one_full_row_per_example_with_its_label(tmp_path: Path) -> None:
    images, labels = pixels(7), np.array([0, 1, 2, 3, 0, 1, 2])
    np.savez(tmp_path / "d.npz", inputs=images, labels=labels)
    cache = classify(tmp_path / "d.npz", tmp_path / "c", part_tokens=3)
    m = cache.manifest
    assert m.format_version == "1.3" and m.task is not None
    assert (m.task.kind, m.task.input, m.task.shape, m.task.labels, m.task.views) == (
        "classification", "image", [1, 8, 8], True, 0,
    )  # fmt: skip
    assert (m.sequences, m.tokens, len(m.parts), m.teacher.vocab_size) == (7, 7, 3, CLASSES)
    assert (m.targets.k, m.targets.logprob_dtype) == (CLASSES, "float32")
    got = rows(cache)
    assert got.labels.tolist() == labels.tolist()
    np.testing.assert_allclose(full_distribution(got), teacher_logprobs(images), atol=1e-6)
    assert logitcache.verify(cache).problems == []
    with pytest.raises(logitcache.LogitCacheError, match="classification cache"):
        cache[0]


def test_topk_and_sampled_classification_targets(tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", pixels(5))  # no labels: the parts hold none
    top = classify(tmp_path / "d.npy", tmp_path / "top", targets="topk", top_k=2)
    assert not top.manifest.task.labels and top.read_decoded(0).labels is None
    expected = np.sort(teacher_logprobs(pixels(5)), -1)[:, ::-1][:, :2]
    np.testing.assert_allclose(rows(top).target_logprobs, expected, atol=1e-3)
    sampled = classify(tmp_path / "d.npy", tmp_path / "s", targets="sample", samples=16)
    probs = np.exp(rows(sampled).target_logprobs)
    assert np.allclose(probs.sum(-1), 1.0) and sampled.manifest.targets.kind == "sample"


def write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_dump_labels_by_sorted_class_folder(tmp_path: Path) -> None:
    images = pixels(5, seed=1)
    for i, name in enumerate(["b/1.png", "a/2.png", "b/0.png", "c/x.png", "a/1.png"]):
        write_png(tmp_path / "imgs" / name, images[i])
    cache = classify(tmp_path / "imgs", tmp_path / "c")
    order = [4, 1, 2, 0, 3]  # a/1, a/2, b/0, b/1, c/x: classes sorted, files sorted
    assert rows(cache).labels.tolist() == [0, 0, 1, 1, 2]
    np.testing.assert_allclose(
        full_distribution(rows(cache)), teacher_logprobs(images[order]), atol=1e-6
    )
    assert cache.manifest.data.format == "imagefolder"


def test_rgb_folder_with_resize(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    write_png(tmp_path / "imgs/a/0.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    write_png(tmp_path / "imgs/b/0.png", rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    factory = "tests.logitcache.classifiers:rgb_cnn"
    cache = classify(tmp_path / "imgs", tmp_path / "c", teacher_factory=factory, resize=(8, 8))
    assert cache.manifest.task.shape == [3, 8, 8] and cache.manifest.sequences == 2
    examples = load_examples(tmp_path / "imgs", resize=(8, 8))
    with torch.no_grad():
        want = torch.log_softmax(rgb_cnn()(examples.inputs), -1).numpy()
    np.testing.assert_allclose(full_distribution(rows(cache)), want, atol=1e-6)


def test_parquet_image_column_dumps_like_the_same_arrays(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    images, labels = pixels(4, seed=3), [3, 2, 1, 0]
    encoded = []
    for a in images:
        buffer = io.BytesIO()
        Image.fromarray(a).save(buffer, format="PNG")
        encoded.append({"bytes": buffer.getvalue(), "path": None})  # datasets' Image feature
    pq.write_table(pa.table({"image": encoded, "label": labels}), tmp_path / "d.parquet")
    np.savez(tmp_path / "d.npz", inputs=images, labels=np.array(labels))
    table = rows(classify(tmp_path / "d.parquet", tmp_path / "p"))
    arrays = rows(classify(tmp_path / "d.npz", tmp_path / "n"))
    assert table.labels.tolist() == labels == arrays.labels.tolist()
    np.testing.assert_array_equal(table.target_logprobs, arrays.target_logprobs)


def test_views_replay_the_teachers_exact_inputs(tmp_path: Path, monkeypatch) -> None:
    """The recording teacher saves every batch it is fed; the trainer's batches, built from the
    stored views, must be those very tensors, bit for bit."""
    record = tmp_path / "record"
    record.mkdir()
    monkeypatch.setenv("LOGITCACHE_TEST_RECORD", str(record))
    np.savez(tmp_path / "d.npz", inputs=pixels(5), labels=np.arange(5) % CLASSES)
    cache = classify(
        tmp_path / "d.npz", tmp_path / "c", views=4, crop_scale=(0.3, 1.0), batch_size=2,
        teacher_factory="tests.logitcache.classifiers:recording_cnn",
    )  # fmt: skip
    seen = torch.cat([torch.load(p) for p in sorted(record.iterdir())])[1:]  # [0]: the probe
    examples = load_examples(tmp_path / "d.npz")
    table = load_rows(cache, examples)
    assert table.views is not None and table.views.shape == (20, 5)
    assert table.example.tolist() == [i for i in range(5) for _ in range(4)]
    replayed = cached_batches(table, examples)(torch.arange(20), 0).inputs
    assert torch.equal(replayed, seen)
    boxes = table.views.numpy()
    assert len({tuple(b) for b in boxes}) > 10  # the views differ
    assert set(boxes[:, 4].tolist()) == {0, 1}
    spec = ViewSpec(4, (0.3, 1.0), (3 / 4, 4 / 3), True, 0)
    np.testing.assert_array_equal(boxes[8:12], draw_views(spec, 2, 8, 8))  # (seed, example)
    assert logitcache.verify(cache).problems == []


def test_a_view_is_the_reference_crop() -> None:
    """A whole-image box is the image itself (mirrored when flipped); a smaller box is its
    pixels resized bilinearly with half-pixel centres, computed here by hand in numpy."""
    x = torch.rand(2, 1, 8, 8)
    views = torch.tensor([[0, 0, 8, 8, 0], [0, 0, 8, 8, 1]], dtype=torch.int32)
    out = apply_views(x, views)
    assert torch.equal(out[0], x[0]) and torch.equal(out[1], x[1].flip(-1))
    crop = torch.tensor([[2, 3, 4, 4, 0]], dtype=torch.int32)
    want = torch.nn.functional.interpolate(
        x[:1, :, 2:6, 3:7], size=(8, 8), mode="bilinear", align_corners=False
    )
    got = apply_views(x[:1], crop)
    assert torch.equal(got, want)
    np.testing.assert_allclose(got[0, 0].numpy(), bilinear(x[0, 0, 2:6, 3:7].numpy(), 8), atol=1e-6)


def bilinear(src: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel-centre bilinear resize of a square array (align_corners=False), by hand."""
    n = src.shape[0]
    pos = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    lo = np.floor(pos).astype(int)
    hi, frac = np.minimum(lo + 1, n - 1), pos - np.floor(pos)
    rows = src[lo] * (1 - frac)[:, None] + src[hi] * frac[:, None]
    return rows[:, lo] * (1 - frac)[None] + rows[:, hi] * frac[None]


def test_views_are_drawn_inside_the_image_whatever_the_parameters() -> None:
    for spec in (ViewSpec(50, (0.08, 1.0)), ViewSpec(50, (0.9, 1.0), (0.2, 5.0), False, 3)):
        for example in range(5):
            v = draw_views(spec, example, 7, 11)
            assert (v[:, 0] >= 0).all() and (v[:, 0] + v[:, 2] <= 7).all()
            assert (v[:, 1] >= 0).all() and (v[:, 1] + v[:, 3] <= 11).all()
            assert ((v[:, 2:4] >= 1).all() and spec.flip) or (v[:, 4] == 0).all()


# ---------------------------------------------------------------------------------------------
# bad input: exit 2, one clear line, nothing written


def refused(tmp_path: Path, *flags: object) -> str:
    out = tmp_path / "out"
    proc = run_cli("dump", "--task", "classification", "--teacher-factory", CNN,
                   "--out", out, *flags)  # fmt: skip
    assert proc.returncode == 2, describe(proc)
    assert "Traceback" not in proc.stderr and not out.exists(), describe(proc)
    return flat(proc.stderr)


def test_a_folder_without_class_folders_is_refused(tmp_path: Path) -> None:
    write_png(tmp_path / "imgs/0.png", pixels(1)[0])
    message = refused(tmp_path, "--data", tmp_path / "imgs")
    assert "holds no class folders" in message and "one subfolder per class" in message


def test_images_of_mixed_sizes_without_resize_are_refused(tmp_path: Path) -> None:
    write_png(tmp_path / "imgs/a/0.png", pixels(1)[0])
    write_png(tmp_path / "imgs/b/0.png", pixels(1, size=(6, 9))[0])
    message = refused(tmp_path, "--data", tmp_path / "imgs")
    assert "mixed sizes" in message and "--resize" in message and "9x6" in message


def test_labels_out_of_range_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", inputs=pixels(3), labels=np.array([0, CLASSES, 1]))
    message = refused(tmp_path, "--data", tmp_path / "d.npz")
    assert f"label {CLASSES} of example 1 is out of range" in message
    assert f"{CLASSES} classes" in message


def test_a_teacher_that_is_no_classifier_and_bad_view_flags_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", inputs=pixels(3))
    data = ("--data", tmp_path / "d.npz")
    assert "--crop-scale 0.0,1.0 must be MIN,MAX" in refused(
        tmp_path, *data, "--views", "2", "--crop-scale", "0,1"
    )
    assert "is not two numbers" in refused(tmp_path, *data, "--resize", "8")
    proc = run_cli("dump", "--task", "classification", *data, "--out", tmp_path / "o",
                   "--teacher-factory", "tests.logitcache.classifiers:sequence_model")  # fmt: skip
    assert proc.returncode == 2 and "(batch, classes) logits" in flat(proc.stderr), describe(proc)


def test_the_cli_writes_full_targets_by_default_and_reports_examples(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", inputs=pixels(4), labels=np.arange(4))
    proc = run_cli("dump", "--task", "classification", "--teacher-factory", CNN, "--data",
                   tmp_path / "d.npz", "--out", tmp_path / "c", "--views", "3")  # fmt: skip
    assert proc.returncode == 0, describe(proc)
    assert "4 examples, 12 target rows (3 per example), 4 classes" in flat(proc.stdout)
    manifest = json.loads((tmp_path / "c/manifest.json").read_text())
    assert manifest["targets"]["k"] == CLASSES and manifest["task"]["augment"] == "crop"
    # the CLI's defaults are DumpOptions' exactly (a rounded --crop-ratio would make the two
    # caches' task records differ, and merge would refuse to join them)
    api = classify(tmp_path / "d.npz", tmp_path / "api", views=3)
    assert manifest["task"] == json.loads(api.manifest.to_json())["task"]
