"""What the text-classifier tests share: the stdlib-snippets task (`logitcache.testing.textcls`)
with a byte-level BPE trained on it, tiny BERT sequence classifiers saved with that tokenizer,
and the teachers' log-probabilities computed here from the models themselves (with the
tokenizer called directly, not through the code under test)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from logitcache.testing.textcls import PACKAGES, package_files, text_classifier, write_snippets
from logitcache.testing.tokenizer import train_tokenizer

SEQ_LEN = 48


@dataclass(frozen=True)
class TextTask:
    """Two teachers (seeds 0 and 1) of the same label space, a third with other class names,
    the snippets (train and held-out, .jsonl) and the tokenizer."""

    teacher: Path
    other_seed: Path
    other_names: Path
    train: Path
    heldout: Path
    tokenizer: object


def build_text_task(root: Path, per_class: int = 12) -> TextTask:
    files = [f for p in PACKAGES for f in package_files(p)[:3]]
    tok = train_tokenizer(files, vocab_size=400, masked_lm=True)
    renamed = {i: f"other{i}" for i in range(len(PACKAGES))}
    peaked = {"init_std": 0.5}  # untrained, but far from uniform: averages differ visibly
    return TextTask(
        text_classifier(root / "teacher", tok, seed=0, **peaked),
        text_classifier(root / "teacher-b", tok, seed=1, **peaked),
        text_classifier(root / "teacher-renamed", tok, seed=2, id2label=renamed, **peaked),
        write_snippets(root / "train.jsonl", per_class=per_class, chars=200),
        write_snippets(root / "heldout.jsonl", "heldout", per_class=per_class // 2, chars=200),
        tok,
    )


@torch.inference_mode()
def teacher_logprobs(teacher: Path, texts: list[str], tok: object) -> np.ndarray:
    """(N, classes) float64 log_softmax of the saved classifier on each text alone (truncated
    to SEQ_LEN, no padding), so padding and masking in the dump are checked too."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(teacher).eval()
    rows = []
    for text in texts:
        ids = tok(text, truncation=True, max_length=SEQ_LEN, return_tensors="pt")["input_ids"]
        rows.append(torch.log_softmax(model(input_ids=ids).logits[0].double(), -1))
    return torch.stack(rows).numpy()
