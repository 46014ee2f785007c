"""GeoLLaVA-8K Anchored Token Selection (ATS), and the `anchored` strategy.

Scoring (step 6 of the released checkpoint): the tile's CLS token of the selected CLIP layer is
passed through that layer's raw attention ``q_proj`` (a Linear with bias; no layer norm, no head
split), every candidate vector through the same layer's ``v_proj``, and the score is their dot
product divided by sqrt(D). The kept vectors themselves stay the raw (unprojected) features.

The `anchored` strategy applies this scoring to the raw patches of every tile, without the
background clustering: it keeps the top `tokens_per_tile` (default 24) valid patches of each tile
(ties to the lower patch index), in spatial order (token index), then the globally best-scoring
ones when `budget` is smaller than tiles x tokens_per_tile. Invalid patches (padding, at least half
nodata, outside the AOI) are never candidates (``drop_padding=True``). Every kept token is an 'anchor' (it won the CLS ranking).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from engine.selection.base import Selection, check_budget, register
from engine.selection.common import (
    cap_global,
    members_from_ids,
    project,
    unreduced_tokens,
    valid_tensor,
)

NEG = float("-inf")


def anchor_scores(cls: torch.Tensor, vectors: torch.Tensor, q_proj, v_proj) -> torch.Tensor:
    """cls (T, D), vectors (T, K, D) -> scores (T, K) = (cls q_proj) . (v v_proj) / sqrt(D)."""
    w = q_proj.weight
    q = q_proj(cls.to(device=w.device, dtype=w.dtype)).float()  # (T, D)
    v = v_proj(vectors.to(device=w.device, dtype=w.dtype)).float()  # (T, K, D)
    d = vectors.shape[-1]
    return torch.einsum("tkd,td->tk", v, q) / math.sqrt(d)


def top_k_spatial(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the indices of the k best scores (ties to the lower index), re-sorted into index
    (spatial) order. Returns (indices (T, k), their scores (T, k)); -inf scores mark slots that
    had no candidate."""
    k = min(int(k), scores.shape[1])
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    order = torch.sort(order, dim=1).values
    return order, scores.gather(1, order)


@register("anchored")
class AnchoredStrategy:
    """ATS on raw patches: top `tokens_per_tile` patches of each tile by the CLS-anchored score."""

    name = "anchored"
    question_dependent = False

    def __init__(self, tokens_per_tile: int = 24, drop_padding: bool = True, chunk: int = 64,
                 **_ignored) -> None:
        if int(tokens_per_tile) < 1:
            raise ValueError("tokens_per_tile must be at least 1")
        self.k = int(tokens_per_tile)
        self.drop_padding = bool(drop_padding)
        self.chunk = int(chunk)

    def select(self, features, geometry, question, budget, *, model, q_proj=None, v_proj=None):
        budget = check_budget(budget)
        if q_proj is None or v_proj is None:
            q_proj, v_proj = model.select_layer_qv()
        patches, cls = features.patches, features.cls
        t, n, _ = patches.shape
        valid = valid_tensor(geometry, patches)
        ids_all, sc_all = [], []
        with torch.no_grad():
            for s in range(0, t, self.chunk):
                sc = anchor_scores(cls[s : s + self.chunk], patches[s : s + self.chunk], q_proj, v_proj)
                if self.drop_padding:
                    sc = sc.masked_fill(~valid[s : s + self.chunk].to(sc.device), NEG)
                idx, top = top_k_spatial(sc.cpu(), self.k)
                flat = idx + (torch.arange(s, s + idx.shape[0])[:, None] * n)
                ids_all.append(flat.reshape(-1))
                sc_all.append(top.reshape(-1))
        ids = torch.cat(ids_all)
        scores = torch.cat(sc_all)
        ok = torch.isfinite(scores)
        ids, scores = ids[ok], scores[ok]
        keep = cap_global(scores, budget)
        ids, scores = ids[keep], scores[keep]
        vec = patches.reshape(t * n, -1)[ids.to(patches.device)]
        embeds = project(model, vec)
        return Selection(
            embeds=embeds,
            members=members_from_ids(ids.numpy()),
            scores=scores.numpy().astype(np.float32),
            roles=["anchor"] * len(ids),
            candidates=unreduced_tokens(t, n),
            strategy=self.name,
            info={"tokens_per_tile": self.k, "tiles": t, "budget": budget},
        )
