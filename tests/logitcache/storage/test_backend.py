"""Every storage backend passes the same checks (a conformance suite, as zarr-python's stores)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from logitcache.errors import LogitCacheError
from logitcache.format.manifest import BACKENDS, PartInfo, array_names, expected_arrays
from logitcache.storage import backend as registry
from logitcache.storage.files import bytes_under, hash_files
from tests.synthetic import template, topk_part


def _members() -> list[str]:
    names = [n for n in vars(registry.Backend) if not n.startswith("_")]
    return sorted(set(names) | set(registry.Backend.__annotations__))


@pytest.fixture(params=BACKENDS)
def written(request: pytest.FixtureRequest, tmp_path: Path):
    """(backend, manifest, part info, arrays, parts dir) of one freshly written part."""
    manifest = template(backend=request.param, chunk_bytes=256)
    backend = registry.get_backend(request.param)
    rng = np.random.default_rng(1)
    lengths = np.array([5, 9, 3])
    tokens = int(lengths.sum())
    arrays = topk_part(
        rng.integers(0, 300, size=tokens), rng.normal(size=(tokens, 300)), lengths, 4, "uint16"
    )
    parts = tmp_path / "parts"
    parts.mkdir()
    name = "part-000000"
    path = parts / (name + backend.SUFFIX)
    backend.write_part(path, arrays, manifest.codec, manifest.layout.chunk_bytes)
    info = PartInfo(name, arrays.sequences, arrays.tokens, hash_files(path, path.name), 0)
    return backend, manifest, info, arrays, parts


def test_every_backend_has_every_member_of_the_protocol() -> None:
    for name in BACKENDS:
        backend = registry.get_backend(name)
        missing = [m for m in _members() if not hasattr(backend, m)]
        assert not missing, f"{name} lacks {missing}"


def test_an_unknown_backend_is_refused_with_the_known_ones() -> None:
    with pytest.raises(
        LogitCacheError, match="unknown format 'hdf5'; choose one of: zarr, parquet"
    ):
        registry.get_backend("hdf5")


def test_a_written_part_reads_back_whole_by_rows_and_by_chunks(written) -> None:
    backend, manifest, info, arrays, parts = written
    path = parts / (info.name + backend.SUFFIX)
    names = array_names(manifest.targets.kind)
    back = backend.read_part(path, names)
    for name in names:
        np.testing.assert_array_equal(getattr(back, name), getattr(arrays, name))
        chunks = [chunk for _, chunk in backend.iter_chunks(path, name)]
        np.testing.assert_array_equal(np.concatenate(chunks), getattr(arrays, name))
    np.testing.assert_array_equal(
        backend.read_rows(path, "target_ids", 4, 11), arrays.target_ids[4:11]
    )


def test_a_written_part_passes_its_own_checks(written) -> None:
    backend, manifest, info, _, parts = written
    path = parts / (info.name + backend.SUFFIX)
    listed = {rel[len(path.name) + 1 :] for rel in info.files if "/" in rel}
    backend.check_part(path, expected_arrays(manifest, info), listed)
    assert backend.file_problems(parts, info) == []
    sizes = backend.array_bytes(parts, info)
    assert sum(sizes.values()) == bytes_under(path)
    assert {"input_ids", "target_ids", "target_logprobs"} <= set(sizes)


def test_a_part_that_disagrees_with_the_manifest_fails_its_check(written) -> None:
    backend, manifest, info, _, parts = written
    path = parts / (info.name + backend.SUFFIX)
    listed = {rel[len(path.name) + 1 :] for rel in info.files if "/" in rel}
    wrong = PartInfo(info.name, info.sequences + 1, info.tokens, info.files, 0)
    with pytest.raises(ValueError):
        backend.check_part(path, expected_arrays(manifest, wrong), listed)
