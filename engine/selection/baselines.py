"""Query-free baselines: `uniform` (downsample every tile to fit the budget) and `random`.

`uniform`: every tile's 24 x 24 patch grid is average-pooled to g x g non-overlapping cells
(cell of patch (i, j) = (i * g // 24, j * g // 24)), with the largest g <= 24 such that
tiles x g**2 <= budget; no budget means g = 12 (the 2 x 2 pooling of the unreduced path). When
the budget is below the number of tiles, each tile becomes one mean and `budget` evenly spaced
tiles are kept. Cells made only of padding are dropped. Score 1 for every token; role 'merged'
for pooled cells, 'kept' when g = 24 (single patches).

`random`: `budget` valid patches drawn uniformly without replacement with a seeded
`torch.Generator` (default budget: 24 a tile, the geollava count), kept in spatial order; the
score is the draw's priority in (0, 1], role 'kept'. The same seed gives the same tokens.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from engine.selection import clusters as C
from engine.selection.base import Selection, check_budget, register
from engine.selection.common import (
    members_from_ids,
    project,
    role_for,
    unreduced_tokens,
    valid_tensor,
)


def pool_labels(grid: int, g: int) -> torch.Tensor:
    """(grid**2,) cell label of every patch for a g x g non-overlapping pooling."""
    r = torch.arange(grid).repeat_interleave(grid) * g // grid
    c = torch.arange(grid).repeat(grid) * g // grid
    return r * g + c


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
            g = (grid + 1) // 2
        else:
            g = min(grid, int(math.isqrt(budget // t))) if budget >= t else 1
        labels = pool_labels(grid, g)[None].expand(t, n).contiguous()
        means, _ = C.cluster_means(patches, labels.to(patches.device), g * g)
        vsum, _ = C.cluster_means(valid[..., None].float(), labels, g * g)
        ok = vsum[..., 0] > 0  # (t, g*g)
        ti, ci = torch.nonzero(ok, as_tuple=True)
        if budget is not None and len(ti) > budget:
            pick = torch.from_numpy(np.unique(np.linspace(0, len(ti) - 1, budget).round().astype(np.int64)))
            ti, ci = ti[pick], ci[pick]
        lab_np = labels[0].numpy()
        cell_members = [np.nonzero(lab_np == c)[0] for c in range(g * g)]
        members = [cell_members[c] + tt * n for tt, c in zip(ti.tolist(), ci.tolist())]
        return Selection(
            embeds=project(model, means[ti.to(means.device), ci.to(means.device)]),
            members=[m.astype(np.int64) for m in members],
            scores=np.ones(len(members), dtype=np.float32),
            roles=[role_for(len(m), False) for m in members],
            candidates=unreduced_tokens(t, n),
            strategy=self.name,
            info={"pool": g, "budget": budget, "tiles": t},
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
