"""A batch's targets without its full logits: the output head, a few time steps at a time.

With a 128k-256k vocabulary the (batch, time, vocab) logits are the dump's memory peak (one
32k-token sequence at 256k ids is 34 GB in float32), although the targets keep k or N values
per position. For a Hugging Face causal LM whose output head is a plain `torch.nn.Linear`,
`split_head` cuts the model at its final hidden states: the body (`model.base_model`) runs once
per batch, and `chunked_targets` computes ``logits = head(hidden[:, t : t + steps])`` and their
targets with the same function as the full path (`targets.device_targets`), one chunk of time
steps after another, so that no more than `CHUNK_LOGITS_BYTES` of float32 logits exist at once
(on a CPU `CPU_CHUNK_TOKENS` positions, fewer still, which is also faster there).
Sampled draws are keyed by (seed, sequence, position) (`logitcache.dumping.sampling`), so
chunking changes none of them.

The final steps some families take after the head are reproduced, in float32, in the order of
their `*ForCausalLM.forward`:

* ``config.logit_scale`` (Cohere): ``logits * logit_scale``;
* ``config.logits_scaling`` (Granite): ``logits / logits_scaling``;
* ``config.final_logit_softcapping`` (Gemma 2 and 3, nanochat): ``cap * tanh(logits / cap)``.

A config that sets a final step not among them (`UNREPRODUCED`) is not split, and every split
is checked once, when the dump starts, on a probe batch: its logits must equal the model's own
forward's to within a few units in the last place of the model's dtype. Whatever fails a check
(a factory teacher, whose module is not known to be a causal LM; a quantised or custom head;
a model without a separate base model; an unknown final step) keeps the full path, and
`LogitsPlan.describe` says which path runs and why (`DumpSummary.logits`, the CLI's last line).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from logitcache.dumping.targets import TargetSpec

__all__ = [
    "CHUNK_LOGITS_BYTES",
    "CPU_CHUNK_TOKENS",
    "UNREPRODUCED",
    "LogitsPlan",
    "SplitHead",
    "auto_chunk_tokens",
    "chunked_targets",
    "plan_logits",
    "split_head",
    "time_steps",
]

#: Float32 logits computed at once on the chunked path on a GPU (0 = auto for
#: --logits-chunk-tokens): 512 positions at 131072 ids, 2.6k at 32k. Large enough that the
#: head's matmul keeps a GPU busy, small next to a batch's full logits (2 GiB at batch 2, 2048
#: positions, 131072 ids).
CHUNK_LOGITS_BYTES = 256 << 20

#: Positions computed at once on a CPU (0 = auto): there the head's matmul is faster over a few
#: hundred rows than over a whole batch, because its output stays in the caches, where the
#: targets then read it (4x256 teacher, vocabulary 8192, batch 8 x 512 on 2 cores: head and
#: top-64 170 ms a batch at 512 positions, 187 ms over the batch's 4096; 242 ms at 128, where
#: the head's weights are read again too often).
CPU_CHUNK_TOKENS = 512

#: Config fields that name a step after the head which `SplitHead.logits` does not take; a
#: model whose config sets one (to anything but None or 1) keeps the full path.
UNREPRODUCED = (
    "output_multiplier",
    "lm_head_multiplier",
    "logits_mup_width_multiplier",
    "output_logit_soft_cap",
    "logits_soft_cap",
)

#: The probe batch's shape (rows, time steps): two rows, so batching is part of the check.
PROBE_SHAPE = (2, 8)


class TargetsFn(Protocol):
    """What computes targets on the device (`targets.device_targets`; bench_dump swaps it):
    logits (B, t, V) of time steps first_position .. first_position + t - 1 of sequences (B,)."""

    def __call__(
        self,
        logits: torch.Tensor,
        spec: TargetSpec,
        sequences: torch.Tensor,
        *,
        first_position: int = 0,
    ) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class SplitHead:
    """A causal LM cut at its final hidden states: `body` maps ids (B, T) to (B, T, H), `head`
    (H -> V) and the final steps map those to the model's logits."""

    body: torch.nn.Module = field(repr=False)
    head: torch.nn.Linear = field(repr=False)
    family: str  # the model's class name, for the log
    multiply: float | None = None  # Cohere's logit_scale
    divide: float | None = None  # Granite's logits_scaling
    softcap: float | None = None  # Gemma 2's final_logit_softcapping

    @property
    def vocab_size(self) -> int:
        return self.head.out_features

    @torch.inference_mode()
    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, time) ids -> (batch, time, hidden) final hidden states, no KV cache kept."""
        extra = {"use_cache": False} if _accepts(self.body, "use_cache") else {}
        out = self.body(input_ids=input_ids, **extra)
        hidden = getattr(out, "last_hidden_state", None)
        return out[0] if hidden is None else hidden

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(batch, steps, hidden) -> (batch, steps, vocab) float32 logits: the head in the
        model's dtype (as the model's own forward computes it), the final steps in float32."""
        x = self.head(hidden).float()
        if self.multiply is not None:
            x = x * self.multiply
        if self.divide is not None:
            x = x / self.divide
        if self.softcap is not None:
            x = torch.tanh(x / self.softcap) * self.softcap
        return x


