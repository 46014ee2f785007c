"""Small helpers shared by the token strategies: geometry access, padding masks, projection in
chunks, role rules and the global budget cap.

Role rule (the same for every strategy, see `role_for`):

* ``'anchor'`` - the token won a ranking by a query score (the CLIP CLS query in `geollava` /
  `anchored`, the question in `pyramid` / `budget`, the CLS score in `background` when ranked
  by score);
* ``'merged'`` - an unranked average of two or more patches (background cluster means, UHR-BAT
  merge centres, uniform pooling cells);
* ``'kept'`` - an unranked single patch (random, uniform without pooling, background singletons)
  or an empty slot.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

GRID = 24
PATCHES = GRID * GRID


def unreduced_tokens(n_tiles: int, n_patches: int = PATCHES) -> int:
    """Tokens the unreduced path (`none`: every tile's patches pooled 2 x 2, as LongVA) gives;
    the `candidates` figure of every Selection."""
    side = int(round(n_patches**0.5))
    return int(n_tiles) * ((side + 1) // 2) ** 2


def role_for(n_members: int, ranked: bool) -> str:
    """Role of a token from how it was chosen (see module docstring)."""
    if ranked:
        return "anchor"
    return "merged" if n_members > 1 else "kept"


def _attr(obj: Any, name: str) -> Any:
    value = getattr(obj, name, None)
    return value() if callable(value) else value


def patch_valid(geometry: Any, n_tiles: int, n_patches: int = PATCHES) -> np.ndarray:
    """(T, P) bool: False for pure padding patches. All True when the geometry is unknown."""
    valid = None if geometry is None else _attr(geometry, "patch_valid")
    if valid is None and geometry is not None:
        layout = getattr(geometry, "layout", None)
        valid = None if layout is None else _attr(layout, "patch_valid")
    if valid is None:
        return np.ones((n_tiles, n_patches), dtype=bool)
    valid = np.asarray(valid, dtype=bool).reshape(n_tiles, n_patches)
    return valid


def tile_grid(geometry: Any, n_tiles: int) -> tuple[int, int]:
    """(rows, cols) of the tile grid; a single row when the geometry is unknown."""
    for obj in (geometry, getattr(geometry, "layout", None)):
        if obj is None:
            continue
        rows, cols = getattr(obj, "rows", None), getattr(obj, "cols", None)
        if rows is not None and cols is not None and int(rows) * int(cols) == n_tiles:
            return int(rows), int(cols)
    return 1, n_tiles


def project(model: Any, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Vision vectors (N, D) -> LM embeddings (N, H) through the model's projector, in chunks.
    Without a model (pure-tensor tests) the vectors are returned unchanged."""
    if model is None:
        return x
    if x.shape[0] == 0:
        probe = model.project(x.new_zeros((1, x.shape[-1])))
        return probe[:0]
    with torch.no_grad():
        return torch.cat([model.project(c) for c in torch.split(x, chunk)], 0)


def cap_global(scores: torch.Tensor, budget: int | None) -> torch.Tensor:
    """Indices of the `budget` best scores (ties to the lower index), returned in index order.
    All indices when the budget is None or not binding."""
    n = int(scores.shape[0])
    if budget is None or budget >= n:
        return torch.arange(n)
    order = torch.sort(scores.float(), descending=True, stable=True).indices[:budget]
    return torch.sort(order).values


def members_from_ids(ids: Sequence[int] | np.ndarray) -> list[np.ndarray]:
    """One single-patch member array per flat patch id."""
    return [np.array([int(i)], dtype=np.int64) for i in np.asarray(ids).reshape(-1)]


def masked_cell_means(x: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                      n_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the VALID patches of every cell. x (T, N, D), labels (T, N) in 0..n_slots-1,
    valid (T, N) bool -> (means (T, S, D) in x's dtype, valid counts (T, S) long). Invalid
    patches (nodata, outside the AOI, padding) add nothing, so what the raster holds there
    cannot reach a pooled vector; a cell without valid patches has count 0 and a zero mean."""
    t, n, d = x.shape
    lab = labels.to(x.device)
    w = valid.to(device=x.device, dtype=torch.float32)
    sums = torch.zeros(t, n_slots, d, dtype=torch.float32, device=x.device)
    sums.scatter_add_(1, lab[..., None].expand(t, n, d), x.float() * w[..., None])
    cnt = torch.zeros(t, n_slots, dtype=torch.float32, device=x.device)
    cnt.scatter_add_(1, lab, w)
    return (sums / cnt.clamp(min=1)[..., None]).to(x.dtype), cnt.round().long().cpu()


def valid_tensor(geometry: Any, features_patches: torch.Tensor) -> torch.Tensor:
    t, n = features_patches.shape[:2]
    return torch.from_numpy(patch_valid(geometry, t, n).copy())
