"""Device, dtype, quantisation and attention-kernel choices for loading the model.

Pure decisions (no model code): 'auto' means nf4 on CUDA when bitsandbytes imports (16-bit
weights without it), otherwise float32 on the CPU. The 16-bit float the model computes in (nf4's
compute dtype, the unquantised vision tower and projector, the 16-bit weight format) is bfloat16,
except on CUDA GPUs without native bfloat16 (compute capability below 8.0: T4, V100, RTX 20xx,
GTX 10xx), where it is float16 (`half_precision`); there 'bf16' is refused with a sentence naming
'fp16', and the plan's names say fp16 where fp16 runs. Attention 'auto' means flash-attention-2 when ``flash_attn`` imports and the
model runs on a CUDA GPU flash-attention supports (Ampere, compute capability 8.0, and newer),
else PyTorch SDPA. nf4 on the CPU is there on request only, where the
installed bitsandbytes has a CPU backend (0.46 and later): about a quarter of fp32's memory for
the language model, at CPU speed.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from dataclasses import dataclass

QUANTIZATIONS = ("auto", "nf4", "bf16", "fp16", "fp32")
HALF_FORMATS = ("bf16", "fp16")  # the 16-bit weight formats, by their --quantization names
ATTENTIONS = ("auto", "flash_attention_2", "sdpa", "eager")


class DeviceChoiceError(ValueError):
    """The requested device / quantisation / attention cannot be used on this machine."""


@dataclass(frozen=True)
class DevicePlan:
    device: str  # 'cuda:0' | 'cpu'
    quantization: str  # 'nf4' | 'bf16' | 'fp16' | 'fp32'
    attention: str  # 'flash_attention_2' | 'sdpa' | 'eager'
    gpu_name: str | None
    # the float format the model computes in: 'fp32' for fp32, else `half_precision(device)`
    # ('bf16' | 'fp16'); for nf4 the dtype of its 4-bit layers' matmuls and of every
    # unquantised tensor (vision tower, projector, reghead, embeddings, lm_head)
    compute: str

    @property
    def four_bit(self) -> bool:
        return self.quantization == "nf4"

    @property
    def dtype(self):
        """The torch dtype of `compute`: what the weights are loaded in and computed with."""
        return torch_dtype(self.compute)

    @property
    def description(self) -> str:
        """The weight format as shown to a user: 'nf4 (fp16 compute)' where nf4 computes in
        float16, else the quantization name, which already says the dtype."""
        if self.four_bit and self.compute == "fp16":
            return "nf4 (fp16 compute)"
        return self.quantization


def torch_dtype(name: str):
    """torch dtype of a float format name: 'fp32' | 'bf16' | 'fp16'."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


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


# bfloat16 arithmetic is native from Ampere (compute capability 8.0) on. Older GPUs have float16
# units only: bf16 there runs emulated through float32 (slowly) or fails in a kernel that has no
# bf16 path for them. The capability is the rule, not torch.cuda.is_bf16_supported(): by default
# (including_emulation=True) that answers True on a T4 too, because emulation "works"; its
# native answer is the same capability test, and reading the capability keeps this rule and
# flash-attention's (FLASH_MIN_CAPABILITY) on one probe.
BF16_MIN_CAPABILITY = (8, 0)


def half_precision(device: str) -> str:
    """'bf16' or 'fp16': the 16-bit float format the model computes in on `device`.

    'fp16' on a CUDA GPU below compute capability 8.0 (no native bfloat16), 'bf16' on newer ones
    and on the CPU (where bfloat16 is PyTorch's supported 16-bit format). A GPU whose capability
    cannot be read keeps bf16, as before this choice existed."""
    capability = gpu_capability(device) if device.startswith("cuda") else None
    return "fp16" if capability is not None and capability < BF16_MIN_CAPABILITY else "bf16"


def half_dtype(device: str):
    """The torch dtype of `half_precision(device)` (torch.bfloat16 or torch.float16)."""
    return torch_dtype(half_precision(device))


