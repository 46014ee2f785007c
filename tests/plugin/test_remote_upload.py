"""The remote-engine path: what the plugin uploads, and the answers it gets back.

A small capture server stands in for a remote engine where the test needs to see the exact
bytes sent (it keeps the multipart parts and answers with an error); the real engine is used
where the answer matters.
"""

from __future__ import annotations

import json
import os
import threading
from email.parser import BytesParser
from email.policy import HTTP
from http.server import ThreadingHTTPServer

import numpy as np
import pytest

from conftest import write_raster
from stub_engine import JsonHandler


class CaptureEngine:
    """Keeps every POST /ask body's parts; answers 400 'captured' (or a /health)."""

    def __init__(self, health: dict | None = None):
        self.parts: list[dict] = []
        self.health = dict({"status": "ok", "protocol": 1}, **(health or {}))
        cap = self

        class Handler(JsonHandler):
            def do_GET(self):  # noqa: N802
                self._json(200, cap.health)

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                head = f"Content-Type: {self.headers.get('Content-Type')}\r\n\r\n".encode()
                msg = BytesParser(policy=HTTP).parsebytes(head + body)
                cap.parts.append({p.get_param("name", header="content-disposition"): p.get_payload(decode=True)
                                  for p in msg.iter_parts()})
                self._json(400, {"error": {"code": "captured", "message": "captured", "hint": None}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def capture():
    cap = CaptureEngine()
    yield cap
    cap.close()


def send(url, path, tmp_path, upload=True, **client_kw):
    """Ask about ``path`` with an upload; returns the EngineError the capture server answers."""
    from geovqa.client import EngineClient
    from geovqa.engine_errors import EngineError
    from geovqa.engine_protocol import build_ask_request

    client = EngineClient(url, "t", **client_kw)
    with pytest.raises(EngineError) as err:
        list(client.ask(build_ask_request("What is here?", str(path)), upload=upload).events())
    return err.value


def uploaded(cap, tmp_path):
    """The raster bytes of the last upload, saved as a file GDAL opens."""
    from osgeo import gdal

    assert cap.parts, "nothing was uploaded"
    data = cap.parts[-1]["raster"]
    dest = tmp_path / "received.tif"
    dest.write_bytes(data)
    ds = gdal.Open(str(dest))
    assert ds is not None
    return ds


def write_world_file_tiff(tmp_path):
    """A TIFF placed only by a .tfw world file (no GeoTIFF tags), as scanners and old tools write."""
    from osgeo import gdal

    path = tmp_path / "scan.tif"
    ds = gdal.GetDriverByName("GTiff").Create(str(path), 40, 30, 1, gdal.GDT_Byte, ["PROFILE=BASELINE"])
    ds.GetRasterBand(1).WriteArray(np.arange(40 * 30, dtype=np.uint8).reshape(30, 40))
    ds = None
    (tmp_path / "scan.tfw").write_text("2.0\n0.0\n0.0\n-2.0\n600001.0\n5100001.0\n")
    return path


def test_plain_geotiff_is_uploaded_as_it_is(capture, tmp_path):
    path = write_raster(tmp_path / "plain.tif")
    send(capture.url, path, tmp_path)
    assert capture.parts[-1]["raster"] == open(path, "rb").read()


def test_world_file_placement_goes_inside_the_upload(capture, tmp_path):
    path = write_world_file_tiff(tmp_path)
    send(capture.url, path, tmp_path)
    ds = uploaded(capture, tmp_path)
    # the world file gives the centre of the top-left pixel; the geotransform its corner
    assert ds.GetGeoTransform() == pytest.approx((600000.0, 2.0, 0.0, 5100002.0, 0.0, -2.0))
    assert ds.GetRasterBand(1).ReadAsArray().tolist() == np.arange(1200, dtype=np.uint8).reshape(30, 40).tolist()


def test_aux_xml_nodata_and_msk_mask_go_inside_the_upload(capture, tmp_path):
    from osgeo import gdal

    path = write_raster(tmp_path / "side.tif", bands=1)
    ds = gdal.Open(path)  # read-only: GDAL puts nodata in .aux.xml and the mask in .msk
    ds.GetRasterBand(1).SetNoDataValue(7)
    ds.CreateMaskBand(gdal.GMF_PER_DATASET)
    m = ds.GetRasterBand(1).GetMaskBand()
    m.WriteArray(np.where(np.arange(48)[:, None] < 10, 0, 255).repeat(64, axis=1).astype(np.uint8))
    ds = None
    assert os.path.exists(path + ".aux.xml") and os.path.exists(path + ".msk")
    send(capture.url, path, tmp_path)
    got = uploaded(capture, tmp_path)
    assert got.GetRasterBand(1).GetNoDataValue() == 7
    assert got.GetFileList() == [str(tmp_path / "received.tif")]  # nothing beside it
    assert got.GetRasterBand(1).GetMaskBand().ReadAsArray()[:10].max() == 0


def test_vrt_and_png_are_uploaded_as_geotiff_and_the_copy_is_removed(capture, tmp_path, monkeypatch):
    import tempfile

    from osgeo import gdal

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    src = write_raster(tmp_path / "src.tif")
    vrt = str(tmp_path / "src.vrt")
    gdal.BuildVRT(vrt, [src])
    png = str(tmp_path / "pic.png")
    gdal.Translate(png, src, format="PNG")
    for path in (vrt, png):
        send(capture.url, path, tmp_path)
        got = uploaded(capture, tmp_path)
        assert capture.parts[-1]["raster"][:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
        assert (got.RasterXSize, got.RasterYSize) == (64, 48)  # the same pixel grid: windows stay valid
        assert json.loads(capture.parts[-1]["request"])["raster_path"] is None
    assert os.listdir(tmp_path / "tmp") == []  # the temporary GeoTIFFs are gone


def test_remote_engine_answers_about_a_vrt(real_engine, tmp_path):
    """The real engine refuses non-GeoTIFF uploads; the converted VRT is answered and placed."""
    from geovqa.client import EngineClient
    from geovqa.engine_protocol import build_ask_request
    from osgeo import gdal

    src = write_raster(tmp_path / "src.tif", width=120, height=90)
    vrt = str(tmp_path / "src.vrt")
    gdal.BuildVRT(vrt, [src])
    client = EngineClient(real_engine.url, real_engine.token)
    events = list(client.ask(build_ask_request("What is here?", vrt, max_new_tokens=4), upload=True).events())
    assert events[-1]["type"] == "result", events[-1]
    heat = client.download_file(events[-1]["heatmap_file"], str(tmp_path / "heat.tif"))
    assert gdal.Open(heat).GetGeoTransform()[0] == pytest.approx(500000.0)


def test_always_upload_reaches_an_engine_behind_a_tunnel_on_loopback(capture, tmp_path):
    """An SSH tunnel on 127.0.0.1 to a remote engine: by address the path would be sent, which
    the engine cannot see; 'always upload' sends the file."""
    from conftest import set_settings
    from geovqa.engine_errors import EngineError
    from geovqa.engine_protocol import build_ask_request
    from geovqa.settings import make_client

    path = write_raster(tmp_path / "tunnelled.tif")
    set_settings(engine_url=capture.url, send_rasters="upload")
    with pytest.raises(EngineError):
        list(make_client().ask(build_ask_request("What?", path)).events())
    assert capture.parts[-1]["raster"] == open(path, "rb").read()


@pytest.mark.parametrize("mode, url, uploads", [
    ("auto", "http://127.0.0.1:8765", False), ("auto", "http://192.0.2.7:8765", True),
    ("upload", "http://127.0.0.1:8765", True), ("path", "http://192.0.2.7:8765", False),
    ("nonsense", "http://192.0.2.7:8765", True),  # an unknown stored value is 'auto'
])
def test_send_rasters_setting_decides_upload(mode, url, uploads):
    from conftest import set_settings
    from geovqa.settings import make_client

    set_settings(engine_url=url, send_rasters=mode)
    assert make_client().uploads is uploads


def test_send_rasters_on_the_options_page(qgis_app):
    from geovqa.settings import Settings
    from geovqa.settings_page import SettingsForm

    form = SettingsForm()
    assert form.send_rasters.currentData() == "auto"  # the default: today's rule
    form.send_rasters.setCurrentIndex(form.send_rasters.findData("path"))
    form.apply()
    assert Settings.load().send_rasters == "path"
    assert SettingsForm().send_rasters.currentData() == "path"


def test_an_upload_over_the_engines_limit_is_refused_before_sending(tmp_path):
    from geovqa.client import EngineClient
    from geovqa.engine_errors import EngineError
    from geovqa.engine_protocol import build_ask_request

    path = write_raster(tmp_path / "big.tif")
    size = os.path.getsize(path)
    cap = CaptureEngine(health={"max_upload_bytes": 1000})
    try:
        with pytest.raises(EngineError) as err:
            list(EngineClient(cap.url, "t").ask(build_ask_request("What?", path), upload=True).events())
    finally:
        cap.close()
    assert err.value.code == "upload_too_large"
    assert f"{size} bytes" in err.value.message and "1000 bytes" in err.value.message
    assert cap.parts == []  # nothing was sent


def test_upload_progress_is_reported(tmp_path, monkeypatch):
    from geovqa import ask_stream
    from geovqa.client import EngineClient
    from geovqa.engine_errors import EngineError
    from geovqa.engine_protocol import build_ask_request

    monkeypatch.setattr(ask_stream, "UPLOAD_CHUNK", 1024)
    path = write_raster(tmp_path / "scene.tif")
    size = os.path.getsize(path)
    cap = CaptureEngine(health={"max_upload_bytes": 10 * size})  # under the limit: sent
    seen = []
    try:
        stream = EngineClient(cap.url, "t").ask(build_ask_request("What?", path), upload=True)
        stream.on_upload_progress = lambda sent, total: seen.append((sent, total))
        with pytest.raises(EngineError):
            list(stream.events())
    finally:
        cap.close()
    assert len(seen) == -(-size // 1024) and seen[-1] == (size, size)
    assert [s for s, _ in seen] == sorted(s for s, _ in seen)


class PrunedAnchorsClient:
    """Downloads the heatmap; the anchors file is gone from the engine (pruned, or restarted)."""

    def __init__(self, heatmap_src):
        self.heatmap_src = heatmap_src

    def download_file(self, name, dest):
        from geovqa.engine_errors import EngineError

        if name.endswith(".tif"):
            with open(self.heatmap_src, "rb") as src, open(dest, "wb") as out:
                out.write(src.read())
            return dest
        raise EngineError("not_found", f"There is no result file {name}.", status=404)


def test_a_remote_engine_cannot_make_the_plugin_copy_a_file_of_this_computer(tmp_path):
    """An engine on another computer names its result files by paths on *its* disk: where such a
    path exists here too (a hostile or broken engine naming ~/.ssh/id_rsa, say) the plugin copied
    that file of this computer into its results folder. It downloads the named file instead."""
    from geovqa.client import EngineClient
    from geovqa.tasks import fetch_result_file

    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    heat_src = write_raster(tmp_path / "heat_src.tif", bands=1)
    event = {"type": "result", "heatmap_path": str(secret), "heatmap_file": "x_heatmap.tif"}

    class Remote(PrunedAnchorsClient):
        is_local = False

    got = fetch_result_file(event, Remote(heat_src), "heatmap", tmp_path / "kept.tif")
    assert open(got, "rb").read() == open(heat_src, "rb").read()
    assert not EngineClient("http://203.0.113.5:8765", "t").is_local  # what Remote stands for
    assert fetch_result_file({"type": "result", "heatmap_path": str(secret)}, Remote(heat_src), "heatmap",
                             tmp_path / "none.tif") is None
    assert not (tmp_path / "none.tif").exists()
    local = EngineClient("http://127.0.0.1:8765", "t")
    assert local.is_local
    assert open(fetch_result_file(event, local, "heatmap", tmp_path / "copy.tif")).read() == "private"


@pytest.mark.parametrize("inline", [True, False])
def test_one_failed_download_costs_only_that_layer(tmp_path, inline):
    from geovqa.tasks import keep_result_files_or_warn

    heat_src = write_raster(tmp_path / "heat_src.tif", bands=1)
    anchors = {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {"rank": 0},
               "geometry": {"type": "Polygon", "coordinates": [[[500000, 5000000], [500100, 5000000],
                                                                 [500100, 4999900], [500000, 5000000]]]}}]}
    event = {"type": "result", "heatmap_file": "x_heatmap.tif", "anchors_file": "x_anchors.geojson"}
    if inline:
        event["anchors"] = anchors
    dest = tmp_path / "results"
    files, warning = keep_result_files_or_warn(event, PrunedAnchorsClient(heat_src), dest, "q")
    assert files["heatmap"] and open(files["heatmap"], "rb").read() == open(heat_src, "rb").read()
    if inline:  # the anchors of the event itself stand in for the lost file
        assert json.loads(open(files["anchors"]).read()) == anchors and warning == ""
    else:
        assert files["anchors"] is None
        assert "anchor layer could not be downloaded" in warning and "no result file" in warning
        assert "heatmap" not in warning and "results folder" not in warning
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        os.path.basename(p) for p in files.values() if p)  # nothing orphaned or half-written


def test_a_download_into_a_folder_that_cannot_be_written_blames_the_folder(capture, tmp_path):
    """A local write failure (missing folder, full disk) used to be reported as 'engine not
    reachable'; it is an OSError naming the file (the results folder's fault), and no partial file
    is left."""
    from geovqa.client import EngineClient
    from geovqa.engine_errors import EngineError

    client = EngineClient(capture.url, "t")
    good = tmp_path / "heatmap.tif"
    assert client.download_file("x_heatmap.tif", str(good)) == str(good)
    assert json.loads(good.read_text())["status"] == "ok"  # what the stand-in serves
    bad = tmp_path / "missing-folder" / "heatmap.tif"
    with pytest.raises(OSError) as exc:
        client.download_file("x_heatmap.tif", str(bad))
    assert not isinstance(exc.value, EngineError) and str(bad) in str(exc.value)
    assert not bad.exists()


# --- only the area of interest is uploaded ------------------------------------------------------
# The whole file went up for every question, e.g. 300 MB of a 27K raster for a 1000 x 1000 px window.


def send_about(url, path, aoi, **request_kw):
    """Ask about ``aoi`` of ``path`` with an upload to the capture server (which refuses it)."""
    from geovqa.client import EngineClient
    from geovqa.engine_errors import EngineError
    from geovqa.engine_protocol import build_ask_request

    with pytest.raises(EngineError):
        list(EngineClient(url, "t").ask(build_ask_request("What is here?", str(path), aoi=aoi, **request_kw),
                                        upload=True).events())


def sent_request(cap) -> dict:
    return json.loads(cap.parts[-1]["request"])


def pixels(ds, window=None):
    """Every band of ``ds`` (only ``window``, col_off, row_off, width, height), as one array."""
    return np.stack([ds.GetRasterBand(b + 1).ReadAsArray(*(window or ())) for b in range(ds.RasterCount)])


@pytest.fixture
def own_tempdir(tmp_path, monkeypatch):
    """The temporary folder the uploads are written to, to see that nothing is left in it."""
    import tempfile

    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_a_window_is_cut_and_sent_with_its_georeferencing(capture, tmp_path, own_tempdir):
    from osgeo import gdal

    path = write_raster(tmp_path / "scene.tif", width=300, height=200)
    send_about(capture.url, path, {"window": [100, 50, 40, 30]}, bands=[3, 2, 1])
    got, src = uploaded(capture, tmp_path), gdal.Open(path)
    assert (got.RasterXSize, got.RasterYSize, got.RasterCount) == (40, 30, 3)
    assert got.GetGeoTransform() == pytest.approx((500000.0 + 100 * 10, 10.0, 0.0, 5000000.0 - 50 * 10, 0.0, -10.0))
    assert got.GetProjection() == src.GetProjection()
    assert (pixels(got) == pixels(src, (100, 50, 40, 30))).all()  # full resolution, every band
    assert sent_request(capture)["aoi"] == {"window": [0, 0, 40, 30]}  # relative to the cut
    assert sent_request(capture)["bands"] == [3, 2, 1]
    assert len(capture.parts[-1]["raster"]) < os.path.getsize(path)
    assert os.listdir(own_tempdir) == []  # the cut is deleted after the answer


def test_a_polygon_in_the_rasters_crs_is_cut_to_its_bounding_window_and_kept(capture, tmp_path):
    from osgeo import gdal

    path = write_raster(tmp_path / "scene.tif", width=300, height=200)
    # cols 10.5 .. 30.2, rows 5.5 .. 20.7 of 10 m pixels from (500000, 5000000)
    wkt = "POLYGON ((500105 4999945,500302 4999945,500105 4999793,500105 4999945))"
    send_about(capture.url, path, {"polygon_wkt": wkt})
    got = uploaded(capture, tmp_path)
    assert (got.RasterXSize, got.RasterYSize) == (21, 16)  # cols 10..30, rows 5..20
    assert got.GetGeoTransform() == pytest.approx((500100.0, 10.0, 0.0, 4999950.0, 0.0, -10.0))
    assert sent_request(capture)["aoi"] == {"polygon_wkt": wkt}  # still where it was on the map
    assert (pixels(got) == pixels(gdal.Open(path), (10, 5, 21, 16))).all()
    # a GeoJSON polygon alike
    geo = {"type": "Polygon", "coordinates": [[[500105, 4999945], [500302, 4999945], [500105, 4999793],
                                               [500105, 4999945]]]}
    send_about(capture.url, path, {"geojson": geo})
    assert (uploaded(capture, tmp_path).RasterXSize, uploaded(capture, tmp_path).RasterYSize) == (21, 16)
    assert sent_request(capture)["aoi"] == {"geojson": geo}


def test_a_raster_placed_by_gcps_is_cut_with_its_gcps(capture, tmp_path):
    from conftest import write_gcp_raster
    from osgeo import gdal

    path = write_gcp_raster(tmp_path / "gcps.tif")  # 200 x 100 px, 10 m pixels, GCPs only
    wkt = "POLYGON ((500500 4999800,500900 4999800,500900 4999500,500500 4999500,500500 4999800))"
    send_about(capture.url, path, {"polygon_wkt": wkt})
    got = uploaded(capture, tmp_path)
    assert (got.RasterXSize, got.RasterYSize) == (40, 30)  # cols 50..90, rows 20..50
    fitted = gdal.GCPsToGeoTransform(got.GetGCPs())  # what the engine places the cut with
    assert fitted == pytest.approx((500500.0, 10.0, 0.0, 4999800.0, 0.0, -10.0))
    assert sent_request(capture)["aoi"] == {"polygon_wkt": wkt}


def test_a_polygon_in_pixels_moves_with_the_cut_of_a_raster_with_no_georeferencing(capture, tmp_path):
    from osgeo import gdal, ogr

    path = write_raster(tmp_path / "plain.tif", width=400, height=300, georeferenced=False)
    send_about(capture.url, path, {"polygon_wkt": "POLYGON ((250.5 160,390 160,250.5 290,250.5 160))"})
    got = uploaded(capture, tmp_path)
    assert (got.RasterXSize, got.RasterYSize) == (140, 130)  # cols 250..389, rows 160..289
    assert got.GetGeoTransform(can_return_null=True) is None and got.GetGCPCount() == 0  # still pixels
    sent = ogr.CreateGeometryFromWkt(sent_request(capture)["aoi"]["polygon_wkt"])
    assert sent.Equals(ogr.CreateGeometryFromWkt("POLYGON ((0.5 0,140 0,0.5 130,0.5 0))"))
    assert (pixels(got) == pixels(gdal.Open(path), (250, 160, 140, 130))).all()


def _ring(c0, r0, c1, r1):
    return [[[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]]]


def test_a_geojson_feature_or_collection_is_cut_as_the_engine_reads_it(capture, tmp_path):
    """The engine takes a Feature or a FeatureCollection (the union of its polygons) as well as a
    geometry; the upload used to be cut only for a bare geometry and sent whole for the others."""
    from osgeo import gdal

    path = write_raster(tmp_path / "scene.tif", width=300, height=200)
    left = {"type": "Polygon", "coordinates": _ring(500100, 4999950, 500200, 4999900)}  # cols 10..20, rows 5..10
    right = {"type": "Polygon", "coordinates": _ring(500400, 4999800, 500500, 4999700)}  # cols 40..50, rows 20..30
    feature = {"type": "Feature", "properties": {"name": "field"}, "geometry": left}
    collection = {"type": "FeatureCollection", "features": [
        feature, {"type": "Feature", "properties": {}, "geometry": None},
        {"type": "Feature", "properties": {}, "geometry": right}]}
    for aoi, window in (({"geojson": feature}, (10, 5, 10, 5)), ({"geojson": collection}, (10, 5, 40, 25))):
        send_about(capture.url, path, aoi)
        got = uploaded(capture, tmp_path)
        assert (got.RasterXSize, got.RasterYSize) == window[2:]
        assert (pixels(got) == pixels(gdal.Open(path), window)).all()
        assert sent_request(capture)["aoi"] == aoi  # georeferenced: still where it was on the map


def test_a_geojson_collection_in_pixels_moves_with_the_cut(capture, tmp_path):
    path = write_raster(tmp_path / "plain.tif", width=400, height=300, georeferenced=False)
    collection = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": _ring(250, 160, 300, 200)}},
        {"properties": {}, "geometry": {"type": "MultiPolygon",  # no "type": the engine reads it all the same
                                        "coordinates": [_ring(350, 250, 390, 290)]}}]}
    send_about(capture.url, path, {"geojson": collection})
    got = uploaded(capture, tmp_path)
    assert (got.RasterXSize, got.RasterYSize) == (140, 130)  # cols 250..389, rows 160..289
    moved = sent_request(capture)["aoi"]["geojson"]
    assert moved["features"][0]["geometry"]["coordinates"] == _ring(0, 0, 50, 40)
    assert moved["features"][1]["geometry"]["coordinates"] == [_ring(100, 90, 140, 130)]
    assert moved["features"][0]["properties"] == {} and moved["type"] == "FeatureCollection"


