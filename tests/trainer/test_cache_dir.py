"""``trainer fit --cache-dir``: the parts of a cache at a URL are fetched where the flag says,
passed to the reader explicitly (`FitConfig.cache_dir`), not through the environment."""

from __future__ import annotations

import json
import os
import uuid

from tests.faults.helpers import run_main
from tests.synthetic import VOCAB, synthetic_cache
from trainer.cli import main as trainer_main


def test_fit_fetches_a_remote_cache_into_the_cache_dir_flag(tmp_path, monkeypatch, capsys):
    from logitcache.write.export import export

    url = f"memory://cache-dir-{uuid.uuid4().hex[:8]}/cache"
    export(synthetic_cache(tmp_path / "local", sequences=14), url, backend="zarr")
    student = tmp_path / "student.json"
    config = {"model_type": "gpt2", "vocab_size": VOCAB, "n_positions": 16, "n_embd": 8,
              "n_layer": 1, "n_head": 1}  # fmt: skip
    student.write_text(json.dumps(config))
    flag_dir, env_dir = tmp_path / "flag", tmp_path / "env"
    monkeypatch.setenv("LOGITCACHE_CACHE_DIR", str(env_dir))
    code, _, err = run_main(
        trainer_main,
        ["trainer", "fit", "--cache", url, "--student", student, "--out", tmp_path / "run",
         "--steps", 1, "--batch-size", 2, "--eval-fraction", 0, "--no-progress", "--device",
         "cpu", "--cache-dir", flag_dir],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert any((flag_dir / "parts").iterdir())
    assert not env_dir.exists()
    assert os.environ["LOGITCACHE_CACHE_DIR"] == str(env_dir)  # the environment is left alone
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["cache_dir"] == str(flag_dir)
