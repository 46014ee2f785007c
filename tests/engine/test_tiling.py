"""Tiling reproduces the released checkpoint's anyres geometry exactly."""

import math

import numpy as np
import pytest

from engine.tiling import (
    GRID,
    PATCH,
    TILE,
    anyres_pinpoints,
    make_canvas,
    make_tiles,
    plan_tiles,
    scaled_size,
    select_best_resolution,
    tiling_read_budget,
)


def test_pinpoints_properties():
    pins = anyres_pinpoints()
    assert len(pins) == len(set(pins))
    grid = [(w // TILE, h // TILE) for w, h in pins]
    assert all(w % TILE == 0 and h % TILE == 0 for w, h in pins)
    assert (1, 1) not in grid
    assert all(a * b <= 576 and max(a, b) <= 49 * min(a, b) for a, b in grid)
    # complete: every admissible pair is present
    expected = {(a, b) for a in range(1, 577) for b in range(1, 577)
                if a * b <= 576 and max(a, b) <= 49 * min(a, b) and (a, b) != (1, 1)}
    assert set(grid) == expected
    # the training script's order: by width then height; known first/last entries
    assert grid == sorted(grid)
    assert pins[0] == (336, 672) and pins[47] == (336, 16464) and pins[48] == (672, 336)
    assert (1008, 49392) in pins and (1008, 49728) not in pins and (672, 32928) in pins
    assert (8064, 8064) in pins


@pytest.mark.parametrize(
    "size, cols, rows, tokens",
    [((2000, 1912), 6, 6, 864), ((4000, 3000), 12, 9, 2592), ((800, 600), 3, 2, 144)],
)
def test_reference_examples(size, cols, rows, tokens):
    layout = plan_tiles(size)
    assert (layout.cols, layout.rows) == (cols, rows)
    assert layout.canvas_size == (cols * TILE, rows * TILE)
    assert layout.n_tiles * 24 == tokens  # 24 kept tokens a tile on the unires path


def test_select_best_resolution_rules():
    pins = anyres_pinpoints()
    # fits without downscale -> smallest canvas holding it
    assert select_best_resolution((700, 300), pins) == (1008, 336)
    # huge square -> the 576-tile canvas
    assert select_best_resolution((27000, 27000), pins) == (8064, 8064)
    # effective resolution beats waste: a bigger canvas that keeps more pixels wins
    assert select_best_resolution((400, 400), [(336, 336), (672, 672)]) == (672, 672)
    # equal effective -> least waste
    assert select_best_resolution((300, 300), [(672, 672), (336, 672)]) == (336, 672)
    # exact tie (same effective and waste) -> the earlier pinpoint, as the original's strict '<'
    assert select_best_resolution((300, 300), [(336, 672), (672, 336)]) == (336, 672)
    assert select_best_resolution((300, 300), [(672, 336), (336, 672)]) == (672, 336)
    # very elongated strip uses a long canvas
    w, h = select_best_resolution((100, 20000), pins)
    assert h / w > 10


def _reference_select(size, pins):
    """Straight transcription of the documented rule, for cross-checking."""
    W, H = size
    best = None
    for pw, ph in pins:
        s = min(pw / W, ph / H)
        eff = min(int(W * s) * int(H * s), W * H)
        key = (eff, -(pw * ph - eff))
        if best is None or key > best[0]:
            best = (key, (pw, ph))
    return best[1]


def test_select_matches_rule_on_random_sizes():
    rng = np.random.default_rng(1)
    pins = anyres_pinpoints()
    for _ in range(40):
        size = (int(rng.integers(50, 30000)), int(rng.integers(50, 30000)))
        assert select_best_resolution(size, pins) == _reference_select(size, pins)


def test_scaled_side_is_ceiled():
    # width limits (scale_w < scale_h): width fills, height = ceil(h * scale_w)
    assert scaled_size((2000, 1912), (2016, 2016)) == (2016, math.ceil(1912 * (2016 / 2000)))
    # height limits: height fills, width ceiled (800 * 1.12 is 896.0000000000001 in floats -> 897)
    assert scaled_size((800, 600), (1008, 672)) == (897, 672)
    # equal scales -> the height branch; exact fit
    assert scaled_size((4000, 3000), (4032, 3024)) == (4032, 3024)


def test_layout_offsets_and_padding():
    layout = plan_tiles((2000, 1912))
    assert layout.scaled_size == (2016, 1928)
    assert layout.offset == (0, (2016 - 1928) // 2)
    valid = layout.patch_valid()
    assert valid.shape == (36, 576)
    # 44 px of top padding: the first 3 patch rows (42 px) of the top tile row are pure padding
    top = valid[:6].reshape(6, GRID, GRID)
    assert not top[:, :3, :].any() and top[:, 3:, :].all()
    bottom = valid[30:].reshape(6, GRID, GRID)
    assert bottom[:, :21, :].all() and not bottom[:, 21:, :].any()  # 336-44-... rows
    # no padding at all for an exact fit
    assert plan_tiles((4000, 3000)).patch_valid().all()


def test_patch_boxes_invert_scale_and_offset():
    layout = plan_tiles((800, 600))
    sx, sy = layout.scale
    ox, oy = layout.offset
    boxes = layout.patch_boxes()
    assert boxes.shape == (6, 576, 4)
    # tile 1 (row 0, col 1), patch (row 5, col 7): canvas box
    t, pr, pc = 1, 5, 7
    cx0, cy0 = 1 * TILE + pc * PATCH, 0 * TILE + pr * PATCH
    b = boxes[t, pr * GRID + pc]
    np.testing.assert_allclose(b, [(cx0 - ox) / sx, (cy0 - oy) / sy, (cx0 + PATCH - ox) / sx, (cy0 + PATCH - oy) / sy])
    # forward mapping of an image pixel lands inside the patch whose box contains it
    x, y = 400.3, 250.7
    X, Y = layout.image_to_canvas @ (x, y)
    tcol, trow = int(X // TILE), int(Y // TILE)
    pid = int((Y % TILE) // PATCH) * GRID + int((X % TILE) // PATCH)
    bb = boxes[trow * layout.cols + tcol, pid]
    assert bb[0] <= x < bb[2] and bb[1] <= y < bb[3]
    # every patch box round-trips through the affine pair
    canvas = layout.patch_boxes_canvas().reshape(-1, 4)
    back = np.array([layout.image_to_canvas @ (r[0], r[1]) for r in boxes.reshape(-1, 4)])
    np.testing.assert_allclose(back, canvas[:, :2], atol=1e-9)
    # clipped boxes stay inside the image; padding columns collapse
    clipped = layout.patch_boxes(clip=True)
    assert clipped[..., 0::2].min() >= 0 and clipped[..., 0::2].max() <= 800
    assert (layout.patch_valid() == (layout.patch_image_fraction() > 0)).all()


def test_patch_grid_rc():
    layout = plan_tiles((800, 600))  # 3 x 2 tiles -> 72 x 48 patches
    assert layout.grid_size == (72, 48)
    r, c = layout.patch_grid_rc([0, 23, 24, 576, 576 * 3 + 25])
    assert list(r) == [0, 0, 1, 0, 25] and list(c) == [0, 23, 0, 24, 1]


def test_make_tiles_layout_and_overview():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)
    layout = plan_tiles((800, 600))
    tiles = make_tiles(img, layout)
    assert tiles.shape == (7, 336, 336, 3) and tiles.dtype == np.uint8
    canvas = make_canvas(img, layout)
    assert canvas.shape == (672, 1008, 3)
    ox = layout.offset[0]
    assert not canvas[:, :ox].any() and not canvas[:, ox + layout.scaled_size[0]:].any()
    # tiles are the canvas cut row by row
    np.testing.assert_array_equal(tiles[1 + 4], canvas[336:672, 336:672])
    np.testing.assert_array_equal(tiles[1 + 2], canvas[0:336, 672:1008])
    # overview = plain bicubic resize of the whole image (Pillow default for RGB)
    from PIL import Image

    ref = np.asarray(Image.fromarray(img).resize((336, 336), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(tiles[0], ref)
    ref_scaled = np.asarray(Image.fromarray(img).resize(layout.scaled_size, Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(canvas[:, ox:ox + layout.scaled_size[0]], ref_scaled)


def test_make_tiles_rejects_wrong_size():
    layout = plan_tiles((800, 600))
    with pytest.raises(ValueError, match="planned"):
        make_tiles(np.zeros((10, 10, 3), np.uint8), layout)


def test_read_budget():
    assert tiling_read_budget((27000, 27000)) == 8064 * 8064
    assert tiling_read_budget((800, 600)) == 1008 * 672
    # reading at that budget gives a tiling on the same biggest canvas
    from engine.raster import read_size_for

    w, h = read_size_for((27000, 27000), tiling_read_budget((27000, 27000)))
    assert (w, h) == (8064, 8064) and plan_tiles((w, h)).n_tiles == 576


def test_reading_at_the_budget_keeps_the_canvas():
    from engine.raster import read_size_for

    rng = np.random.default_rng(3)
    pins = anyres_pinpoints()
    for _ in range(40):
        size = (int(rng.integers(100, 60000)), int(rng.integers(100, 60000)))
        canvas = select_best_resolution(size, pins)
        read = read_size_for(size, tiling_read_budget(size))
        assert read[0] * read[1] <= canvas[0] * canvas[1]
        assert select_best_resolution(read, pins) == canvas


def test_a_reduced_read_keeps_the_canvas_of_its_window():
    """33335 x 4167 px is read reduced to 22808 x 2851; planned on that reduced size, the rounding
    picked a 512-tile canvas instead of the window's 576 (about 1 size in 3000). The pipeline
    plans on the window it read."""
    from engine.raster import read_size_for

    window = (33335, 4167)
    canvas = select_best_resolution(window, anyres_pinpoints())
    read = read_size_for(window, tiling_read_budget(window))
    assert read == (22808, 2851) and canvas == (21504, 3024)
    assert plan_tiles(read).canvas_size != canvas  # the rounding trap this guards against
    layout = plan_tiles(read, choose_from=window)
    assert layout.canvas_size == canvas and layout.n_tiles == 576
    assert layout.image_size == read and layout.scaled_size[0] == canvas[0]


def test_health_says_the_most_pixels_any_window_is_read_at():
    """/health's max_read_pixels: a client (the QGIS plugin) reduces an upload larger than it to it,
    so no window's read budget may exceed it, and the canvas chosen for a window larger than it is
    the one chosen for that window reduced to it (aspect kept): the engine reads the same."""
    import math

    from engine.pipeline import max_read_pixels
    from engine.tiling import anyres_pinpoints, select_best_resolution, tiling_read_budget

    most = max_read_pixels()
    assert most == 8064 * 8064 == max(w * h for w, h in anyres_pinpoints())
    assert max_read_pixels([(672, 336), (336, 336)]) == 672 * 336
    for w, h in [(27000, 20250), (27000, 27000), (9000, 9000), (16200, 16200), (40000, 3000), (12000, 11000)]:
        assert tiling_read_budget((w, h)) <= most
        f = math.sqrt(most / (w * h))
        reduced = (math.ceil(w * f), math.ceil(h * f))  # as the plugin reduces it (upload.reduced_size)
        assert select_best_resolution(reduced, anyres_pinpoints()) == select_best_resolution((w, h), anyres_pinpoints())
