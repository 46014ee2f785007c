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
    from geovqa.client import EngineClient, EngineError, build_ask_request

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
    from geovqa.client import EngineClient, build_ask_request
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
    from geovqa.client import EngineError, build_ask_request
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
    from geovqa.client import EngineClient, EngineError, build_ask_request

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
    from geovqa import client as client_mod
    from geovqa.client import EngineClient, EngineError, build_ask_request

    monkeypatch.setattr(client_mod, "UPLOAD_CHUNK", 1024)
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
        from geovqa.client import EngineError

        if name.endswith(".tif"):
            with open(self.heatmap_src, "rb") as src, open(dest, "wb") as out:
                out.write(src.read())
            return dest
        raise EngineError("not_found", f"There is no result file {name}.", status=404)


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
    from geovqa.client import EngineClient, EngineError

    client = EngineClient(capture.url, "t")
    good = tmp_path / "heatmap.tif"
    assert client.download_file("x_heatmap.tif", str(good)) == str(good)
    assert json.loads(good.read_text())["status"] == "ok"  # what the stand-in serves
    bad = tmp_path / "missing-folder" / "heatmap.tif"
    with pytest.raises(OSError) as exc:
        client.download_file("x_heatmap.tif", str(bad))
    assert not isinstance(exc.value, EngineError) and str(bad) in str(exc.value)
    assert not bad.exists()
