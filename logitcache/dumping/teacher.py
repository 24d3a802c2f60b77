"""Loading a teacher and its tokenizer, and fingerprinting both.

A teacher is any torch module that maps input ids (batch, time) to logits (batch, time, vocab):
a Hugging Face causal LM loaded from a path or hub name, or whatever a `module:function` factory
returns. The fingerprints go into the manifest so that a cache says exactly what made it.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from logitcache.errors import LogitCacheError
from logitcache.format.manifest import TeacherInfo, TokenizerInfo
from logitcache.format.tokenizer_id import tokenizer_fingerprint
from logitcache.runtime import load_tokenizer, resolve_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Teacher:
    """A loaded teacher on its device, with its tokenizer and identities."""

    model: torch.nn.Module
    tokenizer: Any
    info: TeacherInfo
    tokenizer_info: TokenizerInfo
    device: torch.device

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, time) ids -> (batch, time, vocab) logits, whatever the module returns."""
        return _as_logits(self.model(input_ids))


def _as_logits(out: Any) -> Any:
    """The logits in whatever a module returned: a tensor, a HF output, or a tuple."""
    out = getattr(out, "logits", out)
    return out[0] if isinstance(out, (tuple, list)) else out


def load_teacher(
    name_or_path: str | None,
    *,
    factory: str | None = None,
    tokenizer: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
    trust_remote_code: bool = False,
) -> Teacher:
    """Load a Hugging Face causal LM (`name_or_path`) or call a `module:function` factory."""
    if dtype not in DTYPES:
        raise LogitCacheError(f"unknown --dtype {dtype!r}; choose one of: {', '.join(DTYPES)}.")
    if (name_or_path is None) == (factory is None):
        raise LogitCacheError(
            "give exactly one of --teacher PATH_OR_NAME or --teacher-factory MODULE:FN."
        )
    torch_device = resolve_device(device)
    if factory is not None:
        if tokenizer is None:
            raise LogitCacheError(
                "--teacher-factory needs --tokenizer PATH (the teacher's tokenizer)."
            )
        model, name, config_text = _from_factory(factory), factory, ""
    else:
        model = _from_pretrained(name_or_path, DTYPES[dtype], trust_remote_code)
        name, config_text = name_or_path, model.config.to_json_string(use_diff=False)
    tok = load_tokenizer(tokenizer or name_or_path, trust_remote_code)
    model = model.to(device=torch_device, dtype=DTYPES[dtype]).eval()
    vocab_size = _probe_vocab_size(model, torch_device)
    info = TeacherInfo(
        name=name,
        config_sha256=hashlib.sha256(config_text.encode()).hexdigest(),
        weights_sha256=weights_sha256(model),
        dtype=dtype,
        vocab_size=vocab_size,
        max_positions=_max_positions(model),
    )
    return Teacher(model, tok, info, tokenizer_info(tok, tokenizer or name_or_path), torch_device)


def _from_pretrained(name: str, dtype: torch.dtype, trust_remote_code: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # our own progress bar and messages say what matters
    hf_logging.disable_progress_bar()
    path = Path(name)
    if (name.startswith((".", "/")) or path.exists()) and not (path / "config.json").is_file():
        raise LogitCacheError(
            f"teacher path {name} does not exist or has no config.json. Pass a directory saved with "
            "save_pretrained (or a hub name), or use --teacher-factory MODULE:FN."
        )
    try:
        return AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as exc:
        raise LogitCacheError(
            f"cannot load {name} as a causal language model: {str(exc).splitlines()[0]} "
            "Check that it is a causal LM saved with save_pretrained (or a reachable hub name); "
            "models with custom code need --trust-remote-code."
        ) from exc


def _from_factory(spec: str) -> torch.nn.Module:
    module_name, _, fn_name = spec.partition(":")
    if not module_name or not fn_name:
        raise LogitCacheError(f"--teacher-factory {spec!r} is not MODULE:FUNCTION.")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise LogitCacheError(f"cannot import --teacher-factory {spec}: {exc}.") from exc
    try:
        model = fn()
    except Exception as exc:  # the user's own code: any failure is theirs to fix, not a bug here
        raise LogitCacheError(
            f"--teacher-factory {spec} raised {type(exc).__name__}: {exc}. Fix the factory (set "
            "LOGITCACHE_DEBUG=1 to see its traceback)."
        ) from exc
    if not isinstance(model, torch.nn.Module):
        raise LogitCacheError(
            f"--teacher-factory {spec} returned {type(model).__name__}, not a torch module."
        )
    return model


def tokenizer_info(tok: Any, name: str) -> TokenizerInfo:
    """Identity of a tokenizer; see `logitcache.format.tokenizer_id.tokenizer_fingerprint`."""
    return TokenizerInfo(
        name=name,
        vocab_size=len(tok),
        fingerprint=tokenizer_fingerprint(tok),
        eos_token_id=tok.eos_token_id,
    )


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _probe_vocab_size(model: torch.nn.Module, device: torch.device) -> int:
    """The width of the logits, read from one forward of one token (works for any module)."""
    with torch.inference_mode():
        out = _as_logits(model(torch.zeros(1, 1, dtype=torch.long, device=device)))
    if not isinstance(out, torch.Tensor) or out.dim() != 3:
        raise LogitCacheError(
            "the teacher did not return (batch, time, vocab) logits for (batch, time) ids."
        )
    return int(out.shape[-1])


def _max_positions(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, attr, None) or getattr(model, attr, None)
        if isinstance(value, int):
            return value
    return None
