"""The CPU dump's top-k log-softmax in C (``native/topk_lse.c``), compiled on first use.

Why: on a CPU, ``torch.topk`` plus a log-sum-exp costs a small teacher about a third of its
forward (``bench_dump --targets-cost``); the C pass reads each row once and leaves the vector
loop only where a better id can be, so a CPU dump runs near its forward's speed. Why C through
``ctypes`` and not a torch extension: it builds in about a second with the system's ``cc`` and
no torch headers, and a ``ctypes`` call releases the GIL, so row ranges run on torch's own
number of threads.

The library is built for this machine (``-march=native``) into
``$LOGITCACHE_NATIVE_DIR`` (default ``~/.cache/logitcache/native``), named by a hash of the
source, the flags and the CPU, under a temporary name and renamed, so concurrent dumps agree.
Without a C compiler, or with ``LOGITCACHE_NATIVE=0``, `available` is False and the dump uses
torch's own operators: the same ids, log-probs equal within float rounding.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native") / "topk_lse.c"
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fPIC", "-shared")
#: Rows per call below which threads cost more than they save.
MIN_ROWS_PER_THREAD = 64


def _cpu_id() -> str:
    """What `-march=native` compiles for: the CPU model and its flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [x for x in info.splitlines() if x.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _build_dir() -> Path:
    root = os.environ.get("LOGITCACHE_NATIVE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "logitcache" / "native"


def _build(compiler: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name, suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], check=True,
                       capture_output=True, timeout=120)  # fmt: skip
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernel, built if missing; None where it cannot be (no compiler, disabled,
    a build error): the caller falls back to torch."""
    if os.environ.get("LOGITCACHE_NATIVE", "1") == "0" or platform.system() == "Windows":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), *FLAGS, compiler, _cpu_id()]).encode()
    ).hexdigest()[:16]
    path = _build_dir() / f"topk_lse-{key}.so"
    try:
        if not path.is_file():
            _build(compiler, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError):
        return None
    lib.topk_logsoftmax.restype = None
    lib.topk_logsoftmax.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                    ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                    ctypes.c_void_p, ctypes.c_void_p]  # fmt: skip
    return lib


def available() -> bool:
    """Whether the C kernel can run here (builds it on the first call)."""
    return _library() is not None


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="logitcache-topk")


def topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k log-probs, ids) of CPU float32 `logits` (..., vocab), decreasing, normalised over
    the whole vocabulary; NaN log-probs on a row with NaN or +inf or only -inf. Call only when
    `available()`."""
    lib = _library()
    assert lib is not None, "native_topk.topk_logprobs called where available() is False"
    vocab = logits.shape[-1]
    rows = logits.reshape(-1, vocab).contiguous()
    values = torch.empty(len(rows), k, dtype=torch.float32)
    ids = torch.empty(len(rows), k, dtype=torch.int64)
    scratch_floats = -(-vocab // 16) + 8 * k + 2  # the C side's block maxima and candidates

    def run(start: int, stop: int) -> None:
        scratch = torch.empty(scratch_floats, dtype=torch.float32)
        lib.topk_logsoftmax(rows.data_ptr(), vocab, start, stop, k, values.data_ptr(),
                            ids.data_ptr(), scratch.data_ptr())  # fmt: skip

    workers = max(1, min(torch.get_num_threads(), len(rows) // MIN_ROWS_PER_THREAD))
    if workers == 1:
        run(0, len(rows))
    else:
        bounds = [len(rows) * i // workers for i in range(workers + 1)]
        for f in [_pool(workers).submit(run, a, b) for a, b in itertools.pairwise(bounds)]:
            f.result()
    shape = (*logits.shape[:-1], k)
    return values.view(shape), ids.view(shape)
