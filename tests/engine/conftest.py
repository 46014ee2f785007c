"""Shared engine test fixtures: the tiny random GeoLLaVA-8K checkpoint (built once, cached under
the repo's .cache/ keyed by a hash of its config) and the model loaded from it on CPU fp32; and
small helpers several engine test files use (a batch job's disk full for one result line)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def tiny_checkpoint_path(seed: int = 0) -> Path:
    """Build (once) and return the cached tiny checkpoint directory."""
    from engine.tiny import build_tiny_checkpoint, tiny_key

    cache_root = Path(os.environ.get("GEOVQA_TEST_CACHE", REPO / ".cache"))
    dest = cache_root / f"tiny-geollava-{tiny_key(seed)}"
    if (dest / "config.json").is_file() and (dest / "model.safetensors.index.json").is_file():
        return dest
    try:
        build_tiny_checkpoint(dest, seed=seed)
    except OSError:
        # another test process finished the same build first
        if not (dest / "model.safetensors.index.json").is_file():
            raise
    return dest


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    import torch

    torch.set_num_threads(1)
    return tiny_checkpoint_path()


@pytest.fixture(scope="session")
def tiny_loaded(tiny_checkpoint):
    """LoadedModel (model, tokenizer, config, info) on CPU float32."""
    from engine.loader import load_model

    return load_model(tiny_checkpoint, device="cpu", quantization="fp32")


@pytest.fixture(scope="session")
def tiny_model(tiny_loaded):
    """The tiny LlavaQwenForCausalLM on CPU float32 (eval mode, no grad)."""
    return tiny_loaded.model


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_loaded):
    return tiny_loaded.tokenizer


def assert_only_the_lm_is_nf4(model, half=None) -> None:
    """The released split: LM linears in nf4; vision tower, projector, reghead, lm_head in
    `half` (default bfloat16; float16 on a GPU without native bfloat16)."""
    import bitsandbytes as bnb
    import torch

    half = torch.bfloat16 if half is None else half

    for layer in model.model.layers:
        for mod in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
            assert isinstance(mod, bnb.nn.Linear4bit)
            assert mod.weight.quant_state.quant_type == "nf4"
    clip_q = model.model.vision_tower.vision_tower.vision_model.encoder.layers[0].self_attn.q_proj
    for mod in (clip_q, model.model.mm_projector[0], model.lm_head):
        assert type(mod) is torch.nn.Linear and mod.weight.dtype == half
    assert model.reghead.dw.weight.dtype == half


def demo_and_real(tmp_path: Path, monkeypatch, tiny_checkpoint: Path) -> Path:
    """No default checkpoint and no GEOVQA_WEIGHTS, the demo model already built (the tiny one),
    and another checkpoint that is not the demo: returns the latter's folder. For tests of runs
    that must tell which model they used."""
    import shutil

    import engine.pipeline as P

    monkeypatch.setattr(P, "DEFAULT_WEIGHTS", tmp_path / "no-weights")
    monkeypatch.delenv("GEOVQA_WEIGHTS", raising=False)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "tiny-geollava").symlink_to(tiny_checkpoint, target_is_directory=True)
    monkeypatch.setenv("GEOVQA_CACHE_DIR", str(cache))
    real = tmp_path / "real"
    shutil.copytree(tiny_checkpoint, real)
    (real / "TINY_MODEL.txt").unlink()
    return real


def disk_full_at_the_second_result(monkeypatch):
    """Patches ``engine.jobs.BatchJob.append_result`` so that the second result line a batch
    writes fails with ENOSPC ("No space left on device"), as a disk full for a moment; the lines
    before and after are written. Returns the real ``append_result`` (to put it back)."""
    from engine.jobs import BatchJob

    real_append = BatchJob.append_result
    calls = []

    def full_once(self, line):
        calls.append(line["index"])
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_append(self, line)

    monkeypatch.setattr(BatchJob, "append_result", full_once)
    return real_append
