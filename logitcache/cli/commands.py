"""The `logitcache` command: dump, info, verify, merge, export. Thin: parse flags, call the
library, print. Every CACHE argument is a directory or a URL (s3://, gs://, az://, memory://)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from logitcache.cli.common import human_bytes, run_app, size_per_token
from logitcache.errors import CorruptCacheError, LogitCacheError
from logitcache.read import reader
from logitcache.storage import mirror, stores

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Run a teacher once, cache its soft targets, and inspect caches.",
)
out = Console()

CacheDirOption = Annotated[
    Path | None,
    typer.Option(
        envvar="LOGITCACHE_CACHE_DIR",
        help="Local cache of parts fetched from a URL [default: ~/.cache/logitcache]; size "
        "limit LOGITCACHE_CACHE_SIZE (default 10GB).",
    ),
]
LicenseOption = Annotated[
    str, typer.Option("--license", help="Licence of the cached data, shown on the README.md card.")
]


@app.command()
def dump(
    data: Annotated[
        str,
        typer.Option(
            help="Input: a text file, directory or glob; .jsonl, .parquet, .npy, or a save_to_disk directory."
        ),
    ],
    out_dir: Annotated[
        str,
        typer.Option(
            "--out", help="Cache directory or URL (s3://bucket/cache) to create (or resume)."
        ),
    ],
    teacher: Annotated[
        str | None, typer.Option(help="Hugging Face causal LM: a local directory or a hub name.")
    ] = None,
    teacher_factory: Annotated[
        str | None,
        typer.Option(help="MODULE:FUNCTION returning a torch module that maps ids to logits."),
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(help="Tokenizer directory or tokenizer.json (default: the teacher's)."),
    ] = None,
    trust_remote_code: Annotated[
        bool, typer.Option(help="Allow a hub model's own Python code to run.")
    ] = False,
    data_format: Annotated[
        str, typer.Option(help="auto, text, jsonl, parquet, arrow or npy.")
    ] = "auto",
    text_field: Annotated[
        str | None, typer.Option(help="Field holding the text (JSON Lines, Parquet, datasets).")
    ] = None,
    ids_field: Annotated[
        str | None, typer.Option(help="Field holding already-tokenized ids instead of text.")
    ] = None,
    targets: Annotated[
        str,
        typer.Option(
            help="topk: the k most probable ids and their log-probs; sample: the distinct ids "
            "among --samples draws from the teacher and their counts."
        ),
    ] = "topk",
    top_k: Annotated[
        int,
        typer.Option(
            help="Teacher ids kept per position (topk). 32: the smallest k whose students came "
            "within 1% of online KD in bench_fidelity (benchmarks/RESULTS.md)."
        ),
    ] = 32,
    samples: Annotated[
        int, typer.Option(help="Draws per position (sample), with replacement, on the device.")
    ] = 64,
    temperature: Annotated[
        float, typer.Option(help="Temperature of the stored (or sampled) distribution.")
    ] = 1.0,
    seed: Annotated[
        int, typer.Option(help="Seed of the draws (sample); see docs/FORMAT.md, section 3a.")
    ] = 0,
    id_order: Annotated[
        str,
        typer.Option(
            help="topk: id (ids increasing within a position: a third smaller at k=64, see "
            "bench_storage in benchmarks/RESULTS.md) or descending (most probable first). "
            "Readers get descending order back either way."
        ),
    ] = "id",
    delta: Annotated[
        bool,
        typer.Option(help="Delta-filter the arrays that increase along a position (smaller)."),
    ] = True,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 1024,
    pack: Annotated[
        bool,
        typer.Option(
            help="Join documents with EOS and cut into --seq-len sequences; --no-pack keeps one truncated sequence per document."
        ),
    ] = True,
    batch_size: Annotated[int, typer.Option(help="Sequences per teacher forward.")] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[
        str, typer.Option(help="Teacher weights: float32, bfloat16 or float16.")
    ] = "float32",
    format: Annotated[
        str, typer.Option(help="Storage backend: zarr (default) or parquet.")
    ] = "zarr",
    logprob_dtype: Annotated[
        str,
        typer.Option(
            help="Stored log-prob type: float16, float32, or uint8 (1/16-nat steps, error at "
            "most 1/32 nat; 58 instead of 93 bytes/token at k=64 in bench_storage)."
        ),
    ] = "float16",
    part_tokens: Annotated[
        int, typer.Option(help="Tokens per part, the unit of commit and resume.")
    ] = 1 << 20,
    clevel: Annotated[int, typer.Option(help="zstd compression level.")] = 5,
    shuffle: Annotated[
        str,
        typer.Option(help="Blosc shuffle before zstd: shuffle (bytes), bitshuffle or noshuffle."),
    ] = "shuffle",
    overwrite: Annotated[
        bool, typer.Option(help="Delete an existing cache at --out and start over.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
    license: LicenseOption = "unknown",
    shard: Annotated[
        str | None,
        typer.Option(
            help="I/N: dump only slice I of N (job I of N independent jobs, e.g. a SLURM "
            "array); join the N caches with `logitcache merge`. Under torchrun the ranks split "
            "the data by themselves."
        ),
    ] = None,
) -> None:
    """Run the teacher over a dataset once and write its soft targets (top-k or sampled).

    Rerunning the same command after an interruption resumes from the last committed part.

    Examples:

      logitcache dump --teacher ./gpt2-teacher --data ./corpus/ --out ./cache --top-k 64 --seq-len 1024

      logitcache dump --teacher-factory mypkg.models:teacher --tokenizer ./tok --data docs.jsonl --text-field text --out ./cache

      logitcache dump --teacher ./gpt2-teacher --data ./corpus/ --out ./cache --targets sample --samples 64 --seed 1

      logitcache dump --teacher ./gpt2-teacher --data ./corpus/ --out s3://bucket/caches/gpt2-k64 --license cc-by-4.0

      torchrun --nproc-per-node 8 -m logitcache dump --teacher ./gpt2-teacher --data ./corpus/ --out ./cache

      logitcache dump --teacher ./gpt2-teacher --data ./corpus/ --out ./cache-3 --shard 3/16
    """
    from logitcache.dumping.pipeline import DumpOptions
    from logitcache.dumping.pipeline import dump as run_dump

    summary = run_dump(
        DumpOptions(
            data=data, out=out_dir, teacher=teacher, teacher_factory=teacher_factory, tokenizer=tokenizer,
            trust_remote_code=trust_remote_code, data_format=data_format, text_field=text_field,
            ids_field=ids_field, targets=targets, top_k=top_k, samples=samples,
            temperature=temperature, seed=seed, id_order=id_order, delta=delta, seq_len=seq_len,
            pack=pack, batch_size=batch_size,
            device=device, dtype=dtype, backend=format, logprob_dtype=logprob_dtype,
            part_tokens=part_tokens, clevel=clevel, shuffle=shuffle, overwrite=overwrite, progress=progress,
            license=license, shard=shard,
        )
    )  # fmt: skip
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports for the job
        return
    m = summary.manifest
    resumed = (
        f" (resumed after {summary.resumed_parts} committed parts)" if summary.resumed_parts else ""
    )
    print(
        f"wrote {out_dir}{resumed}: {m.tokens:,} tokens in {m.sequences:,} sequences, {len(m.parts)} parts; "
        f"{size_per_token(summary.bytes_on_disk, m.tokens)} on disk; "
        f"{summary.wall_seconds:.1f} s ({m.tokens / max(summary.wall_seconds, 1e-9):,.0f} tokens/s)"
    )


def disk_usage(root: str | Path) -> int:
    return stores.disk_usage(root)


@app.command()
def info(
    cache: Annotated[str, typer.Argument(help="Cache directory or URL.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the manifest and sizes as JSON.")
    ] = False,
    cache_dir: CacheDirOption = None,
) -> None:
    """Describe a cache: teacher, tokenizer, data, targets, counts, size and bytes/token.

    --json prints the whole manifest (teacher identity and hashes, tokenizer fingerprint and
    vocabulary size, data fingerprint, ...) plus size_bytes and bytes_per_token.

    It also checks, cheaply, that every part's files are there and its metadata intact
    (missing, truncated or mismatched files: exit 2 naming the part); `verify` reads the data.

    Examples: logitcache info ./cache --json | jq .teacher ; logitcache info s3://bucket/cache
    """
    from logitcache.read.health import structure_problems

    c = reader.open(cache, allow_partial=True, cache_dir=cache_dir)
    m = c.manifest
    size = disk_usage(cache)
    problems = structure_problems(c)
    if as_json:
        doc = dataclasses.asdict(m) | {
            "size_bytes": size,
            "bytes_per_token": size / m.tokens if m.tokens else None,
        }
        print(json.dumps(doc, indent=2))
        _report_damage(cache, problems)
        return
    state = "complete" if m.complete else "UNFINISHED (rerun the dump to finish)"
    rows = [
        ("cache", f"{c.root}  [{m.backend}, format {m.format_version}, {state}]"),
        ("teacher", f"{m.teacher.name}  ({m.teacher.dtype}, vocab {m.teacher.vocab_size}, weights {m.teacher.weights_sha256[:12]})"),
        ("tokenizer", f"{m.tokenizer.name}  (vocab {m.tokenizer.vocab_size}, fingerprint {m.tokenizer.fingerprint[:12]})"),
        ("data", f"{m.data.source}  ({m.data.format}, {m.data.documents} documents, fingerprint {m.data.fingerprint[:12]})"),
        ("targets", describe_targets(m)),
        ("layout", f"seq_len {m.layout.seq_len}, {'packed' if m.layout.packing else 'one document per sequence'}, {m.layout.sequences_per_part} sequences/part"),
        ("codec", f"{m.codec.name}/{m.codec.cname} level {m.codec.clevel}, {m.codec.shuffle}, {m.codec.checksum}"),
        ("counts", f"{m.tokens:,} tokens, {m.sequences:,} sequences, {len(m.parts)} parts"),
        ("size", size_per_token(size, m.tokens)),
    ]  # fmt: skip
    if not c.is_remote and not problems:
        rows.append(("checked", "every part's files present, metadata and chunk indexes intact "
                     "(data: logitcache verify)"))  # fmt: skip
    for key, value in rows:
        out.print(f"[bold]{key:>10}[/bold]  {escape(value)}", highlight=False, soft_wrap=True)
    _report_damage(cache, problems)


def _report_damage(cache: str, problems: list[str]) -> None:
    if problems:
        raise CorruptCacheError(
            f"{cache} is damaged:\n"
            + "\n".join(f"  {p}" for p in problems)
            + "\nRun `logitcache verify` on it for a full check; re-dump the parts named above "
            "(delete the cache and rerun the dump), or restore them from a copy."
        )


def describe_targets(m) -> str:
    """One line on what a cache stores per position, and how."""
    t = m.targets
    delta = f", delta-filtered {'+'.join(m.codec.delta)}" if m.codec.delta else ""
    if t.kind == "sample":
        return (
            f"sample N={t.samples} (at most {t.k} distinct ids), T={t.temperature}, seed "
            f"{t.seed}, ids {t.id_dtype}, counts {t.count_dtype}{delta}"
        )
    values = t.logprob_dtype + (f" (1/{t.logprob_scale:g} nat)" if t.logprob_scale else "")
    return (
        f"topk k={t.k}, T={t.temperature}, ids {t.id_dtype} in {t.order} order, "
        f"log-probs {values}{delta}"
    )


@app.command()
def stats(
    cache: Annotated[str, typer.Argument(help="Cache directory or URL.")],
    plot: Annotated[Path | None, typer.Option(help="Write the histograms to this PNG.")] = None,
    max_tokens: Annotated[
        int, typer.Option(help="Positions to read (0: all); bytes are always the whole cache's.")
    ] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the statistics as JSON.")] = False,
    cache_dir: CacheDirOption = None,
) -> None:
    """Per position: the teacher mass on the stored ids (top-k coverage), the entropy of the
    stored part, the distinct ids; and the bytes per token of each array. The exact definitions
    are in logitcache/read/stats.py.

    Example: logitcache stats ./cache --plot stats.png
    """
    from logitcache.read import stats as stats_mod

    if max_tokens < 0:
        raise LogitCacheError(
            f"--max-tokens must be 0 (every position) or a number of positions, got {max_tokens}."
        )
    c = reader.open(cache, allow_partial=True, cache_dir=cache_dir)
    result = stats_mod.compute(c, max_tokens=max_tokens)
    doc = result.summary()
    if plot is not None:
        stats_mod.plot(result, plot, title=f"{cache}: {describe_targets(c.manifest)}")
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    say = lambda text: out.print(escape(text), highlight=False, soft_wrap=True)  # noqa: E731
    say(f"{cache}: {describe_targets(c.manifest)}")
    say(f"{doc['positions']:,} positions")
    rows = [
        ("mass", "teacher mass on the stored ids"),
        ("entropy", "entropy of the stored part, nats"),
        ("tail_entropy_max", "largest entropy with the tail, nats"),
        ("distinct", "distinct ids per position"),
    ]
    say(f"{'':>36}  {'mean':>9} {'p10':>9} {'p50':>9} {'p90':>9}")
    for key, label in rows:
        if doc.get(key):
            d = doc[key]
            say(f"{label:>36}  {d['mean']:9.4f} {d['p10']:9.4f} {d['p50']:9.4f} {d['p90']:9.4f}")
    say("bytes/token by array:")
    for name, value in sorted(doc["bytes_per_token"].items(), key=lambda x: -x[1]):
        say(f"{name:>36}  {value:9.2f}")
    say(f"{'total':>36}  {doc['bytes_per_token_total']:9.2f}")
    if plot is not None:
        say(f"wrote {plot}")


@app.command()
def verify(
    cache: Annotated[str, typer.Argument(help="Cache directory or URL.")],
    cache_dir: CacheDirOption = None,
) -> None:
    """Read every chunk of a cache and check checksums and invariants; exit 2 naming what is wrong.

    A cache at a URL is fetched part by part into the local cache (--cache-dir) and checked
    there. The README.md card is not checked (it is not part of the manifest).

    Examples: logitcache verify ./cache ; logitcache verify s3://bucket/cache
    """
    from logitcache.read.verify import verify as run_verify

    c = reader.open(cache, allow_partial=True, cache_dir=cache_dir)
    report = run_verify(c)
    if not report.ok:
        raise CorruptCacheError(
            f"{cache} failed verification:\n"
            + "\n".join(f"  {p}" for p in report.problems)
            + "\nRe-dump the parts named above (delete the cache and rerun the dump), or restore them from a copy."
        )
    got = mirror.FETCH_STATS
    fetched = (
        f" (downloaded {got['files']} files, {human_bytes(got['bytes'])})" if c.is_remote else ""
    )
    print(
        f"ok: {report.parts} parts, {report.files} files, {report.chunks} chunks, "
        f"{c.manifest.tokens:,} tokens checked{fetched}"
    )


@app.command()
def merge(
    out_dir: Annotated[str, typer.Argument(metavar="OUT", help="New cache directory or URL.")],
    inputs: Annotated[
        list[str], typer.Argument(metavar="IN...", help="Caches to combine, in this order.")
    ],
    copy: Annotated[
        bool,
        typer.Option(
            help="Copy the data. Default: hard links to the inputs' files (no copy; inputs and "
            "output on one local filesystem)."
        ),
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing cache at OUT.")] = False,
    any_order: Annotated[
        bool,
        typer.Option(
            help="Accept shards of one dump (--shard I/N) out of shard order (default: refused)."
        ),
    ] = False,
    license: LicenseOption = "unknown",
    cache_dir: CacheDirOption = None,
) -> None:
    """Combine caches dumped by separate jobs into one cache (their sequences, in order).

    The inputs must share teacher, tokenizer, targets, layout, codec and backend; their data
    differ (each input's source and fingerprint is recorded in the manifest's merged_from).

    Examples:

      logitcache merge ./cache-all ./cache-job0 ./cache-job1 ./cache-job2

      logitcache merge s3://bucket/all s3://bucket/job0 s3://bucket/job1 --copy
    """
    from logitcache.write.merge import merge as run_merge

    m = run_merge(
        out_dir, inputs, copy=copy, overwrite=overwrite, license=license, cache_dir=cache_dir,
        any_order=any_order,
    )  # fmt: skip
    how = "copied" if copy else "hard-linked"
    print(
        f"wrote {out_dir}: {len(inputs)} caches merged ({how}), {m.tokens:,} tokens in "
        f"{m.sequences:,} sequences, {len(m.parts)} parts"
    )


@app.command()
def export(
    cache: Annotated[str, typer.Argument(help="Cache directory or URL to read.")],
    out_dir: Annotated[str, typer.Argument(metavar="OUT", help="Cache directory or URL to write.")],
    format: Annotated[str, typer.Option(help="Backend of the output: parquet or zarr.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing cache at OUT.")] = False,
    license: LicenseOption = "unknown",
    cache_dir: CacheDirOption = None,
) -> None:
    """Convert a cache to the other backend (or copy it between a directory and a URL).

    The Parquet output loads as is with pyarrow.dataset or datasets.load_dataset("parquet").
    Interrupted? Rerun the same command: it resumes.

    Examples:

      logitcache export ./cache ./cache-parquet --format parquet

      logitcache export ./cache s3://bucket/cache --format zarr
    """
    from logitcache.write.export import export as run_export

    m = run_export(
        cache, out_dir, backend=format, overwrite=overwrite, license=license, cache_dir=cache_dir
    )
    print(
        f"wrote {out_dir} ({format}): {m.tokens:,} tokens in {m.sequences:,} sequences, "
        f"{len(m.parts)} parts"
    )


def main() -> None:
    run_app(app, "logitcache")


if __name__ == "__main__":
    main()
