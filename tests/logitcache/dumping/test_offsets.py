"""`dump --offsets` (format 1.3): each sequence's text and each token's character span, stored
so that a student with another tokenizer can re-tokenize what the teacher saw."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from transformers import AutoTokenizer

import logitcache
from logitcache import CorruptCacheError, LogitCacheError, sequence_text
from logitcache.dumping import data
from logitcache.read.texts import text_problems
from tests.logitcache.dump_helpers import dump_in_process, manifest_json
from tests.trainer.uld_helpers import OFFSETS_DUMP

#: The small corpus in several parts.
SETTINGS = OFFSETS_DUMP | {"part_tokens": 512}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def teacher_tokenizer(tiny_teacher_dir):
    return AutoTokenizer.from_pretrained(tiny_teacher_dir)


@pytest.mark.parametrize("packing", [True, False])
def test_spans_cut_the_same_sequences_and_cover_their_text(teacher_tokenizer, small_docs, packing):
    eos = teacher_tokenizer.eos_token_id
    plain = list(
        data.pack(data.tokenize(iter(small_docs), teacher_tokenizer, False), 50, eos, packing)
    )
    spanned = list(
        data.pack_spans(data.tokenize_spans(iter(small_docs), teacher_tokenizer), 50, eos, packing)
    )
    assert len(spanned) == len(plain) >= len(small_docs)  # packed: cut mid-document too
    for ids, seq in zip(plain, spanned, strict=True):
        np.testing.assert_array_equal(seq.ids, ids)
        assert seq.spans.shape == (len(ids), 2) and seq.spans.dtype == np.uint32
        # every token's span holds that token's text, and the EOS an empty span
        words = seq.ids != eos
        pieces = [seq.text[a:b] for a, b in seq.spans[words].tolist()]
        assert "".join(pieces) == teacher_tokenizer.decode(seq.ids[words].tolist())
        assert (seq.spans[~words, 0] == seq.spans[~words, 1]).all()
    # packed, the sequences' texts are the documents end to end: nothing lost or repeated
    if packing:
        assert "".join(s.text for s in spanned) == "".join(small_docs)
    else:  # one (truncated) sequence per document, from its start
        assert all(doc.startswith(s.text) for doc, s in zip(small_docs, spanned, strict=True))


def test_offsets_dump_reads_back_and_changes_nothing_else(tmp_path, tiny_teacher_dir, small_corpus):
    with_text = dump_in_process(
        tiny_teacher_dir, small_corpus, tmp_path / "text", offsets=True, **SETTINGS
    )
    plain = dump_in_process(tiny_teacher_dir, small_corpus, tmp_path / "plain", **SETTINGS)
    raw = manifest_json(with_text)
    assert raw["format_version"] == "1.3" and raw["layout"]["offsets"] is True
    assert "offsets" not in manifest_json(plain)["layout"]
    assert all("text_bytes" not in p for p in manifest_json(plain)["parts"])
    a, b = logitcache.open(with_text), logitcache.open(plain)
    assert logitcache.verify(a).ok
    assert len(a.manifest.parts) > 1
    docs = "".join(f.read_text(encoding="utf-8") for f in sorted(small_corpus.iterdir()))
    texts = []
    for index, info in enumerate(a.manifest.parts):
        part, other = a.read_decoded(index), b.read_decoded(index)
        np.testing.assert_array_equal(part.input_ids, other.input_ids)  # the same targets
        np.testing.assert_array_equal(part.target_logprobs, other.target_logprobs)
        assert info.text_bytes == len(part.text) > 0
        assert part.token_offsets.shape == (info.tokens, 2)
        texts += [sequence_text(part, s) for s in range(info.sequences)]
    assert "".join(texts) == docs


def test_damaged_text_arrays_are_named(tmp_path, tiny_teacher_dir, small_corpus):
    cache = logitcache.open(
        dump_in_process(tiny_teacher_dir, small_corpus, tmp_path / "c", offsets=True, **SETTINGS)
    )
    part = cache.read_part(0)
    assert text_problems(part) == []
    long_span = part.token_offsets.copy()
    long_span[3, 1] = 10**6
    assert (
        "ends after its text"
        in text_problems(dataclasses.replace(part, token_offsets=long_span))[0]
    )
    bad_cut = part.text_offsets.copy()
    bad_cut[-1] -= 1
    assert "text_offsets" in text_problems(dataclasses.replace(part, text_offsets=bad_cut))[0]
    not_utf8 = part.text.copy()
    not_utf8[0] = 0xFF
    assert "not UTF-8" in text_problems(dataclasses.replace(part, text=not_utf8))[0]
    from logitcache.read.decoded import decode

    with pytest.raises(CorruptCacheError, match="ends after its text"):
        decode(cache.manifest, dataclasses.replace(part, token_offsets=long_span), "part-000000")


def test_offsets_refuse_already_tokenized_input(tmp_path, tiny_teacher_dir, small_corpus):
    ids = tmp_path / "ids.npy"
    np.save(ids, np.arange(40, dtype=np.int64).reshape(2, 20))
    with pytest.raises(LogitCacheError, match="already tokenized ids"):
        dump_in_process(tiny_teacher_dir, ids, tmp_path / "a", offsets=True, **SETTINGS)
    assert not (tmp_path / "a").exists()


def test_a_manifest_must_say_1_3_to_hold_offsets(tmp_path, tiny_teacher_dir, small_corpus):
    import json

    from logitcache.format.parse import parse_manifest

    out = dump_in_process(tiny_teacher_dir, small_corpus, tmp_path / "c", offsets=True, **SETTINGS)
    doc = manifest_json(out)
    assert parse_manifest(json.dumps(doc)).layout.offsets
    with pytest.raises(CorruptCacheError, match=r"cannot describe layout\.offsets"):
        parse_manifest(json.dumps(dict(doc, format_version="1.2")))
    doc["layout"]["offsets"] = False  # text_bytes left behind: inconsistent
    with pytest.raises(CorruptCacheError, match=r"text_bytes without layout\.offsets"):
        parse_manifest(json.dumps(doc))
