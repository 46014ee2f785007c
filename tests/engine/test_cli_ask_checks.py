"""`python -m engine ask` checks its request as the server does (engine/request_checks.py) before
it loads a model: with the real checkpoint a load takes minutes, and a typo in the raster path
used to surface only after it."""

from __future__ import annotations

import numpy as np
import pytest

import engine.pipeline
from engine.cli import main
from rasters import write_geotiff


class RecordingEngine:
    """Stands in for `Engine` to see whether (and with what) `ask` would have loaded a model."""

    made: list = []
    asked: list = []

    def __init__(self, *args, **kwargs):
        RecordingEngine.made.append(kwargs)

    def health(self):
        return {"demo_model": False}

    def ask(self, req):
        RecordingEngine.asked.append(req)
        return iter(())


@pytest.fixture
def recorder(monkeypatch):
    RecordingEngine.made, RecordingEngine.asked = [], []
    monkeypatch.setattr(engine.pipeline, "Engine", RecordingEngine)
    return RecordingEngine


@pytest.fixture
def rgb(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (3, 64, 80), dtype=np.uint8)
    return write_geotiff(tmp_path / "scene.tif", data)


@pytest.mark.parametrize("make_args, expected", [
    (lambda d, r: [str(d / "missing.tif"), "How many ships?"], "There is no file at"),
    (lambda d, r: [str(d), "How many ships?"], "is a folder, not a raster file"),
    (lambda d, r: [r, "   "], "Please type a question"),
    (lambda d, r: [r, "How many ships?", "--bands", "5"], "Band(s) [5] do not exist; the raster has 3"),
    (lambda d, r: [r, "How many ships?", "--aoi", "500,500,10,10"], "lies outside the raster"),
    (lambda d, r: [r, "How many ships?", "--aoi", "POLYGON((0 0, 1 0, 1 1, 0 0))"],
     "does not overlap the raster"),
    (lambda d, r: [r, "How many ships?", "--aoi", "LINESTRING(0 0, 1 1)"], "must be a polygon"),
])
def test_a_bad_request_is_refused_before_any_model_loads(tmp_path, rgb, recorder, capsys,
                                                          make_args, expected):
    rc = main(["ask", *make_args(tmp_path, rgb), "--weights", str(tmp_path / "no-weights"),
               "--no-demo"])
    err = capsys.readouterr().err
    assert rc == 2
    assert expected in err and err.startswith("error:")
    assert recorder.made == []  # no Engine, so no weights were even looked for


@pytest.mark.parametrize("make, expected", [(lambda d: d / "not_a_dir", "does not exist"),
                                            (lambda d: d, "no adapter_config.json")])
def test_a_bad_adapter_is_refused_before_any_model_loads(tmp_path, rgb, recorder, capsys, make, expected):
    rc = main(["ask", rgb, "How many ships?", "--adapter", str(make(tmp_path))])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --adapter: ") and expected in err
    assert recorder.made == []  # no Engine: nothing loaded


def _adapter_with_config(folder, text: str):
    folder.mkdir()
    (folder / "adapter_config.json").write_text(text, encoding="utf-8")
    return folder


DAMAGED_CONFIGS = [
    ("{not json", "adapter_config.json cannot be read as JSON (Expecting property name"),
    ("", "adapter_config.json cannot be read as JSON (Expecting value"),
    ("[1, 2]", "adapter_config.json holds a list, not a JSON object"),
    ('{"r": 8}', "adapter_config.json names no peft_type"),
]


