"""`stats`: what a cache holds per position, and what each array costs on disk.

Per position (a sequence position with a target row), from the uniform view the reader gives
(ids and log-probs, ``-inf`` slots absent):

``mass``
    the teacher probability on the stored ids, ``sum(exp(logprob))``: top-k coverage. Sampled
    targets store ``count / N``, which sums to exactly 1 by construction (their coverage of the
    true distribution is not known from the cache).
``entropy``
    in nats, of **the stored part only**: ``-sum p log p`` over the stored ids with the stored
    probabilities as they are (top-k: not renormalised, so this is a lower bound on the
    teacher's entropy; sampled: the plug-in entropy of ``count / N``, which underestimates the
    teacher's by about ``(distinct - 1) / (2 N)``).
``tail_entropy_max``
    top-k only: the largest entropy the teacher can have given the stored part, reached when the
    tail mass ``r = 1 - mass`` is spread evenly over the ``V - k`` other ids:
    ``entropy + r log((V - k) / r)``.
``distinct``
    ids stored for the position (k for top-k; the distinct ids among the N draws when sampled).

Bytes per token: every file of every listed part by array (zarr: the array's directory,
metadata included; parquet: each column's compressed chunks, with the footer and headers as
"parquet metadata"), plus the manifest, divided by the cache's token count. A classification
cache's positions are its target rows (a row per view of each example), and its bytes are also
given per example (``bytes_per_example``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from logitcache.format.manifest import MANIFEST_NAME
from logitcache.read.reader import Cache


@dataclass
class CacheStats:
    tokens: int  # positions the statistics below cover (all, or the first --max-tokens)
    mass: np.ndarray
    entropy: np.ndarray
    distinct: np.ndarray
    tail_entropy_max: np.ndarray | None
    bytes_by_array: dict[str, int] = field(default_factory=dict)
    total_tokens: int = 0
    #: A classification cache's examples (its rows are their views), 0 for any other cache.
    total_examples: int = 0

    @property
    def bytes_per_token(self) -> dict[str, float]:
        n = max(self.total_tokens, 1)
        return {name: size / n for name, size in self.bytes_by_array.items()}

    @property
    def bytes_per_example(self) -> dict[str, float]:
        n = max(self.total_examples, 1)
        return {name: size / n for name, size in self.bytes_by_array.items()}

    def summary(self) -> dict[str, Any]:
        def describe(x: np.ndarray) -> dict[str, float]:
            if x.size == 0:
                return {}
            q = np.quantile(x, [0.1, 0.5, 0.9])
            return {
                "mean": float(x.mean()),
                "p10": float(q[0]),
                "p50": float(q[1]),
                "p90": float(q[2]),
                "min": float(x.min()),
                "max": float(x.max()),
            }

        doc = {
            "positions": self.tokens,
            "mass": describe(self.mass),
            "entropy": describe(self.entropy),
            "distinct": describe(self.distinct.astype(np.float64)),
            "bytes_per_token": self.bytes_per_token,
            "bytes_per_token_total": sum(self.bytes_per_token.values()),
        }
        if self.tail_entropy_max is not None:
            doc["tail_entropy_max"] = describe(self.tail_entropy_max)
        if self.total_examples:  # classification: positions are target rows, views of examples
            doc["examples"] = self.total_examples
            doc["bytes_per_example"] = self.bytes_per_example
        return doc


def position_stats(
    target_logprobs: np.ndarray, vocab_size: int, kind: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(mass, entropy, distinct, tail_entropy_max) per row of (T, w) uniform log-probs."""
    lp = np.asarray(target_logprobs, dtype=np.float64)
    present = np.isfinite(lp)
    p = np.where(present, np.exp(np.where(present, lp, 0.0)), 0.0)
    mass = p.sum(-1)
    entropy = -(p * np.where(present, lp, 0.0)).sum(-1)
    distinct = present.sum(-1)
    tail_max = None
    if kind != "sample":  # top-k and top-p: the tail mass is known
        rest = np.clip(1.0 - mass, 0.0, 1.0)
        others = np.maximum(vocab_size - distinct, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            extra = np.where(rest > 0, rest * np.log(others / np.where(rest > 0, rest, 1.0)), 0.0)
        tail_max = entropy + extra
    return mass, entropy, distinct, tail_max


def compute(cache: Cache, max_tokens: int = 0) -> CacheStats:
    """Statistics over the cache's positions (the first `max_tokens` if > 0) and its bytes."""
    m = cache.manifest
    pieces: list[tuple] = []
    seen = 0
    for index in range(cache.num_parts):
        arrays = cache.read_decoded(index)
        lp = arrays.target_logprobs
        if arrays.target_positions is not None:  # a masked-LM cache: its target rows only
            lp = lp[arrays.target_positions]
        if max_tokens and seen + len(lp) > max_tokens:
            lp = lp[: max_tokens - seen]
        pieces.append(position_stats(lp, m.teacher.vocab_size, m.targets.kind))
        seen += len(lp)
        if max_tokens and seen >= max_tokens:
            break
    mass, entropy, distinct, tail = (
        np.concatenate([p[i] for p in pieces]) if pieces and pieces[0][i] is not None else None
        for i in range(4)
    )
    if mass is None:
        mass = entropy = np.zeros(0)
        distinct = np.zeros(0, dtype=np.int64)
    return CacheStats(
        tokens=seen,
        mass=mass,
        entropy=entropy,
        distinct=distinct,
        tail_entropy_max=tail,
        bytes_by_array=bytes_by_array(cache),
        total_tokens=m.tokens,
        total_examples=m.sequences if m.task is not None else 0,
    )


def bytes_by_array(cache: Cache) -> dict[str, int]:
    """On-disk bytes of the cache by array name (see the module docstring)."""
    sizes: dict[str, int] = {}
    for index, part in enumerate(cache.manifest.parts):
        for name, size in cache.backend.array_bytes(cache.parts_dir(index), part).items():
            sizes[name] = sizes.get(name, 0) + size
    manifest = Path(cache.root) / MANIFEST_NAME
    if manifest.is_file():
        sizes["manifest"] = manifest.stat().st_size
    return sizes


def plot(stats: CacheStats, out: Path, title: str = "") -> Path:
    """Histograms of mass, entropy and distinct ids per position, and bytes/token by array."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax = axes[0, 0]
    ax.hist(stats.mass, bins=50, range=(0.0, 1.0), color="tab:blue")
    ax.set(title="teacher mass on the stored ids", xlabel="sum p (stored)", ylabel="positions")
    ax = axes[0, 1]
    top = max(float(stats.entropy.max(initial=0.0)), 1e-3)
    if stats.tail_entropy_max is not None:
        top = max(top, float(np.quantile(stats.tail_entropy_max, 0.99)) if stats.tokens else top)
    ax.hist(stats.entropy, bins=50, range=(0, top), alpha=0.8, label="stored part")
    if stats.tail_entropy_max is not None:
        ax.hist(stats.tail_entropy_max, bins=50, range=(0, top), alpha=0.5, label="max with tail")
        ax.legend()
    ax.set(title="entropy per position", xlabel="nats", ylabel="positions")
    ax = axes[1, 0]
    hi = int(stats.distinct.max(initial=1))
    ax.hist(stats.distinct, bins=np.arange(0.5, hi + 1.5, max(1, math.ceil(hi / 60))))
    ax.set(title="distinct ids per position", xlabel="ids", ylabel="positions")
    ax = axes[1, 1]
    per = stats.bytes_per_token
    names = sorted(per, key=per.get)
    ax.barh(names, [per[n] for n in names], color="tab:green")
    ax.set(title=f"bytes/token by array (total {sum(per.values()):.1f})", xlabel="bytes/token")
    fig.suptitle(title or f"{stats.tokens:,} positions")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
