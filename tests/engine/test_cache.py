"""engine/cache.py raster_key: the feature / KV cache key changes when any file behind a raster
changes, not only the file that was opened."""

from __future__ import annotations

import os

import numpy as np

from engine import cache
from engine.cache import raster_key

try:
    from tests.engine.rasters import write_bytes, write_geotiff, write_vrt
except ImportError:  # rootdir-relative import when tests/ is not a package
    from rasters import write_bytes, write_geotiff, write_vrt


def _touch(path, seconds: int) -> None:
    """Give `path` a distinct modification time (no sleeping for the clock to move)."""
    os.utime(path, ns=(seconds * 10**9, seconds * 10**9))


def _grey(value: int) -> np.ndarray:
    return np.full((20, 30), value, np.uint8)


def test_a_vrt_key_changes_when_its_source_is_replaced(tmp_path):
    """Keyed on the VRT alone, a replaced source tile was answered from the old features."""
    src = write_geotiff(tmp_path / "src.tif", _grey(10), crs=None)
    vrt = write_vrt(tmp_path / "m.vrt", src, 30, 20)
    _touch(src, 1_000)
    before = raster_key(vrt, None, None)
    assert raster_key(vrt, None, None) == before  # nothing changed: still a cache hit
    write_geotiff(src, _grey(200), crs=None)  # same size on disk is possible: mtime tells
    _touch(src, 2_000)
    assert raster_key(vrt, None, None) != before


def test_a_nested_vrt_and_sidecar_files_are_part_of_the_key(tmp_path):
    src = write_geotiff(tmp_path / "src.tif", _grey(10), crs=None)
    inner = write_vrt(tmp_path / "inner.vrt", src, 30, 20)
    outer = write_vrt(tmp_path / "outer.vrt", inner, 30, 20)
    assert {os.path.basename(f) for f in cache.raster_files(outer)} >= {"outer.vrt", "inner.vrt", "src.tif"}
    before = raster_key(outer, None, None)
    _touch(src, 3_000)  # the file two VRTs down
    assert raster_key(outer, None, None) != before

    tif = write_geotiff(tmp_path / "plain.tif", _grey(10))
    before = raster_key(tif, None, None)
    # a .aux.xml next to the file (statistics, nodata, a colour table GDAL applies)
    aux = write_bytes(tmp_path / "plain.tif.aux.xml",
                      b'<PAMDataset><Metadata><MDI key="a">1</MDI></Metadata></PAMDataset>')
    assert aux in cache.raster_files(tif)
    assert raster_key(tif, None, None) != before


def test_the_area_and_bands_stay_part_of_the_key(tmp_path):
    tif = write_geotiff(tmp_path / "plain.tif", np.zeros((3, 20, 30), np.uint8))
    assert raster_key(tif, None, None) != raster_key(tif, {"window": [0, 0, 5, 5]}, None)
    assert raster_key(tif, None, [1]) != raster_key(tif, None, [2])