@pytest.mark.parametrize("text, expected", DAMAGED_CONFIGS)
def test_a_damaged_adapter_config_is_refused_naming_it_before_any_model_loads(
        tmp_path, rgb, recorder, capsys, text, expected):
    """An adapter_config.json that is not JSON (or not an object) passed the up-front check and
    was refused only after the base model had loaded (minutes with the real weights), as
    "cannot apply the adapter in DIR: Expecting value: ...", naming no file."""
    adapter = _adapter_with_config(tmp_path / "adapter", text)
    rc = main(["ask", rgb, "How many ships?", "--adapter", str(adapter)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: --adapter: {adapter / 'adapter_config.json'}")
    assert expected in err and "written by `python -m engine finetune`" in err
    assert recorder.made == []  # no Engine: nothing loaded


@pytest.mark.parametrize("text, expected", DAMAGED_CONFIGS[:1] + DAMAGED_CONFIGS[2:3])
def test_serve_refuses_a_damaged_adapter_config_before_the_base_model_loads(
        tmp_path, tiny_checkpoint, capsys, monkeypatch, text, expected):
    import socket

    import engine.loader

    for var in ("GEOVQA_CONFIG_DIR", "GEOVQA_STATE_DIR"):  # serve's token and job folders
        monkeypatch.setenv(var, str(tmp_path / var))
    # the first step of the base model's load (engine/loader.py load_model): its memory check
    monkeypatch.setattr(engine.loader, "check_fits",
                        lambda *a, **k: pytest.fail("the base model began to load before the adapter's check"))
    adapter = _adapter_with_config(tmp_path / "adapter", text)
    with socket.socket() as s:  # a port that is free now
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    rc = main(["serve", "--port", port, "--weights", str(tiny_checkpoint), "--adapter", str(adapter)])
    err = capsys.readouterr().err
    assert rc == 2 and f"error: {adapter / 'adapter_config.json'}" in err and expected in err


def test_missing_raster_is_named_before_missing_weights(tmp_path, capsys):
    """The real Engine, no stand-in: of two mistakes, the one found without loading comes first."""
    rc = main(["ask", str(tmp_path / "missing.tif"), "q?", "--weights", str(tmp_path / "none"),
               "--no-demo"])
    err = capsys.readouterr().err
    assert rc == 2 and "There is no file at" in err and "no weights" not in err


def test_bands_must_be_numbers(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["ask", "scene.tif", "q?", "--bands", "red,green,blue"])
    assert exc.value.code == 2
    assert "--bands: bands must be 1-based band numbers" in capsys.readouterr().err


def test_a_good_request_reaches_the_engine_checked(tmp_path, rgb, recorder, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a path relative to where the user stands
    rc = main(["ask", "scene.tif", "  How many ships?  ", "--bands", "3,2,1",
               "--aoi", "10,10,20,20", "--budget", "64", "--max-new-tokens", "7"])
    assert rc == 0 and len(recorder.made) == 1
    (req,) = recorder.asked
    assert req.raster_path == str(tmp_path / "scene.tif")
    assert req.question == "How many ships?"
    assert (req.bands, req.aoi, req.budget, req.max_new_tokens) == (
        [3, 2, 1], {"window": [10, 10, 20, 20]}, 64, 7)


def _square(x0, y0, size):
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x0 + size, y0], [x0 + size, y0 - size],
                                                [x0, y0 - size], [x0, y0]]]}


def test_a_geojson_file_aoi_keeps_every_feature(tmp_path, rgb, recorder):
    """A FeatureCollection of two areas asks about both (it used to keep the first one only).
    The CLI sends the file's object as it is: the request checks and the reader join its
    polygons (engine/area_of_interest.py geojson_area), as for a client of the server."""
    import json

    from engine.area_of_interest import geojson_area
    from engine.raster import read_raster

    fc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"name": "a"}, "geometry": _square(500000, 5000000, 100)},
        {"type": "Feature", "properties": {}, "geometry": None},  # allowed by GeoJSON: skipped
        {"type": "Feature", "properties": {}, "geometry": _square(500600, 4999500, 100)}]}
    (tmp_path / "two.geojson").write_text(json.dumps(fc))
    assert main(["ask", rgb, "q?", "--aoi", str(tmp_path / "two.geojson")]) == 0
    (req,) = recorder.asked
    assert req.aoi == {"geojson": fc}  # passed through, not joined by the CLI
    area = geojson_area(req.aoi["geojson"])
    assert area.geom_type == "MultiPolygon" and area.area == pytest.approx(2 * 100 * 100)
    assert area.bounds == (500000, 4999400, 500700, 5000000)
    im = read_raster(rgb, aoi=req.aoi)  # what the engine reads: both squares, nothing between
    assert im.window == (0, 0, 70, 60)
    assert im.valid[:10, :10].all() and im.valid[50:, 60:].all() and not im.valid[20:40, 20:40].any()


