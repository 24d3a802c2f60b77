"""The Parquet backend of the cache: one file per part, one row per sequence, readable by
`pyarrow.dataset` and `datasets.load_dataset("parquet", ...)` as is. The only module of the
storage side that imports pyarrow (Parquet *input* data is read by `logitcache.dumping.arrow_input`).

A row holds everything of its sequence, so a reader without this package needs no offsets: a
masked-LM sequence's target rows and their positions *within the sequence* (format 1.3,
docs/FORMAT.md section 6), an ``--offsets`` sequence's text as a string and its tokens' spans.
A classification part (format 1.3) has a row per example: no input ids, its label once (the
same on each of its views), a target row and a view box per view.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from logitcache.errors import LogitCacheError
from logitcache.format.manifest import CodecInfo, PartArrays, PartInfo

SUFFIX = ".parquet"
#: The target columns: a list per sequence of one entry per target row (a token, or in a
#: masked-LM cache a masked position), each a fixed-size list (top-k) or a list (ragged kinds).
TARGET_COLUMNS = ("target_ids", "target_logprobs", "target_counts")
#: Arrays that are not a column of their own (list offsets of another column), or whose stored
#: values a reader derives from the whole row (masked positions are stored within a sequence,
#: a classification example's label once for all its rows).
_DERIVED = ("seq_offsets", "target_lengths", "text_offsets", "text", "target_positions", "labels")


def _per_token(values: np.ndarray, offsets: np.ndarray, lengths=None) -> pa.Array:
    """A list-per-sequence column over `values` whose first axis is tokens; with `lengths`
    (tokens,), `values` is ragged (entries,) and each token holds a list of its entries."""
    flat = pa.array(values.reshape(-1))
    if lengths is not None:
        inner = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)
        flat = pa.ListArray.from_arrays(pa.array(inner), flat)
    elif values.ndim == 2:
        flat = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), flat)


def write_part(path: Path, arrays: PartArrays, codec: CodecInfo, chunk_bytes: int) -> None:
    """Write one part as a Parquet file: zstd, 1 MB pages, page checksums, no statistics."""
    rows = _target_row_offsets(arrays)
    lengths = arrays.target_lengths
    columns = _input_columns(arrays)
    # top-k: a fixed-size list of k per target row; sampled and top-p: a list per row of its
    # ids and one of their counts or log-probs
    for name in TARGET_COLUMNS:
        if getattr(arrays, name) is not None:
            columns[name] = _per_token(getattr(arrays, name), rows, lengths)
    columns |= _masked_columns(arrays, rows) | _text_columns(arrays) | _view_columns(arrays)
    table = pa.table(columns)
    encodings = {_leaf(table, n): "DELTA_BINARY_PACKED" for n in codec.delta if n in columns}
    pq.write_table(
        table,
        str(path),
        compression="zstd",
        compression_level=codec.clevel,
        data_page_size=chunk_bytes,
        use_dictionary=False,
        write_statistics=False,
        write_page_checksum=True,
        column_encoding=encodings or None,
    )


def _target_row_offsets(arrays: PartArrays) -> np.ndarray:
    """(S + 1,) where each sequence's target rows begin: its tokens, or in a masked-LM part
    the rows whose positions fall in it."""
    offsets = np.asarray(arrays.seq_offsets, dtype=np.int64)
    if arrays.target_positions is None:
        return offsets
    return np.searchsorted(np.asarray(arrays.target_positions, dtype=np.int64), offsets)


def _input_columns(arrays: PartArrays) -> dict[str, pa.Array]:
    """What a row's targets are of: a causal or masked LM's input ids, or a classification
    example's label (1.3), one value per row, absent where the data had none."""
    offsets = np.asarray(arrays.seq_offsets, dtype=np.int64)
    if arrays.input_ids is not None:
        return {"input_ids": _per_token(np.asarray(arrays.input_ids), offsets)}
    if arrays.labels is None:
        return {}
    labels = np.asarray(arrays.labels)
    per_example = labels[offsets[:-1]]
    wrong = np.repeat(per_example, np.diff(offsets)) != labels  # (rows,)
    if wrong.any():
        example = int(np.searchsorted(offsets, int(np.argmax(wrong)), side="right")) - 1
        raise LogitCacheError(
            f"example {example} of a part has views that carry different labels; a "
            "classification cache holds one label per example (docs/FORMAT.md section 3b), and "
            "a Parquet part stores it once. Run `logitcache verify` on the source cache."
        )
    return {"labels": pa.array(per_example)}


