"""Streaming a cache into training: deterministic, shuffled, resumable, split across workers/ranks.

The order of an epoch is a pure function of (seed, epoch, manifest counts), computed without
reading any data:

1. the parts are permuted (seeded by seed and epoch);
2. consecutive groups of `shuffle_window` parts form windows; the sequences of a window are
   permuted together (so memory holds at most about two windows of decoded parts);
3. the order is cut into *global batches* of `batch_size` sequences: global batch j is what one
   optimizer step consumes across all ranks. Rank r of `world_size` takes the sequences
   ``r, r + world_size, r + 2 * world_size, ...`` of each global batch (so per-rank batches
   hold ``batch_size / world_size`` sequences, and differ by at most one when that does not
   divide). In the last global batch of an epoch a rank may have nothing left: it then gets a
   *padding batch*, one real sequence with every label -100 and ``index`` -1, which carries no
   loss, so that every rank takes the same number of steps (DDP would otherwise hang). With one
   rank there is never padding.
4. the rank's i-th batch still to come is made by DataLoader worker i % num_workers. PyTorch's
   DataLoader takes batches from its workers round-robin, starting with worker 0, so the rank
   sees its batches in order.

Resuming is exact: the state is (epoch, global batches consumed), and every worker skips the
consumed batches by index, without reading them. Because the state counts global batches, a run
may resume with another number of ranks (same `batch_size`): it continues with the same global
batches, in the same order (docs/SCALING.md). The held-out split is chosen per sequence by a hash of
its storage index with a fixed salt (not the seed), so it never changes between runs.

A masked-LM cache (format 1.3) stores `views` maskings of each data sequence as consecutive
sequences. Its views are held out together (the hash is of the data sequence, ``index //
views``), and the train split of epoch e holds view ``e % views`` of each sequence only: the
student sees a different masking each epoch, as online masked-LM training would, without the
teacher. Its labels are the tokens the masking replaced, -100 at every other position.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

import logitcache
from logitcache import Cache, LogitCacheError, PartArrays

#: What fills an empty split: the eval split grows with the fraction, the train split shrinks.
_EMPTY_SPLIT_FIX = {
    "eval": "Use a larger --eval-fraction or a larger cache (`trainer fit --eval-fraction 0` "
    "holds nothing out).",
    "train": "Use a smaller --eval-fraction, or a larger cache.",
    "all": "Dump data into the cache.",
}
#: The held-out sequences, the rest, or every sequence (`trainer eval --split`).
SPLITS = ("eval", "train", "all")
IGNORE_INDEX = -100
_SPLIT_SALT = np.uint64(0x5EED_0F_CAC4E)


def refuse_classification(cache: Cache) -> None:
    """Refuse a classification cache (format 1.3 `task`): its rows are an example's (or a
    view's) class distribution, with no token ids, so a language-model student has nothing to
    read. `trainer fit --task classification` trains from it, and evaluates it too."""
    task = cache.manifest.task
    if task is not None:
        raise LogitCacheError(
            f"{cache.root} is a {task.kind} cache (dumped with `logitcache dump --task "
            f"{task.kind}`): one class distribution per example, no token ids, so the "
            "language-model trainer cannot read it. Use `trainer fit --task classification "
            "--cache CACHE --data EXAMPLES --student ...` (held-out metrics: its --eval-cache "
            "and --eval-data)."
        )


def _unit_hash(indices: np.ndarray) -> np.ndarray:
    """splitmix64 of each index, mapped to [0, 1): a fixed pseudo-random number per sequence."""
    with np.errstate(over="ignore"):
        z = indices.astype(np.uint64) + _SPLIT_SALT
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class CacheDataset(IterableDataset):
    """Whole collated batches from a cache; use with ``DataLoader(ds, batch_size=None)``.

    Each batch is a dict: ``input_ids`` (B, T) int64, ``labels`` (B, T) int64 (the next input
    token; -100 at padding and at each sequence's last position; for a masked-LM cache the
    original token at each masked position, -100 elsewhere), ``target_ids`` (B, T, k) int64,
    ``target_logprobs`` (B, T, k) float32, ``attention_mask`` (B, T) int64, ``index`` (B,) int64
    storage indices of the sequences (-1 for the row of a padding batch, whose labels are all
    -100).

    `batch_size` is the global batch: the sequences of one optimizer step over all ranks. Rank
    and world size default to torch.distributed's when a process group is initialized.

    With `check_files` (the default), the files of each part are checked against their sha256
    in the manifest before the part is first decoded by this process (a flipped byte, a
    truncated file or a manifest copied from another cache is reported naming the part, instead
    of training on wrong data). A cache at a URL is checked when its parts are fetched.

    With `student_tokens` (a `trainer.align.StudentTokens`: a student with another tokenizer,
    `--loss uld`) each sequence is the student's tokens of the cached text instead, and
    ``target_ids``/``target_logprobs`` (B, T, k) hold at each student position the targets of
    the teacher position it is paired with (all ``-inf`` where it has none).
    """

    def __init__(
        self,
        cache: str | Path | Cache,
        *,
        batch_size: int,
        split: str = "train",
        eval_fraction: float = 0.0,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_window: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
        check_files: bool = True,
        student_tokens: Callable[[PartArrays, int], SequenceRows] | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if batch_size < 1 or shuffle_window < 1:
            raise ValueError("batch_size and shuffle_window must be at least 1")
        if not 0.0 <= eval_fraction < 1.0:
            raise LogitCacheError(f"--eval-fraction must be in [0, 1), got {eval_fraction}.")
        self.cache = cache if isinstance(cache, Cache) else logitcache.open(cache)
        refuse_classification(self.cache)
        self.batch_size, self.split, self.seed = batch_size, split, seed
        self.shuffle, self.shuffle_window = shuffle, shuffle_window
        self.check_files = check_files
        self.student_tokens = student_tokens
        if rank is None or world_size is None:
            distributed = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank() if distributed else 0
            world_size = dist.get_world_size() if distributed else 1
        self.rank, self.world_size = rank, world_size
        self._epoch, self._batches = 0, 0
        masking = self.cache.manifest.masking
        self.views = 1 if masking is None else masking.views
        self._members = self._split_members(eval_fraction)
        self._part_firsts = np.cumsum([0] + [p.sequences for p in self.cache.manifest.parts])
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if self.num_sequences() == 0:
            raise LogitCacheError(
                f"the {split} split of {self.cache.root} has no sequences "
                f"({len(self.cache)} sequences in the cache, eval fraction {eval_fraction}). "
                + _EMPTY_SPLIT_FIX[split]
            )
        if batch_size < world_size:
            raise LogitCacheError(
                f"the {split} split of {self.cache.root} has no sequences for rank {rank} of "
                f"{world_size}: the global --batch-size {batch_size} is smaller than the number "
                "of ranks. Use a --batch-size of at least the number of processes."
            )

    def _split_members(self, eval_fraction: float) -> list[np.ndarray]:
        """Per part, the local indices of the sequences in this split (from counts only)."""
        members, start = [], 0
        for part in self.cache.manifest.parts:
            local = np.arange(part.sequences, dtype=np.int64)
            if self.split != "all":  # the views of one data sequence go together
                held_out = _unit_hash((local + start) // self.views) < eval_fraction
                local = local[held_out] if self.split == "eval" else local[~held_out]
            members.append(local)
            start += part.sequences
        return members

    # ---- state -------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, 0

    def advance(self, n: int = 1) -> None:
        """Record that the training loop consumed `n` more batches of this epoch."""
        self._batches += n

    def state_dict(self) -> dict[str, int]:
        """The position in global batches: the same for every rank, whatever their number."""
        return {"epoch": self._epoch, "batches": self._batches, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        saved = int(state.get("batch_size", self.batch_size))
        if saved != self.batch_size:
            raise LogitCacheError(
                f"the saved data position counts global batches of {saved} sequences, this run "
                f"uses {self.batch_size}: resume with --batch-size {saved} (the global batch, "
                "whatever the number of processes)."
            )
        self._epoch, self._batches = int(state["epoch"]), int(state["batches"])

    def __len__(self) -> int:
        return self.batches_per_epoch()

    def num_sequences(self) -> int:
        return sum(len(m) for m in self._epoch_members(self._epoch))

    def _epoch_members(self, epoch: int) -> list[np.ndarray]:
        """Per part, the local indices of this split's sequences in `epoch`: all of them, but
        for the train split of a masked-LM cache with several views only view ``epoch % views``
        of each data sequence."""
        if self.views == 1 or self.split != "train":
            return self._members
        view = epoch % self.views
        firsts = self._part_firsts[:-1]
        return [
            m[(m + first) % self.views == view]
            for m, first in zip(self._members, firsts, strict=True)
        ]

    def batches_per_epoch(self) -> int:
        """Global batches (optimizer steps) per epoch: the same on every rank."""
        return math.ceil(self.num_sequences() / self.batch_size)

    # ---- order -------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> np.ndarray:
        """(sequences, 2) array of (part, local index) pairs: the whole epoch's order, all ranks."""
        rng = np.random.default_rng([self.seed, epoch])
        members = self._epoch_members(epoch)
        parts = np.arange(len(members))
        if self.shuffle:
            parts = rng.permutation(parts)
        pieces = []
        for w in range(0, len(parts), self.shuffle_window):
            window = [
                np.stack([np.full(len(members[p]), p), members[p]], axis=1)
                for p in parts[w : w + self.shuffle_window]
            ]
            pairs = np.concatenate(window) if window else np.zeros((0, 2), dtype=np.int64)
            pieces.append(rng.permutation(pairs) if self.shuffle else pairs)
        return np.concatenate(pieces) if pieces else np.zeros((0, 2), dtype=np.int64)

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """Every global batch of `epoch` (all ranks), each a (B, 2) array of (part, local index)."""
        order = self.epoch_order(epoch)
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def rank_batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's share of each global batch of `epoch`, a (B, 2) array of (part, local
        index); empty where the rank has nothing in the last global batch (see padding)."""
        return [b[self.rank :: self.world_size] for b in self.global_batches(epoch)]

    def storage_index(self, pairs: np.ndarray) -> np.ndarray:
        """The cache's storage indices (what ``cache[i]`` reads) of (part, local index) pairs
        (N, 2), as `epoch_order` gives them: the ``index`` of a batch."""
        return self._part_firsts[pairs[:, 0]] + pairs[:, 1]

    # ---- reading -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        parts = PartCache(self.cache, 2 * self.shuffle_window, check_files=self.check_files)
        for i, whole in enumerate(self.global_batches(self._epoch)):
            if i < self._batches or (i - self._batches) % workers != worker_id:
                continue
            batch = whole[self.rank :: self.world_size]
            if len(batch) == 0:  # padding: the global batch's first sequence, without labels
                p, s = whole[0]
                padded = collate([self._sequence(parts, int(p), int(s))], np.array([-1]))
                padded["labels"].fill_(IGNORE_INDEX)
                yield padded
                continue
            sequences = [self._sequence(parts, int(p), int(s)) for p, s in batch]
            yield collate(sequences, self.storage_index(batch))

    def _sequence(self, parts: PartCache, part: int, local: int) -> SequenceRows:
        if self.student_tokens is None:
            return parts.sequence(part, local)
        return self.student_tokens(parts.part(part), local)


class PartCache:
    """The last few decoded parts (least recently used evicted): a window is read once. Shared
    by `CacheDataset` and the per-sequence view `trainer.hf.CacheSequences`."""

    def __init__(self, cache: Cache, capacity: int, check_files: bool = False) -> None:
        self.cache, self.capacity, self.check_files = cache, capacity, check_files
        self._parts: OrderedDict[int, PartArrays] = OrderedDict()

    def sequence(self, part: int, local: int) -> SequenceRows:
        """(input ids, target ids, target log-probs, labels or None) of one sequence, in the
        reader's decoded view (labels: a masked-LM cache's, -1 without a target)."""
        arrays = self.part(part)
        a, b = int(arrays.seq_offsets[local]), int(arrays.seq_offsets[local + 1])
        labels = None if arrays.target_labels is None else arrays.target_labels[a:b]
        return arrays.input_ids[a:b], arrays.target_ids[a:b], arrays.target_logprobs[a:b], labels

    def part(self, part: int) -> PartArrays:
        """Part `part` decoded (`Cache.read_decoded`), from memory if it was read lately."""
        if part not in self._parts:
            if self.check_files:
                self.cache.check_part_files(part)
            self._parts[part] = self.cache.read_decoded(part)  # same view for every kind
            while len(self._parts) > self.capacity:
                self._parts.popitem(last=False)
        self._parts.move_to_end(part)
        return self._parts[part]


#: One sequence for `collate`: input ids (n,), target ids and log-probs (n, w), and a masked-LM
#: cache's labels (n,) (the replaced token, negative without a target) or None.
SequenceRows = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]


def collate(sequences: list[SequenceRows], indices: np.ndarray) -> dict[str, torch.Tensor]:
    """Right-pad sequences to the longest and build the labels: the next token, or a masked-LM
    cache's own labels (-100 where a position has no target)."""
    batch, longest = len(sequences), max(len(s[0]) for s in sequences)
    k = max(s[1].shape[1] for s in sequences)  # sampled targets: parts differ in width
    input_ids = np.zeros((batch, longest), dtype=np.int64)  # (B, T)
    labels = np.full((batch, longest), IGNORE_INDEX, dtype=np.int64)  # (B, T)
    mask = np.zeros((batch, longest), dtype=np.int64)  # (B, T)
    target_ids = np.zeros((batch, longest, k), dtype=np.int64)  # (B, T, k)
    target_logprobs = np.zeros((batch, longest, k), dtype=np.float32)  # (B, T, k); pads masked
    for row, (ids, tids, tlps, masked_labels) in enumerate(sequences):
        n = len(ids)
        input_ids[row, :n] = ids
        if masked_labels is None:
            labels[row, : n - 1] = ids[1:]
        else:
            labels[row, :n] = np.where(masked_labels >= 0, masked_labels, IGNORE_INDEX)
        mask[row, :n] = 1
        target_ids[row, :n, : tids.shape[1]] = tids
        target_logprobs[row, :n, : tids.shape[1]] = tlps
        target_logprobs[row, :n, tids.shape[1] :] = -np.inf  # absent slots: the losses skip them
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "attention_mask": torch.from_numpy(mask),
        "target_ids": torch.from_numpy(target_ids),
        "target_logprobs": torch.from_numpy(target_logprobs),
        "index": torch.from_numpy(np.asarray(indices, dtype=np.int64)),
    }
