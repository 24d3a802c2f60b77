"""Parsing a manifest: untrusted JSON in, a checked `Manifest` out.

A cache may come from anyone (a tarball, a public bucket), so nothing in a manifest is used
before it has passed here: the strict schema (unknown, missing or ill-typed fields refused), the
format version (a newer major says to upgrade), and the bounds and cross-field invariants that a
reader relies on before it allocates anything. The schema itself, the dataclasses and the
limits, is `logitcache.format.manifest`; this module only reads against it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from typing import Any

from logitcache.errors import CorruptCacheError, LogitCacheError
from logitcache.format.ensemble import MODES, WEIGHT_TOLERANCE, ensemble_teacher
from logitcache.format.manifest import (
    AUGMENTS,
    BACKENDS,
    ENSEMBLE_FORMAT_VERSION,
    FORMAT_NAME,
    GAPS_FORMAT_VERSION,
    KIND_ARRAYS,
    KNOWN_MAJORS,
    LOGPROB_DTYPES,
    MANIFEST_NAME,
    MASKED_FORMAT_VERSION,
    MAX_K,
    MAX_MANIFEST_BYTES,
    MAX_PART_BYTES,
    MAX_SAMPLES,
    MAX_SEQ_LEN,
    MERGED_FORMAT_VERSION,
    OFFSETS_FORMAT_VERSION,
    ORDERS,
    RAGGED_KINDS,
    READER_VERSION,
    SHUFFLES,
    TARGET_KINDS,
    TASK_FORMAT_VERSION,
    TASK_INPUTS,
    TASK_KINDS,
    TEACHER_KINDS,
    TOPP_FORMAT_VERSION,
    Manifest,
    id_dtype_for,
    part_bytes,
    part_name,
    target_rows,
    targets_need_1_1,
)


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
    problems += _target_problems(m) + _masking_problems(m)
    if m.task is not None:
        problems += _task_problems(m)
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
        elif m.task is not None and part.tokens != part.sequences * m.layout.seq_len:
            problems.append(f"{part.name}: {part.tokens} rows is not one per view of each example")
        elif m.masking is not None and not 0 < part.masked <= part.tokens:
            problems.append(f"{part.name}: {part.masked} masked positions is out of bounds")
        elif m.masking is None and part.masked:
            problems.append(f"{part.name}: masked positions in a cache without masking")
        elif m.targets.kind in RAGGED_KINDS and not (
            target_rows(m, part) <= part.entries <= target_rows(m, part) * m.targets.k
        ):
            problems.append(f"{part.name}: {part.entries} entries is out of bounds")
        elif part.text_bytes and not m.layout.offsets:
            problems.append(f"{part.name}: text_bytes without layout.offsets")
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
    if m.ensemble is not None:
        problems += _ensemble_problems(m)
    if problems:
        raise CorruptCacheError(f"{source} is inconsistent: " + "; ".join(problems) + ".")


def _ensemble_problems(m: Manifest) -> list[str]:
    """An ensemble record (1.3): its mode, at least two members, weights that are a mixture,
    one vocabulary, and a teacher record that is the ensemble's identity."""
    e, problems = m.ensemble, []
    assert e is not None
    if _version_tuple(m.format_version) < _version_tuple(ENSEMBLE_FORMAT_VERSION):
        problems.append(f"ensemble needs format_version {ENSEMBLE_FORMAT_VERSION} or later")
    if e.mode not in MODES:
        problems.append(f"ensemble.mode {e.mode!r} is not one of {MODES}")
    weights = [member.weight for member in e.members]
    if len(weights) < 2:
        problems.append("an ensemble needs at least two members")
    elif not all(math.isfinite(w) and w > 0 for w in weights) or not math.isclose(
        math.fsum(weights), 1.0, abs_tol=WEIGHT_TOLERANCE
    ):
        problems.append("ensemble weights must be positive and sum to 1")
    elif any(member.teacher.vocab_size != m.teacher.vocab_size for member in e.members):
        problems.append("every ensemble member must have the cache's vocab_size")
    elif ensemble_teacher(e.mode, e.members) != m.teacher:
        problems.append("the teacher record is not the identity of the ensemble's members")
    return problems


