"""`make bench`: every benchmark of the project, figures written into docs/benchmarks/.

* strategies — visual tokens into the LM, object-token recall, time to first token and peak
  memory per strategy on synthetic 2K / 8K / 16K scenes (tiny model on CPU; full-size 4-bit on a
  GPU when one is present);
* cache — first vs. second question on the same raster through the real server path;
* nan_read — what NaN in a float raster costs a reduced read (engine/raster_read.py mends the NaN
  GDAL's average spreads);
* qlora_gpu — a QLoRA step on the full-size architecture (only where CUDA is available);
* gpu_load — the full-size architecture loaded in nf4 and a generation (only with CUDA; on the
  CPU run `python -m engine.benchmarks.full_size --device cpu` by hand: ~20 GB RAM, ~10 min);
* cuda_semantics — CUDA arithmetic facts behind docs/verification.md D1 / D3 (only with CUDA).

Benchmarks are not tests: they measure, they do not assert. Run one with `--only NAME`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
BENCHMARKS = {
    "strategies": "engine.benchmarks.strategies",
    "cache": "engine.benchmarks.cache",
    "nan_read": "engine.benchmarks.nan_read",
    "qlora_gpu": "engine.benchmarks.finetune_gpu",
    "gpu_load": "engine.benchmarks.full_size",
    "cuda_semantics": "engine.benchmarks.cuda_semantics",
}
GPU_ONLY = {"qlora_gpu", "gpu_load", "cuda_semantics"}


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in args.only or list(BENCHMARKS):
        print(f"== benchmark {name}", flush=True)
        t0 = time.perf_counter()
        if name in GPU_ONLY and not _cuda():
            print(f"no CUDA GPU: {name} skipped (nothing recorded)", flush=True)
            continue
        try:
            module = importlib.import_module(BENCHMARKS[name])
            if name == "strategies" and _cuda():
                module.run(args.out)  # the tiny model on the CPU, then full-size nf4 on the GPU
                module.run(args.out, device="cuda")
            elif hasattr(module, "run"):
                module.run(args.out)
            else:  # command-line style benchmark (skips itself without CUDA)
                module.main(["--json", str(args.out / f"{name}.json")])
        except Exception:  # keep going: one broken benchmark must not hide the others
            traceback.print_exc()
            failed.append(name)
        print(f"== {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"figures in {args.out}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
