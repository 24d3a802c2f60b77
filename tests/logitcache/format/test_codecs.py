"""Value codecs and sampled targets: error bounds, unbiasedness, reproducibility.

No teacher here: distributions are synthetic (peaked like a language model's, over a few
thousand ids), so each property is checked exactly or with a stated statistical bound.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from logitcache.dumping import sampling
from logitcache.format import codecs

VOCAB = 3000


def lm_like_logits(batch: int, time: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    """Zipf-ish logits with a random peak per position: entropies from ~0.5 to ~6 nats."""
    g = torch.Generator().manual_seed(seed)
    base = -1.1 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    perm = torch.stack([torch.randperm(vocab, generator=g) for _ in range(batch * time)])
    logits = base[perm].view(batch, time, vocab)
    sharp = torch.rand(batch, time, 1, generator=g) * 4 + 0.5
    return logits * sharp + torch.randn(batch, time, vocab, generator=g) * 0.3


# --------------------------------------------------------------------------------------------
# Log-prob codecs: the documented worst case holds on every value


def true_logprobs(n: int = 20000) -> np.ndarray:
    rng = np.random.default_rng(1)
    # dense near 0 (large probabilities), out to -40 and a few down to -300 (clamped by q8)
    return -np.concatenate([rng.exponential(2.0, n), rng.uniform(0, 40, n), [0.0, 300.0]])


def test_float16_error_bound():
    lp = true_logprobs().astype(np.float32)
    stored = lp.astype(np.float16)
    bound = codecs.logprob_error_bound(stored, "float16")
    err = np.abs(stored.astype(np.float64) - lp.astype(np.float64))
    assert (err <= bound).all()
    assert err.max() > 0.25 * bound[err.argmax()]  # the bound is not vacuous


@pytest.mark.parametrize("scale", [codecs.DEFAULT_Q8_SCALE, 8.0, 32.0])
def test_uint8_error_bound(scale: float):
    lp = true_logprobs().astype(np.float32)
    codes = codecs.quantize(lp, scale)
    decoded = codecs.dequantize(codes, scale)
    bound = codecs.logprob_error_bound(decoded, "uint8", scale)
    err = np.abs(decoded.astype(np.float64) - lp)
    inside = lp >= -(codecs.Q8_MAX - 0.5) / scale
    assert (err[inside] <= 0.5 / scale + 1e-6).all()
    assert (err <= bound + 1e-6).all()
    assert np.isinf(bound[~inside]).all()
    # clamped values: both the true and the stored probability are below exp(-254.5 / S)
    assert (np.exp(lp[~inside]) <= math.exp(-(codecs.Q8_MAX - 0.5) / scale)).all()
    assert (np.exp(decoded[~inside]) <= math.exp(-(codecs.Q8_MAX - 0.5) / scale)).all()
    # torch and numpy encode identically
    assert np.array_equal(codecs.quantize(torch.from_numpy(lp), scale).numpy(), codes)


def test_uint8_relative_probability_error():
    """The documented consequence: p'/p within exp(+-1/(2S)) (3.2% at S = 16)."""
    lp = true_logprobs().astype(np.float32)
    lp = lp[lp > -15]
    decoded = codecs.dequantize(codecs.quantize(lp), codecs.DEFAULT_Q8_SCALE)
    ratio = np.exp(decoded.astype(np.float64) - lp)
    assert np.abs(ratio - 1).max() <= math.exp(1 / 32) - 1 + 1e-6


def test_mass_bound_flags_values_off_by_more_than_the_codec_allows():
    lp = torch.log_softmax(lm_like_logits(1, 64)[0], -1).numpy()
    top = np.sort(lp, -1)[:, ::-1][:, :32].copy()
    for dtype, scale in (("float16", 0.0), ("uint8", 16.0), ("float32", 0.0)):
        stored = top.astype(np.float16) if dtype == "float16" else top
        if dtype == "uint8":
            stored = codecs.dequantize(codecs.quantize(top, scale), scale)
        bound = codecs.probability_mass_bound(stored, dtype, scale)
        assert (bound <= 1 + 1e-9).all(), dtype
        corrupted = stored.astype(np.float32) + 0.1  # every value 0.1 nats too high
        assert (codecs.probability_mass_bound(corrupted, dtype, scale)[:8] > 0).all()


def test_decode_topk_restores_descending_order():
    lp = torch.log_softmax(lm_like_logits(1, 16)[0], -1)
    values, ids = lp.topk(8, -1)
    by_id, perm = ids.sort(-1)
    out_ids, out_lp = codecs.decode_topk(
        by_id.numpy(), values.gather(-1, perm).numpy(), "float32", 0.0, "id"
    )
    assert np.array_equal(out_ids, ids.numpy())
    assert np.array_equal(out_lp, values.numpy())


