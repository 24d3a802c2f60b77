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

Classification caches (format 1.3, ``task`` set) use the same axes for another content: a
sequence is one input example and its positions are its views (one position when the dump made
no views). Their parts hold no ``input_ids``; instead ``labels`` (tokens,) holds the example's
hard label on each of its rows where the data has labels, and ``views`` (tokens, 5) the crop box
and flip of each augmented view (`logitcache.examples.views` makes and replays them).

A masked-LM cache (format 1.3, ``masking`` set) stores its targets only at the
masked positions: ``target_positions`` and ``target_labels`` (masked,) say where each target row
belongs on the token axis and which token the masking replaced there, and every target array has
a row per masked position instead of per token.
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
#: them is still written as 1.0, which every 1.x reader reads (`version_for`). 1.3 adds
#: `ensemble` (targets of several teachers' average: `logitcache.format.ensemble`), `task`
#: (classification caches: one sequence per example, one position per view),
#: `layout.offsets` (`dump --offsets`: each sequence's text and each token's character span),
#: masked-LM caches (`masking`, `teacher.kind`, `parts[i].masked`, targets at masked
#: positions only) and top-p targets (`kind` "topp", `targets.top_p` and `min_k`).
READER_VERSION = "1.3"
MERGED_FORMAT_VERSION = "1.1"
GAPS_FORMAT_VERSION = "1.2"
ENSEMBLE_FORMAT_VERSION = "1.3"
TASK_FORMAT_VERSION = "1.3"
OFFSETS_FORMAT_VERSION = "1.3"
MASKED_FORMAT_VERSION = "1.3"
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
#: 1.3, `layout.offsets`: the arrays that give each sequence's text and each token's span in it.
TEXT_ARRAYS = ("text", "text_offsets", "token_offsets")
#: The two arrays a masked-LM cache's part adds (format 1.3), one entry per masked position.
MASKED_ARRAYS = ("target_positions", "target_labels")
#: What `teacher.kind` may say: a causal LM (predicts the next token) or a masked LM (1.3).
TEACHER_KINDS = ("causal", "masked")
LOGPROB_DTYPES = ("float16", "float32", "uint8")
ORDERS = ("descending", "id")
#: Task kinds (1.3): what one sequence of the cache is. A cache without `task` is a causal LM's.
TASK_KINDS = ("classification",)
#: What a classification teacher read (`TaskInfo.input`).
TASK_INPUTS = ("image", "array", "text")
#: Augmentations a classification dump may declare (`TaskInfo.augment`): "" (the examples as
#: they are) or random resized crops with optional horizontal flips (`logitcache.examples.views`).
AUGMENTS = ("", "crop")
#: Per view, in this order (the columns of the `views` array).
VIEW_FIELDS = ("top", "left", "height", "width", "flip")
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
#: Element type of `target_positions` (1.3): a masked position on its part's token axis.
POSITION_DTYPE = "uint32"


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
    kind: str = "causal"  # 1.3: "masked" for a masked-LM teacher (then `Manifest.masking`)


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
class TaskInfo:
    """Format 1.3: a classification cache. Sequence s is input example s (in input order),
    and its `views` positions (1 without views) are the rows the teacher scored; `vocab_size`
    counts classes. The augmentation is declared here and each view's own draw stored in the
    part's ``views`` array, so a trainer replays exactly the crops the teacher saw.

    `shape` is one example as the teacher read it: (channels, height, width) for images, the
    array's shape for arrays, (seq_len,) for text (token ids; the tokenizer is the manifest's
    `tokenizer`). Views crop `shape`'s last two axes and resize to them; text has none.
    """

    kind: str  # "classification"
    input: str  # "image", "array" or "text"
    shape: list[int]
    labels: bool  # whether parts hold `labels` (the data had a label for every example)
    views: int = 0  # 0: one row per example, the example itself; N: N augmented views
    augment: str = ""  # "" or "crop": random resized crop (+ flip), see AUGMENTS
    scale: list[float] = field(default_factory=list)  # crop: [min, max] area fraction
    ratio: list[float] = field(default_factory=list)  # crop: [min, max] aspect ratio w / h
    flip: bool = False  # crop: a horizontal flip with probability 1/2
    seed: int = 0  # crop: the seed of the draws
    #: The teacher's class names in id order (a Hugging Face config's id2label), [] where it
    #: names none (a factory): with the class count, the label space ensembles must share.
    classes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MaskingInfo:
    """How a masked-LM dump masked its input (format 1.3), BERT's recipe: each position that is
    not a special token is chosen with probability `prob`; a chosen one became `mask_token_id`
    with probability `replace_mask`, a uniformly random id with `replace_random`, else stayed
    as it was. Each sequence of the data was masked `views` times (consecutive sequences of the
    cache), every masking drawn from (`seed`, the sequence's storage index)."""

    prob: float
    mask_token_id: int
    seed: int
    views: int = 1
    replace_mask: float = 0.8
    replace_random: float = 0.1


