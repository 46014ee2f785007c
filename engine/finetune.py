"""QLoRA / LoRA fine-tuning of GeoLLaVA-8K on LLaVA conversation data (`python -m engine finetune`).

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
    On CUDA the forward runs under bf16 autocast. Adapters are kept in float32.
    On a GPU without native bfloat16 (compute capability below 8.0: T4, V100) each of those bf16
    is fp16 (`devices.half_precision`, `autocast_dtype`): ``fp16`` = LoRA on an fp16 base, and
    ``bf16`` is refused. fp16's narrow range needs loss scaling (`loss_scaler`): a GradScaler
    scales the loss before backward and unscales the float32 adapter gradients before clipping
    and the step, skipping a step whose gradients overflowed (the lr schedule waits); its state is saved in each
    checkpoint and restored on ``--resume``.
Visual tokens
    Every sample's image goes through the same path as inference (raster read, anyres tiling,
    CLIP, the chosen ``--strategy`` / ``--budget``), so the model is trained on exactly the
    tokens it will see, as GeoLLaVA-8K trained with its pruning active. The vision side is
    frozen, so it runs without gradients.
Loss
    Labels are -100 everywhere except the assistant answers (each answer's tokens and its
    closing ``<|im_end|>``), for every assistant turn of a multi-turn conversation. The output
    head runs only on those positions (`answer_loss`), so long visual prefixes cost no logits.
Loop
    batch 1 x ``--grad-accum``, AdamW, cosine schedule with ``--warmup-ratio``, gradient
    clipping, gradient checkpointing (non-reentrant), tqdm bar with loss and tokens/s.
Outputs in ``--out``
    ``checkpoint-<step>/`` every ``--save-every`` steps: ``adapter/`` (peft) and
    ``trainer_state.pt`` (optimizer, scheduler, RNG, step, fp16 loss scaler; tensors and plain containers only,
    read back with ``torch.load(weights_only=True)``); the newest ``--keep-checkpoints`` (3, 0 =
    all) are kept; ``--resume`` continues from the latest,
    and a run without ``--resume`` into a folder that holds checkpoints, or a finished run's
    ``adapter/``, log or summary, is refused.
    A run that stops early (Ctrl-C, a bad sample with ``--on-bad-sample stop``, a crash) first
    saves its last finished step. A sample that runs out of memory is skipped and reported
    (``out_of_memory``) or stops the run, as ``--on-bad-sample`` says.
    ``train_log.csv`` (step, epoch, loss, lr, tokens_per_s, val_loss, elapsed_s), ``loss.png``,
    ``bad_samples.jsonl`` (every skipped sample with its index and reason), ``adapter/`` (final;
    load it with ``load_model(..., adapter=DIR)`` or ``ask/serve --adapter DIR``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import random
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from engine.cli_args import AUTO_CHOICE_HELP, add_model_arguments, add_strategy_arguments, band_choice, count_or_never, positive_int
from engine.adapter_settings import training_settings
from engine.data import DataError, Sample, load_dataset, split_is_by_raster, split_train_val, strip_image_token
from engine.errors import free_gpu_memory, is_oom
from engine.json_files import json_lines
from engine.run_settings import (absolute_path, changed_settings, model_choice, resolve_tokens_per_tile,
                                 resolved_quantization, with_model_choice, with_resolved_quantization)

LM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OPTIONAL_TARGETS = ("lm_head",)  # LoRA on the (unquantised) output head: opt-in
IGNORE = -100
TRAINING_TIME_REASONS = ("too_long", "visual_failed", "out_of_memory")
SYSTEM_PROMPT = "You are a helpful assistant."
LOG_FIELDS = ("step", "epoch", "loss", "lr", "tokens_per_s", "val_loss", "elapsed_s")


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


# ----------------------------------------------------------------------------- text encoding

@dataclass
class EncodedConversation:
    before: list[int]  # token ids before the image (all prompt: label -100)
    after: list[int]  # token ids after the image
    after_labels: list[int]  # labels for `after` (-100 except assistant answers + <|im_end|>)

    @property
    def n_answer_tokens(self) -> int:
        return sum(1 for x in self.after_labels if x != IGNORE)


def encode_conversation(tokenizer, sample: Sample, system: str | None = None) -> EncodedConversation:
    """ChatML (qwen_1_5) ids of a whole conversation, split at `<image>`, with answer labels.

    Layout: system turn, then for each exchange ``<|im_start|>user\\n{q}<|im_end|>\\n
    <|im_start|>assistant\\n{a}<|im_end|>\\n``; the first user turn is written with ``<image>\\n``
    first (as inference's prompt does), and only ``{a}<|im_end|>`` carries labels. The questions
    and answers are the data's text (``encode_text``: a control token's spelling in them is plain
    text, as in a question asked); the markers around them are the template's."""
    from engine.prompt import encode_template, encode_text

    def enc(s: str) -> list[int]:
        return encode_template(tokenizer, s)

    def text(s: str) -> list[int]:
        return encode_text(tokenizer, s)

    sys_text = system if system is not None else (sample.system or SYSTEM_PROMPT)
    before = enc(f"<|im_start|>system\n{sys_text}<|im_end|>\n<|im_start|>user\n")
    after: list[int] = []
    labels: list[int] = []
    first = True
    for turn in sample.turns:
        if turn.role == "user":
            q = turn.text
            if first:
                q = "\n" + strip_image_token(q)  # "<image>" goes between before and after
                first = False
                ids = text(q) + enc("<|im_end|>\n<|im_start|>assistant\n")
            else:
                ids = enc("<|im_start|>user\n") + text(q.strip()) + enc("<|im_end|>\n<|im_start|>assistant\n")
            after += ids
            labels += [IGNORE] * len(ids)
        else:
            ans = text(turn.text.strip()) + enc("<|im_end|>")
            after += ans
            labels += ans
            nl = enc("\n")
            after += nl
            labels += [IGNORE] * len(nl)
    return EncodedConversation(before=before, after=after, after_labels=labels)


