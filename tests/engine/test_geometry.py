"""TokenGeometry: patch boxes in image/source/map space, validity, footprints, token grid."""

import numpy as np
import pytest
from affine import Affine

from engine.geometry import TokenGeometry
from engine.raster import read_raster
from engine.tiling import GRID, PATCH, TILE, plan_tiles

try:
    from tests.engine.rasters import DEFAULT_TRANSFORM, write_geotiff
except ImportError:
    from rasters import DEFAULT_TRANSFORM, write_geotiff


def _geom(tmp_path, arr, name="g.tif", **kw):
    read_kw = {k: kw.pop(k) for k in ("aoi", "max_pixels", "bands") if k in kw}
    im = read_raster(write_geotiff(tmp_path / name, arr, **kw), **read_kw)
    layout = plan_tiles(im.size)
    return im, layout, TokenGeometry.build(im, layout)


def test_boxes_source_and_map_follow_transforms(tmp_path):
    arr = np.full((600, 800), 50, np.uint8)
    im, layout, g = _geom(tmp_path, arr, aoi=[100, 40, 600, 420], max_pixels=300 * 210)
    assert im.size == (300, 210) and im.image_to_source == Affine(2, 0, 100, 0, 2, 40)
    assert layout.n_tiles >= 2
    ids = np.array([0, 5, 24 * 10 + 3, 576 + 100, 576 + 575])
    img = g.boxes_image(ids)
    np.testing.assert_allclose(img, layout.patch_boxes(clip=True).reshape(-1, 4)[ids])
    src = g.boxes_source(ids)
    np.testing.assert_allclose(src[:, 0], img[:, 0] * 2 + 100)
    np.testing.assert_allclose(src[:, 3], img[:, 3] * 2 + 40)
    mp = g.boxes_map(ids)
    # map box = raster transform applied to the source-pixel box (north-up: y flips)
    t = DEFAULT_TRANSFORM
    for s, m in zip(src, mp):
        x0, y_top = t @ (s[0], s[1])
        x1, y_bot = t @ (s[2], s[3])
        np.testing.assert_allclose(m, [x0, y_bot, x1, y_top])
        assert m[0] <= m[2] and m[1] <= m[3]  # padding patches clip to zero size
    assert g.crs_wkt == im.crs_wkt and g.image_to_map == im.image_to_map


