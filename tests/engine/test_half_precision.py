"""The 16-bit float the engine computes in: bfloat16 on GPUs with native bf16 (compute capability
8.0 and up) and on the CPU, float16 on older GPUs (T4, V100, RTX 20xx, GTX 10xx), where bf16 runs
emulated or fails. A T4 and an A100 are simulated through torch's CUDA probes; their
`is_bf16_supported()` answers True on both, as PyTorch's does by default (emulation counts)."""

from __future__ import annotations

import json

import pytest
import torch

import engine.devices as D
from engine import memory_check
from engine.loader import quant_config, weight_files
from engine.memory_check import NotEnoughMemory, check_fits, count_parameters, needed_bytes

T4 = ((7, 5), "Tesla T4")
A100 = ((8, 0), "NVIDIA A100-SXM4-40GB")


def _gpu(monkeypatch, gpu, bitsandbytes: bool = True):
    capability, name = gpu
    monkeypatch.setattr(D, "cuda_available", lambda: True)
    monkeypatch.setattr(D, "bitsandbytes_usable", lambda: bitsandbytes)
    monkeypatch.setattr(D, "flash_attn_usable", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


@pytest.mark.parametrize("gpu, dtype, shown", [(T4, torch.float16, "nf4 (fp16 compute)"),
                                               (A100, torch.bfloat16, "nf4")])
def test_nf4_computes_in_the_gpus_own_16_bit_format(monkeypatch, gpu, dtype, shown):
    """nf4's compute dtype, and the dtype of the vision tower, projector and everything else kept
    unquantised (the loader loads them in `plan.dtype`)."""
    _gpu(monkeypatch, gpu)
    plan = D.plan_device("auto", "auto", "auto")
    assert (plan.quantization, plan.dtype, plan.description) == ("nf4", dtype, shown)
    assert plan.compute == {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    bnb = quant_config(plan)  # the BitsAndBytesConfig load_model passes on
    assert bnb.bnb_4bit_compute_dtype == dtype and bnb.bnb_4bit_quant_type == "nf4"
    # double quantisation (the memory check's NF4_BYTES_PER_PARAM) and the unquantised modules
    assert bnb.bnb_4bit_use_double_quant is True
    assert set(bnb.llm_int8_skip_modules) == {"vision_tower", "mm_projector", "reghead", "lm_head"}
    assert quant_config(D.plan_device("cuda", "fp32")) is None


@pytest.mark.parametrize("gpu, half", [(T4, "fp16"), (A100, "bf16")])
def test_auto_without_bitsandbytes_loads_the_gpus_16_bit_format(monkeypatch, gpu, half):
    _gpu(monkeypatch, gpu, bitsandbytes=False)
    plan = D.plan_device("cuda", "auto")
    assert (plan.quantization, plan.compute, plan.description) == (half, half, half)
    assert plan.dtype == D.torch_dtype(half)
    assert D.usable_quantizations("cuda:0") == [half, "fp32"]
    with pytest.raises(D.DeviceChoiceError, match=f"bitsandbytes.*use quantization '{half}'"):
        D.plan_device("cuda", "nf4")


def test_bf16_asked_for_on_a_gpu_without_it_is_refused_naming_fp16(monkeypatch):
    _gpu(monkeypatch, T4)
    with pytest.raises(D.DeviceChoiceError, match=r"native bfloat16 .*Tesla T4 has 7\.5: use quantization 'fp16'"):
        D.plan_device("cuda", "bf16")
    fp16 = D.plan_device("cuda", "fp16")
    assert (fp16.quantization, fp16.dtype) == ("fp16", torch.float16)
    assert D.usable_quantizations("cuda:0") == ["nf4", "fp16", "fp32"]
    fp32 = D.plan_device("cuda", "fp32")
    assert (fp32.dtype, fp32.description) == (torch.float32, "fp32")


def test_fp16_runs_on_any_gpu_not_on_the_cpu(monkeypatch):
    _gpu(monkeypatch, A100)
    assert D.plan_device("cuda", "fp16").dtype == torch.float16
    assert D.plan_device("cuda", "bf16").dtype == torch.bfloat16
    with pytest.raises(D.DeviceChoiceError, match="on the CPU use quantization 'fp32' or 'bf16'"):
        D.plan_device("cpu", "fp16")
    assert D.plan_device("cpu", "bf16").dtype == torch.bfloat16
    assert D.half_precision("cpu") == "bf16"


def test_the_memory_check_names_fp16_on_a_gpu_without_bf16(monkeypatch, tiny_checkpoint):
    _gpu(monkeypatch, T4)
    files = weight_files(tiny_checkpoint)
    counts = count_parameters(files)
    free = (needed_bytes(counts, "fp16") + needed_bytes(counts, "fp32")) // 2
    monkeypatch.setattr(memory_check, "available_bytes", lambda device: free)
    with pytest.raises(NotEnoughMemory) as exc:
        check_fits(files, device="cuda:0", quantization="fp32", alternatives=D.usable_quantizations("cuda:0"))
    assert "Choose --quantization nf4 (" in str(exc.value) and " or fp16 (" in str(exc.value)
    assert "bf16" not in str(exc.value)


def test_info_memory_says_what_runs_on_a_gpu_without_bf16(monkeypatch, tiny_checkpoint, capsys):
    from engine.cli import main

    _gpu(monkeypatch, T4)
    monkeypatch.setattr(memory_check, "available_bytes", lambda device: 1 << 40)
    args = ["info", "--memory", "--weights", str(tiny_checkpoint), "--device", "cuda"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["formats"]) == ["nf4", "fp16", "fp32"]
    assert (report["auto_choice"], report["auto_compute"]) == ("nf4", "fp16")
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "--quantization auto (the default) loads nf4 (fp16 compute) here" in text
    assert "Tesla T4 has no native bfloat16" in text
    assert any(line.strip().startswith("fp16") for line in text.splitlines())


@pytest.mark.parametrize("cmd", ["ask", "serve", "info", "eval", "finetune"])
def test_fp16_is_an_accepted_quantization(cmd):
    from test_cli_args import parse

    assert parse(cmd, "--quantization", "fp16").quantization == "fp16"


def test_health_says_what_the_model_computes_in(tiny_checkpoint, tiny_loaded, tmp_path):
    from engine.pipeline import Engine

    assert tiny_loaded.info["compute"] == "fp32"  # the loader's record of the plan
    health = Engine(tiny_checkpoint, loaded=tiny_loaded, output_dir=tmp_path, feature_cache_bytes=0).health()
    assert (health["quantization"], health["compute"]) == ("fp32", "fp32")


def test_cuda_without_a_number_is_the_first_gpu(monkeypatch):
    _gpu(monkeypatch, A100)
    assert D.resolve_device("cuda") == "cuda:0"
    assert D.resolve_device("CUDA:1") == "cuda:1"
    assert D.plan_device("cuda", "fp16").device == "cuda:0"


@pytest.mark.parametrize("device", ["cuda:x", "cuda:-1", "cudax", "cuda:", "cuda:0:1"])
def test_a_malformed_cuda_device_is_refused_as_such(monkeypatch, device):
    """On a GPU machine these passed and failed inside torch when the model loaded."""
    _gpu(monkeypatch, A100)
    with pytest.raises(D.DeviceChoiceError, match=r"unknown device .*'cuda:N'"):
        D.resolve_device(device)


def test_a_gpu_number_past_the_last_gpu_is_refused(monkeypatch):
    _gpu(monkeypatch, A100)
    monkeypatch.setattr(D, "gpu_count", lambda: 2)
    assert D.resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(D.DeviceChoiceError, match=r"'cuda:2' does not exist: PyTorch sees 2 CUDA GPU\(s\) here, cuda:0 to cuda:1"):
        D.resolve_device("cuda:2")