def build_training_inputs(model, enc: EncodedConversation, visual):
    """(inputs_embeds (1, L, H), labels (1, L), attention_mask (1, L)) for one conversation;
    the visual embeddings (N, H) sit between the two text pieces with label -100."""
    import torch  # noqa: PLC0415

    base = _base(model)
    emb = base.get_input_embeddings()
    dev = emb.weight.device
    parts = [emb(torch.tensor(enc.before, dtype=torch.long, device=dev))]
    n_vis = 0
    if visual is not None and visual.numel():
        parts.append(visual.to(device=dev, dtype=emb.weight.dtype))
        n_vis = int(visual.shape[0])
    parts.append(emb(torch.tensor(enc.after, dtype=torch.long, device=dev)))
    embeds = torch.cat(parts, 0).unsqueeze(0)
    labels = [IGNORE] * (len(enc.before) + n_vis) + list(enc.after_labels)
    labels_t = torch.tensor(labels, dtype=torch.long, device=dev).unsqueeze(0)
    mask = torch.ones_like(labels_t)
    return embeds, labels_t, mask


def answer_loss(model, inputs_embeds, labels, attention_mask=None):
    """Mean cross-entropy over the labelled (answer) positions, the same value as the causal-LM
    loss of `model(..., labels=labels)`, but the output head runs only on those positions: the
    full (L x vocab) logits of a 14K-token sequence would take ~8 GB in float32."""
    import torch.nn.functional as F  # noqa: PLC0415

    base = _base(model)
    hidden = base.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
    target = labels[:, 1:]
    keep = target != IGNORE
    head = base.lm_head
    h = hidden[:, :-1][keep]
    logits = head(h.to(head.weight.dtype))  # float32 norms hand on float32 to a bf16 head
    return F.cross_entropy(logits.float(), target[keep])


