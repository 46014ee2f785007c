"""Build a tiny, randomly initialised GeoLLaVA-8K checkpoint in the released layout.

The directory looks like the real one (config.json with model_type ``llava_qwen`` and every LLaVA
field, safetensors shards + ``model.safetensors.index.json``, a Qwen2-style fast tokenizer with the
ChatML special tokens) but the network is a few hundred thousand parameters: a 2-layer Qwen2 LM
and a 3-layer CLIP with the REAL tile geometry (336 px images, 14 px patches, 24 x 24 grid). Tests,
the demo mode and the benchmarks run the whole engine on it without downloading anything.

The weights are random, so the answers are gibberish; the tiny model is built so that greedy
decoding never emits a special token nor an unprintable byte (their lm_head rows are zero), i.e.
it always produces readable text and stops at ``max_new_tokens``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

TINY_FORMAT_VERSION = 2  # bump when the tiny checkpoint's content changes (cache keys use it)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TOKENIZER_BPE_VOCAB = 700  # byte alphabet (256) + merges; special tokens come after

TINY_LM: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 2,
    "attention_dropout": 0.0,
    "rope_scaling": None,
    "use_cache": True,
}

TINY_VISION: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_channels": 3,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "projection_dim": 32,
}

# Built-in corpus for the tiny tokenizer: everyday English plus remote-sensing vocabulary.
_CORPUS = """
You are a helpful assistant. Answer the question about the image with a short sentence.
What is in this image? How many buildings are there? Is there a ship in the harbour?
The image shows a city with roads, buildings, parking lots, trees and a river.
There are three airplanes on the runway near the terminal of the airport.
A large ship is docked at the port next to storage tanks and container cranes.
The scene contains farmland, fields of crops, a forest, grassland, bare soil and water.
Which direction is the bridge from the stadium? It is to the north east of the stadium.
Count the vehicles in the parking lot. There are twelve cars and two trucks.
Is the area urban or rural? The area is mostly rural with a small village.
Where is the swimming pool? The swimming pool is in the lower left part of the image.
Satellite imagery, aerial photograph, ultra high resolution remote sensing, GeoTIFF raster.
Land cover: residential, industrial, commercial, agricultural, wetland, desert, snow, cloud.
Objects: harbor, harbour, ship, boat, vehicle, car, truck, bus, airplane, helicopter, tower,
windmill, wind turbine, solar panel, greenhouse, roundabout, intersection, highway, railway,
train station, tennis court, basketball court, baseball field, soccer field, ground track field,
storage tank, chimney, dam, overpass, golf course, container, crane, pier, lighthouse, bridge.
Colours: red, green, blue, white, black, grey, gray, brown, yellow, orange, dark, light.
Directions: north, south, east, west, left, right, top, bottom, center, centre, upper, lower.
Numbers: zero one two three four five six seven eight nine ten eleven twelve 0 1 2 3 4 5 6 7 8 9
The choices are listed below: (A) yes (B) no (C) maybe (D) unknown. Answer with the letter.
Yes. No. A B C D E. The answer is A. The answer is B. The answer is C. The answer is D.
Describe the image in detail. The road runs from the top left to the bottom right corner.
Please look at the map and tell me whether the river crosses the highway near the bridge.
"""


def tiny_config_dict(**overrides: Any) -> dict[str, Any]:
    """The tiny model's config fields (before the vocabulary size is known)."""
    from engine.modeling import ARCHITECTURE, DEFAULT_VISION_TOWER, MODEL_TYPE

    vision = dict(TINY_VISION)
    vision.update(overrides.pop("vision_config", {}) or {})
    cfg: dict[str, Any] = dict(TINY_LM)
    cfg.update(
        {
            "model_type": MODEL_TYPE,
            "architectures": [ARCHITECTURE],
            "mm_vision_tower": DEFAULT_VISION_TOWER,
            "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "patch",
            "mm_projector_type": "mlp2x_gelu",
            "mm_hidden_size": vision["hidden_size"],
            "image_aspect_ratio": "anyres",
            "image_grid_pinpoints": released_pinpoints(),
            "mm_patch_merge_type": "unires_max24",
            "tokenizer_model_max_length": 32768,
            "vision_config": vision,
        }
    )
    cfg.update(overrides)
    return cfg


