"""Classification caches (format 1.3) wherever a causal-LM cache goes: dumped straight to
Parquet and equal to the zarr dump (image and text classifiers, full, top-k and sampled targets,
with and without views and labels, an ensemble), exported both ways, read by pyarrow alone, by
`Cache.to_hf_dataset` and from the loopback S3 server; `info`, `stats` and `verify` in examples
and classes; and `export --format axolotl` refusing them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import logitcache
from logitcache import DumpOptions, dump
from logitcache.errors import LogitCacheError
from logitcache.examples.load import load_examples
from logitcache.read import stats as stats_mod
from logitcache.storage import stores
from logitcache.write.remote_writer import open_writer
from tests.logitcache.classifiers import CLASSES
from tests.logitcache.dump_helpers import describe, flat, run_cli
from tests.logitcache.dumping.test_classify import classify, pixels
from tests.logitcache.textcls_helpers import SEQ_LEN, TextTask, build_text_task
from trainer.classify import load_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Image dumps in both backends: (data file, settings). Several parts each.
IMAGE_CASES = {
    "full-views": ("d.npz", {"views": 3, "crop_scale": (0.4, 1.0), "part_tokens": 6}),
    "topk-bare": ("d.npy", {"targets": "topk", "top_k": 2, "part_tokens": 3}),
    "sample-views": ("d.npz", {"targets": "sample", "samples": 16, "views": 2, "part_tokens": 4}),
}
TEXT = {"task": "classification", "targets": "full", "seq_len": SEQ_LEN, "progress": False,
        "device": "cpu", "part_tokens": 7}  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seven 8x8 images with labels (.npz) and the same images without (.npy)."""
    root = tmp_path_factory.mktemp("images")
    np.savez(root / "d.npz", inputs=pixels(7), labels=np.arange(7) % CLASSES)
    np.save(root / "d.npy", pixels(7))
    return root


@pytest.fixture(scope="module", params=sorted(IMAGE_CASES))
def image_pair(request, data: Path, tmp_path_factory) -> dict[str, logitcache.Cache]:
    """One image dump per backend with the same settings."""
    name, options = IMAGE_CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    return {b: classify(data / name, root / b, backend=b, **options) for b in ("zarr", "parquet")}


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> TextTask:
    return build_text_task(tmp_path_factory.mktemp("textcls"), per_class=6)


def assert_same_parts(a: logitcache.Cache, b: logitcache.Cache) -> None:
    """Every part of `a` and `b` holds the same arrays as stored and decodes to the same view."""
    assert [p.sequences for p in a.manifest.parts] == [p.sequences for p in b.manifest.parts]
    for index in range(a.num_parts):
        for read in ("read_part", "read_decoded"):
            one, two = getattr(a, read)(index).arrays(), getattr(b, read)(index).arrays()
            assert one.keys() == two.keys(), read
            for name, values in one.items():
                np.testing.assert_array_equal(values, two[name], err_msg=f"{read} {name}")
                assert values.dtype == two[name].dtype, f"{read} {name}"


def test_a_parquet_dump_holds_what_the_zarr_dump_holds(image_pair, tmp_path: Path) -> None:
    zarr_cache, parquet_cache = image_pair["zarr"], image_pair["parquet"]
    m = parquet_cache.manifest
    assert m.backend == "parquet" and m.task is not None and parquet_cache.num_parts > 1
    assert dataclasses.replace(m, backend="zarr", created="", parts=[]) == dataclasses.replace(
        zarr_cache.manifest, created="", parts=[]
    )
    assert sorted(m.parts[0].files) == [f"{m.parts[0].name}.parquet"]
    assert_same_parts(zarr_cache, parquet_cache)
    for cache in (zarr_cache, parquet_cache):
        assert logitcache.verify(cache).problems == []
    examples = load_examples(m.data.source)  # the trainer's rows: the same from either backend
    rows = load_rows(parquet_cache, examples), load_rows(zarr_cache, examples)
    for got, want in zip(*rows, strict=True):
        assert (got is None and want is None) or torch.equal(got, want)
    proc = run_cli("export", zarr_cache.root, tmp_path / "to-parquet", "--format", "parquet")
    assert proc.returncode == 0, describe(proc)
    counts = f"{m.sequences} examples, {m.tokens} target rows, {len(m.parts)} parts"
    assert counts in flat(proc.stdout), describe(proc)
    logitcache.export(tmp_path / "to-parquet", tmp_path / "to-zarr", backend="zarr")
    for backend in ("parquet", "zarr"):
        exported = logitcache.open(tmp_path / f"to-{backend}")
        assert exported.manifest.backend == backend and exported.manifest.task == m.task
        assert logitcache.verify(exported).problems == []
        assert_same_parts(zarr_cache, exported)


