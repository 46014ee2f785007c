"""Property-based tests (hypothesis) of the token strategies' shared contract, over random tile
grids (one tile, one row, one column), raster sizes from 1 px, nodata patterns, feature maps
(random, constant, duplicated, binary), budgets from 1 (below the number of tiles) up,
tokens a tile and seeds: the hard budget, unique and valid member patches inside one tile,
roles, finite scores, the same output for the same seed; `none` unlimited is the pooled
unreduced path, and `planned_tokens` is what `select` sends. The clustering keeps every parent
inside its tile whatever the affinity (ties, NaN).

Fast and deterministic: a few dozen derandomized examples a property (tiny 8-d features)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from affine import Affine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.geometry import TokenGeometry
from engine.raster import RasterImage
from engine.selection import get_strategy
from engine.selection import clusters as C
from engine.selection.base import ROLES, SelectionError
from engine.tiling import TILE, plan_tiles

D = 8
N = 576
STRATEGIES = ["none", "uniform", "random", "background", "anchored", "geollava", "pyramid", "budget"]
# strategies whose members are valid patches only (geollava and background keep the invalid
# patches of a cluster that has a valid one: the heatmap draws its valid ones)
VALID_ONLY = {"uniform", "random", "anchored", "pyramid", "budget"}
FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Identity:
    """A stand-in model whose projector changes nothing (the strategies' projection runs)."""

    def project(self, x):
        return x * 1.0


def eye_linear():
    lin = torch.nn.Linear(D, D)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(D))
        lin.bias.zero_()
    return lin


def question_scorer(e):
    """Stand-in for the LM relevance of pyramid / budget: a softmax over the last channel."""
    return torch.softmax(e.float()[:, -1], 0)


def geometry(w, h, rows, cols, valid):
    """TokenGeometry of a w x h image on a rows x cols tile canvas (the only pinpoint)."""
    image = RasterImage(pixels=np.zeros((h, w, 3), np.uint8), valid=valid,
                        image_to_source=Affine.identity(),
                        source_transform=Affine(2.0, 0, 1000.0, 0, -2.0, 5000.0), crs_wkt=None,
                        source_size=(w, h), window=(0, 0, w, h), bands=(1, 2, 3), path="mem")
    return TokenGeometry.build(image, plan_tiles((w, h), [(cols * TILE, rows * TILE)]))


def select(name, feats, geom, budget, *, k=24, seed=0, **params):
    kw = {}
    if name in ("geollava", "background", "anchored"):
        kw = dict(q_proj=eye_linear(), v_proj=eye_linear())
    if name in ("geollava", "background"):
        kw["affinity"] = lambda p: C.affinity_from_features(p, 24)
    if name in ("pyramid", "budget"):
        params["scorer"] = question_scorer
    if name in ("random", "budget"):
        params["seed"] = seed
    if name in ("geollava", "anchored", "random", "pyramid", "budget"):
        params["tokens_per_tile"] = k
    return get_strategy(name, **params).select(feats, geom, "where are the boats?", budget,
                                               model=Identity(), **kw)


