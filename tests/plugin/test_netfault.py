"""The plugin's HTTP client when the network or the engine misbehaves mid-way.

Each test puts a fault-injecting proxy (:mod:`fault_proxy`) or a misbehaving listener between
the plugin and the stand-in engine and drives the dock, the batch dialog, Processing or the
client through it, checking what the analyst sees: how soon, in which words, and what is kept.
Tests that wait for the client's short timeout shorten it (``short_timeout``) to keep the file
quick."""

from __future__ import annotations

import contextlib
import socket
import time

import pytest

from conftest import MainThreadStallMeter, run_batch_dialog, set_settings, start_batch, wait_for_tasks, wait_until
from fault_proxy import FaultProxy

SHORT_TIMEOUT_S = 2.0


@pytest.fixture
def short_timeout(monkeypatch):
    """The client's short timeout (connect, /health, an answer's first line, between a
    download's bytes) cut from 10 s to SHORT_TIMEOUT_S."""
    from geovqa import client

    monkeypatch.setattr(client, "TIMEOUT_S", SHORT_TIMEOUT_S)
    return SHORT_TIMEOUT_S


def _finished(dock, n=1):
    return lambda: sum(1 for t in dock.conversations.get(dock.layer_combo.currentLayer().id(), []) if t.get("done")) >= n


def spin(seconds):
    """Let the Qt event loop run for ``seconds`` (a time.sleep would block the main thread)."""
    end = time.monotonic() + seconds
    try:
        wait_until(lambda: time.monotonic() >= end, seconds + 5)
    except AssertionError:
        pass


def task_ended(task) -> bool:
    from qgis.core import QgsTask

    try:
        return task.status() in (QgsTask.TaskStatus.Complete, QgsTask.TaskStatus.Terminated)
    except RuntimeError:  # deleted by the task manager: it ended
        return True


@contextlib.contextmanager
def engine_behind(plugin, stub_engine, **fault):
    """The stand-in engine behind a :class:`FaultProxy` doing ``fault``, the plugin's settings
    pointing at the proxy (token, rasters sent by path) and its status checks off; yields the
    proxy, closed after the block."""
    proxy = FaultProxy(stub_engine.port, **fault)
    try:
        set_settings(engine_url=proxy.url, token="stub-token", send_rasters="path")
        plugin.dock.timer.stop()
        yield proxy
    finally:
        proxy.close()


def answer_broken_off(plugin, stub_engine, how):
    """:func:`engine_behind` a proxy that cuts the answer's stream after its first 1000 bytes
    (``how``: "fin" a close, "rst" a reset), the stand-in answering a word every 50 ms so that some
    words came before."""
    stub_engine.token_delay = 0.05
    return engine_behind(plugin, stub_engine, down_cut_after=1000, cut_how=how)


