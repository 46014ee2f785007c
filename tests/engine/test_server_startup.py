"""`serve` refuses what would stop it (a port in use, a state dir another server holds, a port
out of range) before it loads the model, with one ``error: ...`` line and a non-zero exit."""

from __future__ import annotations

import argparse
import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from serverutil import REPO_ROOT, free_port, stub_server  # noqa: E402


def serve_env(tmp_path: Path, **extra: str) -> dict:
    """The environment of a `python -m engine serve` subprocess over the stand-in engine: its own
    config dir under ``tmp_path``, this checkout and tests/engine (server_stub) on the path, and
    ``extra`` variables."""
    return dict(os.environ, GEOVQA_CONFIG_DIR=str(tmp_path / "config"),
                PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(Path(__file__).parent)]), **extra)


def health_check(port: int):
    """A check (no arguments) whether an engine on 127.0.0.1:``port`` answers GET /health with
    200 within a second (no proxy from the environment)."""
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def answers() -> bool:
        try:
            return opener.open(f"http://127.0.0.1:{port}/health", timeout=1).status == 200
        except OSError:
            return False

    return answers


def run_serve(tmp_path: Path, port, state_dir: Path, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    """`python -m engine serve` over the stand-in engine; (its result, the "model loaded" marker)."""
    marker = tmp_path / f"loaded-{port}-{state_dir.name}"
    env = serve_env(tmp_path, GEOVQA_STUB_LOADED=str(marker))
    cmd = [sys.executable, "-m", "engine", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--state-dir", str(state_dir), "--log-level", "warning",
           "--engine-factory", "server_stub:make_engine_noting_the_load", *extra]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    return done, marker


def last_line(done: subprocess.CompletedProcess) -> str:
    return (done.stdout + done.stderr).strip().splitlines()[-1]


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    srv = stub_server(0.01, state_dir=tmp_path_factory.mktemp("held") / "state")
    srv.start()
    yield srv
    srv.cleanup()


def test_a_port_in_use_is_refused_before_the_model_loads(running, tmp_path):
    done, marker = run_serve(tmp_path, running.port, tmp_path / "other-state")
    assert done.returncode != 0
    assert last_line(done) == (f"error: port {running.port} on 127.0.0.1 is in use (another "
                               "engine?). Stop the program using it, or start the engine with "
                               "another --port.")
    assert "Traceback" not in done.stderr
    assert not marker.exists()


def test_a_held_state_dir_is_refused_before_the_model_loads(running, tmp_path):
    done, marker = run_serve(tmp_path, free_port(), running.state_dir)
    assert done.returncode != 0
    assert last_line(done).startswith(
        f"error: state folder {running.state_dir} is in use by another engine server.")
    assert "Traceback" not in done.stderr
    assert not marker.exists()
    assert running.request("GET", "/health", token=False)[0] == 200  # the first one goes on


def test_a_token_file_that_is_not_ascii_is_refused_with_one_line(tmp_path):
    token = tmp_path / "config" / "token"
    token.parent.mkdir()
    token.write_bytes("my-token\n".encode("utf-16"))
    done, marker = run_serve(tmp_path, free_port(), tmp_path / "state")
    assert done.returncode != 0
    assert last_line(done).startswith(f"error: The engine's token file {token} holds bytes that "
                                      "are not ASCII text (it starts with a UTF-16 byte-order mark")
    assert "Traceback" not in done.stderr
    assert not marker.exists()
    assert token.read_bytes() == "my-token\n".encode("utf-16")


def test_an_output_dir_that_cannot_be_made_is_refused_before_the_model_loads(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    done, marker = run_serve(tmp_path, free_port(), tmp_path / "state", "--output-dir", str(blocker / "out"))
    assert done.returncode != 0
    assert last_line(done).startswith(f"error: --output-dir {blocker / 'out'} cannot be made: ")
    assert "Traceback" not in done.stderr
    assert not marker.exists()


@pytest.mark.parametrize("limit", ["-5", "0", "many"])
def test_an_upload_limit_below_one_byte_is_an_argument_error(tmp_path, limit):
    done, marker = run_serve(tmp_path, free_port(), tmp_path / "state", "--max-upload-bytes", limit)
    assert done.returncode == 2
    assert "error: argument --max-upload-bytes:" in last_line(done)
    assert not marker.exists()


@pytest.mark.parametrize("port", ["70000", "0", "-1", "http"])
def test_a_port_out_of_range_is_an_argument_error(tmp_path, port):
    done, marker = run_serve(tmp_path, port, tmp_path / "state")
    assert done.returncode == 2
    assert "error: argument --port:" in last_line(done)
    assert not marker.exists()


def test_the_engine_is_refused_not_hung_while_the_model_loads(tmp_path, monkeypatch):
    """While the model loads, the state dir is locked and the port bound (nobody else can take
    either) but not listened on: a client is refused at once instead of hanging."""
    from engine import server
    from engine.jobs import lock_state_dir

    seen = {}

    def build_engine(args, settings):
        with socket.socket() as probe:
            seen["connect"] = probe.connect_ex(("127.0.0.1", settings.port))
        with socket.socket() as other:
            try:
                other.bind(("127.0.0.1", settings.port))
                seen["bind"] = "bound"
            except OSError:
                seen["bind"] = "refused"
        with pytest.raises(SystemExit, match="in use by another engine server"):
            lock_state_dir(settings.state_dir)
        # a second engine started now, on another state dir: its bind would succeed (neither
        # listens yet), the port's lock refuses it before its own load
        seen["second"], seen["second_loaded"] = (
            (lambda done, marker: (last_line(done), marker.exists()))(
                *run_serve(tmp_path, settings.port, tmp_path / "second-state")))
        raise SystemExit("error: stop here")

    monkeypatch.setattr(server, "build_engine", build_engine)
    monkeypatch.setenv("GEOVQA_CONFIG_DIR", str(tmp_path / "config"))
    parser = argparse.ArgumentParser()
    server.add_serve_arguments(parser)
    args = parser.parse_args(["--port", str(free_port()), "--state-dir", str(tmp_path / "state"),
                              "--log-level", "warning"])
    with pytest.raises(SystemExit, match="stop here"):
        server.serve(args)
    port = args.port
    assert seen == {"connect": errno.ECONNREFUSED, "bind": "refused", "second_loaded": False,
                    "second": f"error: port {port} on 127.0.0.1 is in use (another engine?). Stop the "
                              "program using it, or start the engine with another --port."}
    # a failed start releases what it held: the state dir and the port can be taken again
    lock_state_dir(tmp_path / "state").close()
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))


