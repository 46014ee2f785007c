"""GPU-only checks (skipped without CUDA): 4-bit nf4 loading and generation of the tiny model
(also in fp16, as a GPU without native bfloat16 runs it), and a full-size (7B config, random weights) nf4 load whose peak GPU memory is recorded in
docs/benchmarks/gpu_load.json (and $OUT/gpu_load.json when $OUT is set).

The full-size checkpoint is built on the meta device, materialised on the GPU with random bf16
weights, written in the released layout (sharded safetensors), then loaded through the engine's
own loader in nf4 exactly as real weights would be.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import assert_only_the_lm_is_nf4
from engine.benchmarks.full_size import generate_from_random_visual
from engine.devices import bitsandbytes_cpu_4bit_usable
from engine.loader import load_model
from engine.tiny import write_random_checkpoint

REPO = Path(__file__).resolve().parents[2]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
gpu = pytest.mark.gpu


def test_random_checkpoint_writer_round_trips_on_cpu(tmp_path, tiny_checkpoint):
    """Exercise the writer used by the full-size test with a small config on the CPU."""
    small = dict(vocab_size=768, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                 vision_config=json.loads((tiny_checkpoint / "config.json").read_text())["vision_config"],
                 mm_hidden_size=32)
    dest = write_random_checkpoint(tmp_path / "ckpt", "cpu", **small)
    loaded = load_model(dest, device="cpu", quantization="fp32")
    assert loaded.model.reghead.dw.weight.shape == (32, 1, 3, 3)
    assert float(loaded.model.model.norm.weight.mean()) == 1.0


@gpu
@needs_cuda
def test_tiny_nf4_load_and_generate(tiny_checkpoint):
    loaded = load_model(tiny_checkpoint, device="cuda", quantization="nf4")
    assert loaded.info["four_bit"] and loaded.info["quantization"] == "nf4"
    assert loaded.info["device"].startswith("cuda")
    model = loaded.model
    assert_only_the_lm_is_nf4(model)
    a = generate_from_random_visual(loaded, 144)
    b = generate_from_random_visual(loaded, 144)
    assert a.n_new_tokens > 0 and a.text == b.text
    assert a.peak_memory_bytes and a.peak_memory_bytes > 0
    tiles = torch.randint(0, 256, (3, 336, 336, 3), dtype=torch.uint8)
    from engine.vision import encode_tiles

    feats = encode_tiles(model, tiles)
    assert feats.patches.shape == (2, 576, 32) and feats.patches.is_cuda


@gpu
@needs_cuda
@pytest.mark.parametrize("quantization", ["nf4", "fp16"])
def test_tiny_in_fp16_as_on_a_gpu_without_bfloat16(tiny_checkpoint, monkeypatch, quantization):
    """What a T4 or V100 runs (`devices.half_precision`: fp16), forced on this GPU by the
    capability it reports: nf4's matmuls and every unquantised tensor in float16 (or the whole
    model, for 'fp16'), finite CLIP features, the same greedy answer twice."""
    import engine.devices as devices
    from engine.vision import encode_tiles

    monkeypatch.setattr(devices, "gpu_capability", lambda device: (7, 5))
    loaded = load_model(tiny_checkpoint, device="cuda", quantization=quantization)
    assert loaded.info["compute"] == "fp16" and loaded.info["quantization"] == quantization
    model = loaded.model
    tower = model.vision.vision_tower.vision_model.embeddings.patch_embedding.weight
    assert tower.dtype == torch.float16 and tower.is_cuda
    if quantization == "nf4":
        assert_only_the_lm_is_nf4(model, torch.float16)
    a = generate_from_random_visual(loaded, 144)
    b = generate_from_random_visual(loaded, 144)
    assert a.n_new_tokens > 0 and a.text == b.text
    tiles = torch.randint(0, 256, (3, 336, 336, 3), dtype=torch.uint8)
    feats = encode_tiles(model, tiles)
    assert feats.patches.is_cuda and bool(torch.isfinite(feats.patches.float()).all())


@pytest.mark.skipif(not bitsandbytes_cpu_4bit_usable(), reason="bitsandbytes has no CPU 4-bit backend here")
def test_full_size_measure_runs_on_the_cpu_with_a_small_config(tmp_path, tiny_checkpoint):
    """The full-size benchmark's code (write, nf4 load, generate, record) with small dimensions."""
    from engine.benchmarks.full_size import measure

    vision = json.loads((tiny_checkpoint / "config.json").read_text())["vision_config"]
    small = dict(vocab_size=768, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vision_config=vision, mm_hidden_size=32)
    rec = measure("cpu", tmp_path / "ckpt", n_visual=40, max_new_tokens=3, overrides=small)
    assert rec["quantization"] == "nf4" and rec["generate_new_tokens"] > 0
    assert rec["generate_prompt_tokens"] > 40
    assert rec["load_peak_bytes"] >= rec["resident_after_load_bytes"] * 0.5 > 0
    assert 0 < rec["model_storage_bytes"] < 20 * 1024**2
    # the memory check's estimate (packed codes, block scales, bf16 rest; buffers not counted)
    assert abs(rec["estimated_weight_bytes"] / rec["model_storage_bytes"] - 1) < 0.05
    assert not (tmp_path / "ckpt").exists()  # the checkpoint is removed afterwards


