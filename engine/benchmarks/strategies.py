"""Token-strategy benchmark on synthetic UHR scenes: tokens, object recall, speed, memory.

For every scene size (2K, 8K, 16K squares by default; `engine.synth` scenes with known objects)
the raster is read, tiled and encoded once; then every strategy selects tokens for one question
and the language model prefills the prompt to the first answer token. Reported per strategy:

* ``visual_tokens`` entering the LM (and ``candidates``, the unreduced `none` count);
* ``recall`` - share of object patches the kept tokens stand for, and ``recall_sharp`` - the
  same counting only tokens of at most 4 patches (`engine.synth.object_recall`);
* ``select_s``, ``prefill_s`` and ``ttft_s`` = read + vision + select + prefill (time to first
  token for a fresh raster; read and vision are shared by all strategies and listed apart);
* ``peak_mem_mb`` - peak GPU memory allocated during select + prefill on CUDA; on the CPU the
  peak resident set size of the process sampled during select + prefill (Linux /proc), which
  includes the model and the features already in memory.

Budgets: every strategy gets the geollava count (tiles x 24) as its hard budget except `none`
(unlimited, the unpruned path). On the CPU the tiny checkpoint (`engine.tiny`) is used; with
``device='cuda'`` the full-size architecture (CLIP ViT-L/14-336 + Qwen2-7B dims) is built with
random weights and its language model quantised to 4-bit nf4 with bitsandbytes, so times and
memory are those of the real model (answers are meaningless). A prompt longer than
``max_prefill_tokens`` (default 32,768, the checkpoint's `tokenizer_model_max_length`) is not
prefilled and is marked: the unpruned 8K path (~83K tokens) does not fit the model at all.
"""

from __future__ import annotations

import csv
import gc
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from engine.benchmarks.memory import RssSampler

SIZES = (2048, 8192, 16384)
STRATEGIES = ("none", "uniform", "random", "background", "anchored", "geollava", "pyramid", "budget")
QUESTION = "How many boats are on the water?"
FIELDS = ["device", "model", "size", "tiles", "strategy", "budget", "visual_tokens", "candidates",
          "recall", "recall_sharp", "read_s", "vision_s", "select_s", "prefill_s", "ttft_s",
          "peak_mem_mb", "mem_delta_mb", "note"]


def tiny_model(device: str = "cpu"):
    """(model, tokenizer) of the cached tiny checkpoint."""
    from engine.loader import load_model
    from engine.tiny import build_tiny_checkpoint, tiny_key

    dest = Path(os.environ.get("GEOVQA_TEST_CACHE", ".cache")) / f"tiny-geollava-{tiny_key(0)}"
    if not (dest / "model.safetensors.index.json").is_file():
        build_tiny_checkpoint(dest, seed=0)
    loaded = load_model(dest, device=device, quantization="fp32")
    return loaded.model, loaded.tokenizer


