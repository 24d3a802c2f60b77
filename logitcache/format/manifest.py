"""The cache format, version 1: names, layout and the manifest schema.

This module and `logitcache.format.parse` (which reads a manifest back: the strict schema check
and the bounds) are the only contract between the writer (`logitcache.write.writer`, used by
`dump`) and the reader (`logitcache.read.reader`, used by the trainer): neither imports the other.
`docs/FORMAT.md` describes the same layout in prose, byte by byte, for readers that do not use
this package.

A cache is a directory::

    manifest.json            the commit point: what is listed here is complete and checksummed
    parts/part-000000/       one unit of work (zarr backend: a Zarr v3 group)
    parts/part-000000.parquet                 (parquet backend: one Parquet file)

Each part holds, for its sequences laid end to end on one token axis:
``input_ids`` (tokens,), the targets, and ``seq_offsets`` (sequences + 1,) so that sequence
``s`` of the part is tokens ``seq_offsets[s]:seq_offsets[s + 1]``. Top-k targets are
``target_ids`` and ``target_logprobs`` (tokens, k); sampled targets (format 1.1) are ragged:
``target_ids`` and ``target_counts`` (entries,) with ``target_lengths`` (tokens,) entries per
position; top-p targets (format 1.3) are ragged the same way, ``target_ids`` and
``target_logprobs`` (entries,) with ``target_lengths`` (tokens,).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from logitcache.errors import LogitCacheError

FORMAT_NAME = "logitcache"
FORMAT_VERSION = (
    "1.0"  # major.minor: a reader refuses a newer major, reads every older one it knows
)
#: The newest version this package reads. 1.1 adds optional fields: `merged_from` (written only
#: by `logitcache merge`), sampled targets, uint8 log-probs, id order, temperature, delta
#: filters; 1.2 adds `codec.gaps` (ids stored as per-position gaps). A cache that uses none of
#: them is still written as 1.0, which every 1.x reader reads (`version_for`). 1.3 adds top-p
#: targets (`kind` "topp", `targets.top_p` and `min_k`).
READER_VERSION = "1.3"
MERGED_FORMAT_VERSION = "1.1"
GAPS_FORMAT_VERSION = "1.2"
TOPP_FORMAT_VERSION = "1.3"
KNOWN_MAJORS = (1,)
MANIFEST_NAME = "manifest.json"
PARTS_DIR = "parts"
ARRAY_NAMES = ("input_ids", "target_ids", "target_logprobs", "seq_offsets")
BACKENDS = ("zarr", "parquet")
TARGET_KINDS = ("topk", "sample", "topp")
#: The kinds whose positions hold a varying number of entries (`target_lengths`, `entries`).
RAGGED_KINDS = ("sample", "topp")
#: The arrays of a part, by target kind (`PartArrays` fields; None for the others).
KIND_ARRAYS = {
    "topk": ("input_ids", "target_ids", "target_logprobs", "seq_offsets"),
    "sample": ("input_ids", "target_ids", "target_counts", "target_lengths", "seq_offsets"),
    "topp": ("input_ids", "target_ids", "target_logprobs", "target_lengths", "seq_offsets"),
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
    position can hold, ``min(samples, vocab_size)``. ``kind`` "topp" (1.3): per position the
    fewest most probable ids whose probabilities reach `top_p`, at least `min_k` and at most
    `k` of them, with log-probs as for top-k (so the tail mass is exact here too).
    """

    kind: str
    k: int
    temperature: float
    id_dtype: str
    logprob_dtype: str  # float16, float32, uint8 (1.1: quantised, see logprob_scale); sample: none
    order: str = "descending"  # or "id" (1.1): ids increasing within each position
    # added in 1.1 (left out of the JSON at these defaults)
    samples: int = 0  # sample: draws per position (N)
    count_dtype: str = ""  # sample: uint8 (N <= 255) or uint16; topp: of target_lengths (k)
    logprob_scale: float = 0.0  # uint8 log-probs: stored q means log-prob -q / logprob_scale
    seed: int = 0  # sample: the seed of the draws (logitcache.dumping.sampling)
    # added in 1.3, topp only (left out of the JSON at these defaults)
    top_p: float = 0.0  # the probability mass each position's ids reach, in (0, 1]
    min_k: int = 0  # the fewest ids a position holds, 1..k


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
    #: 1.1: arrays put through a delta *filter* before compression (zarr: numcodecs.delta, which
    #: is not in the Zarr v3 specification; parquet: DELTA_BINARY_PACKED). Only with --delta.
    delta: list[str] = field(default_factory=list)
    #: 1.2: arrays whose stored *values* are per-position gaps (a position's first id as is, each
    #: next one minus the one before it; `logitcache.format.codecs.decode_gaps`): plain integers
    #: that every Zarr and Parquet reader reads, decoded by a cumulative sum.
    gaps: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PartInfo:
    """A committed unit: its sequences and tokens, and the sha256 of every file it is made of,
    keyed by the file's '/'-separated path relative to the cache's parts/ directory."""

    name: str
    sequences: int
    tokens: int
    files: dict[str, str]
    entries: int = 0  # 1.1, sampled targets: (id, count) pairs; 1.3, topp: (id, log-prob) pairs

    def file_as(self, rel: str, name: str) -> str:
        """The path of this part's file `rel` once the part is renamed `name` (merge and the
        sharded join renumber parts: ``part-000003/x/c/0`` -> ``part-000010/x/c/0``)."""
        return name + rel[len(self.name) :]

    def renamed(self, name: str) -> PartInfo:
        """This part under the name `name`, its files keyed by their new paths."""
        files = {self.file_as(rel, name): digest for rel, digest in self.files.items()}
        return dataclasses.replace(self, name=name, files=files)


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


