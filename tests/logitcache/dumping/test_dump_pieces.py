"""The dump's public pieces: the shared setup (`prepare`), the batches, the seams of `run` that
bench_dump times the stages with, and the CLI's defaults (those of `DumpOptions`)."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest

from logitcache.dumping import pipeline, targets
from logitcache.dumping.options import (
    DEFAULT_SAMPLES,
    DEFAULT_TARGETS,
    DEFAULT_TOP_K,
    DumpOptions,
    check_options,
)
from logitcache.dumping.prepare import prepare
from logitcache.format.manifest import MAX_SAMPLES, TARGET_KINDS
from logitcache.read import reader


def _options(data, out, teacher) -> DumpOptions:
    return DumpOptions(
        data=str(data), out=out, teacher=str(teacher), targets="topk", top_k=8, seq_len=64,
        part_tokens=4096, device="cpu", progress=False,
    )  # fmt: skip


def test_batches_never_span_two_parts_and_a_resume_skips_whole_parts():
    sequences = [np.full(3, i) for i in range(7)]  # parts of 3: [0 1 2] [3 4 5] [6]
    got = list(pipeline.batches(iter(sequences), per_part=3, batch_size=2, skip_parts=1))
    assert [[int(s[0]) for s in batch] for batch, _ in got] == [[3, 4], [5], [6]]
    assert [ends_part for _, ends_part in got] == [False, True, True]


def test_input_ids_are_right_padded_with_zeros():
    ids = pipeline.input_ids([np.array([5, 6, 7]), np.array([8])])
    assert ids.dtype == np.int64
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]


def test_prepare_counts_the_parts_and_builds_the_template_of_the_dump(
    tmp_path, tiny_teacher_dir, stdlib_corpus, tiny_cache
):
    job = prepare(_options(stdlib_corpus, tmp_path / "unused", tiny_teacher_dir))
    cache = reader.open(tiny_cache)
    assert job.count_parts() == cache.num_parts
    assert job.template.settings() == cache.manifest.settings()
    assert len(next(job.sequences())) == 64
    assert not (tmp_path / "unused").exists()  # the setup touches no --out


def test_the_loop_seams_replace_the_targets_and_the_writer(tmp_path, tiny_teacher_dir, dump_corpus):
    shapes, sunk = [], []

    def targets_fn(logits, spec, sequences, *, first_position=0):
        shapes.append(tuple(logits.shape))
        return targets.device_targets(logits, spec, sequences, first_position=first_position)

    def loop(*args, **kw):
        pipeline.run(*args, **kw, targets_fn=targets_fn, sink=sunk.append)

    summary = pipeline.dump(_options(dump_corpus, tmp_path / "cache", tiny_teacher_dir), loop=loop)
    assert shapes and len(sunk) == len(shapes)
    assert all(isinstance(b, pipeline.BatchTargets) for b in sunk)
    assert summary.manifest.parts == []  # the sink dropped every batch: nothing was written


def test_the_dump_command_defaults_are_those_of_dump_options():
    from logitcache.cli.dump import dump as command

    defaults = {f.name: f.default for f in dataclasses.fields(DumpOptions)}
    renamed = {"format": "backend", "out_dir": "out"}
    flags = {renamed.get(n, n): p.default for n, p in inspect.signature(command).parameters.items()}
    # chunk_bytes has no flag; teachers is --teacher given more than once (an ensemble)
    assert set(flags) == set(defaults) - {"chunk_bytes", "teachers"}
    # The target options default to None: `cli.dump.target_kind` resolves them (a top-k option
    # implies --targets topk), then the missing ones take DumpOptions' defaults.
    resolved_later = {"targets", "top_k", "samples", "id_order", "logprob_dtype", "top_p", "max_k",
                      "min_k"}  # fmt: skip
    pairs = {"crop_scale", "crop_ratio"}  # "MIN,MAX" text that the command parses
    for name, default in flags.items():
        if name in resolved_later:
            assert default is None, name
        elif name in pairs:
            parsed = tuple(float(x) for x in default.split(","))
            assert parsed == pytest.approx(defaults[name], rel=1e-3), name
        elif default is not inspect.Parameter.empty:  # --data and --out are required
            assert default == defaults[name], name


def test_the_default_targets_are_the_named_constants_and_pass_the_checks(tmp_path):
    """One place names the default target kind and its size; the benchmark that picks them
    changes those constants alone."""
    opts = DumpOptions(data=str(tmp_path / "data"), out=tmp_path / "out")
    assert (opts.targets, opts.samples, opts.top_k) == (
        DEFAULT_TARGETS,
        DEFAULT_SAMPLES,
        DEFAULT_TOP_K,
    )
    assert DEFAULT_TARGETS in TARGET_KINDS and 1 <= DEFAULT_SAMPLES <= MAX_SAMPLES
    check_options(opts)  # the defaults are valid settings
