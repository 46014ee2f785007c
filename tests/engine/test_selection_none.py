"""The `none` strategy: LongVA's unreduced path (project, then 2x2 average pool per tile)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.selection.base import SelectionError, get_strategy
from engine.vision import VisionFeatures


def _features(t=3, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return VisionFeatures(
        cls=torch.randn(t, d, generator=g),
        patches=torch.randn(t, 576, d, generator=g),
        overview_cls=torch.randn(d, generator=g),
        overview_patches=torch.randn(576, d, generator=g),
    )


def test_none_pools_projected_features(tiny_model):
    feats = _features(3)
    strat = get_strategy("none", chunk_tiles=2)
    assert strat.question_dependent is False
    sel = strat.select(feats, None, "q", None, model=tiny_model)
    assert sel.n_tokens == 3 * 144 and sel.candidates == 3 * 144
    assert sel.embeds.shape == (432, tiny_model.config.hidden_size)
    assert set(sel.roles) == {"kept"} and np.all(sel.scores == 1)
    # reference: project every patch, then 2x2 average pool each tile (LongVA unires)
    proj = tiny_model.project(feats.patches)  # (3, 576, H)
    grid = proj.reshape(3, 24, 24, -1).permute(0, 3, 1, 2)
    ref = F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2).reshape(432, -1)
    torch.testing.assert_close(sel.embeds, ref)
    # members: 4 patches each, every patch exactly once, token = mean of its members' projections
    allm = np.concatenate(sel.members)
    assert all(len(m) == 4 for m in sel.members)
    assert np.array_equal(np.sort(allm), np.arange(3 * 576))
    flat = proj.reshape(3 * 576, -1)
    for k in (0, 13, 143, 144, 431):
        torch.testing.assert_close(sel.embeds[k], flat[torch.as_tensor(sel.members[k])].mean(0))
    assert list(sel.members[0]) == [0, 1, 24, 25]
    assert list(sel.members[144]) == [576, 577, 600, 601]


def test_none_refuses_a_budget_it_cannot_meet(tiny_model):
    feats = _features(2)
    strat = get_strategy("none")
    assert strat.select(feats, None, "q", 288, model=tiny_model).n_tokens == 288
    with pytest.raises(SelectionError, match="uniform"):
        strat.select(feats, None, "q", 287, model=tiny_model)


def test_none_plans_its_tokens_from_the_tiles_alone(tiny_model):
    strat = get_strategy("none")
    for tiles in (1, 2, 5):
        sel = strat.select(_features(tiles), None, "q", None, model=tiny_model)
        assert strat.planned_tokens(tiles, None) == sel.n_tokens == tiles * 144
    assert strat.planned_tokens(2, 288) == 288
    with pytest.raises(SelectionError) as planned:
        strat.planned_tokens(2, 287)
    with pytest.raises(SelectionError) as selected:
        strat.select(_features(2), None, "q", 287, model=tiny_model)
    assert str(planned.value) == str(selected.value)


@pytest.mark.parametrize("budget", [None, 30, 1000])
def test_geollava_plans_its_tokens_only_with_faithful_empty_slots(tiny_model, budget):
    feats = _features(3, d=tiny_model.config.mm_hidden_size)
    faithful = get_strategy("geollava", tokens_per_tile=24, faithful_empty_slots=True)
    sel = faithful.select(feats, None, "q", budget, model=tiny_model)
    assert faithful.planned_tokens(3, budget) == sel.n_tokens == min(3 * 24, budget or 10**9)
    assert get_strategy("geollava", tokens_per_tile=24).planned_tokens(3, budget) is None
