"""What the teacher side and the trainer both need of the machine they run on.

The device a ``--device`` flag names, a tokenizer from a path, the number of processes torchrun
started, and how those processes agree on a setup error: the dump (`logitcache.dumping`) and
the trainer (`trainer`) each used to carry a copy of these; this module is the one place, and it
imports nothing of logitcache but its errors, so either side may depend on it. torch and
transformers are imported on first use.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from logitcache.errors import LogitCacheError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

__all__ = ["agree_on_errors", "load_tokenizer", "resolve_device", "torchrun_world_size"]


def resolve_device(name: str) -> torch.device:
    """The device ``--device`` names: ``auto`` is CUDA when available, else the CPU. An unknown
    name, or CUDA where there is none, is a `LogitCacheError` that says what to pass instead."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise LogitCacheError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LogitCacheError(
            f"--device {name} asked for CUDA, but none is available here; use cpu."
        )
    return device


def load_tokenizer(
    name_or_path: str,
    trust_remote_code: bool = False,
    *,
    flag: str | None = None,
    local_only: bool = False,
) -> Any:
    """A Hugging Face tokenizer from a directory saved with save_pretrained (or a hub name), or
    a `tokenizers` JSON file.

    `flag` is the option `name_or_path` was given with (``--tokenizer``), named in the error;
    leave it out where the name may come from another option (the teacher's own name). With
    `local_only` a path that does not exist is refused instead of being looked up on the hub:
    the trainer only ever checks a tokenizer the user has on disk.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if name_or_path.endswith(".json") and Path(name_or_path).is_file():
            return PreTrainedTokenizerFast(tokenizer_file=name_or_path)
        if local_only and not Path(name_or_path).exists():
            raise OSError("the path does not exist")
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        # a file the Rust `tokenizers` library cannot parse raises a bare Exception
        if not isinstance(exc, (OSError, ValueError, KeyError, TypeError)) and (
            type(exc) is not Exception
        ):
            raise
        first = str(exc).splitlines()[0].rstrip(".") if str(exc) else type(exc).__name__
        where = f"{flag} {name_or_path}" if flag else name_or_path
        raise LogitCacheError(
            f"cannot load a tokenizer from {where}: {first}. Pass --tokenizer with a directory "
            "saved by save_pretrained or a tokenizer.json file."
        ) from exc


def torchrun_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def agree_on_errors(
    gather: Callable[[str | None], list[str | None]],
    fn: Callable[[], T],
    *,
    name_the_rank: bool = False,
) -> T:
    """Run `fn` on this rank; if it raised a `LogitCacheError` on any rank, raise one on every
    rank, so that no rank goes on to wait forever in a collective the failed one never joins.

    `gather` is the collective: every rank's small object, in rank order (an all-gather; one
    process passes ``lambda obj: [obj]``). A failing rank raises its own error; the others raise
    the lowest failing rank's message, prefixed ``rank R failed:`` with `name_the_rank` (where
    only some ranks do the work, so that the message says whose it is).
    """
    error: LogitCacheError | None = None
    result: Any = None
    try:
        result = fn()
    except LogitCacheError as exc:
        error = exc
    messages = gather(None if error is None else str(error))
    if error is not None:
        raise error
    failed = next(((rank, m) for rank, m in enumerate(messages) if m is not None), None)
    if failed is not None:
        rank, message = failed
        raise LogitCacheError(f"rank {rank} failed: {message}" if name_the_rank else message)
    return result
