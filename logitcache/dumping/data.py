"""Input data for `dump`: find documents, tokenize them, pack them into sequences.

Documents come from plain text files (one per file), JSON Lines or Parquet with a text field, a
`datasets` directory saved with `save_to_disk`, or already-tokenized ids (a Parquet column of int
lists with `ids_field`, or a 2-D NumPy `.npy` array, one row per document). Everything streams:
memory does not grow with the dataset.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from logitcache.errors import LogitCacheError
from logitcache.format.manifest import PartArrays

FORMATS = ("auto", "text", "jsonl", "parquet", "arrow", "npy")
_BY_SUFFIX = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".npy": "npy"}


@dataclass(frozen=True)
class DataSource:
    """Resolved input: the files (sorted), their format, and which field holds the text or ids."""

    spec: str
    files: tuple[Path, ...]
    format: str
    text_field: str | None = None
    ids_field: str | None = None

    @property
    def pretokenized(self) -> bool:
        return self.format == "npy" or self.ids_field is not None


def resolve(
    spec: str, fmt: str = "auto", text_field: str | None = None, ids_field: str | None = None
) -> DataSource:
    """Find the files of `spec` (a file, a directory or a glob) and decide their format."""
    if fmt not in FORMATS:
        raise LogitCacheError(
            f"unknown --data-format {fmt!r}; choose one of: {', '.join(FORMATS)}."
        )
    path = Path(spec)
    if (path.is_dir() and (path / "dataset_info.json").is_file()) or fmt == "arrow":
        return DataSource(spec, (path,), "arrow", text_field or "text", ids_field)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise LogitCacheError(f"--data {spec}: no such file, directory or matching glob.")
    if not files:
        raise LogitCacheError(f"--data {spec} is an empty directory: there is nothing to dump.")
    if fmt == "auto":
        found = {_BY_SUFFIX.get(f.suffix.lower(), "text") for f in files}
        if len(found) > 1:
            raise LogitCacheError(
                f"--data {spec} mixes formats ({', '.join(sorted(found))}); pass files of one format "
                "or choose with --data-format."
            )
        fmt = found.pop()
    if fmt in ("jsonl", "parquet") and text_field is None and ids_field is None:
        raise LogitCacheError(
            f"--data {spec} is {fmt}: say which field holds the text with --text-field."
        )
    return DataSource(spec, tuple(files), fmt, text_field, ids_field)


def fingerprint(source: DataSource) -> str:
    """sha256 over every input file's name (relative to the spec) and bytes, and the fields read."""
    digest = hashlib.sha256(
        json.dumps([source.format, source.text_field, source.ids_field]).encode()
    )
    base = Path(source.spec) if Path(source.spec).is_dir() else None
    files = (
        sorted(p for p in source.files[0].rglob("*") if p.is_file())
        if source.format == "arrow"
        else source.files
    )
    for f in files:
        rel = f.relative_to(base) if base and f.is_relative_to(base) else Path(f.name)
        digest.update(f"{rel.as_posix()}\0".encode())
        with open(f, "rb") as stream:
            while block := stream.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def count_documents(source: DataSource) -> int | None:
    """How many documents there are, when that is cheap to know (for the progress bar's ETA)."""
    if source.format == "text":
        return len(source.files)
    if source.format == "parquet":
        from logitcache.dumping.arrow_input import parquet_rows

        return sum(parquet_rows(f) for f in source.files)
    if source.format == "npy":
        return sum(
            int(np.load(f, mmap_mode="r", allow_pickle=False).shape[0]) for f in source.files
        )
    return None


def iter_documents(source: DataSource) -> Iterator[str | list[int]]:
    """Each document in order: a string, or a list of token ids for pre-tokenized input."""
    for _, _, doc in _documents(source):
        yield doc


def _documents(source: DataSource) -> Iterator[tuple[Path, int, Any]]:
    """(file, index of the document in the file, document) for each document, in order."""
    readers: dict[str, Callable[[Path, DataSource], Iterator[Any]]] = {
        "text": _read_text,
        "jsonl": _read_jsonl,
        "parquet": _read_parquet,
        "arrow": _read_arrow,
        "npy": _read_npy,
    }
    for f in source.files:
        for number, doc in enumerate(readers[source.format](f, source)):
            _check_document(doc, f, source)
            yield f, number, doc


