"""Loading a teacher and its tokenizer, and fingerprinting both.

A teacher is any torch module that maps input ids (batch, time) to logits (batch, time, vocab):
a Hugging Face causal LM or masked LM loaded from a path or hub name (a masked LM is one whose
config names a ``*ForMaskedLM`` architecture, loaded with ``AutoModelForMaskedLM``), or whatever
a `module:function` factory returns (a masked LM when the dump is given ``--mask-prob``). The fingerprints go into the manifest so that a cache says exactly what made it.

A Hugging Face teacher too big for one device is loaded with a device map (`--device-map`):
transformers has accelerate place its layers over the GPUs, then the CPU, then the disk, and
hooks move the activations from layer to layer (and offloaded weights in when a layer runs).
Such a teacher takes its input ids where accelerate's main device is and returns its logits
there; its weights hash the same as on one device, so its cache is the one-device cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from logitcache.errors import LogitCacheError
from logitcache.examples.text import TextInputs
from logitcache.format.manifest import EnsembleInfo, TeacherInfo, TokenizerInfo
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
    #: Where input ids go and logits come out. With a device map, accelerate's main device:
    #: its top-level hook moves the input there and the output back to the input's device.
    device: torch.device
    #: With --device-map: how many modules accelerate placed on each device ("0", "cpu",
    #: "disk"), in placement order; None for a teacher whole on `device`.
    placement: dict[str, int] | None = None
    #: Where weights that are offloaded to the disk but not stored as safetensors are written
    #: (removed with the teacher); None without a device map.
    offload_dir: tempfile.TemporaryDirectory | None = None
    #: An ensemble of teachers (`logitcache.dumping.ensemble`): its members, weights and mode,
    #: for the manifest; `info` is then the ensemble's identity. None for one teacher.
    ensemble: EnsembleInfo | None = None

    @torch.inference_mode()
    def logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(batch, time) ids -> (batch, time, vocab) logits, whatever the module returns.
        `attention_mask` (batch, time), 0 on padding, is passed only when given: a masked LM
        attends both ways, so right padding would change its logits (a causal LM's not)."""
        if attention_mask is None:
            return _as_logits(self.model(input_ids))
        return _as_logits(self.model(input_ids, attention_mask=attention_mask))


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
    device_map: str | dict[str, int | str] | None = None,
    max_memory: dict[int | str, int] | None = None,
    attn: str = "auto",
    masked_factory: bool = False,
) -> Teacher:
    """Load a Hugging Face causal or masked LM (`name_or_path`) or call a `module:function`
    factory (a masked LM with `masked_factory`: nothing in a module says which it is).

    The weights are loaded in `dtype`. `device_map` (a name accelerate computes a placement
    for, or {module: GPU index, "cpu" or "disk"}) and `max_memory` ({device: bytes}) place a
    from_pretrained teacher's layers instead of putting it whole on `device`; `attn` is its
    attention implementation ("auto": transformers' choice, sdpa where supported). Their
    values are checked by `logitcache.dumping.options.check_options`."""
    if dtype not in DTYPES:
        raise LogitCacheError(f"unknown --dtype {dtype!r}; choose one of: {', '.join(DTYPES)}.")
    if (name_or_path is None) == (factory is None):
        raise LogitCacheError(
            "give exactly one of --teacher PATH_OR_NAME or --teacher-factory MODULE:FN."
        )
    placed = device_map is not None
    torch_device = resolve_device("auto" if placed else device)
    offload_dir = None
    if factory is not None:
        if placed:
            raise LogitCacheError("--device-map places a --teacher model, not a factory's.")
        if tokenizer is None:
            raise LogitCacheError(
                "--teacher-factory needs --tokenizer PATH (the teacher's tokenizer)."
            )
        model, name, config_text = _from_factory(factory), factory, ""
        kind = "masked" if masked_factory else "causal"
    else:
        extra: dict[str, Any] = {}
        if placed:
            _check_gpus(device_map, max_memory)
            offload_dir = tempfile.TemporaryDirectory(prefix="logitcache-offload-")
            extra = {"device_map": device_map, "max_memory": max_memory,
                     "offload_folder": offload_dir.name}  # fmt: skip
        if attn != "auto":
            extra["attn_implementation"] = attn
        kind = pretrained_kind(name_or_path, trust_remote_code)
        model = _from_pretrained(name_or_path, DTYPES[dtype], trust_remote_code, extra, kind)
        name, config_text = name_or_path, model.config.to_json_string(use_diff=False)
    tok = load_tokenizer(tokenizer or name_or_path, trust_remote_code)
    placement = None
    if placed:  # accelerate put the layers in place: moving the model would undo it
        model = model.eval()
        torch_device, placement = _placed_on(model)
    else:  # from_pretrained loaded it in `dtype` already: only a factory's module is cast here
        model = model.to(device=torch_device, dtype=DTYPES[dtype]).eval()
    vocab_size = _probe_vocab_size(model, torch_device)
    info = TeacherInfo(
        name=name,
        config_sha256=hashlib.sha256(config_text.encode()).hexdigest(),
        weights_sha256=weights_sha256(model),
        dtype=dtype,
        vocab_size=vocab_size,
        max_positions=_max_positions(model),
        kind=kind,
    )
    tok_info = tokenizer_info(tok, tokenizer or name_or_path)
    return Teacher(model, tok, info, tok_info, torch_device, placement, offload_dir)


