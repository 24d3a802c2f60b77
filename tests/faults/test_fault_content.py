"""Caches whose bytes are intact but whose content a reader must refuse: an unfinished dump, the
0-part directory a failed dump leaves, and parts whose sha256 matches but whose values are bad
(an id at or above the vocabulary size, a NaN or positive log-prob); and the dump that would
write such values (a tokenizer with more ids than the teacher's logits).

`verify`, `trainer fit` and `logitcache dump` run in-process through their real entry points
(`main()`: argument parsing, the error handler, the exit code), on real caches written by the
real writer (which hashes what it writes, so the bad values carry a matching sha256)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import logitcache
from logitcache.format.manifest import PartArrays
from tests.faults.helpers import flat, run_main
from tests.synthetic import make_cache

#: The synthetic caches below: the tiny teacher's 512 ids (so the tiny student trains on them),
#: 4 parts of 5 sequences of up to 16 tokens, top-8 float16.
SETTINGS = {"vocab": 512, "k": 8, "seq_len": 16, "per_part": 5, "sequences": 20}
BAD_PART, BAD_SEQUENCE = 2, 3  # the sequence within the part that gets the bad value

#: kind -> (array, value written at one position of BAD_SEQUENCE, what the error must say)
BAD_VALUES = {
    "target_id_over_vocab": ("target_ids", 600, "target id 600 is >= the vocabulary size 512"),
    "input_id_over_vocab": ("input_ids", 700, "input id 700 is >= the vocabulary size 512"),
    "nan_logprob": ("target_logprobs", np.nan, "log-prob nan is not a finite value <= 0"),
    "positive_logprob": ("target_logprobs", 0.5, "log-prob 0.5 is not a finite value <= 0"),
}


def verify_cli(cache: Path, capsys) -> tuple[int, str]:
    from logitcache.cli.commands import main

    code, _, err = run_main(main, ["logitcache", "verify", cache], capsys)
    assert "Traceback" not in err, err
    return code, flat(err)


def test_verify_fails_an_unfinished_dump_with_the_readers_reason(tmp_path, capsys):
    """3 committed parts, never finished: `fit`, `export` and `merge` refuse it (they open it
    without allow_partial), so verify must too, with the same sentence."""
    cache = make_cache(tmp_path / "cache", finish=False, **SETTINGS | {"sequences": 15})
    with pytest.raises(logitcache.LogitCacheError) as refused:
        logitcache.open(cache)
    code, message = verify_cli(cache, capsys)
    assert code == 2 and message.startswith("logitcache: error: "), message
    assert flat(str(refused.value)) in message and "(3 parts committed)" in message, message


def test_verify_fails_the_empty_directory_a_failed_dump_leaves(
    tmp_path, tiny_teacher_dir, stdlib_corpus, capsys
):
    """A dump whose teacher gives NaN logits stops before its first part: what it leaves holds
    an unfinished manifest of 0 parts, which verify used to pass as "ok: 0 parts"."""
    from logitcache.cli.commands import main

    out = tmp_path / "cache"
    code, _, err = run_main(
        main,
        ["logitcache", "dump", "--teacher-factory", "tests.logitcache.nan_teacher:build",
         "--tokenizer", tiny_teacher_dir, "--data", stdlib_corpus, "--out", out,
         "--device", "cpu", "--seq-len", 64, "--targets", "topk", "--top-k", 4, "--no-progress"],
        capsys,
    )  # fmt: skip
    assert code == 2 and "non-finite logits" in flat(err), err
    code, message = verify_cli(out, capsys)
    assert code == 2, message
    assert f"{out} is an unfinished dump (0 parts committed)" in message, message
    assert "Rerun the same `logitcache dump` command" in message, message


def _bad_cache(root: Path, kind: str) -> tuple[Path, int, int]:
    """A cache with one bad value in sequence BAD_SEQUENCE of part BAD_PART; (cache, global
    index of that sequence, position of the value)."""
    array, value, _ = BAD_VALUES[kind]
    where: list[int] = []

    def tamper(index: int, part: PartArrays) -> None:
        if index != BAD_PART:
            return
        start, stop = part.seq_offsets[BAD_SEQUENCE], part.seq_offsets[BAD_SEQUENCE + 1]
        position = min(4, int(stop - start) - 1)
        target = getattr(part, array)
        target[start + position, ...] = value  # every slot of the position (ids: input too)
        where.append(position)

    cache = make_cache(root, tamper=tamper, **SETTINGS)
    return Path(cache), BAD_PART * SETTINGS["per_part"] + BAD_SEQUENCE, where[0]


@pytest.mark.parametrize("kind", sorted(BAD_VALUES))
def test_bad_values_with_a_matching_sha256_are_refused_naming_part_sequence_and_position(
    kind, tmp_path, tiny_student_config, capsys
):
    from trainer.cli import main as trainer_main

    cache, index, position = _bad_cache(tmp_path / "cache", kind)
    what = BAD_VALUES[kind][2]
    located = f"part-000002 of {cache} holds values that no reader can use: sequence 3 of the part, position {position}: {what}"

    # the reader itself, both ways in: a whole part, and the one sequence
    c = logitcache.open(cache)
    with pytest.raises(logitcache.CorruptCacheError) as whole:
        c.read_decoded(BAD_PART)
    assert located in flat(str(whole.value)), whole.value
    with pytest.raises(logitcache.CorruptCacheError) as one:
        c[index]
    assert located in flat(str(one.value)), one.value
    assert c[index - 1].input_ids.numel() > 0  # its neighbours read as before

    # verify names the part too (it always read the values; the sha256 all match)
    code, message = verify_cli(cache, capsys)
    assert code == 2 and "part-000002: " in message, message

    # trainer fit, a full epoch: exit 2 with the reader's message, no traceback, no model
    code, _, err = run_main(
        trainer_main,
        ["trainer", "fit", "--cache", cache, "--student", tiny_student_config,
         "--out", tmp_path / "run", "--batch-size", 4, "--epochs", 1, "--eval-fraction", 0,
         "--no-progress"],
        capsys,
    )  # fmt: skip
    message = flat(err)
    assert code == 2 and "Traceback" not in err, err
    assert message.startswith("trainer: error: ") and located in message, message
    assert "logitcache verify" in message and "re-dump the part" in message, message
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.parametrize(
    ("factory", "phrases"),
    [
        ("build_narrow", ["has 512 ids but the teacher's logits have 100", "--tokenizer"]),
        ("build_shifty", ["logits over 600 ids for a batch, but 512 when probed"]),
    ],
)
def test_dump_refuses_a_teacher_whose_vocabulary_does_not_match(
    factory, phrases, tmp_path, tiny_teacher_dir, stdlib_corpus, capsys
):
    """A 100-id model with the 512-id tokenizer used to dump (exit 0) a cache of input ids
    past the model's vocabulary that verify then rejected; a model whose width changes after
    the probe would store ids past the manifest's vocab_size. Both are refused, committing
    nothing a reader would open."""
    from logitcache.cli.commands import main

    out = tmp_path / "cache"
    code, _, err = run_main(
        main,
        ["logitcache", "dump", "--teacher-factory", f"tests.logitcache.nan_teacher:{factory}",
         "--tokenizer", tiny_teacher_dir, "--data", stdlib_corpus, "--out", out,
         "--device", "cpu", "--seq-len", 64, "--targets", "topk", "--top-k", 4, "--no-progress"],
        capsys,
    )  # fmt: skip
    message = flat(err)
    assert code == 2 and "Traceback" not in err, err
    assert message.startswith("logitcache: error: "), message
    for phrase in phrases:
        assert phrase in message, message
    with pytest.raises(logitcache.LogitCacheError):
        logitcache.open(out)  # nothing, or an unfinished dump of 0 parts
