"""`verify`: read every byte of a cache and check it against its manifest and the format's rules.

Checks, per part: each file's sha256 against the manifest (names the file), each chunk decoded
through its crc32c (names the chunk), and the invariants a reader relies on: ids below the
vocabulary size, log-probs finite and at most 0, sorted in decreasing order, offsets that start
at 0, grow, and end at the token count, and counts equal to the manifest's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from logitcache.errors import LogitCacheError
from logitcache.format import PARTS_DIR, PartArrays
from logitcache.reader import Cache
from logitcache.writer import sha256_file


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
    """Check every part of `cache`; problems are collected (not raised) so all are reported."""
    report = VerifyReport()
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
        if not path.is_file():
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
    for array in ("input_ids", "target_ids", "target_logprobs", "seq_offsets"):
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
        f"{name}: {p}" for p in check_invariants(cache, index, PartArrays(**arrays))
    ]


def check_invariants(cache: Cache, index: int, part: PartArrays) -> list[str]:
    """The format's rules for one part's content; an empty list when all hold."""
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
    if part.input_ids.shape != (info.tokens,):
        problems.append(f"input_ids has shape {part.input_ids.shape}, expected ({info.tokens},)")
    if (
        part.target_ids.shape != (info.tokens, m.targets.k)
        or part.target_logprobs.shape != part.target_ids.shape
    ):
        problems.append(f"target arrays do not have shape ({info.tokens}, {m.targets.k})")
        return problems
    if part.target_ids.size and part.target_ids.max() >= m.teacher.vocab_size:
        problems.append(f"a target id is >= vocab_size {m.teacher.vocab_size}")
    if part.input_ids.size and part.input_ids.max() >= m.teacher.vocab_size:
        problems.append(f"an input id is >= vocab_size {m.teacher.vocab_size}")
    values = part.target_logprobs.astype(np.float32)
    if not np.isfinite(values).all() or (values > 0).any():
        problems.append("a log-prob is not finite or is above 0")
    elif (np.diff(values, axis=-1) > 0).any():  # rounding is monotone: float16 keeps the order
        problems.append("log-probs are not in decreasing order")
    if (np.exp(values.astype(np.float64)).sum(-1) > 1 + 1e-2).any():
        problems.append("the stored probabilities of a position sum to more than 1")
    return problems
