"""verify: an intact cache passes, and a flipped byte in any file is found and the file named."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import logitcache
from tests.logitcache.background import Background, cli_jobs
from tests.logitcache.dump_helpers import describe, flat, run_cli

#: (backend, file relative to parts/) to flip a byte in. The zarr ones are in different parts of
#: ONE copy, so one `verify` run must name all five (it reports every problem, not the first).
CORRUPTIONS = [
    ("zarr", "part-000001/input_ids/c/0"),
    ("zarr", "part-000002/target_ids/c/0/0"),
    ("zarr", "part-000003/target_logprobs/c/0/0"),
    ("zarr", "part-000004/seq_offsets/c/0"),
    ("zarr", "part-000005/target_logprobs/zarr.json"),
    ("parquet", "part-000001.parquet"),
]


def submit_verify_runs(jobs: Background, wanted: set[str], root: Path, small_caches) -> None:
    """`logitcache verify` on an intact copy and on copies with flipped bytes."""
    if "verify:intact" in wanted:
        copy = shutil.copytree(small_caches["zarr"], root / "intact")
        jobs.submit("verify:intact", run_cli, "verify", copy)
    for backend in ("zarr", "parquet"):
        if f"verify:{backend}" in wanted:
            copy = shutil.copytree(small_caches[backend], root / f"flipped-{backend}")
            for rel in (rel for b, rel in CORRUPTIONS if b == backend):
                target = copy / "parts" / rel
                data = bytearray(target.read_bytes())
                data[len(data) // 2] ^= 0xFF
                target.write_bytes(bytes(data))
            jobs.submit(f"verify:{backend}", run_cli, "verify", copy)


def submit_background_jobs(
    jobs: Background, wanted: set[str], root: Path, request: pytest.FixtureRequest
) -> None:
    submit_verify_runs(jobs, wanted, root / "verify", request.getfixturevalue("small_caches"))


@cli_jobs(lambda _: ["verify:intact"])
def test_verify_passes_an_intact_cache(background: Background, small_caches: dict[str, Path]):
    proc = background.result("verify:intact")
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout.startswith("ok: ")
    # The same checks, in process, on the parquet cache.
    from logitcache.read.verify import verify

    report = verify(logitcache.open(small_caches["parquet"]))
    assert report.ok, report.problems
    assert report.parts == report.files > 1


@cli_jobs(lambda p: [f"verify:{p['backend']}"])
@pytest.mark.parametrize(("backend", "rel"), CORRUPTIONS)
def test_verify_names_a_file_with_a_flipped_byte(background: Background, backend: str, rel: str):
    proc = background.result(f"verify:{backend}")
    assert proc.returncode == 2, describe(proc)
    assert "Traceback" not in proc.stderr
    message = flat(proc.stderr)
    assert "failed verification" in message
    assert f"parts/{rel}: sha256 does not match" in message
    flipped = sum(b == backend for b, _ in CORRUPTIONS)
    assert message.count("sha256 does not match") == flipped, message
