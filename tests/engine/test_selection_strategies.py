"""Every strategy on crafted feature maps (plain tensors, no model): budgets, tiles, roles,
background pruning, object tokens, determinism, faithful empty slots."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine.selection import available, get_strategy
from engine.selection import clusters as C
from engine.selection.budget import allocate, kmeans

T, N, D = 4, 576, 8
OBJECTS = [(1, 100), (1, 101), (2, 300), (3, 555)]  # (tile, patch) of distinct "object" patches
OBJ_DIR = torch.tensor([0, 0, 0, 0, 0, 0, 0, 4.0])
STRATS = ["geollava", "background", "anchored", "pyramid", "budget", "uniform", "random"]


def crafted():
    torch.manual_seed(0)
    x = torch.zeros(T, N, D)
    x[:, :, 0] = 1.0  # water everywhere ...
    x[:, 288:, 0] = 0.0
    x[:, 288:, 1] = 1.0  # ... forest in the lower half of every tile
    for t, p in OBJECTS:
        x[t, p] = OBJ_DIR + 0.01 * p
    cls = torch.zeros(T, D)
    cls[:, 7] = 1.0  # the CLS query looks for the object direction
    return SimpleNamespace(cls=cls, patches=x)


def eye_linear():
    lin = torch.nn.Linear(D, D)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(D))
        lin.bias.zero_()
    return lin


def obj_scorer(e):
    """Stand-in for the LM relevance: softmax of the object direction component."""
    return torch.softmax(e.float()[:, 7] * 3, 0)


def run(name, budget, **params):
    feats = crafted()
    kw = {}
    if name in ("geollava", "background", "anchored"):
        kw = dict(q_proj=eye_linear(), v_proj=eye_linear())
    if name in ("geollava", "background"):
        kw["affinity"] = lambda p: C.affinity_from_features(p, 24)
    if name in ("pyramid", "budget"):
        params.setdefault("scorer", obj_scorer)
    return get_strategy(name, **params).select(feats, None, "where are the boats?", budget,
                                               model=None, **kw)


def obj_ids():
    return {t * N + p for t, p in OBJECTS}


def test_registry_lists_every_strategy():
    assert set(STRATS) <= set(available())


@pytest.mark.parametrize("name", STRATS)
@pytest.mark.parametrize("budget", [1, 3, 7, 50, 300, None])
def test_budget_never_exceeded_and_members_stay_in_one_tile(name, budget):
    sel = run(name, budget)
    limit = budget if budget is not None else T * 144
    assert 0 < sel.n_tokens <= limit
    assert sel.embeds.shape == (sel.n_tokens, D)
    seen = np.concatenate(sel.members)
    assert len(seen) == len(np.unique(seen))  # no patch stands in two tokens
    for m in sel.members:
        assert len(m) > 0
        assert len(set((np.asarray(m) // N).tolist())) == 1  # footprint inside one tile
    assert sel.candidates == T * 144
    assert set(sel.roles) <= {"anchor", "kept", "merged"}


@pytest.mark.parametrize("name", ["geollava", "background"])
def test_background_collapses_and_objects_stay_single(name):
    sel = run(name, None)
    # two uniform regions a tile collapse to a handful of clusters, objects are kept alone
    assert sel.n_tokens <= T * 16 + len(OBJECTS)
    singles = {int(m[0]) for m in sel.members if len(m) == 1}
    assert obj_ids() <= singles
    big = max(len(m) for m in sel.members)
    assert big >= 100
    # every kept token's vector is the mean of its members' raw features
    x = crafted().patches.reshape(-1, D)
    for e, m in zip(sel.embeds, sel.members):
        assert torch.allclose(e, x[torch.as_tensor(m)].mean(0), atol=1e-5)


def test_geollava_tight_budget_keeps_object_clusters_first():
    sel = run("geollava", len(OBJECTS))
    assert {int(m[0]) for m in sel.members} == obj_ids()
    assert sel.roles == ["anchor"] * len(OBJECTS)
    # LM order = tile, then spatial order
    firsts = [int(m.min()) for m in sel.members]
    assert firsts == sorted(firsts)


def test_geollava_faithful_empty_slots():
    sel = run("geollava", None, faithful_empty_slots=True)
    assert sel.n_tokens == T * 24
    empty = [i for i, m in enumerate(sel.members) if len(m) == 0]
    assert len(empty) == sel.info["empty_slots"] > 0
    assert all(sel.roles[i] == "kept" for i in empty)
    assert torch.count_nonzero(sel.embeds[empty]) == 0  # zero vectors (no model: unprojected)
    # each tile: real tokens first, then its empty slots
    sel2 = run("geollava", None, tokens_per_tile=3)
    assert sel2.n_tokens == T * 3


def test_anchored_picks_object_patches_per_tile():
    sel = run("anchored", None, tokens_per_tile=2)
    assert sel.n_tokens == T * 2
    kept = {int(m[0]) for m in sel.members}
    assert obj_ids() <= kept
    assert sel.roles == ["anchor"] * sel.n_tokens


@pytest.mark.parametrize("name", ["pyramid", "budget"])
def test_text_guided_strategies_find_the_objects(name):
    # pyramid needs room to open a whole tile down to patches (1 + 15 + 8 + 3 per object)
    sel = run(name, 200 if name == "pyramid" else 40)
    kept = {int(i) for m in sel.members if len(m) <= 4 for i in m}
    assert obj_ids() <= kept


def test_budget_regions_preserve_and_merge():
    sel = run("budget", 40, preserve_ratio=0.5)
    roles = set(sel.roles)
    assert "anchor" in roles and ("merged" in roles or "kept" in roles)
    assert sel.info["preserved"] + sel.info["merge_slots"] <= 40


@pytest.mark.parametrize("name", STRATS)
def test_deterministic_given_seed(name):
    a, b = run(name, 30, seed=3), run(name, 30, seed=3)
    assert [m.tolist() for m in a.members] == [m.tolist() for m in b.members]
    assert torch.equal(a.embeds, b.embeds)
    assert np.array_equal(a.scores, b.scores)


def test_random_seed_changes_the_draw():
    a, b = run("random", 30, seed=0), run("random", 30, seed=1)
    assert [m.tolist() for m in a.members] != [m.tolist() for m in b.members]


def test_padding_is_never_a_candidate_for_non_faithful_strategies():
    feats = crafted()
    geo = SimpleNamespace(patch_valid=np.ones((T, N), bool), layout=None)
    geo.patch_valid[0] = False  # tile 0 is pure padding
    for name in ["background", "anchored", "uniform", "random", "pyramid", "budget"]:
        kw = {"scorer": obj_scorer} if name in ("pyramid", "budget") else {}
        extra = {}
        if name in ("background", "anchored"):
            extra = dict(q_proj=eye_linear(), v_proj=eye_linear())
        if name == "background":
            extra["affinity"] = lambda p: C.affinity_from_features(p, 24)
        sel = get_strategy(name, **kw).select(feats, geo, "q", 60, model=None, **extra)
        assert all((np.asarray(m) >= N).any() for m in sel.members), name


def test_allocate_respects_capacity_and_total():
    out = allocate(np.array([5.0, 1.0, 0.0, 4.0]), np.array([3, 10, 10, 10]), 12)
    assert out.sum() == 12 and out[0] == 3 and (out <= [3, 10, 10, 10]).all()
    assert allocate(np.ones(3), np.array([1, 1, 1]), 10).tolist() == [1, 1, 1]


def test_kmeans_is_deterministic_and_uses_k_clusters():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(1, 20, 3, generator=g), torch.randn(1, 20, 3, generator=g) + 10], 1)
    mask = torch.ones(1, 40, dtype=torch.bool)
    a = kmeans(x, mask, torch.tensor([2]), seed=5)
    assert torch.equal(a, kmeans(x, mask, torch.tensor([2]), seed=5))
    assert len(set(a[0, :20].tolist())) == 1 and len(set(a[0, 20:].tolist())) == 1
    assert a[0, 0] != a[0, 39]


def half_nodata():
    """Columns 13..23 of every tile are nodata: an edge that does not fall on the 2 x 2, 4 x 4
    or 6 x 6 cell borders, so cells straddle it."""
    valid = np.ones((T, N), bool)
    valid[:, (np.arange(N) % 24) >= 13] = False
    return SimpleNamespace(patch_valid=valid, layout=None), valid


def with_fill(valid, value):
    """The crafted scene with `value` (what the mended nodata happens to hold) at invalid patches."""
    f = crafted()
    x = f.patches.clone()
    x[torch.from_numpy(~valid)] = value
    return SimpleNamespace(cls=f.cls, patches=x)


def run_on(name, feats, geo, budget, **params):
    kw = {}
    if name in ("background", "anchored"):
        kw = dict(q_proj=eye_linear(), v_proj=eye_linear())
    if name == "background":
        kw["affinity"] = lambda p: C.affinity_from_features(p, 24)
    if name in ("pyramid", "budget"):
        params.setdefault("scorer", obj_scorer)
    return get_strategy(name, **params).select(feats, geo, "where are the boats?", budget,
                                               model=None, **kw)


@pytest.mark.parametrize("name", ["pyramid", "budget", "uniform", "anchored", "random", "background"])
def test_nodata_fill_changes_neither_the_choice_nor_the_tokens(name):
    """Invalid patches are never candidates: what the raster holds there (the mended fill) must
    change neither which patches are chosen nor the vectors sent to the LM."""
    geo, valid = half_nodata()
    loud = torch.zeros(D)
    loud[7] = 3.0  # the fill looks like what the question asks for
    a = run_on(name, with_fill(valid, torch.zeros(D)), geo, 60)
    b = run_on(name, with_fill(valid, loud), geo, 60)
    assert [m.tolist() for m in a.members] == [m.tolist() for m in b.members]
    assert torch.allclose(a.embeds, b.embeds)


@pytest.mark.parametrize("name,budget", [("pyramid", 60), ("pyramid", 200), ("uniform", 60),
                                          ("uniform", 2), ("uniform", None), ("budget", 60)])
def test_pooled_tokens_are_the_mean_of_their_valid_members_only(name, budget):
    """A coarse token stands for its valid patches only: its members (the heatmap and anchors
    footprint) list exactly them, its vector is their mean, and no token is made of nodata."""
    geo, valid = half_nodata()
    feats = with_fill(valid, torch.full((D,), 5.0))
    sel = run_on(name, feats, geo, budget)
    vflat = valid.reshape(-1)
    x = feats.patches.reshape(-1, D)
    assert sel.n_tokens > 0
    for e, m in zip(sel.embeds, sel.members):
        assert len(m) > 0 and vflat[m].all()
        assert torch.allclose(e, x[torch.as_tensor(m)].mean(0), atol=1e-5)
    if name == "uniform" and budget is not None and budget >= T:
        # every valid patch of a tile is covered by that tile's cells
        assert set(np.concatenate(sel.members).tolist()) == set(np.nonzero(vflat)[0].tolist())


def test_pyramid_cells_kept_by_the_question_ranking_are_anchors():
    """A budget below the number of tiles keeps the `budget` cells the question ranks highest:
    they won a ranking, so 'anchor' by common.py's role rule (not 'merged')."""
    sel = run("pyramid", 2)
    assert sel.n_tokens == 2
    assert sel.roles == ["anchor", "anchor"]
    # a budget that holds every tile ranks nothing: the coarse cells stay 'merged'
    assert set(run("pyramid", T, levels=(1,)).roles) == {"merged"}


