"""`logitcache export CACHE OUT --format axolotl`: the cache as a dataset for axolotl's KD trainer.

axolotl (its `integrations/kd` plugin) trains a student from pre-computed teacher targets held
in five per-position fields of a tokenized dataset. This module writes exactly those fields,
one Parquet file per part of the cache, so `datasets.load_dataset` opens the result and
axolotl's KD collator batches it without any conversion step of its own. The mapping, and the
axolotl sources it was read from, are in examples/axolotl_export.md; in short, per sequence
of n tokens:

* ``input_ids`` (n,) and ``labels`` (n,): the ids the teacher read; ``labels`` equals them (a
  cache has no prompt masking, and the model shifts labels itself), ``attention_mask`` is ones;
* ``target_token_ids``, ``target_logprobs``, ``target_mask`` (n, k): row j is the teacher's
  distribution over token j + 1, the row the cache stores at position j (both axolotl's loss
  and the cache align a row with the position that predicts the next token). Log-probs are
  renormalised over the row's stored ids (what axolotl's own dataset preparation does and its
  loss expects), at the cache's temperature unless `temperature` asks for another one (then
  ``p ** (T_cache / T) / Z``, axolotl's own rescaling). Sampled caches give
  ``log(count / N)``, already normalised. Unused slots and the last row of a sequence (which
  would describe a token after the sequence) are padding: id 0, log-prob ``LOGPROB_PAD``,
  mask 0, as axolotl's collator pads.

The export is written under a temporary name next to OUT and renamed into place when complete,
so OUT is either absent, the previous export, or the whole new one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from logitcache.errors import LogitCacheError
from logitcache.format.manifest import PartArrays, refuse_masked
from logitcache.read import reader
from logitcache.storage import files, parquet_backend, stores
from logitcache.storage.paths import refuse_overlap
from logitcache.version import __version__

#: The `--format` value that selects this export.
FORMAT = "axolotl"
#: The file that marks a directory as an export of this kind, with what made it.
MARKER = "logitcache-axolotl.json"
#: Where the Parquet files go: a ``data/train-*`` layout, which `datasets.load_dataset(OUT)`
#: reads as the train split.
DATA_DIR = "data"
#: The log-prob of a padded slot: the finite value axolotl's KD collator pads with (a -inf
#: would turn into NaN in its loss even where the mask is 0).
LOGPROB_PAD = -1e9
#: The zstd level of the Parquet files.
CLEVEL = 3


@dataclass(frozen=True)
class AxolotlExport:
    """What an export wrote: the directory, its Parquet files (relative to it), the sizes, the
    k of every row and the temperature of the written log-probs."""

    out: Path
    files: list[str]
    sequences: int
    tokens: int
    k: int
    temperature: float


def axolotl_columns(
    decoded: PartArrays, k: int, cache_temperature: float, temperature: float
) -> dict[str, np.ndarray]:
    """One decoded part (`Cache.read_decoded`) -> axolotl's fields on the token axis: (T,) for
    the token fields, (T, k) for the targets (rows narrower than k are padded to k, so every
    file of an export has one schema). See the module docstring for the mapping."""
    offsets = np.asarray(decoded.seq_offsets)
    input_ids = np.asarray(decoded.input_ids).astype(np.int64)
    ids = np.asarray(decoded.target_ids).astype(np.int64)  # (T, w), most probable first
    logprobs = np.asarray(decoded.target_logprobs, dtype=np.float64)  # (T, w), -inf unused
    if ids.shape[1] < k:  # sampled: w is the part's most distinct ids at one position
        pad = ((0, 0), (0, k - ids.shape[1]))
        ids = np.pad(ids, pad)
        logprobs = np.pad(logprobs, pad, constant_values=-np.inf)
    valid = np.isfinite(logprobs)
    valid[offsets[1:] - 1] = False  # the last row describes a token outside the sequence
    scaled = np.where(valid, logprobs * (cache_temperature / temperature), -np.inf)
    peak = np.where(valid.any(axis=1, keepdims=True), scaled.max(axis=1, keepdims=True), 0.0)
    mass = np.exp(scaled - peak).sum(axis=1, keepdims=True)  # (T, 1), 0 on all-padding rows
    norm = peak + np.log(np.where(mass > 0, mass, 1.0))  # log of the row's stored mass
    return {
        "input_ids": input_ids,
        "attention_mask": np.ones_like(input_ids, dtype=np.int8),
        "labels": input_ids,
        "target_token_ids": np.where(valid, ids, 0),
        "target_logprobs": np.where(valid, scaled - norm, LOGPROB_PAD).astype(np.float32),
        "target_mask": valid.astype(np.int8),
    }


def export_axolotl(
    cache: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    temperature: float | None = None,
    license: str | None = None,
    cache_dir: str | Path | None = None,
) -> AxolotlExport:
    """Write the complete cache `cache` as an axolotl KD dataset in the local directory `out`.

    `temperature`: that of the written log-probs (default: the cache's own, which is what
    axolotl's ``kd_temperature`` should then be). An existing export at `out` is replaced only
    with `overwrite`; any other non-empty `out` is refused, like `export` refuses to write into
    a directory that is not a cache."""
    if stores.is_remote(out):
        raise LogitCacheError(
            f"export --format {FORMAT} writes a local directory, not {out}: export to a "
            "directory, then upload it (or push it to the Hub with datasets)."
        )
    if temperature is not None and not (temperature > 0 and np.isfinite(temperature)):
        raise LogitCacheError(f"--temperature must be a positive number, got {temperature}.")
    root = Path(out)
    refuse_overlap(root, [cache], "OUT")
    source = reader.open(cache, cache_dir=cache_dir)  # refuses an unfinished dump
    refuse_masked(source.manifest, f"export --format {FORMAT}")
    _refuse_classification(source)
    source.refuse_links()
    _refuse_existing(root, overwrite)
    m = source.manifest
    written_at = m.targets.temperature if temperature is None else float(temperature)
    tmp = files.temporary_sibling(root)
    try:
        (tmp / DATA_DIR).mkdir(parents=True)
        names = []
        for index in range(source.num_parts):
            name = f"{DATA_DIR}/train-{index:05d}-of-{source.num_parts:05d}.parquet"
            decoded = source.read_decoded(index)
            columns = axolotl_columns(decoded, m.targets.k, m.targets.temperature, written_at)
            parquet_backend.write_sequences(tmp / name, columns, decoded.seq_offsets, CLEVEL)
            names.append(name)
        record = {
            "format": f"logitcache-{FORMAT}",
            "format_version": 1,
            "source": source.location,
            "teacher": m.teacher.name,
            "tokenizer": m.tokenizer.name,
            "target_kind": m.targets.kind,
            "k": m.targets.k,
            "samples": m.targets.samples,
            "cache_temperature": m.targets.temperature,
            "temperature": written_at,
            "alignment": "row j describes token j + 1 (kd_prepared_targets_alignment: current)",
            "logprob_pad": LOGPROB_PAD,
            "sequences": m.sequences,
            "tokens": m.tokens,
            "files": names,
            "license": license,
            "tool_version": __version__,
        }
        files.write_json_atomic(tmp / MARKER, record)
        _swap_in(tmp, root)
    except BaseException:
        files.remove_quietly(tmp)
        raise
    return AxolotlExport(root, names, m.sequences, m.tokens, m.targets.k, written_at)


def _refuse_classification(source: reader.Cache) -> None:
    """axolotl's KD dataset is a causal LM's: token ids with next-token targets. A classification
    cache (format 1.3) has neither (its rows are an example's views over classes)."""
    task = source.manifest.task
    if task is not None:
        raise LogitCacheError(
            f"export --format {FORMAT} takes causal-LM caches; {source.location} is a "
            f"{task.kind} cache of {task.input} examples (format 1.3: class distributions per "
            "example, no token ids), which axolotl's KD trainer cannot read. Train a student "
            "classifier on it with `trainer fit --task classification`, or export it with "
            "--format parquet (or read it with Cache.to_hf_dataset()) for another trainer."
        )


def _refuse_existing(root: Path, overwrite: bool) -> None:
    """Refuse an OUT that is a link or a file, a non-empty directory that holds no export, or
    an export when not `overwrite`: checked before anything is read or written."""
    if root.is_symlink():
        raise LogitCacheError(f"{root} is a symbolic link. Refusing to write through it.")
    if not root.exists():
        return
    if not root.is_dir():
        raise LogitCacheError(f"{root} is a file. Choose a new or empty directory for OUT.")
    if (root / MARKER).is_file():
        if not overwrite:
            raise LogitCacheError(
                f"{root} already holds an axolotl export. Choose another output, or pass "
                "--overwrite to replace it."
            )
    elif any(root.iterdir()):
        raise LogitCacheError(
            f"{root} is not empty and holds no axolotl export ({MARKER}). Refusing to write "
            "into it; choose a new or empty directory."
        )


def _swap_in(tmp: Path, root: Path) -> None:
    """Rename the finished export `tmp` to `root`; what was there (the old export or an empty
    directory) is moved aside first and deleted last, so `root` is never half-written."""
    old = files.temporary_sibling(root) if root.exists() else None
    if old is not None:
        os.replace(root, old)
    os.replace(tmp, root)
    files.fsync_dir(root.parent)
    if old is not None:
        files.remove(old)
