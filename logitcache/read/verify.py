"""`verify`: read every byte of a cache and check it against its manifest and the format's rules.

Checks, per part: each file's sha256 against the manifest (names the file), each chunk decoded
through its crc32c (names the chunk), and the invariants a reader relies on: ids below the
vocabulary size, offsets that start at 0, grow, and end at the token count, and counts equal to
the manifest's; for top-k targets, log-probs finite and at most 0, in the stored order
(decreasing, or ids increasing), and no position whose stored probabilities exceed 1 by more
than the value codec's documented worst-case error allows (`logitcache.format.codecs`); for sampled
targets, every position's distinct ids increasing, counts at least 1 and summing to exactly N.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from logitcache.errors import LogitCacheError
from logitcache.format import codecs
from logitcache.format.manifest import (
    PARTS_DIR,
    VIEW_FIELDS,
    PartArrays,
    array_names,
    target_rows,
)
from logitcache.read.decoded import bad_views
from logitcache.read.reader import Cache, completeness_problem
from logitcache.read.texts import text_problems
from logitcache.storage.files import sha256_file
from logitcache.storage.paths import link_problem, link_under


@dataclass
class VerifyReport:
    parts: int = 0
    files: int = 0
    chunks: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(cache: Cache, on_part: Callable[[int], None] | None = None) -> VerifyReport:
    """Check every part of `cache`; problems are collected (not raised) so all are reported.

    An unfinished dump is a problem too (its committed parts are checked all the same): every
    reader refuses it, so a cache that passes verify must be one they open."""
    report = VerifyReport()
    unfinished = completeness_problem(cache.manifest, cache.root)
    if unfinished is not None:
        report.problems.append(unfinished)
    for index, info in enumerate(cache.manifest.parts):
        report.parts += 1
        try:  # a remote part is fetched here (again), each file checked against its sha256
            parts_dir = cache.parts_dir(index, refresh=True)
        except LogitCacheError as exc:
            report.problems.append(str(exc))
            continue
        bad_files = _check_files(parts_dir, info.files, report)
        if not bad_files:
            _check_chunks(cache, index, report)
        if on_part:
            on_part(index)
    return report


def _check_files(parts_dir: Path, files: dict[str, str], report: VerifyReport) -> bool:
    bad = False
    for rel, expected in files.items():
        path = parts_dir / rel
        report.files += 1
        link = link_under(parts_dir, rel)
        if link is not None:  # never hashed through: it may lead anywhere
            report.problems.append(link_problem(link))
            bad = True
        elif not path.is_file():
            report.problems.append(f"{PARTS_DIR}/{rel}: missing")
            bad = True
        elif sha256_file(path) != expected:
            report.problems.append(
                f"{PARTS_DIR}/{rel}: sha256 does not match the manifest (the file was changed or corrupted)"
            )
            bad = True
    return bad


def _check_chunks(cache: Cache, index: int, report: VerifyReport) -> None:
    """Decode every chunk (checksums), then check the invariants on the whole part."""
    name = cache.manifest.parts[index].name
    backend = cache.backend
    try:
        path = cache.part_path(index)  # checks the part's metadata against the manifest
    except LogitCacheError as exc:
        report.problems.append(str(exc))
        return
    arrays = {}
    manifest = cache.manifest
    masked = manifest.masking is not None
    for array in array_names(
        manifest.targets.kind, manifest.task, manifest.layout.offsets, masked=masked
    ):
        pieces = []
        try:
            for _, chunk in backend.iter_chunks(path, array):
                report.chunks += 1
                pieces.append(chunk)
        except Exception as exc:  # any decoding failure is a corrupt chunk, reported by name
            report.problems.append(f"{name}/{array} chunk {len(pieces)}: cannot be decoded ({exc})")
            return
        arrays[array] = np.concatenate(pieces) if pieces else np.zeros(0)
    report.problems += [
        f"{name}: {p}"
        for p in check_invariants(
            cache, index, PartArrays(**{"input_ids": None, "target_logprobs": None} | arrays)
        )
    ]


def check_invariants(cache: Cache, index: int, part: PartArrays) -> list[str]:
    """The format's rules for one part's content, as stored; an empty list when all hold."""
    m = cache.manifest
    info = m.parts[index]
    problems = []
    offsets = np.asarray(part.seq_offsets)
    if len(offsets) != info.sequences + 1 or offsets[0] != 0 or offsets[-1] != info.tokens:
        problems.append(
            f"seq_offsets do not describe {info.sequences} sequences of {info.tokens} tokens"
        )
    elif (np.diff(offsets) <= 0).any() or (np.diff(offsets) > m.layout.seq_len).any():
        problems.append(
            f"seq_offsets give a sequence that is empty or longer than seq_len={m.layout.seq_len}"
        )
    if m.task is not None:
        problems += _task_problems(m, info, part)
    elif part.input_ids.shape != (info.tokens,):
        problems.append(f"input_ids has shape {part.input_ids.shape}, expected ({info.tokens},)")
    elif part.input_ids.size and part.input_ids.max() >= m.teacher.vocab_size:
        problems.append(f"an input id is >= vocab_size {m.teacher.vocab_size}")
    if m.layout.offsets:
        problems += text_problems(part)
    if m.masking is not None:
        problems += _masked_problems(m, info, part)
    if m.targets.kind == "sample":
        return problems + _sample_problems(m, info, part)
    if m.targets.kind == "topp":
        return problems + _topp_problems(m, info, part)
    rows = target_rows(m, info)
    if (
        part.target_ids.shape != (rows, m.targets.k)
        or part.target_logprobs.shape != part.target_ids.shape
    ):
        problems.append(f"target arrays do not have shape ({rows}, {m.targets.k})")
        return problems
    return problems + _logprob_problems(m, part.target_ids, part.target_logprobs)


def _logprob_problems(m, ids: np.ndarray, stored: np.ndarray) -> list[str]:
    """Rows (T, w) of ids and stored values, one id per column: ids in the vocabulary,
    values finite and <= 0 in the stored order, and a position's mass within what the codec's
    error allows."""
    t, problems = m.targets, []
    if ids.size and ids.max() >= m.teacher.vocab_size:
        problems.append(f"a target id is >= vocab_size {m.teacher.vocab_size}")
    values = codecs.decode_logprobs(stored, t.logprob_dtype, t.logprob_scale).astype(np.float32)
    if not np.isfinite(values).all() or (values > 0).any():
        problems.append("a log-prob is not finite or is above 0")
    elif t.order == "descending" and (np.diff(values, axis=-1) > 0).any():
        problems.append("log-probs are not in decreasing order")  # rounding is monotone
    if t.order == "id" and (np.diff(ids.astype(np.int64), axis=-1) <= 0).any():
        problems.append("target ids are not strictly increasing within a position")
    # the true mass is at most 1: a lower bound above 1 proves an error beyond the codec's bound
    bound = codecs.probability_mass_bound(values, t.logprob_dtype, t.logprob_scale)
    if (bound > 1 + 1e-6).any():
        problems.append(
            "the stored probabilities of a position sum to more than 1 by more than the "
            f"{t.logprob_dtype} codec's worst-case error allows"
        )
    return problems


def _task_problems(m, info, part: PartArrays) -> list[str]:
    """Classification (1.3): labels are class ids, one per example (the same on each of its
    rows, `layout.seq_len` of them), views are boxes inside the examples."""
    problems, labels, views = [], part.labels, part.views
    if labels is not None and labels.shape != (info.tokens,):
        problems.append(f"labels has shape {labels.shape}, expected ({info.tokens},)")
    elif labels is not None and labels.size and labels.max() >= m.teacher.vocab_size:
        problems.append(f"a label is >= the class count {m.teacher.vocab_size}")
    elif labels is not None and (np.diff(labels.reshape(-1, m.layout.seq_len), axis=1) != 0).any():
        problems.append("the views of one example carry different labels")
    if views is not None:
        if views.shape != (info.tokens, len(VIEW_FIELDS)):
            problems.append(f"views has shape {views.shape}, expected ({info.tokens}, 5)")
        elif bad_views(views, *m.task.shape[-2:]).any():
            problems.append("a view is not a box inside its example, or its flip is not 0 or 1")
    return problems


def _topp_problems(m, info, part: PartArrays) -> list[str]:
    """Top-p targets: ragged arrays that add up, min_k..k ids per position, and each position's
    row as a top-k row's (`_logprob_problems`), checked a group of equal lengths at a time (the
    positions of length n, their entries taken in order, are an (positions, n) top-k block)."""
    t = m.targets
    lengths = np.asarray(part.target_lengths).astype(np.int64)
    entries = len(part.target_ids)
    if lengths.shape != (info.tokens,) or len(part.target_logprobs) != entries:
        return [f"ragged target arrays do not describe {info.tokens} positions"]
    if entries != info.entries or lengths.sum() != entries:
        return [f"target_lengths add up to {lengths.sum()}, not the {info.entries} entries stored"]
    if lengths.size and (lengths.min() < t.min_k or lengths.max() > t.k):
        return [f"a position holds fewer than min_k={t.min_k} or more than k={t.k} ids"]
    width = lengths[codecs.row_of_entries(lengths)]  # (E,) the length of each entry's position
    problems: list[str] = []
    for n in np.unique(lengths).tolist():
        of_n = width == n
        ids = np.asarray(part.target_ids)[of_n].reshape(-1, n)
        found = _logprob_problems(m, ids, np.asarray(part.target_logprobs)[of_n].reshape(-1, n))
        problems += [p for p in found if p not in problems]
    return problems


def _sample_problems(m, info, part: PartArrays) -> list[str]:
    """Sampled targets: ragged arrays that add up, ids increasing, counts summing to N."""
    t, problems = m.targets, []
    lengths = np.asarray(part.target_lengths).astype(np.int64)
    entries, rows = len(part.target_ids), target_rows(m, info)
    if lengths.shape != (rows,) or len(part.target_counts) != entries:
        return [f"ragged target arrays do not describe {rows} positions"]
    if entries != info.entries or lengths.sum() != entries:
        return [f"target_lengths add up to {lengths.sum()}, not the {info.entries} entries stored"]
    if lengths.size and (lengths.min() < 1 or lengths.max() > t.k):
        return [f"a position holds fewer than 1 or more than k={t.k} distinct ids"]
    ids = part.target_ids.astype(np.int64)
    if "target_ids" in m.codec.gaps:  # stored as per-position gaps (1.2): the ids are their sums
        ids = codecs.decode_gaps(ids, lengths)
    counts = part.target_counts.astype(np.int64)
    if ids.size and ids.max() >= m.teacher.vocab_size:
        problems.append(f"a target id is >= vocab_size {m.teacher.vocab_size}")
    if counts.size and counts.min() < 1:
        problems.append("a stored count is 0")
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    if lengths.size and (np.add.reduceat(counts, starts) != t.samples).any():
        problems.append(f"the counts of a position do not sum to samples={t.samples}")
    steps = np.diff(ids)
    within = np.ones(len(steps), dtype=bool)
    within[starts[1:] - 1] = False  # a step from one position to the next may go down
    if (steps[within] <= 0).any():
        problems.append("target ids are not strictly increasing within a position")
    return problems


def _masked_problems(m, info, part: PartArrays) -> list[str]:
    """A masked-LM part (1.3): one increasing position on the token axis and one label below
    the vocabulary per target row."""
    at = np.asarray(part.target_positions).astype(np.int64)
    labels = np.asarray(part.target_labels).astype(np.int64)
    if at.shape != (info.masked,) or labels.shape != (info.masked,):
        return [f"target_positions and target_labels do not hold {info.masked} entries"]
    if at.size and (at[0] < 0 or at[-1] >= info.tokens or (np.diff(at) <= 0).any()):
        return [f"target_positions are not increasing positions below {info.tokens}"]
    if labels.size and labels.max() >= m.teacher.vocab_size:
        return [f"a target label is >= vocab_size {m.teacher.vocab_size}"]
    return []