@pytest.mark.parametrize("logprob_dtype", ["float16", "float32", "uint8"])
@pytest.mark.parametrize("id_dtype", [np.uint16, np.uint32])
def test_decode_topk_from_id_order_matches_a_stable_argsort(logprob_dtype, id_dtype):
    """The packed-key sort (float16/uint8 values with 16-bit ids) and the argsort fallback both
    give decreasing log-probs with ties (many, after rounding; both zeros) by increasing id."""
    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(8192, size=(500, 16)), axis=-1).astype(id_dtype)
    lp = -rng.exponential(3.0, size=(500, 16)).round(1)  # rounding makes ties
    lp[:50, :3] = 0.0
    lp[50:100, :2] = -0.0
    stored = lp.astype(np.float32)
    scale = 16.0 if logprob_dtype == "uint8" else 0.0
    if logprob_dtype == "uint8":
        stored = codecs.quantize(stored, scale)
    elif logprob_dtype == "float16":
        stored = stored.astype(np.float16)
    decoded = codecs.decode_logprobs(stored, logprob_dtype, scale).astype(np.float32)
    perm = np.argsort(-decoded, axis=-1, kind="stable")
    out_ids, out_lp = codecs.decode_topk(ids, stored, logprob_dtype, scale, "id")
    assert out_ids.dtype == ids.dtype
    assert np.array_equal(out_ids, np.take_along_axis(ids, perm, -1))
    assert np.array_equal(out_lp, np.take_along_axis(decoded, perm, -1))


# --------------------------------------------------------------------------------------------
# Sampled targets


def test_hash_matches_reference_implementation():
    seqs = torch.tensor([0, 1, 7, 2**40 + 3])
    u = sampling.uniforms(sampling.position_keys(12345, seqs, 5), 4)
    for row, seq in enumerate(seqs.tolist()):
        for pos in range(5):
            assert np.array_equal(
                u[row, pos].numpy(), sampling.reference_uniforms(12345, seq, pos, 4)
            )
    assert ((u >= 0) & (u < 1)).all()


def test_uniforms_are_uniform_and_independent():
    u = sampling.uniforms(sampling.position_keys(3, torch.arange(64), 128), 64).flatten()
    n = u.numel()  # 524288
    hist = torch.histc(u.float(), bins=64, min=0, max=1).double()
    chi2 = float(((hist - n / 64) ** 2 / (n / 64)).sum())
    assert chi2 < 63 + 6 * math.sqrt(2 * 63)  # 6 sigma of chi-square with 63 dof
    lag = torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1]
    assert abs(float(lag)) < 6 / math.sqrt(n)


def test_distinct_counts_layout():
    draws = torch.tensor([[[5, 3, 5, 9, 3, 5]]])
    ids, counts, lengths = sampling.distinct_counts(draws)
    assert lengths.tolist() == [[3]]
    assert ids[0, 0, :3].tolist() == [3, 5, 9] and counts[0, 0].tolist() == [2, 3, 1, 0, 0, 0]


def test_sampled_targets_are_unbiased():
    """Mean of counts/N over many draws equals the exact distribution: a chi-square test per
    position over its ids (cells with expected count >= 5, the rest pooled), and a z-bound on
    every id common enough for the normal approximation."""
    logits = lm_like_logits(2, 8, vocab=400, seed=3)
    probs = torch.softmax(logits.double(), -1).reshape(16, 400)
    n, repeats = 64, 200  # the same 2 x 8 positions under 200 sequence indices and 2 seeds
    totals = torch.zeros(16, 400, dtype=torch.float64)
    for seed in (0, 1):
        keys = sampling.position_keys(seed, torch.arange(2 * repeats), 8)
        draws = sampling.draw(logits.repeat(repeats, 1, 1), keys, n)  # (2 * repeats, 8, n)
        draws = draws.view(repeats, 16, n).permute(1, 0, 2).reshape(16, -1)
        totals.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
    per_row = n * repeats * 2
    worst = 0.0
    for row in range(16):
        expected = probs[row] * per_row
        big = expected >= 5
        obs = torch.cat([totals[row][big], totals[row][~big].sum().view(1)])
        exp = torch.cat([expected[big], expected[~big].sum().view(1)])
        keep = exp > 0
        chi2 = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
        dof = int(keep.sum()) - 1
        worst = max(worst, (chi2 - dof) / math.sqrt(2 * dof))
    assert worst < 5, worst  # 16 tests; z > 5 has probability below 1e-5 each under the null
    common = probs * per_row >= 25
    se = (probs * (1 - probs) / per_row).sqrt()
    z = ((totals / per_row - probs).abs() / se)[common]
    assert common.sum() > 500 and float(z.max()) < 5.5