@st.composite
def scenes(draw):
    """(features, geometry): a random tile grid, raster size, nodata pattern and feature map."""
    rows, cols = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    w = draw(st.one_of(st.integers(1, 30), st.integers(1, cols * 400)))
    h = draw(st.one_of(st.integers(1, 30), st.integers(1, rows * 400)))
    t = rows * cols
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    kind = draw(st.sampled_from(["random", "constant", "duplicate", "binary", "tiny", "large"]))
    if kind == "random":
        x = torch.randn(t, N, D, generator=g)
    elif kind == "constant":  # all-equal features: every score ties
        x = torch.full((t, N, D), draw(st.sampled_from([0.0, 1.0, -7.5])))
    elif kind == "duplicate":  # one vector repeated over each tile
        x = torch.randn(t, 1, D, generator=g).expand(t, N, D).clone()
    elif kind == "binary":  # many exact duplicates and ties
        x = torch.randint(0, 2, (t, N, D), generator=g).float()
    else:
        x = torch.randn(t, N, D, generator=g) * (1e-20 if kind == "tiny" else 1e6)
    valid = np.ones((h, w), bool)
    nodata = draw(st.sampled_from(["none", "left half", "random", "stripes", "everywhere"]))
    if nodata == "left half":
        valid[:, : w // 2] = False
    elif nodata == "random":
        valid = np.random.default_rng(w * h).random((h, w)) > 0.4
    elif nodata == "stripes":  # one valid column in three: at full resolution no patch is half valid
        valid[:] = False
        valid[:, ::3] = True
    elif nodata == "everywhere":  # no valid patch at all, as thin stripes at any resolution
        valid[:] = False
    feats = SimpleNamespace(cls=torch.randn(t, D, generator=g), patches=x)
    return feats, geometry(w, h, rows, cols, valid)


budgets = st.one_of(st.none(), st.integers(1, 4), st.integers(1, 3000))
# tokens a tile: the usual few, any, and more than a tile's 576 patches
tokens_per_tile = st.one_of(st.integers(1, 48), st.integers(1, 600), st.integers(570, 700))


@pytest.mark.parametrize("name", STRATEGIES)
@settings(FAST, max_examples=40)
@given(scene=scenes(), budget=budgets, k=tokens_per_tile, seed=st.integers(0, 2**31),
       rank=st.sampled_from(["size", "small", "score"]), flag=st.booleans())
def test_every_strategy_keeps_the_selection_contract(name, scene, budget, k, seed, rank, flag):
    feats, geom = scene
    t = geom.n_tiles
    params = {"background": {"rank": rank}, "geollava": {"faithful_empty_slots": flag},
              "pyramid": {"keep_coarse": flag}}.get(name, {})
    try:
        sel = select(name, feats, geom, budget, k=k, seed=seed, **params)
    except SelectionError:
        assert name == "none" and budget is not None and budget < t * 144
        return
    # without a budget: the unreduced count, a tile's tokens_per_tile, or every cluster
    per_tile = {"none": 144, "uniform": 144, "background": N}.get(name, min(k, N))
    limit = budget if budget is not None else t * per_tile
    assert sel.n_tokens <= limit
    assert sel.embeds.shape == (sel.n_tokens, D)
    assert sel.candidates == t * 144
    assert set(sel.roles) <= set(ROLES)
    assert np.isfinite(sel.scores).all()
    ids = np.concatenate(sel.members) if sel.members else np.zeros(0, np.int64)
    assert len(ids) == len(np.unique(ids))  # no patch stands in two tokens
    assert ids.size == 0 or (ids.min() >= 0 and ids.max() < t * N)
    for m in sel.members:
        assert len(set((np.asarray(m) // N).tolist())) <= 1  # a token's patches share one tile
    if name in VALID_ONLY:
        assert geom.patch_valid.reshape(-1)[ids].all()
    again = select(name, feats, geom, budget, k=k, seed=seed, **params)
    assert torch.equal(sel.embeds, again.embeds)
    assert [m.tolist() for m in sel.members] == [m.tolist() for m in again.members]
    assert np.array_equal(sel.scores, again.scores) and sel.roles == again.roles


@FAST
@given(scenes(), budgets, tokens_per_tile)
def test_planned_tokens_are_what_select_sends(scene, budget, k):
    """`none` and faithful `geollava` promise a count from the tile plan; `select` keeps it (and
    raises the same refusal). `none` without a budget is every tile's 24 x 24 projected grid
    pooled 2 x 2, each token standing for its 4 patches."""
    feats, geom = scene
    t = geom.n_tiles
    none = get_strategy("none", chunk_tiles=2)
    try:
        planned = none.planned_tokens(t, budget)
    except SelectionError:
        planned = "refused"
    try:
        sel = none.select(feats, geom, "q", budget, model=Identity())
        got = sel.n_tokens
    except SelectionError:
        got = "refused"
    assert planned == got
    if budget is None:
        grid = feats.patches.reshape(t, 24, 24, D).permute(0, 3, 1, 2)
        pooled = F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2).reshape(-1, D)
        assert torch.allclose(sel.embeds, pooled, rtol=1e-5, atol=1e-30)
        token = int(np.random.default_rng(k).integers(t * 144))
        tile, cell = divmod(token, 144)
        r, c = divmod(cell, 12)
        assert sorted(sel.members[token].tolist()) == sorted(
            tile * N + (2 * r + a) * 24 + 2 * c + b for a in (0, 1) for b in (0, 1))
    faithful = get_strategy("geollava", tokens_per_tile=k, faithful_empty_slots=True)
    sel = select("geollava", feats, geom, budget, k=k, faithful_empty_slots=True)
    assert faithful.planned_tokens(t, budget) == sel.n_tokens


@FAST
@given(st.integers(1, 3), st.integers(1, 6), st.integers(0, 2**16),
       st.sampled_from(["random", "ties", "nan", "zero"]))
def test_clusters_stay_inside_their_tile_whatever_the_affinity(t, grid, seed, kind):
    g = torch.Generator().manual_seed(seed)
    n = grid * grid
    if kind == "random":
        aff = torch.softmax(torch.randn(t, n, 9, generator=g), -1)
    elif kind == "ties":
        aff = torch.randint(0, 2, (t, n, 9), generator=g).float()
    elif kind == "zero":
        aff = torch.zeros(t, n, 9)
    else:  # an overflowing reghead: some weights NaN
        aff = torch.softmax(torch.randn(t, n, 9, generator=g), -1)
        aff[torch.rand(t, n, 9, generator=g) < 0.3] = float("nan")
    par = C.parents(aff, grid)
    # the released code's rule: argmax (first maximum, NaN the largest) over the dense affinity
    # row, where the weights of offsets clamped onto one patch add up (in offset order)
    idx = C.neighbour_index(grid)
    for i in range(t):
        for p in range(n):
            row = torch.full((n,), float("-inf"))
            for slot, j in enumerate(idx[p].tolist()):
                row[j] = aff[i, p, slot] + (0.0 if row[j] == float("-inf") else row[j])
            assert par[i, p].item() == int(torch.argmax(row))
    labels, counts, roots, _ = C.cluster(aff, grid)
    assert roots.min() >= 0 and roots.max() < n
    for i in range(t):
        assert int(counts[i]) == len(torch.unique(roots[i]))
        assert sorted(torch.unique(labels[i]).tolist()) == list(range(int(counts[i])))
