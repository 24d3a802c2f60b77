"""`logitcache info`, `stats` and `verify`: look at a cache, change nothing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from logitcache.cli.common import CacheDirOption, human_bytes, size_per_token
from logitcache.errors import CorruptCacheError, LogitCacheError
from logitcache.format.manifest import Manifest, nonstandard_filters
from logitcache.read import reader
from logitcache.storage import mirror, stores

out = Console()
err = Console(stderr=True)


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
    size = stores.disk_usage(cache)
    problems = structure_problems(c)
    nonstandard = nonstandard_filters(m)
    if as_json:
        doc = dataclasses.asdict(m) | {
            "size_bytes": size,
            "bytes_per_token": size / m.tokens if m.tokens else None,
            "spec_only": not nonstandard,
            "nonstandard_filters": nonstandard,
        }
        if m.task is not None:  # classification: its rows are views, counted per example
            doc["bytes_per_example"] = size / m.sequences if m.sequences else None
        print(json.dumps(doc, indent=2))
        _warn_nonstandard(nonstandard)
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
        ("readers", describe_readers(m)),
        ("counts", f"{m.tokens:,} tokens, {m.sequences:,} sequences, {len(m.parts)} parts"),
        ("size", size_per_token(size, m.tokens)),
    ]  # fmt: skip
    if m.ensemble is not None:  # the teacher row is the ensemble's identity: who is in it
        members = " + ".join(f"{x.teacher.name} ({x.weight:.3g})" for x in m.ensemble.members)
        rows.insert(2, ("ensemble", f"{m.ensemble.mode} average of {members}"))
    if m.task is not None:  # a classifier's cache: what one example is, and its classes
        rows = _classification_rows(m, rows, size)
    if m.masking is not None:  # a masked-LM cache: its masking, and the rate per masked token
        k = m.masking
        rows.insert(5, ("masking", f"masked LM: p={k.prob} ({k.replace_mask:.0%} mask id "
                    f"{k.mask_token_id}, {k.replace_random:.0%} random, rest unchanged), seed "
                    f"{k.seed}, {k.views} view(s) per sequence"))  # fmt: skip
        rows.append(("masked", f"{m.masked:,} positions with targets = "
                     f"{size / max(m.masked, 1):.1f} bytes per masked token"))  # fmt: skip
    if not c.is_remote and not problems:
        rows.append(("checked", "every part's files present, metadata and chunk indexes intact "
                     "(data: logitcache verify)"))  # fmt: skip
    for key, value in rows:
        out.print(f"[bold]{key:>10}[/bold]  {escape(value)}", highlight=False, soft_wrap=True)
    _warn_nonstandard(nonstandard)
    _report_damage(cache, problems)


def _classification_rows(
    m: Manifest, rows: list[tuple[str, str]], size: int
) -> list[tuple[str, str]]:
    """`info`'s rows for a classification cache: its axes are examples and their views (target
    rows) over classes, not sequences of tokens over a vocabulary, and it may have no tokenizer."""
    assert m.task is not None
    per = max(1, m.task.views)
    tokenizer = (
        f"{m.tokenizer.name}  (vocab {m.tokenizer.vocab_size}, fingerprint "
        f"{m.tokenizer.fingerprint[:12]})"
        if m.task.input == "text"
        else f"none ({m.task.input} examples)"
    )
    bytes_each = f"{size / m.sequences:.1f} bytes per example" if m.sequences else "no examples yet"
    replaced = {
        "teacher": f"{m.teacher.name}  ({m.teacher.dtype}, {m.teacher.vocab_size} classes, "
        f"weights {m.teacher.weights_sha256[:12]})",
        "tokenizer": tokenizer,
        "data": f"{m.data.source}  ({m.data.format}, {m.data.documents} examples, fingerprint "
        f"{m.data.fingerprint[:12]})",
        "layout": f"{'one target row' if per == 1 else f'{per} target rows'} per example, "
        f"{m.layout.sequences_per_part} examples/part",
        "counts": f"{m.sequences:,} examples, {m.tokens:,} target rows ({per} per example), "
        f"{len(m.parts)} parts",
        "size": f"{human_bytes(size)} = {bytes_each}",
    }
    rows = [(key, replaced.get(key, value)) for key, value in rows]
    rows.insert(4, ("task", describe_task(m)))
    return rows


def describe_task(m: Manifest) -> str:
    """A classification cache's task in one line: the examples, the classes, labels and views."""
    task = m.task
    assert task is not None
    names = f": {', '.join(task.classes)}" if task.classes else ""
    rows = f"{task.views} {task.augment} views per example" if task.views else "one row per example"
    labels = "labels" if task.labels else "no labels"
    return (
        f"{task.kind} of {task.input} {task.shape}, {m.teacher.vocab_size} classes{names}, "
        f"{labels}, {rows}"
    )


