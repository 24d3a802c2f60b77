"""Damaged caches: a flipped byte, a truncated file, a deleted file, a manifest from another
cache. `logitcache verify`, `logitcache info` and `trainer fit` each either report the damage,
naming the part, with exit code 2 and no traceback, or (info, for damage inside compressed data
it does not read) say that they did not check the data. The CLIs run in-process through their
real entry points (`main()`: argument parsing, the error handler, the exit code)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.faults.helpers import flat, run_main

FLIPPED = "part-000002/target_logprobs/c/0/0"
TRUNCATED = "part-000003/input_ids/c/0"
DELETED = "part-000004/target_ids/c/0/0"


def damage(kind: str, cache: Path, other: Path) -> str:
    """Damage `cache` in place; the part the tools must name."""
    parts = cache / "parts"
    if kind == "flipped":
        data = bytearray((parts / FLIPPED).read_bytes())
        data[len(data) // 2] ^= 0x01
        (parts / FLIPPED).write_bytes(bytes(data))
        return "part-000002"
    if kind == "truncated":
        data = (parts / TRUNCATED).read_bytes()
        (parts / TRUNCATED).write_bytes(data[: len(data) // 2])
        return "part-000003"
    if kind == "deleted":
        (parts / DELETED).unlink()
        return "part-000004"
    if kind == "foreign_manifest":  # same teacher and settings, other data: same part names
        shutil.copy(other / "manifest.json", cache / "manifest.json")
        return "part-00000"
    raise AssertionError(kind)


@pytest.fixture(scope="module")
def other_cache(tmp_path_factory, tiny_teacher_dir, stdlib_corpus) -> Path:
    """A cache with tiny_cache's settings over other documents (2 parts)."""
    from logitcache.dumping.pipeline import DumpOptions, dump

    data = tmp_path_factory.mktemp("other_data")
    for f in sorted(stdlib_corpus.iterdir())[-3:]:
        shutil.copy(f, data / f.name)
    out = tmp_path_factory.mktemp("other") / "cache"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dump(DumpOptions(data=str(data), out=out, teacher=str(tiny_teacher_dir), targets="topk",
                         top_k=8, seq_len=64, part_tokens=4096, device="cpu",
                         progress=False))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return out


KINDS = ["flipped", "truncated", "deleted", "foreign_manifest"]


@pytest.mark.parametrize("kind", KINDS)
def test_verify_info_and_fit_report_the_damaged_part(
    kind, tmp_path, tiny_cache, other_cache, tiny_student_config, capsys, monkeypatch
):
    from logitcache.cli.commands import main as logitcache_main
    from trainer.cli import main as trainer_main

    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    monkeypatch.delenv("LOGITCACHE_DEBUG", raising=False)
    cache = shutil.copytree(tiny_cache, tmp_path / "cache")
    part = damage(kind, cache, other_cache)

    # verify: exit 2, every damaged file named under its part
    code, out, err = run_main(logitcache_main, ["logitcache", "verify", cache], capsys)
    message = flat(err)
    assert code == 2 and "Traceback" not in err, err
    assert message.startswith("logitcache: error: ") and "failed verification" in message
    expected = {
        "flipped": [f"parts/{FLIPPED}: sha256 does not match"],
        "truncated": [f"parts/{TRUNCATED}: sha256 does not match"],
        "deleted": [f"parts/{DELETED}: missing"],
        "foreign_manifest": ["parts/part-000000/", "parts/part-000001/", "sha256 does not match"],
    }[kind]
    for phrase in expected:
        assert phrase in message, message

    # info: a cheap structural check; it cannot see a flipped byte inside compressed data
    code, out, err = run_main(logitcache_main, ["logitcache", "info", cache], capsys)
    if kind == "flipped":
        assert code == 0, err
        assert "(data: logitcache verify)" in flat(out)  # says what it did not check
    else:
        message = flat(err)
        assert code == 2 and "Traceback" not in err, err
        assert message.startswith("logitcache: error: ") and "is damaged" in message, message
        named = {
            "truncated": f"part-000003 of {cache}: parts/{TRUNCATED} has a damaged chunk index",
            "deleted": f"part-000004 of {cache}: parts/{DELETED} is missing",
            "foreign_manifest": "part-000001 of",  # the other cache's last, shorter part
        }[kind]
        assert named in message, message
        assert kind != "truncated" or "truncated or corrupted" in message
        assert "teacher" in out  # the description is printed all the same

    # trainer fit: refuses to train on the damaged part, naming it (checked before reading)
    code, out, err = run_main(
        trainer_main,
        ["trainer", "fit", "--cache", cache, "--student", tiny_student_config,
         "--out", tmp_path / "run", "--batch-size", 32, "--epochs", 1, "--eval-fraction",
         0, "--no-progress"],
        capsys,
    )  # fmt: skip
    message = flat(err)
    assert code == 2 and "Traceback" not in err, err
    assert message.startswith("trainer: error: "), message
    assert part in message and "logitcache verify" in message, message
    reason = "is missing" if kind == "deleted" else "does not match its sha256"
    assert reason in message, message
    assert not (tmp_path / "run" / "model").exists()


def test_the_damage_is_reported_even_without_the_sha256_check(tmp_path, tiny_cache, capsys):
    """--no-check-files: zarr's own CRC-32C of every chunk still stops a flipped byte."""
    from trainer.dataset import CacheDataset

    cache = shutil.copytree(tiny_cache, tmp_path / "cache")
    damage("flipped", cache, cache)
    ds = CacheDataset(cache, batch_size=32, check_files=False, shuffle=False)
    import logitcache

    with pytest.raises(logitcache.CorruptCacheError, match="part-000002"):
        for _ in torch.utils.data.DataLoader(ds, batch_size=None):
            pass
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"]
