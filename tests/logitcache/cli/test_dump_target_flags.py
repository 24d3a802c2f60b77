"""`logitcache dump` target options: one kind's option implies that kind, the other kind's is
refused. With sampled targets the default, an old `dump --top-k 64` must still write top-k
targets, not silently a sampled cache."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from logitcache import LogitCacheError
from logitcache.cli.dump import target_kind
from logitcache.dumping.options import DEFAULT_TARGETS
from tests.cli import cli_env

NONE = {"--top-k": None, "--logprob-dtype": None, "--id-order": None, "--top-p": None,
        "--max-k": None, "--min-k": None}  # fmt: skip


@pytest.mark.parametrize(
    ("targets", "topk", "samples", "kind"),
    [
        (None, {}, None, DEFAULT_TARGETS),
        (None, {"--top-k": 64}, None, "topk"),
        (None, {"--logprob-dtype": "uint8"}, None, "topk"),
        (None, {"--id-order": "descending"}, None, "topk"),
        (None, {}, 16, "sample"),
        ("topk", {"--top-k": 8}, None, "topk"),
        ("sample", {}, 16, "sample"),
        ("topk", {}, None, "topk"),
        (None, {"--top-p": 0.9}, None, "topp"),
        (None, {"--max-k": 16, "--logprob-dtype": "uint8"}, None, "topp"),
        ("topp", {"--id-order": "descending", "--min-k": 2}, None, "topp"),
    ],
)
def test_the_kind_a_command_line_asks_for(targets, topk, samples, kind):
    assert target_kind(targets, {**NONE, **topk, "--samples": samples}) == kind


@pytest.mark.parametrize(
    ("targets", "topk", "samples", "named"),
    [
        ("sample", {"--top-k": 8}, None, "--top-k does not apply to --targets sample"),
        ("sample", {"--logprob-dtype": "uint8"}, None, "--logprob-dtype does not apply"),
        ("topk", {}, 16, "--samples does not apply to --targets topk"),
        (None, {"--top-k": 8}, 16, "different target kinds"),
        (None, {"--top-k": 8, "--top-p": 0.9}, None, "different target kinds"),
        ("topk", {"--max-k": 8}, None, "--max-k does not apply to --targets topk"),
        ("topp", {"--top-k": 8}, None, "--top-k does not apply to --targets topp"),
        ("sample", {"--top-p": 0.5}, None, "--top-p does not apply to --targets sample"),
    ],
)
def test_options_of_the_other_kind_are_refused(targets, topk, samples, named):
    with pytest.raises(LogitCacheError, match=named):
        target_kind(targets, {**NONE, **topk, "--samples": samples})


def test_an_old_top_k_command_still_writes_top_k(tmp_path, tiny_teacher_dir, dump_corpus):
    """The real CLI: `--top-k 8` alone gives a top-8 cache; `--targets sample --top-k 8`
    exits 2 with the message and writes nothing."""
    base = [sys.executable, "-m", "logitcache", "dump", "--teacher", str(tiny_teacher_dir),
            "--data", str(dump_corpus), "--seq-len", "64", "--no-progress", "--device", "cpu"]  # fmt: skip
    out = tmp_path / "old"
    done = subprocess.run([*base, "--out", str(out), "--top-k", "8"], env=cli_env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    targets = json.loads((out / "manifest.json").read_text())["targets"]
    assert (targets["kind"], targets["k"]) == ("topk", 8), targets
    refused = tmp_path / "refused"
    bad = subprocess.run([*base, "--out", str(refused), "--targets", "sample", "--top-k", "8"],
                         env=cli_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert bad.returncode == 2
    assert "--top-k does not apply to --targets sample" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert not refused.exists()
