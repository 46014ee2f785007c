"""The `budget` strategy: budget-aware token selection after UHR-BAT, never above the budget.

The idea (UHR-BAT, in our words): decide how important every part of the image is for the
question at several scales, split a fixed token budget over regions by that importance, and
inside each region keep the most important tokens as they are while compressing the rest into a
few merged tokens, so that context survives at low cost.

1. **Multi-scale text-guided importance.** For each scale s in ``scales=(1, 2, 4)`` (patches per
   cell side inside a tile), cells are average-pooled over their valid patches only (nodata,
   outside the AOI and padding add nothing, so the raster's fill there cannot change which valid
   patches are kept), projected and scored with the question (`textscore.TextScorer`, softmax
   over all cells of that scale); each valid patch receives its cell's share divided by the
   cell's valid patches. A patch's importance is the mean over scales.
2. **Region budget.** Regions are tiles. Region r gets ``floor(B * w_r / sum w)`` tokens with
   w_r its summed importance, the remainder going to the largest fractional parts; a region
   never gets more tokens than it has valid patches (the excess is redistributed).
3. **Cluster.** The region's valid patches are grouped by a small deterministic k-means
   (`kmeans`) into ``b_r - keep_r`` clusters (at least 1), with ``keep_r = round(preserve_ratio
   * b_r)`` (default 0.5, at least 1; at most ``b_r - 1`` where the region has more valid
   patches than ``b_r``, so that one token at least merges the rest: a region given one token
   is the mean of its patches), on L2-normalised features concatenated with
   ``spatial_weight`` (lambda, default 0.05, released UHR-BAT's ``kmeans_coord_scale``) times
   the patch's (row, col) / 23 inside the tile (0 to 1, their (x, y) / (ts - 1));
   ``kmeans_iters`` (default 10) Lloyd steps; initial centres drawn with a seeded
   `torch.Generator`; empty clusters are dropped.
4. **Preserve (UHR-BAT's rule).** A patch stays unmerged only when its importance is strictly
   above its cluster's mean (by more than float rounding, relative ``TIE_TOL``); of those, the
   ``keep_r`` most important (ties to the lower index) are kept unchanged (role 'anchor': they
   won the question's ranking). A region the question scores alike has none, so its tokens are
   all merged: no patch is promoted for its index.
5. **Merge.** What is left of each cluster becomes one token, the plain mean of its raw
   features (role 'merged', or 'kept' for a single patch); its score is the mean importance.
   Where fewer than ``keep_r`` patches stood above their cluster's mean (p_r of them), the unused
   slots go to merging: the region's unpreserved patches are clustered again, the same way, into
   ``b_r - p_r`` clusters, so every valid patch of a region with a budget is in a token.

Default budget without one: 24 tokens a tile. LM order: tile by tile, then by each token's first
patch in raster order. The total never exceeds the budget (at most p_r + (b_r - p_r) = b_r
tokens per region).

**Where this departs from the released UHR-BAT code** (Yunkaidang/UHR-BAT,
``with_k-means/longva/longva/model/llava_arch.py``, ``select_tokens_with_masks``), plainly: it
is after UHR-BAT, not a port.

* Scales: UHR-BAT encodes the image again at several input sizes and spreads the budget over
  the scales, a top-k for each; ours pools the same CLIP features at 1, 2 and 4 patches a cell,
  averages the three into one importance per patch, and its tokens are single patches and
  means of patches at full resolution (no token of a coarser scale reaches the LM).
* Budget: UHR-BAT clusters a scale's tokens into as many clusters as its top-k, visits clusters
  by mean attention and stops when the budget is spent, so the clusters it does not reach send
  nothing; ours splits the budget over tiles by importance, caps the preserved patches at
  ``round(preserve_ratio * b_r)`` and gives every valid patch of a tile with a budget a token
  (unused preserve slots become more merge clusters).
* The preserve rule is theirs (strictly above the cluster mean, up to float rounding), and so
  is the k-means weighting (L2-normalised features, 0.05 on the position scaled 0 to 1). Their
  k-means runs on projected tokens plus a per-scale position residual, ours on the raw CLIP
  features; their selected tokens then pass a trained multi-scale MLP, ours go through the
  checkpoint's projector only.
* Scoring: UHR-BAT ranks with contextualised states (the last text token's query, after LM
  layers); ours uses the first decoder layer over the question's own tokens, a cheaper proxy
  (see `textscore`).
"""

