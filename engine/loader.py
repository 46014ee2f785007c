"""Load a GeoLLaVA-8K checkpoint directory (released layout) with nf4 / bf16 / fp16 / fp32 weights.

The class is chosen from config.json's ``model_type`` / ``architectures`` (never from the
directory name, which is what sends the original loader to the wrong class), ``rope_scaling`` is
forced off, shards are checked against ``model.safetensors.index.json`` before loading, and every
expected tensor (LM, vision tower, projector, ``reghead``) must be present; a vision tower of
another tile geometry than CLIP ViT-L/14-336's (336 px, 14 px patches, 24 x 24 a tile, which
tiling and every strategy assume) is refused before any weight is read. On CUDA the default is
4-bit nf4 (bitsandbytes) with the vision tower, projector, reghead and lm_head kept unquantised;
on the CPU it is float32. The unquantised tensors and nf4's matmuls use the plan's 16-bit dtype
(`DevicePlan.dtype`): bfloat16, or float16 on a GPU without native bfloat16 (`devices.half_precision`). A peft LoRA adapter directory can be applied on top.

Of ``generation_config.json`` the engine takes what changes its greedy answers
(:class:`GenerationDefaults`): the repetition penalty, which transformers' ``generate`` applies
even without sampling (so the original evaluation's greedy answers carry it), and the extra
end-of-answer ids. Its sampling settings are not used: answers are greedy, as the paper's
evaluation ran them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.devices import DevicePlan, plan_device, usable_quantizations
from engine.json_files import json_kind, read_json_object
from engine.memory_check import UnreadableWeights, check_fits

SKIP_QUANT_MODULES = ["vision_tower", "mm_projector", "reghead", "lm_head"]
REAL_MODEL_NAME = "GeoLLaVA-8K"
TINY_MODEL_NAME = "tiny-demo"


class CheckpointError(ValueError):
    """The directory is not a usable GeoLLaVA-8K checkpoint (message says why)."""


class WeightsMissingError(CheckpointError):
    """No checkpoint (or no weight files) where one was expected."""


@dataclass(frozen=True)
class GenerationDefaults:
    """What the checkpoint's ``generation_config.json`` changes in the engine's decoding."""

    repetition_penalty: float = 1.0
    eos_token_ids: frozenset = frozenset()


def read_generation_defaults(weights_dir: str | os.PathLike) -> GenerationDefaults:
    """The :class:`GenerationDefaults` of the checkpoint in ``weights_dir`` (defaults when it has
    no ``generation_config.json``); CheckpointError when the file is there but cannot be used."""
    path = Path(weights_dir) / "generation_config.json"
    repair = ". Run `make weights` again to repair the download."
    data = read_json_object(path, CheckpointError, unreadable_advice=repair, not_object_advice=repair)
    if data is None:
        return GenerationDefaults()
    penalty = data.get("repetition_penalty", 1.0)
    if penalty is None:
        penalty = 1.0
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not 0 < penalty < 100:
        raise CheckpointError(f"{path}: repetition_penalty {penalty!r} is not a positive number")
    eos = data.get("eos_token_id")
    eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in eos):
        raise CheckpointError(f"{path}: eos_token_id {data.get('eos_token_id')!r} is not a token id or a list of them")
    return GenerationDefaults(float(penalty), frozenset(eos))


@dataclass
class LoadedModel:
    model: Any  # LlavaQwenForCausalLM (or a peft wrapper of it when an adapter is given)
    tokenizer: Any  # Qwen2TokenizerFast
    config: Any  # LlavaQwenConfig
    info: dict[str, Any] = field(default_factory=dict)
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)

    @property
    def vocab_limit(self) -> int:
        """Logits beyond this index are not real tokens (embedding rows > tokenizer size)."""
        return len(self.tokenizer)


def _missing(path: Path, what: str) -> WeightsMissingError:
    return WeightsMissingError(
        f"no weights: {what} ({path}). Run `make weights` to download GeoLLaVA-8K, or use the "
        "tiny demo model (`python -m engine tiny`)."
    )


def read_config_json(weights_dir: str | os.PathLike) -> dict[str, Any]:
    """Validate the directory and return its config.json as a dict."""
    path = Path(weights_dir)
    if not path.exists():
        raise _missing(path, "the weights directory does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint directory")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        if not any(path.iterdir()):
            raise _missing(path, "the weights directory is empty")
        raise CheckpointError(f"{path} has no config.json, so it is not a model checkpoint")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {cfg_path}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path} does not hold a JSON object")
    from engine.modeling import (ARCHITECTURE, DEFAULT_VISION_TOWER, MODEL_TYPE,
                                 clip_vision_config_of, unsupported_tile_geometry)

    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != MODEL_TYPE and ARCHITECTURE not in archs:
        raise CheckpointError(
            f"{path} holds a {cfg.get('model_type')!r} model ({', '.join(archs) or 'no architecture'}); "
            f"GeoVQA needs a GeoLLaVA-8K checkpoint (model_type {MODEL_TYPE!r})"
        )
    try:
        clip = clip_vision_config_of(cfg.get("vision_config"),
                                     cfg.get("mm_vision_tower", DEFAULT_VISION_TOWER))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{cfg_path} does not describe a usable vision tower: {exc}") from exc
    problem = unsupported_tile_geometry(clip)
    if problem:
        raise CheckpointError(f"the checkpoint in {path} cannot be used: {problem}")
    return cfg


def feature_cache_need(cfg: dict[str, Any], cap: int) -> int:
    """The RAM the engine's feature cache, capped at `cap` bytes, can come to hold beside the
    checkpoint whose config.json is `cfg` (`read_config_json`): its cap, or less when even full
    its entries of this model's features (vision hidden size, largest canvas) stay smaller."""
    from engine.cache import FEATURE_CACHE_ITEMS, feature_entry_ceiling
    from engine.modeling import DEFAULT_VISION_TOWER, clip_vision_config_of
    from engine.tiling import anyres_pinpoints

    clip = clip_vision_config_of(cfg.get("vision_config"), cfg.get("mm_vision_tower", DEFAULT_VISION_TOWER))
    pins = cfg.get("image_grid_pinpoints") or anyres_pinpoints()
    canvas = max(int(w) * int(h) for w, h in pins)
    entry = feature_entry_ceiling(clip.hidden_size, clip.image_size, clip.patch_size, canvas)
    return max(0, min(int(cap), FEATURE_CACHE_ITEMS * entry))  # at most that many entries


