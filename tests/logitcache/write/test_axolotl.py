"""`logitcache export CACHE OUT --format axolotl`: real dumps of the tiny teacher, exported by
the real CLI, loaded with `datasets`, compared field by field with the reader; then batched by
axolotl's own KD collator and scored by its own top-k KL loss where axolotl is installed.

The expected values are computed here from the reader's view (`cache[i]`) by the mapping that
examples/axolotl_export.md states, independently of `logitcache.write.axolotl`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import logitcache
from logitcache.errors import LogitCacheError
from logitcache.write.axolotl import LOGPROB_PAD, MARKER, export_axolotl
from tests.logitcache.dump_helpers import describe, flat, run_cli
from tests.synthetic import make_cache

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIELDS = ["input_ids", "attention_mask", "labels", "target_token_ids", "target_logprobs",
          "target_mask"]  # fmt: skip


@pytest.fixture(scope="module")
def caches(small_caches, small_sampled_cache) -> dict[str, Path]:
    """A top-k cache (zarr, k=4) and a sampled one (parquet, N=16), both real dumps."""
    return {"topk": small_caches["zarr"], "sample": small_sampled_cache}


@pytest.fixture(scope="module")
def exports(caches, tmp_path_factory) -> dict[str, Path]:
    """Each cache exported by the real CLI."""
    root = tmp_path_factory.mktemp("axolotl_exports")
    out = {}
    for kind, cache in caches.items():
        out[kind] = root / kind
        proc = run_cli("export", cache, out[kind], "--format", "axolotl")
        assert proc.returncode == 0, describe(proc)
        assert f"wrote {out[kind]} (axolotl)" in proc.stdout
    return out


def load(out: Path, tmp_path: Path, monkeypatch):
    """The export as `datasets` loads it (offline, the Parquet files named explicitly)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)  # if imported earlier
    files = sorted(str(p) for p in (out / "data").glob("*.parquet"))
    return datasets.load_dataset(
        "parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf")
    )


def expected(seq: logitcache.CacheSequence, k: int, ratio: float = 1.0) -> dict[str, np.ndarray]:
    """axolotl's fields of one sequence, from the reader's view: row j keeps the cache's row j
    (the distribution over token j + 1), renormalised over its stored ids after the
    temperature change p ** ratio, padded to k; the last row is padding."""
    n, w = seq.target_ids.shape
    ids = torch.zeros(n, k, dtype=torch.int64)
    lp = torch.full((n, k), float("-inf"), dtype=torch.float64)
    ids[:, :w], lp[:, :w] = seq.target_ids, seq.target_logprobs.double()
    valid = torch.isfinite(lp)
    valid[-1] = False
    norm = torch.log_softmax(torch.where(valid, lp * ratio, float("-inf")), dim=-1)
    return {
        "input_ids": seq.input_ids.numpy(),
        "attention_mask": np.ones(n, dtype=np.int64),
        "labels": seq.input_ids.numpy(),
        "target_token_ids": torch.where(valid, ids, 0).numpy(),
        "target_logprobs": torch.where(valid, norm, LOGPROB_PAD).numpy(),
        "target_mask": valid.long().numpy(),
    }


@pytest.mark.parametrize("kind", ["topk", "sample"])
def test_export_matches_the_reader_field_by_field(kind, caches, exports, tmp_path, monkeypatch):
    cache = logitcache.open(caches[kind])
    k = cache.manifest.targets.k
    ds = load(exports[kind], tmp_path, monkeypatch)
    assert ds.column_names == FIELDS
    assert ds.num_rows == len(cache) and cache.num_parts > 1
    for i, row in enumerate(ds):
        want = expected(cache[i], k)
        for name in FIELDS:
            got = np.asarray(row[name])
            assert got.shape == want[name].shape, (i, name)
            if name == "target_logprobs":
                np.testing.assert_allclose(got, want[name], rtol=0, atol=2e-6, err_msg=str(i))
            else:
                np.testing.assert_array_equal(got, want[name], err_msg=f"{i} {name}")
    marker = json.loads((exports[kind] / MARKER).read_text())
    assert (marker["k"], marker["temperature"], marker["target_kind"]) == (k, 1.0, kind)
    assert marker["sequences"] == len(cache) and marker["tokens"] == cache.manifest.tokens


def test_sampled_rows_are_the_counts_over_n(caches, exports, tmp_path, monkeypatch):
    """Sampled: exp(target_logprobs) on the unmasked slots is count / N, summing to 1."""
    n = logitcache.open(caches["sample"]).manifest.targets.samples
    ds = load(exports["sample"], tmp_path, monkeypatch)
    for row in ds.select(range(5)):
        mask = np.asarray(row["target_mask"], dtype=bool)
        probs = np.where(mask, np.exp(np.asarray(row["target_logprobs"], np.float64)), 0.0)
        counts = probs * n
        np.testing.assert_allclose(counts[mask], np.round(counts[mask]), atol=1e-4)
        np.testing.assert_allclose(probs[mask.any(axis=1)].sum(axis=1), 1.0, atol=1e-5)
        assert mask.sum(axis=1).min() == 0 and mask.sum(axis=1).max() <= n


