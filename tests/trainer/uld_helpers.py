"""What the tests of a student with another tokenizer share (`trainer fit --loss uld`): a cache
dumped with --offsets, a second BPE with another vocabulary size, and a student config for it.
Imported by the test modules that use them (pytest finds fixtures in a module's namespace)."""

from __future__ import annotations

from pathlib import Path

import pytest

from logitcache.dumping.pipeline import DumpOptions, dump
from logitcache.testing import toy

#: The student's own vocabulary: another size than the tiny teacher's 512.
STUDENT_VOCAB = 320
#: The offsets cache: top-8 over the stdlib corpus, 64-token sequences, several parts.
OFFSETS_DUMP = {"targets": "topk", "top_k": 8, "seq_len": 64, "part_tokens": 2048}


@pytest.fixture(scope="module")
def offsets_cache(tmp_path_factory, tiny_teacher_dir: Path, stdlib_corpus: Path) -> Path:
    out = tmp_path_factory.mktemp("offsets_cache") / "cache"
    dump(
        DumpOptions(
            data=str(stdlib_corpus), out=out, teacher=str(tiny_teacher_dir), device="cpu",
            progress=False, offsets=True, **OFFSETS_DUMP,
        )
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def student_tokenizer_dir(tmp_path_factory, stdlib_small_files) -> Path:
    """A byte-level BPE trained on the same text as the teacher's, with another vocabulary."""
    out = tmp_path_factory.mktemp("student_tokenizer")
    toy.train_tokenizer(stdlib_small_files, STUDENT_VOCAB, model_max_length=256).save_pretrained(
        out
    )
    return out


@pytest.fixture(scope="module")
def uld_student_config(tmp_path_factory, student_tokenizer_dir: Path) -> Path:
    """A 1-layer GPT-2 over the student tokenizer's vocabulary (EOS id 0, as the toy BPE's)."""
    path = tmp_path_factory.mktemp("uld_student") / "student.json"
    config = toy.build_student_config(
        STUDENT_VOCAB, n_layer=1, n_embd=32, n_head=2, n_positions=256,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    path.write_text(config.to_json_string(), encoding="utf-8")
    return path
