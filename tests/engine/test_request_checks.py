"""engine/request_checks.py refuses, before anything is queued, the requests that used to pass
its checks and then fail in the stream: numbers that are not finite, bands the reader cannot show."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from server_rasters import write_geotiff  # noqa: E402

from engine import protocol  # noqa: E402
from engine.jobs import JobError  # noqa: E402
from engine.request_checks import validate_aoi, validate_ask, validate_batch  # noqa: E402
from engine.uploads import check_raster_file  # noqa: E402


@pytest.fixture(scope="module")
def raster(tmp_path_factory):
    return write_geotiff(tmp_path_factory.mktemp("checks") / "scene.tif")  # 64 x 48, 3 bands


def refused(call) -> JobError:
    with pytest.raises(JobError) as caught:
        call()
    return caught.value


def square(x0: float, y0: float, x1: float, y1: float) -> list:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


@pytest.mark.parametrize("window", [
    [0, 0, float("inf"), 10],      # JSON 1e999 or Infinity
    [0, 0, 10, float("-inf")],
    [0, 0, 10 ** 400, 10],         # an int no float can hold
    [0, 0, float("nan"), 10],
    [float("nan"), 0, 10, 10],
])
def test_window_numbers_must_be_finite(raster, window):
    info = check_raster_file(raster)
    err = refused(lambda: validate_aoi({"window": window}, info))
    assert err.code == "bad_aoi"
    assert "finite" in err.message


def test_a_huge_finite_window_is_clipped_not_refused(raster):
    info = check_raster_file(raster)
    aoi = {"window": [0, 0, 1e300, 1e300]}
    assert validate_aoi(aoi, info) == aoi


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_polygon_coordinates_must_be_finite(raster, bad):
    info = check_raster_file(raster)
    x0, y0 = 500000 + 2, 4500000 - 40  # inside the raster
    ring = square(x0, y0, x0 + 10, y0 + 10)
    ring[2] = [bad, y0 + 10]
    err = refused(lambda: validate_aoi({"geojson": {"type": "Polygon",
                                                    "coordinates": [ring]}}, info))
    assert err.code == "bad_aoi", err.message
    assert "finite" in err.message


def test_wkt_with_infinite_coordinates_is_a_bad_aoi(raster):
    info = check_raster_file(raster)
    wkt = "POLYGON((500002 4499960, inf 4499960, 500012 4499970, 500002 4499960))"
    assert refused(lambda: validate_aoi({"polygon_wkt": wkt}, info)).code == "bad_aoi"


def test_batch_items_get_the_same_aoi_check(raster):
    body = {"items": [{"raster_path": str(raster), "aoi": {"window": [0, 0, float("nan"), 5]}}],
            "questions": ["Any roads?"]}
    err = refused(lambda: validate_batch(body, protocol.STRATEGIES))
    assert err.code == "bad_aoi"


@pytest.mark.parametrize("bands", [[1, 2], [1, 2, 3, 1]])
def test_bands_are_one_or_three(raster, bands):
    body = {"raster_path": str(raster), "question": "What is here?", "bands": bands}
    err = refused(lambda: validate_ask(body, protocol.STRATEGIES))
    assert err.code == "bad_request"
    assert str(len(bands)) in err.message
    batch = {"items": [{"raster_path": str(raster), "bands": bands}], "questions": ["Any?"]}
    assert refused(lambda: validate_batch(batch, protocol.STRATEGIES)).code == "bad_request"


@pytest.mark.parametrize("bands", [[2], [3, 2, 1]])
def test_one_or_three_bands_pass(raster, bands):
    body = {"raster_path": str(raster), "question": "What is here?", "bands": bands}
    assert validate_ask(body, protocol.STRATEGIES)["bands"] == bands


# --- rasters placed by ground control points ---------------------------------------------------

def _gcp_raster(path, bent: bool = False) -> str:
    """64 x 48 px placed by GCPs on 10 m pixels from (500000, 5000000), UTM 33N; `bent` moves the
    middle GCP 8 pixels east: no affine transform fits, the file needs a warp."""
    import numpy as np
    from rasters import write_gcp_geotiff

    gcps = [(c, r, 500000.0 + 10 * c, 5000000.0 - 10 * r)
            for c, r in ((0, 0), (64, 0), (0, 48), (64, 48), (32, 24))]
    if bent:
        gcps[-1] = (32, 24, gcps[-1][2] + 80, gcps[-1][3])
    return write_gcp_geotiff(path, np.full((3, 48, 64), 100, np.uint8), gcps)


def test_a_gcp_raster_is_described_in_its_gcps_crs(tmp_path):
    """Its bounds were pixels and its CRS none: a polygon drawn in the layer's CRS was refused
    as outside the raster."""
    info = check_raster_file(_gcp_raster(tmp_path / "gcps.tif"))
    assert info.bounds == pytest.approx((500000, 4999520, 500640, 5000000))
    assert "UTM zone 33N" in info.crs_wkt
    body = {"raster_path": info.path, "question": "What is here?",
            "aoi": {"geojson": {"type": "Polygon", "coordinates": [square(500100, 4999700, 500300, 4999900)]}}}
    assert validate_ask(body, protocol.STRATEGIES)["aoi"] == body["aoi"]


def test_a_gcp_raster_needing_a_warp_is_refused_before_anything_is_queued(tmp_path):
    path = _gcp_raster(tmp_path / "bent.tif", bent=True)
    err = refused(lambda: validate_ask({"raster_path": path, "question": "Any roads?"},
                                       protocol.STRATEGIES))
    assert err.code == "raster_unreadable" and "gdalwarp" in err.message
    batch = {"items": [{"raster_path": path}], "questions": ["Any roads?"]}
    assert refused(lambda: validate_batch(batch, protocol.STRATEGIES)).code == "raster_unreadable"


@pytest.mark.parametrize("geotiff_only", [False, True])
def test_check_raster_file_reads_the_header_once(raster, geotiff_only, monkeypatch):
    import builtins

    import engine.uploads as uploads

    opened = []

    def counted_open(file, *args, **kwargs):
        opened.append(str(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(uploads, "open", counted_open, raising=False)
    assert check_raster_file(raster, geotiff_only=geotiff_only).count == 3
    assert opened == [str(raster)]


def test_an_upload_that_is_not_a_tiff_is_refused_before_gdal(tmp_path):
    png = tmp_path / "layer.tif"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    err = refused(lambda: check_raster_file(png, geotiff_only=True))
    assert (err.code, err.message) == ("not_a_raster", "The uploaded file is not a GeoTIFF.")
    assert err.hint == "Upload the layer as a GeoTIFF (.tif)."
    info = check_raster_file(write_geotiff(tmp_path / "ok.tif"), geotiff_only=True)
    assert (info.width, info.height) == (64, 48)


# --- a GeoJSON area: the reader's own geojson_area checks it -----------------------------------

def _feature(geometry) -> dict:
    return {"type": "Feature", "properties": {}, "geometry": geometry}


def _polygon(x0: float, y0: float, size: float = 10) -> dict:
    return {"type": "Polygon", "coordinates": [square(x0, y0 - size, x0 + size, y0)]}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_feature_collection_s_coordinates_must_be_finite(raster, bad):
    info = check_raster_file(raster)
    broken = _polygon(500020, 4499990)
    broken["coordinates"][0][1] = [bad, 4499990]
    fc = {"type": "FeatureCollection", "features": [_feature(_polygon(500002, 4499998)),
                                                    _feature(broken)]}
    err = refused(lambda: validate_aoi({"geojson": fc}, info))
    assert err.code == "bad_aoi" and "Feature 2" in err.message and "finite" in err.message


def test_what_the_checks_pass_the_reader_reads_and_what_they_refuse_it_refuses(raster):
    """One reader (engine/area_of_interest.py geojson_area) for the checks and the read: a
    FeatureCollection passed the reader but not the checks."""
    from engine.raster import read_raster
    from engine.raster_errors import AOIError

    info = check_raster_file(raster)
    bowtie = {"type": "Polygon", "coordinates": [[[500002, 4499998], [500020, 4499980],
                                                  [500020, 4499998], [500002, 4499980],
                                                  [500002, 4499998]]]}
    good = [_polygon(500002, 4499998), _feature(_polygon(500002, 4499998)),
            {"type": "FeatureCollection", "features": [_feature(bowtie),
                                                       _feature(_polygon(500040, 4499970))]},
            {"type": "MultiPolygon", "coordinates": [_polygon(500002, 4499998)["coordinates"]]}]
    bad = [{"type": "GeometryCollection", "geometries": [_polygon(500002, 4499998)]},
           {"type": "FeatureCollection", "features": [_feature({"type": "LineString", "coordinates": [
               [500002, 4499998], [500020, 4499980]]})]},
           {"type": "FeatureCollection", "features": [None]},
           {"type": "Polygon", "coordinates": []},
           [_polygon(500002, 4499998)]]
    for geojson in good:
        aoi = {"geojson": geojson}
        assert validate_aoi(aoi, info) == aoi  # unchanged: the reader reads the same object
        assert read_raster(raster, aoi=aoi).valid.any()
    for geojson in bad:
        err = refused(lambda: validate_aoi({"geojson": geojson}, info))
        assert err.code == "bad_aoi", geojson
        with pytest.raises(AOIError) as read_err:
            read_raster(raster, aoi={"geojson": geojson})
        assert str(read_err.value) == err.message


# --- batches -------------------------------------------------------------------------------------

def test_a_batch_opens_each_raster_once_however_many_items_name_it(raster, tmp_path, monkeypatch):
    """Every item opened its raster again: 2,000 areas of one tiled raster took about 10 s of
    opening the same file before the job was even accepted."""
    import engine.request_checks as checks

    other = write_geotiff(tmp_path / "other.tif")
    opened = []
    real = checks.check_raster_file
    monkeypatch.setattr(checks, "check_raster_file", lambda path, **kw: opened.append(path) or real(path, **kw))
    cells = [{"layer": f"cell {i}", "raster_path": str(raster), "aoi": {"window": [i * 8, 0, 8, 8]}}
             for i in range(8)]
    body = {"items": [*cells, {"layer": " ", "raster_path": str(other)},  # a blank name: the file's
                      {"layer": "again", "raster_path": str(raster)}],
            "questions": ["Any roads?", "Any water?"]}
    spec = validate_batch(body, protocol.STRATEGIES)
    assert sorted(opened) == sorted([str(raster), str(other)])
    assert [it["layer"] for it in spec["items"]] == [*(f"cell {i}" for i in range(8)), "other", "again"]
    assert [it["aoi"] for it in spec["items"][:8]] == [c["aoi"] for c in cells]
    # a later item on a raster already opened is still checked against it, and named
    body["items"].append({"layer": "Harbour", "raster_path": str(raster), "aoi": {"window": [64, 0, 8, 8]}})
    err = refused(lambda: validate_batch(body, protocol.STRATEGIES))
    assert err.code == "aoi_outside_raster" and err.message.startswith("Layer Harbour: ")


@pytest.mark.parametrize("item, message", [
    ({"layer": "Harbour 2024", "raster_path": None}, "Layer Harbour 2024 has no 'raster_path'."),
    ({"layer": "Harbour 2024", "raster_path": "/no/such/h24.tif"}, "Layer Harbour 2024: There is no file"),
    ({"raster_path": None}, "Item 2 has no 'raster_path'."),
    ({"layer": ["not", "a", "name"], "raster_path": "/no/such/h24.tif"}, "Item 2: There is no file"),
    ({"layer": "  ", "bands": [9], "raster_path": "RASTER"}, "Item 2: Band(s) [9] do not exist"),
])
def test_a_batch_item_s_error_names_its_layer(raster, item, message):
    """A named item without a raster path was called "Item 2"; an item without a name was called
    "Layer 2", and a layer "name" that is no string was shown as it was."""
    item = {k: (str(raster) if v == "RASTER" else v) for k, v in item.items()}
    body = {"items": [{"layer": "first", "raster_path": str(raster)}, item], "questions": ["Any?"]}
    assert refused(lambda: validate_batch(body, protocol.STRATEGIES)).message.startswith(message)


def test_an_area_touching_only_the_rasters_edge_is_refused_before_anything_is_queued(raster):
    """Shapely's intersects() is true for a square sharing just a corner or an edge; the reader
    refuses it (no pixel in it) after the question was queued, so the checks refuse it first.
    An area overlapping the last pixels and reaching past the edge is read, so it passes."""
    from engine.raster import read_raster
    from engine.raster_errors import AOIError

    info = check_raster_file(raster)
    left, bottom, right, top = info.bounds
    corner = {"geojson": {"type": "Polygon", "coordinates": [square(left - 10, top, left, top + 10)]}}
    edge = {"geojson": {"type": "Polygon", "coordinates": [square(right, bottom, right + 5, top)]}}
    for aoi in (corner, edge):
        with pytest.raises(AOIError) as read:
            read_raster(raster, aoi=aoi)
        assert read.value.code == "aoi_outside_raster"
        assert refused(lambda: validate_aoi(aoi, info)).code == "aoi_outside_raster"
    pixel = (right - left) / info.width
    sliver = {"geojson": {"type": "Polygon",
                          "coordinates": [square(right - 1.5 * pixel, bottom, right + 5, top)]}}
    assert validate_aoi(sliver, info) == sliver
    assert read_raster(raster, aoi=sliver).window[2] == 2  # the last two columns


def test_a_path_the_engine_cannot_stat_is_unreadable_not_a_server_failure(tmp_path):
    """A name longer than the file system takes (and a folder the engine may not enter) raised
    OSError from Path.exists(), which the server answered with 500."""
    err = refused(lambda: check_raster_file("/" + "a" * 300 + ".tif"))
    assert err.code == "raster_unreadable"
    assert "File name too long" in err.message


def test_an_unreadable_raster_says_what_gdal_said(tmp_path):
    """rasterio wraps GDAL's reason as "Read failed. See previous exception for details."."""
    from rasters import write_truncated

    full = write_geotiff(tmp_path / "full.tif", width=512, height=512)
    bad = write_truncated(tmp_path / "trunc.tif", full, 0.01)
    err = refused(lambda: check_raster_file(str(bad)))
    assert err.code == "raster_unreadable"
    assert "previous exception" not in err.message
    assert "looks like a raster but cannot be read: " in err.message


