"""The plugin's client checked against engine/protocol.py, loaded by file path (stdlib only)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def protocol():
    spec = importlib.util.spec_from_file_location("geovqa_protocol_under_test", ROOT / "engine" / "protocol.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ask_request_has_exactly_the_protocol_fields(protocol):
    from geovqa.engine_protocol import build_ask_request

    req = build_ask_request("  How many ships?  ", "/data/x.tif", aoi={"window": [0, 0, 10, 10]}, budget=512)
    assert set(req) == set(protocol.ASK_FIELDS)
    assert req["question"] == protocol.validate_question("  How many ships?  ")
    assert req["strategy"] == protocol.DEFAULT_STRATEGY
    assert set(req["aoi"]) <= set(protocol.AOI_FIELDS)
    json.dumps(req)
    # "Engine's default": both left out, which the protocol allows (the adapter's, else the default)
    req = build_ask_request("How many ships?", "/data/x.tif", strategy=None, faithful_empty_slots=None)
    assert req["strategy"] is None and req["faithful_empty_slots"] is None
    for field in ("strategy", "faithful_empty_slots"):
        assert "| null" in protocol.ASK_FIELDS[field] and "adapter" in protocol.ASK_FIELDS[field], field


def test_question_limits_match(protocol):
    from geovqa.engine_errors import EngineError
    from geovqa.engine_protocol import MAX_QUESTION_CHARS, build_ask_request

    assert MAX_QUESTION_CHARS == protocol.MAX_QUESTION_CHARS
    for bad in ("", "   ", "x" * (protocol.MAX_QUESTION_CHARS + 1)):
        with pytest.raises(EngineError) as err:
            build_ask_request(bad, "/x.tif")
        with pytest.raises(ValueError) as perr:
            protocol.validate_question(bad)
        assert str(perr.value).startswith(err.value.code + ":")


def test_strategies_and_events_match(protocol):
    from geovqa import engine_protocol, settings

    assert tuple(settings.STRATEGIES) == tuple(protocol.STRATEGIES)
    assert settings.DEFAULT_STRATEGY == protocol.DEFAULT_STRATEGY
    # 0 = the checkpoint's own: sent as null, which the engine reads from the checkpoint's config
    assert settings.Settings().tokens_per_tile == 0
    assert settings.Settings().request_options()["tokens_per_tile"] is None
    assert settings.DEFAULT_TOKENS_PER_TILE == protocol.DEFAULT_TOKENS_PER_TILE  # shown in the boxes
    # and the plugin's own "Engine's default" (sent as no strategy), which is no engine strategy
    assert settings.ENGINE_DEFAULT_STRATEGY not in protocol.STRATEGIES
    assert settings.STRATEGY_CHOICES == tuple(protocol.STRATEGIES) + (settings.ENGINE_DEFAULT_STRATEGY,)
    assert set(settings.STRATEGY_LABELS) == set(settings.STRATEGY_TIPS) == set(settings.STRATEGY_CHOICES)
    assert set(engine_protocol.KNOWN_EVENTS) == set(protocol.EVENT_TYPES)
    assert set(engine_protocol.FINAL_EVENTS) <= set(protocol.EVENT_TYPES)
    assert engine_protocol.PROTOCOL_VERSION == protocol.PROTOCOL_VERSION
    assert engine_protocol.HEARTBEAT_HEADER == protocol.HEARTBEAT_HEADER
    for endpoint in (engine_protocol.ASK_ENDPOINT, engine_protocol.HEALTH_ENDPOINT, engine_protocol.BATCH_ENDPOINT,
                     engine_protocol.JOBS_ENDPOINT + "/{id}", engine_protocol.FILES_ENDPOINT + "/{name}"):
        assert endpoint in protocol.__doc__


def test_result_fields_the_plugin_reads_exist(protocol):
    result = protocol.EVENT_TYPES["result"]
    for key in ("answer", "tokens", "timings", "heatmap_path", "heatmap_file", "anchors_path", "anchors_file",
                "anchors", "crs_wkt", "strategy", "bands", "palette"):
        assert key in result
    assert {"stage", "progress", "message"} <= set(protocol.EVENT_TYPES["status"])
    assert "text" in protocol.EVENT_TYPES["token"]
    assert {"code", "message", "hint"} <= set(protocol.EVENT_TYPES["error"])


def test_health_fields_the_status_line_reads_exist(protocol):
    from geovqa import status

    health = {k: None for k in protocol.HEALTH_FIELDS}
    health.update(status="ok", model="GeoLLaVA-8K", device="cuda:0", gpu_name="H100", quantization="nf4",
                  four_bit=True, weights_present=True, demo_model=False)
    level, text = status.summary(health)
    assert level == "ok" and "GeoLLaVA-8K" in text and "4-bit" in text and "H100" in text and "weights present" in text
    level, text = status.summary(dict(health, demo_model=True, weights_present=False))
    assert level == "demo" and "DEMO" in text
    level, text = status.summary(dict(health, status="loading", message="loading shards 2/4"))
    assert level == "loading" and "loading shards" in text
    # a fine-tuned adapter, and what it was trained with: the dock's options can be set to match
    assert "adapter" in protocol.HEALTH_FIELDS and "adapter_settings" in protocol.HEALTH_FIELDS
    trained = {"format": 1, "strategy": "anchored", "budget": None, "tokens_per_tile": 4,
               "faithful_empty_slots": False, "bands": [4, 3, 2], "records_with_own_bands": 0}
    level, text = status.summary(dict(health, adapter="/runs/harbour/adapter", adapter_settings=trained))
    assert level == "ok" and text.endswith(
        "with adapter harbour/adapter (trained with anchored, 4 tokens a tile, bands 4, 3, 2)"), text
    level, text = status.summary(dict(health, adapter="/r/a", adapter_settings=dict(trained, faithful_empty_slots=True)))
    assert "(trained with anchored, 4 tokens a tile, empty cluster slots sent, bands 4, 3, 2)" in text, text
    level, text = status.summary(dict(health, adapter="C:\\runs\\ships", adapter_settings=None))
    assert text.endswith(", with adapter runs/ships"), text
    assert "adapter" not in status.summary(health)[1]


def test_the_status_line_says_when_nf4_computes_in_fp16(protocol):
    """On a GPU without native bfloat16 (a T4) the engine's nf4 layers compute in fp16."""
    from geovqa import status

    assert "compute" in protocol.HEALTH_FIELDS
    health = {k: None for k in protocol.HEALTH_FIELDS}
    health.update(status="ok", model="GeoLLaVA-8K", device="cuda:0", gpu_name="Tesla T4", quantization="nf4",
                  four_bit=True, compute="fp16", weights_present=True, demo_model=False)
    assert "4-bit nf4 (fp16 compute)" in status.summary(health)[1]
    assert "fp16 compute" not in status.summary(dict(health, gpu_name="A100", compute="bf16"))[1]
    assert "fp16 compute" not in status.summary(dict(health, compute=None))[1]  # an older engine
    assert ", fp16, " in status.summary(dict(health, quantization="fp16", four_bit=False))[1]