def _masking_problems(m: Manifest) -> list[str]:
    """A masked-LM cache (1.3): `masking` present exactly when the teacher is a masked LM, its
    probabilities in range, and a format version that describes it."""
    mk, problems = m.masking, []
    if m.teacher.kind not in TEACHER_KINDS:
        return [f"teacher.kind {m.teacher.kind!r} is not one of {TEACHER_KINDS}"]
    if (mk is not None) != (m.teacher.kind == "masked"):
        return ['masking is given exactly when teacher.kind is "masked"']
    if mk is None:
        return []
    if not 0 < mk.prob < 1:
        problems.append(f"masking.prob {mk.prob} is not in (0, 1)")
    replace = (mk.replace_mask, mk.replace_random)
    if min(replace) < 0 or sum(replace) > 1:
        problems.append("masking.replace_mask and replace_random must be >= 0, summing to <= 1")
    if mk.views < 1 or not 0 <= mk.mask_token_id < m.teacher.vocab_size:
        problems.append("masking.views must be positive and mask_token_id a teacher id")
    if _version_tuple(m.format_version) < _version_tuple(MASKED_FORMAT_VERSION):
        problems.append(f"masking needs format_version {MASKED_FORMAT_VERSION} or later")
    return problems


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
    else:  # topk and topp: log-probs over the full vocabulary
        if t.logprob_dtype not in LOGPROB_DTYPES:
            problems.append(f"logprob_dtype {t.logprob_dtype!r} is not one of {LOGPROB_DTYPES}")
        if t.order not in ORDERS:
            problems.append(f"order {t.order!r} is not one of {ORDERS}")
        scaled = t.logprob_dtype == "uint8"
        if scaled != (math.isfinite(t.logprob_scale) and t.logprob_scale > 0):
            problems.append("logprob_scale must be positive for uint8 log-probs, else 0")
        if t.samples or t.seed:
            problems.append("samples and seed are for sampled targets only")
    if t.kind == "topp":
        problems += _topp_problems(m)
    elif t.count_dtype and t.kind != "sample":
        problems.append("count_dtype is for sampled and top-p targets only")
    if t.kind != "topp" and (t.top_p or t.min_k):
        problems.append("top_p and min_k are for top-p targets only")
    if m.codec.shuffle not in SHUFFLES:
        problems.append(f"codec.shuffle {m.codec.shuffle!r} is not one of {SHUFFLES}")
    if t.kind in KIND_ARRAYS:
        allowed = {n for n in KIND_ARRAYS[t.kind] if n not in ("seq_offsets", "target_logprobs")}
        if t.logprob_dtype == "uint8":
            allowed.add("target_logprobs")
        if not set(m.codec.delta) <= allowed or len(set(m.codec.delta)) != len(m.codec.delta):
            problems.append(f"codec.delta {m.codec.delta} names arrays outside {sorted(allowed)}")
        # gaps: only the ragged ids of sampled targets, never also through a delta filter
        gaps = {"target_ids"} if t.kind == "sample" else set()
        if not set(m.codec.gaps) <= gaps or len(set(m.codec.gaps)) != len(m.codec.gaps):
            problems.append(f"codec.gaps {m.codec.gaps} names arrays outside {sorted(gaps)}")
        elif set(m.codec.gaps) & set(m.codec.delta):
            problems.append(f"codec.gaps and codec.delta both name {sorted(m.codec.gaps)}")
    if m.layout.offsets and _version_tuple(m.format_version) < _version_tuple(
        OFFSETS_FORMAT_VERSION
    ):
        problems.append(
            f"format_version {m.format_version} cannot describe layout.offsets (it needs "
            f"{OFFSETS_FORMAT_VERSION})"
        )
    if m.codec.gaps and _version_tuple(m.format_version) < _version_tuple(GAPS_FORMAT_VERSION):
        problems.append(
            f"format_version {m.format_version} cannot describe codec.gaps (it needs "
            f"{GAPS_FORMAT_VERSION})"
        )
    if not problems and targets_need_1_1(m) and _version_tuple(m.format_version) < (1, 1):
        problems.append(
            f"format_version {m.format_version} cannot describe these targets or this codec "
            f"(they need {MERGED_FORMAT_VERSION})"
        )
    return problems