def test_budget_tile_where_every_patch_scores_alike_has_no_anchor():
    """Released UHR-BAT keeps a token unmerged only when its attention is strictly above its
    k-means cluster's mean. Tile 0 (water / forest, no object) scores every patch the same, so
    none of its patches won a ranking: no 'anchor' there (before, round(0.5 * b_r) patches in
    index order were), and its budget goes to merged tokens covering it."""
    sel = run("budget", 96)
    tile0 = [i for i, m in enumerate(sel.members) if int(m[0]) // N == 0]
    imp0 = sel.scores[tile0]
    assert len(tile0) > 0 and np.ptp(imp0) <= 1e-5 * imp0.max()
    assert [sel.roles[i] for i in tile0 if sel.roles[i] == "anchor"] == []
    assert sum(len(sel.members[i]) for i in tile0) == N  # the whole tile, merged
    # the objects still reach the LM at (near) full resolution; the one the question ranks
    # highest (tile 3) is a token by itself
    assert obj_ids() <= {int(i) for m in sel.members if len(m) <= 4 for i in m}
    assert [3 * N + 555] in [m.tolist() for m in sel.members]
    assert sel.n_tokens <= 96


@pytest.mark.parametrize("budget, ratio", [(1, 0.5), (4, 0.5), (8, 1.0), (40, 1.0)])
def test_budget_every_valid_patch_of_a_region_with_tokens_is_in_one(budget, ratio):
    """A region given fewer tokens than it has patches keeps one slot at least for merging the
    rest: a region of one token is its mean (it was its best patch, the other 575 in no token),
    and preserve_ratio 1 no longer leaves all but the preserved patches out."""
    sel = run("budget", budget, preserve_ratio=ratio)
    assert sel.n_tokens <= budget
    regions = {int(m[0]) // N for m in sel.members}
    covered = sorted(int(i) for m in sel.members for i in m)
    assert covered == [t * N + p for t in sorted(regions) for p in range(N)]
    if budget == 1:
        assert len(regions) == 1 and sel.roles == ["merged"]


def test_budget_spatial_weight_is_released_uhr_bat_default():
    """Released UHR-BAT clusters [L2-normalised features, 0.05 * (x, y) / (ts - 1)]; the default
    spatial weight is theirs (before: 1.0 on (row, col) / 24, about 20 times stronger)."""
    strat = get_strategy("budget")
    assert strat.spatial_weight == pytest.approx(0.05)
    grid = strat.coords(24)
    assert grid.shape == (N, 2)
    assert float(grid.max()) == pytest.approx(1.0) and float(grid.min()) == 0.0


def test_cap_global_breaks_ties_to_the_lower_index():
    """Equal scores (uniform areas, faithful empty slots at -inf) keep the lower indices."""
    from engine.selection.common import cap_global
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0] * 300)
    keep = cap_global(scores, 10)
    ones = torch.nonzero(scores == 1.0, as_tuple=True)[0]
    assert keep.tolist() == ones[:10].tolist()


