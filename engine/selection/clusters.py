"""GeoLLaVA-8K's Background Token Pruning as pure tensor functions (no model needed).

Reproduces steps 3-5 of the released checkpoint (docs: /work/shared/reference/geollava-8k.md):

* the affinity head gives, for every patch of a tile, a softmax over its 3 x 3 neighbourhood in
  the offset order (-1,-1), (-1,0), (-1,1), (0,-1), (0,0), (0,1), (1,-1), (1,0), (1,1);
* at the tile border an offset is clamped to the edge, so several offsets can name the same
  patch; their weights are added (as a dense N x N affinity row would add them);
* every patch's parent is the neighbour with the largest summed weight, ties explicitly to
  the lowest token index; a NaN weight (a reghead that overflowed, e.g. in fp16) counts as the
  largest, as ``argmax`` over the dense affinity row of the released code counts it;
* pointer jumping ``parent = parent[parent]`` for at most 12 rounds (stops early once stable);
  the final pointer is the patch's root, and patches with the same root form one cluster;
* clusters are numbered in increasing root index (the spatial order used for the kept tokens)
  and each becomes the plain mean of its members' raw features.

Everything is sparse (9 neighbours, never the N x N matrix) and vectorised across tiles.
"""

from __future__ import annotations

from functools import lru_cache

import torch

OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0), (0, 1), (1, -1), (1, 0), (1, 1))
MAX_JUMPS = 12


@lru_cache(maxsize=4)
def neighbour_index(grid: int) -> torch.Tensor:
    """(grid**2, 9) long: token index of each patch's clamped neighbour, in OFFSETS order."""
    r = torch.arange(grid).repeat_interleave(grid)
    c = torch.arange(grid).repeat(grid)
    cols = []
    for dr, dc in OFFSETS:
        rr = (r + dr).clamp(0, grid - 1)
        cc = (c + dc).clamp(0, grid - 1)
        cols.append(rr * grid + cc)
    return torch.stack(cols, 1)


def summed_affinity(aff: torch.Tensor, grid: int) -> torch.Tensor:
    """(T, N, 9) softmax weights -> (T, N, 9) where every slot holds the total weight of its
    target patch (duplicates from border clamping added in offset order)."""
    idx = neighbour_index(grid).to(aff.device)
    same = idx[:, :, None] == idx[:, None, :]  # (N, 9, 9): slot k and slot l name one patch
    total = torch.zeros_like(aff)
    for l in range(9):  # add in offset order so the float sum is reproducible
        # where, not a product with 0/1: NaN * 0 would spread one slot's NaN to the whole row
        total = total + torch.where(same[None, :, :, l], aff[:, :, l : l + 1], 0.0)
    return total


def parents(aff: torch.Tensor, grid: int) -> torch.Tensor:
    """(T, N, 9) affinity -> (T, N) long parent token index (argmax, ties to lowest index;
    NaN counts as the largest weight, as torch.argmax counts it)."""
    total = summed_affinity(aff, grid)
    # without this a row holding NaN matches no maximum and its parent is an index past the tile
    total = total.masked_fill(torch.isnan(total), float("inf"))
    idx = neighbour_index(grid).to(aff.device)[None].expand_as(total)
    best = total.max(dim=-1, keepdim=True).values
    big = torch.iinfo(torch.long).max
    return torch.where(total == best, idx, torch.full_like(idx, big)).min(dim=-1).values


def pointer_jump(parent: torch.Tensor, max_rounds: int = MAX_JUMPS) -> tuple[torch.Tensor, int]:
    """Follow parent pointers: ``p = p[p]`` at most `max_rounds` times. Returns (roots, rounds)."""
    p = parent
    rounds = 0
    for _ in range(max_rounds):
        nxt = p.gather(1, p)
        rounds += 1
        if torch.equal(nxt, p):
            break
        p = nxt
    return p, rounds


def labels_from_roots(roots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, N) roots -> (labels (T, N) in 0..K_t-1 numbered by increasing root index,
    counts (T,) clusters per tile)."""
    t, n = roots.shape
    present = torch.zeros(t, n, dtype=torch.long, device=roots.device)
    present.scatter_(1, roots, 1)
    rank = present.cumsum(1) - 1
    return rank.gather(1, roots), present.sum(1)


def cluster_means(x: torch.Tensor, labels: torch.Tensor, n_slots: int | None = None):
    """Mean raw feature of every cluster. x (T, N, D), labels (T, N) ->
    (means (T, S, D), sizes (T, S)); slots beyond a tile's cluster count are zero, size 0."""
    t, n, d = x.shape
    s = n if n_slots is None else int(n_slots)
    sums = torch.zeros(t, s, d, dtype=torch.float32, device=x.device)
    sums.scatter_add_(1, labels[..., None].expand(t, n, d), x.float())
    sizes = torch.zeros(t, s, dtype=torch.float32, device=x.device)
    sizes.scatter_add_(1, labels, torch.ones(t, n, dtype=torch.float32, device=x.device))
    means = sums / sizes.clamp(min=1)[..., None]
    return means.to(x.dtype), sizes.long()


def cluster(aff: torch.Tensor, grid: int, max_rounds: int = MAX_JUMPS):
    """Affinity (T, N, 9) -> (labels (T, N), counts (T,), roots (T, N), rounds used)."""
    roots, rounds = pointer_jump(parents(aff, grid), max_rounds)
    labels, counts = labels_from_roots(roots)
    return labels, counts, roots, rounds


def affinity_from_features(x: torch.Tensor, grid: int, sharpness: float = 50.0) -> torch.Tensor:
    """A hand-made affinity for tests and for running without a reghead: softmax over the nine
    clamped neighbours of ``-sharpness * squared distance`` of the features. Neighbours with
    equal features get equal weight, so uniform areas point at their lowest-index neighbour."""
    idx = neighbour_index(grid).to(x.device)
    nb = x[:, idx]  # (T, N, 9, D)
    dist = ((nb - x[:, :, None]) ** 2).sum(-1)
    return torch.softmax(-sharpness * dist.float(), dim=-1)