#: Fields added to existing records in 1.1 (`codec.gaps` in 1.2, `targets.top_p` and `min_k` in
#: 1.3), and the values they take where unused: left out of the JSON at these values.
_ADDED_IN_1_1 = {
    "targets": {
        "samples": 0,
        "count_dtype": "",
        "logprob_scale": 0.0,
        "seed": 0,
        "top_p": 0.0,
        "min_k": 0,
    },
    "codec": {"delta": [], "gaps": []},
    "parts": {"entries": 0},
}


def version_for(m: Manifest) -> str:
    """The oldest format version that describes `m`: 1.3 with top-p targets, 1.2 with gaps,
    else 1.1 if a 1.1 feature is used, else 1.0."""
    if m.targets.kind == "topp":
        return TOPP_FORMAT_VERSION
    if m.codec.gaps:
        return GAPS_FORMAT_VERSION
    return MERGED_FORMAT_VERSION if m.merged_from or targets_need_1_1(m) else FORMAT_VERSION


def nonstandard_filters(m: Manifest) -> list[str]:
    """The filters of `m` that are not in the Zarr v3 specification or its registered
    extensions, one phrase each; empty for a cache every conforming reader opens (zarr-python,
    tensorstore, zarrs, pyarrow, ...). Only the zarr backend's delta filter (numcodecs.delta,
    written with --delta) is one: Parquet's DELTA_BINARY_PACKED is in the Parquet format."""
    if m.backend != "zarr":
        return []
    return [f"numcodecs.delta on {name}" for name in m.codec.delta]


def targets_need_1_1(m: Manifest) -> bool:
    """Whether `m`'s targets or codec use a 1.1 feature (so 1.0 cannot describe them)."""
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


def part_bytes(m: Manifest, part: PartInfo) -> int:
    """Decoded size of one part: what a reader allocates to hold it whole (for sampled targets,
    also the float32 log-probs of the decoded (tokens, k) view)."""
    id_size = {"uint8": 1, "uint16": 2, "uint32": 4}.get(m.targets.id_dtype, 4)
    lp_size = {"float16": 2, "uint8": 1}.get(m.targets.logprob_dtype, 4)
    if m.targets.kind in RAGGED_KINDS:  # counts (sample) or log-probs (topp) per entry
        count_size = 2 if m.targets.count_dtype == "uint16" else 1
        entry_size = count_size if m.targets.kind == "sample" else lp_size
        per_token = id_size * (1 + m.targets.k) + 4 * m.targets.k + count_size
        return part.tokens * per_token + part.entries * entry_size + (part.sequences + 1) * 8
    per_token = id_size * (1 + m.targets.k) + lp_size * m.targets.k
    return part.tokens * per_token + (part.sequences + 1) * 8


def expected_arrays(m: Manifest, part: PartInfo) -> dict[str, tuple[tuple[int, ...], str]]:
    """{array name: (shape, dtype)} that part `part` must hold, from the manifest alone."""
    t, k, ids = m.targets, m.targets.k, m.targets.id_dtype
    if t.kind in RAGGED_KINDS:
        values = (
            ("target_counts", t.count_dtype)
            if t.kind == "sample"
            else ("target_logprobs", t.logprob_dtype)
        )
        return {
            "input_ids": ((part.tokens,), ids),
            "target_ids": ((part.entries,), ids),
            values[0]: ((part.entries,), values[1]),
            "target_lengths": ((part.tokens,), t.count_dtype),
            "seq_offsets": ((part.sequences + 1,), "int64"),
        }
    return {
        "input_ids": ((part.tokens,), ids),
        "target_ids": ((part.tokens, k), ids),
        "target_logprobs": ((part.tokens, k), t.logprob_dtype),
        "seq_offsets": ((part.sequences + 1,), "int64"),
    }


def is_part_name(name: str) -> bool:
    return bool(_PART_NAME.match(name))


@dataclass
class PartArrays:
    """The content of one part in memory, in the layout both backends store.

    Shapes: ``input_ids`` (tokens,), ``seq_offsets`` (sequences + 1,) with
    ``seq_offsets[0] == 0`` and ``[-1] == tokens``; top-k: ``target_ids`` and
    ``target_logprobs`` (tokens, k); sampled: ``target_ids`` and ``target_counts`` (entries,),
    ``target_lengths`` (tokens,), and ``target_logprobs`` None; top-p: ``target_ids`` and
    ``target_logprobs`` (entries,), ``target_lengths`` (tokens,). The reader's decoded view
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