def check_ids(source: DataSource, vocab_size: int) -> None:
    """Refuse pre-tokenized input holding an id the teacher has no embedding row for (negative,
    or ``>= vocab_size``), naming the file and the document. Run before the cache is touched: the
    teacher would fail on the first such id mid-dump, with parts already committed. One pass
    over the ids (the fingerprint reads every byte anyway); memory stays one document."""
    for f, number, doc in _documents(source):
        ids = np.asarray(doc)
        if not ids.size:
            continue
        if ids.dtype.kind not in "iu":
            raise LogitCacheError(
                f"{f}: document {number} holds {ids.dtype} values, not integer token ids."
            )
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            raise LogitCacheError(
                f"{f}: document {number} holds token id {low if low < 0 else high}, outside the "
                f"teacher's vocabulary 0..{vocab_size - 1}. Token ids must come from the "
                "teacher's tokenizer: re-tokenize the data with it, or choose the matching "
                "--teacher."
            )


def _check_document(doc: Any, f: Path, source: DataSource) -> None:
    if source.pretokenized:
        if not isinstance(doc, (list, np.ndarray)):
            raise LogitCacheError(
                f"{f}: field {source.ids_field!r} holds {type(doc).__name__}, not a list of ids."
            )
    elif not isinstance(doc, str):
        raise LogitCacheError(
            f"{f}: field {source.text_field!r} holds {type(doc).__name__}, not text. "
            "Choose the text column with --text-field (or --ids-field for token ids)."
        )


def _read_text(f: Path, source: DataSource) -> Iterator[str]:
    try:
        yield f.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LogitCacheError(
            f"{f} is not UTF-8 text ({exc.reason} at byte {exc.start}). Remove it from --data or "
            "convert it, or pass the right --data-format."
        ) from exc


def _read_jsonl(f: Path, source: DataSource) -> Iterator[Any]:
    field = source.ids_field or source.text_field
    with open(f, "rb") as stream:
        for number, raw in enumerate(stream, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise LogitCacheError(
                    f"{f} line {number} is not UTF-8 ({exc.reason} at byte {exc.start} of the line). "
                    "Fix or remove it."
                ) from exc
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise LogitCacheError(
                    f"{f} line {number} is not valid JSON ({exc}). Fix or remove it."
                ) from exc
            if not isinstance(record, dict) or field not in record:
                keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise LogitCacheError(
                    f"{f} line {number} has no field {field!r} (has: {keys}). Choose it with --text-field."
                )
            yield record[field]


def _read_parquet(f: Path, source: DataSource) -> Iterator[Any]:
    from logitcache.dumping.arrow_input import iter_parquet_column

    try:
        yield from iter_parquet_column(f, source.ids_field or source.text_field)
    except OSError as exc:
        raise LogitCacheError(f"{f} is not a readable Parquet file ({exc}).") from exc


def _read_arrow(f: Path, source: DataSource) -> Iterator[Any]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(f))
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise LogitCacheError(f"{f} is not a dataset saved with save_to_disk ({exc}).") from exc
    if isinstance(dataset, datasets.DatasetDict):
        raise LogitCacheError(
            f"{f} holds several splits ({', '.join(dataset)}); pass one split's directory."
        )
    field = source.ids_field or source.text_field
    if field not in dataset.column_names:
        raise LogitCacheError(
            f"{f} has no column {field!r} (columns: {', '.join(dataset.column_names)}). Choose it with --text-field."
        )
    for batch in dataset.select_columns([field]).iter(batch_size=1024):
        yield from batch[field]