class SynDropListener:
    """A port whose accept queue is full: further connection attempts get no SYN-ACK (as a hung
    program holding the port, or a remote engine's host behind a firewall that drops packets),
    so ``connect()`` blocks until the kernel gives up (about 2 minutes on Linux)."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.fillers = []
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", self.port))
            except BlockingIOError:
                pass
            self.fillers.append(s)
        time.sleep(0.3)

    def close(self):
        for s in [self.listener, *self.fillers]:
            s.close()


# -- faults the plugin handled badly --------------------------------------------------------------------------------------

def test_cancel_of_a_batch_whose_connection_hangs_in_connect_ends_it_at_once(plugin, raster_layer):
    """Cancel while the question's connection is still being made (no SYN-ACK): AskStream.abort
    only shuts down a socket that is already connected, so the worker stays in connect() until
    the kernel (or the 900 s request timeout) gives up, and the dialog stays 'running' (Run
    disabled, Cancel greyed) meanwhile."""
    hung = SynDropListener()
    try:
        set_settings(engine_url=hung.url, send_rasters="path")
        plugin.dock.timer.stop()  # no status checks against the hung port meanwhile
        dlg, done = start_batch(plugin, [raster_layer()], "q1\nq2")
        spin(1.0)  # the first question is connecting
        t0 = time.monotonic()
        dlg.cancel()
        wait_until(lambda: done, 5, "the cancelled batch to end")
        assert time.monotonic() - t0 < 2, f"Cancel took {time.monotonic() - t0:.1f} s to end the batch"
    finally:
        hung.close()


def test_an_error_answer_cut_short_is_an_engine_error_not_a_crash(stub_engine):
    """An HTTP error answer whose body is cut short (the connection reset while it is read: an
    engine dying, a proxy) made AskStream.events() raise http.client.IncompleteRead, outside
    EngineError: the dock says 'Unexpected error in the GeoVQA plugin ... report it', the batch
    'Unexpected error: IncompleteRead', and a Processing run fails with a raw traceback."""
    from geovqa.client import EngineClient
    from geovqa.engine_errors import EngineError
    from geovqa.engine_protocol import build_ask_request

    cut = FaultProxy(mode="canned", canned=(
        b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: 200\r\n"
        b"Connection: close\r\n\r\n{\"error\": {\"code\""))
    try:
        client = EngineClient(cut.url, "stub-token", send_rasters="path")
        stream = client.ask(build_ask_request("how many ships?", "/data/scene.tif"))
        with pytest.raises(EngineError):
            list(stream.events())
    finally:
        cut.close()


OTHER_PROGRAMS = {
    "ssh": dict(mode="canned", canned=b"SSH-2.0-OpenSSH_8.9p1 Ubuntu-3\r\n"),
    "apache_it_works": dict(mode="canned", canned=(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 44\r\nConnection: close\r\n\r\n"
        b"<html><body><h1>It works!</h1></body></html>")),
    "hung": dict(mode="blackhole"),
}


@pytest.mark.parametrize("program", sorted(OTHER_PROGRAMS))
def test_another_program_on_the_engine_port_is_not_called_unreachable(plugin, program, short_timeout):
    """Another program on the engine's port: an SSH server, a web server's default page, a
    program that accepts and never answers (a hung engine). The status line said 'Engine not
    reachable' and the tooltip 'Start it with Plugins > GeoVQA > Start local engine' (a start
    that fails: the port is taken), or only 'The engine answered /health with something that is
    not JSON.'; a program answering JSON gets 'is not a GeoVQA engine ... Check the engine URL'
    (test_dock_stub.py), which is what the analyst needs here too."""
    other = FaultProxy(**OTHER_PROGRAMS[program])
    try:
        set_settings(engine_url=other.url)
        dock = plugin.dock
        dock.refresh_health()
        wait_until(lambda: getattr(dock, "status_level", None) == "down", 30)
        said = dock.status_label.text() + " " + dock.status_label.toolTip()
        assert "not reachable" not in said and "Start local engine" not in said, said
        if program == "hung":
            assert "not answer" in said or "does not respond" in said, said
            assert "No answer from the engine at 127.0.0.1:" in dock.status_label.text()  # one short line
        else:
            assert "not a GeoVQA engine" in said and "Check the engine URL" in said, said
            assert "Not a GeoVQA engine at 127.0.0.1:" in dock.status_label.text()
    finally:
        dock.timer.stop()
        other.close()


@pytest.mark.parametrize("how", ["rst", "fin"])
def test_an_upload_cut_mid_way_is_not_reported_as_an_engine_that_is_not_running(plugin, raster_layer, tmp_path,
                                                                                   how):
    """The connection breaks while the raster is being uploaded (the engine restarted, a proxy's
    size limit, Wi-Fi): the question ended with 'The GeoVQA engine is not reachable ... Start it
    with Plugins > GeoVQA > Start local engine', though the engine answered /health a moment
    before and took part of the upload. It should say the upload broke off."""
    from stub_engine import StubEngine

    stub = StubEngine(tmp_path / "stub_out", token="stub-token")
    proxy = FaultProxy(stub.port, up_cut_after=6000, cut_how=how)
    try:
        set_settings(engine_url=proxy.url, token="stub-token", send_rasters="upload")
        layer = raster_layer(width=256, height=256)
        dock = plugin.dock
        dock.set_layer(layer)
        dock.ask("how many ships?")
        wait_until(_finished(dock), 30)
        wait_for_tasks()
        error = dock.turns()[-1]["error"]
        assert stub.health_calls >= 1  # the engine was reached: its upload limit was asked
        assert "not reachable" not in error and "Start local engine" not in error, error
        assert "broke off while" in error and "Ask again" in error, error
    finally:
        proxy.close()
        stub.close()


def test_a_port_that_accepts_and_never_answers_is_said_within_seconds(plugin, raster_layer, short_timeout):
    """A program holds the engine's port and never answers (a hung engine, another program): the
    question waits the request timeout (900 s by default) for the answer's first line, saying
    'Sending the question to the engine …' all along, though the engine answers a question's
    headers at once (docs/protocol.md: a 200 stream begins with 'queued'). The connection and
    the headers deserve the short timeout /health has (10 s)."""
    hole = FaultProxy(mode="blackhole")
    try:
        set_settings(engine_url=hole.url, send_rasters="path")  # request_timeout_s: the default
        plugin.dock.timer.stop()
        layer = raster_layer()
        dock = plugin.dock
        dock.set_layer(layer)
        dock.ask("anyone there?")
        t0 = time.monotonic()
        try:
            wait_until(_finished(dock), short_timeout + 8, "an error about the silent engine")
        finally:
            waited = time.monotonic() - t0
            task = dock.task
            dock.stop()
            if task is not None:
                wait_until(lambda: task_ended(task), 10, "the stopped question's task")
        assert waited < short_timeout + 5
        error = dock.turns()[-1]["error"]
        assert "did not answer within" in error and "not reachable" not in error, error
    finally:
        hole.close()


# -- behaviours found correct (kept as regression checks) ---------------------------------------

@pytest.mark.parametrize("fault", ["stall", "trickle_upload", "blackhole"])
def test_stop_ends_a_stalled_question_at_once_and_keeps_what_came(plugin, raster_layer, stub_engine, fault):
    kw = {"stall": dict(down_stall_after=1200), "trickle_upload": dict(up_rate=4000),
          "blackhole": dict(mode="blackhole")}[fault]
    proxy = FaultProxy(stub_engine.port, **kw)
    beat = MainThreadStallMeter(interval_ms=50)
    try:
        set_settings(engine_url=proxy.url, token="stub-token",
                     send_rasters="upload" if fault == "trickle_upload" else "path")
        plugin.dock.timer.stop()
        stub_engine.token_delay = 0.02
        layer = raster_layer(width=256, height=256)
        dock = plugin.dock
        dock.set_layer(layer)
        dock.ask("how many ships?")
        turn, task = dock.current_turn, dock.task
        if fault == "stall":
            wait_until(lambda: turn["answer"], 10, "the first words")
        spin(1.5)
        assert not turn["done"]
        t0 = time.monotonic()
        dock.stop()
        wait_until(lambda: task_ended(task), 5, "the question's task to end")  # the socket shut down under it
        assert time.monotonic() - t0 < 5
        assert turn["done"] and turn["meta"] == "stopped"
        if fault == "stall":
            assert turn["answer"].startswith("The")  # what came stays
        assert beat.worst < 0.3, f"main thread blocked {beat.worst:.2f} s"
    finally:
        beat.stop()
        proxy.close()


def test_the_status_line_recovers_when_the_engine_comes_back(plugin, tmp_path):
    from stub_engine import StubEngine

    down = socket.socket()
    down.bind(("127.0.0.1", 0))
    port = down.getsockname()[1]
    down.close()
    set_settings(engine_url=f"http://127.0.0.1:{port}")
    dock = plugin.dock
    dock.refresh_health()
    wait_until(lambda: getattr(dock, "status_level", None) == "down", 10)
    stub = StubEngine.__new__(StubEngine)
    # the stand-in engine on that very port
    import http.server

    orig = http.server.ThreadingHTTPServer.__init__

    def on_port(self, addr, handler, *a, **k):
        orig(self, ("127.0.0.1", port), handler, *a, **k)

    http.server.ThreadingHTTPServer.__init__ = on_port
    try:
        stub.__init__(tmp_path / "out")
    finally:
        http.server.ThreadingHTTPServer.__init__ = orig
    try:
        t0 = time.monotonic()
        wait_until(lambda: dock.status_level in ("ok", "demo"), 10, "the status line to turn ready")
        assert time.monotonic() - t0 < 5
        wait_for_tasks()
    finally:
        stub.close()


TRUNCATED_500 = (b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: 200\r\n"
                 b"Connection: close\r\n\r\n{\"error\": {\"code\"")


def test_a_processing_batch_keeps_going_when_one_error_answer_is_cut_short(plugin, raster_layer, qgis_processing,
                                                                           tmp_path):
    """The Processing batch catches EngineError per question (the row says it, the next question
    is asked); the raw http.client.IncompleteRead of an error answer cut short escaped it and
    ended the whole run with a Python traceback instead of two error rows."""
    import processing
    from qgis.core import QgsProcessingException

    from conftest import recording_feedback

    cut = FaultProxy(mode="canned", canned=TRUNCATED_500)
    try:
        set_settings(engine_url=cut.url, token="stub-token", send_rasters="path")
        plugin.dock.timer.stop()
        fb = recording_feedback()
        try:
            res = processing.run("geovqa:batch_questions", {
                "LAYERS": [raster_layer("a")], "QUESTIONS": "q1\nq2", "OUTPUT": str(tmp_path / "answers.csv")},
                feedback=fb)
        except QgsProcessingException as exc:
            raise AssertionError(f"the run failed: {exc}; errors: {fb.of('error')}") from None
        assert res["ERRORS"] == 2
        assert not any("Traceback" in e or "IncompleteRead" in e for e in fb.of("error")), fb.of("error")
    finally:
        cut.close()


def test_a_processing_answer_cut_mid_stream_keeps_the_words_that_came(plugin, stub_engine, raster_layer,
                                                                     qgis_processing):
    """The chat dock keeps the words streamed before the stream broke ('GeoVQA (incomplete)');
    a Processing run said only 'The answer stream broke off: IncompleteRead(0 bytes read).': the
    words that came are in neither the log nor the error."""
    import processing
    from qgis.core import QgsProcessingException

    from conftest import recording_feedback

    with answer_broken_off(plugin, stub_engine, "fin"):
        fb = recording_feedback()
        with pytest.raises(QgsProcessingException) as failed:
            processing.run("geovqa:ask_raster", {"INPUT": raster_layer("a"), "QUESTION": "How big?"}, feedback=fb)
        said = " ".join([str(failed.value), *fb.of("info"), *fb.of("error")])
        assert "broke off" in said
        assert "The area" in said, said


def test_a_batch_whose_engine_dies_mid_way_keeps_its_rows_and_does_not_hammer(plugin, raster_layer, stub_engine):
    with engine_behind(plugin, stub_engine) as proxy:
        stub_engine.token_delay = 0.05
        dlg, done = start_batch(plugin, [raster_layer()], "q1\nq2\nq3\nq4")
        wait_until(lambda: dlg.rows, 30, "the first row")
        before = proxy.connections
        stub_engine.close()  # the engine goes away
        t0 = time.monotonic()
        wait_until(lambda: done, 30, "the batch")
        assert time.monotonic() - t0 < 10
        rows = done[0]
        assert rows[0]["answer"] and len(rows) == 4
        assert all(r["error"] and r["answer"] is None for r in rows[2:]), rows
        assert proxy.connections - before <= 3 * 2  # one connection a question (+ a TLS probe each), no retries
        assert dlg.autosave_path.read_text().count("\n") == 4
        wait_for_tasks()


@pytest.mark.parametrize("how", ["rst", "fin"])
def test_an_answer_cut_mid_stream_says_what_to_do_in_words(plugin, raster_layer, stub_engine, how):
    """The connection drops while the answer streams: the words that came stay (checked), but
    the error read 'The answer stream broke off: IncompleteRead(0 bytes read).' (or '[Errno
    104] Connection reset by peer.'), with no hint, where the other way a stream ends early says
    'Look at the engine's log; it may have run out of memory.'"""
    with answer_broken_off(plugin, stub_engine, how):
        layer = raster_layer()
        dock = plugin.dock
        dock.set_layer(layer)
        dock.ask("how many ships?")
        wait_until(_finished(dock), 30)
        turn = dock.turns()[-1]
        assert turn["answer"].startswith("The") and "GeoVQA (incomplete)" in dock.view.toPlainText()
        error = turn["error"]
        assert "broke off" in error
        assert "IncompleteRead" not in error and "Errno" not in error, error
        assert "engine's log" in error or "Ask again" in error, error
        wait_for_tasks()


