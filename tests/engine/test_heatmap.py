"""Heatmap GeoTIFF and anchors GeoJSON: CRS, transform, nodata where pruned, exact footprints."""

from __future__ import annotations

import warnings

import numpy as np
import rasterio
import torch
from shapely.geometry import shape

from engine.geometry import TokenGeometry
from engine.heatmap import write_heatmap
from engine.protocol import ANCHOR_PROPERTIES
from engine.raster import read_raster
from engine.selection.base import Selection
from engine.tiling import plan_tiles
from rasters import write_geotiff


def geometry_for(tmp_path, crs="EPSG:32633", size=(700, 500)):
    w, h = size
    arr = (np.arange(w * h).reshape(h, w) % 251).astype(np.uint8)
    path = write_geotiff(tmp_path / "src.tif", np.stack([arr] * 3), crs=crs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = read_raster(path)
    return TokenGeometry.build(image, plan_tiles(image.size)), path


def make_selection(geometry):
    """Four tokens: a 3-patch cluster, a single patch, a pure-padding patch, an empty slot."""
    valid = geometry.patch_valid.reshape(-1)
    good = np.nonzero(valid)[0]
    pad = np.nonzero(geometry.patch_padding.reshape(-1))[0]
    assert pad.size, "test raster must produce padding"
    members = [good[:3], good[200:201], pad[:1], np.zeros(0, np.int64)]
    return Selection(embeds=torch.zeros(4, 2), members=[m.astype(np.int64) for m in members],
                     scores=np.array([0.5, 2.0, 9.0, 1.0], np.float32),
                     roles=["merged", "anchor", "kept", "kept"], candidates=100, strategy="test")


def test_geotiff_has_source_crs_grid_transform_and_nodata(tmp_path):
    geometry, src = geometry_for(tmp_path)
    sel = make_selection(geometry)
    files = write_heatmap(sel, geometry, tmp_path / "out", "q1")
    grid = geometry.token_grid()
    with rasterio.open(files.tif_path) as ds, rasterio.open(src) as s:
        assert ds.crs == s.crs
        assert ds.transform.almost_equals(grid.transform)
        assert (ds.width, ds.height) == (grid.width, grid.height)
        assert ds.dtypes[0] == "float32" and np.isnan(ds.nodata)
        # QGIS shows the band description in the legend: it says what a clear cell is
        assert ds.descriptions[0] == "token score (test); clear: pruned token or nodata"
        data = ds.read(1)
        # the grid covers the raster: its bounds contain the source bounds (padding around)
        assert ds.bounds.left <= s.bounds.left + 1e-6 and ds.bounds.right >= s.bounds.right - 1e-6
    ids = grid.ids_grid()
    expected = np.full(data.shape, np.nan, np.float32)
    for m, score in zip(sel.members[:2], sel.scores[:2]):
        for i in m:
            expected[ids == i] = score
    np.testing.assert_array_equal(data, expected)  # padding token and the rest: nodata
    assert np.isnan(data).sum() == data.size - 4
    # a painted cell's centre lies inside its patch's map box
    i = int(sel.members[1][0])
    r, c = np.argwhere(ids == i)[0]
    x, y = grid.transform @ (c + 0.5, r + 0.5)
    x0, y0, x1, y1 = geometry.boxes_map([i])[0]
    assert x0 <= x <= x1 and y0 <= y <= y1


def test_geojson_footprints_are_member_unions(tmp_path):
    geometry, _ = geometry_for(tmp_path)
    sel = make_selection(geometry)
    gj = write_heatmap(sel, geometry, tmp_path, "q2").geojson
    assert gj["type"] == "FeatureCollection"
    assert gj["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
    assert "PROJCS" in gj["crs_wkt"] or "PROJCRS" in gj["crs_wkt"]
    feats = gj["features"]
    assert len(feats) == 2  # padding-only and empty tokens are not drawn
    for f, k in zip(feats, (0, 1)):
        assert set(f["properties"]) == set(ANCHOR_PROPERTIES)
        assert f["properties"]["rank"] == k
        assert f["properties"]["role"] == sel.roles[k]
        assert f["properties"]["n_patches"] == len(sel.members[k])
        assert f["properties"]["tile"] == int(sel.members[k][0] // 576)
        ref = geometry.footprint(sel.members[k], "map")
        assert shape(f["geometry"]).symmetric_difference(ref).area < 1e-6 * ref.area
        # the footprint lies inside its tile's footprint
        tile = f["properties"]["tile"]
        tile_fp = geometry.footprint(np.arange(tile * 576, tile * 576 + 576), "map")
        assert tile_fp.buffer(1e-6).contains(shape(f["geometry"]))


def test_no_crs_raster_gives_pixel_coordinates(tmp_path):
    geometry, _ = geometry_for(tmp_path, crs=None, size=(400, 300))
    sel = make_selection(geometry)
    files = write_heatmap(sel, geometry, tmp_path, "q3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(files.tif_path) as ds:
            assert ds.crs is None
            assert ds.transform.almost_equals(geometry.token_grid().transform)
    assert "crs" not in files.geojson and "crs_wkt" not in files.geojson
    minx, miny, maxx, maxy = shape(files.geojson["features"][0]["geometry"]).bounds
    assert 0 <= minx < maxx <= 400 and 0 <= miny < maxy <= 300


def test_edge_cells_mostly_over_padding_hold_no_score(tmp_path):
    """A 500 x 333 px raster is scaled to 505 px across a 672 px canvas: its left and right
    columns of cells are 1/14 image, 13/14 padding. Painted whole, such a cell showed its token's
    full score over the area beyond the raster. Every cell that holds a score is now at least half
    over the raster; the mostly-padding token keeps its anchor, cut to the image."""
    geometry, src = geometry_for(tmp_path, size=(500, 333))
    image_share = geometry.layout.patch_image_fraction().reshape(-1)
    valid = np.nonzero(geometry.patch_valid.reshape(-1))[0]
    sliver = valid[image_share[valid] < 0.5]
    assert sliver.size, "test raster must have edge cells that are mostly padding"
    members = [np.array([i], np.int64) for i in valid]  # every valid patch its own kept token
    sel = Selection(embeds=torch.zeros(len(members), 2), members=members,
                    scores=np.ones(len(members), np.float32), roles=["kept"] * len(members),
                    candidates=len(members), strategy="test")
    files = write_heatmap(sel, geometry, tmp_path / "out", "edge")
    with rasterio.open(files.tif_path) as ds, rasterio.open(src) as s:
        data, t, b = ds.read(1), ds.transform, s.bounds
    rows, cols = np.nonzero(~np.isnan(data))
    x0, y1 = t * (cols, rows)
    x1, y0 = t * (cols + 1, rows + 1)
    inside = ((np.minimum(x1, b.right) - np.maximum(x0, b.left)).clip(0)
              * (np.minimum(y1, b.top) - np.maximum(y0, b.bottom)).clip(0)) / ((x1 - x0) * (y1 - y0))
    assert inside.min() >= 0.5 - 1e-6, inside.min()
    assert rows.size == valid.size - sliver.size  # every other valid patch is painted
    ids = geometry.token_grid().ids_grid()
    assert np.isnan(data[np.isin(ids, sliver)]).all()
    drawn = {f["properties"]["rank"] for f in files.geojson["features"]}
    assert drawn == set(range(len(members)))  # anchors of the sliver tokens too, cut to the image
    for f in files.geojson["features"]:
        fx0, fy0, fx1, fy1 = shape(f["geometry"]).bounds
        assert b.left - 1e-6 <= fx0 and fx1 <= b.right + 1e-6


def test_geojson_n_patches_counts_all_members_also_padding(tmp_path):
    """n_patches = all members (heatmap doc), not just the valid ones that are drawn."""
    geometry, _ = geometry_for(tmp_path)
    valid = geometry.patch_valid.reshape(-1)
    good = np.nonzero(valid)[0]
    pad = np.nonzero(geometry.patch_padding.reshape(-1))[0]
    members = np.concatenate([good[:2], pad[:3]]).astype(np.int64)
    sel = Selection(embeds=torch.zeros(1, 2), members=[members], scores=np.array([1.0], np.float32),
                    roles=["merged"], candidates=100, strategy="test")
    feats = write_heatmap(sel, geometry, tmp_path, "np").geojson["features"]
    assert len(feats) == 1 and feats[0]["properties"]["n_patches"] == 5


def test_a_patch_shared_by_two_tokens_shows_the_larger_score(tmp_path):
    geometry, _ = geometry_for(tmp_path)
    good = np.nonzero(geometry.patch_valid.reshape(-1))[0]
    shared = int(good[10])
    sel = Selection(embeds=torch.zeros(2, 2),
                    members=[np.array([shared, good[11]], np.int64), np.array([shared], np.int64)],
                    scores=np.array([3.0, 1.0], np.float32), roles=["merged", "anchor"],
                    candidates=100, strategy="test")
    files = write_heatmap(sel, geometry, tmp_path, "shared")
    ids = geometry.token_grid().ids_grid()
    with rasterio.open(files.tif_path) as ds:
        data = ds.read(1)
    assert data[ids == shared].tolist() == [3.0]


def test_rotated_raster_footprints_have_the_exact_corners(tmp_path):
    from affine import Affine

    # rotated, with pixels twice as tall as wide: the matrix is not symmetric
    rotated = Affine.translation(500000, 5000000) @ Affine.rotation(30) @ Affine.scale(10, -20)
    w, h = 700, 500
    arr = (np.arange(w * h).reshape(h, w) % 251).astype(np.uint8)
    path = write_geotiff(tmp_path / "rot.tif", np.stack([arr] * 3), transform=rotated)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = read_raster(path)
    geometry = TokenGeometry.build(image, plan_tiles(image.size))
    good = np.nonzero(geometry.patch_valid.reshape(-1))[0]
    members = [good[:3].astype(np.int64), good[200:201].astype(np.int64)]
    sel = Selection(embeds=torch.zeros(2, 2), members=members, scores=np.array([1.0, 2.0], np.float32),
                    roles=["merged", "anchor"], candidates=100, strategy="test")
    feats = write_heatmap(sel, geometry, tmp_path, "rot").geojson["features"]
    for f, m in zip(feats, members):
        from shapely.ops import unary_union
        ref = unary_union(geometry.patch_polygons(m, "map"))  # exact corners via the Affine
        assert shape(f["geometry"]).symmetric_difference(ref).area < 1e-6 * ref.area
