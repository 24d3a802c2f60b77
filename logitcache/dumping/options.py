"""Every setting of a dump (`DumpOptions`), what a dump returns (`DumpSummary`), and the checks
that refuse bad settings before anything is loaded or written.

The CLI's defaults are the defaults here (`logitcache.cli.dump` reads them from the dataclass),
so a default is written once.
"""

from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from logitcache.errors import LogitCacheError
from logitcache.format.card import DEFAULT_LICENSE
from logitcache.format.ensemble import MODES as ENSEMBLE_MODES
from logitcache.format.ensemble import normalized_weights
from logitcache.format.manifest import (
    LOGPROB_DTYPES,
    MAX_SAMPLES,
    ORDERS,
    SHUFFLES,
    TARGET_KINDS,
    Manifest,
)
from logitcache.runtime import torchrun_world_size
from logitcache.storage.paths import refuse_overlap

if TYPE_CHECKING:
    from logitcache.dumping.teacher import Teacher

__all__ = [
    "ATTENTIONS",
    "CLEVELS",
    "DEFAULT_MAX_K",
    "DEFAULT_SAMPLES",
    "DEFAULT_TARGETS",
    "DEFAULT_TOP_K",
    "DEFAULT_TOP_P",
    "DEVICE_MAPS",
    "TASKS",
    "DumpOptions",
    "DumpSummary",
    "check_against_teacher",
    "check_options",
    "device_map_of",
    "max_memory_of",
]

#: What a dump stores when --targets is not given: sampled targets, the distinct ids among
#: --samples draws per position from the teacher and their counts (docs/FORMAT.md, section 3a).
#: counts / N is an unbiased estimate of the whole teacher distribution, with no tail to guess,
#: and for a peaked teacher a few distinct ids carry nearly all the draws, so the cache is
#: smaller than a top-k one of comparable fidelity. The figures that chose it (a strong teacher,
#: pure KD) are in README.md, "Choosing targets"; benchmarks/bench_fidelity.py measures that
#: regime. Top-k stays fully supported: --targets topk --top-k 32.
DEFAULT_TARGETS = "sample"
#: Draws per position of a sampled dump (--samples), the N of that benchmark.
DEFAULT_SAMPLES = 64
#: Ids per position of a top-k dump (--top-k): the smallest k whose students came within 1% of
#: online KD in benchmarks/bench_fidelity.py.
DEFAULT_TOP_K = 32
#: What a dump's teacher is (--task): a causal LM, or a classifier (format 1.3).
TASKS = ("lm", "classification")

#: Top-p targets (--targets topp): each position keeps the fewest ids whose probabilities reach
#: --top-p, at least --min-k and at most --max-k of them (docs/FORMAT.md, section 3f).
DEFAULT_TOP_P = 0.95
DEFAULT_MAX_K = 128
#: The most ids a top-p position may hold: its length is stored as a uint16.
MAX_TOPP_K = 0xFFFF

#: --clevel ranges: Blosc's (zarr) levels, 0 (none) to 9; the Parquet backend's plain zstd
#: levels, 1 to 22 (0 means zstd's default there). Checked up front: out of range, Blosc fails
#: only when the first part is written, after --out was created.
CLEVELS = {"zarr": (0, 9), "parquet": (0, 22)}

#: --device-map values for which accelerate computes the placement itself (from the free memory
#: of each GPU and the CPU, or --max-memory); any other value names a JSON file of one.
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
#: --attn: "auto" is transformers' own choice, sdpa where the model supports it, else eager.
ATTENTIONS = ("auto", "sdpa", "eager", "flash_attention_2")
#: --max-memory units: the binary ones (GiB) and the decimal ones (GB), in bytes.
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


