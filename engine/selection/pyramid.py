"""The `pyramid` strategy: training-free, text-guided coarse-to-fine selection after LRS-VQA.

The idea (LRS-VQA, in our words): look at the scene at low resolution first, let the question
decide which regions matter, and only spend high-resolution tokens there. Our pyramid is built
from the grid tiles' own CLIP features (no extra vision passes): level l averages each tile's
24 x 24 patches into g_l x g_l non-overlapping cells, with ``levels=(1, 4, 12, 24)`` by default
(one token a tile, 6 x 6, 2 x 2 patches, single patches); every level nests in the next.

A cell's token is the mean of its **valid** patches only, and its members (what the heatmap and
the anchors layer draw) are those patches: nodata, outside the AOI and padding add nothing, so
the raster's fill there neither reaches the LM nor sways which cells are opened; a cell without
valid patches is never a token.

1. Start from the coarsest level: one token per tile (cells without valid patches are skipped).
   If that already exceeds the budget, keep the `budget` most relevant cells and stop.
2. Score the current tokens (through the projector) with the question
   (`textscore.TextScorer`: first-layer attention share of the question's tokens, softmax
   over the current set).
3. Open the high-scoring tokens, most relevant first: an opened cell is replaced by its valid
   children at the next level. "High" means a relevance of at least ``open_threshold`` (default
   1.0) times the mean relevance of the current tokens (the question attends to it more than to
   an average token); tokens are opened only while the total stays within the budget.
4. Repeat 2-3 level by level down to single patches.

Unopened coarse tokens stay in the LM input as context (``keep_coarse=True``; LRS-VQA keeps
the low-resolution view too); ``keep_coarse=False`` drops them when at least one region was
opened. Default budget without one: 24 tokens a tile (the geollava count). The scores reported
are the last relevance each token received. Roles (common.py's rule): tokens reached by opening
and, when the coarsest level alone exceeds the budget, the cells kept by the question's ranking
(they won a text ranking) are 'anchor'; unopened multi-patch cells 'merged'. LM order: tile by
tile, then by the first patch of each token in raster order.

**Where this departs from the released LRS-VQA code** (VisionXLab/LRS-VQA,
``llava/model/multimodal_projector/builder.py``), plainly: it is after LRS-VQA, not a port.

* Pyramid: LRS-VQA encodes the image again at each resolution; ours pools the grid tiles' CLIP
  features (one vision pass), so a coarse token is a mean of fine features, not a view of a
  downsampled image.
* What is opened: LRS-VQA keeps the top ``pruning_ratio`` fraction of each level's tokens and
  retrieves every next-level token inside them, level after level down to full resolution, and
  prunes the last level by the ratio again. Ours opens the cells scoring at least
  ``open_threshold`` times the mean, only while the total stays within the budget, and stops
  early (at a coarser level) when nothing more fits.
* What the LM receives: LRS-VQA always sends the whole global thumbnail and drops the
  intermediate-level tokens it did not select; ours sends no thumbnail (the overview tile's
  features are not used) and keeps the unopened coarse cells instead (``keep_coarse``).
* Scoring: LRS-VQA ranks with contextualised states (the attention of the last text token's
  query, after LM layers); ours uses the first decoder layer over the question's own tokens,
  a cheaper proxy (see `textscore`).
"""

from __future__ import annotations

import numpy as np
import torch

from engine.selection.base import Selection, check_budget, register
from engine.selection.baselines import pool_labels
from engine.selection.common import cap_global, project, role_for, unreduced_tokens, valid_tensor
from engine.selection.textscore import make_scorer, score_vectors

DEFAULT_LEVELS = (1, 4, 12, 24)


def cell_tables(grid: int, g: int):
    """Patch ids of every g x g cell: list of int arrays."""
    lab = pool_labels(grid, g).numpy()
    order = np.argsort(lab, kind="stable")
    bounds = np.searchsorted(lab[order], np.arange(g * g + 1))
    return [order[bounds[c] : bounds[c + 1]] for c in range(g * g)]


