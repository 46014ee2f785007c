"""Server API against a real uvicorn subprocess with the stand-in engine: auth, health,
streaming, uploads, output files and every bad input the issue lists."""

from __future__ import annotations

import json
import stat
import sys
import urllib.request
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from server_rasters import make_inputs  # noqa: E402
from serverutil import stub_server  # noqa: E402

from engine import protocol  # noqa: E402

UPLOAD_LIMIT = 100_000


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("rasters"))


@pytest.fixture(scope="module")
def server():
    srv = stub_server(0.01, "--max-upload-bytes", str(UPLOAD_LIMIT))
    srv.start()
    yield srv
    srv.cleanup()


def ask_body(raster, **kw):
    return {"raster_path": str(raster), "question": "What is here?", "max_new_tokens": 32, **kw}


def test_token_file_is_private(server):
    path = server.config_dir / "token"
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(server.token) >= 32


@pytest.mark.parametrize("token", [False, "wrong-token"])
def test_refused_without_the_right_token(server, inputs, token):
    status, body = server.ask(ask_body(inputs["raster"]), token=token)
    assert status == 401
    assert body["error"]["code"] == "unauthorized"
    for method, path in [("GET", "/jobs/0123456789abcdef"), ("DELETE", "/jobs/0123456789abcdef"),
                         ("POST", "/batch"), ("GET", "/files/x.tif")]:
        status, body = server.request(method, path, {} if method == "POST" else None, token=token)
        assert status == 401, path


def test_health_fields(server):
    status, body = server.request("GET", "/health", token=False)
    assert status == 200
    missing = set(protocol.HEALTH_FIELDS) - set(body)
    assert not missing
    assert body["protocol"] == protocol.PROTOCOL_VERSION
    assert body["queue_length"] == 0
    assert body["max_upload_bytes"] == UPLOAD_LIMIT
    assert "token" not in json.dumps(body).lower()


def test_no_cors(server):
    req = urllib.request.Request(server.url + "/health", method="GET",
                                 headers={"Origin": "http://evil.example"})
    with urllib.request.urlopen(req) as resp:
        assert resp.headers.get("access-control-allow-origin") is None


def test_streamed_answer(server, inputs):
    conn, resp = server.open_stream("/ask", ask_body(inputs["raster"], request_id="r1"))
    assert resp.status == 200
    assert resp.getheader("content-type").startswith(protocol.NDJSON_MEDIA_TYPE)
    events = list(server.iter_events(resp))
    conn.close()
    types = [e["type"] for e in events]
    assert types[0] == "queued" and types[-1] == "result"
    assert "token" in types
    assert all(e["request_id"] == "r1" for e in events)
    result = events[-1]
    streamed = "".join(e["text"] for e in events if e["type"] == "token")
    assert streamed == result["answer"]
    assert Path(result["heatmap_path"]).is_file()
    assert Path(result["anchors_path"]).is_file()
    assert result["heatmap_file"] == Path(result["heatmap_path"]).name
    # the heatmap can also be fetched over HTTP (remote clients)
    r = httpx.get(f"{server.url}/files/{result['heatmap_file']}", headers=server.headers())
    assert r.status_code == 200
    assert r.content[:4] in (b"II*\x00", b"MM\x00*")
    assert r.content == Path(result["heatmap_path"]).read_bytes()


def test_files_no_traversal(server):
    for name in ["..%2Ftoken", "..", ".hidden", "nope.tif"]:
        r = httpx.get(f"{server.url}/files/{name}", headers=server.headers())
        assert r.status_code == 404, name


def test_upload_geotiff(server, inputs):
    files = {"raster": ("scene.tif", inputs["raster"].read_bytes(), "image/tiff")}
    data = {"request": json.dumps({"question": "What is here?", "max_new_tokens": 8})}
    with httpx.stream("POST", f"{server.url}/ask", files=files, data=data,
                      headers=server.headers(), timeout=60) as r:
        assert r.status_code == 200
        events = [json.loads(line) for line in r.iter_lines() if line.strip()]
    assert events[-1]["type"] == "result", events[-1]
    uploads = server.state_dir / "uploads"
    assert not list(uploads.glob("*")), "the uploaded raster is deleted after the job"


def _err(status_body):
    status, body = status_body
    return status, body["error"]["code"], body["error"]["message"]