def _capability_text(device: str) -> str:
    capability = gpu_capability(device)
    have = f"{capability[0]}.{capability[1]}" if capability else "unknown"
    return f"{gpu_name(device) or device} has {have}"


def resolve_device(device: str = "auto") -> str:
    device = (device or "auto").lower()
    if device == "auto":
        return "cuda:0" if cuda_available() else "cpu"
    if device == "cuda":
        device = "cuda:0"
    if device.startswith("cuda"):
        # 'cuda:x', 'cuda:-1' or 'cudax' used to pass on a GPU machine and fail in torch later
        number = re.fullmatch(r"cuda:(\d+)", device)
        if number is None:
            raise DeviceChoiceError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N' "
                                    "(N the GPU's number, from 0)")
        if not cuda_available():
            raise DeviceChoiceError(
                f"device {device!r} was requested but PyTorch sees no CUDA GPU on this machine; "
                "use device 'cpu' or 'auto'"
            )
        count = gpu_count()
        if count and int(number.group(1)) >= count:
            raise DeviceChoiceError(
                f"device {device!r} does not exist: PyTorch sees {count} CUDA GPU(s) here, "
                f"cuda:0 to cuda:{count - 1}"
            )
        return device
    if device == "cpu":
        return "cpu"
    raise DeviceChoiceError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda[:N]'")


def gpu_count() -> int:
    """How many CUDA GPUs PyTorch sees (0 when it cannot tell)."""
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:
        return 0


def plan_device(device: str = "auto", quantization: str = "auto", attn: str = "auto") -> DevicePlan:
    """Decide device, weight format and attention kernel; raise DeviceChoiceError with a
    sentence when the combination cannot work here."""
    dev = resolve_device(device)
    quant = (quantization or "auto").lower()
    if quant not in QUANTIZATIONS:
        raise DeviceChoiceError(f"unknown quantization {quantization!r}; use one of {QUANTIZATIONS}")
    on_cuda = dev.startswith("cuda")
    half = half_precision(dev)
    if quant == "auto":
        quant = "nf4" if on_cuda and bitsandbytes_usable() else (half if on_cuda else "fp32")
    if quant == "bf16" and half == "fp16":
        raise DeviceChoiceError(
            f"bf16 needs a GPU with native bfloat16 (compute capability 8.0 and up: Ampere and "
            f"newer); {_capability_text(dev)}: use quantization 'fp16' (the same size) or 'nf4'"
        )
    if quant == "fp16" and not on_cuda:
        raise DeviceChoiceError(
            "fp16 is for CUDA GPUs without native bfloat16; on the CPU use quantization 'fp32' or 'bf16'"
        )
    if quant == "nf4":
        if not on_cuda and not bitsandbytes_cpu_4bit_usable():
            raise DeviceChoiceError(
                "4-bit nf4 needs a CUDA GPU, or on the CPU a bitsandbytes with its CPU backend "
                "(0.46 or later); on the CPU use quantization 'fp32'"
            )
        if not bitsandbytes_usable():
            raise DeviceChoiceError(
                "4-bit nf4 needs the bitsandbytes package, which does not import here; "
                f"install it or use quantization '{half}'"
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
        raise DeviceChoiceError(
            f"flash_attention_2 runs on Ampere and newer GPUs (compute capability 8.0 and up); "
            f"{_capability_text(dev)}: use attn 'sdpa'"
        )
    compute = "fp32" if quant == "fp32" else (quant if quant in HALF_FORMATS else half)
    return DevicePlan(dev, quant, a, gpu_name(dev), compute)


def usable_quantizations(device: str) -> list[str]:
    """The weight formats `plan_device` accepts on `device` ('cpu' or 'cuda:N'), smallest first;
    of the two 16-bit ones the device's own (`half_precision`) only: they are the same size, and
    on a GPU without native bfloat16 'bf16' is refused."""
    on_cuda = device.startswith("cuda")
    nf4 = bitsandbytes_usable() and (on_cuda or bitsandbytes_cpu_4bit_usable())
    return (["nf4"] if nf4 else []) + [half_precision(device), "fp32"]


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
