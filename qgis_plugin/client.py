"""HTTP client for the GeoVQA engine protocol (``engine/protocol.py``), standard library only.

Blocking calls made to run inside a ``QgsTask`` or a Processing algorithm (worker threads):
no Qt objects are touched here. The answer of ``POST /ask`` is NDJSON; :meth:`AskStream.events`
yields one event dict per line as soon as the line arrives, and :meth:`AskStream.abort` (safe
to call from another thread) shuts its sockets down so a blocked read returns at once; a
connection still being made (a host that drops its packets) is given up at once too, and
otherwise after the short timeout (TIMEOUT_S), not the minutes the system waits
(:func:`open_socket`).

Why http.client rather than QNetworkReply: the same code serves the chat dock (in a QgsTask),
the batch task and the Processing algorithms (already in a worker thread, no event loop), and a
socket shutdown gives a prompt, reliable cancel.
It also connects straight to the engine: no proxy (neither QGIS's network settings nor an
``http_proxy`` of the environment) ever carries a call, so a loopback engine is reached as is.
A ``localhost`` URL is dialled at 127.0.0.1 (:func:`dial_host`), where a local engine listens:
Windows and macOS look ``localhost`` up as ::1 first, and Windows tries a refused ::1 for about
two seconds before 127.0.0.1, on every call (health polls too). The request's ``Host`` header
and the TLS server name stay ``localhost``, so a certificate made out for it still verifies.

An ``https://`` engine is reached with certificate checks on (:mod:`tls`: the system's trust
store, or the *CA certificate* setting's PEM file for a self-signed engine); a connection that
fails for a TLS reason gets an error saying which and what to do.
"""

from __future__ import annotations

import errno
import http.client
import ipaddress
import json
import os
import select
import socket
import threading
import time
import unicodedata
import urllib.parse
import uuid
from pathlib import Path

PROTOCOL_VERSION = 1
ASK_ENDPOINT = "/ask"
HEALTH_ENDPOINT = "/health"
BATCH_ENDPOINT = "/batch"
JOBS_ENDPOINT = "/jobs"
FILES_ENDPOINT = "/files"
FINAL_EVENTS = ("result", "error")
# heartbeat: nothing else happened for a while; the stream is alive
KNOWN_EVENTS = ("queued", "status", "token", "result", "error", "heartbeat")
MAX_QUESTION_CHARS = 2000
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# the address a connection to a loopback name is opened to: where an engine started for it
# listens (engine_process.served_host; the engine's own default host, engine/protocol.py)
LOOPBACK_NAMES = {"localhost": "127.0.0.1"}
DEFAULT_ENGINE_URL = "http://127.0.0.1:8765"
DEFAULT_PORT = 8765  # engine/protocol.py DEFAULT_PORT
UPLOAD_CHUNK = 1 << 20
# the short timeout, in seconds: /health and the other small calls, a connection being made
TIMEOUT_S = 10.0
# How a raster reaches the engine: "auto" uploads it when the engine's host is not this computer
# (by address); "upload" always (an SSH tunnel on 127.0.0.1 to an engine elsewhere, which cannot
# see our files); "path" never (an engine on another address that shares our file system).
SEND_RASTERS = ("auto", "upload", "path")


