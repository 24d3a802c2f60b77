"""The optimizer and its schedule: AdamW, linear warmup, cosine decay to `min_lr`."""

from __future__ import annotations

import math

import torch

from trainer.config import FitConfig


def make_optimizer(model: torch.nn.Module, c: FitConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (embeddings, linear weights) only."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": c.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=c.lr, betas=(c.beta1, c.beta2), fused=fused or None)


def warmup_steps(warmup: int | None, total: int) -> int:
    """`warmup` if given, else 5% of the `total` steps, at most 100."""
    if warmup is not None:
        return warmup
    return min(100, total // 20)


def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for the update after `step` updates: linear warmup, cosine."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
