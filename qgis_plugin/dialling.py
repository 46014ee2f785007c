"""Connections to the engine that Stop can end: the socket of an ``http.client`` connection is
made here (dialled, open_socket) at the address :func:`addresses.dial_host` gives (``localhost``:
127.0.0.1), handed to a watcher (an :class:`ask_stream.AskStream`) before it connects, and
connected in short slices that look whether the watcher was stopped; an https connection hands
over its TLS socket before the handshake (WatchedHTTPSConnection). A host that drops the
connection's packets is given up after the connection's timeout, not the minutes the system
waits. No proxy ever carries a connection: the engine is dialled straight. :func:`failed_at`
says at which stage a connection's failure counts (the rule every call shares). A short call
(``/health``, the other JSON requests) is watched by a :class:`CallWatcher`: an overall deadline,
and a stop from another thread.
"""

from __future__ import annotations

import errno
import http.client
import os
import select
import socket
import threading
import time

from .addresses import dial_host


def failed_at(conn: http.client.HTTPConnection, stage: str) -> str:
    """The stage a call on ``conn`` that failed at ``stage`` counts as for
    :meth:`client.EngineClient._unavailable`: ``"connect"`` only while ``conn`` has no socket; a
    connection that was made and whose TLS handshake then failed counts as ``"wait"`` (something
    answered, but not as the engine); any other stage as it is."""
    return "wait" if stage == "connect" and conn.sock is not None else stage


def dialled(conn: http.client.HTTPConnection, watcher=None) -> http.client.HTTPConnection:
    """``conn`` (not opened yet) with its socket made by :func:`open_socket` at
    :func:`dial_host` of its host (``localhost``: 127.0.0.1), which it still names in the
    ``Host`` header and, over https, as the TLS server name (the name the certificate is checked
    against); ``watcher`` (an :class:`ask_stream.AskStream`, or None) gets the socket before it connects."""
    address = dial_host(conn.host)

    def connect(host_port, timeout=None, source_address=None):
        return open_socket((address, host_port[1]), timeout, source_address, watcher)

    conn._create_connection = connect  # http.client's hook (socket.create_connection)
    return conn


def open_socket(address: tuple, timeout: float | None, source_address=None, watcher=None) -> socket.socket:
    """A TCP socket connected to ``address`` (host, port), as ``socket.create_connection`` makes
    it, but with a connect that Stop can end: each socket is handed to ``watcher`` (an
    :class:`ask_stream.AskStream`, or None) before it connects, and the connect waits in slices of
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


ABORTED_READ_S = 0.001  # how long a read of a stopped call waits for bytes


class WatchedSockets:
    """The sockets of one call or answer that :meth:`abort` shuts down from any thread, so a
    blocked connect, send or read returns at once (a connect still in progress also looks at the
    flag: :func:`dialled`). A watcher is handed each socket as it is made (:meth:`adopt`)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._sockets = []
        self._aborted = False

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # not connected yet, or closed already
                pass
            try:
                # Linux may still deliver what the peer sends after a shutdown: a server trickling
                # bytes kept each read fed. Its next wait for bytes times out at once instead.
                sock.settimeout(ABORTED_READ_S)
            except OSError:
                pass

    def adopt(self, sock) -> bool:
        """Take ``sock`` into the sockets :meth:`abort` shuts down (False, and not taken, when
        stopped already)."""
        with self._lock:
            if self._aborted:
                return False
            self._sockets.append(sock)
            return True

    @property
    def aborted(self) -> bool:
        return self._aborted


class CallWatcher(WatchedSockets):
    """The watcher of one short call: every socket it is handed is shut down once
    ``deadline_s`` seconds have passed since it was made (``expired``), or when :meth:`abort`
    is called from another thread (a cancelled health check). Without it a server that trickles
    a few bytes every few seconds kept each read within its timeout and the call alive for ever.
    :meth:`done` ends its clock."""

    def __init__(self, deadline_s: float):
        super().__init__()
        self.expired = False
        self._timer = threading.Timer(deadline_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        self.expired = True
        self.abort()

    def done(self) -> None:
        self._timer.cancel()


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


class WatchedHTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection whose TLS socket is handed to ``watcher`` (an :class:`ask_stream.AskStream`, or
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
