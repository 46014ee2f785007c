"""GeoLLaVA-8K model classes (model_type ``llava_qwen``) in the released checkpoint's key layout.

A Qwen2 causal LM plus, inside ``model``, a CLIP ViT vision tower and the ``mlp2x_gelu``
projector, and at the top level the ``reghead`` affinity head used by the token selection:

    model.embed_tokens.* / model.layers.{i}.* / model.norm.*     Qwen2 LM body
    lm_head.weight                                             untied output head
    model.vision_tower.vision_tower.vision_model.*             transformers CLIPVisionModel
    model.mm_projector.0.* / model.mm_projector.2.*            Linear(D_vis, H), GELU, Linear(H, H)
    reghead.dw.weight [D,1,3,3] / reghead.pw.weight [9,D,1,1] / reghead.pw.bias [9]

The classes only define the network and a few helpers the pipeline and the selection strategies
call (``encode_images``, ``project``, ``select_layer_qv``, ``affinity``, ``embed_text``,
``build_inputs_embeds``). Token selection and generation live in their own modules. No network
access: the CLIP geometry comes from ``config.vision_config`` or from a built-in copy of
openai/clip-vit-large-patch14-336's vision config.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Model,
)
from transformers.models.qwen2.modeling_qwen2 import Qwen2PreTrainedModel

MODEL_TYPE = "llava_qwen"
ARCHITECTURE = "LlavaQwenForCausalLM"
DEFAULT_VISION_TOWER = "openai/clip-vit-large-patch14-336"

# The vision config of openai/clip-vit-large-patch14-336 (what the released checkpoint's
# mm_vision_tower names), kept here so that building the model never touches the network.
CLIP_VIT_L_14_336: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "projection_dim": 768,
}

# The language model of the released checkpoint (Qwen2-7B / LongVA-7B dimensions), used to build
# the full-size architecture with random weights for GPU checks and benchmarks. LongVA extended
# Qwen2-7B-Instruct's context to 224,000 positions with RoPE base 1e9 (its text_extend script),
# and GeoLLaVA-8K inherits that language model; answers are still capped at
# ``tokenizer_model_max_length`` (32768).
QWEN2_7B_LM: dict[str, Any] = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 224000,
    "max_window_layers": 28,
    "rope_theta": 1000000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "rope_scaling": None,
}

def clip_vision_config_of(vision_config: dict | None,
                          mm_vision_tower: str | None = DEFAULT_VISION_TOWER) -> CLIPVisionConfig:
    """The CLIPVisionConfig a checkpoint's config describes: its ``vision_config`` if present,
    else the built-in ViT-L/14-336 config when ``mm_vision_tower`` names that model (ValueError
    otherwise). Works on config.json's raw values, so the loader can check it before loading."""
    if vision_config:
        values = dict(vision_config)
    else:
        tower = str(mm_vision_tower or "")
        if "clip-vit-large-patch14-336" not in tower.lower().replace("_", "-"):
            raise ValueError(
                f"the vision tower {tower!r} is not openai/clip-vit-large-patch14-336 and the "
                "config has no 'vision_config' describing it; add one to config.json"
            )
        values = dict(CLIP_VIT_L_14_336)
    for key in ("model_type", "transformers_version", "architectures"):
        values.pop(key, None)
    return CLIPVisionConfig(**values)


def unsupported_tile_geometry(clip_config: CLIPVisionConfig) -> str | None:
    """Why the engine cannot run a vision tower of this geometry, or None when it can.

    Tiling, token geometry, heatmaps and every selection strategy but ``none`` are built for
    CLIP ViT-L/14-336 tiles (engine/tiling.py: TILE 336 px, PATCH 14 px, a GRID of 24 x 24
    patches); a tower of another image or patch size would load, then fail inside a strategy."""
    from engine.tiling import GRID, PATCH, TILE

    size, patch = clip_config.image_size, clip_config.patch_size
    if (size, patch) == (TILE, PATCH):
        return None
    whole = isinstance(size, int) and isinstance(patch, int) and patch > 0 and size % patch == 0
    grid = f"a {size // patch} x {size // patch} patch grid" if whole else "no whole patch grid"
    return (f"its vision tower has image_size {size} and patch_size {patch} ({grid} a tile), but "
            f"the engine supports only image_size {TILE} and patch_size {PATCH} (a {GRID} x {GRID} "
            "patch grid a tile, the CLIP ViT-L/14-336 tower of GeoLLaVA-8K)")


