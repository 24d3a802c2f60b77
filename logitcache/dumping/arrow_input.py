"""Reading Parquet input data for `dump` (`--data FILE.parquet`): the dump's input, not cache
storage (that is `logitcache.storage.parquet_backend`). A damaged or non-Parquet file is a user
error with a clear message, never a crash.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from logitcache.errors import LogitCacheError

__all__ = ["iter_parquet_column", "parquet_rows"]


def _unreadable(path: Path, exc: Exception) -> LogitCacheError:
    return LogitCacheError(f"{path} is not a readable Parquet file ({exc}).")


def _open_input(path: Path) -> pq.ParquetFile:
    """An input Parquet file; a corrupt or non-Parquet file is a user error, not a crash."""
    try:
        return pq.ParquetFile(str(path))
    except (OSError, pa.ArrowException) as exc:
        raise _unreadable(path, exc) from exc


def parquet_rows(path: Path) -> int:
    """Row count from the footer, without reading data (used for progress totals)."""
    return _open_input(path).metadata.num_rows


def iter_parquet_column(path: Path, field: str) -> Iterator[object]:
    """Yield one column's values row by row, a record batch at a time (bounded memory)."""
    file = _open_input(path)
    if field not in file.schema_arrow.names:
        raise LogitCacheError(
            f"{path} has no column {field!r} (columns: {', '.join(file.schema_arrow.names)}). "
            "Pass the right one with --text-field."
        )
    batches = file.iter_batches(columns=[field], batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
        except (OSError, pa.ArrowException) as exc:  # a damaged page inside a valid file
            raise _unreadable(path, exc) from exc
        if batch is None:
            return
        yield from batch.column(0).to_pylist()