def full_size_model(device: str = "cuda", lm: dict | None = None, vision: dict | None = None):
    """The full-size architecture with random weights, LM linears in 4-bit nf4 (meant for
    CUDA; `lm` / `vision` override the dimensions, e.g. for a quick check)."""
    import bitsandbytes as bnb

    from engine.devices import half_dtype
    from engine.modeling import (CLIP_VIT_L_14_336, QWEN2_7B_LM, LlavaQwenConfig,
                                 LlavaQwenForCausalLM)
    from engine.tiny import build_tokenizer, tiny_config_dict

    tok = build_tokenizer()
    cfg = tiny_config_dict(vision_config=dict(vision or CLIP_VIT_L_14_336),
                           **(lm or QWEN2_7B_LM))
    cfg.pop("model_type"), cfg.pop("architectures")
    cfg["eos_token_id"] = tok.convert_tokens_to_ids("<|im_end|>")
    cfg["pad_token_id"] = tok.convert_tokens_to_ids("<|endoftext|>")
    config = LlavaQwenConfig(**cfg)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    half = half_dtype(device)  # the engine's 16-bit dtype there: bf16, fp16 without native bf16
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(half)  # build in 16 bits directly: 15 GB, not 30 GB
    try:
        with torch.device(device):
            model = LlavaQwenForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(old_dtype)
    layers = model.model.layers
    for layer in layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, mod in list(parent.named_children()):
                if isinstance(mod, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                          compute_dtype=half, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(mod.weight.data.cpu(), requires_grad=False,
                                                 quant_type="nf4")
                    if mod.bias is not None:
                        q.bias = torch.nn.Parameter(mod.bias.data, requires_grad=False)
                    setattr(parent, name, q.to(device))
                    del mod
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return model, tok


def _prepare(model, path: str, batch_size: int):
    from engine.geometry import TokenGeometry
    from engine.raster import read_for_tiling
    from engine.tiling import make_tiles, plan_tiles
    from engine.vision import encode_tiles

    t0 = time.perf_counter()
    image = read_for_tiling(path)
    layout = plan_tiles(image.size, choose_from=image.window[2:])
    geometry = TokenGeometry.build(image, layout)
    tiles = make_tiles(image.pixels, layout)
    t1 = time.perf_counter()
    with torch.no_grad():
        feats = encode_tiles(model, tiles, batch_size=batch_size)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return geometry, feats, t1 - t0, time.perf_counter() - t1


def _one(model, tok, name, feats, geometry, objects, budget, device, max_prefill):
    from engine.generate import prefill_prefix
    from engine.pipeline import build_inputs
    from engine.selection import get_strategy
    from engine.synth import object_recall

    params = {"tokenizer": tok} if name in ("pyramid", "budget") else {}
    strat = get_strategy(name, **params)
    gc.collect()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated() if cuda else 0
    note = ""
    with RssSampler() as rss, torch.no_grad():
        t0 = time.perf_counter()
        sel = strat.select(feats, geometry, QUESTION, budget, model=model)
        if cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        prefill = float("nan")
        if max_prefill is None or sel.n_tokens <= max_prefill:
            embeds, _, _ = build_inputs(model, tok, QUESTION, sel)
            t2 = time.perf_counter()
            prefill_prefix(model, embeds)
            if cuda:
                torch.cuda.synchronize()
            prefill = time.perf_counter() - t2
        else:
            note = f"not prefilled: over the {max_prefill}-token context"
    peak = torch.cuda.max_memory_allocated() if cuda else rss.peak
    delta = peak - (start if cuda else rss.start)
    return sel, t1 - t0, prefill, (peak, delta), note, object_recall(sel, geometry, objects), \
        object_recall(sel, geometry, objects, max_token_patches=4)


def run(out_dir="docs/benchmarks", sizes=SIZES, device="cpu", strategies=STRATEGIES,
        scene_dir=None, max_prefill_tokens=32768, n_objects=8, seed=0, batch_size=16,
        stem=None, log=print) -> list[dict]:
    """Run the benchmark and write ``<stem>.md``, ``<stem>.csv`` and ``<stem>.png`` in
    `out_dir` (stem: 'strategies' on the CPU, 'strategies_gpu' on CUDA). ``device='cuda'``
    uses the full-size 4-bit architecture; 'cpu' the tiny model. Returns the table rows."""
    from engine.synth import make_scene

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or ("strategies" if torch.device(device).type == "cpu" else "strategies_gpu")
    scene_dir = Path(scene_dir or Path(os.environ.get("GEOVQA_TEST_CACHE", ".cache")) / "synth")
    cuda = torch.device(device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but no CUDA GPU is available.")
    model, tok = full_size_model(device) if cuda else tiny_model(device)
    model_name = "full-size random nf4" if cuda else "tiny random fp32"
    rows = []
    for size in sizes:
        path = scene_dir / f"synth_{size}_s{seed}_o{n_objects}.tif"
        scene = make_scene(path, size, objects=n_objects, seed=seed) if not path.is_file() else \
            _scene_boxes(path, size, n_objects, seed)
        geometry, feats, read_s, vision_s = _prepare(model, str(path), batch_size)
        t = feats.n_tiles
        log(f"{size}px: {t} tiles, read {read_s:.1f}s, vision {vision_s:.1f}s")
        for name in strategies:
            budget = None if name == "none" else t * 24
            sel, sel_s, pre_s, peak, note, rec, rec4 = _one(
                model, tok, name, feats, geometry, scene.objects, budget, device, max_prefill_tokens)
            row = dict(device=device, model=model_name, size=size, tiles=t, strategy=name,
                       budget=budget if budget is not None else "", visual_tokens=sel.n_tokens,
                       candidates=sel.candidates, recall=round(rec, 4), recall_sharp=round(rec4, 4),
                       read_s=round(read_s, 3), vision_s=round(vision_s, 3), select_s=round(sel_s, 3),
                       prefill_s=round(pre_s, 3) if pre_s == pre_s else "",
                       ttft_s=round(read_s + vision_s + sel_s + pre_s, 3) if pre_s == pre_s else "",
                       peak_mem_mb=round(peak[0] / 2**20, 1),
                       mem_delta_mb=round(peak[1] / 2**20, 1), note=note)
            rows.append(row)
            log(f"  {name:10s} tokens {sel.n_tokens:6d} recall {rec:.2f}/{rec4:.2f} "
                f"select {sel_s:.2f}s prefill {row['prefill_s']}s peak {row['peak_mem_mb']} MB")
        del feats
        gc.collect()
        write_outputs(rows, out_dir, stem, device)  # after every size: a cut-off run keeps its rows
    return rows


def _scene_boxes(path, size, n_objects, seed):
    """Object boxes of an existing scene file (same seed -> same boxes, no rewrite)."""
    from engine.synth import Scene, SceneObject, place_objects

    import rasterio

    with rasterio.open(path) as ds:
        transform, (w, h) = ds.transform, (ds.width, ds.height)
    objs = []
    for kind, (x0, y0, x1, y1) in place_objects(w, h, n_objects, seed):
        mx0, my1 = transform @ (x0, y0)
        mx1, my0 = transform @ (x1, y1)
        objs.append(SceneObject(kind, (x0, y0, x1, y1), (mx0, my0, mx1, my1)))
    return Scene(path=Path(path), size=(w, h), crs_epsg=32633, transform=transform, objects=objs)


def write_outputs(rows: list[dict], out_dir: Path, stem: str, device: str) -> None:
    out_dir = Path(out_dir)
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    cols = ["size", "tiles", "strategy", "budget", "visual_tokens", "recall", "recall_sharp",
            "select_s", "prefill_s", "ttft_s", "peak_mem_mb", "mem_delta_mb", "note"]
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# Token strategies on synthetic UHR scenes ({rows[0]['model'] if rows else ''}, {device})",
        "",
        f"Generated by `engine.benchmarks.strategies.run` on {now}; machine: {platform.machine()}, "
        f"{os.cpu_count()} CPUs visible, torch {torch.__version__}"
        + (f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() and device != "cpu" else "")
        + ".",
        "",
        "Scenes: `engine.synth.make_scene` squares with 8 small objects; question: "
        f"\"{QUESTION}\". Budget = tiles x 24 for every strategy but `none`. recall = share of "
        "object patches covered by kept tokens; recall_sharp counts only tokens of <= 4 patches. "
        "ttft_s = read + vision + select + prefill. mem_delta_mb = peak minus the memory in use "
        "when the strategy started (what the strategy and its prefill add). Peak memory: "
        + ("GPU max allocated during select + prefill." if device != "cpu" else
           "process RSS during select + prefill (includes model and features)."),
        "",
        "Reading the numbers: the weights are random, so the learned affinity head and the "
        "CLS / question scores carry no meaning here; recall shows the mechanics of each path "
        "(which patches its kept tokens stand for), not a trained model's judgement. Token counts, "
        "select / prefill times and memory are the real costs of each path. The tiling never "
        "exceeds 576 tiles, so a 16K scene is read decimated to the same ~8K canvas as an 8K one "
        "(same token counts, smaller objects per patch).",
        "",
        "| " + " | ".join(cols) + " |",
        "| " + " | ".join("---" for _ in cols) + " |",
    ]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    lines += ["", f"![plot]({stem}.png)", ""]
    (out_dir / f"{stem}.md").write_text("\n".join(lines))
    plot(rows, out_dir / f"{stem}.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def num(v):
        return float(v) if v not in ("", None) else None

    names = list(dict.fromkeys(r["strategy"] for r in rows))
    panels = (("visual_tokens", "visual tokens into the LM"),
              ("recall", "object recall (any kept token)"),
              ("recall_sharp", "object recall (tokens of <= 4 patches)"),
              ("ttft_s", "time to first token (s)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(19, 4.2))
    for name in names:
        rs = [r for r in rows if r["strategy"] == name]
        for ax, (key, _title) in zip(axes, panels):
            pts = [(num(r["size"]), num(r[key])) for r in rs if num(r[key]) is not None]
            if pts:
                ax.plot(*zip(*pts), "o-", label=name, alpha=0.85)
    for ax, (key, title) in zip(axes, panels):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("scene side (px)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if key.startswith("recall"):
            ax.set_ylim(-0.02, 1.02)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def rewrite_from_csv(out_dir="docs/benchmarks", stem: str = "strategies") -> None:
    """Re-render the Markdown table and the plot from an existing CSV (no re-run)."""
    out_dir = Path(out_dir)
    with open(out_dir / f"{stem}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    write_outputs(rows, out_dir, stem, rows[0]["device"] if rows else "cpu")


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/benchmarks")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    ap.add_argument("--max-prefill-tokens", type=int, default=32768)
    a = ap.parse_args(argv)
    run(a.out, sizes=a.sizes, device=a.device, strategies=a.strategies,
        max_prefill_tokens=a.max_prefill_tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