def _task_problems(m: Manifest) -> list[str]:
    """The `task` record (1.3): one sequence per example with exactly one row per view, the
    augmentation's parameters in range, and the layout and version that describe it."""
    task, problems = m.task, []
    assert task is not None
    if task.kind not in TASK_KINDS or task.input not in TASK_INPUTS:
        problems.append(
            f"task {task.kind!r} of {task.input!r} is not one of {TASK_KINDS} of {TASK_INPUTS}"
        )
    if not 1 <= len(task.shape) <= 4 or not all(1 <= n <= 1 << 16 for n in task.shape):
        problems.append(f"task.shape {task.shape} is not 1 to 4 sizes in 1..65536")
    if not 0 <= task.views <= MAX_SEQ_LEN or m.layout.seq_len != max(1, task.views):
        problems.append(f"task.views={task.views} does not match layout.seq_len={m.layout.seq_len}")
    if m.layout.packing:
        problems.append("a classification cache is stored unpacked (layout.packing false)")
    if task.augment not in AUGMENTS or (task.augment == "crop") != (task.views > 0):
        problems.append(f"task.augment {task.augment!r} must be 'crop' with views, else ''")
    elif task.augment == "crop":
        if len(task.scale) != 2 or not 0 < task.scale[0] <= task.scale[1] <= 1:
            problems.append(f"task.scale {task.scale} is not [min, max] with 0 < min <= max <= 1")
        if len(task.ratio) != 2 or not 0 < task.ratio[0] <= task.ratio[1] < math.inf:
            problems.append(f"task.ratio {task.ratio} is not [min, max] with 0 < min <= max")
        if len(task.shape) < 2:
            problems.append("crops need examples with two spatial axes")
    elif task.scale or task.ratio or task.flip or task.seed:
        problems.append("task.scale, ratio, flip and seed are for augment 'crop' only")
    if task.input == "text" and (len(task.shape) != 1 or task.views or not m.tokenizer.fingerprint):
        problems.append("a text task has shape [seq_len], no views and a tokenizer")
    if task.classes and len(task.classes) != m.teacher.vocab_size:
        problems.append(f"task.classes names {len(task.classes)} classes, not vocab_size")
    if _version_tuple(m.format_version) < _version_tuple(TASK_FORMAT_VERSION):
        problems.append(f"a task needs format_version {TASK_FORMAT_VERSION} or later")
    return problems


def _topp_problems(m: Manifest) -> list[str]:
    """Top-p targets (1.3): the coverage in (0, 1], 1 <= min_k <= k, the lengths' type."""
    t, problems = m.targets, []
    if not (math.isfinite(t.top_p) and 0 < t.top_p <= 1):
        problems.append(f"top_p={t.top_p} is not in (0, 1]")
    if not 1 <= t.min_k <= t.k:
        problems.append(f"min_k={t.min_k} is not in 1..k={t.k}")
    if t.count_dtype != ("uint8" if t.k <= 255 else "uint16"):
        problems.append(f"count_dtype {t.count_dtype!r} does not fit k={t.k} ids per position")
    if _version_tuple(m.format_version) < _version_tuple(TOPP_FORMAT_VERSION):
        problems.append(
            f"format_version {m.format_version} cannot describe top-p targets (they need "
            f"{TOPP_FORMAT_VERSION})"
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