@dataclass(frozen=True)
class LayoutInfo:
    """How sequences are cut and grouped into parts and chunks."""

    seq_len: int
    packing: bool
    sequences_per_part: int
    chunk_bytes: int
    #: 1.3: each part also holds its sequences' text and each token's character span in it
    #: (`TEXT_ARRAYS`), so that a student with another tokenizer can re-tokenize the same text
    #: and pair its positions with the teacher's (`trainer fit --loss uld`).
    offsets: bool = False


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
    text_bytes: int = 0  # 1.3, layout.offsets: UTF-8 bytes of the part's text array
    masked: int = 0  # 1.3, masked-LM caches: positions with targets (rows of the target arrays)

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
class EnsembleMember:
    """One teacher of an ensemble (format 1.3) and its share of the average."""

    teacher: TeacherInfo
    weight: float  # normalised: the members' weights sum to 1
    #: Made by `logitcache ensemble` from separate caches: the member cache's location as given
    #: and its own targets record (what the approximation bound of docs/FORMAT.md reads);
    #: empty and None in a one-pass ensemble dump.
    cache: str = ""
    targets: TargetInfo | None = None


@dataclass(frozen=True)
class EnsembleInfo:
    """The targets are those of the members' average (format 1.3): ``mode`` "logits", the
    weighted mean of their logits; "probs", the weighted mean of their probabilities at the
    targets' temperature. The manifest's `teacher` record is then the ensemble's identity
    (`logitcache.format.ensemble.ensemble_teacher`)."""

    mode: str
    members: list[EnsembleMember]


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
    ensemble: EnsembleInfo | None = None  # format 1.3: targets of several teachers' average
    task: TaskInfo | None = None  # format 1.3: a classification cache; None for a causal LM
    masking: MaskingInfo | None = None  # format 1.3: a masked-LM cache

    @property
    def masked(self) -> int:
        """Positions with targets over the whole cache: `tokens`, or for a masked-LM cache the
        masked positions only."""
        return sum(p.masked for p in self.parts) if self.masking else self.tokens

    def settings(self) -> dict[str, Any]:
        """Everything that decides the cache's content: a resumed dump must match it exactly."""
        ensemble = {"ensemble": dataclasses.asdict(self.ensemble)} if self.ensemble else {}
        return ensemble | {
            "backend": self.backend,
            "teacher": dataclasses.asdict(self.teacher),
            "tokenizer": dataclasses.asdict(self.tokenizer),
            "data": dataclasses.asdict(self.data),
            "targets": dataclasses.asdict(self.targets),
            "layout": dataclasses.asdict(self.layout),
            "codec": dataclasses.asdict(self.codec),
            "task": None if self.task is None else dataclasses.asdict(self.task),
            "masking": None if self.masking is None else dataclasses.asdict(self.masking),
        }

    def to_json(self) -> str:
        doc = dataclasses.asdict(self)
        if not doc["merged_from"]:  # optional (1.1): absent from dumps, which stay 1.0
            del doc["merged_from"]
        if doc["ensemble"] is None:  # optional (1.3): absent from a single teacher's cache
            del doc["ensemble"]
        else:
            for member in doc["ensemble"]["members"]:
                if member["targets"] is None:  # a one-pass dump's members: no cache of their own
                    del member["cache"], member["targets"]
        if doc["task"] is None:  # optional (1.3): absent from causal-LM caches
            del doc["task"]
        if doc["masking"] is None:  # optional (1.3): only masked-LM caches have it
            del doc["masking"]
        for record, defaults in _ADDED_IN_1_1.items():  # absent means the default
            for entry in doc["parts"] if record == "parts" else [doc[record]]:
                for name, default in defaults.items():
                    if entry.get(name) == default:
                        del entry[name]
        return json.dumps(doc, indent=2, sort_keys=False) + "\n"


