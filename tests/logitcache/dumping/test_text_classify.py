"""`dump --task classification` with a text classifier: a saved BERT sequence classifier and its
own tokenizer over stdlib snippets from .jsonl, Parquet, `datasets` and .txt inputs, each row
equal to the model run directly on its text; ensembles of text classifiers in one pass, equal to
the direct average of the teachers; and the bad inputs a text dump refuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import logitcache
from logitcache import DumpOptions, dump
from logitcache.errors import LogitCacheError
from tests.logitcache.classifiers import bag_of_tokens
from tests.logitcache.dump_helpers import describe, flat, run_cli
from tests.logitcache.textcls_helpers import SEQ_LEN, TextTask, build_text_task, teacher_logprobs

FULL = {"task": "classification", "targets": "full", "seq_len": SEQ_LEN, "progress": False,
        "device": "cpu", "part_tokens": 10}  # fmt: skip

#: The dump's padded batches against each text's own forward: the same model, but matmuls of
#: other shapes, which round float32 otherwise (up to 3.8e-6 on an AVX2 EPYC). Padding that
#: leaked into attention would move log-probs by orders of magnitude more.
BATCHED_ATOL = 2e-5


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory, one_torch_thread) -> TextTask:
    return build_text_task(tmp_path_factory.mktemp("textcls"))


def text_dump(data: Path, out: Path, **options: object) -> logitcache.Cache:
    dump(DumpOptions(data=str(data), out=str(out), **(FULL | options)))
    return logitcache.open(out)


def full_rows(cache: logitcache.Cache) -> tuple[np.ndarray, np.ndarray | None]:
    """(rows, classes) log-probs in class order, and the labels (None if the cache has none)."""
    parts = [cache.read_decoded(i) for i in range(cache.num_parts)]
    ids = np.concatenate([p.target_ids for p in parts])
    out = np.empty(ids.shape, dtype=np.float64)
    np.put_along_axis(out, ids, np.concatenate([p.target_logprobs for p in parts]), axis=-1)
    labels = None if parts[0].labels is None else np.concatenate([p.labels for p in parts])
    return out, labels


def jsonl_rows(path: Path) -> tuple[list[str], list[int]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def test_a_text_cache_holds_each_texts_teacher_distribution(task: TextTask, tmp_path: Path):
    cache = text_dump(task.train, tmp_path / "c", teacher=str(task.teacher))
    m = cache.manifest
    assert m.format_version == "1.3" and m.task is not None
    assert (m.task.input, m.task.shape, m.task.labels, m.task.views) == ("text", [SEQ_LEN], True, 0)
    assert m.task.classes == ["asyncio", "email", "multiprocessing", "xml"]
    assert m.tokenizer.fingerprint == logitcache.tokenizer_fingerprint(task.tokenizer)
    assert (m.data.format, m.data.text_field, m.teacher.max_positions) == ("jsonl", "text", 128)
    texts, labels = jsonl_rows(task.train)
    assert (m.sequences, m.tokens, len(m.parts)) == (len(texts), len(texts), -(-len(texts) // 10))
    got, stored = full_rows(cache)
    assert stored.tolist() == labels
    np.testing.assert_allclose(got, teacher_logprobs(task.teacher, texts, task.tokenizer),
                               atol=BATCHED_ATOL)  # fmt: skip
    assert logitcache.verify(cache).problems == []


def test_parquet_and_datasets_tables_with_named_columns(task: TextTask, tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts, labels = jsonl_rows(task.train)
    pq.write_table(pa.table({"body": texts, "package": labels}), tmp_path / "d.parquet")
    datasets.Dataset.from_dict({"body": texts, "package": labels}).save_to_disk(tmp_path / "ds")
    want = teacher_logprobs(task.teacher, texts, task.tokenizer)
    for name, fmt in (("d.parquet", "parquet"), ("ds", "arrow")):
        cache = text_dump(tmp_path / name, tmp_path / f"c-{fmt}", teacher=str(task.teacher),
                          input_field="body", label_field="package")  # fmt: skip
        got, stored = full_rows(cache)
        assert (cache.manifest.data.format, stored.tolist()) == (fmt, labels)
        np.testing.assert_allclose(got, want, atol=BATCHED_ATOL)


def test_short_texts_of_a_txt_file_are_padded_and_masked(task: TextTask, tmp_path: Path) -> None:
    lines = ["import os", "msg = email.message_from_string(raw)", "x" * 400, "async def f(): pass"]
    (tmp_path / "d.txt").write_text("\n".join(lines) + "\n")
    cache = text_dump(tmp_path / "d.txt", tmp_path / "c", teacher=str(task.teacher))
    got, labels = full_rows(cache)
    assert labels is None and not cache.manifest.task.labels
    np.testing.assert_allclose(got, teacher_logprobs(task.teacher, lines, task.tokenizer),
                               atol=BATCHED_ATOL)  # fmt: skip


def test_a_factory_text_classifier_reads_the_ids_and_mask_of_its_tokenizer(
    task: TextTask, tmp_path: Path
) -> None:
    cache = text_dump(task.heldout, tmp_path / "c", tokenizer=str(task.teacher),
                      teacher_factory="tests.logitcache.classifiers:bag_of_tokens")  # fmt: skip
    texts, _ = jsonl_rows(task.heldout)
    model = bag_of_tokens()
    with torch.inference_mode():
        want = []
        for text in texts:
            ids = task.tokenizer(text, truncation=True, max_length=SEQ_LEN, return_tensors="pt")
            logits = model(ids["input_ids"], torch.ones_like(ids["input_ids"]))
            want.append(torch.log_softmax(logits[0].double(), -1).numpy())
    np.testing.assert_allclose(full_rows(cache)[0], np.stack(want), atol=BATCHED_ATOL)
    assert cache.manifest.tokenizer.fingerprint == logitcache.tokenizer_fingerprint(task.tokenizer)
    assert cache.manifest.task.classes == []  # a factory names no classes


@pytest.mark.parametrize(("mode", "temperature"), [("logits", 1.0), ("probs", 2.0)])
def test_an_ensemble_of_text_classifiers_is_the_direct_average(
    task: TextTask, tmp_path: Path, mode: str, temperature: float
) -> None:
    teachers = [str(task.teacher), str(task.other_seed)]
    cache = text_dump(task.heldout, tmp_path / "c", teachers=teachers, weights=[3.0, 1.0],
                      ensemble=mode, temperature=temperature)  # fmt: skip
    m = cache.manifest
    assert m.ensemble is not None and [x.weight for x in m.ensemble.members] == [0.75, 0.25]
    assert m.task is not None and m.task.classes[0] == "asyncio"
    texts, _ = jsonl_rows(task.heldout)
    a, b = (teacher_logprobs(t, texts, task.tokenizer) for t in (task.teacher, task.other_seed))
    if mode == "logits":  # log_softmax of a log-prob average is that of the logits' average
        mean = (0.75 * a + 0.25 * b) / temperature
        want = mean - np.log(np.exp(mean).sum(-1, keepdims=True))
    else:
        a_t, b_t = (x / temperature - np.log(np.exp(x / temperature).sum(-1, keepdims=True))
                    for x in (a, b))  # fmt: skip
        want = np.log(0.75 * np.exp(a_t) + 0.25 * np.exp(b_t))
    got, _ = full_rows(cache)  # stored at the dump temperature
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.abs(got - a / temperature).max() > 0.05  # not the first teacher alone


def test_an_ensemble_of_classifiers_with_other_class_names_is_refused(
    task: TextTask, tmp_path: Path
) -> None:
    with pytest.raises(LogitCacheError, match="share one label space") as exc:
        text_dump(task.heldout, tmp_path / "c", teachers=[str(task.teacher), str(task.other_names)])
    assert "'asyncio'" in str(exc.value) and "'other0'" in str(exc.value)
    assert not (tmp_path / "c").exists()


def test_bad_text_inputs_are_refused_before_out_is_touched(task: TextTask, tmp_path: Path):
    teacher = {"teacher": str(task.teacher)}
    (tmp_path / "numbers.jsonl").write_text('{"text": 3, "label": 0}\n')
    (tmp_path / "far.jsonl").write_text('{"text": "import os", "label": 7}\n')
    (tmp_path / "bad-tok").mkdir()
    (tmp_path / "bad-tok/tokenizer.json").write_text("{not json")
    cases = [
        ({"data": task.train, "input_field": "body"}, "has no column 'body'"),
        ({"data": tmp_path / "numbers.jsonl"}, "'text' is not a text column (row 0 holds int)"),
        ({"data": task.train, "tokenizer": str(tmp_path / "bad-tok/tokenizer.json")}, "--tokenizer"),
        ({"data": tmp_path / "far.jsonl"}, "label 7 of example 0 is out of range for a teacher with 4"),
        ({"data": task.train, "seq_len": 500}, "longer than the teacher's maximum of 128"),
    ]  # fmt: skip
    for options, message in cases:
        out = tmp_path / "out"
        with pytest.raises(LogitCacheError, match=message.replace("(", r"\(").replace(")", r"\)")):
            text_dump(options.pop("data"), out, **(teacher | options))
        assert not out.exists()


def test_the_cli_dumps_text_and_refuses_views_and_an_image_teacher_on_text(
    task: TextTask, tmp_path: Path
) -> None:
    common = ("dump", "--task", "classification", "--data", task.heldout, "--seq-len", SEQ_LEN)
    proc = run_cli(*common, "--teacher", task.teacher, "--out", tmp_path / "c")
    assert proc.returncode == 0, describe(proc)
    assert "4 classes" in flat(proc.stdout), describe(proc)
    info = run_cli("info", tmp_path / "c")
    assert info.returncode == 0, describe(info)
    assert (f"task classification of text [{SEQ_LEN}], 4 classes: asyncio, email, "
            "multiprocessing, xml, labels, one row per example") in flat(info.stdout)  # fmt: skip
    proc = run_cli(*common, "--teacher", task.teacher, "--out", tmp_path / "v", "--views", "2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, describe(proc)
    assert "a text classifier reads each example whole" in flat(proc.stderr)
    proc = run_cli(*common, "--teacher-factory", "tests.logitcache.classifiers:cnn",
                   "--out", tmp_path / "i")  # fmt: skip
    assert proc.returncode == 2 and "holds text" in flat(proc.stderr), describe(proc)
    assert not (tmp_path / "v").exists() and not (tmp_path / "i").exists()
