"""Train a student from a cache with Hugging Face `transformers.Trainer` instead of `trainer fit`.

Teams that receive a cache usually already train with ``transformers.Trainer`` (or TRL, which
subclasses it). Three pieces plug a cache into it, each reusing what `trainer fit` runs:

`CacheSequences`
    A map-style torch ``Dataset``: item i is one sequence of a cache split (the held-out split
    is the one `trainer fit --eval-fraction` holds out, by the same hash). With ``shuffle``
    (the default for training) the order of an epoch is `CacheDataset`'s: parts permuted,
    sequences permuted within windows of ``shuffle_window`` parts, so that each part is decoded
    once per epoch; `DistillationTrainer` then reads the items in that order (a sequential
    sampler) instead of drawing them at random, which on a large cache would decode a whole part
    for nearly every sequence. ``shuffle=False`` gives the storage order, for evaluation or for
    a sampler of your own. Each item holds numpy arrays: ``input_ids`` (T,), ``target_ids`` and
    ``target_logprobs`` (T, k), and ``index`` (the storage index).
`collate_sequences`
    The data collator: `trainer.dataset.collate`, so a batch is exactly a `CacheDataset` batch
    (``input_ids``, ``labels``, ``attention_mask``, ``target_ids``, ``target_logprobs``,
    ``index``), ``labels`` already shifted (``labels[t]`` is the token after ``input_ids[t]``).
`DistillationTrainer`
    A ``transformers.Trainer`` whose ``compute_loss`` runs the student and our sparse loss
    (`trainer.losses.DistillationLoss` or any `LossFn`: ``LOSSES``, tail modes, alpha,
    temperature). Everything else is the Trainer's own: gradient accumulation, bf16,
    ``save_steps``, ``resume_from_checkpoint``, logging, evaluation.

Why a subclass and not ``compute_loss_func``: the Trainer calls ``compute_loss_func(outputs,
labels, num_items_in_batch)``, so the cached targets would have to pass through the model's
``forward``, which does not take them. A Trainer that already overrides ``compute_loss`` (TRL's
trainers do) can call `DistillationTrainer.distillation_loss` from its own.

The loss of a batch is `trainer fit`'s for that batch: the loss function's mean over the
batch's labelled positions. With gradient accumulation the Trainer sums the losses of the
micro-batches of one optimizer step; each is weighted by its share of the step's labelled
positions (``num_items_in_batch``, counted here on our already-shifted labels: the Trainer's own
count drops position 0 of every row for causal LMs, which shift labels themselves), so the sum
is the mean over the whole accumulated batch, the loss (and gradient) of one batch that size.
Under data-parallel training with ``average_tokens_across_devices`` (the default) the count is
over all processes and the loss is scaled by their number, as the Trainer does for its own
losses: the gradient DDP averages is then the global batch's mean, as in `trainer fit`.

``remove_unused_columns``: the Trainer drops every batch key that the model's ``forward`` does
not name, which would drop the cached targets; `DistillationTrainer` turns it off (with a
warning if it was on, as TRL's trainers do).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, SequentialSampler
from transformers import Trainer

from logitcache import Cache, LogitCacheError, Manifest
from trainer.dataset import IGNORE_INDEX, CacheDataset, PartCache, collate
from trainer.losses import DistillationLoss, LossFn, LossParts
from trainer.student import check_output_rows, check_student

__all__ = ["CacheSequences", "DistillationTrainer", "collate_sequences"]


class CacheSequences(Dataset):
    """One cache sequence per item, for samplers and data collators that work item by item.

    The split and its order come from a `CacheDataset` (``batch_size`` 1, one process): the same
    held-out split as `trainer fit` with the same ``eval_fraction``, and with ``shuffle`` the same
    epoch order for the same ``seed`` and ``shuffle_window`` (set with `set_epoch`, which the
    Trainer calls at every epoch). Decoded parts are kept in an LRU of ``parts_in_memory``
    (default two windows, as `CacheDataset` keeps), one per process: each DataLoader worker has
    its own.
    """

    def __init__(
        self,
        cache: str | Path | Cache,
        *,
        split: str = "train",
        eval_fraction: float = 0.0,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_window: int = 1,
        parts_in_memory: int | None = None,
        check_files: bool = True,
    ) -> None:
        self._source = CacheDataset(
            cache, batch_size=1, split=split, eval_fraction=eval_fraction, seed=seed,
            shuffle=shuffle, shuffle_window=shuffle_window, rank=0, world_size=1,
            check_files=check_files,
        )  # fmt: skip
        if parts_in_memory is not None and parts_in_memory < 1:
            raise ValueError(f"parts_in_memory must be at least 1, got {parts_in_memory}")
        self.cache: Cache = self._source.cache
        self.shuffle = shuffle
        self.parts_in_memory = parts_in_memory or 2 * shuffle_window
        self.epoch = 0
        self._order = self._source.epoch_order(0)  # (sequences, 2) (part, local index)
        self._parts: PartCache | None = None  # made on first read, in the reading process

    @property
    def manifest(self) -> Manifest:
        return self.cache.manifest

    def set_epoch(self, epoch: int) -> None:
        """Use the order of `epoch` (a new permutation if ``shuffle``); the Trainer calls this."""
        if self.shuffle and epoch != self.epoch:
            self._order = self._source.epoch_order(epoch)
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._order)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} of a split of {len(self)}")
        pair = self._order[i : i + 1] if i >= 0 else self._order[i:][:1]  # (1, 2)
        if self._parts is None:
            self._parts = PartCache(
                self.cache, self.parts_in_memory, check_files=self._source.check_files
            )
        input_ids, target_ids, target_logprobs, labels = self._parts.sequence(*map(int, pair[0]))
        item = {
            "input_ids": input_ids,  # (T,)
            "target_ids": target_ids,  # (T, k)
            "target_logprobs": target_logprobs,  # (T, k)
            "index": int(self._source.storage_index(pair)[0]),
        }
        if labels is not None:  # a masked-LM cache: the replaced tokens, -1 without a target
            item["masked_labels"] = labels  # (T,)
        return item

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for DataLoader workers without the decoded parts: each worker reads its own."""
        return {**self.__dict__, "_parts": None}