#: Fields added to existing records in 1.1 (`codec.gaps` in 1.2; `layout.offsets`,
#: `parts[].text_bytes`, `targets.top_p` and `min_k` in 1.3), and the values they take where
#: unused: left out of the JSON at these values.
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
    "layout": {"offsets": False},
    "parts": {"entries": 0, "text_bytes": 0, "masked": 0},
    "teacher": {"kind": "causal"},  # 1.3
}


def version_for(m: Manifest) -> str:
    """The oldest format version that describes `m`: 1.3 for an ensemble, a task, offsets or
    a masked LM, 1.2 with gaps, else 1.1 if a 1.1 feature is used, else 1.0."""
    if m.ensemble is not None:
        return ENSEMBLE_FORMAT_VERSION
    if m.task is not None:
        return TASK_FORMAT_VERSION
    if m.layout.offsets:
        return OFFSETS_FORMAT_VERSION
    if m.masking is not None:
        return MASKED_FORMAT_VERSION
    if m.targets.kind == "topp":
        return TOPP_FORMAT_VERSION
    if m.codec.gaps:
        return GAPS_FORMAT_VERSION
    return MERGED_FORMAT_VERSION if m.merged_from or targets_need_1_1(m) else FORMAT_VERSION


def refuse_masked(m: Manifest, what: str) -> None:
    """Refuse a masked-LM cache (1.3) in `what`, a conversion that has no place yet for its
    masked positions and labels."""
    if m.masking is not None:
        raise LogitCacheError(
            f"{what} does not take masked-LM caches yet (format 1.3: targets at masked positions "
            "only); read this one with logitcache.open or train on it with `trainer fit`."
        )


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


def array_names(
    kind: str, task: TaskInfo | None = None, offsets: bool = False, masked: bool = False
) -> tuple[str, ...]:
    """The arrays a part of a cache with targets of `kind` holds: with `task` (1.3), a
    classification cache's; with `offsets` (1.3), its text too (`TEXT_ARRAYS`); `masked`: a
    masked-LM cache, whose parts add `MASKED_ARRAYS`."""
    if task is None:
        return (
            KIND_ARRAYS[kind] + (TEXT_ARRAYS if offsets else ()) + (MASKED_ARRAYS if masked else ())
        )
    inputs = ("labels",) if task.labels else ()
    return (*inputs, *KIND_ARRAYS[kind][1:], *(("views",) if task.views else ()))