def test_ctrl_c_ends_serve_normally(tmp_path, monkeypatch):
    """uvicorn re-raises the SIGINT it handled after its graceful shutdown; `serve` ends as
    `make serve` expects (exit 0), not as 'interrupted' with 130."""
    import uvicorn

    from engine import server

    def interrupted(self, sockets=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(server, "build_engine", lambda args, settings: None)
    monkeypatch.setattr(server, "create_app", lambda engine, settings, state_lock=None: None)
    monkeypatch.setattr(uvicorn.Server, "run", interrupted)
    monkeypatch.setenv("GEOVQA_CONFIG_DIR", str(tmp_path / "config"))
    parser = argparse.ArgumentParser()
    server.add_serve_arguments(parser)
    args = parser.parse_args(["--port", str(free_port()), "--state-dir", str(tmp_path / "state"),
                              "--log-level", "warning"])
    assert server.serve(args) is None


def test_serve_leaves_the_state_dir_to_a_job_queue_still_busy(tmp_path, monkeypatch):
    """When serve ends while the job worker is still in a step, the queue keeps the state dir's
    lock (it lets it go when the worker ends, or the process exit does): serve must not close it."""
    import types

    import uvicorn

    from engine import server
    from engine.jobs import lock_state_dir

    kept = {}

    class BusyJobs:
        def release_state_lock(self):
            return False  # the worker is still running: the lock stays held

    def create_app(engine, settings, state_lock=None):
        kept["lock"] = state_lock
        return types.SimpleNamespace(state=types.SimpleNamespace(jobs=BusyJobs()))

    monkeypatch.setattr(server, "build_engine", lambda args, settings: None)
    monkeypatch.setattr(server, "create_app", create_app)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    monkeypatch.setenv("GEOVQA_CONFIG_DIR", str(tmp_path / "config"))
    parser = argparse.ArgumentParser()
    server.add_serve_arguments(parser)
    args = parser.parse_args(["--port", str(free_port()), "--state-dir", str(tmp_path / "state"),
                              "--log-level", "warning"])
    try:
        assert server.serve(args) is None
        with pytest.raises(SystemExit, match="is in use by another engine server"):
            lock_state_dir(tmp_path / "state")
    finally:
        kept["lock"].close()
    lock_state_dir(tmp_path / "state").close()


# --- GEOVQA_PARENT_PID: the engine ends with the QGIS that started it ----------------------------

PARENT = """
import os, subprocess, sys, time
env = dict(os.environ, GEOVQA_PARENT_PID=str(os.getpid()))
child = subprocess.Popen(sys.argv[1:], env=env)
print(child.pid, flush=True)
time.sleep(120)
"""


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:  # a zombie has ended
            return fh.read().split(") ")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _until(predicate, timeout: float) -> bool:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@pytest.mark.skipif(os.name != "posix", reason="kills its stand-in parent with SIGKILL")
def test_serve_ends_when_the_program_that_started_it_dies(tmp_path):
    """QGIS killed or crashed with a local engine started from the plugin: the engine went on,
    holding its port, its state folder and the GPU memory, and the next QGIS could not stop it.
    With GEOVQA_PARENT_PID (the plugin sets it) it ends, releasing the port and the lock."""
    from engine.jobs import lock_state_dir

    port, state = free_port(), tmp_path / "state"
    env = serve_env(tmp_path)
    serve = [sys.executable, "-m", "engine", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--state-dir", str(state), "--log-level", "warning", "--engine-factory", "server_stub:make_engine"]
    parent = subprocess.Popen([sys.executable, "-c", PARENT, *serve], cwd=REPO_ROOT, env=env,
                              stdout=subprocess.PIPE, text=True)
    engine_pid = int(parent.stdout.readline())
    answers = health_check(port)

    try:
        assert _until(answers, 60), "the engine did not start"
        parent.kill()  # QGIS crashes
        parent.wait(10)
        assert _until(lambda: _gone(engine_pid), 10), "the engine outlived the program that started it"
        assert not answers()
        with socket.socket() as s:  # the port is free again (for serve, which reuses TIME_WAIT ports)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
        lock_state_dir(state).close()  # and so is the state folder
    finally:
        parent.kill()
        if not _gone(engine_pid):
            os.kill(engine_pid, 9)


def test_a_parent_pid_that_is_not_a_pid_is_refused_with_one_line(tmp_path, monkeypatch):
    from engine.parent import parent_pid_from_environment

    assert parent_pid_from_environment({}) is None
    assert parent_pid_from_environment({"GEOVQA_PARENT_PID": " 4242 "}) == 4242
    with pytest.raises(SystemExit, match="error: GEOVQA_PARENT_PID='qgis' is not a process id"):
        parent_pid_from_environment({"GEOVQA_PARENT_PID": "qgis"})


def test_the_parent_watch_calls_back_once_the_parent_has_ended():
    from engine.parent import parent_alive_check, watch_parent

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    gone = []
    try:
        assert parent_alive_check(child.pid)()
        watch_parent(child.pid, on_gone=lambda: gone.append(True), poll_s=0.05)
        assert not _until(lambda: gone, 0.3)
    finally:
        child.kill()
        child.wait()
    assert _until(lambda: gone, 5) and not parent_alive_check(child.pid)()


# --- GEOVQA_STOP_ON_STDIN_EOF: the plugin's Stop, the same on every system ----------------------

def _serve_with_stdin(tmp_path: Path, stop_on_eof: bool):
    """`serve` (stand-in engine) with standard input a pipe, as the plugin starts it; (process,
    port, state dir, log file) once it answers /health."""
    import time

    port, state = free_port(), tmp_path / "state"
    env = serve_env(tmp_path)
    env.pop("GEOVQA_STOP_ON_STDIN_EOF", None)
    if stop_on_eof:
        env["GEOVQA_STOP_ON_STDIN_EOF"] = "1"
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--host", "127.0.0.1", "--port", str(port),
                                 "--state-dir", str(state), "--log-level", "info",
                                 "--engine-factory", "server_stub:make_engine"],
                                cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)
    answers = health_check(port)

    deadline = time.monotonic() + 60
    while not answers():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"serve did not start:\n{log.read_text()}")
        time.sleep(0.2)
    return proc, answers, state, log