from __future__ import annotations

import numpy as np
import torch

from engine.selection.base import Selection, check_budget, register
from engine.selection.baselines import pool_labels
from engine.selection.common import masked_cell_means, project, role_for, unreduced_tokens, valid_tensor
from engine.selection.textscore import make_scorer, score_vectors

DEFAULT_SCALES = (1, 2, 4)
# "strictly above the cluster's mean" ignores differences of float rounding (relative), so that
# patches the question scores alike never pass as more important than their neighbours
TIE_TOL = 1e-5
# k-means weight of the patch position, released UHR-BAT's kmeans_coord_scale (its features,
# L2-normalised, weigh 1.0): position only breaks near-ties between similar features
SPATIAL_WEIGHT = 0.05


def allocate(weights: np.ndarray, capacity: np.ndarray, total: int) -> np.ndarray:
    """Split `total` integer tokens proportionally to `weights`, never above `capacity`
    (largest remainder; excess redistributed to regions with room)."""
    weights = np.asarray(weights, dtype=np.float64).clip(min=0)
    capacity = np.asarray(capacity, dtype=np.int64)
    out = np.zeros_like(capacity)
    left = min(int(total), int(capacity.sum()))
    for _ in range(len(weights) + 1):
        room = capacity - out
        active = room > 0
        if left <= 0 or not active.any():
            break
        w = np.where(active, weights, 0.0)
        if w.sum() <= 0:
            w = active.astype(np.float64)
        share = left * w / w.sum()
        base = np.minimum(np.floor(share).astype(np.int64), room)
        rem = left - int(base.sum())
        frac = np.where(room - base > 0, share - np.floor(share), -1.0)
        order = np.argsort(-frac, kind="stable")
        extra = np.zeros_like(base)
        for i in order[:rem]:
            if frac[i] >= 0:
                extra[i] = 1
        add = base + extra
        out += add
        left -= int(add.sum())
    return out


def kmeans(x: torch.Tensor, mask: torch.Tensor, k: torch.Tensor, iters: int = 10,
           seed: int = 0) -> torch.Tensor:
    """Batched deterministic k-means. x (R, n, F) points, mask (R, n) real points, k (R,) clusters
    per batch row (<= real points). Returns assignments (R, n) in 0..k_r-1 (-1 for masked)."""
    r, n, f = x.shape
    kmax = int(k.max()) if r else 0
    if kmax == 0:
        return torch.full((r, n), -1, dtype=torch.long)
    gen = torch.Generator().manual_seed(int(seed))
    prio = torch.rand(r, n, generator=gen).masked_fill(~mask, 2.0)
    init = torch.sort(prio, dim=1, stable=True).indices[:, :kmax]  # random real points first
    cent = x.gather(1, init[..., None].expand(r, kmax, f)).clone()
    cmask = torch.arange(kmax)[None, :] < k[:, None]  # (R, kmax) centres in use
    assign = torch.zeros(r, n, dtype=torch.long)
    for _ in range(max(1, int(iters))):
        d2 = (x * x).sum(-1, keepdim=True) - 2 * x @ cent.transpose(1, 2) + (cent * cent).sum(-1)[:, None, :]
        d2 = d2.masked_fill(~cmask[:, None, :], float("inf"))
        new = d2.argmin(-1)
        oh = torch.zeros(r, n, kmax).scatter_(2, new[..., None], 1.0) * mask[..., None]
        cnt = oh.sum(1)
        sums = oh.transpose(1, 2) @ x
        cent = torch.where(cnt[..., None] > 0, sums / cnt.clamp(min=1)[..., None], cent)
        if torch.equal(new, assign):
            break
        assign = new
    return assign.masked_fill(~mask, -1)


