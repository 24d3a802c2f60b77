"""Top-p targets (``--targets topp``, format 1.3): per position the fewest most probable ids
whose probabilities reach ``top_p``, clamped to ``min_k..max_k``, stored ragged.

The device computation and the host's packing are compared with a numpy reference on small
hand-made logits (a peaked row, a flat one, exact ties, both clamps); a real dump of the tiny
teacher with the teacher's own float64 distribution (ids, lengths, an exact tail); the Parquet
backend and the uniform view with the zarr one; `verify` with damaged parts; the manifest's
checks; and the whole road from the command line: `logitcache dump` -> `info` -> `trainer fit`,
each a real subprocess.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import logitcache
from logitcache.dumping import targets
from logitcache.errors import CorruptCacheError
from logitcache.format.parse import parse_manifest
from logitcache.read.verify import check_invariants, verify
from tests.cli import REPO, cli_env
from tests.logitcache.dumping.test_targets import FORWARD_NOISE, dump_cache

TOPP = {"targets": "topp", "top_p": 0.3, "max_k": 24, "min_k": 2}


# --------------------------------------------------------------------------------------------
# the device computation and the host's packing, against numpy


def reference_rows(logits: np.ndarray, top_p: float, min_k: int, max_k: int):
    """Per row of (N, V) logits: (ids, log-probs) of the fewest most probable ids whose float64
    probabilities reach `top_p`, clamped to min_k..max_k; most probable first, ties by id."""
    rows = []
    for x in logits.astype(np.float64):
        lp = x - np.log(np.exp(x - x.max()).sum()) - x.max()
        order = np.lexsort((np.arange(len(x)), -lp))  # decreasing log-prob, then increasing id
        reached = np.cumsum(np.exp(lp[order])) >= top_p
        n = int(np.argmax(reached)) + 1 if reached.any() else len(x)
        n = min(max(n, min_k), max_k)
        rows.append((order[:n], lp[order[:n]]))
    return rows


def hand_made_logits() -> np.ndarray:
    """(2, 3, 12) logits: peaked (one id holds 0.99: min_k decides), flat (max_k decides),
    exact ties inside the kept ids, across the max_k cut and across the coverage boundary, and
    an ordinary row."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 12))
    x[0, 0] = -5.0
    x[0, 0, 7] = 5.0  # p(7) about 0.995
    x[0, 1] = 0.0  # uniform: 12 ids needed for 0.8, max_k caps it
    x[1, 0] = [3, 3, 3, 0, 0, 0, 0, 0, 0, 0, 0, -1]  # three tied ids of 0.27 each
    x[1, 1] = [2, 2, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0]  # 7 ids reach 0.8: max_k cuts a tie
    x[1, 2] = [3, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]  # the 5th id, one of 8 tied, reaches 0.8
    return x


@pytest.mark.parametrize("order", ["descending", "id"])
@pytest.mark.parametrize("logprob_dtype", ["float32", "float16"])
def test_ragged_rows_equal_a_numpy_reference(order, logprob_dtype):
    logits = hand_made_logits()
    top_p, min_k, max_k = 0.8, 2, 6
    spec = targets.TargetSpec(
        kind="topp", k=max_k, top_p=top_p, min_k=min_k, order=order, logprob_dtype=logprob_dtype
    )
    out = targets.device_targets(torch.from_numpy(logits).float(), spec, torch.tensor([0, 1]))
    assert out["finite"].all()
    info = targets.target_info(kind="topp", vocab_size=12, top_k=max_k, top_p=top_p,
                               min_k=min_k, logprob_dtype=logprob_dtype, order=order)  # fmt: skip
    rows = [{name: value[s].numpy() for name, value in out.items() if name != "finite"}
            for s in range(2)]  # fmt: skip
    part = targets.assemble(info, [np.arange(3), np.arange(3)], rows)
    want = reference_rows(logits.reshape(6, 12), top_p, min_k, max_k)
    lengths = [len(ids) for ids, _ in want]
    assert part.target_lengths.tolist() == lengths
    assert lengths == [min_k, max_k, lengths[2], 3, max_k, 5]  # both clamps, and the ties
    assert part.target_lengths.dtype == np.uint8 and part.target_counts is None
    assert part.target_ids.shape == part.target_logprobs.shape == (sum(lengths),)
    assert part.target_logprobs.dtype == np.dtype(logprob_dtype)
    tolerance = 1e-6 if logprob_dtype == "float32" else 2e-3
    starts = np.concatenate([[0], np.cumsum(lengths)])
    for t, (ids, lp) in enumerate(want):
        got_ids = part.target_ids[starts[t] : starts[t + 1]].astype(np.int64)
        got_lp = part.target_logprobs[starts[t] : starts[t + 1]].astype(np.float64)
        if order == "id":
            assert (np.diff(got_ids) > 0).all()
        else:
            assert (np.diff(got_lp) <= 0).all()
        np.testing.assert_allclose(np.sort(got_lp)[::-1], lp, rtol=tolerance, atol=1e-6)
        # every id above the last one kept is kept; of those tied with it, topk picks
        row, last = logits.reshape(6, 12)[t], logits.reshape(6, 12)[t][ids[-1]]
        assert set(np.flatnonzero(row > last)) <= set(got_ids.tolist())
        assert set(got_ids.tolist()) <= set(np.flatnonzero(row >= last))


