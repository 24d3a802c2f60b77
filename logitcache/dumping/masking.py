"""The masking of a masked-LM dump: BERT's recipe, fixed at dump time and reproducible.

Offline distillation of a masked LM (DistilBERT's setting) cannot re-mask every epoch: the
teacher saw one masked input, and its soft targets belong to that input. So the dump masks each
sequence `views` times (consecutive sequences of the cache, like augmented crops; the trainer
shows a student one view per epoch), runs the teacher on every masked copy and keeps targets at
the masked positions only (docs/FORMAT.md, section 3e).

Each masking is drawn from (seed, the masked sequence's storage index) alone, with numpy's
``default_rng([seed, index])``, so it does not depend on batching, parts, shards or resuming.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from logitcache.format.manifest import MaskingInfo

__all__ = ["DEFAULT_MASK_PROB", "Masked", "Masker", "repeat_views"]

#: BERT's masking probability (`--mask-prob` of a masked-LM teacher when not given).
DEFAULT_MASK_PROB = 0.15


@dataclass(frozen=True)
class Masked:
    """One masked sequence: what the teacher reads, and where and what the targets are."""

    input_ids: np.ndarray  # (n,) the ids after masking
    positions: np.ndarray  # (m,) int64, increasing: the chosen positions, m >= 1
    labels: np.ndarray  # (m,) the original ids there


@dataclass(frozen=True)
class Masker:
    """BERT's 80/10/10 masking with the settings of the manifest's `masking` record;
    `special_ids` are never chosen, random replacements are drawn from ``0..vocab_size-1``
    (the tokenizer's ids)."""

    info: MaskingInfo
    special_ids: np.ndarray
    vocab_size: int

    def mask(self, ids: np.ndarray, index: int) -> Masked:
        """Mask sequence `ids`, the cache's sequence `index` (its storage index).

        Three draws of ``len(ids)`` values from ``default_rng([seed, index])``, in this order:
        ``u`` (uniform [0, 1)), ``action`` (uniform [0, 1)), ``random`` (integers in
        ``[0, vocab_size)``). Position j is chosen when it is not a special id and
        ``u[j] < prob``; when none is, the eligible position with the smallest ``u`` is (position
        0 when no position is eligible), so every sequence carries a target. A chosen position
        becomes the mask id when ``action < replace_mask``, ``random[j]`` when ``action <
        replace_mask + replace_random``, and keeps its id otherwise."""
        info = self.info
        rng = np.random.default_rng([info.seed, index])
        n = len(ids)
        u, action = rng.random(n), rng.random(n)
        random = rng.integers(0, self.vocab_size, n)
        eligible = ~np.isin(ids, self.special_ids)
        chosen = eligible & (u < info.prob)
        if not chosen.any():
            chosen[int(np.argmin(np.where(eligible, u, np.inf)))] = True
        positions = np.flatnonzero(chosen)
        masked = np.array(ids, copy=True)
        act = action[positions]
        masked[positions[act < info.replace_mask]] = info.mask_token_id
        swap = positions[
            (act >= info.replace_mask) & (act < info.replace_mask + info.replace_random)
        ]
        masked[swap] = random[swap]
        return Masked(masked, positions.astype(np.int64), np.asarray(ids)[positions])


def repeat_views(sequences: Iterable[np.ndarray], views: int) -> Iterator[np.ndarray]:
    """Each sequence `views` times in a row: the stream of the cache's sequences before masking
    (view v of data sequence s is the cache's sequence ``s * views + v``)."""
    for sequence in sequences:
        yield from itertools.repeat(sequence, views)
