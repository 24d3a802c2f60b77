"""Data-parallel training under `torchrun`: the process group and the few collectives `fit` uses.

``torchrun --nproc-per-node N -m trainer fit ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; `init` joins them into
one process group (NCCL with one GPU per process, ``cuda:LOCAL_RANK``, else gloo on the CPU).
A plain ``trainer fit`` (no ``WORLD_SIZE``, or 1) runs exactly as before: no group, no
collectives, nothing changes.

Host-side agreement (errors found during setup, a stop signal seen by some ranks) goes through a
gloo group, so that it never waits on the GPU; per-step loss statistics go through the main
group on the device.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from logitcache.errors import LogitCacheError
from logitcache.runtime import agree_on_errors, resolve_device, torchrun_world_size

T = TypeVar("T")


@dataclass
class Dist:
    """This process's place in the run: rank 0 of 1 when not launched by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this module created the process group (and destroys it)
    control: Any = field(default=None, repr=False)  # gloo group for host-side agreement

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device_name: str) -> tuple[Dist, torch.device]:
    """Join the torchrun process group if there is one; the device this process trains on."""
    world = torchrun_world_size()
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return Dist(), resolve_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", local_rank)  # one GPU per process
    else:
        device = resolve_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        except (RuntimeError, ValueError) as exc:
            raise LogitCacheError(
                f"cannot join the torchrun process group ({exc}). Launch with torchrun (which "
                "sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT), or run without it."
            ) from exc
        owns = True
    control = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    d = Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns, control)
    return d, device


def shutdown(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def agree(d: Dist, fn: Callable[[], T]) -> T:
    """Run `fn` on every rank; if it raised a `LogitCacheError` on any, raise one on all (the
    lowest failing rank's message), so that no rank goes on to wait for the others forever."""
    return agree_on_errors(partial(all_gather, d), fn)


def all_gather(d: Dist, obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order (host objects, through the gloo group)."""
    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj, group=d.control)
    return out


def any_rank(d: Dist, flag: bool) -> bool:
    """True on every rank if `flag` is true on any (e.g. a stop signal seen by some ranks)."""
    if not d.enabled:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=d.control)
    return bool(t.item())


def all_sum(d: Dist, t: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks, in place, on the tensor's device (the main group)."""
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def lost_peer(d: Dist, exc: BaseException) -> LogitCacheError:
    """What to say when a collective fails because another rank died."""
    return LogitCacheError(
        f"rank {d.rank} of {d.world_size} lost contact with the other ranks ({type(exc).__name__}"
        f": {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no detail'}): another "
        "process failed or was killed; its own message says why. Fix that and rerun with "
        "--resume: training continues from the last checkpoint."
    )