@pytest.mark.parametrize("case, expected_status, expected_code, words", [
    ("unknown_strategy", 400, "unknown_strategy", "strategy"),
    ("empty_question", 400, "empty_question", "question"),
    ("image_only_question", 400, "empty_question", "only <image>"),
    ("nul_in_path", 400, "bad_request", "nul character"),
    ("long_question", 400, "question_too_long", "limit"),
    ("missing_file", 422, "raster_unreadable", "no file"),
    ("broken_tiff", 422, "raster_unreadable", "cannot be read"),
    ("text_file", 400, "not_a_raster", "not a raster"),
    ("folder", 400, "not_a_raster", "folder"),
    ("window_outside", 400, "aoi_outside_raster", "outside"),
    ("window_empty", 400, "bad_aoi", "no area"),
    ("polygon_outside", 400, "aoi_outside_raster", "overlap"),
    ("bad_band", 400, "bad_request", "band"),
    ("bad_budget", 400, "bad_request", "budget"),
    ("bad_faithful", 400, "bad_request", "faithful_empty_slots"),
])
def test_bad_input(server, inputs, case, expected_status, expected_code, words):
    body = ask_body(inputs["raster"])
    if case == "unknown_strategy":
        body["strategy"] = "magic"
    elif case == "empty_question":
        body["question"] = "   "
    elif case == "image_only_question":  # the prompt drops <image>: nothing was asked
        body["question"] = " <image>\n"
    elif case == "nul_in_path":  # JSON allows it: it was a 500 "internal" (stat's ValueError)
        body["raster_path"] = str(inputs["raster"]) + "\x00.tif"
    elif case == "long_question":
        body["question"] = "why " * 1000
    elif case == "missing_file":
        body["raster_path"] = str(inputs["folder"] / "missing.tif")
    elif case == "broken_tiff":
        body["raster_path"] = str(inputs["broken"])
    elif case == "text_file":
        body["raster_path"] = str(inputs["text"])
    elif case == "folder":
        body["raster_path"] = str(inputs["folder"])
    elif case == "window_outside":
        body["aoi"] = {"window": [1000, 1000, 10, 10]}
    elif case == "window_empty":
        body["aoi"] = {"window": [0, 0, 0, 10]}
    elif case == "polygon_outside":
        body["aoi"] = {"polygon_wkt": "POLYGON((0 0, 1 0, 1 1, 0 1, 0 0))"}
    elif case == "bad_band":
        body["bands"] = [1, 2, 7]
    elif case == "bad_budget":
        body["budget"] = -3
    elif case == "bad_faithful":
        body["faithful_empty_slots"] = "yes"
    status, answer = server.ask(body)
    code, message = answer["error"]["code"], answer["error"]["message"]
    assert (status, code) == (expected_status, expected_code), message
    assert words in message.lower()
    assert protocol.ERROR_CODES[code] == status
    if case == "text_file":  # says what to do, not only what is wrong
        assert "export it as GeoTIFF" in (answer["error"]["hint"] or "")


def test_upload_too_large(server, inputs):
    files = {"raster": ("big.tif", inputs["big"].read_bytes(), "image/tiff")}
    assert inputs["big"].stat().st_size > UPLOAD_LIMIT
    data = {"request": json.dumps({"question": "What is here?"})}
    r = httpx.post(f"{server.url}/ask", files=files, data=data, headers=server.headers())
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "upload_too_large"
    assert "limit" in r.json()["error"]["message"]


def test_an_upload_whose_length_is_over_the_limit_is_refused_before_it_is_read(server, inputs):
    """A Content-Length beyond the limit (plus room for the request part) is refused from the
    header alone, saying the size sent."""
    from engine.server import MAX_JSON_BODY_BYTES

    raster = b"II*\x00" + b"\x00" * (UPLOAD_LIMIT + MAX_JSON_BODY_BYTES)
    files = {"raster": ("huge.tif", raster, "image/tiff")}
    data = {"request": json.dumps({"question": "What is here?"})}
    built = httpx.Request("POST", f"{server.url}/ask", files=files, data=data)
    body = built.read()  # sent whole, with its Content-Length
    r = httpx.post(f"{server.url}/ask", content=body,
                   headers={**server.headers(), "content-type": built.headers["content-type"]})
    assert r.status_code == 413
    error = r.json()["error"]
    assert error["code"] == "upload_too_large"
    assert error["message"].startswith("The upload (") and f"limit of {UPLOAD_LIMIT} bytes" in error["message"]