def test_load_dataset_of_the_directory_gives_the_train_split(exports, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    ds = datasets.load_dataset(str(exports["topk"]), cache_dir=str(tmp_path / "hf"))
    assert list(ds) == ["train"]
    assert ds["train"].num_rows == len(load(exports["topk"], tmp_path, monkeypatch))


def test_temperature_rescales_like_axolotl(caches, tmp_path):
    """--temperature T: p ** (T_cache / T) renormalised over the stored ids, recorded."""
    cache = logitcache.open(caches["topk"])
    out = export_axolotl(caches["topk"], tmp_path / "warm", temperature=2.0)
    assert out.temperature == 2.0
    assert json.loads((tmp_path / "warm" / MARKER).read_text())["temperature"] == 2.0
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "warm" / out.files[0])
    got = table.column("target_logprobs").to_pylist()
    for i in (0, 1):
        np.testing.assert_allclose(
            np.asarray(got[i]), expected(cache[i], out.k, ratio=0.5)["target_logprobs"],
            rtol=0, atol=2e-6,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# refusals, following `export`'s conventions


def test_an_existing_export_is_replaced_only_with_overwrite(caches, tmp_path):
    out = tmp_path / "out"
    export_axolotl(caches["topk"], out)
    proc = run_cli("export", caches["topk"], out, "--format", "axolotl", "--temperature", "3")
    assert proc.returncode == 2, describe(proc)
    assert "already holds an axolotl export" in flat(proc.stderr)
    assert json.loads((out / MARKER).read_text())["temperature"] == 1.0  # untouched
    proc = run_cli(
        "export", caches["topk"], out, "--format", "axolotl", "--temperature", "3", "--overwrite"
    )
    assert proc.returncode == 0, describe(proc)
    assert json.loads((out / MARKER).read_text())["temperature"] == 3.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind


def test_refusals_leave_everything_as_it_was(caches, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(LogitCacheError, match="not empty and holds no axolotl export"):
        export_axolotl(caches["topk"], other, overwrite=True)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    unfinished = make_cache(tmp_path / "unfinished", finish=False)
    with pytest.raises(LogitCacheError, match="unfinished dump"):
        export_axolotl(unfinished, tmp_path / "a")
    with pytest.raises(LogitCacheError, match="lies inside the input"):
        export_axolotl(caches["topk"], Path(caches["topk"]) / "axolotl")
    with pytest.raises(LogitCacheError, match="writes a local directory"):
        export_axolotl(caches["topk"], "s3://bucket/out")
    with pytest.raises(LogitCacheError, match="positive"):
        export_axolotl(caches["topk"], tmp_path / "b", temperature=0.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "unfinished"]


def test_cli_format_errors_name_the_choices(caches, tmp_path):
    proc = run_cli("export", caches["topk"], tmp_path / "x", "--format", "axolotol")
    assert proc.returncode == 2 and "choose one of: zarr, parquet, axolotl" in flat(proc.stderr)
    proc = run_cli("export", caches["topk"], tmp_path / "y", "--format", "parquet",
                   "--temperature", "2")  # fmt: skip
    assert proc.returncode == 2 and "applies to --format axolotl only" in flat(proc.stderr)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# --------------------------------------------------------------------------------------------
# axolotl's own KD collator and loss (axolotl installs on CPU with --no-deps plus peft, trl and
# addict; see examples/axolotl_export.md)


def test_axolotl_collator_and_loss_read_the_export(
    caches, exports, tiny_teacher_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    collator_module = pytest.importorskip("axolotl.integrations.kd.collator")
    forward_kl = pytest.importorskip("axolotl.integrations.kd.topk_logprob.forward_kl")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_teacher_dir))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    collate = collator_module.DataCollatorForKD(tokenizer=tokenizer)

    for kind in ("topk", "sample"):
        cache = logitcache.open(caches[kind])
        k = cache.manifest.targets.k
        ds = load(exports[kind], tmp_path / kind, monkeypatch)
        rows = [ds[i] for i in range(4)]
        lengths = [len(r["input_ids"]) for r in rows]
        batch = collate([dict(r) for r in rows])
        b, t = len(rows), max(lengths)
        assert batch["target_token_ids"].shape == (b, t, k)
        assert batch["target_logprobs"].shape == batch["target_mask"].shape == (b, t, k)
        assert batch["input_ids"].shape == batch["labels"].shape == (b, t)
        assert torch.isfinite(batch["target_logprobs"]).all()
        for s, n in enumerate(lengths):
            assert not batch["target_mask"][s, n - 1 :].any()  # last row and the padding
            assert (batch["labels"][s, n:] == -100).all()

        # axolotl's top-k forward KL on the batch == the same KL from the reader's view
        torch.manual_seed(0)
        student = torch.randn(b, t, cache.manifest.teacher.vocab_size)
        got = forward_kl.loss(
            student, batch["target_token_ids"], batch["target_logprobs"], batch["target_mask"]
        )
        total, slots = 0.0, 0
        for s, n in enumerate(lengths):
            want = expected(cache[s], k)
            mask = torch.from_numpy(want["target_mask"]).bool()
            teacher = torch.from_numpy(want["target_logprobs"]).float()
            ids = torch.from_numpy(want["target_token_ids"])
            logq = torch.log_softmax(student[s, :n].float(), dim=-1).gather(-1, ids)
            total += (teacher.exp() * (teacher - logq))[mask].sum().item()
            slots += int(mask.sum())
        assert got.item() == pytest.approx(total / slots, rel=1e-5)
