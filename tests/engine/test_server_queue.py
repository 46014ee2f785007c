"""The single GPU queue over a real uvicorn: order and positions, cancellation (client
disconnect, DELETE), out-of-memory recovery, and batch results persisted as they complete."""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from server_rasters import make_inputs  # noqa: E402
from serverutil import stub_server  # noqa: E402
from serverutil import wait_until as _wait_until  # noqa: E402

wait_until = functools.partial(_wait_until, timeout=30.0)

WORD_DELAY = 0.08


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("rasters"))


@pytest.fixture(scope="module")
def server():
    srv = stub_server(WORD_DELAY)
    srv.start()
    yield srv
    srv.cleanup()


def body(raster, **kw):
    return {"raster_path": str(raster), "question": "What is here?", "max_new_tokens": 12, **kw}




def open_ask(server, raster, **kw):
    """Start a question; returns (connection, event iterator, events read so far)."""
    conn, resp = server.open_stream("/ask", body(raster, **kw))
    assert resp.status == 200
    events = server.iter_events(resp)
    return conn, events, [next(events)]


def read_until_token(events, seen):
    for event in events:
        seen.append(event)
        if event["type"] == "token":
            return
    raise AssertionError("no token event")


def test_queue_order_and_positions(server, inputs):
    streams = {}
    conn, events, seen = open_ask(server, inputs["raster"], request_id="a")
    read_until_token(events, seen)  # "a" holds the worker
    streams["a"] = (conn, events, seen)
    for name in ("b", "c"):  # submitted in this order while "a" runs
        streams[name] = open_ask(server, inputs["raster"], request_id=name)
    status, health = server.request("GET", "/health", token=False)
    assert health["queue_length"] == 2
    results = {}
    for name, (conn, events, seen) in streams.items():
        seen.extend(events)
        conn.close()
        results[name] = seen
    positions = {n: [e["position"] for e in ev if e["type"] == "queued"]
                 for n, ev in results.items()}
    assert positions["a"] == [0]
    assert positions["b"] == [1]
    assert positions["c"] == [2, 1]  # told when it moves up
    seq = {n: ev[-1]["stub_seq"] for n, ev in results.items()}
    assert seq["a"] < seq["b"] < seq["c"]
    assert all(ev[-1]["type"] == "result" for ev in results.values())
    assert all(ev[-1]["stub_concurrent"] == 1 for ev in results.values())  # one at a time


def test_client_disconnect_cancels_gpu_work(server, inputs):
    outputs = server.state_dir / "outputs"
    before = set(outputs.glob("*-heatmap.tif"))
    conn, events, seen = open_ask(server, inputs["raster"], max_new_tokens=40, request_id="gone")
    job_id = seen[0]["job_id"]
    read_until_token(events, seen)
    conn.close()  # the analyst moved on
    # the worker lets go long before the 40 words (3.2 s) would have been written
    t0 = time.monotonic()
    wait_until(lambda: server.request("GET", f"/jobs/{job_id}")[0] == 404, timeout=20)
    status, events = server.ask(body(inputs["raster"], request_id="next"))
    assert status == 200
    assert events[0]["type"] == "queued" and events[0]["position"] == 0
    assert events[-1]["type"] == "result"
    after = set(outputs.glob("*-heatmap.tif"))
    assert len(after - before) == 1, "the disconnected question never finished"
    assert time.monotonic() - t0 < 40 * WORD_DELAY + 5


def test_delete_cancels_a_waiting_question(server, inputs):
    conn1, events1, seen1 = open_ask(server, inputs["raster"])
    read_until_token(events1, seen1)
    conn, events, seen = open_ask(server, inputs["raster"], request_id="victim")
    queued = seen[0]
    assert queued["type"] == "queued" and queued["position"] == 1
    status, info = server.request("DELETE", f"/jobs/{queued['job_id']}")
    assert status == 200 and info["state"] == "cancelled"
    rest = list(events)
    conn.close()
    assert rest[-1]["type"] == "error" and rest[-1]["code"] == "cancelled"
    assert not [e for e in rest if e["type"] == "token"]
    seen1.extend(events1)
    conn1.close()
    assert seen1[-1]["type"] == "result"