@dataclass
class DumpOptions:
    """Every setting of a dump; the CLI fills it from flags, Python callers directly."""

    data: str
    out: str | Path  # a directory, or a URL (s3://...): see logitcache.storage.stores
    teacher: str | None = None
    #: An ensemble (`logitcache.dumping.ensemble`): two or more teachers (paths or hub names,
    #: loaded like `teacher`, which is then None), averaged as `ensemble` says ("logits" or
    #: "probs"; None: "logits") with `weights` (one per teacher; None: equal).
    teachers: list[str] = field(default_factory=list)
    ensemble: str | None = None
    weights: list[float] | None = None
    teacher_factory: str | None = None
    tokenizer: str | None = None
    trust_remote_code: bool = False
    data_format: str = "auto"
    text_field: str | None = None
    ids_field: str | None = None
    targets: str = DEFAULT_TARGETS  # "sample", "topk" or "topp"
    top_k: int = DEFAULT_TOP_K  # ids per position for targets="topk"
    top_p: float = DEFAULT_TOP_P  # targets="topp": the mass each position's ids reach...
    max_k: int = DEFAULT_MAX_K  # ...with at most max_k ids
    min_k: int = 1  # ...and at least min_k
    samples: int = DEFAULT_SAMPLES  # draws per position for targets="sample"
    temperature: float = 1.0
    seed: int = 0  # of the draws (targets="sample")
    id_order: str = "id"  # top-k: ids increasing within a position (smaller), or "descending"
    #: The layout before format 1.2: a delta filter on the arrays that increase along a
    #: position (zarr: numcodecs.delta, which is not in the Zarr v3 specification, so
    #: tensorstore and other readers refuse the cache; parquet: DELTA_BINARY_PACKED), in place
    #: of storing sampled ids as gaps. Off by default: the default cache is spec-only.
    delta: bool = False
    seq_len: int = 1024
    pack: bool = True
    # positions whose logits are made at once (chunked path, logitcache.dumping.chunked): 0 is
    # auto (256 MiB of float32 logits), -1 the full logits of every batch
    logits_chunk_tokens: int = 0
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "float32"  # what the weights are loaded in (logits and targets are float32)
    #: None: the whole teacher on `device`. Else accelerate places its layers over the GPUs (then
    #: the CPU, then the disk): one of DEVICE_MAPS, or a JSON file {module name: GPU index,
    #: "cpu" or "disk"}. For a teacher bigger than one GPU; see docs/SCALING.md.
    device_map: str | None = None
    max_memory: str | None = None  # the budgets of a computed placement: "0=70GiB,cpu=200GiB"
    attn: str = "auto"  # attention kernel of a from_pretrained teacher: one of ATTENTIONS
    backend: str = "zarr"
    logprob_dtype: str = "float16"
    part_tokens: int = 1 << 20
    chunk_bytes: int = 1 << 20
    clevel: int = 5
    shuffle: str = "shuffle"  # Blosc byte shuffle: smallest for id-ordered targets (FORMAT.md)
    overwrite: bool = False
    progress: bool = True
    #: threads that compress, write and hash parts (several parts at once, committed in
    #: order); 0 is auto: 1 for a CPU teacher, whose forward wants every core, else up to 4
    writer_threads: int = 0
    profile: bool = False  # time every stage of the dump (`logitcache.dumping.profile`)
    license: str = DEFAULT_LICENSE  # shown on the README.md card
    shard: str | None = None  # "I/N": dump only slice I of N (see logitcache.dumping.sharding)
    #: "lm": a causal LM over token sequences. "classification" (format 1.3,
    #: `logitcache.dumping.classify`): a classifier over examples, one target row per example,
    #: or per augmented view with `views`; `targets` may then also be "full" (every class).
    task: str = "lm"
    #: Views per example or sequence (format 1.3). Classification: seeded random resized crops
    #: per example (0: none, the example itself). Masked LM: maskings of each sequence, stored
    #: as consecutive sequences (0 or 1: one).
    views: int = 0
    crop_scale: tuple[float, float] = (0.08, 1.0)  # views: area fraction of a crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # views: aspect ratio (width / height)
    flip: bool = True  # views: mirror each view with probability 1/2
    resize: tuple[int, int] | None = None  # classification: (height, width) for mixed sizes
    input_field: str | None = None  # classification tables: the image or array column
    label_field: str | None = None  # classification tables: the label column
    #: Store each sequence's text and each token's character span in it (format 1.3), so that
    #: a student with another tokenizer can train from the cache (`trainer fit --loss uld`).
    offsets: bool = False
    #: Masked-LM teachers (`logitcache.dumping.masking`): the probability that a position is
    #: masked. None: `DEFAULT_MASK_PROB` for a masked-LM --teacher, and a causal teacher; given,
    #: it also makes a --teacher-factory module a masked LM. Refused with a causal LM.
    mask_prob: float | None = None