def weight_files(weights_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of the checkpoint; raises if the index names missing shards."""
    path = Path(weights_dir)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot read the shard index {index}: {exc}") from exc
        shards = sorted(set(weight_map.values()))
        absent = [s for s in shards if not (path / s).is_file()]
        if absent:
            raise WeightsMissingError(
                f"the checkpoint in {path} is incomplete: {len(absent)} of {len(shards)} weight "
                f"shards are missing ({', '.join(absent[:3])}{', ...' if len(absent) > 3 else ''}). "
                "Run `make weights` again to finish the download."
            )
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise _missing(path, "config.json is there but no model.safetensors or shard index")


def checkpoint_started(weights_dir: str | os.PathLike | None) -> bool:
    """True when ``weights_dir`` holds something of a checkpoint, complete or not.

    False for a folder that is missing or holds only hidden entries: `make weights` keeps an
    interrupted download's temp files in ``.cache/huggingface``, and an empty folder may be all a
    failed first download left. Any other content was meant to be a checkpoint, so a broken one
    must be reported (``check_checkpoint``), not mistaken for "no weights"."""
    if not weights_dir:
        return False
    path = Path(weights_dir)
    if not path.is_dir():
        return path.exists()  # a file where the folder should be: reported by read_config_json
    try:
        return any(not entry.name.startswith(".") for entry in path.iterdir())
    except OSError:
        return True  # unreadable: let read_config_json say why


def check_checkpoint(weights_dir: str | os.PathLike) -> None:
    """Raise the CheckpointError that says what is wrong with ``weights_dir``, if anything
    (config.json, model type, shard index, missing shards); reads no weights."""
    read_config_json(weights_dir)
    weight_files(weights_dir)


def checkpoint_present(weights_dir: str | os.PathLike | None) -> bool:
    """True when ``weights_dir`` looks like a complete GeoLLaVA-8K checkpoint."""
    if not weights_dir:
        return False
    try:
        check_checkpoint(weights_dir)
    except CheckpointError:
        return False
    return True


def quant_config(plan: DevicePlan):
    """The BitsAndBytesConfig of an nf4 plan (None for the others): 4-bit nf4 with double
    quantisation, computing in the plan's dtype (float16 on a GPU without native bfloat16), the
    modules of SKIP_QUANT_MODULES left unquantised."""
    if not plan.four_bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=plan.dtype,
        bnb_4bit_use_double_quant=True,
        llm_int8_skip_modules=list(SKIP_QUANT_MODULES),
    )


def load_model(
    weights_dir: str | os.PathLike,
    *,
    device: str = "auto",
    quantization: str = "auto",
    attn: str = "auto",
    adapter: str | os.PathLike | None = None,
    ram_cache_bytes: int = 0,
) -> LoadedModel:
    """Load the checkpoint in ``weights_dir``. See the module docstring for the choices.

    ``ram_cache_bytes``: the cap of the RAM cache the caller keeps beside the model (the engine's
    feature cache), counted by the memory check when the model loads on the CPU, as much of it as
    this model's features can fill (:func:`feature_cache_need`)."""
    from transformers import AutoTokenizer

    from engine.modeling import LlavaQwenConfig, LlavaQwenForCausalLM
    from engine.tiny import is_tiny_checkpoint

    adapter_settings = None
    if adapter is not None:  # a mistyped --adapter is refused now, not after minutes of loading the base
        adapter_settings = read_adapter_settings(check_adapter(adapter))
    path = Path(weights_dir)
    cfg = read_config_json(path)
    generation = read_generation_defaults(path)
    files = weight_files(path)
    plan = plan_device(device, quantization, attn)
    tiny = is_tiny_checkpoint(path)
    try:
        check_fits(files, device=plan.device, quantization=plan.quantization,
                   alternatives=usable_quantizations(plan.device),
                   model_name=TINY_MODEL_NAME if tiny else REAL_MODEL_NAME,
                   ram_cache_bytes=feature_cache_need(cfg, ram_cache_bytes))
    except UnreadableWeights as exc:
        raise CheckpointError(f"the checkpoint in {path} is damaged: {exc}. Run `make weights` again "
                              "to repair the download.") from exc

    config = LlavaQwenConfig.from_pretrained(path)
    config.rope_scaling = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
    except Exception as exc:  # missing / broken tokenizer files
        raise CheckpointError(f"cannot load the tokenizer from {path}: {exc}") from exc

    kwargs: dict[str, Any] = {
        "config": config,
        "dtype": plan.dtype,
        "attn_implementation": plan.attention,
        "low_cpu_mem_usage": True,
        "output_loading_info": True,
        "use_safetensors": True,
    }
    qc = quant_config(plan)
    if qc is not None:
        kwargs["quantization_config"] = qc
    if plan.device.startswith("cuda"):
        kwargs["device_map"] = {"": plan.device}
    try:
        model, loading = LlavaQwenForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        from engine.errors import OutOfMemory, is_oom

        if is_oom(exc):
            raise OutOfMemory("loading the model weights", exc) from exc
        raise CheckpointError(f"cannot load the weights in {path}: {exc}") from exc
    missing = [k for k in loading.get("missing_keys", []) if "position_ids" not in k]
    if missing:
        raise CheckpointError(
            f"the checkpoint in {path} lacks {len(missing)} expected tensors, e.g. "
            f"{', '.join(missing[:4])}; it is not a complete GeoLLaVA-8K checkpoint"
        )
    if plan.device == "cpu":
        model = model.to("cpu")
        if plan.four_bit:
            _detach_from_checkpoint_files(model)
    model.eval()
    model.requires_grad_(False)

    adapter_path = None
    if adapter is not None:
        model, adapter_path = _apply_adapter(model, adapter)

    info = {
        "device": plan.device,
        "gpu_name": plan.gpu_name,
        "quantization": plan.quantization,
        "four_bit": plan.four_bit,
        "compute": plan.compute,  # 'bf16' | 'fp16' | 'fp32'
        "attention": plan.attention,
        "dtype": str(plan.dtype).replace("torch.", ""),
        "weights_dir": str(path.resolve()),
        "is_tiny": tiny,
        "demo": tiny,
        "model_name": TINY_MODEL_NAME if tiny else REAL_MODEL_NAME,
        "adapter": adapter_path,
        # the visual-token settings the adapter was trained with (geovqa_training.json; None for
        # an adapter without the file): the engine's defaults while it is loaded
        "adapter_settings": adapter_settings,
        "vocab_limit": len(tokenizer),
        "repetition_penalty": generation.repetition_penalty,
    }
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, info=info, generation=generation)


