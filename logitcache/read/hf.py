"""`Cache.to_hf_dataset()`: a cache as a streaming `datasets.IterableDataset`, read in place.

Users of Hugging Face's stack (`Trainer`, TRL, their own loop over `datasets`) get the cache
as the dataset type they already shuffle, shard and batch, without a conversion step that would
copy it: the dataset is `IterableDataset.from_generator` over the cache's parts, each part one
*shard* (the parts are passed as a list in ``gen_kwargs``, which is what `datasets` splits into
shards). So:

* ``.shuffle(seed, buffer_size)`` shuffles the order of the parts and, within a buffer of
  ``buffer_size`` sequences, the sequences; ``.set_epoch(e)`` reshuffles both (the seed in
  effect is ``seed + e``), and the same seed and epoch give the same order again;
* DataLoader workers and `datasets.distributed.split_dataset_by_node` divide whole parts, so
  each part is read and decoded once per epoch, by one process;
* every part is decoded through `Cache.read_decoded` (its file and value checks included), a
  part at a time per shard being read, so memory stays at about one decoded part per shard
  (recent `datasets` fill the shuffle buffer from ``max_buffer_input_shards`` shards at once).

Each example is one sequence, in the reader's uniform view (`CacheSequence`):

* ``index`` (int64): the sequence's global index in the cache (``cache[index]``);
* ``input_ids`` (n,) int64: the ids the teacher read;
* ``target_ids`` (n, w) int64 and ``target_logprobs`` (n, w) float32: row j is the teacher's
  distribution over token j + 1, most probable first, ``-inf`` (and id 0) in unused slots;
  w = k for top-k caches; for sampled caches, log(count / N) and w the most distinct ids at
  one position of the sequence's part;
* a masked-LM cache (format 1.3) adds ``labels`` (n,) int64: the id the masking replaced at a
  masked position, -1 elsewhere, where the target row is a placeholder never to train on;
* an ``--offsets`` cache (format 1.3) adds ``text`` (string), the text the sequence's tokens
  cover, and ``token_offsets`` (n, 2) int64, each token's [start, end) in its characters.

A classification cache (format 1.3) has **one example per view** instead, the unit a classifier
trains on (the student sees the view and matches the teacher's distribution on it; without
views, one per input example). Its fields:

* ``example`` (int64): the input example's index, its row in the dump's ``data.source`` (the
  same index as the cache's sequence), so a map over it fetches the example from the data;
* ``view`` (int64): the view's number within its example, 0 without views;
* ``target_ids`` (w,) int64 and ``target_logprobs`` (w,) float32: the teacher's distribution
  over classes on this view, most probable first, as above (a full cache: w = the classes);
* ``label`` (`datasets.ClassLabel`, named by ``task.classes`` where the teacher names them):
  the example's hard label, only where the data had labels;
* ``view_box`` (5,) int32: the view's (top, left, height, width, flip), only with views
  (`logitcache.examples.views.apply_views` cuts it out of the example as the teacher saw it).

`datasets` is imported here, on first use, never by `import logitcache`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from logitcache.format.manifest import VIEW_FIELDS, Manifest, PartArrays
from logitcache.read.decoded import split_sequences
from logitcache.read.texts import sequence_text

if TYPE_CHECKING:
    import datasets


class Parts(Protocol):
    """What the view needs of a cache (`logitcache.read.reader.Cache` has it; the reader
    imports this module, not the reverse). Picklable, for DataLoader workers."""

    @property
    def manifest(self) -> Manifest: ...

    @property
    def num_parts(self) -> int: ...

    def part_span(self, index: int) -> tuple[int, int]: ...

    def read_decoded(self, index: int) -> PartArrays: ...


def features(manifest: Manifest) -> datasets.Features:
    """The examples' schema (module docstring) for a cache with `manifest`, for `datasets` 3
    (`Sequence`) and 4+ (`List`)."""
    import datasets

    nested = getattr(datasets, "List", None) or datasets.Sequence
    if manifest.task is not None:
        return datasets.Features(_view_fields(manifest, nested))
    fields = {
        "index": datasets.Value("int64"),
        "input_ids": nested(datasets.Value("int64")),
        "target_ids": nested(nested(datasets.Value("int64"))),
        "target_logprobs": nested(nested(datasets.Value("float32"))),
    }
    if manifest.masking is not None:
        fields["labels"] = nested(datasets.Value("int64"))
    if manifest.layout.offsets:
        fields["text"] = datasets.Value("string")
        fields["token_offsets"] = nested(nested(datasets.Value("int64")))
    return datasets.Features(fields)


def _view_fields(manifest: Manifest, nested: Any) -> dict[str, Any]:
    """A classification cache's fields: one example per view (module docstring)."""
    import datasets

    task = manifest.task
    assert task is not None
    fields = {
        "example": datasets.Value("int64"),
        "view": datasets.Value("int64"),
        "target_ids": nested(datasets.Value("int64")),
        "target_logprobs": nested(datasets.Value("float32")),
    }
    if task.labels:
        names = {"names": task.classes} if task.classes else {}
        fields["label"] = datasets.ClassLabel(num_classes=manifest.teacher.vocab_size, **names)
    if task.views:
        fields["view_box"] = nested(datasets.Value("int32"), length=len(VIEW_FIELDS))
    return fields


def to_hf_dataset(cache: Parts) -> datasets.IterableDataset:
    """The sequences of `cache` as a `datasets.IterableDataset` with one shard per part."""
    import datasets

    return datasets.IterableDataset.from_generator(
        _sequences,
        features=features(cache.manifest),
        gen_kwargs={"parts": list(range(cache.num_parts)), "cache": cache},
    )


def _sequences(parts: list[int], cache: Parts) -> Iterator[dict[str, Any]]:
    """The examples of the parts `parts` (this shard's, in the order `datasets` gives them)."""
    for index in parts:
        first, _ = cache.part_span(index)
        part = cache.read_decoded(index)
        if cache.manifest.task is not None:
            yield from _views(part, first, cache.manifest.layout.seq_len)
            continue
        for offset, seq in enumerate(split_sequences(part)):
            example = {
                "index": first + offset,
                "input_ids": seq.input_ids.numpy(),
                "target_ids": seq.target_ids.numpy(),
                "target_logprobs": seq.target_logprobs.numpy(),
            }
            if seq.labels is not None:
                example["labels"] = seq.labels.numpy()
            if part.text is not None:
                a, b = part.seq_offsets[offset], part.seq_offsets[offset + 1]
                example["text"] = sequence_text(part, offset)
                example["token_offsets"] = part.token_offsets[a:b].astype(np.int64)
            yield example


def _views(part: PartArrays, first: int, per_example: int) -> Iterator[dict[str, Any]]:
    """A classification part's examples, one per view; `first` is its first example's index,
    `per_example` the rows of each (`layout.seq_len`)."""
    for row in range(part.tokens):
        example = {
            "example": first + row // per_example,
            "view": row % per_example,
            "target_ids": part.target_ids[row].astype(np.int64),
            "target_logprobs": part.target_logprobs[row].astype(np.float32),
        }
        if part.labels is not None:
            example["label"] = int(part.labels[row])
        if part.views is not None:
            example["view_box"] = part.views[row]
        yield example
