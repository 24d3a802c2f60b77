"""What the ensemble tests share: the direct average of the teachers' outputs, computed here
from the models themselves (not by the code under test)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def load_models(teacher_dirs: Sequence[Path]) -> list[torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    return [AutoModelForCausalLM.from_pretrained(d).eval() for d in teacher_dirs]


@torch.inference_mode()
def direct_average(
    models: Sequence[torch.nn.Module],
    input_ids: torch.Tensor,
    weights: Sequence[float],
    mode: str,
    temperature: float = 1.0,
) -> torch.Tensor:
    """(T, V) log-probabilities of the ensemble at `temperature` for one sequence (T,), in
    float64: logits, log softmax of the weighted mean of the logits; probs, the log of the
    weighted mean of the softmaxes. `weights` sum to 1."""
    logits = [m(input_ids[None]).logits[0].double() / temperature for m in models]
    if mode == "logits":
        return torch.log_softmax(sum(w * x for w, x in zip(weights, logits, strict=True)), -1)
    probs = sum(w * torch.softmax(x, -1) for w, x in zip(weights, logits, strict=True))
    return torch.log(probs)
