"""Property-based tests (hypothesis) of the tiling plan, the token geometry and the heatmap, over
raster sizes from 1 px to 200,000 px a side, odd aspect ratios, one-tile / one-row / one-column
grids, rotated and sheared geotransforms, nodata and AOI windows at the raster's edges:

* the chosen canvas is one of the pinpoints and holds the whole resized image, which the
  patches tile exactly (no overlap, no gap; pure padding patches hold no image);
* a token's footprint lies inside its tile and the image, agrees with the affine transform
  (area, member patches covered) and is the same traced in one pass (`footprints`) or alone;
* the heatmap GeoTIFF is the token grid (size, transform, CRS, NaN nodata) painted only on the
  kept tokens' valid, mostly-image patches.

Fast and deterministic: derandomized, a few dozen examples a property."""

import math
import warnings

import numpy as np
import rasterio
import shapely
import torch
from affine import Affine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shapely.geometry import box

from engine.geometry import TokenGeometry
from engine.heatmap import MIN_IMAGE_FRACTION, write_heatmap
from engine.raster import RasterError, RasterImage, read_for_tiling
from engine.selection.base import Selection
from engine.tiling import GRID, PATCH, TILE, anyres_pinpoints, plan_tiles, select_best_resolution
from rasters import write_geotiff

N = GRID * GRID
FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
sides = st.one_of(st.integers(1, 40), st.integers(1, 5000), st.integers(1, 200_000))


def box_areas(b):
    return np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)


@FAST
@given(w=sides, h=sides)
def test_the_plan_puts_the_whole_image_on_a_pinpoint_canvas_tiled_exactly(w, h):
    layout = plan_tiles((w, h))
    cw, ch = layout.canvas_size
    nw, nh = layout.scaled_size
    ox, oy = layout.offset
    assert (cw, ch) in set(anyres_pinpoints()) and (cw, ch) == select_best_resolution((w, h), anyres_pinpoints())
    assert (layout.cols * TILE, layout.rows * TILE) == (cw, ch)
    assert 0 < nw <= cw and 0 < nh <= ch and nw == cw or nh == ch  # one side fills the canvas
    assert 0 <= ox and ox + nw <= cw and 0 <= oy and oy + nh <= ch
    # image corners land on the scaled image's corners, and the mapping inverts exactly
    assert np.allclose(layout.image_to_canvas @ (0, 0), (ox, oy))
    assert np.allclose(layout.image_to_canvas @ (w, h), (ox + nw, oy + nh))
    assert np.allclose(layout.canvas_to_image @ (layout.image_to_canvas @ (w / 3, h / 7)), (w / 3, h / 7))
    # the patches, clipped to the image, tile it: their areas add up to the image's
    boxes = layout.patch_boxes(clip=True)
    area = box_areas(boxes)
    assert math.isclose(area.sum(), w * h, rel_tol=1e-9)
    image_patch = layout.patch_valid()
    assert (area[image_patch] > 0).all() and (area[~image_patch] <= 1e-9 * w * h).all()


def image(w, h, valid, transform):
    return RasterImage(pixels=np.zeros((h, w, 3), np.uint8), valid=valid,
                       image_to_source=Affine(1.5, 0, 10, 0, 1.5, 20), source_transform=transform,
                       crs_wkt=None, source_size=(w, h), window=(0, 0, w, h), bands=(1, 2, 3),
                       path="mem")


TRANSFORMS = {
    "north-up": Affine(2.0, 0, 1000.0, 0, -2.0, 5000.0),
    "south-up": Affine(0.5, 0, -3.0, 0, 0.25, 7.0),
    "rotated": Affine.rotation(30) * Affine.scale(3, -3),
    "sheared": Affine(1, 0.3, 5, 0.2, -1, 9),
}


@FAST
@given(rows=st.integers(1, 4), cols=st.integers(1, 4), w=st.integers(1, 1400), h=st.integers(1, 1400),
       transform=st.sampled_from(sorted(TRANSFORMS)), seed=st.integers(0, 2**16),
       n_groups=st.integers(1, 40))