def pretrained_kind(name: str, trust_remote_code: bool) -> str:
    """ "masked" when the config at `name` names a ``*ForMaskedLM`` architecture (what
    ``save_pretrained`` of a BERT-style masked LM writes), else "causal". A name whose config
    cannot be read is "causal": loading it then reports the problem."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, ImportError):
        return "causal"
    architectures = getattr(config, "architectures", None) or []
    return "masked" if any(a.endswith("ForMaskedLM") for a in architectures) else "causal"


def _from_pretrained(
    name: str, dtype: torch.dtype, trust_remote_code: bool, extra: dict[str, Any], kind: str
) -> torch.nn.Module:
    """`AutoModelForCausalLM.from_pretrained` (`AutoModelForMaskedLM` for `kind` "masked") in
    `dtype` (no float32 copy first), with `extra`: the device map, memory budgets, offload
    folder and attention implementation, if any."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # our own progress bar and messages say what matters
    hf_logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)  # "parameters on the meta device"
    path = Path(name)
    if (name.startswith((".", "/")) or path.exists()) and not (path / "config.json").is_file():
        raise LogitCacheError(
            f"teacher path {name} does not exist or has no config.json. Pass a directory saved with "
            "save_pretrained (or a hub name), or use --teacher-factory MODULE:FN."
        )
    auto = AutoModelForMaskedLM if kind == "masked" else AutoModelForCausalLM
    try:
        return auto.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        hint = (
            "Check that it is a causal LM saved with save_pretrained (or a reachable hub name); "
            "models with custom code need --trust-remote-code."
        )
        if "attn_implementation" in extra:
            hint += f" Not every model has --attn {extra['attn_implementation']}: try --attn auto."
        if "device_map" in extra:
            hint += " A --device-map file must give a device to every module of the model."
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        what = "masked" if kind == "masked" else "causal"
        raise LogitCacheError(
            f"cannot load {name} as a {what} language model: {first} {hint}"
        ) from exc


def _check_gpus(device_map: str | dict[str, int | str], max_memory: dict | None) -> None:
    """Refuse a placement that names a GPU this machine does not have (accelerate would only
    warn, and then fail mid-load or place everything elsewhere)."""
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for flag, devices in (
        ("--device-map", device_map.values() if isinstance(device_map, dict) else ()),
        ("--max-memory", max_memory or {}),
    ):
        gpus = [d for d in devices if type(d) is int]
        if gpus and max(gpus) >= have:
            raise LogitCacheError(
                f"{flag} names GPU {max(gpus)}, but this machine has {have or 'no'} "
                f"GPU{'' if have == 1 else 's'} (they are counted from 0)."
            )


