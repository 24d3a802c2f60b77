"""Reading classifier examples: an image folder (one subfolder per class, torchvision's
ImageFolder layout), a NumPy file (`.npz` with ``inputs`` and optionally ``labels``, or a bare
`.npy` of inputs), or a table (Parquet file, or a `datasets` `save_to_disk` directory) with an
image, array or text column and optionally a label column; for a text classifier also a
`.jsonl` file (one object per line: the text and optionally the label) or a `.txt` file (one
example per line, no labels). Text is tokenized to one length (`logitcache.examples.text`).

Every example is decoded up front into one float32 tensor (images scaled to [0, 1], channels
first), since a classifier dump and its student both index examples at random (views, shuffled
batches) and the sets this is for fit in memory. Bad input is refused before a teacher is loaded:
a folder without classes, images of mixed sizes without a resize, labels that are not ids.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from logitcache.errors import LogitCacheError
from logitcache.examples.text import tokenize_texts
from logitcache.format.manifest import DataInfo

__all__ = ["IMAGE_SUFFIXES", "Examples", "Text", "check_labels", "load_examples"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
#: Columns tried, in order, when --input-field / --label-field are not given.
INPUT_FIELDS = ("image", "img", "pixel_values", "inputs")
#: The same for a text classifier's table or .jsonl.
TEXT_FIELDS = ("text", "sentence", "content")
LABEL_FIELDS = ("label", "labels")


@dataclass
class Examples:
    """Decoded examples: ``inputs`` (N, *shape) float32, or for text (N, 2, seq_len) int64
    (ids over attention mask, `logitcache.examples.text`); ``labels`` (N,) int64 or None."""

    inputs: torch.Tensor
    labels: np.ndarray | None
    #: "image" (decoded pictures or uint8 arrays, scaled to [0, 1]), "array" or "text"
    input: str
    classes: list[str]  # class names of an image folder, in label order; [] otherwise
    info: DataInfo

    @property
    def shape(self) -> list[int]:
        """One example as the manifest's `task.shape` says it: for text, [seq_len]."""
        if self.input == "text":
            return [int(self.inputs.shape[-1])]
        return list(self.inputs.shape[1:])

    def __len__(self) -> int:
        return len(self.inputs)


def load_examples(
    source: str | Path,
    *,
    resize: tuple[int, int] | None = None,
    input_field: str | None = None,
    label_field: str | None = None,
    text: Text | None = None,
) -> Examples:
    """The examples at `source`; `resize` (height, width) makes images of mixed sizes one size
    (bilinear), `input_field` and `label_field` name a table's columns. With `text` (a text
    classifier's tokenizer and length) the input column holds text, tokenized; without it a
    text column is refused, since nothing could read it."""
    path = Path(source)
    if not path.exists():
        raise LogitCacheError(f"--data {source} does not exist.")
    if text is not None:
        return _text(path, text, input_field, label_field)
    if path.is_dir() and not (path / "dataset_info.json").is_file():
        return _image_folder(path, resize)
    if path.suffix in (".npz", ".npy"):
        return _numpy(path)
    if path.suffix == ".parquet" or path.is_dir():
        return _table(path, resize, input_field, label_field)
    if path.suffix in (".jsonl", ".txt"):
        raise _needs_text_teacher(f"--data {source} holds text")
    raise LogitCacheError(
        f"--data {source}: a classification dump reads an image folder (one subfolder per "
        "class), a .npz/.npy file, a .parquet file or a datasets save_to_disk directory."
    )


@dataclass(frozen=True)
class Text:
    """How text examples are tokenized: the classifier's tokenizer, to `seq_len` tokens."""

    tokenizer: Any
    seq_len: int


def check_labels(labels: np.ndarray | None, classes: int, where: str) -> None:
    """Refuse a label that is not a class id of a teacher with `classes` outputs."""
    if labels is None or not labels.size:
        return
    bad = np.flatnonzero((labels < 0) | (labels >= classes))
    if bad.size:
        i = int(bad[0])
        raise LogitCacheError(
            f"{where}: label {int(labels[i])} of example {i} is out of range for a teacher with "
            f"{classes} classes (labels are class ids 0..{classes - 1}). Fix the labels, or use "
            "the teacher they belong to."
        )