def released_pinpoints(tile: int = 336, max_tiles: int = 576, max_ratio: int = 49) -> list:
    """All (336a, 336b) with a*b <= 576, max/min <= 49, excluding 1 x 1 (as [w, h] lists)."""
    out = []
    for a in range(1, max_tiles + 1):
        for b in range(1, max_tiles // a + 1):
            if a == b == 1 or max(a, b) > max_ratio * min(a, b):
                continue
            out.append([tile * a, tile * b])
    return out


def tiny_key(seed: int = 0, **overrides: Any) -> str:
    """Short hash naming a tiny checkpoint built with these arguments (for caches)."""
    blob = json.dumps(
        {"v": TINY_FORMAT_VERSION, "seed": seed, "cfg": tiny_config_dict(**overrides)},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_tokenizer():
    """Train the small byte-level BPE and wrap it as a Qwen2-style fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    # Qwen2's pre-tokenisation: split on its regex, then map bytes to printable characters.
    qwen_split = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(qwen_split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_BPE_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    lines = [ln for ln in _CORPUS.strip().splitlines() if ln.strip()]
    tok.train_from_iterator(lines * 4, trainer=trainer)
    fast = Qwen2TokenizerFast(
        tokenizer_object=tok,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    if fast.convert_tokens_to_ids("<|endoftext|>") is None:
        fast.add_special_tokens({"pad_token": "<|endoftext|>"})
    return fast


def build_tiny_checkpoint(dest: str | os.PathLike, seed: int = 0, **overrides: Any) -> Path:
    """Write a random tiny GeoLLaVA-8K checkpoint into ``dest`` (created; replaced if it is an
    earlier tiny checkpoint, refused if it holds anything else) and return its path. ``overrides`` replace config fields (``vision_config`` is
    merged into the tiny CLIP config)."""
    import torch

    from engine.modeling import LlavaQwenConfig, LlavaQwenForCausalLM

    dest = Path(dest)
    _check_replaceable(dest)
    tokenizer = build_tokenizer()
    n_tok = len(tokenizer)
    cfg_dict = tiny_config_dict(**overrides)
    # Like the real checkpoint, the embedding matrix is larger than the tokenizer.
    cfg_dict.setdefault("vocab_size", ((n_tok + 63) // 64) * 64 + 64)
    cfg_dict["bos_token_id"] = None
    cfg_dict["eos_token_id"] = tokenizer.convert_tokens_to_ids("<|im_end|>")
    cfg_dict["pad_token_id"] = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    cfg_dict.pop("model_type")
    cfg_dict.pop("architectures")
    config = LlavaQwenConfig(**cfg_dict)
    config.architectures = ["LlavaQwenForCausalLM"]

    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(seed)
        model = LlavaQwenForCausalLM(config).float().eval()
        with torch.no_grad():
            # The random reghead bias is zero in the original init; give it some signal so the
            # affinity is not uniform, and keep special tokens out of greedy decoding.
            model.reghead.pw.bias.normal_(0.0, 0.5)
            for tid in _unwanted_output_ids(tokenizer):
                model.lm_head.weight[tid].zero_()

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=dest.parent))
    try:
        total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        shard = max(total // 3 + 1, 1024)
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=shard)
        tokenizer.save_pretrained(tmp)
        _write_readme(tmp, seed)
        if dest.exists():
            shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _check_replaceable(dest: Path) -> None:
    """`dest` may be replaced: absent, an empty folder, or a tiny checkpoint this module wrote
    (TINY_MODEL.txt). Anything else (a real checkpoint, the current folder, a user's files) is
    refused with ValueError, never deleted."""
    if not dest.exists() and not dest.is_symlink():
        return
    if not dest.is_dir() or dest.is_symlink():
        raise ValueError(f"{dest} exists and is not a folder; choose another --dest")
    if any(dest.iterdir()) and not (dest / "TINY_MODEL.txt").is_file():
        raise ValueError(f"{dest} holds files that are not a tiny checkpoint; nothing was changed. "
                         "Choose an empty or new folder as --dest.")


def _unwanted_output_ids(tokenizer) -> list[int]:
    """Special tokens and tokens that do not decode to printable text (lone bytes, control
    characters): their lm_head rows are zeroed so the random model writes readable gibberish."""
    out = []
    for tid in range(len(tokenizer)):
        text = tokenizer.decode([tid])
        if tokenizer.convert_ids_to_tokens(tid) in SPECIAL_TOKENS or not text.strip() and "\n" not in text:
            out.append(tid)
        elif "\ufffd" in text or not all(ch.isprintable() or ch == "\n" for ch in text):
            out.append(tid)
    return out


def _write_readme(path: Path, seed: int) -> None:
    (path / "TINY_MODEL.txt").write_text(
        "Tiny random GeoLLaVA-8K checkpoint built by engine/tiny.py "
        f"(format {TINY_FORMAT_VERSION}, seed {seed}). Random weights: answers are meaningless.\n"
    )


def write_random_checkpoint(dest: str | os.PathLike, device: str = "cpu", **overrides: Any) -> Path:
    """Random bf16 weights of the released architecture (Qwen2-7B LM, CLIP ViT-L/14-336 tower)
    unless `overrides` replace config fields (tests use small ones), built on the meta device,
    materialised on `device` and saved in the released layout with the tiny tokenizer (token
    ids beyond it are simply never used). For GPU load / QLoRA checks of the full size."""
    import torch

    from engine.modeling import QWEN2_7B_LM, LlavaQwenConfig, LlavaQwenForCausalLM

    config = LlavaQwenConfig(**{**QWEN2_7B_LM, **overrides})
    config.architectures = ["LlavaQwenForCausalLM"]
    with torch.device("meta"):
        model = LlavaQwenForCausalLM(config)
    model = model.to(torch.bfloat16).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0) if "norm" in name else p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.config.dtype = "bfloat16"
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True, max_shard_size="4GB")
    del model
    build_tokenizer().save_pretrained(dest)
    return dest


def is_tiny_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a checkpoint written by build_tiny_checkpoint."""
    return (Path(path) / "TINY_MODEL.txt").is_file()