def test_patch_box_matches_tiling_scale_and_offset(tmp_path):
    arr = np.full((600, 800), 80, np.uint8)
    im, layout, g = _geom(tmp_path, arr)
    sx, sy = layout.scale
    ox, oy = layout.offset
    # a fully interior patch: tile (1, 1), patch (12, 12)
    pid = (1 * layout.cols + 1) * 576 + 12 * GRID + 12
    x0 = 336 + 12 * PATCH
    y0 = 336 + 12 * PATCH
    np.testing.assert_allclose(g.boxes_image([pid])[0], [(x0 - ox) / sx, (y0 - oy) / sy,
                                                         (x0 + PATCH - ox) / sx, (y0 + PATCH - oy) / sy])
    centers = g.patch_centers()
    assert centers.shape == (layout.n_tiles, 576, 2)
    b = g.boxes_image([pid])[0]
    np.testing.assert_allclose(centers.reshape(-1, 2)[pid], [(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])
    cm = g.patch_centers("map").reshape(-1, 2)[pid]
    np.testing.assert_allclose(cm, im.image_to_map @ tuple(centers.reshape(-1, 2)[pid]))


def test_padding_patches_invalid(tmp_path):
    arr = np.full((600, 800), 80, np.uint8)
    _, layout, g = _geom(tmp_path, arr)
    assert layout.offset[0] > PATCH  # 800x600 -> 55 px of side padding
    np.testing.assert_array_equal(g.patch_padding, ~layout.patch_valid())
    assert g.patch_padding.any()
    assert not g.patch_valid[g.patch_padding].any()
    assert g.patch_valid[~g.patch_padding].all()  # all data valid here
    # left tile column: the first 3 patch columns are padding (55 px // 14 = 3, fourth is partial)
    t0 = g.patch_padding[0].reshape(GRID, GRID)
    assert t0[:, :3].all() and not t0[:, 3:].any()


def test_nodata_half_rule(tmp_path):
    # 672 x 336 raster -> canvas 672 x 336 exactly (1 pixel = 1 canvas px), 2 tiles
    arr = np.full((336, 672), 100, np.uint8)
    arr[:, :7] = 0  # left half of patch column 0 is nodata -> exactly 50% valid -> valid
    arr[:, 14:14 + 8] = 0  # patch column 1: 8 of 14 columns nodata -> 43% valid -> invalid
    arr[:14, 28:42] = 0  # one fully-nodata patch (row 0, column 2)
    im, layout, g = _geom(tmp_path, arr, nodata=0)
    assert layout.canvas_size == (672, 336) and layout.offset == (0, 0)
    v = g.patch_valid[0].reshape(GRID, GRID)
    assert v[:, 0].all()
    assert not v[:, 1].any()
    assert not v[0, 2] and v[1:, 2].all()
    assert g.patch_valid[1].all()
    np.testing.assert_allclose(g.patch_valid_fraction[0].reshape(GRID, GRID)[0, 1], 6 / 14)


def test_footprint_is_union_not_bbox(tmp_path):
    arr = np.full((336, 672), 100, np.uint8)
    _, layout, g = _geom(tmp_path, arr)
    # an L shape of three patches in tile 0: (0,0), (0,1), (1,0)
    ids = [0, 1, GRID]
    fp_img = g.footprint(ids, space="image")
    assert fp_img.area == pytest.approx(3 * PATCH * PATCH)
    assert fp_img.geom_type == "Polygon"  # adjacent boxes merge into one shape
    assert fp_img.area < fp_img.envelope.area
    fp_map = g.footprint(ids)  # default: map space
    assert fp_map.area == pytest.approx(3 * (PATCH * 10) ** 2)  # 10 m pixels
    x0, y0 = DEFAULT_TRANSFORM @ (0, 0)
    assert fp_map.bounds == pytest.approx((x0, y0 - 2 * PATCH * 10, x0 + 2 * PATCH * 10, y0))
    fp_src = g.footprint(ids, space="source")
    assert fp_src.equals(fp_img)  # full-resolution read: source = image
    # patches across the tile boundary join too
    across = g.footprint([23, 576], space="image")
    assert across.geom_type == "Polygon" and across.area == pytest.approx(2 * PATCH * PATCH)
    assert g.footprint([], space="image").is_empty
    with pytest.raises(IndexError):
        g.boxes_map([2 * 576])
    with pytest.raises(ValueError, match="space"):
        g.footprint([0], space="pixels")
    assert len(g.patch_polygons([0, 1])) == 2


def test_token_grid_georeference(tmp_path):
    arr = np.full((600, 800), 80, np.uint8)
    im, layout, g = _geom(tmp_path, arr)
    grid = g.token_grid()
    assert (grid.width, grid.height) == (layout.cols * GRID, layout.rows * GRID) == (72, 48)
    assert grid.crs_wkt == im.crs_wkt
    # every patch's grid cell maps to the same map box as boxes_map (unclipped -> compare interior)
    ids = np.arange(layout.n_patches)
    r, c = grid.rc(ids)
    inner = ~g.patch_padding.reshape(-1) & (layout.patch_image_fraction().reshape(-1) == 1.0)
    for pid in ids[inner][::97]:
        cell = [grid.transform @ (c[pid], r[pid]), grid.transform @ (c[pid] + 1, r[pid] + 1)]
        (x0, y0), (x1, y1) = cell
        np.testing.assert_allclose(g.boxes_map([pid])[0], [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)])
    ids_grid = grid.ids_grid()
    assert ids_grid.shape == (48, 72) and np.array_equal(np.sort(ids_grid.ravel()), ids)
    assert ids_grid[0, 24] == 576 and ids_grid[24, 0] == 3 * 576
    vals = grid.to_grid(g.patch_valid.astype(float), fill=-1)
    assert vals.shape == (48, 72) and vals[0, 0] == 0.0 and vals[24, 36] == 1.0
    # the grid's origin is the canvas origin, i.e. offset back from the raster origin
    ox, oy = layout.offset
    sx, sy = layout.scale
    np.testing.assert_allclose(grid.transform @ (0, 0), im.image_to_map @ (-ox / sx, -oy / sy))


