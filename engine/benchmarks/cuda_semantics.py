"""Two facts of CUDA arithmetic that decide how exactly `geollava` can match the released code.

    python -m engine.benchmarks.cuda_semantics [--json docs/benchmarks/cuda_semantics.json]

docs/verification.md lists two follow-ups that only a GPU can answer; this records both, on the CPU
and on CUDA side by side (without CUDA it records the CPU side only and says so):

* **D3, bf16 `scatter_add_` counts.** The original counts cluster members with a bf16
  `scatter_add_`. bf16 holds integers exactly only up to 256, so if every atomic add rounds, a
  cluster of 576 patches is counted as 256 and its centre becomes `sum / 256`, not the mean.
* **D1, `topk` order of tied `-inf` slots.** The original keeps `topk(24)` of 576 root-indexed
  scores where non-roots are `-inf`; in tiles with fewer than 24 clusters the indices chosen among
  the `-inf` slots decide where its zero vectors sit. We record which indices come back for roots
  at 0, 5 and 575, and whether they are the lowest free indices.

Not a test: it measures what the hardware does and writes it down.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOTS = (0, 5, 575)  # the example of docs/verification.md D1
N_PATCHES, K = 576, 24


def scatter_add_count(device: str, n: int = N_PATCHES) -> float:
    """Count `n` ones into one bf16 slot with scatter_add_, as the original counts cluster sizes."""
    idx = torch.zeros(1, n, dtype=torch.long, device=device)
    ones = torch.ones(1, n, dtype=torch.bfloat16, device=device)
    out = torch.zeros(1, n, dtype=torch.bfloat16, device=device).scatter_add_(1, idx, ones)
    return float(out[0, 0])


def topk_empty_slots(device: str, roots=ROOTS, k: int = K) -> dict:
    """Which `-inf` indices topk(k) returns after the finite roots, and in which order."""
    scores = torch.full((1, N_PATCHES), float("-inf"), device=device)
    for r in roots:
        scores[0, r] = 1.0 + r / N_PATCHES
    idx = torch.topk(scores, k, dim=1).indices[0].sort().values.tolist()
    empty = [i for i in idx if i not in roots]
    lowest = [i for i in range(N_PATCHES) if i not in roots][: len(empty)]
    return {"indices_sorted": idx, "empty_slot_indices": empty,
            "lowest_free_indices": empty == lowest}


def record(devices: list[str]) -> dict:
    out = {}
    for dev in devices:
        count = scatter_add_count(dev)
        out[dev] = {
            "bf16_scatter_add_count_of_576": count,
            "bf16_counts_cap_at_256": count < N_PATCHES,
            "topk_tied_neg_inf": topk_empty_slots(dev),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path("docs/benchmarks/cuda_semantics.json"))
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    rec = {"torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(0) if cuda else None,
           "results": record(["cpu", "cuda"] if cuda else ["cpu"])}
    text = json.dumps(rec, indent=2) + "\n"
    print(text)
    if not cuda:
        print("No CUDA GPU: only the CPU side was measured; nothing recorded.")
        return 0
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], args.json.name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
