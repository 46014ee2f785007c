"""Start and stop a local GeoVQA engine from QGIS with QProcess (no shell).

The command is ``<python> -m engine serve --host 127.0.0.1 --port <port from the engine URL>
[--weights <dir>] [extra args]``, run in the engine folder (the repository holding ``engine/``).
The engine's output is kept (last lines) for the diagnostics report.
"""

from __future__ import annotations

import os
import shlex
import urllib.parse
from collections import deque
from pathlib import Path

from qgis.PyQt.QtCore import QObject, QProcess, QProcessEnvironment, pyqtSignal

NOT_RUNNING = QProcess.ProcessState.NotRunning
MERGED = QProcess.ProcessChannelMode.MergedChannels


class EngineProcessError(RuntimeError):
    """The local engine cannot be started (message for a person)."""


def engine_command(settings) -> tuple:
    """(program, args, working_dir) for the configured local engine."""
    engine_dir = Path(settings.engine_dir).expanduser() if settings.engine_dir.strip() else None
    python = settings.python.strip()
    if not python and engine_dir is not None:
        for cand in (engine_dir / ".venv" / "bin" / "python", engine_dir / ".venv" / "Scripts" / "python.exe"):
            if cand.exists():
                python = str(cand)
                break
    if not python:
        raise EngineProcessError(
            "No Python for the engine is configured. Set 'Engine Python' (the python of the venv "
            "with torch, e.g. <repo>/.venv/bin/python) or the engine folder in Settings > Options > GeoVQA."
        )
    if not Path(python).exists():
        raise EngineProcessError(f"The engine Python {python} does not exist.")
    url = urllib.parse.urlsplit(settings.engine_url or "http://127.0.0.1:8765")
    if url.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise EngineProcessError(
            f"The engine URL {settings.engine_url} is not on this computer; a local engine can only "
            "be started for a 127.0.0.1 URL."
        )
    args = ["-m", "engine", "serve", "--host", "127.0.0.1", "--port", str(url.port or 8765)]
    if settings.weights_dir.strip():
        args += ["--weights", settings.weights_dir.strip()]
    if settings.extra_args.strip():
        args += shlex.split(settings.extra_args)
    workdir = str(engine_dir) if engine_dir is not None else str(Path(python).resolve().parent.parent.parent)
    return python, args, workdir


class EngineProcess(QObject):
    """Owns at most one engine process started from QGIS."""

    state_changed = pyqtSignal(str)  # 'starting' | 'running' | 'stopped' | 'failed'
    output = pyqtSignal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.proc = None
        self.lines = deque(maxlen=200)
        self.command = None

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.state() != NOT_RUNNING

    def start(self, settings, extra_env: dict | None = None) -> None:
        if self.is_running():
            return
        program, args, workdir = engine_command(settings)
        self.command = [program] + args
        proc = QProcess(self)
        proc.setProcessChannelMode(MERGED)
        proc.setWorkingDirectory(workdir)
        env = QProcessEnvironment.systemEnvironment()
        env.insert("PYTHONUNBUFFERED", "1")
        for k, v in (extra_env or {}).items():
            env.insert(k, v)
        proc.setProcessEnvironment(env)
        proc.readyReadStandardOutput.connect(self._read)
        proc.started.connect(lambda: self.state_changed.emit("running"))
        proc.finished.connect(self._finished)
        proc.errorOccurred.connect(self._error)
        self.proc = proc
        self.state_changed.emit("starting")
        proc.start(program, args)

    def stop(self, wait_ms: int = 5000) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.state() != NOT_RUNNING:
            proc.terminate()
            if not proc.waitForFinished(wait_ms):
                proc.kill()
                proc.waitForFinished(2000)
        self.proc = None
        self.state_changed.emit("stopped")

    def log_text(self) -> str:
        return "\n".join(self.lines)

    def failure_reason(self) -> str:
        """The engine's own last error sentence (its command line prints "error: ..." before it
        exits: no weights, not enough memory, a bad option), else its last output line."""
        lines = [ln.strip() for ln in self.lines if ln.strip() and not ln.startswith("[engine ")]
        for line in reversed(lines):
            head, sep, rest = line.partition("error:")
            if sep and rest.strip() and not head.strip().startswith(("File ", "raise ")):
                return rest.strip()
        return lines[-1] if lines else ""

    def _read(self):
        if self.proc is None:
            return
        data = bytes(self.proc.readAllStandardOutput()).decode("utf-8", errors="replace")
        for line in data.splitlines():
            self.lines.append(line)
            self.output.emit(line)

    def _finished(self, code, _status=None):
        self.lines.append(f"[engine exited with code {code}]")
        self.state_changed.emit("stopped" if code == 0 else "failed")

    def _error(self, err):
        self.lines.append(f"[engine process error: {err}]")
        if self.proc is not None and self.proc.state() == NOT_RUNNING:
            self.state_changed.emit("failed")


def which(name: str) -> str | None:
    for d in os.environ.get("PATH", "").split(os.pathsep):
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None
