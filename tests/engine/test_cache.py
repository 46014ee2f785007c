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


def test_a_raster_replaced_with_the_same_size_and_mtime_gets_a_new_key(tmp_path):
    """`cp -p`, `rsync -t` or an unpacked archive keep the old mtime: with the same size too, the
    cache answered about the old pixels. The inode and the ctime tell the new file."""
    tif = write_geotiff(tmp_path / "scene.tif", _grey(10), crs=None)
    _touch(tif, 1_000)
    before = raster_key(tif, None, None)
    other = write_geotiff(tmp_path / "other.tif", _grey(200), crs=None)
    assert os.path.getsize(other) == os.path.getsize(tif)
    _touch(other, 1_000)
    os.replace(other, tif)
    assert os.stat(tif).st_mtime_ns == 1_000 * 10**9
    assert raster_key(tif, None, None) != before


def test_a_source_inside_a_zip_is_stamped_by_the_zip_and_a_web_source_is_not_cached(tmp_path):
    """QGIS reads zipped rasters as /vsizip/…: a VRT over one was keyed on a name nothing could
    stat, so a replaced zip was answered from the old features."""
    import zipfile

    src = write_geotiff(tmp_path / "x.tif", _grey(10), crs=None)
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(src, "x.tif")
    vrt = write_vrt(tmp_path / "z.vrt", f"/vsizip/{archive}/x.tif", 30, 20)
    before = raster_key(vrt, None, None)
    assert before is not None
    assert raster_key(vrt, None, None) == before
    with zipfile.ZipFile(archive, "w") as zf:  # replaced with other pixels
        zf.write(write_geotiff(tmp_path / "y.tif", _grey(200), crs=None), "x.tif")
    _touch(archive, 5_000)
    assert raster_key(vrt, None, None) != before
    # a source on a web server: nothing tells when it changes, so the read is not cached
    web = write_vrt(tmp_path / "w.vrt", "/vsicurl/https://example.org/x.tif", 30, 20)
    assert cache._file_stamp("/vsicurl/https://example.org/x.tif") is None
    assert cache._file_stamp("/vsizip//vsicurl/https://example.org/a.zip/x.tif") is None
    assert "/vsicurl/https://example.org/x.tif" in cache.raster_files(web)
    assert raster_key(web, None, None) is None


def test_a_feature_cache_of_zero_bytes_keeps_nothing():
    import torch

    off = cache.FeatureCache(max_bytes=0)
    off.put("k", (None, torch.zeros(0)))  # even an empty entry: the cache is off
    off.put("k2", (None, torch.zeros(4)))
    assert len(off) == 0 and off.get("k") is None and off.nbytes == 0
    on = cache.FeatureCache(max_bytes=1024)
    on.put("k", (None, torch.zeros(4)))
    assert on.get("k") is not None


def test_the_feature_cache_cap_comes_from_the_option_then_the_variable(monkeypatch):
    import pytest

    monkeypatch.delenv(cache.FEATURE_CACHE_ENV, raising=False)
    assert cache.feature_cache_cap(None) == cache.DEFAULT_FEATURE_CACHE_BYTES == 4 * 2**30
    monkeypatch.setenv(cache.FEATURE_CACHE_ENV, " 1048576 ")
    assert cache.feature_cache_cap(None) == 1048576
    assert cache.feature_cache_cap(0) == 0  # the option wins, 0 included
    monkeypatch.setenv(cache.FEATURE_CACHE_ENV, "4G")
    with pytest.raises(ValueError, match=rf"{cache.FEATURE_CACHE_ENV} must be a whole number of bytes.*'4G'"):
        cache.feature_cache_cap(None)


def _entry(n_floats: int):
    """A cache value holding `n_floats` float32 numbers (4 bytes each)."""
    import torch

    return (None, torch.zeros(n_floats, dtype=torch.float32))


def test_the_least_recently_used_entry_goes_first_when_the_bytes_run_out():
    features = cache.FeatureCache(max_bytes=3 * 400, max_items=10)
    for key in ("a", "b", "c"):
        features.put(key, _entry(100))  # 400 bytes each: the cache is full
    assert features.nbytes == 1200 and len(features) == 3
    assert features.get("a") is not None  # "a" is now the most recently used
    features.put("d", _entry(100))
    assert features.get("b") is None  # the least recently used went
    assert all(features.get(k) is not None for k in ("a", "c", "d"))
    assert features.nbytes == 1200 and len(features) == 3


def test_the_oldest_entries_go_when_the_items_run_out():
    prefixes = cache.PrefixStore(max_bytes=2**20, max_items=2)
    for key in ("a", "b", "c"):
        prefixes.put(key, _entry(10))
    assert len(prefixes) == 2 and prefixes.nbytes == 80
    assert prefixes.get("a") is None
    assert prefixes.get("b") is not None and prefixes.get("c") is not None


def test_an_entry_put_again_is_counted_once():
    features = cache.FeatureCache(max_bytes=1000, max_items=10)
    features.put("a", _entry(100))
    features.put("a", _entry(50))
    assert len(features) == 1 and features.nbytes == 200
    features.put("b", _entry(150))  # 200 + 600 bytes fit under the cap
    assert features.get("a") is not None and features.get("b") is not None


def test_an_entry_larger_than_the_cap_is_not_kept_and_evicts_nothing():
    features = cache.FeatureCache(max_bytes=1000, max_items=10)
    features.put("small", _entry(100))
    features.put("huge", _entry(1000))  # 4000 bytes
    assert features.get("huge") is None
    assert features.get("small") is not None and features.nbytes == 400


def test_one_feature_entry_holds_at_most_the_overview_and_every_canvas_tile():
    # 8064 x 8064 px canvas = 24 x 24 tiles of 336 px, plus the overview tile: 577 tiles, each
    # with a CLS and 24 x 24 patch states of 1024 float32 numbers
    assert cache.feature_entry_ceiling(1024, 336, 14, 8064 * 8064) == 577 * 577 * 1024 * 4
    assert cache.feature_entry_ceiling(8, 336, 14, 336 * 672, value_bytes=2) == 3 * 577 * 8 * 2


def test_a_negative_feature_cache_size_is_refused(monkeypatch):
    import pytest

    with pytest.raises(ValueError, match="0 or more bytes, not -1"):
        cache.feature_cache_cap(-1)
    monkeypatch.setenv(cache.FEATURE_CACHE_ENV, "-1")
    with pytest.raises(ValueError, match=rf"{cache.FEATURE_CACHE_ENV} must be a whole number of bytes.*'-1'"):
        cache.feature_cache_cap(None)