class EngineError(Exception):
    """A failure talking to the engine, with a message written for a person."""

    def __init__(self, code: str, message: str, hint: str | None = None, status: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint
        self.status = status

    def __str__(self) -> str:
        return self.message + (f" {self.hint}" if self.hint else "")


class EngineUnavailable(EngineError):
    """The engine cannot be reached (not started, wrong URL, or it crashed)."""


def new_request_id() -> str:
    return uuid.uuid4().hex


def question_too_long(question: str) -> str | None:
    """Why ``question`` (stripped, as it is sent) is longer than the engine takes
    (MAX_QUESTION_CHARS, engine/protocol.py), with what to do; None when it is not."""
    n = len(question.strip()) if isinstance(question, str) else 0
    if n <= MAX_QUESTION_CHARS:
        return None
    return (f"The question has {n} characters; the engine takes at most {MAX_QUESTION_CHARS}: "
            "shorten it.")


def questions_too_long(text: str) -> str | None:
    """:func:`question_too_long` of the first of a batch's questions (``text``: one a line, blank
    lines skipped) that is longer than the engine takes, naming it by its number and, when blank
    lines come before it, by the line it is on ("Question 3 (line 5) has ..."); None when none is."""
    questions = [(line, q) for line, q in enumerate(text.splitlines(), 1) if q.strip()]
    for number, (line, question) in enumerate(questions, 1):
        too_long = question_too_long(question)
        if too_long and len(questions) > 1:
            where = f"Question {number}" if line == number else f"Question {number} (line {line})"
            return too_long.replace("The question has", f"{where} has", 1)
        if too_long:
            return too_long
    return None


def build_ask_request(
    question: str,
    raster_path: str | None,
    *,
    aoi: dict | None = None,
    bands: list | None = None,
    strategy: str | None = "geollava",
    budget: int | None = None,
    tokens_per_tile: int | None = None,
    max_new_tokens: int = 256,
    seed: int | None = None,
    request_id: str | None = None,
    faithful_empty_slots: bool | None = False,
) -> dict:
    """The JSON body of ``POST /ask`` (protocol ASK_FIELDS), validated on the client side.
    ``strategy`` and ``faithful_empty_slots`` None are sent as null: the engine then uses the
    loaded adapter's training settings, else its defaults."""
    if not isinstance(question, str) or not question.strip():
        raise EngineError("empty_question", "Please type a question.")
    question = question.strip()
    too_long = question_too_long(question)
    if too_long:
        raise EngineError("question_too_long", too_long)
    return {
        "raster_path": raster_path,
        "question": question,
        "aoi": aoi,
        "bands": list(bands) if bands else None,
        "strategy": strategy,
        "budget": int(budget) if budget else None,
        "tokens_per_tile": int(tokens_per_tile) if tokens_per_tile else None,
        "max_new_tokens": int(max_new_tokens),
        "seed": seed,
        "request_id": request_id or new_request_id(),
        "faithful_empty_slots": None if faithful_empty_slots is None else bool(faithful_empty_slots),
    }


def engine_json(text: str, message: str):
    """``text`` from the engine read as JSON, or ``EngineError('bad_response')`` with ``message``,
    whose ``{why}`` says what is wrong: not JSON, or JSON nested deeper than Python can read (which
    ``json.loads`` raises as RecursionError, not ValueError: a broken or hostile remote engine).
    Every place the client reads the engine's JSON goes through here."""
    try:
        return json.loads(text)
    except RecursionError as exc:
        why, cause = "JSON nested too deeply to be read", exc
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        why, cause = "not JSON", exc
    raise EngineError("bad_response", message.replace("{why}", why)) from cause


def parse_event(line: bytes | str) -> dict | None:
    """One NDJSON line -> event dict (None for a blank keep-alive line)."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    line = line.strip()
    if not line:
        return None
    event = engine_json(line, "The engine sent a line that is {why}: " + repr(line[:120]))
    if not isinstance(event, dict) or "type" not in event:
        raise EngineError("bad_response", f"The engine sent an event without a type: {line[:120]!r}")
    return event


def error_from_body(status: int, body: bytes) -> EngineError:
    """Turn an HTTP error response (protocol error_body) into an EngineError."""
    try:  # a body that cannot be read says no more than its status
        err = engine_json(body.decode("utf-8", errors="replace"), "{why}").get("error") or {}
    except (EngineError, AttributeError):
        err = {}
    if not isinstance(err, dict):
        err = {}
    code = err.get("code") or ("unauthorized" if status == 401 else "internal")
    message = err.get("message") or f"The engine answered HTTP {status}."
    hint = err.get("hint")
    if status == 401 and not hint:
        hint = "Check the engine token in Settings > Options > GeoVQA."
    if code == "model_loading":
        return EngineUnavailable(code, message or "The engine is still loading the model.", hint, status)
    return EngineError(code, message, hint, status)


def error_body(resp: http.client.HTTPResponse) -> bytes:
    """The body of an HTTP error answer ``resp``, as much of it as came: one cut short (the
    connection reset while it was read: an engine dying, a proxy) is what arrived, and
    :func:`error_from_body` then says the status alone."""
    try:
        return resp.read()
    except http.client.IncompleteRead as exc:
        return exc.partial
    except (OSError, http.client.HTTPException):
        return b""


def host_port(host: str, port: int) -> str:
    """``host:port`` as a URL writes it (an IPv6 address in brackets: ``[::1]:8765``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def engine_address(url: str) -> tuple:
    """``(scheme, host, port, path_prefix)`` of an engine URL, or EngineError('bad_url').

    A URL without a port means the engine's default port (8765) on this computer, and 443 / 80
    elsewhere; *Start local engine* starts the engine on exactly this host and port.
    """
    text = (url or "").strip() or DEFAULT_ENGINE_URL
    parsed = urllib.parse.urlsplit(text)
    if parsed.scheme not in ("http", "https"):
        raise EngineError("bad_url", f"The engine URL must start with http:// or https:// (got {url!r}).")
    host = parsed.hostname
    if not host:
        raise EngineError("bad_url", f"The engine URL {url!r} names no host; e.g. {DEFAULT_ENGINE_URL}.")
    if any(ch.isspace() for ch in parsed.netloc):  # "127.0.0.1 :8765": no host has a space
        raise EngineError("bad_url", f"The engine URL {url!r} has a space in its host or port; "
                          f"e.g. {DEFAULT_ENGINE_URL}.")
    try:
        port = parsed.port
        if port == 0:  # urllib takes it; nothing listens there
            raise ValueError(port)
    except ValueError:
        raise EngineError("bad_url", f"The engine URL {url!r} has an invalid port; ports are 1 to 65535, "
                          f"e.g. {DEFAULT_ENGINE_URL}.") from None
    if port is None:
        port = DEFAULT_PORT if host in LOOPBACK_HOSTS else (443 if parsed.scheme == "https" else 80)
    return parsed.scheme, host, port, parsed.path.rstrip("/")


ENDPOINT_NAMES = tuple(e.strip("/") for e in (HEALTH_ENDPOINT, ASK_ENDPOINT, BATCH_ENDPOINT, JOBS_ENDPOINT,
                                               FILES_ENDPOINT))


def endpoint_in_url(url: str) -> str:
    """The engine URL ``url`` without an endpoint its path ends in (``.../health``, ``.../ask``,
    ``.../jobs/ID``: pasted from a test with curl), when it ends in one; '' when it does not (or
    cannot be read). Every call appends its endpoint to the URL, so such a URL reaches none."""
    try:
        _scheme, _host, _port, prefix = engine_address(url)
    except EngineError:
        return ""
    parts = [p for p in prefix.split("/") if p]
    for i, part in enumerate(parts):
        if part.lower() in ENDPOINT_NAMES and (i == len(parts) - 1 or part.lower() in ("jobs", "files")):
            parsed = urllib.parse.urlsplit(url.strip())
            base = "/".join([""] + parts[:i])
            return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, base, "", ""))
    return ""