def _read_npy(f: Path, source: DataSource) -> Iterator[np.ndarray]:
    try:
        array = np.load(f, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise LogitCacheError(f"{f} is not a plain NumPy array of token ids ({exc}).") from exc
    if array.ndim != 2 or array.dtype.kind not in "iu":
        raise LogitCacheError(
            f"{f} must be a 2-D integer array (documents x tokens), got {array.dtype} {array.shape}."
        )
    yield from array


def tokenize(
    docs: Iterator[str | list[int]], tokenizer: Any, pretokenized: bool, batch: int = 64
) -> Iterator[list[int]]:
    """Token ids per document, tokenizing texts in batches with the fast tokenizer when it has one."""
    if pretokenized:
        for doc in docs:
            yield [int(t) for t in doc]
        return
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pending: list[str] = []

    def flush() -> Iterator[list[int]]:
        if backend is not None:
            yield from (e.ids for e in backend.encode_batch(pending, add_special_tokens=False))
        else:
            yield from tokenizer(pending, add_special_tokens=False)["input_ids"]
        pending.clear()

    for doc in docs:
        pending.append(doc)
        if len(pending) == batch:
            yield from flush()
    yield from flush()


def pack(
    token_docs: Iterator[list[int]], seq_len: int, eos_id: int | None, packing: bool = True
) -> Iterator[np.ndarray]:
    """Sequences of at most `seq_len` ids.

    Packed: documents are joined, each followed by EOS, and cut every `seq_len` tokens; the last
    sequence may be shorter (nothing is dropped). Not packed: one sequence per document,
    truncated to `seq_len`. Empty documents are skipped.
    """
    if not packing:
        for ids in token_docs:
            if ids:
                yield np.asarray(ids[:seq_len], dtype=np.int64)
        return
    _require_eos(eos_id)
    buffer: list[int] = []
    for ids in token_docs:
        if not ids:
            continue
        buffer.extend(ids)
        buffer.append(eos_id)
        while len(buffer) >= seq_len:
            yield np.asarray(buffer[:seq_len], dtype=np.int64)
            del buffer[:seq_len]
    if buffer:
        yield np.asarray(buffer, dtype=np.int64)


def count_sequences(
    token_docs: Iterator[list[int]], seq_len: int, eos_id: int | None, packing: bool = True
) -> int:
    """How many sequences `pack` makes of these documents, without building them."""
    if not packing:
        return sum(1 for ids in token_docs if ids)
    _require_eos(eos_id)
    tokens = sum(len(ids) + 1 for ids in token_docs if ids)  # each document and its EOS
    return -(-tokens // seq_len)


def _require_eos(eos_id: int | None) -> None:
    if eos_id is None:
        raise LogitCacheError(
            "the tokenizer has no EOS token to join documents with; pass --no-pack."
        )


# --------------------------------------------------------------------------------------------
# --offsets: each sequence's text and each token's character span in it (format 1.3)


@dataclass(frozen=True)
class Spanned:
    """A packed sequence with its text: ``ids`` (n,) int64, ``text`` the characters its tokens
    come from (the pieces of its documents, end to end), ``spans`` (n, 2) uint32 each token's
    [start, end) in characters of ``text``; an EOS appended after a document has the empty span
    at that document's end. What `dump --offsets` stores, so that a student with another
    tokenizer can re-tokenize the same text (`trainer fit --loss uld`)."""

    ids: np.ndarray
    text: str
    spans: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class _Document:
    """A tokenized document: its text, ids and each id's character span in the text."""

    text: str
    ids: list[int]
    spans: np.ndarray  # (n, 2) int64


#: A packed sequence: its ids (`pack`), or with --offsets its ids and text (`pack_spans`).
Packed = np.ndarray | Spanned


def ids_of(sequence: Packed) -> np.ndarray:
    """The token ids of a sequence that `pack` or `pack_spans` made."""
    return sequence.ids if isinstance(sequence, Spanned) else sequence


def with_ids(sequence: Packed, ids: np.ndarray) -> Packed:
    """`sequence` reading `ids` instead (a masked-LM dump's masked input): with --offsets its
    text and spans stay those of the original tokens, which is the text it covers."""
    return dataclasses.replace(sequence, ids=ids) if isinstance(sequence, Spanned) else ids


def tokenize_spans(
    docs: Iterator[str | list[int]], tokenizer: Any, batch: int = 64
) -> Iterator[_Document]:
    """Each text document with its ids and their character spans, from the fast tokenizer's
    offsets (`check_offsets` has made sure there is one)."""
    backend = tokenizer.backend_tokenizer
    pending: list[str] = []

    def flush() -> Iterator[_Document]:
        for text, e in zip(
            pending, backend.encode_batch(pending, add_special_tokens=False), strict=True
        ):
            yield _Document(text, list(e.ids), np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2))
        pending.clear()

    for doc in docs:
        pending.append(doc)  # text: the source is not pre-tokenized (`check_offsets`)
        if len(pending) == batch:
            yield from flush()
    yield from flush()


def check_offsets(source: DataSource, tokenizer: Any) -> None:
    """Refuse `--offsets` where there is no text to store or no offsets to take."""
    if source.pretokenized:
        raise LogitCacheError(
            f"--offsets needs text, but --data {source.spec} is already tokenized ids: there "
            "are no characters to store. Dump from the text (--text-field), or drop --offsets."
        )
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise LogitCacheError(
            "--offsets needs a fast (Rust) tokenizer, which reports each token's characters; "
            "this teacher's tokenizer is a slow one. Pass a tokenizer.json with --tokenizer."
        )


def pack_spans(
    docs: Iterator[_Document], seq_len: int, eos_id: int | None, packing: bool = True
) -> Iterator[Spanned]:
    """`pack`'s sequences, the same ids cut at the same places, each with its text and spans."""
    if not packing:
        for doc in docs:
            if doc.ids:
                yield _spanned([(doc, 0, min(len(doc.ids), seq_len), False)], eos_id)
        return
    _require_eos(eos_id)
    pieces: list[tuple[_Document, int, int, bool]] = []  # (document, first, stop, EOS after)
    filled = 0
    for doc in docs:
        n, first = len(doc.ids), 0
        while doc.ids and first <= n:  # positions 0..n-1 are the tokens, n its EOS
            stop = min(n + 1, first + seq_len - filled)
            pieces.append((doc, first, min(stop, n), stop == n + 1))
            filled, first = filled + stop - first, stop
            if filled == seq_len:
                yield _spanned(pieces, eos_id)
                pieces, filled = [], 0
    if pieces:
        yield _spanned(pieces, eos_id)


def _spanned(pieces: list[tuple[_Document, int, int, bool]], eos_id: int | None) -> Spanned:
    """One sequence from its document pieces: tokens ``first:stop`` of each document, and its
    EOS if the piece ends the document. A piece's text runs from the end of the token before it
    (0 at the document's start) to the end of its last token (the document's end if that token
    is the last), so consecutive sequences cut a document's text without gap or overlap."""
    texts, ids, spans, base = [], [], [], 0
    for doc, first, stop, eos in pieces:
        start = 0 if first == 0 else int(doc.spans[first - 1, 1])
        end = len(doc.text) if stop == len(doc.ids) else max(start, int(doc.spans[stop - 1, 1]))
        ids += doc.ids[first:stop]
        spans.append(np.clip(doc.spans[first:stop], start, end) - start + base)
        base += end - start
        texts.append(doc.text[start:end])
        if eos:
            ids.append(eos_id)
            spans.append(np.array([[base, base]]))
    return Spanned(
        np.asarray(ids, dtype=np.int64), "".join(texts), np.concatenate(spans).astype(np.uint32)
    )


def with_texts(arrays: PartArrays, texts: list[Spanned]) -> PartArrays:
    """A part's arrays plus its sequences' text (`TEXT_ARRAYS`): the UTF-8 of each text end to
    end, where each sequence's begins, and every token's span."""
    encoded = [t.text.encode("utf-8") for t in texts]
    starts = np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).astype(np.int64)
    return dataclasses.replace(
        arrays,
        text=np.frombuffer(b"".join(encoded), dtype=np.uint8),
        text_offsets=starts,
        token_offsets=np.concatenate([t.spans for t in texts]).astype(np.uint32),
    )
