"""Query-free baselines: `uniform` (downsample every tile to fit the budget) and `random`.

`uniform`: every tile's 24 x 24 patch grid is average-pooled to gr x gc non-overlapping cells
(cell of patch (i, j) = (i * gr // 24, j * gc // 24)) with k = budget // tiles cells a tile,
gr = floor(sqrt(k)) rows and gc = min(24, k // gr) columns (k = 24 gives 4 x 6); no budget means
12 x 12 (the 2 x 2 pooling of the unreduced path). When
the budget is below the number of tiles, each tile becomes one mean and `budget` evenly spaced
tiles are kept. A cell is the mean of its valid patches only and its members are those patches
(nodata, outside the AOI and padding add nothing, so the fill value never reaches the LM and the
heatmap / anchors footprint is what the token stands for); a cell without valid patches is
dropped. Score 1 for every token; role 'merged' for pooled cells, 'kept' for single patches.

`random`: `budget` valid patches drawn uniformly without replacement with a seeded
`torch.Generator` (default budget: 24 a tile, the geollava count), kept in spatial order; the
score is the draw's priority in [0, 1), role 'kept'. The same seed gives the same tokens.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from engine.selection.base import Selection, check_budget, register
from engine.selection.common import (
    masked_cell_means,
    members_from_ids,
    project,
    role_for,
    unreduced_tokens,
    valid_tensor,
)


def pool_labels(grid: int, g: int, gc: int | None = None) -> torch.Tensor:
    """(grid**2,) cell label of every patch for a g x gc (default g x g) non-overlapping
    pooling; labels are row-major over the cells."""
    gc = g if gc is None else gc
    r = torch.arange(grid).repeat_interleave(grid) * g // grid
    c = torch.arange(grid).repeat(grid) * gc // grid
    return r * gc + c


@register("uniform")
class UniformStrategy:
    name = "uniform"
    question_dependent = False

    def __init__(self, **_ignored) -> None:
        pass

    def select(self, features, geometry, question, budget, *, model) -> Selection:
        budget = check_budget(budget)
        patches = features.patches
        t, n, d = patches.shape
        grid = int(round(n**0.5))
        valid = valid_tensor(geometry, patches)
        if budget is None:
            gr = gc = (grid + 1) // 2
        elif budget >= t:
            k = min(budget // t, grid * grid)
            gr = min(grid, math.isqrt(k))
            gc = min(grid, k // gr)
        else:
            gr = gc = 1
        cells = gr * gc
        labels = pool_labels(grid, gr, gc)[None].expand(t, n).contiguous()
        means, vcount = masked_cell_means(patches, labels, valid, cells)
        ok = vcount > 0  # (t, cells)
        ti, ci = torch.nonzero(ok, as_tuple=True)
        if budget is not None and len(ti) > budget:
            pick = torch.from_numpy(np.unique(np.linspace(0, len(ti) - 1, budget).round().astype(np.int64)))
            ti, ci = ti[pick], ci[pick]
        lab_np = labels[0].numpy()
        cell_members = [np.nonzero(lab_np == c)[0] for c in range(cells)]
        vnp = valid.numpy()
        members = [cell_members[c][vnp[tt, cell_members[c]]] + tt * n
                   for tt, c in zip(ti.tolist(), ci.tolist())]
        return Selection(
            embeds=project(model, means[ti.to(means.device), ci.to(means.device)]),
            members=[m.astype(np.int64) for m in members],
            scores=np.ones(len(members), dtype=np.float32),
            roles=[role_for(len(m), False) for m in members],
            candidates=unreduced_tokens(t, n),
            strategy=self.name,
            info={"pool": [gr, gc], "budget": budget, "tiles": t},
        )


@register("random")
class RandomStrategy:
    name = "random"
    question_dependent = False

    def __init__(self, seed: int | None = 0, tokens_per_tile: int = 24, **_ignored) -> None:
        self.seed = 0 if seed is None else int(seed)
        self.k = int(tokens_per_tile)

    def select(self, features, geometry, question, budget, *, model) -> Selection:
        budget = check_budget(budget)
        patches = features.patches
        t, n, d = patches.shape
        valid = valid_tensor(geometry, patches).reshape(-1)
        cand = torch.nonzero(valid, as_tuple=True)[0]
        want = t * self.k if budget is None else budget
        gen = torch.Generator().manual_seed(self.seed)
        prio = torch.rand(len(cand), generator=gen)
        order = torch.sort(prio, descending=True, stable=True).indices[: min(want, len(cand))]
        order = torch.sort(order).values
        ids = cand[order]
        return Selection(
            embeds=project(model, patches.reshape(t * n, d)[ids.to(patches.device)]),
            members=members_from_ids(ids.numpy()),
            scores=prio[order].numpy().astype(np.float32),
            roles=["kept"] * len(ids),
            candidates=unreduced_tokens(t, n),
            strategy=self.name,
            info={"seed": self.seed, "budget": budget, "tiles": t},
        )
