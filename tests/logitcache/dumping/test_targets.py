"""Every target kind and codec end to end: dump with the tiny teacher, read back, verify, stats.

The stored values are compared with the teacher's own distribution (one forward per sequence,
float64), so each codec's documented error bound is asserted on real outputs; sampled caches
are compared draw for draw with an independent recomputation from (seed, sequence, position).
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
from logitcache.dumping import sampling
from logitcache.dumping.pipeline import DumpOptions, dump
from logitcache.errors import CorruptCacheError
from logitcache.format import codecs
from logitcache.format.parse import parse_manifest
from logitcache.read.verify import check_invariants, verify

REPO = Path(__file__).resolve().parents[3]
SEQ_LEN = 64
#: float32 disagreement between the dump's batched, right-padded forward and a one-sequence one
FORWARD_NOISE = 2e-5


def dump_cache(teacher: Path, data: Path, out: Path, **options) -> Path:
    settings = {"seq_len": SEQ_LEN, "part_tokens": 256, "batch_size": 4} | options
    opts = DumpOptions(
        data=str(data), out=out, teacher=str(teacher), device="cpu", progress=False, **settings
    )
    dump(opts)
    return out


@pytest.fixture(scope="module")
def exact(tiny_teacher_dir: Path):
    """exact(input_ids (n,)) -> (n, V) float64 log-probs of the teacher at T=1."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_teacher_dir)).eval()

    def run(ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0].double()
        return torch.log_softmax(logits / temperature, -1)

    return run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, stdlib_corpus: Path) -> Path:
    """A few documents (~1500 tokens): several parts of 4 sequences at seq_len 64."""
    out = tmp_path_factory.mktemp("targets_corpus")
    for doc in sorted(stdlib_corpus.iterdir())[:4]:
        (out / doc.name).write_text(doc.read_text()[:1500])
    return out


TOPK_CODECS = [
    {"logprob_dtype": "float16"},
    {"logprob_dtype": "float32", "id_order": "id"},
    {"logprob_dtype": "uint8"},
    {"logprob_dtype": "uint8", "delta": True},  # the numcodecs filter, only when asked for
    {"logprob_dtype": "uint8", "id_order": "id", "backend": "parquet", "delta": True},
    {"logprob_dtype": "float16", "id_order": "id", "backend": "parquet", "delta": False},
    {"logprob_dtype": "float16", "id_order": "descending", "shuffle": "bitshuffle"},  # 1.0 layout
    {"logprob_dtype": "float16", "shuffle": "noshuffle"},
]


@pytest.mark.parametrize("options", TOPK_CODECS, ids=lambda o: "-".join(map(str, o.values())))
def test_topk_codecs_hold_their_error_bound(tiny_teacher_dir, corpus, exact, tmp_path, options):
    out = dump_cache(tiny_teacher_dir, corpus, tmp_path / "c", targets="topk", top_k=8, **options)
    cache = logitcache.open(out)
    t = cache.manifest.targets
    assert verify(cache).ok, verify(cache).problems
    wants_delta = options.get("delta", False) and (t.order == "id" or t.logprob_dtype == "uint8")
    assert bool(cache.manifest.codec.delta) == wants_delta
    assert cache.manifest.codec.gaps == []  # top-k ids stay plain: gaps are for sampled ids
    assert cache.manifest.codec.shuffle == options.get("shuffle", "shuffle")
    for seq in list(cache)[:6]:
        lp = exact(seq.input_ids)
        # the uniform view: descending log-probs, ids the teacher's top 8 up to near-ties
        assert (seq.target_logprobs[:, :-1] >= seq.target_logprobs[:, 1:]).all()
        true = lp.gather(-1, seq.target_ids).numpy()
        stored = seq.target_logprobs.double().numpy()
        bound = codecs.logprob_error_bound(stored, t.logprob_dtype, t.logprob_scale)
        assert (np.abs(stored - true) <= bound + FORWARD_NOISE).all()
        top = lp.topk(8, -1).values.numpy()
        assert np.allclose(np.sort(true, -1), np.sort(top, -1), atol=1e-4)


def test_topk_temperature(tiny_teacher_dir, corpus, exact, tmp_path):
    out = dump_cache(
        tiny_teacher_dir, corpus, tmp_path / "c", targets="topk", top_k=4, temperature=2.0,
        logprob_dtype="float32",
    )  # fmt: skip
    cache = logitcache.open(out)
    assert cache.manifest.targets.temperature == 2.0 and cache.manifest.format_version == "1.1"
    seq = cache[1]
    lp = exact(seq.input_ids, temperature=2.0)
    assert torch.allclose(lp.gather(-1, seq.target_ids).float(), seq.target_logprobs, atol=1e-4)


