"""The CPU dump's targets in C (``native/targets.c``), compiled on first use.

Why: on a CPU, torch's operators for the targets cost a small teacher about a third of its
forward (``bench_dump --targets-cost``): ``torch.topk`` walks each row with a scalar partial
sort and a log-sum-exp reads it twice more; sampled draws make a float64 copy, a running sum
that is one long chain of dependent additions, and a search. The C passes read each row once,
leave the vector loops only where they must, and split the running sum into independent chains,
so a CPU dump runs near its forward's speed. Why C through ``ctypes`` and not a torch
extension: it builds in about a second with the system's ``cc`` and no torch headers, and a
``ctypes`` call releases the GIL.

Threads: built with ``-fopenmp`` where the compiler has it, the rows are split over the
calling thread's OpenMP team, which is torch's own (the library resolves ``libgomp.so.1`` to
the copy torch has loaded): the workers that just ran the forward and are still spinning for
work. Without OpenMP, row ranges run on a pool of torch's number of threads, which must wait for
those workers to stop spinning: on 2 cores, the top-64 of a 4096 x 8192 batch in 512-row chunks
(each after its chunk of the head) then added 39 ms to the head's 147, on the team 20 ms.

The library is built for this machine (``-march=native``) into ``$LOGITCACHE_NATIVE_DIR``
(default: ``native/`` in the cache directory of fetched parts, ``$LOGITCACHE_CACHE_DIR`` or
``~/.cache/logitcache``), named by a hash of the source, the flags and the CPU,
under a temporary name and renamed, so concurrent dumps agree. It is compiled with
``-ffast-math`` but linked without it, so that loading it does not switch the process to
flushing subnormals. Without a C compiler, or with ``LOGITCACHE_NATIVE=0``, `available` is
False and the dump uses torch's operators: the same ids, log-probs equal within float rounding,
draws equal but where u lies within ~1e-16 of a boundary.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import itertools
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native") / "targets.c"
#: The widest vectors where the CPU has them (an x86 option: other compilers' targets refuse it).
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686")
FLAGS = ("-O3", "-march=native", *(("-mprefer-vector-width=512",) if _X86 else ()),
         "-ffast-math", "-fPIC")  # fmt: skip
#: Tried first: the rows then run on torch's own OpenMP workers (``*_team`` in targets.c).
OPENMP = ("-fopenmp",)
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
    """``$LOGITCACHE_NATIVE_DIR``, else ``native/`` in the directory of fetched parts."""
    from logitcache.storage.mirror import default_cache_dir

    root = os.environ.get("LOGITCACHE_NATIVE_DIR")
    return Path(root) if root else default_cache_dir() / "native"


def _build(compiler: str, dest: Path, extra: tuple[str, ...]) -> None:
    """Compile, then link in a second step without the fast-math flags (GCC before 13 links
    crtfastmath.o into a shared library built with them, which sets flush-to-zero for every
    thread of the process that loads it)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        obj, lib = Path(tmp) / "targets.o", Path(tmp) / dest.name
        for step in ([*FLAGS, *extra, "-c", str(SOURCE), "-o", str(obj)],
                     ["-shared", *extra, str(obj), "-o", str(lib), "-lm"]):  # fmt: skip
            subprocess.run([compiler, *step], check=True, capture_output=True, timeout=120)
        os.replace(lib, dest)


