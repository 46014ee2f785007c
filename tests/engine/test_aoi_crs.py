"""A GeoJSON area of interest whose legacy (2008) "crs" member names another CRS than the
raster's (engine/aoi_crs.py): it was read as if it were in the raster's CRS, so an area drawn in
longitudes and latitudes over a UTM raster was refused as "does not overlap" (or, over a raster
in degrees of another datum, read at the wrong place). Now it is reprojected, the same way by the
request checks and the reader; a member that cannot be read is refused with bad_aoi."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from server_rasters import write_geotiff  # noqa: E402

from engine.aoi_crs import aoi_crs_note  # noqa: E402
from engine.jobs import JobError  # noqa: E402
from engine.raster import read_raster  # noqa: E402
from engine.raster_errors import AOIError  # noqa: E402
from engine.request_checks import validate_aoi  # noqa: E402
from engine.uploads import check_raster_file  # noqa: E402

# the raster: 64 x 48 px of 1 m in EPSG:32633 (UTM 33N), top left at (500000, 4500000)
COLS, ROWS = (10.25, 40.75), (10.25, 30.75)  # the area, in the raster's pixels (edges off centres)
WINDOW = (10, 10, 31, 21)  # the pixel window that area is read over


@pytest.fixture(scope="module")
def raster(tmp_path_factory):
    return write_geotiff(tmp_path_factory.mktemp("aoicrs") / "scene.tif")


def utm_ring() -> list:
    (c0, c1), (r0, r1) = COLS, ROWS
    return [[500000 + c, 4500000 - r] for c, r in ((c0, r0), (c1, r0), (c1, r1), (c0, r1), (c0, r0))]


def lonlat_ring() -> list:
    from rasterio.warp import transform

    ring = utm_ring()
    lons, lats = transform("EPSG:32633", "EPSG:4326", [p[0] for p in ring], [p[1] for p in ring])
    return [[lon, lat] for lon, lat in zip(lons, lats)]


def named(name: str, ring: list, kind: str = "Feature") -> dict:
    polygon = {"type": "Polygon", "coordinates": [ring]}
    obj = {"type": "Feature", "properties": {}, "geometry": polygon} if kind == "Feature" else (
        {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {},
                                                     "geometry": polygon}]}
        if kind == "FeatureCollection" else polygon)
    obj["crs"] = {"type": "name", "properties": {"name": name}}
    return obj


def refused(call) -> JobError:
    with pytest.raises(JobError) as caught:
        call()
    return caught.value


@pytest.mark.parametrize("name", ["urn:ogc:def:crs:EPSG::4326", "EPSG:4326",
                                  "urn:ogc:def:crs:OGC:1.3:CRS84"])
@pytest.mark.parametrize("kind", ["Feature", "FeatureCollection", "Polygon"])
def test_an_area_in_lon_lat_over_a_utm_raster_is_reprojected_by_the_checks_and_the_reader(
        raster, name, kind):
    """The checks said "does not overlap the raster" (lon 15, lat 40.65 is nowhere near
    x 500000, y 4500000); GeoJSON's x is the longitude whatever axis order EPSG:4326 declares."""
    aoi = {"geojson": named(name, lonlat_ring(), kind)}
    assert validate_aoi(aoi, check_raster_file(raster)) == aoi
    image = read_raster(raster, aoi=aoi)
    assert image.window == WINDOW
    inside = image.valid  # the polygon's pixels, as for the same area given in UTM
    same = read_raster(raster, aoi={"geojson": {"type": "Polygon", "coordinates": [utm_ring()]}})
    assert same.window == WINDOW and np.array_equal(inside, same.valid)
    note = aoi_crs_note(aoi, image.crs_wkt)
    assert note == (f"note: the area of interest's GeoJSON is in {name} (its \"crs\" member); it "
                    "was reprojected into the raster's CRS (EPSG:32633)")


@pytest.mark.parametrize("name", ["EPSG:32633", "urn:ogc:def:crs:EPSG::32633"])
def test_a_member_naming_the_raster_s_own_crs_changes_nothing(raster, name):
    aoi = {"geojson": named(name, utm_ring())}
    assert validate_aoi(aoi, check_raster_file(raster)) == aoi
    image = read_raster(raster, aoi=aoi)
    assert image.window == WINDOW
    assert aoi_crs_note(aoi, image.crs_wkt) is None


