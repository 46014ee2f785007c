"""``none``: the unreduced LongVA path (no pruning), for comparison.

What LongVA's ``unires`` branch does with an anyres image: every tile (the overview is dropped)
goes through the vision tower and the projector, then each tile's 24 x 24 grid of PROJECTED
features is average-pooled 2 x 2 (stride 2) to 12 x 12 = 144 tokens; tiles follow row-major tile
order and tokens row-major order inside a tile. We project and pool a chunk of tiles at a time
(pooling commutes with chunking), so memory stays bounded. Every token stands for its 4 patches.

Padding-only pooled tokens are kept, as the original does (faithful); the heatmap layer already
knows which patches are padding. A budget below T * 144 is refused: this strategy never reduces.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from engine.selection.base import Selection, SelectionError, check_budget, register

POOL = 2


@register("none")
class NoneStrategy:
    name = "none"
    question_dependent = False

    def __init__(self, chunk_tiles: int = 16) -> None:
        self.chunk_tiles = max(int(chunk_tiles), 1)

    def select(self, features, geometry, question, budget, *, model) -> Selection:
        budget = check_budget(budget)
        patches = features.patches
        t, n, _d = patches.shape
        g = int(round(n**0.5))
        if g * g != n or g % POOL:
            raise SelectionError(f"{n} patches a tile do not form an even square grid")
        h = g // POOL
        per_tile = h * h
        total = t * per_tile
        if budget is not None and budget < total:
            raise SelectionError(
                f"strategy 'none' keeps all {total} tokens ({t} tiles x {per_tile}) and cannot fit "
                f"a budget of {budget}; use 'uniform' or 'geollava' to reduce the tokens"
            )
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
