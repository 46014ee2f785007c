"""End to end: `python -m engine serve` with the real Engine and the tiny random checkpoint on a
real uvicorn (loopback): health, streamed answer with heatmap and anchors, feature-cache hit on
the second question, cancellation by disconnect, bad input, uploads, queue order.
Batch resume after SIGKILL: test_server_e2e_batch.py."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from server_rasters import make_inputs, write_geotiff  # noqa: E402
from serverutil import ServerProcess  # noqa: E402
from serverutil import wait_until as _wait_until  # noqa: E402

wait_until = functools.partial(_wait_until, timeout=120.0, step=0.1)

from engine import protocol  # noqa: E402

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def weights(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("rasters")
    made = make_inputs(d)
    made["scene"] = write_geotiff(d / "e2e.tif", width=400, height=300, seed=5)
    return made


def start(weights, **kw) -> ServerProcess:
    return ServerProcess(["--weights", str(weights), "--device", "cpu", "--log-level", "warning"],
                         module="engine", subcommand=["serve"], env=ENV, **kw).start(timeout=240)


@pytest.fixture(scope="module")
def server(weights):
    srv = start(weights)
    yield srv
    srv.cleanup()


def body(raster, **kw):
    return {"raster_path": str(raster), "question": "What is in this image?",
            "max_new_tokens": 6, **kw}




def test_health(server):
    status, health = server.request("GET", "/health", token=False)
    assert status == 200
    assert not set(protocol.HEALTH_FIELDS) - set(health)
    assert health["device"] == "cpu" and health["four_bit"] is False
    assert health["demo_model"] is True  # the tiny random checkpoint
    assert health["queue_length"] == 0


def test_auth_refused(server, inputs):
    assert server.ask(body(inputs["scene"]), token=False)[0] == 401
    assert server.ask(body(inputs["scene"]), token="nope")[0] == 401


def test_stream_then_cache_hit(server, inputs):
    import rasterio

    status, events = server.ask(body(inputs["scene"], request_id="e1"))
    assert status == 200, events
    types = [e["type"] for e in events]
    assert types[-1] == "result", events[-1]
    assert "token" in types and types.index("token") < len(types) - 1
    result = events[-1]
    assert result["answer"] == "".join(e["text"] for e in events if e["type"] == "token")
    assert Path(result["heatmap_path"]).is_file() and Path(result["anchors_path"]).is_file()
    with rasterio.open(result["heatmap_path"]) as ds, rasterio.open(inputs["scene"]) as src:
        assert ds.crs == src.crs
    anchors = json.loads(Path(result["anchors_path"]).read_text())
    assert anchors["type"] == "FeatureCollection" and anchors["features"]
    assert result["cache"]["features"] is False
    status, again = server.ask(body(inputs["scene"], question="Is there water?"))
    assert again[-1]["type"] == "result", again[-1]
    assert again[-1]["cache"]["features"] is True
    assert isinstance(again[-1]["cache"]["kv_prefix"], bool)


def test_the_result_says_which_bands_the_model_saw(server, tmp_path):
    """The result event (POST /ask) and a batch's results (GET /jobs/{id}/results) carry the
    source band of each channel the model saw, whether asked for or chosen by the engine."""
    five = write_geotiff(tmp_path / "five.tif", width=120, height=90, count=5, seed=9)
    status, events = server.ask(body(five, bands=[4, 3, 2]))
    assert status == 200 and events[-1]["type"] == "result", events[-1]
    assert events[-1]["bands"] == [4, 3, 2] and events[-1]["palette"] is False
    events = server.ask(body(five))[1]
    assert events[-1]["bands"] == [1, 2, 3]  # no colour tags: the first three
    events = server.ask(body(five, bands=[5]))[1]
    assert events[-1]["bands"] == [5, 5, 5] and events[-1]["cache"]["features"] is False
    status, job = server.request("POST", "/batch", {
        "items": [{"layer": "five", "raster_path": str(five), "bands": [4, 3, 2]},
                  {"layer": "five again", "raster_path": str(five)}],
        "questions": ["What is here?"], "max_new_tokens": 2})
    assert status == 200, job
    wait_until(lambda: server.request("GET", f"/jobs/{job['job_id']}")[1]["state"] in ("done", "failed"))
    rows = sorted(server.request("GET", f"/jobs/{job['job_id']}/results")[1]["results"],
                  key=lambda r: r["index"])
    assert [(r["bands"], r["palette"]) for r in rows] == [([4, 3, 2], False), ([1, 2, 3], False)]


def test_disconnect_frees_the_worker(server, inputs):
    conn, resp = server.open_stream("/ask", body(inputs["scene"], max_new_tokens=400))
    job_id = resp.getheader("X-Job-Id")
    for event in server.iter_events(resp):
        if event["type"] == "token":
            break
    conn.close()
    wait_until(lambda: server.request("GET", f"/jobs/{job_id}")[0] == 404, timeout=30)
    status, events = server.ask(body(inputs["scene"]))
    assert events[0]["type"] == "queued" and events[0]["position"] == 0


@pytest.mark.parametrize("change, code", [
    ({"strategy": "magic"}, "unknown_strategy"),
    ({"question": ""}, "empty_question"),
    ({"question": "x" * 2001}, "question_too_long"),
    ({"aoi": {"window": [5000, 0, 10, 10]}}, "aoi_outside_raster"),
    ({"raster_path": "TEXT"}, "not_a_raster"),
    ({"raster_path": "BROKEN"}, "raster_unreadable"),
])
def test_bad_input(server, inputs, change, code):
    b = body(inputs["scene"], **change)
    b["raster_path"] = {"TEXT": str(inputs["text"]), "BROKEN": str(inputs["broken"])}.get(
        b["raster_path"], b["raster_path"])
    status, err = server.ask(b)
    assert status == protocol.ERROR_CODES[code] and err["error"]["code"] == code
    assert err["error"]["message"]


def test_an_all_nodata_raster_ends_the_stream_with_no_valid_pixels(server, inputs, tmp_path):
    """Found when the pixels are read (the stream has begun): an error event, and the server
    goes on answering."""
    import rasterio

    empty = tmp_path / "empty.tif"
    with rasterio.open(inputs["scene"]) as src:
        profile = dict(src.profile, nodata=0)
    with rasterio.open(empty, "w", **profile) as dst:
        dst.write(np.zeros((profile["count"], profile["height"], profile["width"]), np.uint8))
    status, events = server.ask(body(empty))
    assert status == 200
    assert events[-1]["type"] == "error" and events[-1]["code"] == "no_valid_pixels"
    assert "is nodata" in events[-1]["message"]
    assert server.ask(body(inputs["scene"]))[1][-1]["type"] == "result"


def upload_ask(server, raster: bytes, question: str) -> dict:
    import httpx

    files = {"raster": ("scene.tif", raster, "image/tiff")}
    data = {"request": json.dumps({"question": question, "max_new_tokens": 4})}
    with httpx.stream("POST", f"{server.url}/ask", files=files, data=data,
                      headers=server.headers(), timeout=120) as r:
        assert r.status_code == 200
        events = [json.loads(line) for line in r.iter_lines() if line.strip()]
    assert events[-1]["type"] == "result", events[-1]
    return events[-1]


def test_uploaded_geotiff(server, inputs):
    import httpx

    result = upload_ask(server, inputs["scene"].read_bytes(), "What is here?")
    r = httpx.get(f"{server.url}/files/{result['anchors_file']}", headers=server.headers())
    assert r.status_code == 200 and r.json()["type"] == "FeatureCollection"
    assert not list((server.state_dir / "uploads").glob("*"))


def test_the_same_upload_again_hits_the_caches(server, inputs, tmp_path):
    """An upload is stored in a new temporary file each time; its content, not its path, keys the
    caches, so a second question about the same raster skips the vision tower as a local one does.
    Other bytes are another raster."""
    from server_rasters import write_geotiff

    raster = write_geotiff(tmp_path / "up.tif", width=200, height=150, seed=11).read_bytes()
    first = upload_ask(server, raster, "How many ships?")
    again = upload_ask(server, raster, "Is there water?")
    assert first["cache"]["features"] is False and again["cache"]["features"] is True
    other = write_geotiff(tmp_path / "other.tif", width=200, height=150, seed=12).read_bytes()
    assert upload_ask(server, other, "Is there water?")["cache"]["features"] is False


def test_two_questions_queue_in_order(server, inputs):
    import threading

    out = {}
    conn, resp = server.open_stream("/ask", body(inputs["raster"], question="Describe it.",
                                                 max_new_tokens=300))
    events = server.iter_events(resp)
    first = []
    for event in events:
        first.append(event)
        if event["type"] == "token":
            break  # the first question holds the worker now

    def run():
        out["second"] = server.ask(body(inputs["raster"], question="Any roads?"))[1]

    second = threading.Thread(target=run)
    second.start()
    first.extend(events)
    conn.close()
    second.join(60)
    assert first[-1]["type"] == "result" and out["second"][-1]["type"] == "result"
    assert [e["position"] for e in out["second"] if e["type"] == "queued"][0] == 1
    assert out["second"][-1]["cache"]["features"] is True  # same raster, read once


def test_serve_says_in_its_log_that_the_demo_model_answers(server):
    """`serve` on the tiny random model logged only 'GeoVQA engine on ...': nothing said the
    answers are meaningless unless one read /health (`ask` and `make run` say it loudly)."""
    assert server.request("GET", "/health", token=False)[1]["demo_model"] is True
    assert "is the tiny RANDOM demo model, not GeoLLaVA-8K" in server.log()