def _base(model):
    """The LlavaQwenForCausalLM under an optional peft wrapper."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


# ------------------------------------------------------------------------------ visual tokens

def default_visual_fn(model, *, strategy: str, budget: int | None, tokens_per_tile: int | None = None,
                      seed: int = 0, tokenizer=None, faithful_empty_slots: bool = False,
                      bands: Sequence[int] | None = None) -> Callable[[Sample], Any]:
    """A function sample -> visual embeddings (N, H) built by `engine.pipeline.prepare_visual`
    (the very path `ask` uses: raster read, anyres tiling, CLIP, the strategy), without
    gradients. The question given to text-guided strategies is the first user turn. The bands
    read are the sample's own (its record's "bands", else --bands, `engine.data`), else `bands`,
    else the engine's default choice, as `ask` makes it.

    The model runs in eval mode while the tokens are built (train mode is restored after): the
    text-guided strategies (`pyramid`, `budget`) score the image through the first decoder
    layer's q/k projections, which carry LoRA, and LoRA dropout in train mode would pick other
    tokens on every pass than `ask` (eval mode) picks."""
    import torch  # noqa: PLC0415

    from engine.pipeline import prepare_visual  # noqa: PLC0415

    base = _base(model)

    def fn(sample: Sample):
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                vis = prepare_visual(base, str(sample.image), sample.first_question, strategy=strategy,
                                     budget=budget, tokens_per_tile=tokens_per_tile, seed=seed,
                                     bands=getattr(sample, "bands", None) or (list(bands) if bands else None),
                                     tokenizer=tokenizer, faithful_empty_slots=faithful_empty_slots)
        finally:
            if was_training:
                model.train()
        return vis.selection.embeds.detach()

    return fn


# ----------------------------------------------------------------------------------- training

@dataclass
class TrainConfig:
    out: Path
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    grad_accum: int = 4
    epochs: float = 1.0
    max_steps: int | None = None
    max_grad_norm: float = 1.0
    save_every: int = 100
    eval_every: int = 100
    seed: int = 0
    resume: bool = False
    gradient_checkpointing: bool = True
    max_length: int | None = None
    progress: bool = True
    keep_checkpoints: int | None = 3  # the newest N checkpoints kept (ft3.sh's save_total_limit); 0 / None: all
    on_bad: str = "stop"  # what a sample whose image fails in the visual path does: stop | skip
    run_args: dict | None = None  # written to finetune_args.json once a resume's checkpoint is restored
    # the visual-token settings written into every adapter folder (geovqa_training.json): what
    # `ask` / `serve --adapter` use when a question gives none of its own
    adapter_settings: dict | None = None


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

    lm = _base(model).model
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


def autocast_dtype(device: str):
    """The dtype the training forward autocasts to on `device`: the GPU's 16-bit format on CUDA
    (`devices.half_dtype`: bfloat16, float16 on a GPU without native bfloat16), None (no
    autocast: the CPU trains in the loaded dtype) elsewhere."""
    from engine.devices import half_dtype  # noqa: PLC0415

    return half_dtype(device) if device.startswith("cuda") else None


def loss_scaler(device: str, dtype):
    """A torch.amp.GradScaler for training under autocast to `dtype` on `device`, enabled for
    float16 only: its 5 exponent bits flush small gradients of the fp16 activations to zero unless
    the loss is scaled up first. bfloat16 has float32's range and needs none; a disabled scaler
    passes the loss and the step through unchanged."""
    import torch  # noqa: PLC0415

    return torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)


def _checkpoint_dirs(out: Path) -> list[Path]:
    """The ``checkpoint-<step>`` folders in `out`, in step order."""
    found = [(int(m.group(1)), d) for d in out.glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", d.name))]
    return [d for _, d in sorted(found)]


def _latest_checkpoint(out: Path) -> Path | None:
    complete = [d for d in _checkpoint_dirs(out)
                if (d / "trainer_state.pt").is_file() and (d / "adapter").is_dir()]
    return complete[-1] if complete else None


def _rng_state() -> dict[str, Any]:
    import torch  # noqa: PLC0415

    st: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    import torch  # noqa: PLC0415

    torch.set_rng_state(st["torch"])
    random.setstate((3, tuple(st["python"]), None))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


@contextlib.contextmanager
def _ctrl_c_deferred():
    """Hold Ctrl-C (SIGINT) back until the block ends, then raise KeyboardInterrupt: the optimizer
    update and the record of the finished step must not be split by an interruption. A no-op
    outside the main thread or where Python does not own the SIGINT handler."""
    if threading.current_thread() is not threading.main_thread() or \
            not callable(signal.getsignal(signal.SIGINT)):
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


class _SampleOutOfMemory(Exception):
    """A training sample ran out of (GPU) memory: in its visual path, forward or backward pass."""

    def __init__(self, n_tokens: int | None, phase: str) -> None:
        self.n_tokens = n_tokens
        self.phase = phase
        super().__init__(self.describe())

    def describe(self) -> str:
        if self.phase == "visual":
            return "ran out of memory while building its visual tokens"
        return f"ran out of memory in the {self.phase} pass at {self.n_tokens} tokens (text + visual)"


def save_adapter(model, folder: Path, adapter_settings: dict | None = None) -> Path:
    """The peft adapter in `folder`, with the visual-token settings it was trained on
    (`engine.adapter_settings`, read back by `ask` / `serve --adapter`)."""
    from engine.adapter_settings import write_training_settings  # noqa: PLC0415

    model.save_pretrained(str(folder), save_embedding_layers=False)
    if adapter_settings is not None:
        write_training_settings(folder, adapter_settings)
    _share_as_umask_allows(folder)
    return folder


def _share_as_umask_allows(folder: Path) -> None:
    """Give the adapter's files the mode every other file of the run gets (0o666 & ~umask):
    safetensors writes adapter_model.safetensors with 0600 whatever the umask, so an adapter copied
    to a shared drive or served by another account (`serve --adapter`) could not be read."""
    import os  # noqa: PLC0415

    mask = os.umask(0)
    os.umask(mask)
    for p in Path(folder).iterdir():
        if p.is_file() and not p.is_symlink():
            with contextlib.suppress(OSError):  # a file system without modes (FAT, some shares)
                os.chmod(p, 0o666 & ~mask)


def save_checkpoint(model, optimizer, scheduler, step: int, micro: int, out: Path,
                    rng: dict[str, Any] | None = None, adapter_settings: dict | None = None,
                    scaler=None) -> Path:
    """Write checkpoint-<step> atomically (a temporary folder renamed). `rng` is the RNG state to
    store (default: now), so that a checkpoint taken after an interruption can hold the state of
    the end of its step. `scaler`: the fp16 loss scaler (`loss_scaler`), whose state (empty when
    it is disabled) is stored beside the optimizer's."""
    import torch  # noqa: PLC0415

    d = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    if tmp.exists():
        import shutil  # noqa: PLC0415

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_adapter(model, tmp / "adapter", adapter_settings)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng if rng is not None else _rng_state(), "step": step, "micro": micro,
                "scaler": scaler.state_dict() if scaler is not None else {}, "format": 1},
               tmp / "trainer_state.pt")
    if d.exists():
        import shutil  # noqa: PLC0415

        shutil.rmtree(d)
    tmp.rename(d)
    return d


def load_checkpoint(model, optimizer, scheduler, ckpt: Path, scaler=None) -> tuple[int, int]:
    """Restore adapter weights, optimizer, scheduler, RNG and the fp16 loss scaler (when `scaler`
    is enabled and the checkpoint holds a state: one saved without fp16, by an older version or
    on a GPU with bfloat16, leaves it at its start); return (step, micro)."""
    import torch  # noqa: PLC0415
    from peft import set_peft_model_state_dict  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    ad = ckpt / "adapter"
    f = ad / "adapter_model.safetensors"
    if not f.is_file():
        raise DataError(f"the checkpoint {ckpt} has no adapter_model.safetensors")
    try:
        res = set_peft_model_state_dict(model, load_file(str(f)))
    except RuntimeError as exc:  # shape mismatch: other --lora-r / targets than the checkpoint
        raise DataError(f"the checkpoint {ckpt} was made with other LoRA settings (rank or target "
                        f"modules) than this run; resume with the same settings. ({exc})") from exc
    if getattr(res, "unexpected_keys", None):
        raise DataError(f"the checkpoint {ckpt} does not match this model/LoRA settings "
                        f"(unexpected keys such as {res.unexpected_keys[:2]})")
    state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    return int(state["step"]), int(state["micro"])


def _use_current_lr(optimizer, scheduler, lr: float, weight_decay: float) -> None:
    """After a checkpoint's optimizer and scheduler states are loaded, they hold its run's --lr
    (each parameter group's lr and initial_lr, the scheduler's base_lrs) and --weight-decay, and a
    resume with other values went on with the old ones. Put this run's in, at the position the
    schedule has reached (its shape, from --warmup-ratio and the run's length, is this run's); with
    unchanged settings every value is the one restored, so a resume still reproduces the run."""
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["weight_decay"] = weight_decay
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def plot_log(csv_path: Path, png_path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    steps, loss, vsteps, vloss = [], [], [], []
    with csv_path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get("loss"):
                steps.append(int(row["step"]))
                loss.append(float(row["loss"]))
            if row.get("val_loss"):
                vsteps.append(int(row["step"]))
                vloss.append(float(row["val_loss"]))
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, loss, label="train loss", lw=1.2)
    if vloss:
        ax.plot(vsteps, vloss, "o-", label="validation loss", lw=1.2)
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