@register("pyramid")
class PyramidStrategy:
    name = "pyramid"
    question_dependent = True

    def __init__(self, levels=DEFAULT_LEVELS, open_threshold: float = 1.0, keep_coarse: bool = True,
                 tokens_per_tile: int = 24, tokenizer=None, last_n: int | None = None, scorer=None,
                 **_ignored) -> None:
        levels = tuple(int(v) for v in levels)
        if any(b % a for a, b in zip(levels, levels[1:])) or levels != tuple(sorted(set(levels))):
            raise ValueError("pyramid levels must increase and each divide the next")
        if float(open_threshold) < 0:
            raise ValueError("open_threshold must not be negative")
        self.levels, self.open_threshold, self.keep_coarse = levels, float(open_threshold), bool(keep_coarse)
        self.k, self.tokenizer, self.last_n, self.scorer = int(tokens_per_tile), tokenizer, last_n, scorer

    def select(self, features, geometry, question, budget, *, model) -> Selection:
        budget = check_budget(budget)
        patches = features.patches
        t, n, d = patches.shape
        grid = int(round(n**0.5))
        levels = tuple(v for v in self.levels if v <= grid) or (grid,)
        B = t * self.k if budget is None else budget
        valid = valid_tensor(geometry, patches)
        flat = patches.reshape(t * n, d)
        vflat = valid.reshape(-1).numpy()
        tables = {g: cell_tables(grid, g) for g in levels}
        score_fn = make_scorer(model, question, self.tokenizer, self.scorer, self.last_n)

        # token = (level index, tile, cell); its cell's patch ids are tables[g][cell] + tile * n,
        # the patches it stands for (members) the valid ones among them
        def cell(tok):
            li, ti, ci = tok
            return tables[levels[li]][ci] + ti * n

        def mem(tok):
            ids = cell(tok)
            return ids[vflat[ids]]

        vweight = torch.from_numpy(vflat.astype(np.float32)).to(flat.device)

        def vectors(toks):
            """Mean raw feature of the valid patches of each token's cell (nodata, outside the
            AOI and padding add nothing): one gather per level (cells of a level all have the
            same number of patches, valid or not)."""
            out = flat.new_zeros(len(toks), d)
            for li in range(len(levels)):
                pos = [i for i, tk in enumerate(toks) if tk[0] == li]
                if not pos:
                    continue
                idx = torch.from_numpy(np.stack([cell(toks[i]) for i in pos])).to(flat.device)
                w = vweight[idx]
                mean = (flat[idx].float() * w[..., None]).sum(1) / w.sum(1).clamp(min=1)[:, None]
                out[torch.tensor(pos, device=flat.device)] = mean.to(flat.dtype)
            return out

        def alive(tok):
            return bool(vflat[cell(tok)].any())

        def children(tok):
            li, ti, ci = tok
            g0, g1 = levels[li], levels[li + 1]
            f = g1 // g0
            r0, c0 = divmod(ci, g0)
            out = [(li + 1, ti, (r0 * f + a) * g1 + c0 * f + b) for a in range(f) for b in range(f)]
            return [c for c in out if alive(c)]

        frontier = [(0, ti, ci) for ti in range(t) for ci in range(levels[0] ** 2)]
        frontier = [tk for tk in frontier if alive(tk)]
        opened_from = set()  # tokens reached by opening
        scores = score_vectors(score_fn, model, vectors(frontier))
        opened_levels = []
        for li in range(len(levels) - 1):
            if not frontier or len(frontier) >= B:  # nothing valid to open (no mean to cut at)
                break
            order = torch.sort(scores, descending=True, stable=True).indices.tolist()
            cut = self.open_threshold * float(scores.sum()) / len(frontier) * (1 - 1e-6)
            total, opened, new_children = len(frontier), set(), {}
            for i in order:
                if float(scores[i]) < cut:
                    break
                tk = frontier[i]
                if tk[0] != li:
                    continue
                ch = children(tk)
                if not ch or total + len(ch) - 1 > B:
                    continue
                opened.add(i)
                new_children[i] = ch
                total += len(ch) - 1
            if not opened:
                break
            opened_levels.append(len(opened))
            nxt = []
            for i, tk in enumerate(frontier):
                if i in opened:
                    nxt.extend(new_children[i])
                    opened_from.update(new_children[i])
                else:
                    nxt.append(tk)
            frontier = nxt
            scores = score_vectors(score_fn, model, vectors(frontier))
        if not self.keep_coarse and opened_from:
            keep_idx = [i for i, tk in enumerate(frontier) if tk in opened_from]
            frontier = [frontier[i] for i in keep_idx]
            scores = scores[keep_idx]
        ranked = len(frontier) > B  # the cap below keeps the question's best cells: a ranking
        keep = cap_global(scores, B).tolist()
        frontier = [frontier[i] for i in keep]
        scores = scores[keep]
        members = [mem(tk).astype(np.int64) for tk in frontier]
        lm_order = sorted(range(len(frontier)), key=lambda i: (frontier[i][1], int(members[i].min())))
        frontier = [frontier[i] for i in lm_order]
        members = [members[i] for i in lm_order]
        scores = scores[lm_order] if lm_order else scores
        vec = vectors(frontier)
        return Selection(
            embeds=project(model, vec),
            members=members,
            scores=np.asarray(scores, dtype=np.float32).reshape(-1),
            roles=[role_for(len(m), ranked or tk in opened_from) for tk, m in zip(frontier, members)],
            candidates=unreduced_tokens(t, n),
            strategy=self.name,
            info={"levels": list(levels), "opened_per_level": opened_levels, "budget": budget,
                  "open_threshold": self.open_threshold, "tiles": t},
        )