def _view_columns(arrays: PartArrays) -> dict[str, pa.Array]:
    """A classification part's view boxes (1.3), one (top, left, height, width, flip) per row."""
    if arrays.views is None:
        return {}
    return {"views": _per_token(np.asarray(arrays.views), np.asarray(arrays.seq_offsets))}


def _masked_columns(arrays: PartArrays, rows: np.ndarray) -> dict[str, pa.Array]:
    """A masked-LM part's positions, within their sequence, and labels (format 1.3)."""
    if arrays.target_positions is None:
        return {}
    owner = np.repeat(np.arange(arrays.sequences), np.diff(rows))  # (M,) sequence of each row
    start = np.asarray(arrays.seq_offsets, dtype=np.int64)[owner]
    within = (np.asarray(arrays.target_positions, dtype=np.int64) - start).astype(np.uint32)
    return {
        "target_positions": _per_token(within, rows),
        "target_labels": _per_token(np.asarray(arrays.target_labels), rows),
    }


def _text_columns(arrays: PartArrays) -> dict[str, pa.Array]:
    """An ``--offsets`` part's text, one string per sequence (its bytes are the part's text
    array, its offsets `text_offsets`), and each token's character span (format 1.3)."""
    if arrays.text is None:
        return {}
    starts = np.asarray(arrays.text_offsets, dtype=np.int64)
    data = np.ascontiguousarray(arrays.text, dtype=np.uint8)
    buffers = [None, pa.py_buffer(starts.astype(np.int32)), pa.py_buffer(data)]
    text = pa.Array.from_buffers(pa.string(), arrays.sequences, buffers)
    text.validate(full=True)  # each sequence's bytes UTF-8 on their own (FORMAT.md 3d)
    offsets = np.asarray(arrays.seq_offsets)
    return {"text": text, "token_offsets": _per_token(np.asarray(arrays.token_offsets), offsets)}


def write_sequences(
    path: Path, columns: dict[str, np.ndarray], offsets: np.ndarray, clevel: int
) -> None:
    """Write token-axis arrays as a Parquet file of one row per sequence (``offsets`` (S + 1,)
    delimit the sequences; a (tokens, k) array becomes a list of fixed-size lists): zstd, page
    checksums, no statistics, like a part. For the datasets that `export --format axolotl`
    writes, which are not caches but share this module so pyarrow stays imported in one place
    on the storage side."""
    table = pa.table({name: _per_token(values, offsets) for name, values in columns.items()})
    pq.write_table(
        table,
        str(path),
        compression="zstd",
        compression_level=clevel,
        use_dictionary=False,
        write_statistics=False,
        write_page_checksum=True,
    )


def _leaf(table: pa.Table, name: str) -> str:
    """The Parquet path of a column's values (`column_encoding` applies to leaves)."""
    depth = str(table.schema.field(name).type).count("list")
    return ".".join([name] + ["list.element"] * depth)