@pytest.mark.parametrize("aoi", [None, {"window": [0, 0, 64, 48]}, {"window": [-10, -10, 100, 100]},
                                 {"polygon_wkt": "POLYGON ((499000 5001000,501000 5001000,501000 4990000,"
                                                 "499000 4990000,499000 5001000))"}])
def test_the_whole_raster_asked_about_is_sent_as_it_is(capture, tmp_path, aoi):
    path = write_raster(tmp_path / "plain.tif")  # 64 x 48
    send_about(capture.url, path, aoi)
    assert capture.parts[-1]["raster"] == open(path, "rb").read()
    assert sent_request(capture)["aoi"] == aoi


def test_the_same_area_gives_the_same_bytes(capture, tmp_path):
    """The engine keys its feature cache on the upload's SHA-256: a second question about the same
    area must send the same bytes to hit it."""
    path = write_raster(tmp_path / "scene.tif", width=300, height=200)
    for _ in range(2):
        send_about(capture.url, path, {"window": [100, 50, 40, 30]})
    assert capture.parts[-1]["raster"] == capture.parts[-2]["raster"]
    send_about(capture.url, path, {"window": [100, 50, 41, 30]})
    assert capture.parts[-1]["raster"] != capture.parts[-2]["raster"]


def test_a_cut_keeps_the_nodata_the_mask_and_the_bands(capture, tmp_path):
    from osgeo import gdal

    path = write_raster(tmp_path / "rgba.tif", width=120, height=90, bands=3)
    ds = gdal.Open(path)  # read-only: GDAL puts nodata in .aux.xml and the mask in .msk
    for b in (1, 2, 3):
        ds.GetRasterBand(b).SetNoDataValue(7)
    ds.CreateMaskBand(gdal.GMF_PER_DATASET)
    mask = np.where(np.arange(90)[:, None] < 40, 0, 255).repeat(120, axis=1).astype(np.uint8)
    ds.GetRasterBand(1).GetMaskBand().WriteArray(mask)
    ds = None
    send_about(capture.url, path, {"window": [20, 30, 50, 20]})
    got = uploaded(capture, tmp_path)
    assert (got.RasterXSize, got.RasterYSize, got.RasterCount) == (50, 20, 3)
    assert got.GetFileList() == [str(tmp_path / "received.tif")]  # nodata and mask inside it
    assert all(got.GetRasterBand(b).GetNoDataValue() == 7 for b in (1, 2, 3))
    src = gdal.Open(path)  # kept in a name: GDAL 3.6 crashes on a band whose dataset is gone
    assert [got.GetRasterBand(b).GetColorInterpretation() for b in (1, 2, 3)] == [
        src.GetRasterBand(b).GetColorInterpretation() for b in (1, 2, 3)]
    assert (got.GetRasterBand(1).GetMaskBand().ReadAsArray() == mask[30:50, 20:70]).all()


