"""Tests for the embedded default teacher (``logitcache.testing.toy``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

from logitcache.testing import toy

# A deliberately cheap teacher for tests that build their own.
MICRO = {
    "vocab_size": 300,
    "n_layer": 1,
    "n_embd": 32,
    "n_head": 2,
    "n_positions": 64,
    "seq_len": 32,
    "batch_size": 4,
    "verbose": False,
}


def _sample_text(path: Path, n_chars: int = 1500) -> str:
    return path.read_text(encoding="utf-8")[:n_chars]


def _lm_loss(model: torch.nn.Module, ids: list[int]) -> float:
    x = torch.tensor([ids])
    with torch.no_grad():
        return float(model(input_ids=x, labels=x).loss)


# ------------------------------------------------------------------------------------------
# Corpus and split
# ------------------------------------------------------------------------------------------


def test_split_is_disjoint_deterministic_and_mostly_train():
    train = toy.stdlib_files("train")
    heldout = toy.stdlib_files("heldout")
    assert train and heldout
    assert not set(train) & set(heldout)
    assert train == toy.stdlib_files("train")
    assert heldout == toy.stdlib_files("heldout")
    assert train == sorted(train)
    assert 0.01 < len(heldout) / (len(train) + len(heldout)) < 0.15
    assert all("site-packages" not in p.parts for p in train + heldout)


def test_limit_is_a_deterministic_subset_of_the_split():
    train = set(toy.stdlib_files("train"))
    sample = toy.stdlib_files("train", limit=15)
    assert len(sample) == 15
    assert set(sample) <= train
    assert sample == toy.stdlib_files("train", limit=15)
    assert sample == sorted(sample)
    # Not just the alphabetically first files: a spread over the stdlib.
    assert sample != sorted(train)[:15]
    assert toy.stdlib_files("heldout", limit=0) == []
    with pytest.raises(ValueError):
        toy.stdlib_files("validation")


def test_split_by_relative_path_on_a_fake_tree(tmp_path: Path):
    for i in range(300):
        f = tmp_path / f"pkg{i % 7}" / f"mod{i}.py"
        f.parent.mkdir(exist_ok=True)
        f.write_text(f"x = {i}\n")
    for skipped in ("site-packages", "test", "idlelib/idle_test"):
        d = tmp_path / skipped
        d.mkdir(parents=True)
        (d / "skipme.py").write_text("y = 1\n")
    train = toy.stdlib_files("train", root=tmp_path)
    heldout = toy.stdlib_files("heldout", root=tmp_path)
    assert len(train) + len(heldout) == 300
    assert not set(train) & set(heldout)
    assert heldout, "300 files should yield some held-out ones"
    assert all(p.name != "skipme.py" for p in train + heldout)
    # The split depends on the relative path only, not on where the tree lives.
    moved = tmp_path.parent / (tmp_path.name + "_moved")
    tmp_path.rename(moved)
    assert [p.relative_to(moved) for p in toy.stdlib_files("heldout", root=moved)] == [
        p.relative_to(tmp_path) for p in heldout
    ]


def test_write_corpus_documents(stdlib_corpus: Path, stdlib_small_files: list[Path]):
    docs = sorted(stdlib_corpus.iterdir())
    assert len(docs) == len(stdlib_small_files)
    for doc, src in zip(docs, stdlib_small_files, strict=True):
        assert doc.suffix == ".txt"
        raw = doc.read_bytes()
        assert 0 < len(raw) <= 4096
        text = raw.decode("utf-8")
        assert src.read_text(encoding="utf-8").startswith(text)
        assert text.endswith("\n")


def test_write_corpus_skips_undecodable_and_empty(tmp_path: Path, stdlib_small_files):
    bad = tmp_path / "latin1.py"
    bad.write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    empty = tmp_path / "empty.py"
    empty.write_text("")
    out = toy.write_corpus(tmp_path / "out", files=[bad, stdlib_small_files[0], empty])
    docs = list(out.iterdir())
    assert len(docs) == 1
    assert docs[0].read_text(encoding="utf-8") == stdlib_small_files[0].read_text("utf-8")


def test_write_corpus_from_split(tmp_path: Path):
    out = toy.write_corpus(tmp_path / "h", "heldout", limit=3, max_bytes=1000)
    docs = sorted(out.iterdir())
    assert 1 <= len(docs) <= 3
    assert all(len(d.read_bytes()) <= 1000 for d in docs)


# ------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------


def test_tokenizer_round_trips_and_has_requested_vocab(tmp_path: Path, stdlib_small_files):
    tok = toy.train_tokenizer(stdlib_small_files[:8], vocab_size=400)
    assert len(tok) == 400
    assert tok.eos_token == toy.EOS_TOKEN
    assert tok.pad_token_id == tok.eos_token_id == tok.bos_token_id
    # Unseen text (held-out split) plus whitespace and non-ASCII that BPE never saw.
    text = _sample_text(toy.stdlib_files("heldout")[0]) + "\n\t  x  =  1 . é ∑ 😀\r\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8")), "merges should compress source code"
    assert tok.decode(tok.encode(toy.EOS_TOKEN)) == toy.EOS_TOKEN
    assert tok.encode(toy.EOS_TOKEN) == [tok.eos_token_id]

    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == 400
    assert loaded.eos_token == toy.EOS_TOKEN
    assert loaded.eos_token_id == tok.eos_token_id
    assert loaded.encode(text) == ids
    assert loaded.decode(ids) == text


def test_tokenizer_training_is_deterministic(stdlib_small_files):
    a = toy.train_tokenizer(stdlib_small_files[:5], vocab_size=300)
    b = toy.train_tokenizer(stdlib_small_files[:5], vocab_size=300)
    assert a.get_vocab() == b.get_vocab()


# ------------------------------------------------------------------------------------------
# Teacher
# ------------------------------------------------------------------------------------------


def test_tiny_teacher_loads_through_auto_classes(tiny_teacher_dir: Path, stdlib_small_files):
    for name in ("config.json", "model.safetensors", "tokenizer.json", toy.INFO_FILE):
        assert (tiny_teacher_dir / name).is_file(), name
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    assert isinstance(model, GPT2LMHeadModel)
    assert len(tok) == model.config.vocab_size == 512
    assert tok.eos_token == toy.EOS_TOKEN
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config.n_layer == 2 and model.config.n_embd == 64
    assert tok.model_max_length == model.config.n_positions == 256

    ids = tok.encode(_sample_text(stdlib_small_files[0], 600))[:128]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 512)
    assert torch.isfinite(logits).all()
    # Trained: far from uniform (uniform would put 1/512 ~ 0.002 on the argmax).
    assert logits.softmax(-1).max(-1).values.mean() > 0.02


def test_saved_teacher_gives_same_logits_as_before_saving(tmp_path: Path, monkeypatch):
    probe = torch.arange(1, 33).unsqueeze(0)
    before: list[torch.Tensor] = []
    original = GPT2LMHeadModel.save_pretrained

    def recording_save(self, *args, **kwargs):
        with torch.no_grad():
            before.append(self(probe).logits.clone())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GPT2LMHeadModel, "save_pretrained", recording_save)
    files = toy.stdlib_files("train", limit=3)
    out = toy.build_teacher(tmp_path, files=files, train_steps=3, **MICRO)
    monkeypatch.undo()

    assert len(before) == 1
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert not reloaded.training
    with torch.no_grad():
        after = reloaded(probe).logits
    torch.testing.assert_close(after, before[0], rtol=0, atol=1e-6)


def test_training_lowers_the_loss(tiny_teacher_dir: Path, tmp_path: Path, stdlib_small_files):
    info = toy.read_info(tiny_teacher_dir)
    assert info is not None
    curve = [loss for _, _, loss in info["train"]["loss_curve"]]
    assert len(curve) == info["settings"]["train_steps"] == 40
    assert math.isclose(curve[0], math.log(512), rel_tol=0.05), "random init ~ uniform"
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.3

    # Same seed and tokenizer, no training: the trained teacher must fit the text better.
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    settings = info["settings"]
    untrained_dir = toy.build_teacher(
        tmp_path,
        files=stdlib_small_files,
        tokenizer=tok,
        train_steps=0,
        verbose=False,
        **{k: settings[k] for k in ("vocab_size", "n_layer", "n_embd", "n_head", "n_positions")},
    )
    assert toy.read_info(untrained_dir)["train"]["loss_curve"] == []
    ids = tok.encode(_sample_text(stdlib_small_files[1], 2000))[:200]
    trained_loss = _lm_loss(AutoModelForCausalLM.from_pretrained(tiny_teacher_dir), ids)
    untrained_loss = _lm_loss(AutoModelForCausalLM.from_pretrained(untrained_dir), ids)
    assert trained_loss < untrained_loss - 0.3


def test_ensure_teacher_reuses_and_rebuilds(tmp_path: Path, monkeypatch):
    calls: list[dict] = []
    real_build = toy.build_teacher

    def spy(out_dir, **kw):
        calls.append(kw)
        return real_build(out_dir, **kw)

    monkeypatch.setattr(toy, "build_teacher", spy)
    files = toy.stdlib_files("train", limit=3)
    kw = {"files": files, "train_steps": 2, **MICRO}

    out = toy.ensure_teacher(tmp_path / "t", **kw)
    assert len(calls) == 1
    weights = out / "model.safetensors"
    stamp = (weights.stat().st_mtime_ns, (out / toy.INFO_FILE).read_text())

    # Same settings (verbosity is not a setting): reused, nothing rewritten.
    assert toy.ensure_teacher(tmp_path / "t", **{**kw, "verbose": True}) == out
    assert len(calls) == 1
    assert (weights.stat().st_mtime_ns, (out / toy.INFO_FILE).read_text()) == stamp

    # Different settings: rebuilt, and the new settings are recorded.
    toy.ensure_teacher(tmp_path / "t", **{**kw, "train_steps": 3})
    assert len(calls) == 2
    assert json.loads((out / toy.INFO_FILE).read_text())["settings"]["train_steps"] == 3
    toy.ensure_teacher(tmp_path / "t", **{**kw, "train_steps": 3, "files": files[:2]})
    assert len(calls) == 3

    # An interrupted build (no toy_info.json) is not reused.
    (out / toy.INFO_FILE).unlink()
    toy.ensure_teacher(tmp_path / "t", **{**kw, "train_steps": 3, "files": files[:2]})
    assert len(calls) == 4
    assert toy.read_info(out) is not None


def test_build_student_config(tiny_teacher_dir: Path):
    cfg = toy.build_student_config(tiny_teacher_dir, n_layer=1, n_embd=32, n_head=2)
    teacher_cfg = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).config
    assert cfg.vocab_size == teacher_cfg.vocab_size
    assert cfg.eos_token_id == teacher_cfg.eos_token_id
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head) == (1, 32, 2)
    student = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        assert student(torch.tensor([[0, 5, 511]])).logits.shape == (1, 3, 512)

    by_size = toy.build_student_config(1000, n_positions=128, resid_pdrop=0.1)
    assert (by_size.vocab_size, by_size.n_positions, by_size.resid_pdrop) == (1000, 128, 0.1)
