"""Will the weights fit? Sizes a checkpoint for a device plan before it loads.

The tensor shapes come from the safetensors headers (nothing is read but the headers), the bytes
a parameter takes from the plan: 4 in fp32, 2 in bf16 or fp16, and in nf4 about 0.52 for the language
model's linear weights (4-bit codes plus double-quantised block scales) and 2 for everything
kept unquantised (bf16, or fp16 on a GPU without native bfloat16). That sum plus working memory is compared with the memory free on the device
(the GPU's free memory, or the RAM the OS says is available, capped by a container's cgroup
limit), so a model that cannot fit is refused at once, with the choices that would fit, instead
of after minutes of loading that end in a CUDA out-of-memory error or, on the CPU, in the
kernel's OOM killer ending the process without a word. ``GEOVQA_SKIP_MEMORY_CHECK=1`` loads
anyway (a machine with swap, say).

On the CPU the engine's vision-feature cache (``engine.cache.FeatureCache``, CPU tensors up to its
cap, ``serve --feature-cache-bytes``) fills the same RAM as the weights once questions come, so
the check counts it there (``ram_cache_bytes``: its cap, or what a small model's features can fill
of it, ``loader.feature_cache_need``). On a GPU it checks the GPU's memory only:
the cache then adds to the process's RAM, unchecked (docs/protocol.md says so).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from engine.cache import FEATURE_CACHE_ENV
from engine.errors import EngineError

SKIP_ENV = "GEOVQA_SKIP_MEMORY_CHECK"
# nf4 with double quantisation: 4 bits a weight, an 8-bit scale a block of 64, an fp32 scale a
# block of 256 scales
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0}
HALF_BYTES = 2.0  # nf4's unquantised tensors: bf16 or fp16, whichever the GPU computes in
# the language model's linear weights: what bitsandbytes quantises (the loader skips the vision
# tower, projector, reghead and lm_head)
QUANTISED_KEY = re.compile(r"^model\.layers\.\d+\..+\.weight$")
WORKING_FLOOR = 1 << 30  # activations, KV cache, CLIP batches: at least 1 GiB ...
WORKING_SHARE = 0.10  # ... or a tenth of the weights


class UnreadableWeights(ValueError):
    """A weight file's safetensors header cannot be read (a damaged or cut-off download)."""


