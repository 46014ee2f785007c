"""read_raster on real GeoTIFF/VRT files written into tmp_path."""

import os

import numpy as np
import pytest
from affine import Affine

from engine.raster import read_for_tiling, read_raster, read_size_for
from engine.raster_errors import AOIError, BandError, NeedsWarpError, RasterError, RasterOpenError

try:
    from tests.engine.rasters import (DEFAULT_TRANSFORM, write_bytes, write_gcp_geotiff, write_geotiff,
                                      write_huge_vrt, write_stacked_vrt, write_truncated, write_vrt)
except ImportError:  # rootdir-relative import when tests/ is not a package
    from rasters import (DEFAULT_TRANSFORM, write_bytes, write_gcp_geotiff, write_geotiff, write_huge_vrt,
                         write_stacked_vrt, write_truncated, write_vrt)

RNG = np.random.default_rng(42)


def _u8(*shape):
    return RNG.integers(0, 256, shape, dtype=np.uint8)


def test_rgb_uint8_kept_as_is(tmp_path):
    arr = _u8(3, 40, 50)
    p = write_geotiff(tmp_path / "rgb.tif", arr, photometric="RGB")
    im = read_raster(p)
    assert im.pixels.shape == (40, 50, 3) and im.pixels.dtype == np.uint8
    np.testing.assert_array_equal(im.pixels, arr.transpose(1, 2, 0))
    assert im.valid.all() and im.bands == (1, 2, 3) and im.stretch is None
    assert im.source_size == (50, 40) and im.window == (0, 0, 50, 40)
    assert im.image_to_source == Affine.identity()
    assert im.source_transform == DEFAULT_TRANSFORM and "UTM zone 33N" in im.crs_wkt
    assert im.image_to_map == DEFAULT_TRANSFORM and im.path == p


def test_single_band_grey_replicated(tmp_path):
    arr = _u8(30, 20)
    im = read_raster(write_geotiff(tmp_path / "g.tif", arr))
    assert im.bands == (1, 1, 1)
    for c in range(3):
        np.testing.assert_array_equal(im.pixels[..., c], arr)


def test_two_bands_first_is_grey(tmp_path):
    arr = _u8(2, 10, 12)
    im = read_raster(write_geotiff(tmp_path / "two.tif", arr))
    assert im.bands == (1, 1, 1)
    np.testing.assert_array_equal(im.pixels[..., 1], arr[0])


def test_four_band_colorinterp_and_alpha(tmp_path):
    arr = _u8(4, 20, 30)
    arr[3] = 255
    arr[3, :5, :] = 0  # transparent top rows
    p = write_geotiff(tmp_path / "rgba.tif", arr, photometric="RGB", alpha=True)
    im = read_raster(p)
    assert im.bands == (1, 2, 3)
    assert not im.valid[:5].any() and im.valid[5:].all()
    assert not im.pixels[:5].any()
    np.testing.assert_array_equal(im.pixels[5:], arr[:3, 5:].transpose(1, 2, 0))


def test_band_order_from_colorinterp(tmp_path):
    arr = _u8(4, 8, 8)
    p = write_geotiff(tmp_path / "nirbgr.tif", arr, colorinterp=["undefined", "blue", "green", "red"])
    im = read_raster(p)
    assert im.bands == (4, 3, 2)
    np.testing.assert_array_equal(im.pixels[..., 0], arr[3])


def test_explicit_bands_and_errors(tmp_path):
    arr = _u8(5, 8, 8)
    p = write_geotiff(tmp_path / "five.tif", arr)
    im = read_raster(p, bands=[5, 4, 3])
    assert im.bands == (5, 4, 3)
    np.testing.assert_array_equal(im.pixels[..., 0], arr[4])
    assert read_raster(p, bands=[2]).bands == (2, 2, 2)
    with pytest.raises(BandError, match="Band 7 does not exist.*5 band"):
        read_raster(p, bands=[1, 2, 7])
    with pytest.raises(BandError, match="Band 0"):
        read_raster(p, bands=[0])
    with pytest.raises(BandError, match="one band .* or three"):
        read_raster(p, bands=[1, 2])
    assert issubclass(BandError, RasterError) and issubclass(RasterError, ValueError)


def test_uint16_stretch_2_98(tmp_path):
    arr = RNG.integers(1000, 3000, (3, 60, 60)).astype(np.uint16)
    arr[0, 0, 0] = 65000  # outlier must not dominate the stretch
    im = read_raster(write_geotiff(tmp_path / "u16.tif", arr))
    lo, hi = np.percentile(arr[0].astype(float), [2, 98])
    assert im.stretch[0] == pytest.approx((lo, hi))
    expected = np.rint(np.clip((arr[0].astype(float) - lo) * 255 / (hi - lo), 0, 255)).astype(np.uint8)
    np.testing.assert_array_equal(im.pixels[..., 0], expected)
    assert im.pixels[0, 0, 0] == 255
    assert im.pixels.min() == 0 and im.pixels.max() == 255


def test_stretch_uses_valid_pixels_only(tmp_path):
    arr = np.full((40, 40), 500, np.uint16)
    arr[:, 20:] = np.arange(20, dtype=np.uint16)[None, :] * 10 + 100
    arr[:, :20] = 9999  # nodata
    im = read_raster(write_geotiff(tmp_path / "nd16.tif", arr, nodata=9999))
    assert not im.valid[:, :20].any() and im.valid[:, 20:].all()
    lo, hi = im.stretch[0]
    assert 100 <= lo < hi <= 290  # 9999 never entered the statistics
    assert not im.pixels[:, :20].any()


def test_constant_band_no_division_by_zero(tmp_path):
    arr = np.full((3, 10, 10), 1200, np.uint16)
    with np.errstate(all="raise"):
        im = read_raster(write_geotiff(tmp_path / "const.tif", arr))
    assert im.pixels.dtype == np.uint8 and np.unique(im.pixels).size == 1
    im2 = read_raster(write_geotiff(tmp_path / "constf.tif", np.full((10, 10), 0.25, np.float32)))
    assert np.unique(im2.pixels).size == 1


def test_float_nan_invalid(tmp_path):
    arr = RNG.random((30, 30)).astype(np.float32)
    arr[3:7, 4:9] = np.nan
    im = read_raster(write_geotiff(tmp_path / "f.tif", arr))
    assert not im.valid[3:7, 4:9].any()
    assert im.valid.sum() == 30 * 30 - 20
    assert not im.pixels[3:7, 4:9].any()
    assert im.pixels[im.valid].max() == 255


