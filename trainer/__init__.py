"""trainer: train a student from a logitcache cache, without ever loading the teacher.

It reads caches through the reader side of logitcache only. The names below are imported on
first use, so ``import trainer`` (and ``trainer plot``) stay light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "DEFAULT_TAIL",
    "LOSSES",
    "TAIL_MODES",
    "CacheDataset",
    "CacheSequences",
    "ClassifierConfig",
    "DistillationLoss",
    "DistillationTrainer",
    "FitConfig",
    "FusedDistillationLoss",
    "LossFn",
    "LossParts",
    "StudentTokens",
    "ULDLoss",
    "build_student",
    "classifier_loss",
    "collate_sequences",
    "distillation_loss",
    "evaluate",
    "evaluate_classifier",
    "fit",
    "fit_classifier",
    "fused_distillation_loss",
    "load_rows",
    "plot_run",
    "train_classifier",
    "uld_distance",
]

_HOME = {
    "DEFAULT_TAIL": "trainer.losses",
    "LOSSES": "trainer.losses",
    "TAIL_MODES": "trainer.losses",
    "DistillationLoss": "trainer.losses",
    "LossFn": "trainer.losses",
    "LossParts": "trainer.losses",
    "distillation_loss": "trainer.losses",
    "ULDLoss": "trainer.losses",
    "uld_distance": "trainer.losses",
    "StudentTokens": "trainer.align",
    "CacheDataset": "trainer.dataset",
    "CacheSequences": "trainer.hf",
    "DistillationTrainer": "trainer.hf",
    "collate_sequences": "trainer.hf",
    "FitConfig": "trainer.config",
    "FusedDistillationLoss": "trainer.fused",
    "fused_distillation_loss": "trainer.fused",
    "fit": "trainer.recipe",
    "build_student": "trainer.student",
    "evaluate": "trainer.evaluation",
    "plot_run": "trainer.plot",
    "ClassifierConfig": "trainer.classify",
    "classifier_loss": "trainer.classify",
    "evaluate_classifier": "trainer.classify",
    "fit_classifier": "trainer.classify",
    "load_rows": "trainer.classify",
    "train_classifier": "trainer.classify",
}

if TYPE_CHECKING:
    from trainer.align import StudentTokens
    from trainer.classify import (
        ClassifierConfig,
        classifier_loss,
        evaluate_classifier,
        fit_classifier,
        load_rows,
        train_classifier,
    )
    from trainer.config import FitConfig
    from trainer.dataset import CacheDataset
    from trainer.evaluation import evaluate
    from trainer.fused import FusedDistillationLoss, fused_distillation_loss
    from trainer.hf import CacheSequences, DistillationTrainer, collate_sequences
    from trainer.losses import (
        DEFAULT_TAIL,
        LOSSES,
        TAIL_MODES,
        DistillationLoss,
        LossFn,
        LossParts,
        ULDLoss,
        distillation_loss,
        uld_distance,
    )
    from trainer.plot import plot_run
    from trainer.recipe import fit
    from trainer.student import build_student


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