def test_serve_ends_gracefully_when_its_standard_input_closes(tmp_path):
    """QProcess.terminate() posts WM_CLOSE on Windows, which a console Python never sees: every
    Stop local engine was a kill after the grace period (no graceful shutdown, no job state
    saved). With GEOVQA_STOP_ON_STDIN_EOF=1 (the plugin sets it) the engine ends as on Ctrl-C
    when the plugin closes its standard input, on every system."""
    from engine.jobs import lock_state_dir

    proc, answers, state, log = _serve_with_stdin(tmp_path, stop_on_eof=True)
    try:
        proc.stdin.close()
        assert proc.wait(15) == 0, log.read_text()
        text = log.read_text()
        assert "closed its standard input (GEOVQA_STOP_ON_STDIN_EOF); the engine ends" in text, text
        assert "Application shutdown complete" in text, text  # uvicorn's graceful path, lifespan included
        assert not answers()
        lock_state_dir(state).close()  # the state folder is free again
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_without_the_variable_a_closed_standard_input_ends_nothing(tmp_path):
    import time

    proc, answers, _state, log = _serve_with_stdin(tmp_path, stop_on_eof=False)
    try:
        proc.stdin.close()
        time.sleep(2)
        assert proc.poll() is None and answers(), log.read_text()
    finally:
        proc.terminate()
        proc.wait(15)


