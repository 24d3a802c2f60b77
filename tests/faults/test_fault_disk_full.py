"""The disk fills up during a dump: a clear message, exit code 2, the committed parts kept and
the failed one removed; after space is freed the same command finishes the dump, and the cache
equals an uninterrupted one.

Two ways to fill the disk: a real size-limited filesystem (a tmpfs mounted for the test, then
remounted larger; needs root and mount rights, skipped otherwise), and the writer's fault hook
(LOGITCACHE_FAULTS=enospc=BYTES, here set in-process), which makes a part write fail with a
real OSError(ENOSPC) after BYTES bytes, through the same error path (runs everywhere)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.helpers import (
    assert_same_cache,
    committed_parts,
    dump_command,
    flat,
    mount,
    run_main,
    small_tmpfs,
)


def check_failed_dump(code: int, stderr: str, out: Path) -> int:
    message = flat(stderr)
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert message.startswith("logitcache: error: cannot write to "), message
    assert "No space left on device" in message and "free space" in message, message
    assert "rerun the same command" in message
    parts = committed_parts(out)
    assert parts > 0, "nothing was committed before the disk filled up"
    assert f"while writing part-{parts:06d}" in message, message
    leftovers = [p.name for p in (out / "parts").iterdir() if p.name.startswith(".tmp-")]
    assert not leftovers, f"the failed part was not removed: {leftovers}"
    return parts


@pytest.mark.parametrize("writer_threads", [1, 3])
def test_enospc_from_the_writer_then_rerun(
    tmp_path, tiny_teacher_dir, dump_corpus, dump_reference, capsys, monkeypatch, writer_threads
):
    """LOGITCACHE_FAULTS=enospc=150000 (about a third of the cache), set here in-process. With
    a pool of 3 writers, parts after the failed one may be staged already: they must be
    removed too, and the commits before it kept in order."""
    from logitcache.cli.commands import main
    from logitcache.write import faults

    out = tmp_path / "cache"
    args = ["logitcache", *dump_command(tiny_teacher_dir, dump_corpus, out)[3:]]
    args += ["--writer-threads", str(writer_threads)]
    monkeypatch.setattr(faults, "ACTIVE", True)
    monkeypatch.setattr(faults, "_ENOSPC_AFTER", 150_000)
    monkeypatch.setattr(faults, "_written", 0)
    code, _, stderr = run_main(main, args, capsys)
    check_failed_dump(code, stderr, out)
    assert "injected by LOGITCACHE_FAULTS" in stderr
    monkeypatch.setattr(faults, "_ENOSPC_AFTER", None)  # space freed
    code, stdout, stderr = run_main(main, args, capsys)
    assert code == 0, stderr
    assert "resumed after" in stdout
    assert_same_cache(out, dump_reference)


@pytest.fixture
def small_filesystem(tmp_path):
    """A 200 KiB tmpfs (the cache needs ~450 KiB of data, and tmpfs takes 4 KiB per file)."""
    covered = "the ENOSPC hook test covers the disk-full path"
    with small_tmpfs(tmp_path / "disk", "200k", covered) as disk:
        yield disk


def test_a_real_full_filesystem_then_rerun_after_freeing_space(
    small_filesystem, tiny_teacher_dir, dump_corpus, dump_reference, capsys
):
    from logitcache.cli.commands import main

    out = small_filesystem / "cache"
    args = ["logitcache", *dump_command(tiny_teacher_dir, dump_corpus, out)[3:]]
    code, _, stderr = run_main(main, args, capsys)
    check_failed_dump(code, stderr, out)
    assert "injected" not in stderr  # the kernel's ENOSPC this time
    proc = mount("-o", "remount,size=4m", str(small_filesystem))  # space is freed
    assert proc.returncode == 0, proc.stderr
    code, stdout, stderr = run_main(main, args, capsys)
    assert code == 0, stderr
    assert "resumed after" in stdout
    assert_same_cache(out, dump_reference)
