"""What `finetune` trains: peft LoRA adapters on the language model, and the base prepared for them.

What is trained
    peft LoRA adapters on the Qwen2 language model's linear layers only:
    ``model.layers.N.self_attn.{q,k,v,o}_proj`` and ``model.layers.N.mlp.{gate,up,down}_proj``
    (`LM_TARGET_REGEX`; the CLIP tower's own q/k/v projections, the projector, ``reghead`` and
    ``lm_head`` stay frozen). ``--target-modules`` narrows the list (e.g. ``q_proj,v_proj``) or
    adds ``lm_head`` (LoRA on the unquantised output head; the tiny random test model needs it
    to overfit because its random output head is too small to move the logits far).
Precision
    ``--quantization nf4`` (default on CUDA) = QLoRA: the loader's 4-bit nf4 base (vision tower,
    projector, embeddings and output head in bf16, as `ask` runs it) with the language model's
    norms in float32 (`upcast_lm_norms`); ``bf16`` = LoRA on a bf16 base; on the CPU fp32.
    On a GPU without native bfloat16 (compute capability below 8.0: T4, V100) each of those bf16
    is fp16 (`devices.half_precision`): ``fp16`` = LoRA on an fp16 base, and ``bf16`` is refused.
    Adapters are kept in float32. `add_lora` also switches on gradient checkpointing
    (non-reentrant) and turns the KV cache off.
"""

from __future__ import annotations

from typing import Sequence

from engine.loader import base_model

LM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OPTIONAL_TARGETS = ("lm_head",)  # LoRA on the (unquantised) output head: opt-in


def lm_target_regex(targets: Sequence[str] = LM_TARGETS) -> str:
    """A peft target_modules regex (full match on module names) for the LM's linear layers."""
    bad = set(targets) - set(LM_TARGETS) - set(OPTIONAL_TARGETS)
    if bad:
        raise ValueError(f"unknown LoRA target modules {sorted(bad)}; choose from "
                         f"{', '.join(LM_TARGETS + OPTIONAL_TARGETS)}")
    attn = [t for t in targets if t in LM_TARGETS[:4]]
    mlp = [t for t in targets if t in LM_TARGETS[4:]]
    alts = []
    if attn:
        alts.append(r"self_attn\.(?:" + "|".join(attn) + ")")
    if mlp:
        alts.append(r"mlp\.(?:" + "|".join(mlp) + ")")
    pattern = r"(?:.*\.)?model\.layers\.\d+\.(?:" + "|".join(alts) + ")" if alts else ""
    if "lm_head" in targets:
        pattern = (pattern + "|" if pattern else "") + r"(?:.*\.)?lm_head"
    if not pattern:
        raise ValueError("no LoRA target modules given")
    return pattern


LM_TARGET_REGEX = lm_target_regex()


def upcast_lm_norms(model) -> int:
    """QLoRA preparation of a 4-bit base, after LLaVA's QLoRA recipe: the language model's
    RMSNorm weights go to float32; every other unquantised tensor keeps the dtype it was loaded in.

    peft's ``prepare_model_for_kbit_training`` instead casts *every* unquantised tensor to float32:
    at full size that is the 1.1 B parameters of ``embed_tokens`` + ``lm_head``, the 0.3 B of the
    CLIP tower and the projector, about 2.8 GB more than bf16 on the card. It also moved the
    vision tower to float32, so training built its visual tokens (CLIP features, affinity
    clusters, anchor scores) in another precision than `ask` does on the same nf4 model. All
    those tensors are frozen, so their precision does not touch the optimizer. Returns the
    number of parameters cast."""
    import torch  # noqa: PLC0415

    lm = base_model(model).model
    cast = 0
    for name, mod in lm.named_modules():
        if name.startswith(("vision_tower", "mm_projector", "reghead")):
            continue
        if type(mod).__name__.endswith("RMSNorm"):
            for p in mod.parameters(recurse=False):
                if p.is_floating_point() and p.dtype != torch.float32:
                    p.data = p.data.to(torch.float32)
                    cast += p.numel()
    return cast


def add_lora(model, *, r: int = 16, alpha: int = 32, dropout: float = 0.05,
             targets: Sequence[str] = LM_TARGETS, four_bit: bool = False, gradient_checkpointing: bool = True):
    """Wrap the loaded model with trainable LoRA adapters on the LM linear layers."""
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    model.requires_grad_(False)
    if four_bit:
        upcast_lm_norms(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=lm_target_regex(targets),
                     bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)
