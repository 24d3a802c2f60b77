"""Read throughput of a cache in S3 (a loopback moto server) against the same cache on local disk.

    python benchmarks/bench_remote.py            # default run (~2-4 min on 2 CPU cores)
    python benchmarks/bench_remote.py --quick    # smoke run, does not touch RESULTS.md

What it measures, for one cache, read whole part by part with ``Cache.read_part`` (what the
trainer's dataset does: decode every chunk of a part, checksums included):

* **local disk**: ``logitcache.open(DIR)``; the files are in the OS page cache after the first
  repetition (as on a training machine with RAM to spare), so this is decode-bound;
* **S3, epoch 1**: ``logitcache.open("s3://...")`` with an empty local cache directory: every
  part is downloaded over HTTP from moto's standalone server on 127.0.0.1, each file
  sha256-checked against the manifest, then decoded;
* **S3, epoch 2**: a new ``open`` of the same URL with the local cache now warm: the manifest is
  fetched, nothing else is downloaded, the parts are read from the local cache.

Each is repeated (``--repeats``, fresh local cache directory for every epoch-1 run) and the
table reports the median, throughput in stored MB/s and tokens/s, and the ratio to local disk.
The loopback server has no network latency or bandwidth limit, so epoch 1 measures the client
and server overhead (HTTP, moto, sha256), a lower bound on a real bucket's cost; epoch 2 does
not depend on the network at all.

The cache holds synthetic but realistically shaped targets (top-k of random logits over a
32,000-id vocabulary, float16 log-probs, uint16 ids), written by the real writer: read
throughput depends on sizes and codecs, not on which model produced the numbers.

Full runs write their section of ``benchmarks/RESULTS.md`` (between ``<!-- bench_remote:start
-->`` and ``<!-- bench_remote:end -->``; other sections are left alone).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from common import (  # noqa: E402
    RESULTS,
    command_line,
    loadavg,
    machine,
    machine_line,
    now_utc,
    update_results,
)

import logitcache  # noqa: E402
from logitcache.format.manifest import MANIFEST_NAME, PARTS_DIR, LayoutInfo, PartArrays  # noqa: E402
from logitcache.storage import mirror, stores  # noqa: E402
from logitcache.write.writer import CacheWriter  # noqa: E402
from tests.logitcache.s3server import environment, moto_server  # noqa: E402
from tests.synthetic import template  # noqa: E402

SECTION = "bench_remote"
VOCAB = 32_000


def write_cache(root: Path, tokens: int, k: int, part_tokens: int, seq_len: int) -> Path:
    """A cache of `tokens` tokens: sequences of `seq_len`, parts of `part_tokens`."""
    per_part = max(1, part_tokens // seq_len)
    m = template(vocab=VOCAB, k=k, seq_len=seq_len, per_part=per_part)
    m = dataclasses.replace(m, layout=LayoutInfo(seq_len, True, per_part, 1 << 20))  # 1 MB chunks
    rng = np.random.default_rng(0)
    sequences = tokens // seq_len
    with CacheWriter(root, m) as writer:
        for first in range(0, sequences, per_part):
            n = min(per_part, sequences - first) * seq_len
            # A peaked distribution like an LM's: a few large logits over a broad background.
            logits = rng.standard_normal((n, 4 * k), dtype=np.float32) * 2.0
            logits[:, 0] += 6.0
            top = -np.sort(-logits, axis=-1)[:, :k]
            logz = np.log(np.exp(top).sum(-1, keepdims=True) + VOCAB - 4 * k)
            ids = np.stack([rng.choice(VOCAB, size=k, replace=False) for _ in range(256)])
            writer.write_part(
                PartArrays(
                    input_ids=rng.integers(0, VOCAB, size=n).astype(np.uint16),
                    target_ids=ids[rng.integers(0, 256, size=n)].astype(np.uint16),
                    target_logprobs=(top - logz).astype(np.float16),
                    seq_offsets=np.arange(0, n + 1, seq_len, dtype=np.int64),
                )
            )
        writer.finish()
    return root


def upload(local: Path, url: str) -> None:
    """Put a cache in the store: part files first, the manifest last (its commit point)."""
    store = stores.RemoteStore(url)
    for path in sorted((local / PARTS_DIR).rglob("*")):
        if path.is_file():
            store.put_file(path, path.relative_to(local).as_posix())
    store.put_file(local / MANIFEST_NAME, MANIFEST_NAME)


def read_all(location: str | Path, cache_dir: Path | None = None) -> tuple[float, float]:
    """Seconds to open the cache and read every part whole; of which, seconds in `open`."""
    start = time.perf_counter()
    cache = logitcache.open(location, cache_dir=cache_dir)
    opened = time.perf_counter()
    for index in range(cache.num_parts):
        cache.read_part(index)
    return time.perf_counter() - start, opened - start


def stored_bytes(local: Path) -> int:
    return sum(f.stat().st_size for f in (local / PARTS_DIR).rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1 << 19)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--part-tokens", type=int, default=1 << 16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small cache, no RESULTS.md")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.part_tokens, args.repeats = 1 << 15, 1 << 13, 2
    command, date = command_line(), now_utc()

    work = Path(tempfile.mkdtemp(prefix="bench_remote-"))
    try:
        local = write_cache(work / "cache", args.tokens, args.k, args.part_tokens, args.seq_len)
        cache = logitcache.open(local)
        size, tokens = stored_bytes(local), cache.manifest.tokens
        print(
            f"cache: {tokens:,} tokens, k={args.k}, {cache.num_parts} parts, "
            f"{size / 1e6:.1f} MB stored ({size / tokens:.1f} bytes/token)"
        )
        times: dict[str, list[float]] = {"local": [], "epoch1": [], "epoch2": []}
        opens: dict[str, list[float]] = {"local": [], "epoch1": [], "epoch2": []}
        with moto_server() as server, environment(server.env):
            url = "s3://bench/cache"
            stores.RemoteStore("s3://bench").fs.mkdir("bench")
            upload(local, url)
            read_all(local)  # page cache warm, imports done: the same start for everyone
            for r in range(args.repeats):
                cold = work / f"local-cache-{r}"
                before = dict(mirror.FETCH_STATS)
                for key, location, cache_dir in (
                    ("local", local, None), ("epoch1", url, cold), ("epoch2", url, cold)
                ):  # fmt: skip
                    total, opening = read_all(location, cache_dir)
                    times[key].append(total)
                    opens[key].append(opening)
                    if key == "epoch1":
                        assert mirror.FETCH_STATS["bytes"] - before["bytes"] == size
                        before = dict(mirror.FETCH_STATS)
                assert before == mirror.FETCH_STATS, "epoch 2 downloaded again"
                shutil.rmtree(cold)
                print(
                    f"  repeat {r + 1}: local {times['local'][-1]:.3f} s, S3 epoch 1 "
                    f"{times['epoch1'][-1]:.3f} s, epoch 2 {times['epoch2'][-1]:.3f} s"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    local_s = statistics.median(times["local"])
    rows = []
    for key, label in (
        ("local", "local disk"),
        ("epoch1", "S3, epoch 1 (empty local cache: download + sha256 + decode)"),
        ("epoch2", "S3, epoch 2 (local cache warm)"),
    ):
        s = statistics.median(times[key])
        rows.append(
            f"| {label} | {s:.3f} | {statistics.median(opens[key]):.3f} | "
            f"{' / '.join(f'{t:.3f}' for t in times[key])} | "
            f"{size / s / 1e6:,.1f} | {tokens / s / 1e6:,.2f} | {local_s / s:.2f} |"
        )
    table = (
        "| read of the whole cache | median s | of which `open` (median s) | all runs (s) "
        "| MB/s stored | M tokens/s | throughput vs local disk |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows)
    )
    print(table)
    if args.quick:
        print("(--quick: RESULTS.md not updated)")
        return
    body = f"""## Remote reads: S3 (loopback moto server) vs local disk (`bench_remote.py`)

- Command: `{command}`
- Date: {date}
- Machine: {machine_line(machine(extra=("s3fs", "moto")))} (moto as a standalone server on
  127.0.0.1); load average at the end {loadavg()}
- Cache: {tokens:,} tokens in {cache.num_parts} parts (zarr, k={args.k}, uint16 ids, float16
  log-probs, seq_len {args.seq_len}), {size / 1e6:.1f} MB stored; synthetic top-k targets
  written by the real writer. Each run reads every part whole with `Cache.read_part`; median
  of {args.repeats} runs, a fresh local cache directory for each epoch-1 run.

{table}

Epoch 1 pays the download (HTTP to a server on the same machine, so no network latency or
bandwidth limit: a lower bound for a real bucket) and a sha256 of every file. Epoch 2 downloads
nothing: it reads the verified copies from the local cache, and what it costs beyond local disk
is mostly `open` (a new S3 client and the manifest GET, once per open, not per byte).
"""
    update_results(SECTION, body)
    print(f"wrote the {SECTION} section of {RESULTS}")


if __name__ == "__main__":
    main()
