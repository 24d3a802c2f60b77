"""`logitcache merge` and `export`: make a new cache from existing ones."""

from __future__ import annotations

from typing import Annotated

import typer

from logitcache.cli.common import CacheDirOption, LicenseOption
from logitcache.format.card import DEFAULT_LICENSE


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
        f"wrote {out_dir}: {len(inputs)} caches merged ({how}), {m.tokens:,} tokens in "
        f"{m.sequences:,} sequences, {len(m.parts)} parts"
    )


def export(
    cache: Annotated[str, typer.Argument(help="Cache directory or URL to read.")],
    out_dir: Annotated[str, typer.Argument(metavar="OUT", help="Cache directory or URL to write.")],
    format: Annotated[str, typer.Option(help="Backend of the output: parquet or zarr.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing cache at OUT.")] = False,
    license: LicenseOption = DEFAULT_LICENSE,
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
