"""GeoLLaVA-8K clustering on hand-built affinities: border clamping, ties, pointer jumping."""

import torch

from engine.selection import clusters as C


def aff_from(spec, grid=3):
    """Affinity (1, grid**2, 9) with the given {patch: {slot: weight}}, zero elsewhere."""
    a = torch.zeros(1, grid * grid, 9)
    for p, slots in spec.items():
        for s, w in slots.items():
            a[0, p, s] = w
    return a


def test_neighbour_index_clamps_in_offset_order():
    idx = C.neighbour_index(3)
    assert idx[4].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]  # centre: all nine
    assert idx[0].tolist() == [0, 0, 1, 0, 0, 1, 3, 3, 4]  # top-left corner clamps
    assert idx[8].tolist() == [4, 5, 5, 7, 8, 8, 7, 8, 8]


def test_border_weights_add_up_before_argmax():
    # patch 1 (top middle): raw maximum 0.3 points down to 4, but the two slots clamped onto
    # itself ((-1,0) and (0,0)) add up to 0.4, so its parent is itself.
    a = aff_from({1: {1: 0.2, 4: 0.2, 7: 0.3}})
    par = C.parents(a, 3)[0]
    assert par[1].item() == 1
    # without clamping (centre patch) the same raw numbers give the raw maximum
    a = aff_from({4: {1: 0.2, 4: 0.2, 7: 0.3}})
    assert C.parents(a, 3)[0, 4].item() == 7


def test_ties_go_to_lowest_token_index():
    # patch 4: equal weight on 8 (slot 8) and 2 (slot 2) -> 2; all-zero rows -> slot 0 target
    a = aff_from({4: {8: 0.5, 2: 0.5}, 5: {5: 0.4, 3: 0.4}})
    par = C.parents(a, 3)[0]
    assert par[4].item() == 2
    assert par[5].item() == 4  # slot 3 of patch 5 = (0,-1) = patch 4 < 5 (self, slot 4)
    assert par[0].item() == 0  # zero row: every target ties, lowest index is patch 0 itself


def test_pointer_jumping_finds_roots_and_stops():
    # chain 8 -> 7 -> 6 -> 3 -> 0 (each picks its (0,-1) or (-1,0) neighbour), others self
    spec = {p: {4: 1.0} for p in range(9)}
    spec[8] = {3: 1.0}  # (0,-1) -> 7
    spec[7] = {3: 1.0}  # -> 6
    spec[6] = {1: 1.0}  # (-1,0) -> 3
    spec[3] = {1: 1.0}  # -> 0
    a = aff_from(spec)
    labels, counts, roots, rounds = C.cluster(a, 3)
    assert roots[0].tolist() == [0, 1, 2, 0, 4, 5, 0, 0, 0]
    assert counts.tolist() == [5]
    # clusters numbered by increasing root index: roots 0,1,2,4,5 -> labels 0..4
    assert labels[0].tolist() == [0, 1, 2, 0, 3, 4, 0, 0, 0]
    assert 1 <= rounds <= 4
    # a single round only halves the chain
    roots1, r1 = C.pointer_jump(C.parents(a, 3), max_rounds=1)
    assert r1 == 1 and roots1[0, 8].item() == 6


def test_cluster_means_are_plain_means_of_raw_features():
    x = torch.arange(9 * 2, dtype=torch.float32).reshape(1, 9, 2)
    labels = torch.tensor([[0, 1, 1, 0, 2, 2, 0, 0, 0]])
    means, sizes = C.cluster_means(x, labels, 4)
    assert sizes.tolist() == [[5, 2, 2, 0]]
    assert torch.allclose(means[0, 0], x[0, [0, 3, 6, 7, 8]].mean(0))
    assert torch.allclose(means[0, 1], x[0, [1, 2]].mean(0))
    assert torch.equal(means[0, 3], torch.zeros(2))


def test_uniform_area_collapses_and_distinct_patch_stays_alone():
    g = 24
    x = torch.zeros(2, g * g, 4)
    x[1, 100] = torch.tensor([5.0, 0, 0, 0])
    labels, counts, roots, _ = C.cluster(C.affinity_from_features(x, g), g)
    assert counts[0] < 10  # a uniform tile: a handful of clusters (border clamping adds a few)
    assert (labels[1] == labels[1, 100]).sum() == 1  # the distinct patch is its own cluster
    # vectorised across tiles: same result tile by tile
    l0, c0, _, _ = C.cluster(C.affinity_from_features(x[:1], g), g)
    assert torch.equal(l0[0], labels[0])


