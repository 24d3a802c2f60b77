"""The masked-LM counterpart of `logitcache.testing.toy`: a small BERT trained here with masked-LM
loss on the standard library sources, with the same byte-level BPE carrying BERT's special tokens
(`logitcache.testing.tokenizer`, ``masked_lm=True``), and the config of a BERT student that
shares its vocabulary.

Like the GPT-2 toy it is saved with ``save_pretrained`` so that ``logitcache dump`` loads it
through ``AutoModelForMaskedLM.from_pretrained``: a real checkpoint that costs seconds (tests)
or a few minutes (the benchmark), never a download. Its training reuses the toy's loop
(`toy._train`), with transformers' own 80/10/10 masking for the loss.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    BertConfig,
    BertForMaskedLM,
    DataCollatorForLanguageModeling,
    MegatronBertConfig,
    MegatronBertForMaskedLM,
    ModernBertConfig,
    ModernBertForMaskedLM,
    PretrainedConfig,
)

from logitcache.testing import toy
from logitcache.testing.corpus import stdlib_files
from logitcache.testing.tokenizer import train_tokenizer

__all__ = ["build_mlm_student_config", "ensure_mlm_teacher"]

#: Bump when the recipe changes so that `ensure_mlm_teacher` rebuilds saved teachers.
RECIPE_VERSION = 1
#: The architectures a teacher can have: BERT (post-LayerNorm, absolute positions, as
#: published), Megatron's BERT (pre-LayerNorm), or ModernBERT (pre-LayerNorm, rotary positions,
#: a gated MLP, and in training the output layer at the masked positions only, so that a step
#: costs less: what the benchmark's teacher is, benchmarks/bench_mlm.py says why).
ARCHITECTURES = {
    "bert": (BertConfig, BertForMaskedLM),
    "megatron-bert": (MegatronBertConfig, MegatronBertForMaskedLM),
    "modernbert": (ModernBertConfig, ModernBertForMaskedLM),
}


def _bert_config(
    vocab_size: int, n_layer: int, hidden: int, positions: int, arch: str = "bert"
) -> PretrainedConfig:
    """A BERT of `n_layer` x `hidden` (heads of 64 wide, at least one), dropout 0 so that the
    same weights always give the same logits."""
    if arch == "modernbert":
        return _modernbert_config(vocab_size, n_layer, hidden, positions)
    return ARCHITECTURES[arch][0](
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=n_layer,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=4 * hidden,
        max_position_embeddings=positions,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )


def _modernbert_config(
    vocab_size: int, n_layer: int, hidden: int, positions: int
) -> PretrainedConfig:
    """A ModernBERT of `n_layer` x `hidden` with the special ids of `MLM_SPECIALS` ([PAD] 0,
    [CLS] 2, [SEP] 3), its gated MLP with as many parameters as BERT's 4 x `hidden` one, no
    dropout (ModernBERT's default). `sparse_prediction`: given labels (training), the output
    layer runs at the masked positions only; the logits a dump reads (no labels) are every
    position's."""
    return ModernBertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=n_layer,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=8 * hidden // 3,  # 3 matrices of hidden x this: BERT's 2 of 4 x hidden
        max_position_embeddings=positions,
        pad_token_id=0,
        bos_token_id=2,
        cls_token_id=2,
        eos_token_id=3,
        sep_token_id=3,
        sparse_prediction=True,
    )


def ensure_mlm_teacher(
    out_dir: Path,
    *,
    vocab_size: int = 4096,
    n_layer: int = 4,
    hidden: int = 256,
    positions: int = 512,
    train_steps: int = 0,
    seq_len: int = 128,
    batch_size: int = 16,
    lr: float = 5e-4,
    warmup_steps: int = 100,
    seed: int = 0,
    arch: str = "bert",
    mask_prob: float = 0.15,
    files: Sequence[Path] | None = None,
    verbose: bool = True,
) -> Path:
    """`out_dir` if it holds a masked-LM teacher built with these settings, else build one.

    `arch` is one of `ARCHITECTURES`. The build trains the tokenizer on `files` (default: the stdlib train split), then a
    seeded-random BERT for `train_steps` AdamW steps on packed `seq_len` sequences with masked-LM
    loss (`mask_prob` of the positions, BERT's 15% by default, 80/10/10: more masks give more
    targets per step, which a teacher trained for minutes needs) and a cosine schedule after
    `warmup_steps` (post-LayerNorm BERT stalls at unigram statistics with a short warm-up or a
    large rate), and saves model, tokenizer and ``toy_info.json``
    (settings, loss curve) last: its presence, with equal settings, means "built".
    """
    files = list(stdlib_files("train") if files is None else files)
    settings = {
        "recipe_version": RECIPE_VERSION,
        "kind": "masked-lm",
        "vocab_size": vocab_size,
        "n_layer": n_layer,
        "hidden": hidden,
        "positions": positions,
        "train_steps": train_steps,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "lr": lr,
        "warmup_steps": warmup_steps,
        "seed": seed,
        "arch": arch,
        "mask_prob": mask_prob,
        "files": [str(p) for p in files] if len(files) < 64 else f"{len(files)} files",
    }
    out_dir = Path(out_dir)
    info = toy.read_info(out_dir)
    if info is not None and info.get("settings") == settings:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / toy.INFO_FILE).unlink(missing_ok=True)  # an interrupted rebuild must not look done
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(files, vocab_size, model_max_length=positions, masked_lm=True)
    torch.manual_seed(seed)
    model = ARCHITECTURES[arch][1](_bert_config(len(tokenizer), n_layer, hidden, positions, arch))
    masker = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mask_prob)

    def masked_loss(net: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        inputs, labels = masker.torch_mask_tokens(input_ids.clone())
        return net(input_ids=inputs, attention_mask=torch.ones_like(inputs), labels=labels).loss

    curve = toy._train(
        model,
        tokenizer,
        files,
        train_seconds=0,
        train_steps=train_steps,
        seq_len=seq_len,
        batch_size=batch_size,
        lr=lr,
        lr_schedule="cosine",
        warmup_steps=min(warmup_steps, train_steps // 10),
        seed=seed,
        verbose=verbose,
        loss_of=masked_loss,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    record = {
        "settings": settings,
        "n_params": sum(p.numel() for p in model.parameters()),
        "train": {"steps": len(curve), "loss_curve": curve},
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    (out_dir / toy.INFO_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return out_dir


def build_mlm_student_config(
    teacher: Path | str, *, n_layer: int = 2, hidden: int = 64, **overrides: Any
) -> PretrainedConfig:
    """Config of a small BERT student with the teacher's vocabulary and positions (cached
    targets index the student's logits by the teacher's ids), whatever the teacher's `arch`."""
    cfg = AutoConfig.from_pretrained(teacher)
    student = _bert_config(cfg.vocab_size, n_layer, hidden, cfg.max_position_embeddings)
    student.architectures = ["BertForMaskedLM"]  # what makes `trainer fit` build a masked LM
    for name, value in overrides.items():
        setattr(student, name, value)
    return student