def test_a_json_body_sent_in_chunks_is_cut_off_at_the_limit(server):
    """Without a Content-Length (chunked transfer) the body is counted as it arrives."""
    from engine.server import MAX_JSON_BODY_BYTES

    big = json.dumps({"items": [{"layer": "x" * MAX_JSON_BODY_BYTES, "raster_path": "/x.tif"}],
                      "questions": ["Any roads?"]}).encode()

    def chunks():
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    r = httpx.post(f"{server.url}/batch", content=chunks(),
                   headers={**server.headers(), "content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {"code": "bad_request", "message": "The request body is too large.", "hint": None}


def test_upload_not_a_raster(server, inputs):
    files = {"raster": ("notes.tif", b"hello, not a tiff" * 10, "image/tiff")}
    data = {"request": json.dumps({"question": "What is here?"})}
    r = httpx.post(f"{server.url}/ask", files=files, data=data, headers=server.headers())
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "not_a_raster"
    assert not list((server.state_dir / "uploads").glob("*"))


def test_not_json(server):
    r = httpx.post(f"{server.url}/ask", content=b"{nope", headers={
        **server.headers(), "Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "bad_request"


def test_unknown_job(server):
    status, body = server.request("GET", "/jobs/0123456789abcdef")
    assert status == 404 and body["error"]["code"] == "not_found"


# --- a GeoJSON area of interest: a geometry, a Feature or a FeatureCollection -------------------

def _square(x0: float, y0: float, size: float) -> dict:
    """A GeoJSON square with its top-left corner at (x0, y0) (the scene: 64 x 48 px of 1 m from
    (500000, 4500000), UTM 33N)."""
    ring = [[x0, y0], [x0 + size, y0], [x0 + size, y0 - size], [x0, y0 - size], [x0, y0]]
    return {"type": "Polygon", "coordinates": [ring]}


def _feature(geometry) -> dict:
    return {"type": "Feature", "properties": {"name": "area"}, "geometry": geometry}


@pytest.mark.parametrize("geojson", [
    _square(500002, 4499998, 10),
    _feature(_square(500002, 4499998, 10)),
    {"type": "FeatureCollection", "features": [_feature(_square(500002, 4499998, 10)),
                                               _feature(None),
                                               _feature(_square(500040, 4499970, 8))]},
])
def test_a_geojson_aoi_may_be_a_geometry_a_feature_or_a_feature_collection(server, inputs, geojson):
    """A FeatureCollection (what a GIS exports) was refused ("Unknown geometry type:
    'featurecollection'") though the raster reader reads it; the checks now use that reader."""
    status, events = server.ask(ask_body(inputs["raster"], aoi={"geojson": geojson}))
    assert status == 200, events
    assert events[-1]["type"] == "result", events[-1]
    batch = {"items": [{"layer": "scene", "raster_path": str(inputs["raster"]),
                        "aoi": {"geojson": geojson}}], "questions": ["Any roads?"]}
    status, job = server.request("POST", "/batch", batch)
    assert status == 200 and job["job_id"], job
    server.request("DELETE", f"/jobs/{job['job_id']}")  # leave the queue as it was


@pytest.mark.parametrize("geojson, code, words", [
    ({"type": "FeatureCollection", "features": []}, "bad_aoi", "no feature with a polygon"),
    ({"type": "FeatureCollection", "features": [_feature(None)]}, "bad_aoi",
     "no feature with a polygon"),
    ({"type": "FeatureCollection", "features": [
        _feature(_square(500002, 4499998, 10)),
        _feature({"type": "Point", "coordinates": [500010, 4499990]})]}, "bad_aoi",
     "feature 2 of the area of interest's featurecollection must be a polygon"),
    (_feature({"type": "LineString", "coordinates": [[500002, 4499998], [500010, 4499990]]}),
     "bad_aoi", "must be a polygon (polygon or multipolygon), not a linestring"),
    ({"type": "Point", "coordinates": [500010, 4499990]}, "bad_aoi", "not a point"),
    (_feature(None), "bad_aoi", "feature has no geometry"),
    ({"type": "FeatureCollection", "features": "all of them"}, "bad_aoi", "'features' list"),
    ({"type": "FeatureCollection", "features": [_feature(_square(0, 10, 5))]},
     "aoi_outside_raster", "does not overlap"),
])
def test_a_geojson_aoi_that_is_no_polygon_is_a_clear_400(server, inputs, geojson, code, words):
    status, code_got, message = _err(server.ask(ask_body(inputs["raster"], aoi={"geojson": geojson})))
    assert (status, code_got) == (400, code), message
    assert words in message.lower()
    batch = {"items": [{"layer": "Harbour", "raster_path": str(inputs["raster"]),
                        "aoi": {"geojson": geojson}}], "questions": ["Any roads?"]}
    status, code_got, message = _err(server.request("POST", "/batch", batch))
    assert (status, code_got) == (400, code) and message.startswith("Layer Harbour: "), message


def test_bands_naming_an_alpha_band_are_a_bad_request_and_the_colour_bands_are_not(server, tmp_path):
    """A request's `bands` naming an RGBA GeoTIFF's alpha band (its transparency mask) is refused
    before it is queued, the band named; the plugin's renders (RGBA GeoTIFFs asked as bands
    [1, 2, 3]) are answered as before."""
    import numpy as np
    from rasters import write_geotiff

    data = np.random.default_rng(3).integers(0, 255, (4, 64, 80), dtype=np.uint8)
    rgba = write_geotiff(tmp_path / "render.tif", data, photometric="RGB", alpha=True)
    status, answer = server.ask(ask_body(rgba, bands=[4, 3, 2]))
    assert (status, answer["error"]["code"]) == (400, "bad_request")
    assert answer["error"]["message"].startswith("Band 4 is the raster's alpha band")
    status, answer = server.ask(ask_body(rgba, bands=[1, 2, 3]))
    assert status == 200 and answer[-1]["type"] == "result", answer


@pytest.mark.parametrize("token", [False, "wrong-token"])
def test_batch_results_refused_without_the_right_token(server, inputs, token):
    """GET /jobs/{id}/results hands out every answer of a batch job: it needs the token too."""
    status, job = server.request("POST", "/batch", {
        "items": [{"layer": "one", "raster_path": str(inputs["raster"])}],
        "questions": ["Any roads?"], "max_new_tokens": 8})
    assert status == 200, job
    status, body = server.request("GET", f"/jobs/{job['job_id']}/results", token=token)
    assert status == 401, body
    assert body["error"]["code"] == "unauthorized"
    assert "results" not in body