def test_descending_float_topk_dump_is_still_format_1_0(tiny_teacher_dir, corpus, tmp_path):
    out = dump_cache(tiny_teacher_dir, corpus, tmp_path / "c", targets="topk", top_k=4,
                     logprob_dtype="float16", id_order="descending")  # fmt: skip
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["format_version"] == "1.0"
    assert set(doc["targets"]) == {"kind", "k", "temperature", "id_dtype", "logprob_dtype", "order"}
    assert "delta" not in doc["codec"] and "gaps" not in doc["codec"]
    # a 1.0 manifest from before this change parses, with the 1.1 fields at their defaults
    m = parse_manifest((out / "manifest.json").read_bytes())
    assert (m.targets.samples, m.targets.count_dtype, m.codec.delta) == (0, "", [])


def test_manifest_needs_1_2_for_gaps_and_1_1_for_sampled_targets(
    tiny_teacher_dir, corpus, tmp_path
):
    out = dump_cache(tiny_teacher_dir, corpus, tmp_path / "c", targets="sample", samples=8)
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["format_version"] == "1.2" and doc["targets"]["kind"] == "sample"
    assert doc["codec"]["gaps"] == ["target_ids"] and "delta" not in doc["codec"]
    doc["format_version"] = "1.1"  # a 1.1 reader would take the gaps for ids
    with pytest.raises(CorruptCacheError, match=r"1\.2"):
        parse_manifest(json.dumps(doc))
    # --delta: the layout before 1.2 (numcodecs filter, no gaps), still 1.1
    old = dump_cache(
        tiny_teacher_dir, corpus, tmp_path / "old", targets="sample", samples=8, delta=True
    )
    doc = json.loads((old / "manifest.json").read_text())
    assert doc["format_version"] == "1.1" and doc["codec"]["delta"] == ["target_ids"]
    assert "gaps" not in doc["codec"]
    doc["format_version"] = "1.0"
    with pytest.raises(CorruptCacheError, match=r"1\.1"):
        parse_manifest(json.dumps(doc))


# --------------------------------------------------------------------------------------------
# Sampled targets


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, tiny_teacher_dir, corpus) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sampled")
    sample = {"targets": "sample", "samples": 16, "seed": 5}
    return {
        "zarr": dump_cache(tiny_teacher_dir, corpus, root / "zarr", **sample),
        "parquet": dump_cache(
            tiny_teacher_dir,
            corpus,
            root / "parquet",
            backend="parquet",
            batch_size=3,
            part_tokens=192,
            **sample,
        ),
    }


def test_sampled_cache_layout_and_verify(sampled):
    for path in sampled.values():
        cache = logitcache.open(path)
        m = cache.manifest
        assert (m.targets.kind, m.targets.samples, m.targets.count_dtype) == ("sample", 16, "uint8")
        report = verify(cache)
        assert report.ok, report.problems
        raw = cache.read_part(0)
        assert raw.target_ids.ndim == 1 and raw.target_counts.shape == raw.target_ids.shape
        assert raw.target_lengths.shape == raw.input_ids.shape
        assert int(raw.target_lengths.astype(np.int64).sum()) == len(raw.target_ids)