def test_a_vrt_is_converted_and_cut_in_one_go(capture, tmp_path, own_tempdir):
    from osgeo import gdal

    src = write_raster(tmp_path / "src.tif", width=300, height=200)
    vrt = str(tmp_path / "src.vrt")
    gdal.BuildVRT(vrt, [src])
    send_about(capture.url, vrt, {"window": [100, 50, 40, 30]})
    got = uploaded(capture, tmp_path)
    assert capture.parts[-1]["raster"][:4] in (b"II*\x00", b"MM\x00*")
    assert (got.RasterXSize, got.RasterYSize) == (40, 30)
    assert got.GetGeoTransform()[0] == pytest.approx(501000.0)
    assert sent_request(capture)["aoi"] == {"window": [0, 0, 40, 30]}
    assert os.listdir(own_tempdir) == []



def _utm_geotiff(path, width, height, dtype, options, array=None):
    from osgeo import gdal, osr

    ds = gdal.GetDriverByName("GTiff").Create(str(path), width, height, 1, dtype, options)
    ds.SetGeoTransform((500000.0, 1.0, 0.0, 5000000.0, 0.0, -1.0))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    ds.SetProjection(srs.ExportToWkt())
    if array is not None:
        ds.GetRasterBand(1).WriteArray(array)
    ds = None
    return str(path)


