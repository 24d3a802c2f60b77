"""The chunked path (`logitcache.dumping.chunked`) against the full logits it replaces.

Five families of random-initialised tiny causal LMs, each with the final step its config sets
(none, a tanh soft-cap, a multiplier, a divisor), split at their final hidden states: the
split's logits equal the model's own, and the targets computed a few time steps at a time equal
those of the full logits (top-k ids equal away from ties and log-probs within float tolerance;
sampled draws identical). Models whose logits the split does not reproduce keep the full path,
and say why; so do factory teachers. End to end, a dump of the tiny GPT-2 teacher in chunks
writes the same cache as one from its full logits.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch
import transformers

import logitcache
from logitcache.dumping import chunked, targets
from logitcache.dumping.pipeline import DumpOptions, dump
from logitcache.errors import LogitCacheError

CPU = torch.device("cpu")
VOCAB = 300
LAYERS = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64,
}  # fmt: skip
#: family -> (model class, config, the final steps the split should find: multiply, divide, cap)
FAMILIES = {
    "gpt2": ("GPT2LMHeadModel", transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64), (None, None, None)),
    "llama": ("LlamaForCausalLM", transformers.LlamaConfig(**LAYERS), (None, None, None)),
    # a cap of 0.5 on logits of about that size: the cap changes every logit
    "gemma2": ("Gemma2ForCausalLM", transformers.Gemma2Config(
        **LAYERS, head_dim=16, final_logit_softcapping=0.5), (None, None, 0.5)),
    "cohere": ("CohereForCausalLM", transformers.CohereConfig(**LAYERS, logit_scale=0.25),
               (0.25, None, None)),
    "granite": ("GraniteForCausalLM", transformers.GraniteConfig(**LAYERS, logits_scaling=4.0),
                (None, 4.0, None)),
}  # fmt: skip


def _model(family: str, cls_name: str | None = None) -> torch.nn.Module:
    name, config, _ = FAMILIES[family]
    torch.manual_seed(0)
    return getattr(transformers, cls_name or name)(config).eval()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request) -> tuple[str, torch.nn.Module, chunked.SplitHead]:
    model = _model(request.param)
    split = chunked.split_head(model, CPU)
    assert isinstance(split, chunked.SplitHead), split
    return request.param, model, split


def _ids(batch: int = 2, time: int = 21) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, time), generator=torch.Generator().manual_seed(1))


def test_the_split_finds_the_final_steps_and_gives_the_models_own_logits(family):
    name, model, split = family
    assert (split.multiply, split.divide, split.softcap) == FAMILIES[name][2]
    ids = _ids()
    with torch.inference_mode():
        full = model(ids).logits.float()
        hidden = split.hidden(ids)  # (batch, time, hidden)
        pieces = torch.cat([split.logits(hidden[:, t : t + 4]) for t in range(0, 21, 4)], dim=1)
    torch.testing.assert_close(pieces, full, rtol=1e-6, atol=1e-6)


SPECS = {
    "topk-float32-id": targets.TargetSpec(kind="topk", k=8, logprob_dtype="float32", order="id"),
    "topk-uint8": targets.TargetSpec(kind="topk", k=8, logprob_dtype="uint8", logprob_scale=16.0),
    "topk-temperature": targets.TargetSpec(kind="topk", k=5, temperature=2.0),
    "sample": targets.TargetSpec(kind="sample", samples=16, seed=3),
    # nearly flat random-init logits over 300 ids: a coverage of 0.1 takes about 30 of them
    "topp": targets.TargetSpec(kind="topp", k=48, top_p=0.1, min_k=1),
    "topp-uint8-id": targets.TargetSpec(
        kind="topp", k=48, top_p=0.1, min_k=4, order="id", logprob_dtype="uint8", logprob_scale=16.0
    ),
}


@pytest.mark.parametrize("spec_name", sorted(SPECS))
@pytest.mark.parametrize("chunk_tokens", [2, 6, 1000])  # 1 time step, 3, all at once
def test_chunked_targets_equal_those_of_the_full_logits(family, spec_name, chunk_tokens):
    _, model, split = family
    spec, ids, sequences = SPECS[spec_name], _ids(), torch.tensor([40, 41])
    with torch.inference_mode():
        full_logits = model(ids).logits
    want = targets.device_targets(full_logits, spec, sequences)
    got = chunked.chunked_targets(
        split, split.hidden(ids), spec, sequences, targets.device_targets, chunk_tokens
    )
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype, name
    if spec.kind == "sample":  # draws keyed by (seed, sequence, position): identical
        for name in want:
            assert torch.equal(got[name], want[name]), name
        return
    assert torch.equal(got["finite"], want["finite"])
    if spec.kind == "topp":  # the same count of ids per position, not at a clamp
        assert torch.equal(got["target_lengths"], want["target_lengths"])
        assert 1 < want["target_lengths"].float().mean() < spec.k
    # ids equal away from ties: where the k-th and (k+1)-th logits are apart
    ordered = (full_logits.float() / spec.temperature).sort(-1, descending=True).values
    apart = (ordered[..., spec.k - 1] - ordered[..., spec.k]) > 1e-5  # (batch, time)
    assert apart.float().mean() > 0.9
    assert torch.equal(got["target_ids"][apart], want["target_ids"][apart])
    lp_got, lp_want = got["target_logprobs"].float(), want["target_logprobs"].float()
    if spec.logprob_dtype == "uint8":  # codes: at most one step apart at a rounding boundary
        assert (lp_got[apart] - lp_want[apart]).abs().max() <= 1
    else:
        torch.testing.assert_close(lp_got[apart], lp_want[apart], rtol=1e-5, atol=1e-5)


def test_time_steps_come_from_the_budget_or_the_option():
    # auto at 131072 ids: 256 MiB of float32 logits are 512 positions, 256 steps of batch 2
    assert chunked.time_steps(0, 2, 2048, 131072) == 256
    assert chunked.time_steps(0, 1, 100, 131072) == 100  # never past the batch's length
    assert chunked.time_steps(0, 4096, 8, 1 << 18) == 1  # at least one step
    assert chunked.time_steps(10, 3, 50, VOCAB) == 3


def test_auto_chunks_are_cache_sized_on_a_cpu_and_budget_sized_on_a_gpu():
    assert chunked.auto_chunk_tokens(CPU, 8192) == chunked.CPU_CHUNK_TOKENS == 512
    assert chunked.auto_chunk_tokens(torch.device("cuda"), 131072) == 512
    assert chunked.auto_chunk_tokens(torch.device("cuda"), 8192) == 8192
    model = _model("gpt2")
    assert chunked.plan_logits(model, CPU, pretrained=True, chunk_tokens=0).chunk_tokens == 512
    assert chunked.plan_logits(model, CPU, pretrained=True, chunk_tokens=96).chunk_tokens == 96


# --------------------------------------------------------------------------------------------
# The full path, and why


class Doubling(transformers.GPT2LMHeadModel):
    """A GPT-2 whose forward doubles its logits: a final step no config names."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