def test_out_of_memory_is_reported_and_server_keeps_serving(server, inputs):
    status, events = server.ask(body(inputs["raster"], question="__oom__", budget=1024))
    assert status == 200
    err = events[-1]
    assert err["type"] == "error" and err["code"] == "out_of_memory"
    assert "out of memory" in err["message"].lower()
    assert "budget" in err["hint"] and "512" in err["hint"]
    assert err["retry_budget"] == 512
    status, events = server.ask(body(inputs["raster"]))
    assert events[-1]["type"] == "result"


def test_feature_cache_hit_on_second_question(server, inputs):
    raster = inputs["raster2"]
    _, first = server.ask(body(raster, question="How many roads?"))
    _, second = server.ask(body(raster, question="How many houses?"))
    assert first[-1]["cache"]["features"] is False
    assert second[-1]["cache"]["features"] is True


def test_batch_results_grow_and_delete_cancels(server, inputs):
    spec = {"items": [{"layer": "scene", "raster_path": str(inputs["raster"])}],
            "questions": [f"Question {i}?" for i in range(8)], "strategy": "geollava",
            "max_new_tokens": 12}
    status, job = server.request("POST", "/batch", spec)
    assert status == 200, job
    job_id = job["job_id"]
    assert job["total"] == 8
    results_path = Path(job["results_path"])
    sizes = []
    wait_until(lambda: sizes.append(len(results_path.read_text().splitlines())) or sizes[-1] >= 2)
    status, info = server.request("GET", f"/jobs/{job_id}")
    assert info["state"] in ("running", "queued") and info["done"] >= 2
    status, info = server.request("DELETE", f"/jobs/{job_id}")
    assert status == 200
    wait_until(lambda: server.request("GET", f"/jobs/{job_id}")[1]["state"] == "cancelled")
    done = server.request("GET", f"/jobs/{job_id}")[1]["done"]
    time.sleep(1.0)
    lines = results_path.read_text().splitlines()
    assert len(lines) == done < 8, "nothing is answered after the cancel"
    status, res = server.request("GET", f"/jobs/{job_id}/results")
    assert [r["index"] for r in res["results"]] == list(range(done))
    assert all(r["answer"] and r["error"] is None for r in res["results"])
    # a batch waits its turn like any question and reports its position
    assert sizes == sorted(sizes)


def test_batch_bad_input(server, inputs):
    status, body_ = server.request("POST", "/batch", {
        "items": [{"raster_path": str(inputs["text"])}], "questions": ["What?"]})
    assert status == 400 and body_["error"]["code"] == "not_a_raster"
    status, body_ = server.request("POST", "/batch", {
        "items": [{"raster_path": str(inputs["raster"])}], "questions": [""]})
    assert status == 400 and body_["error"]["code"] == "empty_question"
    status, body_ = server.request("POST", "/batch", {
        "items": [{"raster_path": str(inputs["raster"])}], "questions": ["ok?"],
        "strategy": "nope"})
    assert status == 400 and body_["error"]["code"] == "unknown_strategy"


def test_a_silent_stream_gets_heartbeats(inputs):
    """A question queued behind a long job, or in a long prefill on the CPU, sent nothing for
    minutes: a client could not tell that from a dead connection, and its read timeout ended a
    question the engine was still answering. After heartbeat_s of silence the stream says so."""
    srv = stub_server(WORD_DELAY, env={"GEOVQA_STUB_VISION_DELAY": "1.5", "GEOVQA_HEARTBEAT_S": "0.3"})
    srv.start()
    try:
        assert srv.request("GET", "/health")[1]["heartbeat_s"] == 0.3
        conn, resp = srv.open_stream("/ask", body(inputs["raster"], request_id="hb"))
        assert resp.getheader("X-Heartbeat-S") == "0.3"  # known before the first event
        events = list(srv.iter_events(resp))
        conn.close()
    finally:
        srv.cleanup()
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "result", kinds
    beats = [e for e in events if e["type"] == "heartbeat"]
    assert len(beats) >= 2, kinds  # 1.5 s of "vision" with a heartbeat every 0.3 s
    assert all(b["request_id"] == "hb" and b["job_id"] == events[0]["job_id"] for b in beats)
    first_token = kinds.index("token")
    assert "heartbeat" not in kinds[first_token:], kinds  # words flowing: no heartbeat needed
