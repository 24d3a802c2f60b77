"""The held-out yardstick of `bench_fidelity`: a teacher's full distribution on text nobody trained
on, computed once, and the exact measures of a student against it.

The teacher's log-probabilities over the whole vocabulary are computed once per run and kept in
memory (64 x 256 positions x 8192 ids in float32 is 0.5 GiB), so that measuring a student, at
the end of its run or every few steps along it (the KL trajectory), costs one student forward
and no teacher forward. Every measure is exact: KL(teacher || student) sums over all V ids.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor

#: Confidence bins of the expected calibration error (equal width over [0, 1]).
ECE_BINS = 15
#: Top-k masses reported for the teacher (how much of its distribution k ids hold).
TEACHER_MASS_KS = (8, 32, 64)


@dataclasses.dataclass
class HeldOut:
    """Held-out sequences (n, T) and the teacher's log-probs at every position but the last."""

    ids: Tensor  # (n, T) int64
    teacher_logp: Tensor  # (n, T-1, V) float32

    @classmethod
    def build(cls, teacher: torch.nn.Module, ids: Tensor, batch: int = 8) -> HeldOut:
        parts = []
        with torch.no_grad():
            for start in range(0, len(ids), batch):
                logits = teacher(input_ids=ids[start : start + batch]).logits.float()
                parts.append(torch.log_softmax(logits, -1)[:, :-1])
        return cls(ids=ids, teacher_logp=torch.cat(parts))

    @property
    def labels(self) -> Tensor:
        return self.ids[:, 1:]

    def teacher_stats(self) -> dict[str, float]:
        """How strong (CE on the real next tokens) and how peaked (entropy, top-1 probability,
        the mass its top k ids hold) the teacher is on this text, per position."""
        t = self.teacher_logp
        p = t.exp()
        stats = {
            "ce": float(-t.gather(-1, self.labels[..., None]).mean()),
            "entropy": float(-(p * t).sum(-1).mean()),
            "top1_prob": float(p.max(-1).values.mean()),
        }
        top = p.topk(max(TEACHER_MASS_KS), dim=-1).values.cumsum(-1)
        for k in TEACHER_MASS_KS:
            stats[f"mass_top{k}"] = float(top[..., k - 1].mean())
        return stats

    def measure(self, student: torch.nn.Module, batch: int = 8) -> dict[str, float]:
        """Held-out CE, exact KL(teacher || student), ECE of the student's top-1 and top-1
        agreement with the teacher's argmax. The student is left in the mode it came in."""
        was_training = student.training
        student.eval()
        conf_sum = torch.zeros(ECE_BINS, dtype=torch.float64)
        acc_sum = torch.zeros(ECE_BINS, dtype=torch.float64)
        ce = kl = agree = 0.0
        with torch.no_grad():
            for start in range(0, len(self.ids), batch):
                ids = self.ids[start : start + batch]
                t = self.teacher_logp[start : start + batch]
                s = torch.log_softmax(student(input_ids=ids).logits.float(), -1)[:, :-1]
                labels = ids[:, 1:]
                ce += float(-s.gather(-1, labels[..., None]).sum())
                kl += float((t.exp() * (t - s)).sum())
                conf, pred = s.max(-1)
                agree += float((pred == t.argmax(-1)).sum())
                conf = conf.exp().flatten().double()
                right = (pred == labels).flatten().double()
                which = (conf * ECE_BINS).long().clamp(max=ECE_BINS - 1)
                conf_sum.index_add_(0, which, conf)
                acc_sum.index_add_(0, which, right)
        student.train(was_training)
        count = self.labels.numel()
        ece = float((conf_sum - acc_sum).abs().sum()) / count
        return {"ce": ce / count, "kl": kl / count, "ece": ece, "top1": agree / count}


def load_model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def non_embedding_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "wte" not in n and "wpe" not in n)
