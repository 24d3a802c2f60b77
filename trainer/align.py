"""A student with another tokenizer: its own tokens for a cached sequence, and for each of its
positions the teacher position it is paired with (`trainer fit --loss uld`).

A cache dumped with ``--offsets`` (format 1.3) holds each sequence's text and each teacher
token's character span in it (`logitcache.read.texts`). `StudentTokens` re-tokenizes that text
with the student's tokenizer and pairs positions by what they have read: student position j
(its token ends at character e) is paired with the teacher position whose token also ends at
e, so both predict what follows the same text. Where a teacher token boundary falls inside a
student token (or the reverse) the position has no pair and gets only the student's CE. Where
several teacher tokens end at one character (a character split over byte-level tokens), the
last one is paired: it has read the whole character.

Documents: a packed sequence joins documents with the teacher's EOS, a token with an empty
span at the end of its document. The text is cut there, each piece tokenized on its own and
followed by the student's EOS, and the two EOS positions are paired with each other (not with
the teacher token that ends at the same character).

Student sequences longer than the student's context are truncated to it: a tokenizer with a
smaller vocabulary makes more tokens of the same text than the teacher's did.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from logitcache import Manifest, PartArrays, sequence_text
from logitcache.errors import LogitCacheError
from trainer.dataset import SequenceRows


class StudentTokens:
    """Re-tokenizes cached sequences with the student's tokenizer (a transformers fast
    tokenizer) and pairs its positions with the teacher's, as the module docstring says."""

    def __init__(self, tokenizer: Any, manifest: Manifest, max_length: int | None) -> None:
        if not manifest.layout.offsets:
            raise LogitCacheError(
                f"--loss uld needs the text the teacher saw, and the cache of teacher "
                f"{manifest.teacher.name} holds only token ids. Dump it again with --offsets."
            )
        if manifest.masking is not None:
            raise LogitCacheError(
                f"--loss uld pairs positions that predict the next token, but {manifest.teacher.name} "
                "is a masked LM: its cached targets are for the masked tokens themselves, which no "
                "position of another tokenizer corresponds to. Train on this cache without "
                "--loss uld (a student with the teacher's tokenizer)."
            )
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        if self.backend is None:
            raise LogitCacheError(
                "--loss uld needs a fast (Rust) student tokenizer, which reports each token's "
                "characters: pass a directory with tokenizer.json as --tokenizer."
            )
        self.eos = tokenizer.eos_token_id
        if manifest.layout.packing and self.eos is None:
            raise LogitCacheError(
                "the cache joins documents with EOS, but the student tokenizer has no EOS "
                "token to join them with: give it one (eos_token in tokenizer_config.json)."
            )
        self.teacher_eos = manifest.tokenizer.eos_token_id
        self.max_length = max_length

    def __call__(self, part: PartArrays, s: int) -> SequenceRows:
        """Sequence `s` of a decoded part (`logitcache.Cache.read_decoded`) as the student
        reads it: its ids (M,), and the teacher's targets (M, k) at the paired positions, all
        ``-inf`` (no teacher, no ULD term) where a position has no pair."""
        a, b = int(part.seq_offsets[s]), int(part.seq_offsets[s + 1])
        ids, pairs = self.tokenize(
            sequence_text(part, s), np.asarray(part.input_ids[a:b]), part.token_offsets[a:b]
        )
        target_ids = np.zeros((len(ids), part.target_ids.shape[1]), dtype=np.int64)
        target_logprobs = np.full(target_ids.shape, -np.inf, dtype=np.float32)
        paired = pairs >= 0
        target_ids[paired] = part.target_ids[a:b][pairs[paired]]
        target_logprobs[paired] = part.target_logprobs[a:b][pairs[paired]]
        return ids, target_ids, target_logprobs, None  # no masked-LM labels: next tokens

    def tokenize(
        self, text: str, teacher_ids: np.ndarray, spans: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The student's ids (M,) for a sequence's text, and for each the teacher position it is
        paired with, -1 for none. `teacher_ids` (T,) and `spans` (T, 2) are the cached ones."""
        spans = np.asarray(spans, dtype=np.int64)
        boundary = (teacher_ids == self.teacher_eos) & (spans[:, 0] == spans[:, 1])
        cuts = [int(c) for c in spans[boundary, 1]]  # where each document ends, then its EOS
        starts = [0, *cuts]
        pieces = [text[x:y] for x, y in zip(starts, [*cuts, len(text)], strict=True)]
        ids: list[int] = []
        keys: list[int] = []  # 2 * end character + (1 for an EOS)
        for i, encoding in enumerate(self.backend.encode_batch(pieces, add_special_tokens=False)):
            ids += encoding.ids
            keys += [2 * (starts[i] + end) for _, end in encoding.offsets]
            if i < len(cuts):
                ids.append(self.eos)
                keys.append(2 * cuts[i] + 1)
        teacher_keys = 2 * spans[:, 1] + boundary
        last = dict(zip(teacher_keys.tolist(), range(len(teacher_keys)), strict=True))
        pairs = np.array([last.get(k, -1) for k in keys], dtype=np.int64)
        limit = len(ids) if self.max_length is None else self.max_length
        return np.asarray(ids[:limit], dtype=np.int64), pairs[:limit]
