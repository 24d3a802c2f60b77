"""A GPT-2 style byte-level BPE, trained locally on the corpus with the ``tokenizers`` library
(no download), wrapped as a transformers tokenizer so it saves and loads like any other."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from logitcache.testing.corpus import read_text

__all__ = ["EOS_TOKEN", "MLM_SPECIALS", "train_tokenizer"]

#: The only special token; doubles as bos/eos/pad/unk, exactly like GPT-2's.
EOS_TOKEN = "<|endoftext|>"
#: BERT's special tokens (ids 0..4 in this order) for a masked-LM tokenizer: [SEP] ends each
#: document when packing, [MASK] is what the masking writes.
MLM_SPECIALS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}


def _iter_texts(files: Iterable[Path]) -> Iterator[str]:
    for path in files:
        text = read_text(Path(path))
        if text is not None:
            yield text


def train_tokenizer(
    files: Iterable[Path],
    vocab_size: int = 8192,
    *,
    model_max_length: int = 1024,
    masked_lm: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE on ``files`` and wrap it for transformers.

    Byte-level means every string is encodable and ``decode(encode(x)) == x`` exactly (no
    unknown tokens, whitespace preserved), which matters for source code. The single special
    token ``<|endoftext|>`` (id 0) is eos, bos, pad and unk, as in GPT-2. The result is a
    ``PreTrainedTokenizerFast``, so ``save_pretrained`` writes ``tokenizer.json`` and
    ``AutoTokenizer.from_pretrained`` restores it. The vocabulary can come out smaller than
    ``vocab_size`` only if the corpus runs out of pairs to merge.

    With ``masked_lm`` the specials are BERT's instead (`MLM_SPECIALS`: [PAD], [UNK], [CLS],
    [SEP], [MASK], ids 0..4), [SEP] doubling as eos so that packing separates documents with it:
    the same byte-level BPE, for a masked-LM teacher.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = list(MLM_SPECIALS.values()) if masked_lm else [EOS_TOKEN]
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size must be >= {256 + len(specials)} (256 bytes + {specials})")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_iter_texts(files), trainer=trainer)
    names = (
        MLM_SPECIALS | {"eos_token": MLM_SPECIALS["sep_token"]}
        if masked_lm
        else dict.fromkeys(("eos_token", "bos_token", "pad_token", "unk_token"), EOS_TOKEN)
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **names,
        model_max_length=model_max_length,
        # Cleanup would rewrite " ." to "." etc. and break the exact round trip.
        clean_up_tokenization_spaces=False,
    )
