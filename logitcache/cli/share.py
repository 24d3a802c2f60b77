"""`logitcache merge` and `export`: make a new cache from existing ones."""

from __future__ import annotations

from typing import Annotated

import typer

from logitcache.cli.common import CacheDirOption, LicenseOption, cache_counts
from logitcache.errors import LogitCacheError
from logitcache.format.card import DEFAULT_LICENSE
from logitcache.format.manifest import BACKENDS


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
    license: LicenseOption = DEFAULT_LICENSE,
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
        f"wrote {out_dir}: {len(inputs)} caches merged ({how}), {cache_counts(m)}, "
        f"{len(m.parts)} parts"
    )


def ensemble(
    out_dir: Annotated[str, typer.Argument(metavar="OUT", help="New cache directory or URL.")],
    inputs: Annotated[
        list[str],
        typer.Argument(
            metavar="CACHE...", help="Caches of the teachers, each dumped from the same data."
        ),
    ],
    mode: Annotated[
        str,
        typer.Option(
            help="logits: the weighted mean of the teachers' logits (exact for caches of every "
            "id, --top-k = vocabulary; refused otherwise); probs: of their probabilities "
            "(top-k: the union of the stored ids, within the bound of docs/FORMAT.md section "
            "3c; sampled: their draws pooled)."
        ),
    ],
    weights: Annotated[
        str | None,
        typer.Option(
            help="The caches' weights, in their order, e.g. 2,1 (scaled to sum to 1) [equal]. "
            "Sampled caches weigh their draws: leave it out with equal --samples."
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing cache at OUT.")] = False,
    license: LicenseOption = DEFAULT_LICENSE,
    cache_dir: CacheDirOption = None,
) -> None:
    """Combine caches that several teachers dumped separately over the same data into the
    cache of their average (an ensemble; one pass instead: dump --teacher A --teacher B).

    The caches must hold the same input ids from the same tokenizer, with targets of one kind
    and temperature. Interrupted? Rerun the same command: it resumes.

    Examples:

      logitcache ensemble ./cache-ab ./cache-a ./cache-b --mode probs

      logitcache ensemble ./cache-ab ./cache-a-full ./cache-b-full --mode logits --weights 2,1
    """
    from logitcache.format.ensemble import parse_weights
    from logitcache.write.ensemble import ensemble as run_ensemble

    m = run_ensemble(
        out_dir, inputs, mode=mode, weights=None if weights is None else parse_weights(weights),
        overwrite=overwrite, license=license, cache_dir=cache_dir,
    )  # fmt: skip
    shares = ", ".join(f"{member.weight:.3g}" for member in m.ensemble.members)
    print(
        f"wrote {out_dir}: the {mode} average of {len(inputs)} caches (weights {shares}), "
        f"{cache_counts(m)}, {len(m.parts)} parts, {m.targets.kind} k={m.targets.k}"
    )


def export(
    cache: Annotated[str, typer.Argument(help="Cache directory or URL to read.")],
    out_dir: Annotated[str, typer.Argument(metavar="OUT", help="Cache directory or URL to write.")],
    format: Annotated[
        str,
        typer.Option(
            help="parquet or zarr: a cache with that backend. axolotl: a dataset with axolotl's "
            "KD fields (a local directory; examples/axolotl_export.md)."
        ),
    ],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing cache at OUT.")] = False,
    temperature: Annotated[
        float | None,
        typer.Option(
            help="--format axolotl only: the temperature of the written log-probs (default: the "
            "cache's; set axolotl's kd_temperature to it)."
        ),
    ] = None,
    license: LicenseOption = DEFAULT_LICENSE,
    cache_dir: CacheDirOption = None,
) -> None:
    """Convert a cache to the other backend (or copy it between a directory and a URL), or
    write it as a dataset for axolotl's knowledge-distillation trainer.

    The Parquet output loads as is with pyarrow.dataset or datasets.load_dataset("parquet").
    Interrupted? Rerun the same command: it resumes (an axolotl export starts over).

    Examples:

      logitcache export ./cache ./cache-parquet --format parquet

      logitcache export ./cache s3://bucket/cache --format zarr

      logitcache export ./cache ./cache-axolotl --format axolotl
    """
    from logitcache.write.axolotl import FORMAT as AXOLOTL

    if format == AXOLOTL:
        from logitcache.write.axolotl import export_axolotl

        a = export_axolotl(
            cache, out_dir, overwrite=overwrite, temperature=temperature, license=license,
            cache_dir=cache_dir,
        )  # fmt: skip
        print(
            f"wrote {out_dir} ({format}): {a.tokens:,} tokens in {a.sequences:,} sequences, "
            f"{len(a.files)} Parquet files, k={a.k}, temperature {a.temperature:g}"
        )
        return
    if temperature is not None:
        raise LogitCacheError(
            f"--temperature applies to --format {AXOLOTL} only: a {format} export copies the "
            "cache's targets as they are."
        )
    if format not in BACKENDS:
        raise LogitCacheError(
            f"unknown format {format!r}; choose one of: {', '.join((*BACKENDS, AXOLOTL))}."
        )
    from logitcache.write.export import export as run_export

    m = run_export(
        cache, out_dir, backend=format, overwrite=overwrite, license=license, cache_dir=cache_dir
    )
    print(f"wrote {out_dir} ({format}): {cache_counts(m)}, {len(m.parts)} parts")