def train(
    model,
    tokenizer,
    train_samples: list[Sample],
    val_samples: list[Sample],
    visual_fn: Callable[[Sample], Any],
    cfg: TrainConfig,
    *,
    device: str = "cpu",
    bad_report: Path | None = None,
    reported_before: set[int] | None = None,
    precision=None,
) -> dict[str, Any]:
    """The training loop. `model` is already a peft model with trainable adapters.
    `reported_before`: sample indices an earlier (resumed) run already skipped and reported.
    `precision`: the dtype the forward autocasts to; None: `autocast_dtype(device)` (none on the
    CPU). float16 trains with loss scaling (`loss_scaler`)."""
    import torch  # noqa: PLC0415
    from transformers import get_cosine_schedule_with_warmup  # noqa: PLC0415

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if not train_samples:
        raise DataError("no valid training samples are left; see the bad-sample report")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(train_samples) / cfg.grad_accum))
    total = cfg.max_steps if cfg.max_steps else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(round(cfg.warmup_ratio * total)), total)
    amp_dtype = precision if precision is not None else autocast_dtype(device)
    scaler = loss_scaler(device, amp_dtype)

    step, micro = 0, 0
    elapsed_before = 0.0  # training time of the run this one resumes, up to its checkpoint
    log_path = out / "train_log.csv"
    if cfg.resume:
        ckpt = _latest_checkpoint(out)
        if ckpt is None:
            print(f"--resume: no checkpoint in {out}; starting from step 0", file=sys.stderr)
        else:
            step, micro = load_checkpoint(model, optimizer, scheduler, ckpt, scaler)
            _use_current_lr(optimizer, scheduler, cfg.lr, cfg.weight_decay)
            print(f"resumed from {ckpt} at step {step}", file=sys.stderr)
    if cfg.run_args is not None:  # not before: a resume refused above keeps the run's record
        (out / "finetune_args.json").write_text(json.dumps(cfg.run_args, indent=2) + "\n")
    if step == 0 or not log_path.is_file():
        with log_path.open("w", newline="") as f:
            csv.writer(f).writerow(LOG_FIELDS)
    else:  # drop log rows past the checkpoint (written after it, before an interruption)
        with log_path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        with log_path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            w.writeheader()
            w.writerows(rows)
        with contextlib.suppress(KeyError, IndexError, TypeError, ValueError):
            elapsed_before = float(rows[-1]["elapsed_s"])

    reported: set[int] = set(reported_before or ())  # samples skipped during training, reported once

    def skip(sample: Sample, reason: str, msg: str) -> None:
        if sample.index in reported:
            return
        reported.add(sample.index)
        print(f"sample {sample.index} (id {sample.id}) skipped: {msg} (listed in bad_samples.jsonl)",
              file=sys.stderr)
        if bad_report is not None:
            _append_bad(bad_report, [(sample, reason, msg)])

    def forward_loss(sample: Sample):
        enc = encode_conversation(tokenizer, sample)
        try:
            vis = visual_fn(sample)
        except Exception as exc:  # noqa: BLE001 - out of memory is re-raised tagged, others below
            if is_oom(exc):
                raise _SampleOutOfMemory(None, "visual") from exc
            if not isinstance(exc, (ValueError, OSError)):
                raise
            # unreadable raster, strategy error: per sample
            if cfg.on_bad == "stop":
                raise DataError(f"sample {sample.index} (id {sample.id}): building its visual tokens "
                                f"failed: {exc}. Fix it, or pass --on-bad-sample skip.") from exc
            skip(sample, "visual_failed", f"building its visual tokens failed: {exc}")
            return None, -1
        n_tok = len(enc.before) + len(enc.after) + (int(vis.shape[0]) if vis is not None else 0)
        if cfg.max_length and n_tok > cfg.max_length:
            msg = f"{n_tok} tokens (text + visual), more than --max-length {cfg.max_length}"
            if cfg.on_bad == "stop":
                raise DataError(f"sample {sample.index} (id {sample.id}) has {msg}. Shorten it, raise "
                                "--max-length or lower --budget, or pass --on-bad-sample skip.")
            skip(sample, "too_long", msg)
            return None, n_tok
        try:
            embeds, labels, mask = build_training_inputs(model, enc, vis)
            with torch.autocast(device.split(":")[0], dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = answer_loss(model, embeds, labels, mask)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled here
            if is_oom(exc):
                raise _SampleOutOfMemory(n_tok, "forward") from exc
            raise
        return loss, n_tok

    def out_of_memory(sample: Sample, oom: _SampleOutOfMemory) -> None:
        """Skip the sample (--on-bad-sample skip), or save the progress and stop."""
        free_memory()
        msg = f"{oom.describe()}; a lower --budget or --max-length avoids it"
        if cfg.on_bad == "skip":
            skip(sample, "out_of_memory", msg)
            return
        saved = save_progress()
        where = f"; progress is saved in {saved.name}, continue with --resume" if saved else ""
        raise DataError(f"sample {sample.index} (id {sample.id}) {msg}, or pass --on-bad-sample skip{where}.")

    def free_memory() -> None:
        import gc  # noqa: PLC0415

        gc.collect()  # the failed pass's tensors sit in reference cycles of its traceback
        free_gpu_memory()

    def validate() -> float | None:
        if not val_samples:
            return None
        model.eval()
        losses = []
        with torch.no_grad():
            for s in val_samples:
                try:
                    loss, _ = forward_loss(s)
                except _SampleOutOfMemory as oom:  # a validation sample too large: leave it out
                    free_memory()
                    skip(s, "out_of_memory", f"{oom.describe()} in validation; left out of the "
                                             "validation loss")
                    continue
                if loss is not None:
                    losses.append(float(loss))
        model.train()
        return sum(losses) / len(losses) if losses else None

    bar = None
    if cfg.progress:
        from tqdm import tqdm  # noqa: PLC0415

        bar = tqdm(total=total, initial=step, desc="finetune", unit="step", file=sys.stderr, dynamic_ncols=True)
    model.train()
    t_start = time.perf_counter() - elapsed_before
    n = len(train_samples)
    skipped_long: set[int] = set(reported) & {s.index for s in train_samples}
    order: list[int] = []
    order_epoch = -1
    last_val = None
    # the state at the end of the last finished optimizer step: what an interruption saves
    done = {"step": step, "micro": micro, "rng": _rng_state(), "saved": step if cfg.resume else -1}

    # the log row of the last finished step until it is written: validation runs between the two,
    # and an interruption there still writes it (val_loss empty), so log and checkpoint agree
    pending: dict[str, Any] = {"row": None}

    def write_row(val: float | None) -> None:
        row, pending["row"] = pending["row"], None
        if row is not None:
            row[LOG_FIELDS.index("val_loss")] = "" if val is None else f"{val:.6f}"
            with log_path.open("a", newline="") as f:
                csv.writer(f).writerow(row)

    def save_progress() -> Path | None:
        """checkpoint-<last finished step> unless it is already on disk (or nothing was done)."""
        if done["step"] == done["saved"] or done["step"] == 0:
            return None
        d = save_checkpoint(model, optimizer, scheduler, done["step"], done["micro"], out, rng=done["rng"],
                            adapter_settings=cfg.adapter_settings, scaler=scaler)
        done["saved"] = done["step"]
        return d

    try:
        while step < total:
            optimizer.zero_grad(set_to_none=True)
            acc_loss, acc_n, acc_tokens = 0.0, 0, 0
            t0 = time.perf_counter()
            while acc_n < cfg.grad_accum:
                epoch, pos = divmod(micro, n)
                if order_epoch != epoch:
                    order, order_epoch = _epoch_order(n, epoch, cfg.seed), epoch
                sample = train_samples[order[pos]]
                micro += 1
                if sample.index in skipped_long:
                    if len(skipped_long) >= n:
                        raise DataError("no training sample is usable (all too long for --max-length, "
                                        "out of memory or failing in the visual path); see bad_samples.jsonl")
                    continue
                try:
                    loss, n_tok = forward_loss(sample)
                    if loss is None:
                        skipped_long.add(sample.index)
                        continue
                    try:
                        scaler.scale(loss / cfg.grad_accum).backward()
                    except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled here
                        if not is_oom(exc):
                            raise
                        # gradients may hold part of this sample: restart the step's accumulation
                        del loss
                        optimizer.zero_grad(set_to_none=True)
                        acc_loss, acc_n, acc_tokens = 0.0, 0, 0
                        raise _SampleOutOfMemory(n_tok, "backward") from exc
                except _SampleOutOfMemory as oom:
                    out_of_memory(sample, oom)
                    skipped_long.add(sample.index)
                    continue
                acc_loss += float(loss.detach())
                acc_n += 1
                acc_tokens += n_tok
            with _ctrl_c_deferred():  # an update and its bookkeeping happen together or not at all
                scaler.unscale_(optimizer)  # clip the true gradients (a no-op without fp16)
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                scale = scaler.get_scale()
                scaler.step(optimizer)  # skipped when an fp16 gradient overflowed ...
                scaler.update()
                if scaler.get_scale() >= scale:  # ... which lowers the scale: the schedule waits
                    scheduler.step()
                step += 1
                done.update(step=step, micro=micro, rng=_rng_state())
                dt = time.perf_counter() - t0
                loss_mean = acc_loss / acc_n
                tps = acc_tokens / dt if dt > 0 else 0.0
                pending["row"] = [step, f"{micro / n:.4f}", f"{loss_mean:.6f}",
                                  f"{scheduler.get_last_lr()[0]:.3e}", f"{tps:.1f}", "",
                                  f"{time.perf_counter() - t_start:.2f}"]
            val = None
            if val_samples and cfg.eval_every and (step % cfg.eval_every == 0 or step == total):
                val = last_val = validate()
            write_row(val)
            if bar is not None:
                post = {"loss": f"{loss_mean:.4f}", "tok/s": f"{tps:.0f}"}
                if last_val is not None:
                    post["val"] = f"{last_val:.4f}"
                bar.set_postfix(post)
                bar.update(1)
            if cfg.save_every and (step % cfg.save_every == 0 or step == total):
                save_checkpoint(model, optimizer, scheduler, step, micro, out,
                                adapter_settings=cfg.adapter_settings, scaler=scaler)
                done["saved"] = step
                _prune_checkpoints(out, cfg.keep_checkpoints)
    except BaseException as exc:  # Ctrl-C, a bad sample with --on-bad-sample stop, a crash: keep the work
        if bar is not None:
            bar.close()
        try:
            write_row(None)  # the finished step's row, if validation or the write was cut
        except Exception as log_exc:  # noqa: BLE001 - report, then raise the original error
            print(f"could not write the log row of step {done['step']}: {log_exc}", file=sys.stderr)
        try:
            saved = save_progress()
        except Exception as save_exc:  # noqa: BLE001 - report, then raise the original error
            saved = None
            print(f"could not save the progress of step {done['step']}: {save_exc}", file=sys.stderr)
        if saved is not None:
            what = "interrupted" if isinstance(exc, KeyboardInterrupt) else "stopped"
            print(f"{what} after step {done['step']}: saved {saved}; continue with --resume", file=sys.stderr)
        raise
    if bar is not None:
        bar.close()
    adapter_dir = out / "adapter"
    save_adapter(model, adapter_dir, cfg.adapter_settings)
    plot_log(log_path, out / "loss.png")
    summary = {"steps": step, "trainable_parameters": n_trainable, "train_samples": len(train_samples),
               "val_samples": len(val_samples), "adapter": str(adapter_dir), "log": str(log_path),
               "plot": str(out / "loss.png"), "skipped_during_training": len(reported),
               "final_val_loss": last_val}
    (out / "finetune_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _prune_checkpoints(out: Path, keep: int | None) -> None:
    """Delete all but the newest `keep` checkpoints in `out` (after each save); 0 or None keeps all."""
    if not keep:
        return
    import shutil  # noqa: PLC0415

    for d in _checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(d, ignore_errors=True)


def _append_bad(path: Path, entries: list[tuple[Sample, str, str]]) -> None:
    """Add samples skipped during training to the bad-sample report (same line format)."""
    with Path(path).open("a", encoding="utf-8") as f:
        for s, reason, msg in entries:
            f.write(json.dumps({"index": s.index, "id": s.id, "reason": reason, "message": msg}) + "\n")


# ---------------------------------------------------------------------------------------- CLI

DEFAULT = " (default: %(default)s)"  # --help shows each default, as ask's and eval's options do


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="training data: LLaVA conversation JSON list or JSONL")
    parser.add_argument("--out", type=Path, required=True, help="output folder (checkpoints, log, adapter)")
    add_model_arguments(parser, adapter=False,
                        quantization_help="nf4 = QLoRA; bf16 / fp16 = LoRA on a 16-bit base (fp16 for GPUs "
                                          "without native bfloat16, where bf16 is refused); " + AUTO_CHOICE_HELP)
    parser.add_argument("--image-root", default=None, help="folder relative image paths are taken from")
    parser.add_argument("--max-pixels", type=positive_int, default=None,
                        help="reject images whose width x height exceeds this (reported per sample)")
    parser.add_argument("--on-bad-sample", choices=["skip", "stop"], default="stop",
                        help="skip bad samples (each listed in OUT/bad_samples.jsonl) or stop at the first (default: stop)")
    add_strategy_arguments(parser, budget_help="visual token budget per sample")
    parser.add_argument("--bands", type=band_choice, default=None,
                        help="1-based bands the model sees, as `ask --bands` and the QGIS plugin send them: "
                             "three as red, green, blue (e.g. 4,3,2) or one as grey (default: the engine's "
                             "choice for each raster: the bands tagged red/green/blue, else the first three); "
                             "a record's own \"bands\" field replaces it")
    parser.add_argument("--lora-r", type=positive_int, default=16, help="LoRA rank" + DEFAULT)
    parser.add_argument("--lora-alpha", type=int, default=32, help="LoRA scale (alpha / r)" + DEFAULT)
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input" + DEFAULT)
    parser.add_argument("--target-modules", default=",".join(LM_TARGETS),
                        help="LM linear layers that get adapters (comma-separated; add lm_head to adapt the output head)"
                             + DEFAULT)
    parser.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate of the adapters" + DEFAULT)
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay" + DEFAULT)
    parser.add_argument("--warmup-ratio", type=float, default=0.03,
                        help="share of the steps the cosine schedule warms up over" + DEFAULT)
    parser.add_argument("--grad-accum", type=positive_int, default=4,
                        help="samples a step (batch 1 x this); the effective batch" + DEFAULT)
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the training samples" + DEFAULT)
    parser.add_argument("--max-steps", type=positive_int, default=None, help="optimizer steps (overrides --epochs)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 = none)" + DEFAULT)
    parser.add_argument("--max-length", type=positive_int, default=32768,
                        help="longest sequence (text + visual tokens)" + DEFAULT)
    parser.add_argument("--save-every", type=count_or_never, default=100,
                        help="checkpoint every N optimizer steps (0 = none; the final adapter is always written)"
                             + DEFAULT)
    parser.add_argument("--keep-checkpoints", type=count_or_never, default=3,
                        help="keep only the newest N checkpoints, as GeoLLaVA-8K's ft3.sh (save_total_limit 3); "
                             "0 = keep all" + DEFAULT)
    parser.add_argument("--eval-every", type=count_or_never, default=100,
                        help="validation loss every N steps (0 = never)" + DEFAULT)
    parser.add_argument("--val-fraction", type=float, default=0.05,
                        help="share of the distinct rasters held out whole for validation" + DEFAULT)
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the split, the data order and the adapters' initial weights" + DEFAULT)
    parser.add_argument("--resume", action="store_true", help="continue from the newest OUT/checkpoint-*")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--no-progress", action="store_true")


# what decides the base model, the visual tokens, the samples (--image-root, --max-pixels), the
# train/validation split and the data order (--seed, --val-fraction, and --grad-accum, which maps
# optimizer steps to samples) and the adapter's shape and scale (--lora-r, --target-modules,
# --lora-alpha): a resumed run must keep them. "weights" is the checkpoint folder the engine resolved
# (GEOVQA_WEIGHTS, the default folder or the demo when --weights is left out), "demo_model" whether
# it is the tiny random one. The learning rate, its schedule, --weight-decay, --lora-dropout,
# --max-length and the length of the run (--epochs, --max-steps) may change on --resume.
RESUME_KEYS = ("data", "image_root", "max_pixels", "weights", "demo_model", "quantization", "strategy", "budget",
               "tokens_per_tile", "faithful_empty_slots", "bands", "seed", "val_fraction", "grad_accum",
               "lora_r", "target_modules", "lora_alpha")
RESUME_DEFAULTS = {"faithful_empty_slots": False, "bands": None}  # runs from before the options existed


RESUME_PATH_KEYS = ("data", "weights", "image_root")  # recorded and compared as absolute paths


def _target_list(text) -> list[str]:
    """--target-modules as a list of layer names."""
    return [t.strip() for t in str(text).split(",") if t.strip()]


def _run_args(args: argparse.Namespace, model: dict | None = None) -> dict:
    """The run's settings as finetune_args.json records them. `model` is the resolved checkpoint
    (run_settings.model_choice), resolved from the arguments when not given."""
    run = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if not callable(v)}
    run.update(model or model_choice(args.weights, demo_ok=not args.no_demo))
    run.update({k: absolute_path(run[k]) for k in RESUME_PATH_KEYS if k in run})
    # the format the base is trained in, not "auto" as typed: nf4 on a GPU, fp32 on the CPU
    run["quantization"] = resolved_quantization(args.device, args.quantization)
    if isinstance(run.get("target_modules"), str):  # "q_proj, v_proj" and "q_proj,v_proj" are one choice
        run["target_modules"] = ",".join(_target_list(run["target_modules"]))
    return run