class LlavaQwenConfig(Qwen2Config):
    """Qwen2 config plus the LLaVA multimodal fields the released checkpoint carries."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        mm_vision_tower: str = DEFAULT_VISION_TOWER,
        mm_vision_select_layer: int = -2,
        mm_vision_select_feature: str = "patch",
        mm_projector_type: str = "mlp2x_gelu",
        mm_hidden_size: int = 1024,
        image_aspect_ratio: str = "anyres",
        image_grid_pinpoints: list | None = None,
        mm_patch_merge_type: str = "unires_max24",
        tokenizer_model_max_length: int = 32768,
        vision_config: dict | None = None,
        **kwargs: Any,
    ) -> None:
        self.mm_vision_tower = mm_vision_tower
        self.mm_vision_select_layer = mm_vision_select_layer
        self.mm_vision_select_feature = mm_vision_select_feature
        self.mm_projector_type = mm_projector_type
        self.mm_hidden_size = mm_hidden_size
        self.image_aspect_ratio = image_aspect_ratio
        self.image_grid_pinpoints = image_grid_pinpoints
        self.mm_patch_merge_type = mm_patch_merge_type
        self.tokenizer_model_max_length = tokenizer_model_max_length
        self.vision_config = dict(vision_config) if vision_config else None
        super().__init__(**kwargs)

    def clip_vision_config(self) -> CLIPVisionConfig:
        """The vision tower's CLIPVisionConfig: ``vision_config`` if present, else the built-in
        ViT-L/14-336 config when ``mm_vision_tower`` names that model."""
        return clip_vision_config_of(self.vision_config, self.mm_vision_tower)

    @property
    def max_visual_tokens_per_tile(self) -> int:
        """MAX_TOKENS of ``unires_maxN`` (24 for the released checkpoint)."""
        from engine.protocol import tokens_per_tile_of

        return tokens_per_tile_of(self.mm_patch_merge_type)


class LlavaVisionTower(nn.Module):
    """Holds the CLIPVisionModel under the attribute ``vision_tower`` (so keys read
    ``model.vision_tower.vision_tower.vision_model.*``, as in the released checkpoint)."""

    def __init__(self, clip_config: CLIPVisionConfig, select_layer: int = -2) -> None:
        super().__init__()
        self.vision_tower = CLIPVisionModel(clip_config)
        self.select_layer = select_layer

    @property
    def num_layers(self) -> int:
        return len(self.vision_tower.vision_model.encoder.layers)

    @property
    def grid(self) -> int:
        cfg = self.vision_tower.config
        return cfg.image_size // cfg.patch_size

    def hidden_index(self) -> int:
        """Index into CLIP's ``hidden_states`` tuple (length num_layers + 1) of the selected
        layer: hidden_states[0] is the embedding output, hidden_states[k] the output of encoder
        layer k - 1."""
        n = self.num_layers + 1
        idx = self.select_layer + n if self.select_layer < 0 else self.select_layer
        if not 1 <= idx < n:
            raise ValueError(
                f"mm_vision_select_layer {self.select_layer} does not name an encoder layer of a "
                f"{self.num_layers}-layer tower"
            )
        return idx

    def selected_layer(self) -> nn.Module:
        """The encoder layer whose OUTPUT is hidden_states[select_layer].

        hidden_states[k] is produced by encoder.layers[k - 1]; with select_layer = -2 and 24
        layers that is hidden_states[23] = output of layers[22], which is also
        ``layers[select_layer]`` = layers[-2] as the original code indexes it. (For a negative
        index both readings coincide; we use the output-owner rule so positive indexes are
        consistent too.)"""
        return self.vision_tower.vision_model.encoder.layers[self.hidden_index() - 1]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 1 + grid**2, D): hidden state of the selected layer, CLS first.

        Runs only the layers needed (the ones after the selected layer are skipped); the result
        is the same tensor CLIPVisionModel(output_hidden_states=True).hidden_states[idx] gives.
        """
        vm = self.vision_tower.vision_model
        param = vm.embeddings.patch_embedding.weight
        x = pixel_values.to(device=param.device, dtype=param.dtype)
        h = vm.embeddings(x)
        h = vm.pre_layrnorm(h)
        for layer in vm.encoder.layers[: self.hidden_index()]:
            out = layer(h, None, None)
            h = out[0] if isinstance(out, (tuple, list)) else out
        return h


class RegProxyAffinityHead(nn.Module):
    """Learned 3 x 3 neighbour affinity: depthwise 3x3 conv (no bias), 1x1 conv to 9 channels,
    softmax over the 9 neighbours of each patch. Input (B, H, W, D), output (B, H, W, 9), the
    channels in ``engine.selection.clusters.OFFSETS`` order (row offset, then column offset)."""

    def __init__(self, in_dim: int = 1024) -> None:
        super().__init__()
        self.dw = nn.Conv2d(in_dim, in_dim, 3, stride=1, padding=1, groups=in_dim, bias=False)
        self.pw = nn.Conv2d(in_dim, 9, 1, bias=True)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        x = grid.permute(0, 3, 1, 2).contiguous()
        x = self.pw(self.dw(x))
        return F.softmax(x.permute(0, 2, 3, 1), dim=-1)


