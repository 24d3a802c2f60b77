"""A text-classification task that ships offline, and a tiny text classifier for it.

The examples are snippets of the Python standard library's sources, labelled by the top-level
package they come from (`PACKAGES`: asyncio, email, multiprocessing, xml): real, varied text
whose classes differ in vocabulary and style, so a classifier can learn them and a student can
be distilled from it. Files, not snippets, are split into train and held-out (every
`HELDOUT_EVERY`-th of each package's files in path order), so held-out snippets never come
from a file seen in training.

`text_classifier` builds a small BERT sequence classifier from a config (no download) and saves
it with its tokenizer, a directory `AutoModelForSequenceClassification.from_pretrained` and
`AutoTokenizer.from_pretrained` both load: what `logitcache dump --task classification
--teacher DIR` reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from logitcache.testing.corpus import SPLITS, read_text, stdlib_root

__all__ = ["PACKAGES", "package_files", "stdlib_snippets", "text_classifier", "write_snippets"]

#: The classes, in label order: stdlib packages with many files of distinct subject matter.
PACKAGES = ("asyncio", "email", "multiprocessing", "xml")
#: One file in this many of a package is held out.
HELDOUT_EVERY = 4


def package_files(package: str, split: str = "train") -> list[Path]:
    """The ``*.py`` files under the stdlib package `package` in `split`, sorted by path."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    files = sorted(p for p in (stdlib_root() / package).rglob("*.py") if _kept(p))
    held = split == "heldout"
    return [p for i, p in enumerate(files) if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == held]


def _kept(path: Path) -> bool:
    """Sources only: no caches, no test suites (as `logitcache.testing.corpus` walks)."""
    return not {"__pycache__", "test", "tests"}.intersection(path.parts)


def stdlib_snippets(
    split: str = "train",
    *,
    per_class: int = 40,
    chars: int = 300,
    packages: tuple[str, ...] = PACKAGES,
) -> tuple[list[str], list[int]]:
    """Up to `per_class` snippets of each package (whole lines, about `chars` characters each,
    blank ones skipped), in package order, and their labels (the package's index)."""
    texts: list[str] = []
    labels: list[int] = []
    for label, package in enumerate(packages):
        found = 0
        for path in package_files(package, split):
            for snippet in _snippets(read_text(path) or "", chars):
                if found == per_class:
                    break
                texts.append(snippet)
                labels.append(label)
                found += 1
    return texts, labels


def _snippets(text: str, chars: int) -> list[str]:
    """`text` cut into consecutive runs of whole lines of at least `chars` characters."""
    out, run = [], ""
    for line in text.splitlines(keepends=True):
        run += line
        if len(run) >= chars:
            if run.strip():
                out.append(run)
            run = ""
    return out


def write_snippets(path: Path, split: str = "train", **options: Any) -> Path:
    """`stdlib_snippets` as a .jsonl file of {"text", "label"} objects at `path`."""
    texts, labels = stdlib_snippets(split, **options)
    lines = (json.dumps({"text": t, "label": y}) for t, y in zip(texts, labels, strict=True))
    Path(path).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return Path(path)


def text_classifier(
    dest: Path,
    tokenizer: Any,
    *,
    classes: int = len(PACKAGES),
    layers: int = 2,
    hidden: int = 32,
    max_positions: int = 128,
    seed: int = 0,
    id2label: dict[int, str] | None = None,
    init_std: float = 0.02,
) -> Path:
    """A BERT sequence classifier (`layers` x `hidden`, initialised under `seed` with weights of
    standard deviation `init_std`: BERT's 0.02 gives near-uniform outputs untrained, larger ones
    peaked) with `tokenizer`'s vocabulary, saved with the tokenizer in `dest`; returns `dest`."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    names = id2label or {i: (PACKAGES[i] if classes == len(PACKAGES) else f"class{i}")
                         for i in range(classes)}  # fmt: skip
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id or 0,
        num_labels=classes,
        initializer_range=init_std,
        id2label=names,
        label2id={v: k for k, v in names.items()},
    )
    BertForSequenceClassification(config).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return Path(dest)