def size_text(n: int) -> str:
    """A byte count for a person: bytes below 1 MiB, else MiB / GiB (of 2^20 / 2^30 bytes) with one
    decimal, as the engine says sizes. Every size the plugin says about an upload uses it
    (:mod:`upload` too), so the engine's 2 GiB limit reads "2.0 GiB" everywhere."""
    if n < 1 << 20:
        return f"{n} bytes"
    if n < 1 << 30:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / (1 << 30):.1f} GiB"


def _positive_int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def health_read_budget(health) -> int | None:
    """The engine's ``max_read_pixels`` in its ``/health`` answer ``health`` (a dict, or None when
    none came): the most pixels it reads of any raster window. None when it does not say (an
    older engine) or no answer is known."""
    return _positive_int(health.get("max_read_pixels")) if isinstance(health, dict) else None


def clean_token(token: str) -> str:
    """The token without the spaces and invisible characters a copy and paste brings along.

    Raises EngineError('unauthorized') when what is left cannot be sent in an HTTP header
    (engine tokens are plain ASCII)."""
    kept = "".join(ch for ch in (token or "")
                   if not ch.isspace() and unicodedata.category(ch) not in ("Cf", "Zs", "Cc"))
    if kept and not (kept.isascii() and kept.isprintable()):
        raise EngineError("unauthorized", "The engine token holds characters that no engine token has.",
                          "Copy it again from the engine's token file (~/.config/geovqa/token) "
                          "into Settings > Options > GeoVQA.")
    return kept


def is_own_host(host: str, own_addresses=()) -> bool:
    """True when ``host`` (an engine URL's host) is this computer: a loopback name or address, or
    an IP address among ``own_addresses`` (this computer's interface addresses, e.g. its LAN
    address 192.168.1.20 for an engine serving on 0.0.0.0).

    Host names other than ``localhost`` are never looked up: a lookup may take seconds (this is
    decided when the client is made, on the user-interface thread), and the connection looks the
    name up again, so a name that answered with our address may reach another computer, which
    must never get this computer's engine token. Such a URL counts as another computer."""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a host name
        return False
    if address.is_loopback:  # 127.0.0.2, 127.1.2.3: this computer too
        return True
    if address.is_unspecified or address.is_multicast:
        return False
    own = set()
    for text in own_addresses or ():
        try:
            own.add(ipaddress.ip_address(str(text)))
        except ValueError:
            continue
    return address in own