@dataclass
class DumpSummary:
    manifest: Manifest
    resumed_parts: int
    bytes_on_disk: int
    wall_seconds: float
    #: With --device-map: the teacher's modules per device (`Teacher.placement`), else None.
    placement: dict[str, int] | None = None
    logits: str = ""  # how the teacher's logits were computed: chunked or full, and why
    #: With --profile: seconds per stage and thread (`logitcache.dumping.profile`), else None.
    profile: dict | None = None

    @property
    def bytes_per_token(self) -> float | None:
        """None for a dump without tokens (an empty shard): its metadata is no rate."""
        return self.bytes_on_disk / self.manifest.tokens if self.manifest.tokens else None


def check_options(opts: DumpOptions) -> None:
    """Refuse settings that are wrong whatever the teacher and the data are, and an --out that
    overlaps an input: before the teacher is loaded or --out is touched."""
    for name in ("top_k", "max_k", "min_k", "samples", "batch_size", "part_tokens", "chunk_bytes"):
        if getattr(opts, name) < 1:
            raise LogitCacheError(
                f"--{name.replace('_', '-')} must be at least 1, got {getattr(opts, name)}."
            )
    if opts.writer_threads < 0:
        raise LogitCacheError(
            f"--writer-threads must be 0 (auto) or at least 1, got {opts.writer_threads}."
        )
    if opts.seq_len < 2:  # a 1-token sequence has no next token: a student could not train
        raise LogitCacheError(
            f"--seq-len must be at least 2, got {opts.seq_len}: the student learns to predict "
            "each token from the ones before it, so a sequence needs at least two tokens."
        )
    if opts.logits_chunk_tokens < -1:
        raise LogitCacheError(
            f"--logits-chunk-tokens must be -1 (full logits), 0 (auto) or a number of "
            f"positions, got {opts.logits_chunk_tokens}."
        )
    if opts.backend not in CLEVELS:
        raise LogitCacheError(
            f"--format must be one of {', '.join(CLEVELS)}, got {opts.backend!r}."
        )
    low, high = CLEVELS[opts.backend]
    if not low <= opts.clevel <= high:
        raise LogitCacheError(
            f"--clevel must be in {low}..{high} for --format {opts.backend} (higher: smaller "
            f"and slower), got {opts.clevel}."
        )
    if opts.logprob_dtype not in LOGPROB_DTYPES:
        raise LogitCacheError(
            f"--logprob-dtype must be one of {', '.join(LOGPROB_DTYPES)}, got "
            f"{opts.logprob_dtype!r}."
        )
    if opts.task not in TASKS:
        raise LogitCacheError(f"--task must be one of {', '.join(TASKS)}, got {opts.task!r}.")
    choices = TARGET_KINDS if opts.task == "lm" else (*TARGET_KINDS, "full")
    if opts.targets not in choices:
        raise LogitCacheError(
            f"--targets must be one of {', '.join(choices)} for --task {opts.task}, got "
            f"{opts.targets!r}."
        )
    if opts.task == "lm" and opts.resize:
        raise LogitCacheError("--resize is for --task classification.")
    if opts.id_order not in ORDERS:
        raise LogitCacheError(f"--id-order must be descending or id, got {opts.id_order!r}.")
    if opts.shuffle not in SHUFFLES:
        raise LogitCacheError(
            f"--shuffle must be one of {', '.join(SHUFFLES)}, got {opts.shuffle!r}."
        )
    if not 0 < opts.top_p <= 1:  # also refuses NaN
        raise LogitCacheError(
            f"--top-p must be in (0, 1], the probability mass each position's ids reach "
            f"(e.g. 0.95), got {opts.top_p}."
        )
    if opts.min_k > opts.max_k or opts.max_k > MAX_TOPP_K:
        raise LogitCacheError(
            f"--min-k {opts.min_k} and --max-k {opts.max_k} must satisfy 1 <= min-k <= max-k "
            f"<= {MAX_TOPP_K}."
        )
    if opts.samples > MAX_SAMPLES:
        raise LogitCacheError(f"--samples must be at most {MAX_SAMPLES}, got {opts.samples}.")
    if not 0 < opts.temperature < float("inf"):
        raise LogitCacheError(f"--temperature must be a positive number, got {opts.temperature}.")
    if not 0 <= opts.seed < 1 << 63:
        raise LogitCacheError(f"--seed must be in 0..2**63-1, got {opts.seed}.")
    _check_ensemble(opts)  # before --device-map's checks, which are about one teacher
    if opts.mask_prob is not None and not 0 < opts.mask_prob < 1:
        raise LogitCacheError(
            f"--mask-prob must be in (0, 1) (BERT's is 0.15), got {opts.mask_prob}."
        )
    if opts.views < 0:
        raise LogitCacheError(f"--views must be 0 or more, got {opts.views}.")
    _check_placement(opts)
    refuse_overlap(opts.out, _local_inputs(opts), "--out")


