"""`logitcache.runtime`: what the dump and the trainer share of the machine (device, tokenizer,
torchrun's world size, agreeing on an error), and that both CLIs now say the same thing."""

from __future__ import annotations

import json

import pytest
import torch

from logitcache.cli.commands import main as logitcache_main
from logitcache.errors import CorruptCacheError, LogitCacheError
from logitcache.runtime import (
    agree_on_errors,
    load_tokenizer,
    resolve_device,
    torchrun_world_size,
)
from tests.faults.helpers import run_main
from tests.synthetic import synthetic_cache
from trainer.cli import main as trainer_main

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def flat(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------
# resolve_device


def test_a_device_is_resolved_or_explained() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(LogitCacheError, match="unknown device 'tpu'; use cpu, cuda, cuda:N"):
        resolve_device("tpu")


@no_cuda
def test_cuda_where_there_is_none_is_refused() -> None:
    with pytest.raises(LogitCacheError, match="--device cuda:1 asked for CUDA, but none"):
        resolve_device("cuda:1")


@no_cuda
def test_both_clis_refuse_cuda_on_a_cpu_machine_with_the_same_message(tmp_path, capsys) -> None:
    text = tmp_path / "data.txt"
    text.write_text("some text\n")
    dump = run_main(
        logitcache_main,
        ["logitcache", "dump", "--teacher", tmp_path / "unread-teacher", "--data", text,
         "--out", tmp_path / "cache", "--device", "cuda", "--no-progress"],
        capsys,
    )  # fmt: skip
    cache = synthetic_cache(tmp_path / "synthetic", sequences=8)
    student = tmp_path / "student"
    student.mkdir()
    (student / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (student / "model.safetensors").write_bytes(b"")  # never read: the device is refused first
    train = run_main(
        trainer_main,
        ["trainer", "eval", "--cache", cache, "--student", student, "--split", "all",
         "--device", "cuda"],
        capsys,
    )  # fmt: skip
    said = "--device cuda asked for CUDA, but none is available here; use cpu."
    for prog, (code, _, err) in {"logitcache": dump, "trainer": train}.items():
        assert code == 2 and flat(err) == f"{prog}: error: {said}", err


# --------------------------------------------------------------------------------------------
# load_tokenizer


def test_a_missing_tokenizer_names_the_flag_and_is_never_looked_up(tmp_path) -> None:
    missing = str(tmp_path / "no-such-tokenizer")
    with pytest.raises(LogitCacheError) as info:
        load_tokenizer(missing, flag="--tokenizer", local_only=True)
    assert str(info.value).startswith(f"cannot load a tokenizer from --tokenizer {missing}: ")
    assert "the path does not exist." in str(info.value)
    assert "Pass --tokenizer with a directory saved by save_pretrained" in str(info.value)


def test_a_tokenizer_json_file_loads(tmp_path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    loaded = load_tokenizer(str(path))
    assert loaded("a b")["input_ids"] == [1, 2]


# --------------------------------------------------------------------------------------------
# torchrun's world size


@pytest.mark.parametrize(("value", "world"), [(None, 1), ("4", 4), ("not a number", 1)])
def test_the_world_size_is_torchruns_or_one(monkeypatch, value, world) -> None:
    if value is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", value)
    assert torchrun_world_size() == world


# --------------------------------------------------------------------------------------------
# agree_on_errors: simulated ranks (the gather returns what every rank sent)


def ranks(messages: list[str | None]):
    """A gather for one rank of a job where the ranks sent `messages` (this rank's included)."""
    return lambda mine: [*messages]


def fail(message: str, kind: type[LogitCacheError] = LogitCacheError):
    def fn():
        raise kind(message)

    return fn


def test_without_an_error_every_rank_gets_its_own_result() -> None:
    assert agree_on_errors(lambda mine: [mine], lambda: 7) == 7
    assert agree_on_errors(ranks([None, None, None]), lambda: "ok") == "ok"


def test_a_failing_rank_raises_its_own_error() -> None:
    with pytest.raises(CorruptCacheError, match=r"^mine$"):
        agree_on_errors(ranks([None, "mine"]), fail("mine", CorruptCacheError))


def test_the_other_ranks_raise_the_lowest_failing_ranks_message() -> None:
    with pytest.raises(LogitCacheError, match=r"^first$"):
        agree_on_errors(ranks([None, "first", "second"]), lambda: 1)
    with pytest.raises(LogitCacheError, match=r"^rank 1 failed: first$"):
        agree_on_errors(ranks([None, "first", "second"]), lambda: 1, name_the_rank=True)


def test_each_rank_sends_its_message_or_none() -> None:
    sent: list[str | None] = []

    def gather(mine: str | None) -> list[str | None]:
        sent.append(mine)
        return [mine]

    agree_on_errors(gather, lambda: 1)
    with pytest.raises(LogitCacheError):
        agree_on_errors(gather, fail("bad"))
    assert sent == [None, "bad"]


def test_nothing_but_a_logitcache_error_is_agreed_on() -> None:
    """A bug keeps its traceback and is not gathered (the job fails as it would alone)."""
    sent: list[str | None] = []

    def bug():
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        agree_on_errors(lambda mine: sent.append(mine) or [mine], bug)
    assert sent == []