def _placed_on(model: torch.nn.Module) -> tuple[torch.device, dict[str, int]]:
    """Where a device-mapped model takes its input (accelerate's main device: its top-level
    hook moves the input there and the logits back), and its modules per device."""
    device_map = getattr(model, "hf_device_map", None) or {"": "cpu"}
    placement: dict[str, int] = {}
    for device in device_map.values():
        placement[str(device)] = placement.get(str(device), 0) + 1
    hook = getattr(model, "_hf_hook", None)
    main = getattr(hook, "execution_device", None)
    if main is None:  # one device, no hooks: the model simply lives there
        main = next(model.parameters()).device
    return torch.device(main), placement


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
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), in name order.

    Weights that accelerate offloaded (left on the meta device, loaded by a hook when their
    module runs) are loaded the same way, one module at a time, so a device-mapped teacher
    hashes as it would on one device."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        with _loaded(model, name, tensor) as loaded:
            t = loaded.detach().cpu().contiguous()
            digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@contextlib.contextmanager
def _loaded(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """`tensor` (the state dict's entry `name`), its offloaded weights loaded to the CPU."""
    if tensor.device.type != "meta":
        yield tensor
        return
    from accelerate.utils import align_module_device  # only accelerate's hooks leave meta here

    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    with align_module_device(module, torch.device("cpu")):
        loaded = getattr(module, attr)
        if loaded.device.type == "meta":
            raise LogitCacheError(
                f"the teacher's weight {name} is offloaded where accelerate cannot load it from "
                "(it stays on the meta device), so the teacher cannot be fingerprinted. Place "
                "its module on a GPU or the CPU in --device-map."
            )
        yield loaded


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


def is_text_classifier(name: str, trust_remote_code: bool = False) -> bool:
    """Whether the saved model at `name` is a text classifier: its config names a
    ``*ForSequenceClassification`` architecture (what save_pretrained of one writes)."""
    config = Path(name) / "config.json"
    if not config.is_file():
        return False
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in architectures)


