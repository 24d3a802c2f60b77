"""`dump --task classification`: a classifier teacher over examples into a cache (format 1.3).

One sequence per example, in input order; its positions are its views (one, the example itself,
without `--views`). Each view is drawn from (seed, example, view) (`logitcache.examples.views`),
fed to the teacher, and its logits become one target row through the same `targets.py` code as a
causal LM's positions (top-k, sampled, or "full": every class in float32, exact at any
temperature). The example's hard label and each view's box go next to the targets, so a student
replays the teacher's crops without the teacher (FKD: Shen and Xing, 2022).

A text classifier (a saved `AutoModelForSequenceClassification`, or a factory with
--tokenizer) reads text examples tokenized to --seq-len (`logitcache.examples.text`); the cache
keeps the tokenizer's fingerprint, and the student's trainer tokenizes the same --data with it
(as it re-reads the images of an image cache), so a text cache holds no token ids of its own.

Several --teacher classifiers make an ensemble (`logitcache.dumping.ensemble`), once they share a
label space: the class count and, where both name them, the class names.

With --shard I/N the job writes the parts ``[I * P // N, (I + 1) * P // N)`` of the P parts
of the whole dump, byte for byte those parts, into a complete cache whose data record carries
the `[shard I/N]` marker (`logitcache.format.shards`); `logitcache merge` of every shard, in
shard order, is the whole dump. Under torchrun a classification dump is refused (`_shard`).

Examples are decoded into memory up front (`logitcache.examples.load`): every check of the data
(classes, sizes, labels) happens before --out is touched. A rerun of the same command resumes
after the committed parts, as a causal-LM dump does.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Sequence

import numpy as np
import torch

from logitcache.dumping import sharding
from logitcache.dumping import targets as target_code
from logitcache.dumping.ensemble import load_ensemble
from logitcache.dumping.options import DumpOptions, DumpSummary, check_options, ensemble_mode
from logitcache.dumping.teacher import (
    Teacher,
    as_input,
    class_names,
    is_text_classifier,
    load_classifier,
)
from logitcache.errors import LogitCacheError
from logitcache.examples.load import Examples, Text, check_labels, load_examples
from logitcache.examples.views import ViewSpec, apply_views, draw_views
from logitcache.format.manifest import (
    FORMAT_NAME,
    CodecInfo,
    LayoutInfo,
    Manifest,
    PartArrays,
    TaskInfo,
    version_for,
)
from logitcache.format.shards import Shard, shard_data
from logitcache.progress import progress_bar
from logitcache.runtime import load_tokenizer
from logitcache.storage import stores
from logitcache.version import __version__
from logitcache.write.remote_writer import open_writer

__all__ = ["dump_classifier"]


def dump_classifier(opts: DumpOptions) -> DumpSummary:
    """Run the classifier teacher over `opts.data` and write (or finish) the cache at
    `opts.out`; the settings are `DumpOptions`' (task "classification")."""
    start = time.perf_counter()
    check_options(opts)
    _check_classification(opts)
    shard = _shard(opts)
    examples = load_examples(
        opts.data, resize=opts.resize, input_field=opts.input_field, label_field=opts.label_field,
        text=_text(opts),
    )  # fmt: skip
    spec = _view_spec(opts, examples)
    teacher, names = _load(opts, examples)
    classes = teacher.info.vocab_size
    check_labels(examples.labels, classes, f"--data {opts.data}")
    if opts.targets == "topk" and not 1 <= opts.top_k <= classes:
        raise LogitCacheError(f"--top-k {opts.top_k} is not in 1..{classes} (the classes).")
    template = _template(opts, teacher, examples, spec, names)
    per_part = template.layout.sequences_per_part
    begin, end = 0, len(examples)
    if shard is not None:  # a slice of the parts, exactly the whole dump's (sharding.py)
        first, stop = sharding.part_range(-(-len(examples) // per_part), shard)
        begin, end = first * per_part, min(stop * per_part, len(examples))
        template = dataclasses.replace(template, data=shard_data(template.data, shard))
    writer = open_writer(opts.out, template, overwrite=opts.overwrite, license=opts.license)
    with writer as w:
        resumed = w.committed
        done = min(begin + resumed * per_part, end)
        bar_cm = progress_bar("dump", total=end - begin, unit="examples",
                              enabled=opts.progress, completed=done - begin)  # fmt: skip
        with bar_cm as bar:
            for first in range(done, end, per_part):
                stop = min(first + per_part, end)
                w.write_part(_part(opts, teacher, examples, spec, template, first, stop, bar))
        if not w.manifest.complete:
            w.finish()
        manifest = w.manifest
    return DumpSummary(manifest, resumed, stores.disk_usage(opts.out), time.perf_counter() - start)


def _check_classification(opts: DumpOptions) -> None:
    if opts.device_map is not None:
        raise LogitCacheError("--device-map places a causal LM; a classifier runs on --device.")
    if opts.views < 0:
        raise LogitCacheError(f"--views must be 0 (no augmentation) or more, got {opts.views}.")


def _shard(opts: DumpOptions) -> Shard | None:
    """--shard I/N, as for a causal LM. torchrun ranks are refused: they would need the rank
    group and the join of `sharding.dump_sharded`, which runs the causal-LM loop."""
    shard = sharding.from_options(opts.shard)
    if shard is not None and shard.torchrun:
        raise LogitCacheError(
            "--task classification does not run under torchrun. Split the dump into "
            "independent jobs instead: `logitcache dump ... --shard I/N --out SHARD_I` for I "
            "in 0..N-1, then `logitcache merge OUT SHARD_0 ... SHARD_N-1`."
        )
    return shard


def _text(opts: DumpOptions) -> Text | None:
    """How to tokenize the examples, for a text classifier: a saved sequence classifier (the
    first --teacher's tokenizer unless --tokenizer; every member's is checked to be the same),
    or a factory given --tokenizer. None for an image or array classifier."""
    paths = opts.teachers or ([opts.teacher] if opts.teacher else [])
    if opts.tokenizer is None and not any(is_text_classifier(p) for p in paths):
        return None
    source = opts.tokenizer or paths[0]
    flag = "--tokenizer" if opts.tokenizer else None
    return Text(load_tokenizer(source, opts.trust_remote_code, flag=flag), opts.seq_len)


def _load(opts: DumpOptions, examples: Examples) -> tuple[Teacher, list[str]]:
    """The teacher (or the ensemble of --teacher classifiers) and its class names."""

    def load(name: str | None, factory: str | None = None) -> Teacher:
        return load_classifier(
            name, examples.inputs[:1], factory=factory, tokenizer=opts.tokenizer,
            device=opts.device, dtype=opts.dtype, trust_remote_code=opts.trust_remote_code,
        )  # fmt: skip

    if not opts.teachers:
        teacher = load(opts.teacher, opts.teacher_factory)
        return teacher, class_names(teacher)
    named: list[str] = []

    def check(paths: Sequence[str], members: Sequence[Teacher]) -> None:
        named.extend(_shared_label_space(paths, members))

    mode = ensemble_mode(opts)
    teacher = load_ensemble(opts.teachers, opts.weights, mode, opts.temperature, load, check)
    return teacher, named


def _shared_label_space(paths: Sequence[str], members: Sequence[Teacher]) -> list[str]:
    """Refuse classifiers that do not share a label space (an average of their outputs class by
    class would mix classes): the same class count, and the same class names wherever two name
    theirs. Returns the names (the first member's that has them; [] if none does)."""
    first, where = members[0].info.vocab_size, paths[0]
    reference: list[str] = []
    for path, member in zip(paths, members, strict=True):
        if member.info.vocab_size != first:
            raise LogitCacheError(
                f"--teacher {path} has {member.info.vocab_size} classes, --teacher {paths[0]} "
                f"{first}: the classifiers of an ensemble must share one label space, since "
                "their outputs are averaged class by class."
            )
        own = class_names(member)
        if own and not reference:
            reference, where = own, path
        elif own and own != reference:
            i = next(c for c, (a, b) in enumerate(zip(own, reference, strict=True)) if a != b)
            raise LogitCacheError(
                f"--teacher {path} calls class {i} {own[i]!r}, --teacher {where} "
                f"{reference[i]!r} (their configs' id2label): the classifiers of an ensemble "
                "must share one label space, class id for class id. Use teachers trained on the "
                "same labels, or fix id2label in their config.json."
            )
    return reference


def _view_spec(opts: DumpOptions, examples: Examples) -> ViewSpec:
    spec = ViewSpec(opts.views, opts.crop_scale, opts.crop_ratio, opts.flip, opts.seed)
    if spec.views and examples.input == "text":
        raise LogitCacheError(
            "--views crops images; a text classifier reads each example whole (one target row "
            "per example). Leave out --views."
        )
    if spec.views:
        spec.check()
        if len(examples.shape) < 2:
            raise LogitCacheError(
                f"--views crop two spatial axes, but the examples of {opts.data} have shape "
                f"{tuple(examples.shape)}; leave out --views."
            )
    return spec


def _template(
    opts: DumpOptions, teacher: Teacher, examples: Examples, spec: ViewSpec, names: list[str]
) -> Manifest:
    classes = teacher.info.vocab_size
    if opts.targets == "full":  # every class, float32, in id order: the exact distribution
        targets = target_code.target_info(
            kind="topk", vocab_size=classes, top_k=classes, temperature=opts.temperature,
            logprob_dtype="float32", order="id",
        )  # fmt: skip
    else:
        targets = target_code.target_info(
            kind=opts.targets, vocab_size=classes, top_k=opts.top_k, samples=opts.samples,
            temperature=opts.temperature, logprob_dtype=opts.logprob_dtype, order=opts.id_order,
            seed=opts.seed,
        )  # fmt: skip
    cropped = spec.views > 0
    task = TaskInfo(
        kind="classification",
        input=examples.input,
        shape=examples.shape,
        labels=examples.labels is not None,
        views=spec.views,
        augment="crop" if cropped else "",
        scale=list(spec.scale) if cropped else [],
        ratio=list(spec.ratio) if cropped else [],
        flip=spec.flip and cropped,
        seed=spec.seed if cropped else 0,
        classes=names,
    )
    rows = max(1, spec.views)
    codec = CodecInfo("blosc", "zstd", opts.clevel, opts.shuffle, "crc32c",
                      gaps=target_code.gap_arrays(targets))  # fmt: skip
    m = Manifest(
        format=FORMAT_NAME,
        format_version="",
        backend=opts.backend,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        teacher=teacher.info,
        tokenizer=teacher.tokenizer_info,
        data=examples.info,
        targets=targets,
        layout=LayoutInfo(rows, False, max(1, opts.part_tokens // rows), opts.chunk_bytes),
        codec=codec,
        complete=False,
        sequences=0,
        tokens=0,
        tool_version=__version__,
        task=task,
        ensemble=teacher.ensemble,
    )
    return dataclasses.replace(m, format_version=version_for(m))


def _part(
    opts: DumpOptions, teacher: Teacher, examples: Examples, spec: ViewSpec, template: Manifest,
    first: int, stop: int, bar,
) -> PartArrays:  # fmt: skip
    """Examples `first..stop-1` as one part: their views, the teacher's targets on each, the
    labels and the view boxes."""
    rows = max(1, spec.views)
    target_spec = target_code.TargetSpec.of(template.targets)
    height, width = examples.shape[-2:] if spec.views else (0, 0)
    host, boxes = [], []
    for a in range(first, stop, opts.batch_size):
        b = min(a + opts.batch_size, stop)
        batch = examples.inputs[a:b]  # (B, *shape)
        if spec.views:
            views = np.concatenate([draw_views(spec, i, height, width) for i in range(a, b)])
            batch = apply_views(batch.repeat_interleave(rows, 0), torch.from_numpy(views))
            boxes.append(views)
        inputs = as_input(batch, teacher.device, opts.dtype)
        logits = teacher.logits(inputs).float().reshape(b - a, rows, -1)  # (B, views, classes)
        found = target_code.device_targets(logits, target_spec, torch.arange(a, b))
        if not bool(found["finite"].all()):
            bad = a + int(torch.nonzero(~found["finite"].all(-1))[0])
            raise LogitCacheError(
                f"the teacher's logits for example {bad} are not finite (NaN or infinite). "
                "Nothing of that part was written; check the teacher and its --dtype."
            )
        for r in range(b - a):
            host.append({k: v[r].cpu().numpy() for k, v in found.items() if k != "finite"})
        bar.advance(b - a)
    shells = [np.zeros(rows, np.int64)] * (stop - first)  # one row per view, no input ids
    arrays = target_code.assemble(template.targets, shells, host, template.codec.gaps)
    labels = None
    if examples.labels is not None:
        ids = np.repeat(examples.labels[first:stop], rows)
        labels = ids.astype(np.dtype(template.targets.id_dtype))
    views = np.concatenate(boxes) if boxes else None
    return dataclasses.replace(arrays, input_ids=None, labels=labels, views=views)