@pytest.mark.parametrize("geojson", [
    lambda: {"type": "Feature", "properties": {}, "geometry": _square(500000, 5000000, 100)},
    lambda: _square(500000, 5000000, 100),
])
def test_a_geojson_file_feature_or_geometry_is_sent_as_it_is(tmp_path, rgb, recorder, geojson):
    import json

    (tmp_path / "one.json").write_text(json.dumps(geojson()))
    assert main(["ask", rgb, "q?", "--aoi", str(tmp_path / "one.json")]) == 0
    assert recorder.asked[0].aoi == {"geojson": geojson()}


def test_a_decimal_window_is_a_window(rgb, recorder):
    assert main(["ask", rgb, "q?", "--aoi", "0,0,10.5,10"]) == 0
    assert recorder.asked[0].aoi == {"window": [0, 0, 10.5, 10]}


@pytest.mark.parametrize(("content", "expected"), [
    ("[]", "holds no GeoJSON object"),
    ('{"type": "FeatureCollection", "features": []}', "has no feature with a polygon"),
    ('{"type": "Feature", "geometry": null}', "Feature has no geometry"),
    ('{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": '
     '{"type": "Point", "coordinates": [500010, 4999990]}}]}',
     "Feature 1 of the area of interest's FeatureCollection must be a polygon"),
    ('{"type": "LineString", "coordinates": [[500010, 4999990], [500100, 4999900]]}',
     "must be a polygon (Polygon or MultiPolygon), not a LineString"),
    ('{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": '
     '[[[0, 0], [10, 0], [10, 10], [0, 0]]]}}', "does not overlap the raster"),
    ("{not json", "is not readable GeoJSON"),
    (None, "does not exist"),
])
def test_a_bad_geojson_file_aoi_is_a_clear_error(tmp_path, rgb, recorder, capsys, content, expected):
    path = tmp_path / "area.geojson"
    if content is not None:
        path.write_text(content)
    assert main(["ask", rgb, "q?", "--aoi", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and expected in err and "Traceback" not in err
    assert f"area-of-interest file {path}" in err  # the file is named
    assert recorder.made == []


def test_an_aoi_that_is_no_kind_of_area_is_named(rgb, recorder, capsys):
    """A mistyped file name is not parsed as WKT ("Unknown type: 'DATA/TYPO.SHP'")."""
    assert main(["ask", rgb, "q?", "--aoi", "data/area.shp"]) == 2
    err = capsys.readouterr().err
    assert "'data/area.shp' is none of" in err and recorder.made == []


def test_an_output_dir_that_cannot_be_made_is_refused_before_loading(tmp_path, rgb, recorder, capsys):
    """It used to fail with a traceback after the whole answer had been generated."""
    assert main(["ask", rgb, "q?", "--output-dir", rgb]) == 2  # a file, not a folder
    err = capsys.readouterr().err
    assert err.startswith("error: --output-dir") and "cannot be made" in err and recorder.made == []
    assert main(["ask", rgb, "q?", "--output-dir", str(tmp_path / "new" / "dir")]) == 0
    assert (tmp_path / "new" / "dir").is_dir()


def _folder_the_permission_bits_call_writable_but_is_not():
    """A folder where os.access(W_OK) says yes and making a file fails, as for every folder on
    Windows (os.access reads only the read-only attribute there): sysfs's root for root on Linux
    (root passes the permission bits; sysfs makes no files). None where this system has none."""
    import os
    import tempfile

    folder = "/sys"
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        return None
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return folder
    return None


def test_an_output_dir_where_no_file_can_be_made_is_refused_before_loading(tmp_path, rgb, recorder, capsys):
    """The folder check asked os.access, which on Windows says yes to every folder: a protected
    --output-dir passed it and the answer failed after all its work, when its heatmap was written."""
    folder = _folder_the_permission_bits_call_writable_but_is_not()
    if folder is None:
        pytest.skip("no folder here that os.access calls writable while no file can be made in it")
    assert main(["ask", rgb, "q?", "--output-dir", folder]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --output-dir {folder} cannot be written to: "), err
    assert recorder.made == []


def test_the_write_check_leaves_nothing_behind(tmp_path):
    from engine.cli_args import writable_folder_problem

    assert writable_folder_problem(tmp_path / "out", "--output-dir") is None
    assert list((tmp_path / "out").iterdir()) == []


def test_a_question_with_bytes_that_are_not_utf8_is_refused_before_loading(rgb, recorder, capsys):
    """"café" typed in a Latin-1 terminal reaches sys.argv as 'caf\\udce9' (surrogateescape)."""
    assert main(["ask", rgb, "caf\udce9?"]) == 2
    err = capsys.readouterr().err
    assert "not valid text" in err and recorder.made == []


def test_a_seed_beyond_64_bits_is_refused_before_loading(rgb, recorder, capsys):
    assert main(["ask", rgb, "q?", "--strategy", "random", "--seed", str(2**64)]) == 2
    assert "'seed' must be between 0 and" in capsys.readouterr().err and recorder.made == []
    assert main(["ask", rgb, "q?", "--strategy", "random", "--seed", str(2**63 - 1)]) == 0


def test_bands_naming_the_alpha_band_are_refused_before_any_model_loads(tmp_path, recorder, capsys):
    """`ask --bands 4,3,2` on an RGBA GeoTIFF read its alpha (a transparency mask) as red. Refused
    with the band named, before a model loads; its colour bands (the plugin sends a render as
    bands 1, 2, 3) are asked about as before."""
    data = np.random.default_rng(1).integers(0, 255, (4, 64, 80), dtype=np.uint8)
    rgba = write_geotiff(tmp_path / "rgba.tif", data, photometric="RGB", alpha=True)
    common = ["--weights", str(tmp_path / "no-weights"), "--no-demo"]
    assert main(["ask", rgba, "How many ships?", "--bands", "4,3,2", *common]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Band 4 is the raster's alpha band (transparency, a mask and not imagery)")
    assert recorder.made == []
    main(["ask", rgba, "How many ships?", "--bands", "1,2,3", *common])
    assert [r.bands for r in recorder.asked] == [[1, 2, 3]]


@pytest.mark.parametrize("text", ["10,20,30,40,50", "10,20,30"])
def test_a_window_of_other_than_four_numbers_is_no_area(text):
    from engine.cli import parse_aoi
    from engine.jobs import JobError

    assert parse_aoi("10,20,30,40") == {"window": [10, 20, 30, 40]}
    with pytest.raises(JobError, match="is none of 'col,row,width,height'") as exc:
        parse_aoi(text)
    assert exc.value.code == "bad_aoi"


def _lonlat_file(tmp_path, crs_name: str):
    """A .geojson of a 100 m square 20 px into the raster (10 m pixels, EPSG:32633), written in
    longitude/latitude with the legacy "crs" member naming `crs_name`, as QGIS and GDAL write it."""
    import json

    from rasterio.warp import transform

    ring = _square(500205, 4999795, 100)["coordinates"][0]
    lons, lats = transform("EPSG:32633", "EPSG:4326", [p[0] for p in ring], [p[1] for p in ring])
    obj = {"type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": crs_name}},
           "features": [{"type": "Feature", "properties": {},
                         "geometry": {"type": "Polygon", "coordinates": [list(map(list, zip(lons, lats)))]}}]}
    path = tmp_path / "lonlat.geojson"
    path.write_text(json.dumps(obj))
    return path


def test_a_geojson_file_in_lon_lat_is_asked_about_where_it_lies(tmp_path, rgb, recorder, capsys):
    """A file whose "crs" member names EPSG:4326 was read as if in the raster's UTM metres and
    refused before loading: "does not overlap the raster". It is reprojected, as the reader does."""
    from engine.raster import read_raster

    path = _lonlat_file(tmp_path, "urn:ogc:def:crs:EPSG::4326")
    assert main(["ask", rgb, "q?", "--aoi", str(path)]) == 0, capsys.readouterr().err
    (req,) = recorder.asked
    assert read_raster(rgb, aoi=req.aoi).window == (20, 20, 11, 11)


def test_a_geojson_file_naming_an_unknown_crs_is_refused_naming_the_file(tmp_path, rgb, recorder,
                                                                         capsys):
    path = _lonlat_file(tmp_path, "EPSG:123456789")
    assert main(["ask", rgb, "q?", "--aoi", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: The area-of-interest file {path}: The area of interest's GeoJSON "
                          "names the CRS 'EPSG:123456789'")
    assert recorder.made == []
