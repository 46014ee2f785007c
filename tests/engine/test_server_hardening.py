"""Hostile or odd request bodies against a real uvicorn with the stand-in engine: each is
refused with a 4xx protocol error before anything is queued, never a 500 or a stuck job."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from server_rasters import make_inputs  # noqa: E402
from serverutil import stub_server  # noqa: E402

from engine import protocol  # noqa: E402

DEEP = b"[" * 200_000 + b"]" * 200_000
SURROGATE = '"\\ud800"'  # a lone surrogate as a JSON escape, as a client may send it


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("rasters"))


@pytest.fixture(scope="module")
def server():
    srv = stub_server(0.01)
    srv.start()
    yield srv
    srv.cleanup()


def post_raw(server, path: str, content: bytes, ctype: str = "application/json") -> httpx.Response:
    return httpx.post(f"{server.url}{path}", content=content, timeout=60,
                      headers={**server.headers(), "Content-Type": ctype})


def post_upload(server, inputs, request_part: bytes) -> httpx.Response:
    files = {"raster": ("scene.tif", inputs["raster"].read_bytes(), "image/tiff"),
             "request": (None, request_part, "application/json")}
    return httpx.post(f"{server.url}/ask", files=files, headers=server.headers(), timeout=60)


def assert_refused(resp: httpx.Response, code: str = "bad_request", words: str = "") -> None:
    assert resp.status_code == protocol.ERROR_CODES[code], resp.text
    error = resp.json()["error"]
    assert error["code"] == code
    assert words in error["message"].lower()


def assert_no_jobs_left(server) -> None:
    assert server.request("GET", "/health")[1]["queue_length"] == 0
    assert not list((server.state_dir / "jobs").glob("*"))
    assert not list((server.state_dir / "uploads").glob("*"))


def test_deeply_nested_json_is_a_bad_request(server, inputs):
    assert_refused(post_raw(server, "/ask", DEEP), words="nested")
    assert_refused(post_raw(server, "/batch", DEEP), words="nested")
    assert_refused(post_upload(server, inputs, DEEP), words="nested")
    assert_no_jobs_left(server)


def ask_text(raster, **replace: str) -> bytes:
    fields = {"raster_path": json.dumps(str(raster)), "question": '"What is here?"', **replace}
    return ("{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}").encode()


@pytest.mark.parametrize("field", ["question", "request_id", "raster_path"])
def test_lone_surrogates_are_a_bad_request(server, inputs, field):
    body = ask_text(inputs["raster"], **{field: SURROGATE})
    assert_refused(post_raw(server, "/ask", body), words="invalid characters")
    assert_refused(post_upload(server, inputs, ask_text(inputs["raster"], **{field: SURROGATE})),
                   words="invalid characters")
    assert_no_jobs_left(server)


@pytest.mark.parametrize("where", ["question", "layer"])
def test_lone_surrogates_in_a_batch_are_a_bad_request(server, inputs, where):
    question = SURROGATE if where == "question" else '"Any roads?"'
    layer = SURROGATE if where == "layer" else '"one"'
    body = (f'{{"items": [{{"layer": {layer}, "raster_path": {json.dumps(str(inputs["raster"]))}}}],'
            f' "questions": [{question}]}}').encode()
    assert_refused(post_raw(server, "/batch", body), words="invalid characters")
    assert_no_jobs_left(server)


@pytest.mark.parametrize(("window", "code", "words"), [
    ("[0, 0, 1e999, 10]", "bad_request", "too large"),  # JSON has no infinite numbers
    ("[0, 0, Infinity, 10]", "bad_request", "not a json number"),
    ("[0, 0, NaN, 10]", "bad_request", "not a json number"),
    ("[0, 0, " + "1" + "0" * 400 + ", 10]", "bad_aoi", "finite"),  # valid JSON, no float holds it
])
def test_non_finite_windows_are_refused_over_http(server, inputs, window, code, words):
    body = ask_text(inputs["raster"], aoi=f'{{"window": {window}}}')
    assert_refused(post_raw(server, "/ask", body), code, words)
    batch = (f'{{"items": [{{"raster_path": {json.dumps(str(inputs["raster"]))}, '
             f'"aoi": {{"window": {window}}}}}], "questions": ["Any roads?"]}}').encode()
    assert_refused(post_raw(server, "/batch", batch), code, words)
    assert_no_jobs_left(server)


@pytest.mark.parametrize(("field", "value"), [("budget", "NaN"), ("max_new_tokens", "Infinity"),
                                              ("tokens_per_tile", "-Infinity"), ("budget", "1e400")])
def test_non_finite_numbers_anywhere_are_a_bad_request(server, inputs, field, value):
    """NaN and Infinity are not JSON, whichever field holds them; before, some fields let them
    through to the engine."""
    body = ask_text(inputs["raster"], **{field: value})
    assert_refused(post_raw(server, "/ask", body), words="json")
    assert_refused(post_upload(server, inputs, body), words="json")
    assert_no_jobs_left(server)


def test_a_boundary_too_long_is_a_bad_request_leaving_nothing(server, inputs):
    boundary = "b" * 300
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"request\"\r\n\r\n"
            f"{{\"question\": \"What?\"}}\r\n--{boundary}--\r\n").encode()
    resp = post_raw(server, "/ask", body, f"multipart/form-data; boundary={boundary}")
    assert_refused(resp, words="boundary")
    assert_no_jobs_left(server)


@pytest.mark.parametrize("method, path", [("GET", "/ask"), ("PUT", "/ask"), ("GET", "/batch"),
                                          ("POST", "/jobs/0123456789abcdef")])
def test_a_wrong_method_is_method_not_allowed(server, method, path):
    resp = httpx.request(method, f"{server.url}{path}", headers=server.headers(), timeout=30)
    assert_refused(resp, "method_not_allowed", method.lower())
    assert resp.status_code == 405
    assert resp.headers.get("allow")


def test_media_types_ignore_case(server, inputs):
    request = httpx.Request("POST", f"{server.url}/ask", headers=server.headers(),
                            files={"raster": ("scene.tif", inputs["raster"].read_bytes(),
                                              "image/tiff")},
                            data={"request": json.dumps({"question": "What is here?",
                                                         "max_new_tokens": 8})})
    ctype = request.headers["content-type"].replace("multipart/form-data", "Multipart/Form-Data")
    with httpx.stream("POST", request.url, content=request.read(), timeout=60,
                      headers={**server.headers(), "Content-Type": ctype}) as resp:
        assert resp.status_code == 200, resp.read()
        events = [json.loads(line) for line in resp.iter_lines() if line.strip()]
    assert events[-1]["type"] == "result", events[-1]
    assert_no_jobs_left(server)


def test_a_self_intersecting_polygon_is_answered_not_a_server_failure(server, inputs):
    """A bow-tie AOI (a hand-drawn ring crossing itself) made the request checks fail with a
    GEOS TopologyException: 500 internal. It is read as the reader reads it (made valid)."""
    bowtie = [[500002, 4499998], [500020, 4499980], [500020, 4499998], [500002, 4499980],
              [500002, 4499998]]
    body = ask_text(inputs["raster"], aoi=json.dumps(
        {"geojson": {"type": "Polygon", "coordinates": [bowtie]}}))
    with httpx.stream("POST", f"{server.url}/ask", content=body, timeout=60,
                      headers={**server.headers(), "Content-Type": "application/json"}) as resp:
        assert resp.status_code == 200, resp.read()
        events = [json.loads(line) for line in resp.iter_lines() if line.strip()]
    assert events[-1]["type"] == "result", events[-1]


def test_unknown_fields_are_a_bad_request(server, inputs):
    """Documented (docs/protocol.md, POST /ask) but not done: the server ignored them, so a
    client's misspelt field went unnoticed. The upload's 'request' part is the same JSON."""
    body = ask_text(inputs["raster"], budjet="64")
    assert_refused(post_raw(server, "/ask", body), words="unknown request fields: 'budjet'")
    assert_refused(post_upload(server, inputs, json.dumps(
        {"question": "What?", "raster_identity": "sha256:0"}).encode()),
        words="unknown request fields: 'raster_identity'")
    assert_no_jobs_left(server)


def test_a_whole_number_of_thousands_of_digits_is_a_bad_request_in_words(server, inputs):
    """Python refuses to convert over 4300 digits, and its message told the client to call
    sys.set_int_max_str_digits(), which no client can."""
    huge = "9" * 5000
    for resp in (post_raw(server, "/ask", ask_text(inputs["raster"], budget=huge)),
                 post_upload(server, inputs, f'{{"question": "What?", "seed": {huge}}}'.encode()),
                 post_raw(server, "/batch", f'{{"items": [], "questions": [], "budget": {huge}}}'.encode())):
        assert_refused(resp, words="has a whole number of more than 4300 digits, too many for any field")
        assert "sys." not in resp.text
    assert_no_jobs_left(server)


def test_a_remove_that_is_not_true_or_false_is_said_in_a_sentence(server):
    """The message was pydantic's list of error dicts ("[{'type': 'bool_parsing', 'loc': ...")."""
    resp = httpx.delete(f"{server.url}/jobs/0123456789abcdef", params={"remove": "maybe"},
                        headers=server.headers(), timeout=30)
    assert_refused(resp, words="the request is malformed: 'remove' is 'maybe': ")
    message = resp.json()["error"]["message"]
    assert "{" not in message and message.endswith(".")
