"""Benchmark compression choices on real teacher outputs.

    python benchmarks/bench_codecs.py           # default run (~5-10 min on 2 CPU cores)
    python benchmarks/bench_codecs.py --quick   # smoke run

The data is what a cache really stores: `logitcache dump` of the benchmark teacher (the toy
GPT-2, see common.TEACHER_KW) over stdlib text, top-k=64, float16 log-probs, uint16 ids.
Every alternative is applied with numcodecs directly, chunk by chunk, exactly as the Zarr
backend splits an array (``chunk_bytes`` of rows per inner chunk); the reported sizes are the
compressed chunks only (the crc32c and the shard index add 4 + 16 bytes per chunk on top,
the same for every codec). Times are single-threaded (``numcodecs.blosc.use_threads = False``:
the dump compresses on its writer thread, where Blosc runs without its own threads anyway),
the best of ``--repeats`` runs, in MB (10^6 bytes) of uncompressed input per second.

Layouts of a token's k targets:

* **prob order**: as `dump` writes them, most probable first; the log-probs are then
  non-increasing along each row.
* **id order + delta**: each row's ids sorted ascending and stored as differences (numcodecs
  ``Delta``, which runs along the flattened chunk), the log-probs permuted the same way.

Full runs (not ``--quick``) write their section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

CHUNKS = {"256 KiB": 1 << 18, "1 MiB": 1 << 20, "4 MiB": 1 << 22}
DEFAULT_CHUNK = "1 MiB"
#: A measurement is repeated (up to --repeats) only while it has taken less than this: the
#: slowest codecs (Blosc zstd level 9 is zstd level 22) run once.
MAX_SECONDS = 2.0


def codecs() -> dict[str, object]:
    import numcodecs

    blosc = numcodecs.Blosc
    shuffles = {"bitshuffle": blosc.BITSHUFFLE, "byte shuffle": blosc.SHUFFLE, "no shuffle": 0}
    out: dict[str, object] = {}
    for level in (1, 3, 5, 9):
        for name, shuffle in shuffles.items():
            out[f"blosc zstd {level} {name}"] = blosc(cname="zstd", clevel=level, shuffle=shuffle)
    for name in ("bitshuffle", "byte shuffle"):
        out[f"blosc lz4 5 {name}"] = blosc(cname="lz4", clevel=5, shuffle=shuffles[name])
    for level in (1, 3, 5, 9):
        out[f"zstd {level} (no shuffle)"] = numcodecs.Zstd(level=level)
    return out


def layouts(ids: np.ndarray, logprobs: np.ndarray) -> dict[str, tuple[np.ndarray, object]]:
    """(array, filter or None) for each way of storing the two target arrays."""
    import numcodecs

    order = np.argsort(ids, axis=1, kind="stable")
    sorted_ids = np.take_along_axis(ids, order, axis=1)
    return {
        "ids, prob order": (ids, None),
        "ids, id order + delta": (sorted_ids, numcodecs.Delta(dtype=ids.dtype.str)),
        "log-probs, prob order": (logprobs, None),
        "log-probs, id order": (np.take_along_axis(logprobs, order, axis=1), None),
    }


def measure(array: np.ndarray, filt, codec, chunk_bytes: int, repeats: int) -> dict[str, float]:
    """Compressed bytes and best encode/decode seconds of `array` split into row chunks."""
    row_bytes = array.itemsize * int(np.prod(array.shape[1:]))
    rows = max(1, chunk_bytes // row_bytes)
    chunks = [np.ascontiguousarray(array[i : i + rows]) for i in range(0, len(array), rows)]
    best_enc = best_dec = float("inf")
    spent, runs = 0.0, 0
    while runs < 1 or (runs < repeats and spent < MAX_SECONDS):
        runs += 1
        t = time.perf_counter()
        encoded = [codec.encode(filt.encode(c) if filt else c) for c in chunks]
        enc_s = time.perf_counter() - t
        t = time.perf_counter()
        decoded = []
        for blob, c in zip(encoded, chunks, strict=True):
            raw = np.frombuffer(codec.decode(blob), dtype=c.dtype)
            decoded.append(filt.decode(raw) if filt else raw)
        dec_s = time.perf_counter() - t
        best_enc, best_dec = min(best_enc, enc_s), min(best_dec, dec_s)
        spent += enc_s + dec_s
    for out, c in zip(decoded, chunks, strict=True):
        if not np.array_equal(np.asarray(out).reshape(c.shape).view(c.dtype), c):
            raise AssertionError("round trip failed")
    return {"bytes": sum(len(e) for e in encoded), "enc": best_enc, "dec": best_dec}


def real_targets(args, teacher_dir: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(target_ids, target_logprobs) of a dump of stdlib text, made once and reused."""
    from logitcache.dumping.pipeline import DumpOptions, dump
    from logitcache.read import reader

    tag = "quick" if args.quick else "full"
    corpus = args.work / f"corpus-codecs-{tag}"
    common.write_token_corpus(corpus, teacher_dir, args.tokens)
    cache = args.work / f"cache-codecs-{tag}"
    stamp = args.work / f".cache-codecs-{tag}.json"
    wanted = {"tokens": args.tokens, "teacher": str(teacher_dir), "k": 64, "seq_len": 512}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == wanted):
        print(f"[bench_codecs] dumping {args.tokens:,} tokens", file=sys.stderr)
        dump(
            DumpOptions(
                data=str(corpus),
                out=cache,
                teacher=str(teacher_dir),
                targets="topk",
                top_k=64,
                seq_len=512,
                batch_size=8,
                device="cpu",
                progress=False,
                overwrite=True,
            )
        )
        stamp.write_text(json.dumps(wanted))
    c = reader.open(cache)
    parts = [c.read_part(i) for i in range(c.num_parts)]
    ids = np.concatenate([p.target_ids for p in parts])
    logprobs = np.concatenate([p.target_logprobs for p in parts])
    # Most probable first, whatever order the cache stores (a stable sort: ties keep theirs).
    order = np.argsort(-logprobs.astype(np.float32), axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1)
    logprobs = np.take_along_axis(logprobs, order, axis=1)
    return ids, logprobs, {"manifest": c.manifest}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run, no RESULTS.md")
    p.add_argument("--tokens", type=int, default=None, help="default 65536 (quick 16384)")
    p.add_argument("--repeats", type=int, default=None, help="timings: best of N (default 3)")
    p.add_argument("--work", type=Path, default=common.WORK, help="reusable work directory")
    p.add_argument("--no-results", action="store_true", help="do not write RESULTS.md")
    args = p.parse_args(argv)
    if args.tokens is None:
        args.tokens = 16_384 if args.quick else 65_536
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    return args