def dial_host(host: str) -> str:
    """The address a connection to an engine URL's ``host`` is opened to: 127.0.0.1 for
    ``localhost``, which Windows and macOS resolve to ::1 first, where no local engine listens
    (Windows then waits about two seconds before trying 127.0.0.1); any other host as it is."""
    return LOOPBACK_NAMES.get(host, host)


def dialled(conn: http.client.HTTPConnection, watcher=None) -> http.client.HTTPConnection:
    """``conn`` (not opened yet) with its socket made by :func:`open_socket` at
    :func:`dial_host` of its host (``localhost``: 127.0.0.1), which it still names in the
    ``Host`` header and, over https, as the TLS server name (the name the certificate is checked
    against); ``watcher`` (an :class:`AskStream`, or None) gets the socket before it connects."""
    address = dial_host(conn.host)

    def connect(host_port, timeout=None, source_address=None):
        return open_socket((address, host_port[1]), timeout, source_address, watcher)

    conn._create_connection = connect  # http.client's hook (socket.create_connection)
    return conn


def open_socket(address: tuple, timeout: float | None, source_address=None, watcher=None) -> socket.socket:
    """A TCP socket connected to ``address`` (host, port), as ``socket.create_connection`` makes
    it, but with a connect that Stop can end: each socket is handed to ``watcher`` (an
    :class:`AskStream`, or None) before it connects, and the connect waits in slices of
    CONNECT_SLICE_S, giving up at once when ``watcher.aborted`` is set (``abort()`` also shuts the
    socket down). A host that drops the connection's packets (a firewall, a hung program whose
    queue is full) is given up after ``timeout`` seconds, not the minutes the system waits.
    Raises OSError (ConnectionAbortedError when aborted, TimeoutError, ...)."""
    host, port = address
    error = None
    for family, kind, proto, _name, where in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            if watcher is not None and not watcher.adopt(sock):
                raise ConnectionAbortedError("stopped before the connection was made")
            if source_address:
                sock.bind(source_address)
            _connect_watched(sock, where, timeout, watcher)
            sock.settimeout(timeout)
            return sock
        except OSError as exc:
            sock.close()
            if watcher is not None and watcher.aborted:
                raise ConnectionAbortedError("stopped while the connection was being made") from None
            error = exc
    raise error or OSError(f"no address found for {host}")


CONNECT_SLICE_S = 0.2  # how often a connect in progress looks whether it was stopped
_CONNECTING = {errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY, 10035}  # 10035: WSAEWOULDBLOCK


def _connect_watched(sock: socket.socket, where, timeout: float | None, watcher) -> None:
    sock.setblocking(False)
    code = sock.connect_ex(where)
    if code in (0, errno.EISCONN):
        return
    if code not in _CONNECTING:
        raise OSError(code, os.strerror(code))
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if watcher is not None and watcher.aborted:
            raise ConnectionAbortedError("stopped while the connection was being made")
        left = CONNECT_SLICE_S if deadline is None else min(CONNECT_SLICE_S, deadline - time.monotonic())
        if left <= 0:
            raise TimeoutError(f"no answer to the connection within {timeout:g} s")
        _, writable, failed = select.select([], [sock], [sock], left)
        if writable or failed:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, os.strerror(code))
            return