from engine.request_checks import MAX_NEW_TOKENS_LIMIT  # noqa: E402


@pytest.mark.parametrize("field, value", [
    ("budget", True), ("max_new_tokens", False), ("seed", True),  # JSON true/false is no number
    ("tokens_per_tile", 577), ("max_new_tokens", MAX_NEW_TOKENS_LIMIT + 1),
    ("faithful_empty_slots", 1), ("faithful_empty_slots", "yes"),
])
def test_numbers_and_flags_are_checked_at_their_limits(raster, field, value):
    body = {"raster_path": str(raster), "question": "Any roads?", field: value}
    err = refused(lambda: validate_ask(body, protocol.STRATEGIES))
    assert err.code == "bad_request" and field in err.message


def test_the_largest_allowed_values_pass(raster):
    body = {"raster_path": str(raster), "question": "Any roads?", "tokens_per_tile": 576,
            "faithful_empty_slots": True}
    got = validate_ask(body, protocol.STRATEGIES)
    assert got["tokens_per_tile"] == 576 and got["faithful_empty_slots"] is True


BOWTIE_WKT = ("POLYGON((500002 4499998, 500020 4499980, 500020 4499998, 500002 4499980, "
              "500002 4499998))")  # a self-intersecting ring, as drawn by hand


@pytest.mark.parametrize("aoi", [
    {"polygon_wkt": BOWTIE_WKT},
    {"geojson": {"type": "Polygon", "coordinates": [[[500002, 4499998], [500020, 4499980],
                                                     [500020, 4499998], [500002, 4499980],
                                                     [500002, 4499998]]]}},
])
def test_a_self_intersecting_polygon_is_checked_as_the_reader_reads_it(raster, aoi):
    """GEOS cannot intersect a bow-tie ring with the raster's extent (TopologyException): the
    server answered 500. The reader makes it valid and reads it; the checks now do the same."""
    from engine.raster import read_raster

    info = check_raster_file(raster)
    assert validate_aoi(aoi, info) == aoi
    assert read_raster(raster, aoi=aoi).valid.any()
    far = {"polygon_wkt": BOWTIE_WKT.replace("5000", "6000")}  # the same bow-tie, 100 km east
    assert refused(lambda: validate_aoi(far, info)).code == "aoi_outside_raster"


