"""Unit tests of the server's pieces without a server: token file, bearer check, exception
mapping, JSONL recovery after a crash mid-write, binding rules."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from engine import auth, protocol
from engine.jobs import BatchJob, JobError, error_for_exception
from engine.server import Settings, check_binding, is_loopback


def test_token_created_private_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOVQA_CONFIG_DIR", str(tmp_path / "cfg"))
    token = auth.load_or_create_token()
    path = protocol.token_path()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert auth.load_or_create_token() == token
    os.chmod(path, 0o644)
    assert auth.load_or_create_token() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_bearer_check():
    assert auth.token_matches("abc", "Bearer abc")
    assert auth.token_matches("abc", "bearer  abc ")
    for header in [None, "", "abc", "Basic abc", "Bearer ", "Bearer abcd", "Bearer ab"]:
        assert not auth.token_matches("abc", header)


class OutOfMemoryError(RuntimeError):
    pass


class RasterError(ValueError):
    pass


class AoiOutsideRaster(RasterError):
    pass


class SelectionError(ValueError):
    pass


@pytest.mark.parametrize("exc, code", [
    (OutOfMemoryError("CUDA out of memory"), "out_of_memory"),
    (RuntimeError("CUDA error: out of memory"), "out_of_memory"),
    (RasterError("cannot read"), "raster_unreadable"),
    (AoiOutsideRaster("outside"), "aoi_outside_raster"),
    (SelectionError("unknown strategy 'x'"), "unknown_strategy"),
    (ValueError("empty_question: Please type a question."), "empty_question"),
    (KeyError("boom"), "internal"),
])
def test_error_mapping(exc, code):
    err = error_for_exception(exc, budget=800)
    assert err.code == code
    assert err.message
    if code == "out_of_memory":
        assert "400" in err.hint


def test_truncated_results_line_is_dropped(tmp_path):
    job = BatchJob("0123456789abcdef", {"items": [{"raster_path": "/x"}], "questions": ["a", "b"]},
                   tmp_path)
    job.append_result({"index": 0, "answer": "yes"})
    with open(job.results_path, "a") as fh:
        fh.write('{"index": 1, "ans')  # killed while writing
    results = job.load_results()
    assert [r["index"] for r in results] == [0]
    job.append_result({"index": 1, "answer": "no"})
    lines = [json.loads(x) for x in job.results_path.read_text().splitlines()]
    assert [r["index"] for r in lines] == [0, 1]


def test_binding_rules(tmp_path, caplog):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    check_binding(Settings(host="127.0.0.1", state_dir=tmp_path))
    with pytest.raises(SystemExit, match="^error: .*--allow-remote"):
        check_binding(Settings(host="0.0.0.0", state_dir=tmp_path))
    with caplog.at_level("WARNING", logger="engine.server"):
        check_binding(Settings(host="0.0.0.0", allow_remote=True, state_dir=tmp_path))
    assert "reachable from other computers" in caplog.text


def test_job_error_body():
    body = JobError("not_a_raster", "x is not a raster").body()
    assert body == {"error": {"code": "not_a_raster", "message": "x is not a raster",
                              "hint": None}}
    with pytest.raises(ValueError, match="unknown error code 'not_a_code'"):
        JobError("not_a_code", "a code no client knows").body()


def test_state_dir_is_exclusive(tmp_path):
    from engine.jobs import JobQueue

    first = JobQueue(object(), tmp_path, dict)
    first.start()
    try:
        with pytest.raises(SystemExit, match="in use by another engine server"):
            JobQueue(object(), tmp_path, dict).start()
    finally:
        first.stop()
    again = JobQueue(object(), tmp_path, dict)
    again.start()
    again.stop()


def test_a_queue_given_the_state_lock_starts_on_it_and_frees_it(tmp_path):
    """serve takes the lock before loading the model; the job worker must start on that lock
    (not ask for it a second time) and free it when it stops."""
    from engine.jobs import JobQueue, lock_state_dir

    jobs = JobQueue(object(), tmp_path, dict, state_lock=lock_state_dir(tmp_path))
    with pytest.raises(SystemExit, match="in use by another engine server"):
        lock_state_dir(tmp_path)
    jobs.start()
    jobs.stop()
    lock_state_dir(tmp_path).close()


def test_real_engine_errors_map_to_codes():
    torch = pytest.importorskip("torch")
    from engine.errors import Cancelled, OutOfMemory

    err = error_for_exception(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"), 300)
    assert err.code == "out_of_memory" and err.extra["retry_budget"] == 150
    err = error_for_exception(OutOfMemory("running the vision tower"), None)
    assert err.code == "out_of_memory" and "vision tower" in err.message
    assert error_for_exception(Cancelled()).code == "cancelled"
    from engine.raster_errors import AOIOutsideError, RasterOpenError

    assert error_for_exception(AOIOutsideError("outside")).code == "aoi_outside_raster"
    assert error_for_exception(RasterOpenError("nope")).code == "not_a_raster"


@pytest.mark.parametrize(("status", "code"), [(400, "bad_request"), (413, "bad_request"), (418, "bad_request"),
                                              (500, "internal"), (503, "internal")])
def test_framework_http_errors_keep_the_protocol_pairing(tmp_path, status, code):
    """An HTTP error the framework raises (not one of ours) gets a protocol code and that code's
    own status, so a client that reads the code reads the status it expects."""
    import warnings

    from starlette.exceptions import HTTPException

    from engine.server import create_app

    app = create_app(engine=None, settings=Settings(state_dir=tmp_path, token="t"))

    @app.get("/raise")
    def _raise():
        raise HTTPException(status_code=status, detail="refused by the framework")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

        resp = TestClient(app).get("/raise")
    assert resp.status_code == protocol.ERROR_CODES[code]
    assert resp.json()["error"]["code"] == code
    assert "refused by the framework" in resp.json()["error"]["message"]


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_an_empty_token_file_gets_a_new_private_token(tmp_path, monkeypatch, content):
    """An existing but empty token file used to recurse until RecursionError."""
    monkeypatch.setenv("GEOVQA_CONFIG_DIR", str(tmp_path / "cfg"))
    path = protocol.token_path()
    path.parent.mkdir(parents=True)
    path.write_text(content)
    os.chmod(path, 0o644)
    token = auth.load_or_create_token()
    assert len(token) >= 32
    assert path.read_text().strip() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert auth.load_or_create_token() == token
    assert [p.name for p in path.parent.iterdir()] == ["token"]  # no temporary file left


@pytest.mark.parametrize("content, why", [
    (b"abc\xc3\xa9def\n", "(the first at byte 3)"),
    (b"\xff\xfea\x00b\x00", "(it starts with a UTF-16 byte-order mark: an editor saved it as 'Unicode' / UTF-16)"),
    (b"\xef\xbb\xbfab\xc3\xa9", "(the first at byte 5)"),  # counted in the file, byte-order mark included
    (b"\x89PNG\r\n\x1a\n", "(the first at byte 0)"),
])
def test_a_token_file_that_is_not_ascii_is_a_clear_error(tmp_path, content, why):
    """It used to end the start with a bare UnicodeDecodeError naming no file."""
    path = tmp_path / "token"
    path.write_bytes(content)
    with pytest.raises(auth.TokenFileError) as err:
        auth.load_or_create_token(path)
    message = str(err.value)
    assert message.startswith(f"The engine's token file {path} holds bytes that are not ASCII text {why}")
    assert "Delete the file" in message and "write an ASCII token" in message
    assert path.read_bytes() == content  # the user's file is left as it is
    assert error_for_exception(err.value).code == "bad_request"


def test_a_utf8_byte_order_mark_before_the_token_is_dropped(tmp_path):
    """Windows editors save "UTF-8 with BOM"; the plugin reads such a file as the token after the
    mark, and the engine must serve that same token (it used to refuse to start)."""
    path = tmp_path / "token"
    path.write_bytes(b"\xef\xbb\xbfmy-token\r\n")
    assert auth.load_or_create_token(path) == "my-token"
    assert path.read_bytes() == b"\xef\xbb\xbfmy-token\r\n"  # the user's file is left as it is


def test_a_token_created_meanwhile_by_another_server_is_used(tmp_path, monkeypatch):
    """The missing-file path must not overwrite a token another process just wrote."""
    path = tmp_path / "token"
    real_write = auth._write_new_token

    def racing_write(p, *, replace):
        if not replace:
            p.write_text("theirs\n")  # the other server got there first
        return real_write(p, replace=replace)

    monkeypatch.setattr(auth, "_write_new_token", racing_write)
    assert auth.load_or_create_token(path) == "theirs"
    assert path.read_text() == "theirs\n"


def test_relative_folders_become_absolute(tmp_path, monkeypatch):
    """Paths in responses (heatmap_path, results_path) must not depend on the server's working
    directory: --state-dir relstate used to give heatmap_path 'relstate/outputs/...'."""
    import argparse

    from engine.server import add_serve_arguments, settings_from_args

    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    settings = settings_from_args(parser.parse_args(["--state-dir", "relstate"]))
    assert settings.state_dir == tmp_path / "relstate"
    assert settings.output_dir == tmp_path / "relstate" / "outputs"
    assert settings.upload_dir == tmp_path / "relstate" / "uploads"
    settings = settings_from_args(parser.parse_args(["--state-dir", "s", "--output-dir", "out"]))
    assert (settings.state_dir, settings.output_dir) == (tmp_path / "s", tmp_path / "out")


def test_a_batch_in_a_relative_state_dir_reports_an_absolute_results_path(tmp_path, monkeypatch):
    from engine.jobs import JobQueue

    monkeypatch.chdir(tmp_path)
    settings = Settings(state_dir="relstate", token="t")
    jobs = JobQueue(object(), settings.state_dir, dict)
    job = jobs.submit_batch({"items": [{"raster_path": "/x.tif"}], "questions": ["q"]})
    results_path = Path(job.info()["results_path"])
    assert results_path.is_absolute() and results_path.is_file()


def test_a_full_disk_during_an_upload_blames_the_engine_not_the_data(tmp_path, monkeypatch):
    """'No space left on device' while storing an upload used to come back as 'not valid
    multipart data' (bad_request); it is the engine's problem (internal, with a hint), and nothing
    is left behind."""
    import asyncio
    import errno as errno_mod

    import engine.uploads as uploads

    class FullDisk:
        def write(self, data):
            raise OSError(errno_mod.ENOSPC, "No space left on device")

        def close(self):
            pass

    monkeypatch.setattr(uploads, "open", lambda *a, **k: FullDisk(), raising=False)
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"request\"\r\n\r\n"
            '{"question": "q?"}\r\n'
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"raster\"; filename=\"a.tif\"\r\n"
            "Content-Type: image/tiff\r\n\r\n").encode() + b"II*\x00" + b"x" * 1000 + f"\r\n--{boundary}--\r\n".encode()

    async def chunks():
        yield body

    with pytest.raises(JobError) as exc:
        asyncio.run(uploads.receive_upload(f"multipart/form-data; boundary={boundary}", chunks(),
                                           max_bytes=10**6, temp_root=tmp_path))
    assert exc.value.code == "internal" and "No space left on device" in exc.value.message
    assert "--state-dir" in exc.value.hint
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("twice", ["raster", "request"])
def test_an_upload_with_two_parts_of_one_name_is_refused_not_joined(tmp_path, twice):
    """Two 'raster' parts were written one after the other into one file (two 'request' parts
    into one text): the upload is refused, and nothing is left behind."""
    import asyncio

    import engine.uploads as uploads

    boundary = "b0undary"
    parts = {"request": ("", '{"question": "q?"}'),
             "raster": ('; filename="a.tif"\r\nContent-Type: image/tiff', "II*\x00" + "x" * 100)}
    order = ["request", "raster", twice]
    body = "".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"{parts[name][0]}"
                   f"\r\n\r\n{parts[name][1]}\r\n" for name in order) + f"--{boundary}--\r\n"

    async def chunks():
        yield body.encode()

    with pytest.raises(JobError) as exc:
        asyncio.run(uploads.receive_upload(f"multipart/form-data; boundary={boundary}", chunks(),
                                           max_bytes=10**6, temp_root=tmp_path))
    assert exc.value.code == "bad_request"
    assert f"more than one '{twice}' part" in exc.value.message
    assert not list(tmp_path.iterdir())


def test_batch_results_are_read_and_encoded_off_the_event_loop(tmp_path, monkeypatch):
    """GET /jobs/{id}/results read a large batch's results.jsonl (and built its JSON) inside the
    async handler: streamed answers and /health stalled until it was done."""
    import asyncio
    import warnings

    from fastapi.responses import JSONResponse

    import engine.jobs
    from engine.server import create_app

    settings = Settings(state_dir=tmp_path, token="t")
    app = create_app(engine=None, settings=settings)
    job = app.state.jobs.submit_batch({"items": [{"raster_path": "/x.tif"}], "questions": ["q1", "q2"]})
    lines = [{"index": i, "layer": "x", "answer": f"answer {i}", "error": None} for i in range(2)]
    for line in lines:
        job.append_result(line)

    read_in, encoded_in = [], []

    def on_event_loop() -> bool:
        try:
            asyncio.get_running_loop()
            return True
        except RuntimeError:
            return False

    real_read, real_render = engine.jobs.read_results, JSONResponse.render

    def recording_read(path, *args, **kwargs):
        read_in.append(on_event_loop())
        return real_read(path, *args, **kwargs)

    def recording_render(self, content):
        if isinstance(content, dict) and "results" in content:
            encoded_in.append(on_event_loop())
        return real_render(self, content)

    monkeypatch.setattr(engine.jobs, "read_results", recording_read)
    monkeypatch.setattr(JSONResponse, "render", recording_render)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

        resp = TestClient(app).get(f"/jobs/{job.job_id}/results", headers={"Authorization": "Bearer t"})
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    assert resp.json() == {"job_id": job.job_id, "results": lines}
    assert read_in == [False] and encoded_in == [False]  # both in a worker thread


@pytest.mark.parametrize("value", ["abc", "0", "-1", "inf"])
def test_a_bad_heartbeat_setting_names_its_variable(monkeypatch, value):
    from engine import protocol

    monkeypatch.setenv(protocol.HEARTBEAT_ENV, value)
    with pytest.raises(ValueError, match=rf"GEOVQA_HEARTBEAT_S must be a positive number of seconds, not '{value}'"):
        protocol.heartbeat_interval()
    monkeypatch.setenv(protocol.HEARTBEAT_ENV, " 2.5 ")
    assert protocol.heartbeat_interval() == 2.5


def test_a_job_read_from_its_folder_is_read_off_the_event_loop(tmp_path, monkeypatch):
    """A finished job not held in memory is answered from its folder (state.json, for an older
    engine's folder the whole results.jsonl): GET, DELETE and /results read it in the handler,
    on the event loop that streams every answer."""
    import asyncio
    import json
    import warnings

    import engine.jobs
    from engine.server import create_app

    folder = tmp_path / "jobs" / "0123456789abcdef"
    folder.mkdir(parents=True)
    (folder / "spec.json").write_text(json.dumps({"items": [{"raster_path": "/x.tif"}], "questions": ["q"]}))
    (folder / "state.json").write_text(json.dumps({"state": "done", "total": 1, "done": 1, "errors": 0}))
    (folder / "results.jsonl").write_text(json.dumps({"index": 0, "answer": "a", "error": None}) + "\n")
    read_in = []
    real = engine.jobs.finished_info_from_disk

    def recording(directory):
        try:
            asyncio.get_running_loop()
            read_in.append(True)
        except RuntimeError:
            read_in.append(False)
        return real(directory)

    monkeypatch.setattr(engine.jobs, "finished_info_from_disk", recording)
    app = create_app(engine=None, settings=Settings(state_dir=tmp_path, token="t"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

        client = TestClient(app)
        auth = {"Authorization": "Bearer t"}
        assert client.get("/jobs/0123456789abcdef", headers=auth).json()["state"] == "done"
        assert client.get("/jobs/0123456789abcdef/results", headers=auth).json()["results"][0]["answer"] == "a"
        assert client.delete("/jobs/0123456789abcdef", headers=auth).json()["state"] == "done"
    assert read_in and not any(read_in), read_in


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
@pytest.mark.parametrize("mode", [0o604, 0o640, 0o660])
def test_a_token_readable_by_anyone_but_its_owner_is_made_private(tmp_path, mode):
    path = tmp_path / "token"
    path.write_text("my-token\n")
    os.chmod(path, mode)
    assert auth.load_or_create_token(path) == "my-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_results_line_cut_just_before_its_newline_is_dropped(tmp_path):
    """The last record is whole JSON but its newline never reached the disk: the line is not
    finished, and the next answer must not be written onto its end."""
    job = BatchJob("0123456789abcdef", {"items": [{"raster_path": "/x"}], "questions": ["a", "b"]},
                   tmp_path)
    job.append_result({"index": 0, "answer": "yes"})
    with open(job.results_path, "a") as fh:
        fh.write('{"index": 1, "answer": "no"}')  # killed before the newline
    assert [r["index"] for r in job.load_results()] == [0]
    job.append_result({"index": 1, "answer": "no"})
    lines = [json.loads(x) for x in job.results_path.read_text().splitlines()]
    assert [r["index"] for r in lines] == [0, 1]


@pytest.mark.skipif(os.name != "posix", reason="symbolic links")
def test_files_serves_only_files_in_the_output_folder_not_links_out_of_it(tmp_path):
    import warnings

    from engine.server import create_app

    out = tmp_path / "out"
    out.mkdir()
    (out / "answer-heatmap.tif").write_bytes(b"II*\x00heatmap")
    (tmp_path / "private.tif").write_bytes(b"II*\x00not for clients")
    (out / "link-heatmap.tif").symlink_to(tmp_path / "private.tif")
    app = create_app(engine=None, settings=Settings(state_dir=tmp_path / "state", output_dir=out, token="t"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

        client = TestClient(app)
    auth_header = {"Authorization": "Bearer t"}
    ok = client.get("/files/answer-heatmap.tif", headers=auth_header)
    assert ok.status_code == 200 and ok.content == b"II*\x00heatmap"
    assert ok.headers["content-type"] == "image/tiff"
    refused = client.get("/files/link-heatmap.tif", headers=auth_header)
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found"


def test_a_result_names_a_file_to_fetch_only_for_files_in_the_output_folder(tmp_path):
    """heatmap_file / anchors_file tell a client on another computer what to GET from /files; a
    path the engine wrote elsewhere has no such name (GET /files would refuse it)."""
    import warnings

    import numpy as np

    from engine.server import create_app

    try:
        from tests.engine.rasters import write_geotiff
    except ImportError:
        from rasters import write_geotiff

    out = tmp_path / "out"
    raster = write_geotiff(tmp_path / "scene.tif", np.zeros((8, 8), np.uint8))

    class Engine:
        def health(self):
            return {}

        def ask(self, request, cancel):
            yield {"type": "result", "answer": "ok", "heatmap_path": str(out / "q-heatmap.tif"),
                   "anchors_path": str(tmp_path / "elsewhere-anchors.geojson")}

    app = create_app(engine=Engine(), settings=Settings(state_dir=tmp_path / "state", output_dir=out, token="t"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

        with TestClient(app) as client:
            resp = client.post("/ask", headers={"Authorization": "Bearer t"},
                               json={"raster_path": str(raster), "question": "What is here?"})
    events = [json.loads(line) for line in resp.text.splitlines()]
    (result,) = [e for e in events if e["type"] == "result"]
    assert result["heatmap_file"] == "q-heatmap.tif"
    assert "anchors_file" not in result


def _multipart(request: bytes, raster: bytes, boundary: str = "b0undary") -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"request\"\r\n\r\n".encode() + request
            + f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"raster\"; filename=\"a.tif\"\r\n"
              "Content-Type: image/tiff\r\n\r\n".encode() + raster + f"\r\n--{boundary}--\r\n".encode())


def _receive(tmp_path, body: bytes, max_bytes: int):
    import asyncio

    import engine.uploads as uploads

    async def chunks():
        for i in range(0, len(body), 4096):
            yield body[i:i + 4096]

    return asyncio.run(uploads.receive_upload("multipart/form-data; boundary=b0undary", chunks(),
                                              max_bytes=max_bytes, temp_root=tmp_path / "uploads"))


def test_an_upload_one_byte_over_the_limit_is_refused_and_one_at_it_is_taken(tmp_path):
    import numpy as np

    try:
        from tests.engine.rasters import write_geotiff
    except ImportError:
        from rasters import write_geotiff

    raster = Path(write_geotiff(tmp_path / "scene.tif", np.zeros((8, 8), np.uint8))).read_bytes()
    with pytest.raises(JobError) as exc:
        _receive(tmp_path, _multipart(b'{"question": "q?"}', raster), max_bytes=len(raster) - 1)
    assert exc.value.code == "upload_too_large"
    assert not list((tmp_path / "uploads").iterdir())
    upload = _receive(tmp_path, _multipart(b'{"question": "q?"}', raster), max_bytes=len(raster))
    try:
        assert upload.raster_path.read_bytes() == raster and upload.request == {"question": "q?"}
    finally:
        upload.cleanup()


def test_an_empty_raster_part_or_an_oversized_request_part_is_a_bad_request(tmp_path):
    from engine.uploads import MAX_JSON_PART_BYTES

    with pytest.raises(JobError) as exc:
        _receive(tmp_path, _multipart(b'{"question": "q?"}', b""), max_bytes=10**6)
    assert exc.value.code == "bad_request" and "no 'raster' file part (or it is empty)" in exc.value.message
    big = json.dumps({"question": "q?", "pad": "x" * MAX_JSON_PART_BYTES}).encode()
    with pytest.raises(JobError) as exc:
        _receive(tmp_path, _multipart(big, b"II*\x00" + b"x" * 100), max_bytes=10**6)
    assert exc.value.code == "bad_request" and exc.value.message == "The 'request' part is too large."
    assert not list((tmp_path / "uploads").iterdir())


def test_an_upload_is_identified_by_the_hash_of_its_raster_bytes(tmp_path):
    """The feature cache keys an uploaded raster by this hash (its temporary path changes with
    every upload): two rasters must not share one, the same raster sent again must."""
    import hashlib

    import numpy as np

    try:
        from tests.engine.rasters import write_geotiff
    except ImportError:
        from rasters import write_geotiff

    first = Path(write_geotiff(tmp_path / "one.tif", np.full((8, 8), 10, np.uint8))).read_bytes()
    second = Path(write_geotiff(tmp_path / "two.tif", np.full((8, 8), 200, np.uint8))).read_bytes()
    seen = []
    for raster in (first, second, first):
        upload = _receive(tmp_path, _multipart(b'{"question": "q?"}', raster), max_bytes=10**6)
        seen.append(upload.sha256)
        upload.cleanup()
    assert seen == [hashlib.sha256(first).hexdigest(), hashlib.sha256(second).hexdigest(),
                    hashlib.sha256(first).hexdigest()]
