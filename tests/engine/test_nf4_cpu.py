"""The 4-bit nf4 path on the CPU (bitsandbytes' CPU backend): the same loader, module split, token
path and QLoRA step a CUDA machine runs, so they are exercised by every test run, not only on a
lent GPU. Skipped where the installed bitsandbytes has no CPU backend."""

from __future__ import annotations

import pytest

from conftest import assert_only_the_lm_is_nf4
from engine.benchmarks.full_size import generate_from_random_visual
from engine.devices import bitsandbytes_cpu_4bit_usable
from engine.loader import load_model

pytestmark = pytest.mark.skipif(not bitsandbytes_cpu_4bit_usable(),
                                reason="bitsandbytes has no CPU 4-bit backend here")


@pytest.fixture(scope="module")
def nf4(tiny_checkpoint):
    return load_model(tiny_checkpoint, device="cpu", quantization="nf4")


def test_nf4_quantises_only_the_language_model(nf4):
    assert nf4.info["four_bit"] and nf4.info["quantization"] == "nf4" and nf4.info["device"] == "cpu"
    assert_only_the_lm_is_nf4(nf4.model)


def test_nf4_generation_is_deterministic(nf4):
    a = generate_from_random_visual(nf4, 144)
    b = generate_from_random_visual(nf4, 144)
    assert a.n_new_tokens > 0 and a.text == b.text


def test_nf4_engine_answers_with_bf16_vision_and_geollava(tiny_checkpoint, tmp_path):
    from engine.pipeline import AskRequest, Engine
    from engine.synth import make_scene

    scene = make_scene(tmp_path / "scene.tif", (700, 500), objects=3, seed=1)
    engine = Engine(tiny_checkpoint, device="cpu", quantization="nf4", output_dir=tmp_path / "out")
    assert engine.health()["four_bit"] is True
    events = list(engine.ask(AskRequest(str(scene.path), "How many boats?", max_new_tokens=6)))
    result = events[-1]
    assert result["type"] == "result", result
    assert result["answer"] and 0 < result["tokens"]["visual_kept"] <= 6 * 24


def test_qlora_step_on_nf4_base_trains_only_the_adapters(tiny_checkpoint):
    from engine.benchmarks.finetune_gpu import qlora_step

    rec = qlora_step(tiny_checkpoint, device="cpu", quantization="nf4", n_visual=[64, 200], lora_r=4)
    assert rec["quantization"] == "nf4"
    # only the adapters train: their size is proportional to the rank
    wider = qlora_step(tiny_checkpoint, device="cpu", quantization="nf4", n_visual=[64], lora_r=8)
    assert wider["trainable_parameters"] == 2 * rec["trainable_parameters"] > 0
    assert [s["visual_tokens"] for s in rec["steps"]] == [64, 200]
    assert all(s["loss"] == s["loss"] and s["loss"] > 0 for s in rec["steps"])  # finite
    assert rec["steps"][1]["sequence_tokens"] - rec["steps"][0]["sequence_tokens"] == 136
    # 4-bit LM + bf16 frozen rest: under half the storage of the same model trained in fp32
    fp32 = qlora_step(tiny_checkpoint, device="cpu", quantization="fp32", n_visual=[64], lora_r=4)
    assert fp32["trainable_parameters"] == rec["trainable_parameters"]
    assert 0 < rec["parameter_bytes"] < 0.5 * fp32["parameter_bytes"]
    assert rec["memory_counted"] == "process resident set (RSS)"
    assert all(s["peak_bytes"] > 0.9 * rec["resident_after_load_bytes"] > 0 for s in rec["steps"])