@pytest.mark.parametrize("extra", [{"budjet": 64}, {"raster_identity": "sha256:" + "0" * 64},
                                   {"selection_text": "boats"}])
def test_fields_the_protocol_does_not_define_are_refused(raster, extra):
    """docs/protocol.md: a field not listed (the engine's own raster_identity and selection_text
    included) is refused with bad_request; the server dropped it without a word, so a misspelt
    budget ran the question without one."""
    body = {"raster_path": str(raster), "question": "Any roads?", **extra}
    err = refused(lambda: validate_ask(body, protocol.STRATEGIES))
    assert err.code == "bad_request"
    assert err.message == f"Unknown request fields: {next(iter(extra))!r}."
    assert "budget" in err.hint
    every = {name: None for name in protocol.ASK_FIELDS}  # every field the protocol lists passes
    assert validate_ask({**every, "raster_path": str(raster), "question": "Any roads?"},
                        protocol.STRATEGIES)["question"] == "Any roads?"


@pytest.mark.parametrize("extra, where", [
    ({"budjet": 64}, "top"), ({"question": "Any roads?"}, "top"), ({"request_id": "q-1"}, "top"),
    ({"budget": 64}, "item"), ({"question": "Any water?"}, "item"), ({"layer_id": "abc"}, "item"),
])
def test_batch_fields_the_protocol_does_not_define_are_refused(raster, extra, where):
    """As /ask: /batch dropped a field it does not define without a word, at the top level (a
    misspelt 'budjet' ran the job without a budget) and in each item (a per-item 'budget' or
    'question' was ignored); the refusal names the field, and the item by its number."""
    items = [{"layer": "one", "raster_path": str(raster)}, {"layer": "two", "raster_path": str(raster)}]
    body = {"items": items, "questions": ["Any roads?"]}
    if where == "top":
        body.update(extra)
        expected = f"Unknown request fields: {next(iter(extra))!r}."
    else:
        items[1].update(extra)
        expected = f"Unknown fields in item 2: {next(iter(extra))!r}."
    err = refused(lambda: validate_batch(body, protocol.STRATEGIES))
    assert err.code == "bad_request"
    assert err.message == expected
    assert ("max_new_tokens" if where == "top" else "raster_path") in err.hint
    # every field the protocol lists passes, at both levels
    item = {name: None for name in protocol.BATCH_ITEM_FIELDS}
    every = {**{name: None for name in protocol.BATCH_FIELDS},
             "items": [{**item, "raster_path": str(raster)}], "questions": ["Any roads?"]}
    assert validate_batch(every, protocol.STRATEGIES)["items"][0]["layer"] == raster.stem


