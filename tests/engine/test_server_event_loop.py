"""Heavy work of a request runs off the server's event loop: parsing a JSON body (about 0.8 s for
4 MiB of numbers), the upload's request part and raster check (GDAL), removing a refused upload
and writing a batch job's folder (two fsyncs). On the loop each stalled every other stream and
/health. Each is made to block here (on a threading.Event, no timing) while /health is asked:
it must answer meanwhile, and the blocked request must end as it did before once released."""

from __future__ import annotations

import json
import shutil
import sys
import threading
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from rasters import write_geotiff  # noqa: E402

import engine.server as server  # noqa: E402
import engine.uploads as uploads  # noqa: E402
from engine.server import Settings, create_app  # noqa: E402

AUTH = {"Authorization": "Bearer t"}
WAIT_S = 20  # only ever waited in full when the code under test is wrong


class StandInEngine:
    def health(self):
        return {}

    def ask(self, request, cancel):
        yield {"type": "result", "answer": "ok"}


class Gate:
    """Wraps a function so that each call waits until `release` is set; `entered` says a call
    has begun."""

    def __init__(self, real):
        self.real, self.entered, self.release = real, threading.Event(), threading.Event()

    def __call__(self, *args, **kwargs):
        self.entered.set()
        assert self.release.wait(WAIT_S), "never released"
        return self.real(*args, **kwargs)


def multipart(request: dict, raster: bytes, boundary: str = "b0undary") -> tuple[bytes, dict]:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"request\"\r\n\r\n".encode()
            + json.dumps(request).encode()
            + f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"raster\"; filename=\"a.tif\"\r\n"
              "Content-Type: image/tiff\r\n\r\n".encode() + raster + f"\r\n--{boundary}--\r\n".encode())
    return body, {**AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.fixture
def raster(tmp_path) -> Path:
    return Path(write_geotiff(tmp_path / "scene.tif", np.zeros((8, 8), np.uint8)))


def gated(monkeypatch, app, what: str) -> Gate:
    """Make `what` block until released."""
    if what == "submit_batch":
        gate = Gate(app.state.jobs.submit_batch)
        monkeypatch.setattr(app.state.jobs, "submit_batch", gate)
        return gate
    if what.endswith("cleanup"):  # shutil.rmtree as engine/uploads.py sees it, and no one else
        gate = Gate(shutil.rmtree)
        monkeypatch.setattr(uploads, "shutil", types.SimpleNamespace(rmtree=gate))
        return gate
    module, name = {"json body": (server, "parse_json"), "request part": (uploads, "parse_json"),
                    "raster check": (uploads, "check_raster_file")}[what]
    gate = Gate(getattr(module, name))
    monkeypatch.setattr(module, name, gate)
    return gate


def the_request(what: str, raster: Path) -> dict:
    """The POST that reaches `what`, and what it answers once released."""
    batch = {"items": [{"layer": "scene", "raster_path": str(raster)}], "questions": ["Any roads?"]}
    if what in ("json body", "submit_batch"):
        return {"url": "/batch", "json": batch, "headers": AUTH, "status": 200}
    raster_bytes = raster.read_bytes()
    if what == "upload cleanup":  # a request part without a question: refused, the upload removed
        body, headers = multipart({"budget": 8}, raster_bytes)
        return {"url": "/ask", "content": body, "headers": headers, "status": 400,
                "code": "empty_question"}
    if what == "refused upload cleanup":  # not a raster: refused while received, removed there
        body, headers = multipart({"question": "What is here?"}, b"II*\x00" + b"x" * 100)
        return {"url": "/ask", "content": body, "headers": headers, "status": 422,
                "code": "raster_unreadable"}
    body, headers = multipart({"question": "What is here?"}, raster_bytes)
    return {"url": "/ask", "content": body, "headers": headers, "status": 200}


@pytest.mark.parametrize("what", ["json body", "submit_batch", "request part", "raster check",
                                  "upload cleanup", "refused upload cleanup"])
def test_health_answers_while_a_request_does_its_heavy_work(tmp_path, monkeypatch, raster, what):
    app = create_app(StandInEngine(), Settings(state_dir=tmp_path / "state", token="t"))
    gate = gated(monkeypatch, app, what)
    request = the_request(what, raster)
    status, code = request.pop("status"), request.pop("code", None)
    answers: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

        with TestClient(app) as client:  # one event loop, shared by the threads below
            def post():
                answers["post"] = client.post(**request)

            def health():
                answers["health"] = client.get("/health")

            poster, asker = threading.Thread(target=post), threading.Thread(target=health)
            poster.start()
            try:
                assert gate.entered.wait(WAIT_S), f"the {what} step was never reached"
                asker.start()
                asker.join(WAIT_S)  # the event loop is free: /health answers at once
                assert "health" in answers, f"/health did not answer while the {what} step ran"
                assert answers["health"].status_code == 200
                assert "post" not in answers  # still held by the gate
            finally:
                gate.release.set()
                poster.join(WAIT_S)
                if asker.is_alive():
                    asker.join(WAIT_S)
    response = answers["post"]
    assert response.status_code == status, response.text
    if code is not None:
        assert response.json()["error"]["code"] == code
    if request["url"] == "/ask":
        assert not list((tmp_path / "state" / "uploads").iterdir())  # the upload is removed
