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

from logitcache.dumping import chunked, data, masking, targets
from logitcache.dumping.ensemble import FULL_LOGITS_WHY, load_ensemble
from logitcache.dumping.options import (
    DumpOptions,
    check_against_teacher,
    check_options,
    device_map_of,
    ensemble_mode,
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
    MaskingInfo,
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
    masker: masking.Masker | None = None  # a masked-LM teacher: how each sequence is masked

    def tokens(self, bar: Bar | None = None) -> Iterator[list[int]]:
        """Token ids per document, in order; `bar` counts the documents read."""
        return data.tokenize(self._documents(bar), self.teacher.tokenizer, self.source.pretokenized)

    def _documents(self, bar: Bar | None) -> Iterator[str | list[int]]:
        documents = data.iter_documents(self.source)
        return documents if bar is None else bar.counting(documents)

    def sequences(self, bar: Bar | None = None) -> Iterator[data.Packed]:
        """The packed sequences of the whole data, in order (with --offsets, each with its text:
        `data.Spanned`; for a masked-LM teacher each one `views` times, before masking: the
        cache's sequences). The first is made at once, so that empty data (or packing without an
        EOS token) fails before --out is touched."""
        eos = self.teacher.tokenizer_info.eos_token_id
        o = self.opts
        if o.offsets:
            spans = data.tokenize_spans(self._documents(bar), self.teacher.tokenizer)
            stream = data.pack_spans(spans, o.seq_len, eos, o.pack)
        else:
            stream = data.pack(self.tokens(bar), o.seq_len, eos, o.pack)
        first = next(stream, None)
        if first is None:
            raise self._no_tokens()
        return masking.repeat_views(itertools.chain([first], stream), self._views)

    @property
    def _views(self) -> int:
        return 1 if self.masker is None else self.masker.info.views

    def count_parts(self) -> int:
        """How many parts the whole dump makes: a counting pass over the tokens, without
        packing them or running the teacher (what a shard needs to find its slice)."""
        eos = self.teacher.tokenizer_info.eos_token_id
        sequences = data.count_sequences(self.tokens(), self.opts.seq_len, eos, self.opts.pack)
        if sequences == 0:
            raise self._no_tokens()
        return -(-sequences * self._views // self.template.layout.sequences_per_part)

    def _no_tokens(self) -> LogitCacheError:
        return LogitCacheError(f"--data {self.opts.data} holds no tokens: every document is empty.")


def prepare(opts: DumpOptions) -> Prepared:
    """Check `opts`, load the teacher and the data, and build the manifest template."""
    check_options(opts)
    source = data.resolve(opts.data, opts.data_format, opts.text_field, opts.ids_field)
    teacher = _load(opts)
    check_against_teacher(opts, teacher)
    if opts.offsets:
        data.check_offsets(source, teacher.tokenizer)
    if source.pretokenized:  # before touching --out: a bad id must leave nothing behind
        data.check_ids(source, teacher.info.vocab_size)
    template = _manifest_template(opts, teacher, source)
    masker = None
    if template.masking is not None:  # its head is no plain linear layer: the full logits
        plan = chunked.LogitsPlan(None, why="a masked-LM teacher")
        tok = teacher.tokenizer
        specials = np.asarray(sorted(set(tok.all_special_ids)), dtype=np.int64)
        masker = masking.Masker(template.masking, specials, len(tok))
    elif opts.teachers:  # an ensemble: one member at a time into a running average
        plan = chunked.LogitsPlan(None, why=FULL_LOGITS_WHY)
    else:
        plan = chunked.plan_logits(
            teacher.model, teacher.device, pretrained=opts.teacher is not None,
            chunk_tokens=opts.logits_chunk_tokens,
        )  # fmt: skip
    profile = Profile(opts.profile, teacher.device)
    return Prepared(opts, teacher, source, template, plan, profile, masker)


def _load(opts: DumpOptions) -> Teacher:
    """The teacher of the dump: `opts.teacher` or the factory's, or the ensemble of
    `opts.teachers`, each member loaded as a single --teacher would be."""

    def load(name: str | None, factory: str | None = None) -> Teacher:
        return load_teacher(
            name, factory=factory, tokenizer=opts.tokenizer, device=opts.device,
            dtype=opts.dtype, trust_remote_code=opts.trust_remote_code,
            device_map=device_map_of(opts), max_memory=max_memory_of(opts), attn=opts.attn,
            masked_factory=opts.mask_prob is not None,
        )  # fmt: skip

    if not opts.teachers:
        return load(opts.teacher, opts.teacher_factory)
    return load_ensemble(opts.teachers, opts.weights, ensemble_mode(opts), opts.temperature, load)


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
            offsets=opts.offsets,
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
        ensemble=teacher.ensemble,
        masking=_masking_info(opts, teacher),
    )
    return dataclasses.replace(manifest, format_version=version_for(manifest))


def _masking_info(opts: DumpOptions, teacher: Teacher) -> MaskingInfo | None:
    """The manifest's `masking` record of a masked-LM teacher (BERT's 80/10/10), else None."""
    if teacher.info.kind != "masked":
        return None
    prob = masking.DEFAULT_MASK_PROB if opts.mask_prob is None else opts.mask_prob
    mask_id = teacher.tokenizer.mask_token_id
    return MaskingInfo(
        prob=float(prob), mask_token_id=mask_id, seed=opts.seed, views=max(1, opts.views)
    )