class ScaledHead(torch.nn.Linear):
    """A linear head that computes something else (like a quantised one)."""

    def forward(self, x):
        return super().forward(x) * 3


def test_what_the_split_would_not_reproduce_keeps_the_full_path():
    doubled = Doubling(FAMILIES["gpt2"][1]).eval()
    assert "differs from the model's own logits" in chunked.split_head(doubled, CPU)

    unknown = _model("llama")
    unknown.config.output_multiplier = 2.0  # a step after the head, not among those reproduced
    assert "output_multiplier=2" in chunked.split_head(unknown, CPU)

    custom = _model("gpt2")
    custom.lm_head = ScaledHead(32, VOCAB, bias=False)
    assert "a ScaledHead, not a plain torch.nn.Linear" in chunked.split_head(custom, CPU)

    plain = torch.nn.Sequential(torch.nn.Embedding(VOCAB, 8), torch.nn.Linear(8, VOCAB))
    assert "not a Hugging Face model" in chunked.split_head(plain, CPU)


def test_the_probe_catches_a_soft_cap_left_out():
    model = _model("gemma2")
    split = chunked.split_head(model, CPU)
    assert isinstance(split, chunked.SplitHead) and split.softcap == 0.5
    problem = chunked._probe(model, dataclasses.replace(split, softcap=None), CPU)
    assert problem is not None and "Gemma2ForCausalLM takes a step after its head" in problem


