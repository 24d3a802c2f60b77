"""Seeded augmented views of image-like examples: random resized crops with an optional flip.

A view is five integers (`VIEW_FIELDS`: top, left, height, width, flip): the crop box in the
example's own pixel grid and whether it is mirrored. Drawing them (`draw_views`) depends only on
(seed, example index, view index) and the declared parameters, never on batching; applying them
(`apply_views`) is a slice, a bilinear resize back to the example's size and a flip, in float32
on the CPU, so the trainer that replays a stored view gets the teacher's input bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from logitcache.errors import LogitCacheError
from logitcache.format.manifest import VIEW_FIELDS, TaskInfo

__all__ = ["ViewSpec", "apply_views", "draw_views"]

#: Tries at a box of the drawn area and aspect ratio before the fallback (torchvision's number).
ATTEMPTS = 10


@dataclass(frozen=True)
class ViewSpec:
    """The declared augmentation (the manifest's `task` record holds the same fields)."""

    views: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    seed: int = 0

    @classmethod
    def of(cls, task: TaskInfo) -> ViewSpec:
        return cls(task.views, tuple(task.scale), tuple(task.ratio), task.flip, task.seed)

    def check(self) -> None:
        """Refuse parameters no crop can be drawn from (before anything is loaded)."""
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise LogitCacheError(
                f"--crop-scale {lo},{hi} must be MIN,MAX with 0 < MIN <= MAX <= 1 (a fraction "
                "of the image's area), e.g. --crop-scale 0.5,1."
            )
        if not 0 < self.ratio[0] <= self.ratio[1] < math.inf:
            raise LogitCacheError(
                f"--crop-ratio {self.ratio[0]},{self.ratio[1]} must be MIN,MAX with "
                "0 < MIN <= MAX (width / height), e.g. --crop-ratio 0.75,1.333."
            )


def draw_views(spec: ViewSpec, example: int, height: int, width: int) -> np.ndarray:
    """(spec.views, 5) int32: the views of example `example` (its global index) of a
    `height` x `width` image. torchvision's RandomResizedCrop rule: an area fraction uniform in
    `scale` and a log-uniform aspect ratio in `ratio`, up to `ATTEMPTS` tries at a box that
    fits, else the whole image clipped to the ratio range, centred; then a flip with
    probability 1/2 if `spec.flip`. The generator is numpy's PCG64 seeded with
    (seed, example), so a view does not depend on the batch or the part it was made in."""
    rng = np.random.default_rng([spec.seed, example])
    out = np.zeros((spec.views, len(VIEW_FIELDS)), dtype=np.int32)
    area, log_ratio = height * width, (math.log(spec.ratio[0]), math.log(spec.ratio[1]))
    for j in range(spec.views):
        box = None
        for _ in range(ATTEMPTS):
            target = area * rng.uniform(*spec.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                box = (
                    int(rng.integers(0, height - h + 1)),
                    int(rng.integers(0, width - w + 1)),
                    h,
                    w,
                )
                break
        if box is None:
            box = _central(height, width, spec.ratio)
        flip = bool(spec.flip and rng.random() < 0.5)
        out[j] = (*box, int(flip))
    return out


def _central(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """The fallback crop: the whole image, narrowed to the nearest allowed ratio, centred."""
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def apply_views(examples: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """(B, ..., H, W) float32 examples and (B, 5) views -> (B, ..., H, W): each example's crop
    box, resized bilinearly (half-pixel centres, no antialiasing) back to H x W, then mirrored
    where `flip` is 1. Row b of `views` applies to row b of `examples`."""
    size = examples.shape[-2:]
    out = torch.empty_like(examples)
    for b, (top, left, h, w, flip) in enumerate(views.tolist()):
        crop = examples[b, ..., top : top + h, left : left + w]
        flat = crop.reshape(1, -1, h, w)  # interpolate wants (N, C, H, W)
        resized = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
        resized = resized.reshape(crop.shape[:-2] + size)
        out[b] = resized.flip(-1) if flip else resized
    return out
