"""Fixtures of the dump tests: the small and main caches, dumped once per session, and the
background runner of a module's CLI jobs (tests/logitcache/background.py)."""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from logitcache.testing import toy
from tests.logitcache.background import Background, wanted_jobs
from tests.logitcache.dump_helpers import MAIN, SMALL, dump_in_process, write_docs


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_torch_thread():
    """In-process teacher forwards on one thread, like the CLI subprocesses (OMP_NUM_THREADS=1):
    on 2 shared cores, small matmuls on 2 threads are many times slower, not faster."""
    with _torch_threads(1):
        yield


@pytest.fixture(scope="session")
def small_docs(stdlib_corpus: Path) -> list[str]:
    """Six short documents (real Python source, first ~600 characters of each)."""
    files = sorted(stdlib_corpus.iterdir())[:6]
    return [f.read_text(encoding="utf-8")[:600] for f in files]


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory, small_docs: list[str]) -> Path:
    return write_docs(tmp_path_factory.mktemp("small") / "corpus", small_docs)


@pytest.fixture(scope="session")
def small_caches(tmp_path_factory, tiny_teacher_dir: Path, small_corpus: Path) -> dict[str, Path]:
    """The small corpus dumped in both formats (several parts each): the 'existing caches'.
    Session-scoped (several modules read them, none writes them), dumped on one thread."""
    return _in_both_backends(
        tmp_path_factory.mktemp("small_caches"), tiny_teacher_dir, small_corpus, SMALL
    )


@pytest.fixture(scope="session")
def main_caches(tmp_path_factory, tiny_teacher_dir: Path, stdlib_corpus: Path) -> dict[str, Path]:
    """The whole stdlib corpus dumped in both formats with `MAIN`. Session-scoped (the content,
    format and layout tests read them, none writes them), dumped on one thread."""
    return _in_both_backends(
        tmp_path_factory.mktemp("main_caches"), tiny_teacher_dir, stdlib_corpus, MAIN
    )


@pytest.fixture(scope="session")
def small_sampled_cache(tmp_path_factory, tiny_teacher_dir: Path, small_corpus: Path) -> Path:
    """The small corpus as sampled targets (N=16, parquet, several parts), dumped on one
    thread: what the tests of the readers' sampled views read."""
    out = tmp_path_factory.mktemp("small_sampled") / "cache"
    with _torch_threads(1):
        return dump_in_process(
            tiny_teacher_dir, small_corpus, out, targets="sample", samples=16, seq_len=64,
            part_tokens=256, backend="parquet",
        )  # fmt: skip


def _in_both_backends(root: Path, teacher: Path, corpus: Path, settings: dict) -> dict[str, Path]:
    """`corpus` dumped by `teacher` with `settings` into ROOT/zarr and ROOT/parquet, on one
    torch thread (as the tests that compare bytes expect)."""
    with _torch_threads(1):
        return {
            backend: dump_in_process(teacher, corpus, root / backend, backend=backend, **settings)
            for backend in ("zarr", "parquet")
        }


@pytest.fixture(scope="module")
def background(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, one_torch_thread
) -> Iterator[Background]:
    """The module's CLI jobs, submitted by its `submit_background_jobs` when its first CLI test
    starts; left-over jobs are cancelled and the module's cleanups run when it ends."""
    wanted = wanted_jobs(request)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        jobs = Background(pool)
        if wanted:
            root = tmp_path_factory.mktemp("cli")
            request.module.submit_background_jobs(jobs, wanted, root, request)
        try:
            yield jobs
        finally:
            for job in jobs.jobs.values():
                job.cancel()
    for cleanup in jobs.cleanups:
        cleanup()


@pytest.fixture(scope="session")
def second_teacher_dir(tmp_path_factory, tiny_teacher_dir: Path, stdlib_small_files) -> Path:
    """A second tiny teacher for the ensemble tests: the tiny teacher's tokenizer and shape,
    another seed and fewer steps, so the two disagree (a weaker member beside a stronger)."""
    from transformers import AutoTokenizer

    from tests.conftest import TINY_TEACHER

    settings = TINY_TEACHER | {"seed": 1, "train_steps": 15}
    return toy.build_teacher(
        tmp_path_factory.mktemp("second_teacher"), files=stdlib_small_files, verbose=False,
        tokenizer=AutoTokenizer.from_pretrained(tiny_teacher_dir), **settings,
    )  # fmt: skip


@pytest.fixture(scope="session")
def other_tokenizer_teacher_dir(tmp_path_factory, stdlib_small_files) -> Path:
    """An untrained one-layer teacher with its own 300-id tokenizer: what an ensemble with the
    tiny teacher must refuse."""
    return toy.build_teacher(
        tmp_path_factory.mktemp("other_tokenizer_teacher"), files=stdlib_small_files,
        verbose=False, vocab_size=300, n_layer=1, n_embd=32, n_head=2, n_positions=256,
    )  # fmt: skip


#: The member caches of the ensemble tests: every id (full coverage), the top 8, 16 draws.
ENSEMBLE_SHAPE = {"seq_len": 64, "part_tokens": 256}
FULL = {"targets": "topk", "top_k": 512, "logprob_dtype": "float32", **ENSEMBLE_SHAPE}
TOP8 = {"targets": "topk", "top_k": 8, "logprob_dtype": "float32", "id_order": "descending",
        **ENSEMBLE_SHAPE}  # fmt: skip
SAMPLED = {"targets": "sample", "samples": 16, **ENSEMBLE_SHAPE}


@pytest.fixture(scope="session")
def ensemble_members(
    tmp_path_factory, tiny_teacher_dir, second_teacher_dir, other_tokenizer_teacher_dir,
    small_corpus, small_docs,
) -> dict[str, list[Path]]:  # fmt: skip
    """{"full", "top8", "sampled": [cache of the tiny teacher, of the second teacher]} over
    the small corpus (the draws seeded 0 and 1), and the odd ones out: "other data" (the
    second teacher's top 8 of three of the documents), "other tokenizer" (its own teacher's
    top 8 of the small corpus). Dumped in-process on one thread, once per session."""
    root = tmp_path_factory.mktemp("ensemble_members")
    teachers = {"a": tiny_teacher_dir, "b": second_teacher_dir}
    caches: dict[str, list[Path]] = {}
    with _torch_threads(1):
        for kind, settings in (("full", FULL), ("top8", TOP8), ("sampled", SAMPLED)):
            caches[kind] = [
                dump_in_process(
                    t,
                    small_corpus,
                    root / f"{kind}-{name}",
                    **settings,
                    **({"seed": i} if kind == "sampled" else {}),
                )
                for i, (name, t) in enumerate(teachers.items())
            ]
        other_data = write_docs(root / "other-corpus", small_docs[:3])
        caches["other data"] = [
            dump_in_process(second_teacher_dir, other_data, root / "other-data", **TOP8)
        ]
        caches["other tokenizer"] = [
            dump_in_process(other_tokenizer_teacher_dir, small_corpus, root / "other-tok", **TOP8)
        ]
    return caches