def test_sampled_targets_equal_an_independent_recomputation(sampled, tiny_teacher_dir):
    """Draw for draw: (seed, global sequence index, position) -> the same counts, whatever the
    batch size and part size of the dump (the parquet cache used 3 and 192, zarr 4 and 256)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_teacher_dir)).eval()
    a, b = (list(logitcache.open(p)) for p in (sampled["zarr"], sampled["parquet"]))
    assert len(a) == len(b) > 8
    for index in (0, 3, 4, len(a) - 1):
        seq = a[index]
        assert torch.equal(seq.input_ids, b[index].input_ids)
        assert torch.equal(seq.target_ids, b[index].target_ids)
        assert torch.equal(seq.target_logprobs, b[index].target_logprobs)
        with torch.no_grad():
            logits = model(input_ids=seq.input_ids[None]).logits
        keys = sampling.position_keys(5, torch.tensor([index]), len(seq.input_ids))
        ids, counts, lengths = sampling.distinct_counts(sampling.draw(logits, keys, 16))
        for t in range(len(seq.input_ids)):
            n = int(lengths[0, t])
            want = dict(zip(ids[0, t, :n].tolist(), counts[0, t, :n].tolist(), strict=True))
            present = torch.isfinite(seq.target_logprobs[t])
            got = dict(
                zip(
                    seq.target_ids[t][present].tolist(),
                    (seq.target_logprobs[t][present].exp() * 16).round().long().tolist(),
                    strict=True,
                )
            )
            assert got == want, (index, t)
    # random access agrees with iteration
    cache = logitcache.open(sampled["zarr"])
    for index in (2, 7):
        assert torch.equal(cache[index].target_ids[:, :3], a[index].target_ids[:, :3])


def test_sampled_uniform_view(sampled):
    seq = next(iter(logitcache.open(sampled["zarr"])))
    lp = seq.target_logprobs
    present = torch.isfinite(lp)
    assert torch.allclose(lp.exp().where(present, 0.0).sum(-1), torch.ones(len(lp)), atol=1e-5)
    assert (lp[:, :-1] >= lp[:, 1:]).all()  # most drawn first, -inf padding last
    assert (seq.target_ids[~present] == 0).all()


def test_seed_changes_the_draws(tiny_teacher_dir, corpus, sampled, tmp_path):
    other = dump_cache(tiny_teacher_dir, corpus, tmp_path / "c", targets="sample", samples=16,
                       seed=6)  # fmt: skip
    a = logitcache.open(sampled["zarr"]).read_part(0)
    b = logitcache.open(other).read_part(0)
    assert not (
        np.array_equal(a.target_ids, b.target_ids)
        and np.array_equal(a.target_counts, b.target_counts)
    )


def test_verify_catches_bad_counts(sampled):
    cache = logitcache.open(sampled["zarr"])
    raw = cache.read_part(0)
    assert check_invariants(cache, 0, raw) == []
    counts = raw.target_counts.copy()
    counts[0] += 1
    problems = check_invariants(cache, 0, dataclasses.replace(raw, target_counts=counts))
    assert any("sum" in p for p in problems)
    assert raw.target_lengths[0] >= 2
    ids = raw.target_ids.copy()
    assert cache.manifest.codec.gaps == ["target_ids"]  # the default: ids stored as gaps
    ids[1] = 0  # a zero gap: the position's second id repeats its first
    problems = check_invariants(cache, 0, dataclasses.replace(raw, target_ids=ids))
    assert any("increasing" in p for p in problems)


def test_trainer_trains_from_a_sampled_cache(sampled, tmp_path):
    from transformers import GPT2Config

    from trainer.dataset import CacheDataset
    from trainer.recipe import FitConfig, fit

    ds = CacheDataset(sampled["zarr"], batch_size=4, shuffle=False)
    batch = next(iter(ds))
    lp = batch["target_logprobs"]
    assert lp.shape[-1] == batch["target_ids"].shape[-1] <= 16
    assert torch.isneginf(lp).any() and not torch.isnan(lp).any()

    config = tmp_path / "student.json"
    m = logitcache.open(sampled["zarr"]).manifest
    student = GPT2Config(vocab_size=m.teacher.vocab_size, n_positions=SEQ_LEN, n_embd=32,
                         n_layer=1, n_head=2)  # fmt: skip
    config.write_text(student.to_json_string())
    run = FitConfig(
        cache=str(sampled["zarr"]), student=str(config), out=str(tmp_path / "run"), steps=12,
        batch_size=4, eval_fraction=0.2, eval_every=0, lr=3e-3, progress=False, device="cpu",
    )  # fmt: skip
    summary = fit(run)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kd = [r["kd"] for r in rows if r["kind"] == "train"]
    assert all(np.isfinite(kd)) and kd[-1] < kd[0]
    assert np.isfinite(summary["final"]["eval"]["kl"])


def test_a_dump_with_the_defaults_stores_the_default_targets_and_trains(
    tiny_teacher_dir, corpus, tmp_path, capsys
):
    """No --targets, --top-k or --samples: the cache holds `DEFAULT_TARGETS` at their default
    size, `info` describes them, and `trainer fit` with its defaults trains from it and says
    what it distils from (whichever kind the default is)."""
    from transformers import GPT2Config

    from logitcache.cli.inspect import describe_targets
    from logitcache.dumping.options import DEFAULT_SAMPLES, DEFAULT_TARGETS, DEFAULT_TOP_K
    from trainer.recipe import FitConfig, fit

    out = dump_cache(tiny_teacher_dir, corpus, tmp_path / "c")
    cache = logitcache.open(out)
    t = cache.manifest.targets
    assert t.kind == DEFAULT_TARGETS
    assert verify(cache).ok, verify(cache).problems
    if DEFAULT_TARGETS == "sample":
        assert (t.samples, t.k) == (DEFAULT_SAMPLES, min(DEFAULT_SAMPLES, 512))
        assert describe_targets(cache.manifest).startswith(f"sample N={DEFAULT_SAMPLES} ")
        note = f"sampled targets N={DEFAULT_SAMPLES}, no tail"
    else:
        assert t.k == DEFAULT_TOP_K
        assert describe_targets(cache.manifest).startswith(f"topk k={DEFAULT_TOP_K},")
        note = f"top-{DEFAULT_TOP_K} targets, tail renorm"

    config = tmp_path / "student.json"
    student = GPT2Config(vocab_size=cache.manifest.teacher.vocab_size, n_positions=SEQ_LEN,
                         n_embd=32, n_layer=1, n_head=2)  # fmt: skip
    config.write_text(student.to_json_string())
    capsys.readouterr()
    summary = fit(FitConfig(cache=str(out), student=str(config), out=str(tmp_path / "run"),
                            steps=4, batch_size=4, eval_fraction=0.2, device="cpu"))  # fmt: skip
    assert note in capsys.readouterr().err
    assert np.isfinite(summary["final"]["train"]["loss"])
    assert np.isfinite(summary["final"]["eval"]["kl"])


# --------------------------------------------------------------------------------------------
# stats


def test_stats(sampled, tiny_teacher_dir, corpus, tmp_path):
    from logitcache.read import stats

    topk = dump_cache(tiny_teacher_dir, corpus, tmp_path / "topk", targets="topk", top_k=8)
    for path in (topk, sampled["zarr"], sampled["parquet"]):
        cache = logitcache.open(path)
        doc = stats.compute(cache).summary()
        assert doc["positions"] == cache.manifest.tokens
        assert 0 < doc["mass"]["mean"] <= 1 + 1e-6
        assert doc["bytes_per_token_total"] > 0 and "input_ids" in doc["bytes_per_token"]
        assert {"target_ids", "manifest"} <= set(doc["bytes_per_token"])
        if path == topk:
            assert doc["distinct"]["min"] == doc["distinct"]["max"] == 8
            assert doc["tail_entropy_max"]["mean"] >= doc["entropy"]["mean"] > 0
            assert "target_logprobs" in doc["bytes_per_token"]
        else:
            assert abs(doc["mass"]["mean"] - 1) < 1e-5
            assert 1 <= doc["distinct"]["mean"] <= 16
            assert "target_counts" in doc["bytes_per_token"]


def test_stats_command_writes_the_plot(sampled, tmp_path):
    png = tmp_path / "stats.png"
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "logitcache", "stats", str(sampled["zarr"]), "--plot", str(png)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "distinct ids per position" in proc.stdout and "target_counts" in proc.stdout
    assert png.stat().st_size > 10_000


# --------------------------------------------------------------------------------------------
# docs/FORMAT.md: the sampled-targets recipe reads a cache with plain zarr


SAMPLED_RUNNER = """
import json, sys
from pathlib import Path
import numpy as np
exec(Path(sys.argv[1]).read_text())
root = Path(sys.argv[2])
manifest = json.loads((root / "manifest.json").read_text())
part = manifest["parts"][0]
gaps = "target_ids" in manifest["codec"].get("gaps", [])
ids, counts, lengths, offsets = read_sampled_zarr_part(root / "parts" / part["name"], gaps)[1:]
assert "logitcache" not in sys.modules
rows = [sampled_distribution(ids, counts, lengths, t, manifest["targets"]["samples"])
        for t in range(int(offsets[1]))]
print(json.dumps([{str(k): v for k, v in r.items()} for r in rows]))
"""


def test_format_doc_sampled_recipe_reads_a_sampled_cache(sampled, tmp_path):
    import re

    text = (REPO / "docs" / "FORMAT.md").read_text(encoding="utf-8")
    block = next(
        b for b in re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
        if "def read_sampled_zarr_part" in b
    )  # fmt: skip
    (tmp_path / "recipe.py").write_text(block)
    (tmp_path / "runner.py").write_text(SAMPLED_RUNNER)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "recipe.py"),
         str(sampled["zarr"])],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    first = next(iter(logitcache.open(sampled["zarr"])))
    assert len(rows) == len(first.input_ids)
    for t, row in enumerate(rows):
        present = torch.isfinite(first.target_logprobs[t])
        want = dict(zip(first.target_ids[t][present].tolist(),
                        first.target_logprobs[t][present].exp().tolist(), strict=True))  # fmt: skip
        assert {int(k): v for k, v in row.items()} == pytest.approx(want, rel=1e-5)