def collate_sequences(features: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
    """The Trainer's ``data_collator``: items of `CacheSequences` (or any mapping with
    ``input_ids`` (T,), ``target_ids`` and ``target_logprobs`` (T, k), optionally ``index``
    and a masked-LM cache's ``masked_labels`` (T,)) -> the batch `trainer fit` trains on
    (`trainer.dataset.collate`: right-padded, next-token ``labels`` with -100 at padding and at
    each sequence's last position, or the masked labels)."""
    sequences = [
        (
            np.asarray(f["input_ids"]),
            np.asarray(f["target_ids"]),
            np.asarray(f["target_logprobs"], dtype=np.float32),
            None if f.get("masked_labels") is None else np.asarray(f["masked_labels"]),
        )
        for f in features
    ]
    indices = np.array([int(f.get("index", -1)) for f in features], dtype=np.int64)
    return collate(sequences, indices)


class DistillationTrainer(Trainer):
    """``transformers.Trainer`` with our sparse distillation loss on the cached targets.

    Pass it what a Trainer takes (``model``, ``args``, ``train_dataset``, ``eval_dataset``, ...)
    plus ``loss_fn``, a `LossFn` (default ``DistillationLoss()``: forward KL on the renormalised
    top-k, alpha 0.5, T 1). The data collator defaults to `collate_sequences`. Datasets that are
    `CacheSequences` are checked against the model here, before any training: a student whose
    vocabulary or context does not fit the cache is refused with a `LogitCacheError`.

    The training log rows get ``ce`` and ``kd`` besides ``loss``, as `trainer fit`'s metrics
    have: this process's means over the labelled positions since the last row (``kd`` is the
    divergence before the ``T**2`` factor).
    """

    #: `compute_loss` already weights each micro-batch by its share of the step's positions.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        args: Any = None,
        *,
        loss_fn: LossFn | None = None,
        data_collator: Any = None,
        **kwargs: Any,
    ) -> None:
        if "loss_is_scaled_for_ga" not in vars(Trainer):
            import transformers

            raise LogitCacheError(
                "DistillationTrainer needs a transformers whose Trainer reads "
                "loss_is_scaled_for_ga (transformers 5), to weight accumulated micro-batches "
                f"itself; this is transformers {transformers.__version__}. Upgrade transformers."
            )
        super().__init__(model, args, data_collator=data_collator or collate_sequences, **kwargs)
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else DistillationLoss()
        if self.args.remove_unused_columns:
            warnings.warn(
                "DistillationTrainer sets remove_unused_columns=False: the Trainer would "
                "otherwise drop target_ids and target_logprobs, which the model's forward does "
                "not take. Set it to False in your TrainingArguments to silence this.",
                UserWarning,
                stacklevel=2,
            )
            self.args.remove_unused_columns = False
        evals = self.eval_dataset
        evals = list(evals.values()) if isinstance(evals, dict) else [evals]
        for ds in [self.train_dataset, *evals]:
            if isinstance(ds, CacheSequences) and self.model is not None:
                where = f"the student ({type(self.model).__name__})"
                check_student(self.model.config, ds.manifest, where)
                check_output_rows(self.model, ds.manifest, where)
        self._logged = torch.zeros(3, dtype=torch.float64)  # positions, ce and kd sums

    # ---- the loss ----------------------------------------------------------------------------
    def distillation_loss(
        self, model: torch.nn.Module, inputs: Mapping[str, Tensor]
    ) -> tuple[LossParts, Any]:
        """The student's forward on ``input_ids`` and ``attention_mask`` and `loss_fn` on its
        logits and the batch: `trainer fit`'s step, without the Trainer's scaling."""
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        return self.loss_fn(outputs.logits, inputs), outputs  # logits (batch, time, vocab)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """The batch's loss (`distillation_loss`); in training, weighted by its share of the
        optimizer step's labelled positions (see the module docstring).

        Evaluation (the model in eval mode) gets the batch's own mean: the Trainer's count for
        it there is its own, over ``labels[..., 1:]``, which is not ours."""
        parts, outputs = self.distillation_loss(model, inputs)
        loss = parts.loss
        if model.training:
            n = (inputs["labels"] != IGNORE_INDEX).sum()
            loss = loss * self._share(n, num_items_in_batch)
            step = torch.stack([n.double(), parts.ce.double() * n, parts.kd.double() * n])
            self._logged = self._logged.to(step.device) + step  # read (a sync) only by `log`
        return (loss, outputs) if return_outputs else loss

    def _share(self, n: Tensor, num_items_in_batch: Tensor | int | None) -> Tensor | float:
        """The factor that turns this micro-batch's mean into its part of the step's mean."""
        if num_items_in_batch is None:  # no count: micro-batches weighted equally
            return 1.0 / getattr(
                self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
            )
        share = n / torch.as_tensor(num_items_in_batch, device=n.device).clamp(min=1)
        if self._counts_all_ranks():
            share = share * self.accelerator.num_processes  # DDP averages the gradients
        return share

    def _counts_all_ranks(self) -> bool:
        return bool(self.args.average_tokens_across_devices and self.args.world_size > 1)

    def get_batch_samples(
        self, epoch_iterator: Any, num_batches: int, device: torch.device
    ) -> tuple[list, Tensor | None]:
        """The micro-batches of one optimizer step and their labelled positions, counted on our
        labels (already shifted, so every non -100 label is a prediction target)."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batch_samples:
            return batch_samples, None
        total = sum((b["labels"] != IGNORE_INDEX).sum() for b in batch_samples).to(device)
        if self._counts_all_ranks():
            total = self.accelerator.gather(total).sum()
        return batch_samples, total

    # ---- data and logs -----------------------------------------------------------------------
    def _get_train_sampler(
        self, train_dataset: Dataset | None = None
    ) -> torch.utils.data.Sampler | None:
        """A `CacheSequences` that shuffles itself is read in its own (part-local) order."""
        ds = self.train_dataset if train_dataset is None else train_dataset
        if isinstance(ds, CacheSequences) and ds.shuffle:
            return SequentialSampler(ds)
        return super()._get_train_sampler(train_dataset)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log row, with ``ce`` and ``kd`` on training rows."""
        positions, ce, kd = self._logged.tolist()
        if "loss" in logs and positions > 0:
            logs = {**logs, "ce": ce / positions, "kd": kd / positions}
            self._logged = torch.zeros_like(self._logged)
        super().log(logs, start_time)