def test_a_row_of_nan_is_not_finite_and_an_unused_slot_never_counts():
    logits = torch.zeros(1, 2, 70000)
    logits[0, 0, 0] = 100.0  # one id holds all the mass: the other 3 slots hold -100 log-probs
    logits[0, 1] = float("nan")
    spec = targets.TargetSpec(kind="topp", k=4, top_p=0.9, min_k=1, logprob_dtype="float16")
    out = targets.device_targets(logits, spec, torch.tensor([0]))
    # -100 overflows no float16, but -70000 would; a used slot only ever holds the top values
    assert out["target_lengths"].tolist() == [[1, 1]]
    assert out["finite"].tolist() == [[True, False]]


# --------------------------------------------------------------------------------------------
# a real dump


@pytest.fixture(scope="module")
def topp_caches(tiny_teacher_dir, corpus, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("topp")
    zarr = dump_cache(tiny_teacher_dir, corpus, root / "zarr", **TOPP)
    parquet = logitcache.export(zarr, root / "parquet", backend="parquet")
    del parquet
    return {"zarr": zarr, "parquet": root / "parquet"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, stdlib_corpus: Path) -> Path:
    out = tmp_path_factory.mktemp("topp_corpus")
    for doc in sorted(stdlib_corpus.iterdir())[:2]:
        (out / doc.name).write_text(doc.read_text()[:1500])
    return out


def test_a_dump_stores_the_teachers_fewest_ids_with_an_exact_tail(topp_caches, tiny_teacher_dir):
    from transformers import AutoModelForCausalLM

    cache = logitcache.open(topp_caches["zarr"])
    m = cache.manifest
    assert (m.format_version, m.targets.kind, m.targets.k) == ("1.3", "topp", 24)
    assert (m.targets.top_p, m.targets.min_k, m.targets.count_dtype) == (0.3, 2, "uint8")
    assert verify(cache).ok, verify(cache).problems
    model = AutoModelForCausalLM.from_pretrained(str(tiny_teacher_dir)).eval()
    lengths, checked = [], 0
    for seq in cache:
        with torch.no_grad():
            exact = torch.log_softmax(model(seq.input_ids[None]).logits[0].double(), -1).numpy()
        stored = seq.target_logprobs.numpy().astype(np.float64)
        used = np.isfinite(stored)
        lengths += used.sum(-1).tolist()
        for t, n in enumerate(used.sum(-1)):
            ranked = np.sort(exact[t])[::-1]
            cum = np.cumsum(np.exp(ranked))
            if np.abs(cum - 0.3).min() < 1e-4 or np.abs(ranked[n - 1] - ranked[n]) < 1e-4:
                continue  # the batched forward's noise may move the boundary: not decidable
            want = min(max(int(np.argmax(cum >= 0.3)) + 1, 2), 24)
            assert n == want, (t, n, want)
            ids = seq.target_ids[t, :n].numpy()
            assert set(ids) == set(np.argsort(-exact[t])[:n])
            np.testing.assert_allclose(
                stored[t, :n], exact[t, ids], rtol=2**-11, atol=FORWARD_NOISE
            )
            # the tail is exact: 1 - the stored mass is the teacher's mass elsewhere
            tail = 1 - np.exp(stored[t, :n]).sum()
            assert abs(tail - (1 - np.exp(exact[t, ids]).sum())) < 1e-3
            checked += 1
    assert checked > 0.9 * len(lengths)
    assert min(lengths) >= 2 and max(lengths) <= 24 and len(set(lengths)) > 3  # ragged


def test_parquet_and_random_access_give_the_same_view(topp_caches):
    a, b = logitcache.open(topp_caches["zarr"]), logitcache.open(topp_caches["parquet"])
    assert b.manifest.backend == "parquet" and verify(b).ok, verify(b).problems
    assert b.manifest.targets == a.manifest.targets
    assert [p.entries for p in a.manifest.parts] == [p.entries for p in b.manifest.parts]
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        one = a[i]  # only the rows of sequence i
        w = int(np.isfinite(one.target_logprobs.numpy()).sum(-1).max())
        for s in (x, y):
            assert torch.equal(s.input_ids, one.input_ids)
            assert torch.equal(s.target_ids[:, :w], one.target_ids)
            assert torch.equal(s.target_logprobs[:, :w], one.target_logprobs)
            assert torch.isneginf(s.target_logprobs[:, w:]).all()


def test_verify_catches_a_damaged_topp_part(topp_caches):
    cache = logitcache.open(topp_caches["zarr"])
    part = cache.read_part(0)
    assert check_invariants(cache, 0, part) == []
    short = part.target_lengths.copy()
    short[1] += short[0] - 1  # the same entries, the first position given fewer than min_k
    short[0] = 1
    problems = check_invariants(cache, 0, dataclasses.replace(part, target_lengths=short))
    assert any("fewer than min_k=2" in p for p in problems), problems
    values = part.target_logprobs.copy()
    values[3] = 0.5
    problems = check_invariants(cache, 0, dataclasses.replace(part, target_logprobs=values))
    assert any("above 0" in p for p in problems), problems
    ids = part.target_ids.copy()
    ids[[0, 1]] = ids[[1, 0]]  # the first position's ids out of id order
    problems = check_invariants(cache, 0, dataclasses.replace(part, target_ids=ids))
    assert any("increasing" in p for p in problems), problems


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"top_p": 0.0}, "top_p=0.0 is not in (0, 1]"),
        ({"top_p": 1.5}, "top_p=1.5 is not in (0, 1]"),
        ({"min_k": 25}, "min_k=25 is not in 1..k=24"),
        ({"count_dtype": "uint16"}, "does not fit k=24"),
    ],
)
def test_the_manifest_checks_the_topp_fields(topp_caches, change, named):
    raw = json.loads((topp_caches["zarr"] / "manifest.json").read_text())
    raw["targets"].update(change)
    with pytest.raises(CorruptCacheError, match=named.replace("(", r"\(").replace(")", r"\)")):
        parse_manifest(json.dumps(raw))


