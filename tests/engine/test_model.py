"""GeoLLaVA-8K model classes: key layout, LM equivalence with plain Qwen2, vision helpers."""

from __future__ import annotations

import re

import pytest
import torch

from engine.modeling import (
    LlavaQwenConfig,
    LlavaQwenForCausalLM,
    RegProxyAffinityHead,
)

# The released checkpoint's key layout (from the reference note), as regular expressions.
RELEASED_KEY_PATTERNS = [
    r"model\.embed_tokens\.weight",
    r"model\.layers\.\d+\.(self_attn\.(q|k|v)_proj\.(weight|bias)|self_attn\.o_proj\.weight"
    r"|mlp\.(gate|up|down)_proj\.weight|input_layernorm\.weight|post_attention_layernorm\.weight)",
    r"model\.norm\.weight",
    r"lm_head\.weight",
    r"model\.vision_tower\.vision_tower\.vision_model\..+",
    r"model\.mm_projector\.(0|2)\.(weight|bias)",
    r"reghead\.dw\.weight",
    r"reghead\.pw\.(weight|bias)",
]


def released_7b_config() -> LlavaQwenConfig:
    from engine.modeling import QWEN2_7B_LM

    return LlavaQwenConfig(**QWEN2_7B_LM)


def test_full_size_layout_on_meta():
    with torch.device("meta"):
        model = LlavaQwenForCausalLM(released_7b_config())
    sd = model.state_dict()
    for key in sd:
        assert any(re.fullmatch(p, key) for p in RELEASED_KEY_PATTERNS), key
    assert tuple(sd["reghead.dw.weight"].shape) == (1024, 1, 3, 3)
    assert tuple(sd["reghead.pw.weight"].shape) == (9, 1024, 1, 1)
    assert tuple(sd["reghead.pw.bias"].shape) == (9,)
    assert tuple(sd["model.mm_projector.0.weight"].shape) == (3584, 1024)
    assert tuple(sd["model.mm_projector.2.weight"].shape) == (3584, 3584)
    assert tuple(sd["lm_head.weight"].shape) == (152064, 3584)
    assert sd["lm_head.weight"] is not sd["model.embed_tokens.weight"]
    n_clip = {k.split(".")[6] for k in sd if ".encoder.layers." in k}
    assert len(n_clip) == 24  # built-in ViT-L/14-336 config, no network
    # hidden_states[-2] of a 24-layer tower is the output of encoder layer 22
    assert model.vision.hidden_index() == 23
    q, v = model.select_layer_qv()
    layer22 = model.model.vision_tower.vision_tower.vision_model.encoder.layers[22]
    assert q is layer22.self_attn.q_proj and v is layer22.self_attn.v_proj
    assert sum(p.numel() for p in sd.values()) > 7.5e9


def test_tiny_keys_match_released_layout(tiny_model):
    for key in tiny_model.state_dict():
        assert any(re.fullmatch(p, key) for p in RELEASED_KEY_PATTERNS), key
    cfg = tiny_model.config
    assert cfg.model_type == "llava_qwen"
    assert cfg.mm_patch_merge_type == "unires_max24" and cfg.max_visual_tokens_per_tile == 24
    assert cfg.image_aspect_ratio == "anyres" and cfg.mm_vision_select_layer == -2
    assert tiny_model.patch_grid == 24


def test_unknown_tower_without_vision_config_is_refused():
    cfg = LlavaQwenConfig(mm_vision_tower="some/other-tower", hidden_size=64,
                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="vision_config"):
        cfg.clip_vision_config()


def test_lm_forward_equals_plain_qwen2(tiny_model):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**{k: v for k, v in tiny_model.config.to_dict().items()
                         if k not in ("model_type", "architectures", "vision_config")})
    cfg._attn_implementation = "sdpa"
    plain = Qwen2ForCausalLM(cfg).eval()
    sd = {k: v for k, v in tiny_model.state_dict().items()
          if not (k.startswith("reghead.") or ".vision_tower." in k or ".mm_projector." in k)}
    missing, unexpected = plain.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    torch.manual_seed(1)
    emb = torch.randn(1, 37, cfg.hidden_size) * 0.05
    with torch.no_grad():
        a = tiny_model(inputs_embeds=emb).logits
        b = plain(inputs_embeds=emb).logits
    assert a.shape == (1, 37, cfg.vocab_size)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_projector_is_linear_gelu_linear(tiny_model):
    proj = tiny_model.model.mm_projector
    assert isinstance(proj[0], torch.nn.Linear) and isinstance(proj[2], torch.nn.Linear)
    assert isinstance(proj[1], torch.nn.GELU) and proj[1].approximate == "none"
    x = torch.randn(5, tiny_model.config.mm_hidden_size)
    ref = torch.nn.functional.linear(
        torch.nn.functional.gelu(torch.nn.functional.linear(x, proj[0].weight, proj[0].bias)),
        proj[2].weight, proj[2].bias)
    torch.testing.assert_close(tiny_model.project(x), ref)
    assert tiny_model.project(x.double()).dtype == tiny_model.embed_dtype


