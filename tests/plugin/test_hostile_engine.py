"""The client against a misbehaving or hostile engine: error bodies, /health answers and answer
streams of the wrong shape, odd statuses, endless or oversized answers. Every one must end as an
EngineError with a sentence the dock can show (or, for a detail of the wrong shape, cost only that
detail), never a Python traceback, a hang or a lost answer. The generated cases are few and
derandomized (fast, deterministic); the fuzzing that found the bugs ran with many more."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FAST = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# any JSON value the engine could send: NaN, infinities and integers too large for a float included
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-10**400, max_value=10**400),
                         st.floats(allow_nan=True), st.text(max_size=6))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)), max_leaves=6)


def _said_in_words(exc) -> None:
    """``exc`` is an EngineError the dock can show: text for its code, message and hint."""
    from geovqa.engine_errors import EngineError

    assert isinstance(exc, EngineError), exc
    assert isinstance(exc.code, str) and exc.code
    assert isinstance(exc.message, str) and exc.message.strip()
    assert exc.hint is None or isinstance(exc.hint, str)
    assert str(exc).startswith(exc.message)


ERROR_BODIES = st.one_of(
    st.binary(max_size=40),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"error": st.fixed_dictionaries(
        {}, optional={"code": JSON_VALUES, "message": JSON_VALUES, "hint": JSON_VALUES})}).map(
        lambda v: json.dumps(v).encode()))


@FAST
@given(status=st.sampled_from([400, 401, 403, 404, 413, 422, 429, 500, 502, 503, 507]), body=ERROR_BODIES)
def test_any_error_body_is_an_engine_error_said_in_words(status, body):
    """An error body whose code, message or hint is not text (a list, a number, an object: a
    broken or hostile engine, a proxy's own JSON) made an EngineError whose str() raised
    TypeError ("can only concatenate list (not "str") to list"): the dock's error line, the batch
    row and Processing's log failed with a traceback instead of saying the error."""
    from geovqa.engine_errors import error_from_body

    _said_in_words(error_from_body(status, body))


def test_an_error_message_that_is_not_text_is_said_by_its_status():
    from geovqa.engine_errors import error_from_body

    err = error_from_body(503, json.dumps({"error": {"code": ["busy"], "message": {"text": "later"},
                                                     "hint": 5}}).encode())
    assert (err.code, err.message) == ("internal", "The engine answered HTTP 503.")
    assert isinstance(err.hint, str)
    err = error_from_body(400, json.dumps({"error": {"code": "bad_aoi", "message": "No area.",
                                                     "hint": ["draw one"]}}).encode())
    assert (err.code, str(err)) == ("bad_aoi", "No area.")


EVENT_TYPES = ("queued", "status", "token", "result", "error", "heartbeat")
EVENT_FIELDS = ("text", "stage", "progress", "position", "message", "code", "hint", "answer", "tokens", "timings",
                "bands", "palette", "strategy", "retry_budget", "heatmap_file", "anchors", "request_id",
                "upload_pixel_offset", "upload_reduced")
EVENTS = st.fixed_dictionaries({"type": st.one_of(st.sampled_from(EVENT_TYPES), JSON_VALUES)},
                               optional={name: JSON_VALUES for name in EVENT_FIELDS})


@FAST
@given(event=EVENTS)
def test_an_event_of_any_shape_is_read_or_refused_in_words(event):
    """Events whose fields have the wrong type (a status's stage a list, its progress an integer
    too large for a float, a message that is a number, the bands [1e999]) raised TypeError /
    OverflowError in the words and the progress the dock, the batch and Processing make of them
    (tasks.event_text, BatchProgress.event, bands.bands_text): the answer under way was lost as
    'Unexpected error in the GeoVQA plugin', or the dock's slot failed with a traceback. Such a
    field now counts as left out; only an event whose type is no name is refused, in words."""
    from geovqa.ask_stream import parse_event
    from geovqa.bands import bands_text
    from geovqa.engine_errors import EngineError
    from geovqa.tasks import BatchProgress, event_text

    try:
        ev = parse_event(json.dumps(event).encode() + b"\n")
    except EngineError as exc:
        _said_in_words(exc)
        return
    progress = BatchProgress(2, lambda _percent: None)
    progress.event(ev, 256)
    assert 0.0 <= progress.fraction <= 1.0
    assert event_text(ev) is None or isinstance(event_text(ev), str)
    assert isinstance(bands_text(ev.get("bands"), ev.get("palette")), str)
    # what the dock and the batch do with them: words joined, a message with its hint, the time
    assert isinstance("" + ev.get("text", "") + ev.get("answer", ""), str)
    assert isinstance((ev.get("message") or "") + " " + (ev.get("hint") or ""), str)
    float((ev.get("timings") or {}).get("total") or 0)
    assert not {"upload_pixel_offset", "upload_reduced"} & set(ev)  # the plugin's own, never the engine's


def _odd_events(stub_engine, change):
    """Make ``stub_engine`` send its events passed through ``change(event) -> [events]``."""
    from stub_engine import StubEngine

    def events(req):
        for ev in StubEngine.events(stub_engine, req):
            yield from change(dict(ev))

    stub_engine.events = events


def test_an_answer_with_odd_fields_and_no_request_ids_is_shown_whole(plugin, raster_layer, stub_engine):
    """An engine that leaves request_id out of its events (the protocol says each echoes it) had its
    answer taken for a stopped question's by the dock: every event dropped, the result files
    discarded, the question 'Answering…' for ever. Odd fields (a stage that is a list, a progress
    too large for a float, a token's text a number, token counts in a list, a time that is text)
    ended the answer as 'Unexpected error in the GeoVQA plugin' or raised in the dock's slot."""
    from conftest import python_errors, wait_for_tasks, wait_until

    def change(ev):
        ev.pop("request_id", None)
        if ev["type"] == "status":
            yield dict(ev, stage=["read"], progress=10**400, message={"m": 1})
        if ev["type"] == "token":
            yield {"type": "token", "text": 5}
        if ev["type"] == "result":
            ev.update(tokens=[1, 2], timings={"total": "soon"}, bands=[1e999], strategy=["x"],
                      upload_pixel_offset=["a", "b"], upload_reduced={"sent": [1], "of": "x"})
        yield ev

    _odd_events(stub_engine, change)
    layer = raster_layer()
    dock = plugin.dock
    dock.set_layer(layer)
    with python_errors() as errors:
        dock.ask("What is here?")
        wait_until(lambda: dock.turns() and dock.turns()[-1].get("done"), 30, "the answer")
        wait_for_tasks()
    assert not errors, errors[0]
    turn = dock.turns()[-1]
    assert turn.get("error") is None, turn
    assert turn["answer"] == "The area is 64 x 48 pixels with 3 bands."
    assert turn.get("heatmap_layer_id") and turn.get("anchors_layer_id")


def test_a_result_without_its_answer_keeps_the_streamed_words_everywhere(stub_engine, tmp_path):
    """A result that leaves out its answer (or sends a number) gave the batch and Processing an
    empty answer although its words had streamed: now every reader gets those words."""
    from geovqa.client import EngineClient
    from geovqa.engine_protocol import build_ask_request

    _odd_events(stub_engine, lambda ev: [dict(ev, answer=42) if ev["type"] == "result" else ev])
    from conftest import write_raster

    path = write_raster(tmp_path / "scene.tif")
    client = EngineClient(stub_engine.url, stub_engine.token, send_rasters="path")
    events = list(client.ask(build_ask_request("What?", path)).events())
    assert events[-1]["type"] == "result"
    assert events[-1]["answer"] == "The area is 64 x 48 pixels with 3 bands. "


def test_an_event_of_another_question_is_refused_in_words(stub_engine, tmp_path):
    """An event echoing another question's request_id (streams mixed up: an engine's bug, a
    proxy) is not taken for this question's answer."""
    from geovqa.client import EngineClient
    from geovqa.engine_errors import EngineError
    from geovqa.engine_protocol import build_ask_request

    _odd_events(stub_engine, lambda ev: [dict(ev, request_id="another") if ev["type"] == "result" else ev])
    from conftest import write_raster

    client = EngineClient(stub_engine.url, stub_engine.token, send_rasters="path")
    with pytest.raises(EngineError, match="another question") as err:
        list(client.ask(build_ask_request("What?", write_raster(tmp_path / "scene.tif"))).events())
    _said_in_words(err.value)
    assert err.value.code == "bad_response"


def test_an_out_of_memory_retry_budget_too_large_for_the_budget_box_is_no_crash(plugin, raster_layer, stub_engine):
    """retry_budget 10**12 (an int) went into the dock's budget box, whose setValue raised
    OverflowError in the dock's slot when the retry was clicked; 10**400 before that in the
    error event."""
    from conftest import python_errors, wait_for_tasks, wait_until

    stub_engine.fail_with = {"code": "out_of_memory", "message": "Out of GPU memory.", "hint": "Retry smaller.",
                             "retry_budget": 10**12}
    dock = plugin.dock
    dock.set_layer(raster_layer())
    with python_errors() as errors:
        dock.ask("What is here?")
        wait_until(lambda: dock.turns() and dock.turns()[-1].get("done"), 30, "the error")
        wait_for_tasks()
        dock.retry_smaller()
    assert not errors, errors[0]
    assert dock.turns()[-1]["error"].startswith("Out of GPU memory.")


HEALTH_FIELDS = ("status", "model", "device", "gpu_name", "quantization", "four_bit", "compute", "weights_present",
                 "demo_model", "message", "strategies", "max_upload_bytes", "max_read_pixels", "heartbeat_s",
                 "queue_length")
TRAINED = st.fixed_dictionaries(  # an adapter's training settings (/health adapter_settings)
    {"bands": st.one_of(st.integers(), JSON_VALUES)},
    optional={name: JSON_VALUES for name in ("strategy", "tokens_per_tile", "budget", "faithful_empty_slots")})
HEALTHS = st.fixed_dictionaries(
    {"protocol": JSON_VALUES, "adapter": st.one_of(st.none(), st.text(min_size=1, max_size=8)),
     "adapter_settings": st.one_of(JSON_VALUES, TRAINED)},
    optional={name: JSON_VALUES for name in HEALTH_FIELDS})


@FAST
@given(health=HEALTHS)
def test_a_health_answer_of_any_shape_is_said_on_the_status_line(health):
    """An adapter's training settings whose bands are a number (True, 3) made the status line's
    summary raise TypeError ("'int' object is not iterable") in the dock's slot: the status line
    stayed on its last words and QGIS showed a traceback after every health check."""
    from geovqa import status
    from geovqa.client import health_read_budget

    level, text = status.summary(health)
    assert level in status.COLORS and isinstance(text, str) and text
    budget = health_read_budget(health)
    assert budget is None or (isinstance(budget, int) and budget > 0)


def test_an_adapter_whose_bands_are_a_number_is_said_without_them():
    from geovqa import status

    health = {"status": "ok", "protocol": 1, "model": "GeoLLaVA-8K", "adapter": "/w/out/adapter",
              "adapter_settings": {"strategy": "anchored", "bands": 3}}
    assert status.summary(health)[1].endswith("with adapter out/adapter (trained with anchored)")


class RawEngine:
    """An 'engine' on a loopback port that answers every request (its head and body read) with
    ``answer(head, sock, closed)``, which writes what it likes (a status line, a body that ends
    once the event ``closed`` is set)."""

    def __init__(self, answer):
        import socket
        import threading

        self.answer = answer
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import threading

        while not self.closed.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")]
            while length and len(body) < length[0]:
                body += conn.recv(65536)
            self.answer(head, conn, self.closed)
        except OSError:  # the client went away (what a test of a never-ending answer wants)
            pass
        finally:
            conn.close()

    def close(self):
        self.closed.set()
        self.listener.close()


def endless(status: str, content_type: str, first: bytes = b""):
    """An answer with ``status`` whose chunked body is ``first`` then 64 KiB of 'a' every 10 ms
    for ever (until the engine is closed)."""
    def answer(_head, conn, closed):
        conn.sendall(f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n"
                     .encode())
        piece = b"a" * 65536
        if first:
            conn.sendall(f"{len(first):x}\r\n".encode() + first + b"\r\n")
        while not closed.wait(0.01):
            conn.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")

    return answer


def canned(status: str, headers: str = "", body: bytes = b""):
    def answer(_head, conn, _closed):
        conn.sendall(f"HTTP/1.1 {status}\r\n{headers}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                     .encode() + body)

    return answer


def _outcome(call, seconds=10.0):
    """What ``call()`` ended with, in a thread given ``seconds``: ('returned', value), ('raised',
    exc), or ('hung', None) (a test of the old code: it read for ever)."""
    import threading

    out = []

    def run():
        try:
            out.append(("returned", call()))
        except BaseException as exc:  # noqa: BLE001 - the test says what it was
            out.append(("raised", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return out[0] if out else ("hung", None)


def _ask(url):
    from geovqa.client import EngineClient
    from geovqa.engine_protocol import build_ask_request

    client = EngineClient(url, "tok", send_rasters="path")
    stream = client.ask(build_ask_request("What is here?", "/data/scene.tif"))
    return stream, lambda: list(stream.events())


@pytest.mark.parametrize("answer, words", [
    (endless("200 OK", "application/x-ndjson", b'{"type": "token", "text": "'), "event line longer than 1 bytes"),
    (endless("500 Internal Server Error", "text/html"), "HTTP 500"),
])
def test_an_answer_that_never_ends_is_refused_not_read_for_ever(monkeypatch, answer, words):
    """An answer stream line, or an error body, that never ends (a hostile or broken engine, a
    proxy streaming something else) was read whole: the worker thread read for ever, its memory
    growing without bound, and neither the dock nor a batch ever heard of the question again."""
    from geovqa import ask_stream

    monkeypatch.setattr(ask_stream, "MAX_EVENT_BYTES", 1, raising=False)  # "1 bytes": the limit in words
    monkeypatch.setattr("geovqa.engine_errors.MAX_ERROR_BYTES", 1 << 16, raising=False)
    engine = RawEngine(answer)
    stream, read = _ask(engine.url)
    try:
        how, exc = _outcome(read)
        if how == "hung":
            stream.abort()
        assert how == "raised", how
        _said_in_words(exc)
        assert words in exc.message
    finally:
        engine.close()


def test_a_health_answer_that_never_ends_is_refused_not_read_for_ever(monkeypatch):
    """A /health answer that never ends kept the dock's health task reading for ever (the status
    line never changed again, the memory grew without bound)."""
    from geovqa import client as client_module

    monkeypatch.setattr(client_module, "MAX_JSON_BYTES", 1 << 20, raising=False)
    engine = RawEngine(endless("200 OK", "application/json", b'{"protocol": 1, "status": "'))
    try:
        how, exc = _outcome(client_module.EngineClient(engine.url).health)
        assert how == "raised", how
        _said_in_words(exc)
        assert "more than 1.0 MiB" in exc.message
    finally:
        engine.close()


@pytest.mark.parametrize("status, headers", [
    ("302 Found", "Location: https://127.0.0.1:8765/ask\r\n"),
    ("301 Moved Permanently", "Location: https://gpu-box.example.org/ask\r\nContent-Type: text/html\r\n"),
    ("307 Temporary Redirect", ""),
    ("204 No Content", ""),
])
def test_a_redirect_or_an_empty_answer_to_a_question_is_said_as_such(status, headers):
    """A redirect (a reverse proxy sending http to https) or a 204 answering the question was read
    as an answer stream: "The engine closed the answer stream before sending a result. Look at
    the engine's log; it may have run out of memory" (or "sent a line that is not JSON: '<html>'")."""
    engine = RawEngine(canned(status, headers, b"<html>moved</html>" if "html" in headers else b""))
    try:
        _stream, read = _ask(engine.url)
        how, exc = _outcome(read)
        assert how == "raised", how
        _said_in_words(exc)
        assert exc.code == "bad_response" and f"HTTP {status}" in exc.message
        if "Location" in headers:
            assert "redirect" in exc.message and headers.split(": ")[1].split("\r")[0] in exc.message
            assert "redirect" in exc.hint
    finally:
        engine.close()


def test_a_redirected_health_check_names_where_it_was_sent():
    """/health answered with a redirect said "not a GeoVQA engine (its /health answer is not
    JSON)", hiding that the engine URL only needs the address it redirects to."""
    from geovqa.client import EngineClient

    engine = RawEngine(canned("301 Moved Permanently", "Location: https://gpu-box.example.org:8765/health\r\n"))
    try:
        how, exc = _outcome(EngineClient(engine.url).health)
        assert how == "raised", how
        _said_in_words(exc)
        assert "redirect" in exc.message and "https://gpu-box.example.org:8765/health" in exc.message
    finally:
        engine.close()


@pytest.mark.parametrize("status, body, words", [
    (403, b"<html><h1>Forbidden</h1></html>", "token"),
    (404, b'{"detail": "Not Found"}', "path in the engine URL"),
    (413, b"", "smaller area"),
    (429, b"slow down", "wait a moment"),
    (502, b"<html>Bad Gateway</html>", "wait a moment"),
    (503, b"", "wait a moment"),
    (504, "délai dépassé".encode("latin-1"), "wait a moment"),
])
def test_an_error_status_without_the_engines_words_says_what_to_do(status, body, words):
    """403, 404, 413, 429 and 5xx answers without the engine's error body (a proxy's page, nothing,
    bytes that are not UTF-8) said only "The engine answered HTTP 429." and nothing to do."""
    from geovqa.engine_errors import error_from_body

    err = error_from_body(status, body)
    _said_in_words(err)
    assert f"HTTP {status}" in err.message and words in (err.hint or "")
    engine_words = json.dumps({"error": {"code": "upload_too_large", "message": "Too big.", "hint": None}})
    assert error_from_body(status, engine_words.encode()).hint is None  # the engine's own error: as it says


@pytest.mark.parametrize("answer", [b"[]", b'{"job_id": 5, "results": {"a": 1}}', b'"done"', b"{}", b"null"])
def test_a_batch_job_answer_of_the_wrong_shape_is_a_bad_response(answer):
    """POST /batch, GET /jobs/{id} and its results answered with JSON of the wrong shape (a list, a
    job_id that is a number, no results) raised KeyError / TypeError out of the client."""
    from geovqa.client import EngineClient

    engine = RawEngine(canned("200 OK", "Content-Type: application/json\r\n", answer))
    try:
        client = EngineClient(engine.url, "tok")
        calls = [lambda: client.submit_batch({"items": [], "questions": []}), lambda: client.job_results("j1")]
        if not answer.startswith(b"{"):  # an object is a job's info, its fields read with .get
            calls += [lambda: client.job("j1"), lambda: client.cancel_job("j1")]
        for call in calls:
            how, exc = _outcome(call)
            assert how == "raised", how
            _said_in_words(exc)
            assert exc.code == "bad_response"
    finally:
        engine.close()


def trickle(head_first: bool):
    """An answer that trickles: a byte every 0.2 s for ever (until the engine is closed), in its
    status line and headers (``head_first``) or in a JSON body that says it is 100 kB long."""
    def answer(_head, conn, closed):
        if not head_first:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
        while not closed.wait(0.2):
            conn.sendall(b"H" if head_first else b" ")
    return answer


@pytest.mark.parametrize("head_first", [True, False], ids=["in its headers", "in its body"])
def test_a_health_answer_that_trickles_is_given_up_at_the_short_timeout(head_first):
    """A server that sent a byte every 0.2 s kept every read of /health within its 1 s timeout,
    with no deadline for the whole answer: the call never ended (the dock's status check with it).
    The short timeout now bounds the whole call."""
    import time

    from geovqa.client import EngineClient

    engine = RawEngine(trickle(head_first))
    try:
        t0 = time.monotonic()
        how, exc = _outcome(EngineClient(engine.url, timeout=1.0).health, seconds=6.0)
        assert how == "raised", how
        assert time.monotonic() - t0 < 3.0
        _said_in_words(exc)
        assert exc.code == "no_answer" and "within 1 s" in exc.message, exc.message
    finally:
        engine.close()


def test_the_docks_health_check_against_a_trickling_engine_ends_and_never_piles_up(plugin, monkeypatch):
    """Against a trickling engine the dock's health task never ended: the status line said
    'checking' for ever (a check asked meanwhile only waited behind it). Now each check ends at the
    short timeout, one task at a time, and one under way is stopped at once by cancelling it."""
    import time

    from conftest import set_settings, wait_for_tasks, wait_until
    from geovqa import client as client_module
    from geovqa.client import EngineClient
    from geovqa.tasks import HealthTask
    from qgis.core import QgsApplication

    monkeypatch.setattr(client_module, "TIMEOUT_S", 1.0)
    engine = RawEngine(trickle(False))
    try:
        set_settings(engine_url=engine.url)
        dock = plugin.dock
        wait_until(lambda: dock._health_task is None, 15, "the first health check")
        dock.timer.setInterval(50)  # a periodic check every 50 ms while one runs
        dock.timer.start()
        counts = []
        t0 = time.monotonic()
        dock.refresh_health()
        while time.monotonic() - t0 < 2.5:
            QgsApplication.processEvents()
            counts.append(sum(1 for t in QgsApplication.taskManager().tasks() if isinstance(t, HealthTask)))
            time.sleep(0.02)
        dock.timer.stop()
        assert max(counts) == 1, max(counts)
        wait_until(lambda: dock._health_task is None, 5, "the health check to end")
        assert dock.status_level == "down" and "No answer from the engine" in dock.status_label.text()
        assert "within 1 s" in dock.status_label.toolTip()
        # a check under way, cancelled, ends at once (the dock cancels its own when it shuts down)
        monkeypatch.setattr(client_module, "TIMEOUT_S", 30.0)
        task = HealthTask(EngineClient(engine.url))
        QgsApplication.taskManager().addTask(task)
        wait_until(lambda: task.status() == task.Running, 5, "the check to start")
        time.sleep(0.3)
        t0 = time.monotonic()
        task.cancel()
        wait_until(lambda: task.error, 5, "the cancelled check to end")
        assert time.monotonic() - t0 < 1.5 and task.error_code == "cancelled", task.error
        wait_for_tasks()
    finally:
        engine.close()


def trickled_answer(first_event: bytes = b"", head_first: bool = False):
    """An engine whose /health answers well and whose answer to a question trickles: a byte every
    0.2 s for ever (until the engine is closed) and never an event (after ``first_event``, a
    line), in the status line of its answer (``head_first``) or in its stream."""
    health = json.dumps({"status": "ok", "protocol": 1, "model": "GeoLLaVA-8K", "heartbeat_s": 15}).encode()

    def answer(head, conn, closed):
        if head.startswith(b"GET /health"):
            canned("200 OK", "Content-Type: application/json\r\n", health)(head, conn, closed)
            return
        if not head_first:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nX-Heartbeat-S: 15\r\n"
                         b"Connection: close\r\n\r\n" + first_event)
        while not closed.wait(0.2):
            conn.sendall(b"H" if head_first else b" ")
    return answer


@pytest.mark.parametrize("head_first", [True, False], ids=["in its headers", "in its stream"])
def test_stop_ends_an_answer_that_trickles_at_once(head_first):
    """An answer stream fed a byte every 0.2 s (never a line, never an event) keeps each read
    within its timeout: only Stop (AskStream.abort, which the dock's Stop, a batch's and
    Processing's Cancel call) can end it, and it must do so at once, although the engine goes on
    sending after the shutdown (a read after it sees the end of the stream, or a reset)."""
    import threading
    import time

    engine = RawEngine(trickled_answer(head_first=head_first))
    try:
        stream, read = _ask(engine.url)
        timer = threading.Timer(0.7, stream.abort)  # the answer is being read by then
        timer.start()
        t0 = time.monotonic()
        how, events = _outcome(read, seconds=5.0)
        timer.join()
        if how == "hung":
            engine.close()  # a Stop that did not end it: only the engine's end does
        assert how == "returned", (how, events)
        assert events == [] and time.monotonic() - t0 < 1.7
    finally:
        engine.close()


def test_the_docks_stop_ends_a_trickling_answer_and_keeps_its_words(plugin, raster_layer):
    """The dock's Stop against an engine that sent some words and then only a byte every 0.2 s:
    the turn says "stopped" with the words that came, and its task ends within about a second
    (a task reading on would hold its bar in QGIS's task list, and QGIS's exit would wait on it)."""
    import time

    from conftest import python_errors, set_settings, wait_for_tasks, wait_until

    words = json.dumps({"type": "token", "text": "Fields and "}).encode() + b"\n"
    engine = RawEngine(trickled_answer(first_event=words))
    try:
        set_settings(engine_url=engine.url)
        dock = plugin.dock
        dock.set_layer(raster_layer())
        with python_errors() as errors:
            dock.ask("What is here?")
            turn = dock.current_turn
            wait_until(lambda: turn["answer"], 10, "the first words")
            time.sleep(0.5)  # the stream trickles on
            t0 = time.monotonic()
            dock.stop()
            wait_for_tasks(timeout=5)
            took = time.monotonic() - t0
        assert not errors, errors[0]
        assert took < 1.5, took
        assert turn["done"] and turn["meta"] == "stopped" and turn["answer"] == "Fields and "
        assert dock.progress_label.text() == "Stopped." and not dock.is_asking()
        assert [t["meta"] for t in dock.turns()] == ["stopped"]
    finally:
        engine.close()


def test_the_docks_stop_ends_the_upload_limit_check_of_an_engine_that_never_answers(plugin, raster_layer):
    """A raster sent as an upload first asks the engine's /health for its upload limit; against
    an engine that takes the request and never answers, the dock's Stop must end that call at
    once (it only aborted the answer stream, so Stop waited the short timeout, 10 s)."""
    import time

    from conftest import python_errors, set_settings, wait_for_tasks
    from geovqa.tasks import AskTask
    from qgis.core import QgsApplication

    asked = []

    def silent(head, _conn, closed):
        asked.append(head.split(b"\r\n", 1)[0])
        closed.wait(30)

    engine = RawEngine(silent)
    try:
        set_settings(engine_url=engine.url, send_rasters="upload")
        dock = plugin.dock
        dock.set_layer(raster_layer())
        with python_errors() as errors:
            dock.ask("What is here?")
            turn = dock.current_turn
            deadline = time.monotonic() + 5
            while not any(b"/health" in line for line in asked) and time.monotonic() < deadline:
                QgsApplication.processEvents()
                time.sleep(0.02)
            assert any(b"/health" in line for line in asked), asked
            time.sleep(1.0)  # the question's client waits on /health (the dock's own checks too)
            t0 = time.monotonic()
            dock.stop()
            # (the dock's own health check of this engine waits its short timeout: not the question's)
            while any(isinstance(t, AskTask) for t in QgsApplication.taskManager().tasks()) \
                    and time.monotonic() - t0 < 15:
                QgsApplication.processEvents()
                time.sleep(0.02)
            took = time.monotonic() - t0
            wait_for_tasks(timeout=15)
        assert not errors, errors[0]
        assert took < 1.5, took
        assert turn["done"] and turn["meta"] == "stopped"
        assert not any(b"POST" in line for line in asked), asked
    finally:
        engine.close()
