"""The `geollava` strategy: Background Token Pruning + Anchored Token Selection exactly as the
released GeoLLaVA-8K checkpoint runs them (reference note, steps 1-7), the default strategy.

Per grid tile (the overview tile is already dropped by `VisionFeatures`):

1. affinity = the checkpoint's `reghead` (3 x 3 depthwise conv, 1 x 1 conv, softmax over 9);
2. clusters by argmax parents + pointer jumping (`clusters.py`: border clamping with added
   weights, ties to the lowest token index, at most 12 rounds), numbered by root index;
3. cluster centres = plain means of the raw CLIP layer -2 features;
4. score = (CLS q_proj) . (centre v_proj) / sqrt(D) with the raw Linear layers of that CLIP
   layer (`anchored.anchor_scores`);
5. keep the top `tokens_per_tile` (24) centres in spatial (root index) order, project them.

Choices we made where the checkpoint leaves room (documented, switchable):

* **Empty slots.** A tile with fewer clusters than `tokens_per_tile` yields zero vectors for the
  missing slots in the original. ``faithful_empty_slots=True`` reproduces this: the zero vectors
  go through the projector and are appended after the tile's real tokens, with role 'kept', no
  member patches (so no footprint) and the score a zero vector gets; they rank last under a
  global budget. The default (False) drops them: the LM sees fewer, all meaningful tokens.
* **Padding (and other invalid patches).** Padding patches (black canvas, no image) take part in
  the clustering as in the original, so the real clusters are unchanged. "Invalid" below means
  `geometry.patch_valid` is False: padding, and also patches at least half nodata or outside a
  polygon AOI. A kept cluster made only of invalid patches still enters the LM by default (as
  trained); ``drop_padding=True`` removes such clusters. Either way the heatmap and GeoJSON never
  draw invalid patches (`heatmap.py` paints valid members only and skips tokens without any);
  `info['padding_tokens']` counts the kept clusters without a valid patch.
* **Global budget.** With `budget` < tiles x tokens_per_tile the per-tile winners compete by
  score across the whole image; the best `budget` survive (ties to the earlier token) and keep
  their LM order (tile by tile, spatial inside a tile).

* **Precision.** Cluster sums and scores are computed in float32. The original runs them in the
  model's bf16, where scores near the 24th place can round to ties and keep a different cluster;
  see docs/verification.md for the measured agreement with the original code.

Roles: every kept centre won the CLS ranking -> 'anchor'; empty slots -> 'kept'.
`info` reports clusters per tile, pointer-jumping rounds and the padding counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.selection import clusters as C
from engine.selection.anchored import anchor_scores, top_k_spatial
from engine.selection.base import Selection, check_budget, register
from engine.protocol import DEFAULT_TOKENS_PER_TILE
from engine.selection.common import PATCHES, cap_global, project, unreduced_tokens, valid_tensor


@dataclass
class ClusterPick:
    """Tensor-level result of the selection (before the projector), in LM order."""

    vectors: torch.Tensor  # (M, D) raw cluster means (zeros for empty slots)
    members: list[np.ndarray]  # flat patch ids per token (empty for empty slots)
    scores: torch.Tensor  # (M,) anchor score
    rank_key: torch.Tensor  # (M,) score used for the global cap (-inf for empty slots)
    tiles: torch.Tensor  # (M,) tile of each token
    sizes: torch.Tensor  # (M,) patches per token
    clusters_per_tile: torch.Tensor  # (T,)
    rounds: int


def _members(labels: torch.Tensor, tile0: int, n: int, keys: list[tuple[int, int]]):
    """Flat patch ids of cluster (tile, label) for each key, from labels (t, N) of a chunk."""
    t = labels.shape[0]
    flat_key = (torch.arange(t)[:, None] * n + labels.cpu()).reshape(-1).numpy()
    order = np.argsort(flat_key, kind="stable")
    sorted_key = flat_key[order]
    out = []
    for tile, lab in keys:
        k = (tile - tile0) * n + lab
        lo, hi = np.searchsorted(sorted_key, [k, k + 1])
        pos = order[lo:hi]  # positions (tile_local * N + patch)
        out.append((pos + tile0 * n).astype(np.int64))
    return out


def pick_clusters(cls, patches, q_proj, v_proj, *, affinity, k=DEFAULT_TOKENS_PER_TILE,
                  faithful_empty_slots=False, valid=None, drop_padding=False, chunk=144,
                  max_rounds=C.MAX_JUMPS) -> ClusterPick:
    """Steps 3-6 on plain tensors. `affinity(patches_chunk) -> (t, N, 9)` is the reghead (or a
    hand-made affinity in tests). cls (T, D), patches (T, N, D), valid (T, N) bool or None."""
    t_all, n, d = patches.shape
    grid = int(round(n**0.5))
    vec, mem, sc, key, tiles, sizes, cpt = [], [], [], [], [], [], []
    rounds_max = 0
    with torch.no_grad():
        for s in range(0, t_all, chunk):
            x = patches[s : s + chunk]
            t = x.shape[0]
            aff = affinity(x).float()
            labels, counts, _roots, rounds = C.cluster(aff, grid, max_rounds)
            rounds_max = max(rounds_max, rounds)
            n_slots = int(counts.max())
            means, csize = C.cluster_means(x, labels.to(x.device), n_slots)
            score = anchor_scores(cls[s : s + t], means, q_proj, v_proj).cpu()
            slot = torch.arange(n_slots)[None, :]
            rank = score.masked_fill(slot >= counts.cpu()[:, None], float("-inf"))
            if drop_padding and valid is not None:
                vmean, _ = C.cluster_means(valid[s : s + t, :, None].float(), labels.cpu(), n_slots)
                rank = rank.masked_fill(vmean[..., 0] <= 0, float("-inf"))
            idx, top = top_k_spatial(rank, k)
            ok = torch.isfinite(top)
            ti, si = torch.nonzero(ok, as_tuple=True)
            lab = idx[ti, si]
            vec.append(means[ti.to(means.device), lab.to(means.device)])
            sc.append(score[ti, lab])
            key.append(top[ti, si])
            tiles.append(ti + s)
            sizes.append(csize.cpu()[ti, lab])
            mem.extend(_members(labels, s, n, list(zip((ti + s).tolist(), lab.tolist()))))
            cpt.append(counts.cpu())
            if faithful_empty_slots:
                # the released code caps MAX_TOKENS at the tile's N patches: never more slots than that
                n_empty = (min(k, n) - ok.sum(1)).clamp(min=0)
                if int(n_empty.sum()) > 0:
                    zero = anchor_scores(cls[s : s + t], x.new_zeros(t, 1, d), q_proj, v_proj)
                    et = torch.repeat_interleave(torch.arange(t), n_empty)
                    m = int(et.shape[0])
                    vec.append(x.new_zeros(m, d))
                    sc.append(zero[:, 0].cpu()[et])
                    key.append(torch.full((m,), float("-inf")))
                    tiles.append(et + s)
                    sizes.append(torch.zeros(m, dtype=torch.long))
                    mem.extend([np.zeros(0, dtype=np.int64)] * m)
    tiles_all = torch.cat(tiles)
    sizes_all = torch.cat(sizes)
    # LM order: tile by tile; inside a tile the real tokens (spatial order), then empty slots
    order = torch.sort(tiles_all * 2 + (sizes_all == 0).long(), stable=True).indices
    ol = order.tolist()
    return ClusterPick(
        vectors=torch.cat(vec)[order.to(vec[0].device)], members=[mem[i] for i in ol],
        scores=torch.cat(sc).float()[order], rank_key=torch.cat(key).float()[order],
        tiles=tiles_all[order], sizes=sizes_all[order],
        clusters_per_tile=torch.cat(cpt), rounds=rounds_max,
    )


def model_affinity(model):
    """The checkpoint's reghead as an affinity function (T, N, D) -> (T, N, 9)."""
    return lambda x: model.affinity(x)


