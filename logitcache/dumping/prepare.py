"""The setup every dump makes before its first batch, single-process or one shard of many.

`prepare(opts)` checks the options, resolves the data, loads the teacher, checks the two
against each other, decides how the logits are computed (`logitcache.dumping.chunked`), and
builds the manifest template; `Prepared.sequences` then streams the data read, tokenized and
packed. Both `logitcache.dumping.pipeline.dump` and
`logitcache.dumping.sharding.dump_sharded` start here, so a setting means the same in both and
every check runs before --out is touched.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from logitcache.dumping import chunked, data, targets
from logitcache.dumping.options import (
    DumpOptions,
    check_against_teacher,
    check_options,
    device_map_of,
    max_memory_of,
)
from logitcache.dumping.profile import Profile
from logitcache.dumping.teacher import Teacher, load_teacher
from logitcache.errors import LogitCacheError
from logitcache.format.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    CodecInfo,
    DataInfo,
    LayoutInfo,
    Manifest,
    version_for,
)
from logitcache.progress import Bar
from logitcache.version import __version__

__all__ = ["Prepared", "prepare"]


@dataclass(frozen=True)
class Prepared:
    """A checked dump, ready to run: its options, teacher, data, manifest template (the
    manifest of the whole dump, before any part is written) and how the logits are computed."""

    opts: DumpOptions
    teacher: Teacher
    source: data.DataSource
    template: Manifest
    logits: chunked.LogitsPlan
    profile: Profile  # every stage's time with --profile; inert without

    def tokens(self, bar: Bar | None = None) -> Iterator[list[int]]:
        """Token ids per document, in order; `bar` counts the documents read."""
        documents = data.iter_documents(self.source)
        if bar is not None:
            documents = bar.counting(documents)
        return data.tokenize(documents, self.teacher.tokenizer, self.source.pretokenized)

    def sequences(self, bar: Bar | None = None) -> Iterator[np.ndarray]:
        """The packed sequences of the whole data, in order. The first is made at once, so that
        empty data (or packing without an EOS token) fails before --out is touched."""
        eos = self.teacher.tokenizer_info.eos_token_id
        stream = data.pack(self.tokens(bar), self.opts.seq_len, eos, self.opts.pack)
        first = next(stream, None)
        if first is None:
            raise self._no_tokens()
        return itertools.chain([first], stream)

    def count_parts(self) -> int:
        """How many parts the whole dump makes: a counting pass over the tokens, without
        packing them or running the teacher (what a shard needs to find its slice)."""
        eos = self.teacher.tokenizer_info.eos_token_id
        sequences = data.count_sequences(self.tokens(), self.opts.seq_len, eos, self.opts.pack)
        if sequences == 0:
            raise self._no_tokens()
        return -(-sequences // self.template.layout.sequences_per_part)

    def _no_tokens(self) -> LogitCacheError:
        return LogitCacheError(f"--data {self.opts.data} holds no tokens: every document is empty.")


def prepare(opts: DumpOptions) -> Prepared:
    """Check `opts`, load the teacher and the data, and build the manifest template."""
    check_options(opts)
    source = data.resolve(opts.data, opts.data_format, opts.text_field, opts.ids_field)
    teacher = load_teacher(
        opts.teacher,
        factory=opts.teacher_factory,
        tokenizer=opts.tokenizer,
        device=opts.device,
        dtype=opts.dtype,
        trust_remote_code=opts.trust_remote_code,
        device_map=device_map_of(opts),
        max_memory=max_memory_of(opts),
        attn=opts.attn,
    )
    check_against_teacher(opts, teacher)
    if source.pretokenized:  # before touching --out: a bad id must leave nothing behind
        data.check_ids(source, teacher.info.vocab_size)
    plan = chunked.plan_logits(
        teacher.model, teacher.device, pretrained=opts.teacher is not None,
        chunk_tokens=opts.logits_chunk_tokens,
    )  # fmt: skip
    template = _manifest_template(opts, teacher, source)
    return Prepared(opts, teacher, source, template, plan, Profile(opts.profile, teacher.device))


def _manifest_template(opts: DumpOptions, teacher: Teacher, source: data.DataSource) -> Manifest:
    documents = data.count_documents(source)
    target_info = targets.target_info(
        kind=opts.targets, vocab_size=teacher.info.vocab_size,
        top_k=opts.max_k if opts.targets == "topp" else opts.top_k, samples=opts.samples,
        temperature=opts.temperature, logprob_dtype=opts.logprob_dtype, order=opts.id_order,
        seed=opts.seed, top_p=opts.top_p, min_k=opts.min_k,
    )  # fmt: skip
    manifest = Manifest(
        format=FORMAT_NAME,
        format_version=FORMAT_VERSION,  # the oldest version that describes it, set below
        backend=opts.backend,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        teacher=teacher.info,
        tokenizer=teacher.tokenizer_info,
        data=DataInfo(
            source=str(opts.data),
            format=source.format,
            fingerprint=data.fingerprint(source),
            documents=-1 if documents is None else documents,
            text_field=source.text_field if not source.pretokenized else source.ids_field,
        ),
        targets=target_info,
        layout=LayoutInfo(
            seq_len=opts.seq_len,
            packing=opts.pack,
            sequences_per_part=max(1, opts.part_tokens // opts.seq_len),
            chunk_bytes=opts.chunk_bytes,
        ),
        codec=CodecInfo(
            name="blosc",
            cname="zstd",
            clevel=opts.clevel,
            shuffle=opts.shuffle,
            checksum="crc32c",
            # --delta: the numcodecs filter of before 1.2 (not Zarr v3 spec) in place of gaps
            delta=targets.delta_arrays(target_info) if opts.delta else [],
            gaps=[] if opts.delta else targets.gap_arrays(target_info),
        ),
        complete=False,
        sequences=0,
        tokens=0,
        tool_version=__version__,
    )
    return dataclasses.replace(manifest, format_version=version_for(manifest))