class _WatchedHTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection whose TLS socket is handed to ``watcher`` (an :class:`AskStream`, or
    None) before its handshake: wrapping the TCP socket detaches the one :func:`open_socket`
    handed over, so Stop could not end a handshake an engine (a hung program, a proxy) never
    answers; it waited the short timeout."""

    watcher = None

    def connect(self):
        http.client.HTTPConnection.connect(self)  # TCP, through open_socket
        sock = self._context.wrap_socket(self.sock, server_hostname=self.host, do_handshake_on_connect=False)
        self.sock = sock
        if self.watcher is not None and not self.watcher.adopt(sock):
            raise ConnectionAbortedError("stopped before the TLS handshake")
        sock.do_handshake()


class EngineClient:
    """Talks to one engine at ``base_url`` with a bearer ``token``."""

    def __init__(self, base_url: str, token: str = "", timeout: float | None = None, stream_timeout: float = 900.0,
                 send_rasters: str = "auto", ca_file: str = "", own_addresses=()):
        self.scheme, self.host, self.port, self.prefix = engine_address(base_url)
        # this computer's interface addresses (settings.this_computer_addresses): an engine URL
        # naming one of them is on this computer too; decided once, here (see is_local)
        self.is_local = is_own_host(self.host, own_addresses)
        self.ca_file = ca_file or ""  # PEM file trusted for an https engine ('': the system's store)
        self._ssl_context = None  # made at the first https connection (tls.context)
        self.send_rasters = send_rasters if send_rasters in SEND_RASTERS else "auto"
        self.base_url = (base_url.strip() or DEFAULT_ENGINE_URL).rstrip("/")
        try:
            self.token, self.token_error = clean_token(token), None
        except EngineError as exc:  # /health needs no token: report it when a call needs one
            self.token, self.token_error = "", exc
        self.timeout = TIMEOUT_S if timeout is None else timeout
        self.stream_timeout = stream_timeout
        # (max_upload_bytes or None, max_read_pixels or None) once /health answered: see upload_limit
        self._upload_limit = None
        # set by settings.make_client: asked when a connection is refused (a batch's client lives
        # long, the engine may have stopped meanwhile), true while an engine started from this
        # QGIS runs to answer at this URL: then it is still loading its model (see _unavailable)
        self.local_engine_loading = lambda: False

    # -- plumbing ---------------------------------------------------------------------------
    def _connection(self, timeout: float, watcher=None) -> http.client.HTTPConnection:
        """A connection to the engine, not opened yet (a ``localhost`` URL: to 127.0.0.1, see
        :func:`dial_host`). Its socket is made by :func:`open_socket`: ``watcher`` (an
        :class:`AskStream`) gets it before it connects, so Stop reaches a connect in progress."""
        if self.scheme == "https":
            conn = _WatchedHTTPSConnection(self.host, self.port, timeout=timeout, context=self.ssl_context())
            conn.watcher = watcher
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        return dialled(conn, watcher)

    def ssl_context(self):
        """The TLS context of https connections (:func:`tls.context`); EngineError('tls_ca_file')
        when the CA certificate setting names a file that cannot be used."""
        if self._ssl_context is None:
            from .tls import context

            self._ssl_context = context(self.ca_file)
        return self._ssl_context

    def headers(self, content_type: str | None = "application/json", auth: bool = True) -> dict:
        h = {"Accept": "application/json, application/x-ndjson"}
        if content_type:
            h["Content-Type"] = content_type
        if auth and self.token_error is not None:
            raise self.token_error
        if auth and not self.token and (not self.is_local or self.send_rasters == "upload"):
            # settings.resolved_token never reads this computer's engine token for another host,
            # nor for "always upload" (an SSH tunnel on 127.0.0.1 to another computer's engine)
            where = ("is on another computer" if not self.is_local else
                     "gets uploads (Send rasters: always upload, as through an SSH tunnel to another "
                     "computer)")
            raise EngineError("unauthorized", f"The engine at {self.base_url} {where} and "
                              "needs its own token.",
                              "Type the remote engine's token (from its token file, ~/.config/geovqa/token on "
                              "that computer) in Settings > Options > GeoVQA > Engine token.")
        if auth and self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    def _unavailable(self, exc: Exception, stage: str = "connect", doing: str = "",
                     seconds: float | None = None) -> EngineError:
        """The error for a call that failed with ``exc`` at ``stage``, said for what went wrong:

        * TLS the reason (certificate not trusted, another host's, http/https mismatch):
          what :func:`tls.explain` says;
        * ``"connect"`` (no connection: refused, no route, a name not found, no answer to the
          connection): EngineUnavailable 'engine_down', "not reachable ... start it";
        * a timeout once connected (``seconds``, default the short timeout): EngineUnavailable
          'no_answer', "accepted the connection but did not answer" (an engine busy or hung,
          another program holding the port);
        * an answer that is not HTTP while the answer's first line is awaited (``"wait"``: an
          SSH server, a program speaking its own protocol): EngineUnavailable 'not_an_engine';
        * anything else once connected (``"send"``, ``"wait"``, ``"receive"``: the connection
          reset or closed mid-way): EngineError 'stream_broken', "broke off while ``doing``; ask
          again" (``doing``: "sending the question", ...).

        A connection whose TLS handshake failed without a TLS reason was made: it counts as
        ``"wait"`` (callers pass ``"connect"`` only until the socket is connected)."""
        from .tls import explain

        explained = explain(self, exc)
        if explained is not None:
            return explained
        if stage == "connect":
            return self._not_reachable(exc)
        if isinstance(exc, (socket.timeout, TimeoutError)):
            return EngineUnavailable(
                "no_answer",
                f"The engine at {self.base_url} accepted the connection but did not answer within "
                f"{self.timeout if seconds is None else seconds:g} s.",
                "The engine may be busy or hung (look at its log; restart it if it is hung), or another program "
                "holds that port: check the engine URL (host and port) in Settings > Options > GeoVQA.")
        if stage == "wait" and isinstance(exc, http.client.HTTPException) and not isinstance(
                exc, (http.client.RemoteDisconnected, http.client.IncompleteRead)):
            return EngineUnavailable(
                "not_an_engine",
                f"Something else answers at {self.base_url}: not a GeoVQA engine (its answer is not HTTP: "
                f"{exc.__class__.__name__}).",
                "Check the engine URL (host and port) in Settings > Options > GeoVQA: another program may "
                "use that port.")
        doing = doing or {"send": "sending the question", "wait": "waiting for the answer"}.get(
            stage, "receiving the answer")
        return EngineError(
            "stream_broken",
            f"The connection to the engine at {self.base_url} broke off while {doing} "
            f"({_connection_words(exc)}).",
            "Ask again; if it breaks off again, look at the engine's log (it may have stopped or "
            "restarted) and at the network between this computer and the engine.")

    def _not_reachable(self, exc: Exception) -> EngineUnavailable:
        """'engine_down': no connection could be made (see :meth:`_unavailable`)."""
        if self.local_engine_loading():  # never tell the user to start what is starting
            return EngineUnavailable(
                "engine_down",
                "The local engine started from QGIS is still loading the model (nothing answers at "
                f"{self.base_url} yet).",
                "Ask again when the status line of the GeoVQA dock says it is ready.",
            )
        return EngineUnavailable(
            "engine_down",
            f"The GeoVQA engine is not reachable at {self.base_url} ({exc.__class__.__name__}: {exc}).",
            "Start it with Plugins > GeoVQA > Start local engine (or start the engine on the GPU "
            "machine it runs on), and check the engine URL in Settings > Options > GeoVQA.",
        )

    def _connect(self, conn: http.client.HTTPConnection) -> None:
        """Open ``conn``; a failure is the :meth:`_unavailable` error of its stage ("connect", or
        "wait" when the socket connected and the TLS handshake failed)."""
        try:
            conn.connect()
        except (OSError, http.client.HTTPException) as exc:
            raise self._unavailable(exc, "connect" if conn.sock is None else "wait") from exc

    def request_json(self, method: str, path: str, body: dict | None = None, timeout: float | None = None,
                     auth: bool = True):
        data = json.dumps(body).encode("utf-8") if body is not None else None
        headers = self.headers("application/json" if data else None, auth=auth)
        conn = self._connection(timeout or self.timeout)
        stage = "send"
        try:
            self._connect(conn)
            conn.request(method, self.prefix + path, body=data, headers=headers)
            stage = "wait"
            resp = conn.getresponse()
            stage = "receive"
            payload = error_body(resp) if resp.status >= 400 else resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise self._unavailable(exc, stage, seconds=timeout or self.timeout) from exc
        finally:
            conn.close()
        if resp.status >= 400:
            raise error_from_body(resp.status, payload)
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EngineError("bad_response", f"The engine answered {path} with something that is not JSON.") from exc
        return engine_json(text, f"The engine answered {path} with something that is {{why}}.")

    @property
    def uploads(self) -> bool:
        """True when rasters are sent as uploads rather than paths (see SEND_RASTERS)."""
        if self.send_rasters == "auto":
            return not self.is_local
        return self.send_rasters == "upload"

    # -- endpoints --------------------------------------------------------------------------
    def health(self) -> dict:
        """``GET /health`` (no token needed): the engine's HEALTH_FIELDS. Raises
        EngineUnavailable('not_an_engine') when the answer is not a GeoVQA engine's (a JSON object
        with a ``protocol`` field; an answer that is not JSON, a web server's page): another
        program answering on the engine's address."""
        try:
            health = self.request_json("GET", HEALTH_ENDPOINT, auth=False)
        except EngineError as exc:
            if exc.code == "bad_response" and isinstance(exc.__cause__, ValueError):  # not JSON at all
                raise self._not_an_engine("is not JSON") from None
            if exc.status != 404:
                raise
            raise EngineError(
                exc.code, f"Nothing answers {self.base_url}{HEALTH_ENDPOINT} ({exc.message.rstrip('.')}).",
                f"Check the path in the engine URL (Settings > Options > GeoVQA): it is the engine's base "
                f"URL, such as {self.scheme}://{host_port(self.host, self.port)}, without /health or another endpoint.",
                exc.status) from None
        if not isinstance(health, dict) or "protocol" not in health:
            raise self._not_an_engine("is not a GeoVQA engine's")
        return health

    def _not_an_engine(self, why: str) -> EngineUnavailable:
        return EngineUnavailable(
            "not_an_engine",
            f"The program answering at {self.base_url} is not a GeoVQA engine (its {HEALTH_ENDPOINT} "
            f"answer {why}).",
            "Check the engine URL (host and port) in Settings > Options > GeoVQA: another program may "
            "use that port.")

    def upload_limit(self) -> int | None:
        """The engine's ``max_upload_bytes`` (``/health``), or None when no limit is known (an
        older engine; ``/health`` failed, in which case the next call asks again). An engine that
        cannot be reached raises its EngineUnavailable here: a raster is only converted or cut for
        an upload after this is asked, and that work (minutes for a large one) is for nothing
        when nothing can be sent.

        Asked once per client: :func:`settings.make_client` makes one client per question in the
        dock and one per batch (batch dialog, Processing), so a batch asks once, not once a
        question, and every single question still asks at the moment it is sent."""
        return self._upload_limits()[0]

    def read_budget(self) -> int | None:
        """The engine's ``max_read_pixels`` (``/health``): the most pixels it reads of any raster
        window; an upload of a larger window is reduced to it (:mod:`upload`). None when not
        known (an engine without the field: the window is sent at full resolution). Asked with
        :meth:`upload_limit`, from the same ``/health`` answer."""
        return self._upload_limits()[1]

    def _upload_limits(self) -> tuple:
        if self._upload_limit is None:
            try:
                health = self.health()
            except EngineUnavailable as exc:
                if exc.code != "model_loading":
                    raise
                return None, None
            except EngineError:
                return None, None
            if not isinstance(health, dict):
                health = {}
            self._upload_limit = (_positive_int(health.get("max_upload_bytes")), health_read_budget(health))
        return self._upload_limit

    def ask(self, request: dict, upload: bool | None = None, prepared=None) -> "AskStream":
        """Start ``POST /ask``; iterate ``.events()`` for the streamed events.

        ``upload`` (default: :attr:`uploads`, from the *Send rasters* setting) sends the raster
        file as a multipart upload instead of its path, cut to the request's AOI (see
        :mod:`upload`). ``prepared``: an :class:`upload.Upload` already made for the request's
        raster and AOI (a batch asks several questions about one), sent as it is and not deleted.
        """
        if prepared is not None:
            return AskStream(self, request, prepared=prepared)
        if upload is None:
            upload = self.uploads
        return AskStream(self, request, upload_path=request.get("raster_path") if upload else None)

    def submit_batch(self, body: dict) -> str:
        return self.request_json("POST", BATCH_ENDPOINT, body)["job_id"]

    def job(self, job_id: str) -> dict:
        return self.request_json("GET", f"{JOBS_ENDPOINT}/{urllib.parse.quote(job_id)}")

    def cancel_job(self, job_id: str) -> dict:
        return self.request_json("DELETE", f"{JOBS_ENDPOINT}/{urllib.parse.quote(job_id)}")

    def job_results(self, job_id: str) -> list:
        return self.request_json("GET", f"{JOBS_ENDPOINT}/{urllib.parse.quote(job_id)}/results")["results"]

    def download_file(self, name: str, dest: str, watcher=None) -> str:
        """GET /files/{name} into ``dest`` (for an engine on another host).

        The file comes at once or in a steady flow: the short timeout (TIMEOUT_S) bounds the
        connect and each wait for its next bytes, so a stalled download fails in seconds.
        ``watcher``: the :class:`AskStream` the file belongs to, which gets the connection's
        sockets, so its ``abort()`` (Stop, Cancel) ends the download at once; EngineError
        'cancelled' then."""
        conn = self._connection(self.timeout, watcher=watcher)
        stage = "connect"
        try:
            conn.connect()
            stage = "send"
            if watcher is not None and not watcher.adopt(conn.sock):  # over https: the TLS socket
                raise ConnectionAbortedError("stopped")
            conn.request("GET", f"{self.prefix}{FILES_ENDPOINT}/{urllib.parse.quote(name)}", headers=self.headers(None))
            stage = "wait"
            resp = conn.getresponse()
            stage = "receive"
            if resp.status >= 400:
                raise error_from_body(resp.status, error_body(resp))
            fh = _open_local(dest)  # a local folder that cannot be written is not the engine's fault
            try:
                with fh:
                    while True:
                        chunk = resp.read(1 << 16)  # an OSError here is the connection's...
                        if not chunk:
                            break
                        _write_local(fh, chunk, dest)  # ...and one here the disk's (LocalFileError)
            except BaseException:
                Path(dest).unlink(missing_ok=True)  # no half-written file left behind
                raise
        except LocalFileError as exc:
            raise OSError(exc.errno, f"{exc.strerror or exc} ({dest})") from None
        except (OSError, http.client.HTTPException) as exc:
            if watcher is not None and watcher.aborted:
                raise EngineError("cancelled", f"The download of {name} was stopped.") from None
            if stage == "connect" and conn.sock is not None:  # connected; the TLS handshake failed
                stage = "wait"
            raise self._unavailable(exc, stage, doing=f"downloading {name}") from exc
        finally:
            conn.close()
        return dest


