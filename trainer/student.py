"""The student: built from a config, a config directory or a saved model, checked against a cache.

``--student`` is one of

* a transformers config JSON file (``config.json`` or any name): a fresh model, seeded init;
* a directory holding ``config.json`` and no weights: the same;
* a directory saved with ``save_pretrained`` (config + weights): training continues from it;
* a trainer run directory (it holds ``model/``): the run's final student.

Before any training the student is checked against the cache's manifest: its output size must
equal the teacher's vocabulary (the cached targets are teacher token ids that index the
student's logits), its context must hold the cache's sequences, and, with ``--tokenizer``, the
tokenizer must be the one the cache was made with, and it must be the teacher's kind of model:
a causal LM for a causal teacher's cache, a masked LM (``AutoModelForMaskedLM``) for a masked-LM
cache (format 1.3). Every mismatch is a `LogitCacheError` that names both sides. A student with
another tokenizer (``--loss uld``, `check_uld_student`) is checked against that tokenizer
instead: its output must cover the tokenizer's ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from logitcache import Manifest, tokenizer_fingerprint
from logitcache.errors import LogitCacheError
from logitcache.runtime import load_tokenizer

#: Files that make a directory a saved model rather than a bare config.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
#: Where a trainer run keeps its final student (see `trainer.fit`).
RUN_MODEL_DIR = "model"


@dataclass(frozen=True)
class StudentSource:
    """What ``--student`` points to: ``kind`` is "config" (fresh init) or "pretrained"."""

    kind: str
    path: Path  # the config file for "config", the model directory for "pretrained"
    spec: str  # as given


def resolve_student(spec: str | Path) -> StudentSource:
    """Decide what ``spec`` is (see the module docstring), or explain what it should be."""
    path = Path(spec)
    if path.is_file():
        return StudentSource("config", path, str(spec))
    if not path.is_dir():
        raise LogitCacheError(
            f"--student {spec} does not exist. Pass a transformers config JSON file, a directory "
            "with config.json (fresh model), or a model directory saved with save_pretrained."
        )
    if not (path / "config.json").is_file() and (path / RUN_MODEL_DIR / "config.json").is_file():
        path = path / RUN_MODEL_DIR  # a trainer run directory
    if not (path / "config.json").is_file() and (path / "checkpoint").is_dir():
        raise LogitCacheError(
            f"the run in {spec} has not finished: it has a checkpoint but no {RUN_MODEL_DIR}/ "
            "yet. Finish it with `trainer fit ... --resume` first."
        )
    if not (path / "config.json").is_file():
        raise LogitCacheError(
            f"--student {spec} is a directory without config.json. Pass a transformers config "
            "JSON file, a directory with config.json, or a model saved with save_pretrained."
        )
    if any((path / name).is_file() for name in WEIGHT_FILES):
        return StudentSource("pretrained", path, str(spec))
    return StudentSource("config", path / "config.json", str(spec))


def load_config(source: StudentSource) -> Any:
    """The student's `transformers.PretrainedConfig`."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(source.path))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LogitCacheError(
            f"cannot read a transformers model config from {source.path}: {first}. It needs a "
            '"model_type" (e.g. "gpt2") and that model\'s fields.'
        ) from exc