def test_a_file_within_the_limit_goes_when_its_cut_would_not(tmp_path, own_tempdir):
    """A GeoTIFF that fits the engine's upload limit is sent as it is when its cut (DEFLATE, no
    predictor) outgrows it, or when the cut could not come under the limit at all; both were
    refused ("too large"), naming a smaller area as the way out."""
    from geovqa import upload
    from osgeo import gdal

    y, x = np.mgrid[0:1024, 0:1024]
    smooth = _utm_geotiff(tmp_path / "smooth.tif", 1024, 1024, gdal.GDT_UInt16,
                          ["COMPRESS=ZSTD", "PREDICTOR=2", "TILED=YES", "ZSTD_LEVEL=19"], (x * 7 + y * 3).astype(np.uint16))
    size = os.path.getsize(smooth)
    aoi = {"window": [0, 0, 780, 780]}  # 58 % of the pixels: worth a cut, which comes out larger
    up = upload.prepare_upload(smooth, aoi, max_bytes=size + 1000)
    assert (up.path, up.aoi, up.temp_dir) == (smooth, aoi, None)
    # a sparse GeoTIFF: a few hundred kB, 1.2 G pixels; its 20000 x 20000 px cut could not fit
    sparse = _utm_geotiff(tmp_path / "sparse.tif", 35000, 35000, gdal.GDT_Byte,
                          ["COMPRESS=DEFLATE", "TILED=YES", "SPARSE_OK=TRUE"])
    size = os.path.getsize(sparse)
    assert 20000 * 20000 > (size + 1000) * upload.DEFLATE_MAX_RATIO
    aoi = {"window": [0, 0, 20000, 20000]}
    up = upload.prepare_upload(sparse, aoi, max_bytes=size + 1000)
    assert (up.path, up.aoi, up.temp_dir) == (sparse, aoi, None)
    assert os.listdir(own_tempdir) == []
    # a file over the limit itself is still refused
    from geovqa.engine_errors import EngineError

    with pytest.raises(EngineError) as err:
        upload.prepare_upload(sparse, aoi, max_bytes=size // 2)
    assert err.value.code == "upload_too_large"

def test_a_cut_no_smaller_than_the_file_is_not_sent(capture, tmp_path, monkeypatch, own_tempdir):
    """A well-compressed GeoTIFF whose cut would be bigger (here: cuts written uncompressed) goes
    as it is, with the AOI as asked."""
    from geovqa import upload
    from osgeo import gdal

    monkeypatch.setattr(upload, "CREATION_OPTIONS", ["COMPRESS=NONE"])
    path = str(tmp_path / "flat.tif")
    gdal.Translate(path, write_raster(tmp_path / "src.tif", width=300, height=200), creationOptions=["COMPRESS=DEFLATE"])
    send_about(capture.url, path, {"window": [1, 1, 298, 198]})
    assert capture.parts[-1]["raster"] == open(path, "rb").read()
    assert sent_request(capture)["aoi"] == {"window": [1, 1, 298, 198]}
    assert os.listdir(own_tempdir) == []


def _written_cuts(monkeypatch):
    """Every file :func:`upload.translate_to_geotiff` writes (the calls, recorded)."""
    from geovqa import upload

    calls = []
    write = upload.translate_to_geotiff

    def recording(path, dest, window=None, cancelled=None, *args, **kw):
        calls.append(window)
        return write(path, dest, window, cancelled, *args, **kw)

    monkeypatch.setattr(upload, "translate_to_geotiff", recording)
    return calls


def write_jpeg_geotiff(tmp_path):
    """A 300 x 200 px RGB GeoTIFF, JPEG-compressed (quality 75), of a fine texture like imagery's:
    its DEFLATE cuts take about 85 % of their pixels' bytes, the file about 32 % of its own."""
    from osgeo import gdal

    rng = np.random.default_rng(0)
    src = tmp_path / "texture.tif"
    ds = gdal.GetDriverByName("GTiff").Create(str(src), 300, 200, 3, gdal.GDT_Byte)
    ds.SetGeoTransform((500000.0, 10.0, 0.0, 5000000.0, 0.0, -10.0))
    for b in range(3):
        noise = rng.integers(0, 256, (202, 302)).astype(float)
        ds.GetRasterBand(b + 1).WriteArray((sum(noise[i:i + 200, j:j + 300] for i in range(3) for j in range(3)) / 9)
                                           .astype(np.uint8))
    ds = None
    path = str(tmp_path / "jpeg.tif")
    gdal.Translate(path, str(src), creationOptions=["COMPRESS=JPEG", "JPEG_QUALITY=75", "TILED=YES"])
    return path


def test_a_cut_not_worth_it_is_decided_before_anything_is_written(capture, tmp_path, monkeypatch, own_tempdir):
    """The "no smaller than the file" check came after the whole cut was written: a large area of a
    27K GeoTIFF spent minutes and gigabytes in the temporary folder before the file went anyway."""
    from geovqa import upload
    from osgeo import gdal

    written = _written_cuts(monkeypatch)
    path = str(tmp_path / "deflate.tif")
    gdal.Translate(path, write_raster(tmp_path / "src.tif", width=300, height=200), creationOptions=["COMPRESS=DEFLATE"])
    send_about(capture.url, path, {"window": [0, 0, 300, 140]})  # 70 % of the pixels
    assert capture.parts[-1]["raster"] == open(path, "rb").read() and written == []
    assert sent_request(capture)["aoi"] == {"window": [0, 0, 300, 140]}
    send_about(capture.url, path, {"window": [0, 0, 300, 100]})  # half of them: cut
    assert (uploaded(capture, tmp_path).RasterXSize, uploaded(capture, tmp_path).RasterYSize) == (300, 100)
    assert written == [(0, 0, 300, 100)]

    # JPEG: the lossless cut of 40 % of the pixels would be larger than the whole file
    jpeg = write_jpeg_geotiff(tmp_path)
    send_about(capture.url, jpeg, {"window": [0, 0, 200, 120]})
    assert capture.parts[-1]["raster"] == open(jpeg, "rb").read() and len(written) == 1
    assert os.path.getsize(upload.translate_to_geotiff(jpeg, str(tmp_path / "cut.tif"), (0, 0, 200, 120))) >= \
        os.path.getsize(jpeg)  # (what was not written: it would have gone to waste)
    send_about(capture.url, jpeg, {"window": [0, 0, 150, 100]})  # a quarter: the cut is smaller
    assert (uploaded(capture, tmp_path).RasterXSize, uploaded(capture, tmp_path).RasterYSize) == (150, 100)
    assert len(capture.parts[-1]["raster"]) < os.path.getsize(jpeg)
    assert os.listdir(own_tempdir) == []


def test_a_cut_or_conversion_with_no_room_in_the_temporary_folder(capture, tmp_path, monkeypatch, own_tempdir):
    from geovqa import upload
    from geovqa.engine_errors import EngineError
    from osgeo import gdal

    written = _written_cuts(monkeypatch)
    monkeypatch.setattr(upload, "free_bytes", lambda folder: 5_000_000 if folder == str(own_tempdir) else None,
                        raising=False)
    path = write_raster(tmp_path / "scene.tif", width=300, height=200)
    send_about(capture.url, path, {"window": [100, 50, 40, 30]})
    assert capture.parts[-1]["raster"] == open(path, "rb").read() and written == []  # the file itself needs no room
    assert sent_request(capture)["aoi"] == {"window": [100, 50, 40, 30]}

    vrt = str(tmp_path / "scene.vrt")
    gdal.BuildVRT(vrt, [path])
    with pytest.raises(EngineError) as err:
        upload.prepare_upload(vrt, {"window": [100, 50, 40, 30]})
    assert err.value.code == "no_space" and written == []
    assert str(own_tempdir) in err.value.message and "scene.vrt" in err.value.message
    # 40 x 30 x 3 bytes; 5,000,000 bytes free; the reserve of 32 MiB: sizes in 2^20-byte MiB, as the client's
    assert "takes up to 3600 bytes" in err.value.message and "only 4.8 MiB free" in err.value.message, err.value.message
    assert "at least 32.0 MiB free" in err.value.message
    assert os.listdir(own_tempdir) == []
    monkeypatch.setattr(upload, "free_bytes", lambda folder: None)  # cannot be told: tried
    assert upload.prepare_upload(vrt, {"window": [100, 50, 40, 30]}).window == (100, 50, 40, 30)


def test_a_conversion_is_not_refused_for_room_beyond_the_upload_limit(tmp_path, monkeypatch, own_tempdir,
                                                                       small_gdal_cache):
    """The free-space check asked for room for every pixel uncompressed (75 MB here; 5.8 GB for a
    27K 16-bit 4-band mosaic) although the writing stops once the file passes the engine's upload
    limit (20 MB here; 2 GiB by default), at most what is buffered before the check later (16 MB
    here): with 40 MB free the conversion, which takes 1 MB, was refused with "takes up to 75 MB"."""
    from osgeo import gdal
    from geovqa import upload
    from geovqa.engine_errors import EngineError

    src = write_raster(tmp_path / "tile.tif", width=100, height=100, pixel=50.0)
    vrt = str(tmp_path / "mosaic.vrt")
    gdal.Translate(vrt, src, format="VRT", width=5000, height=5000)
    monkeypatch.setattr(upload, "free_bytes", lambda folder: upload.FREE_SPACE_RESERVE + 40_000_000)
    up = upload.prepare_upload(vrt, None, max_bytes=20_000_000)
    try:
        assert os.path.getsize(up.path) < 20_000_000
    finally:
        up.cleanup()
    with pytest.raises(EngineError) as err:  # the room asked for: the limit and what is buffered
        upload.prepare_upload(vrt, None, max_bytes=30_000_000)
    # 30,000,000 bytes and the 16 MiB buffered: 46,777,216 bytes
    assert err.value.code == "no_space" and "takes up to 44.6 MiB" in err.value.message, err.value.message
    assert os.listdir(own_tempdir) == []


@pytest.fixture(params=["real", "stub"])
def remote_engine(request, monkeypatch):
    """The real engine (tiny model) or the stand-in, sent uploads as if on another computer; the
    size of every file prepared for an upload is kept in ``sizes``."""
    from conftest import set_settings
    from geovqa import upload

    eng = request.getfixturevalue("real_engine" if request.param == "real" else "stub_engine")
    set_settings(send_rasters="upload", max_new_tokens=4)
    sizes = []
    prepare = upload.prepare_upload

    def recording(path, aoi=None, cancelled=None, *args, **kw):
        from osgeo import gdal

        made = prepare(path, aoi, cancelled, *args, **kw)
        ds = gdal.Open(made.path)
        sizes.append((ds.RasterXSize, ds.RasterYSize))
        return made

    monkeypatch.setattr(upload, "prepare_upload", recording)
    return request.param, eng, sizes


def ask_in_dock(dock, layer, question, mode, geometry):
    from conftest import wait_for_tasks, wait_until

    dock.set_layer(layer)
    dock.set_aoi_mode(mode)
    dock.set_aoi_geometry(geometry, layer.crs())
    n = len(dock.turns(layer))
    dock.ask(question)
    wait_until(lambda: len(dock.turns(layer)) > n and dock.turns(layer)[-1].get("done"), 180, "the answer")
    wait_for_tasks()
    turn = dock.turns(layer)[-1]
    assert turn.get("error") is None, turn.get("error")
    return turn


def test_the_results_about_a_cut_land_on_the_area_asked_about(plugin, remote_engine, tmp_path, raster_layer):
    """Only the AOI's window is uploaded; the heatmap and anchors the engine makes of it land on
    that area of the layer, where those of the engine reading the whole file land: in map
    coordinates for a georeferenced raster, moved back by the cut's offset for one with no
    georeferencing (whose results are in the cut's pixels)."""
    from conftest import valid_cells_extent
    from geovqa.client import EngineClient
    from geovqa.engine_protocol import new_request_id
    from geovqa.tasks import keep_result_files, rect_bounds
    from qgis.core import QgsGeometry, QgsProject, QgsRectangle, QgsVectorLayer

    kind, eng, sizes = remote_engine
    dock, near = plugin.dock, 1e-6

    def extents(heatmap, anchors):
        vector = QgsVectorLayer(anchors, "anchors", "ogr")
        assert vector.featureCount() >= 1
        return valid_cells_extent(heatmap), vector.extent()

    def assert_placed(turn, layer, area):
        got = extents(QgsProject.instance().mapLayer(turn["heatmap_layer_id"]).source(),
                      QgsProject.instance().mapLayer(turn["anchors_layer_id"]).source())
        # the same question with the engine reading the whole file by its path
        client = EngineClient(eng.url, eng.token, send_rasters="path")
        event = list(client.ask(dict(turn["request"], request_id=new_request_id())).events())[-1]
        assert event["type"] == "result", event
        ref = keep_result_files(event, client, tmp_path / "reference", new_request_id(), rect_bounds(layer.extent()),
                                unreferenced=layer.name() == "plain")
        for box, ref_box in zip(got, extents(ref["heatmap"], ref["anchors"])):
            assert box.toString(6) == ref_box.toString(6)
        assert area.buffered(near).contains(got[1]), got[1].toString()  # the anchors on the area

    plain = raster_layer("plain", width=400, height=300, georeferenced=False)  # QGIS shows it at x = col, y = -row
    bottom_right = QgsRectangle(200, -300, 400, -150)
    turn = ask_in_dock(dock, plain, "What is in the bottom-right corner?", "rectangle",
                       QgsGeometry.fromRect(bottom_right))
    assert turn["request"]["aoi"] == {"window": [200, 150, 200, 150]}
    assert sizes[-1] == (200, 150)  # the window was uploaded, not the 400 x 300 raster
    assert_placed(turn, plain, bottom_right)
    assert bottom_right.buffered(near).contains(
        valid_cells_extent(QgsProject.instance().mapLayer(turn["heatmap_layer_id"]).source()))
    if kind == "real":  # the stand-in answers about the whole window for a polygon
        triangle = QgsGeometry.fromWkt("POLYGON((250 -160, 390 -160, 390 -290, 250 -160))")
        turn = ask_in_dock(dock, plain, "What is in the triangle?", "polygon", triangle)
        assert sizes[-1] == (140, 130)
        assert_placed(turn, plain, triangle.boundingBox())

    geo = raster_layer("geo", width=400, height=300)  # 10 m pixels from (500000, 5000000)
    area = QgsRectangle(501000, 4998000, 502000, 4999000)
    turn = ask_in_dock(dock, geo, "What is in this square?", "rectangle", QgsGeometry.fromRect(area))
    assert turn["request"]["aoi"] == {"window": [100, 100, 100, 100]}
    assert sizes[-1] == (100, 100)
    assert_placed(turn, geo, area)
    dock.set_aoi_mode("layer")


def test_a_window_larger_than_the_engine_reads_is_sent_reduced_and_its_results_land_on_it(
        plugin, stub_engine, tmp_path, raster_layer, monkeypatch):
    """A 27K raster went at full resolution (2.19 GB, refused by the default 2 GiB limit) though
    the engine reads at most ~65 M pixels of any window (/health's max_read_pixels). It goes
    reduced to that now; for a raster without georeferencing the results, in the reduced cut's
    pixels, are scaled back before they are moved by the cut's offset, and land on the area."""
    from conftest import set_settings, valid_cells_extent, wait_for_tasks, wait_until
    from qgis.core import QgsGeometry, QgsProject, QgsRectangle, QgsVectorLayer

    set_settings(send_rasters="upload", max_new_tokens=4)
    stub_engine.max_read_pixels = 20_000
    dock, near = plugin.dock, 1e-6

    def sent():
        from osgeo import gdal

        ds = gdal.Open(stub_engine.uploads[-1]["path"])
        return ds, (ds.RasterXSize, ds.RasterYSize)

    def placed(turn):
        heat = valid_cells_extent(QgsProject.instance().mapLayer(turn["heatmap_layer_id"]).source())
        anchors = QgsVectorLayer(QgsProject.instance().mapLayer(turn["anchors_layer_id"]).source(), "a", "ogr")
        return heat, anchors.extent()

    plain = raster_layer("plain", width=400, height=300, georeferenced=False)  # QGIS shows it at x = col, y = -row
    bottom_right = QgsRectangle(200, -300, 400, -150)
    turn = ask_in_dock(dock, plain, "What is in the bottom-right corner?", "rectangle",
                       QgsGeometry.fromRect(bottom_right))
    assert turn["request"]["aoi"] == {"window": [200, 150, 200, 150]}
    _, size = sent()
    assert size == (164, 123) and 20_000 <= size[0] * size[1] < 20_000 * 1.02  # of 200 x 150
    sent_window = stub_engine.uploads[-1]["request"]["aoi"]["window"]
    assert sent_window == [0, 0, 164, 123]
    assert "sent at 164 x 123 of 200 x 150" in turn["meta"], turn["meta"]
    heat, anchors = placed(turn)
    assert heat.toString(3) == bottom_right.toString(3)  # the whole window, scaled back onto it
    assert bottom_right.buffered(near).contains(anchors), anchors.toString()

    geo = raster_layer("geo", width=400, height=300)  # 10 m pixels from (500000, 5000000), asked about whole
    dock.set_aoi_mode("layer")
    dock.set_layer(geo)
    n = len(dock.turns(geo))
    dock.ask("What is here?")
    wait_until(lambda: len(dock.turns(geo)) > n and dock.turns(geo)[-1].get("done"), 60, "the answer")
    wait_for_tasks()
    turn = dock.turns(geo)[-1]
    assert turn.get("error") is None, turn
    ds, size = sent()
    assert size == (164, 123)
    gt = ds.GetGeoTransform()
    assert gt[0] == 500000 and gt[3] == 5000000 and gt[1] == pytest.approx(4000 / 164)
    heat, _ = placed(turn)
    assert heat.toString(3) == geo.extent().toString(3)
    stub_engine.max_read_pixels = None  # an engine that does not say: full resolution, as before
    dock.ask("And now?")
    wait_until(lambda: len(dock.turns(geo)) > n + 1 and dock.turns(geo)[-1].get("done"), 60, "the answer")
    wait_for_tasks()
    assert stub_engine.uploads[-1]["size"] == os.path.getsize(geo.source())
    assert "sent at" not in dock.turns(geo)[-1]["meta"]


def test_a_whole_raster_larger_than_the_engine_reads_is_not_refused_for_its_full_resolution(tmp_path):
    """A 1200 x 1200 uncompressed GeoTIFF (1.4 MB; a 27K RGB one is 2.19 GB, over the default 2 GiB
    limit) was refused as too large for a 1 MB upload limit, though the engine reads it decimated
    to at most max_read_pixels anyway (65 M pixels, 8064 x 8064; 90 000 here)."""
    from osgeo import gdal

    path = str(tmp_path / "big_plain.tif")
    ds = gdal.GetDriverByName("GTiff").Create(path, 1200, 1200, 1, gdal.GDT_Byte, ["TILED=YES"])
    ds.SetGeoTransform((500000.0, 0.5, 0.0, 5000000.0, 0.0, -0.5))
    ds.GetRasterBand(1).WriteArray(np.random.default_rng(0).integers(0, 255, (1200, 1200), dtype=np.uint8))
    ds = None
    for health, expected in [({"max_upload_bytes": 1_000_000}, "upload_too_large"),  # an older engine
                             ({"max_upload_bytes": 1_000_000, "max_read_pixels": 90_000}, "captured")]:
        cap = CaptureEngine(health=health)
        try:
            err = send(cap.url, path, tmp_path)
            assert err.code == expected, f"{err.code}: {err}"
            if expected == "captured":
                received = uploaded(cap, tmp_path)
                assert (received.RasterXSize, received.RasterYSize) == (300, 300)
                assert received.GetGeoTransform() == (500000.0, 2.0, 0.0, 5000000.0, 0.0, -2.0)
        finally:
            cap.close()


def test_a_vrt_mosaic_is_converted_no_larger_than_the_engine_reads(tmp_path, own_tempdir):
    """A 16200 x 16200 VRT mosaic asked about whole was written for the upload at 16200 x 16200:
    four times the pixels the engine reads (at most 8064 x 8064); a 27K one, 11 times (minutes of
    writing for real imagery). A palette raster is reduced by nearest, not averaged."""
    from osgeo import gdal
    from geovqa import upload

    src = write_raster(tmp_path / "tile.tif", width=100, height=100, pixel=81.0)
    vrt = str(tmp_path / "mosaic.vrt")
    gdal.Translate(vrt, src, format="VRT", width=16200, height=16200)
    up = upload.prepare_upload(vrt, None, max_bytes=2 * 1024 ** 3, max_pixels=8064 * 8064)
    try:
        ds = gdal.Open(up.path)
        assert (ds.RasterXSize, ds.RasterYSize) == (8064, 8064) == up.size and up.source_size == (16200, 16200)
        assert ds.GetGeoTransform()[1] == pytest.approx(81.0 * 100 / 8064)
    finally:
        up.cleanup()
    pal = str(tmp_path / "pal.tif")
    out = gdal.GetDriverByName("GTiff").Create(pal, 400, 400, 1, gdal.GDT_Byte)
    table = gdal.ColorTable()
    for i in range(4):
        table.SetColorEntry(i, (60 * i, 0, 0, 255))
    out.GetRasterBand(1).SetColorTable(table)
    out.GetRasterBand(1).WriteArray(np.tile(np.array([[0, 3], [3, 0]], np.uint8), (200, 200)))
    out = None
    with upload.upload_file(pal, None, max_pixels=10_000) as up:
        values = set(np.unique(gdal.Open(up.path).ReadAsArray()))
    assert values <= {0, 3}, values  # an average would make indices 1 and 2, colours never there


# --- the batch: each layer converted and cut once for all its questions -------------------------


def run_batch(items, questions, progress=None):
    """A BatchTask over ``items`` x ``questions`` with the configured engine, run to its end."""
    from geovqa.settings import Settings, make_client
    from geovqa.tasks import BatchTask
    from qgis.core import QgsApplication

    settings = Settings.load()
    task = BatchTask(make_client(settings), items, questions, settings.request_options(), settings.results_dir())
    ended = []
    task.taskCompleted.connect(lambda: ended.append(True))
    task.taskTerminated.connect(lambda: ended.append(False))
    if progress is not None:
        task.progressChanged.connect(progress.append)
    QgsApplication.taskManager().addTask(task)
    return task, ended


def batch_item(path, aoi=None):
    from osgeo import gdal

    ds = gdal.Open(str(path))
    gt, w, h = ds.GetGeoTransform(), ds.RasterXSize, ds.RasterYSize
    return {"layer": os.path.basename(str(path)), "layer_id": None, "raster_path": str(path), "aoi": aoi,
            "crs_wkt": ds.GetProjection(), "clip_bounds": (gt[0], gt[3] + h * gt[5], gt[0] + w * gt[1], gt[3]),
            "unreferenced": False}


def test_a_batch_converts_and_cuts_each_layer_once_and_deletes_the_copies(stub_engine, tmp_path, monkeypatch,
                                                                       own_tempdir):
    from conftest import set_settings, valid_cells_extent, wait_for_tasks, wait_until
    from geovqa import upload
    from osgeo import gdal
    from qgis.core import QgsRectangle

    set_settings(send_rasters="upload")
    written = []
    translate = upload.translate_to_geotiff
    monkeypatch.setattr(upload, "translate_to_geotiff", lambda *a, **kw: written.append(a[0]) or translate(*a, **kw))
    src = write_raster(tmp_path / "src.tif", width=300, height=200)
    vrt = str(tmp_path / "src.vrt")
    gdal.BuildVRT(vrt, [src])
    items = [batch_item(vrt), batch_item(src, {"window": [100, 50, 40, 30]})]
    task, ended = run_batch(items, ["How big?", "What bands?", "Anything else?"])
    wait_until(lambda: ended, 60, "the batch")
    wait_for_tasks()
    assert ended == [True] and all(r["error"] is None for r in task.results), task.results
    assert written == [vrt, src]  # once per layer, not once per question
    sent = stub_engine.uploads
    assert len(sent) == 6 and len({u["sha256"] for u in sent[:3]}) == 1 and len({u["sha256"] for u in sent[3:]}) == 1
    assert [u["request"]["aoi"] for u in sent] == [None] * 3 + [{"window": [0, 0, 40, 30]}] * 3
    assert [r["answer"] for r in task.results[3:]] == ["The area is 40 x 30 pixels with 3 bands."] * 3
    area = QgsRectangle(501000, 4999200, 501400, 4999500)  # the window on the map
    assert all(area.buffered(1e-6).contains(valid_cells_extent(r["heatmap_path"])) for r in task.results[3:])
    assert os.listdir(own_tempdir) == []


def test_a_batch_reports_its_uploads_progress(stub_engine, tmp_path, monkeypatch):
    from conftest import set_settings, wait_for_tasks, wait_until
    from geovqa import ask_stream

    set_settings(send_rasters="upload")
    monkeypatch.setattr(ask_stream, "UPLOAD_CHUNK", 1024)
    path = write_raster(tmp_path / "scene.tif", width=120, height=90)
    seen = []
    task, ended = run_batch([batch_item(path)], ["How big?", "What bands?"], seen)
    wait_until(lambda: ended, 60, "the batch")
    wait_for_tasks()
    assert ended == [True]
    # two answers, 50 % each; the first half of each is its upload, sent 1 KiB at a time
    uploading = [p for p in seen if 0 < p < 25 or 50 < p < 75]
    assert len(uploading) >= 10, seen
    assert seen == sorted(seen) and seen[-1] == 100


def test_a_cancelled_batch_deletes_its_copies(stub_engine, tmp_path, own_tempdir):
    from conftest import set_settings, wait_for_tasks, wait_until

    set_settings(send_rasters="upload")
    stub_engine.token_delay = 0.2
    path = write_raster(tmp_path / "scene.tif", width=300, height=200)
    task, ended = run_batch([batch_item(path, {"window": [10, 10, 50, 50]})], ["q1", "q2", "q3"])
    wait_until(lambda: stub_engine.uploads, 30, "the first upload")
    assert len(os.listdir(own_tempdir)) == 1  # the cut, kept for the next questions
    task.cancel()
    wait_until(lambda: ended, 30, "the cancelled batch")
    wait_for_tasks()
    assert len(task.results) < 3
    assert os.listdir(own_tempdir) == []


def test_a_conversion_cancelled_meanwhile_stops_and_leaves_nothing(tmp_path, own_tempdir):
    from geovqa.engine_errors import EngineError
    from geovqa.upload import prepare_upload

    path = write_raster(tmp_path / "scene.tif", width=300, height=200)
    with pytest.raises(EngineError) as err:
        prepare_upload(path, {"window": [10, 10, 200, 100]}, cancelled=lambda: True)
    assert err.value.code == "cancelled"
    assert os.listdir(own_tempdir) == []


# --- the Processing batch: the same, through the batch dialog's helper --------------------------


def _processing_batch(layers, questions, tmp_path, feedback=None):
    import processing

    return processing.run("geovqa:batch_questions", {"LAYERS": layers, "QUESTIONS": "\n".join(questions),
                                                     "OUTPUT": str(tmp_path / "answers.csv")}, feedback=feedback)


def _vrt_and_tif_layers(tmp_path):
    from osgeo import gdal
    from qgis.core import QgsProject, QgsRasterLayer

    src = write_raster(tmp_path / "src.tif", width=300, height=200)
    vrt = str(tmp_path / "src.vrt")
    gdal.BuildVRT(vrt, [src])
    layers = [QgsRasterLayer(vrt, "vrt", "gdal"), QgsRasterLayer(src, "tif", "gdal")]
    QgsProject.instance().addMapLayers(layers)
    return vrt, layers


def test_the_processing_batch_converts_each_layer_once_and_deletes_the_copies(
        plugin, stub_engine, tmp_path, monkeypatch, own_tempdir, qgis_processing, qgis_new_project):
    """It prepared the upload again for every question (a VRT was converted once a question)."""
    from conftest import set_settings
    from geovqa import upload

    set_settings(send_rasters="upload")
    written = []
    translate = upload.translate_to_geotiff
    monkeypatch.setattr(upload, "translate_to_geotiff", lambda *a, **kw: written.append(a[0]) or translate(*a, **kw))
    vrt, layers = _vrt_and_tif_layers(tmp_path)
    res = _processing_batch(layers, ["How big?", "What bands?", "Anything else?"], tmp_path)
    assert res["ANSWERED"] == 6 and res["ERRORS"] == 0
    assert written == [vrt]  # once for the VRT's three questions; the GeoTIFF is sent as it is
    sent = stub_engine.uploads
    assert len(sent) == 6 and len({u["sha256"] for u in sent[:3]}) == 1
    assert os.listdir(own_tempdir) == []


def test_the_processing_batch_gives_each_upload_only_part_of_its_answers_share(
        plugin, stub_engine, tmp_path, monkeypatch, qgis_processing, qgis_new_project):
    """Each upload set the run's progress to 0..100 % of that upload: it jumped to 100 % and back."""
    from conftest import set_settings
    from geovqa import ask_stream
    from qgis.core import QgsProcessingFeedback, QgsProject, QgsRasterLayer

    set_settings(send_rasters="upload")
    monkeypatch.setattr(ask_stream, "UPLOAD_CHUNK", 1024)
    layer = QgsRasterLayer(write_raster(tmp_path / "scene.tif", width=120, height=90), "scene", "gdal")
    QgsProject.instance().addMapLayer(layer)
    feedback, seen = QgsProcessingFeedback(), []
    feedback.progressChanged.connect(seen.append)
    res = _processing_batch([layer], ["How big?", "What bands?"], tmp_path, feedback)
    assert res["ANSWERED"] == 2 and len(stub_engine.uploads) == 2
    # two answers, 50 % each; the first half of each is its upload, sent 1 KiB at a time
    uploading = [p for p in seen if 0 < p < 25 or 50 < p < 75]
    assert len(uploading) >= 10, seen
    assert seen == sorted(seen) and seen[-1] == 100


def test_a_cancelled_or_failed_processing_batch_deletes_its_copies(
        plugin, stub_engine, tmp_path, monkeypatch, own_tempdir, qgis_processing, qgis_new_project):
    from conftest import set_settings
    from geovqa import results_io
    from qgis.core import QgsProcessingException, QgsProcessingFeedback

    set_settings(send_rasters="upload")
    _, layers = _vrt_and_tif_layers(tmp_path)
    write = results_io.CsvRows.write
    copies, feedback = [], QgsProcessingFeedback()

    def cancel_after_the_first_answer(self, row):
        write(self, row)
        copies.append(os.listdir(own_tempdir))
        feedback.cancel()

    monkeypatch.setattr(results_io.CsvRows, "write", cancel_after_the_first_answer)
    res = _processing_batch(layers, ["q1", "q2", "q3"], tmp_path, feedback)
    assert res["ANSWERED"] == 1 and len(stub_engine.uploads) == 1
    assert len(copies[0]) == 1 and os.listdir(own_tempdir) == []  # kept for the next question, then deleted

    def failing_write(self, row):  # the answers table fails at the second answer
        copies.append(row)
        if len(copies) == 3:
            raise OSError(28, "No space left on device")
        return write(self, row)

    monkeypatch.setattr(results_io.CsvRows, "write", failing_write)
    with pytest.raises(QgsProcessingException, match="No space left"):
        _processing_batch(layers, ["q1", "q2", "q3"], tmp_path)
    assert len(stub_engine.uploads) == 3 and os.listdir(own_tempdir) == []


# --- the upload's size check: once per batch, still before every single question ----------------


def test_a_batch_asks_the_engines_upload_limit_once(stub_engine, tmp_path):
    """GET /health was called before every upload: once per question of a batch."""
    from conftest import set_settings, wait_for_tasks, wait_until

    set_settings(send_rasters="upload")
    a = write_raster(tmp_path / "a.tif", width=100, height=80)
    b = write_raster(tmp_path / "b.tif", width=60, height=50)
    task, ended = run_batch([batch_item(a), batch_item(b, {"window": [10, 10, 20, 20]})], ["q1", "q2", "q3"])
    wait_until(lambda: ended, 60, "the batch")
    wait_for_tasks()
    assert ended == [True] and all(r["error"] is None for r in task.results), task.results
    assert len(stub_engine.uploads) == 6 and stub_engine.health_calls == 1

    stub_engine.max_upload_bytes = 1000  # every file is over it: refused before sending, each question
    task, ended = run_batch([batch_item(a), batch_item(b)], ["q1", "q2"])
    wait_until(lambda: ended, 60, "the batch")
    wait_for_tasks()
    assert [("upload_too_large" if "accepts uploads up to 1000 bytes" in r["error"] else r["error"])
            for r in task.results] == ["upload_too_large"] * 4
    assert len(stub_engine.uploads) == 6 and stub_engine.health_calls == 2


def test_the_processing_batch_asks_the_engines_upload_limit_once(
        plugin, stub_engine, tmp_path, qgis_processing, qgis_new_project):
    from conftest import set_settings, wait_for_tasks

    set_settings(send_rasters="upload")
    _, layers = _vrt_and_tif_layers(tmp_path)
    wait_for_tasks()  # the dock's own health check
    before = stub_engine.health_calls
    res = _processing_batch(layers, ["q1", "q2", "q3"], tmp_path)
    assert res["ANSWERED"] == 6 and stub_engine.health_calls - before == 1


def test_every_single_question_still_checks_the_upload_limit(stub_engine, tmp_path):
    from conftest import set_settings
    from geovqa.engine_errors import EngineError
    from geovqa.engine_protocol import build_ask_request
    from geovqa.settings import make_client

    set_settings(send_rasters="upload")
    path = write_raster(tmp_path / "a.tif")
    events = list(make_client().ask(build_ask_request("q1", path)).events())
    assert events[-1]["type"] == "result" and stub_engine.health_calls == 1
    stub_engine.max_upload_bytes = 1000  # the engine restarted with a smaller limit
    with pytest.raises(EngineError) as err:
        list(make_client().ask(build_ask_request("q2", path)).events())
    assert err.value.code == "upload_too_large" and stub_engine.health_calls == 2
    assert len(stub_engine.uploads) == 1


# --- a raster too large for the engine's upload limit: said while it is converted, stopped early -----


@pytest.fixture
def small_gdal_cache():
    """GDAL keeps written blocks in its cache (5 % of the memory) before they reach the file: with
    a small one, the file grows as it is written, as it does for a raster larger than the cache."""
    from osgeo import gdal

    before = gdal.GetCacheMax()
    gdal.SetCacheMax(16 * 1024 * 1024)
    yield
    gdal.SetCacheMax(before)


def write_huge_vrt(tmp_path, size=20000):
    """A ``size`` x ``size`` px VRT (3 bands: 1.2 GB of pixels at 20000) over a 100 x 100 px
    GeoTIFF of noise: converted, it takes about 8 MB."""
    from osgeo import gdal

    src = str(tmp_path / "small_src.tif")
    ds = gdal.GetDriverByName("GTiff").Create(src, 100, 100, 3, gdal.GDT_Byte)
    ds.SetGeoTransform((500000.0, 10.0, 0.0, 5000000.0, 0.0, -10.0))
    from osgeo import osr

    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    ds.SetProjection(srs.ExportToWkt())
    rng = np.random.default_rng(0)
    for b in range(3):
        ds.GetRasterBand(b + 1).WriteArray(rng.integers(0, 255, (100, 100), dtype=np.uint8))
    ds = None
    vrt = str(tmp_path / "huge.vrt")
    gdal.Translate(vrt, src, format="VRT", width=size, height=size)
    return vrt


LIMIT = 2_000_000  # 1.2 GB of pixels could be deflated below it (1/1032): written until it passes it


def test_a_conversion_that_grows_past_the_upload_limit_is_stopped_and_deleted(tmp_path, own_tempdir,
                                                                               small_gdal_cache):
    """The whole raster was converted (a 100000 x 100000 px VRT: about 30 GB) before its size was
    checked against the engine's limit."""
    from geovqa.engine_errors import EngineError
    from geovqa.upload import prepare_upload

    vrt = write_huge_vrt(tmp_path)
    seen = []
    with pytest.raises(EngineError) as err:
        prepare_upload(vrt, None, progress=seen.append, max_bytes=LIMIT)
    assert err.value.code == "upload_too_large"
    assert "huge.vrt is too large to send to the engine" in err.value.message
    assert "accepts uploads up to 1.9 MiB" in err.value.message, err.value.message  # 2,000,000 bytes
    assert "smaller area of interest" in err.value.hint and "never upload" in err.value.hint
    assert seen and seen == sorted(seen) and seen[-1] < 0.6, seen[-5:]  # stopped early, not at the end
    assert os.listdir(own_tempdir) == []
    with pytest.raises(EngineError) as err:  # the area of it: said so
        prepare_upload(vrt, {"window": [0, 0, 15000, 15000]}, max_bytes=LIMIT)
    assert "The area of interest of huge.vrt is too large" in err.value.message
    assert os.listdir(own_tempdir) == []



def test_a_conversion_past_the_limit_is_stopped_early_with_gdals_default_cache(tmp_path, own_tempdir):
    """The test above shrinks GDAL's block cache first. With the default cache (5 % of the memory:
    1.26 GB on a 23 GB machine, 3.2 GB on a 64 GB workstation) the written blocks stayed in memory,
    the file did not grow, and a 1.2 GB conversion ran to its end before the 2 MB limit was seen,
    QGIS's memory growing by the cache. It is written in strips now, each flushed to the file."""
    from geovqa.engine_errors import EngineError
    from geovqa.upload import prepare_upload

    vrt = write_huge_vrt(tmp_path)
    seen = []
    with pytest.raises(EngineError) as err:
        prepare_upload(vrt, None, progress=seen.append, max_bytes=LIMIT)
    assert err.value.code == "upload_too_large"
    assert seen and seen[-1] < 0.6, f"stopped at {seen[-1]:.0%} of the conversion"
    assert os.listdir(own_tempdir) == []


def test_nothing_is_converted_for_an_engine_that_cannot_be_reached(tmp_path, own_tempdir):
    """The whole raster was converted (minutes for a large one) before the upload found that the
    remote engine was not there; the engine's state comes first now."""
    from conftest import free_port
    from geovqa.client import EngineClient
    from geovqa.engine_errors import EngineUnavailable
    from geovqa.engine_protocol import build_ask_request
    from geovqa.tasks import prepare_item_upload

    vrt = write_huge_vrt(tmp_path)
    client = EngineClient(f"http://127.0.0.1:{free_port()}", "t", send_rasters="upload")
    seen = []
    upload, error = prepare_item_upload(client, vrt, None, progress=seen.append)
    assert upload is None and "not reachable" in error and seen == []
    with pytest.raises(EngineUnavailable):
        list(client.ask(build_ask_request("What?", vrt), upload=True).events())
    assert os.listdir(own_tempdir) == []

def test_a_conversion_no_compression_could_bring_under_the_limit_is_refused_before_writing(
        tmp_path, own_tempdir, monkeypatch):
    from geovqa import upload
    from geovqa.engine_errors import EngineError

    written = _written_cuts(monkeypatch)
    vrt = write_huge_vrt(tmp_path)
    asked = []
    with pytest.raises(EngineError) as err:  # 1.2 GB of pixels: not under 1 MB even at 1032:1
        upload.prepare_upload(vrt, None, max_bytes=lambda: asked.append(True) or 1_000_000)
    assert err.value.code == "upload_too_large" and "nothing was written" in err.value.message
    assert written == [] and asked == [True] and os.listdir(own_tempdir) == []
    plain = write_raster(tmp_path / "plain.tif")  # sent as it is: the limit is not asked here
    assert upload.prepare_upload(plain, None, max_bytes=lambda: asked.append(True) or 10).path == plain
    assert asked == [True]


def test_the_dock_says_it_prepares_the_raster_and_that_it_is_too_large(plugin, stub_engine, tmp_path, own_tempdir,
                                                                      small_gdal_cache, qgis_new_project,
                                                                      monkeypatch):
    """After 100 s the dock still said "Sending the question to the engine …" while a 30 GB
    GeoTIFF was being written, which the engine's limit would then refuse."""
    from conftest import set_settings, wait_for_tasks, wait_until
    from qgis.core import QgsProject, QgsRasterLayer

    set_settings(send_rasters="upload")
    stub_engine.max_upload_bytes = LIMIT
    layer = QgsRasterLayer(write_huge_vrt(tmp_path), "huge", "gdal")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    dock = plugin.dock
    said = []
    set_text = dock.progress_label.setText
    monkeypatch.setattr(dock.progress_label, "setText", lambda text: said.append(text) or set_text(text))
    dock.set_layer(layer)
    dock.question_edit.setText("What is here?")
    dock.ask()
    wait_until(lambda: dock.turns(layer) and dock.turns(layer)[-1].get("done"), 60, "the refusal")
    wait_for_tasks()
    preparing = [t for t in said if t.startswith("Preparing the raster for upload")]
    assert len(preparing) >= 3 and any(t.endswith(" %") for t in preparing), said
    turn = dock.turns(layer)[-1]
    assert "huge.vrt is too large to send to the engine" in turn["error"] and "smaller area" in turn["error"]
    assert stub_engine.uploads == [] and os.listdir(own_tempdir) == []


def test_the_batch_dialog_says_it_prepares_the_raster_and_that_it_is_too_large(
        plugin, stub_engine, tmp_path, own_tempdir, small_gdal_cache, qgis_new_project, monkeypatch):
    from conftest import run_batch_dialog, set_settings
    from qgis.core import QgsProject, QgsRasterLayer

    set_settings(send_rasters="upload")
    stub_engine.max_upload_bytes = LIMIT
    layer = QgsRasterLayer(write_huge_vrt(tmp_path), "huge", "gdal")
    QgsProject.instance().addMapLayer(layer)
    dlg = plugin.open_batch()
    said = []
    set_text = dlg.message.setText
    monkeypatch.setattr(dlg.message, "setText", lambda text: said.append(text) or set_text(text))
    _, rows = run_batch_dialog(plugin, [layer], "q1\nq2", dlg=dlg)
    preparing = [t for t in said if t.startswith("Preparing the raster of 'huge' for upload")]
    assert len(preparing) >= 3 and any(t.endswith(" %") for t in preparing), said
    assert [("too large" in (r["error"] or "")) for r in rows] == [True, True]
    assert stub_engine.uploads == [] and os.listdir(own_tempdir) == []


def test_processing_says_it_prepares_the_raster_once(plugin, stub_engine, tmp_path, qgis_processing, own_tempdir):
    import processing
    from conftest import recording_feedback, set_settings
    from qgis.core import QgsProject, QgsRasterLayer

    set_settings(send_rasters="upload")
    src = write_raster(tmp_path / "src.tif", width=120, height=90)
    vrt = str(tmp_path / "src.vrt")
    from osgeo import gdal

    gdal.BuildVRT(vrt, [src])
    layer = QgsRasterLayer(vrt, "v", "gdal")
    QgsProject.instance().addMapLayer(layer)
    feedback = recording_feedback()
    res = processing.run("geovqa:ask_raster", {"INPUT": layer, "QUESTION": "How big?"}, feedback=feedback)
    assert res["ANSWER"] == "The area is 120 x 90 pixels with 3 bands."
    assert feedback.of("text").count("Preparing the raster for upload …") == 1, feedback.of("text")
    assert os.listdir(own_tempdir) == []


def test_only_an_area_of_interest_the_engine_takes_is_cut_for(tmp_path):
    """aoi_window: the bounding window of one AOI, clipped to the raster; none (the file as it is)
    for no AOI, for one naming two kinds of area (the engine refuses it: it must not reach the
    engine as a cut that hides that), or for a window outside the raster."""
    from geovqa.upload import aoi_window
    from osgeo import gdal

    ds = gdal.Open(write_raster(tmp_path / "r.tif"))  # 64 x 48 px, 10 m, origin 500000/5000000
    assert aoi_window(ds, {"window": [10, 5, 20, 10]}) == (10, 5, 20, 10)
    assert aoi_window(ds, {"window": [50, 40, 30, 30]}) == (50, 40, 14, 8)
    triangle = "POLYGON((500100 4999900,500300 4999900,500300 4999700,500100 4999900))"
    assert aoi_window(ds, {"polygon_wkt": triangle}) == (10, 10, 20, 20)
    assert aoi_window(ds, None) is None
    assert aoi_window(ds, {}) is None
    assert aoi_window(ds, {"window": [10, 5, 20, 10], "polygon_wkt": triangle}) is None
    assert aoi_window(ds, {"window": [70, 5, 20, 10]}) is None


def test_a_stopped_answer_fetches_none_of_its_files(tmp_path):
    """Once the answer is stopped no result file is fetched, not even a local engine's file that a
    copy would get at once: the files stay behind, each said not fetched (stopped)."""
    from geovqa.ask_stream import AskStream
    from geovqa.client import EngineClient
    from geovqa.tasks import keep_result_files_or_warn

    heat_src = write_raster(tmp_path / "heat_src.tif", bands=1)
    client = EngineClient("http://127.0.0.1:8765", "t")
    assert client.is_local
    event = {"type": "result", "heatmap_path": heat_src, "heatmap_file": "x_heatmap.tif",
             "anchors": {"type": "FeatureCollection", "features": []}}
    stream = AskStream(client, {"question": "q"})
    stream.abort()
    dest = tmp_path / "results"
    files, warning = keep_result_files_or_warn(event, client, dest, "q", stream=stream)
    assert files == {"heatmap": None, "anchors": None}
    assert "heatmap layer was not fetched (stopped)" in warning and "anchor layer was not fetched (stopped)" in warning
    assert list(dest.iterdir()) == []


def test_the_results_about_an_uploaded_cut_are_placed_by_its_offset_and_scale():
    """The result event's upload_pixel_offset and upload_pixel_scale (added for a cut of a raster
    with no georeferencing) give (dx, dy) and (sx, sy) in that order; none: no move, no scale."""
    from geovqa.tasks import result_offset, result_scale

    event = {"upload_pixel_offset": [120, 40], "upload_pixel_scale": [5.5, 3.0]}
    assert (result_offset(event), result_scale(event)) == ((120.0, 40.0), (5.5, 3.0))
    assert (result_offset({}), result_scale({})) == ((0.0, 0.0), (1.0, 1.0))
    assert result_scale({"upload_pixel_scale": [2.0]}) == (1.0, 1.0)