def target_rows(m: Manifest, part: PartInfo) -> int:
    """The rows of `part`'s target arrays: a row per token, or per masked position."""
    return part.masked if m.masking is not None else part.tokens


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
    also the float32 log-probs of the decoded (tokens, k) view; with offsets, the text and the
    spans)."""
    text = 0
    if m.layout.offsets:
        text = part.text_bytes + (part.sequences + 1) * 8 + part.tokens * 8
    return text + _target_part_bytes(m, part)


def _target_part_bytes(m: Manifest, part: PartInfo) -> int:
    id_size = {"uint8": 1, "uint16": 2, "uint32": 4}.get(m.targets.id_dtype, 4)
    lp_size = {"float16": 2, "uint8": 1}.get(m.targets.logprob_dtype, 4)
    if m.task is not None:  # no input ids; labels in the id type, views 5 int32 per row
        id_size += 4 * len(VIEW_FIELDS) if m.task.views else 0
    if m.targets.kind in RAGGED_KINDS:  # counts (sample) or log-probs (topp) per entry
        count_size = 2 if m.targets.count_dtype == "uint16" else 1
        entry_size = count_size if m.targets.kind == "sample" else lp_size
        per_token = id_size * (1 + m.targets.k) + 4 * m.targets.k + count_size
        masked = part.masked * (4 + id_size + 8)  # positions, labels, and the decoded labels
        return (
            part.tokens * per_token + part.entries * entry_size + masked
            + (part.sequences + 1) * 8
        )  # fmt: skip
    per_token = id_size * (1 + m.targets.k) + lp_size * m.targets.k
    masked = part.masked * (4 + id_size + 8)  # positions, labels, and the decoded labels
    return part.tokens * per_token + masked + (part.sequences + 1) * 8


def expected_arrays(m: Manifest, part: PartInfo) -> dict[str, tuple[tuple[int, ...], str]]:
    """{array name: (shape, dtype)} that part `part` must hold, from the manifest alone."""
    if m.task is not None:
        arrays = _target_arrays(m, part)
        rows = {
            "labels": ((part.tokens,), m.targets.id_dtype),
            "views": ((part.tokens, len(VIEW_FIELDS)), "int32"),
        }
        names = array_names(m.targets.kind, m.task)
        return {name: arrays[name] if name in arrays else rows[name] for name in names}
    text = {}
    if m.layout.offsets:
        text = {
            "text": ((part.text_bytes,), "uint8"),
            "text_offsets": ((part.sequences + 1,), "int64"),
            "token_offsets": ((part.tokens, 2), "uint32"),
        }
    return _target_arrays(m, part) | text


def _target_arrays(m: Manifest, part: PartInfo) -> dict[str, tuple[tuple[int, ...], str]]:
    """The input ids and the targets of the cache's kind (what every causal-LM part holds)."""
    t, k, ids = m.targets, m.targets.k, m.targets.id_dtype
    rows = target_rows(m, part)
    if t.kind in RAGGED_KINDS:
        values = (
            ("target_counts", t.count_dtype)
            if t.kind == "sample"
            else ("target_logprobs", t.logprob_dtype)
        )
        shapes = {
            "input_ids": ((part.tokens,), ids),
            "target_ids": ((part.entries,), ids),
            values[0]: ((part.entries,), values[1]),
            "target_lengths": ((rows,), t.count_dtype),
            "seq_offsets": ((part.sequences + 1,), "int64"),
        }
    else:
        shapes = {
            "input_ids": ((part.tokens,), ids),
            "target_ids": ((rows, k), ids),
            "target_logprobs": ((rows, k), t.logprob_dtype),
            "seq_offsets": ((part.sequences + 1,), "int64"),
        }
    if m.masking is not None:
        shapes["target_positions"] = ((rows,), POSITION_DTYPE)
        shapes["target_labels"] = ((rows,), ids)
    return shapes


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
    Classification (1.3): ``input_ids`` None, ``labels`` (tokens,) if the data had labels,
    ``views`` (tokens, 5) int32 with views.
    With ``layout.offsets`` (1.3): ``text`` (text bytes,) uint8, the UTF-8 text of the
    sequences end to end; ``text_offsets`` (sequences + 1,) int64, sequence s's text is bytes
    ``text_offsets[s]:text_offsets[s + 1]``; ``token_offsets`` (tokens, 2) uint32, each token's
    [start, end) in characters of its sequence's text.
    A masked-LM cache (1.3) adds
    ``target_positions`` and ``target_labels`` (masked,), and its target arrays have a row per
    masked position. The reader's decoded view (`logitcache.read.reader.Cache.read_decoded`) is
    always the top-k shape, -inf padded, a row per token; for a masked-LM cache
    ``target_labels`` is then (tokens,) int64, -1 where a position has no target.
    """

    input_ids: Any
    target_ids: Any
    target_logprobs: Any
    seq_offsets: Any
    target_counts: Any = None
    target_lengths: Any = None
    labels: Any = None
    views: Any = None
    text: Any = None
    text_offsets: Any = None
    token_offsets: Any = None
    target_positions: Any = None
    target_labels: Any = None

    def arrays(self) -> dict[str, Any]:
        """{name: array} of the arrays this part holds (the ones that are not None)."""
        names = (*KIND_ARRAYS["topk"], "target_counts", "target_lengths", "labels", "views",
                 *TEXT_ARRAYS, *MASKED_ARRAYS)  # fmt: skip
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @property
    def tokens(self) -> int:
        return int(self.seq_offsets[-1])

    @property
    def sequences(self) -> int:
        return len(self.seq_offsets) - 1
