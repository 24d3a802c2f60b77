"""The text of a cache dumped with ``--offsets`` (format 1.3): each sequence's characters and
each token's span in them.

A part then holds ``text`` (UTF-8 bytes, the sequences' texts end to end), ``text_offsets``
(sequences + 1,) where each begins, and ``token_offsets`` (tokens, 2), each token's [start,
end) in *characters* of its sequence's text (docs/FORMAT.md, section 3d). This is what lets a
student with another tokenizer re-tokenize the text the teacher saw and pair its positions with
the teacher's (`trainer fit --loss uld`). The checks here run before anything is read from
those arrays, so that a damaged cache is refused by name instead of misaligning silently.
"""

from __future__ import annotations

import numpy as np

from logitcache.format.manifest import PartArrays


def text_problems(part: PartArrays) -> list[str]:
    """The format's rules for a part's text arrays; an empty list when all hold."""
    starts = np.asarray(part.text_offsets)
    if part.text is None or len(starts) != part.sequences + 1:
        return [f"text_offsets do not describe {part.sequences} sequences"]
    if starts[0] != 0 or starts[-1] != len(part.text) or (np.diff(starts) < 0).any():
        return [f"text_offsets do not cut the {len(part.text)} text bytes into sequences"]
    spans = np.asarray(part.token_offsets).astype(np.int64)
    if spans.shape != (part.tokens, 2) or (spans[:, 0] > spans[:, 1]).any():
        return ["token_offsets are not one [start, end) span per token"]
    for s in range(part.sequences):
        try:
            text = sequence_text(part, s)
        except UnicodeDecodeError:
            return [f"the text of sequence {s} is not UTF-8"]
        a, b = int(part.seq_offsets[s]), int(part.seq_offsets[s + 1])
        if b > a and spans[a:b, 1].max() > len(text):
            return [f"a token span of sequence {s} ends after its text ({len(text)} characters)"]
    return []


def sequence_text(part: PartArrays, s: int) -> str:
    """The text of sequence `s` of a part (the characters its ``token_offsets`` index)."""
    a, b = int(part.text_offsets[s]), int(part.text_offsets[s + 1])
    return bytes(part.text[a:b]).decode("utf-8")