def _check_resume_settings(args: argparse.Namespace, out: Path, model: dict | None = None) -> None:
    """--resume with another base model or token path would train on other inputs than the
    checkpoint saw: refuse, naming the differences. `model` as in `_run_args`."""
    saved = out / "finetune_args.json"
    if not (args.resume and saved.is_file()):
        return
    current = _run_args(args, model)
    # a record of an older version holds --weights as typed and no demo_model
    recorded = with_model_choice(json.loads(saved.read_text(encoding="utf-8")), current)
    recorded = with_resolved_quantization(recorded, current)  # older records hold "auto" as typed
    if isinstance(recorded.get("target_modules"), str):  # older records hold it as typed
        recorded["target_modules"] = ",".join(_target_list(recorded["target_modules"]))
    desc = changed_settings(recorded, current, RESUME_KEYS, defaults=RESUME_DEFAULTS, paths=RESUME_PATH_KEYS,
                            label=_flag_name)
    if desc:
        raise DataError(f"{out} holds a run made with other settings ({desc}); resume with the same "
                        "settings, or train into another --out")


def _flag_name(key: str) -> str:
    """How a recorded setting is named to the user: its flag."""
    return "demo model" if key == "demo_model" else "--" + key.replace("_", "-")


def _check_new_run(args: argparse.Namespace, out: Path) -> None:
    """A run without --resume into a folder that holds another run's checkpoints would mix with
    them: pruning keeps the higher-numbered old ones and deletes the new run's own, and a later
    --resume would continue the other run; into one that holds a finished run's adapter, log or
    summary it would overwrite them. Refuse, before the data and the model are loaded."""
    if args.resume:
        return
    found = _checkpoint_dirs(out)
    if found:
        names = ", ".join(d.name for d in found[:3]) + (", ..." if len(found) > 3 else "")
        raise DataError(f"{out} already holds checkpoints of an earlier run ({names}); continue that run "
                        "with --resume, or start a new one with another --out (or delete them)")
    # a finished run (also one saved without checkpoints, --save-every 0): the new run would
    # overwrite its adapter, log and summary without asking
    finished = [name for name in ("adapter", "finetune_summary.json") if (out / name).exists()]
    if _logged_steps(out / "train_log.csv"):
        finished.append("train_log.csv")
    if finished:
        raise DataError(f"{out} already holds the results of an earlier run ({', '.join(finished)}), which a new "
                        "run would overwrite; train into another --out, or remove them to start over")


