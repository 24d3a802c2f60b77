"""The README.md card every cache carries: what it is, how it was made, how to load it.

Written by `dump` (when it finishes), `merge` and `export` next to manifest.json. It is for
people: generated from the manifest, not listed in it, not checksummed, and ignored by readers
and by `verify`. The manifest stays the only source of truth.
"""

from __future__ import annotations

from logitcache.format.manifest import Manifest

CARD_NAME = "README.md"
DEFAULT_LICENSE = "unknown"


def render_card(manifest: Manifest, location: str, license: str = DEFAULT_LICENSE) -> str:
    """The card of the cache described by `manifest`, stored at `location` (path or URL)."""
    m = manifest
    t, tok, d, tg, lay, c = m.teacher, m.tokenizer, m.data, m.targets, m.layout, m.codec
    suffix = "" if m.backend == "zarr" else ".parquet"
    sources = "".join(
        f"| {i.cache} | {i.data.source} | {i.data.format} | `{i.data.fingerprint[:16]}` | "
        f"{i.parts} | {i.sequences:,} | {i.tokens:,} |\n"
        for i in m.merged_from
    )
    merged = (
        "\nMerged from these caches, in this order (`logitcache merge`):\n\n"
        "| cache | data | format | data fingerprint | parts | sequences | tokens |\n"
        "|---|---|---|---|---|---|---|\n" + sources
        if m.merged_from
        else ""
    )
    plain = (
        """import zarr, numpy as np  # one part; see docs/FORMAT.md section 10 for all of it
group = zarr.open_group("CACHE/parts/part-000000", mode="r")
input_ids = np.asarray(group["input_ids"][...])              # (tokens,)
target_ids = np.asarray(group["target_ids"][...])            # (tokens, k)
target_logprobs = np.asarray(group["target_logprobs"][...])  # (tokens, k), log p at T=1
seq_offsets = np.asarray(group["seq_offsets"][...])          # sequence s = rows offsets[s]:offsets[s+1]"""
        if m.backend == "zarr" and tg.kind == "topk"
        else """import zarr, numpy as np  # one part; see docs/FORMAT.md sections 3b and 10
group = zarr.open_group("CACHE/parts/part-000000", mode="r")
input_ids = np.asarray(group["input_ids"][...])              # (tokens,)
target_ids = np.asarray(group["target_ids"][...])            # (entries,) ids, position by position
target_logprobs = np.asarray(group["target_logprobs"][...])  # (entries,) their log p
target_lengths = np.asarray(group["target_lengths"][...])    # (tokens,) entries of each position
seq_offsets = np.asarray(group["seq_offsets"][...])          # sequence s = rows offsets[s]:offsets[s+1]"""
        if m.backend == "zarr" and tg.kind == "topp"
        else """import zarr, numpy as np  # one part; see docs/FORMAT.md sections 3a and 10
group = zarr.open_group("CACHE/parts/part-000000", mode="r")
input_ids = np.asarray(group["input_ids"][...])              # (tokens,)
target_ids = np.asarray(group["target_ids"][...])            # (entries,) distinct ids, position by position
target_counts = np.asarray(group["target_counts"][...])      # (entries,) draws of each id; count / N estimates p
target_lengths = np.asarray(group["target_lengths"][...])    # (tokens,) entries of each position
seq_offsets = np.asarray(group["seq_offsets"][...])          # sequence s = rows offsets[s]:offsets[s+1]"""
        if m.backend == "zarr"
        else """import pyarrow.dataset as ds  # one row per sequence; read only the files manifest.json lists
table = ds.dataset(["CACHE/parts/part-000000.parquet"], format="parquet").to_table()
# or: datasets.load_dataset("parquet", data_files=["CACHE/parts/part-000000.parquet"])
"""
        + (
            "# columns: input_ids list<uint>, target_ids list<list<uint>[k]>, target_logprobs list<list<float>[k]>"
            if tg.kind == "topk"
            else "# columns: input_ids list<uint>, target_ids list<list<uint>>, target_logprobs list<list<float>> (a list per token)"
            if tg.kind == "topp"
            else "# columns: input_ids list<uint>, target_ids list<list<uint>> (distinct ids), target_counts list<list<uint>> (their draws)"
        )
    ).replace("CACHE", location.rstrip("/"))
    return f"""---
license: {license}
tags: [knowledge-distillation, logitcache]
---

# logitcache cache: {_title(tg)} of {t.name}

Soft targets of a teacher language model, written by
[logitcache](https://pypi.org/project/logitcache/) {m.tool_version or "(unknown version)"}
for offline knowledge distillation. {_what(tg)}

This card is generated from `manifest.json`, which is authoritative (and holds the sha256 of
every data file). The card itself is not checksummed.

**License:** {license}

| | |
|---|---|
| Teacher | `{t.name}` ({t.dtype}, vocabulary {t.vocab_size:,}, weights sha256 `{t.weights_sha256[:16]}`) |
| Tokenizer | `{tok.name}` (vocabulary {tok.vocab_size:,}, fingerprint `{tok.fingerprint[:16]}`, EOS {tok.eos_token_id}) |
| Data | `{d.source}` ({d.format}, {_documents(d.documents)}, fingerprint `{d.fingerprint[:16]}`) |
| Targets | {_targets_row(tg)} |
| Layout | seq_len {lay.seq_len}, {"packed with EOS" if lay.packing else "one document per sequence"}, {lay.sequences_per_part:,} sequences per part |
| Storage | {m.backend} (`parts/part-NNNNNN{suffix}`), {c.name}/{c.cname} level {c.clevel}, {c.checksum} |
| Counts | {m.tokens:,} tokens, {m.sequences:,} sequences, {len(m.parts):,} parts |
| Format | logitcache {m.format_version}, created {m.created}, {"complete" if m.complete else "INCOMPLETE"} |
{merged}
## Load it with logitcache

```bash
pip install logitcache            # add [s3] (or [gcs], [azure]) for a cache in an object store
logitcache info {location}
logitcache verify {location}
trainer fit --cache {location} --student ./student-config.json --out ./run
```

```python
import logitcache

cache = logitcache.open("{location}")
seq = cache[0]  # input_ids (T,), target_ids (T, k), target_logprobs (T, k) tensors
```

A student must have vocabulary size {t.vocab_size} and the tokenizer with fingerprint
`{tok.fingerprint[:16]}...` (`trainer fit --tokenizer` checks it).

## Load it without logitcache

The format is plain {"Zarr v3" if m.backend == "zarr" else "Parquet"}, specified byte by byte
in logitcache's `docs/FORMAT.md`. Read only the parts that `manifest.json` lists, in order
(anything else under `parts/` is an unfinished write).

```python
{plain}
```
"""