def test_token_footprints_stay_in_their_tile_and_follow_the_transform(rows, cols, w, h, transform,
                                                                      seed, n_groups):
    rng = np.random.default_rng(seed)
    valid = rng.random((h, w)) > 0.3
    geom = TokenGeometry.build(image(w, h, valid, TRANSFORMS[transform]),
                               plan_tiles((w, h), [(cols * TILE, rows * TILE)]))
    layout = geom.layout
    # tokens: random disjoint groups of patches of one tile each
    tile_of = rng.integers(layout.n_tiles, size=n_groups)
    groups = [t * N + rng.choice(N, size=rng.integers(1, 40), replace=False) for t in tile_of]
    taken = np.zeros(layout.n_patches, bool)
    for i, g in enumerate(groups):
        groups[i] = g[~taken[g]]
        taken[g] = True
    groups = [g for g in groups if g.size]
    assert groups
    traced_map = geom.footprints(groups, "map")
    traced_image = geom.footprints(groups, "image")
    i2m = geom.image_to_map
    det = abs(i2m.determinant)
    frame = box(0, 0, w, h)
    to_map = [i2m.a, i2m.b, i2m.d, i2m.e, i2m.xoff, i2m.yoff]
    boxes = geom.patch_boxes_image.reshape(-1, 4)
    # patches with image in them (a padding patch's clipped box is a line, or a float sliver)
    image_patch = layout.patch_valid().reshape(-1)
    canvas_to_image = layout.canvas_to_image
    for g, fp_map, fp_image in zip(groups, traced_map, traced_image):
        alone = geom.footprint(g, "map")
        assert fp_map.symmetric_difference(alone).area <= 1e-6 * max(alone.area, 1e-12)
        # inside the image, and inside its tile (the tile's canvas square mapped back)
        tr, tc = divmod(int(g[0]) // N, layout.cols)
        x0, y0 = canvas_to_image @ (tc * TILE, tr * TILE)
        x1, y1 = canvas_to_image @ ((tc + 1) * TILE, (tr + 1) * TILE)
        assert fp_image.difference(frame.intersection(box(x0, y0, x1, y1))).area <= 1e-9 * w * h
        # its area is its patches' clipped area, scaled by the transform's determinant
        area = box_areas(boxes[g]).sum()
        assert math.isclose(fp_image.area, area, rel_tol=1e-6, abs_tol=1e-9)
        assert math.isclose(fp_map.area, area * det, rel_tol=1e-6, abs_tol=1e-9)
        # in map space it is the image-space footprint through the affine transform
        expected = shapely.affinity.affine_transform(fp_image, to_map)
        assert fp_map.symmetric_difference(expected).area <= 1e-6 * max(expected.area, 1e-12)
        for pid in g[image_patch[g]][:3]:  # it covers its member image patches
            patch = geom.patch_polygons([pid], "map")[0]
            assert patch.difference(fp_map).area <= 1e-6 * patch.area
    # the token grid's cell (col, row) is the canvas patch corner through image -> map
    grid = geom.token_grid()
    for c, r in [(0, 0), (grid.width, grid.height), (7 % grid.width, 5 % grid.height)]:
        expected = i2m @ (canvas_to_image @ (c * PATCH, r * PATCH))
        assert np.allclose(grid.transform @ (c, r), expected, rtol=1e-9, atol=1e-6)


@st.composite
def rasters_and_windows(draw):
    w = draw(st.one_of(st.integers(1, 12), st.integers(1, 700)))
    h = draw(st.one_of(st.integers(1, 12), st.integers(1, 700)))
    edge = draw(st.sampled_from(["whole", "left", "right", "top", "bottom", "corner", "beyond"]))
    ww, wh = draw(st.integers(1, w)), draw(st.integers(1, h))
    window = {"whole": None, "left": [0, h - wh, ww, wh], "right": [w - ww, 0, ww, wh],
              "top": [w - ww, 0, ww, wh], "bottom": [0, h - wh, ww, wh],
              "corner": [w - ww, h - wh, ww, wh], "beyond": [w - ww, h - wh, ww + 50, wh + 50]}[edge]
    return w, h, window, draw(st.integers(0, 2**16)), draw(st.booleans())


@FAST
@given(case=rasters_and_windows(), budget=st.integers(1, 400))
def test_heatmap_is_the_token_grid_painted_on_kept_valid_patches(tmp_path_factory, case, budget):
    w, h, window, seed, nodata = case
    tmp = tmp_path_factory.mktemp("heat")
    rng = np.random.default_rng(seed)
    arr = rng.integers(1, 256, (h, w)).astype(np.uint8)
    if nodata:
        arr[: h // 2, : w // 3] = 0
    path = write_geotiff(tmp / "r.tif", arr, nodata=0 if nodata else None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = read_for_tiling(path, aoi=window)
    except RasterError:  # e.g. the window holds only nodata
        return
    geom = TokenGeometry.build(im, plan_tiles(im.size, choose_from=im.window[2:]))
    layout = geom.layout
    # a selection: `budget` random disjoint groups of patches, each inside one tile
    ids = rng.permutation(layout.n_patches)[: budget * 3]
    ids = ids[np.argsort(ids // N, kind="stable")]
    members = [g for g in np.array_split(ids, min(budget, ids.size)) if g.size]
    members = [g[g // N == g[0] // N] for g in members]
    scores = rng.random(len(members)).astype(np.float32)
    sel = Selection(embeds=torch.zeros(len(members), 2), members=members, scores=scores,
                    roles=["kept"] * len(members), candidates=layout.n_tiles * 144, strategy="t")
    files = write_heatmap(sel, geom, tmp, "q")
    grid = geom.token_grid()
    with rasterio.open(files.tif_path) as ds:
        data = ds.read(1)
        assert (ds.width, ds.height) == (grid.width, grid.height)
        assert ds.transform.almost_equals(grid.transform)
        assert ds.crs is not None and ds.crs.to_epsg() == 32633
        assert ds.nodata is not None and math.isnan(ds.nodata)
    expected = np.full(layout.n_patches, np.nan)
    paint = geom.patch_valid.reshape(-1) & (layout.patch_image_fraction().reshape(-1) >= MIN_IMAGE_FRACTION)
    for m, s in zip(members, scores):
        expected[m[paint[m]]] = s
    np.testing.assert_array_equal(data, grid.to_grid(expected.astype(np.float32)))
    # every token with a valid patch is an anchor, inside the window read (source pixels)
    valid = geom.patch_valid.reshape(-1)
    drawn = [m[valid[m]] for m in members if valid[m].any()]
    assert len(files.geojson["features"]) == len(drawn)
    c0, r0, ww, wh = im.window
    for fp in geom.footprints(drawn, "source"):
        assert not fp.is_empty
        assert fp.difference(box(c0, r0, c0 + ww, r0 + wh)).area <= 1e-9 * ww * wh
