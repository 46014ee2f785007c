"""Loader: bit-exact round trip of the tiny checkpoint, device choices, clear errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.devices import plan_device
from engine.loader import (
    CheckpointError,
    WeightsMissingError,
    checkpoint_present,
    load_model,
    weight_files,
)


def test_round_trip_bit_exact(tiny_checkpoint, tiny_loaded):
    files = weight_files(tiny_checkpoint)
    assert len(files) >= 2  # sharded like the release
    saved = {}
    for f in files:
        saved.update(load_file(str(f)))
    state = tiny_loaded.model.state_dict()
    assert set(saved) == set(state)
    for key, tensor in saved.items():
        assert torch.equal(tensor, state[key]), key
    assert any(k.startswith("reghead.") for k in saved)
    assert any(k.startswith("model.vision_tower.vision_tower.vision_model.") for k in saved)


def test_info_and_auto_choice_on_cpu(tiny_checkpoint, tiny_loaded):
    info = tiny_loaded.info
    assert info["is_tiny"] and info["demo"] and info["model_name"] == "tiny-demo"
    assert info["device"] == "cpu" and info["quantization"] == "fp32" and not info["four_bit"]
    assert info["attention"] == "sdpa"
    assert tiny_loaded.config.rope_scaling is None
    assert tiny_loaded.vocab_limit == len(tiny_loaded.tokenizer)
    assert tiny_loaded.vocab_limit < tiny_loaded.config.vocab_size
    if not torch.cuda.is_available():
        plan = plan_device("auto", "auto", "auto")
        assert (plan.device, plan.quantization, plan.attention) == ("cpu", "fp32", "sdpa")


def test_nf4_on_the_cpu_only_with_a_bitsandbytes_cpu_backend(monkeypatch):
    import engine.devices as D

    monkeypatch.setattr(D, "bitsandbytes_cpu_4bit_usable", lambda: False)
    with pytest.raises(ValueError, match="CUDA GPU, or on the CPU"):
        D.plan_device("cpu", "nf4")
    monkeypatch.setattr(D, "bitsandbytes_cpu_4bit_usable", lambda: True)
    plan = D.plan_device("cpu", "nf4")
    assert (plan.device, plan.quantization, plan.four_bit) == ("cpu", "nf4", True)
    assert D.plan_device("cpu", "auto").quantization == "fp32"  # never chosen by itself


@pytest.mark.parametrize("capability, name, expected", [
    ((7, 5), "Tesla T4", "sdpa"),
    ((7, 0), "Tesla V100-SXM2-16GB", "sdpa"),
    ((8, 0), "NVIDIA A100-SXM4-40GB", "flash_attention_2"),
    ((9, 0), "NVIDIA H100 80GB HBM3", "flash_attention_2"),
])
def test_flash_attention_only_on_gpus_it_runs_on(monkeypatch, capability, name, expected):
    """flash-attn (the `.[gpu]` extra) imports on a T4, RTX 20xx or V100 and then fails at the
    first attention call: auto chose it there, so every answer failed after the model loaded."""
    import engine.devices as D

    monkeypatch.setattr(D, "cuda_available", lambda: True)
    monkeypatch.setattr(D, "flash_attn_usable", lambda: True)
    monkeypatch.setattr(D, "bitsandbytes_usable", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    plan = D.plan_device("auto", "auto", "auto")
    assert (plan.device, plan.quantization, plan.attention) == ("cuda:0", "nf4", expected)
    if expected == "sdpa":
        with pytest.raises(D.DeviceChoiceError, match=f"Ampere.*{name} has {capability[0]}.{capability[1]}.*sdpa"):
            D.plan_device("auto", "auto", "flash_attention_2")
    else:
        assert D.plan_device("auto", "auto", "flash_attention_2").attention == "flash_attention_2"
        # flash-attention has no float32 kernels: fp32 weights keep SDPA under auto
        assert D.plan_device("auto", "fp32", "auto").attention == "sdpa"


def test_tokenizer_is_qwen2_style(tiny_loaded):
    tok = tiny_loaded.tokenizer
    assert "Qwen2" in type(tok).__name__
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        i = tok.convert_tokens_to_ids(special)
        assert tok.decode([i]) == special
    ids = tok("How many ships are in the harbour?").input_ids
    assert tok.decode(ids) == "How many ships are in the harbour?"


def test_missing_dir(tmp_path):
    with pytest.raises(WeightsMissingError, match="make weights"):
        load_model(tmp_path / "nowhere", device="cpu")
    assert not checkpoint_present(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsMissingError, match="make weights"):
        load_model(empty, device="cpu")


def test_no_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path, device="cpu")


def test_wrong_model_type(tmp_path, tiny_checkpoint):
    dest = _config_copy(tmp_path, tiny_checkpoint, model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(CheckpointError, match="llava_qwen"):
        load_model(dest, device="cpu")


SUPPORTED = ("the engine supports only image_size 336 and patch_size 14 (a 24 x 24 patch grid a "
             "tile, the CLIP ViT-L/14-336 tower of GeoLLaVA-8K)")


def test_a_tower_of_another_patch_grid_is_refused_at_load(tmp_path):
    """Such a checkpoint used to load, answer with `none`, and fail inside every other strategy
    ("cannot reshape array of size 3456 into shape (6,256)"): tiling and token geometry fix 24 x 24
    patches of 14 px a 336 px tile. It is refused at load, before any weight is read."""
    import engine.modeling as M
    from engine.pipeline import Engine
    from engine.tiny import build_tiny_checkpoint

    dest = build_tiny_checkpoint(tmp_path / "grid16", seed=0, vision_config={"patch_size": 21})
    said = ("cannot be used: its vision tower has image_size 336 and patch_size 21 (a 16 x 16 "
            f"patch grid a tile), but {SUPPORTED}")
    with pytest.raises(CheckpointError) as err:
        load_model(dest, device="cpu", quantization="fp32")
    assert str(err.value) == f"the checkpoint in {dest} {said}"
    assert not checkpoint_present(dest)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(M.LlavaQwenForCausalLM, "from_pretrained",
                   classmethod(lambda *a, **k: pytest.fail("the weights were read")))
        with pytest.raises(CheckpointError, match=re.escape(said)):
            Engine(dest, output_dir=tmp_path / "out")


def _config_copy(tmp_path, tiny_checkpoint, **changes):
    dest = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update(changes)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


@pytest.mark.parametrize("vision, said", [
    ({"patch_size": 16}, "image_size 336 and patch_size 16 (a 21 x 21 patch grid a tile)"),
    ({"image_size": 448}, "image_size 448 and patch_size 14 (a 32 x 32 patch grid a tile)"),
    ({"image_size": 672, "patch_size": 28}, "image_size 672 and patch_size 28 (a 24 x 24 patch grid"),
    ({"patch_size": 20}, "image_size 336 and patch_size 20 (no whole patch grid a tile)"),
])
def test_every_other_tile_geometry_is_refused(tmp_path, tiny_checkpoint, vision, said):
    from engine.loader import check_checkpoint

    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    dest = _config_copy(tmp_path, tiny_checkpoint, vision_config={**cfg["vision_config"], **vision})
    with pytest.raises(CheckpointError, match=re.escape(said) + ".*" + re.escape(SUPPORTED)):
        check_checkpoint(dest)


def test_a_tower_the_config_does_not_describe_is_refused_before_loading(tmp_path, tiny_checkpoint):
    dest = _config_copy(tmp_path, tiny_checkpoint, vision_config=None,
                        mm_vision_tower="google/siglip-so400m-patch14-384")
    with pytest.raises(CheckpointError, match="does not describe a usable vision tower: the vision "
                                              "tower 'google/siglip-so400m-patch14-384' is not"):
        load_model(dest, device="cpu")


def test_the_released_tower_is_accepted_described_or_by_name(tmp_path, tiny_checkpoint):
    """The tiny model (its own 336 / 14 vision_config) loads (every other test); a config with
    ViT-L/14-336's full vision_config, and the full-size config the GPU kit writes
    (write_random_checkpoint: no vision_config, the tower named by mm_vision_tower), pass."""
    from engine.loader import read_config_json
    from engine.modeling import CLIP_VIT_L_14_336, QWEN2_7B_LM, LlavaQwenConfig

    read_config_json(tiny_checkpoint)
    described = _config_copy(tmp_path, tiny_checkpoint, vision_config=dict(CLIP_VIT_L_14_336))
    read_config_json(described)
    full = tmp_path / "full"
    config = LlavaQwenConfig(**QWEN2_7B_LM)
    config.architectures = ["LlavaQwenForCausalLM"]
    config.save_pretrained(full)
    assert json.loads((full / "config.json").read_text()).get("vision_config") is None
    assert read_config_json(full)["hidden_size"] == 3584


def test_class_comes_from_config_not_name(tmp_path, tiny_checkpoint):
    # a directory name that would send the original loader to another class
    dest = tmp_path / "llava-v1.5-7b-mistral-GeoLLaVA"
    shutil.copytree(tiny_checkpoint, dest)
    loaded = load_model(dest, device="cpu", quantization="fp32")
    assert type(loaded.model).__name__ == "LlavaQwenForCausalLM"


def test_missing_shard(tmp_path, tiny_checkpoint):
    dest = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, dest)
    first = sorted(dest.glob("model-*.safetensors"))[0]
    first.unlink()
    with pytest.raises(WeightsMissingError, match="missing"):
        load_model(dest, device="cpu")
    assert not checkpoint_present(dest)


def test_missing_tensor(tmp_path, tiny_checkpoint):
    from safetensors.torch import save_file

    dest = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, dest)
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["reghead.pw.bias"]
    tensors = load_file(str(dest / shard))
    del tensors["reghead.pw.bias"]
    save_file(tensors, str(dest / shard), metadata={"format": "pt"})
    del index["weight_map"]["reghead.pw.bias"]
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="reghead.pw.bias"):
        load_model(dest, device="cpu")


def test_bad_adapter_dir(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="adapter"):
        load_model(tiny_checkpoint, device="cpu", adapter=tmp_path)


@pytest.mark.parametrize("kind, message", [("missing", "does not exist"), ("file", "is a file"),
                                           ("folder", "no adapter_config.json")])
def test_a_bad_adapter_is_refused_before_the_base_model_loads(tmp_path, tiny_checkpoint, monkeypatch,
                                                             kind, message):
    import engine.loader as L

    adapter = tmp_path / "not_an_adapter"
    if kind == "file":
        adapter.write_text("x")
    elif kind == "folder":
        adapter.mkdir()
    monkeypatch.setattr(L, "read_config_json", lambda *a: pytest.fail("the checkpoint was read first"))
    with pytest.raises(CheckpointError, match=f"{message}.*python -m engine finetune"):
        load_model(tiny_checkpoint, device="cpu", adapter=adapter)


def test_lora_adapter_is_applied(tmp_path, tiny_checkpoint, tiny_loaded):
    from peft import LoraConfig, get_peft_model

    base = load_model(tiny_checkpoint, device="cpu", quantization="fp32").model
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = load_model(tiny_checkpoint, device="cpu", quantization="fp32", adapter=tmp_path / "adapter")
    assert loaded.info["adapter"]
    emb = torch.randn(1, 5, tiny_loaded.config.hidden_size) * 0.05
    with torch.no_grad():
        a = loaded.model(inputs_embeds=emb).logits
        b = tiny_loaded.model(inputs_embeds=emb).logits
    assert not torch.allclose(a, b)  # the adapter changes the output
    # the pipeline's helpers work through the peft wrapper
    import numpy as np

    from engine.generate import generate_text
    from engine.vision import encode_tiles

    tiles = np.zeros((2, 336, 336, 3), dtype=np.uint8)
    feats = encode_tiles(loaded.model, tiles)
    vis = loaded.model.project(feats.patches[0, :8])
    emb = loaded.model.build_inputs_embeds([1, 2], vis, [3])
    assert generate_text(loaded.model, loaded.tokenizer, emb, max_new_tokens=3).n_new_tokens == 3


class _OfflineHub:
    """huggingface_hub.HfApi on a machine without the Hub."""

    def model_info(self, repo, revision=None, token=None):
        raise OSError("offline")


def test_download_weights_offline_and_verified(tmp_path, tiny_checkpoint, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from engine.weights import ALLOW_PATTERNS, DownloadError, download_weights

    def offline(**kwargs):
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "HfApi", _OfflineHub)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(DownloadError, match="offline"):
        download_weights(tmp_path / "w1")

    seen = {}

    def fake_download(**kwargs):  # stands in for the Hub: copies the tiny checkpoint
        seen.update(kwargs)
        shutil.copytree(tiny_checkpoint, kwargs["local_dir"], dirs_exist_ok=True)
        return kwargs["local_dir"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert download_weights(tmp_path / "w2") == tmp_path / "w2"
    assert seen["repo_id"] == "initiacms/GeoLLaVA-8K" and seen["allow_patterns"] == ALLOW_PATTERNS
    # what huggingface_hub fetches of a repository holding a training checkpoint folder too
    from huggingface_hub.utils import filter_repo_objects

    repo_files = ["config.json", "model-00001-of-00004.safetensors", "model.safetensors.index.json",
                  "checkpoint-1000/model-00001-of-00004.safetensors", "checkpoint-1000/config.json", "README.md"]
    fetched = list(filter_repo_objects(repo_files, allow_patterns=seen["allow_patterns"],
                                       ignore_patterns=seen["ignore_patterns"]))
    assert fetched == ["config.json", "model-00001-of-00004.safetensors", "model.safetensors.index.json", "README.md"]
    assert "*.safetensors" in ALLOW_PATTERNS and "tokenizer.json" in ALLOW_PATTERNS

    def partial(**kwargs):  # config only: verification must fail
        shutil.copy(tiny_checkpoint / "config.json", Path(kwargs["local_dir"]) / "config.json")
        return kwargs["local_dir"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", partial)
    with pytest.raises(DownloadError, match="not usable"):
        download_weights(tmp_path / "w3")

    def cut_off(**kwargs):  # every file there, one shard cut short
        fake_download(**kwargs)
        shard = sorted(Path(kwargs["local_dir"]).glob("*.safetensors"))[-1]
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        return kwargs["local_dir"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cut_off)
    with pytest.raises(DownloadError, match="not usable: .*not a readable safetensors file"):
        download_weights(tmp_path / "w4")


def test_download_weights_fetches_one_commit_and_resumes_the_same(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    """The branch asked for (main) is resolved to its commit once and every file comes from it;
    a resumed or repaired download fetches the commit recorded by the first, not whatever main
    holds by then (a re-upload would have mixed two checkpoints in one folder)."""
    import huggingface_hub

    from engine.cli import main
    from engine.weights import REVISION_FILE, download_weights, recorded_revision

    heads = {"main": "a" * 40, "v2": "b" * 40}

    class Hub:
        def model_info(self, repo, revision=None, token=None):
            return type("Info", (), {"sha": heads.get(revision or "main", revision)})()

    fetched = []

    def fake_download(**kwargs):
        fetched.append(kwargs["revision"])
        shutil.copytree(tiny_checkpoint, kwargs["local_dir"], dirs_exist_ok=True)
        return kwargs["local_dir"]

    monkeypatch.setattr(huggingface_hub, "HfApi", Hub)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    dest = tmp_path / "w"
    download_weights(dest)
    assert fetched == ["a" * 40] and recorded_revision(dest) == "a" * 40
    assert (dest / REVISION_FILE).read_text() == f"initiacms/GeoLLaVA-8K\n{'a' * 40}\n"
    heads["main"] = "c" * 40  # the Hub's main moved on
    assert main(["weights", "--dest", str(dest)]) == 0
    assert fetched[-1] == "a" * 40 and f"at commit {'a' * 40}" in capsys.readouterr().out
    download_weights(dest, revision="v2")  # asked for: that one, recorded
    assert fetched[-1] == "b" * 40 and recorded_revision(dest) == "b" * 40
    assert recorded_revision(dest, repo="someone/else") is None
    monkeypatch.setattr(huggingface_hub, "HfApi", _OfflineHub)  # the Hub cannot be asked: as given
    download_weights(tmp_path / "w2", revision="v2")
    assert fetched[-1] == "v2" and recorded_revision(tmp_path / "w2") is None


def test_tiny_never_deletes_what_it_did_not_write(tmp_path, tiny_checkpoint):
    """`engine tiny --dest DIR` used to rmtree DIR whatever it held (`--dest .` emptied the current
    folder). It replaces only an earlier tiny checkpoint or an empty folder."""
    import shutil

    from engine.tiny import build_tiny_checkpoint

    user = tmp_path / "mine"
    (user / "sub").mkdir(parents=True)
    (user / "sub" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not a tiny checkpoint; nothing was changed"):
        build_tiny_checkpoint(user)
    assert (user / "sub" / "keep.txt").read_text() == "x"
    a_file = tmp_path / "file.bin"
    a_file.write_text("data")
    with pytest.raises(ValueError, match="not a folder"):
        build_tiny_checkpoint(a_file)
    assert a_file.read_text() == "data"
    earlier = tmp_path / "tiny"
    shutil.copytree(tiny_checkpoint, earlier)
    (earlier / "stale.txt").write_text("from the earlier build")
    assert build_tiny_checkpoint(earlier, seed=3) == earlier
    assert not (earlier / "stale.txt").exists() and "seed 3" in (earlier / "TINY_MODEL.txt").read_text()
    # the released layout: safetensors shards named by model.safetensors.index.json
    index = json.loads((earlier / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


def test_a_geollava_architecture_is_accepted_under_another_model_type(tmp_path, tiny_checkpoint):
    """config.json names the class in model_type or in architectures; either one is enough."""
    from engine.loader import read_config_json

    dest = _config_copy(tmp_path, tiny_checkpoint, model_type="llava", architectures=["LlavaQwenForCausalLM"])
    assert read_config_json(dest)["model_type"] == "llava"
    assert checkpoint_present(dest)


def test_rope_scaling_in_the_config_is_switched_off(tmp_path, tiny_checkpoint):
    """The loader forces rope_scaling off: a config.json that sets one still loads without it."""
    dest = _config_copy(tmp_path, tiny_checkpoint, rope_scaling={"type": "linear", "factor": 2.0})
    loaded = load_model(dest, device="cpu", quantization="fp32")
    assert loaded.config.rope_scaling is None


def test_tiny_refuses_a_link_to_a_folder(tmp_path):
    from engine.tiny import build_tiny_checkpoint

    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    with pytest.raises(ValueError, match="not a folder"):
        build_tiny_checkpoint(link)
    assert link.is_symlink() and not any(target.iterdir())


def test_only_a_well_formed_revision_record_is_read(tmp_path):
    from engine.weights import REVISION_FILE, recorded_revision

    record = tmp_path / REVISION_FILE
    for text, expected in ((f"initiacms/GeoLLaVA-8K\n{'a' * 40}\n", "a" * 40),
                           (f"initiacms/GeoLLaVA-8K\n{'a' * 41}\n", None),
                           (f"initiacms/GeoLLaVA-8K\n{'g' * 40}\n", None),
                           (f"initiacms/GeoLLaVA-8K\n{'a' * 40}\nmore\n", None)):
        record.write_text(text)
        assert recorded_revision(tmp_path) == expected, text


def test_a_download_with_an_empty_shard_index_is_no_checkpoint(tmp_path, tiny_checkpoint, monkeypatch):
    import huggingface_hub

    from engine.weights import DownloadError, download_weights

    def fake_download(**kwargs):
        dest = Path(kwargs["local_dir"])
        shutil.copy(tiny_checkpoint / "config.json", dest / "config.json")
        (dest / "model.safetensors.index.json").write_text('{"weight_map": {}}')
        return kwargs["local_dir"]

    monkeypatch.setattr(huggingface_hub, "HfApi", _OfflineHub)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    with pytest.raises(DownloadError, match="no weight files were downloaded"):
        download_weights(tmp_path / "w")
