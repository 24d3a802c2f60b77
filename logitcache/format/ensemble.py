"""What an ensemble of teachers is in a cache (format 1.3), independent of how it was made.

Two ways make one: `logitcache dump --teacher A --teacher B --ensemble MODE` runs the members
over each batch and computes the targets of their average (`logitcache.dumping.ensemble`), and
`logitcache ensemble OUT CACHE...` combines caches the members made separately
(`logitcache.write.ensemble`). Both check the weights here and record the ensemble the same
way: an `EnsembleInfo` listing every member, and in the manifest's `teacher` record the
ensemble's own identity, hashed from the members' identities, the weights and the mode, so
that two caches of the same ensemble compare equal (`merge`, resume) and any change of member,
weight or mode tells them apart.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence

from logitcache.errors import LogitCacheError
from logitcache.format.manifest import EnsembleMember, TeacherInfo

__all__ = ["MODES", "WEIGHT_TOLERANCE", "ensemble_teacher", "normalized_weights", "parse_weights"]

#: "logits": the weighted mean of the members' logits (the usual recipe: a geometric mean of
#: their distributions, renormalised); "probs": the weighted mean of their probabilities.
MODES = ("logits", "probs")
#: How far a manifest's normalised weights may sum from 1 (they are floats written as JSON).
WEIGHT_TOLERANCE = 1e-9


def parse_weights(text: str) -> list[float]:
    """``--weights 2,1`` -> [2.0, 1.0] (checked further by `normalized_weights`)."""
    try:
        return [float(item) for item in text.split(",")]
    except ValueError:
        raise LogitCacheError(
            f"--weights must be numbers separated by commas, one per teacher (e.g. 2,1), got "
            f"{text!r}."
        ) from None


def normalized_weights(weights: Sequence[float] | None, members: int) -> list[float]:
    """The members' weights scaled to sum to 1; None gives every member the same. Refuses a
    count that is not the members', and weights that are not positive finite numbers (a zero
    weight is a member left out: leave it out)."""
    if weights is None:
        return [1.0 / members] * members
    if len(weights) != members:
        raise LogitCacheError(
            f"--weights gives {len(weights)} weight{'' if len(weights) == 1 else 's'} for "
            f"{members} teachers; give one per teacher, in the order of the teachers."
        )
    bad = [w for w in weights if not (math.isfinite(w) and w > 0)]
    if bad:
        raise LogitCacheError(
            f"--weights must be positive numbers, got {bad[0]:g} (a teacher without weight is "
            "one to leave out)."
        )
    total = math.fsum(weights)
    return [w / total for w in weights]


def ensemble_teacher(mode: str, members: Sequence[EnsembleMember]) -> TeacherInfo:
    """The ensemble's identity, the manifest's `teacher` record: its name lists the members,
    its hashes cover each member's config or weights hash with its weight, and the mode; its
    vocabulary is theirs (they share it), its position limit the smallest of theirs."""

    def digest(field: str) -> str:
        items = [[getattr(m.teacher, field), m.weight] for m in members]
        return hashlib.sha256(json.dumps([mode, items]).encode()).hexdigest()

    dtypes = {m.teacher.dtype for m in members}
    limits = [m.teacher.max_positions for m in members if m.teacher.max_positions is not None]
    return TeacherInfo(
        name=f"ensemble ({mode}) of " + " + ".join(m.teacher.name for m in members),
        config_sha256=digest("config_sha256"),
        weights_sha256=digest("weights_sha256"),
        dtype=dtypes.pop() if len(dtypes) == 1 else "mixed",
        vocab_size=members[0].teacher.vocab_size,
        max_positions=min(limits) if limits else None,
    )
