"""End `serve` when the program that started it dies (``GEOVQA_PARENT_PID``), or when that
program closes the engine's standard input (``GEOVQA_STOP_ON_STDIN_EOF=1``).

The QGIS plugin starts the engine with ``GEOVQA_PARENT_PID=<QGIS's pid>`` in its environment. A
QGIS that quits or unloads the plugin stops the engine itself; one that crashes or is killed
cannot, and the engine went on holding its port, its state folder and the GPU memory, out of
reach of the next QGIS. With the variable set, a thread checks once a second that the parent
still runs; when it has gone, the engine ends as on Ctrl-C (SIGINT: uvicorn's graceful shutdown,
the port and the state folder's lock released), and is ended outright when that has not
happened within EXIT_GRACE_S (a model load busy in native code).

How the parent is watched, without psutil:

* Windows: a handle to the parent process opened at the start (``OpenProcess(SYNCHRONIZE)``),
  polled with ``WaitForSingleObject``; a handle cannot be fooled by the pid being reused.
* Linux, macOS: when the parent is our own parent (the plugin starts the engine directly),
  ``os.getppid()`` changing (we are handed to init / a subreaper when it dies); otherwise
  ``os.kill(pid, 0)``, which reports a process that still exists (a pid reused after the
  parent died reads as alive: that case is not caught).

Stopping it on purpose, on every system: with ``GEOVQA_STOP_ON_STDIN_EOF=1`` a thread reads the
engine's standard input (a pipe from the plugin) and, at its end, ends the engine the same way
(as on Ctrl-C). The plugin's *Stop local engine* closes that pipe. A signal cannot do this on
Windows: QProcess.terminate() posts WM_CLOSE there, which a console program never sees, and every
stop was a kill after the grace period (no graceful shutdown, no job state saved). Without the
variable, standard input is left alone (a terminal's Ctrl-D ends nothing).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Callable

PARENT_PID_ENV = "GEOVQA_PARENT_PID"
STOP_ON_STDIN_EOF_ENV = "GEOVQA_STOP_ON_STDIN_EOF"
POLL_S = 1.0
EXIT_GRACE_S = 15.0

log = logging.getLogger(__name__)


def parent_alive_check(pid: int) -> Callable[[], bool]:
    """A function telling whether process ``pid`` still runs (see the module's notes)."""
    if os.name == "nt":  # pragma: no cover - Windows only
        import ctypes

        synchronize, wait_object_0 = 0x00100000, 0
        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(synchronize, False, pid)
        if not handle:  # gone already (or never was)
            return lambda: False
        return lambda: kernel32.WaitForSingleObject(handle, 0) != wait_object_0
    if os.getppid() == pid:
        return lambda: os.getppid() == pid

    def alive() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process with that pid: it exists
            return True
        return True

    return alive


def end_this_process(why: str = "the parent's death") -> None:
    """End as on Ctrl-C; outright when that has not ended the process within EXIT_GRACE_S of
    ``why`` (for the log)."""
    signal.raise_signal(signal.SIGINT)
    time.sleep(EXIT_GRACE_S)
    log.warning("the engine did not end within %.0f s of %s; ending it now", EXIT_GRACE_S, why)
    os._exit(1)


def watch_parent(pid: int, on_gone: Callable[[], None] = end_this_process,
                 poll_s: float = POLL_S) -> threading.Thread:
    """Call ``on_gone`` (in a daemon thread) once process ``pid`` no longer runs."""
    alive = parent_alive_check(pid)

    def watch() -> None:
        while alive():
            time.sleep(poll_s)
        log.warning("the program that started the engine (pid %d) has ended; the engine ends too", pid)
        on_gone()

    thread = threading.Thread(target=watch, name="geovqa-parent-watch", daemon=True)
    thread.start()
    return thread


def parent_pid_from_environment(environ=None) -> int | None:
    """The pid in GEOVQA_PARENT_PID, or None when it is unset; SystemExit for one that is not a
    pid (a line ``error: ...``, as for serve's other refusals)."""
    text = (os.environ if environ is None else environ).get(PARENT_PID_ENV, "").strip()
    if not text:
        return None
    try:
        pid = int(text)
    except ValueError:
        pid = 0
    if pid <= 0:
        raise SystemExit(f"error: {PARENT_PID_ENV}={text!r} is not a process id.")
    return pid


def stop_on_stdin_eof_requested(environ=None) -> bool:
    """True when GEOVQA_STOP_ON_STDIN_EOF is ``1`` (the plugin sets it)."""
    return (os.environ if environ is None else environ).get(STOP_ON_STDIN_EOF_ENV, "").strip() == "1"


def watch_stdin(on_eof: Callable[[], None] | None = None, fd: int | None = None) -> threading.Thread | None:
    """Call ``on_eof`` (in a daemon thread; default: end this process as on Ctrl-C) once the file
    descriptor ``fd`` (default: standard input's) has reached its end; what is read is ignored.
    None, and nothing watched, when there is no standard input (pythonw).

    Read with os.read, not through sys.stdin: a daemon thread blocked in a buffered read holds
    the buffer's lock, and Python's exit, which closes sys.stdin, then aborts ("could not acquire
    lock ... at interpreter shutdown")."""
    if fd is None:
        try:
            fd = sys.stdin.fileno()
        except (AttributeError, OSError, ValueError):  # no standard input at all
            log.warning("%s=1 but the engine has no standard input to watch", STOP_ON_STDIN_EOF_ENV)
            return None

    def watch() -> None:
        try:
            while os.read(fd, 4096):
                pass
        except OSError:  # closed under us: as good as its end
            pass
        log.warning("the program that started the engine closed its standard input (%s); the engine ends",
                    STOP_ON_STDIN_EOF_ENV)
        if on_eof is None:
            end_this_process("its standard input closing")
        else:
            on_eof()

    thread = threading.Thread(target=watch, name="geovqa-stdin-watch", daemon=True)
    thread.start()
    return thread
