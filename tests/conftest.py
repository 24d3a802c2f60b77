"""Shared, session-scoped fixtures: real text and a real (tiny) teacher, built offline.

Everything comes from ``logitcache.testing.toy``: documents are Python standard library sources and
the teacher is a locally trained byte-level BPE plus a 2-layer GPT-2, saved with
``save_pretrained`` so tests load it exactly as users would
(``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``). Both are
built once per session and kept small so the default test run stays fast on 2 CPU cores.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from logitcache.testing import toy

#: Settings of the tiny teacher; tests may read them (e.g. the vocab size).
TINY_TEACHER = {
    "vocab_size": 512,
    "n_layer": 2,
    "n_embd": 64,
    "n_head": 2,
    "n_positions": 256,
    "seq_len": 128,
    "batch_size": 8,
    "train_steps": 40,
    "lr": 3e-3,
    "seed": 0,
}
#: Per-document cap of the test corpus, in UTF-8 bytes.
CORPUS_MAX_BYTES = 4096


@pytest.fixture(scope="session")
def stdlib_small_files() -> list[Path]:
    """~20 small stdlib train-split files (under 16 KB each), a deterministic choice."""
    candidates = toy.stdlib_files("train", limit=200)
    small = [p for p in candidates if 500 < p.stat().st_size < 16_000]
    assert len(small) >= 20, "stdlib too small?"
    return small[:20]


@pytest.fixture(scope="session")
def stdlib_corpus(tmp_path_factory: pytest.TempPathFactory, stdlib_small_files) -> Path:
    """A ``--data`` directory: one ``.txt`` document per stdlib file, each at most 4 KB."""
    dest = tmp_path_factory.mktemp("stdlib_corpus")
    return toy.write_corpus(dest, files=stdlib_small_files, max_bytes=CORPUS_MAX_BYTES)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory, stdlib_small_files) -> Path:
    """A saved tiny GPT-2 teacher (vocab 512, 2x64), trained 40 steps so logits are peaked."""
    out = tmp_path_factory.mktemp("tiny_teacher")
    return toy.build_teacher(out, files=stdlib_small_files, verbose=False, **TINY_TEACHER)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, tiny_teacher_dir, stdlib_corpus) -> Path:
    """The tiny teacher's top-8 targets over the stdlib corpus: ~530 sequences of 64, 9 parts
    (dumped in-process, once per session; the trainer and fault tests read it). Top-k whatever
    the default target kind: the fault tests name its target_logprobs files."""
    from logitcache.dumping.pipeline import DumpOptions, dump

    out = tmp_path_factory.mktemp("tiny_cache") / "cache"
    dump(
        DumpOptions(
            data=str(stdlib_corpus), out=out, teacher=str(tiny_teacher_dir), targets="topk",
            top_k=8, seq_len=64, part_tokens=4096, device="cpu", progress=False,
        )
    )  # fmt: skip
    return out


@pytest.fixture(scope="session")
def tiny_student_config(tmp_path_factory, tiny_teacher_dir) -> Path:
    """A 1-layer, 32-wide GPT-2 config matching the tiny teacher's vocabulary."""
    path = tmp_path_factory.mktemp("student") / "student.json"
    config = toy.build_student_config(
        tiny_teacher_dir, n_layer=1, n_embd=32, n_head=2, n_positions=64
    )
    path.write_text(config.to_json_string(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def dump_corpus(tmp_path_factory, stdlib_corpus: Path) -> Path:
    """6 documents of the stdlib corpus (~10.7k tokens)."""
    corpus = tmp_path_factory.mktemp("dump_corpus") / "corpus"
    corpus.mkdir()
    from tests.faults.helpers import FILES

    for f in sorted(stdlib_corpus.iterdir())[:FILES]:
        shutil.copy(f, corpus / f.name)
    return corpus


@pytest.fixture(scope="session")
def dump_reference(tmp_path_factory, tiny_teacher_dir: Path, dump_corpus: Path) -> Path:
    """`dump_corpus` dumped in-process with `tests.faults.helpers.OPTIONS` (43 parts): what every
    interrupted, faulty or distributed dump of it must end up equal to."""
    from logitcache.dumping.pipeline import DumpOptions, dump
    from tests.faults.helpers import OPTIONS

    out = tmp_path_factory.mktemp("dump_reference") / "cache"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dump(DumpOptions(data=str(dump_corpus), out=out, teacher=str(tiny_teacher_dir),
                         device="cpu", progress=False, **OPTIONS))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return out


#: Settings of the tiny masked-LM teacher (a BERT, `logitcache.testing.mlm`).
TINY_MLM_TEACHER = {
    "vocab_size": 400,
    "n_layer": 2,
    "hidden": 32,
    "positions": 128,
    "seq_len": 64,
    "batch_size": 8,
    "train_steps": 40,
    "lr": 3e-3,
}


@pytest.fixture(scope="session")
def tiny_mlm_teacher_dir(tmp_path_factory: pytest.TempPathFactory, stdlib_small_files) -> Path:
    """A saved tiny BERT masked-LM teacher (vocab 400, 2x32) with BERT's special tokens,
    trained 40 steps with masked-LM loss."""
    from logitcache.testing import mlm

    out = tmp_path_factory.mktemp("tiny_mlm_teacher")
    return mlm.ensure_mlm_teacher(out, files=stdlib_small_files, verbose=False, **TINY_MLM_TEACHER)


@pytest.fixture(scope="session")
def tiny_mlm_cache(tmp_path_factory, tiny_mlm_teacher_dir, stdlib_corpus) -> Path:
    """The tiny BERT's top-8 targets at 15% masked positions, 2 views per sequence of 64
    (dumped in-process once per session)."""
    from logitcache.dumping.pipeline import DumpOptions, dump

    out = tmp_path_factory.mktemp("tiny_mlm_cache") / "cache"
    dump(
        DumpOptions(
            data=str(stdlib_corpus), out=out, teacher=str(tiny_mlm_teacher_dir), targets="topk",
            top_k=8, seq_len=64, part_tokens=4096, device="cpu", progress=False, views=2,
        )
    )  # fmt: skip
    return out