def _title(tg) -> str:
    if tg.kind == "topp":
        return f"top-p targets (p={tg.top_p:g}, at most {tg.k} ids)"
    return f"top-{tg.k} targets" if tg.kind == "topk" else f"sampled targets (N={tg.samples})"


def _targets_row(tg) -> str:
    if tg.kind == "sample":
        return (
            f"sample, N={tg.samples} (at most {tg.k} distinct ids per position), ids "
            f"{tg.id_dtype}, counts {tg.count_dtype}, order {tg.order}"
        )
    size = f"top_p={tg.top_p:g}, {tg.min_k}..{tg.k} ids" if tg.kind == "topp" else f"k={tg.k}"
    return f"{tg.kind}, {size}, ids {tg.id_dtype}, log-probs {tg.logprob_dtype}, order {tg.order}"


def _what(tg) -> str:
    """What a position holds, in a sentence or two."""
    if tg.kind == "sample":
        return (
            f"For each position, {tg.samples} draws from the teacher's distribution at "
            f"temperature {tg.temperature:g} (seed {tg.seed}): the distinct ids drawn and how "
            "often, so that `count / N` is an unbiased estimate of the teacher's probabilities."
        )
    if tg.kind == "topp":
        return (
            f"For each position the fewest most probable next-token ids whose probabilities "
            f"reach {tg.top_p:g} (at least {tg.min_k}, at most {tg.k}) and their "
            f"log-probabilities at temperature {tg.temperature:g}, normalised over the "
            "teacher's **full** vocabulary (so the mass outside the stored ids is "
            "`1 - sum(exp(logprobs))`)."
        )
    return (
        f"For each position the {tg.k} most probable next-token ids and their log-probabilities "
        f"at temperature {tg.temperature:g}, normalised over the teacher's **full** vocabulary "
        "(so the mass outside the stored ids is `1 - sum(exp(logprobs))`)."
    )


def _documents(n: int) -> str:
    return "documents not counted" if n < 0 else f"{n:,} documents"
