"""The models of the digits benchmark (bench_digits.py) and demo_classify.py, importable as
`--teacher-factory digits_models:teacher` / `--student digits_models:student` with this folder
on the path: a CNN teacher over the 8x8 scikit-learn digits and a mobile-sized MLP student.

`teacher()` loads the weights bench_digits.py trained and cached under benchmarks/.work/digits/
(seed 0 unless $DIGITS_TEACHER names another file); `fresh_teacher(seed)` is the same network
untrained."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

WORK = Path(__file__).resolve().parent / ".work" / "digits"
CLASSES = 10


class TeacherCNN(nn.Module):
    """Three 3x3 convolutions and two dense layers over (B, 1, 8, 8): about 150k parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (64, 4, 4)
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (128, 2, 2)
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(512, 128), nn.ReLU(), nn.Dropout(0.3),
                                  nn.Linear(128, CLASSES))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, 10)


def fresh_teacher(seed: int) -> TeacherCNN:
    torch.manual_seed(seed)
    return TeacherCNN()


def teacher() -> nn.Module:
    """The trained teacher (bench_digits.py writes it first)."""
    path = Path(os.environ.get("DIGITS_TEACHER", WORK / "teacher-0.pt"))
    model = TeacherCNN()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def student() -> nn.Module:
    """The "mobile" student: an MLP 64 -> 32 -> 10 over the flattened image (2,410 parameters)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, CLASSES))