def test_a_stream_stalled_longer_than_four_heartbeats_is_said_broken(plugin, raster_layer, stub_engine,
                                                                    short_timeout):
    """The connection stalls mid-answer (no byte, no close). An engine that says it sends a
    heartbeat every N s of silence (X-Heartbeat-S) has lost the stream after four missed ones:
    the question ended only after the request timeout (15 minutes), the dock waiting meanwhile."""
    stub_engine.token_delay = 0.02
    stub_engine.heartbeat_s = 1.0  # four of them: 4 s, neither the short timeout nor the request one
    with engine_behind(plugin, stub_engine, down_stall_after=1200):
        dock = plugin.dock
        dock.set_layer(raster_layer(width=256, height=256))
        dock.ask("how many ships?")
        turn = dock.current_turn
        wait_until(lambda: turn["answer"], 10, "the first words")
        t0 = time.monotonic()
        wait_until(lambda: turn["done"], 15, "the stalled stream to be said broken")
        assert time.monotonic() - t0 < 8
        assert turn["answer"].startswith("The")  # what came stays
        # the connection stalled: a longer request timeout (the hint for an engine without
        # heartbeats) would change nothing
        assert "sent nothing for 4 s, not even the heartbeat" in turn["error"], turn["error"]
        assert "request timeout" not in turn["error"], turn["error"]
        wait_for_tasks()