def test_encode_images_equals_clip_hidden_state_minus_2(tiny_model):
    torch.manual_seed(2)
    px = torch.randn(2, 3, 336, 336)
    cls, patches = tiny_model.encode_images(px)
    clip = tiny_model.model.vision_tower.vision_tower
    with torch.no_grad():
        ref = clip(pixel_values=px, output_hidden_states=True).hidden_states[-2]
    assert cls.shape == (2, 32) and patches.shape == (2, 576, 32)
    torch.testing.assert_close(cls, ref[:, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(patches, ref[:, 1:], rtol=0, atol=1e-6)
    # q/v come from the layer that produced hidden_states[-2] (layer index n_layers - 2)
    layers = clip.vision_model.encoder.layers
    q, v = tiny_model.select_layer_qv()
    assert q is layers[len(layers) - 2].self_attn.q_proj
    assert v is layers[len(layers) - 2].self_attn.v_proj


def test_affinity_is_reghead_softmax(tiny_model):
    torch.manual_seed(3)
    patches = torch.randn(3, 576, 32)
    q = tiny_model.affinity(patches)
    assert q.shape == (3, 576, 9)
    torch.testing.assert_close(q.sum(-1), torch.ones(3, 576))
    head: RegProxyAffinityHead = tiny_model.reghead
    x = patches.reshape(3, 24, 24, 32).permute(0, 3, 1, 2)
    logits = torch.nn.functional.conv2d(
        torch.nn.functional.conv2d(x, head.dw.weight, padding=1, groups=32),
        head.pw.weight, head.pw.bias)
    ref = torch.softmax(logits.permute(0, 2, 3, 1), -1).reshape(3, 576, 9)
    torch.testing.assert_close(q, ref)


def test_build_inputs_embeds(tiny_model):
    vis = torch.randn(10, tiny_model.config.hidden_size)
    emb = tiny_model.build_inputs_embeds([1, 2, 3], vis, [4, 5])
    assert emb.shape == (1, 15, tiny_model.config.hidden_size)
    torch.testing.assert_close(emb[0, 3:13], vis)
    torch.testing.assert_close(emb[0, :3], tiny_model.model.embed_tokens.weight[[1, 2, 3]])
    assert tiny_model.build_inputs_embeds([1], None, [2]).shape[1] == 2


def test_auto_classes_know_llava_qwen(tiny_checkpoint):
    from transformers import AutoConfig, AutoModelForCausalLM

    import engine.modeling  # noqa: F401  (registers llava_qwen)

    cfg = AutoConfig.from_pretrained(tiny_checkpoint)
    assert isinstance(cfg, LlavaQwenConfig)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    assert isinstance(model, LlavaQwenForCausalLM)


def test_the_selected_layer_must_be_an_encoder_layer(tiny_model, monkeypatch):
    """-2 of a 3-layer tower is hidden_states[2]; -4 would be the embeddings' output (no layer)."""
    tower = tiny_model.vision
    assert tower.num_layers == 3 and tower.hidden_index() == 2
    for bad in (-4, 0, 4):
        monkeypatch.setattr(tower, "select_layer", bad)
        with pytest.raises(ValueError, match="does not name an encoder layer"):
            tower.hidden_index()


def test_config_defaults_are_the_released_checkpoints():
    """A config.json without the LLaVA fields reads as GeoLLaVA-8K's: the 32768-token context the
    original code truncates to, layer -2, unires_max24."""
    cfg = LlavaQwenConfig()
    assert cfg.tokenizer_model_max_length == 32768
    assert (cfg.mm_vision_select_layer, cfg.mm_patch_merge_type, cfg.mm_projector_type) == (
        -2, "unires_max24", "mlp2x_gelu")


def test_a_projector_width_other_than_the_towers_is_refused():
    from engine.tiny import tiny_config_dict

    cfg = tiny_config_dict()
    cfg.pop("model_type"), cfg.pop("architectures")
    cfg["mm_hidden_size"] = 48  # the tiny tower is 32 wide
    with pytest.raises(ValueError, match="does not match the vision tower width 32"):
        LlavaQwenForCausalLM(LlavaQwenConfig(vocab_size=1024, **cfg))


def test_the_tiny_checkpoint_has_the_released_anyres_canvases():
    """Every 336 a x 336 b canvas with a x b <= 576 tiles and sides at most 49:1, but 1 x 1."""
    from engine.tiny import released_pinpoints

    pins = released_pinpoints()
    assert [336, 336] not in pins and [672, 336] in pins and [336, 672] in pins
    assert [336 * 24, 336 * 24] in pins and [336 * 49, 336] in pins and [336 * 50, 336] not in pins
    assert all((w // 336) * (h // 336) <= 576 for w, h in pins)
