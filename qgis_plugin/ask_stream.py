"""One streamed answer of ``POST /ask`` (AskStream): the question, or the raster uploaded as
multipart (converted and cut to the AOI first, :mod:`upload`), sent; the NDJSON answer read one
event a line as each line arrives (parse_event), with a silence allowed by the engine's heartbeats
(read_timeout), and a stream that breaks off said in words (stream_broken). :meth:`AskStream.abort`
(safe from another thread) shuts its sockets down, so a blocked connect, send or read returns at
once; the answer's downloads (:meth:`AskStream.download_file`) stop with it. Runs in worker
threads (a QgsTask, a Processing algorithm): no Qt objects are touched here.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import uuid
from typing import TYPE_CHECKING

from .dialling import WatchedSockets, failed_at
from .engine_events import checked_event
from .engine_errors import (EngineError, connection_words, engine_json, error_body, error_from_body, not_the_answer,
                            size_text)
from .engine_protocol import ASK_ENDPOINT, FINAL_EVENTS, HEARTBEAT_HEADER

if TYPE_CHECKING:
    from .client import EngineClient

UPLOAD_CHUNK = 1 << 20  # bytes of an uploaded raster sent at a time (its progress is said after each)
# the longest event line read: a result with the anchors of every token kept (strategy none on
# a full 8K canvas) is tens of megabytes; a line that never ends must not fill the memory
MAX_EVENT_BYTES = 256 << 20
STALL_HEARTBEATS = 4  # heartbeats missed in a row that make a silent answer stream a broken one


def parse_event(line: bytes | str) -> dict | None:
    """One NDJSON line -> event dict (None for a blank keep-alive line), its fields of the wrong
    type dropped (:func:`engine_events.checked_event`)."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    line = line.strip()
    if not line:
        return None
    event = engine_json(line, "The engine sent a line that is {why}: " + repr(line[:120]))
    if not isinstance(event, dict) or "type" not in event:
        raise EngineError("bad_response", f"The engine sent an event without a type: {line[:120]!r}")
    return checked_event(event)


def read_timeout(resp, short: float, longest: float) -> float:
    """How long the answer stream ``resp`` may stay silent: an engine that sends a heartbeat
    event every N s of silence (its ``X-Heartbeat-S`` header) has stalled after STALL_HEARTBEATS
    of them went missing (but at least the ``short`` timeout); one that does not say (older) may
    be silent for ``longest``, the request timeout (a question queued behind long jobs)."""
    try:
        beat = float(resp.getheader(HEARTBEAT_HEADER) or "nan")
    except ValueError:
        beat = float("nan")
    if not 0 < beat < float("inf"):
        return longest
    return min(longest, max(short, STALL_HEARTBEATS * beat))


def stream_broken(exc: Exception, seconds: float, heartbeats: bool = False) -> EngineError:
    """EngineError 'stream_broken' for an answer stream that failed with ``exc`` while it was read
    (``seconds``: the timeout it was read with; ``heartbeats``: four of the engine's heartbeat
    intervals, :func:`read_timeout`, not the request timeout), in words and with what to do; the
    words of the answer that came before are the caller's to keep (the dock shows them marked
    incomplete)."""
    if isinstance(exc, (socket.timeout, TimeoutError)) and heartbeats:
        # a busy engine says so every heartbeat interval: the connection is what stalled
        return EngineError(
            "stream_broken",
            f"The answer stream broke off: the engine sent nothing for {seconds:g} s, not even the "
            "heartbeat it sends while busy, so the connection to it stalled.",
            "Ask again; if it happens again, look at the network between this computer and the engine "
            "(a proxy, a VPN) and at the engine's log.")
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return EngineError(
            "stream_broken",
            f"The answer stream broke off: the engine sent nothing for {seconds:g} s.",
            "Ask again; look at the engine's log if it is hung. A question that waits behind long jobs "
            "needs a longer request timeout (the geovqa/request_timeout_s setting).")
    return EngineError(
        "stream_broken",
        f"The answer stream broke off: the connection to the engine dropped ({connection_words(exc)}) "
        "before the answer was complete.",
        "Ask again; if it breaks off again, look at the engine's log (it may have stopped or run out "
        "of memory) and at the network between this computer and the engine.")


