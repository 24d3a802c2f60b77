"""`Cache.check_part_files`: a part's files against their sha256 in the manifest, for a local
cache and a cache in an object store alike; the trainer checks every part through it."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch

import logitcache
from logitcache import CorruptCacheError
from logitcache.storage import files, stores
from tests.synthetic import make_cache
from trainer.dataset import CacheDataset


def flip_a_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


def first_file(cache: logitcache.Cache, part: int) -> str:
    """Any file will do: its sha256 covers every byte."""
    return next(iter(cache.manifest.parts[part].files))


@pytest.fixture
def local(tmp_path) -> logitcache.Cache:
    return logitcache.open(make_cache(tmp_path / "cache", sequences=12))


@pytest.fixture
def remote(tmp_path) -> logitcache.Cache:
    url = make_cache(f"memory://check-{uuid.uuid4().hex[:8]}/cache", sequences=12)
    return logitcache.open(url, cache_dir=tmp_path / "fetched")


def test_an_intact_cache_passes(local, remote) -> None:
    for cache in (local, remote):
        for part in range(cache.num_parts):
            cache.check_part_files(part)


def test_a_flipped_byte_in_a_local_part_is_named(local) -> None:
    rel = first_file(local, 1)
    path = Path(local.root) / "parts" / rel
    path.write_bytes(flip_a_byte(path.read_bytes()))
    local.check_part_files(0)
    with pytest.raises(CorruptCacheError) as info:
        local.check_part_files(1)
    name = local.manifest.parts[1].name
    assert f"{name} of {local.root}: parts/{rel} does not match its sha256" in str(info.value)
    assert "logitcache verify" in str(info.value)


def test_a_missing_local_file_is_named(local) -> None:
    rel = first_file(local, 0)
    (Path(local.root) / "parts" / rel).unlink()
    with pytest.raises(CorruptCacheError, match=f"parts/{rel} is missing"):
        local.check_part_files(0)


def test_an_unchanged_local_file_is_hashed_once(local, monkeypatch) -> None:
    hashed: list[Path] = []
    real = files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda p: hashed.append(p) or real(p))
    local.check_part_files(0)
    first = len(hashed)
    local.check_part_files(0)
    assert first == len(local.manifest.parts[0].files) and len(hashed) == first


def test_a_flipped_byte_in_a_remote_part_is_found_when_it_is_fetched(remote) -> None:
    store = stores.RemoteStore(remote.root)
    rel = first_file(remote, 1)
    store.write_bytes(f"parts/{rel}", flip_a_byte(store.read_bytes(f"parts/{rel}")))
    remote.check_part_files(0)
    with pytest.raises(CorruptCacheError) as info:
        remote.check_part_files(1)
    assert f"{remote.root}/parts/{rel}: sha256 does not match the manifest" in str(info.value)


def test_the_trainer_refuses_a_damaged_remote_part(remote) -> None:
    store = stores.RemoteStore(remote.root)
    rel = first_file(remote, 0)
    store.write_bytes(f"parts/{rel}", flip_a_byte(store.read_bytes(f"parts/{rel}")))
    ds = CacheDataset(remote, batch_size=4, shuffle=False)
    with pytest.raises(CorruptCacheError, match="sha256 does not match the manifest"):
        for _ in torch.utils.data.DataLoader(ds, batch_size=None):
            pass
