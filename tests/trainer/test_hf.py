"""`trainer.hf`: a real `transformers.Trainer` trains a student from a cache written by the real
dump, with `trainer fit`'s loss, the Trainer's gradient accumulation, checkpoints and resume."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import TrainingArguments

import logitcache
from logitcache import LogitCacheError
from logitcache.testing import toy
from trainer import (
    CacheDataset,
    CacheSequences,
    DistillationLoss,
    DistillationTrainer,
    collate_sequences,
)
from trainer.evaluation import evaluate_model
from trainer.recipe import FitConfig, fit
from trainer.student import build_student

#: The loss settings the equality tests run: the default, and one that uses every knob.
LOSS_SETTINGS = [
    {},
    {"alpha": 0.2, "temperature": 2.0, "tail": "bucket", "loss": "gjsd", "beta": 0.3},
]


def hf_args(out: Path, **overrides: Any) -> TrainingArguments:
    """Small, quiet, CPU, deterministic TrainingArguments; one step of 8 sequences unless
    overridden."""
    settings: dict[str, Any] = {
        "output_dir": str(out), "per_device_train_batch_size": 8, "max_steps": 1,
        "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
        "use_cpu": True, "disable_tqdm": True, "seed": 0, "dataloader_num_workers": 0,
        "remove_unused_columns": False,
    }  # fmt: skip
    settings.update(overrides)
    return TrainingArguments(**settings)


def student(spec: Path, cache: Path) -> torch.nn.Module:
    """The student `trainer fit` starts from: the seeded init of `build_student`."""
    return build_student(str(spec), logitcache.open(cache).manifest, seed=0)[0]


def train_rows(trainer: DistillationTrainer) -> list[dict[str, float]]:
    return [row for row in trainer.state.log_history if "loss" in row]


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def dropout_student(tmp_path_factory, tiny_teacher_dir) -> Path:
    """The tiny student with dropout, so that a resume must restore the RNG to match."""
    path = tmp_path_factory.mktemp("dropout_student") / "student.json"
    config = toy.build_student_config(
        tiny_teacher_dir, n_layer=1, n_embd=32, n_head=2, n_positions=64,
        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
    )  # fmt: skip
    path.write_text(config.to_json_string(), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# the data: the batches `trainer fit` trains on


def test_collated_sequences_are_the_cache_datasets_batches(tiny_cache):
    """Item by item through the collator, the same batches as `CacheDataset`'s, in the same
    epoch order (storage order, and the shuffled order of each epoch)."""
    plain = CacheSequences(tiny_cache, shuffle=False)
    batch = next(iter(DataLoader(CacheDataset(tiny_cache, batch_size=8, shuffle=False), None)))
    ours = collate_sequences([plain[i] for i in range(8)])
    assert ours.keys() == batch.keys()
    for key in batch:
        assert torch.equal(ours[key], batch[key]), key

    shuffled = CacheSequences(tiny_cache, seed=3, shuffle_window=2)
    reference = CacheDataset(tiny_cache, batch_size=8, seed=3, shuffle_window=2)
    for epoch in (0, 1):
        shuffled.set_epoch(epoch)
        reference.set_epoch(epoch)
        first = next(iter(DataLoader(reference, batch_size=None)))
        assert torch.equal(
            collate_sequences([shuffled[i] for i in range(8)])["index"], first["index"]
        )
    assert not torch.equal(
        collate_sequences([shuffled[i] for i in range(8)])["index"], ours["index"]
    )
    assert len(plain) == len(CacheDataset(tiny_cache, batch_size=1).epoch_order(0))


def test_dataloader_workers_read_the_same_batches(tiny_cache):
    """In a worker process, and pickled (as a spawned worker gets it: without its decoded
    parts), the dataset reads the same items."""
    data = CacheSequences(tiny_cache, seed=1)
    first = data[0]  # decoded parts in this process
    copy = pickle.loads(pickle.dumps(data))
    assert copy._parts is None and np.array_equal(
        copy[0]["target_logprobs"], first["target_logprobs"]
    )
    kwargs = {"batch_size": 4, "collate_fn": collate_sequences}
    here = [b["index"] for b, _ in zip(DataLoader(data, **kwargs), range(3), strict=False)]
    there = DataLoader(data, num_workers=1, **kwargs)
    for a, (b, _) in zip(here, zip(there, range(3), strict=False), strict=True):
        assert torch.equal(a, b["index"])


def test_the_splits_are_trainer_fits(tiny_cache):
    train = CacheSequences(tiny_cache, split="train", eval_fraction=0.2, shuffle=False)
    held_out = CacheSequences(tiny_cache, split="eval", eval_fraction=0.2, shuffle=False)
    train_ids = {train[i]["index"] for i in range(len(train))}
    eval_ids = {held_out[i]["index"] for i in range(len(held_out))}
    assert not train_ids & eval_ids and len(train_ids | eval_ids) == len(
        logitcache.open(tiny_cache)
    )
    expected = CacheDataset(
        tiny_cache, batch_size=1, split="eval", eval_fraction=0.2, shuffle=False
    )
    assert eval_ids == set(expected.storage_index(expected.epoch_order(0)).tolist())
    with pytest.raises(IndexError):
        train[len(train)]


# --------------------------------------------------------------------------------------------
# (a) the loss is `trainer fit`'s


@pytest.mark.parametrize("settings", LOSS_SETTINGS, ids=["default", "gjsd-bucket-T2"])
def test_the_trainers_first_loss_is_trainer_fits(
    tmp_path, tiny_cache, tiny_student_config, settings
):
    """The same student init, the same first batch (the same shuffled order), the same loss
    settings: the Trainer's logged loss of step 1 is `trainer fit`'s, to float32 rounding."""
    config = FitConfig(
        cache=str(tiny_cache), student=str(tiny_student_config), out=str(tmp_path / "fit"),
        steps=1, batch_size=8, eval_fraction=0.0, checkpoint_every=0, log_every=1,
        progress=False, **settings,
    )  # fmt: skip
    fit(config)
    rows = [json.loads(x) for x in (tmp_path / "fit" / "metrics.jsonl").read_text().splitlines()]
    fit_row = next(r for r in rows if r["kind"] == "train" and r["step"] == 1)

    loss_fn = DistillationLoss(
        alpha=config.alpha, temperature=config.temperature, tail=config.tail,
        loss=config.loss, beta=config.beta,
    )  # fmt: skip
    trainer = DistillationTrainer(
        model=student(tiny_student_config, tiny_cache), args=hf_args(tmp_path / "hf"),
        train_dataset=CacheSequences(tiny_cache, seed=config.seed), loss_fn=loss_fn,
    )  # fmt: skip
    trainer.train()
    (row,) = train_rows(trainer)
    for key in ("loss", "ce", "kd"):
        assert row[key] == pytest.approx(fit_row[key], rel=1e-6, abs=1e-7), (key, row, fit_row)


def test_compute_loss_on_a_batch_is_the_loss_functions(tmp_path, tiny_cache, tiny_student_config):
    """Directly: in training mode with the batch's own count, and in evaluation mode, the
    loss of a batch is `DistillationLoss` of the student's logits on it."""
    model = student(tiny_student_config, tiny_cache)
    trainer = DistillationTrainer(model=model, args=hf_args(tmp_path))
    batch = collate_sequences([CacheSequences(tiny_cache, shuffle=False)[i] for i in range(5)])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = DistillationLoss()(logits, batch).loss
        n = (batch["labels"] != -100).sum()
        assert torch.equal(trainer.compute_loss(model, batch, num_items_in_batch=n), expected)
        # a micro-batch that is a third of its step's positions carries a third of the loss
        third = trainer.compute_loss(model, batch, num_items_in_batch=3 * n)
        assert third.item() == pytest.approx(expected.item() / 3, rel=1e-6)
        model.eval()
        assert torch.equal(trainer.compute_loss(model, batch, num_items_in_batch=3 * n), expected)


