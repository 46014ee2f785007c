"""The memory check before a load (engine/memory_check.py): sizes read from the safetensors
headers match what the loader builds, and a model that cannot fit is refused before any weight is
read, naming the formats that would fit."""

from __future__ import annotations

import pytest

from engine import memory_check
from engine.devices import bitsandbytes_cpu_4bit_usable
from engine.loader import load_model, weight_files
from engine.memory_check import NotEnoughMemory, count_parameters, needed_bytes


@pytest.fixture(scope="module")
def counts(tiny_checkpoint):
    return count_parameters(weight_files(tiny_checkpoint))


def _stored_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("quantization", ["fp32", "bf16"])
def test_header_sizes_match_the_loaded_model(tiny_checkpoint, counts, quantization):
    loaded = load_model(tiny_checkpoint, device="cpu", quantization=quantization)
    params = list(loaded.model.parameters())
    assert counts.quantisable + counts.other == sum(p.numel() for p in params)
    assert counts.weight_bytes(quantization) == _stored_bytes(loaded.model)


@pytest.mark.skipif(not bitsandbytes_cpu_4bit_usable(), reason="bitsandbytes has no CPU 4-bit backend")
def test_the_nf4_split_is_what_bitsandbytes_quantises(tiny_checkpoint, counts):
    import math

    loaded = load_model(tiny_checkpoint, device="cpu", quantization="nf4")
    four_bit = [p for p in loaded.model.parameters() if type(p).__name__ == "Params4bit"]
    assert sum(math.prod(p.quant_state.shape) for p in four_bit) == counts.quantisable > 0
    rest = [p for p in loaded.model.parameters() if type(p).__name__ != "Params4bit"]
    assert sum(p.numel() for p in rest) == counts.other
    # packed codes + bf16 rest: the estimate adds only the block scales on top
    packed = _stored_bytes(loaded.model)
    assert packed < counts.weight_bytes("nf4") < packed + counts.quantisable / 32


def test_full_size_estimates():
    """Qwen2-7B + CLIP ViT-L/14-336 in the released layout: ~7.9 B parameters, ~6.2 GB in nf4."""
    import torch

    from engine.memory_check import count_shapes
    from engine.modeling import QWEN2_7B_LM, LlavaQwenConfig, LlavaQwenForCausalLM

    with torch.device("meta"):
        model = LlavaQwenForCausalLM(LlavaQwenConfig(**QWEN2_7B_LM))
    c = count_shapes((n, p.shape) for n, p in model.named_parameters())
    assert 7.9e9 < c.quantisable + c.other < 8.0e9
    assert 6.1e9 < c.weight_bytes("nf4") < 6.3e9
    assert c.weight_bytes("fp32") == 2 * c.weight_bytes("bf16")


def test_a_model_that_cannot_fit_is_refused_before_loading(tiny_checkpoint, counts, monkeypatch):
    from engine.modeling import LlavaQwenForCausalLM

    def must_not_load(*_a, **_k):
        raise AssertionError("weights were read")

    monkeypatch.setattr(LlavaQwenForCausalLM, "from_pretrained", must_not_load)
    # room for bf16 but not for fp32
    free = (needed_bytes(counts, "bf16") + needed_bytes(counts, "fp32")) // 2
    monkeypatch.setattr(memory_check, "available_bytes", lambda device: free)
    with pytest.raises(NotEnoughMemory) as exc:
        load_model(tiny_checkpoint, device="cpu", quantization="fp32")
    msg = str(exc.value)
    assert "in fp32 needs about" in msg and "in RAM" in msg and "--quantization" in msg
    assert "bf16 (" in msg and "fp32 (" not in msg
    assert exc.value.needed == needed_bytes(counts, "fp32") and exc.value.available == free
    assert memory_check.SKIP_ENV in msg