def test_uint8_nodata_and_internal_mask(tmp_path):
    arr = _u8(20, 20)
    arr[arr == 0] = 1
    arr[2:4, :] = 0
    im = read_raster(write_geotiff(tmp_path / "nd.tif", arr, nodata=0))
    assert not im.valid[2:4].any() and im.valid[4:].all()
    mask = np.ones((20, 20), bool)
    mask[10:, 10:] = False
    im2 = read_raster(write_geotiff(tmp_path / "mask.tif", _u8(3, 20, 20), mask=mask))
    np.testing.assert_array_equal(im2.valid, mask)
    assert not im2.pixels[10:, 10:].any()


def test_striped_nodata_survives_a_reduced_read(tmp_path):
    """Every other column nodata (e.g. Landsat-7 SLC-off gaps), read 4x smaller: each output
    pixel has valid source pixels and gets their average. The mask used to be sampled (nearest),
    which hit a nodata column each time and lost the whole striped half."""
    arr = np.full((400, 400), 1000, np.uint16)
    arr[:, ::2] = 65535  # nodata
    arr[:, 200:] = 3000  # no gaps on the right half
    im = read_raster(write_geotiff(tmp_path / "stripes.tif", arr, nodata=65535), max_pixels=100 * 100)
    assert im.size == (100, 100) and im.valid.all()
    assert im.stretch[0] == (1000.0, 3000.0)  # the left half's value, not nodata's
    assert (im.pixels[:, :50] < im.pixels[:, 50:]).all()
    gaps = arr.copy()
    gaps[:, :100] = 65535  # a wholly nodata quarter stays nodata
    im = read_raster(write_geotiff(tmp_path / "gaps.tif", gaps, nodata=65535), max_pixels=100 * 100)
    assert not im.valid[:, :25].any() and im.valid[:, 25:].all()


def test_no_valid_pixel_is_a_clear_error(tmp_path):
    """All nodata (or NaN, or masked) used to become an all-black image the model was asked about."""
    from engine.protocol import ERROR_CODES
    from engine.raster_errors import NoValidPixelsError

    cases = {
        "nodata.tif": dict(array=np.zeros((3, 20, 20), np.uint16), nodata=0),
        "nan.tif": dict(array=np.full((20, 20), np.nan, np.float32)),
        "masked.tif": dict(array=_u8(3, 20, 20), mask=np.zeros((20, 20), bool)),
    }
    for name, kw in cases.items():
        p = write_geotiff(tmp_path / name, kw.pop("array"), **kw)
        with pytest.raises(NoValidPixelsError) as e:
            read_raster(p)
        assert e.value.code == "no_valid_pixels" and e.value.code in ERROR_CODES
        assert "is nodata" in str(e.value) and name in str(e.value)

    # data only in the left half: an area of interest on the right half has nothing to show
    arr = _u8(20, 20)
    arr[arr == 0] = 1
    arr[:, 10:] = 0
    p = write_geotiff(tmp_path / "half.tif", arr, nodata=0)
    assert read_raster(p).valid_fraction == 0.5
    assert read_raster(p, aoi=[5, 0, 10, 20]).valid_fraction == 0.5
    with pytest.raises(NoValidPixelsError, match="area of interest"):
        read_raster(p, aoi=[10, 0, 10, 20])


def test_a_chosen_band_without_data_is_named(tmp_path):
    """One of the three bands chosen is NaN everywhere: "Every pixel is nodata, check the nodata
    value" sent the user after the wrong thing; the band is named, and other bands suggested."""
    from engine.raster_errors import NoValidPixelsError

    arr = np.random.default_rng(0).random((4, 20, 20)).astype(np.float32)
    arr[2] = np.nan
    p = write_geotiff(tmp_path / "bands.tif", arr)
    with pytest.raises(NoValidPixelsError, match=r"Band 3 of .*bands\.tif.* holds no data .*Choose other bands"):
        read_raster(p, bands=[1, 2, 3])
    assert read_raster(p, bands=[1, 2, 4]).valid_fraction == 1.0
    with pytest.raises(NoValidPixelsError, match="Every pixel"):  # nothing anywhere: as before
        read_raster(write_geotiff(tmp_path / "nan.tif", np.full((3, 20, 20), np.nan, np.float32)), bands=[1, 2, 3])


def test_palette_raster(tmp_path):
    arr = np.zeros((10, 10), np.uint8)
    arr[5:] = 1
    p = write_geotiff(tmp_path / "pal.tif", arr, colormap={0: (0, 0, 255, 255), 1: (255, 0, 0, 255)})
    im = read_raster(p)
    assert tuple(im.pixels[0, 0]) == (0, 0, 255) and tuple(im.pixels[9, 9]) == (255, 0, 0)


def test_no_crs_no_georeference(tmp_path):
    arr = _u8(3, 16, 24)
    im = read_raster(write_geotiff(tmp_path / "plain.tif", arr, crs=None))
    assert im.crs_wkt is None and im.source_transform == Affine.identity()
    assert not im.georeferenced
    assert im.image_to_map == Affine.identity()


def _gcps(*pixels, transform=DEFAULT_TRANSFORM):
    """(col, row, x, y) ground control points at `pixels`, placed by `transform`."""
    return [(c, r, *(transform @ (c, r))) for c, r in pixels]


GCP_PIXELS = ((0, 0), (60, 0), (0, 40), (60, 40), (30, 20))


def test_a_raster_placed_by_gcps_gets_their_affine_fit_and_crs(tmp_path):
    """It used to be read as a plain picture (no CRS, pixel coordinates): a polygon in the GCPs'
    CRS was 'outside', and heatmap and anchors came out in pixels where QGIS shows the layer at
    the GCPs."""
    from shapely.geometry import box

    arr = _u8(3, 40, 60)
    gcps = _gcps(*GCP_PIXELS)
    gcps[-1] = (30, 20, gcps[-1][2] + 2.0, gcps[-1][3])  # 0.2 px off, as a hand-placed GCP is
    p = write_gcp_geotiff(tmp_path / "gcps.tif", arr, gcps)
    im = read_raster(p)
    assert im.georeferenced and "UTM zone 33N" in im.crs_wkt
    assert im.source_transform.almost_equals(DEFAULT_TRANSFORM, precision=0.5)
    t = im.source_transform
    area = box(*(t @ (20, 30)), *(t @ (50, 10)))  # source pixels cols 20..50, rows 10..30
    im = read_raster(p, aoi=area.wkt)
    assert im.window == (20, 10, 30, 20) and im.valid.all()
    np.testing.assert_array_equal(im.pixels, arr[:, 10:30, 20:50].transpose(1, 2, 0))
    assert im.image_to_map @ (0, 0) == pytest.approx(t @ (20, 10))


def test_a_rotated_gcp_fit_is_used_as_it_is(tmp_path):
    rotated = Affine.translation(500000, 5000000) @ Affine.rotation(30) @ Affine.scale(10, -10)
    p = write_gcp_geotiff(tmp_path / "rot.tif", _u8(40, 60), _gcps(*GCP_PIXELS, transform=rotated))
    assert read_raster(p).source_transform.almost_equals(rotated, precision=1e-6)


