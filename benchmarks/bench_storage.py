"""Storage per token and reconstruction error of every target kind and codec, with baselines.

    python benchmarks/bench_storage.py               # default (a few minutes once the teacher exists)
    python benchmarks/bench_storage.py --quick       # smoke run, RESULTS.md untouched

All rows encode the **same teacher outputs**: the `bench_fidelity` teacher (built or reused,
see that script) run over ``--tokens`` tokens of held-out stdlib text in sequences of 256.
Each logitcache row is a real cache written by the code `dump` uses (`logitcache.dumping.targets`
computes the targets from the logits exactly as `dump` does, `CacheWriter` writes and commits
the parts), and its size is every file on disk (input ids, offsets, metadata, manifest)
divided by the tokens. Then the cache is read back through `logitcache.open` and compared with
the exact float64 teacher distribution:

``max |d lp|``
    the largest error of a stored log-prob, next to the codec's documented worst case
    (`logitcache.format.codecs`); the script fails if a bound is exceeded.
``KL on support``
    KL(exact || stored), both renormalised over the stored ids: what the value codec (top-k) or
    the sampling noise (sampled) does to the distribution's shape where it is stored; mean per
    position, nats.
``TV incl. tail``
    total variation between the exact distribution and the stored one over the full
    vocabulary, the teacher's mass outside the stored ids counted in full: ``0.5 * (sum over
    stored ids |p - p'| + (1 - sum over stored ids p))``; mean per position.

Baselines, measured on the same outputs: full float32 logits (uncompressed); top-k with uint32
ids and float32 values, uncompressed; top-k with uint32 ids and float16 values under zstd
(level 3, 1 MiB frames; the layout large training frameworks use); and DistillKit's published
figures, quoted (not measured): about 114 and 300 bytes/token at k = 50 and k = 128 on large
vocabularies. Sampled targets are also measured in a fixed-width layout (distinct ids padded to
the part's largest count with count 0) against the ragged layout the format uses. Top-p
rows (``topp<p>-max<k>``: per position the fewest ids reaching p, at most k) are ragged too;
their "ids/position" is the mean count.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fidelity as bf
import common

DISTILLKIT = [
    ("DistillKit budget (k=50), quoted", 114),
    ("DistillKit recommended (k=128), quoted", 300),
]


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    kind: str
    k: int = 0
    samples: int = 0
    logprob_dtype: str = "float16"
    order: str = "descending"
    delta: bool = False  # the numcodecs filter (--delta); without it sampled ids are gaps (1.2)
    backend: str = "zarr"
    shuffle: str = "shuffle"  # Blosc's byte shuffle, dump's default; "bitshuffle" before
    top_p: float = 0.0  # topp: the coverage, with k the most ids (--max-k) and min_k 1


def settings(quick: bool) -> list[Setting]:
    out = []
    for k in (8, 32, 64) if not quick else (8, 64):
        for dtype in ("float16", "uint8"):
            for order in ("descending", "id"):
                for delta in (False, True):
                    if delta and order == "descending" and dtype == "float16":
                        continue  # nothing in that layout increases along a row
                    out.append(Setting(f"topk{k}", "topk", k=k, logprob_dtype=dtype,
                                       order=order, delta=delta))  # fmt: skip
    out.append(Setting("topk64", "topk", k=64, logprob_dtype="float32"))
    for order, delta in (("descending", False), ("id", True)):  # the earlier shuffle default
        out.append(Setting("topk64", "topk", k=64, order=order, delta=delta, shuffle="bitshuffle"))
    out.append(Setting("topk128", "topk", k=128, logprob_dtype="uint8", order="id", delta=True))
    for n in (16, 32, 64, 128) if not quick else (16, 64):
        for delta in (False, True):
            out.append(Setting(f"sample{n}", "sample", samples=n, order="id", delta=delta))
    out += [
        Setting(
            "topk64", "topk", k=64, logprob_dtype="uint8", order="id", backend="parquet", delta=True
        ),
        Setting("sample64", "sample", samples=64, order="id", backend="parquet", delta=True),
        Setting("sample64", "sample", samples=64, order="id", backend="parquet"),  # gaps
    ]
    for max_k in (64, 128):  # top-p, as dump writes it by default (float16, id order)
        for p in (0.5, 0.7, 0.8, 0.9, 0.95) if not quick else (0.5, 0.9):
            out.append(Setting(f"topp{p:g}-max{max_k}", "topp", k=max_k, top_p=p, order="id"))
    out.append(Setting("topp0.9-max128", "topp", k=128, top_p=0.9, logprob_dtype="uint8",
                       order="id"))  # fmt: skip
    return out


def describe(s: Setting) -> str:
    if s.kind == "sample":
        codec = "counts uint8"
    else:
        codec = {"float16": "f16", "float32": "f32", "uint8": "q8 (1/16 nat)"}[s.logprob_dtype]
    order = {"descending": "prob order", "id": "id order"}[s.order]
    shuffle = "" if s.shuffle == "shuffle" else f", {s.shuffle}"
    coding = ", delta" if s.delta else ", gaps" if s.kind == "sample" else ""
    return f"{s.name} {codec}, {order}{coding}{shuffle}, {s.backend}"


# --------------------------------------------------------------------------------------------
# Teacher outputs


def teacher_outputs(teacher_dir: Path, tokens: int):
    """(sequences (n, 256) int64, logits (n, 256, V) float32) over held-out text."""
    import torch
    from transformers import AutoModelForCausalLM

    seqs = bf.heldout_sequences(teacher_dir, tokens)
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = torch.cat(
            [model(input_ids=seqs[i : i + 8]).logits for i in range(0, len(seqs), 8)]
        )
    return seqs, logits.float()


# --------------------------------------------------------------------------------------------
# Writing a cache the way dump does


def template(
    teacher_dir: Path,
    targets,
    delta: list[str],
    backend: str,
    seq_len: int,
    shuffle: str,
    gaps: list[str] | None = None,
):
    from logitcache.dumping.teacher import load_teacher
    from logitcache.format.manifest import (
        FORMAT_NAME,
        CodecInfo,
        DataInfo,
        LayoutInfo,
        Manifest,
        version_for,
    )
    from logitcache.version import __version__

    t = load_teacher(str(teacher_dir), device="cpu")
    codec = CodecInfo("blosc", "zstd", 5, shuffle, "crc32c", delta=delta, gaps=list(gaps or []))
    m = Manifest(
        format=FORMAT_NAME, format_version="1.0", backend=backend,
        created="2026-01-01T00:00:00+00:00", teacher=t.info, tokenizer=t.tokenizer_info,
        data=DataInfo("stdlib held-out (bench_storage)", "npy", "0" * 64, -1),
        targets=targets, layout=LayoutInfo(seq_len, True, 1 << 20, 1 << 20), codec=codec,
        complete=False, sequences=0, tokens=0, tool_version=__version__,
    )  # fmt: skip
    return dataclasses.replace(m, format_version=version_for(m))


def write_cache(out: Path, s: Setting, seqs, logits, teacher_dir: Path) -> Any:
    import torch

    from logitcache.dumping import targets as targets_mod
    from logitcache.write.writer import CacheWriter

    vocab = logits.shape[-1]
    info = targets_mod.target_info(
        kind=s.kind, vocab_size=vocab, top_k=s.k, samples=s.samples,
        logprob_dtype=s.logprob_dtype, order=s.order, top_p=s.top_p or 1.0,
    )  # fmt: skip
    delta = targets_mod.delta_arrays(info) if s.delta else []
    gaps = [] if s.delta else targets_mod.gap_arrays(info)  # as dump decides (prepare.py)
    m = template(teacher_dir, info, delta, s.backend, seqs.shape[1], s.shuffle, gaps)
    spec = targets_mod.TargetSpec.of(info)
    inputs, rows = [], []
    for start in range(0, len(seqs), 8):
        batch = logits[start : start + 8]
        index = torch.arange(start, start + len(batch))
        host = {
            k: v.cpu().numpy() for k, v in targets_mod.device_targets(batch, spec, index).items()
        }
        for row in range(len(batch)):
            inputs.append(seqs[start + row].numpy())
            rows.append({k: v[row] for k, v in host.items() if k != "finite"})
    shutil.rmtree(out, ignore_errors=True)
    with CacheWriter(out, m) as writer:
        writer.write_part(targets_mod.assemble(info, inputs, rows, gaps))
        writer.finish()
    return info


def size_on_disk(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


# --------------------------------------------------------------------------------------------
# Errors against the exact distribution


def errors(ids: np.ndarray, stored_lp: np.ndarray, exact_lp) -> dict[str, float]:
    """ids (T, w), stored log-probs (T, w) (-inf = absent), exact log-probs (T, V) torch."""
    import torch

    ids_t = torch.from_numpy(ids.astype(np.int64))
    lp_true = exact_lp.gather(-1, ids_t).double().numpy()
    present = np.isfinite(stored_lp)
    lp_s = np.where(present, stored_lp.astype(np.float64), 0.0)
    p = np.where(present, np.exp(lp_true), 0.0)
    q = np.where(present, np.exp(lp_s), 0.0)
    dlp = np.abs(lp_s - lp_true)[present]
    pn = p / p.sum(-1, keepdims=True)
    qn = q / q.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(present & (pn > 0), pn * (np.log(pn) - np.log(np.where(qn > 0, qn, 1))), 0)
    tv = 0.5 * (np.abs(p - q).sum(-1) + np.clip(1 - p.sum(-1), 0, 1))
    return {
        "max_dlp": float(dlp.max()) if dlp.size else 0.0,
        "kl_support": float(kl.sum(-1).mean()),
        "tv": float(tv.mean()),
        "coverage": float(p.sum(-1).mean()),
        "distinct": float(present.sum(-1).mean()),
    }


def check_bound(ids, stored_lp, exact_lp, info) -> float:
    """The largest (error - documented bound) over the stored values; <= 0 when the bound holds."""
    import torch

    from logitcache.format import codecs

    if info.kind == "sample":
        return 0.0
    lp_true = exact_lp.gather(-1, torch.from_numpy(ids.astype(np.int64))).double().numpy()
    bound = codecs.logprob_error_bound(stored_lp, info.logprob_dtype, info.logprob_scale)
    # the stored values are rounded from float32 log-probs, themselves within ~1e-6 of float64
    with np.errstate(invalid="ignore"):  # top-p's unused slots: -inf values, infinite bounds
        excess = np.abs(stored_lp.astype(np.float64) - lp_true) - bound - 1e-5
    return float(np.nanmax(np.where(np.isfinite(bound), excess, -np.inf)))


# --------------------------------------------------------------------------------------------
# Baselines


def zstd_size(arrays: list[np.ndarray], level: int = 3) -> int:
    import numcodecs

    codec = numcodecs.Zstd(level=level)
    total = 0
    for a in arrays:
        raw = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
        for i in range(0, raw.size, 1 << 20):
            total += len(codec.encode(raw[i : i + (1 << 20)]))
    return total


def padded_size(s: Setting, seqs, logits, info, work: Path) -> int:
    """The same sampled targets in a fixed-width layout: (T, W) ids and counts, count 0 = pad."""
    import torch

    from logitcache.dumping import targets as targets_mod
    from logitcache.format.manifest import CodecInfo, PartArrays
    from logitcache.storage import zarr_backend as _zarr

    spec = targets_mod.TargetSpec.of(info)
    ids, counts = [], []
    for start in range(0, len(seqs), 8):
        out = targets_mod.device_targets(logits[start : start + 8], spec,
                                         torch.arange(start, start + 8))  # fmt: skip
        ids.append(out["target_ids"].reshape(-1, s.samples).numpy())
        counts.append(out["target_counts"].reshape(-1, s.samples).numpy())
    ids_a, counts_a = np.concatenate(ids), np.concatenate(counts)
    width = int((counts_a > 0).sum(-1).max())
    arrays = PartArrays(
        input_ids=seqs.reshape(-1).numpy().astype(np.uint16),
        target_ids=ids_a[:, :width].astype(np.uint16),
        target_logprobs=None,
        seq_offsets=np.arange(0, seqs.numel() + 1, seqs.shape[1], dtype=np.int64),
        target_counts=counts_a[:, :width].astype(np.uint8),
    )
    path = work / "padded"
    shutil.rmtree(path, ignore_errors=True)
    codec = CodecInfo("blosc", "zstd", 5, s.shuffle, "crc32c",
                      delta=["target_ids"] if s.delta else [])  # fmt: skip
    _zarr.write_part(path, arrays, codec, 1 << 20)
    return size_on_disk(path)


# --------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=32_768, help="Held-out tokens encoded [32768].")
    p.add_argument("--teacher-seconds", type=float, default=900.0,
                   help="bench_fidelity's teacher budget (the teacher is shared) [900].")  # fmt: skip
    p.add_argument("--teacher", type=Path, default=None,
                   help="A finished teacher directory to use instead (e.g. bench_fidelity's "
                   "realistic one, benchmarks/.work/fidelity-realistic/teacher).")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="Smoke run; RESULTS.md untouched.")
    p.add_argument("--no-write", action="store_true", help="Do not touch RESULTS.md.")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.no_write = 4096, True
    return args


def main(argv=None) -> None:
    import torch

    import logitcache

    args = parse_args(argv)
    started, t0, load_before = common.now_utc(), time.perf_counter(), common.loadavg()
    teacher_dir = args.teacher or bf.ensure_teacher(args.teacher_seconds)
    seqs, logits = teacher_outputs(teacher_dir, args.tokens)
    tokens, vocab = seqs.numel(), logits.shape[-1]
    exact = torch.log_softmax(logits.double(), -1).reshape(tokens, vocab)
    entropy = float(-(exact.exp() * exact).sum(-1).mean())
    bf.log(f"{tokens} tokens, vocab {vocab}, mean teacher entropy {entropy:.3f} nats")

    rows: list[list[Any]] = []
    failures = []
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        work = Path(tmp)
        for s in settings(args.quick):
            out = work / "cache"
            info = write_cache(out, s, seqs, logits, teacher_dir)
            size = size_on_disk(out)
            cache = logitcache.open(out)
            decoded = [cache.read_decoded(i) for i in range(cache.num_parts)]
            ids = np.concatenate([d.target_ids for d in decoded])
            lp = np.concatenate([d.target_logprobs for d in decoded]).astype(np.float32)
            width = max(ids.shape[1], 1)
            err = errors(ids, lp, exact)
            excess = check_bound(ids, lp, exact, info)
            if excess > 0:
                failures.append(f"{describe(s)}: a value exceeds its codec's bound by {excess:.2e}")
            targets_bytes = size - (out / "manifest.json").stat().st_size
            bound = {
                "float16": "2^-11 |lp|", "float32": "0", "uint8": "1/32",
            }.get(info.logprob_dtype, "exact counts")  # fmt: skip
            rows.append([
                describe(s), f"{size / tokens:.1f}", f"{err['distinct']:.1f}",
                f"{err['max_dlp']:.2e}" if s.kind != "sample" else "-", bound,
                f"{err['kl_support']:.2e}", f"{err['tv']:.4f}", f"{err['coverage']:.4f}",
            ])  # fmt: skip
            bf.log(f"{describe(s)}: {size / tokens:.1f} B/token ({targets_bytes} B w/o manifest)")
            if s.kind == "sample" and s.backend == "zarr":
                padded = padded_size(s, seqs, logits, info, work)
                rows.append([
                    describe(s).replace("zarr", "zarr, fixed-width padded (not the format)"),
                    f"{padded / tokens:.1f}", f"{err['distinct']:.1f}", "-", "exact counts",
                    f"{err['kl_support']:.2e}", f"{err['tv']:.4f}", f"{err['coverage']:.4f}",
                ])  # fmt: skip
            del cache, decoded
            _ = width

    # baselines on the same outputs
    base_rows = [["full float32 logits, uncompressed", f"{(vocab + 1) * 4:.1f}", str(vocab),
                  "0", "-", "0", "0", "1.0000"]]  # fmt: skip
    input_u32 = seqs.reshape(-1).numpy().astype(np.uint32)
    for k in (50, 64, 128):
        values, ids = exact.float().topk(k, -1)
        err = errors(ids.numpy(), values.numpy(), exact)
        base_rows.append([f"top-{k} uint32 ids + float32 values, uncompressed", f"{k * 8 + 4:.1f}",
                          str(k), f"{err['max_dlp']:.2e}", "0", f"{err['kl_support']:.2e}",
                          f"{err['tv']:.4f}", f"{err['coverage']:.4f}"])  # fmt: skip
        f16 = values.half()
        size = zstd_size([input_u32, ids.numpy().astype(np.uint32), f16.numpy()])
        err16 = errors(ids.numpy(), f16.float().numpy(), exact)
        base_rows.append([f"top-{k} uint32 ids + float16 values, zstd", f"{size / tokens:.1f}",
                          str(k), f"{err16['max_dlp']:.2e}", "2^-11 |lp|",
                          f"{err16['kl_support']:.2e}", f"{err16['tv']:.4f}",
                          f"{err16['coverage']:.4f}"])  # fmt: skip
    base_rows += [[name, f"~{b}", "", "", "", "", "", ""] for name, b in DISTILLKIT]

    header = ["setting", "B/token (all)", "ids/position", "max abs d lp", "bound",
              "KL on support", "TV incl. tail", "teacher mass stored"]  # fmt: skip
    table = common.markdown_table(header, rows)
    baselines = common.markdown_table(header, base_rows)
    print(table)
    print(baselines)
    if failures:
        print("\n".join(failures))
        raise SystemExit(1)
    if args.no_write:
        return
    teacher_name = (
        f"the teacher at `{args.teacher}`" if args.teacher else "the bench_fidelity weak teacher"
    )
    body = "\n\n".join(
        [
            "## Storage per token and reconstruction error (`bench_storage.py`)",
            f"- date: {started}; {(time.perf_counter() - t0) / 60:.1f} min; load average "
            f"{load_before} before\n- machine: {common.machine_line()}\n- command: `{common.command_line()}`",
            f"Teacher outputs: {teacher_name} over {tokens:,} held-out stdlib tokens "
            f"(vocabulary {vocab}, mean entropy {entropy:.2f} nats/position). Every logitcache "
            "row is a complete cache written by dump's code path (zstd level 5 + byte shuffle "
            "inside zarr shards unless the row says otherwise or is parquet); B/token counts every file including input "
            "ids, offsets, metadata and the manifest. Errors are against the exact float64 "
            "distribution; every stored value was checked against its codec's documented "
            "bound.",
            table,
            "Baselines on the same teacher outputs (errors computed the same way; DistillKit's "
            "figures are quoted from its documentation, not measured here):",
            baselines,
        ]
    )
    common.update_results("bench_storage", body)
    bf.log(f"wrote {common.RESULTS}")


if __name__ == "__main__":
    main()