def test_every_error_body_becomes_a_clear_engine_error(protocol):
    from geovqa.engine_errors import EngineError, EngineUnavailable, error_from_body

    for code, http_status in protocol.ERROR_CODES.items():
        body = json.dumps(protocol.error_body(code, f"message for {code}", "a hint")).encode()
        err = error_from_body(http_status, body)
        assert isinstance(err, EngineError)
        assert err.code == code and err.message == f"message for {code}" and err.hint == "a hint"
        assert isinstance(err, EngineUnavailable) == (code == "model_loading")


def test_ndjson_events_parse(protocol):
    from geovqa.ask_stream import parse_event
    from geovqa.engine_errors import EngineError

    for kind in protocol.EVENT_TYPES:
        ev = parse_event(json.dumps({"type": kind, "request_id": "r1"}).encode() + b"\n")
        assert ev["type"] == kind
    assert parse_event(b"\n") is None
    with pytest.raises(EngineError):
        parse_event(b"not json\n")


def test_token_location_matches(protocol, monkeypatch, tmp_path):
    from geovqa import settings

    monkeypatch.setenv("GEOVQA_CONFIG_DIR", str(tmp_path))
    assert settings.default_token_path() == protocol.token_path()
    (tmp_path / "token").write_text("secret\n")
    s = settings.Settings()
    assert s.resolved_token() == "secret"
    monkeypatch.delenv("GEOVQA_CONFIG_DIR")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert settings.config_dir() == protocol.config_dir()


