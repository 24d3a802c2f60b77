"""Batches of a `CacheDataset` through a `DataLoader`: one epoch at a time, worker errors as
the trainer's own messages."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from logitcache.errors import LogitCacheError
from trainer.dataset import CacheDataset


def epoch_batches(
    ds: CacheDataset,
    epoch: int,
    *,
    seed: int,
    num_workers: int,
    pin: bool,
    stopping: Callable[[], bool],
) -> Iterator[dict[str, torch.Tensor]]:
    """The rest of `epoch` from the dataset's position. The loader gets its own generator, so
    creating it (at an epoch start or on resume) never draws from the global RNG. `stopping`:
    a stop was requested, so a worker's crash is the same Ctrl-C and ends the epoch quietly."""
    ds.set_epoch(epoch)
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=num_workers, generator=generator, pin_memory=pin
    )
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except LogitCacheError as exc:
            raise type(exc)(worker_message(exc)) from None
        except RuntimeError:
            if stopping():  # a worker died of the same Ctrl-C; the batch was not consumed
                return
            raise
        yield batch


def worker_message(exc: LogitCacheError) -> str:
    """A DataLoader worker's error re-raised in the main process carries the worker's traceback
    in its message; keep only the original message."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    cls = type(exc)
    for marker in (f"\n{cls.__module__}.{cls.__qualname__}: ", f"\n{cls.__qualname__}: "):
        cut = text.rfind(marker)
        if cut >= 0:
            return text[cut + len(marker) :].strip()
    return text.strip().splitlines()[-1]
