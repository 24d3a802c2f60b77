"""A GPT-2 style byte-level BPE, trained locally on the corpus with the ``tokenizers`` library
(no download), wrapped as a transformers tokenizer so it saves and loads like any other."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from logitcache.testing.corpus import read_text

__all__ = ["EOS_TOKEN", "train_tokenizer"]

#: The only special token; doubles as bos/eos/pad/unk, exactly like GPT-2's.
EOS_TOKEN = "<|endoftext|>"


def _iter_texts(files: Iterable[Path]) -> Iterator[str]:
    for path in files:
        text = read_text(Path(path))
        if text is not None:
            yield text


def train_tokenizer(
    files: Iterable[Path], vocab_size: int = 8192, *, model_max_length: int = 1024
) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE on ``files`` and wrap it for transformers.

    Byte-level means every string is encodable and ``decode(encode(x)) == x`` exactly (no
    unknown tokens, whitespace preserved), which matters for source code. The single special
    token ``<|endoftext|>`` (id 0) is eos, bos, pad and unk, as in GPT-2. The result is a
    ``PreTrainedTokenizerFast``, so ``save_pretrained`` writes ``tokenizer.json`` and
    ``AutoTokenizer.from_pretrained`` restores it. The vocabulary can come out smaller than
    ``vocab_size`` only if the corpus runs out of pairs to merge.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes + {EOS_TOKEN}), got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_iter_texts(files), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=model_max_length,
        # Cleanup would rewrite " ." to "." etc. and break the exact round trip.
        clean_up_tokenization_spaces=False,
    )