def load(build_dir: Path, compiler: str) -> ctypes.CDLL | None:
    """The library for this source, flags and CPU from `build_dir`, compiled there with
    `compiler` if it is not there yet: with OpenMP where the compiler has it, else without;
    None where neither builds."""
    for extra in (OPENMP, ()):
        key = hashlib.sha256(
            "\0".join([SOURCE.read_text(), *FLAGS, *extra, compiler, _cpu_id()]).encode()
        ).hexdigest()[:16]
        path = build_dir / f"targets-{key}.so"
        try:
            if not path.is_file():
                _build(compiler, path, extra)
            lib = ctypes.CDLL(str(path))
        except (OSError, subprocess.SubprocessError):
            continue
        pointer, size = ctypes.c_void_p, ctypes.c_int64
        lib.sample_rows.restype = lib.topk_logsoftmax.restype = None
        lib.sample_rows.argtypes = [pointer, size, size, size, pointer, size, pointer, pointer]
        lib.topk_logsoftmax.argtypes = [pointer, size, size, size, size, pointer, pointer,
                                        pointer]  # fmt: skip
        if extra:
            lib.sample_rows_team.restype = lib.topk_logsoftmax_team.restype = None
            lib.topk_logsoftmax_team.argtypes = [pointer, size, size, size, pointer, pointer,
                                                 pointer, size, size]  # fmt: skip
            lib.sample_rows_team.argtypes = [pointer, size, size, pointer, size, pointer,
                                             pointer, size, size]  # fmt: skip
        lib.openmp = bool(extra)
        return lib
    return None


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The kernels, built if missing; None where they cannot be (disabled, no compiler, a build
    error): the callers fall back to torch."""
    if os.environ.get("LOGITCACHE_NATIVE", "1") == "0" or platform.system() == "Windows":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    return None if compiler is None else load(_build_dir(), compiler)


#: Set inside `torch_operators()`: the targets are computed by torch even where C could.
_TORCH_ONLY = contextvars.ContextVar("logitcache_native_torch_only", default=False)


def available() -> bool:
    """Whether the C kernels run here (builds them on the first call)."""
    return not _TORCH_ONLY.get() and _library() is not None


def openmp() -> bool:
    """Whether the kernels run here on the calling thread's OpenMP team (torch's workers)
    rather than on a thread pool of their own."""
    lib = _library()
    return lib is not None and lib.openmp


@contextlib.contextmanager
def torch_operators() -> Iterator[None]:
    """Within the block, the targets take torch's path even where C could: for a benchmark
    that times both paths side by side, and tests of the fallback in the same process."""
    token = _TORCH_ONLY.set(True)
    try:
        yield
    finally:
        _TORCH_ONLY.reset(token)


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="logitcache-targets")


def _threads(rows: int) -> int:
    """torch's number of threads, fewer where rows are too few to be worth splitting."""
    return max(1, min(torch.get_num_threads(), rows // MIN_ROWS_PER_THREAD))


def _over_rows(rows: int, run: Callable[[int, int], None]) -> None:
    """`run(start, stop)` over row ranges, on torch's number of threads (a library built
    without OpenMP)."""
    workers = _threads(rows)
    if workers == 1:
        run(0, rows)
        return
    bounds = [rows * i // workers for i in range(workers + 1)]
    for f in [_pool(workers).submit(run, a, b) for a, b in itertools.pairwise(bounds)]:
        f.result()


def _split_rows(
    lib: ctypes.CDLL,
    rows: int,
    scratch: tuple[int, torch.dtype],
    team: Callable[[int, int], None],
    each: Callable[[int, int, int], None],
) -> None:
    """A kernel over `rows` rows, each thread with `scratch` (length, dtype) of its own: on the
    OpenMP team, `team(scratch pointer, threads)`; else `each(start, stop, scratch pointer)`
    over `_over_rows`' ranges."""
    length, dtype = scratch
    if lib.openmp:
        threads = _threads(rows)
        memory = torch.empty(threads, length, dtype=dtype)  # held until the kernel returns
        team(memory.data_ptr(), threads)
        return

    def run(start: int, stop: int) -> None:
        memory = torch.empty(length, dtype=dtype)
        each(start, stop, memory.data_ptr())

    _over_rows(rows, run)


def topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k log-probs, ids) of CPU float32 `logits` (..., vocab), decreasing, normalised over
    the whole vocabulary; NaN log-probs on a row with NaN or +inf or only -inf. Call only when
    `available()`."""
    lib = _library()
    assert lib is not None, "native.topk_logprobs called where available() is False"
    vocab = logits.shape[-1]
    rows = logits.reshape(-1, vocab).contiguous()
    values = torch.empty(len(rows), k, dtype=torch.float32)
    ids = torch.empty(len(rows), k, dtype=torch.int64)
    scratch_floats = 2 * -(-vocab // 16) + 8 * k + 2  # block maxima, candidates, chosen blocks
    x, out = (rows.data_ptr(), vocab), (values.data_ptr(), ids.data_ptr())
    _split_rows(
        lib, len(rows), (scratch_floats, torch.float32),
        lambda scratch, threads: lib.topk_logsoftmax_team(
            *x, len(rows), k, *out, scratch, scratch_floats, threads),
        lambda start, stop, scratch: lib.topk_logsoftmax(*x, start, stop, k, *out, scratch),
    )  # fmt: skip
    shape = (*logits.shape[:-1], k)
    return values.view(shape), ids.view(shape)


def draw(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """(..., n) int64 ids drawn from softmax of CPU float32 `logits` (..., vocab), finite, the
    temperature applied, at float64 `uniforms` (..., n): `logitcache.dumping.sampling.draw`'s
    definition. Call only when `available()`."""
    lib = _library()
    assert lib is not None, "native.draw called where available() is False"
    vocab, n = logits.shape[-1], uniforms.shape[-1]
    rows = logits.reshape(-1, vocab).contiguous()
    u = uniforms.reshape(-1, n).to(torch.float64).contiguous()
    out = torch.empty(len(rows), n, dtype=torch.int64)
    scratch_doubles = vocab + -(-vocab // 16) + 1
    x, draws = (rows.data_ptr(), vocab), (u.data_ptr(), n, out.data_ptr())
    _split_rows(
        lib, len(rows), (scratch_doubles, torch.float64),
        lambda scratch, threads: lib.sample_rows_team(
            *x, len(rows), *draws, scratch, scratch_doubles, threads),
        lambda start, stop, scratch: lib.sample_rows(*x, start, stop, *draws, scratch),
    )  # fmt: skip
    return out.view(*logits.shape[:-1], n)