def test_an_older_version_cannot_describe_topp(topp_caches):
    raw = json.loads((topp_caches["zarr"] / "manifest.json").read_text())
    raw["format_version"] = "1.2"
    with pytest.raises(CorruptCacheError, match="cannot describe top-p targets"):
        parse_manifest(json.dumps(raw))


def test_the_axolotl_export_reads_topp(topp_caches, tmp_path):
    from logitcache.write.axolotl import export_axolotl

    export_axolotl(topp_caches["zarr"], tmp_path / "ax")
    marker = json.loads(next((tmp_path / "ax").glob("*.json")).read_text())
    assert marker["target_kind"] == "topp" and marker["k"] == 24


# --------------------------------------------------------------------------------------------
# the command line, end to end


def _run(*args: object, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True,
                          text=True, env=cli_env(), cwd=REPO, timeout=timeout)  # fmt: skip


def test_dump_info_and_fit_from_the_command_line(tiny_teacher_dir, corpus, tmp_path):
    from transformers import GPT2Config

    out = tmp_path / "cache"
    done = _run("logitcache", "dump", "--teacher", tiny_teacher_dir, "--data", corpus,
                "--out", out, "--seq-len", 64, "--top-p", 0.5, "--max-k", 16,
                "--no-progress", "--device", "cpu")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    targets_record = json.loads((out / "manifest.json").read_text())["targets"]
    assert (targets_record["kind"], targets_record["top_p"], targets_record["k"]) == (
        "topp", 0.5, 16)  # fmt: skip
    info = _run("logitcache", "info", out)
    assert info.returncode == 0, info.stderr
    assert "topp p=0.5, 1..16 ids" in info.stdout, info.stdout
    student = tmp_path / "student.json"
    student.write_text(GPT2Config(vocab_size=512, n_positions=64, n_embd=32, n_layer=1,
                                  n_head=2).to_json_string())  # fmt: skip
    fit = _run("trainer", "fit", "--cache", out, "--student", student, "--out", tmp_path / "run",
               "--steps", 6, "--log-every", 1, "--batch-size", 4, "--eval-fraction", 0.2,
               "--device", "cpu")  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-2000:]
    # the start-up line (with the progress bar, on stderr) says what the run distils from
    assert "top-p targets p=0.5 (1..16 ids), tail renorm" in fit.stderr, fit.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kd = [r["kd"] for r in rows if r["kind"] == "train"]
    assert len(kd) == 6 and all(np.isfinite(kd)) and kd[-1] < kd[0]