@pytest.mark.parametrize("case, gcps, message", [
    ("bent", _gcps(*GCP_PIXELS[:4]) + [(30, 20, 500300.0 + 80, 4999800.0)], "need a warp.*misses a GCP by [0-9.]+ pixels"),
    ("two", _gcps((0, 0), (60, 40)), "at least three"),
    ("on one line", _gcps((0, 0), (30, 20), (60, 40)), "need a warp.*one line"),
])
def test_gcps_no_affine_honours_are_refused(tmp_path, case, gcps, message):
    p = write_gcp_geotiff(tmp_path / "bad.tif", _u8(40, 60), gcps)
    with pytest.raises(NeedsWarpError, match=message) as err:
        read_raster(p)
    assert err.value.code == "raster_unreadable"


def _clustered_gcps(n=12, seed=3):
    """`n` GCPs in the centre third of a 1000 x 800 px scan (all in one town), each up to 0.45 px
    off the 10 m grid of DEFAULT_TRANSFORM, as hand-placed GCPs are."""
    rng = np.random.default_rng(seed)
    gcps = []
    for _ in range(n):
        col, row = rng.uniform(350, 650), rng.uniform(300, 500)
        dc, dr = rng.uniform(-0.45, 0.45, 2)
        gcps.append((col, row, *(DEFAULT_TRANSFORM @ (col + dc, row + dr))))
    return gcps


def test_gcps_that_bend_the_image_away_from_them_are_refused(tmp_path):
    """12 GCPs clustered in the centre, each within half a pixel of one affine fit, were read with
    that fit; QGIS shows a file with 6 or more GCPs through GDAL's polynomial warp (order 2),
    which here puts the corners about 9 px away: heatmap and anchors landed off what the user
    sees. Now the file is refused: warp it first."""
    p = write_gcp_geotiff(tmp_path / "scan.tif", np.full((3, 800, 1000), 100, np.uint8), _clustered_gcps())
    with pytest.raises(NeedsWarpError, match=r"bend the image.*12 GCPs.*strays up to [0-9.]+ pixels.*"
                                             r"gdalwarp -r bilinear") as err:
        read_raster(p)
    assert err.value.code == "raster_unreadable"
    # fewer than 6: GDAL's warp is the affine fit itself, so the same GCPs place the file
    p = write_gcp_geotiff(tmp_path / "five.tif", np.full((3, 800, 1000), 100, np.uint8), _clustered_gcps()[:5])
    assert read_raster(p).georeferenced


def test_many_gcps_on_one_affine_grid_use_its_fit(tmp_path):
    """12 GCPs spread over the image on one affine grid: GDAL's order-2 warp is that grid."""
    rotated = Affine.translation(500000, 5000000) @ Affine.rotation(30) @ Affine.scale(10, -10)
    pixels = [(c, r) for c in (0, 20, 40, 60) for r in (0, 20, 40)]
    p = write_gcp_geotiff(tmp_path / "many.tif", _u8(40, 60), _gcps(*pixels, transform=rotated))
    assert read_raster(p).source_transform.almost_equals(rotated, precision=1e-6)


def test_a_raster_placed_by_rpcs_alone_is_refused(tmp_path):
    from rasterio.rpc import RPC

    coeffs = [1.0] + [0.0] * 19
    rpcs = RPC(height_off=0, height_scale=100, lat_off=45, lat_scale=0.01, line_den_coeff=coeffs,
               line_num_coeff=[0.0, 0.0, -1.0] + [0.0] * 17, line_off=20, line_scale=20,
               long_off=15, long_scale=0.01, samp_den_coeff=coeffs,
               samp_num_coeff=[0.0, 1.0] + [0.0] * 18, samp_off=30, samp_scale=30)
    p = write_gcp_geotiff(tmp_path / "rpc.tif", _u8(40, 60), (), rpcs=rpcs)
    with pytest.raises(NeedsWarpError, match="RPC.*gdalwarp -rpc"):
        read_raster(p)


def test_vrt(tmp_path):
    arr = _u8(3, 12, 14)
    src = write_geotiff(tmp_path / "base.tif", arr, crs=None)
    im = read_raster(write_vrt(tmp_path / "m.vrt", src, 14, 12, count=3))
    np.testing.assert_array_equal(im.pixels, arr.transpose(1, 2, 0))


def test_bands_of_different_types_are_read_and_stretched(tmp_path):
    """A VRT stacking Byte, UInt16 and Float32 files used to fail in rasterio ("more than one
    'dtype' found") and was reported as a corrupt file."""
    grey = _u8(30, 40)
    sources = [write_geotiff(tmp_path / "b1.tif", grey),
               write_geotiff(tmp_path / "b2.tif", grey.astype(np.uint16) * 100),
               write_geotiff(tmp_path / "b3.tif", grey.astype(np.float32) / 3)]
    vrt = write_stacked_vrt(tmp_path / "mixed.vrt", sources)
    for max_pixels in (None, 300):  # full resolution and a decimated (resampled) read
        im = read_raster(vrt, max_pixels=max_pixels)
        assert im.bands == (1, 2, 3) and im.valid.all() and len(im.stretch) == 3
        # the same picture in UInt16 and Float32: stretched alike, the channels agree; the Byte
        # band is kept as it is, as when read alone
        np.testing.assert_allclose(im.pixels[..., 2], im.pixels[..., 1], atol=1)
        np.testing.assert_array_equal(im.pixels[..., 0],
                                      read_raster(vrt, bands=[1], max_pixels=max_pixels).pixels[..., 0])
        assert im.stretch[0] == (0.0, 255.0)
    assert read_raster(vrt, bands=[3, 1, 2]).stretch[0] == pytest.approx(
        (np.percentile(grey / 3, 2), np.percentile(grey / 3, 98)), rel=1e-4)


@pytest.mark.parametrize("max_pixels", [None, 20 * 25])
def test_a_byte_band_among_wider_bands_keeps_its_values(tmp_path, max_pixels):
    """A Byte band read with UInt16 bands (here a uint16 RGB stacked with a Byte band, shown as
    blue with `bands`) was stretched by its percentiles like them: its 60..120 became 0..255.
    The stretch is decided per band by its own type: the Byte band keeps its values."""
    rgb = RNG.integers(1000, 3000, (3, 40, 50)).astype(np.uint16)
    byte = RNG.integers(60, 121, (40, 50)).astype(np.uint8)
    sources = [write_geotiff(tmp_path / f"c{i}.tif", rgb[i]) for i in range(3)]
    vrt = write_stacked_vrt(tmp_path / "rgb_byte.vrt", [*sources, write_geotiff(tmp_path / "b.tif", byte)])
    im = read_raster(vrt, bands=[1, 2, 4], max_pixels=max_pixels)
    alone = read_raster(vrt, bands=[4], max_pixels=max_pixels)
    np.testing.assert_array_equal(im.pixels[..., 2], alone.pixels[..., 0])
    assert 60 <= im.pixels[..., 2].min() and im.pixels[..., 2].max() <= 120
    if max_pixels is None:
        np.testing.assert_array_equal(im.pixels[..., 2], byte)
    assert im.stretch[2] == (0.0, 255.0)
    # the UInt16 bands are stretched as in the uint16 RGB alone
    assert im.pixels[..., 0].min() == 0 and im.pixels[..., 0].max() == 255
    np.testing.assert_array_equal(im.pixels[..., :2],
                                  read_raster(vrt, max_pixels=max_pixels).pixels[..., :2])