def test_stop_during_a_stalled_result_download_ends_the_question_at_once(plugin, raster_layer, stub_engine):
    """An engine on another computer (here: a host name, which the plugin never takes for this
    computer): once the answer has streamed, the heatmap and anchors are downloaded (GET /files)
    on a connection of their own, with the 900 s request timeout, before the result reaches the
    dock. That connection stalls: Stop shuts down only the answer's socket (AskStream.abort), so
    the question's task sits in the download until its timeout (the batch dialog's Cancel the same)."""
    host = socket.gethostname()
    if socket.gethostbyname(host) != "127.0.0.1":
        pytest.skip("needs a host name for this computer that resolves to 127.0.0.1")
    stub_engine.token_delay = 0.01
    proxy = FaultProxy(stub_engine.port, stall_requests=b"GET /files")
    try:
        set_settings(engine_url=f"http://{host}:{proxy.port}", token="stub-token")
        plugin.dock.timer.stop()
        layer = raster_layer()
        dock = plugin.dock
        dock.set_layer(layer)
        dock.ask("how many ships?")
        turn, task = dock.current_turn, dock.task
        wait_until(lambda: proxy.stalled, 20, "the stalled download")
        assert turn["answer"].endswith("bands. ")  # the whole answer came; its files are being fetched
        t0 = time.monotonic()
        dock.stop()
        wait_until(lambda: task_ended(task), 5, "the stopped question's task")
        assert time.monotonic() - t0 < 2
    finally:
        proxy.close()