def check_part(
    path: Path, expected: dict[str, tuple[tuple[int, ...], str]], listed: set[str]
) -> None:
    """Check a part file's footer against the manifest before any data page is read: the
    row count, the exact Arrow schema (types and k), and the declared uncompressed size."""
    del listed  # a parquet part is one file
    file = pq.ParquetFile(str(path))
    meta = file.metadata
    sequences = expected["seq_offsets"][0][0] - 1
    if meta.num_rows != sequences:
        raise ValueError(f"the file holds {meta.num_rows} rows, the manifest says {sequences}")
    columns = []  # list-per-sequence columns; the text and a classification label, one a row
    ragged = "target_lengths" in expected  # sampled, top-p: the lengths are list offsets
    for name, (shape, dtype) in expected.items():
        if name in ("seq_offsets", "target_lengths", "text_offsets"):
            continue
        value = pa.from_numpy_dtype(np.dtype(dtype))
        if name in ("text", "labels"):  # a string, and a classification example's one label
            columns.append((name, pa.string() if name == "text" else value))
            continue
        if ragged and name in TARGET_COLUMNS:
            value = pa.list_(value)
        elif len(shape) == 2:
            value = pa.list_(value, shape[1])
        columns.append((name, pa.list_(value)))
    want = pa.schema(columns)
    if not file.schema_arrow.equals(want):
        raise ValueError(f"the file's schema is not {want}".replace("\n", ", "))
    decoded = sum(np.dtype(dtype).itemsize * math.prod(shape) for shape, dtype in expected.values())
    declared = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if declared > 4 * decoded + (1 << 20):  # values plus offsets and levels
        raise ValueError(f"the file declares {declared} uncompressed bytes, {decoded} decoded")


def read_part(path: Path, names: tuple[str, ...] | None = None) -> PartArrays:
    """Read a whole part, verifying page checksums, back into the flat token-axis layout.
    Ragged parts (sampled and top-p: a variable-length list of ids per token; the reader
    checked the schema against the manifest first) come back ragged, their per-token entry
    counts (`target_lengths`) taken from the inner list offsets, as int32: Parquet stores no
    type for them (the reader casts them to the manifest's). A classification part's rows are
    its target rows, its label repeated on each. `names` is accepted for symmetry with the
    zarr backend: a Parquet part is one file, read whole."""
    del names
    table = pq.ParquetFile(str(path), page_checksum_verification=True).read()
    classified = "input_ids" not in table.column_names  # format 1.3: rows are views
    offsets = _list_offsets(table.column("target_ids" if classified else "input_ids"))
    inputs = None if classified else _tokens_of(table.column("input_ids"))
    ids = _tokens_of(table.column("target_ids"))
    found = {n: _tokens_of(table.column(n)) for n in ("target_logprobs", "target_counts")
             if n in table.column_names}  # fmt: skip
    per_token = table.column("target_ids").combine_chunks().flatten()  # a list per target row
    if isinstance(per_token.type, pa.FixedSizeListType):  # top-k
        arrays = PartArrays(inputs, ids, found["target_logprobs"], offsets)
    else:
        lengths = per_token.value_lengths().to_numpy(zero_copy_only=False)
        arrays = PartArrays(
            inputs, ids, found.get("target_logprobs"), offsets, found.get("target_counts"), lengths
        )
    if "target_positions" in table.column_names:
        _read_masked(table, arrays)
    if "text" in table.column_names:
        _read_text(table, arrays)
    if classified:
        _read_classified(table, arrays)
    return arrays


def _read_classified(table: pa.Table, arrays: PartArrays) -> None:
    """Set a classification part's `labels` (each example's, on each of its rows) and `views`;
    a views column with another number of rows than the targets is refused."""
    if "labels" in table.column_names:
        per_example = table.column("labels").combine_chunks().to_numpy(zero_copy_only=False)
        arrays.labels = np.repeat(per_example, np.diff(arrays.seq_offsets))
    if "views" in table.column_names:
        if not np.array_equal(_list_offsets(table.column("views")), arrays.seq_offsets):
            raise ValueError("an example's views are not one per target row")
        arrays.views = _tokens_of(table.column("views"))


def _list_offsets(column: pa.ChunkedArray) -> np.ndarray:
    """(rows + 1,) int64 offsets of a list (or string) column, from 0."""
    offsets = column.combine_chunks().offsets.to_numpy().astype(np.int64)
    return offsets - offsets[0]