def test_a_read_rasterio_refuses_is_not_called_corrupt(tmp_path, monkeypatch):
    import engine.raster_read as raster_read

    def refuse(*args, **kwargs):
        raise ValueError("an argument rasterio does not accept")

    monkeypatch.setattr(raster_read, "_read_bands", refuse)
    with pytest.raises(RasterOpenError) as err:
        read_raster(write_geotiff(tmp_path / "fine.tif", _u8(3, 8, 8)))
    assert "does not accept" in str(err.value) and "corrupt" not in str(err.value)
    assert err.value.code == "raster_unreadable"


def test_corrupt_and_missing_files(tmp_path):
    junk = write_bytes(tmp_path / "junk.tif", os.urandom(4096))
    with pytest.raises(RasterOpenError, match="junk.tif.*corrupt"):
        read_raster(junk)
    text = write_bytes(tmp_path / "notes.tif", b"just some text, not an image\n" * 20)
    with pytest.raises(RasterOpenError):
        read_raster(text)
    with pytest.raises(RasterOpenError, match="not found"):
        read_raster(tmp_path / "missing.tif")
    with pytest.raises(RasterOpenError, match="folder"):
        read_raster(tmp_path)
    good = write_geotiff(tmp_path / "good.tif", _u8(3, 300, 300), compress=None)
    trunc = write_truncated(tmp_path / "trunc.tif", good, keep_fraction=0.4)
    with pytest.raises(RasterOpenError, match="trunc.tif") as err:
        read_raster(trunc)
    # GDAL's own words, not rasterio's "See previous exception for details." pointing at nothing
    assert "previous exception" not in str(err.value) and "(GDAL: " in str(err.value)


def test_aoi_pixel_window(tmp_path):
    arr = _u8(40, 50)
    p = write_geotiff(tmp_path / "w.tif", arr)
    im = read_raster(p, aoi=[10, 5, 20, 15])
    assert im.window == (10, 5, 20, 15) and im.size == (20, 15)
    np.testing.assert_array_equal(im.pixels[..., 0], arr[5:20, 10:30])
    assert im.image_to_source @ (0, 0) == (10, 5)
    x, y = im.image_to_map @ (0, 0)
    assert (x, y) == DEFAULT_TRANSFORM @ (10, 5)
    # partly outside -> clipped
    im2 = read_raster(p, aoi=(40, 30, 100, 100))
    assert im2.window == (40, 30, 10, 10)
    with pytest.raises(AOIError, match="wholly outside"):
        read_raster(p, aoi=[60, 0, 10, 10])
    with pytest.raises(AOIError, match="4 numbers"):
        read_raster(p, aoi=[1, 2, 3])


def test_aoi_polygon_wkt_geojson_shapely(tmp_path):
    from shapely.geometry import Polygon, mapping

    arr = _u8(3, 100, 100)
    p = write_geotiff(tmp_path / "poly.tif", arr)
    t = DEFAULT_TRANSFORM
    # a triangle over source pixels (20,10) (60,10) (20,50)
    tri = Polygon([t @ (20, 10), t @ (60, 10), t @ (20, 50)])
    for aoi in (tri, tri.wkt, mapping(tri), {"type": "Feature", "properties": {}, "geometry": mapping(tri)}):
        im = read_raster(p, aoi=aoi)
        assert im.window == (20, 10, 40, 40)
        assert im.valid[1, 1] and not im.valid[38, 38]  # inside / outside the hypotenuse
        assert 0.4 < im.valid.mean() < 0.6
        assert not im.pixels[~im.valid].any()
        np.testing.assert_array_equal(im.pixels[im.valid], arr[:, 10:50, 20:60].transpose(1, 2, 0)[im.valid])
    far = Polygon([(0, 0), (10, 0), (10, 10)])
    with pytest.raises(AOIError, match="wholly outside"):
        read_raster(p, aoi=far)
    with pytest.raises(AOIError, match="WKT"):
        read_raster(p, aoi="POLYGON((broken")


def test_aoi_polygon_in_pixel_coords_without_georef(tmp_path):
    p = write_geotiff(tmp_path / "plainpoly.tif", _u8(60, 80), crs=None)
    im = read_raster(p, aoi="POLYGON((10 20, 30 20, 30 40, 10 40, 10 20))")
    assert im.window == (10, 20, 20, 20) and im.valid.all()


def test_read_size_for():
    assert read_size_for((100, 50), None) == (100, 50)
    assert read_size_for((100, 50), 10_000) == (100, 50)
    w, h = read_size_for((27000, 27000), 8064 * 8064)
    assert (w, h) == (8064, 8064)
    w, h = read_size_for((6000, 3000), 20_000)
    assert w * h <= 20_000 and abs(w / h - 2) < 0.05
    assert read_size_for((100000, 1), 10) == (10, 1)


