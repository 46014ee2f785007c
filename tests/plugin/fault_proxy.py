"""A small fault-injecting TCP proxy for the plugin's network tests (standard library only).

``FaultProxy(target_port, ...)`` listens on a free loopback port (``.url``) and forwards each
connection to ``127.0.0.1:target_port`` (the stub engine, or the real one), misbehaving on
demand:

* ``first_byte_delay``: hold the engine's first byte back for that many seconds;
* ``down_stall_after``: forward K bytes of the answer, then nothing more (socket kept open);
* ``down_cut_after`` / ``up_cut_after``: cut the connection after K bytes of the answer / of
  the request (``cut_how`` "rst" or "fin");
* ``up_rate``: trickle the request (upload) at that many bytes a second;
* ``mode="blackhole"``: accept and read, never answer (a port held by a hung program);
* ``mode="canned"``: answer every request with ``canned`` bytes and close (another web server,
  a proxy's 502, a non-HTTP program).

``connections`` counts the connections made (retry storms); ``upstream_closed`` is set once a
connection's upstream side was closed by the proxy (the engine sees the client vanish).
"""

from __future__ import annotations

import socket
import struct
import threading
import time


class FaultProxy:
    def __init__(self, target_port: int | None = None, mode: str = "forward", canned: bytes = b"",
                 first_byte_delay: float = 0.0, down_stall_after: int | None = None,
                 down_cut_after: int | None = None, up_cut_after: int | None = None, cut_how: str = "rst",
                 up_rate: float | None = None, stall_requests: bytes | None = None):
        self.target_port = target_port
        self.mode = mode
        self.canned = canned
        self.first_byte_delay = first_byte_delay
        self.down_stall_after = down_stall_after
        self.down_cut_after = down_cut_after
        self.up_cut_after = up_cut_after
        self.cut_how = cut_how
        self.up_rate = up_rate
        # a connection whose request starts with these bytes (b"GET /files") gets no answer byte
        self.stall_requests = stall_requests
        self.stalled = 0
        self.connections = 0
        self.requests_seen: list[bytes] = []
        self.upstream_closed = threading.Event()
        self._socks: list[socket.socket] = []
        self._closed = False
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    # -- plumbing -------------------------------------------------------------------------------
    def close(self):
        self._closed = True
        for s in [self.listener, *self._socks]:
            try:
                s.close()
            except OSError:
                pass

    def _accept(self):
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            self._socks.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    @staticmethod
    def _rst(sock):
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.shutdown(socket.SHUT_RD)  # wakes the other pump's recv, so the close below is the last
        except OSError:
            pass
        try:
            sock.close()
        except OSError:
            pass

    def _cut(self, sock):
        if self.cut_how == "rst":
            self._rst(sock)
        else:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _serve(self, client):
        if self.mode == "blackhole":
            try:
                while client.recv(65536):
                    pass
            except OSError:
                pass
            return
        if self.mode == "canned":
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    chunk = client.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                self.requests_seen.append(data)
                client.sendall(self.canned)
                time.sleep(0.05)
            except OSError:
                pass
            finally:
                client.close()
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            self._rst(client)
            return
        self._socks.append(upstream)
        threading.Thread(target=self._pump_up, args=(client, upstream), daemon=True).start()
        self._pump_down(client, upstream)

    def _pump_up(self, client, upstream):
        sent = 0
        try:
            while True:
                chunk = client.recv(4096 if self.up_rate else 65536)
                if not chunk:
                    break
                if sent == 0 and self.stall_requests and chunk.startswith(self.stall_requests):
                    self.stalled += 1
                    # never forwarded: the engine waits for a request, the client for an answer
                    while client.recv(65536):
                        pass
                    return
                if self.up_cut_after is not None and sent + len(chunk) > self.up_cut_after:
                    upstream.sendall(chunk[: self.up_cut_after - sent])
                    self._cut(client)
                    break
                upstream.sendall(chunk)
                sent += len(chunk)
                if self.up_rate:
                    time.sleep(len(chunk) / self.up_rate)
        except OSError:
            pass
        # the client went away (or was cut): the engine sees it go
        try:
            upstream.close()
        except OSError:
            pass
        self.upstream_closed.set()

    def _pump_down(self, client, upstream):
        sent = 0
        first = True
        try:
            while True:
                chunk = upstream.recv(65536)
                if not chunk:
                    break
                if first and self.first_byte_delay:
                    time.sleep(self.first_byte_delay)
                first = False
                if self.down_cut_after is not None and sent + len(chunk) > self.down_cut_after:
                    client.sendall(chunk[: self.down_cut_after - sent])
                    time.sleep(0.05)
                    self._cut(client)
                    upstream.close()
                    self.upstream_closed.set()
                    return
                if self.down_stall_after is not None and sent + len(chunk) > self.down_stall_after:
                    client.sendall(chunk[: self.down_stall_after - sent])
                    sent = self.down_stall_after
                    while upstream.recv(65536):  # the engine goes on; nothing more reaches the client
                        pass
                    return
                client.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        try:
            client.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def refused_url() -> str:
    """A loopback URL where nothing listens (engine down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
