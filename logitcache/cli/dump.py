"""`logitcache dump`: the flags of `DumpOptions`, whose defaults are the flags' defaults."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from logitcache.cli.common import LicenseOption, size_per_token
from logitcache.dumping.options import DumpOptions

D = DumpOptions  # the defaults, in one place: DumpOptions.top_k is 32, and so on


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
    ] = D.teacher,
    teacher_factory: Annotated[
        str | None,
        typer.Option(help="MODULE:FUNCTION returning a torch module that maps ids to logits."),
    ] = D.teacher_factory,
    tokenizer: Annotated[
        str | None,
        typer.Option(help="Tokenizer directory or tokenizer.json (default: the teacher's)."),
    ] = D.tokenizer,
    trust_remote_code: Annotated[
        bool, typer.Option(help="Allow a hub model's own Python code to run.")
    ] = D.trust_remote_code,
    data_format: Annotated[
        str, typer.Option(help="auto, text, jsonl, parquet, arrow or npy.")
    ] = D.data_format,
    text_field: Annotated[
        str | None, typer.Option(help="Field holding the text (JSON Lines, Parquet, datasets).")
    ] = D.text_field,
    ids_field: Annotated[
        str | None, typer.Option(help="Field holding already-tokenized ids instead of text.")
    ] = D.ids_field,
    targets: Annotated[
        str,
        typer.Option(
            help="topk: the k most probable ids and their log-probs; sample: the distinct ids "
            "among --samples draws from the teacher and their counts."
        ),
    ] = D.targets,
    top_k: Annotated[
        int,
        typer.Option(
            help="Teacher ids kept per position (topk). 32: the smallest k whose students came "
            "within 1% of online KD in bench_fidelity (benchmarks/RESULTS.md)."
        ),
    ] = D.top_k,
    samples: Annotated[
        int, typer.Option(help="Draws per position (sample), with replacement, on the device.")
    ] = D.samples,
    temperature: Annotated[
        float, typer.Option(help="Temperature of the stored (or sampled) distribution.")
    ] = D.temperature,
    seed: Annotated[
        int, typer.Option(help="Seed of the draws (sample); see docs/FORMAT.md, section 3a.")
    ] = D.seed,
    id_order: Annotated[
        str,
        typer.Option(
            help="topk: id (ids increasing within a position: a third smaller at k=64, see "
            "bench_storage in benchmarks/RESULTS.md) or descending (most probable first). "
            "Readers get descending order back either way."
        ),
    ] = D.id_order,
    delta: Annotated[
        bool,
        typer.Option(help="Delta-filter the arrays that increase along a position (smaller)."),
    ] = D.delta,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = D.seq_len,
    pack: Annotated[
        bool,
        typer.Option(
            help="Join documents with EOS and cut into --seq-len sequences; --no-pack keeps one truncated sequence per document."
        ),
    ] = D.pack,
    logits_chunk_tokens: Annotated[
        int,
        typer.Option(
            help="Positions whose logits are made at once, from the final hidden states of a "
            "causal LM with a plain linear head: 0 picks 256 MiB of float32 logits; -1 makes "
            "every batch's full logits (a factory teacher always does)."
        ),
    ] = D.logits_chunk_tokens,
    batch_size: Annotated[int, typer.Option(help="Sequences per teacher forward.")] = D.batch_size,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = D.device,
    dtype: Annotated[
        str, typer.Option(help="Teacher weights: float32, bfloat16 or float16.")
    ] = D.dtype,
    format: Annotated[
        str, typer.Option(help="Storage backend: zarr (default) or parquet.")
    ] = D.backend,
    logprob_dtype: Annotated[
        str,
        typer.Option(
            help="Stored log-prob type: float16, float32, or uint8 (1/16-nat steps, error at "
            "most 1/32 nat; 58 instead of 93 bytes/token at k=64 in bench_storage)."
        ),
    ] = D.logprob_dtype,
    part_tokens: Annotated[
        int, typer.Option(help="Tokens per part, the unit of commit and resume.")
    ] = D.part_tokens,
    clevel: Annotated[int, typer.Option(help="zstd compression level.")] = D.clevel,
    shuffle: Annotated[
        str,
        typer.Option(help="Blosc shuffle before zstd: shuffle (bytes), bitshuffle or noshuffle."),
    ] = D.shuffle,
    overwrite: Annotated[
        bool, typer.Option(help="Delete an existing cache at --out and start over.")
    ] = D.overwrite,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = D.progress,
    license: LicenseOption = D.license,
    shard: Annotated[
        str | None,
        typer.Option(
            help="I/N: dump only slice I of N (job I of N independent jobs, e.g. a SLURM "
            "array); join the N caches with `logitcache merge`. Under torchrun the ranks split "
            "the data by themselves."
        ),
    ] = D.shard,
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
    from logitcache.dumping.pipeline import dump as run_dump

    summary = run_dump(
        DumpOptions(
            data=data, out=out_dir, teacher=teacher, teacher_factory=teacher_factory, tokenizer=tokenizer,
            trust_remote_code=trust_remote_code, data_format=data_format, text_field=text_field,
            ids_field=ids_field, targets=targets, top_k=top_k, samples=samples,
            temperature=temperature, seed=seed, id_order=id_order, delta=delta, seq_len=seq_len,
            logits_chunk_tokens=logits_chunk_tokens,
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
        f"{summary.wall_seconds:.1f} s ({m.tokens / max(summary.wall_seconds, 1e-9):,.0f} tokens/s); "
        f"{summary.logits}"
    )