def _read_masked(table: pa.Table, arrays: PartArrays) -> None:
    """Set a masked-LM part's `target_positions` (back on the part's token axis) and
    `target_labels`; a position outside its sequence, or a sequence whose target columns have
    another number of rows than its positions, is refused (either would move rows)."""
    rows = _list_offsets(table.column("target_positions"))
    for name in ("target_labels", "target_ids"):
        if not np.array_equal(_list_offsets(table.column(name)), rows):
            raise ValueError(f"a sequence's {name} are not one per masked position")
    within = _tokens_of(table.column("target_positions")).astype(np.int64)
    owner = np.repeat(np.arange(len(rows) - 1), np.diff(rows))
    start, lengths = arrays.seq_offsets[:-1], np.diff(arrays.seq_offsets)
    if (within >= lengths[owner]).any():
        raise ValueError("a target position is not inside its sequence")
    arrays.target_positions = (start[owner] + within).astype(np.uint32)
    arrays.target_labels = _tokens_of(table.column("target_labels"))


def _read_text(table: pa.Table, arrays: PartArrays) -> None:
    """Set an ``--offsets`` part's `text` (UTF-8 bytes end to end), `text_offsets` and
    `token_offsets` from its string and span columns."""
    text = table.column("text").combine_chunks()
    _, starts, data = text.buffers()  # validity, int32 offsets, UTF-8 (None if all are empty)
    starts = np.frombuffer(starts, dtype=np.int32)[text.offset : text.offset + len(text) + 1]
    starts = starts.astype(np.int64)
    data = np.zeros(0, np.uint8) if data is None else np.frombuffer(data, dtype=np.uint8)
    arrays.text = data[starts[0] : starts[-1]].copy()
    arrays.text_offsets = starts - starts[0]
    arrays.token_offsets = _tokens_of(table.column("token_offsets"))


def _tokens_of(column: pa.ChunkedArray) -> np.ndarray:
    """A list-per-sequence column flattened back to a (tokens,) or (tokens, k) array, or for a
    variable-length list per token, to its (entries,) values."""
    values = column.combine_chunks().flatten()
    if isinstance(values.type, pa.FixedSizeListType):
        return values.flatten().to_numpy(zero_copy_only=False).reshape(-1, values.type.list_size)
    if isinstance(values.type, pa.ListType):
        return values.flatten().to_numpy(zero_copy_only=False)
    return values.to_numpy(zero_copy_only=False)


def read_rows(path: Path, name: str, start: int, stop: int) -> np.ndarray:
    """Rows `start:stop` of one array (reads the whole part: parts are row groups)."""
    return getattr(read_part(path), name)[start:stop]


def iter_chunks(path: Path, name: str) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (row group index, data) for one column; page checksums are checked."""
    if name in _DERIVED:
        yield 0, getattr(read_part(path), name)
        return
    file = pq.ParquetFile(str(path), page_checksum_verification=True)
    for index in range(file.num_row_groups):
        yield index, _tokens_of(file.read_row_group(index, columns=[name]).column(name))


def file_problems(base: Path, part: PartInfo) -> list[tuple[str, str]]:
    """None to report: a part is one file whose footer `check_part` already reads."""
    del base, part
    return []


def array_bytes(base: Path, part: PartInfo) -> dict[str, int]:
    """On-disk bytes by column (its compressed chunks), the footer and page headers as
    "parquet metadata"."""
    path = base / f"{part.name}{SUFFIX}"
    meta = pq.ParquetFile(str(path)).metadata
    sizes: dict[str, int] = {}
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            column = group.column(c)
            name = column.path_in_schema.split(".")[0]
            sizes[name] = sizes.get(name, 0) + column.total_compressed_size
    sizes["parquet metadata"] = path.stat().st_size - sum(sizes.values())
    return sizes
