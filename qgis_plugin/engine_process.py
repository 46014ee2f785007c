"""Start and stop a local GeoVQA engine from QGIS with QProcess (no shell).

The command is ``<python> -m engine serve --host 127.0.0.1 --port <port> [--weights <dir>]
[extra args]``, run in the engine folder (the repository holding ``engine/``). Host and port are
the ones the client will call (`addresses.engine_address`): 8765 when the URL names no port, and
``--host ::1`` for an ``http://[::1]:...`` URL. The engine's output is kept (last lines) for the
diagnostics report.

Stopping never blocks the user interface: :meth:`EngineProcess.stop` asks the engine to end and
returns; a timer kills it when it still runs after a grace period (state "stopping" meanwhile).
The engine is asked by closing its standard input: it is started with
``GEOVQA_STOP_ON_STDIN_EOF=1`` and then ends as on Ctrl-C (uvicorn's graceful shutdown, its jobs'
state saved) when its input ends (engine/parent.py), the same on every system. A signal cannot
ask on Windows, where QProcess.terminate() posts WM_CLOSE, which a console Python never sees.
SIGTERM (terminate) follows half-way through the grace period, for an engine that does not watch
its input (an older engine folder), where it works: Linux and macOS. Only
:meth:`EngineProcess.shutdown` (plugin unload, QGIS quitting) waits, briefly and boundedly, so
that the engine never outlives QGIS. A QGIS that crashes or is killed cannot stop it: the engine
is started with ``GEOVQA_PARENT_PID=<QGIS's pid>`` and ends by itself when that process has gone
(engine/parent.py).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import weakref
from collections import deque
from pathlib import Path

from qgis.PyQt.QtCore import QCoreApplication, QObject, QProcess, QProcessEnvironment, QTimer, pyqtSignal

from .addresses import DEFAULT_ENGINE_URL, LOOPBACK_HOSTS, engine_address
from .engine_errors import EngineError
from .paths import user_path

NOT_RUNNING = QProcess.ProcessState.NotRunning
MERGED = QProcess.ProcessChannelMode.MergedChannels
FAILED_TO_START = QProcess.ProcessError.FailedToStart
# How long a stopped engine may take to end by itself (finish its answer, close its files)
# before it is killed; and at plugin unload / QGIS exit, the most QGIS waits for it (twice:
# after the request to end, then after the kill).
STOP_GRACE_MS = 5000
SHUTDOWN_WAIT_MS = 1500
PARENT_PID_ENV = "GEOVQA_PARENT_PID"  # engine/parent.py: serve ends when this process has ended
STOP_ON_STDIN_EOF_ENV = "GEOVQA_STOP_ON_STDIN_EOF"  # engine/parent.py: "1": serve ends when its input ends
# QGIS's own Python settings, left out of the engine's environment: OSGeo4W's QGIS on Windows
# sets PYTHONHOME / PYTHONPATH for the Python inside QGIS, and the engine's venv Python would take
# them for its own and stop at once ("Fatal Python error: init_fs_encoding"); macOS app bundles
# set __PYVENV_LAUNCHER__, which makes a venv Python take the bundle's for its own executable.
QGIS_PYTHON_VARIABLES = ("PYTHONHOME", "PYTHONPATH", "PYTHONEXECUTABLE", "PYTHONSTARTUP", "PYTHONUSERBASE",
                         "PYTHONPLATLIBDIR", "PYTHONINSPECT", "PYTHONSAFEPATH", "__PYVENV_LAUNCHER__")
# QGIS's own GDAL and PROJ data, left out too: OSGeo4W and the standalone installer (Windows) set
# GDAL_DATA, GDAL_DRIVER_PATH and PROJ_LIB / PROJ_DATA for QGIS's GDAL and PROJ, QGIS.app (macOS)
# sets GDAL_DRIVER_PATH to its bundle. The engine's rasterio brings its own GDAL and PROJ (a wheel,
# which finds its data by itself): fed another PROJ's proj.db, every CRS lookup fails (errors in
# the log, and the anchors GeoJSON names its CRS by raw WKT instead of its EPSG code); another
# GDAL's plugins fail to load or crash it. Both are paths bound to QGIS's versions; the user's
# GDAL / PROJ configuration options (GDAL_CACHEMAX, PROJ_NETWORK, ...) still reach the engine.
QGIS_GDAL_VARIABLES = ("GDAL_DATA", "GDAL_DRIVER_PATH", "PROJ_DATA", "PROJ_LIB")
# The engine's output is read as UTF-8 (EngineProcess._read, MemoryCheck). Python writes a pipe in
# the locale's encoding, on Windows the ANSI code page (cp1252 in the west): "C:\\Users\\José" came
# out garbled. PYTHONIOENCODING, not PYTHONUTF8=1: it sets exactly the standard streams (PYTHONUTF8
# would also change the default encoding of every file the engine opens), and it wins over a
# PYTHONIOENCODING inherited from QGIS's environment, which UTF-8 mode does not.
ENGINE_OUTPUT_ENCODING = {"PYTHONIOENCODING": "utf-8"}


class EngineProcessError(RuntimeError):
    """The local engine cannot be started (message for a person)."""


def split_arguments(text: str, windows: bool | None = None) -> list:
    """The words of *Extra engine arguments*, quoted as in a shell: spaces separate words, and
    quotes keep a word with spaces whole. On Windows (``windows``; default: this computer's) a
    backslash is part of a path (``D:\\lora\\mine``), not an escape, and only double quotes
    quote (an apostrophe is a letter, as in ``D:\\Bob's lora``). Raises EngineProcessError for a
    quote that is not closed."""
    if windows is None:
        windows = os.name == "nt"
    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = ""  # as shlex.split: '#' is no comment
    if windows:
        lexer.escape = ""
        lexer.quotes = '"'
    try:
        return list(lexer)
    except ValueError as exc:  # "No closing quotation", "No escaped character"
        example = '"D:\\my lora"' if windows else '"/data/Bob\'s lora"'
        raise EngineProcessError(
            f"The setting 'Extra engine arguments' ({text.strip()}) cannot be read: {exc}. Close every "
            f"quote, and put a path holding spaces or an apostrophe in double quotes, e.g. --adapter "
            f"{example} (Settings > Options > GeoVQA)."
        ) from None


def check_python(python: str) -> None:
    """Raise EngineProcessError, saying what to choose instead, when the engine Python ``python``
    cannot be run: a folder (a venv's, say), or a file that is not executable."""
    path = Path(python)
    where = "Set 'Engine Python' in Settings > Options > GeoVQA to the python program of the engine's venv"
    if not path.exists():
        raise EngineProcessError(f"The engine Python {python} does not exist. {where}.")
    if path.is_dir():
        raise EngineProcessError(
            f"The engine Python {python} is a folder, not a program. {where} (e.g. "
            f"{path / 'bin' / 'python'}, or {path / 'Scripts' / 'python.exe'} on Windows)."
        )
    if not path.is_file():
        raise EngineProcessError(f"The engine Python {python} is not a program file. {where}.")
    if not os.access(python, os.X_OK):
        raise EngineProcessError(
            f"The engine Python {python} cannot be run: it is not executable (no permission to run it). "
            f"{where}, or make the file executable."
        )


def option_value(args: list, name: str, shortest: str | None = None):
    """The value the last ``name VALUE`` or ``name=VALUE`` among ``args`` gives (argparse: the
    last one counts); None when none does. ``shortest``: the shortest abbreviation argparse takes
    for ``name`` (the engine's serve options that begin alike), e.g. ``--po 9000`` for --port."""
    def is_name(option: str) -> bool:
        return option == name or (shortest is not None and option.startswith(shortest) and name.startswith(option))

    value = None
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        option, eq, rest = arg.partition("=")
        if not is_name(option):
            continue
        if eq:
            value = rest
        elif i + 1 < len(args):
            value = args[i + 1]
    return value


def served_host(host: str) -> str:
    """The address a local engine started for an engine URL's (loopback) ``host`` listens on:
    ``::1`` stays IPv6, the rest is 127.0.0.1."""
    return "::1" if host == "::1" else "127.0.0.1"


def check_serve_arguments(url: str, scheme: str, port: int, extra: list) -> None:
    """Refuse *Extra engine arguments* that would make the local engine serve somewhere else than
    the engine URL the plugin calls: another ``--port``, https without ``--tls-cert`` (the engine
    serves plain http then) or ``--tls-cert`` for an http URL."""
    where = "Settings > Options > GeoVQA"
    # `serve` has no other option beginning with --p, nor with --tls-c
    other_port = option_value(extra, "--port", shortest="--p")
    if other_port is not None and other_port.strip() != str(port):
        raise EngineProcessError(
            f"The setting 'Extra engine arguments' has --port {other_port}, but the engine URL {url} is "
            f"on port {port}: the plugin would call a port nobody listens on. Remove --port from the "
            f"extra arguments and put the port in the engine URL instead ({where}).")
    tls = option_value(extra, "--tls-cert", shortest="--tls-c") is not None
    if scheme == "https" and not tls:
        raise EngineProcessError(
            f"The engine URL {url} is https://, but a local engine serves plain http unless the setting "
            f"'Extra engine arguments' gives --tls-cert FILE --tls-key FILE. Use the URL "
            f"http://{url.split('://', 1)[1]} for a local engine, or add the certificate and key "
            f"({where}).")
    if scheme == "http" and tls:
        raise EngineProcessError(
            f"The setting 'Extra engine arguments' has --tls-cert, so the local engine serves https, but "
            f"the engine URL {url} is http://. Use https://{url.split('://', 1)[1]} ({where}).")


def engine_command(settings, serve: bool = True) -> tuple:
    """(program, args, working_dir) for the configured local engine. ``serve``: also refuse extra
    arguments that would make it serve elsewhere than the engine URL (check_serve_arguments)."""
    return engine_launch(settings, serve)[:3]


def engine_launch(settings, serve: bool = True) -> tuple:
    """(program, args, working_dir, serving) for the configured local engine, as
    :func:`engine_command`, with ``serving``: the (scheme, address, port) it will serve, from the
    one reading of the engine URL that also made its ``--host`` and ``--port``."""
    engine_dir = Path(user_path(settings.engine_dir)) if settings.engine_dir.strip() else None
    python = user_path(settings.python)
    if not python and engine_dir is not None:
        for cand in (engine_dir / ".venv" / "bin" / "python", engine_dir / ".venv" / "Scripts" / "python.exe"):
            if cand.exists():
                python = str(cand)
                break
    if not python:
        raise EngineProcessError(
            "No Python for the engine is configured. Set 'Engine Python' (the python of the venv "
            "with torch, e.g. <repo>/.venv/bin/python, or <repo>\\.venv\\Scripts\\python.exe on Windows) "
            "or the engine folder in Settings > Options > GeoVQA."
        )
    check_python(python)
    try:
        scheme, host, port, _ = engine_address(settings.engine_url)
    except EngineError as exc:
        raise EngineProcessError(str(exc)) from None
    if host not in LOOPBACK_HOSTS:
        raise EngineProcessError(
            f"The engine URL {settings.engine_url} is not on this computer; a local engine can only "
            "be started for a 127.0.0.1 URL."
        )
    # the very host and port the client will call (engine_address): ::1 stays IPv6
    args = ["-m", "engine", "serve", "--host", served_host(host), "--port", str(port)]
    if settings.weights_dir.strip():
        args += ["--weights", user_path(settings.weights_dir)]
    extra = split_arguments(settings.extra_args) if settings.extra_args.strip() else []
    if serve:
        check_serve_arguments(settings.engine_url.strip() or DEFAULT_ENGINE_URL, scheme, port, extra)
    args += extra
    # <repo>/.venv/bin/python -> <repo>; not resolve(): a venv's python is a link to the base
    # interpreter, whose folder is not the engine's
    workdir = str(engine_dir) if engine_dir is not None else str(Path(python).absolute().parent.parent.parent)
    return python, args, workdir, (scheme, served_host(host), port)


def engine_environment(extra_env: dict | None = None) -> QProcessEnvironment:
    """The environment of an engine command started from QGIS: QGIS's own, less its Python
    settings (QGIS_PYTHON_VARIABLES) and its GDAL / PROJ data paths (QGIS_GDAL_VARIABLES), with
    ``extra_env`` added. Its standard streams are unbuffered and UTF-8, as the plugin reads them
    (ENGINE_OUTPUT_ENCODING)."""
    env = QProcessEnvironment.systemEnvironment()
    for name in QGIS_PYTHON_VARIABLES + QGIS_GDAL_VARIABLES:
        env.remove(name)
    env.insert("PYTHONUNBUFFERED", "1")
    for k, v in ENGINE_OUTPUT_ENCODING.items():
        env.insert(k, v)
    for k, v in (extra_env or {}).items():
        env.insert(k, v)
    return env


_STARTED = weakref.WeakSet()  # the EngineProcess objects of this QGIS


def local_engine_serves(url: str) -> bool:
    """True while an engine started from this QGIS runs (not stopping) to answer at ``url``: a
    connection refused there means that it is still loading its model. Plain attributes only:
    safe from a worker thread (a Processing algorithm's)."""
    return any(proc.serves(url) for proc in list(_STARTED))


class EngineProcess(QObject):
    """Owns at most one engine process started from QGIS."""

    state_changed = pyqtSignal(str)  # 'starting' | 'running' | 'stopping' | 'stopped' | 'failed'
    output = pyqtSignal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.proc = None
        self.lines = deque(maxlen=200)
        self.command = None
        self.start_error = ""  # why the last engine could not be started (QProcess's words)
        # (scheme, host, port) the running engine serves, from its start until it ends or is
        # asked to stop; None otherwise
        self.serving = None
        _STARTED.add(self)
        self._stopping = None  # the process asked to end, until it has
        self.shutting_down = False  # shutdown() began: QGIS quits or the plugin unloads
        self._terminate_timer = QTimer(self)
        self._terminate_timer.setSingleShot(True)
        self._terminate_timer.timeout.connect(self._terminate_if_running)
        self._kill_timer = QTimer(self)
        self._kill_timer.setSingleShot(True)
        self._kill_timer.timeout.connect(self._kill_if_running)
        app = QCoreApplication.instance()
        if app is not None:  # QGIS quitting without unloading the plugin first
            app.aboutToQuit.connect(self.shutdown)

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.state() != NOT_RUNNING

    def serves(self, url: str) -> bool:
        """True while the engine started here runs, not asked to stop, to answer at ``url`` (the
        same scheme, address and port)."""
        serving = self.serving
        if serving is None:
            return False
        try:
            scheme, host, port, _ = engine_address(url)
        except EngineError:
            return False
        return host in LOOPBACK_HOSTS and (scheme, served_host(host), port) == serving

    def is_stopping(self) -> bool:
        """True from :meth:`stop` until the engine has ended."""
        return self._stopping is not None and self.is_running()

    def start(self, settings, extra_env: dict | None = None) -> None:
        if self.is_stopping():
            raise EngineProcessError("The local engine is still stopping; start it again in a few seconds.")
        if self.is_running():
            return
        program, args, workdir, serving = engine_launch(settings)
        self.command = [program] + args
        self.start_error = ""
        self.serving = serving
        proc = QProcess(self)
        proc.setProcessChannelMode(MERGED)
        proc.setWorkingDirectory(workdir)
        # the engine ends by itself when this QGIS dies without stopping it (crashed, killed):
        # engine/parent.py watches this pid; and when stop() closes its standard input (a pipe,
        # QProcess's default, left open until then)
        env = {PARENT_PID_ENV: str(os.getpid()), STOP_ON_STDIN_EOF_ENV: "1"}
        env.update(extra_env or {})
        proc.setProcessEnvironment(engine_environment(env))
        proc.readyReadStandardOutput.connect(self._read)
        proc.started.connect(lambda: self.state_changed.emit("running"))
        proc.finished.connect(self._finished)
        proc.errorOccurred.connect(self._error)
        self.proc = proc
        self.state_changed.emit("starting")
        proc.start(program, args)

    def stop(self, grace_ms: int | None = None) -> None:
        """Ask the engine to end (its standard input closed; SIGTERM half-way through the grace
        period) and return at once (state "stopping"); it is killed when it still runs after
        ``grace_ms`` (default STOP_GRACE_MS). "stopped" follows when it has ended."""
        proc = self.proc
        if proc is None:
            return
        if proc.state() == NOT_RUNNING:
            self.proc = None
            self.state_changed.emit("stopped")
            return
        if self._stopping is proc:  # asked already: the timer is running
            return
        self._stopping = proc
        self.serving = None
        self.state_changed.emit("stopping")
        # Not terminate() at once as well: on Linux and macOS an engine ending on its input's
        # end would take a SIGTERM arriving before its own SIGINT for a second Ctrl-C, which
        # makes uvicorn skip its graceful shutdown; a SIGTERM after it is harmless.
        proc.closeWriteChannel()
        grace = max(0, int(STOP_GRACE_MS if grace_ms is None else grace_ms))
        self._terminate_timer.start(grace // 2)
        self._kill_timer.start(grace)

    def _terminate_if_running(self) -> None:
        proc = self._stopping
        if proc is not None and proc.state() != NOT_RUNNING:
            proc.terminate()

    def _kill_if_running(self) -> None:
        proc = self._stopping
        if proc is not None and proc.state() != NOT_RUNNING:
            self.lines.append("[engine did not end when asked; killed]")
            proc.kill()  # finished follows through the event loop

    def shutdown(self, wait_ms: int = SHUTDOWN_WAIT_MS) -> None:
        """Plugin unload / QGIS quitting: end the engine for sure, waiting at most about twice
        ``wait_ms`` (the only place that blocks): its standard input closed, SIGTERM after half
        of ``wait_ms``, killed after ``wait_ms``. The states it still reports are the last:
        nothing should react to them by starting new work (:attr:`shutting_down`)."""
        self.shutting_down = True
        app = QCoreApplication.instance()
        if app is not None:
            try:
                app.aboutToQuit.disconnect(self.shutdown)
            except (TypeError, RuntimeError):
                pass
        self._terminate_timer.stop()
        self._kill_timer.stop()
        proc = self.proc
        if proc is None or proc.state() == NOT_RUNNING:
            return
        self._stopping = proc  # an exit by signal is no failure to report
        self.serving = None
        proc.closeWriteChannel()
        if proc.waitForFinished(wait_ms // 2):
            return
        proc.terminate()
        if not proc.waitForFinished(wait_ms - wait_ms // 2):
            proc.kill()
            proc.waitForFinished(wait_ms)

    def log_text(self) -> str:
        return "\n".join(self.lines)

    def failure_reason(self) -> str:
        """Why the engine could not be started (:attr:`start_error`), else the engine's own last
        error sentence (its command line prints "error: ..." before it exits: no weights, not
        enough memory, a bad option), else its last output line."""
        if self.start_error:
            return self.start_error
        return error_sentence(ln for ln in self.lines if not ln.startswith("[engine "))

    def _read(self):
        if self.proc is None:
            return
        data = bytes(self.proc.readAllStandardOutput()).decode("utf-8", errors="replace")
        for line in data.splitlines():
            self.lines.append(line)
            self.output.emit(line)

    def _finished(self, code, _status=None):
        self.lines.append(f"[engine exited with code {code}]")
        asked = self._stopping is not None
        self._stopping = None
        self.serving = None
        self._terminate_timer.stop()
        self._kill_timer.stop()
        self.state_changed.emit("stopped" if code == 0 or asked else "failed")

    def _error(self, err):
        """A failure to start (no ``finished`` follows), or a crash (``finished`` follows, and
        reports it: Qt6 emits this after the process has ended, so a stop ended by a signal would
        otherwise read as a failure)."""
        self.lines.append(f"[engine process error: {err}]")
        if err == FAILED_TO_START and self.proc is not None and self.proc.state() == NOT_RUNNING:
            self.serving = None
            self.start_error = self.proc.errorString() or "the engine Python could not be run"
            self.lines.append(f"[engine could not be started: {self.start_error}]")
            # asked to stop while it failed to start: that process has ended, so nothing is
            # stopping any more (else the next engine would show as stopping, its crash as a stop)
            self._stopping = None
            self._terminate_timer.stop()
            self._kill_timer.stop()
            self.state_changed.emit("failed")


# The engine's own refusals: "error: ..." at the start of a line, or argparse's
# "python -m engine serve: error: ..." (a program name, then the sentence).
ENGINE_ERROR_RE = re.compile(r"^(?:[\w .-]+: )?error:\s*(\S.*)$")


def error_sentence(lines) -> str:
    """The last "error: ..." sentence of an engine command's output, else its last line.

    A line that starts with "error:" is the engine's own sentence (a port in use, a state folder
    held by another server, no weights) and wins over log lines that only mention "error:"."""
    lines = [ln.strip() for ln in lines if ln.strip()]
    for line in reversed(lines):
        match = ENGINE_ERROR_RE.match(line)
        if match:
            return match.group(1).strip()
    for line in reversed(lines):
        head, sep, rest = line.partition("error:")
        if sep and rest.strip() and not head.strip().startswith(("File ", "raise ")):
            return rest.strip()
    return lines[-1] if lines else ""


# the serve options `info --memory` takes too: what the model needs, and the feature cache's cap
# (RAM beside a model on the CPU)
MODEL_FLAGS = ("--weights", "--device", "--quantization", "--feature-cache-bytes")


def memory_check_command(settings) -> tuple:
    """(program, args, working_dir) of ``engine info --memory --json`` for the configured local
    engine: the same Python, weights and model options (--device, --quantization, --no-demo,
    --feature-cache-bytes) its serve command would use; serve-only options are left out."""
    program, serve_args, workdir = engine_command(settings, serve=False)
    args = ["-m", "engine", "info", "--memory", "--json"]
    rest = serve_args[3:]
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg in MODEL_FLAGS and i + 1 < len(rest):
            args += [arg, rest[i + 1]]
            i += 2
            continue
        if arg == "--no-demo" or arg.split("=", 1)[0] in MODEL_FLAGS and "=" in arg:
            args.append(arg)
        i += 1
    return program, args, workdir


def memory_summary(report: dict) -> str:
    """One paragraph from the JSON of ``engine info --memory``."""
    def size(n) -> str:
        return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"

    free = report.get("free_bytes")
    model = "the tiny demo model" if report.get("demo_model") else report.get("weights_dir", "?")
    verdicts = {True: "fits", False: "does not fit", None: "unknown"}
    parts = [f"{q} {size(r['needed_bytes'])}: {verdicts[r.get('fits')]}"
             for q, r in report.get("formats", {}).items()]
    auto = report.get("auto_choice")
    cache = report.get("feature_cache_bytes") or 0
    return (f"{model}, {report.get('parameters', 0):,} parameters. Free on {report.get('device')}: "
            f"{size(free) if free is not None else 'unknown'}. Needed: " + "; ".join(parts)
            + (f" (each with the engine's feature cache, {size(cache)}: --feature-cache-bytes in "
               "Extra engine arguments, 0 turns it off)" if cache else "") + "."
            + (f" The default (auto) loads {auto}." if auto else ""))


class MemoryCheck(QObject):
    """Runs ``engine info --memory`` for the configured local engine without blocking QGIS."""

    done = pyqtSignal(object, str)  # (report dict or None, error sentence)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.proc = None

    def start(self, settings) -> None:
        try:
            program, args, workdir = memory_check_command(settings)
        except EngineProcessError as exc:
            self.done.emit(None, str(exc))
            return
        if self.proc is not None:
            self.proc.kill()
        proc = QProcess(self)
        proc.setWorkingDirectory(workdir)
        proc.setProcessEnvironment(engine_environment())
        proc.finished.connect(lambda code, _status=None, p=proc: self._finished(p, code))
        proc.errorOccurred.connect(lambda err, p=proc: self._failed(p, err))
        self.proc = proc
        proc.start(program, args)

    def _finished(self, proc, code) -> None:
        if proc is not self.proc:
            return
        self.proc = None
        out = bytes(proc.readAllStandardOutput()).decode("utf-8", errors="replace")
        err = bytes(proc.readAllStandardError()).decode("utf-8", errors="replace")
        if code == 0:
            try:
                report = json.loads(out)
            except ValueError:
                report = None
            if isinstance(report, dict):
                self.done.emit(report, "")
                return
        self.done.emit(None, error_sentence(err.splitlines()) or f"the engine exited with code {code}")

    def _failed(self, proc, err) -> None:
        if proc is self.proc and proc.state() == NOT_RUNNING:
            self.proc = None
            self.done.emit(None, f"the engine Python could not be started: {proc.errorString() or err}")