def _fingerprint(kind: str, fields: Iterable[str | None], root: Path, files: list[Path]) -> str:
    """sha256 over the JSON [kind, fields...], then each file's path relative to `root`, a NUL
    byte and its bytes: two sources with equal fingerprints hold the same examples."""
    h = hashlib.sha256(json.dumps([kind, *fields]).encode())
    for f in files:
        rel = f.relative_to(root).as_posix() if f != root else f.name
        h.update(rel.encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _image_folder(root: Path, resize: tuple[int, int] | None) -> Examples:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise LogitCacheError(
            f"--data {root} holds no class folders: an image folder has one subfolder per class "
            f"({root}/cat/001.png, {root}/dog/002.png), and the folder names are the classes."
        )
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise LogitCacheError(
                f"class folder {root / name} holds no images ({', '.join(IMAGE_SUFFIXES)})."
            )
        files += found
        labels += [label] * len(found)
    pictures = [_open_image(f.read_bytes(), str(f)) for f in files]
    inputs = _stack_images(pictures, [str(f) for f in files], resize)
    fields = [None if resize is None else f"{resize[0]}x{resize[1]}"]
    info = DataInfo(str(root), "imagefolder", _fingerprint("imagefolder", fields, root, files),
                    len(files), None)  # fmt: skip
    return Examples(inputs, np.asarray(labels, dtype=np.int64), "image", classes, info)


def _open_image(data: bytes, where: str) -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise LogitCacheError(
            "reading images needs Pillow: pip install 'logitcache[vision]'."
        ) from None
    try:
        picture = Image.open(io.BytesIO(data))
        picture.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise LogitCacheError(f"{where} is not a readable image ({exc}).") from exc
    return picture


def _stack_images(
    pictures: list[Any], names: list[str], resize: tuple[int, int] | None
) -> torch.Tensor:
    """(N, C, H, W) float32 in [0, 1]: greyscale (C = 1) if every picture is, else RGB."""
    from PIL import Image

    grey = all(p.mode in ("1", "L", "I", "I;16", "F") for p in pictures)
    mode = "L" if grey else "RGB"
    sizes = {p.size for p in pictures}
    if resize is None and len(sizes) > 1:
        first = pictures[0].size
        other = next(i for i, p in enumerate(pictures) if p.size != first)
        raise LogitCacheError(
            f"images of mixed sizes: {names[0]} is {first[0]}x{first[1]} but {names[other]} is "
            f"{pictures[other].size[0]}x{pictures[other].size[1]} (width x height). Pass "
            "--resize HEIGHTxWIDTH to make them one size."
        )
    arrays = []
    for p in pictures:
        p = p.convert(mode)
        if resize is not None and p.size != (resize[1], resize[0]):
            p = p.resize((resize[1], resize[0]), Image.BILINEAR)
        a = np.asarray(p, dtype=np.uint8)
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(arrays)).float().div_(255.0)


def _numpy(path: Path) -> Examples:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise LogitCacheError(f"{path} is not a readable NumPy file ({exc}).") from exc
    if path.suffix == ".npy":
        inputs, labels = loaded, None
    else:
        if "inputs" not in loaded.files:
            raise LogitCacheError(
                f"{path} holds {sorted(loaded.files)}; a classification .npz holds the examples "
                "as `inputs` (N, ...) and optionally their class ids as `labels` (N,)."
            )
        inputs, labels = loaded["inputs"], loaded["labels"] if "labels" in loaded.files else None
    info = DataInfo(str(path), "npy", _fingerprint("npy", [], path, [path]), len(inputs), None)
    return _from_arrays(inputs, labels, info, str(path))


def _from_arrays(inputs: np.ndarray, labels: Any, info: DataInfo, where: str) -> Examples:
    """uint8 inputs are images ((N, H, W) gets a channel axis), scaled to [0, 1]; other
    numeric inputs are arrays, taken as float32."""
    if inputs.ndim < 2 or not len(inputs) or inputs.dtype.kind not in "uif":
        raise LogitCacheError(
            f"{where}: inputs of shape {inputs.shape} and type {inputs.dtype} are not N >= 1 "
            "numeric examples (N, ...)."
        )
    labels = _labels(labels, len(inputs), where)
    if inputs.dtype == np.uint8:
        images = inputs[:, None] if inputs.ndim == 3 else inputs
        return Examples(torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0),
                        labels, "image", [], info)  # fmt: skip
    values = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
    return Examples(values, labels, "array", [], info)


def _labels(labels: Any, n: int, where: str) -> np.ndarray | None:
    """`labels` as (n,) int64, or None; refused unless one integer per example."""
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.shape != (n,) or labels.dtype.kind not in "iu":
        raise LogitCacheError(
            f"{where}: labels of shape {labels.shape} and type {labels.dtype} are not one "
            f"integer class id per example ({n},)."
        )
    return labels.astype(np.int64)


