"""The `logitcache` command: dump, info, verify. Thin: parse flags, call the library, print."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from logitcache import reader
from logitcache.clitools import human_bytes, run_app
from logitcache.errors import CorruptCacheError

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Run a teacher once, cache its soft targets, and inspect caches.",
)
out = Console()


@app.command()
def dump(
    data: Annotated[
        str,
        typer.Option(
            help="Input: a text file, directory or glob; .jsonl, .parquet, .npy, or a save_to_disk directory."
        ),
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Cache directory to create (or resume).")],
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
    top_k: Annotated[int, typer.Option(help="Teacher ids kept per position.")] = 64,
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
        str, typer.Option(help="Stored log-prob type: float16 or float32.")
    ] = "float16",
    part_tokens: Annotated[
        int, typer.Option(help="Tokens per part, the unit of commit and resume.")
    ] = 1 << 20,
    clevel: Annotated[int, typer.Option(help="zstd compression level.")] = 5,
    overwrite: Annotated[
        bool, typer.Option(help="Delete an existing cache at --out and start over.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
) -> None:
    """Run the teacher over a dataset once and write its top-k soft targets.

    Rerunning the same command after an interruption resumes from the last committed part.

    Examples:

      logitcache dump --teacher ./gpt2-teacher --data ./corpus/ --out ./cache --top-k 64 --seq-len 1024

      logitcache dump --teacher-factory mypkg.models:teacher --tokenizer ./tok --data docs.jsonl --text-field text --out ./cache
    """
    from logitcache.dump import DumpOptions
    from logitcache.dump import dump as run_dump

    summary = run_dump(
        DumpOptions(
            data=data, out=out_dir, teacher=teacher, teacher_factory=teacher_factory, tokenizer=tokenizer,
            trust_remote_code=trust_remote_code, data_format=data_format, text_field=text_field,
            ids_field=ids_field, top_k=top_k, seq_len=seq_len, pack=pack, batch_size=batch_size,
            device=device, dtype=dtype, backend=format, logprob_dtype=logprob_dtype,
            part_tokens=part_tokens, clevel=clevel, overwrite=overwrite, progress=progress,
        )
    )  # fmt: skip
    m = summary.manifest
    resumed = (
        f" (resumed after {summary.resumed_parts} committed parts)" if summary.resumed_parts else ""
    )
    print(
        f"wrote {out_dir}{resumed}: {m.tokens:,} tokens in {m.sequences:,} sequences, {len(m.parts)} parts; "
        f"{human_bytes(summary.bytes_on_disk)} on disk = {summary.bytes_per_token:.1f} bytes/token; "
        f"{summary.wall_seconds:.1f} s ({m.tokens / max(summary.wall_seconds, 1e-9):,.0f} tokens/s)"
    )


def disk_usage(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


@app.command()
def info(
    cache: Annotated[Path, typer.Argument(help="Cache directory.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the manifest and sizes as JSON.")
    ] = False,
) -> None:
    """Describe a cache: teacher, tokenizer, data, targets, counts, size and bytes/token.

    Example: logitcache info ./cache --json | jq .teacher
    """
    c = reader.open(cache, allow_partial=True)
    m = c.manifest
    size = disk_usage(c.root)
    if as_json:
        doc = dataclasses.asdict(m) | {
            "size_bytes": size,
            "bytes_per_token": size / max(m.tokens, 1),
        }
        print(json.dumps(doc, indent=2))
        return
    state = "complete" if m.complete else "UNFINISHED (rerun the dump to finish)"
    rows = [
        ("cache", f"{c.root}  [{m.backend}, format {m.format_version}, {state}]"),
        ("teacher", f"{m.teacher.name}  ({m.teacher.dtype}, vocab {m.teacher.vocab_size}, weights {m.teacher.weights_sha256[:12]})"),
        ("tokenizer", f"{m.tokenizer.name}  (vocab {m.tokenizer.vocab_size}, fingerprint {m.tokenizer.fingerprint[:12]})"),
        ("data", f"{m.data.source}  ({m.data.format}, {m.data.documents} documents, fingerprint {m.data.fingerprint[:12]})"),
        ("targets", f"{m.targets.kind} k={m.targets.k}, T={m.targets.temperature}, ids {m.targets.id_dtype}, log-probs {m.targets.logprob_dtype}"),
        ("layout", f"seq_len {m.layout.seq_len}, {'packed' if m.layout.packing else 'one document per sequence'}, {m.layout.sequences_per_part} sequences/part"),
        ("codec", f"{m.codec.name}/{m.codec.cname} level {m.codec.clevel}, {m.codec.shuffle}, {m.codec.checksum}"),
        ("counts", f"{m.tokens:,} tokens, {m.sequences:,} sequences, {len(m.parts)} parts"),
        ("size", f"{human_bytes(size)} = {size / max(m.tokens, 1):.1f} bytes/token"),
    ]  # fmt: skip
    for key, value in rows:
        out.print(f"[bold]{key:>10}[/bold]  {escape(value)}", highlight=False, soft_wrap=True)


@app.command()
def verify(cache: Annotated[Path, typer.Argument(help="Cache directory.")]) -> None:
    """Read every chunk of a cache and check checksums and invariants; exit 2 naming what is wrong.

    Example: logitcache verify ./cache
    """
    from logitcache.verify import verify as run_verify

    c = reader.open(cache, allow_partial=True)
    report = run_verify(c)
    if not report.ok:
        raise CorruptCacheError(
            f"{cache} failed verification:\n"
            + "\n".join(f"  {p}" for p in report.problems)
            + "\nRe-dump the parts named above (delete the cache and rerun the dump), or restore them from a copy."
        )
    print(
        f"ok: {report.parts} parts, {report.files} files, {report.chunks} chunks, "
        f"{c.manifest.tokens:,} tokens checked"
    )


def main() -> None:
    run_app(app, "logitcache")


if __name__ == "__main__":
    main()