def test_batch_rows_have_the_protocol_result_fields(protocol):
    from geovqa.results_io import CSV_COLUMNS, flat_row

    for key in protocol.BATCH_RESULT_FIELDS:
        if key in ("tokens", "timings", "palette"):  # flattened into other columns
            continue
        assert key in CSV_COLUMNS
    # the result's bands and palette flag share the "bands" column
    assert flat_row({"bands": [4, 3, 2], "palette": False})["bands"] == "4,3,2"
    assert flat_row({"bands": [1, 1, 1], "palette": True})["bands"] == "1 (colour table)"
    assert flat_row({})["bands"] == ""


def test_the_bands_sent_and_the_bands_reported_match_the_protocol(protocol):
    """The request's ``bands`` (one band as grey, or three as red, green, blue) is what
    bands.layer_bands gives; the result's ``bands`` is one band a channel, and ``palette`` a flag."""
    from geovqa.bands import bands_cell, bands_text
    from geovqa.engine_protocol import build_ask_request

    assert "one (shown as grey) or three" in protocol.ASK_FIELDS["bands"]
    assert build_ask_request("q?", "/x.tif", bands=[4, 3, 2])["bands"] == [4, 3, 2]
    assert build_ask_request("q?", "/x.tif", bands=[2])["bands"] == [2]
    assert build_ask_request("q?", "/x.tif")["bands"] is None  # the engine's own choice
    assert "'bands'" in protocol.BATCH_FIELDS["items"]
    result = protocol.EVENT_TYPES["result"]
    assert result["bands"].startswith("list[int]") and result["palette"].startswith("bool")
    assert "[b, b, b]" in result["bands"]  # one band shown as grey: the same band in each channel
    assert bands_text([2, 2, 2]) == "band 2 as grey" and bands_cell([1, 1, 1], True) == "1 (colour table)"


def test_batch_jobs_through_the_plugin_client(real_engine, tmp_path, protocol):
    """POST /batch, GET/DELETE /jobs/{id} and /results from the plugin's side, on the real engine."""
    import time

    from conftest import wait_until, write_raster
    from geovqa.client import EngineClient

    raster = write_raster(tmp_path / "scene.tif", width=80, height=60)
    client = EngineClient(real_engine.url, real_engine.token)
    body = {"items": [{"layer": "scene", "raster_path": str(raster), "aoi": None}],
            "questions": ["How many ships?", "Is there water?"], "strategy": "geollava",
            "budget": None, "tokens_per_tile": 24, "max_new_tokens": 4, "faithful_empty_slots": False,
            "seed": 0}
    assert set(body) == set(protocol.BATCH_FIELDS)
    job_id = client.submit_batch(body)
    wait_until(lambda: client.job(job_id)["state"] in ("done", "failed"), 120, "the batch job")
    job = client.job(job_id)
    assert set(job) >= set(protocol.JOB_FIELDS) - {"kind"}
    assert job["state"] == "done" and job["done"] == job["total"] == 2 and job["errors"] == 0
    rows = client.job_results(job_id)
    assert [r["question"] for r in sorted(rows, key=lambda r: r["index"])] == body["questions"]
    assert all(set(protocol.BATCH_RESULT_FIELDS) <= set(r) and r["answer"] is not None for r in rows)
    assert all(r["bands"] == [1, 2, 3] and r["palette"] is False for r in rows)  # the engine's own choice

    # a long job cancelled from the plugin's side stops early
    many = {**body, "questions": [f"Question {i}?" for i in range(40)]}
    job_id = client.submit_batch(many)
    time.sleep(0.2)
    assert client.cancel_job(job_id)["state"] in ("cancelled", "running", "done")
    wait_until(lambda: client.job(job_id)["state"] in ("cancelled", "done"), 60, "the cancelled job")
    job = client.job(job_id)
    assert job["state"] == "cancelled" and job["done"] < job["total"] == 40