def test_the_stdin_watch_calls_back_at_the_end_of_its_stream_only():
    import threading

    from engine.parent import stop_on_stdin_eof_requested, watch_stdin

    assert stop_on_stdin_eof_requested({"GEOVQA_STOP_ON_STDIN_EOF": "1"})
    assert not stop_on_stdin_eof_requested({}) and not stop_on_stdin_eof_requested({"GEOVQA_STOP_ON_STDIN_EOF": "0"})
    read_end, write_end = os.pipe()
    ended = threading.Event()
    try:
        thread = watch_stdin(on_eof=ended.set, fd=read_end)
        os.write(write_end, b"anything the plugin might write\n")
        assert not ended.wait(0.3)
        os.close(write_end)
        assert ended.wait(5)
        thread.join(5)
    finally:
        os.close(read_end)


def test_a_refusal_with_its_input_watched_exits_with_its_own_code(tmp_path):
    """The watch must not hold standard input's buffer: Python's exit closes sys.stdin, and a
    daemon thread blocked in a buffered read made it abort ("could not acquire lock ... at
    interpreter shutdown", exit code 6 instead of serve's 2)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    env = serve_env(tmp_path, GEOVQA_STOP_ON_STDIN_EOF="1")
    proc = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--port", str(free_port()),
                             "--state-dir", str(tmp_path / "state"), "--output-dir", str(blocker / "out"),
                             "--engine-factory", "server_stub:make_engine"],
                            cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out = proc.stdout.read()  # stdin stays open, as the plugin keeps it
        assert proc.wait(30) == 1, out  # SystemExit("error: ...")
        assert "Fatal Python error" not in out and out.strip().splitlines()[-1].startswith("error: --output-dir"), out
    finally:
        proc.stdin.close()
        if proc.poll() is None:
            proc.kill()
