"""Text examples for a text classifier: tokenized to one fixed length, and the adapter that feeds
them to a sequence classifier (format 1.3, `task.input` "text").

A text example is held as one (2, seq_len) int64 tensor: row 0 its token ids, truncated to
`seq_len` and right-padded, row 1 the attention mask (1 on tokens, 0 on padding). Keeping both in
one tensor lets a text example be indexed, batched and moved exactly like an image example, so the
classifier dump and the trainer's loop need no text branch; `TextInputs` splits it again into the
``input_ids`` and ``attention_mask`` a Hugging Face sequence classifier takes. The dump and the
trainer tokenize with this one function and a tokenizer of the same fingerprint, so the student
reads the token ids the teacher read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from logitcache.errors import LogitCacheError

__all__ = ["TextInputs", "pad_id", "tokenize_texts"]


def pad_id(tokenizer: Any) -> int:
    """The id padding is written with: the tokenizer's pad token, else its EOS token (GPT-2's
    habit). It is masked out, so only a sequence classifier that finds its last token by the
    pad id (GPT-2's) reads it, and that one is configured with the same id."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    raise LogitCacheError(
        "the tokenizer has neither a pad nor an EOS token, so text examples cannot be padded "
        "to --seq-len. Pass a tokenizer that defines pad_token (--tokenizer)."
    )


def tokenize_texts(texts: Sequence[str], tokenizer: Any, seq_len: int, where: str) -> torch.Tensor:
    """(N, 2, seq_len) int64: each text's ids (the tokenizer's special tokens added as it adds
    them, truncated to `seq_len`, padded with `pad_id` on the right) over its attention mask.
    A text with no token at all is refused: a classifier has nothing to read."""
    pad = pad_id(tokenizer)
    encoded = tokenizer(list(texts), truncation=True, max_length=seq_len)["input_ids"]
    out = np.zeros((len(texts), 2, seq_len), dtype=np.int64)
    out[:, 0] = pad
    for i, ids in enumerate(encoded):
        if not ids:
            raise LogitCacheError(
                f"{where} row {i} gives no tokens (an empty text): drop it from the data."
            )
        out[i, 0, : len(ids)] = ids
        out[i, 1, : len(ids)] = 1
    return torch.from_numpy(out)


class TextInputs(torch.nn.Module):
    """A sequence classifier (called as ``model(input_ids=..., attention_mask=...)``, returning
    logits or a Hugging Face output with ``.logits``) as a module on packed text examples:
    (batch, 2, seq_len) int64 -> (batch, classes) logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = getattr(model, "config", None)

    def forward(self, examples: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=examples[:, 0], attention_mask=examples[:, 1])
        return getattr(out, "logits", out)