def test_the_plan_names_the_path():
    model = _model("gpt2")
    plan = chunked.plan_logits(model, CPU, pretrained=True, chunk_tokens=0)
    assert plan.split is not None
    assert plan.describe().startswith("chunked logits: GPT2LMHeadModel's linear head over")
    factory = chunked.plan_logits(model, CPU, pretrained=False, chunk_tokens=0)
    assert factory.split is None and "--teacher-factory" in factory.describe()
    off = chunked.plan_logits(model, CPU, pretrained=True, chunk_tokens=-1)
    assert off.split is None and off.describe() == "full logits (--logits-chunk-tokens -1)"


# --------------------------------------------------------------------------------------------
# End to end


def _files(root: Path) -> dict[str, str]:
    """sha256 of every file of a cache but its manifest and card (their run fields differ)."""
    return {
        f.relative_to(root).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(root.rglob("*"))
        if f.is_file() and f.name not in ("manifest.json", "README.md")
    }


@pytest.fixture(scope="module")
def short_corpus(tmp_path_factory, stdlib_corpus: Path) -> Path:
    out = tmp_path_factory.mktemp("chunked_corpus")
    for doc in sorted(stdlib_corpus.iterdir())[:3]:
        (out / doc.name).write_text(doc.read_text()[:1200])
    return out


def _dump(teacher: Path, data: Path, out: Path, **options) -> tuple[Path, str]:
    opts = DumpOptions(
        data=str(data), out=out, teacher=str(teacher), seq_len=64, part_tokens=256,
        batch_size=4, device="cpu", progress=False, **options,
    )  # fmt: skip
    return out, dump(opts).logits


@pytest.mark.parametrize(
    "options",
    [
        {"targets": "sample", "samples": 16, "seed": 7},
        {"top_k": 8, "logprob_dtype": "float32"},
        {"targets": "topp", "top_p": 0.2, "max_k": 16, "logprob_dtype": "float32"},
    ],
    ids=["sample", "topk", "topp"],
)
def test_a_chunked_dump_writes_the_cache_of_the_full_logits(
    tiny_teacher_dir, short_corpus, tmp_path, options
):
    teacher, data = tiny_teacher_dir, short_corpus
    full, full_path = _dump(teacher, data, tmp_path / "full", logits_chunk_tokens=-1, **options)
    # 12 positions: chunks of 3 time steps of the batch's 4 sequences
    split, split_path = _dump(teacher, data, tmp_path / "split", logits_chunk_tokens=12, **options)
    assert full_path == "full logits (--logits-chunk-tokens -1)"
    assert split_path.startswith("chunked logits: GPT2LMHeadModel's linear head over up to 12 ")
    a, b = logitcache.open(full), logitcache.open(split)
    assert a.manifest.settings() == b.manifest.settings()
    if options.get("targets") == "sample":
        assert _files(full) == _files(split)  # byte for byte
        return
    if options.get("targets") == "topp":  # the same ids per position; their values as top-k's
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x.target_ids.sort(-1).values, y.target_ids.sort(-1).values)
            torch.testing.assert_close(x.target_logprobs, y.target_logprobs, rtol=1e-5, atol=1e-5)
        return
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_teacher_dir)).eval()
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.input_ids, y.input_ids)
        with torch.inference_mode():
            ordered = model(x.input_ids[None]).logits[0].sort(-1, descending=True).values
        apart = ordered[:, 7] - ordered[:, 8] > 1e-5  # the 8th and 9th apart: the same ids kept
        assert torch.equal(x.target_ids.sort(-1).values[apart], y.target_ids.sort(-1).values[apart])
        torch.testing.assert_close(x.target_logprobs, y.target_logprobs, rtol=1e-5, atol=1e-5)


def test_a_factory_teacher_dumps_its_full_logits(tmp_path):
    from tests.logitcache.test_golden_bytes import TEACHER, write_fixed_input

    tok, ids = write_fixed_input(tmp_path)
    opts = DumpOptions(
        data=str(ids), out=tmp_path / "c", teacher_factory=TEACHER, tokenizer=str(tok), top_k=4,
        seq_len=16, device="cpu", progress=False,
    )  # fmt: skip
    assert "--teacher-factory" in dump(opts).logits


def test_a_bad_chunk_size_is_refused(tmp_path):
    opts = DumpOptions(data=str(tmp_path), out=tmp_path / "c", logits_chunk_tokens=-2)
    with pytest.raises(LogitCacheError, match="--logits-chunk-tokens must be -1"):
        dump(opts)
