"""Full-size GeoLLaVA-8K (Qwen2-7B + CLIP ViT-L/14-336, random weights) through the engine's own
loader in nf4: load time, peak and resident memory, and a short generation.

    python -m engine.benchmarks.full_size [--device cuda|cpu] [--json PATH] [--workdir DIR]

The checkpoint is built on the meta device, given random bf16 weights and written in the released
layout (sharded safetensors, about 16 GB in --workdir, deleted afterwards), then loaded in nf4
exactly as real weights would be. On CUDA this is the figure of issue #2 (`gpu_load.json`, also
recorded by tests/engine/test_gpu.py); on the CPU (bitsandbytes' CPU backend, needs about 20 GB of
RAM while the checkpoint is written) it checks the same full-size loader path on a machine without
a GPU and records the process's resident memory (`full_size_cpu_nf4.json`).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

CONFIG = "GeoLLaVA-8K full size (Qwen2-7B + CLIP ViT-L/14-336), random weights"


def generate_from_random_visual(loaded, n_visual: int, max_new_tokens: int = 8):
    """Greedy generation after `n_visual` random CLIP-sized features through the projector."""
    import torch

    from engine.generate import generate_text
    from engine.prompt import split_prompt

    model, tok = loaded.model, loaded.tokenizer
    feats = torch.randn(n_visual, model.config.mm_hidden_size, generator=torch.Generator().manual_seed(0))
    pieces = split_prompt(tok, "How many ships are in the harbour?")
    emb = model.build_inputs_embeds(pieces.before, model.project(feats), pieces.after)
    return generate_text(model, tok, emb, max_new_tokens=max_new_tokens)


def storage_bytes(model) -> int:
    """Bytes of the model's parameters and buffers as stored (nf4 weights count packed)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return int(sum(t.numel() * t.element_size() for t in tensors))


def measure(device: str, workdir: Path, *, n_visual: int = 13824 // 4, max_new_tokens: int = 16,
            keep: bool = False, overrides: dict | None = None) -> dict:
    """Write the random full-size checkpoint, load it in nf4 on `device`, generate; a record.
    `overrides` replace config fields (the tests use small ones)."""
    import torch

    from engine.benchmarks.memory import RssSampler
    from engine.loader import load_model, weight_files
    from engine.memory_check import count_parameters
    from engine.modeling import QWEN2_7B_LM
    from engine.tiny import write_random_checkpoint

    cuda = device.startswith("cuda")
    workdir = Path(workdir)
    try:
        t0 = time.perf_counter()
        # written by a child process, so none of the 15 GB it builds stays in this one's figures
        writer = multiprocessing.get_context("spawn").Process(
            target=write_random_checkpoint, args=(workdir, device if cuda else "cpu"),
            kwargs={**QWEN2_7B_LM, **(overrides or {})})
        writer.start()
        writer.join()
        if writer.exitcode != 0:
            raise RuntimeError(f"writing the random checkpoint failed (exit code {writer.exitcode})")
        t_write = time.perf_counter() - t0
        gc.collect()
        rss_before = RssSampler().current()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with RssSampler(interval=0.05) as rss:
            loaded = load_model(workdir, device=device, quantization="nf4")
        t_load = time.perf_counter() - t0
        gc.collect()
        peak = torch.cuda.max_memory_allocated() if cuda else rss.peak
        resident = torch.cuda.memory_allocated() if cuda else RssSampler().current()
        estimate = count_parameters(weight_files(workdir)).weight_bytes("nf4")
        with RssSampler(interval=0.05) as gen_rss:
            gen = generate_from_random_visual(loaded, n_visual, max_new_tokens)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return {
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)",
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_total_bytes": int(torch.cuda.mem_get_info()[1]) if cuda else None,
        "config": CONFIG if not overrides else f"{CONFIG}, with {sorted(overrides)} overridden",
        "quantization": loaded.info["quantization"],
        "attention": loaded.info["attention"],
        "memory_counted": "GPU bytes allocated by torch" if cuda else "process resident set (RSS)",
        "rss_before_load_bytes": int(rss_before),
        "write_checkpoint_s": round(t_write, 1),
        "load_s": round(t_load, 1),
        "load_peak_bytes": int(peak),
        "resident_after_load_bytes": int(resident),
        "model_storage_bytes": storage_bytes(loaded.model),
        # engine/memory_check.py's nf4 estimate from the safetensors headers (block scales included)
        "estimated_weight_bytes": int(estimate),
        "generate_prompt_tokens": gen.n_prompt_tokens,
        "generate_new_tokens": gen.n_new_tokens,
        "prefill_s": round(gen.prefill_s, 3),
        "generate_s": round(gen.generate_s, 3),
        "generate_peak_bytes": gen.peak_memory_bytes if cuda else int(gen_rss.peak),
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path, default=None,
                    help="default: docs/benchmarks/gpu_load.json (CUDA) or full_size_cpu_nf4.json")
    ap.add_argument("--workdir", type=Path, default=None, help="where the ~16 GB checkpoint is written")
    ap.add_argument("--visual", type=int, default=None, help="visual tokens before the question "
                    "(default 3,456 on CUDA, 64 on the CPU)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 16 on CUDA, 2 on the CPU")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    out = args.json or Path("docs/benchmarks") / ("gpu_load.json" if cuda else "full_size_cpu_nf4.json")
    work = args.workdir or Path(os.environ.get("GEOVQA_BIG_TMP", "/tmp")) / "geollava-7b-random"
    rec = measure(args.device, work, n_visual=args.visual or (3456 if cuda else 64),
                  max_new_tokens=args.new_tokens or (16 if cuda else 2))
    text = json.dumps(rec, indent=2) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], out.name).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
