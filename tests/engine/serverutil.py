"""Start a real engine server (uvicorn subprocess) on a free loopback port, talk to it, stop it.

Standard library only, so the plugin's tests can reuse it from the QGIS venv: give `python` the
engine venv's interpreter. The server gets its own config dir (GEOVQA_CONFIG_DIR, where the token
is created) and state dir, both temporary unless given.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One ``python -m engine.server`` subprocess bound to 127.0.0.1."""

    def __init__(self, args: list[str] | None = None, *, python: str | None = None,
                 config_dir: str | Path | None = None, state_dir: str | Path | None = None,
                 env: dict | None = None, port: int | None = None, module: str = "engine.server",
                 subcommand: list[str] | None = None, ca_file: str | Path | None = None):
        self.args = list(args or [])
        self.ca_file = ca_file  # the server's certificate: talk https, trusting it (--tls-cert)
        self.python = python or sys.executable
        self._tmp = tempfile.TemporaryDirectory(prefix="geovqa-server-")
        self.config_dir = Path(config_dir or Path(self._tmp.name) / "config")
        self.state_dir = Path(state_dir or Path(self._tmp.name) / "state")
        self.extra_env = dict(env or {})
        self.port = port or free_port()
        self.module = module  # "engine" with subcommand ["serve"] runs the real CLI
        self.subcommand = list(subcommand or [])
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(self._tmp.name) / f"server-{self.port}.log"

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"{'https' if self.ca_file else 'http'}://127.0.0.1:{self.port}"

    def ssl_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else None

    def start(self, timeout: float = 120.0) -> "ServerProcess":
        env = dict(os.environ)
        env.update(self.extra_env)
        env["GEOVQA_CONFIG_DIR"] = str(self.config_dir)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in [str(REPO_ROOT), env.get("PYTHONPATH", "")] if p)
        cmd = [self.python, "-m", self.module, *self.subcommand, "--host", "127.0.0.1",
               "--port", str(self.port), "--state-dir", str(self.state_dir), *self.args]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, body = self.request("GET", "/health", token=False, timeout=2)
                if status == 200:
                    return body
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not healthy after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Stop the server abruptly (SIGKILL by default) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        self.proc = None
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def cleanup(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    # -- client helpers ------------------------------------------------------------------------
    @property
    def token(self) -> str:
        return (self.config_dir / "token").read_text().strip()

    def headers(self, token: bool | str = True) -> dict:
        if token is True:
            return {"Authorization": f"Bearer {self.token}"}
        if isinstance(token, str):
            return {"Authorization": f"Bearer {token}"}
        return {}

    def request(self, method: str, path: str, body: dict | None = None, *,
                token: bool | str = True, timeout: float = 30) -> tuple[int, object]:
        """(status, parsed JSON body) for a plain JSON request."""
        data = None if body is None else json.dumps(body).encode()
        headers = self.headers(token)
        if data is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.ssl_context()) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as err:
            raw = err.read()
            status = err.code
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def open_stream(self, path: str, body: dict, *, token: bool | str = True,
                    timeout: float = 60) -> tuple[http.client.HTTPConnection,
                                                  http.client.HTTPResponse]:
        """POST `body` and return the open connection and response (for NDJSON streams)."""
        conn = (http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout,
                                            context=self.ssl_context()) if self.ca_file
                else http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout))
        headers = {"Content-Type": "application/json", **self.headers(token)}
        conn.request("POST", path, body=json.dumps(body), headers=headers)
        return conn, conn.getresponse()

    @staticmethod
    def iter_events(resp: http.client.HTTPResponse) -> Iterator[dict]:
        for line in resp:
            line = line.strip()
            if line:
                yield json.loads(line)

    def ask(self, body: dict, **kw) -> tuple[int, list[dict] | dict]:
        """POST /ask: (200, every event) or (4xx/5xx, the error body)."""
        conn, resp = self.open_stream("/ask", body, **kw)
        try:
            if resp.status != 200:
                return resp.status, json.loads(resp.read() or b"null")
            return resp.status, list(self.iter_events(resp))
        finally:
            conn.close()


def stub_server(word_delay: float, *extra_args: str, env: dict | None = None, **kwargs) -> ServerProcess:
    """A (not yet started) server over the protocol stand-in engine of server_stub.py; ``env``:
    more environment for it (e.g. GEOVQA_STUB_VISION_DELAY)."""
    return ServerProcess(["--engine-factory", "server_stub:make_engine", "--log-level", "warning",
                          *extra_args],
                         env={"PYTHONPATH": str(Path(__file__).parent),
                              "GEOVQA_STUB_WORD_DELAY": str(word_delay), **(env or {})}, **kwargs)


def wait_until(predicate, timeout: float = 60.0, step: float = 0.05):
    """Poll `predicate` until it returns something truthy (returned) or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not reached in time")