def test_pyarrow_alone_reads_examples_labels_views_and_targets(data: Path, tmp_path: Path):
    """The layout of docs/FORMAT.md section 6, read with nothing but pyarrow."""
    cache = classify(data / "d.npz", tmp_path / "c", backend="parquet", views=3,
                     crop_scale=(0.4, 1.0), part_tokens=12)  # fmt: skip
    labels = np.load(data / "d.npz")["labels"]
    files = [tmp_path / "c/parts" / f"{p.name}.parquet" for p in cache.manifest.parts]
    table = pa.concat_tables(pq.read_table(f) for f in files)
    assert table.schema == pa.schema([
        ("labels", pa.uint8()),
        ("target_ids", pa.list_(pa.list_(pa.uint8(), CLASSES))),
        ("target_logprobs", pa.list_(pa.list_(pa.float32(), CLASSES))),
        ("views", pa.list_(pa.list_(pa.int32(), 5))),
    ])  # fmt: skip
    assert table.num_rows == 7 and table.column("labels").to_pylist() == labels.tolist()
    decoded = [cache.read_decoded(i) for i in range(cache.num_parts)]
    boxes = np.concatenate([p.views for p in decoded])
    for s, row in enumerate(table.to_pylist()):
        assert len(row["target_ids"]) == len(row["views"]) == 3
        assert row["views"] == boxes[3 * s : 3 * s + 3].tolist()
        for ids, logprobs in zip(row["target_ids"], row["target_logprobs"], strict=True):
            assert ids == list(range(CLASSES))  # full: every class, in id order
            assert abs(np.exp(logprobs).sum() - 1) < 1e-5
    want = np.concatenate([p.target_logprobs for p in decoded])  # descending, ids in target_ids
    ids = np.concatenate([p.target_ids for p in decoded])
    stored = np.array([r for row in table.column("target_logprobs").to_pylist() for r in row])
    np.testing.assert_array_equal(np.take_along_axis(stored, ids, axis=1), want)


def test_views_of_one_example_with_different_labels(data: Path, tmp_path: Path) -> None:
    """A zarr part whose views disagree on their example's label: verify names it, and the
    Parquet backend, which keeps one label per example, refuses to export it."""
    source = classify(data / "d.npz", tmp_path / "c", views=2, part_tokens=14)
    arrays = source.read_part(0)
    arrays.labels[1] = (arrays.labels[0] + 1) % CLASSES  # example 0: views 0 and 1 differ
    template = dataclasses.replace(source.manifest, parts=[], sequences=0, tokens=0,
                                   complete=False)  # fmt: skip
    with open_writer(tmp_path / "bad", template) as writer:
        writer.write_part(arrays)
        writer.finish()
    bad = logitcache.open(tmp_path / "bad")
    assert any("carry different labels" in p for p in logitcache.verify(bad).problems)
    with pytest.raises(LogitCacheError, match="example 0 of a part has views that carry differ"):
        logitcache.export(tmp_path / "bad", tmp_path / "p", backend="parquet")


