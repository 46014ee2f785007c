"""Hand-checkable reference values for the GeoLLaVA-8K token path (tiling, clustering, empty
slots, prompt, CLIP constants).

Every value below was checked against the released code during the verification recorded in
docs/verification.md (run outside the repository); the tests only use our own code, so they pin the
behaviour that verification found equal to the original.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine import tiling as T
from engine.prompt import chat_prompt
from engine.selection import clusters as C
from engine.selection.geollava import pick_clusters
from engine.vision import CLIP_MEAN, CLIP_STD, preprocess

G, N = 24, 576


# ---------------------------------------------------------------- tiling
def test_pinpoint_list_matches_the_training_script_shape():
    pins = T.anyres_pinpoints()
    assert len(pins) == 2239  # the ft3.sh list has 2239 entries
    assert pins[:3] == [(336, 672), (336, 1008), (336, 1344)]
    assert pins[-3:] == [(48720, 1008), (49056, 1008), (49392, 1008)]
    assert pins[48] == (672, 336)  # a = 1 has 48 entries (b = 2..49), then a = 2 starts at b = 1
    assert (336, 336) not in pins
    assert all(a * b <= 576 * 336 * 336 for a, b in pins)


@pytest.mark.parametrize(
    "size, canvas, scaled, offset, tokens",
    [
        ((2000, 1912), (2016, 2016), (2016, 1928), (0, 44), 864),
        ((4000, 3000), (4032, 3024), (4032, 3024), (0, 0), 2592),
        # 800 * (672 / 600) = 896.0000000000001 in floats; the original ceils it to 897
        ((800, 600), (1008, 672), (897, 672), (55, 0), 144),
        # every canvas keeps all pixels; least waste ties between 336x672 and 672x336: first wins
        ((336, 336), (336, 672), (336, 336), (0, 168), 48),
        ((337, 335), (672, 336), (339, 336), (166, 0), 48),
        ((1, 1), (336, 672), (336, 336), (0, 168), 48),
        ((100000, 10), (49392, 1008), (49392, 5), (0, 501), 10584),
        ((1000, 1000), (1008, 1008), (1008, 1008), (0, 0), 216),
    ],
)
def test_layout_reference_values(size, canvas, scaled, offset, tokens):
    lay = T.plan_tiles(size)
    assert lay.canvas_size == canvas
    assert lay.scaled_size == scaled
    assert lay.offset == offset
    assert lay.n_tiles * 24 == tokens


def test_scaled_size_uses_float_ceil_like_the_original():
    assert 800 * (672 / 600) > 896  # float product just above the exact value
    assert T.scaled_size((800, 600), (1008, 672)) == (math.ceil(800 * (672 / 600)), 672) == (897, 672)


def test_tiles_are_row_major_with_the_overview_first():
    px = np.zeros((336, 672, 3), np.uint8)
    px[:, 336:] = 200  # right half bright
    lay = T.plan_tiles((672, 336))
    assert (lay.rows, lay.cols, lay.offset) == (1, 2, (0, 0))
    tiles = T.make_tiles(px, lay)
    assert tiles.shape == (3, 336, 336, 3)
    assert tiles[1].max() == 0 and tiles[2].min() == 200
    assert 0 < tiles[0].mean() < 200  # overview: the whole image squeezed to 336 x 336


def test_clip_constants_and_preprocess():
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    assert tuple(CLIP_MEAN) == tuple(OPENAI_CLIP_MEAN)
    assert tuple(CLIP_STD) == tuple(OPENAI_CLIP_STD)
    x = preprocess(np.full((1, 2, 2, 3), 255, np.uint8))
    expect = [(1.0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]
    assert torch.allclose(x[0, :, 0, 0], torch.tensor(expect), atol=1e-6)


def test_prompt_is_the_qwen_1_5_chatml_text():
    assert chat_prompt("How many ships?") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nHow many ships?<|im_end|>\n<|im_start|>assistant\n"
    )


# ---------------------------------------------------------------- clustering on a 24 x 24 tile
def _one_hot_affinity(channel: int, tiles: int = 1) -> torch.Tensor:
    aff = torch.full((tiles, N, 9), 0.01)
    aff[..., channel] = 0.92
    return aff


def test_uniform_affinity_gives_four_corner_clusters():
    # all nine weights equal: interior patches tie and pick their lowest-index neighbour
    # (up-left). On the border the clamped offsets add up: a corner names itself 4 times (4/9),
    # so all four corners are roots; the top row and left column run to patch 0, the right
    # column up to patch 23, the bottom row left to patch 552; 575 stays alone.
    aff = torch.full((1, N, 9), 1 / 9)
    par = C.parents(aff, G)
    assert par[0, [0, 23, 552, 575]].tolist() == [0, 23, 552, 575]
    assert par[0, 5] == 4  # top row: left, self and right weigh 2/9 each; lowest index wins
    assert par[0, 24] == 0  # left column: the patch above
    assert par[0, 25] == 0  # interior: up-left
    assert par[0, 47] == 23  # right column: the patch above
    assert par[0, 560] == 559  # bottom row: the patch to the left
    labels, counts, roots, rounds = C.cluster(aff, G)
    assert counts.tolist() == [4]
    uniq, sizes = torch.unique(roots[0], return_counts=True)
    assert uniq.tolist() == [0, 23, 552, 575] and sizes.tolist() == [529, 23, 23, 1]
    assert labels[0, 575] == 3 and labels[0, 300] == 0  # numbered by increasing root index
    assert rounds == 6  # longest chain 22 steps: 5 doublings, plus the round that sees no change


def test_pointing_up_left_collapses_the_tile_into_one_cluster():
    labels, counts, roots, rounds = C.cluster(_one_hot_affinity(0), G)  # offset (-1, -1)
    assert counts.tolist() == [1] and bool((roots == 0).all()) and rounds == 6


def test_pointing_up_gives_one_cluster_per_column():
    labels, counts, roots, _ = C.cluster(_one_hot_affinity(1), G)  # offset (-1, 0)
    assert counts.tolist() == [24]
    assert torch.equal(roots[0], torch.arange(N) % G)  # root = top patch of the column
    assert torch.equal(labels[0], torch.arange(N) % G)


def test_three_cycles_never_converge_and_stop_after_twelve_rounds():
    # patch 0 -> 1 -> 24 -> 0 (right, down-left, up); everything else points at itself
    parent = torch.arange(N)[None].clone()
    parent[0, 0], parent[0, 1], parent[0, 24] = 1, 24, 0
    roots, rounds = C.pointer_jump(parent, 12)
    assert rounds == 12
    # p^(2^12) with 4096 = 1 (mod 3): the cycle ends where one step would have put it
    assert roots[0, :2].tolist() == [1, 24] and roots[0, 24] == 0


def _features(tiles=1, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tiles, N, d, generator=g), torch.randn(tiles, d, generator=g)


def _identity_qv(d):
    q, v = torch.nn.Linear(d, d), torch.nn.Linear(d, d)
    with torch.no_grad():
        for m in (q, v):
            m.weight.copy_(torch.eye(d))
            m.bias.zero_()
    return q, v


def test_column_clusters_are_plain_means_kept_in_column_order():
    x, cls = _features()
    q, v = _identity_qv(8)
    pick = pick_clusters(cls, x, q, v, affinity=lambda _: _one_hot_affinity(1))
    assert pick.vectors.shape == (24, 8)
    cols = x[0].reshape(G, G, 8).mean(0)  # (column, d)
    assert torch.allclose(pick.vectors, cols, atol=1e-6)
    assert [int(m[0]) for m in pick.members] == list(range(24))
    expect = cols @ cls[0] / math.sqrt(8)
    assert torch.allclose(pick.scores, expect, atol=1e-5)


def test_empty_slots_dropped_by_default_zero_vectors_when_faithful():
    x, cls = _features(tiles=2)
    q, v = _identity_qv(8)
    aff = _one_hot_affinity(0, tiles=2)  # one cluster per tile
    default = pick_clusters(cls, x, q, v, affinity=lambda _: aff)
    assert default.vectors.shape[0] == 2
    assert torch.allclose(default.vectors, x.mean(1), atol=1e-6)
    faithful = pick_clusters(cls, x, q, v, affinity=lambda _: aff, faithful_empty_slots=True)
    assert faithful.vectors.shape[0] == 48  # 24 a tile, as the original
    assert faithful.tiles.tolist() == [0] * 24 + [1] * 24
    for t in range(2):
        rows = faithful.vectors[24 * t: 24 * (t + 1)]
        assert torch.allclose(rows[0], x[t].mean(0), atol=1e-6)  # the real cluster first
        assert bool((rows[1:] == 0).all())  # then the 23 empty slots, exact zeros
        assert [len(m) for m in faithful.members[24 * t: 24 * (t + 1)]] == [576] + [0] * 23
