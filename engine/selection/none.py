"""``none``: the unreduced LongVA path (no pruning), for comparison.

What LongVA's ``unires`` branch does with an anyres image: every tile (the overview is dropped)
goes through the vision tower and the projector, then each tile's 24 x 24 grid of PROJECTED
features is average-pooled 2 x 2 (stride 2) to 12 x 12 = 144 tokens; tiles follow row-major tile
order and tokens row-major order inside a tile. We project and pool a chunk of tiles at a time
(pooling commutes with chunking), so memory stays bounded. Every token stands for its 4 patches.

Padding-only pooled tokens are kept, as the original does (faithful); the heatmap layer already
knows which patches are padding. A budget below T * 144 is refused: this strategy never reduces.
The count depends on the number of tiles alone, so `planned_tokens` gives it (and the refusal)
from the tiling plan, before the vision tower runs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from engine.selection.base import Selection, SelectionError, check_budget, register
from engine.selection.common import PATCHES

POOL = 2


@register("none")
class NoneStrategy:
    name = "none"
    question_dependent = False

    def __init__(self, chunk_tiles: int = 16) -> None:
        self.chunk_tiles = max(int(chunk_tiles), 1)

    def planned_tokens(self, n_tiles: int, budget: int | None, n_patches: int = PATCHES) -> int:
        """The tokens `select` will send for `n_tiles` tiles (known before the vision tower);
        raises the SelectionError `select` would raise for a budget it cannot fit."""
        return _checked_total(n_tiles, n_patches, check_budget(budget))[0]

    def select(self, features, geometry, question, budget, *, model) -> Selection:
        budget = check_budget(budget)
        patches = features.patches
        t, n, _d = patches.shape
        total, g = _checked_total(t, n, budget)
        h = g // POOL
        per_tile = h * h
        out = []
        for s in range(0, t, self.chunk_tiles):
            x = model.project(patches[s : s + self.chunk_tiles])  # (c, n, H)
            c, _, hd = x.shape
            x = x.reshape(c, g, g, hd).permute(0, 3, 1, 2)
            x = F.avg_pool2d(x, POOL)  # (c, H, h, h)
            out.append(x.flatten(2).transpose(1, 2).reshape(c * per_tile, hd))
        embeds = torch.cat(out, 0)
        return Selection(
            embeds=embeds,
            members=pooled_members(t, g, POOL),
            scores=np.ones(total, dtype=np.float32),
            roles=["kept"] * total,
            candidates=total,
            strategy=self.name,
            info={"tokens_per_tile": per_tile, "pool": POOL},
        )


def _checked_total(n_tiles: int, n_patches: int, budget: int | None) -> tuple[int, int]:
    """(tokens for `n_tiles` tiles, patch grid side); SelectionError when they exceed `budget`."""
    g = int(round(n_patches**0.5))
    if g * g != n_patches or g % POOL:
        raise SelectionError(f"{n_patches} patches a tile do not form an even square grid")
    per_tile = (g // POOL) ** 2
    total = int(n_tiles) * per_tile
    if budget is not None and budget < total:
        raise SelectionError(
            f"strategy 'none' keeps all {total} tokens ({n_tiles} tiles x {per_tile}) and cannot fit "
            f"a budget of {budget}; use 'uniform' or 'geollava' to reduce the tokens"
        )
    return total, g


def pooled_members(n_tiles: int, grid: int, pool: int = POOL) -> list[np.ndarray]:
    """Flat patch ids (tile * grid**2 + row * grid + col) of each pooled token, in token order."""
    h = grid // pool
    rows = np.arange(h)[:, None, None, None] * pool + np.arange(pool)[None, None, :, None]
    cols = np.arange(h)[None, :, None, None] * pool + np.arange(pool)[None, None, None, :]
    local = (rows * grid + cols).reshape(h * h, pool * pool)  # (h*h, pool*pool)
    members = []
    for t in range(n_tiles):
        base = t * grid * grid
        members.extend((local + base).astype(np.int64))
    return members