def test_text_and_ensemble_caches_in_parquet(task: TextTask, tmp_path: Path) -> None:
    """A text classifier's cache, a one-pass ensemble's and `logitcache ensemble`'s, each the
    same in both backends."""
    made: dict[str, dict[str, logitcache.Cache]] = {}
    for backend in ("zarr", "parquet"):
        root = tmp_path / backend
        dump(DumpOptions(data=str(task.train), out=str(root / "a"), teacher=str(task.teacher),
                         backend=backend, **TEXT))  # fmt: skip
        dump(DumpOptions(data=str(task.train), out=str(root / "b"), teacher=str(task.other_seed),
                         backend=backend, **TEXT))  # fmt: skip
        dump(DumpOptions(data=str(task.train), out=str(root / "ab"), backend=backend,
                         teachers=[str(task.teacher), str(task.other_seed)], **TEXT))  # fmt: skip
        logitcache.ensemble(root / "combined", [root / "a", root / "b"], mode="probs")
        made[backend] = {n: logitcache.open(root / n) for n in ("a", "ab", "combined")}
    for name, parquet_cache in made["parquet"].items():
        m = parquet_cache.manifest
        assert m.backend == "parquet" and m.task.input == "text", name
        assert (m.ensemble is not None) == (name != "a"), name
        assert logitcache.verify(parquet_cache).problems == [], name
        assert_same_parts(made["zarr"][name], parquet_cache)
    table = pq.read_table(tmp_path / "parquet/a/parts/part-000000.parquet")
    assert table.column_names == ["labels", "target_ids", "target_logprobs"]  # no views, no ids


def test_to_hf_dataset_yields_one_example_per_view(data: Path, tmp_path: Path) -> None:
    import datasets

    for backend in ("zarr", "parquet"):
        cache = classify(data / "d.npz", tmp_path / backend, backend=backend, views=3,
                         targets="topk", top_k=3, part_tokens=6)  # fmt: skip
        ds = cache.to_hf_dataset()
        assert isinstance(ds, datasets.IterableDataset)
        assert set(ds.features) == {"example", "view", "target_ids", "target_logprobs", "label",
                                    "view_box"}  # fmt: skip
        assert isinstance(ds.features["label"], datasets.ClassLabel)
        assert ds.features["label"].num_classes == CLASSES
        rows = list(ds)
        decoded = [cache.read_decoded(i) for i in range(cache.num_parts)]
        assert len(rows) == 21 == sum(p.tokens for p in decoded)
        assert [(r["example"], r["view"]) for r in rows] == [(e, v) for e in range(7)
                                                             for v in range(3)]  # fmt: skip
        want = {n: np.concatenate([getattr(p, n) for p in decoded])
                for n in ("target_ids", "target_logprobs", "labels", "views")}  # fmt: skip
        np.testing.assert_array_equal([r["target_ids"] for r in rows], want["target_ids"])
        np.testing.assert_array_equal([r["target_logprobs"] for r in rows], want["target_logprobs"])
        assert [r["label"] for r in rows] == want["labels"].tolist() == [e % CLASSES for e in range(7)
                                                                         for _ in range(3)]  # fmt: skip
        assert [r["view_box"] for r in rows] == want["views"].tolist()
        batch = next(iter(ds.with_format("torch").batch(batch_size=5)))
        assert batch["target_logprobs"].shape == (5, 3) and batch["view_box"].shape == (5, 5)
        shuffled = ds.shuffle(seed=0, buffer_size=8)
        order = [(r["example"], r["view"]) for r in shuffled]
        assert sorted(order) == sorted((e, v) for e in range(7) for v in range(3)) != order


def test_to_hf_dataset_without_views_or_labels_names_the_classes(task: TextTask, data: Path,
                                                                 tmp_path: Path):  # fmt: skip
    bare = classify(data / "d.npy", tmp_path / "bare", backend="parquet")
    ds = bare.to_hf_dataset()
    assert set(ds.features) == {"example", "view", "target_ids", "target_logprobs"}
    assert [(r["example"], r["view"]) for r in ds] == [(e, 0) for e in range(7)]
    dump(DumpOptions(data=str(task.train), out=str(tmp_path / "text"), teacher=str(task.teacher),
                     backend="parquet", **TEXT))  # fmt: skip
    text = logitcache.open(tmp_path / "text")
    label = text.to_hf_dataset().features["label"]
    assert (
        label.names == ["asyncio", "email", "multiprocessing", "xml"] == text.manifest.task.classes
    )
    rows = list(text.to_hf_dataset())
    assert [label.int2str(r["label"]) for r in rows[:3]] == [
        text.manifest.task.classes[i] for i in text.read_decoded(0).labels[:3]
    ]