def _recorded_split(args: argparse.Namespace, out: Path) -> str:
    """How the run splits off its validation samples: by raster (whole images held out); a
    --resume of a run made before that (its finetune_args.json has no "val_split") keeps the
    record split it trained with, so its samples and their order stay the same."""
    saved = out / "finetune_args.json"
    if args.resume and saved.is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            return str(json.loads(saved.read_text(encoding="utf-8")).get("val_split", "record"))
    return "raster"


def _split_note(samples: Sequence[Sample], val: Sequence[Sample], fraction: float, split_by: str) -> str:
    """A line saying what the validation loss measures, or '' without validation samples."""
    if not val:
        return ""
    images = {str(s.image) for s in samples}
    held = {str(s.image) for s in val}
    if split_by == "raster" and split_is_by_raster(samples, fraction):
        return (f"validation: {len(val)} samples about {len(held)} of {len(images)} rasters, held out whole "
                "(none of their questions is trained on)")
    why = ("the run being resumed split its data so" if split_by == "record" else
           "the data has a single raster")
    return (f"validation: {len(val)} of {len(samples)} samples, held out by record ({why}): the validation "
            "questions are about rasters the adapter also trains on")


def _logged_steps(log: Path) -> int:
    """How many step rows a train_log.csv holds (0 when there is none: a run stopped before its
    first step leaves the header only)."""
    try:
        with log.open(newline="") as f:
            return sum(1 for _ in csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return 0


def run_finetune(args: argparse.Namespace, *, visual_fn_factory=None) -> int:
    """`python -m engine finetune`. `visual_fn_factory` (tests) replaces `default_visual_fn` and is
    called with the same arguments."""
    from engine.loader import load_model  # noqa: PLC0415

    lm_target_regex(_target_list(args.target_modules))  # a mistyped name, before anything loads
    if args.image_root is not None and not Path(args.image_root).expanduser().is_dir():
        root = Path(args.image_root).expanduser()
        state = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"--image-root {root} {state}; give the folder the data file's relative image "
                        "paths are under")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_new_run(args, out)
    # the checkpoint, resolved once before anything loads: compared with a resumed run's record,
    # recorded for the next resume and loaded (GEOVQA_WEIGHTS may point elsewhere by then)
    checkpoint = model_choice(args.weights, demo_ok=not args.no_demo)
    resolve_tokens_per_tile(args, checkpoint)
    _check_resume_settings(args, out, checkpoint)
    bad_report = out / "bad_samples.jsonl"
    # training-time skips of an earlier run (too long, visual path failed) stay in the report
    earlier: list[dict] = []
    if args.resume and bad_report.is_file():
        for line in json_lines(bad_report.read_text(encoding="utf-8")):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("reason") in TRAINING_TIME_REASONS:
                earlier.append(rec)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm  # noqa: PLC0415

        bar = tqdm(desc="checking data", unit="sample", file=sys.stderr, leave=False)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    try:
        samples, report = load_dataset(args.data, image_root=args.image_root, max_pixels=args.max_pixels,
                                       on_bad=args.on_bad_sample, report_path=bad_report, progress=progress,
                                       bands=args.bands)
    finally:
        if bar is not None:
            bar.close()
    if earlier:
        with bad_report.open("a", encoding="utf-8") as f:
            for rec in earlier:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    print(report.summary(), file=sys.stderr)
    for b in report.bad[:20]:
        print("  skipped " + b.describe(), file=sys.stderr)
    if len(report.bad) > 20:
        print(f"  ... and {len(report.bad) - 20} more in {bad_report}", file=sys.stderr)
    split_by = _recorded_split(args, out)
    train_s, val_s = split_train_val(samples, args.val_fraction, args.seed, by=split_by)
    note = _split_note(samples, val_s, args.val_fraction, split_by)
    if note:
        print(note, file=sys.stderr)

    loaded = load_model(checkpoint["weights"], device=args.device, quantization=args.quantization)
    info = loaded.info
    device = str(info.get("device", "cpu"))
    if info.get("demo"):
        from engine.weights import demo_model_note

        print(demo_model_note(args.weights, "training"), file=sys.stderr)
    targets = _target_list(args.target_modules)
    import torch  # noqa: PLC0415

    torch.manual_seed(args.seed)  # the adapters' initial weights come from --seed, not from the process
    model = add_lora(loaded.model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                     targets=targets, four_bit=bool(info.get("four_bit")),
                     gradient_checkpointing=not args.no_gradient_checkpointing)
    factory = visual_fn_factory or default_visual_fn
    visual_fn = factory(model, strategy=args.strategy, budget=args.budget, tokens_per_tile=args.tokens_per_tile,
                        seed=args.seed, tokenizer=loaded.tokenizer, faithful_empty_slots=args.faithful_empty_slots,
                        bands=args.bands)
    cfg = TrainConfig(out=out, lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
                      grad_accum=args.grad_accum, epochs=args.epochs, max_steps=args.max_steps,
                      max_grad_norm=args.max_grad_norm, save_every=args.save_every, eval_every=args.eval_every,
                      seed=args.seed, resume=args.resume,
                      gradient_checkpointing=not args.no_gradient_checkpointing, max_length=args.max_length,
                      progress=not args.no_progress, keep_checkpoints=args.keep_checkpoints,
                      on_bad=args.on_bad_sample, run_args={**_run_args(args, checkpoint), "val_split": split_by},
                      adapter_settings=training_settings(
                          args, records_with_own_bands=sum(1 for s in samples if s.bands_from_record)))
    summary = train(model, loaded.tokenizer, train_s, val_s, visual_fn, cfg, device=device, bad_report=bad_report,
                    reported_before={int(r["index"]) for r in earlier if isinstance(r.get("index"), int)})
    print(finished_text(summary, checkpoint, cfg.adapter_settings, weights_given=args.weights is not None),
          file=sys.stderr)
    return 0


