"""Sampled soft targets: N draws per position from the teacher's distribution, on the device.

`dump --targets sample --samples N` stores, per position, the distinct ids among N draws with
replacement from ``softmax(logits / temperature)`` and how often each was drawn. ``counts / N``
is an unbiased estimate of the teacher's distribution (E[count_i / N] = p_i exactly, up to the
float64 rounding of the CDF below), with variance p_i (1 - p_i) / N per id.

Reproducibility. Draw j of position t of global sequence s (its storage index in the cache)
uses the uniform number

    key(s, t) = mix(mix(mix(seed + GOLDEN) + s) + t)          (64-bit wrap-around arithmetic)
    u(s, t, j) = (mix(key(s, t) + (j + 1) * GOLDEN) >> 11) * 2**-53        in [0, 1)

where ``mix`` is the splitmix64 finaliser (a bijection of 64-bit integers) and GOLDEN =
0x9E3779B97F4A7C15. The drawn id is the inverse CDF at u: the first id whose cumulative
probability (float64 cumulative sum of the float64 softmax, divided by its last element so that
it ends at exactly 1) exceeds u (computed as `draw` says, without dividing the row twice). So a position's draws depend only on (seed, s, t) and the
teacher's logits there: not on the batch size, on which batch or part the sequence fell in, on
resuming, or on how work is split across processes. CPU and CUDA compute the same u exactly;
the CDF can differ in the last float64 bit between devices, which changes a draw only when u
falls within ~1e-16 of a boundary.

Nothing here allocates more than ``chunk_elements`` float64 values at once (default 2**25,
256 MiB): rows of the (batch, time, vocab) logits are processed in slices.
"""

from __future__ import annotations

import numpy as np
import torch

from logitcache.dumping import native

GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1
MAX_SAMPLES = 65535  # counts are stored as uint8 (N <= 255) or uint16


def _signed(x: int) -> int:
    """A 64-bit pattern as the int64 value torch stores for it."""
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 tensors (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors, with 64-bit wrap-around multiplication."""
    x = (x ^ _shr(x, 30)) * _signed(_M1)
    x = (x ^ _shr(x, 27)) * _signed(_M2)
    return x ^ _shr(x, 31)


def mix_int(x: int) -> int:
    """`mix` on one Python integer (the reference; also used for the seed)."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * _M1) & _MASK64
    x = ((x ^ (x >> 27)) * _M2) & _MASK64
    return x ^ (x >> 31)


def position_keys(seed: int, sequences: torch.Tensor, length: int, start: int = 0) -> torch.Tensor:
    """(B, length) int64 keys of positions start..start+length-1 of global sequences
    `sequences` (B,)."""
    base = _signed(mix_int(seed + GOLDEN))
    rows = mix(sequences.to(torch.int64) + base)  # (B,)
    positions = torch.arange(start, start + length, dtype=torch.int64, device=sequences.device)
    return mix(rows[:, None] + positions[None, :])  # (B, length)


def uniforms(keys: torch.Tensor, samples: int) -> torch.Tensor:
    """(*keys.shape, samples) float64 uniforms in [0, 1), one per draw."""
    draws = torch.arange(1, samples + 1, dtype=torch.int64, device=keys.device)
    steps = draws * _signed(GOLDEN)  # (j + 1) * GOLDEN, wrapped
    bits = _shr(mix(keys[..., None] + steps), 11)  # 53 random bits
    return bits.to(torch.float64) * (2.0**-53)


def reference_uniforms(seed: int, sequence: int, position: int, samples: int) -> np.ndarray:
    """The same numbers in plain Python integers (for tests and other implementations)."""
    key = mix_int(mix_int(mix_int(seed + GOLDEN) + sequence) + position)
    out = [(mix_int(key + (j + 1) * GOLDEN) >> 11) * 2.0**-53 for j in range(samples)]
    return np.array(out, dtype=np.float64)


#: float64 values a CPU turns into a CDF at once: a few hundred rows of a 8k-32k vocabulary,
#: so the copy, the exponentials and the running sum pass over a slice in cache instead of
#: making one trip to memory each. With the divisions multiplied out (see `draw`), on one core:
#: 0.07 instead of 0.22 s for the draws of 2048 x 8192 logits, every draw the same.
CPU_DRAW_ELEMENTS = 1 << 21


def draw(
    logits: torch.Tensor,
    keys: torch.Tensor,
    samples: int,
    *,
    temperature: float = 1.0,
    chunk_elements: int = 1 << 25,
) -> torch.Tensor:
    """(B, T, samples) int64 ids drawn from softmax(logits / temperature) at each position.

    logits (B, T, V) any float dtype; keys (B, T) from `position_keys`.

    The id is the first v with ``C[v] > u * C[V-1]``, where C is the float64 running sum of
    ``exp(x - max x)``: the documented ``cumsum(softmax(x)) / last > u`` with the two divisions
    multiplied out, so the row is not divided twice (equal up to float64 rounding, which moves
    a draw only when u is within ~1e-16 of a boundary). The threshold is kept below ``C[V-1]``,
    so that every u < 1 lands on an id of non-zero probability.
    """
    batch, time, vocab = logits.shape
    if (logits.device.type == "cpu" and logits.dtype == torch.float32 and temperature == 1.0
            and native.available()):  # fmt: skip
        return native.draw(logits, uniforms(keys, samples))  # the same draws, a fifth the time
    flat = logits.reshape(batch * time, vocab)
    keys = keys.reshape(batch * time)
    out = torch.empty(batch * time, samples, dtype=torch.int64, device=logits.device)
    if logits.device.type == "cpu":
        chunk_elements = min(chunk_elements, CPU_DRAW_ELEMENTS)
    rows = max(1, min(chunk_elements // max(vocab, 1), batch * time))
    buffer = torch.empty(rows, vocab, dtype=torch.float64, device=logits.device)
    for start in range(0, batch * time, rows):
        stop = min(start + rows, batch * time)
        cdf = buffer[: stop - start]
        cdf.copy_(flat[start:stop])  # to float64
        if temperature != 1.0:
            cdf /= temperature
        cdf.sub_(cdf.amax(dim=-1, keepdim=True)).exp_().cumsum_(dim=-1)
        last = cdf[:, -1:]
        below_last = torch.nextafter(last, torch.zeros_like(last))
        threshold = torch.minimum(uniforms(keys[start:stop], samples) * last, below_last)
        out[start:stop] = torch.searchsorted(cdf, threshold, right=True)
    return out.view(batch, time, samples)


def distinct_counts(draws: torch.Tensor, count_dtype: torch.dtype = torch.uint8):
    """Distinct ids among the draws of each position, ascending, with their counts.

    draws (..., N) int64 -> (ids (..., N) int32, counts (..., N) `count_dtype`, lengths (...)
    int64): the first ``lengths`` slots of a row hold its distinct ids in increasing order and
    their counts (>= 1); the remaining slots are padding with count 0 and id 0.
    """
    ordered, _ = draws.sort(dim=-1)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    slot = first.cumsum(dim=-1) - 1  # slot of each draw among the row's distinct ids
    counts = torch.zeros_like(ordered).scatter_add_(-1, slot, torch.ones_like(ordered))
    ids = torch.zeros_like(ordered).scatter_(-1, slot, ordered)  # equal values per slot
    return ids.to(torch.int32), counts.to(count_dtype), first.sum(dim=-1)