class NotEnoughMemory(EngineError):
    """The weights cannot fit in the memory free on the chosen device (message says what would)."""

    def __init__(self, message: str, needed: int, available: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.available = available


@dataclass(frozen=True)
class TensorCounts:
    """Parameters of a checkpoint: those nf4 quantises and the rest."""

    quantisable: int
    other: int

    def weight_bytes(self, quantization: str) -> int:
        if quantization == "nf4":
            return int(self.quantisable * NF4_BYTES_PER_PARAM + self.other * HALF_BYTES)
        per = BYTES_PER_PARAM[quantization]
        return int((self.quantisable + self.other) * per)


def count_shapes(named_shapes: Iterable[tuple[str, Iterable[int]]]) -> TensorCounts:
    """Parameter counts of (checkpoint key, shape) pairs."""
    quantisable = other = 0
    for key, shape in named_shapes:
        shape = [int(d) for d in shape]
        n = 1
        for d in shape:
            n *= d
        if len(shape) == 2 and QUANTISED_KEY.match(key):
            quantisable += n
        else:
            other += n
    return TensorCounts(quantisable, other)


def count_parameters(files: Iterable[Path]) -> TensorCounts:
    """Parameter counts from the safetensors headers of `files` (no tensor data is read)."""
    from safetensors import safe_open

    def shapes():
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as handle:
                    pairs = [(key, handle.get_slice(key).get_shape()) for key in handle.keys()]
            except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError: the file is damaged
                raise UnreadableWeights(f"{f} is not a readable safetensors file ({exc})") from exc
            yield from pairs

    return count_shapes(shapes())


def needed_bytes(counts: TensorCounts, quantization: str) -> int:
    """Weights plus working memory for one question."""
    w = counts.weight_bytes(quantization)
    return w + max(WORKING_FLOOR, int(WORKING_SHARE * w))


def available_bytes(device: str) -> int | None:
    """Free memory on `device` (None when it cannot be told): the GPU's free memory, or the RAM
    the OS says is available, capped by this process's cgroup limit (a container's memory limit
    is what the OOM killer enforces, whatever the host has free)."""
    if device.startswith("cuda"):
        from engine.devices import gpu_free_bytes

        return gpu_free_bytes(device)
    ram = _available_ram()
    room = cgroup_room()
    if ram is None or room is None:
        return room if ram is None else ram
    return min(ram, room)


def _available_ram() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - psutil missing or unsupported: try /proc
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _stat(path: Path, *names: str) -> int:
    """The first of `names` found in a cgroup memory.stat file (0 when none is)."""
    stats = {}
    for line in (_read(path) or "").splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            stats[key] = int(value)
    return next((stats[n] for n in names if n in stats), 0)


def cgroup_room(proc_cgroup: Path = Path("/proc/self/cgroup"),
                sys_cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Memory this process's cgroup may still take (limit - usage, reclaimable file cache not
    counted as usage), for cgroup v2 and v1; None without a limit or on other systems."""
    lines = (_read(proc_cgroup) or "").splitlines()
    for line in lines:  # v2: "0::/path"
        if line.startswith("0::"):
            rel = line[3:].lstrip("/")
            for d in ([sys_cgroup / rel] if rel else []) + [sys_cgroup]:
                limit = _read(d / "memory.max")
                usage = _read(d / "memory.current")
                if limit is None or usage is None:
                    continue
                if not limit.isdigit() or not usage.isdigit():
                    return None  # "max": no limit
                used = int(usage) - _stat(d / "memory.stat", "inactive_file")
                return max(0, int(limit) - used)
    for line in lines:  # v1: "N:memory:/path" (also "N:cpu,memory:/path")
        parts = line.split(":", 2)
        if len(parts) == 3 and "memory" in parts[1].split(","):
            rel = parts[2].lstrip("/")
            base = sys_cgroup / "memory"
            for d in ([base / rel] if rel else []) + [base]:
                limit = _read(d / "memory.limit_in_bytes")
                usage = _read(d / "memory.usage_in_bytes")
                if limit is None or usage is None or not limit.isdigit() or not usage.isdigit():
                    continue
                if int(limit) >= 1 << 60:  # "unlimited" is a page-rounded 2**63
                    return None
                used = int(usage) - _stat(d / "memory.stat", "total_inactive_file", "inactive_file")
                return max(0, int(limit) - used)
    return None


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def counted_cache_bytes(device: str, ram_cache_bytes: int) -> int:
    """The part of a RAM cache's cap that counts against `device`'s free memory: all of it on the
    CPU (model and cache share the RAM), none on a GPU (whose memory alone is checked)."""
    return 0 if device.startswith("cuda") else max(0, int(ram_cache_bytes))


def fit_report(files: Iterable[Path], device: str, formats: Iterable[str],
               ram_cache_bytes: int = 0) -> dict:
    """What each weight format needs on `device` and what is free there (nothing is loaded).

    `ram_cache_bytes`: the cap of the engine's feature cache, counted in each format's need on
    the CPU (`counted_cache_bytes`); the report's ``feature_cache_bytes`` is what was counted."""
    counts = count_parameters(files)
    free = available_bytes(device)
    cache = counted_cache_bytes(device, ram_cache_bytes)

    def need(q: str) -> int:
        return needed_bytes(counts, q) + cache

    return {
        "device": device,
        "free_bytes": free,
        "parameters": counts.quantisable + counts.other,
        "feature_cache_bytes": cache,
        "formats": {q: {"weights_bytes": counts.weight_bytes(q), "needed_bytes": need(q),
                        "fits": None if free is None else need(q) <= free}
                    for q in formats},
    }


def skip_requested() -> bool:
    """GEOVQA_SKIP_MEMORY_CHECK turns the check off (1, true, yes, on); unset, blank, 0, false, no
    or off leave it on, and another value is refused (ValueError naming the variable) rather
    than read as either."""
    from engine.env_settings import env_flag  # noqa: PLC0415

    return env_flag(SKIP_ENV, "1 (load without checking the free memory) or 0 (check it)")


def check_fits(files: Iterable[Path], *, device: str, quantization: str, alternatives: Iterable[str],
               model_name: str = "the model", ram_cache_bytes: int = 0) -> None:
    """Raise NotEnoughMemory when the checkpoint in `files`, loaded with `quantization` on
    `device`, needs more than is free there (a free memory that cannot be told passes).

    `alternatives` are the other quantisations usable on this device; those that would fit are
    named in the message. `ram_cache_bytes` (the feature cache's cap) is counted on the CPU, and
    the message then names it and how to make it smaller."""
    if skip_requested():
        return
    report = fit_report(files, device, dict.fromkeys([quantization, *alternatives]), ram_cache_bytes)
    mine = report["formats"][quantization]
    if mine["fits"] is not False:
        return
    where = "on the GPU" if device.startswith("cuda") else "in RAM"
    fits = [f"{q} ({_gb(r['needed_bytes'])})" for q, r in report["formats"].items()
            if q != quantization and r["fits"]]
    choice = (f"Choose --quantization {' or '.join(fits)}" if fits
              else "No weight format fits here; free memory or use a GPU with more memory")
    need, free = mine["needed_bytes"], report["free_bytes"]
    cache = report["feature_cache_bytes"]
    parts = f"weights {_gb(mine['weights_bytes'])} + working memory"
    if cache:
        parts += f" + feature cache {_gb(cache)}"
        choice += (f", a smaller feature cache (serve --feature-cache-bytes or {FEATURE_CACHE_ENV}; "
                   "0 turns it off)")
    raise NotEnoughMemory(
        f"{model_name} in {quantization} needs about {_gb(need)} {where} ({parts}) but only "
        f"{_gb(free)} is free on {device}. {choice}, or set {SKIP_ENV}=1 to load anyway.",
        need, free)
