"""logitcache.storage.files: the one place for hashing, atomic writes and safe removal."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from logitcache.storage import files


def test_sha256_file_matches_hashlib_across_blocks(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert files.sha256_file(path, block=1000) == hashlib.sha256(data).hexdigest()


def test_hash_files_keys_a_part_by_its_final_name(tmp_path: Path) -> None:
    part = tmp_path / ".tmp-write"
    (part / "ids" / "c").mkdir(parents=True)
    (part / "zarr.json").write_text("{}")
    (part / "ids" / "c" / "0").write_bytes(b"abc")
    assert files.hash_files(part, "part-000000") == {
        "part-000000/ids/c/0": hashlib.sha256(b"abc").hexdigest(),
        "part-000000/zarr.json": hashlib.sha256(b"{}").hexdigest(),
    }
    one = tmp_path / "x.parquet"
    one.write_bytes(b"p")
    assert files.hash_files(one, "part-000001.parquet") == {
        "part-000001.parquet": hashlib.sha256(b"p").hexdigest()
    }


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text("old")
    seen = []
    files.write_text_atomic(path, "new", before_rename=lambda: seen.append(path.read_text()))
    assert path.read_text() == "new"
    assert seen == ["old"], "the hook runs before the rename, the old content still in place"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "manifest.json"
    path.write_text("old")

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        files.write_text_atomic(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_write_json_atomic_writes_indented_json_with_a_newline(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    files.write_json_atomic(path, {"a": [1, 2]})
    assert path.read_text() == json.dumps({"a": [1, 2]}, indent=2) + "\n"


def test_temporary_names_are_recognised(tmp_path: Path) -> None:
    assert files.is_temporary(files.temporary_sibling(tmp_path / "manifest.json").name)
    assert files.is_temporary(".write-probe-" + "0" * 32)
    assert not files.is_temporary("manifest.json")
    assert not files.is_temporary(".manifest.json.tmp")
    files.probe_writable(tmp_path / "new")
    assert list((tmp_path / "new").iterdir()) == []


def test_remove_deletes_a_link_never_what_it_points_to(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.mkdir()
    (target / "data").write_text("keep")
    link = tmp_path / "parts"
    link.symlink_to(target)
    files.remove(link)
    assert not link.exists() and not link.is_symlink()
    assert (target / "data").read_text() == "keep"
    file_link = tmp_path / "card"
    file_link.symlink_to(target / "data")
    files.remove(file_link)
    assert (target / "data").read_text() == "keep"


def test_remove_deletes_a_tree_and_accepts_a_missing_path(tmp_path: Path) -> None:
    tree = tmp_path / "parts"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_bytes(b"x" * 5)
    assert files.bytes_under(tree) == 5
    files.remove(tree)
    assert not tree.exists()
    files.remove(tree)
    files.remove_quietly(tree)