@register("geollava")
class GeoLLaVAStrategy:
    """BTP + ATS as shipped: 24 cluster centres a tile (`tokens_per_tile`), see module doc."""

    name = "geollava"
    question_dependent = False

    def __init__(self, tokens_per_tile: int = DEFAULT_TOKENS_PER_TILE,
                 faithful_empty_slots: bool = False, drop_padding: bool = False,
                 chunk: int = 144, max_rounds: int = C.MAX_JUMPS, **_ignored) -> None:
        if int(tokens_per_tile) < 1:
            raise ValueError("tokens_per_tile must be at least 1")
        self.k = int(tokens_per_tile)
        self.faithful_empty_slots = bool(faithful_empty_slots)
        self.drop_padding = bool(drop_padding)
        self.chunk = int(chunk)
        self.max_rounds = int(max_rounds)

    def planned_tokens(self, n_tiles: int, budget: int | None, n_patches: int = PATCHES) -> int | None:
        """With `faithful_empty_slots` every tile sends min(tokens_per_tile, its patches) tokens
        (empty slots filled with zeros), so the count is known before the vision tower: that
        count, capped at `budget`. Without it a tile sends as many as it has clusters: None."""
        budget = check_budget(budget)
        if not self.faithful_empty_slots:
            return None
        total = int(n_tiles) * min(self.k, int(n_patches))
        return total if budget is None else min(total, budget)

    def select(self, features, geometry, question, budget, *, model, affinity=None,
               q_proj=None, v_proj=None) -> Selection:
        budget = check_budget(budget)
        if q_proj is None or v_proj is None:
            q_proj, v_proj = model.select_layer_qv()
        affinity = affinity or model_affinity(model)
        patches = features.patches
        t, n, _ = patches.shape
        valid = valid_tensor(geometry, patches)
        pick = pick_clusters(
            features.cls, patches, q_proj, v_proj, affinity=affinity, k=self.k,
            faithful_empty_slots=self.faithful_empty_slots, valid=valid,
            drop_padding=self.drop_padding, chunk=self.chunk, max_rounds=self.max_rounds,
        )
        keep = cap_global(pick.rank_key, budget)
        members = [pick.members[i] for i in keep.tolist()]
        vflat = valid.reshape(-1).numpy()
        padding_tokens = sum(1 for m in members if len(m) and not vflat[m].any())
        empty = sum(1 for m in members if len(m) == 0)
        embeds = project(model, pick.vectors[keep.to(pick.vectors.device)])
        return Selection(
            embeds=embeds,
            members=members,
            scores=pick.scores[keep].numpy().astype(np.float32),
            roles=["kept" if len(m) == 0 else "anchor" for m in members],
            candidates=unreduced_tokens(t, n),
            strategy=self.name,
            info={
                "tokens_per_tile": self.k,
                "tiles": t,
                "budget": budget,
                "clusters_total": int(pick.clusters_per_tile.sum()),
                "clusters_per_tile_mean": float(pick.clusters_per_tile.float().mean()),
                "pointer_jump_rounds": pick.rounds,
                "empty_slots": empty,
                "padding_tokens": padding_tokens,
                "faithful_empty_slots": self.faithful_empty_slots,
            },
        )
