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