def test_absurdly_nested_json_from_the_engine_is_a_bad_response(tmp_path):
    """json.loads raises RecursionError (not ValueError) on JSON nested deeper than Python's
    recursion limit: a broken or hostile remote engine's /health, /jobs, error body or answer
    line escaped the client as a RecursionError instead of a sentence."""
    import sys
    import threading
    from http.server import ThreadingHTTPServer

    from geovqa.ask_stream import parse_event
    from geovqa.client import EngineClient
    from geovqa.engine_errors import EngineError, error_from_body
    from geovqa.engine_protocol import build_ask_request
    from stub_engine import JsonHandler

    nested = "[" * (sys.getrecursionlimit() * 20) + "]" * (sys.getrecursionlimit() * 20)
    with pytest.raises(EngineError, match="nested too deeply") as err:
        parse_event(nested.encode() + b"\n")
    assert err.value.code == "bad_response"
    err = error_from_body(500, ('{"error": ' + nested + "}").encode())  # says what its status says
    assert isinstance(err, EngineError) and "HTTP 500" in err.message
    err = error_from_body(500, b'{"error": "a string, not an object"}')
    assert isinstance(err, EngineError) and "HTTP 500" in err.message

    class Handler(JsonHandler):
        def _nested(self, content_type):
            data = nested.encode() + (b"\n" if content_type.endswith("ndjson") else b"")
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            self._nested("application/json")

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._nested("application/x-ndjson")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = EngineClient(f"http://127.0.0.1:{server.server_port}", "tok")
        for call in (client.health, lambda: client.job("abc")):
            with pytest.raises(EngineError, match="nested too deeply") as err:
                call()
            assert err.value.code == "bad_response"
        with pytest.raises(EngineError, match="nested too deeply") as err:
            list(client.ask(build_ask_request("What?", str(tmp_path / "x.tif")), upload=False).events())
        assert err.value.code == "bad_response"
    finally:
        server.shutdown()
        server.server_close()


def test_an_event_without_a_type_is_a_bad_response(protocol):
    from geovqa.ask_stream import parse_event
    from geovqa.engine_errors import EngineError

    with pytest.raises(EngineError) as exc:
        parse_event(b'{"request_id": "r1", "text": "hello"}\n')
    assert exc.value.code == "bad_response"


def test_a_401_without_an_engine_body_is_unauthorized_with_the_token_hint(protocol):
    """A 401 whose body is not the engine's (a proxy's HTML page, nothing) still says 'token'."""
    from geovqa.engine_errors import error_from_body

    for body in (b"", b"<html>401 Authorization Required</html>", b'{"detail": "no"}'):
        err = error_from_body(401, body)
        assert err.code == "unauthorized", body
        assert "token" in (err.hint or "").lower(), body
    other = error_from_body(500, b"")
    assert other.code == "internal" and other.hint is None