def describe_readers(m: Manifest) -> str:
    """Which readers open the cache: spec-only, or the filters that keep others out."""
    nonstandard = nonstandard_filters(m)
    if nonstandard:
        return f"NOT spec-only: {', '.join(nonstandard)} (zarr-python only)"
    if m.backend == "zarr":
        return "spec-only: every Zarr v3 reader (zarr-python, tensorstore, zarrs, ...)"
    return "spec-only: every Parquet reader (pyarrow, datasets, polars, DuckDB, ...)"


def _warn_nonstandard(nonstandard: list[str]) -> None:
    """On stderr, so that `info --json` stays parseable."""
    if nonstandard:
        err.print(
            f"warning: this cache uses {', '.join(nonstandard)}, which is not in the Zarr v3 "
            "specification: zarr-python reads it, tensorstore and other Zarr readers refuse "
            "it. Re-dump without --delta (or `logitcache export` it to parquet) for a cache "
            "every reader opens.",
            highlight=False,
            soft_wrap=True,
        )


def _report_damage(cache: str, problems: list[str]) -> None:
    if problems:
        raise CorruptCacheError(
            f"{cache} is damaged:\n"
            + "\n".join(f"  {p}" for p in problems)
            + "\nRun `logitcache verify` on it for a full check; re-dump the parts named above "
            "(delete the cache and rerun the dump), or restore them from a copy."
        )


def describe_targets(m: Manifest) -> str:
    """One line on what a cache stores per position, and how."""
    t = m.targets
    delta = f", delta-filtered {'+'.join(m.codec.delta)}" if m.codec.delta else ""
    delta += f", {'+'.join(m.codec.gaps)} stored as gaps" if m.codec.gaps else ""
    if t.kind == "sample":
        return (
            f"sample N={t.samples} (at most {t.k} distinct ids), T={t.temperature}, seed "
            f"{t.seed}, ids {t.id_dtype}, counts {t.count_dtype}{delta}"
        )
    values = t.logprob_dtype + (f" (1/{t.logprob_scale:g} nat)" if t.logprob_scale else "")
    size = f"topp p={t.top_p:g}, {t.min_k}..{t.k} ids" if t.kind == "topp" else f"topk k={t.k}"
    if m.task is not None and t.kind == "topk" and t.k == m.teacher.vocab_size:
        size = f"full ({size}: every class)"  # what `dump --targets full` writes
    return (
        f"{size}, T={t.temperature}, ids {t.id_dtype} in {t.order} order, log-probs {values}{delta}"
    )


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
    task = c.manifest.task
    ids = "ids" if task is None else "classes"
    if task is None:
        say(f"{doc['positions']:,} positions")
    else:  # a classification cache: a target row per view of each example
        say(f"{doc['positions']:,} target rows of {c.manifest.sequences:,} examples "
            f"({max(1, task.views)} per example), {c.manifest.teacher.vocab_size} classes")  # fmt: skip
    rows = [
        ("mass", f"teacher mass on the stored {ids}"),
        ("entropy", "entropy of the stored part, nats"),
        ("tail_entropy_max", "largest entropy with the tail, nats"),
        ("distinct", f"distinct {ids} per {'position' if task is None else 'row'}"),
    ]
    say(f"{'':>36}  {'mean':>9} {'p10':>9} {'p50':>9} {'p90':>9}")
    for key, label in rows:
        if doc.get(key):
            d = doc[key]
            say(f"{label:>36}  {d['mean']:9.4f} {d['p10']:9.4f} {d['p50']:9.4f} {d['p90']:9.4f}")
    unit, per = "token", doc["bytes_per_token"]
    if task is not None:  # per example: what a classification cache is counted in
        unit, per = "example", doc["bytes_per_example"]
    say(f"bytes/{unit} by array:")
    for name, value in sorted(per.items(), key=lambda x: -x[1]):
        say(f"{name:>36}  {value:9.2f}")
    say(f"{'total':>36}  {sum(per.values()):9.2f}")
    if plot is not None:
        say(f"wrote {plot}")


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
    m = c.manifest
    checked = f"{m.tokens:,} tokens"
    if m.task is not None:
        checked = f"{m.sequences:,} examples ({m.tokens:,} target rows)"
    print(
        f"ok: {report.parts} parts, {report.files} files, {report.chunks} chunks, "
        f"{checked} checked{fetched}"
    )