def test_random_tokens_are_in_spatial_order():
    sel = run("random", 30, seed=0)
    firsts = [int(m[0]) for m in sel.members]
    assert firsts == sorted(firsts)


def test_geollava_drop_padding_removes_padding_clusters():
    feats = crafted()
    geo = SimpleNamespace(patch_valid=np.ones((T, N), bool), layout=None)
    geo.patch_valid[0] = False  # tile 0 is pure padding
    kw = dict(q_proj=eye_linear(), v_proj=eye_linear(),
              affinity=lambda p: C.affinity_from_features(p, 24))
    kept = get_strategy("geollava").select(feats, geo, "q", None, model=None, **kw)
    dropped = get_strategy("geollava", drop_padding=True).select(feats, geo, "q", None, model=None, **kw)
    assert kept.info["padding_tokens"] > 0
    assert dropped.info["padding_tokens"] == 0
    assert all((np.asarray(m) >= N).any() for m in dropped.members)


def test_kmeans_seed_picks_the_initial_centres():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 200, 4, generator=g)
    mask = torch.ones(1, 200, dtype=torch.bool)
    a = kmeans(x, mask, torch.tensor([12]), iters=1, seed=0)
    b = kmeans(x, mask, torch.tensor([12]), iters=1, seed=1)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("name", ["pyramid", "budget", "uniform", "anchored", "random", "background"])
def test_no_valid_patch_gives_an_empty_selection(name):
    """A raster read with valid pixels where no patch is at least half valid (thin stripes of
    data) leaves no candidate: every strategy that drops invalid patches sends no token (pyramid
    divided by the empty frontier's length: ZeroDivisionError)."""
    geo = SimpleNamespace(patch_valid=np.zeros((T, N), bool), layout=None)
    sel = run_on(name, crafted(), geo, 60)
    assert sel.n_tokens == 0 and sel.members == [] and sel.embeds.shape == (0, D)
    assert sel.candidates == T * 144