@pytest.mark.parametrize("header, seconds", [
    ("5", 20.0),      # four heartbeats missed
    ("1", 10.0),      # but never less than the short timeout
    ("600", 900.0),   # nor more than the request timeout
    ("0", 900.0),     # no heartbeat interval: as an engine that says none
    ("-3", 900.0),
    ("soon", 900.0),
    (None, 900.0),    # an older engine
])
def test_an_answer_stream_may_stay_silent_four_heartbeats_within_the_timeouts(header, seconds):
    import email.message

    from geovqa.ask_stream import read_timeout
    from geovqa.engine_protocol import HEARTBEAT_HEADER

    class Response:  # the headers of the engine's 200 answer stream (http.client reads them so)
        def __init__(self, value):
            self.msg = email.message.Message()
            if value is not None:
                self.msg[HEARTBEAT_HEADER] = value

        def getheader(self, name, default=None):
            return self.msg.get(name, default)

    assert read_timeout(Response(header), short=10.0, longest=900.0) == seconds


def test_an_answer_stream_that_broke_off_says_how_in_words():
    """A stream read with the engine's heartbeats that got nothing for four of them: the connection
    stalled; one with no heartbeats that timed out: the engine was silent (the request timeout is
    the setting to lengthen); one whose connection dropped says how, heartbeats or not."""
    import socket

    from geovqa.ask_stream import stream_broken

    stalled = stream_broken(socket.timeout("timed out"), 20.0, heartbeats=True)
    silent = stream_broken(socket.timeout("timed out"), 900.0)
    dropped = [stream_broken(ConnectionResetError(104, "reset"), s, heartbeats=h)
               for s, h in ((20.0, True), (900.0, False))]
    assert {e.code for e in [stalled, silent, *dropped]} == {"stream_broken"}
    assert "nothing for 20 s, not even the heartbeat" in str(stalled)
    assert "nothing for 900 s." in str(silent) and "request_timeout_s" in str(silent)
    for e in dropped:
        assert "the connection to the engine dropped (it was reset)" in str(e) and "sent nothing" not in str(e)


def test_an_error_answer_cut_short_still_says_the_engines_error_when_it_came_whole():
    """An error answer whose connection closed before its announced length, after the whole JSON
    error had come: the engine's code and message are what came, not only the HTTP status."""
    import http.client
    import io

    from geovqa.engine_errors import error_body, error_from_body

    body = json.dumps({"error": {"code": "out_of_memory", "message": "The GPU ran out of memory."}}).encode()
    raw = (b"HTTP/1.1 507 Insufficient Storage\r\nContent-Type: application/json\r\n"
           + f"Content-Length: {len(body) + 50}\r\n\r\n".encode() + body)

    class Sock:  # the connection: what came, then closed
        def makefile(self, mode):
            return io.BytesIO(raw)

    resp = http.client.HTTPResponse(Sock())
    resp.begin()
    err = error_from_body(resp.status, error_body(resp))
    assert (err.code, str(err).startswith("The GPU ran out of memory.")) == ("out_of_memory", True)


def test_the_status_line_says_each_state_of_the_engine(protocol):
    """Each /health status has its level and words: a model that failed to load is an error,
    never 'Ready'; random weights are said (no real weights), real ones too."""
    from geovqa import status

    health = {k: None for k in protocol.HEALTH_FIELDS}
    health.update(status="ok", model="GeoLLaVA-8K", device="cuda:0", gpu_name="A100", quantization="bf16",
                  four_bit=False, weights_present=True, demo_model=False)
    assert status.summary(health) == ("ok", "Ready: GeoLLaVA-8K on cuda:0 (A100), bf16, weights present")
    level, text = status.summary(dict(health, weights_present=False, demo_model=True))
    assert level == "demo" and "no real weights" in text and "weights present" not in text
    assert status.summary(dict(health, status="error", message="CUDA out of memory while loading")) == (
        "error", "Engine error: CUDA out of memory while loading")
    assert status.summary(dict(health, status="loading", message=None))[0] == "loading"
    assert status.summary(None, url="http://127.0.0.1:8765") == (
        "down", "The GeoVQA engine is not reachable at http://127.0.0.1:8765.")
