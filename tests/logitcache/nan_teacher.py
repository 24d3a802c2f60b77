"""Teacher factories for CLI tests: `build` gives NaN logits (the "non-finite teacher logits"
error test), `build_uniform` a cheap finite teacher, `build_narrow` one whose 100 ids are fewer
than the tokenizer's, `build_shifty` one whose output width differs from what a probe sees,
`build_broken` a factory that raises.

Used as ``logitcache dump --teacher-factory tests.logitcache.nan_teacher:build --tokenizer DIR``
with the repository root on PYTHONPATH.
"""

from __future__ import annotations

import torch

VOCAB_SIZE = 512  # the tiny test teacher's vocabulary


class NanTeacher(torch.nn.Module):
    """(batch, time) ids -> (batch, time, vocab) logits, every one of them NaN."""

    def __init__(self, vocab_size: int = VOCAB_SIZE) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, 8)
        self.head = torch.nn.Linear(8, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids)) * float("nan")


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return NanTeacher()


class UniformTeacher(torch.nn.Module):
    """(batch, time) ids -> (batch, time, vocab) zero logits: a uniform, finite teacher."""

    def __init__(self, vocab_size: int = VOCAB_SIZE) -> None:
        super().__init__()
        self.head = torch.nn.Linear(1, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, self.head.out_features)


def build_uniform() -> torch.nn.Module:
    """A finite teacher that loads without transformers' model code (about half the start-up
    time of a `from_pretrained` teacher), for CLI tests in which the teacher does not matter."""
    torch.manual_seed(0)
    return UniformTeacher()


def build_narrow() -> torch.nn.Module:
    """A uniform teacher over 100 ids: narrower than the 512-id tokenizer it is dumped with."""
    return UniformTeacher(vocab_size=100)


class ShiftyTeacher(UniformTeacher):
    """Logits over 512 ids for one token (what the vocabulary probe sends), 600 for more."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        width = self.head.out_features if input_ids.shape[-1] == 1 else 600
        return torch.zeros(*input_ids.shape, width)


def build_shifty() -> torch.nn.Module:
    return ShiftyTeacher()


def build_broken() -> torch.nn.Module:
    """A factory that fails the way user code does: `dump` must report it, not crash."""
    raise ValueError("checkpoint teacher.bin not found")