def finished_text(summary: dict, checkpoint: dict, adapter_settings: dict | None, *,
                  weights_given: bool = True) -> str:
    """The end-of-run message: what was written, the final validation loss, and ready-to-copy
    ways to use the adapter (ask, serve, the QGIS plugin). The commands name the base model the
    adapter was trained on (--weights), unless that was the demo model found without --weights."""
    import shlex  # noqa: PLC0415

    from engine.adapter_settings import settings_text  # noqa: PLC0415

    adapter = shlex.quote(str(Path(summary["adapter"]).resolve()))
    weights = "" if checkpoint.get("demo_model") and not weights_given else f" --weights {shlex.quote(str(checkpoint['weights']))}"
    lines = [f"Adapter written to {summary['adapter']} ({summary['steps']} steps, "
             f"{summary['trainable_parameters']:,} trainable parameters). Log: {summary['log']}, "
             f"plot: {summary['plot']}."]
    if summary.get("val_samples"):
        val = summary.get("final_val_loss")
        lines.append(f"Final validation loss: {val:.4f} ({summary['val_samples']} held-out samples)." if val is not None
                     else f"Final validation loss: none ({summary['val_samples']} held-out samples, none usable).")
    if adapter_settings:
        lines.append(f"It was trained with {settings_text(adapter_settings)}; the engine uses these "
                     "whenever a question does not set them.")
    lines += ["Use it:",
              f"  python -m engine ask RASTER \"question\"{weights} --adapter {adapter}",
              f"  python -m engine serve{weights} --adapter {adapter}",
              f"  QGIS plugin: Settings > Options > GeoVQA > Extra engine arguments: --adapter {adapter}"
              " (then restart the local engine)"]
    return "\n".join(lines)
