"""The `background` strategy: GeoLLaVA-8K Background Token Pruning alone.

Runs the checkpoint's learned affinity head and the same clustering as `geollava`
(`clusters.py`: argmax parents, border clamping, ties to the lowest index, <= 12 pointer-jumping
rounds) and emits **every** cluster mean of every tile (no anchored top-k): connected similar
patches (water, forest) collapse into a few means while small distinct objects stay as their own
small clusters. Clusters without a valid patch (padding, nodata, outside the AOI) are dropped
(``drop_padding=True``).

Under a budget smaller than the number of clusters we keep the best clusters by `rank`:

* ``'size'`` (default): the largest clusters first (score = patches in the cluster / 576), so a
  tight budget still covers most of the image area with coarse means;
* ``'small'``: the smallest clusters first (score = 1 / patches), favouring small distinct
  objects over background;
* ``'score'``: the CLS-anchored score of `anchored.anchor_scores` (ties to the earlier token).

Kept tokens stay in LM order (tile by tile, root-index order inside a tile). Roles: a cluster of
two or more patches is 'merged', a single patch 'kept'; with ``rank='score'`` every token won a
CLS ranking and is an 'anchor'.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.selection import clusters as C
from engine.selection.anchored import anchor_scores
from engine.selection.base import Selection, check_budget, register
from engine.selection.common import cap_global, project, role_for, unreduced_tokens, valid_tensor
from engine.selection.geollava import _members, model_affinity

RANKS = ("size", "small", "score")


@register("background")
class BackgroundStrategy:
    """Every cluster mean (BTP only), capped by the budget via `rank`."""

    name = "background"
    question_dependent = False

    def __init__(self, rank: str = "size", drop_padding: bool = True, chunk: int = 144,
                 max_rounds: int = C.MAX_JUMPS, **_ignored) -> None:
        if rank not in RANKS:
            raise ValueError(f"rank must be one of {RANKS}, not {rank!r}")
        self.rank = rank
        self.drop_padding = bool(drop_padding)
        self.chunk = int(chunk)
        self.max_rounds = int(max_rounds)

    def select(self, features, geometry, question, budget, *, model, affinity=None,
               q_proj=None, v_proj=None) -> Selection:
        budget = check_budget(budget)
        affinity = affinity or model_affinity(model)
        if self.rank == "score" and (q_proj is None or v_proj is None):
            q_proj, v_proj = model.select_layer_qv()
        patches = features.patches
        t_all, n, _ = patches.shape
        grid = int(round(n**0.5))
        valid = valid_tensor(geometry, patches)
        vec, mem, scores, sizes = [], [], [], []
        n_clusters = 0
        with torch.no_grad():
            for s in range(0, t_all, self.chunk):
                x = patches[s : s + self.chunk]
                t = x.shape[0]
                labels, counts, _r, _ = C.cluster(affinity(x).float(), grid, self.max_rounds)
                n_clusters += int(counts.sum())
                slots = int(counts.max())
                means, csize = C.cluster_means(x, labels.to(x.device), slots)
                csize = csize.cpu()
                ok = torch.arange(slots)[None, :] < counts.cpu()[:, None]
                if self.drop_padding:
                    vsum, _ = C.cluster_means(valid[s : s + t, :, None].float(), labels.cpu(), slots)
                    ok &= vsum[..., 0] > 0
                ti, li = torch.nonzero(ok, as_tuple=True)
                if self.rank == "score":
                    sc = anchor_scores(features.cls[s : s + t], means, q_proj, v_proj).cpu()[ti, li]
                elif self.rank == "size":
                    sc = csize[ti, li].float() / n
                else:
                    sc = 1.0 / csize[ti, li].float()
                vec.append(means[ti.to(means.device), li.to(means.device)])
                scores.append(sc.float())
                sizes.append(csize[ti, li])
                mem.extend(_members(labels, s, n, list(zip((ti + s).tolist(), li.tolist()))))
        scores_t = torch.cat(scores)
        keep = cap_global(scores_t, budget)
        kl = keep.tolist()
        members = [mem[i] for i in kl]
        ranked = self.rank == "score"
        return Selection(
            embeds=project(model, torch.cat(vec)[keep.to(vec[0].device)]),
            members=members,
            scores=scores_t[keep].numpy().astype(np.float32),
            roles=[role_for(len(m), ranked) for m in members],
            candidates=unreduced_tokens(t_all, n),
            strategy=self.name,
            info={"clusters_total": n_clusters, "rank": self.rank, "budget": budget,
                  "tiles": t_all},
        )