def test_cuda_semantics_recorder_on_cpu():
    """The recorder the GPU run uses (docs/verification.md D1, D3) measures the CPU correctly."""
    from engine.benchmarks.cuda_semantics import ROOTS, scatter_add_count, topk_empty_slots

    assert scatter_add_count("cpu") == 576.0  # CPU bf16 scatter_add counts exactly
    assert scatter_add_count("cpu", n=100) == 100.0
    t = topk_empty_slots("cpu")
    assert len(t["indices_sorted"]) == 24 and set(ROOTS) <= set(t["indices_sorted"])
    assert len(t["empty_slot_indices"]) == 21 and not set(ROOTS) & set(t["empty_slot_indices"])


STRATEGIES = ["none", "uniform", "random", "background", "anchored", "geollava", "pyramid", "budget"]
EXACT_ON_CUDA = {"none", "uniform", "geollava", "background"}  # no ranking by LM attention


@pytest.fixture(scope="module")
def cuda_and_cpu_selections(tiny_checkpoint, tmp_path_factory):
    """Every strategy on the same synthetic scene, tiny model in fp32 on CUDA and on the CPU."""
    from engine.pipeline import prepare_visual
    from engine.synth import make_scene

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    scene = make_scene(tmp_path_factory.mktemp("cuda") / "scene.tif", (900, 700), objects=4, seed=3)
    out = {}
    for dev in ("cpu", "cuda"):
        loaded = load_model(tiny_checkpoint, device=dev, quantization="fp32")
        for name in STRATEGIES:
            budget = None if name == "none" else 60
            out[dev, name] = prepare_visual(loaded.model, str(scene.path), "How many boats?",
                                            strategy=name, budget=budget,
                                            tokenizer=loaded.tokenizer).selection
    return out


@gpu
@needs_cuda
@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_on_cuda_matches_cpu(name, cuda_and_cpu_selections):
    """Every strategy runs on the GPU within its budget; the ones without LM-attention ranking
    keep exactly the tokens they keep on the CPU (fp32, no TF32)."""
    cpu, cuda = cuda_and_cpu_selections["cpu", name], cuda_and_cpu_selections["cuda", name]
    assert cuda.embeds.is_cuda and torch.isfinite(cuda.embeds).all()
    assert cuda.n_tokens > 0 and (name == "none" or cuda.n_tokens <= 60)
    for m in cuda.members:
        assert len(set((m // 576).tolist())) <= 1  # a token never spans tiles
    if name in EXACT_ON_CUDA:
        assert [m.tolist() for m in cpu.members] == [m.tolist() for m in cuda.members]
        torch.testing.assert_close(cuda.embeds.cpu(), cpu.embeds, rtol=1e-4, atol=1e-4)
    else:  # same budget use; the kept sets may differ only where fp32 rounding flips a tie
        assert abs(cpu.n_tokens - cuda.n_tokens) <= max(2, cpu.n_tokens // 10)


@gpu
@needs_cuda
def test_full_size_nf4_load_peak_memory(tmp_path_factory):
    from engine.benchmarks.full_size import measure

    free, total = torch.cuda.mem_get_info()
    if total < 20 * 1024**3:
        pytest.skip("the full-size test needs a GPU with at least 20 GiB")
    root = Path(os.environ.get("GEOVQA_BIG_TMP", tmp_path_factory.mktemp("full")))
    record = measure("cuda", root / "geollava-7b-random")
    text = json.dumps(record, indent=2) + "\n"
    out = REPO / "docs" / "benchmarks" / "gpu_load.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_load.json").write_text(text)
    # a 7B LM in nf4 plus the bf16 vision tower and lm_head fits well under 12 GiB
    assert record["resident_after_load_bytes"] < 12 * 1024**3
    # the memory check's estimate (engine/memory_check.py) is what torch holds after the load
    assert abs(record["resident_after_load_bytes"] / record["estimated_weight_bytes"] - 1) < 0.1
    assert record["generate_new_tokens"] > 0