def _table(
    path: Path, resize: tuple[int, int] | None, input_field: str | None, label_field: str | None
) -> Examples:
    """A Parquet file or a `datasets` directory: an image column (the `datasets` Image feature,
    {bytes, path}, or raw encoded bytes) or a numeric list column, and optionally labels."""
    table, files = _read_table(path)
    names = table.column_names
    column = _pick(input_field, INPUT_FIELDS, names, path, "--input-field", required=True)
    label = _pick(label_field, LABEL_FIELDS, names, path, "--label-field", required=False)
    values = table.column(column).to_pylist()
    fields = [column, label, None if resize is None else f"{resize[0]}x{resize[1]}"]
    fmt = "arrow" if path.is_dir() else "parquet"
    info = DataInfo(str(path), fmt, _fingerprint(fmt, fields, path, files), len(values), column)
    labels = None if label is None else np.asarray(table.column(label).to_pylist())
    first = values[0] if values else None
    if isinstance(first, str):
        raise _needs_text_teacher(f"{path}: column {column!r} holds text")
    if isinstance(first, (bytes, dict)):
        raw = [v["bytes"] if isinstance(v, dict) else v for v in values]
        pictures = [_open_image(b, f"{path} row {i}") for i, b in enumerate(raw)]
        rows = [f"{path} row {i}" for i in range(len(raw))]
        inputs = _stack_images(pictures, rows, resize)
        return Examples(inputs, _labels(labels, len(values), str(path)), "image", [], info)
    try:
        arrays = np.asarray(values)
    except ValueError as exc:
        raise LogitCacheError(f"{path}: column {column!r} holds arrays of mixed shapes.") from exc
    return _from_arrays(arrays, labels, info, str(path))


def _needs_text_teacher(what: str) -> LogitCacheError:
    return LogitCacheError(
        f"{what}, which only a text classifier reads: pass a --teacher saved from an "
        "AutoModelForSequenceClassification (its tokenizer beside it), or a --teacher-factory "
        "with --tokenizer."
    )


def _read_table(path: Path) -> tuple[Any, list[Path]]:
    """A Parquet file or a `datasets` directory as a pyarrow table, and the files it is in."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.is_dir():
            import datasets

            return datasets.load_from_disk(str(path)).data.table, sorted(path.glob("*.arrow"))
        return pq.read_table(str(path)), [path]
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise LogitCacheError(f"{path} is not a readable table ({exc}).") from exc


def _text(path: Path, text: Text, input_field: str | None, label_field: str | None) -> Examples:
    """Text examples from a table, a .jsonl or a .txt file, tokenized (`tokenize_texts`)."""
    if path.suffix == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        rows: dict[str, list[Any]] = {"text": lines}
        fmt, column, label, files = "text", "text", None, [path]
    else:
        if path.suffix == ".jsonl":
            rows, fmt, files = _jsonl(path), "jsonl", [path]
        elif path.suffix == ".parquet" or path.is_dir():
            table, files = _read_table(path)
            rows, fmt = table.to_pydict(), "arrow" if path.is_dir() else "parquet"
        else:
            raise LogitCacheError(
                f"--data {path}: a text classifier reads a .parquet file, a datasets "
                "save_to_disk directory, a .jsonl file (one object per line) or a .txt file "
                "(one example per line)."
            )
        names = list(rows)
        column = _pick(input_field, TEXT_FIELDS, names, path, "--input-field", required=True)
        label = _pick(label_field, LABEL_FIELDS, names, path, "--label-field", required=False)
    texts = rows[column]
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise LogitCacheError(
            f"{path}: column {column!r} is not a text column (row {bad} holds "
            f"{type(texts[bad]).__name__}). Name the text column with --input-field."
        )
    if not texts:
        raise LogitCacheError(f"--data {path} holds no examples.")
    inputs = tokenize_texts(texts, text.tokenizer, text.seq_len, str(path))
    info = DataInfo(str(path), fmt, _fingerprint(fmt, [column, label], path, files), len(texts),
                    column)  # fmt: skip
    labels = None if label is None else _labels(_integers(rows[label], path), len(texts), str(path))
    return Examples(inputs, labels, "text", [], info)


def _jsonl(path: Path) -> dict[str, list[Any]]:
    """A .jsonl file as columns: every line an object (a key missing from a line is None)."""
    objects = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise LogitCacheError(f"{path} line {number} is not JSON ({exc}).") from exc
        if not isinstance(obj, dict):
            raise LogitCacheError(f"{path} line {number} is not a JSON object.")
        objects.append(obj)
    keys = list(dict.fromkeys(k for obj in objects for k in obj))
    return {k: [obj.get(k) for obj in objects] for k in keys}


def _integers(values: list[Any], path: Path) -> np.ndarray:
    """A label column as an array, refused unless every entry is an integer."""
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise LogitCacheError(
            f"{path}: the label column holds entries that are not integer class ids."
        )
    return np.asarray(values, dtype=np.int64)


def _pick(
    given: str | None, defaults: tuple[str, ...], names: list[str], path: Path, flag: str,
    *, required: bool,
) -> str | None:  # fmt: skip
    if given is not None:
        if given not in names:
            raise LogitCacheError(f"{path} has no column {given!r} (columns: {', '.join(names)}).")
        return given
    found = next((n for n in defaults if n in names), None)
    if found is None and required:
        raise LogitCacheError(
            f"{path} has none of the columns {', '.join(defaults)} (columns: {', '.join(names)}). "
            f"Name the input column with {flag}."
        )
    return found