def build_projector(config: LlavaQwenConfig) -> nn.Sequential:
    """``mlp2x_gelu``: Linear(mm_hidden, H), exact GELU, Linear(H, H)."""
    kind = str(config.mm_projector_type)
    if kind != "mlp2x_gelu":
        raise ValueError(f"projector type {kind!r} is not supported (only 'mlp2x_gelu')")
    return nn.Sequential(
        nn.Linear(config.mm_hidden_size, config.hidden_size),
        nn.GELU(),
        nn.Linear(config.hidden_size, config.hidden_size),
    )


class LlavaQwenModel(Qwen2Model):
    """Qwen2 body plus ``vision_tower`` and ``mm_projector``."""

    config_class = LlavaQwenConfig

    def __init__(self, config: LlavaQwenConfig) -> None:
        super().__init__(config)
        clip_cfg = config.clip_vision_config()
        if clip_cfg.hidden_size != config.mm_hidden_size:
            raise ValueError(
                f"mm_hidden_size {config.mm_hidden_size} does not match the vision tower width "
                f"{clip_cfg.hidden_size}"
            )
        # CLIP has no flash-attention-2 path for every version; SDPA is exact and fast enough.
        clip_cfg._attn_implementation = "sdpa"
        self.vision_tower = LlavaVisionTower(clip_cfg, config.mm_vision_select_layer)
        self.mm_projector = build_projector(config)


class LlavaQwenForCausalLM(Qwen2ForCausalLM):
    """GeoLLaVA-8K / LongVA: LlavaQwenModel + untied lm_head + top-level ``reghead``."""

    config_class = LlavaQwenConfig
    _tied_weights_keys: list[str] = []
    _keys_to_ignore_on_load_unexpected = [r"position_ids", r"image_newline"]
    _no_split_modules = ["Qwen2DecoderLayer", "CLIPEncoderLayer"]

    def __init__(self, config: LlavaQwenConfig) -> None:
        # Skip Qwen2ForCausalLM.__init__ so the plain Qwen2Model is never built (7B on CPU).
        Qwen2PreTrainedModel.__init__(self, config)
        self.model = LlavaQwenModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reghead = RegProxyAffinityHead(config.mm_hidden_size)
        self.post_init()

    # -- vision ---------------------------------------------------------------------------
    @property
    def vision(self) -> LlavaVisionTower:
        return self.model.vision_tower

    @property
    def patch_grid(self) -> int:
        """Patches per tile side (24 for 336 px tiles and 14 px patches)."""
        return self.vision.grid

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP-preprocessed tiles (B, 3, S, S) -> (cls (B, D), patches (B, grid**2, D)) of layer
        ``mm_vision_select_layer``, before the projector."""
        h = self.vision(pixel_values)
        return h[:, 0], h[:, 1:]

    def select_layer_qv(self) -> tuple[nn.Linear, nn.Linear]:
        """``q_proj`` and ``v_proj`` of the CLIP layer whose output the features come from."""
        attn = self.vision.selected_layer().self_attn
        return attn.q_proj, attn.v_proj

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Vision features (..., D_vis) -> LM embeddings (..., H) through the projector, in the
        projector's dtype and device; output in the LM embedding dtype."""
        proj = self.model.mm_projector
        w = proj[0].weight
        out = proj(x.to(device=w.device, dtype=w.dtype))
        return out.to(self.embed_dtype)

    def affinity(self, patches: torch.Tensor) -> torch.Tensor:
        """(T, grid**2, D) patch features -> (T, grid**2, 9) neighbour affinity (softmax)."""
        t, n, d = patches.shape
        g = int(round(n**0.5))
        if g * g != n:
            raise ValueError(f"{n} patches do not form a square grid")
        w = self.reghead.dw.weight
        q = self.reghead(patches.reshape(t, g, g, d).to(device=w.device, dtype=w.dtype))
        return q.reshape(t, n, 9)

    # -- text -----------------------------------------------------------------------------
    @property
    def embed_dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def embed_device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def embed_text(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Token ids (N,) -> embeddings (N, H)."""
        t = torch.as_tensor(ids, dtype=torch.long, device=self.embed_device).reshape(-1)
        return self.model.embed_tokens(t)

    def build_inputs_embeds(
        self,
        before_ids: Sequence[int],
        visual: torch.Tensor | None,
        after_ids: Sequence[int],
    ) -> torch.Tensor:
        """Prompt pieces around the ``<image>`` placeholder + visual embeddings (N, H) ->
        inputs_embeds (1, L, H) in the LM's dtype/device. ``visual`` None or empty means a
        text-only prompt."""
        parts = [self.embed_text(before_ids)]
        if visual is not None and visual.numel():
            parts.append(visual.to(device=self.embed_device, dtype=self.embed_dtype))
        parts.append(self.embed_text(after_ids))
        return torch.cat(parts, 0).unsqueeze(0)


def register_auto() -> None:
    """Make AutoConfig / AutoModelForCausalLM know ``llava_qwen`` (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, LlavaQwenConfig)
    except ValueError:
        pass
    try:
        AutoModelForCausalLM.register(LlavaQwenConfig, LlavaQwenForCausalLM)
    except ValueError:
        pass


register_auto()