def _accepts(module: torch.nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # a builtin or wrapped forward without a signature
        return False


def _final_step(config: Any, name: str) -> float | None:
    """A final-step setting from the config or its text config (multimodal models), or None
    where it is unset or the identity (1)."""
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else None
    for source in (config, text):
        value = getattr(source, name, None)
        if value is not None and value != 1:
            return float(value)
    return None


def split_head(model: torch.nn.Module, device: torch.device) -> SplitHead | str:
    """`model` split at its final hidden states, or why it cannot be (the full path then runs).

    Checks the structure (a Hugging Face model with a separate base model and a plain
    `torch.nn.Linear` output head, bias or not), the config (no step in `UNREPRODUCED`), and
    the result: the split's logits of a probe batch against the model's own."""
    config = getattr(model, "config", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if config is None or not callable(get_head):
        return f"{type(model).__name__} is not a Hugging Face model with an output head"
    head = get_head()
    if type(head) is not torch.nn.Linear:  # quantised or custom heads compute something else
        return f"its output head is a {type(head).__name__}, not a plain torch.nn.Linear"
    body = getattr(model, "base_model", model)
    if body is model:
        return f"{type(model).__name__} has no separate base model to take hidden states from"
    for name in UNREPRODUCED:
        if (value := _final_step(config, name)) is not None:
            return (
                f"its config sets {name}={value:g}, a step after the output head that the "
                "chunked path does not reproduce"
            )
    split = SplitHead(
        body, head, type(model).__name__, multiply=_final_step(config, "logit_scale"),
        divide=_final_step(config, "logits_scaling"),
        softcap=_final_step(config, "final_logit_softcapping"),
    )  # fmt: skip
    problem = _probe(model, split, device)
    return split if problem is None else problem


def _probe(model: torch.nn.Module, split: SplitHead, device: torch.device) -> str | None:
    """None if the split's logits of a probe batch equal the model's own forward's (to a few
    units in the last place of the model's dtype), else what differs."""
    embeddings = model.get_input_embeddings()
    words = getattr(embeddings, "num_embeddings", split.vocab_size)
    rows, steps = PROBE_SHAPE
    ids = (torch.arange(rows * steps, device=device).view(rows, steps) * 7919 + 1) % words
    with torch.inference_mode():
        full = getattr(model(ids), "logits", None)
        if not isinstance(full, torch.Tensor) or full.shape != (rows, steps, split.vocab_size):
            return (
                "the model's logits are not its head's outputs: shape "
                f"{tuple(getattr(full, 'shape', ()))} against the head's {split.vocab_size} ids"
            )
        mine = split.logits(split.hidden(ids)).to(full.device)
    eps = 4 * torch.finfo(full.dtype).eps  # the split rounds the final steps once, in float32
    full = full.float()
    if torch.allclose(mine, full, rtol=eps, atol=eps):
        return None
    difference = (mine - full).abs().max().item()
    return (
        f"head(hidden states) differs from the model's own logits by up to {difference:.3g} on "
        f"a probe batch: {split.family} takes a step after its head that the chunked path "
        "does not reproduce"
    )


def time_steps(chunk_tokens: int, batch: int, time: int, vocab: int) -> int:
    """Time steps per chunk: `chunk_tokens` positions (batch rows x steps), or as many as
    `CHUNK_LOGITS_BYTES` of float32 logits hold where it is 0; at least 1, at most `time`."""
    tokens = chunk_tokens if chunk_tokens > 0 else _budget_tokens(vocab)
    return max(1, min(time, tokens // batch))


def _budget_tokens(vocab: int) -> int:
    """Positions whose float32 logits fit in `CHUNK_LOGITS_BYTES` (at least 1)."""
    return max(1, CHUNK_LOGITS_BYTES // (4 * vocab))


@dataclass(frozen=True)
class LogitsPlan:
    """How a dump gets its logits: `split` set, the chunked path; None, the full one. `why`
    says why the full path runs (empty on the chunked path)."""

    split: SplitHead | None
    chunk_tokens: int = 0  # positions per chunk on the chunked path (`plan_logits` sets it)
    why: str = ""

    def describe(self) -> str:
        if self.split is None:
            return f"full logits ({self.why})"
        vocab = self.split.vocab_size
        tokens = self.chunk_tokens
        steps = " with a tanh soft-cap" if self.split.softcap is not None else ""
        return (
            f"chunked logits: {self.split.family}'s linear head over up to {tokens:,} positions "
            f"at a time{steps} ({tokens * vocab * 4 / 2**20:,.0f} MiB of float32 logits)"
        )


def plan_logits(
    model: torch.nn.Module, device: torch.device, *, pretrained: bool, chunk_tokens: int
) -> LogitsPlan:
    """The chunked path where `model` (a teacher loaded with `from_pretrained`) splits, else
    the full path with the reason. `chunk_tokens` -1 asks for the full path, 0 for
    `auto_chunk_tokens`."""
    if chunk_tokens < 0:
        return LogitsPlan(None, why="--logits-chunk-tokens -1")
    if not pretrained:
        return LogitsPlan(None, why="a --teacher-factory module: its output head is not known")
    split = split_head(model, device)
    if isinstance(split, str):
        return LogitsPlan(None, why=split)
    return LogitsPlan(split, chunk_tokens or auto_chunk_tokens(device, split.vocab_size))


def auto_chunk_tokens(device: torch.device, vocab: int) -> int:
    """Positions per chunk for --logits-chunk-tokens 0: `CPU_CHUNK_TOKENS` on a CPU, else as
    many as `CHUNK_LOGITS_BYTES` of float32 logits hold."""
    if torch.device(device).type == "cpu":
        return CPU_CHUNK_TOKENS
    return _budget_tokens(vocab)


@torch.inference_mode()
def chunked_targets(
    split: SplitHead,
    hidden: torch.Tensor,
    spec: TargetSpec,
    sequences: torch.Tensor,
    targets_fn: TargetsFn,
    chunk_tokens: int = 0,
) -> dict[str, torch.Tensor]:
    """The targets of a batch, as `targets_fn` computes them from its full logits, computed
    from its final hidden states (batch, time, hidden), `split.hidden(input_ids)`, a chunk of
    time steps at a time; `sequences` (batch,) the global sequence indices. Every array
    `targets_fn` returns is (batch, time, ...), so the chunks' arrays are joined along time.
    The body's forward is the caller's, so that it can be timed apart (`dump --profile`)."""
    batch, time = hidden.shape[:2]
    steps = time_steps(chunk_tokens, batch, time, split.vocab_size)
    pieces = []
    for start in range(0, time, steps):
        logits = split.logits(hidden[:, start : start + steps])  # (batch, steps, vocab)
        pieces.append(targets_fn(logits, spec, sequences, first_position=start))
        del logits  # before the next chunk's are made
    if len(pieces) == 1:
        return pieces[0]
    return {name: torch.cat([p[name] for p in pieces], dim=1) for name in pieces[0]}