# --------------------------------------------------------------------------------------------
# (d) gradient accumulation is the larger batch


def test_gradient_accumulation_is_the_larger_batch(tmp_path, tiny_cache, tiny_student_config):
    """One step of 2 x 4 sequences equals one step of 8: the loss, the gradient norm and the
    weights after an SGD update. The first micro-batch holds 4 sequences cut to 8 tokens, the
    second 4 whole ones, so weighting them equally (the mean of the two means) would differ."""
    data = CacheSequences(tiny_cache, shuffle=False)
    cut = [{k: v[:8] if k != "index" else v for k, v in data[i].items()} for i in range(4)]
    subset = [*cut, *(data[i] for i in range(4, 8))]  # any sized sequence of items will do

    results = []
    for per_device, accumulate in ((8, 1), (4, 2)):
        model = student(tiny_student_config, tiny_cache)
        trainer = DistillationTrainer(
            model=model, train_dataset=subset,
            args=hf_args(
                tmp_path / f"{per_device}x{accumulate}", per_device_train_batch_size=per_device,
                gradient_accumulation_steps=accumulate, optim="sgd", learning_rate=0.5,
                train_sampling_strategy="sequential", lr_scheduler_type="constant",
            ),
        )  # fmt: skip
        trainer.train()
        (row,) = train_rows(trainer)
        results.append((row, weights(model)))
    (big, big_weights), (accumulated, accumulated_weights) = results
    assert accumulated["loss"] == pytest.approx(big["loss"], rel=1e-6)
    assert accumulated["grad_norm"] == pytest.approx(big["grad_norm"], rel=1e-5)
    for key, value in big_weights.items():
        torch.testing.assert_close(accumulated_weights[key], value, rtol=1e-5, atol=1e-6)

    # The batch of 8 itself, and what equal weighting of the micro-batches would have given.
    model = student(tiny_student_config, tiny_cache)
    halves = [collate_sequences([subset[i] for i in range(a, a + 4)]) for a in (0, 4)]
    whole = collate_sequences([subset[i] for i in range(8)])
    with torch.no_grad():
        losses = [
            DistillationLoss()(
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b
            ).loss.item()
            for b in (whole, *halves)
        ]
    assert big["loss"] == pytest.approx(losses[0], rel=1e-6)
    equal_weights = (losses[1] + losses[2]) / 2
    assert abs(equal_weights - losses[0]) > 100 * 1e-6 * losses[0], losses  # the test can tell


