"""What every benchmark script shares: the figures each run records next to its numbers (the
machine, the command, the date, the load, the revision), the ``benchmarks/RESULTS.md`` section
writer and its tables, and the toy teacher and stdlib corpora the dump-side benchmarks run on.

They live in one place so that the RESULTS.md headers of every script say the same things in
the same way, and a fix to one (a field added, a race closed) reaches them all. The scripts run
as ``python benchmarks/bench_x.py``, which puts this folder on ``sys.path``: ``import common``.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
#: Reusable work directory of every benchmark (teachers, corpora, caches; gitignored).
WORK = HERE / ".work"

#: The teacher the dump-side benchmarks use: the toy default (GPT-2 4x256, vocab 8192, 1024
#: positions) trained for 300 steps so its distributions are peaked like a real LM's (an
#: untrained one is near-uniform, which would make the cache sizes and codec numbers
#: meaningless).
TEACHER_KW = {"train_steps": 300}
QUICK_TEACHER_KW = {"train_steps": 20}
DEFAULT_SHAPE = "4x256"
#: Other shapes (`--teacher-shape`) cost more per step; 30 steps already peak their outputs.
OTHER_SHAPE_KW = {"train_steps": 30}


# --------------------------------------------------------------------------------------------
# What a run records
# --------------------------------------------------------------------------------------------


def now_utc() -> str:
    """The date and time in one fixed UTC format, so every section's dates compare."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def command_line() -> str:
    """The command that ran this script, as a reader would retype it from the repository root
    (the script path relative to the working directory where possible)."""
    script = Path(sys.argv[0])
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(Path.cwd())
    return shlex.join(["python", str(script), *sys.argv[1:]])


def _cpu_model() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return cpu


def _mem_total() -> str:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB RAM"
    return "unknown RAM"


def machine(extra: Sequence[str] = ()) -> dict[str, str]:
    """What the numbers were measured on: ``cpu`` (model, usable and online cores), ``memory``,
    ``software`` (Python, torch with its intra-op threads, zarr, numcodecs, then the version of
    every module named in `extra`, e.g. ``("s3fs", "moto")``) and ``gpu`` when there is one."""
    import numcodecs
    import torch
    import zarr

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    software = [
        f"Python {platform.python_version()}",
        f"torch {torch.__version__} ({torch.get_num_threads()} intra-op threads)",
        f"zarr {zarr.__version__}",
        f"numcodecs {numcodecs.__version__}",
    ]
    for name in extra:
        module = importlib.import_module(name)
        software.append(f"{name} {getattr(module, '__version__', 'unknown')}")
    info = {
        "cpu": f"{_cpu_model()}, {usable} usable cores ({os.cpu_count()} online)",
        "memory": _mem_total(),
        "software": ", ".join(software),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_line(info: dict[str, str] | None = None) -> str:
    """`machine()` on one line (cpu; memory; GPU or none; software), for the headers that give
    the machine a single bullet."""
    info = machine() if info is None else info
    gpu = f"GPU {info['gpu']}" if "gpu" in info else "no GPU"
    return f"{info['cpu']}; {info['memory']}; {gpu}; {info['software']}"


def loadavg() -> str:
    """The 1/5/15-minute load average: on a shared machine, how clean a timing could be."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def git_revision() -> str:
    """`git describe --always --dirty` of the repository, or "unknown": which code ran."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=HERE,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


# --------------------------------------------------------------------------------------------
# RESULTS.md
# --------------------------------------------------------------------------------------------


def update_results(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section between ``<!-- name:start -->`` and ``<!-- name:end -->``
    and leave every other section alone, so each script refreshes only its own. The file is
    replaced atomically through a temporary file named after this process, so two scripts
    finishing together never write through the same temporary."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if not text.strip():
        text = (
            "# Benchmark results\n\n"
            "Each section is written by the script it names; rerun the script to refresh it.\n"
        )
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def fill_defaults(args: Any, defaults: dict[str, Any]) -> Any:
    """Set each of `defaults` on `args` where the command line left it None (defaults that
    depend on a mode, such as --quick), and return `args`."""
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table with aligned columns (readable as plain text too); cells go through
    `str`."""
    cells = [[str(x) for x in row] for row in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *cells, strict=True)]
    fmt = "| " + " | ".join(f"{{:{w}}}" for w in widths) + " |"
    lines = [fmt.format(*header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(lines + [fmt.format(*row) for row in cells])


# --------------------------------------------------------------------------------------------
# The toy teacher and stdlib corpora (bench_dump, bench_scale, bench_codecs, bench_trainer)
# --------------------------------------------------------------------------------------------


def teacher_settings(quick: bool, shape: str = DEFAULT_SHAPE) -> tuple[str, dict[str, Any]]:
    """(directory name under the work folder, `toy.ensure_teacher` keyword arguments) of the
    benchmark teacher: the toy default, or a GPT-2 of another `shape` ("LAYERSxWIDTH", same
    tokenizer and vocabulary) trained briefly, for ratios on a less vocabulary-bound model."""
    if quick:
        return "teacher-quick", QUICK_TEACHER_KW
    if shape == DEFAULT_SHAPE:
        return "teacher", TEACHER_KW
    layers, width = (int(x) for x in shape.split("x"))
    shaped = {"n_layer": layers, "n_embd": width, "n_head": max(1, width // 64)}
    return f"teacher-{shape}", shaped | OTHER_SHAPE_KW


def ensure_teacher(quick: bool, work: Path, shape: str = DEFAULT_SHAPE) -> Path:
    """The benchmark teacher (`teacher_settings`), built once under `work` and reused."""
    from logitcache.testing import toy

    name, kw = teacher_settings(quick, shape)
    return toy.ensure_teacher(work / name, **kw)


def _stable_order(paths: list[Path]) -> list[Path]:
    """A fixed pseudo-random file order (by a hash of the name): mixes many packages."""
    return sorted(paths, key=lambda p: hashlib.sha1(p.name.encode()).hexdigest())


def write_token_corpus(dest: Path, teacher_dir: Path, tokens: int, split: str = "train") -> int:
    """A ``--data`` directory of whole stdlib documents totalling at least `tokens` tokens
    (counting one EOS per document, as packing does); returns the exact count. Reused when a
    finished one with the same target is there already, so repeated runs time the same text."""
    from transformers import AutoTokenizer

    from logitcache.testing import toy

    stamp = dest / ".tokens.json"
    wanted = {"tokens": tokens, "split": split, "teacher": str(teacher_dir)}
    if stamp.is_file():
        done = json.loads(stamp.read_text())
        if done.get("wanted") == wanted:
            return int(done["count"])
    shutil.rmtree(dest, ignore_errors=True)
    backend = AutoTokenizer.from_pretrained(str(teacher_dir)).backend_tokenizer
    chosen, count = [], 0
    for path in _stable_order(toy.stdlib_files(split)):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if not text.strip():
            continue
        chosen.append(path)
        count += len(backend.encode(text, add_special_tokens=False).ids) + 1
        if count >= tokens:
            break
    if count < tokens:
        raise SystemExit(f"the stdlib {split} split has only {count} tokens; ask for fewer.")
    toy.write_corpus(dest, files=chosen)
    stamp.write_text(json.dumps({"wanted": wanted, "count": count}))
    return count