def _documented_draws(logits: torch.Tensor, keys: torch.Tensor, samples: int) -> torch.Tensor:
    """FORMAT.md's recipe, literally: cumsum(softmax) in float64, divided by its last element,
    the first id whose cdf exceeds u."""
    x = logits.double().reshape(-1, logits.shape[-1])
    cdf = torch.softmax(x, dim=-1).cumsum(dim=-1)
    cdf = cdf / cdf[:, -1:]
    u = sampling.uniforms(keys.reshape(-1), samples)
    return torch.searchsorted(cdf, u, right=True).view(*logits.shape[:2], samples)


@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])  # near-uniform to very peaked
def test_draws_are_the_documented_recipe_draw_for_draw(scale):
    """`draw` multiplies the recipe's divisions out; every draw must stay the recipe's, with
    ids of zero probability (-inf logits, here a whole tail) never drawn."""
    g = torch.Generator().manual_seed(int(scale * 10))
    logits = torch.randn(6, 64, 3000, generator=g) * scale
    logits[:, :, 2500:] = float("-inf")  # the last ids cannot be drawn
    logits[0, 0, :] = float("-inf")
    logits[0, 0, 7] = 0.0  # one possible id only
    keys = sampling.position_keys(4, torch.arange(6), 64)
    got = sampling.draw(logits, keys, 48, chunk_elements=5000)  # a row at a time
    assert torch.equal(got, _documented_draws(logits, keys, 48))
    assert int(got.max()) < 2500 and set(got[0, 0].tolist()) == {7}


def test_temperature_is_applied_before_sampling():
    logits = lm_like_logits(1, 4, vocab=50, seed=5)
    keys = sampling.position_keys(0, torch.arange(1), 4)
    hot = sampling.draw(logits, keys, 20000, temperature=2.0)
    same = sampling.draw(logits / 2.0, keys, 20000)
    assert torch.equal(hot, same)


def test_draws_do_not_depend_on_batching():
    """A sequence's draws depend on (seed, its global index, position): batch it with any
    others, in any order or chunking, and the draws are identical."""
    logits = lm_like_logits(6, 10, vocab=500, seed=7)
    seqs = torch.arange(100, 106)
    whole = sampling.draw(logits, sampling.position_keys(9, seqs, 10), 32)
    for split in ([0, 1, 2, 3, 4, 5, 6], [0, 2, 6], [0, 6]):
        parts = []
        for a, b in itertools.pairwise(split):
            keys = sampling.position_keys(9, seqs[a:b], 10)
            parts.append(sampling.draw(logits[a:b], keys, 32, chunk_elements=700))
        assert torch.equal(torch.cat(parts), whole)
    reversed_ = sampling.draw(logits.flip(0), sampling.position_keys(9, seqs.flip(0), 10), 32)
    assert torch.equal(reversed_.flip(0), whole)
    other_seed = sampling.draw(logits, sampling.position_keys(10, seqs, 10), 32)
    assert not torch.equal(other_seed, whole)


def test_zero_probability_ids_are_never_drawn():
    logits = torch.full((1, 3, 20), -math.inf)
    logits[..., [2, 7, 19]] = torch.tensor([0.0, 1.0, -1.0])
    draws = sampling.draw(logits, sampling.position_keys(0, torch.arange(1), 3), 5000)
    assert set(draws.unique().tolist()) == {2, 7, 19}


def test_decode_sample_uniform_view():
    ids = np.array([3, 5, 9, 1, 4], dtype=np.uint16)
    counts = np.array([2, 3, 1, 4, 2], dtype=np.uint8)
    lengths = np.array([3, 0, 2], dtype=np.uint8)[[0, 2]]  # two positions: 3 and 2 entries
    out_ids, out_lp = codecs.decode_sample(ids, counts, lengths, samples=6)
    assert out_ids.tolist() == [[5, 3, 9], [1, 4, 0]]
    expected = np.log(np.array([[3, 2, 1], [4, 2, 0]]) / 6)
    assert np.allclose(out_lp[:, :2], expected[:, :2]) and out_lp[1, 2] == -np.inf
    assert np.isclose(out_lp[0, 2], np.log(1 / 6))