def test_crs84_and_epsg_4326_are_the_same_to_a_raster_in_degrees(tmp_path):
    """Over a raster in EPSG:4326 an area named CRS84 (lon/lat, as GeoJSON is) is not swapped
    into lat/lon, and no note says it was moved."""
    import rasterio
    from rasterio.transform import from_origin

    path = tmp_path / "degrees.tif"
    with rasterio.open(path, "w", driver="GTiff", width=40, height=30, count=1, dtype="uint8",
                       crs="EPSG:4326", transform=from_origin(15.0, 41.0, 0.01, 0.01)) as ds:
        ds.write(np.full((1, 30, 40), 100, np.uint8))
    ring = [[15.105, 40.895], [15.305, 40.895], [15.305, 40.795], [15.105, 40.795], [15.105, 40.895]]
    for name in ("urn:ogc:def:crs:OGC:1.3:CRS84", "OGC:CRS84", "EPSG:4326"):
        aoi = {"geojson": named(name, ring)}
        assert validate_aoi(aoi, check_raster_file(path)) == aoi
        image = read_raster(path, aoi=aoi)
        assert image.window == (10, 10, 21, 11), name
        assert aoi_crs_note(aoi, image.crs_wkt) is None


@pytest.mark.parametrize("crs, expected", [
    ({"type": "name", "properties": {"name": "EPSG:99999999"}}, "which the engine does not know"),
    ({"type": "name", "properties": {"name": "not a crs"}}, "which the engine does not know"),
    ("EPSG:4326", "names no CRS"),
    ({"type": "link", "properties": {"href": "http://example.com/crs", "type": "proj4"}},
     "names no CRS"),
    ({"type": "name", "properties": {"name": 4326}}, "names no CRS"),
])
def test_a_crs_member_that_cannot_be_read_is_bad_aoi_in_the_checks_and_the_reader(raster, crs,
                                                                                   expected):
    geojson = named("EPSG:4326", lonlat_ring())
    geojson["crs"] = crs
    err = refused(lambda: validate_aoi({"geojson": geojson}, check_raster_file(raster)))
    assert err.code == "bad_aoi" and expected in err.message
    with pytest.raises(AOIError) as read_err:
        read_raster(raster, aoi={"geojson": geojson})
    assert str(read_err.value) == err.message


def test_a_crs_member_over_a_raster_without_a_crs_is_refused(tmp_path):
    """Such a raster's area of interest is in source pixels: there is nothing to reproject into."""
    from rasters import write_geotiff as write_any

    path = write_any(tmp_path / "plain.tif", np.full((3, 40, 50), 7, np.uint8), crs=None)
    geojson = named("EPSG:4326", [[1, 1], [20, 1], [20, 20], [1, 20], [1, 1]])
    err = refused(lambda: validate_aoi({"geojson": geojson}, check_raster_file(path)))
    assert err.code == "bad_aoi" and "has no CRS to reproject it into" in err.message
    with pytest.raises(AOIError, match="has no CRS to reproject it into"):
        read_raster(path, aoi={"geojson": geojson})
    del geojson["crs"]  # without the member: pixels, as before
    assert read_raster(path, aoi={"geojson": geojson}).window == (1, 1, 19, 19)


def test_coordinates_the_projection_cannot_take_are_bad_aoi_not_a_traceback(raster):
    """A latitude of 95 degrees (metres written under an EPSG:4326 member, say) has no place in
    UTM: PROJ raised its own error out of the reader."""
    geojson = named("EPSG:4326", [[15, 95], [15.1, 95], [15.1, 94], [15, 94], [15, 95]])
    err = refused(lambda: validate_aoi({"geojson": geojson}, check_raster_file(raster)))
    assert err.code == "bad_aoi" and "could not be reprojected into the raster's CRS" in err.message
    with pytest.raises(AOIError) as read_err:
        read_raster(raster, aoi={"geojson": geojson})
    assert str(read_err.value) == err.message


def test_an_area_in_another_crs_that_misses_the_raster_is_still_outside(raster):
    ring = [[16.0, 41.0], [16.1, 41.0], [16.1, 40.9], [16.0, 40.9], [16.0, 41.0]]
    err = refused(lambda: validate_aoi({"geojson": named("EPSG:4326", ring)},
                                       check_raster_file(raster)))
    assert err.code == "aoi_outside_raster"