def _detach_from_checkpoint_files(model) -> None:
    """Copy the unquantised tensors of a CPU nf4 model into memory of their own.

    On the CPU they are zero-copy views of the memory-mapped safetensors shards, which keeps
    every shard mapped, including the pages of the bf16 weights read for quantisation: the full
    model then shows about 18 GB resident instead of about 6 GB (docs/benchmarks)."""
    import torch

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.dtype != torch.uint8:  # packed nf4 weights are already our own
                t.data = t.data.clone()


def check_adapter(adapter: str | os.PathLike) -> Path:
    """The LoRA adapter folder ``adapter``, or a CheckpointError saying why it is none: it must
    exist, be a folder and hold adapter_config.json, a JSON object naming its ``peft_type`` (peft
    reads nothing else first: a damaged one failed only after the base model had loaded, minutes
    with the real weights, with peft's bare JSON error). Reads no weights, so callers run it
    before the base model loads."""
    apath = Path(adapter).expanduser()
    advice = "pass the adapter folder written by `python -m engine finetune` (OUT/adapter)"
    if not apath.exists():
        raise CheckpointError(f"the adapter folder {apath} does not exist; {advice}")
    if not apath.is_dir():
        raise CheckpointError(f"{apath} is a file, not a LoRA adapter folder; {advice}")
    config = apath / "adapter_config.json"
    if not config.is_file():
        raise CheckpointError(f"{apath} is not a LoRA adapter folder (no adapter_config.json); {advice}")
    damaged = f"the adapter folder is damaged or was not written by `finetune`; {advice}"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: not JSON, or not UTF-8
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else (
            "nested too deeply" if isinstance(exc, RecursionError) else str(exc))
        raise CheckpointError(f"{config} cannot be read as JSON ({why}): {damaged}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{config} holds {json_kind(data)}, not a JSON object: {damaged}")
    if not isinstance(data.get("peft_type"), str) or not data["peft_type"]:
        raise CheckpointError(f"{config} names no peft_type (e.g. \"LORA\"), so it is no PEFT "
                              f"adapter's config: {damaged}")
    return apath


def read_adapter_settings(adapter: str | os.PathLike) -> dict | None:
    """The visual-token settings `finetune` recorded in the adapter folder (geovqa_training.json),
    None for an adapter without them; a CheckpointError when the file is there but unusable."""
    from engine.adapter_settings import AdapterSettingsError, read_training_settings

    try:
        return read_training_settings(adapter)
    except AdapterSettingsError as exc:
        raise CheckpointError(str(exc)) from exc


def _apply_adapter(model, adapter: str | os.PathLike):
    """Wrap ``model`` with the peft LoRA adapter stored in ``adapter`` (inference mode)."""
    apath = check_adapter(adapter)
    from peft import PeftModel

    try:
        wrapped = PeftModel.from_pretrained(model, str(apath), is_trainable=False)
    except Exception as exc:
        raise CheckpointError(f"cannot apply the adapter in {apath}: {exc}") from exc
    wrapped.eval()
    return wrapped, str(apath.resolve())


def base_model(model):
    """The LlavaQwenForCausalLM under an optional peft wrapper."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model