@register("budget")
class BudgetStrategy:
    name = "budget"
    question_dependent = True

    def __init__(self, scales=DEFAULT_SCALES, preserve_ratio: float = 0.5,
                 spatial_weight: float = SPATIAL_WEIGHT, kmeans_iters: int = 10, seed: int | None = 0,
                 tokens_per_tile: int = 24, tokenizer=None, last_n: int | None = None, scorer=None,
                 **_ignored) -> None:
        if not 0 <= float(preserve_ratio) <= 1:
            raise ValueError("preserve_ratio must be between 0 and 1")
        self.scales = tuple(int(s) for s in scales)
        self.preserve_ratio = float(preserve_ratio)
        self.spatial_weight = float(spatial_weight)
        self.iters = int(kmeans_iters)
        self.seed = 0 if seed is None else int(seed)
        self.k, self.tokenizer, self.last_n, self.scorer = int(tokens_per_tile), tokenizer, last_n, scorer

    def _cluster(self, patches, mask, k, grid) -> torch.Tensor:
        """k-means labels (T, N) of the `mask` patches of every tile into k[t] clusters (-1 where
        masked or k[t] == 0), on L2-normalised features joined to the weighted patch position."""
        t, n, _ = patches.shape
        k = torch.minimum(torch.from_numpy(np.asarray(k, dtype=np.int64)), mask.sum(1))
        assign = torch.full((t, n), -1, dtype=torch.long)
        rows = torch.nonzero(k > 0, as_tuple=True)[0]
        if not len(rows):
            return assign
        rc = self.coords(grid)
        for c in torch.split(rows, 64):
            feat = torch.nn.functional.normalize(patches[c.to(patches.device)].float(), dim=-1).cpu()
            x = torch.cat([feat, self.spatial_weight * rc[None].expand(len(c), n, 2)], -1)
            assign[c] = kmeans(x, mask[c], k[c], self.iters, self.seed + int(c[0]))
        return assign

    @staticmethod
    def coords(grid: int) -> torch.Tensor:
        """(grid**2, 2) the k-means position of every patch of a tile: (row, col) / (grid - 1),
        0 to 1 across the tile as in released UHR-BAT ((x, y) / (ts - 1))."""
        i = torch.arange(grid * grid)
        return torch.stack([i // grid, i % grid], 1).float() / max(1, grid - 1)

    @staticmethod
    def _cluster_mean(imp, assign, n) -> torch.Tensor:
        """(T, N) the mean importance of each patch's cluster (float64; 0 where unassigned)."""
        lab = assign.clamp(min=0)
        w = (assign >= 0).double()
        sums = torch.zeros(imp.shape[0], n, dtype=torch.float64).scatter_add_(1, lab, imp.double() * w)
        cnt = torch.zeros(imp.shape[0], n, dtype=torch.float64).scatter_add_(1, lab, w)
        return (sums / cnt.clamp(min=1)).gather(1, lab) * w

    def importance(self, patches, valid, score_fn, model) -> torch.Tensor:
        t, n, d = patches.shape
        grid = int(round(n**0.5))
        imp = torch.zeros(t, n)
        used = 0
        for s in self.scales:
            if grid % s:
                continue
            g = grid // s
            lab = pool_labels(grid, g)[None].expand(t, n).contiguous()
            if s == 1:  # single patches: no pooling, no copy
                means, vcount = patches, valid.long()
            else:  # the mean of each cell's VALID patches: the nodata fill adds nothing
                means, vcount = masked_cell_means(patches, lab, valid, g * g)
            ok = vcount > 0
            ti, ci = torch.nonzero(ok, as_tuple=True)
            sc = score_vectors(score_fn, model, means[ti.to(means.device), ci.to(means.device)]).float()
            cell = torch.zeros(t, g * g)
            cell[ti, ci] = sc / vcount[ti, ci].float()
            imp += cell.gather(1, lab)
            used += 1
        return (imp / max(used, 1)) * valid

    def select(self, features, geometry, question, budget, *, model) -> Selection:
        budget = check_budget(budget)
        patches = features.patches
        t, n, d = patches.shape
        grid = int(round(n**0.5))
        B = t * self.k if budget is None else budget
        valid = valid_tensor(geometry, patches)
        score_fn = make_scorer(model, question, self.tokenizer, self.scorer, self.last_n)
        with torch.no_grad():
            imp = self.importance(patches, valid, score_fn, model)
        cap = valid.sum(1).numpy()
        alloc = allocate(imp.sum(1).double().numpy(), cap, B)
        keep_n = np.where(alloc > 0, np.maximum(1, np.round(self.preserve_ratio * alloc)), 0).astype(np.int64)
        # at most this many preserved patches a region, and one slot at least left to merge the
        # rest into where the region has more valid patches than tokens (a region of one token
        # is its mean, not one patch with the others in no token)
        keep_n = np.minimum(keep_n, np.where(cap > alloc, alloc - 1, alloc))

        # preserve (UHR-BAT's rule): cluster the region, keep unmerged only patches strictly above
        # their cluster's mean importance, the most important first, at most keep_n of them
        k1 = np.where(alloc > 0, np.maximum(1, alloc - keep_n), 0)
        assign1 = self._cluster(patches, valid, k1, grid)
        cand = valid & (assign1 >= 0) & (imp > self._cluster_mean(imp, assign1, n) * (1 + TIE_TOL))
        rank = imp.masked_fill(~cand, float("-inf"))
        order = torch.sort(rank, dim=1, descending=True, stable=True).indices
        pos = torch.empty_like(order)
        pos.scatter_(1, order, torch.arange(n)[None].expand(t, n))
        preserved = cand & (pos < torch.from_numpy(keep_n)[:, None])
        rest = valid & ~preserved
        kept_n = preserved.sum(1).numpy().astype(np.int64)

        # merge: what is left of each cluster becomes one token; where fewer patches than keep_n
        # stood above their cluster's mean, the unused slots go to merging: the region's
        # unpreserved patches are clustered again into alloc - kept_n clusters
        merge_n = np.minimum(alloc - kept_n, rest.sum(1).numpy())
        again = merge_n != k1
        assign = assign1.masked_fill(~rest, -1)
        if again.any():
            assign2 = self._cluster(patches, rest, np.where(again, merge_n, 0), grid)
            sel_rows = torch.from_numpy(again)[:, None]
            assign = torch.where(sel_rows, assign2, assign)

        # assemble tokens: a preserved patch is its own token, a k-means cluster one token
        label = torch.where(preserved, torch.arange(n)[None].expand(t, n), n + assign)
        label = label.masked_fill(~(preserved | (assign >= 0)), -1).numpy()
        tiles_np = np.repeat(np.arange(t), n).reshape(t, n)
        ok = label >= 0
        ids = (tiles_np * n + np.arange(n)[None])[ok]  # ascending flat patch ids
        keys = tiles_np[ok].astype(np.int64) * (2 * n) + label[ok]
        order = np.argsort(keys, kind="stable")
        ukeys, start, inverse, counts = np.unique(keys[order], return_index=True,
                                                  return_inverse=True, return_counts=True)
        groups = np.split(ids[order], start[1:]) if len(ukeys) else []
        first = ids[order][start] if len(ukeys) else np.zeros(0, np.int64)
        lm = np.lexsort((first, ukeys // (2 * n)))  # tile, then first patch in raster order
        members = [groups[i].astype(np.int64) for i in lm]
        is_preserved = (ukeys % (2 * n)) < n
        tok = torch.from_numpy(inverse.astype(np.int64))
        src = torch.from_numpy(ids[order])
        flat = patches.reshape(t * n, d)
        m_all = len(ukeys)
        sums = torch.zeros(m_all, d, dtype=torch.float32, device=flat.device)
        sums.index_add_(0, tok.to(flat.device), flat[src.to(flat.device)].float())
        cnt = torch.from_numpy(counts.astype(np.float32))
        vec = (sums / cnt.to(flat.device)[:, None]).to(flat.dtype)[torch.from_numpy(lm).to(flat.device)]
        isum = torch.zeros(m_all).index_add_(0, tok, imp.reshape(-1)[src].float())
        scores = (isum / cnt)[torch.from_numpy(lm)].numpy().astype(np.float32)
        roles = ["anchor" if is_preserved[i] else role_for(int(counts[i]), False) for i in lm]
        return Selection(
            embeds=project(model, vec),
            members=members,
            scores=scores,
            roles=roles,
            candidates=unreduced_tokens(t, n),
            strategy=self.name,
            info={"budget": budget, "preserved": int(kept_n.sum()), "merge_slots": int(merge_n.sum()),
                  "regions_used": int((alloc > 0).sum()), "scales": list(self.scales),
                  "preserve_ratio": self.preserve_ratio, "spatial_weight": self.spatial_weight,
                  "tiles": t},
        )