def test_geometry_on_decimated_big_raster(tmp_path):
    arr = np.zeros((3000, 4000), np.uint8) + 9
    arr[:, :1000] = 0
    im, layout, g = _geom(tmp_path, arr, name="big.tif", nodata=0, overviews=[2, 4, 8], max_pixels=800 * 600)
    assert im.size == (800, 600) and im.image_to_source == Affine(5, 0, 0, 0, 5, 0)
    # the left quarter (source cols < 1000 = image cols < 200) is nodata
    cx = g.patch_centers("source")[..., 0]
    assert not g.patch_valid[cx < 950].any()
    assert g.patch_valid[(cx > 1050) & ~g.patch_padding].all()
    # a patch box in map coordinates = raster transform over its source box
    pid = int(np.flatnonzero(g.patch_valid.reshape(-1))[10])
    s = g.boxes_source([pid])[0]
    m = g.boxes_map([pid])[0]
    t = DEFAULT_TRANSFORM
    np.testing.assert_allclose([m[0], m[3]], t @ (s[0], s[1]))
    np.testing.assert_allclose([m[2], m[1]], t @ (s[2], s[3]))


def test_no_georef_geometry_in_pixels(tmp_path):
    arr = np.full((100, 120), 7, np.uint8)
    im, layout, g = _geom(tmp_path, arr, crs=None)
    assert g.crs_wkt is None
    pid = int(np.flatnonzero(g.patch_valid.reshape(-1))[0])
    np.testing.assert_allclose(g.boxes_map([pid]), g.boxes_source([pid]))
    grid = g.token_grid()
    assert grid.crs_wkt is None and grid.width == layout.cols * GRID


def test_build_checks_sizes(tmp_path):
    arr = np.full((50, 60), 7, np.uint8)
    im = read_raster(write_geotiff(tmp_path / "s.tif", arr))
    with pytest.raises(ValueError, match="planned"):
        TokenGeometry.build(im, plan_tiles((61, 50)))
    assert TILE == 336


def test_batch_footprints_equal_single_footprints(tmp_path):
    """`footprints` (traced from the patch grid) gives exactly `footprint` for every group,
    including groups that cross tiles, edge patches clipped to the image, and overlapping groups
    (which fall back to the per-group union)."""
    arr = np.random.default_rng(0).integers(0, 255, (3, 500, 700), dtype=np.uint8)
    _, _, g = _geom(tmp_path, arr)
    n = g.layout.n_patches
    rng = np.random.default_rng(1)
    groups = [np.arange(0, 30), np.array([575, 576, 600]), np.array([n - 1]),
              rng.choice(np.arange(1000, 2000), 50, replace=False)]
    groups.append(np.array([5, 6, 1500]))  # overlaps groups 0 and maybe 3
    groups.append(np.array([], dtype=np.int64))
    batch = g.footprints(groups, "map")
    for ids, shape in zip(groups, batch):
        single = g.footprint(ids, "map")
        assert shape.symmetric_difference(single).area <= 1e-6 * max(single.area, 1.0)
    assert batch[0].geom_type == "Polygon" and batch[-1].is_empty


def test_valid_fraction_counts_pixels_by_their_centre():
    """A box edge at 0.6 px leaves pixel 0 (centre 0.5) out: only pixel 1 is counted."""
    from engine.geometry import _valid_fraction

    valid = np.array([[False, True, True]])
    boxes = np.array([[[0.6, 0.0, 1.6, 1.0], [0.4, 0.0, 1.4, 1.0]]])
    np.testing.assert_allclose(_valid_fraction(valid, boxes), [[1.0, 0.0]])