class AskStream(WatchedSockets):
    """One streamed answer. ``events()`` yields event dicts; ``abort()`` cancels from any thread.

    When the upload was a cut of a raster with no georeferencing, the engine's result is in the
    cut's pixels: the result event then carries ``upload_pixel_offset`` ``[dx, dy]`` (added by
    the plugin, not the engine), and, when the cut was reduced to the engine's read budget,
    ``upload_pixel_scale`` ``[sx, sy]`` (source pixels per pixel sent), which
    :func:`tasks.place_result_files` applies to the copies of its files (source = offset + scale
    x result). A reduced upload adds ``upload_reduced`` ``{"sent": [w, h], "of": [W, H]}``. The event's inline ``anchors`` stay as the engine sent them.
    """

    def __init__(self, client: EngineClient, request: dict, upload_path: str | None = None, prepared=None):
        self.client = client
        self.request = request
        self.upload_path = upload_path
        self.prepared = prepared  # an upload.Upload made by the caller (kept after the answer)
        self.request_id = request.get("request_id")
        # called as on_upload_progress(bytes_sent, bytes_total) while a raster is uploaded
        # (from the worker thread; QgsTask.setProgress and Processing feedback accept that)
        self.on_upload_progress = None
        # called as on_prepare_progress(fraction) while the raster is converted or cut for the
        # upload (0..1; from the worker thread), before it is sent
        self.on_prepare_progress = None
        super().__init__()  # every socket of this answer (its own, its downloads'): abort() shuts them

    def download_file(self, name: str, dest: str) -> str:
        """:meth:`client.EngineClient.download_file` of one of this answer's files: :meth:`abort` ends
        it too (EngineError 'cancelled'), as it ends the answer."""
        if self._aborted:
            raise EngineError("cancelled", f"The download of {name} was stopped.")
        return self.client.download_file(name, dest, watcher=self)

    def events(self):
        """Yield the answer's events; an uploaded raster is converted and cut to the AOI first
        (here, so every caller does it in its worker thread; see :mod:`upload`)."""
        if self.prepared is not None:
            yield from self._upload_events(self.prepared)
            return
        if not self.upload_path:
            yield from self._events(None)
            return
        from .upload import upload_file

        try:
            # the engine's upload limit bounds the conversion (asked only when a file is written)
            with upload_file(self.upload_path, self.request.get("aoi"), cancelled=lambda: self._aborted,
                             progress=self._prepare_progress, max_bytes=self.client.upload_limit,
                             max_pixels=self.client.read_budget) as sent:
                yield from self._upload_events(sent)
        except EngineError:
            if not self._aborted:
                raise

    def _prepare_progress(self, fraction: float) -> None:
        if self.on_prepare_progress is not None:
            self.on_prepare_progress(fraction)

    def _upload_events(self, sent):
        self._check_upload_size(os.path.getsize(sent.path))
        offset = [sent.pixel_offset[0], sent.pixel_offset[1]]
        scale = [sent.pixel_scale[0], sent.pixel_scale[1]]
        for event in self._events(sent):
            if event.get("type") == "result":
                if offset != [0, 0]:
                    event = dict(event, upload_pixel_offset=offset)
                if scale != [1.0, 1.0]:
                    event = dict(event, upload_pixel_scale=scale)
                if sent.size is not None:  # reduced to what the engine reads: said under the answer
                    event = dict(event, upload_reduced={"sent": list(sent.size), "of": list(sent.source_size)})
            yield event

    def _check_upload_size(self, size: int) -> None:
        """Refuse a file over the engine's ``max_upload_bytes`` before sending it.

        The engine refuses it anyway, but only once the limit has been sent, and a refusal
        while we are still sending may look like a reset connection (docs/protocol.md asks
        clients to check first). No limit known (older engine, /health failed): just send.
        The limit is asked once per client (:meth:`client.EngineClient.upload_limit`): once per batch."""
        limit = self.client.upload_limit()
        if limit is not None and limit < size:
            raise EngineError(
                "upload_too_large",
                f"The raster to upload is {size_text(size)}; the engine at {self.client.base_url} accepts "
                f"uploads up to {size_text(limit)}.",
                "Ask about a smaller area of interest (or a clipped copy of the layer), or start that engine "
                "with a larger --max-upload-bytes.")

    def _events(self, sent):
        # The short timeout (client.TIMEOUT_S) bounds the connect, the question's sending and the wait
        # for the answer's first line: the engine checks the question and answers its headers
        # at once (the stream then starts with `queued`), so a port held by a program that never
        # answers is said in seconds. An upload is sent, and its answer's first line awaited,
        # with the request timeout: the engine writes it to its disk as it comes, and the last
        # megabytes may still be on a slow link when the send returns. The answer's body is read
        # with a timeout of four of the engine's heartbeats (read_timeout), or the request
        # timeout for an engine that sends none: a queued question may wait minutes for the GPU.
        timeout, stream_timeout = self.client.timeout, self.client.stream_timeout
        conn = self.client._connection(timeout, watcher=self)
        stage, doing = "connect", ""
        waited = timeout  # the timeout of the step that runs (said when it runs out)
        try:
            try:
                conn.connect()
                sock = conn.sock  # over https the TLS socket, not the one adopted in the connect
                if not self.adopt(sock):
                    return
                stage = "send"
                if sent is not None:
                    doing, waited = "sending the raster", stream_timeout
                    sock.settimeout(stream_timeout)
                    # and so it stays for the first line: sendall returns once the last bytes are
                    # in the socket buffers (megabytes), which a slow link delivers long after
                    self._send_multipart(conn, sent.path, sent.aoi)
                else:
                    body = json.dumps(self.request).encode("utf-8")
                    conn.request("POST", self.client.prefix + ASK_ENDPOINT, body=body, headers=self.client.headers())
                if self._aborted:
                    return
                stage, doing = "wait", ""
                resp = conn.getresponse()
                read_for = read_timeout(resp, timeout, stream_timeout)
                beats = read_for != stream_timeout  # the engine's heartbeats set it
                sock.settimeout(read_for)  # (conn.sock may be None now: the answer holds it)
            except (OSError, http.client.HTTPException) as exc:
                if self._aborted:
                    return
                raise self.client._unavailable(exc, failed_at(conn, stage), doing, waited) from exc
            if resp.status >= 400:
                raise error_from_body(resp.status, error_body(resp))
            if resp.status != 200:  # a redirect, an answer without the stream (204)
                raise not_the_answer(resp.status, resp.reason, resp.getheader("Location"), "the question",
                                     self.client.base_url)
            final_seen = False
            words = []  # the answer's pieces: a result that leaves its answer out gets them
            while not self._aborted:
                try:
                    line = resp.readline(MAX_EVENT_BYTES + 1)  # a line that never ends is not read whole
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    if self._aborted:
                        return
                    raise stream_broken(exc, read_for, heartbeats=beats) from exc
                if not line:
                    break
                if len(line) > MAX_EVENT_BYTES:
                    raise EngineError(
                        "bad_response",
                        f"The engine sent an event line longer than {size_text(MAX_EVENT_BYTES)} (the longest "
                        "answer, with its anchors, is a few megabytes), so it was not read.",
                        "Look at the engine's version and log: it does not speak this plugin's protocol "
                        "(or another program answers at the engine URL).")
                event = parse_event(line)
                if event is None:
                    continue
                event = self._own_event(event, words)
                yield event
                if event.get("type") in FINAL_EVENTS:
                    final_seen = True
                    break
            if not final_seen and not self._aborted:
                raise EngineError(
                    "stream_broken",
                    "The engine closed the answer stream before sending a result.",
                    "Look at the engine's log; it may have run out of memory.",
                )
        finally:
            conn.close()

    def _own_event(self, event: dict, words: list) -> dict:
        """``event`` as this question's: with its ``request_id`` (an engine that leaves it out
        would have its answer taken for a stale one's by the dock, and lost), and a ``result``
        without its ``answer`` with the ``words`` streamed before it. EngineError 'bad_response'
        for an event of another question (its request_id another's) mixed into this stream."""
        rid = event.get("request_id")
        if rid is None or self.request_id is None:
            event["request_id"] = self.request_id
        elif rid != self.request_id:
            raise EngineError(
                "bad_response",
                f"The engine sent an event of another question ({rid!r:.60}) in this question's answer.",
                "Ask again; if it happens again, look at the engine's version and log (or at a proxy "
                "between this computer and the engine).")
        if event.get("type") == "token":
            words.append(event.get("text", ""))
        elif event.get("type") == "result" and "answer" not in event:
            event["answer"] = "".join(words)
        return event

    def _send_multipart(self, conn, path: str, aoi) -> None:
        """POST /ask as multipart: a ``request`` JSON part (with ``aoi``, the AOI for the file)
        and the ``raster`` file at ``path``, streamed."""
        boundary = "geovqa-" + uuid.uuid4().hex
        req = dict(self.request, raster_path=None, aoi=aoi)
        name = os.path.basename(path) or "raster.tif"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"request\"\r\n"
                f"Content-Type: application/json\r\n\r\n{json.dumps(req)}\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"raster\"; filename=\"{name}\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode("utf-8")
        tail = f"\r\n--{boundary}--\r\n".encode("utf-8")
        size = os.path.getsize(path)
        conn.putrequest("POST", self.client.prefix + ASK_ENDPOINT)
        for k, v in self.client.headers(f"multipart/form-data; boundary={boundary}").items():
            conn.putheader(k, v)
        conn.putheader("Content-Length", str(len(head) + size + len(tail)))
        conn.endheaders()
        conn.send(head)
        sent = 0
        with open(path, "rb") as fh:
            while not self._aborted:
                chunk = fh.read(UPLOAD_CHUNK)
                if not chunk:
                    break
                conn.send(chunk)
                sent += len(chunk)
                if self.on_upload_progress is not None:
                    self.on_upload_progress(sent, size)
        if not self._aborted:
            conn.send(tail)
