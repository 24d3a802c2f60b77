"""An ensemble as one teacher: several members over the same batch, their outputs averaged.

`load_ensemble` loads every ``--teacher`` of a dump, checks that they share one tokenizer
(fingerprint, `logitcache.format.tokenizer_id`) and one vocabulary, and returns a `Teacher`
whose module returns the ensemble's logits, so that the rest of the dump (targets, sampling,
parts, resume, shards) runs unchanged on them:

* ``--ensemble logits``: the weighted mean of the members' logits;
* ``--ensemble probs``: ``T * log(sum_i w_i softmax(logits_i / T))``, in log space
  (`logitcache.write.ensemble.mix`), so that the targets' own division by the temperature
  ``T`` gives back the log of the weighted mean of the members' probabilities at ``T``.

The output is generic over the last dimension of the members' logits, so a classifier teacher
(one row per example) is wrapped the same way once its loader returns a `Teacher`.

The chunked path (`logitcache.dumping.chunked`) is not taken: the members' logits are made
whole, one member at a time (the ensemble keeps one running average, not every member's
logits), so an ensemble's peak is one member's full logits plus the average.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from logitcache.dumping.teacher import Teacher
from logitcache.errors import LogitCacheError
from logitcache.format.ensemble import ensemble_teacher, normalized_weights
from logitcache.format.manifest import EnsembleInfo, EnsembleMember
from logitcache.write.ensemble import mix

__all__ = ["FULL_LOGITS_WHY", "EnsembleModel", "load_ensemble"]

#: What `LogitsPlan.describe` says of an ensemble's logits (the dump's last line).
FULL_LOGITS_WHY = "an ensemble: each member's full logits, averaged"


class EnsembleModel(torch.nn.Module):
    """(batch, time) ids -> the ensemble's (batch, time, vocab) float32 logits."""

    def __init__(
        self, members: Sequence[Teacher], weights: Sequence[float], mode: str, temperature: float
    ) -> None:
        super().__init__()
        self.models = torch.nn.ModuleList(m.model for m in members)  # the state dict: theirs
        self._logits = [m.logits for m in members]
        self.weights, self.mode, self.temperature = list(weights), mode, temperature

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return ensemble_logits(self._logits, input_ids, self.weights, self.mode, self.temperature)


def ensemble_logits(
    members: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    input_ids: torch.Tensor,
    weights: Sequence[float],
    mode: str,
    temperature: float,
) -> torch.Tensor:
    """The ensemble's logits for `input_ids`, each member's logits made only when the running
    average takes them in."""
    if mode == "logits":
        return mix((m(input_ids).float() for m in members), weights, mode)
    scaled = (torch.log_softmax(m(input_ids).float() / temperature, -1) for m in members)
    return mix(scaled, weights, mode).mul_(temperature)


def load_ensemble(
    paths: Sequence[str],
    weights: Sequence[float] | None,
    mode: str,
    temperature: float,
    load: Callable[[str], Teacher],
    check: Callable[[Sequence[str], Sequence[Teacher]], None] | None = None,
) -> Teacher:
    """Load every member with `load` (a path -> `Teacher`), check that they can be averaged
    (first with `check`, the members' kind's own test: a classifier's label space), and return
    the ensemble as one `Teacher`, its `ensemble` record listing them."""
    shares = normalized_weights(weights, len(paths))
    members = [load(path) for path in paths]
    if check is not None:
        check(paths, members)
    first = members[0]
    for path, member in zip(paths[1:], members[1:], strict=True):
        if member.tokenizer_info.fingerprint != first.tokenizer_info.fingerprint:
            raise LogitCacheError(
                f"--teacher {path} has another tokenizer than --teacher {paths[0]} (fingerprint "
                f"{member.tokenizer_info.fingerprint[:12]} vs "
                f"{first.tokenizer_info.fingerprint[:12]}): the teachers of an ensemble must "
                "share one, so that an input id means the same to each. Pass teachers trained "
                "with the same tokenizer, or --tokenizer to give them one."
            )
        if member.info.vocab_size != first.info.vocab_size:
            raise LogitCacheError(
                f"--teacher {path} has logits over {member.info.vocab_size} ids, --teacher "
                f"{paths[0]} over {first.info.vocab_size}: the teachers of an ensemble must "
                "share one vocabulary (the same output width), since their outputs are averaged "
                "id by id."
            )
    record = EnsembleInfo(
        mode, [EnsembleMember(m.info, w) for m, w in zip(members, shares, strict=True)]
    )
    model = EnsembleModel(members, shares, mode, temperature).eval()
    return Teacher(
        model, first.tokenizer, ensemble_teacher(mode, record.members), first.tokenizer_info,
        first.device, ensemble=record,
    )  # fmt: skip