HEARTBEAT_HEADER = "X-Heartbeat-S"  # engine/protocol.py HEARTBEAT_HEADER
STALL_HEARTBEATS = 4  # heartbeats missed in a row that make a silent answer stream a broken one


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
        f"The answer stream broke off: the connection to the engine dropped ({_connection_words(exc)}) "
        "before the answer was complete.",
        "Ask again; if it breaks off again, look at the engine's log (it may have stopped or run out "
        "of memory) and at the network between this computer and the engine.")


def _connection_words(exc: Exception) -> str:
    """How a connection ended, in words: "the engine closed it", "reset" ..., for
    :meth:`EngineClient._unavailable` (not the exception's repr, "IncompleteRead(0 bytes read)")."""
    if isinstance(exc, http.client.IncompleteRead):
        return "it was closed before the answer was complete"
    if isinstance(exc, (http.client.RemoteDisconnected, ConnectionAbortedError)):
        return "it was closed"
    if isinstance(exc, ConnectionResetError):
        return "it was reset"
    if isinstance(exc, BrokenPipeError):
        return "the engine stopped reading"
    return getattr(exc, "strerror", None) or exc.__class__.__name__


class LocalFileError(OSError):
    """Writing a downloaded file on this computer failed (its folder, its disk)."""


def _open_local(dest: str):
    try:
        return open(dest, "wb")
    except OSError as exc:
        raise LocalFileError(exc.errno, exc.strerror) from None


