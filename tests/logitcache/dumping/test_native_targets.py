"""The C targets against torch's operators and the documented recipe: the same top-k ids and
log-probs on every row shape the dump meets (peaked, flat, tied, partly -inf, broken), the same
draws, whatever the thread count; a clean fallback to torch where the kernel cannot be built;
and no change to the process's floating-point mode when it loads."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from logitcache.dumping import native, sampling, targets

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler here")


def reference(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch in float64; ties broken by the lower id, as the kernel promises."""
    x = logits.double()
    # a stable sort on the negated values keeps equal values in increasing id order
    order = torch.sort(-x, dim=-1, stable=True).indices[..., :k]
    return x.gather(-1, order) - torch.logsumexp(x, -1, keepdim=True), order


def lm_like(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Peaked rows: a Gaussian floor with a few ids far above it, like a trained LM's."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * 2.0
    hot = torch.randint(0, vocab, (rows, 8), generator=g)
    return x.scatter_add(1, hot, torch.rand(rows, 8, generator=g) * 12)


@pytest.mark.parametrize(
    ("vocab", "k"),
    [(8192, 64), (8192, 1), (3001, 32), (1000, 200), (50, 50), (17, 5)],
)
def test_matches_torch(vocab: int, k: int) -> None:
    x = lm_like(300, vocab, seed=vocab + k)
    values, ids = native.topk_logprobs(x, k)
    want_values, want_ids = reference(x, k)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(values.double(), want_values, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["C", "torch"])
def test_wide_rows_and_partial_last_slice(path: str) -> None:
    """Logits spread over hundreds of nats (the kernel's exp clamps far below the maximum), far
    from 0 (log-probs keep float32's precision there, in both paths), and vocabularies whose
    last strided slice of the row is short."""
    for vocab, scale, shift in [(8192, 40.0, 0.0), (8191, 5.0, 1e4), (4099, 200.0, -3e3)]:
        x = lm_like(200, vocab, seed=vocab) * scale + shift
        x[::7, : vocab // 3] = -1e30  # far below every other entry: no mass, no candidates
        with native.torch_operators() if path == "torch" else contextlib.nullcontext():
            values, ids = targets.topk_logprobs(x, 64)
        want_values, want_ids = reference(x, 64)
        # torch.topk breaks the ties that float32 makes at 1e4 its own way: the same logits
        assert torch.equal(x.gather(-1, ids), x.gather(-1, want_ids))
        assert path == "torch" or torch.equal(ids, want_ids)
        torch.testing.assert_close(values.double(), want_values, atol=2e-5, rtol=1e-5)


def test_flat_and_tied_rows_keep_the_lowest_ids() -> None:
    x = torch.zeros(4, 4096)
    x[1, ::3] = 1.0  # ties among a third of the row, more candidates than the ranked path takes
    x[2] = torch.arange(4096).remainder(7).float()  # seven values, each tied ~585 times
    x[3, 4000:] = 5.0  # the best ids at the end of the row
    values, ids = native.topk_logprobs(x, 64)
    want_values, want_ids = reference(x, 64)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(values.double(), want_values, atol=2e-5, rtol=1e-5)


def test_non_finite_rows_get_nan_and_masked_ids_do_not_count() -> None:
    x = lm_like(6, 1024, seed=1)
    x[0, 10] = float("nan")
    x[1, 20] = float("inf")
    x[2] = float("-inf")
    x[3, :1000] = float("-inf")  # a masked vocabulary: 24 ids left, fewer than k
    x[4, 1::2] = float("-inf")
    values, ids = native.topk_logprobs(x, 32)
    assert values[:3].isnan().all()
    want_values, want_ids = reference(x[3:], 32)
    assert torch.equal(ids[3:5, :24], want_ids[:2, :24]) and torch.equal(ids[5], want_ids[2])
    assert values[3, 24:].isneginf().all()  # the -inf ids that fill the top 32
    torch.testing.assert_close(values[4:].double(), want_values[1:], atol=2e-5, rtol=1e-5)


def test_threads_split_rows_without_changing_them() -> None:
    x = lm_like(1000, 2048, seed=2).view(10, 100, 2048)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.topk_logprobs(x, 16)
        torch.set_num_threads(4)
        four = native.topk_logprobs(x, 16)
    finally:
        torch.set_num_threads(threads)
    assert one[0].shape == (10, 100, 16)
    assert torch.equal(one[0], four[0]) and torch.equal(one[1], four[1])


def test_the_dump_targets_use_it_on_a_cpu() -> None:
    """device_targets' top-k equals the torch path's within float16 rounding, same ids."""
    x = lm_like(2 * 50, 4096, seed=3).view(2, 50, 4096)
    spec = targets.TargetSpec(kind="topk", k=16)
    got = targets.device_targets(x, spec, torch.arange(2))
    want_values, want_ids = reference(x, 16)
    assert torch.equal(got["target_ids"].long(), want_ids)
    torch.testing.assert_close(got["target_logprobs"].double(), want_values.half().double(),
                               atol=2e-3, rtol=2e-3)  # fmt: skip
    assert got["finite"].all()


def test_disabled_falls_back_to_torch(tmp_path) -> None:
    """With LOGITCACHE_NATIVE=0 the kernels are unavailable and the targets are torch's: a fresh
    process with an empty build directory, which stays empty."""
    code = (
        "import torch\n"
        "from logitcache.dumping import native, targets\n"
        "x = torch.randn(8, 300)\n"
        "v, i = targets.topk_logprobs(x, 4)\n"
        "assert torch.equal(i, x.topk(4).indices)\n"
        "print(native.available())\n"
    )
    environ = {**os.environ, "LOGITCACHE_NATIVE_DIR": str(tmp_path), "LOGITCACHE_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "False"
    assert not list(tmp_path.iterdir())


def test_a_failing_compiler_gives_none_and_leaves_nothing(tmp_path) -> None:
    assert native.load(tmp_path, "/bin/false") is None
    assert not list(tmp_path.iterdir())


def test_builds_once_into_its_directory(tmp_path) -> None:
    """A fresh build directory gets one library, named by the source and the CPU; the next
    load finds it instead of compiling again."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert native.load(tmp_path, compiler) is not None
    (built,) = tmp_path.iterdir()
    assert built.name.startswith("targets-") and built.suffix == ".so"
    stamp = built.stat().st_mtime_ns
    assert native.load(tmp_path, compiler) is not None
    assert [p.stat().st_mtime_ns for p in tmp_path.iterdir()] == [stamp]


def recipe_draws(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """docs/FORMAT.md's definition, literally: float64 cumsum of the softmax, divided by its last
    element; the first id whose value exceeds u."""
    x = logits.double().numpy()
    p = np.exp(x - x.max(-1, keepdims=True))
    cdf = np.cumsum(p / p.sum(-1, keepdims=True), -1)
    cdf /= cdf[..., -1:]
    got = [np.searchsorted(c, uu, side="right") for c, uu in zip(cdf, u.numpy(), strict=True)]
    return torch.from_numpy(np.minimum(np.stack(got), x.shape[-1] - 1))


@pytest.mark.parametrize("vocab", [8192, 3001, 17, 2, 1])
def test_draws_are_the_recipe_draw_for_draw(vocab: int) -> None:
    x = lm_like(400, vocab, seed=vocab) if vocab > 8 else torch.randn(400, vocab)
    keys = sampling.position_keys(7, torch.arange(4), 100).reshape(400)
    u = sampling.uniforms(keys, 64)
    got = native.draw(x, u)
    assert torch.equal(got, recipe_draws(x, u))
    x3 = x.view(4, 100, vocab)
    assert torch.equal(sampling.draw(x3, keys.view(4, 100), 64).view(400, 64), got)


def test_draws_keep_zero_probability_ids_out() -> None:
    """Ids whose probability is 0 in float64 (-inf logits, or far below the maximum) are never
    drawn, even at u just below 1 and at the row's ends."""
    x = torch.full((3, 64), -1e4)
    x[0, 0] = x[1, 63] = 0.0
    x[2, 31:33] = 0.0
    x[:, 10] = float("-inf")
    u = torch.tensor([0.0, 0.5, 1 - 2**-53], dtype=torch.float64).expand(3, 3).contiguous()
    got = native.draw(x, u)
    assert (got[0] == 0).all() and (got[1] == 63).all()
    assert got[2].tolist() == [31, 32, 32]  # C[31] = half the mass: u = 0.5 is not below it


def test_loading_it_leaves_subnormals_alone() -> None:
    """Compiled with -ffast-math but linked without: torch still keeps subnormal floats."""
    assert native.available()
    tiny = torch.tensor([1e-39], dtype=torch.float32)  # subnormal in float32
    assert (tiny * 0.5).item() > 0.0


def test_torch_operators_block_takes_torch_path() -> None:
    x = lm_like(64, 1000, seed=4)
    assert native.available()
    with native.torch_operators():
        assert not native.available()
        values, ids = targets.topk_logprobs(x, 8)
    assert native.available()
    want_values, want_ids = reference(x, 8)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(values.double(), want_values, atol=2e-5, rtol=1e-5)


def test_openmp_runs_on_torchs_own_runtime() -> None:
    """Built with OpenMP, the library shares torch's libgomp (one runtime, one team of workers)
    instead of bringing a second one whose threads would fight torch's for the cores. In a
    fresh process: others in this one (scikit-learn's) may have loaded their own copy."""
    if not native.openmp():
        pytest.skip("the compiler here has no OpenMP")
    code = (
        "import json, pathlib, torch\n"
        "from logitcache.dumping import native\n"
        "native.topk_logprobs(torch.randn(300, 100), 4)\n"
        "lines = pathlib.Path('/proc/self/maps').read_text().splitlines()\n"
        "print(json.dumps(sorted({x.split()[-1] for x in lines if 'libgomp' in x})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)  # fmt: skip
    (runtime,) = json.loads(out.stdout)
    assert "torch" in runtime


def test_without_openmp_a_pool_gives_the_same_targets(tmp_path, monkeypatch) -> None:
    x = lm_like(700, 3001, seed=5)
    keys = sampling.position_keys(3, torch.arange(7), 100).reshape(700)
    u = sampling.uniforms(keys, 16)
    want = (*native.topk_logprobs(x, 32), native.draw(x, u))
    monkeypatch.setattr(native, "OPENMP", ())
    lib = native.load(tmp_path, shutil.which("cc") or shutil.which("gcc"))
    assert lib is not None and not lib.openmp
    monkeypatch.setattr(native, "_library", lambda: lib)
    got = (*native.topk_logprobs(x, 32), native.draw(x, u))
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_the_log_probs_do_not_depend_on_the_vector_width(tmp_path, monkeypatch) -> None:
    """Built for 128-bit vectors instead of this machine's widest, the kernel gives the same
    bits: its sum of exps is added in fixed lanes, so a cache's bytes do not depend on whether
    the dumping CPU has AVX2 or AVX-512."""
    if not native._X86:
        pytest.skip("-mprefer-vector-width is an x86 option")
    x = lm_like(500, 8192, seed=6) * 3
    want = native.topk_logprobs(x, 64)
    monkeypatch.setattr(native, "FLAGS", (*native.FLAGS, "-mprefer-vector-width=128"))
    lib = native.load(tmp_path, shutil.which("cc") or shutil.which("gcc"))
    assert lib is not None
    monkeypatch.setattr(native, "_library", lambda: lib)
    got = native.topk_logprobs(x, 64)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
