"""The on-disk bytes of a dump do not change when the code is reorganised.

Each case dumps a fixed input (a seeded id array, a fixed word-level tokenizer, a teacher whose
logits are an exact table lookup, so no summation order can change them) and compares the
sha256 of every file it wrote with digests recorded before the package restructuring. A
behaviour-preserving refactor keeps them; a format change must update them on purpose (rerun
with ``LOGITCACHE_GOLDEN_PRINT=1`` to print the new table) and say so in docs/FORMAT.md.

`manifest.json` and `README.md` are compared with the run-specific fields (creation time, the
output and input paths) taken out, since those differ by design between runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from logitcache.dumping.pipeline import DumpOptions, dump

VOCAB = 64
TEACHER = "tests.logitcache.test_golden_bytes:lookup_teacher"


class LookupTeacher(torch.nn.Module):
    """(batch, time) ids -> (batch, time, vocab) logits read from a seeded table: peaked
    (scale 4) and exact, since a lookup does no arithmetic."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1234)
        self.table = torch.nn.Embedding(VOCAB, VOCAB)
        with torch.no_grad():
            self.table.weight.copy_(4 * torch.randn(VOCAB, VOCAB, generator=generator))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table(input_ids)


def lookup_teacher() -> torch.nn.Module:
    return LookupTeacher()


@pytest.fixture(scope="module")
def fixed_input(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_fixed_input(tmp_path_factory.mktemp("golden_input"))


def write_fixed_input(root: Path) -> tuple[Path, Path]:
    """(tokenizer directory, ids.npy) of the fixed input, written under `root`."""
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, eos_token="w1", unk_token="w0").save_pretrained(
        root / "tok"
    )
    ids = np.random.default_rng(0).integers(0, VOCAB, size=(12, 40)).astype(np.int64)
    np.save(root / "ids.npy", ids)
    return root / "tok", root / "ids.npy"


#: case -> DumpOptions fields beyond the common ones. Each names its target kind (and a sampled
#: one its N), so that a change of the dump's defaults leaves the recorded bytes alone.
CASES: dict[str, dict] = {
    "zarr-topk": {"targets": "topk"},
    "zarr-topk-descending-uint8": {
        "targets": "topk",
        "id_order": "descending",
        "logprob_dtype": "uint8",
    },
    "zarr-sample": {"targets": "sample", "samples": 16, "seed": 3},
    "parquet-topk": {"targets": "topk", "backend": "parquet"},
}
#: `--delta` writes the layout of before format 1.2 (the default until then) byte for byte.
CASES |= {f"{name}-delta": options | {"delta": True} for name, options in list(CASES.items())}

#: case -> (files written, sha256 over the sorted "path sha256" lines). The "-delta" cases keep
#: the digests recorded before the package restructuring (see module docstring), when the delta
#: filter was the default; the others were recorded when the default became spec-only (format
#: 1.2: no delta filter; sampled ids stored as gaps), on purpose. The four float16 top-k cases
#: were recorded again when the top-k log-probs became (x - max) - log(sum) with a fixed-order
#: sum: 3 of their 3936 log-probs moved by one float16 step, each to the correctly rounded value
#: (the old ones were all three one step off), ids and layout unchanged.
GOLDEN: dict[str, tuple[int, str]] = {
    "parquet-topk": (9, "13620a6a6eeaa12227010e6d88a26974c4aeaeb5f158cde3d3faee8e04446604"),
    "zarr-sample": (89, "10a66fff91542c52ac5e32b5abb596fe819a397f74df87aa3d2897acc79f6766"),
    "zarr-topk": (73, "baea844a176f161169b228a897beb1da9bf3d8a985cd2f4a9e2828a6c86380a4"),
    "zarr-topk-descending-uint8": (
        73,
        "d6270b3a3957bf7375ecc201bf5b5f34116c89d9253411a7f98ea5fa9e885864",
    ),
    "parquet-topk-delta": (9, "695375f77835ae59c045cd05dce62c7e62d7b69b65a1ab689d44f9a28e541af2"),
    "zarr-sample-delta": (89, "0d04d95825e9c3fb6f5a556b85141c9fbe27fff2e775abb8860173ea8843b9fa"),
    "zarr-topk-delta": (73, "bb5a1778b77fa17290f1fdc8e457e24388519ad27cd29b1fbf3fcf24bcfd08c8"),
    "zarr-topk-descending-uint8-delta": (
        73,
        "8dd76d468e4b075479f1c3deba4413121387f173b3231e41242289887de70388",
    ),
}


def _digests(root: Path) -> dict[str, str]:
    return {
        f.relative_to(root).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(root.rglob("*"))
        if f.is_file() and f.name not in ("manifest.json", "README.md")
    }


def _stable_manifest(root: Path, *paths: Path) -> str:
    """manifest.json less its creation time, with the run's paths replaced by placeholders."""
    doc = json.loads((root / "manifest.json").read_text())
    doc.pop("created")
    text = json.dumps(doc, sort_keys=True)
    for i, path in enumerate(paths):
        text = text.replace(str(path), f"<path{i}>")
    return text


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_fixed_input_dumps_to_the_recorded_bytes(case, fixed_input, tmp_path) -> None:
    tok, ids = fixed_input
    out = tmp_path / "cache"
    opts = DumpOptions(
        data=str(ids), out=out, teacher_factory=TEACHER, tokenizer=str(tok), top_k=8,
        seq_len=16, batch_size=4, part_tokens=64, chunk_bytes=256, device="cpu",
        progress=False, **CASES[case],
    )  # fmt: skip
    dump(opts)
    files = _digests(out)
    manifest = hashlib.sha256(_stable_manifest(out, ids, tok, out).encode()).hexdigest()
    files["manifest.json (stable fields)"] = manifest
    if os.environ.get("LOGITCACHE_GOLDEN_PRINT"):
        print(f"\n{case}: {json.dumps(files, indent=2, sort_keys=True)}")
    listing = "".join(f"{path} {digest}\n" for path, digest in sorted(files.items()))
    recorded = (len(files), hashlib.sha256(listing.encode()).hexdigest())
    assert recorded == GOLDEN.get(case), f"{case}: {recorded}"
