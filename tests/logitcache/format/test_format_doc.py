"""docs/FORMAT.md: its reading recipes, run without logitcache, give the same data."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import logitcache
from tests.cli import REPO, cli_env
from tests.logitcache.dump_helpers import describe, sequences_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FORMAT_DOC = REPO / "docs" / "FORMAT.md"


RECIPE_RUNNER = r"""
import importlib.abc
import sys

class _Forbid(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"logitcache", "torch", "transformers", "trainer"}:
            raise ImportError(f"reading a cache must not need {name}")
        return None

sys.meta_path.insert(0, _Forbid())

import numpy as np
from pathlib import Path

exec(compile(Path(sys.argv[1]).read_text(encoding="utf-8"), "FORMAT.md recipes", "exec"))
for root, out in zip(sys.argv[2::2], sys.argv[3::2]):
    check_files(root, read_manifest(root))
    seqs = list(iter_sequences(root))
    np.savez(
        out,
        lengths=np.array([len(s[0]) for s in seqs]),
        input_ids=np.concatenate([s[0] for s in seqs]),
        target_ids=np.concatenate([s[1] for s in seqs]),
        target_logprobs=np.concatenate([s[2] for s in seqs]),
    )
"""


def format_doc_recipes() -> str:
    """The Python code blocks of FORMAT.md's "Reading without logitcache" section, in order."""
    text = FORMAT_DOC.read_text(encoding="utf-8")
    start = text.index("## 10. Reading without logitcache")
    end = text.index("\n## ", start)  # the next section
    blocks = re.findall(r"```python\n(.*?)```", text[start:end], flags=re.DOTALL)
    assert len(blocks) >= 3
    return "\n\n".join(blocks)


def _run_recipes(
    runner: Path, recipes: Path, args: list, cwd: Path
) -> subprocess.CompletedProcess[str]:
    """`runner` (which must not import logitcache: the recipes stand alone) in a fresh
    interpreter, on the recipes file and `args`; it must exit 0."""
    proc = subprocess.run(
        [sys.executable, runner, recipes, *map(str, args)],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=cwd,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, describe(proc)
    return proc


def test_format_doc_keeps_its_sections():
    text = FORMAT_DOC.read_text(encoding="utf-8")
    assert "## Why these choices" in text
    assert "benchmarks/RESULTS.md" in text
    for phrase in ("seq_offsets", "manifest.json", "crc32c", "page_checksum", "2^-11"):
        assert phrase in text


def test_plain_zarr_and_pyarrow_read_the_same_data(main_caches: dict[str, Path], tmp_path: Path):
    recipes = tmp_path / "recipes.py"
    recipes.write_text(format_doc_recipes(), encoding="utf-8")
    runner = tmp_path / "runner.py"
    runner.write_text(RECIPE_RUNNER, encoding="utf-8")
    outputs = {backend: tmp_path / f"{backend}.npz" for backend in main_caches}
    args = [x for b in main_caches for x in (main_caches[b], outputs[b])]
    _run_recipes(runner, recipes, args, tmp_path)

    for backend, out in outputs.items():
        plain = np.load(out)
        assert plain["input_ids"].dtype == np.uint16 and plain["target_ids"].dtype == np.uint16
        assert plain["target_logprobs"].dtype == np.float16
        expected = sequences_of(main_caches[backend])
        assert plain["lengths"].tolist() == [len(s.input_ids) for s in expected]
        assert np.array_equal(
            plain["input_ids"], torch.cat([s.input_ids for s in expected]).numpy()
        )
        assert np.array_equal(
            plain["target_ids"], torch.cat([s.target_ids for s in expected]).numpy()
        )
        assert np.array_equal(
            plain["target_logprobs"].astype(np.float32),
            torch.cat([s.target_logprobs for s in expected]).numpy(),
        )


OTHER_READERS_RUNNER = r"""
import json
import sys
from pathlib import Path

import numpy as np

exec(compile(Path(sys.argv[1]).read_text(encoding="utf-8"), "FORMAT.md recipes", "exec"))
assert "logitcache" not in sys.modules
zarr_root, parquet_root, hf_cache = map(Path, sys.argv[2:5])
manifest = read_manifest(zarr_root)
arrays = 0
for part in manifest["parts"]:
    path = zarr_root / "parts" / part["name"]
    names = ("input_ids", "target_ids", "target_logprobs", "seq_offsets")
    for name, ours in zip(names, read_zarr_part(path)):
        theirs = read_tensorstore_array(path / name)
        assert theirs.dtype == ours.dtype and np.array_equal(theirs, ours), (part["name"], name)
        arrays += 1
manifest = read_manifest(parquet_root)
k = manifest["targets"]["k"]
table = read_parquet_cache(parquet_root, manifest)
assert table.num_rows == manifest["sequences"]
parts = [read_parquet_part(f, k) for f in parquet_files(parquet_root, manifest)]
flat = table.column("target_ids").combine_chunks().flatten().flatten().to_numpy()
assert np.array_equal(flat.reshape(-1, k), np.concatenate([p[1] for p in parts]))
import os

os.environ["HF_DATASETS_CACHE"] = str(hf_cache)
rows = load_parquet_cache(parquet_root, manifest)
assert rows.num_rows == manifest["sequences"]
assert rows["input_ids"] == table.column("input_ids").to_pylist()
print(json.dumps({"arrays": arrays, "sequences": rows.num_rows}))
"""


def test_tensorstore_pyarrow_dataset_and_datasets_recipes_read_the_same_data(
    small_caches: dict[str, Path], tmp_path: Path
):
    """FORMAT.md's "Other readers" snippets, run as written: tensorstore gives zarr-python's
    arrays, pyarrow.dataset and datasets give the rows of the plain pyarrow recipe."""
    recipes = tmp_path / "recipes.py"
    recipes.write_text(format_doc_recipes(), encoding="utf-8")
    assert "def read_tensorstore_array" in recipes.read_text()
    runner = tmp_path / "runner.py"
    runner.write_text(OTHER_READERS_RUNNER, encoding="utf-8")
    caches = [small_caches["zarr"], small_caches["parquet"], tmp_path / "hf"]
    proc = _run_recipes(runner, recipes, caches, tmp_path)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    parts = len(logitcache.open(small_caches["zarr"]).manifest.parts)
    assert report["arrays"] == 4 * parts >= 8
    assert report["sequences"] == logitcache.open(small_caches["parquet"]).manifest.sequences