def test_a_batch_row_whose_answer_broke_off_keeps_its_words_as_incomplete(plugin, raster_layer, stub_engine):
    """The batch dialog's row of an answer cut mid-stream: no answer, the error, and the words
    that came in ``incomplete_answer`` (they were lost)."""
    with answer_broken_off(plugin, stub_engine, "fin"):
        dlg, (row,) = run_batch_dialog(plugin, [raster_layer()], "q1", timeout=30)
        assert row["answer"] is None and "broke off" in row["error"], row
        assert row["incomplete_answer"].startswith("The area"), row
        # the table shows them too, before the error
        from geovqa.batch_dialog import ANSWER_COLUMN
        cell = dlg.table.item(0, ANSWER_COLUMN).text()
        assert cell.startswith("(incomplete) The area") and "ERROR: " in cell, cell


def test_a_processing_batch_row_whose_answer_broke_off_keeps_its_words_in_the_csv(plugin, stub_engine, raster_layer,
                                                                                  qgis_processing, tmp_path):
    import csv

    import processing

    with answer_broken_off(plugin, stub_engine, "rst"):
        res = processing.run("geovqa:batch_questions", {
            "LAYERS": [raster_layer("a")], "QUESTIONS": "How big?", "OUTPUT": str(tmp_path / "answers.csv")})
        assert res["ERRORS"] == 1
        with open(res["OUTPUT"], encoding="utf-8-sig", newline="") as fh:
            (row,) = list(csv.DictReader(fh))
        assert row["answer"] == "" and "broke off" in row["error"], row
        assert row["incomplete_answer"].startswith("The area"), row