def _write_local(fh, chunk: bytes, dest: str) -> None:
    try:
        fh.write(chunk)
    except OSError as exc:
        raise LocalFileError(exc.errno, exc.strerror) from None


class AskStream:
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
        self._sockets = []  # every socket of this answer (its own, its downloads'): abort() shuts them
        self._lock = threading.Lock()
        self._aborted = False

    def abort(self) -> None:
        """Stop the answer from any thread: every socket it opened is shut down, so a blocked
        connect, send or read returns at once (a connect still in progress also looks at the flag)."""
        with self._lock:
            self._aborted = True
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # not connected yet, or closed already
                pass

    def adopt(self, sock) -> bool:
        """Take ``sock`` into the sockets :meth:`abort` shuts down (False, and not taken, when
        the answer was stopped already)."""
        with self._lock:
            if self._aborted:
                return False
            self._sockets.append(sock)
            return True

    @property
    def aborted(self) -> bool:
        return self._aborted

    def download_file(self, name: str, dest: str) -> str:
        """:meth:`EngineClient.download_file` of one of this answer's files: :meth:`abort` ends
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
        The limit is asked once per client (:meth:`EngineClient.upload_limit`): once per batch."""
        limit = self.client.upload_limit()
        if limit is not None and limit < size:
            raise EngineError(
                "upload_too_large",
                f"The raster to upload is {size_text(size)}; the engine at {self.client.base_url} accepts "
                f"uploads up to {size_text(limit)}.",
                "Ask about a smaller area of interest (or a clipped copy of the layer), or start that engine "
                "with a larger --max-upload-bytes.")

    def _events(self, sent):
        # The short timeout (TIMEOUT_S) bounds the connect, the question's sending and the wait
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
                if stage == "connect" and conn.sock is not None:  # connected; the TLS handshake failed
                    stage = "wait"
                raise self.client._unavailable(exc, stage, doing, waited) from exc
            if resp.status >= 400:
                raise error_from_body(resp.status, error_body(resp))
            final_seen = False
            while not self._aborted:
                try:
                    line = resp.readline()
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    if self._aborted:
                        return
                    raise stream_broken(exc, read_for, heartbeats=beats) from exc
                if not line:
                    break
                event = parse_event(line)
                if event is None:
                    continue
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
