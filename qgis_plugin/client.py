"""HTTP client for the GeoVQA engine protocol (``engine/protocol.py``), standard library only:
:class:`EngineClient`, one engine's calls (``/health``, ``/ask``, batch jobs, ``/files``
downloads) and the error each failure is said with.

Blocking calls made to run inside a ``QgsTask`` or a Processing algorithm (worker threads):
no Qt objects are touched here. The answer of ``POST /ask`` is streamed by
:class:`ask_stream.AskStream`; connections are made by :mod:`dialling` (Stop-able connects,
``localhost`` dialled at 127.0.0.1, see :mod:`addresses`); the errors and the protocol's terms
live in :mod:`engine_errors` and :mod:`engine_protocol`.

Why http.client rather than QNetworkReply: the same code serves the chat dock (in a QgsTask),
the batch task and the Processing algorithms (already in a worker thread, no event loop), and a
socket shutdown gives a prompt, reliable cancel.
It also connects straight to the engine: no proxy (neither QGIS's network settings nor an
``http_proxy`` of the environment) ever carries a call, so a loopback engine is reached as is.

An ``https://`` engine is reached with certificate checks on (:mod:`tls`: the system's trust
store, or the *CA certificate* setting's PEM file for a self-signed engine); a connection that
fails for a TLS reason gets an error saying which and what to do.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import unicodedata
import urllib.parse
from pathlib import Path

from .addresses import DEFAULT_ENGINE_URL, engine_address, host_port, is_own_host
from .ask_stream import AskStream
from .dialling import CallWatcher, WatchedHTTPSConnection, dialled, failed_at
from .engine_errors import (EngineError, EngineUnavailable, connection_words, engine_json, error_body,
                            error_from_body, not_the_answer, size_text)
from .engine_protocol import BATCH_ENDPOINT, FILES_ENDPOINT, HEALTH_ENDPOINT, JOBS_ENDPOINT, protocol_error

# the most bytes of a JSON answer read (/health, /jobs: a batch's 10,000 results are a few
# megabytes): one that never ends (a hostile or broken engine) must not fill the memory
MAX_JSON_BYTES = 64 << 20
# the short timeout, in seconds: /health and the other small calls (each as a whole, from its
# connect to the last byte of its answer), a connection being made
TIMEOUT_S = 10.0
# How a raster reaches the engine: "auto" uploads it when the engine's host is not this computer
# (by address); "upload" always (an SSH tunnel on 127.0.0.1 to an engine elsewhere, which cannot
# see our files); "path" never (an engine on another address that shares our file system).
SEND_RASTERS = ("auto", "upload", "path")


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
        self._calls = set()  # the CallWatchers of the short calls under way (abort_calls stops them)
        self._calls_lock = threading.Lock()
        self._protocol_checked = False  # a /health answer of this client reported our protocol
        # set by settings.make_client: asked when a connection is refused (a batch's client lives
        # long, the engine may have stopped meanwhile), true while an engine started from this
        # QGIS runs to answer at this URL: then it is still loading its model (see _unavailable)
        self.local_engine_loading = lambda: False

    # -- plumbing ---------------------------------------------------------------------------
    def _connection(self, timeout: float, watcher=None) -> http.client.HTTPConnection:
        """A connection to the engine, not opened yet (a ``localhost`` URL: to 127.0.0.1, see
        :func:`addresses.dial_host`). Its socket is made by :func:`dialling.open_socket`:
        ``watcher`` (an :class:`ask_stream.AskStream`) gets it before it connects, so Stop reaches
        a connect in progress."""
        if self.scheme == "https":
            conn = WatchedHTTPSConnection(self.host, self.port, timeout=timeout, context=self.ssl_context())
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
        ``"wait"``: callers pass the stage through :func:`dialling.failed_at`, which says so."""
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
            f"({connection_words(exc)}).",
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
            raise self._unavailable(exc, failed_at(conn, "connect")) from exc

    def request_json(self, method: str, path: str, body: dict | None = None, timeout: float | None = None,
                     auth: bool = True):
        """``method path`` with the JSON ``body``, its JSON answer. ``timeout`` (default: the short
        timeout) bounds the whole call, from the connect to the answer's last byte, not only each
        read (a server trickling a byte every few seconds is given up then, 'no_answer');
        :meth:`abort_calls` stops it from another thread (EngineError 'cancelled')."""
        data = json.dumps(body).encode("utf-8") if body is not None else None
        headers = self.headers("application/json" if data else None, auth=auth)
        seconds = timeout or self.timeout
        call = CallWatcher(seconds)
        with self._calls_lock:
            self._calls.add(call)
        conn = self._connection(seconds, watcher=call)
        stage, connected = "send", False
        try:
            try:
                self._connect(conn)
            except EngineError:
                if call.aborted:  # out of time (or stopped) while connecting, or in a TLS handshake once connected
                    raise self._stopped(call, failed_at(conn, "connect") == "wait", seconds, path) from None
                raise
            connected = True
            try:
                if not call.adopt(conn.sock):  # over https the TLS socket, not the one adopted in the connect
                    raise ConnectionAbortedError("stopped")
                conn.request(method, self.prefix + path, body=data, headers=headers)
                stage = "wait"
                resp = conn.getresponse()
                stage = "receive"
                payload = error_body(resp) if resp.status >= 400 else resp.read(MAX_JSON_BYTES + 1)
            except (OSError, http.client.HTTPException) as exc:
                if call.aborted:  # out of time or stopped: no TLS probe of what answered (tls.explain)
                    raise self._stopped(call, connected, seconds, path) from None
                raise self._unavailable(exc, failed_at(conn, stage), seconds=seconds) from exc
            if call.aborted:  # an error body cut short by the deadline or a stop
                raise self._stopped(call, connected, seconds, path)
        finally:
            call.done()
            with self._calls_lock:
                self._calls.discard(call)
            conn.close()
        if resp.status >= 400:
            raise error_from_body(resp.status, payload)
        if 300 <= resp.status < 400:
            raise not_the_answer(resp.status, resp.reason, resp.getheader("Location"), path, self.base_url)
        if len(payload) > MAX_JSON_BYTES:  # an answer that never ends is not read whole
            raise EngineError("bad_response", f"The engine answered {path} with more than "
                              f"{size_text(MAX_JSON_BYTES)}, which no answer of the engine is.",
                              "Check the engine URL (host and port) in Settings > Options > GeoVQA: another "
                              "program may answer there.")
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EngineError("bad_response", f"The engine answered {path} with something that is not JSON.") from exc
        return engine_json(text, f"The engine answered {path} with something that is {{why}}.")

    def _stopped(self, call: CallWatcher, connected: bool, seconds: float, path: str) -> EngineError:
        """The error of a short call that ``call`` ended: its deadline passed before a connection
        was made ('engine_down') or before the answer came whole within ``seconds``
        ('no_answer'), or :meth:`abort_calls` stopped it ('cancelled')."""
        if not call.expired:
            return EngineError("cancelled", f"The call to {self.base_url}{path} was stopped.")
        if not connected:
            return self._not_reachable(TimeoutError(f"no answer to the connection within {seconds:g} s"))
        return self._unavailable(TimeoutError(), "wait", seconds=seconds)

    def abort_calls(self) -> None:
        """Stop this client's short calls under way (:meth:`request_json`: ``/health``, the jobs of
        a batch) from any thread: each raises EngineError 'cancelled' at once."""
        with self._calls_lock:
            calls = list(self._calls)
        for call in calls:
            call.abort()

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
        program answering on the engine's address; EngineUnavailable('wrong_protocol') when its
        ``protocol`` is not this plugin's (:func:`engine_protocol.protocol_error`)."""
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
        wrong = protocol_error(health, self.base_url)
        if wrong is not None:
            raise wrong
        self._protocol_checked = True
        return health

    def check_protocol(self) -> None:
        """Raise EngineUnavailable('wrong_protocol') when the engine speaks another protocol than
        this plugin (asked once per client, with ``/health``, unless an answer of it is known:
        :meth:`upload_limit` asked it). Any other failure of ``/health`` is left to the call
        that follows, which says its own; the batch task and Processing ask this before their
        questions, the chat dock reads it from its status check."""
        if self._protocol_checked:
            return
        try:
            self.health()
        except EngineError as exc:
            if exc.code == "wrong_protocol":
                raise

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
            except EngineError as exc:
                if exc.code == "cancelled":  # stopped (abort_calls): not 'no limit known', and
                    raise  # the question stops here instead of asking /health again, for 10 s
                return None, None
            if not isinstance(health, dict):
                health = {}
            self._upload_limit = (_positive_int(health.get("max_upload_bytes")), health_read_budget(health))
        return self._upload_limit

    def ask(self, request: dict, upload: bool | None = None, prepared=None) -> AskStream:
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
        return _field(self.request_json("POST", BATCH_ENDPOINT, body), "job_id", str, BATCH_ENDPOINT)

    def job(self, job_id: str) -> dict:
        return _object(self.request_json("GET", f"{JOBS_ENDPOINT}/{urllib.parse.quote(job_id)}"), JOBS_ENDPOINT)

    def cancel_job(self, job_id: str) -> dict:
        return _object(self.request_json("DELETE", f"{JOBS_ENDPOINT}/{urllib.parse.quote(job_id)}"), JOBS_ENDPOINT)

    def job_results(self, job_id: str) -> list:
        path = f"{JOBS_ENDPOINT}/{urllib.parse.quote(job_id)}/results"
        return _field(self.request_json("GET", path), "results", list, path)

    def download_file(self, name: str, dest: str, watcher=None) -> str:
        """GET /files/{name} into ``dest`` (for an engine on another host).

        The file comes at once or in a steady flow: the short timeout (TIMEOUT_S) bounds the
        connect and each wait for its next bytes, so a stalled download fails in seconds.
        ``watcher``: the :class:`ask_stream.AskStream` the file belongs to, which gets the connection's
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
            raise self._unavailable(exc, failed_at(conn, stage), doing=f"downloading {name}") from exc
        finally:
            conn.close()
        return dest


def _object(answer, path: str) -> dict:
    """``answer`` (JSON the engine sent for ``path``) when it is an object, else EngineError
    'bad_response' (a list, a number: not what the protocol answers)."""
    if not isinstance(answer, dict):
        raise EngineError("bad_response", f"The engine answered {path} with JSON that is not an object.",
                          "Look at the engine's version and log: it does not speak this plugin's protocol.")
    return answer


def _field(answer, name: str, kind: type, path: str):
    """The field ``name`` of ``answer`` (see :func:`_object`), which must be a ``kind``, else
    EngineError 'bad_response' (a KeyError or TypeError escaped the client before)."""
    value = _object(answer, path).get(name)
    if not isinstance(value, kind):
        raise EngineError("bad_response", f"The engine's answer to {path} has no {name} (a {kind.__name__}).",
                          "Look at the engine's version and log: it does not speak this plugin's protocol.")
    return value


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
