"""Device, dtype, quantisation and attention-kernel choices for loading the model.

Pure decisions (no model code): 'auto' means nf4 on CUDA when bitsandbytes imports, otherwise
float32 on the CPU; attention 'auto' means flash-attention-2 when ``flash_attn`` imports and the
model runs on a CUDA GPU flash-attention supports (Ampere, compute capability 8.0, and newer),
else PyTorch SDPA. nf4 on the CPU is there on request only, where the
installed bitsandbytes has a CPU backend (0.46 and later): about a quarter of fp32's memory for
the language model, at CPU speed.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

QUANTIZATIONS = ("auto", "nf4", "bf16", "fp32")
ATTENTIONS = ("auto", "flash_attention_2", "sdpa", "eager")


class DeviceChoiceError(ValueError):
    """The requested device / quantisation / attention cannot be used on this machine."""


@dataclass(frozen=True)
class DevicePlan:
    device: str  # 'cuda:0' | 'cpu'
    quantization: str  # 'nf4' | 'bf16' | 'fp32'
    attention: str  # 'flash_attention_2' | 'sdpa' | 'eager'
    gpu_name: str | None

    @property
    def four_bit(self) -> bool:
        return self.quantization == "nf4"

    @property
    def dtype(self):
        import torch

        return torch.float32 if self.quantization == "fp32" else torch.bfloat16


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # a broken CUDA install must not stop CPU use
        return False


def _imports(package: str) -> bool:
    """True when `package` is installed and imports without error (a broken build counts as
    missing)."""
    if importlib.util.find_spec(package) is None:
        return False
    try:
        importlib.import_module(package)
    except Exception:
        return False
    return True


def bitsandbytes_usable() -> bool:
    """True when bitsandbytes imports (4-bit layers on CUDA; on the CPU see below)."""
    return _imports("bitsandbytes")


@functools.lru_cache(maxsize=1)
def bitsandbytes_cpu_4bit_usable() -> bool:
    """True when bitsandbytes quantises and dequantises nf4 on the CPU (its CPU backend)."""
    if not bitsandbytes_usable():
        return False
    try:
        import torch
        from bitsandbytes.functional import dequantize_4bit, quantize_4bit

        x = torch.linspace(-1, 1, 128, dtype=torch.bfloat16).reshape(2, 64)
        q, state = quantize_4bit(x, quant_type="nf4")
        return bool((dequantize_4bit(q, state) - x).abs().max() < 0.2)
    except Exception:
        return False


def flash_attn_usable() -> bool:
    return _imports("flash_attn")


# flash-attention 2 runs on Ampere and newer GPUs only; on a T4, RTX 20xx or V100 it imports and
# then fails at the first attention call
FLASH_MIN_CAPABILITY = (8, 0)


def gpu_capability(device: str) -> tuple[int, int] | None:
    """(major, minor) compute capability of the CUDA ``device``; None when it cannot be read."""
    if not device.startswith("cuda"):
        return None
    try:
        import torch

        return tuple(torch.cuda.get_device_capability(torch.device(device)))
    except Exception:
        return None


def resolve_device(device: str = "auto") -> str:
    device = (device or "auto").lower()
    if device == "auto":
        return "cuda:0" if cuda_available() else "cpu"
    if device == "cuda":
        device = "cuda:0"
    if device.startswith("cuda"):
        if not cuda_available():
            raise DeviceChoiceError(
                f"device {device!r} was requested but PyTorch sees no CUDA GPU on this machine; "
                "use device 'cpu' or 'auto'"
            )
        return device
    if device == "cpu":
        return "cpu"
    raise DeviceChoiceError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda[:N]'")


def plan_device(device: str = "auto", quantization: str = "auto", attn: str = "auto") -> DevicePlan:
    """Decide device, weight format and attention kernel; raise DeviceChoiceError with a
    sentence when the combination cannot work here."""
    dev = resolve_device(device)
    quant = (quantization or "auto").lower()
    if quant not in QUANTIZATIONS:
        raise DeviceChoiceError(f"unknown quantization {quantization!r}; use one of {QUANTIZATIONS}")
    on_cuda = dev.startswith("cuda")
    if quant == "auto":
        quant = "nf4" if on_cuda and bitsandbytes_usable() else ("bf16" if on_cuda else "fp32")
    if quant == "nf4":
        if not on_cuda and not bitsandbytes_cpu_4bit_usable():
            raise DeviceChoiceError(
                "4-bit nf4 needs a CUDA GPU, or on the CPU a bitsandbytes with its CPU backend "
                "(0.46 or later); on the CPU use quantization 'fp32'"
            )
        if not bitsandbytes_usable():
            raise DeviceChoiceError(
                "4-bit nf4 needs the bitsandbytes package, which does not import here; "
                "install it or use quantization 'bf16'"
            )
    a = (attn or "auto").lower()
    if a not in ATTENTIONS:
        raise DeviceChoiceError(f"unknown attention {attn!r}; use one of {ATTENTIONS}")
    capability = gpu_capability(dev) if on_cuda else None
    flash_gpu = capability is not None and capability >= FLASH_MIN_CAPABILITY
    if a == "auto":
        a = "flash_attention_2" if flash_gpu and quant != "fp32" and flash_attn_usable() else "sdpa"
    elif a == "flash_attention_2" and not (on_cuda and flash_attn_usable()):
        raise DeviceChoiceError(
            "flash_attention_2 needs a CUDA GPU and the flash_attn package; use attn 'sdpa'"
        )
    elif a == "flash_attention_2" and not flash_gpu:
        have = f"{capability[0]}.{capability[1]}" if capability else "unknown"
        raise DeviceChoiceError(
            f"flash_attention_2 runs on Ampere and newer GPUs (compute capability 8.0 and up); "
            f"{gpu_name(dev) or dev} has {have}: use attn 'sdpa'"
        )
    return DevicePlan(dev, quant, a, gpu_name(dev))


def usable_quantizations(device: str) -> list[str]:
    """The weight formats `plan_device` accepts on `device` ('cpu' or 'cuda:N'), smallest first."""
    on_cuda = device.startswith("cuda")
    nf4 = bitsandbytes_usable() and (on_cuda or bitsandbytes_cpu_4bit_usable())
    return (["nf4"] if nf4 else []) + ["bf16", "fp32"]


def gpu_name(device: str) -> str | None:
    if not device.startswith("cuda"):
        return None
    try:
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    except Exception:
        return None


def gpu_free_bytes(device: str = "cuda:0") -> int | None:
    if not device.startswith("cuda") or not cuda_available():
        return None
    try:
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    except Exception:
        return None