def test_nothing_fits_says_so(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(memory_check, "available_bytes", lambda device: 1000)
    with pytest.raises(NotEnoughMemory, match="No weight format fits here"):
        load_model(tiny_checkpoint, device="cpu", quantization="fp32")


def test_the_check_can_be_skipped(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(memory_check, "available_bytes", lambda device: 1000)
    monkeypatch.setenv(memory_check.SKIP_ENV, "1")
    loaded = load_model(tiny_checkpoint, device="cpu", quantization="fp32")
    assert loaded.info["quantization"] == "fp32"


def test_unknown_free_memory_does_not_block(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(memory_check, "available_bytes", lambda device: None)
    assert load_model(tiny_checkpoint, device="cpu", quantization="fp32").info["device"] == "cpu"


def test_available_ram_is_read():
    free = memory_check.available_bytes("cpu")
    assert free is not None and free > 1 << 26


def test_cli_prints_the_refusal(tiny_checkpoint, monkeypatch, capsys):
    from engine.cli import main

    monkeypatch.setattr(memory_check, "available_bytes", lambda device: 1000)
    assert main(["info", "--weights", str(tiny_checkpoint), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tiny-demo in fp32 needs about")


def test_info_memory_reports_every_format_without_loading(tiny_checkpoint, counts, monkeypatch, capsys):
    import json

    import engine.loader
    from engine.cli import main

    def must_not_load(*_a, **_k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(engine.loader, "load_model", must_not_load)
    monkeypatch.setenv("GEOVQA_FEATURE_CACHE_BYTES", "0")  # the model's own need (the cache: below)
    free = (needed_bytes(counts, "bf16") + needed_bytes(counts, "fp32")) // 2
    monkeypatch.setattr(memory_check, "available_bytes", lambda device: free)
    assert main(["info", "--memory", "--json", "--weights", str(tiny_checkpoint), "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"] == counts.quantisable + counts.other and report["free_bytes"] == free
    assert report["formats"]["fp32"] == {"weights_bytes": counts.weight_bytes("fp32"),
                                         "needed_bytes": needed_bytes(counts, "fp32"), "fits": False}
    assert report["formats"]["bf16"]["fits"] is True
    assert report["auto_choice"] == "fp32"  # the CPU's default
    assert main(["info", "--memory", "--weights", str(tiny_checkpoint), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"demo model {tiny_checkpoint}: {report['parameters']:,} parameters\n")
    assert any(line.strip().startswith("fp32") and line.endswith("does not fit") for line in text.splitlines())
    assert "--quantization auto (the default) loads fp32 here" in text


CACHE = 200 * 2**20  # a feature cache cap far above the tiny model's weights, below what its features can fill


def test_the_feature_cache_cap_counts_against_the_ram(tiny_checkpoint, counts, monkeypatch):
    """The feature cache (CPU tensors, 4 GiB by default) filled RAM the check never counted: a
    CPU model that just fitted could be killed by the OOM killer once questions came."""
    free = needed_bytes(counts, "fp32") + CACHE // 2  # the model fits, the model + cache does not
    monkeypatch.setattr(memory_check, "available_bytes", lambda device: free)
    assert load_model(tiny_checkpoint, device="cpu", quantization="fp32").info["device"] == "cpu"
    with pytest.raises(NotEnoughMemory) as exc:
        load_model(tiny_checkpoint, device="cpu", quantization="fp32", ram_cache_bytes=CACHE)
    msg = str(exc.value)
    assert exc.value.needed == needed_bytes(counts, "fp32") + CACHE
    assert "in RAM (weights" in msg and "+ working memory + feature cache 0.2 GB)" in msg
    assert "--feature-cache-bytes or GEOVQA_FEATURE_CACHE_BYTES; 0 turns it off" in msg
    assert memory_check.SKIP_ENV in msg


def test_the_engine_gives_the_check_its_feature_cache_cap(tiny_checkpoint, counts, monkeypatch, tmp_path):
    from engine.pipeline import Engine

    free = needed_bytes(counts, "fp32") + CACHE // 2
    monkeypatch.setattr(memory_check, "available_bytes", lambda device: free)
    with pytest.raises(NotEnoughMemory, match="feature cache"):
        Engine(tiny_checkpoint, device="cpu", quantization="fp32", output_dir=tmp_path,
               feature_cache_bytes=CACHE)
    monkeypatch.setenv("GEOVQA_FEATURE_CACHE_BYTES", str(CACHE))  # the variable, when not given
    with pytest.raises(NotEnoughMemory, match="feature cache"):
        Engine(tiny_checkpoint, device="cpu", quantization="fp32", output_dir=tmp_path)
    eng = Engine(tiny_checkpoint, device="cpu", quantization="fp32", output_dir=tmp_path,
                 feature_cache_bytes=0)
    assert eng.features.max_bytes == 0


def test_the_cache_counts_no_more_than_the_models_features_can_fill(tiny_checkpoint, counts, monkeypatch):
    """The default 4 GiB cap counted whole refused the tiny demo model on a machine with under
    4 GiB free, though its 16 largest entries (32-wide features) come to well under 1 GB; the
    released model's (ViT-L, 1024-wide: about 1.4 GB a full canvas) fill the cap."""
    from engine.cache import FEATURE_CACHE_ITEMS, feature_entry_ceiling
    from engine.loader import feature_cache_need, read_config_json

    cap = 4 * 2**30
    tiny = feature_cache_need(read_config_json(tiny_checkpoint), cap)
    assert tiny == FEATURE_CACHE_ITEMS * feature_entry_ceiling(32, 336, 14, 8064 * 8064) < 2**30
    assert feature_cache_need({"mm_vision_tower": "openai/clip-vit-large-patch14-336"}, cap) == cap
    free = needed_bytes(counts, "fp32") + tiny + 2**20  # under the 4 GiB cap, over what it can hold
    monkeypatch.setattr(memory_check, "available_bytes", lambda device: free)
    assert load_model(tiny_checkpoint, device="cpu", quantization="fp32", ram_cache_bytes=cap).info["device"] == "cpu"


def test_the_cache_is_not_counted_against_a_gpus_memory(tiny_checkpoint, counts, monkeypatch):
    """On a GPU the check sizes the GPU's memory; the cache is in RAM (docs/protocol.md)."""
    monkeypatch.setattr(memory_check, "available_bytes", lambda device: 10**12)
    gpu = memory_check.fit_report(weight_files(tiny_checkpoint), "cuda:0", ["bf16"], ram_cache_bytes=CACHE)
    cpu = memory_check.fit_report(weight_files(tiny_checkpoint), "cpu", ["bf16"], ram_cache_bytes=CACHE)
    assert gpu["feature_cache_bytes"] == 0 and gpu["formats"]["bf16"]["needed_bytes"] == needed_bytes(counts, "bf16")
    assert cpu["feature_cache_bytes"] == CACHE
    assert cpu["formats"]["bf16"]["needed_bytes"] == needed_bytes(counts, "bf16") + CACHE


def test_info_memory_counts_the_feature_cache_on_the_cpu(tiny_checkpoint, counts, monkeypatch, capsys):
    import json

    from engine.cli import main

    free = needed_bytes(counts, "fp32") + CACHE // 2
    monkeypatch.setattr(memory_check, "available_bytes", lambda device: free)
    args = ["info", "--memory", "--weights", str(tiny_checkpoint), "--device", "cpu"]
    assert main([*args, "--json", "--feature-cache-bytes", str(CACHE)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["feature_cache_bytes"] == CACHE
    assert report["formats"]["fp32"]["needed_bytes"] == needed_bytes(counts, "fp32") + CACHE
    assert report["formats"]["fp32"]["fits"] is False
    assert main([*args, "--feature-cache-bytes", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["formats"]["fp32"]["fits"] is True
    assert main([*args, "--feature-cache-bytes", str(CACHE)]) == 0
    assert "includes the feature cache, 0.2 GB" in capsys.readouterr().out


def _cgroup_tree(tmp_path, proc_line: str, files: dict[str, str]):
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "proc_cgroup"
    proc.write_text(proc_line + "\n")
    root = tmp_path / "sys"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return proc, root


def test_cgroup_v2_limit_counts_usage_less_reclaimable_cache(tmp_path):
    from engine.memory_check import cgroup_room

    proc, root = _cgroup_tree(tmp_path, "0::/docker/abc", {
        "docker/abc/memory.max": str(16 << 30), "docker/abc/memory.current": str(6 << 30),
        "docker/abc/memory.stat": f"anon {4 << 30}\ninactive_file {2 << 30}\n"})
    assert cgroup_room(proc, root) == (16 << 30) - (4 << 30)
    (root / "docker/abc/memory.max").write_text("max\n")
    assert cgroup_room(proc, root) is None


def test_cgroup_v1_limit_and_unlimited(tmp_path):
    from engine.memory_check import cgroup_room

    proc, root = _cgroup_tree(tmp_path, "12:blkio:/\n4:memory:/job/7\n0::/", {
        "memory/job/7/memory.limit_in_bytes": str(8 << 30),
        "memory/job/7/memory.usage_in_bytes": str(3 << 30),
        "memory/job/7/memory.stat": f"inactive_file 5\ntotal_inactive_file {1 << 30}\n"})
    assert cgroup_room(proc, root) == (8 << 30) - (2 << 30)
    (root / "memory/job/7/memory.limit_in_bytes").write_text("9223372036854771712")
    assert cgroup_room(proc, root) is None
    # a container sees its own cgroup at the mount's root, not under the host's path
    proc2, root2 = _cgroup_tree(tmp_path / "ns", "4:memory:/docker/xyz", {
        "memory/memory.limit_in_bytes": str(4 << 30), "memory/memory.usage_in_bytes": str(1 << 30)})
    assert cgroup_room(proc2, root2) == 3 << 30


def test_no_cgroup_information_means_no_cap(tmp_path):
    from engine.memory_check import cgroup_room

    assert cgroup_room(tmp_path / "missing", tmp_path) is None


def test_a_container_limit_caps_the_free_ram(monkeypatch):
    monkeypatch.setattr(memory_check, "_available_ram", lambda: 64 << 30)
    monkeypatch.setattr(memory_check, "cgroup_room", lambda: 10 << 30)
    assert memory_check.available_bytes("cpu") == 10 << 30
    monkeypatch.setattr(memory_check, "cgroup_room", lambda: None)
    assert memory_check.available_bytes("cpu") == 64 << 30


def test_a_damaged_shard_is_a_clear_checkpoint_error(tiny_checkpoint, tmp_path, capsys):
    import shutil

    from engine.cli import main
    from engine.loader import CheckpointError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    shard = sorted(broken.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:50])  # a download cut off in the header
    with pytest.raises(CheckpointError, match=f"is damaged: {shard} is not a readable safetensors file"):
        load_model(broken, device="cpu", quantization="fp32")
    assert main(["info", "--memory", "--weights", str(broken), "--device", "cpu"]) == 2
    assert "is not a readable safetensors file" in capsys.readouterr().err


def test_working_memory_is_a_tenth_of_the_weights_and_at_least_1_gib():
    from engine.memory_check import TensorCounts

    big = TensorCounts(quantisable=0, other=5 * 2**30)  # 20 GiB in fp32, 10 GiB in bf16
    assert needed_bytes(big, "fp32") == 20 * 2**30 + 2 * 2**30
    assert needed_bytes(big, "bf16") == 10 * 2**30 + 2**30
    small = TensorCounts(quantisable=0, other=1000)
    assert needed_bytes(small, "fp32") == 4000 + 2**30


@pytest.mark.parametrize("value", ["0", " ", ""])
def test_the_check_is_not_skipped_by_a_variable_of_0_or_blank(tiny_checkpoint, monkeypatch, value):
    monkeypatch.setattr(memory_check, "available_bytes", lambda device: 1000)
    monkeypatch.setenv(memory_check.SKIP_ENV, value)
    with pytest.raises(NotEnoughMemory):
        load_model(tiny_checkpoint, device="cpu", quantization="fp32")


@pytest.mark.parametrize("value", ["false", "no", "off", "FALSE", " 0 "])
def test_the_check_is_not_skipped_by_a_variable_saying_no(tiny_checkpoint, monkeypatch, value):
    """Anything but "" and "0" used to skip the check: GEOVQA_SKIP_MEMORY_CHECK=false skipped it."""
    monkeypatch.setattr(memory_check, "available_bytes", lambda device: 1000)
    monkeypatch.setenv(memory_check.SKIP_ENV, value)
    with pytest.raises(NotEnoughMemory):
        load_model(tiny_checkpoint, device="cpu", quantization="fp32")


@pytest.mark.parametrize("value", ["true", "Yes", "on"])
def test_the_check_is_skipped_by_a_variable_saying_yes(tiny_checkpoint, monkeypatch, value):
    monkeypatch.setattr(memory_check, "available_bytes", lambda device: 1000)
    monkeypatch.setenv(memory_check.SKIP_ENV, value)
    assert load_model(tiny_checkpoint, device="cpu", quantization="fp32").info["quantization"] == "fp32"


@pytest.mark.parametrize("value", ["abc", "-1", "2", "maybe"])
def test_an_unclear_skip_variable_is_refused_naming_it(tiny_checkpoint, monkeypatch, value):
    monkeypatch.setattr(memory_check, "available_bytes", lambda device: 1000)
    monkeypatch.setenv(memory_check.SKIP_ENV, value)
    with pytest.raises(ValueError, match=rf"^GEOVQA_SKIP_MEMORY_CHECK must be 1 .* or 0 .*, not '{value}'\.$"):
        load_model(tiny_checkpoint, device="cpu", quantization="fp32")