def test_stop_during_a_stalled_tls_handshake_ends_the_question_at_once(qgis_app):
    """An https engine URL whose port accepts but never answers the TLS handshake (a hung
    program, a proxy): wrapping the TCP socket handed to the stream detached it, so Stop shut
    down nothing and the handshake went on until the short timeout (10 s)."""
    import threading

    from geovqa.client import EngineClient
    from geovqa.engine_protocol import build_ask_request

    hole = FaultProxy(mode="blackhole")
    try:
        client = EngineClient(f"https://127.0.0.1:{hole.port}", "stub-token", send_rasters="path")
        stream = client.ask(build_ask_request("how many ships?", "/data/scene.tif"))
        ended = threading.Event()
        threading.Thread(target=lambda: (list(stream.events()), ended.set()), daemon=True).start()
        wait_until(lambda: hole.connections, 5, "the connection")
        time.sleep(0.5)  # the ClientHello is sent, no ServerHello comes
        t0 = time.monotonic()
        stream.abort()
        ended.wait(15)
        assert time.monotonic() - t0 < 2, "Stop did not end the TLS handshake"
    finally:
        hole.close()


def test_an_upload_on_a_slow_link_is_not_said_unanswered(plugin, tmp_path, short_timeout):
    """A raster uploaded over a slow link (200 kB/s through a proxy): the send returns once the
    last bytes are in the socket buffers, and the first line was then awaited with the short
    timeout, running out while the bytes still buffered reached the engine: a healthy engine
    was said not to answer (no_answer) and the question failed."""
    import numpy as np
    from osgeo import gdal

    from geovqa.client import EngineClient
    from geovqa.engine_errors import EngineError
    from geovqa.engine_protocol import build_ask_request
    from stub_engine import StubEngine

    path = str(tmp_path / "noise.tif")  # random bytes do not compress: ~0.8 MB sent
    ds = gdal.GetDriverByName("GTiff").Create(path, 512, 512, 3, gdal.GDT_Byte)
    ds.SetGeoTransform((500000.0, 10.0, 0.0, 5000000.0, 0.0, -10.0))
    for b in range(3):
        ds.GetRasterBand(b + 1).WriteArray(np.random.default_rng(b).integers(0, 255, (512, 512), dtype=np.uint8))
    ds = None
    stub = StubEngine(tmp_path / "stub_out", token="stub-token")
    proxy = FaultProxy(stub.port, up_rate=200_000)  # about 4 s on the way, the short timeout 2 s
    try:
        stream = EngineClient(proxy.url, "stub-token", send_rasters="upload").ask(
            build_ask_request("how many ships?", path))
        try:
            events = list(stream.events())
        except EngineError as exc:
            pytest.fail(f"{exc.code}: {exc}")
        assert events[-1]["type"] == "result"
    finally:
        proxy.close()
        stub.close()
