"""Synthetic UHR scenes: georeferenced GeoTIFF with overviews, known object boxes, recall."""

from __future__ import annotations

import numpy as np
import rasterio
import torch

from engine.selection.base import Selection
from engine.synth import make_scene, object_patches, object_recall


def test_scene_is_a_georeferenced_tiled_geotiff_with_objects(tmp_path):
    sc = make_scene(tmp_path / "a.tif", (1200, 900), objects=5, seed=4)
    assert len(sc.objects) == 5
    with rasterio.open(sc.path) as ds:
        assert ds.crs.to_epsg() == 32633 and ds.count == 3 and ds.dtypes[0] == "uint8"
        assert (ds.width, ds.height) == (1200, 900)
        assert ds.overviews(1)  # built for fast decimated reads
        assert ds.compression is not None
        img = ds.read()
        for o in sc.objects:
            x0, y0, x1, y1 = o.box_px
            assert x1 - x0 >= 14 and y1 - y0 >= 4
            patch = img[:, y0:y1, x0:x1].reshape(3, -1)
            assert (patch.mean(1) > 0).all() and patch.max() >= 220  # bright object colour
            # map box matches the pixel box through the transform
            mx0, my1 = ds.transform @ (x0, y0)
            assert np.allclose((mx0, my1), (o.box_map[0], o.box_map[3]))
        # background has several textures (water, forest, fields)
        assert len(np.unique(img[1, ::50, ::50])) > 20


def test_same_seed_same_scene_other_seed_differs(tmp_path):
    a = make_scene(tmp_path / "a.tif", 600, objects=3, seed=1)
    b = make_scene(tmp_path / "b.tif", 600, objects=3, seed=1)
    c = make_scene(tmp_path / "c.tif", 600, objects=3, seed=2)
    with rasterio.open(a.path) as da, rasterio.open(b.path) as db, rasterio.open(c.path) as dc:
        assert np.array_equal(da.read(), db.read())
        assert not np.array_equal(da.read(), dc.read())
    assert [o.box_px for o in a.objects] == [o.box_px for o in b.objects]


def test_object_recall_definition(tmp_path):
    from engine.geometry import TokenGeometry
    from engine.raster import read_raster
    from engine.tiling import plan_tiles

    sc = make_scene(tmp_path / "r.tif", (700, 500), objects=3, seed=0)
    image = read_raster(str(sc.path))
    geo = TokenGeometry.build(image, plan_tiles(image.size))
    obj = object_patches(geo, sc.objects)
    assert obj.size >= 3

    def sel(members):
        n = len(members)
        return Selection(embeds=torch.zeros(n, 2), members=members, scores=np.ones(n),
                         roles=["kept"] * n, candidates=n)

    everything = [np.arange(geo.n_tiles * 576)]
    assert object_recall(sel(everything), geo, sc.objects) == 1.0
    # the one giant token does not count when only small tokens count
    assert object_recall(sel(everything), geo, sc.objects, max_token_patches=4) == 0.0
    half = [np.array([i]) for i in obj[: obj.size // 2]]
    assert object_recall(sel(half), geo, sc.objects) == (obj.size // 2) / obj.size
    assert object_recall(sel([np.array([int(np.setdiff1d(np.arange(10), obj)[0])])]), geo, sc.objects) == 0.0


def test_object_patches_are_valid_patches_a_quarter_covered_or_holding_the_centre(tmp_path):
    from engine.geometry import TokenGeometry
    from engine.raster import read_raster
    from engine.tiling import plan_tiles

    sc = make_scene(tmp_path / "r.tif", (700, 500), objects=0, seed=0)
    image = read_raster(str(sc.path))
    geo = TokenGeometry.build(image, plan_tiles(image.size))
    valid = np.flatnonzero(np.asarray(geo.patch_valid, dtype=bool).reshape(-1))
    assert 0 < valid.size < geo.n_tiles * 576  # the canvas pads the raster
    # a box over everything, padding included: every valid patch, no padding patch
    np.testing.assert_array_equal(object_patches(geo, [(-1000, -1000, 10_000, 10_000)]), valid)
    # nor a nodata patch of the raster
    try:
        from tests.engine.rasters import write_geotiff
    except ImportError:  # pragma: no cover
        from rasters import write_geotiff
    pixels = np.full((3, 500, 700), 120, np.uint8)
    pixels[:, :, :300] = 0
    holed = read_raster(str(write_geotiff(tmp_path / "holed.tif", pixels, nodata=0)))
    holed_geo = TokenGeometry.build(holed, plan_tiles(holed.size))
    holed_valid = np.flatnonzero(np.asarray(holed_geo.patch_valid, dtype=bool).reshape(-1))
    assert holed_valid.size < valid.size
    np.testing.assert_array_equal(object_patches(holed_geo, [(-1000, -1000, 10_000, 10_000)]), holed_valid)
    # an object far smaller than a patch still has the one patch holding its centre
    p = int(valid[valid.size // 2])
    x0, y0, x1, y1 = geo.boxes_source(np.array([p]))[0]
    cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
    assert (x1 - x0) * (y1 - y0) > 4 * 4
    np.testing.assert_array_equal(object_patches(geo, [(cx, cy, cx + 1, cy + 1)]), [p])


def test_a_patch_a_quarter_covered_is_an_object_patch_and_recall_counts_tokens_of_four(tmp_path):
    from engine.geometry import TokenGeometry
    from engine.raster import read_raster
    from engine.synth import ORIGIN, PIXEL_SIZE
    from engine.tiling import plan_tiles

    sc = make_scene(tmp_path / "r.tif", (700, 500), objects=[("boat", (100, 60, 130, 80))], seed=0)
    x0, y0, x1, y1 = 100, 60, 130, 80
    assert sc.objects[0].box_map == (ORIGIN[0] + x0 * PIXEL_SIZE, ORIGIN[1] - y1 * PIXEL_SIZE,
                                     ORIGIN[0] + x1 * PIXEL_SIZE, ORIGIN[1] - y0 * PIXEL_SIZE)
    image = read_raster(str(sc.path))
    geo = TokenGeometry.build(image, plan_tiles(image.size))
    p = 12 * 24 + 10  # row 12, column 10 of the first tile: inside the raster
    bx0, by0, bx1, by1 = geo.boxes_source(np.array([p]))[0]
    w = bx1 - bx0
    # an object over the right 30 % of the patch and on to the right (its centre two patches
    # further): the patch is one of its patches; over the right 20 %: it is not
    assert p in object_patches(geo, [(bx1 - 0.3 * w, by0, bx1 + 3 * w, by1)])
    assert p not in object_patches(geo, [(bx1 - 0.2 * w, by0, bx1 + 3 * w, by1)])
    obj = object_patches(geo, sc.objects)
    assert obj.size >= 4
    fours = [obj[i:i + 4] for i in range(0, obj.size, 4)]
    sel = Selection(embeds=torch.zeros(len(fours), 2), members=fours, scores=np.ones(len(fours)),
                    roles=["kept"] * len(fours), candidates=len(fours))
    assert object_recall(sel, geo, sc.objects, max_token_patches=4) == 1.0