@pytest.mark.parametrize("odd, shown", [(True, "true"), ("500010", '"500010"'), (None, "null")])
def test_a_geojson_coordinate_must_be_a_json_number(raster, odd, shown):
    """shapely reads true as 1 and "500010" as 500010: a ring with [true, false] in it was read
    as a corner at (1, 0), another area than the client meant, without a word."""
    from engine.raster import read_raster
    from engine.raster_errors import AOIError

    info = check_raster_file(raster)
    ring = square(500002, 4499980, 500020, 4499998)
    ring[1] = [odd, 4499980]
    for geojson in ({"type": "Polygon", "coordinates": [ring]},
                    {"type": "MultiPolygon", "coordinates": [[ring]]}):
        err = refused(lambda: validate_aoi({"geojson": _feature(geojson)}, info))
        assert err.code == "bad_aoi"
        assert err.message == ("The area of interest's Feature has a coordinate that is not a "
                               f"number: {shown}.")
        with pytest.raises(AOIError, match="not a number"):
            read_raster(raster, aoi={"geojson": geojson})


def test_a_wkt_polygon_with_no_area_is_said_to_have_none(raster):
    """It was refused as "does not overlap the raster", which it does."""
    info = check_raster_file(raster)
    err = refused(lambda: validate_aoi(
        {"polygon_wkt": "POLYGON((500002 4499998, 500010 4499990, 500020 4499980, "
                        "500002 4499998))"}, info))
    assert err.code == "bad_aoi" and "has no area" in err.message