def test_decimated_read_uses_overviews(tmp_path):
    # 6000 x 6000 uint8 with a coarse pattern; compressed, cheap to write
    yy, xx = np.mgrid[0:6000, 0:6000]
    arr = (((yy // 600) + (xx // 600)) % 2 * 200 + 20).astype(np.uint8)
    p = write_geotiff(tmp_path / "big.tif", arr, overviews=[2, 4, 8, 16])
    del yy, xx
    im = read_raster(p, max_pixels=300 * 300)
    assert im.size == (300, 300) and im.window == (0, 0, 6000, 6000)
    assert im.image_to_source == Affine(20, 0, 0, 0, 20, 0)
    assert im.decimation == (20.0, 20.0)
    # the pattern is in the right place: image pixel centre -> source pixel -> value
    for col, row in [(15, 15), (45, 15), (15, 45), (165, 255), (285, 15)]:  # square centres
        sc, sr = im.image_to_source @ (col + 0.5, row + 0.5)
        assert im.pixels[row, col, 0] == arr[int(sr), int(sc)]
    # with an AOI window too
    im2 = read_raster(p, aoi=[1200, 600, 2400, 1200], max_pixels=120 * 60)
    assert im2.size == (120, 60)
    assert im2.image_to_source == Affine(20, 0, 1200, 0, 20, 600)
    sc, sr = im2.image_to_source @ (15.5, 15.5)
    assert im2.pixels[15, 15, 0] == arr[int(sr), int(sc)]
    assert im2.image_to_map == DEFAULT_TRANSFORM @ im2.image_to_source


def test_decimated_read_comes_from_the_overview(tmp_path):
    import rasterio

    arr = np.full((1024, 1024), 200, np.uint8)
    p = write_geotiff(tmp_path / "ov.tif", arr, overviews=[4])
    with rasterio.open(p, "r+") as dst:  # change full resolution only; the overview keeps 200
        dst.write(np.full((1, 1024, 1024), 10, np.uint8))
    assert read_raster(p).pixels.max() == 10
    im = read_raster(p, max_pixels=256 * 256)
    assert im.size == (256, 256) and np.all(im.pixels == 200)


def test_read_for_tiling_budget(tmp_path):
    from engine.tiling import plan_tiles, tiling_read_budget

    arr = np.zeros((2000, 3000), np.uint8) + 5
    p = write_geotiff(tmp_path / "t.tif", arr, overviews=[2, 4])
    small = [0, 0, 900, 700]  # smaller than its canvas (1008 x 1008 area): full resolution
    im = read_for_tiling(p, aoi=small)
    assert im.size == (900, 700) and im.decimation == (1.0, 1.0)
    budget = tiling_read_budget((3000, 2000), [(1008, 672), (672, 672)])
    im2 = read_for_tiling(p, pinpoints=[(1008, 672), (672, 672)])
    assert im2.size[0] * im2.size[1] <= budget == 1008 * 672
    assert plan_tiles(im2.size, [(1008, 672), (672, 672)]).canvas_size == (1008, 672)


def test_tiny_polygon_aoi(tmp_path):
    from shapely.geometry import box

    p = write_geotiff(tmp_path / "tiny.tif", _u8(20, 20))
    x, y = DEFAULT_TRANSFORM @ (5.1, 5.1)
    with pytest.raises(AOIError, match="smaller than one pixel"):
        read_raster(p, aoi=box(x, y - 2, x + 2, y))


def test_protocol_aoi_dicts_and_error_codes(tmp_path):
    from shapely.geometry import box, mapping

    from engine.protocol import ERROR_CODES
    from engine.raster_errors import AOIOutsideError

    p = write_geotiff(tmp_path / "pd.tif", _u8(40, 40))
    assert read_raster(p, aoi={"window": [2, 3, 10, 11]}).window == (2, 3, 10, 11)
    poly = box(*(DEFAULT_TRANSFORM @ (5, 30)), *(DEFAULT_TRANSFORM @ (25, 10)))
    assert read_raster(p, aoi={"polygon_wkt": poly.wkt}).window == (5, 10, 20, 20)
    assert read_raster(p, aoi={"geojson": mapping(poly)}).window == (5, 10, 20, 20)
    with pytest.raises(AOIOutsideError) as e:
        read_raster(p, aoi={"window": [100, 100, 5, 5]})
    assert e.value.code == "aoi_outside_raster"
    with pytest.raises(AOIError) as e:
        read_raster(p, aoi={"window": [1, 2]})
    assert e.value.code == "bad_aoi"
    with pytest.raises(RasterOpenError) as e:
        read_raster(write_bytes(tmp_path / "x.tif", b"nope" * 100))
    assert e.value.code == "not_a_raster"
    with pytest.raises(BandError) as e:
        read_raster(p, bands=[9])
    for code in ("aoi_outside_raster", "bad_aoi", "not_a_raster", "raster_unreadable", e.value.code):
        assert code in ERROR_CODES


def test_polygon_aoi_edge_cases(tmp_path):
    p = write_geotiff(tmp_path / "e.tif", _u8(30, 30), crs=None)
    bowtie = "POLYGON((0 0, 20 20, 20 0, 0 20, 0 0))"  # self-intersecting, made valid
    im = read_raster(p, aoi=bowtie)
    assert im.window == (0, 0, 20, 20) and 0.3 < im.valid.mean() < 0.7
    with pytest.raises(AOIError, match="must be a polygon"):
        read_raster(p, aoi="LINESTRING(0 0, 10 10)")
    with pytest.raises(AOIError, match="GeoJSON"):
        read_raster(p, aoi={"type": "Polygon", "coordinates": "bad"})


def test_protocol_aoi_dict_null_entries_are_absent(tmp_path):
    """{"window": [...], "polygon_wkt": null} passes the server's checks: the reader agrees."""
    from shapely.geometry import box, mapping

    p = write_geotiff(tmp_path / "nulls.tif", _u8(40, 40))
    aoi = {"window": [2, 3, 10, 11], "polygon_wkt": None, "geojson": None}
    assert read_raster(p, aoi=aoi).window == (2, 3, 10, 11)
    poly = box(*(DEFAULT_TRANSFORM @ (5, 30)), *(DEFAULT_TRANSFORM @ (25, 10)))
    aoi = {"polygon_wkt": None, "geojson": mapping(poly), "window": None}
    assert read_raster(p, aoi=aoi).window == (5, 10, 20, 20)


def test_reads_bound_gdals_block_cache(tmp_path, monkeypatch):
    """GDAL's default cache (5% of RAM) added over a gigabyte to a reduced read of a 27,000 px
    raster; reads run with READ_CACHE_BYTES, unless the user set GDAL_CACHEMAX."""
    import rasterio.env

    import engine.raster_read as raster_read

    seen = []
    real = raster_read._read_bands

    def spy(*args, **kwargs):
        seen.append(rasterio.env.getenv().get("GDAL_CACHEMAX") if rasterio.env.hasenv() else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(raster_read, "_read_bands", spy)
    path = write_geotiff(tmp_path / "a.tif", _u8(3, 40, 40))
    monkeypatch.delenv("GDAL_CACHEMAX", raising=False)
    read_raster(path)
    monkeypatch.setenv("GDAL_CACHEMAX", "512")
    read_raster(path)
    assert seen[0] == raster_read.READ_CACHE_BYTES and seen[1] != raster_read.READ_CACHE_BYTES


# ------------------------------------------------------------------------------ cancellation


def _count_reads(monkeypatch, after_first=None):
    """Count the GDAL pixel reads of engine.raster_read; `after_first()` runs after the first one."""
    import engine.raster_read as raster_read

    calls = []
    real = raster_read._read_bands

    def counted(*args, **kwargs):
        calls.append(args[2])  # the window
        out = real(*args, **kwargs)
        if after_first is not None and len(calls) == 1:
            after_first()
        return out

    monkeypatch.setattr(raster_read, "_read_bands", counted)
    return calls


def test_a_cancel_set_before_the_read_reads_no_pixel(tmp_path, monkeypatch):
    import threading

    from engine.errors import Cancelled

    cancel = threading.Event()
    cancel.set()
    calls = _count_reads(monkeypatch)
    with pytest.raises(Cancelled):
        read_raster(write_geotiff(tmp_path / "small.tif", _u8(3, 40, 50)), cancel=cancel)
    assert calls == []


def test_a_cancel_during_a_huge_read_stops_it_between_strips(tmp_path, monkeypatch):
    """A 27,000 px raster without overviews, decimated: GDAL goes through every source row, so
    the read is cut in row strips and a cancel stops it after the strip under way."""
    import threading

    from engine.errors import Cancelled

    small = write_geotiff(tmp_path / "small.tif", _u8(3, 54, 54))
    vrt = write_huge_vrt(tmp_path / "huge.vrt", small)
    whole = read_for_tiling(vrt)  # uncancelled: the same read, in strips, gives the image
    assert whole.size == (8064, 8064) and whole.valid.all()
    cancel = threading.Event()
    calls = _count_reads(monkeypatch, after_first=cancel.set)
    with pytest.raises(Cancelled, match="cancelled while the raster was being read"):
        read_for_tiling(vrt, cancel=cancel)
    assert len(calls) == 1 and calls[0].height < 1000  # one strip of the 27,000 rows, then stop


def test_a_small_read_is_one_gdal_call(tmp_path, monkeypatch):
    calls = _count_reads(monkeypatch)
    read_raster(write_geotiff(tmp_path / "small.tif", _u8(3, 300, 400)), max_pixels=100 * 100)
    assert len(calls) == 1


@pytest.mark.parametrize("max_pixels", [None, 150 * 110])
def test_a_read_in_strips_gives_the_image_of_one_read(tmp_path, monkeypatch, max_pixels):
    """Strips (forced here on a small raster) read the same pixels and mask: exactly at full
    resolution; decimated, GDAL's average may round a few border pixels the other way."""
    import engine.raster_read as raster_read

    arr = RNG.integers(0, 4000, (3, 330, 310)).astype(np.uint16)
    arr[:, ::3, :] = 9999  # nodata rows, reduced by the mask's average too
    arr[:, 200:260, 40:90] = 9999
    p = write_geotiff(tmp_path / "u16.tif", arr, nodata=9999)
    one = read_raster(p, max_pixels=max_pixels)
    monkeypatch.setattr(raster_read, "STRIP_SOURCE_PIXELS", 1000)
    monkeypatch.setattr(raster_read, "STRIP_PIXELS", 5000)
    calls = _count_reads(monkeypatch)
    strips = read_raster(p, max_pixels=max_pixels)
    assert len(calls) > 5
    assert strips.size == one.size and strips.image_to_source == one.image_to_source
    np.testing.assert_array_equal(strips.valid, one.valid)
    diff = np.abs(strips.pixels.astype(int) - one.pixels.astype(int))
    if max_pixels is None:
        assert not diff.any()
    else:
        assert diff.max() <= 1 and np.count_nonzero(diff) <= 0.001 * diff.size


# ------------------------------------------------------------------ NaN without a nodata tag


def _nan_scene():
    """float32, no nodata tag: NaN every other row on the left half (scan gaps), a NaN block of
    80 x 80 px on the right half, values 100..200 elsewhere (the left half brighter)."""
    arr = RNG.uniform(100, 150, (2, 400, 400)).astype(np.float32)
    arr[:, :, :200] += 50
    arr[:, ::2, :200] = np.nan
    arr[:, 240:320, 280:360] = np.nan
    return arr


@pytest.mark.parametrize("overviews", [None, [2, 4]])
def test_nan_gaps_without_nodata_are_missing_in_a_reduced_read_as_in_a_full_one(tmp_path, overviews):
    """GDAL's average skips nodata but spreads NaN: each reduced pixel with one NaN source pixel
    became NaN, so the striped half was lost (the file's NaN-spread overviews too). NaN now
    counts as missing as a nodata tag does: the same image as the file tagged nodata=NaN."""
    arr = _nan_scene()
    untagged = read_raster(write_geotiff(tmp_path / "nan.tif", arr, overviews=overviews),
                           max_pixels=100 * 100)
    tagged = read_raster(write_geotiff(tmp_path / "tagged.tif", arr, nodata=float("nan")),
                         max_pixels=100 * 100)
    assert untagged.size == (100, 100)
    np.testing.assert_array_equal(untagged.valid, tagged.valid)
    np.testing.assert_array_equal(untagged.pixels, tagged.pixels)
    assert untagged.valid[:, :50].all()  # every reduced pixel of the striped half has data
    assert not untagged.valid[60:80, 70:90].any() and not untagged.pixels[60:80, 70:90].any()
    assert untagged.valid.sum() == 100 * 100 - 20 * 20
    assert untagged.pixels[:, :50].mean() > untagged.pixels[:, 50:][untagged.valid[:, 50:]].mean()
    full = read_raster(tmp_path / "nan.tif")  # full resolution: NaN pixels missing, as before
    np.testing.assert_array_equal(full.valid, ~np.isnan(arr).any(axis=0))


def test_a_float_raster_without_nan_is_read_once(tmp_path, monkeypatch):
    calls = _count_reads(monkeypatch)
    arr = RNG.uniform(0, 1, (1, 300, 300)).astype(np.float32)
    read_raster(write_geotiff(tmp_path / "f.tif", arr), max_pixels=100 * 100)
    assert len(calls) == 1


# ------------------------------------------------------- NaN besides a nodata tag or a mask


@pytest.mark.parametrize("overviews", [None, [2, 4]])
@pytest.mark.parametrize("missing", ["nodata", "mask"])
def test_nan_gaps_beside_a_nodata_tag_or_a_mask_are_missing_in_a_reduced_read(tmp_path, overviews,
                                                                              missing):
    """A float band tagged nodata=-9999 (or with a per-dataset mask) that also holds NaN: GDAL's
    average skipped the -9999 (masked) pixels but spread the NaN, so the striped half was lost.
    NaN now counts as missing together with the tag or mask: the same image as the file with
    every missing pixel NaN and tagged nodata=NaN."""
    arr = _nan_scene()
    hidden = np.zeros(arr.shape[1:], bool)
    hidden[:40, 300:] = True  # a block the tag or the mask hides (10 x 25 reduced pixels)
    reference = arr.copy()
    reference[:, hidden] = np.nan
    if missing == "nodata":
        tagged = arr.copy()
        tagged[:, hidden] = -9999
        path = write_geotiff(tmp_path / "nd.tif", tagged, nodata=-9999, overviews=overviews)
    else:
        path = write_geotiff(tmp_path / "mask.tif", arr, mask=~hidden, overviews=overviews)
    im = read_raster(path, max_pixels=100 * 100)
    ref = read_raster(write_geotiff(tmp_path / "ref.tif", reference, nodata=float("nan")),
                      max_pixels=100 * 100)
    assert im.size == (100, 100)
    np.testing.assert_array_equal(im.valid, ref.valid)
    np.testing.assert_array_equal(im.pixels, ref.pixels)
    assert im.valid[:, :50].all()  # every reduced pixel of the striped half has data
    assert not im.valid[:10, 75:].any() and not im.valid[60:80, 70:90].any()
    assert im.valid.sum() == 100 * 100 - 20 * 20 - 10 * 25


def test_a_tagged_or_masked_float_raster_without_spread_nan_is_read_once(tmp_path, monkeypatch):
    """NaN where the mask is 0 anyway (a band tagged nodata=NaN, a block wholly hidden) is no
    reason to read the band again."""
    calls = _count_reads(monkeypatch)
    arr = RNG.uniform(0, 1, (1, 300, 300)).astype(np.float32)
    gaps = arr.copy()
    gaps[:, ::2] = np.nan
    gaps[:, 100:200, 100:200] = np.nan
    hidden = np.ones((300, 300), bool)
    hidden[:60, :60] = False
    files = [write_geotiff(tmp_path / "nan.tif", gaps, nodata=float("nan"), overviews=[2]),
             write_geotiff(tmp_path / "nd.tif", np.where(hidden, arr, -9999), nodata=-9999),
             write_geotiff(tmp_path / "mask.tif", arr, mask=hidden, overviews=[2])]
    for path in files:
        calls.clear()
        read_raster(path, max_pixels=100 * 100)
        assert len(calls) == 1, path


# --------------------------------------------------- what mending spread NaN reads again


def _corner_scene():
    """float32, 3 bands, no nodata tag, 600 x 600: band 1 NaN in the top-left corner triangle
    (a collar), band 2 NaN in a strip at the bottom with gaps every other row, band 3 none."""
    arr = RNG.uniform(100, 200, (3, 600, 600)).astype(np.float32)
    rows, cols = np.mgrid[0:600, 0:600]
    arr[0][rows + cols < 200] = np.nan
    arr[1, 540::2, 100:300] = np.nan
    return arr


def test_spread_nan_is_read_again_only_where_it_is(tmp_path, monkeypatch):
    """The re-read with NaN as nodata went over the whole window at full resolution, whatever
    part held spread NaN: a NaN collar made every whole-raster question read the raster at full
    size. Only the output pixels holding spread NaN are read again now, each band's own, and the
    image is the same as that of the file tagged nodata=NaN."""
    arr = _corner_scene()
    path = write_geotiff(tmp_path / "corner.tif", arr)
    ref = read_raster(write_geotiff(tmp_path / "tagged.tif", arr, nodata=float("nan")),
                      max_pixels=150 * 150)
    calls = _count_reads(monkeypatch)
    im = read_raster(path, max_pixels=150 * 150)
    np.testing.assert_array_equal(im.valid, ref.valid)
    np.testing.assert_array_equal(im.pixels, ref.pixels)
    assert im.valid[140:, 25:75].all()  # the gaps' reduced pixels all have data
    assert not im.valid[:40, :40][np.add.outer(np.arange(40), np.arange(40)) < 45].any()
    first, again = calls[0], calls[1:]
    assert (first.width, first.height) == (600, 600) and again
    assert sum(w.width * w.height for w in again) < 0.15 * 600 * 600  # about the corner and strip


@pytest.mark.parametrize("overviews", [None, [2, 4]])
def test_a_nan_corner_leaves_the_read_of_the_rest_as_it_was(tmp_path, overviews):
    """Away from its NaN, a raster reads as it does without them: through its overviews when it
    has them (the whole band was read again at full resolution, so a NaN corner changed every
    pixel of an image read through overviews). Plateaus of 0 and 1000 fix the stretch to 0..1000
    in both images."""
    clean = RNG.uniform(100, 900, (600, 600)).astype(np.float32)
    clean[250:420, 250:420] = 0
    clean[430:600, 430:600] = 1000
    corner = clean.copy()
    corner[np.add.outer(np.arange(600), np.arange(600)) < 200] = np.nan
    a = read_raster(write_geotiff(tmp_path / "clean.tif", clean, overviews=overviews),
                    max_pixels=130 * 130)
    b = read_raster(write_geotiff(tmp_path / "corner.tif", corner, overviews=overviews),
                    max_pixels=130 * 130)
    assert a.stretch == b.stretch == ((0.0, 1000.0),) * 3
    away = np.add.outer(np.arange(a.size[1]), np.arange(a.size[0])) > 50  # the corner is < 44
    np.testing.assert_array_equal(b.pixels[away], a.pixels[away])
    assert b.valid[away].all() and not b.valid[:30, :30][np.add.outer(np.arange(30),
                                                                     np.arange(30)) < 40].any()


def test_a_cancel_stops_the_read_again_of_spread_nan(tmp_path, monkeypatch):
    """The re-read of a reduced read's spread NaN checks the question's cancel between its
    blocks (a small window was read again in one call, whatever the cancel said)."""
    import threading

    from engine.errors import Cancelled

    path = write_geotiff(tmp_path / "corner.tif", _corner_scene())
    cancel = threading.Event()
    calls = _count_reads(monkeypatch, after_first=cancel.set)
    with pytest.raises(Cancelled):
        read_raster(path, max_pixels=150 * 150, cancel=cancel)
    assert len(calls) == 1


def test_an_explicit_band_choice_naming_the_alpha_band_is_refused(tmp_path):
    """An RGBA raster's 4th band is its transparency mask, not imagery: bands=[4, 3, 2] read it as
    red. The engine's own choice never uses it; an explicit one naming it is refused, band named.
    Its colour bands stay valid (the plugin sends a render as bands [1, 2, 3])."""
    arr = _u8(4, 8, 8)
    p = write_geotiff(tmp_path / "rgba.tif", arr, photometric="RGB", alpha=True)
    with pytest.raises(BandError, match=r"band 4 is the raster's alpha band \(transparency"):
        read_raster(p, bands=[4, 3, 2])
    with pytest.raises(BandError, match="band 4 is the raster's alpha band"):
        read_raster(p, bands=[4])
    assert read_raster(p, bands=[1, 2, 3]).bands == (1, 2, 3)
    assert read_raster(p).bands == (1, 2, 3)
    # a 4-band raster whose 4th band is not tagged alpha (RGBN) may show it
    rgbn = write_geotiff(tmp_path / "rgbn.tif", arr, photometric="MINISBLACK")
    assert read_raster(rgbn, bands=[4, 3, 2]).bands == (4, 3, 2)


def test_engine_raster_still_offers_the_raster_error_family():
    """The RasterError family is public API (code outside this repo catches it from
    engine.raster), so engine.raster re-exports it from its home, engine/raster_errors.py."""
    import engine.raster as raster
    import engine.raster_errors as raster_errors

    family = ("RasterError", "RasterOpenError", "BandError", "AOIError", "AOIOutsideError",
              "NoValidPixelsError", "NeedsWarpError")
    for name in family:
        assert getattr(raster, name) is getattr(raster_errors, name)
        assert name in raster.__all__


def test_a_pixel_nodata_in_one_band_only_is_invalid(tmp_path):
    arr = np.full((3, 10, 12), 100, np.uint8)
    arr[0, 2, 3] = 0  # red is nodata there, green and blue are not
    im = read_raster(write_geotiff(tmp_path / "one.tif", arr, nodata=0))
    assert not im.valid[2, 3] and im.valid.sum() == 10 * 12 - 1
    assert not im.pixels[2, 3].any()


def test_an_alpha_band_before_the_colour_bands_is_not_shown(tmp_path):
    arr = _u8(4, 8, 8)
    arr[0] = 255  # opaque
    p = write_geotiff(tmp_path / "argb.tif", arr,
                      colorinterp=["alpha", "undefined", "undefined", "undefined"])
    im = read_raster(p)
    assert im.bands == (2, 3, 4)
    np.testing.assert_array_equal(im.pixels, arr[1:].transpose(1, 2, 0))


def test_complex_band_shows_the_amplitude(tmp_path):
    re = RNG.integers(-500, 500, (20, 30)).astype(np.float32)
    im_ = RNG.integers(-500, 500, (20, 30)).astype(np.float32)
    arr = (re + 1j * im_).astype(np.complex64)
    got = read_raster(write_geotiff(tmp_path / "slc.tif", arr))
    amp = np.abs(arr)
    lo, hi = np.percentile(amp.astype(np.float64), (2.0, 98.0))  # the documented stretch
    assert got.stretch[0] == pytest.approx((lo, hi), rel=1e-5)



# --- found by property-based testing of the reader's inputs -------------------------------------

@pytest.mark.parametrize("window", [[float("nan"), 0, 5, 5], [0, 0, float("inf"), 5],
                                    [0, 0, 5, float("nan")], [0, 0, 10 ** 400, 5],
                                    {"window": "1234"}])
def test_a_pixel_window_without_four_finite_numbers_is_an_aoi_error(tmp_path, window):
    """NaN and infinity reached math.floor (ValueError, OverflowError: no RasterError, so a
    traceback), and a string window was read as its digits, [1, 2, 3, 4]."""
    p = write_geotiff(tmp_path / "w.tif", _u8(20, 20))
    with pytest.raises(AOIError) as e:
        read_raster(p, aoi=window)
    assert e.value.code == "bad_aoi"


@pytest.mark.parametrize("aoi", [
    "POLYGON((1 1, 5 5, 9 9, 1 1))",                     # its points on one line
    "POLYGON((2 2, 12 2, 2 2, 2 2))",                    # folded onto itself
    "GEOMETRYCOLLECTION(LINESTRING(1 1, 20 20))",        # a collection of a line only
])
def test_a_polygon_aoi_with_no_area_is_refused_not_read_as_a_line(tmp_path, aoi):
    """Made valid, a ring whose points lie on one line is a line, which was rasterised as the
    area of interest: a diagonal of pixels went to the model as the area the user drew."""
    p = write_geotiff(tmp_path / "line.tif", _u8(30, 30), crs=None)
    with pytest.raises(AOIError, match="has no area") as e:
        read_raster(p, aoi=aoi)
    assert e.value.code == "bad_aoi"


def test_only_the_polygons_of_a_collection_aoi_mark_pixels_valid(tmp_path):
    p = write_geotiff(tmp_path / "gc.tif", _u8(30, 30), crs=None)
    im = read_raster(p, aoi="GEOMETRYCOLLECTION(POLYGON((0 0, 10 0, 10 10, 0 10, 0 0)), "
                            "LINESTRING(0 0, 25 25))")
    # the line's pixels were read and marked valid too, in a window spanning the line
    assert im.window == (0, 0, 10, 10) and im.valid.all()


def test_a_polygon_aoi_with_an_infinite_coordinate_is_an_aoi_error(tmp_path):
    """GEOS raised IllegalArgumentException (a GEOSException, no RasterError)."""
    p = write_geotiff(tmp_path / "inf.tif", _u8(20, 20), crs=None)
    with pytest.raises(AOIError, match="not finite"):
        read_raster(p, aoi="POLYGON((0 0, inf 0, 10 10, 0 10, 0 0))")


@pytest.mark.parametrize("bands", [[float("inf")], [1.5], [1, 2.5, 3]])
def test_band_numbers_that_are_not_whole_are_a_band_error(tmp_path, bands):
    """[inf] raised OverflowError; 1.5 was read as band 1 without a word."""
    p = write_geotiff(tmp_path / "b.tif", _u8(3, 10, 10))
    with pytest.raises(BandError, match="band numbers"):
        read_raster(p, bands=bands)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_named_pipe_is_refused_at_once_not_waited_on(tmp_path):
    """GDAL opened a named pipe and waited for a writer: the read (and the engine's queue
    behind it) hung for ever."""
    import threading

    fifo = tmp_path / "pipe.tif"
    os.mkfifo(fifo)
    outcome = []

    def read():
        try:
            read_raster(str(fifo))
        except Exception as exc:  # noqa: BLE001 - the outcome is checked below
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    hung = reader.is_alive()
    if hung:  # let the blocked open go: a writer that closes at once gives GDAL an empty file
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(10)
    assert not hung, "the read waited on the named pipe"
    assert isinstance(outcome[0], RasterOpenError) and "not a regular file" in str(outcome[0])
    assert outcome[0].code == "not_a_raster"


@pytest.mark.parametrize("transform", [
    Affine(10.0, 0.0, 500000.0, 0.0, 0.0, 5000000.0),     # a pixel height of zero
    Affine(1.0, 2.0, 500000.0, 2.0, 4.0, 5000000.0),      # rows along the columns
    Affine(float("nan"), 0.0, 500000.0, 0.0, -10.0, 5000000.0),
])
@pytest.mark.parametrize("aoi", [None, "POLYGON((500000 5000000, 500050 5000000, "
                                       "500050 4999950, 500000 5000000))"])
def test_a_geotransform_that_places_no_pixel_is_refused(tmp_path, transform, aoi):
    """Without an AOI the read went through and put every answer on one line (or at NaN);
    a polygon AOI raised TransformNotInvertibleError or a GEOSException."""
    p = write_geotiff(tmp_path / "gt.tif", _u8(10, 10), transform=transform)
    with pytest.raises(RasterOpenError, match="places no pixel on the map") as e:
        read_raster(p, aoi=aoi)
    assert e.value.code == "raster_unreadable"
