"""`logitcache dump`: the flags of `DumpOptions`, whose defaults are the flags' defaults."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from logitcache.cli.common import LicenseOption, size_per_token
from logitcache.dumping.options import DumpOptions
from logitcache.errors import LogitCacheError

D = DumpOptions  # the defaults, in one place: DEFAULT_TARGETS and the rest, in options.py


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
        list[str] | None,
        typer.Option(
            help="Hugging Face causal LM, or masked LM (a config naming a *ForMaskedLM "
            "architecture: see --mask-prob): a local directory or a hub name. Give it two or "
            "more times for an ensemble (see --ensemble)."
        ),
    ] = None,
    ensemble: Annotated[
        str | None,
        typer.Option(
            help="With several --teacher: cache the targets of their average, logits (the "
            "weighted mean of their logits) or probs (of their probabilities at --temperature) "
            "[logits]."
        ),
    ] = D.ensemble,
    weights: Annotated[
        str | None,
        typer.Option(
            help="With several --teacher: their weights in the average, in their order, e.g. "
            "2,1 (scaled to sum to 1) [equal]."
        ),
    ] = None,
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
        str | None,
        typer.Option(
            help="sample: the distinct ids among --samples draws from the teacher and their "
            "counts (counts / N estimates the whole distribution without bias); topk: the k "
            f"most probable ids and their log-probs, fully supported (--targets topk --top-k "
            f"{D.top_k}); topp: per position the fewest most probable ids reaching --top-p, "
            "with their log-probs (few where the teacher is sure, more where it is not); "
            "full (--task classification, its default): every class's log-prob in float32. "
            f"Default {D.targets}, or the kind of the target options given; why: Choosing "
            "targets in README.md."
        ),
    ] = None,
    top_k: Annotated[
        int | None,
        typer.Option(help=f"Teacher ids kept per position (topk; implies it) [{D.top_k}]."),
    ] = None,
    top_p: Annotated[
        float | None,
        typer.Option(
            help="Probability mass each position's ids reach (topp; implies it), in (0, 1] "
            f"[{D.top_p}]."
        ),
    ] = None,
    max_k: Annotated[
        int | None,
        typer.Option(help=f"Most ids a position holds (topp; implies it) [{D.max_k}]."),
    ] = None,
    min_k: Annotated[
        int | None,
        typer.Option(help=f"Fewest ids a position holds (topp; implies it) [{D.min_k}]."),
    ] = None,
    samples: Annotated[
        int | None,
        typer.Option(
            help=f"Draws per position (sample), with replacement, on the device [{D.samples}]."
        ),
    ] = None,
    temperature: Annotated[
        float, typer.Option(help="Temperature of the stored (or sampled) distribution.")
    ] = D.temperature,
    seed: Annotated[
        int, typer.Option(help="Seed of the draws (sample); see docs/FORMAT.md, section 3a.")
    ] = D.seed,
    id_order: Annotated[
        str | None,
        typer.Option(
            help="topk or topp (implies topk): id (ids increasing within a position: a third smaller at "
            "k=64, see bench_storage in benchmarks/RESULTS.md) or descending (most probable "
            f"first). Readers get descending order back either way [{D.id_order}]."
        ),
    ] = None,
    delta: Annotated[
        bool,
        typer.Option(
            help="The layout before format 1.2: a delta filter on the ids (zarr: "
            "numcodecs.delta, NOT in the Zarr v3 spec: tensorstore and other readers refuse "
            "it) instead of storing sampled ids as gaps. Off by default: the default cache "
            "opens in every Zarr v3 reader (docs/FORMAT.md, section 5)."
        ),
    ] = D.delta,
    offsets: Annotated[
        bool,
        typer.Option(
            "--offsets",
            help="Also store each sequence's text and each token's character span in it "
            "(format 1.3), so that a student with another tokenizer can train from "
            "the cache: `trainer fit --loss uld --tokenizer STUDENT_TOK`.",
        ),
    ] = D.offsets,
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
            "causal LM with a plain linear head: 0 picks 512 on a CPU (the head's output stays in "
            "the caches), 256 MiB of float32 logits on a GPU; -1 makes every batch's full "
            "logits (a factory teacher always does)."
        ),
    ] = D.logits_chunk_tokens,
    batch_size: Annotated[int, typer.Option(help="Sequences per teacher forward.")] = D.batch_size,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = D.device,
    dtype: Annotated[
        str,
        typer.Option(
            help="Teacher weights, loaded directly in it: float32, bfloat16 or float16 (logits "
            "and targets are computed in float32 either way)."
        ),
    ] = D.dtype,
    device_map: Annotated[
        str | None,
        typer.Option(
            help="A teacher bigger than one GPU: accelerate places its layers over this "
            "machine's GPUs, then the CPU, then the disk (auto, balanced, sequential), or as a "
            'JSON file says ({module: GPU index, "cpu" or "disk"}). Needs accelerate. '
            "Layers run one after another, so a teacher that fits one GPU is faster under "
            "torchrun (docs/SCALING.md)."
        ),
    ] = D.device_map,
    max_memory: Annotated[
        str | None,
        typer.Option(
            help="With --device-map auto/balanced/sequential: the memory each device may hold, "
            "e.g. 0=70GiB,1=70GiB,cpu=200GiB (default: what is free)."
        ),
    ] = D.max_memory,
    attn: Annotated[
        str,
        typer.Option(
            help="Attention of a --teacher model: auto (sdpa where the model has it, else "
            "eager), sdpa, eager or flash_attention_2."
        ),
    ] = D.attn,
    format: Annotated[
        str, typer.Option(help="Storage backend: zarr (default) or parquet.")
    ] = D.backend,
    logprob_dtype: Annotated[
        str | None,
        typer.Option(
            help="Stored log-prob type (topk or topp; implies topk): float16, float32, or uint8 (1/16-nat "
            "steps, error at most 1/32 nat; 58 instead of 93 bytes/token at k=64 in "
            f"bench_storage) [{D.logprob_dtype}]."
        ),
    ] = None,
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
    writer_threads: Annotated[
        int,
        typer.Option(
            help="Threads that compress, write and hash parts, several parts at once (committed "
            "in order): more where the compressor is the bottleneck (--profile: 'queue full'). "
            "0: 1 beside a CPU teacher, up to 4 beside a GPU."
        ),
    ] = D.writer_threads,
    profile: Annotated[
        bool,
        typer.Option(
            help="Time every stage (input, forward, targets, copies, assembly, compression, "
            "commits; on a GPU the device's own time too) and print where the time went."
        ),
    ] = D.profile,
    mask_prob: Annotated[
        float | None,
        typer.Option(
            help="Masked-LM teachers: the probability that a position is masked (BERT's "
            "80/10/10: [MASK], a random id, unchanged), drawn from --seed; targets are stored "
            "at the masked positions only (docs/FORMAT.md, section 3e). Default 0.15 for a "
            "masked-LM --teacher; makes a --teacher-factory module a masked LM. Refused for a "
            "causal LM."
        ),
    ] = D.mask_prob,
    license: LicenseOption = D.license,
    shard: Annotated[
        str | None,
        typer.Option(
            help="I/N: dump only slice I of N (job I of N independent jobs, e.g. a SLURM "
            "array); join the N caches with `logitcache merge`. Under torchrun the ranks split "
            "the data by themselves."
        ),
    ] = D.shard,
    task: Annotated[
        str,
        typer.Option(
            help="lm: a causal LM over token sequences. classification: a classifier over "
            "examples (an image folder with one subfolder per class, a .npz of inputs and "
            "labels, or a Parquet/datasets table with an image column; for a text classifier, "
            "a saved AutoModelForSequenceClassification or a factory with --tokenizer, a "
            "table, .jsonl or .txt of texts, tokenized to --seq-len), one target row per "
            "example or per --views view; --targets full (the default there) stores every "
            "class's log-prob in float32 (docs/FORMAT.md, section 3b)."
        ),
    ] = D.task,
    views: Annotated[
        int,
        typer.Option(
            help="classification: seeded random resized crops per example, each stored with "
            "its box and flip so that training replays it (FKD); 0: the examples as they are. "
            "Masked-LM teachers: maskings per sequence, each its own target set (stored as "
            "consecutive sequences; `trainer fit` shows a student one view per epoch) [1]."
        ),
    ] = D.views,
    crop_scale: Annotated[
        str, typer.Option(help="--views: MIN,MAX area fraction of a crop.")
    ] = ",".join(map(str, D.crop_scale)),
    crop_ratio: Annotated[
        str, typer.Option(help="--views: MIN,MAX aspect ratio (width / height) of a crop.")
    ] = ",".join(map(repr, D.crop_ratio)),  # exact (3/4, 4/3): rounding would change manifests
    flip: Annotated[
        bool, typer.Option(help="--views: mirror each view with probability 1/2.")
    ] = D.flip,
    resize: Annotated[
        str | None,
        typer.Option(help="classification: HEIGHTxWIDTH to resize images of mixed sizes to."),
    ] = None,
    input_field: Annotated[
        str | None,
        typer.Option(
            help="classification tables (and .jsonl): the image, array or text column (default: "
            "image, or for a text classifier text)."
        ),
    ] = D.input_field,
    label_field: Annotated[
        str | None,
        typer.Option(help="classification tables: the class-id column (default: label)."),
    ] = D.label_field,
) -> None:
    """Run the teacher over a dataset once and write its soft targets (sampled, top-k or top-p).

    Rerunning the same command after an interruption resumes from the last committed part.

    Examples:

      logitcache dump --teacher ./gpt2-teacher --data ./corpus/ --out ./cache --seq-len 1024

      logitcache dump --teacher ./gpt2-teacher --data ./corpus/ --out ./cache --targets topk --top-k 64

      logitcache dump --teacher-factory mypkg.models:teacher --tokenizer ./tok --data docs.jsonl --text-field text --out ./cache

      logitcache dump --teacher ./gpt2-teacher --data ./corpus/ --out ./cache --targets sample --samples 32 --seed 1

      logitcache dump --teacher ./gpt2-teacher --data ./corpus/ --out ./cache --targets topp --top-p 0.95 --max-k 128

      logitcache dump --teacher ./gpt2-teacher --data ./corpus/ --out s3://bucket/caches/gpt2 --license cc-by-4.0

      torchrun --nproc-per-node 8 -m logitcache dump --teacher ./gpt2-teacher --data ./corpus/ --out ./cache

      logitcache dump --teacher ./gpt2-teacher --data ./corpus/ --out ./cache-3 --shard 3/16

      logitcache dump --teacher ./gpt2-teacher --data ./corpus/ --out ./cache --profile

      logitcache dump --teacher ./teacher-a --teacher ./teacher-b --weights 2,1 --ensemble probs --data ./corpus/ --out ./cache

      logitcache dump --teacher ./gpt2-teacher --data ./corpus/ --out ./cache --targets topk --offsets

      logitcache dump --teacher ./llama-70b --data ./corpus/ --out ./cache --device-map auto --max-memory 0=70GiB,1=70GiB --dtype bfloat16

      logitcache dump --task classification --teacher ./vit-classifier --data ./images/ --resize 224x224 --out ./cache

      logitcache dump --task classification --teacher-factory mypkg.models:cnn --data digits.npz --views 32 --crop-scale 0.5,1 --no-flip --out ./cache

      logitcache dump --task classification --teacher ./bert-classifier --data reviews.parquet --input-field text --seq-len 128 --out ./text-cache

      logitcache dump --task classification --teacher ./bert-a --teacher ./bert-b --ensemble probs --data reviews.parquet --seq-len 128 --out ./text-cache-ab

      logitcache dump --teacher ./bert-teacher --data ./corpus/ --out ./mlm-cache --seq-len 128 --targets topk --top-k 32 --mask-prob 0.15 --views 4
    """
    from logitcache.dumping.pipeline import dump as run_dump
    from logitcache.format.ensemble import parse_weights

    targets = target_kind(
        targets, {"--top-k": top_k, "--logprob-dtype": logprob_dtype, "--id-order": id_order,
                  "--samples": samples, "--top-p": top_p, "--max-k": max_k, "--min-k": min_k},
    )  # fmt: skip
    if task == "classification" and targets == D.targets and not (top_k or samples):
        targets = "full"  # nothing asked for: every class (exact at any temperature)
    top_k = D.top_k if top_k is None else top_k
    top_p = D.top_p if top_p is None else top_p
    max_k = D.max_k if max_k is None else max_k
    min_k = D.min_k if min_k is None else min_k
    samples = D.samples if samples is None else samples
    id_order = D.id_order if id_order is None else id_order
    logprob_dtype = D.logprob_dtype if logprob_dtype is None else logprob_dtype
    teachers = teacher or []
    summary = run_dump(
        DumpOptions(
            data=data, out=out_dir, teacher=teachers[0] if len(teachers) == 1 else None,
            teachers=teachers if len(teachers) > 1 else [], ensemble=ensemble,
            weights=None if weights is None else parse_weights(weights),
            teacher_factory=teacher_factory, tokenizer=tokenizer,
            trust_remote_code=trust_remote_code, data_format=data_format, text_field=text_field,
            ids_field=ids_field, targets=targets, top_k=top_k, top_p=top_p, max_k=max_k,
            min_k=min_k, samples=samples, temperature=temperature, seed=seed,
            id_order=id_order, delta=delta, offsets=offsets, seq_len=seq_len,
            logits_chunk_tokens=logits_chunk_tokens,
            pack=pack, batch_size=batch_size,
            device=device, dtype=dtype, device_map=device_map, max_memory=max_memory, attn=attn,
            backend=format, logprob_dtype=logprob_dtype,
            part_tokens=part_tokens, clevel=clevel, shuffle=shuffle, overwrite=overwrite, progress=progress,
            writer_threads=writer_threads, profile=profile,
            license=license, shard=shard, task=task, views=views,
            crop_scale=pair(crop_scale, "--crop-scale", float),
            crop_ratio=pair(crop_ratio, "--crop-ratio", float),
            flip=flip, resize=None if resize is None else pair(resize, "--resize", int, "x"),
            input_field=input_field, label_field=label_field,
            mask_prob=mask_prob,
        )
    )  # fmt: skip
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports for the job
        return
    m = summary.manifest
    resumed = (
        f" (resumed after {summary.resumed_parts} committed parts)" if summary.resumed_parts else ""
    )
    if summary.placement is not None:  # where accelerate put the teacher, for the record
        where = ", ".join(
            f"{n} module{'' if n == 1 else 's'} on {device}"
            for device, n in summary.placement.items()
        )
        print(f"teacher placed by --device-map {device_map}: {where}")
    if m.task is not None:
        print(
            f"wrote {out_dir}{resumed}: {m.sequences:,} examples, {m.tokens:,} target rows "
            f"({max(1, m.task.views)} per example), {m.teacher.vocab_size} classes, "
            f"{summary.bytes_on_disk / max(m.sequences, 1):,.1f} bytes per example on disk; "
            f"{summary.wall_seconds:.1f} s"
        )
        return
    print(
        f"wrote {out_dir}{resumed}: {m.tokens:,} tokens in {m.sequences:,} sequences, {len(m.parts)} parts; "
        f"{size_per_token(summary.bytes_on_disk, m.tokens)} on disk; "
        f"{summary.wall_seconds:.1f} s ({m.tokens / max(summary.wall_seconds, 1e-9):,.0f} tokens/s); "
        f"{summary.logits}"
    )
    if m.masking is not None:  # targets at the masked positions only: their own rate
        print(
            f"masked LM: {m.masked:,} masked positions ({m.masked / m.tokens:.1%} of tokens, "
            f"{m.masking.views} view{'' if m.masking.views == 1 else 's'} per sequence); "
            f"{summary.bytes_on_disk / max(m.masked, 1):.1f} bytes per masked token"
        )
    if summary.profile is not None:
        from logitcache.dumping.profile import render

        print(render(summary.profile))


def pair(text: str, flag: str, kind: type, sep: str = ",") -> tuple:
    """'A,B' (or 'AxB') as a pair of `kind`, or a one-line error naming the flag."""
    pieces = text.lower().split(sep)
    try:
        if len(pieces) != 2:
            raise ValueError
        return kind(pieces[0]), kind(pieces[1])
    except ValueError:
        example = "224x224" if sep == "x" else "0.5,1"
        raise LogitCacheError(f"{flag} {text!r} is not two numbers like {example}.") from None


#: The target kinds each kind-specific option of `dump` applies to; the first is the kind it
#: implies when --targets is not given.
FLAG_KINDS = {
    "--top-k": ("topk",),
    "--logprob-dtype": ("topk", "topp"),
    "--id-order": ("topk", "topp"),
    "--samples": ("sample",),
    "--top-p": ("topp",),
    "--max-k": ("topp",),
    "--min-k": ("topp",),
}


def target_kind(targets: str | None, flags: dict[str, object]) -> str:
    """The target kind a command line asks for, from --targets and the kind-specific options
    given (`flags`: {flag: value, None where not given}). An option implies its kind (an old
    ``dump --top-k 64`` still writes top-k targets, not silently a sampled cache), and options
    that do not apply to the kind ``--targets`` names are refused rather than ignored."""
    given = [flag for flag, value in flags.items() if value is not None]
    if targets is None:
        if not given:
            return D.targets
        kinds = [k for k in FLAG_KINDS[given[0]] if all(k in FLAG_KINDS[f] for f in given)]
        if not kinds:
            raise LogitCacheError(
                f"{', '.join(given)} are options of different target kinds; choose one with "
                "--targets topk, --targets topp or --targets sample."
            )
        return kinds[0]
    if targets not in {kind for kinds in FLAG_KINDS.values() for kind in kinds}:
        return targets  # "full", or a kind that does not exist: DumpOptions' check names them
    other = [flag for flag in given if targets not in FLAG_KINDS[flag]]
    if other:
        kinds = sorted({k for flag in other for k in FLAG_KINDS[flag]})
        raise LogitCacheError(
            f"{', '.join(other)} does not apply to --targets {targets}; drop it, or choose "
            f"--targets {' or '.join(kinds)}."
        )
    return targets