def _check_placement(opts: DumpOptions) -> None:
    """--attn, --device-map and --max-memory: values, and what they cannot be combined with."""
    if opts.attn not in ATTENTIONS:
        raise LogitCacheError(f"--attn must be one of {', '.join(ATTENTIONS)}, got {opts.attn!r}.")
    if opts.teacher_factory is not None and opts.attn != "auto":
        raise LogitCacheError(
            f"--attn {opts.attn} chooses the attention of a model loaded by from_pretrained "
            "(--teacher); a --teacher-factory module brings its own. Leave out --attn."
        )
    if opts.device_map is None:
        if opts.max_memory is not None:
            raise LogitCacheError(
                "--max-memory sets the budgets of a --device-map placement; add --device-map "
                "auto (or balanced, sequential), or leave out --max-memory."
            )
        return
    if opts.teacher_factory is not None:
        raise LogitCacheError(
            "--device-map places the layers of a model loaded by from_pretrained (--teacher); a "
            "--teacher-factory module is built by your code and runs whole on --device. Use "
            "--teacher with a save_pretrained directory, or leave out --device-map."
        )
    if torchrun_world_size() > 1:
        raise LogitCacheError(
            "--device-map splits one teacher over this machine's GPUs, but torchrun started "
            f"{torchrun_world_size()} processes, each of which would place a whole teacher "
            "over the same GPUs. Use one or the other: torchrun (one whole teacher per GPU, "
            "the faster) when the teacher fits on one GPU; a single process with --device-map "
            "when it does not (and --shard I/N jobs on separate machines for more throughput)."
        )
    if opts.device != "auto":
        raise LogitCacheError(
            f"--device {opts.device} and --device-map {opts.device_map} contradict: with "
            "--device-map the teacher's layers go where the map says, and the input ids to "
            "accelerate's main device. Leave out --device."
        )
    placement, budgets = device_map_of(opts), max_memory_of(opts)
    if isinstance(placement, dict) and budgets is not None:
        raise LogitCacheError(
            f"--max-memory sets the budgets accelerate places layers by, but --device-map "
            f"{opts.device_map} is a placement already. Leave out one of them."
        )
    try:
        import accelerate  # noqa: F401  (transformers places the layers with it)
    except ImportError as exc:
        raise LogitCacheError(
            "--device-map needs the accelerate package (Hugging Face's big-model loading), "
            "which is not installed here: pip install accelerate (or pip install "
            "'logitcache[big]')."
        ) from exc