def test_geollava_steps_on_a_hand_computed_3x3_tile():
    """Clusters {0,1,3,4} (root 0), {2,5} (root 2), {6,7,8} (root 6); scores by hand."""
    from engine.selection.geollava import pick_clusters

    spec = {p: {4: 1.0} for p in range(9)}
    spec[1] = {3: 1.0}  # -> 0
    spec[3] = {1: 1.0}  # -> 0
    spec[4] = {0: 1.0}  # -> 0
    spec[5] = {1: 1.0}  # -> 2
    spec[7] = {3: 1.0}  # -> 6
    spec[8] = {3: 1.0}  # -> 7 -> 6
    aff = aff_from(spec)
    x = torch.tensor([[1.0, 0], [1, 0], [0, 2], [1, 0], [1, 0], [0, 4], [3, 3], [3, 3], [3, 3]])[None]
    cls = torch.tensor([[1.0, 1.0]])
    q = torch.nn.Linear(2, 2)
    v = torch.nn.Linear(2, 2)
    with torch.no_grad():
        q.weight.copy_(torch.tensor([[1.0, 0], [0, 2]]))
        q.bias.copy_(torch.tensor([0.5, 0]))
        v.weight.copy_(torch.eye(2))
        v.bias.copy_(torch.tensor([0.0, 1.0]))
    # q = (1.5, 2); centres (1,0), (0,3), (3,3); v = (1,1), (0,4), (3,4)
    # scores = (1.5*1 + 2*1, 2*4, 1.5*3 + 2*4) / sqrt(2) = (3.5, 8, 12.5) / sqrt(2)
    pick = pick_clusters(cls, x, q, v, affinity=lambda _: aff, k=2)
    assert [m.tolist() for m in pick.members] == [[2, 5], [6, 7, 8]]  # top 2, spatial order
    torch.testing.assert_close(pick.scores, torch.tensor([8.0, 12.5]) / 2**0.5)
    torch.testing.assert_close(pick.vectors, torch.tensor([[0.0, 3.0], [3.0, 3.0]]))
    # k larger than the clusters: all three, spatial order; faithful: plus zero slots
    pick = pick_clusters(cls, x, q, v, affinity=lambda _: aff, k=5, faithful_empty_slots=True)
    assert [m.tolist() for m in pick.members] == [[0, 1, 3, 4], [2, 5], [6, 7, 8], [], []]
    assert torch.equal(pick.vectors[3:], torch.zeros(2, 2))
    # the zero vector's score: q . v_proj(0) / sqrt(2) = (1.5*0 + 2*1) / sqrt(2)
    torch.testing.assert_close(pick.scores[3:], torch.full((2,), 2.0 / 2**0.5))
    # k above the tile's 9 patches: slots stop at 9 a tile (the released code caps MAX_TOKENS at N)
    pick = pick_clusters(cls, x, q, v, affinity=lambda _: aff, k=20, faithful_empty_slots=True)
    assert len(pick.members) == 9 and sum(len(m) == 0 for m in pick.members) == 6


def test_nan_affinity_counts_as_the_largest_weight_as_argmax_does():
    """A reghead that overflows (fp16) gives NaN weights. The released code's argmax over the
    dense row takes the first NaN; before, a NaN row matched no maximum, its parent was an
    index past the tile and pointer jumping crashed with an index error."""
    nan = float("nan")
    a = aff_from({4: {1: 0.9, 5: nan, 7: nan}, 0: {s: nan for s in range(9)}, 8: {0: 0.6}})
    par = C.parents(a, 3)[0]
    assert par[4].item() == 5  # slot 5 = (0, 1) = patch 5 < 7 (slot 7), beats the finite 0.9
    assert par[0].item() == 0  # every slot NaN: the lowest-index neighbour (itself)
    assert par[8].item() == 4  # a finite row is untouched
    labels, counts, roots, _ = C.cluster(a, 3)
    assert roots.max().item() < 9 and int(counts[0]) >= 1
    dense = torch.zeros(9, 9)  # the released code: argmax over the dense N x N row
    for k, j in enumerate(C.neighbour_index(3)[4].tolist()):
        dense[4, j] += a[0, 4, k]
    assert int(torch.argmax(dense[4])) == par[4].item()
