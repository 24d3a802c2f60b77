"""`trainer fit --task classification` on a text cache: the trainer tokenizes --data into exactly
the teacher's inputs (the teacher itself, evaluated as a student, has zero KL and full
agreement), a sequence-classification student trains from the cache through the CLI and reports
held-out metrics, and a tokenizer other than the cache's is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import logitcache
from logitcache import DumpOptions, dump
from logitcache.examples.text import TextInputs
from logitcache.testing.textcls import PACKAGES, package_files
from logitcache.testing.tokenizer import train_tokenizer
from tests.cli import REPO, cli_env
from tests.logitcache.textcls_helpers import SEQ_LEN, TextTask, build_text_task
from trainer.classify import ClassifierConfig, cache_examples, evaluate_classifier, load_rows

FULL = {"task": "classification", "targets": "full", "seq_len": SEQ_LEN, "progress": False,
        "device": "cpu"}  # fmt: skip


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> TextTask:
    torch.set_num_threads(1)
    return build_text_task(tmp_path_factory.mktemp("textcls"))


@pytest.fixture(scope="module")
def caches(task: TextTask, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("caches")
    for name, data in (("train", task.train), ("heldout", task.heldout)):
        dump(DumpOptions(data=str(data), out=str(root / name), teacher=str(task.teacher), **FULL))
    return {"train": root / "train", "heldout": root / "heldout"}


def config(caches: dict[str, Path], task: TextTask, **options: object) -> ClassifierConfig:
    settings = {"cache": str(caches["heldout"]), "data": str(task.heldout), "student": "",
                "progress": False} | options  # fmt: skip
    return ClassifierConfig(**settings)


def test_the_trainer_reads_the_teachers_own_inputs(caches: dict[str, Path], task: TextTask):
    from transformers import AutoModelForSequenceClassification

    cache = logitcache.open(caches["heldout"])
    examples = cache_examples(cache, str(task.heldout), config(caches, task))
    assert examples.input == "text" and tuple(examples.inputs.shape[1:]) == (2, SEQ_LEN)
    teacher = TextInputs(AutoModelForSequenceClassification.from_pretrained(task.teacher))
    got = evaluate_classifier(teacher, examples, torch.device("cpu"), load_rows(cache, examples))
    assert got["kl"] < 1e-6 and got["agreement"] == 1.0, got


def test_another_tokenizer_is_refused(caches, task: TextTask, tmp_path: Path) -> None:
    other = train_tokenizer(package_files(PACKAGES[0])[:2], vocab_size=300, masked_lm=True)
    other.save_pretrained(tmp_path / "tok")
    cache = logitcache.open(caches["heldout"])
    with pytest.raises(logitcache.LogitCacheError, match=r"not the one .* was dumped with"):
        cache_examples(
            cache, str(task.heldout), config(caches, task, tokenizer=str(tmp_path / "tok"))
        )


def test_a_text_student_trains_from_the_cache_through_the_cli(caches, task: TextTask, tmp_path):
    from transformers import BertConfig

    student = tmp_path / "student"
    BertConfig(vocab_size=len(task.tokenizer), hidden_size=16, num_hidden_layers=1,
               num_attention_heads=2, intermediate_size=32, max_position_embeddings=SEQ_LEN,
               num_labels=len(PACKAGES), architectures=["BertForSequenceClassification"],
               ).save_pretrained(student)  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "fit", "--task", "classification", "--cache",
         caches["train"], "--data", task.train, "--student", student, "--out", tmp_path / "run",
         "--eval-cache", caches["heldout"], "--eval-data", task.heldout, "--epochs", "6",
         "--batch-size", "8", "--lr", "1e-2", "--temperature", "2", "--no-progress"],
        capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["rows"] == 4 * 12 and len(summary["epochs"]) == 6
    assert set(summary["eval"]) == {"accuracy", "ce", "kl", "agreement"}
    assert summary["epochs"][-1]["kd"] < summary["epochs"][0]["kd"]  # it learns the teacher
    assert "held-out agreement" in proc.stdout and (tmp_path / "run/model.pt").is_file()


def test_a_student_narrower_than_the_tokenizer_is_refused(caches, task: TextTask, tmp_path):
    from transformers import BertConfig

    from trainer.classify import fit_classifier

    BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32, num_labels=len(PACKAGES),
               architectures=["BertForSequenceClassification"]).save_pretrained(tmp_path / "s")  # fmt: skip
    narrow = config(caches, task, student=str(tmp_path / "s"), out=str(tmp_path / "run"))
    with pytest.raises(logitcache.LogitCacheError, match="embeds 50 token ids, but the examples"):
        fit_classifier(narrow)
    assert not (tmp_path / "run").exists()


def test_a_factory_module_is_a_text_student_too(caches, task: TextTask, tmp_path: Path) -> None:
    from trainer.classify import fit_classifier

    run = config(caches, task, student="tests.logitcache.classifiers:bag_of_tokens",
                 cache=str(caches["train"]), data=str(task.train), out=str(tmp_path / "run"),
                 epochs=2, batch_size=8, eval_cache=str(caches["heldout"]),
                 eval_data=str(task.heldout))  # fmt: skip
    summary = fit_classifier(run)
    assert summary["rows"] == 4 * 12 and len(summary["epochs"]) == 2
    assert set(summary["eval"]) == {"accuracy", "ce", "kl", "agreement"}