def _check_ensemble(opts: DumpOptions) -> None:
    """--teacher given several times, --ensemble and --weights: together, and their values."""
    if not opts.teachers:
        if opts.ensemble is not None or opts.weights is not None:
            flag = "--ensemble" if opts.ensemble is not None else "--weights"
            raise LogitCacheError(
                f"{flag} sets how several teachers are averaged; give --teacher two or more "
                f"times (--teacher A --teacher B {flag} ...), or leave out {flag}."
            )
        return
    if opts.teacher_factory is not None:
        raise LogitCacheError(
            "an ensemble is two or more --teacher models (paths or hub names); a "
            "--teacher-factory cannot be one of them. Leave out --teacher-factory."
        )
    if len(opts.teachers) < 2 or opts.teacher is not None:
        raise LogitCacheError(
            "an ensemble is two or more teachers: DumpOptions.teachers lists all of them "
            "(teacher is then None); a single teacher is DumpOptions.teacher."
        )
    if ensemble_mode(opts) not in ENSEMBLE_MODES:
        raise LogitCacheError(
            f"--ensemble must be one of {', '.join(ENSEMBLE_MODES)}, got {opts.ensemble!r}."
        )
    normalized_weights(opts.weights, len(opts.teachers))
    if opts.device_map is not None:
        raise LogitCacheError(
            "--device-map places the layers of one teacher; the teachers of an ensemble each "
            "run whole on --device. Leave out --device-map."
        )


def ensemble_mode(opts: DumpOptions) -> str:
    """How an ensemble dump averages its teachers: --ensemble, "logits" where not given."""
    return opts.ensemble or "logits"


def device_map_of(opts: DumpOptions) -> str | dict[str, int | str] | None:
    """--device-map as from_pretrained takes it: None, one of DEVICE_MAPS, or the JSON file's
    {module name: GPU index, "cpu" or "disk"} ("cuda:N" read as N)."""
    value = opts.device_map
    if value is None or value in DEVICE_MAPS:
        return value
    path = Path(value)
    expected = (
        f"--device-map must be {', '.join(DEVICE_MAPS)}, or a JSON file mapping module names "
        'to devices ({"model.layers.0": 0, "lm_head": 1, ...}, a device being a GPU index, '
        '"cpu" or "disk")'
    )
    if not path.is_file():
        raise LogitCacheError(f"{expected}; {value!r} is neither (no such file).")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise LogitCacheError(f"{expected}; cannot read {value} as JSON: {exc}.") from exc
    if not isinstance(raw, dict) or not raw:
        raise LogitCacheError(f"{expected}; {value} holds no such mapping.")
    placement: dict[str, int | str] = {}
    for name, device in raw.items():
        if isinstance(device, str) and (match := re.fullmatch(r"cuda:(\d+)", device)):
            device = int(match[1])
        if not (device in ("cpu", "disk") or (type(device) is int and device >= 0)):
            raise LogitCacheError(f"{expected}; in {value}, {name!r} is mapped to {device!r}.")
        placement[name] = device
    return placement