def load_classifier(
    name_or_path: str | None,
    probe: torch.Tensor,
    *,
    factory: str | None = None,
    tokenizer: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
    trust_remote_code: bool = False,
) -> Teacher:
    """A classifier teacher: a Hugging Face `AutoModelForImageClassification` or
    `AutoModelForSequenceClassification` directory or any torch module a `module:function`
    factory returns, mapping (batch, *example shape) inputs to (batch, classes) logits.
    `probe` (1, *shape) is one example: its forward gives the class count, and refuses a module
    that does not take such inputs before --out is touched. The same `Teacher` as a causal LM's,
    so whatever wraps one (an ensemble) wraps this.

    A text classifier's examples are (batch, 2, seq_len) int64 (`logitcache.examples.text`):
    a sequence classifier directory, or a factory given with `tokenizer`, is called as
    ``model(input_ids=..., attention_mask=...)``; its tokenizer (`tokenizer`, else the one
    saved beside the model) is the cache's, fingerprinted. A Hugging Face image classifier
    directory with a preprocessor_config.json that normalises is given its image mean and std
    in front of the model (inputs are pixel values in [0, 1])."""
    if dtype not in DTYPES:
        raise LogitCacheError(f"unknown --dtype {dtype!r}; choose one of: {', '.join(DTYPES)}.")
    if (name_or_path is None) == (factory is None):
        raise LogitCacheError(
            "give exactly one of --teacher PATH (a saved classifier) or "
            "--teacher-factory MODULE:FN."
        )
    torch_device = resolve_device(device)
    text = not probe.is_floating_point()
    if factory is not None:
        model, name, config_text = _from_factory(factory), factory, ""
        model = TextInputs(model) if text else model
    else:
        model = _classifier_from_pretrained(name_or_path, trust_remote_code, text)
        name, config_text = name_or_path, model.config.to_json_string(use_diff=False)
        model = TextInputs(model) if text else _Normalized(model, Path(name_or_path))
    model = model.to(device=torch_device, dtype=DTYPES[dtype]).eval()
    limit = _max_positions(model) if text else None
    if limit is not None and probe.shape[-1] > limit:
        raise LogitCacheError(
            f"--seq-len {probe.shape[-1]} is longer than the teacher's maximum of {limit} "
            f"positions. Use --seq-len {limit} or less (texts are truncated to it)."
        )
    with torch.inference_mode():
        out = _as_logits(model(as_input(probe, torch_device, dtype)))
    if not isinstance(out, torch.Tensor) or out.shape[:1] != (1,) or out.dim() != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise LogitCacheError(
            f"the teacher returned {got} for one example of shape {tuple(probe.shape[1:])}; a "
            "classifier teacher returns (batch, classes) logits."
        )
    info = TeacherInfo(
        name=name,
        config_sha256=hashlib.sha256(config_text.encode()).hexdigest(),
        weights_sha256=weights_sha256(model),
        dtype=dtype,
        vocab_size=int(out.shape[-1]),
        max_positions=limit,
    )
    if not text:  # the inputs are the examples themselves (the data record fingerprints them)
        no_tokenizer = TokenizerInfo(name="", vocab_size=0, fingerprint="", eos_token_id=None)
        return Teacher(model, None, info, no_tokenizer, torch_device)
    source = tokenizer or name_or_path
    if source is None:
        raise LogitCacheError(
            "a --teacher-factory text classifier needs --tokenizer (the tokenizer its token ids "
            "come from)."
        )
    tok = load_tokenizer(source, trust_remote_code, flag="--tokenizer" if tokenizer else None)
    return Teacher(model, tok, info, tokenizer_info(tok, source), torch_device)


def class_names(teacher: Teacher) -> list[str]:
    """A Hugging Face classifier's class names in id order (its config's id2label), [] for a
    module that names none (a factory's)."""
    config = getattr(teacher.model, "config", None)
    id2label = getattr(config, "id2label", None) or {}
    if sorted(int(i) for i in id2label) != list(range(teacher.info.vocab_size)):
        return []
    return [str(id2label[i]) for i in range(teacher.info.vocab_size)]


def as_input(probe: torch.Tensor, device: torch.device, dtype: str) -> torch.Tensor:
    """An example batch where the teacher reads it: in the teacher's --dtype, but token ids
    (text) stay integers."""
    if probe.is_floating_point():
        return probe.to(device=device, dtype=DTYPES[dtype])
    return probe.to(device=device)


def _classifier_from_pretrained(name: str, trust_remote_code: bool, text: bool) -> torch.nn.Module:
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if not (Path(name) / "config.json").is_file():
        raise LogitCacheError(
            f"teacher path {name} has no config.json. Pass a directory saved with "
            "save_pretrained, or use --teacher-factory MODULE:FN."
        )
    auto = AutoModelForSequenceClassification if text else AutoModelForImageClassification
    try:
        return auto.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        what = "a text (sequence)" if text else "an image"
        raise LogitCacheError(
            f"cannot load {name} as {what} classifier ({exc}). Pass a directory saved from an "
            f"{auto.__name__}, or use --teacher-factory MODULE:FN."
        ) from exc


class _Normalized(torch.nn.Module):
    """A Hugging Face image classifier behind its image processor's normalisation (mean and
    std of preprocessor_config.json, when it normalises): what it was trained to see."""

    def __init__(self, model: torch.nn.Module, path: Path) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        processor = path / "preprocessor_config.json"
        settings = json.loads(processor.read_text()) if processor.is_file() else {}
        normalize = settings.get("do_normalize", False)
        mean = settings.get("image_mean", [0.0]) if normalize else [0.0]
        std = settings.get("image_std", [1.0]) if normalize else [1.0]
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=(pixel_values - self.mean) / self.std).logits
