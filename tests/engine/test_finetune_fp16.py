"""Fine-tuning where the GPU computes in float16 (no native bfloat16: T4, V100): the forward
autocasts to fp16 and the loss is scaled (torch.amp.GradScaler), whose state every checkpoint
keeps and --resume restores. The CPU stands in for such a GPU: autocast to float16 works there too."""

from __future__ import annotations

import pytest
import torch

import engine.devices as devices
import engine.finetune_loop as ft_loop
from engine.finetune import run_finetune
from engine.finetune_loop import autocast_dtype, loss_scaler
from test_finetune import _args, _log, _write_data


def _trainer_state(ckpt):
    return torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("capability, dtype", [((7, 5), torch.float16), ((8, 0), torch.bfloat16)])
def test_training_autocasts_to_the_gpus_own_16_bit_format(monkeypatch, capability, dtype):
    """bf16 autocast on a T4 runs emulated (slowly) or fails; an A100 keeps bf16."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts
    assert autocast_dtype("cuda:0") is dtype
    assert autocast_dtype("cpu") is None
    assert devices.half_dtype("cuda:0") is dtype
    assert loss_scaler("cpu", dtype).is_enabled() == (dtype is torch.float16)
    assert not loss_scaler("cpu", None).is_enabled()


def test_fp16_training_scales_the_loss_and_resume_restores_the_scaler(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(ft_loop, "autocast_dtype", lambda device: torch.float16)
    data = _write_data(tmp_path, n=4)
    out = tmp_path / "run"
    assert run_finetune(_args(data, out, tiny_checkpoint, "--max-steps", "2", "--save-every", "1",
                              "--val-fraction", "0", "--grad-accum", "1")) == 0
    scaler = _trainer_state(out / "checkpoint-2")["scaler"]
    assert scaler["scale"] > 0 and {"growth_factor", "backoff_factor", "_growth_tracker"} <= set(scaler)
    assert all(float(r["loss"]) == float(r["loss"]) for r in _log(out))  # finite, not NaN

    # a scale a fresh scaler (65536, halved on overflow) would never have after one more step
    state = _trainer_state(out / "checkpoint-2")
    state["scaler"]["scale"] = 1024.0
    torch.save(state, out / "checkpoint-2" / "trainer_state.pt")
    assert run_finetune(_args(data, out, tiny_checkpoint, "--max-steps", "3", "--save-every", "1",
                              "--val-fraction", "0", "--grad-accum", "1", "--resume")) == 0
    assert _trainer_state(out / "checkpoint-3")["scaler"]["scale"] in (1024.0, 512.0)


def test_without_fp16_checkpoints_hold_an_empty_scaler_state(tmp_path, tiny_checkpoint):
    """bf16 and fp32 need no loss scaling: the state is there, empty, and a resume ignores it."""
    data = _write_data(tmp_path, n=4)
    out = tmp_path / "run"
    assert run_finetune(_args(data, out, tiny_checkpoint, "--max-steps", "1", "--save-every", "1",
                              "--val-fraction", "0", "--grad-accum", "1")) == 0
    assert _trainer_state(out / "checkpoint-1")["scaler"] == {}
    assert run_finetune(_args(data, out, tiny_checkpoint, "--max-steps", "2", "--save-every", "1",
                              "--val-fraction", "0", "--grad-accum", "1", "--resume")) == 0
    assert [r["step"] for r in _log(out)] == ["1", "2"]