def max_memory_of(opts: DumpOptions) -> dict[int | str, int] | None:
    """--max-memory as from_pretrained takes it: {GPU index, "cpu" or "disk": bytes}."""
    text = opts.max_memory
    if text is None:
        return None
    budgets: dict[int | str, int] = {}
    for item in text.split(","):
        key, sep, size = (s.strip() for s in item.partition("="))
        match = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([a-zA-Z]*)", size)
        problem = None
        if not sep or not (key.isdigit() or key in ("cpu", "disk")):
            problem = f"{item.strip()!r} is not DEVICE=SIZE"
        elif match is None or match[2].lower() not in _UNITS:
            problem = f"{size!r} is not a size"
        elif (int(key) if key.isdigit() else key) in budgets:
            problem = f"{key} is given twice"
        if problem:
            raise LogitCacheError(
                "--max-memory must be DEVICE=SIZE pairs separated by commas, DEVICE a GPU index, "
                "cpu or disk and SIZE like 70GiB or 500MB (e.g. 0=70GiB,1=70GiB,cpu=200GiB); "
                f"in {text!r}, {problem}."
            )
        assert match is not None
        budgets[int(key) if key.isdigit() else key] = int(
            float(match[1]) * _UNITS[match[2].lower()]
        )
    return budgets


def _local_inputs(opts: DumpOptions) -> list[str]:
    """What a dump reads from local disk, for the --out check: --data (for a glob, the files
    it matches) and --teacher / --tokenizer where they are paths rather than hub names."""
    found = [opts.data] if Path(opts.data).exists() else glob.glob(opts.data, recursive=True)
    named = (opts.teacher, *opts.teachers, opts.tokenizer)
    return found + [p for p in named if p and Path(p).exists()]


def check_against_teacher(opts: DumpOptions, teacher: Teacher) -> None:
    """Refuse settings the loaded teacher cannot serve (a k past its vocabulary, a tokenizer
    wider than its logits, sequences longer than its positions)."""
    _check_masking(opts, teacher)
    vocab = teacher.info.vocab_size
    if opts.targets == "topk" and not 1 <= opts.top_k <= vocab:
        raise LogitCacheError(
            f"--top-k {opts.top_k} is not in 1..{vocab} (the teacher's vocabulary size)."
        )
    if opts.targets == "topp" and not opts.max_k <= vocab:
        raise LogitCacheError(
            f"--max-k {opts.max_k} is not in 1..{vocab} (the teacher's vocabulary size)."
        )
    words = teacher.tokenizer_info.vocab_size
    if words > vocab:  # input ids up to words - 1: past the model's embedding, and any student's
        raise LogitCacheError(
            f"the tokenizer ({teacher.tokenizer_info.name}) has {words} ids but the teacher's "
            f"logits have {vocab}: ids {vocab}..{words - 1} are outside the model's vocabulary, "
            "and a cache of them would be refused by every reader. Pass the tokenizer the "
            f"teacher was trained with (--tokenizer; at most {vocab} ids), or a teacher whose "
            f"output covers all {words}."
        )
    limit = teacher.info.max_positions
    if limit is not None and opts.seq_len > limit:
        raise LogitCacheError(
            f"--seq-len {opts.seq_len} is longer than the teacher's maximum of {limit} positions. "
            f"Use --seq-len {limit} or less."
        )


def _check_masking(opts: DumpOptions, teacher: Teacher) -> None:
    """--mask-prob and --views only with a masked-LM teacher, whose tokenizer has a mask
    token."""
    name = teacher.info.name
    if teacher.info.kind != "masked":
        for flag, given in (
            ("--mask-prob", opts.mask_prob is not None),
            ("--views", opts.views > 1 and opts.task == "lm"),
        ):
            if given:
                raise LogitCacheError(
                    f"{flag} masks the input of a masked-LM teacher, but {name} is a causal LM "
                    "(its config names no *ForMaskedLM architecture): its targets are for the "
                    f"next token at every position. Leave out {flag}, or pass a masked LM."
                )
        return
    if teacher.tokenizer.mask_token_id is None:
        raise LogitCacheError(
            f"the tokenizer ({teacher.tokenizer_info.name}) has no mask token, which a masked-LM "
            "dump writes at the masked positions. Pass the teacher's own tokenizer (--tokenizer) "
            "with a mask token ([MASK])."
        )
