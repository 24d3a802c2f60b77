"""A teacher placed by accelerate (`--device-map`) dumps the cache it dumps on one device.

On a CPU, accelerate can split a model over the only two places it has there: the CPU and the
disk. The modules mapped to "disk" keep their weights on the meta device, and accelerate's
hooks, at every module, load them from the safetensors file for each forward and drop them
after; the hook at the top moves the input to the main device and the logits back. So the split
path runs as it does over GPUs, but for the copies of activations between GPUs:

* the CLI, with a JSON map (layer 1 and the final norm on the disk) and with ``auto`` under a
  --max-memory budget that does not hold the whole teacher, writes byte for byte the cache of the
  same dump on one device (`dump_reference`: the manifest but `created`, every part file);
* in-process, the split teacher's weights hash as on one device (its manifest record is the
  same), its offloaded modules' hooks really load their weights, and its logits are bitwise the
  one-device teacher's, in float32 and in bfloat16 (which is loaded as bfloat16, not cast);
* a GPT-2 teacher runs sdpa attention unless told otherwise, and eager gives the same targets
  within float rounding;
* what cannot work is refused with exit 2 and a message: --device-map under torchrun, and
  without accelerate (the other bad values: tests/logitcache/test_bad_input_sweep.py).

With a GPU, the same comparison runs between a teacher whole on cuda:0 and one split between
cuda:0 and the CPU (or two GPUs where there are two).
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from logitcache.dumping.options import DumpOptions, max_memory_of
from logitcache.dumping.pipeline import dump
from logitcache.dumping.teacher import load_teacher
from logitcache.errors import LogitCacheError
from tests.cli import REPO
from tests.faults.helpers import OPTIONS, assert_same_cache, describe, flat, run
from tests.logitcache.dump_helpers import SMALL, dump_in_process, sequences_of, write_docs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: The tiny GPT-2 teacher split over the CPU and the disk: layer 1 and the final norm are
#: offloaded, the embeddings, layer 0 and the head (tied to the embeddings) stay in memory.
SPLIT = {
    "transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu",
    "transformer.h.0": "cpu", "transformer.h.1": "disk", "transformer.ln_f": "disk",
    "lm_head": "cpu",
}  # fmt: skip
#: A CPU budget under the tiny teacher's ~600 KB of float32 weights: `auto` must offload some.
AUTO_BUDGET = "cpu=400KiB,disk=1GiB"


def dump_command(teacher: Path, data: Path, out: Path, *placement: object) -> list[str]:
    """`logitcache dump` of the reference's data and settings (`tests.faults.helpers.OPTIONS`),
    placed by `placement` instead of --device cpu."""
    args = [sys.executable, "-m", "logitcache", "dump", "--teacher", teacher, "--data", data,
            "--out", out, "--no-progress", *placement]  # fmt: skip
    for key, value in OPTIONS.items():
        args += [f"--{key.replace('_', '-')}", value]
    return [str(a) for a in args]


def ids_of(teacher, docs: list[str], length: int = 48) -> torch.Tensor:
    """(len(docs), length) token ids of real text."""
    rows = [teacher.tokenizer(doc)["input_ids"][:length] for doc in docs]
    assert all(len(r) == length for r in rows)
    return torch.tensor(rows)


@pytest.fixture(scope="module")
def split_dumps(tmp_path_factory, tiny_teacher_dir: Path, dump_corpus: Path) -> dict:
    """The reference's dump through the CLI, split by a JSON map and by `auto`, both at once;
    each with its own TMPDIR, to see that the offload folder is removed."""
    pytest.importorskip("accelerate")
    root = tmp_path_factory.mktemp("device-map")
    (root / "split.json").write_text(json.dumps(SPLIT), encoding="utf-8")
    runs = {
        "file": ["--device-map", root / "split.json"],
        "auto": ["--device-map", "auto", "--max-memory", AUTO_BUDGET],
    }
    for name in runs:
        (root / f"tmp-{name}").mkdir()
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = {
            name: pool.submit(
                run,
                dump_command(tiny_teacher_dir, dump_corpus, root / name, *placement),
                TMPDIR=str(root / f"tmp-{name}"),
            )
            for name, placement in runs.items()
        }
        return {"root": root, **{name: job.result() for name, job in jobs.items()}}


@pytest.mark.parametrize("how", ["file", "auto"])
def test_a_split_teacher_writes_the_one_device_cache_byte_for_byte(
    split_dumps, dump_reference: Path, how: str
):
    proc = split_dumps[how]
    assert proc.returncode == 0, describe(proc)
    report = flat(proc.stdout)
    # the split really happened: modules in memory and modules offloaded to the disk
    assert "teacher placed by --device-map" in report
    assert " on cpu" in report and " on disk" in report, report
    if how == "file":
        assert "5 modules on cpu, 2 modules on disk" in report
    assert_same_cache(split_dumps["root"] / how, dump_reference)
    leftovers = list((split_dumps["root"] / f"tmp-{how}").glob("logitcache-offload-*"))
    assert not leftovers, leftovers


def test_the_split_runs_through_accelerate_hooks_and_hashes_as_one_device(
    tiny_teacher_dir: Path, small_docs: list[str], monkeypatch
):
    hooks = pytest.importorskip("accelerate.hooks")
    whole = load_teacher(str(tiny_teacher_dir), device="cpu")
    split = load_teacher(str(tiny_teacher_dir), device_map=SPLIT)
    assert split.placement == {"cpu": 5, "disk": 2} and whole.placement is None
    assert split.device == torch.device("cpu")
    assert split.info == whole.info  # config, weights sha256 (loaded through the hooks), vocab
    offloaded = {
        name: module
        for name, module in split.model.named_modules()
        if getattr(getattr(module, "_hf_hook", None), "offload", False)
    }
    assert offloaded and all(
        n.startswith(("transformer.h.1.", "transformer.ln_f")) for n in offloaded
    )
    assert {p.device.type for n, p in split.model.named_parameters() if ".h.1." in n} == {"meta"}

    loaded: list[int] = []
    pre_forward = hooks.AlignDevicesHook.pre_forward

    def counting(self, module, *args, **kwargs):
        if self.offload:
            loaded.append(id(module))
        return pre_forward(self, module, *args, **kwargs)

    monkeypatch.setattr(hooks.AlignDevicesHook, "pre_forward", counting)
    ids = ids_of(whole, small_docs[:3])
    assert torch.equal(split.logits(ids), whole.logits(ids))
    assert set(loaded) == {id(m) for m in offloaded.values()}  # each one's weights came in
    assert {p.device.type for n, p in split.model.named_parameters() if ".h.1." in n} == {"meta"}


def test_bfloat16_is_loaded_as_bfloat16_and_split_gives_the_same_logits(
    tiny_teacher_dir: Path, small_docs: list[str], monkeypatch
):
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    asked = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        asked.append(kwargs["dtype"])
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    whole = load_teacher(str(tiny_teacher_dir), device="cpu", dtype="bfloat16")
    split = load_teacher(str(tiny_teacher_dir), device_map=SPLIT, dtype="bfloat16")
    assert asked == [torch.bfloat16, torch.bfloat16]  # loaded in it, no float32 copy first
    assert {t.dtype for t in whole.model.state_dict().values()} == {torch.bfloat16}
    assert split.info == whole.info and whole.info.dtype == "bfloat16"
    ids = ids_of(whole, small_docs[:3])
    logits = whole.logits(ids)
    assert logits.dtype == torch.bfloat16  # the targets are taken in float32 from these
    assert torch.equal(split.logits(ids), logits)


def test_gpt2_runs_sdpa_by_default_and_eager_gives_the_same_targets(
    tiny_teacher_dir: Path, small_docs: list[str], tmp_path: Path
):
    default = load_teacher(str(tiny_teacher_dir), device="cpu")
    eager = load_teacher(str(tiny_teacher_dir), device="cpu", attn="eager")
    assert default.model.config._attn_implementation == "sdpa"
    assert eager.model.config._attn_implementation == "eager"
    assert default.info == eager.info  # the kernel is not part of the teacher's identity

    data = write_docs(tmp_path / "docs", small_docs)
    caches = {
        attn: sequences_of(dump_in_process(tiny_teacher_dir, data, tmp_path / attn, attn=attn,
                                           **SMALL))
        for attn in ("sdpa", "eager")
    }  # fmt: skip
    same_ids = positions = 0
    for a, b in zip(caches["sdpa"], caches["eager"], strict=True):
        assert torch.equal(a.input_ids, b.input_ids)
        same = (a.target_ids == b.target_ids).all(-1)  # (T,) positions with the same top-k
        same_ids += int(same.sum())
        positions += len(same)
        gap = (a.target_logprobs[same].float() - b.target_logprobs[same].float()).abs()
        assert gap.max() <= 2e-3  # float16 rounding of values a few 1e-6 apart
    assert same_ids >= 0.99 * positions  # the rest: near-ties at the k-th id


@pytest.mark.parametrize(
    ("text", "budgets"),
    [
        ("0=70GiB,1=70GiB,cpu=200GiB", {0: 70 << 30, 1: 70 << 30, "cpu": 200 << 30}),
        (" cpu = 500MB , disk=1.5GiB", {"cpu": 500 * 10**6, "disk": 3 << 29}),
        ("0=1024", {0: 1024}),
    ],
)
def test_max_memory_is_read_into_bytes_per_device(text: str, budgets: dict):
    options = DumpOptions(data="d", out="o", teacher="t", device_map="auto", max_memory=text)
    assert max_memory_of(options) == budgets


def test_a_device_map_naming_a_missing_gpu_is_refused_before_loading(tiny_teacher_dir: Path):
    pytest.importorskip("accelerate")
    missing = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(LogitCacheError, match=f"--device-map names GPU {missing}, but"):
        load_teacher(str(tiny_teacher_dir), device_map={"": missing})
    with pytest.raises(LogitCacheError, match=f"--max-memory names GPU {missing}, but"):
        load_teacher(str(tiny_teacher_dir), device_map="auto", max_memory={missing: 1 << 30})


def refused(tmp_path: Path, teacher: Path, data: Path, **env: str):
    """A --device-map dump that must stop with exit 2 before touching --out: its message."""
    out = tmp_path / "cache"
    proc = run(dump_command(teacher, data, out, "--device-map", "auto"), **env)
    assert proc.returncode == 2, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    message = flat(proc.stderr)
    assert message.startswith("logitcache: error: "), describe(proc)
    assert not out.exists()
    return message


def test_device_map_under_torchrun_is_refused(tmp_path, tiny_teacher_dir, dump_corpus):
    message = refused(
        tmp_path, tiny_teacher_dir, dump_corpus, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1", MASTER_PORT="29999",
    )  # fmt: skip
    assert "--device-map splits one teacher over this machine's GPUs" in message
    assert "torchrun started 2 processes" in message and "Use one or the other" in message


def test_device_map_without_accelerate_says_how_to_install_it(
    tmp_path, tiny_teacher_dir, dump_corpus
):
    stub = tmp_path / "no-accelerate" / "accelerate"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text('raise ImportError("accelerate hidden by the test")\n')
    path = os.pathsep.join([str(stub.parent), str(REPO)])
    message = refused(tmp_path, tiny_teacher_dir, dump_corpus, PYTHONPATH=path)
    assert "--device-map needs the accelerate package" in message
    assert "pip install accelerate" in message


def gpu_placements() -> list:
    """A map with layer 1 and the final norm on the CPU (offloaded to cuda:0 for each
    forward), and with two GPUs one with them on cuda:1 (activations cross GPUs)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    needs = {"cpu-offload": 1, "two-gpus": 2}
    return [
        pytest.param(name, marks=pytest.mark.skipif(gpus < n, reason=f"needs {n} GPU(s)"))
        for name, n in needs.items()
    ]


@pytest.mark.parametrize("placement", gpu_placements())
def test_on_gpus_a_split_teacher_writes_the_one_gpu_cache(
    tiny_teacher_dir: Path, small_docs: list[str], tmp_path: Path, placement: str
):
    pytest.importorskip("accelerate")
    where = "cpu" if placement == "cpu-offload" else 1
    split = {name: (where if device == "disk" else 0) for name, device in SPLIT.items()}
    (tmp_path / "map.json").write_text(json.dumps(split), encoding="utf-8")
    data = write_docs(tmp_path / "docs", small_docs)
    whole = tmp_path / "whole"
    dump(DumpOptions(data=str(data), out=whole, teacher=str(tiny_teacher_dir), device="cuda:0",
                     progress=False, **SMALL))  # fmt: skip
    placed = tmp_path / "placed"
    summary = dump(DumpOptions(data=str(data), out=placed, teacher=str(tiny_teacher_dir),
                               device_map=str(tmp_path / "map.json"), progress=False, **SMALL))  # fmt: skip
    assert summary.placement == {"0": 5, str(where): 2}
    assert_same_cache(placed, whole)
