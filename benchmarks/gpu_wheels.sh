#!/usr/bin/env bash
# Run HERE (a machine with PyPI) before a GPU job: fetches into .whl/ the wheels that the GPU
# machine's image lacks (its python3 is 3.12 with torch, transformers, pyarrow, typer, rich,
# tokenizers, safetensors, fsspec and accelerate, but not zarr, numcodecs, crc32c or donfig),
# and keeps .whl/ out of git. About 10 MB; the job carries it (`carry: [".whl"]`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>"$(git rev-parse --git-path info/exclude)"
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl zarr==3.1.6 numcodecs==0.16.6 crc32c==2.9.post0 donfig==0.8.1.post1
ls -l .whl
