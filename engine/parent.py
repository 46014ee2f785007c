"""End `serve` when the program that started it dies (``GEOVQA_PARENT_PID``).

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
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Callable

PARENT_PID_ENV = "GEOVQA_PARENT_PID"
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


def end_this_process() -> None:
    """End as on Ctrl-C; outright when that has not ended the process within EXIT_GRACE_S."""
    signal.raise_signal(signal.SIGINT)
    time.sleep(EXIT_GRACE_S)
    log.warning("the engine did not end within %.0f s of the parent's death; ending it now", EXIT_GRACE_S)
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
