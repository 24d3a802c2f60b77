"""The cache format, version 1: names, layout and the manifest schema.

This module is the only contract between the writer (`logitcache.write.writer`, used by `dump`) and
the reader (`logitcache.read.reader`, used by the trainer): neither imports the other. `docs/FORMAT.md`
describes the same layout in prose, byte by byte, for readers that do not use this package.

A cache is a directory::

    manifest.json            the commit point: what is listed here is complete and checksummed
    parts/part-000000/       one unit of work (zarr backend: a Zarr v3 group)
    parts/part-000000.parquet                 (parquet backend: one Parquet file)

Each part holds, for its sequences laid end to end on one token axis:
``input_ids`` (tokens,), the targets, and ``seq_offsets`` (sequences + 1,) so that sequence
``s`` of the part is tokens ``seq_offsets[s]:seq_offsets[s + 1]``. Top-k targets are
``target_ids`` and ``target_logprobs`` (tokens, k); sampled targets (format 1.1) are ragged:
``target_ids`` and ``target_counts`` (entries,) with ``target_lengths`` (tokens,) entries per
position.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from logitcache.errors import CorruptCacheError, LogitCacheError

FORMAT_NAME = "logitcache"
FORMAT_VERSION = (
    "1.0"  # major.minor: a reader refuses a newer major, reads every older one it knows
)
#: The newest version this package reads. 1.1 adds optional fields: `merged_from` (written only
#: by `logitcache merge`), sampled targets, uint8 log-probs, id order, temperature, delta
#: filters. A cache that uses none of them is still written as 1.0, which every 1.x reader
#: reads (`version_for`).
READER_VERSION = "1.1"
MERGED_FORMAT_VERSION = "1.1"
KNOWN_MAJORS = (1,)
MANIFEST_NAME = "manifest.json"
PARTS_DIR = "parts"
ARRAY_NAMES = ("input_ids", "target_ids", "target_logprobs", "seq_offsets")
BACKENDS = ("zarr", "parquet")
TARGET_KINDS = ("topk", "sample")
#: The arrays of a part, by target kind (`PartArrays` fields; None for the others).
KIND_ARRAYS = {
    "topk": ("input_ids", "target_ids", "target_logprobs", "seq_offsets"),
    "sample": ("input_ids", "target_ids", "target_counts", "target_lengths", "seq_offsets"),
}
LOGPROB_DTYPES = ("float16", "float32", "uint8")
ORDERS = ("descending", "id")
#: Blosc shuffle filters a codec may name (zarr.codecs.BloscShuffle member names).
SHUFFLES = ("noshuffle", "shuffle", "bitshuffle")
MAX_SAMPLES = 65535
MAX_MANIFEST_BYTES = 64 * 1024 * 1024  # refuse to parse anything larger: a manifest is metadata
_PART_NAME = re.compile(r"^part-\d{6}$")
#: Bounds checked before anything is allocated from metadata: a reader decodes a whole part at
#: once, so its decoded size (ids, targets, offsets) is capped; k and seq_len are capped on
#: their own so that a hostile manifest cannot make one row or one sequence huge.
MAX_K = 1 << 20
MAX_SEQ_LEN = 1 << 24
MAX_PART_BYTES = 1 << 34  # 16 GiB decoded


def part_name(index: int) -> str:
    """The name of part `index`; fixed width so that names sort in storage order."""
    return f"part-{index:06d}"


def id_dtype_for(vocab_size: int) -> str:
    """The narrowest unsigned integer type that holds every id below `vocab_size`."""
    for name, limit in (("uint8", 1 << 8), ("uint16", 1 << 16), ("uint32", 1 << 32)):
        if vocab_size <= limit:
            return name
    raise LogitCacheError(f"vocabulary of {vocab_size} ids is larger than 2**32; not supported.")


@dataclass(frozen=True)
class TeacherInfo:
    """Which model produced the targets; the hashes tell two checkpoints of one name apart."""

    name: str
    config_sha256: str
    weights_sha256: str
    dtype: str
    vocab_size: int  # width of the teacher's logits; students must match it
    max_positions: int | None = None


@dataclass(frozen=True)
class TokenizerInfo:
    """The tokenizer the input ids come from; `fingerprint` hashes vocab, merges and specials."""

    name: str
    vocab_size: int
    fingerprint: str
    eos_token_id: int | None = None


@dataclass(frozen=True)
class DataInfo:
    """Where the input came from and a hash of its bytes and of how it was read."""

    source: str
    format: str
    fingerprint: str
    documents: int
    text_field: str | None = None


@dataclass(frozen=True)
class TargetInfo:
    """What is stored per position, from the teacher's distribution at `temperature`.

    ``kind`` "topk": the `k` most probable ids with their log-probabilities normalised over the
    full vocabulary, so ``1 - sum(exp(logprobs))`` is the teacher's exact mass outside the
    stored ids (up to the value codec's rounding, `logitcache.format.codecs`). ``kind`` "sample"
    (1.1): the distinct ids among `samples` draws with their counts; `k` is then the most a
    position can hold, ``min(samples, vocab_size)``.
    """

    kind: str
    k: int
    temperature: float
    id_dtype: str
    logprob_dtype: str  # float16, float32, uint8 (1.1: quantised, see logprob_scale); sample: none
    order: str = "descending"  # or "id" (1.1): ids increasing within each position
    # added in 1.1 (left out of the JSON at these defaults)
    samples: int = 0  # sample: draws per position (N)
    count_dtype: str = ""  # sample: uint8 (N <= 255) or uint16
    logprob_scale: float = 0.0  # uint8 log-probs: stored q means log-prob -q / logprob_scale
    seed: int = 0  # sample: the seed of the draws (logitcache.dumping.sampling)


@dataclass(frozen=True)
class LayoutInfo:
    """How sequences are cut and grouped into parts and chunks."""

    seq_len: int
    packing: bool
    sequences_per_part: int
    chunk_bytes: int


@dataclass(frozen=True)
class CodecInfo:
    """Compression of every data chunk (zarr: Blosc inside the shard, then crc32c)."""

    name: str
    cname: str
    clevel: int
    shuffle: str
    checksum: str
    delta: list[str] = field(default_factory=list)  # 1.1: arrays delta-filtered first


@dataclass(frozen=True)
class PartInfo:
    """A committed unit: its sequences and tokens, and the sha256 of every file it is made of,
    keyed by the file's '/'-separated path relative to the cache's parts/ directory."""

    name: str
    sequences: int
    tokens: int
    files: dict[str, str]
    entries: int = 0  # 1.1, sampled targets: (id, count) pairs stored in the part


@dataclass(frozen=True)
class MergedInput:
    """One input of `logitcache merge`: where it came from and which parts it became."""

    cache: str  # the input's location as given to merge
    created: str  # the input's own `created`
    data: DataInfo  # the input's own data record
    parts: int  # its parts are the next `parts` parts of the merged cache, in order
    sequences: int
    tokens: int


@dataclass(frozen=True)
class Manifest:
    """The whole description of a cache; written last, so it is the commit point."""

    format: str
    format_version: str
    backend: str
    created: str
    teacher: TeacherInfo
    tokenizer: TokenizerInfo
    data: DataInfo
    targets: TargetInfo
    layout: LayoutInfo
    codec: CodecInfo
    complete: bool
    sequences: int
    tokens: int
    parts: list[PartInfo] = field(default_factory=list)
    tool_version: str = ""
    merged_from: list[MergedInput] = field(default_factory=list)  # format 1.1, merge only

    def settings(self) -> dict[str, Any]:
        """Everything that decides the cache's content: a resumed dump must match it exactly."""
        return {
            "backend": self.backend,
            "teacher": dataclasses.asdict(self.teacher),
            "tokenizer": dataclasses.asdict(self.tokenizer),
            "data": dataclasses.asdict(self.data),
            "targets": dataclasses.asdict(self.targets),
            "layout": dataclasses.asdict(self.layout),
            "codec": dataclasses.asdict(self.codec),
        }

    def to_json(self) -> str:
        doc = dataclasses.asdict(self)
        if not doc["merged_from"]:  # optional (1.1): absent from dumps, which stay 1.0
            del doc["merged_from"]
        for record, defaults in _ADDED_IN_1_1.items():  # absent means the default
            for entry in doc["parts"] if record == "parts" else [doc[record]]:
                for name, default in defaults.items():
                    if entry.get(name) == default:
                        del entry[name]
        return json.dumps(doc, indent=2, sort_keys=False) + "\n"


#: Fields added to existing records in 1.1, and the values they take where unused.
_ADDED_IN_1_1 = {
    "targets": {"samples": 0, "count_dtype": "", "logprob_scale": 0.0, "seed": 0},
    "codec": {"delta": []},
    "parts": {"entries": 0},
}


def version_for(m: Manifest) -> str:
    """The oldest format version that describes `m`: 1.0 unless a 1.1 feature is used."""
    return READER_VERSION if m.merged_from or _targets_need_1_1(m) else FORMAT_VERSION


def _targets_need_1_1(m: Manifest) -> bool:
    t = m.targets
    return (
        t.kind != "topk"
        or t.order != "descending"
        or t.logprob_dtype not in ("float16", "float32")
        or t.temperature != 1.0
        or bool(m.codec.delta)
        or any(getattr(t, name) != d for name, d in _ADDED_IN_1_1["targets"].items())
    )


def array_names(kind: str) -> tuple[str, ...]:
    """The arrays a part of a cache with targets of `kind` holds."""
    return KIND_ARRAYS[kind]


def diff_settings(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two `Manifest.settings()` dicts, one line each."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += diff_settings(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: cache has {a!r}, this run has {b!r}")
    return lines


def load_json(text: str | bytes) -> Any:
    """`json.loads` for what a cache holds (manifest, zarr.json, lock file): a document nested
    deeper than the decoder's recursion limit (``[[[[...`` in a few KB) raises ValueError, like
    any other invalid JSON, instead of a RecursionError that no caller expects."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("it is nested too deeply to be metadata") from None


def parse_manifest(text: str | bytes, source: str = MANIFEST_NAME) -> Manifest:
    """Parse a manifest into the strict schema: unknown, missing or ill-typed fields are refused.

    Nothing in a manifest is executed or used to allocate before it has passed this check.
    """
    if len(text) > MAX_MANIFEST_BYTES:
        raise CorruptCacheError(
            f"{source} is {len(text)} bytes, over the {MAX_MANIFEST_BYTES} limit."
        )
    try:
        raw = load_json(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptCacheError(f"{source} is not valid JSON ({exc}).") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise CorruptCacheError(
            f'{source} is not a logitcache manifest (no "format": "{FORMAT_NAME}").'
        )
    version = _check_version(raw.get("format_version"), source)
    try:
        manifest = _build(Manifest, raw, source)
    except CorruptCacheError as exc:
        if "unknown field" in str(exc) and version > _version_tuple(READER_VERSION):
            raise _upgrade(source, raw["format_version"]) from exc
        raise
    _check_consistency(manifest, source)
    return manifest


def _version_tuple(version: str) -> tuple[int, int]:
    major, minor = version.split(".")
    return int(major), int(minor)


def _upgrade(source: str, version: str) -> LogitCacheError:
    return LogitCacheError(
        f"{source} uses cache format {version}, newer than this logitcache reads "
        f"({READER_VERSION}). Upgrade logitcache: pip install -U logitcache."
    )


def _check_version(version: Any, source: str) -> tuple[int, int]:
    if not isinstance(version, str) or not re.fullmatch(r"\d{1,6}\.\d{1,6}", version):
        raise CorruptCacheError(f"{source}: format_version {version!r} is not MAJOR.MINOR.")
    parsed = _version_tuple(version)
    if parsed[0] > max(KNOWN_MAJORS):
        raise _upgrade(source, version)
    if parsed[0] not in KNOWN_MAJORS:
        raise LogitCacheError(
            f"{source} uses cache format {version}, older than any this logitcache reads "
            f"(majors {', '.join(map(str, KNOWN_MAJORS))}). Re-dump it, or read it with the "
            "logitcache version that wrote it."
        )
    return parsed


def _check_consistency(m: Manifest, source: str) -> None:
    """Bounds and cross-field invariants that the type check alone cannot see."""
    problems = []
    if m.backend not in BACKENDS:
        problems.append(f"backend {m.backend!r} is not one of {BACKENDS}")
    if m.targets.kind not in TARGET_KINDS:
        problems.append(f"target kind {m.targets.kind!r} is not one of {TARGET_KINDS}")
    if not 1 <= m.teacher.vocab_size <= 1 << 32:
        problems.append(f"vocab_size={m.teacher.vocab_size} is not in 1..2**32")
    elif m.targets.id_dtype != id_dtype_for(m.teacher.vocab_size):
        problems.append(f"id_dtype {m.targets.id_dtype!r} does not fit vocab_size")
    if not 1 <= m.targets.k <= min(m.teacher.vocab_size, MAX_K):
        problems.append(
            f"k={m.targets.k} is not in 1..min(vocab_size={m.teacher.vocab_size}, {MAX_K})"
        )
    problems += _target_problems(m)
    if not 1 <= m.layout.seq_len <= MAX_SEQ_LEN or m.layout.sequences_per_part < 1:
        problems.append(
            f"seq_len must be in 1..{MAX_SEQ_LEN} and sequences_per_part must be positive"
        )
    if problems:  # the part checks below rely on these
        raise CorruptCacheError(f"{source} is inconsistent: " + "; ".join(problems) + ".")
    for i, part in enumerate(m.parts):
        if part.name != part_name(i):
            problems.append(f"part {i} is named {part.name!r}, expected {part_name(i)!r}")
        if not 0 < part.sequences <= m.layout.sequences_per_part:
            problems.append(f"{part.name}: {part.sequences} sequences is out of bounds")
        if not 0 < part.tokens <= part.sequences * m.layout.seq_len:
            problems.append(f"{part.name}: {part.tokens} tokens is out of bounds")
        elif m.targets.kind == "sample" and not (
            part.tokens <= part.entries <= part.tokens * m.targets.k
        ):
            problems.append(f"{part.name}: {part.entries} entries is out of bounds")
        elif part_bytes(m, part) > MAX_PART_BYTES:
            problems.append(
                f"{part.name}: {part.tokens} tokens at k={m.targets.k} decode to "
                f"{part_bytes(m, part)} bytes, over the {MAX_PART_BYTES} limit"
            )
        problems += [
            f"{part.name}: unsafe file name {f!r}"
            for f in part.files
            if not (_safe_rel(f) and f.split("/")[0].startswith(part.name))
        ]
    if (
        sum(p.sequences for p in m.parts) != m.sequences
        or sum(p.tokens for p in m.parts) != m.tokens
    ):
        problems.append("sequence/token totals do not equal the sum over parts")
    if m.merged_from:
        if _version_tuple(m.format_version) < _version_tuple(MERGED_FORMAT_VERSION):
            problems.append(f"merged_from needs format_version {MERGED_FORMAT_VERSION} or later")
        counts = (len(m.parts), m.sequences, m.tokens)
        inputs = tuple(
            sum(getattr(i, f) for i in m.merged_from) for f in ("parts", "sequences", "tokens")
        )
        # an unfinished copy (export of a merged cache) holds a prefix of the parts
        short = any(i < c for i, c in zip(inputs, counts, strict=True))
        if (inputs != counts) if m.complete else short:
            problems.append("merged_from counts do not add up to the cache's parts and totals")
    if problems:
        raise CorruptCacheError(f"{source} is inconsistent: " + "; ".join(problems) + ".")


def part_bytes(m: Manifest, part: PartInfo) -> int:
    """Decoded size of one part: what a reader allocates to hold it whole (for sampled targets,
    also the float32 log-probs of the decoded (tokens, k) view)."""
    id_size = {"uint8": 1, "uint16": 2, "uint32": 4}.get(m.targets.id_dtype, 4)
    lp_size = {"float16": 2, "uint8": 1}.get(m.targets.logprob_dtype, 4)
    if m.targets.kind == "sample":
        count_size = 2 if m.targets.count_dtype == "uint16" else 1
        per_token = id_size * (1 + m.targets.k) + 4 * m.targets.k + count_size
        return part.tokens * per_token + part.entries * count_size + (part.sequences + 1) * 8
    per_token = id_size * (1 + m.targets.k) + lp_size * m.targets.k
    return part.tokens * per_token + (part.sequences + 1) * 8


def expected_arrays(m: Manifest, part: PartInfo) -> dict[str, tuple[tuple[int, ...], str]]:
    """{array name: (shape, dtype)} that part `part` must hold, from the manifest alone."""
    t, k, ids = m.targets, m.targets.k, m.targets.id_dtype
    if t.kind == "sample":
        return {
            "input_ids": ((part.tokens,), ids),
            "target_ids": ((part.entries,), ids),
            "target_counts": ((part.entries,), t.count_dtype),
            "target_lengths": ((part.tokens,), t.count_dtype),
            "seq_offsets": ((part.sequences + 1,), "int64"),
        }
    return {
        "input_ids": ((part.tokens,), ids),
        "target_ids": ((part.tokens, k), ids),
        "target_logprobs": ((part.tokens, k), t.logprob_dtype),
        "seq_offsets": ((part.sequences + 1,), "int64"),
    }


def _target_problems(m: Manifest) -> list[str]:
    """The `targets` and `codec` fields of each kind and codec, and the version they need."""
    t, problems = m.targets, []
    if not (math.isfinite(t.temperature) and t.temperature > 0):
        problems.append(f"temperature {t.temperature} is not a positive number")
    if t.kind == "sample":
        if not 1 <= t.samples <= MAX_SAMPLES:
            problems.append(f"samples={t.samples} is not in 1..{MAX_SAMPLES}")
        elif t.k != min(t.samples, m.teacher.vocab_size):
            problems.append(f"k={t.k} is not min(samples, vocab_size) for sampled targets")
        if t.count_dtype != ("uint8" if t.samples <= 255 else "uint16"):
            problems.append(f"count_dtype {t.count_dtype!r} does not fit samples={t.samples}")
        if t.logprob_dtype != "none" or t.order != "id" or t.logprob_scale != 0.0:
            problems.append('sampled targets need logprob_dtype "none", order "id", no scale')
    elif t.kind == "topk":
        if t.logprob_dtype not in LOGPROB_DTYPES:
            problems.append(f"logprob_dtype {t.logprob_dtype!r} is not one of {LOGPROB_DTYPES}")
        if t.order not in ORDERS:
            problems.append(f"order {t.order!r} is not one of {ORDERS}")
        scaled = t.logprob_dtype == "uint8"
        if scaled != (math.isfinite(t.logprob_scale) and t.logprob_scale > 0):
            problems.append("logprob_scale must be positive for uint8 log-probs, else 0")
        if t.samples or t.count_dtype or t.seed:
            problems.append("samples, count_dtype and seed are for sampled targets only")
    if m.codec.shuffle not in SHUFFLES:
        problems.append(f"codec.shuffle {m.codec.shuffle!r} is not one of {SHUFFLES}")
    if t.kind in KIND_ARRAYS:
        allowed = {n for n in KIND_ARRAYS[t.kind] if n not in ("seq_offsets", "target_logprobs")}
        if t.logprob_dtype == "uint8":
            allowed.add("target_logprobs")
        if not set(m.codec.delta) <= allowed or len(set(m.codec.delta)) != len(m.codec.delta):
            problems.append(f"codec.delta {m.codec.delta} names arrays outside {sorted(allowed)}")
    if not problems and _targets_need_1_1(m) and _version_tuple(m.format_version) < (1, 1):
        problems.append(
            f"format_version {m.format_version} cannot describe these targets or this codec "
            f"(they need {READER_VERSION})"
        )
    return problems


def _safe_rel(path: str) -> bool:
    """A name relative to parts/ that cannot escape it (no absolute path, no `..`)."""
    pieces = path.split("/")
    return (
        bool(path)
        and not path.startswith("/")
        and "\\" not in path
        and all(p not in ("", ".", "..") for p in pieces)
    )


def is_part_name(name: str) -> bool:
    return bool(_PART_NAME.match(name))


def _build(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass `cls` from JSON `raw`, checking every field's presence and type."""
    if not isinstance(raw, dict):
        raise CorruptCacheError(f"{where}: expected an object for {cls.__name__}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise CorruptCacheError(f"{where}: unknown field(s) {sorted(unknown)} in {cls.__name__}.")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            has_default = (
                f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            )
            if has_default:
                continue
            raise CorruptCacheError(f"{where}: missing field {cls.__name__}.{name}.")
        values[name] = _coerce(hints[name], raw[name], f"{where}: {cls.__name__}.{name}")
    return cls(**values)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise CorruptCacheError(f"{where}: expected a list.")
        return [_coerce(args[0], v, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise CorruptCacheError(f"{where}: expected an object.")
        return {_coerce(args[0], k, where): _coerce(args[1], v, where) for k, v in value.items()}
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint)
    if not ok:
        raise CorruptCacheError(
            f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r:.60}."
        )
    return float(value) if hint is float else value


@dataclass
class PartArrays:
    """The content of one part in memory, in the layout both backends store.

    Shapes: ``input_ids`` (tokens,), ``seq_offsets`` (sequences + 1,) with
    ``seq_offsets[0] == 0`` and ``[-1] == tokens``; top-k: ``target_ids`` and
    ``target_logprobs`` (tokens, k); sampled: ``target_ids`` and ``target_counts`` (entries,),
    ``target_lengths`` (tokens,), and ``target_logprobs`` None. The reader's decoded view
    (`logitcache.read.reader.Cache.read_decoded`) is always the top-k shape, -inf padded.
    """

    input_ids: Any
    target_ids: Any
    target_logprobs: Any
    seq_offsets: Any
    target_counts: Any = None
    target_lengths: Any = None

    def arrays(self) -> dict[str, Any]:
        """{name: array} of the arrays this part holds (the ones that are not None)."""
        names = (*KIND_ARRAYS["topk"], "target_counts", "target_lengths")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @property
    def tokens(self) -> int:
        return int(self.seq_offsets[-1])

    @property
    def sequences(self) -> int:
        return len(self.seq_offsets) - 1