# --------------------------------------------------------------------------------------------
# (b) training distils


def test_a_short_run_lowers_the_held_out_kl(tmp_path, tiny_cache, tiny_student_config):
    """Held-out KL to the teacher (`trainer evaluate`'s measure, on sequences the run never saw)
    before and after 40 Trainer steps; the Trainer's own eval loss falls too."""
    model = student(tiny_student_config, tiny_cache)
    held_out = CacheDataset(
        tiny_cache, batch_size=16, split="eval", eval_fraction=0.1, shuffle=False
    )

    def kl() -> float:
        loader = DataLoader(held_out, batch_size=None)
        return evaluate_model(model, loader, device=torch.device("cpu"))["kl"]

    trainer = DistillationTrainer(
        model=model,
        args=hf_args(tmp_path, max_steps=40, learning_rate=3e-3, logging_steps=10,
                     per_device_eval_batch_size=16, prediction_loss_only=True),
        train_dataset=CacheSequences(tiny_cache, eval_fraction=0.1),
        eval_dataset=CacheSequences(tiny_cache, split="eval", eval_fraction=0.1, shuffle=False),
    )  # fmt: skip
    before, eval_before = kl(), trainer.evaluate()["eval_loss"]
    trainer.train()
    after, eval_after = kl(), trainer.evaluate()["eval_loss"]
    print(
        f"held-out KL {before:.4f} -> {after:.4f}; eval loss {eval_before:.4f} -> {eval_after:.4f}"
    )
    assert after < 0.8 * before, (before, after)
    assert eval_after < eval_before
    rows = train_rows(trainer)
    assert len(rows) == 4 and all(math.isfinite(r["kd"]) for r in rows)
    assert rows[-1]["kd"] < rows[0]["kd"]


# --------------------------------------------------------------------------------------------
# (c) checkpoints and resume