def main(argv: list[str] | None = None) -> None:
    import numcodecs.blosc

    args = parse_args(argv)
    started, command, load_start = common.now_utc(), common.command_line(), common.loadavg()
    t0 = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    teacher_dir = common.ensure_teacher(args.quick, args.work)
    ids, logprobs, meta = real_targets(args, teacher_dir)
    n, k = ids.shape
    numcodecs.blosc.use_threads = False
    data = layouts(ids, logprobs)
    all_codecs = codecs()
    results: dict[tuple[str, str, str], dict[str, float]] = {}
    for chunk_name, chunk_bytes in CHUNKS.items():
        print(f"[bench_codecs] chunks of {chunk_name}", file=sys.stderr)
        for codec_name, codec in all_codecs.items():
            for layout_name, (array, filt) in data.items():
                results[chunk_name, codec_name, layout_name] = measure(
                    array, filt, codec, chunk_bytes, args.repeats
                )
    finished, load_end = common.now_utc(), common.loadavg()

    def total(chunk: str, codec: str, ids_layout: str, lp_layout: str) -> dict[str, float]:
        a, b = results[chunk, codec, ids_layout], results[chunk, codec, lp_layout]
        return {key: a[key] + b[key] for key in a}

    raw = ids.nbytes + logprobs.nbytes  # per layout, ids + log-probs uncompressed
    prob = ("ids, prob order", "log-probs, prob order")
    byid = ("ids, id order + delta", "log-probs, id order")
    rows = []
    for codec_name in all_codecs:
        r = {key: results[DEFAULT_CHUNK, codec_name, key] for key in data}
        tp, ti = total(DEFAULT_CHUNK, codec_name, *prob), total(DEFAULT_CHUNK, codec_name, *byid)
        rows.append(
            [codec_name]
            + [f"{r[key]['bytes'] / n:.1f}" for key in data]
            + [
                f"**{tp['bytes'] / n:.1f}**",
                f"{ti['bytes'] / n:.1f}",
                f"{raw / tp['enc'] / 1e6:.0f}",
                f"{raw / tp['dec'] / 1e6:.0f}",
                f"{raw / ti['enc'] / 1e6:.0f}",
                f"{raw / ti['dec'] / 1e6:.0f}",
            ]
        )
    main_table = common.markdown_table(
        ["codec"]
        + [f"{key} B/tok" for key in data]
        + [
            "total, prob order B/tok",
            "total, id order B/tok",
            "enc MB/s (prob)",
            "dec MB/s (prob)",
            "enc MB/s (id)",
            "dec MB/s (id)",
        ],
        rows,
    )
    chunk_rows = []
    for codec_name in all_codecs:
        row = [codec_name]
        for chunk_name in CHUNKS:
            tp = total(chunk_name, codec_name, *prob)
            ti = total(chunk_name, codec_name, *byid)
            row += [
                f"{tp['bytes'] / n:.1f} / {ti['bytes'] / n:.1f}",
                f"{raw / tp['enc'] / 1e6:.0f} / {raw / tp['dec'] / 1e6:.0f}",
            ]
        chunk_rows.append(row)
    chunk_table = common.markdown_table(
        ["codec"]
        + [
            f"{c} {what}"
            for c in CHUNKS
            for what in ("B/tok prob / id order", "enc / dec MB/s (prob)")
        ],
        chunk_rows,
    )
    m = meta["manifest"]
    info = common.machine()
    enc_rates = [raw / total(DEFAULT_CHUNK, c, *prob)["enc"] / 1e6 for c in all_codecs]
    lines = [
        "## bench_codecs: compressing the top-k targets",
        "",
        f"- date: {started} to {finished}",
        f"- command: `{command}`",
        f"- machine: {info['cpu']}; {info['memory']}",
        f"- software: {info['software']}",
        f"- load average (1/5/15 min) at start: {load_start}; at end: {load_end}",
        f"- data: a dump of {n:,} tokens of stdlib text by the toy GPT-2 teacher "
        f"({m.teacher.vocab_size} vocab, {common.TEACHER_KW}); k={k}, ids {ids.dtype}, "
        f"log-probs {logprobs.dtype}: {raw / n:.0f} B/token uncompressed (ids + log-probs); "
        f"input ids and offsets (~2 B/token compressed) are not included below",
        f"- timings: single-threaded, best of up to {args.repeats} (fewer for slow codecs); MB/s of uncompressed ids + "
        f"log-probs ({raw / n:.0f} B per token); median encode rate over all codecs "
        f"{statistics.median(enc_rates):.0f} MB/s",
        "",
        f"Bytes per token by codec, {DEFAULT_CHUNK} chunks (the current default is "
        f"`blosc zstd {m.codec.clevel} {m.codec.shuffle}`, {m.layout.chunk_bytes:,} B chunks):",
        "",
        main_table,
        "",
        "Chunk size: total B/token of ids + log-probs (prob order / id order + delta), and "
        "encode / decode MB/s (prob order):",
        "",
        chunk_table,
    ]
    report = "\n".join(lines)
    print(report)
    print(f"\n[bench_codecs] done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if not args.quick and not args.no_results:
        common.update_results("bench_codecs", report)
        print(f"[bench_codecs] wrote its section of {common.RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
