"""QLoRA training step on the full-size GeoLLaVA-8K architecture (random weights): peak GPU memory.

    python -m engine.benchmarks.finetune_gpu [--tokens 2592,13824] [--json docs/benchmarks/qlora_gpu.json]

Without CUDA it prints a note and exits 0 (nothing is recorded). With CUDA it writes a random
checkpoint with Qwen2-7B / CLIP ViT-L/14-336 dimensions in the released layout (bf16 safetensors,
about 16 GB, in --workdir, deleted afterwards), loads it through the engine's loader in nf4, adds
the same LoRA adapters `finetune` adds (LM norms in fp32, the rest as loaded; gradient
checkpointing), and runs forward + backward + AdamW step on one conversation for each visual
token count (2,592 = a 4000 x 3000 image, 13,824 = 8K x 8K at 24 tokens a tile). The visual
tokens are random CLIP-sized features through the projector (the frozen vision side adds no
training memory). Peak memory, step time and trainable parameters go to the JSON file and to
$OUT/qlora_gpu.json when $OUT is set.

`qlora_step` is also run on the CPU by the tests with the tiny checkpoint so this code stays
working between GPU runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path

from engine.tiny import write_random_checkpoint  # noqa: E402  (light: heavy imports are lazy)


def qlora_step(weights_dir, *, device: str, quantization: str, n_visual: list[int], lora_r: int = 16,
               answer: str = "There are three ships in the harbour.") -> dict:
    """Load, add LoRA as `finetune` does, run one optimizer step per visual-token count."""
    import torch

    from engine.benchmarks.memory import RssSampler
    from engine.data import Sample, Turn
    from engine.finetune_inputs import answer_loss, build_training_inputs, encode_conversation
    from engine.finetune_lora import add_lora
    from engine.finetune_loop import autocast_dtype, loss_scaler
    from engine.loader import base_model, load_model

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loaded = load_model(weights_dir, device=device, quantization=quantization)
    load_s = time.perf_counter() - t0
    gc.collect()
    after_load = torch.cuda.memory_allocated() if cuda else RssSampler().current()
    model = add_lora(loaded.model, r=lora_r, alpha=2 * lora_r, dropout=0.05,
                     four_bit=bool(loaded.info.get("four_bit")), gradient_checkpointing=True)
    after_prepare = torch.cuda.memory_allocated() if cuda else RssSampler().current()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    amp = autocast_dtype(device)  # as `finetune` trains: bf16, or fp16 with loss scaling
    scaler = loss_scaler(device, amp)
    base = base_model(model)
    sample = Sample(index=0, id="bench", image=Path("none"), turns=[
        Turn("user", "<image>\nHow many ships are in the harbour?"), Turn("assistant", answer)])
    enc = encode_conversation(loaded.tokenizer, sample)
    runs = []
    model.train()
    for n in n_visual:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        g = torch.Generator().manual_seed(n)
        with torch.no_grad():
            feats = torch.randn(n, base.config.mm_hidden_size, generator=g)
            visual = base.project(feats)
        t1 = time.perf_counter()
        with RssSampler(interval=0.05) as rss:
            embeds, labels, mask = build_training_inputs(model, enc, visual)
            with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
                loss = answer_loss(model, embeds, labels, mask)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
        runs.append({
            "visual_tokens": n,
            "sequence_tokens": int(embeds.shape[1]),
            "loss": round(float(loss.detach()), 4),
            "step_s": round(time.perf_counter() - t1, 3),
            "peak_bytes": int(torch.cuda.max_memory_allocated()) if cuda else int(rss.peak),
        })
    return {
        "quantization": loaded.info.get("quantization"),
        "attention": loaded.info.get("attention"),
        "device": loaded.info.get("device"),
        "load_s": round(load_s, 1),
        "memory_counted": "GPU bytes allocated by torch" if cuda else "process resident set (RSS)",
        "resident_after_load_bytes": int(after_load),
        "resident_after_lora_bytes": int(after_prepare),
        "trainable_parameters": int(sum(p.numel() for p in params)),
        # every parameter's storage after the QLoRA preparation (4-bit weights count packed)
        "parameter_bytes": int(sum(p.numel() * p.element_size() for p in model.parameters())),
        "lora_r": lora_r,
        "gradient_checkpointing": True,
        "steps": runs,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="2592,13824", help="visual token counts, comma-separated")
    ap.add_argument("--json", type=Path, default=Path("docs/benchmarks/qlora_gpu.json"))
    ap.add_argument("--workdir", type=Path, default=None, help="where the ~16 GB random checkpoint is written")
    ap.add_argument("--lora-r", type=int, default=16)
    args = ap.parse_args(argv)

    import torch
    from engine.devices import half_precision

    if not torch.cuda.is_available():
        print("No CUDA GPU: the QLoRA full-size benchmark is skipped (nothing recorded).")
        return 0
    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    work = args.workdir or Path(os.environ.get("GEOVQA_BIG_TMP", "/tmp")) / "geollava-7b-random"
    t0 = time.perf_counter()
    write_random_checkpoint(work, "cuda")
    write_s = time.perf_counter() - t0
    torch.cuda.empty_cache()
    try:
        rec = qlora_step(work, device="cuda", quantization="nf4", n_visual=tokens, lora_r=args.lora_r)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    free, total = torch.cuda.mem_get_info()
    record = {
        "what": "one QLoRA training step (forward + backward + AdamW) on GeoLLaVA-8K's full-size "
                f"architecture with random weights, batch 1, {half_precision('cuda:0')} autocast, "
                "gradient checkpointing",
        "gpu": torch.cuda.get_device_name(0),
        "gpu_total_bytes": int(total),
        "write_checkpoint_s": round(write_s, 1),
        "torch": torch.__version__,
        **rec,
    }
    text = json.dumps(record, indent=2) + "\n"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "qlora_gpu.json").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