def test_a_resumed_run_ends_where_the_uninterrupted_one_does(tmp_path, tiny_cache, dropout_student):
    """6 steps with a checkpoint every 4, over epochs of 3 steps (so the resumed epoch is
    reshuffled by `set_epoch` and its first batch skipped), with dropout and gradient
    accumulation: resuming from step 4 continues at step 5 and ends with the uninterrupted run's
    losses and weights."""
    train = CacheSequences(tiny_cache, eval_fraction=0.97)  # a few sequences: short epochs
    per_epoch = math.ceil(len(train) / 8)
    assert 4 % per_epoch != 0, per_epoch  # the checkpoint is mid-epoch

    def run(out: Path, resume: str | None = None) -> tuple[DistillationTrainer, dict]:
        model = student(dropout_student, tiny_cache)
        trainer = DistillationTrainer(
            model=model, train_dataset=CacheSequences(tiny_cache, eval_fraction=0.97),
            args=hf_args(out, max_steps=6, save_strategy="steps", save_steps=4,
                         per_device_train_batch_size=4, gradient_accumulation_steps=2),
        )  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return trainer, weights(model)

    whole, whole_weights = run(tmp_path / "whole")
    assert whole.state.epoch == pytest.approx(6 / per_epoch)
    assert (tmp_path / "whole" / "checkpoint-4").is_dir()
    resumed, resumed_weights = run(tmp_path / "resumed", str(tmp_path / "whole" / "checkpoint-4"))
    assert resumed.state.global_step == 6
    steps = [r["step"] for r in train_rows(resumed)]
    assert steps == [1, 2, 3, 4, 5, 6]  # the checkpoint's history, then the new steps
    for a, b in zip(train_rows(whole)[4:], train_rows(resumed)[4:], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), (a, b)
    for key, value in whole_weights.items():
        torch.testing.assert_close(resumed_weights[key], value, rtol=0, atol=1e-6)
    # and not trivially: the weights moved after the checkpoint
    fresh = student(dropout_student, tiny_cache)
    assert not torch.equal(whole_weights["lm_head.weight"], fresh.state_dict()["lm_head.weight"])


# --------------------------------------------------------------------------------------------
# settings and refusals


def test_remove_unused_columns_is_turned_off_with_a_warning(
    tmp_path, tiny_cache, tiny_student_config
):
    args = hf_args(tmp_path, remove_unused_columns=True)
    with pytest.warns(UserWarning, match="remove_unused_columns=False"):
        trainer = DistillationTrainer(
            model=student(tiny_student_config, tiny_cache), args=args,
            train_dataset=CacheSequences(tiny_cache),
        )  # fmt: skip
    trainer.train()  # the cached targets reached the loss: it would raise on a missing key
    assert train_rows(trainer)[0]["kd"] > 0


def test_a_student_that_does_not_fit_the_cache_is_refused(tmp_path, tiny_cache, tiny_teacher_dir):
    """`trainer.student`'s checks, when the Trainer is made: before any step or write."""
    from transformers import AutoModelForCausalLM

    def model(**overrides: int) -> torch.nn.Module:
        settings = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64, **overrides}
        return AutoModelForCausalLM.from_config(
            toy.build_student_config(tiny_teacher_dir, **settings)
        )

    data = CacheSequences(tiny_cache)
    with pytest.raises(LogitCacheError, match=r"vocabulary mismatch: .*vocab_size 500, .*512"):
        DistillationTrainer(model=model(vocab_size=500), args=hf_args(tmp_path), train_dataset=data)
    held_out = {"held": CacheSequences(tiny_cache, shuffle=False)}  # a dict of eval sets too
    with pytest.raises(LogitCacheError, match=r"at most 16 positions, .* 64 tokens long"):
        DistillationTrainer(
            model=model(n_positions=16), args=hf_args(tmp_path), eval_dataset=held_out
        )
    resized = model()
    resized.resize_token_embeddings(520)  # the config follows; the cache does not
    with pytest.raises(LogitCacheError, match="vocabulary mismatch"):
        DistillationTrainer(model=resized, args=hf_args(tmp_path), train_dataset=data)
    assert not any(tmp_path.iterdir())  # nothing written


def test_bf16_trains_with_the_fp32_loss(tmp_path, tiny_cache, tiny_student_config):
    """bf16 autocast on this machine (CPU here): the first loss is within bf16 rounding of the
    fp32 one, and the weights stay float32."""
    losses = []
    for bf16 in (False, True):
        model = student(tiny_student_config, tiny_cache)
        trainer = DistillationTrainer(
            model=model, args=hf_args(tmp_path / str(bf16), bf16=bf16),
            train_dataset=CacheSequences(tiny_cache),
        )  # fmt: skip
        trainer.train()
        losses.append(train_rows(trainer)[0]["loss"])
        assert next(model.parameters()).dtype == torch.float32
    assert losses[1] == pytest.approx(losses[0], rel=2e-2) and losses[1] != losses[0]