def test_axolotl_export_refuses_a_classification_cache(data: Path, tmp_path: Path) -> None:
    cache = classify(data / "d.npz", tmp_path / "c", backend="parquet", views=2)
    out = tmp_path / "axolotl"
    proc = run_cli("export", cache.root, out, "--format", "axolotl")
    assert proc.returncode == 2, describe(proc)
    message = flat(proc.stderr)
    assert "Traceback" not in proc.stderr and not out.exists(), describe(proc)
    assert "takes causal-LM caches" in message and "is a classification cache" in message
    assert "trainer fit --task classification" in message
    with pytest.raises(LogitCacheError, match="classification cache"):
        from logitcache.write.axolotl import export_axolotl

        export_axolotl(cache.root, out)
    assert not out.exists()


def test_info_stats_and_verify_count_examples_views_and_classes(data: Path, tmp_path: Path):
    cache = classify(data / "d.npz", tmp_path / "c", backend="parquet", views=2, part_tokens=6)
    info = run_cli("info", cache.root)
    assert info.returncode == 0, describe(info)
    text = flat(info.stdout)
    assert "tokenizer none (image examples)" in text
    assert f"(float32, {CLASSES} classes, weights" in text and "vocab" not in text
    assert "(npy, 7 examples," in text and "documents" not in text
    assert "2 target rows per example, 3 examples/part" in text
    assert "7 examples, 14 target rows (2 per example), 3 parts" in text
    assert "bytes per example" in text and "tokens" not in text and "bytes/token" not in text
    assert f"full (topk k={CLASSES}: every class)" in text
    stats = run_cli("stats", cache.root)
    assert stats.returncode == 0, describe(stats)
    text = flat(stats.stdout)
    assert f"14 target rows of 7 examples (2 per example), {CLASSES} classes" in text
    assert "teacher mass on the stored classes" in text and "distinct classes per row" in text
    assert "bytes/example by array:" in text and "token" not in text.replace("tokenizer", "")
    doc = stats_mod.compute(cache).summary()  # what `stats --json` prints
    assert doc["examples"] == 7 and doc["positions"] == 14
    assert sum(doc["bytes_per_example"].values()) == pytest.approx(2 * doc["bytes_per_token_total"])
    verify = run_cli("verify", cache.root)
    assert verify.returncode == 0, describe(verify)
    assert "7 examples (14 target rows) checked" in verify.stdout


def test_classification_caches_on_the_loopback_s3_server(data: Path, tmp_path: Path) -> None:
    """Dumped to an s3:// URL (Parquet) and uploaded there by `export` (zarr): each opens from
    the URL, verifies (the CLI too), and reads the local dump's parts exactly."""
    pytest.importorskip("s3fs", reason="the S3 tests need s3fs (pip install -e '.[dev]')")
    pytest.importorskip("moto", reason="the S3 tests need moto[server] (pip install -e '.[dev]')")
    from tests.logitcache.s3server import environment, moto_server

    options = {"views": 2, "crop_scale": (0.4, 1.0), "part_tokens": 6}
    local = classify(data / "d.npz", tmp_path / "local", **options)
    with moto_server() as server, environment(server.env | {"LOGITCACHE_RETRY_WAIT": "0.05"}):
        stores.RemoteStore("s3://cls").fs.mkdir("cls")
        dumped = classify(data / "d.npz", "s3://cls/dumped", backend="parquet", **options)
        logitcache.export(local.root, "s3://cls/uploaded", backend="zarr")
        for url in ("s3://cls/dumped", "s3://cls/uploaded"):
            remote = logitcache.open(url, cache_dir=tmp_path / "fetched")
            assert remote.is_remote and remote.manifest.task == local.manifest.task
            assert logitcache.verify(remote).problems == [], url
            assert_same_parts(local, remote)
            proc = run_cli("verify", url, "--cache-dir", tmp_path / "cli-fetched")
            assert proc.returncode == 0 and "7 examples (14 target rows) checked" in proc.stdout, (
                describe(proc)
            )
        assert dumped.manifest.backend == "parquet"