def output_size(config: Any) -> int:
    """Width of the student's logits according to its config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "vocab_size", None)
    if not isinstance(size, int):
        raise LogitCacheError(f"the student config ({config.model_type}) has no vocab_size.")
    return size


def max_positions(config: Any) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(text, attr, None)
        if isinstance(value, int):
            return value
    return None


def student_kind(config: Any) -> str:
    """ "masked" for a masked-LM config (its ``architectures`` name a ``*ForMaskedLM`` class, or
    its model type has no causal LM class at all, like DistilBERT's), else "causal"."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith("ForMaskedLM") for a in architectures):
        return "masked"
    return "causal" if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else "masked"


def check_student(config: Any, manifest: Manifest, where: str = "the student") -> None:
    """Refuse a student whose kind, vocabulary or context does not fit the cache."""
    kind, want = student_kind(config), manifest.teacher.kind
    if kind != want:
        names = {"masked": "a masked LM", "causal": "a causal LM"}
        raise LogitCacheError(
            f"model mismatch: {where} is {names[kind]} ({config.model_type}), but the cache's "
            f"teacher ({manifest.teacher.name}) is {names[want]}: its targets are "
            + (
                "for the masked positions of a masked input"
                if want == "masked"
                else "for the next token at every position"
            )
            + f". Use {names[want]} student config"
            + (
                ' (e.g. a BERT config with "architectures": ["BertForMaskedLM"]).'
                if want == "masked"
                else "."
            )
        )
    teacher_vocab = manifest.teacher.vocab_size
    student_vocab = output_size(config)
    if student_vocab != teacher_vocab:
        raise LogitCacheError(
            f"vocabulary mismatch: {where} has vocab_size {student_vocab}, but the cache's "
            f"teacher ({manifest.teacher.name}) has vocab_size {teacher_vocab}. Cached targets "
            "are teacher token ids that index the student's logits, so the two must be equal: "
            f"set vocab_size to {teacher_vocab} in the student's config."
        )
    limit = max_positions(config)
    if limit is not None and limit < manifest.layout.seq_len:
        raise LogitCacheError(
            f"{where} handles at most {limit} positions, but the cache's sequences are "
            f"{manifest.layout.seq_len} tokens long. Raise the student's max positions "
            f"(n_positions / max_position_embeddings) to at least {manifest.layout.seq_len}."
        )


def check_output_rows(
    model: torch.nn.Module, manifest: Manifest, where: str = "the student"
) -> None:
    """Refuse a built model whose output layer is not as wide as the teacher's vocabulary (its
    config may say otherwise, e.g. after ``resize_token_embeddings``)."""
    width = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    rows = None if width is None else width.weight.shape[0]
    if rows is not None and rows != manifest.teacher.vocab_size:
        raise LogitCacheError(
            f"vocabulary mismatch: {where} has {rows} output rows, but the cache's teacher "
            f"({manifest.teacher.name}) has vocab_size {manifest.teacher.vocab_size}."
        )


def check_tokenizer(spec: str, manifest: Manifest) -> None:
    """Refuse a tokenizer that is not the one the cache's input ids come from."""
    fingerprint = tokenizer_fingerprint(load_tokenizer(spec, flag="--tokenizer", local_only=True))
    want = manifest.tokenizer.fingerprint
    if fingerprint != want:
        raise LogitCacheError(
            f"tokenizer mismatch: --tokenizer {spec} has fingerprint {fingerprint[:16]}, but the "
            f"cache was made with tokenizer {manifest.tokenizer.name} (fingerprint "
            f"{want[:16]}). The cache's input ids would mean different text to this tokenizer; "
            "pass the tokenizer the cache was dumped with, or, to distil into a student with "
            "this other tokenizer, use --loss uld on a cache dumped with --offsets."
        )


def check_uld_student(config: Any, tokenizer: Any, where: str = "the student") -> None:
    """Refuse a student (``--loss uld``) whose logits do not cover its own tokenizer's ids."""
    width, ids = output_size(config), len(tokenizer)
    if width < ids:
        raise LogitCacheError(
            f"vocabulary mismatch: {where} has vocab_size {width}, but its --tokenizer has "
            f"{ids} ids. Set vocab_size to at least {ids} in the student's config."
        )


def build_student(
    spec: str | Path,
    manifest: Manifest | None = None,
    *,
    tokenizer: str | None = None,
    seed: int = 0,
    config_dict: dict[str, Any] | None = None,
    student_tokenizer: Any = None,
) -> tuple[torch.nn.Module, StudentSource]:
    """The student model in float32, in train mode, checked against `manifest` if given.

    With `student_tokenizer` (``--loss uld``: the loaded tokenizer of a student whose vocabulary
    is not the teacher's) it is checked against that tokenizer instead (`check_uld_student`).

    A fresh model is initialised under ``torch.manual_seed(seed)``, so the same seed gives the
    same initial weights. ``config_dict`` (a resumed run's saved config) replaces the config
    read from ``spec``; the weights are then loaded by the caller.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    source = resolve_student(spec)
    if config_dict is not None:
        config_dict = dict(config_dict)
        config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    else:
        config = load_config(source)
    if student_tokenizer is not None:
        check_uld_student(config, student_tokenizer, f"the student {spec}")
    elif manifest is not None:
        check_student(config, manifest, f"the student {spec}")
        if tokenizer is not None:
            check_tokenizer(tokenizer, manifest)
    kind = student_kind(config) if manifest is None else manifest.teacher.kind
    auto = AutoModelForMaskedLM if kind == "masked" else AutoModelForCausalLM
    try:
        if source.kind == "pretrained" and config_dict is None:
            model = auto.from_pretrained(str(source.path), dtype=torch.float32)
        else:
            torch.manual_seed(seed)
            model = auto.from_config(config, dtype=torch.float32)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        damaged = isinstance(exc, SafetensorError)  # a truncated or overwritten weights file
        raise LogitCacheError(
            f"cannot build a {kind} language model from --student {spec}: {first}."
            + (
                f" Its weights in {source.path} are damaged (truncated?): save the model "
                "again, or rerun the `trainer fit` that wrote it."
                if damaged
                else ""
            )
        ) from exc
    if manifest is not None and student_tokenizer is None:
        check_output_rows(model, manifest, f"the student {spec}")
    model.train()
    return model, source


def config_to_dict(model: torch.nn.Module) -> dict[str, Any]:
    """The model's config as plain JSON data (what a checkpoint stores)."""
    return json.loads(model.config.to_json_string(use_diff=False))


# --------------------------------------------------------------------------------------------
# --fused-loss: the student without its output layer


class HiddenStates(torch.nn.Module):
    """The student without its output layer: (input_ids, attention_mask) -> its base model's last
    hidden state (B, T, H), which `fused_head` has checked that the output layer maps to the
    logits. ``trainer fit --fused-loss`` runs the student through this (inside DDP when
    data-parallel), and `trainer.fused` applies the output layer in the loss.

    It wraps the whole model, output layer included, so that under DDP every parameter is the
    wrapper's: the output layer's gradients, which the fused loss produces after DDP's forward,
    reach DDP's gradient hooks like any other, and are averaged over the ranks."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def fused_head(model: torch.nn.Module, where: str = "the student") -> torch.nn.Linear:
    """The output layer of ``model``, after checking that ``--fused-loss`` computes its logits:
    they must be a plain `torch.nn.Linear` of its base model's last hidden state, nothing after
    (no soft-capping, no scaling). Checked on one two-token forward in eval mode (hooks compare
    the head's input with the base model's output and the logits with the head's output), so a
    model that post-processes its logits is refused whatever its config says."""

    def refuse(why: str) -> LogitCacheError:
        return LogitCacheError(
            f"--fused-loss cannot train {where} ({type(model).__name__}): {why}. The fused loss "
            "applies the output layer itself, so it needs logits that are a plain linear map "
            "(torch.nn.Linear) of the base model's last hidden state. Train this student "
            "without --fused-loss."
        )

    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or base is model:
        raise refuse("it has no base model separate from its output layer")
    if head is None or type(head).forward is not torch.nn.Linear.forward:
        raise refuse(f"its output layer is {type(head).__name__}, not a torch.nn.Linear")
    seen: dict[str, torch.Tensor] = {}
    head_calls = []

    def on_base(_module, _args, out) -> None:
        seen["hidden"] = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def on_head(_module, args, out) -> None:
        seen["head_in"], seen["head_out"] = args[0], out
        head_calls.append(1)

    ids = torch.arange(2).remainder(head.weight.shape[0]).unsqueeze(0)  # (1, 2)
    ids = ids.to(head.weight.device)
    hooks = [base.register_forward_hook(on_base), head.register_forward_hook(on_head)]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    finally:
        for h in hooks:
            h.remove()
        model.train(training)
    if len(head_calls) != 1 or "hidden" not in seen:
        raise refuse("its forward does not call its base model and output layer once each")
    if not torch.equal(seen["head_in"], seen["hidden"]):
        raise refuse("its output layer does not read the base model's last hidden state")
    if not torch.equal(logits, seen["head_out"]):
        raise refuse("its logits are not the output layer's output (soft-capped or scaled?)")
    return head
