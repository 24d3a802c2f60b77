"""Tiny classifier teachers for the classification tests, built from seeds (no download).

`--teacher-factory tests.logitcache.classifiers:cnn` gives a small CNN over (B, 1, 8, 8) inputs;
`recording_cnn` is the same model saving every input batch it sees under
$LOGITCACHE_TEST_RECORD, so a test can compare the trainer's replayed crops with the teacher's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

CLASSES = 4


class TinyCNN(torch.nn.Module):
    def __init__(self, channels: int = 1, classes: int = CLASSES) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean((-2, -1))) * 3.0  # (B, classes)


def cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyCNN()


def rgb_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyCNN(channels=3)


class _Recording(TinyCNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        folder = Path(os.environ["LOGITCACHE_TEST_RECORD"])
        torch.save(x.clone(), folder / f"batch-{len(list(folder.iterdir())):04d}.pt")
        return super().forward(x)


def recording_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return _Recording()


def sequence_model() -> torch.nn.Module:
    """Not a classifier: (B, T) ids -> (B, T, V) logits, which a classification dump refuses."""
    return torch.nn.Sequential(
        torch.nn.Flatten(2), torch.nn.Linear(64, 4), torch.nn.Unflatten(1, (1, 1))
    )


class BagOfTokens(torch.nn.Module):
    """A text classifier as a factory returns one: called as Hugging Face sequence classifiers
    are, (B, T) ids and mask -> (B, classes) logits of the mean embedding of the tokens."""

    def __init__(self, vocab: int, classes: int = CLASSES) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 8)
        self.head = torch.nn.Linear(8, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask[..., None].float()  # (B, T, 1)
        return self.head((self.embed(input_ids) * mask).sum(1) / mask.sum(1)) * 3.0


def bag_of_tokens() -> torch.nn.Module:
    torch.manual_seed(0)
    return BagOfTokens(vocab=400)  # the tokenizer of tests/logitcache/textcls_helpers.py


def other_cnn() -> torch.nn.Module:
    """The same architecture as `cnn` with other weights: another teacher of the same classes."""
    torch.manual_seed(1)
    return TinyCNN()


class _Slow(TinyCNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.005)  # a step long enough for a test to signal a run in the middle
        return super().forward(x)


def slow_cnn() -> torch.nn.Module:
    """`cnn` (the same weights and outputs) taking at least 5 ms per call: a student whose run
    a test can interrupt with a signal before it ends."""
    torch.manual_seed(0)
    return _Slow()