def test_qlora_preparation_keeps_frozen_tensors_as_loaded(tiny_checkpoint):
    """Only the LM's norms go to float32; embeddings, output head, vision tower, projector and
    reghead stay bf16 (peft's blanket float32 upcast costs ~2.8 GB at full size), only the
    adapters train, and gradient checkpointing is on."""
    import torch

    from engine.finetune_lora import add_lora

    loaded = load_model(tiny_checkpoint, device="cpu", quantization="nf4")
    model = add_lora(loaded.model, r=4, alpha=8, four_bit=True, gradient_checkpointing=True)
    base = model.get_base_model()
    assert base.is_gradient_checkpointing
    norms = [n for n, m in base.model.named_modules()
             if type(m).__name__.endswith("RMSNorm") and not n.startswith("vision_tower")]
    assert norms and all(base.model.get_submodule(n).weight.dtype == torch.float32 for n in norms)
    for part in (base.model.embed_tokens, base.lm_head, base.model.vision_tower,
                 base.model.mm_projector, base.reghead):
        assert {p.dtype for p in part.parameters()} == {torch.bfloat16}, part
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_qlora_trains_on_the_visual_tokens_ask_sees(tiny_checkpoint, tmp_path):
    """The visual tokens `finetune` builds on the prepared nf4 model are the very tokens the
    loaded nf4 model gives `ask` (same precision, same clusters and anchors), and a few QLoRA
    steps on one sample lower its loss."""
    import torch

    from engine.data import Sample, Turn
    from engine.finetune_inputs import answer_loss, build_training_inputs, default_visual_fn, encode_conversation
    from engine.finetune_lora import LM_TARGETS, add_lora
    from engine.pipeline import prepare_visual
    from engine.synth import make_scene

    scene = make_scene(tmp_path / "scene.tif", (700, 500), objects=3, seed=2)
    question = "How many boats are there?"
    loaded = load_model(tiny_checkpoint, device="cpu", quantization="nf4")
    with torch.no_grad():
        ask_tokens = prepare_visual(loaded.model, str(scene.path), question,
                                    tokenizer=loaded.tokenizer).selection.embeds
    model = add_lora(loaded.model, r=8, alpha=16, dropout=0.0, four_bit=True,
                     targets=(*LM_TARGETS, "lm_head"))
    sample = Sample(index=0, id="s0", image=scene.path,
                    turns=[Turn("user", "<image>\n" + question), Turn("assistant", "three boats")])
    visual = default_visual_fn(model, strategy="geollava", budget=None, tokenizer=loaded.tokenizer)(sample)
    assert visual.dtype == ask_tokens.dtype and torch.equal(visual, ask_tokens)

    enc = encode_conversation(loaded.tokenizer, sample)
    embeds, labels, mask = build_training_inputs(model, enc, visual)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    losses = []
    for _ in range(12):
        loss = answer_loss(model, embeds, labels, mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def _mapped_ranges(suffix: str) -> list[tuple[int, int]]:
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[-1].endswith(suffix):
                lo, hi = (int(v, 16) for v in parts[0].split("-"))
                ranges.append((lo, hi))
    return ranges


def test_cpu_nf4_weights_do_not_keep_the_checkpoint_mapped(tiny_checkpoint, tmp_path):
    """Unquantised tensors are copied out of the memory-mapped shards (else every shard stays
    mapped, the bf16 pages read for quantisation included). A bf16 checkpoint, as released:
    its tensors load as zero-copy views of the mapping."""
    import json

    import torch

    from engine.tiny import write_random_checkpoint

    vision = json.loads((tiny_checkpoint / "config.json").read_text())["vision_config"]
    ckpt = write_random_checkpoint(tmp_path / "bf16", "cpu", vocab_size=768, hidden_size=64,
                                   intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vision_config=vision, mm_hidden_size=32)
    loaded = load_model(ckpt, device="cpu", quantization="nf4")
    ranges = _mapped_ranges(".safetensors")
    for name, t in list(loaded.model.named_parameters()) + list(loaded.model.named_buffers()):
        if t.dtype == torch.uint8:
            continue
        ptr = t.untyped_storage().data_ptr()
        assert not any(lo <= ptr < hi for lo, hi in ranges), f"{name} still points into a shard"


def test_the_engine_does_not_print_bitsandbytes_optional_kernel_warning():
    """Every command used to start with 'Failed to load CPU gemm_4bit_forward from
    kernels-community' (an optional hub download); the engine quiets that one logger."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "import engine, bitsandbytes, logging; "
                        "print(logging.getLogger('bitsandbytes.backends.cpu.ops').level)"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "gemm_4bit_forward" not in r.stderr and r.stdout.strip() == "40"  # logging.ERROR


def test_nf4_with_fp16_compute_loads_and_answers(tiny_checkpoint, monkeypatch):
    """The path a GPU without native bfloat16 (T4, V100) takes, here with the CPU standing in for
    it (`devices.half_precision` made to answer fp16): nf4's compute dtype and every unquantised
    tensor in float16, finite CLIP features, the same greedy answer twice."""
    import torch

    import engine.devices as devices
    from engine.vision import encode_tiles

    monkeypatch.setattr(devices, "half_precision", lambda device: "fp16")
    loaded = load_model(tiny_checkpoint, device="cpu", quantization="nf4")
    assert loaded.info["compute"] == "fp16" and loaded.info["dtype"] == "float16"
    assert_only_the_lm_is_nf4(loaded.model, torch.float16)
    a = generate_from_random_visual(loaded, 144)
    b = generate_from_random_visual(loaded, 144)
    assert a.n_new_tokens > 0 and a.text == b.text
    feats = encode_tiles(loaded.model, torch.randint(0, 256, (3, 336, 336, 3), dtype=torch.uint8))
    assert feats.patches.dtype == torch.float16 and bool(torch.isfinite(feats.patches.float()).all())
