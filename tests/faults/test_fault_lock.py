"""A second dump into a cache that one is writing is refused, naming the holder; a lock whose
holder died (SIGKILL) does not block the rerun."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from logitcache.storage.lock import LOCK_NAME, CacheLock
from tests.faults.helpers import (
    assert_same_cache,
    committed_parts,
    dump_command,
    flat,
    popen,
    run_main,
)


def test_a_second_dump_is_refused_naming_the_holder_and_a_dead_holder_does_not_block(
    tmp_path, tiny_teacher_dir, dump_corpus, dump_reference, capsys
):
    """The first dump runs in a subprocess; the second one and the rerun in this process,
    through the CLI's entry point (the same code as `logitcache dump`, without the start-up)."""
    from logitcache.cli.commands import main

    out = tmp_path / "cache"
    command = dump_command(tiny_teacher_dir, dump_corpus, out)
    in_process = ["logitcache", *command[3:]]
    # The first dump pauses (alive, holding the lock) once its manifest lists 2 parts.
    first = popen(command, LOGITCACHE_FAULTS="pause@part_committed#2")
    try:
        deadline = time.monotonic() + 180
        while committed_parts(out) < 2:
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first dump never committed 2 parts"
            time.sleep(0.05)
        before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
        code, stdout, stderr = run_main(main, in_process, capsys)
        assert code == 2, (stdout, stderr)
        message = flat(stderr)
        assert "Traceback" not in stderr
        assert message.startswith("logitcache: error: ")
        for phrase in (f"{out} is being written by logitcache dump", f"pid {first.pid}",
                       f"on host {socket.gethostname()}", "started 20"):  # fmt: skip
            assert phrase in message, message
        after = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
        assert after == before, "the refused dump changed the cache"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert (out / LOCK_NAME).is_file()  # left behind by the killed holder: stale
    code, stdout, stderr = run_main(main, in_process, capsys)
    assert code == 0, stderr
    assert "resumed after 2 committed parts" in flat(stdout)
    assert_same_cache(out, dump_reference)  # the lock file is gone too


def test_a_lock_file_naming_a_dead_process_does_not_block(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    # A process that took the lock and exited without releasing it (os._exit).
    code = (
        "import os, sys; from logitcache.storage.lock import CacheLock; "
        "lock = CacheLock(sys.argv[1]); lock.acquire(); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code, str(root)], check=True, timeout=60)
    assert (root / LOCK_NAME).read_text().startswith("{")
    with CacheLock(root) as lock:
        assert lock.held
        assert f'"pid": {os.getpid()}' in (root / LOCK_NAME).read_text()
    assert not (root / LOCK_NAME).exists()


def test_without_flock_a_stale_lock_of_this_host_is_taken_over(tmp_path, monkeypatch):
    """The fallback for filesystems without flock: O_EXCL files, dead pids taken over."""
    import errno
    import fcntl

    import pytest

    from logitcache.storage.lock import CacheBusyError

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    root = tmp_path / "cache"
    root.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (root / LOCK_NAME).write_text(
        f'{{"host": "{socket.gethostname()}", "pid": {dead.pid}, "command": "logitcache dump"}}'
    )
    with CacheLock(root):
        with pytest.raises(CacheBusyError, match=f"pid {os.getpid()}") as info:
            CacheLock(root).acquire()  # alive: refused, with the file to delete if it is gone
        assert str(root / LOCK_NAME) in str(info.value)
    assert not (root / LOCK_NAME).exists()
    (root / LOCK_NAME).write_text('{"host": "another-host", "pid": 1}')
    with pytest.raises(CacheBusyError, match="another-host"):
        CacheLock(root).acquire()
    Path(root / LOCK_NAME).unlink()
