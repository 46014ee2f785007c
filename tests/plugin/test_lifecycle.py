"""Plugin load/unload (twice), packaging into an installable zip, engine command line."""

from __future__ import annotations

import configparser
import contextlib
import re
import zipfile
from pathlib import Path

import pytest
from conftest import fake_engine_python

ROOT = Path(__file__).resolve().parents[2]


def test_load_unload_twice(qgis_iface, qgis_new_project):
    import geovqa
    from qgis.core import QgsApplication

    from qgis.core import QgsProject

    registry = QgsApplication.processingRegistry()
    project = QgsProject.instance()
    project_signals = (project.cleared, project.readProject, project.layerWillBeRemoved)
    listeners = [project.receivers(sig) for sig in project_signals]
    for _ in range(2):
        p = geovqa.classFactory(qgis_iface)
        p.initGui()
        now = [project.receivers(sig) for sig in project_signals]
        assert all(n > before for n, before in zip(now, listeners))  # the dock follows the project
        assert registry.providerById("geovqa") is not None
        assert registry.algorithmById("geovqa:ask_raster") is not None
        assert registry.algorithmById("geovqa:batch_questions") is not None
        assert p.dock is not None and p.dock.widget() is not None
        assert len(p.actions) == 5
        p.unload()
        assert registry.providerById("geovqa") is None
        assert p.dock is None and p.actions == [] and p.options_factory is None and p.provider is None
        assert [project.receivers(sig) for sig in project_signals] == listeners  # and lets go of it
    qgis_iface.unregisterOptionsWidgetFactory.assert_called()


def test_the_dock_opens_on_the_active_raster_layer(qgis_iface, raster_layer):
    """Enabled with a project open, the plugin's dock talks about the layer chosen in the layers
    panel, not the first one of the project."""
    import geovqa

    _first, active = raster_layer("a first"), raster_layer("b chosen")  # the list is sorted by name
    qgis_iface.setActiveLayer(active)
    p = geovqa.classFactory(qgis_iface)
    p.initGui()
    try:
        assert p.dock.layer_combo.currentLayer() is active
    finally:
        p.unload()


def test_processing_only_without_iface():
    """qgis_process calls classFactory(None).initProcessing()."""
    import geovqa
    from qgis.core import QgsApplication

    p = geovqa.classFactory(None)
    p.initGui()
    assert QgsApplication.processingRegistry().providerById("geovqa") is not None
    p.unload()
    assert QgsApplication.processingRegistry().providerById("geovqa") is None


@pytest.mark.parametrize("present, expected", [((), ("QGIS3",)), (("QGIS3",), ("QGIS3",)),
                                               (("QGIS4",), ("QGIS4",)), (("QGIS3", "QGIS4"), ("QGIS3", "QGIS4"))])
def test_make_install_plugin_installs_for_each_qgis_on_this_computer(tmp_path, present, expected):
    """`make install-plugin` installed into QGIS3/profiles only: a QGIS 4 (settings in
    QGIS/QGIS4) never saw the plugin. It goes into every QGIS's default profile found here."""
    import os
    import subprocess
    import sys

    data = tmp_path / "data"
    for version in present:
        (data / "QGIS" / version).mkdir(parents=True)
    env = {**os.environ, "XDG_DATA_HOME": str(data)}
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "package_plugin.py"), "--out", str(tmp_path / "dist"),
                        "--install"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    for version in ("QGIS3", "QGIS4"):
        installed = data / "QGIS" / version / "profiles" / "default" / "python" / "plugins" / "geovqa" / "metadata.txt"
        assert installed.is_file() == (version in expected), (version, r.stdout)


def test_package_zip_is_installable(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "package_plugin.py"), "--out", str(tmp_path / "dist"),
                        "--install", "--profile-dir", str(tmp_path / "profile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    zips = list((tmp_path / "dist").glob("geovqa-*.zip"))
    assert len(zips) == 1
    names = zipfile.ZipFile(zips[0]).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"geovqa"} and "geovqa".isidentifier()
    assert "geovqa/metadata.txt" in names and "geovqa/__init__.py" in names
    # plugins.qgis.org refuses a package without a LICENSE (GPLv2-or-later compatible)
    assert "GNU GENERAL PUBLIC LICENSE" in zipfile.ZipFile(zips[0]).read("geovqa/LICENSE").decode()
    assert names.count("geovqa/metadata.txt") == 1
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    cp = configparser.ConfigParser()
    cp.read_string(zipfile.ZipFile(zips[0]).read("geovqa/metadata.txt").decode())
    meta = cp["general"]
    assert meta["name"] == "GeoVQA" and meta["qgisMinimumVersion"] == "3.22"
    assert meta["qgisMaximumVersion"] == "4.99" and meta["supportsQt6"] == "True"
    assert zips[0].name == f"geovqa-{meta['version']}.zip"
    assert f"geovqa/{meta['icon']}" in names
    installed = tmp_path / "profile" / "python" / "plugins" / "geovqa"
    assert (installed / "metadata.txt").is_file() and (installed / "processing" / "provider.py").is_file()


def test_package_zip_without_links_in_the_checkout(tmp_path):
    """A checkout made without symlinks (git's default on Windows) holds qgis_plugin/metadata.txt
    as a text file naming its target; the zip still gets the real metadata."""
    import shutil
    import subprocess
    import sys

    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "qgis_plugin", copy / "qgis_plugin", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "qgis_plugin" / "metadata.txt").unlink()
    (copy / "qgis_plugin" / "metadata.txt").write_text("../metadata.txt")
    shutil.copy(ROOT / "metadata.txt", copy / "metadata.txt")
    (copy / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "package_plugin.py", copy / "scripts")
    r = subprocess.run([sys.executable, str(copy / "scripts" / "package_plugin.py"), "--out", str(tmp_path / "dist")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (zip_path,) = (tmp_path / "dist").glob("geovqa-*.zip")
    meta = zipfile.ZipFile(zip_path).read("geovqa/metadata.txt").decode()
    assert meta == (ROOT / "metadata.txt").read_text()


def test_plugin_never_imports_torch_or_engine():
    """Text check (tests/engine/test_boundaries.py checks the imports on the AST); ``import engine``
    is a whole word: ``from .addresses import engine_address`` is not the engine."""
    src = ROOT / "qgis_plugin"
    for path in src.rglob("*.py"):
        text = path.read_text()
        for bad in ("import torch", "from engine", "import requests", "shell=True", "eval("):
            assert bad not in text, f"{path.name} contains {bad!r}"
        assert not re.search(r"import engine\b", text), f"{path.name} contains 'import engine'"


def test_engine_command_has_no_shell(tmp_path):
    import pytest
    from geovqa.engine_process import EngineProcessError, engine_command
    from geovqa.settings import Settings

    s = Settings(engine_url="http://127.0.0.1:9911")
    with pytest.raises(EngineProcessError, match="No Python") as refused:
        engine_command(s)
    # both venv layouts named: Windows' has no bin/python
    assert ".venv/bin/python" in str(refused.value) and r".venv\Scripts\python.exe" in str(refused.value)
    py = fake_engine_python(tmp_path / "repo" / ".venv" / "bin" / "python")
    s.engine_dir = str(tmp_path / "repo")
    s.weights_dir = "/w/GeoLLaVA-8K"
    s.extra_args = "--device cpu"
    program, args, workdir = engine_command(s)
    assert program == str(py) and workdir == str(tmp_path / "repo")
    assert args == ["-m", "engine", "serve", "--host", "127.0.0.1", "--port", "9911", "--weights", "/w/GeoLLaVA-8K",
                    "--device", "cpu"]
    s.engine_url = "http://10.0.0.5:8765"
    with pytest.raises(EngineProcessError, match="not on this computer"):
        engine_command(s)


@pytest.mark.parametrize("kind, reason", [("missing", "does not exist"), ("folder", "is a folder, not a program"),
                                          ("not executable", "it is not executable")])
def test_engine_command_names_an_engine_python_that_cannot_be_run(tmp_path, kind, reason):
    """engine_command itself (both Start and Check memory build on it) refuses what cannot run."""
    from geovqa.engine_process import EngineProcessError, engine_command, memory_check_command
    from geovqa.settings import Settings

    python = tmp_path / "python"
    if kind == "folder":
        python.mkdir()
    elif kind == "not executable":
        python.write_text("#!/bin/sh\n")
        python.chmod(0o644)
    s = Settings(engine_url="http://127.0.0.1:9911", python=str(python))
    for command in (engine_command, memory_check_command):
        with pytest.raises(EngineProcessError, match=reason):
            command(s)


@pytest.mark.parametrize("windows, text, words", [
    (False, '--adapter "/data/Bob\'s lora" --device cpu', ["--adapter", "/data/Bob's lora", "--device", "cpu"]),
    (False, "--adapter /data/my\\ lora", ["--adapter", "/data/my lora"]),
    (False, "--state-dir /data/run#2", ["--state-dir", "/data/run#2"]),
    # Windows: backslashes are path separators (POSIX rules turned D:\lora\mine into D:loramine),
    # an apostrophe is a letter, double quotes keep spaces
    (True, r"--adapter D:\lora\mine", ["--adapter", r"D:\lora\mine"]),
    (True, r'--adapter "C:\Users\Bob\my lora" --weights \\server\share\w',
     ["--adapter", r"C:\Users\Bob\my lora", "--weights", r"\\server\share\w"]),
    (True, r"--adapter D:\Bob's\lora", ["--adapter", r"D:\Bob's\lora"]),
])
def test_extra_engine_arguments_are_split_as_on_the_platform(windows, text, words):
    from geovqa.engine_process import split_arguments

    assert split_arguments(text, windows=windows) == words


@pytest.mark.parametrize("windows, text", [(False, "--adapter /data/Bob's lora"), (True, '--adapter "D:\\my lora')])
def test_an_unclosed_quote_in_extra_engine_arguments_names_the_setting(windows, text):
    from geovqa.engine_process import EngineProcessError, split_arguments

    with pytest.raises(EngineProcessError, match="'Extra engine arguments'.*No closing quotation.*double quotes"):
        split_arguments(text, windows=windows)


def test_start_local_engine_with_an_apostrophe_in_extra_arguments_says_so(plugin, qgis_iface, tmp_path):
    """An apostrophe in 'Extra engine arguments' (--adapter /data/Bob's lora) raised ValueError
    ('No closing quotation') out of the menu action: a Python error dialog."""
    import sys

    from conftest import free_port, set_settings
    from qgis.core import Qgis

    set_settings(python=sys.executable, engine_dir=str(tmp_path), extra_args="--adapter /data/Bob's lora",
                 engine_url=f"http://127.0.0.1:{free_port()}")
    bar = qgis_iface.messageBar()
    bar.clear_messages()
    assert plugin.start_engine() is False
    texts = bar.get_messages(Qgis.MessageLevel.Critical)
    assert any("'Extra engine arguments'" in t and "No closing quotation" in t for t in texts), texts
    assert not plugin.engine.is_running()


def test_the_engine_folder_comes_from_a_venv_python_not_its_link_target(tmp_path):
    """Only 'Engine Python' set: <repo>/.venv/bin/python is a link to the base interpreter; the
    engine starts in <repo> (where relative weights folders are), not beside the base Python."""
    import os

    from geovqa.engine_process import engine_command
    from geovqa.settings import Settings

    base = fake_engine_python(tmp_path / "pyenv" / "versions" / "3.11" / "bin" / "python3.11")
    py = tmp_path / "repo" / ".venv" / "bin" / "python"
    py.parent.mkdir(parents=True)
    os.symlink(base, py)
    s = Settings(engine_url="http://127.0.0.1:9911", python=str(py))
    program, _, workdir = engine_command(s)
    assert program == str(py) and workdir == str(tmp_path / "repo")


def test_an_engine_that_fails_to_start_says_why(plugin, qgis_iface, tmp_path):
    """The engine's own error sentence reaches the message bar, not only the diagnostics log."""
    import pytest
    from conftest import ENGINE_PY, ENGINE_ROOT, free_port, set_settings, wait_until
    from qgis.core import Qgis

    if not ENGINE_PY.exists():
        pytest.skip(f"{ENGINE_PY} does not exist (run make setup)")
    set_settings(python=str(ENGINE_PY), engine_dir=str(ENGINE_ROOT), extra_args="--no-demo",
                 weights_dir=str(tmp_path / "no-weights-here"), engine_url=f"http://127.0.0.1:{free_port()}")
    bar = qgis_iface.messageBar()
    bar.clear_messages()
    assert plugin.start_engine()

    def critical():
        return bar.get_messages(Qgis.MessageLevel.Critical)

    wait_until(lambda: critical(), 120, "the engine's failure message")
    assert not plugin.engine.is_running()
    reason = plugin.engine.failure_reason()
    assert reason.startswith("no weights:") and "no-weights-here" in reason
    assert any(m.startswith("GeoVQA:The local engine stopped: no weights:") or
               "The local engine stopped: no weights:" in m for m in critical()), critical()
    assert "[engine exited with code 2]" in plugin.engine.log_text()


@pytest.mark.parametrize("kind", ["folder", "not executable"])
def test_an_engine_python_that_cannot_be_run_is_named_before_anything_starts(plugin, qgis_iface, tmp_path, kind):
    """'Engine Python' set to the venv folder, or to a file that is not executable: the message
    bar only said "The local engine stopped with an error", and Check memory said "could not be
    started (0)"."""
    from conftest import free_port, set_settings
    from geovqa.engine_process import EngineProcessError, MemoryCheck
    from qgis.core import Qgis

    python = tmp_path / ".venv"
    if kind == "folder":
        python.mkdir()
        reason = "is a folder, not a program"
    else:
        python.write_text("#!/bin/sh\n")
        python.chmod(0o644)
        reason = "it is not executable"
    settings = set_settings(python=str(python), engine_dir=str(tmp_path), weights_dir="", extra_args="",
                            engine_url=f"http://127.0.0.1:{free_port()}")
    bar = qgis_iface.messageBar()
    bar.clear_messages()
    assert plugin.start_engine() is False
    texts = bar.get_messages(Qgis.MessageLevel.Critical)
    assert any(f"The engine Python {python} " in t and reason in t and "'Engine Python'" in t for t in texts), texts
    assert not plugin.engine.is_running()
    with pytest.raises(EngineProcessError, match=reason):
        plugin.engine.start(settings)

    check = MemoryCheck()
    done = []
    check.done.connect(lambda report, error: done.append((report, error)))
    check.start(settings)
    assert done and done[0][0] is None and reason in done[0][1]


def test_an_engine_python_that_fails_to_start_says_the_systems_reason(plugin, qgis_iface, tmp_path):
    """A program that cannot be started (here: its interpreter line names no interpreter): the
    message bar says why in the system's words, not only "stopped with an error"."""
    import os

    from conftest import free_port, set_settings, wait_until
    from qgis.core import Qgis

    python = tmp_path / "python"
    python.write_text("#!/nonexistent/interpreter\n")
    os.chmod(python, 0o755)
    set_settings(python=str(python), engine_dir=str(tmp_path), weights_dir="", extra_args="",
                 engine_url=f"http://127.0.0.1:{free_port()}")
    bar = qgis_iface.messageBar()
    bar.clear_messages()
    assert plugin.start_engine()
    wait_until(lambda: bar.get_messages(Qgis.MessageLevel.Critical), 20, "the failure message")
    texts = bar.get_messages(Qgis.MessageLevel.Critical)
    reason = plugin.engine.failure_reason()
    assert reason and reason == plugin.engine.start_error, plugin.engine.log_text()
    assert any(f"The local engine could not be started: {reason}" in t for t in texts), texts
    assert not any("stopped with an error" in t for t in texts), texts


def test_the_engines_own_error_line_is_the_reason_it_stopped():
    """`serve` ends a refused start with one "error: ..." line (a port in use, a state folder
    another server holds, a bad --port); that sentence is the reason shown, not the last log
    line, even when a later log line mentions an error in passing."""
    from geovqa.engine_process import error_sentence

    port_in_use = ("port 8765 on 127.0.0.1 is in use (another engine?). Stop the program using "
                   "it, or start the engine with another --port.")
    lines = ["2025-05-01 10:00:00,001 INFO engine.server: starting",
             f"error: {port_in_use}",
             "2025-05-01 10:00:00,002 WARNING py.warnings: resource_tracker: error: 1 leaked "
             "semaphore"]
    assert error_sentence(lines) == port_in_use
    argparse_lines = ["usage: python -m engine serve [-h] [--port PORT]",
                      "python -m engine serve: error: argument --port: 70000 is not a port "
                      "number (1 to 65535)"]
    assert error_sentence(argparse_lines) == ("argument --port: 70000 is not a port number "
                                              "(1 to 65535)")
    assert error_sentence(["INFO:     Waiting for application shutdown.",
                           "INFO:     Application shutdown complete."]) == \
        "INFO:     Application shutdown complete."


def test_unload_during_a_batch_raises_nothing(plugin, raster_layer, stub_engine):
    """Plugin Manager reload mid-batch: the task's progress reached a deleted QProgressBar."""
    import time

    from conftest import python_errors, wait_for_tasks, wait_until
    from qgis.core import QgsApplication
    from qgis.PyQt.QtCore import QEventLoop, QTimer

    with python_errors() as errors:
        stub_engine.token_delay = 0.1
        a, b = raster_layer("a"), raster_layer("b")
        dlg = plugin.open_batch()
        dlg.set_checked_layers({a.id(), b.id()})
        dlg.questions_edit.setPlainText("q1\nq2")
        dlg.run()
        wait_until(lambda: stub_engine.requests, 10)
        plugin.unload()
        loop = QEventLoop()  # back in an event loop, as in QGIS: the dialog is deleted now
        QTimer.singleShot(500, loop.quit)
        loop.exec()
        wait_for_tasks(60)
        for _ in range(10):
            QgsApplication.processEvents()
            time.sleep(0.05)
    assert errors == []
    assert len(stub_engine.requests) <= 2  # the batch stopped, it did not ask all four


def test_unloading_mid_answer_stores_the_question_as_stopped_by_the_unload(plugin, raster_layer, stub_engine,
                                                                          qgis_iface):
    """Plugin Manager (disable, reload) while an answer streams: the project kept the question as
    "superseded by a newer question", which no question was."""
    import geovqa
    from conftest import wait_for_tasks, wait_until

    stub_engine.token_delay = 0.1
    layer = raster_layer()
    plugin.dock.set_layer(layer)
    plugin.dock.ask("slow question")
    turn = plugin.dock.current_turn
    wait_until(lambda: turn["answer"], 10, "the first words")
    plugin.unload()
    wait_for_tasks()
    again = geovqa.classFactory(qgis_iface)  # loaded again: the conversation comes back from the project
    again.initGui()
    try:
        (stored,) = again.dock.turns(layer)
        assert stored["question"] == "slow question" and stored["answer"] and stored["answer"] in turn["answer"]
        assert stored["meta"] == "stopped: the plugin was unloaded"
        assert "stopped: the plugin was unloaded" in again.dock.conversation_text(layer)
    finally:
        again.unload()


def test_unload_while_a_render_is_written_raises_nothing(plugin, raster_layer, stub_engine):
    """The write task of a web/virtual layer's render called back into the deleted renderer."""
    import time

    from conftest import python_errors, set_settings, virtual_raster_layer, wait_for_tasks, wait_until
    from qgis.core import QgsApplication
    from qgis.PyQt.QtCore import QCoreApplication, QEvent

    with python_errors() as errors:
        set_settings(render_max_px=6000)  # a write that takes a moment (never finer than the layer's pixels)
        virt = virtual_raster_layer(raster_layer("src"), size=(6000, 4500))
        plugin.dock.set_layer(virt)
        plugin.dock.ask("what is this?")
        renderer = plugin.dock.renderer
        wait_until(lambda: renderer.task is not None, 60, "the write task")
        plugin.unload()
        QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
        wait_for_tasks(60)
        for _ in range(10):
            QgsApplication.processEvents()
            time.sleep(0.05)
    assert errors == [] and stub_engine.requests == []


def _deferred_deletes():
    """Run the deleteLater()s posted so far (the task manager deletes a task once it ended)."""
    from qgis.PyQt.QtCore import QCoreApplication, QEvent

    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)


def test_cancelling_a_render_whose_write_task_ended_raises_nothing(raster_layer, tmp_path):
    """The task manager deletes the write task once it ended: cancel() then raised RuntimeError
    (wrapped C/C++ object has been deleted), e.g. the batch dialog's Cancel or unload, which
    cancel every renderer of the run, the finished ones too."""
    from conftest import python_errors, virtual_raster_layer, wait_for_tasks, wait_until
    from geovqa.render import LayerRenderer

    virt = virtual_raster_layer(raster_layer("src"))
    done = []
    with python_errors() as errors:
        renderer = LayerRenderer(virt, virt.extent(), str(tmp_path / "render.tif"), 256)
        renderer.done.connect(lambda path, error: done.append((path, error)))
        renderer.start()
        wait_until(lambda: done, 60, "the render")
        wait_for_tasks()
        _deferred_deletes()  # the write task is deleted
        renderer.cancel()
        renderer.cancel()  # twice is harmless too
    assert errors == [] and done == [(str(tmp_path / "render.tif"), "")]


def test_cancelling_a_batch_after_one_of_its_renders_ended_raises_nothing(plugin, raster_layer, stub_engine,
                                                                            qgis_iface):
    """The batch dialog keeps every renderer of the run and cancels them all on Cancel."""
    from conftest import batch_of_two_rendered_layers, python_errors, wait_for_tasks, wait_until

    dlg, _, v2, finished = batch_of_two_rendered_layers(plugin, raster_layer, qgis_iface)
    with python_errors() as errors:
        dlg.run()
        wait_until(lambda: dlg._rendering is not None and dlg._rendering[0] == v2.id(), 60, "v1 rendered")
        _deferred_deletes()  # v1's write task is gone
        dlg.cancel()
        wait_for_tasks()
    assert errors == [] and finished == [[]] and "cancelled" in dlg.message.text()
    assert stub_engine.requests == []


# --- stopping the local engine without freezing QGIS ------------------------------------------
# stop() used to wait for the engine in the main thread (QProcess.waitForFinished, up to 7 s):
# QGIS froze whenever the user stopped an engine that was slow to end.

STUBBORN_ENGINE = '''
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # an engine busy in native code, deaf to SIGTERM
print("ready", flush=True)
time.sleep(120)
'''


def _stand_in_settings(tmp_path, source: str, name: str = "stand-in", **values):
    """Settings whose local engine runs ``source`` (``-m engine serve`` and ``-m engine info``
    run the ``engine`` package of the engine folder) with the python running the tests."""
    import sys

    from conftest import free_port, set_settings

    folder = tmp_path / name
    (folder / "engine").mkdir(parents=True)
    (folder / "engine" / "__init__.py").write_text("")
    (folder / "engine" / "__main__.py").write_text(source)
    settings = dict(python=sys.executable, engine_dir=str(folder), weights_dir="", extra_args="",
                    engine_url=f"http://127.0.0.1:{free_port()}")
    settings.update(values)
    return set_settings(**settings)


@contextlib.contextmanager
def _stand_in_run(settings, timeout: float = 30):
    """An EngineProcess started with ``settings`` whose stand-in engine runs to its own end:
    yields ``(process, its states)`` once it has stopped or failed (within ``timeout`` s), and
    shuts the process down after the block."""
    from conftest import wait_until
    from geovqa.engine_process import EngineProcess

    proc = EngineProcess()
    states = []
    proc.state_changed.connect(states.append)
    proc.start(settings)
    try:
        wait_until(lambda: states[-1] in ("stopped", "failed"), timeout, "the stand-in engine")
        yield proc, states
    finally:
        proc.shutdown(wait_ms=200)


def _stubborn_settings(tmp_path):
    """Settings whose local engine is a python that ignores SIGTERM."""
    return _stand_in_settings(tmp_path, STUBBORN_ENGINE, "stubborn")


def _stubborn_engine(tmp_path):
    """:func:`_stubborn_settings`, and a started EngineProcess for them."""
    from conftest import wait_until
    from geovqa.engine_process import EngineProcess

    settings = _stubborn_settings(tmp_path)
    proc = EngineProcess()
    states = []
    proc.state_changed.connect(states.append)
    proc.start(settings)
    wait_until(lambda: "ready" in proc.lines, 30, "the stand-in engine")
    return proc, states


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie is gone as far as anyone cares
        return fh.read().split(") ")[-1].split()[0] != "Z"


def test_stop_returns_at_once_and_kills_an_engine_deaf_to_sigterm(tmp_path, monkeypatch):
    import time

    from conftest import wait_until
    from geovqa import engine_process
    from geovqa.engine_process import EngineProcessError
    from geovqa.settings import Settings

    monkeypatch.setattr(engine_process, "STOP_GRACE_MS", 1500, raising=False)
    proc, states = _stubborn_engine(tmp_path)
    pid = proc.proc.processId()
    try:
        began = time.monotonic()
        proc.stop()
        assert time.monotonic() - began < 0.5  # the user interface goes on at once
        assert proc.is_stopping() and proc.is_running() and _alive(pid)
        assert states[-1] == "stopping"
        with pytest.raises(EngineProcessError, match="still stopping"):
            proc.start(Settings.load())
        wait_until(lambda: not proc.is_running(), 15, "the engine killed after the grace period")
        assert time.monotonic() - began >= 1.4
        assert not _alive(pid) and not proc.is_stopping()
        assert states[-1] == "stopped"  # asked to stop: not reported as a failure
        assert "killed" in proc.log_text()
    finally:
        proc.shutdown(wait_ms=200)


def test_stop_pressed_again_keeps_the_first_grace_period(tmp_path, monkeypatch):
    """Stop local engine chosen twice (the engine is slow to end): it is asked once, says
    "stopping" once, and is killed when the first grace period ends, not a whole one later."""
    import time

    from conftest import wait_until
    from geovqa import engine_process

    monkeypatch.setattr(engine_process, "STOP_GRACE_MS", 1500, raising=False)
    proc, states = _stubborn_engine(tmp_path)
    try:
        began = time.monotonic()
        proc.stop()
        time.sleep(1.2)
        proc.stop()
        wait_until(lambda: not proc.is_running(), 15, "the engine killed after the grace period")
        assert time.monotonic() - began < 2.4  # not 1.2 + 1.5 s
        assert states.count("stopping") == 1 and states[-1] == "stopped"
    finally:
        proc.shutdown(wait_ms=200)


def test_shutdown_ends_a_deaf_engine_within_its_bounded_wait(tmp_path):
    import time

    proc, states = _stubborn_engine(tmp_path)
    pid = proc.proc.processId()
    began = time.monotonic()
    proc.shutdown(wait_ms=500)
    assert time.monotonic() - began < 3
    assert not proc.is_running() and not _alive(pid)
    assert "failed" not in states


# An engine deaf to terminate(), as every console program is on Windows (QProcess.terminate()
# posts WM_CLOSE there), that ends cleanly at its standard input's end when told to.
DEAF_ENGINE_ENDING_AT_EOF = '''
import os, signal, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", os.environ.get("GEOVQA_STOP_ON_STDIN_EOF"), flush=True)
sys.stdin.buffer.read()
print("input closed: ending", flush=True)
'''


def test_stop_ends_an_engine_deaf_to_signals_by_closing_its_input_not_by_a_kill(tmp_path, monkeypatch):
    """On Windows every Stop local engine was a kill after the grace period: terminate() is
    WM_CLOSE there, which a console Python never sees, so uvicorn's graceful shutdown and the
    jobs' state saving never ran. Stop now closes the engine's standard input first."""
    import time

    from conftest import wait_until
    from geovqa import engine_process
    from geovqa.engine_process import EngineProcess

    monkeypatch.setattr(engine_process, "STOP_GRACE_MS", 8000)
    proc = EngineProcess()
    states = []
    proc.state_changed.connect(states.append)
    proc.start(_stand_in_settings(tmp_path, DEAF_ENGINE_ENDING_AT_EOF, "deaf"))
    try:
        wait_until(lambda: proc.lines and proc.lines[0].startswith("ready"), 30, "the stand-in engine")
        assert proc.lines[0] == "ready 1"  # told to end at its input's end
        began = time.monotonic()
        proc.stop()
        wait_until(lambda: not proc.is_running(), 10, "the engine ending")
        assert time.monotonic() - began < 4, proc.log_text()  # well within the grace period
        assert "input closed: ending" in proc.lines and "[engine exited with code 0]" in proc.lines
        assert "killed" not in proc.log_text() and states[-1] == "stopped"
    finally:
        proc.shutdown(wait_ms=200)


def test_stop_ends_the_real_engine_gracefully_without_a_signal(tmp_path, monkeypatch):
    """The real `serve` (tiny model), started and stopped as the plugin does: it ends by itself
    at its input's end (uvicorn's graceful shutdown, exit code 0), long before terminate()."""
    import os
    import time

    from conftest import ENGINE_PY, ENGINE_ROOT, _engine_importable, _tiny_checkpoint, wait_until
    from geovqa import engine_process
    from geovqa.engine_process import EngineProcess

    ok, why = _engine_importable()
    if not ok:
        pytest.skip(f"the engine in {ENGINE_ROOT}/.venv cannot be imported ({why})")
    env = {"GEOVQA_CONFIG_DIR": str(tmp_path / "config"), "GEOVQA_CACHE_DIR": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    tiny = _tiny_checkpoint(dict(os.environ, **env))
    settings = _stand_in_settings(tmp_path, "", python=str(ENGINE_PY), engine_dir=str(ENGINE_ROOT),
                                  weights_dir=str(tiny),
                                  extra_args=f'--state-dir "{tmp_path / "state"}" --log-level info')
    monkeypatch.setattr(engine_process, "STOP_GRACE_MS", 30000)  # terminate() would come after 15 s
    proc = EngineProcess()
    states = []
    proc.state_changed.connect(states.append)
    proc.start(settings, extra_env=env)
    try:
        wait_until(lambda: any("GeoVQA engine on http://" in ln for ln in proc.lines)
                   or not proc.is_running(), 240, "the engine loading its model")
        wait_until(lambda: any("Uvicorn running" in ln or "Application startup complete" in ln
                               for ln in proc.lines) or not proc.is_running(), 60, "the engine listening")
        assert proc.is_running(), proc.log_text()
        began = time.monotonic()
        proc.stop()
        wait_until(lambda: not proc.is_running(), 20, "the engine ending")
        assert time.monotonic() - began < 10, proc.log_text()
        log = proc.log_text()
        assert "closed its standard input" in log and "Application shutdown complete" in log, log
        assert "[engine exited with code 0]" in proc.lines and "killed" not in log, log
        assert states[-1] == "stopped"
    finally:
        proc.shutdown(wait_ms=200)


def test_stopping_shows_in_the_docks_status_line(plugin, tmp_path):
    from conftest import wait_until

    proc, _ = _stubborn_engine(tmp_path)
    plugin.engine.shutdown()  # the plugin's own, idle; the stand-in takes its place
    plugin.engine = plugin.dock.engine_process = proc
    proc.state_changed.connect(plugin._engine_state)
    try:
        plugin.stop_engine()
        wait_until(lambda: "stopping" in plugin.dock.status_label.text(), 10, "the stopping status line")
        wait_until(lambda: not proc.is_running(), 15, "the engine killed")
        wait_until(lambda: "stopping" not in plugin.dock.status_label.text(), 15, "the status line after")
        assert plugin.dock.status_level == "down"
    finally:
        proc.shutdown(wait_ms=200)


def _stand_in_for_the_plugins_engine(plugin, tmp_path):
    """A started :func:`_stubborn_engine` (running, not listening: a model still loading) as the
    plugin's local engine."""
    proc, _ = _stubborn_engine(tmp_path)
    plugin.engine.shutdown()  # the plugin's own, idle; the stand-in takes its place
    plugin.engine = plugin.dock.engine_process = proc
    proc.state_changed.connect(plugin._engine_state)
    return proc


def _status_after_a_check(dock) -> str:
    from conftest import wait_until

    wait_until(lambda: dock._health_task is None, 15, "the running health check")
    dock.refresh_health()
    wait_until(lambda: dock._health_task is None, 15, "the health check")
    return dock.status_label.text()


def test_the_status_line_says_starting_only_for_the_url_the_local_engine_serves(plugin, tmp_path):
    """With a local engine running, the status line said "The local engine is starting (loading
    the model) …" whenever the health check failed, whatever the URL: also for an engine URL on
    another port (here one nobody listens on)."""
    from conftest import free_port, set_settings
    from geovqa.settings import Settings

    proc = _stand_in_for_the_plugins_engine(plugin, tmp_path)
    served = Settings.load().engine_url
    try:
        assert "The local engine is starting" in _status_after_a_check(plugin.dock)
        other = f"http://127.0.0.1:{free_port()}"
        set_settings(engine_url=other)
        text = _status_after_a_check(plugin.dock)
        assert "starting" not in text and "Engine not reachable at 127.0.0.1:" in text, text
        assert plugin.dock.status_level == "down"
        set_settings(engine_url=served.replace("127.0.0.1", "localhost"))  # the same engine
        assert "The local engine is starting" in _status_after_a_check(plugin.dock)
    finally:
        proc.shutdown(wait_ms=200)


def test_the_local_engine_serves_no_other_computer_on_its_port(plugin, tmp_path):
    """The engine started here answers on this computer only: the same port on another host is
    another engine (its refusals are not this one loading its model)."""
    from geovqa.settings import Settings

    proc = _stand_in_for_the_plugins_engine(plugin, tmp_path)
    served = Settings.load().engine_url
    try:
        assert proc.serves(served) and proc.serves(served.replace("127.0.0.1", "localhost"))
        assert not proc.serves(served.replace("127.0.0.1", "gpu.example.org"))
        assert not proc.serves(served.replace("127.0.0.1", "192.168.1.20"))
    finally:
        proc.shutdown(wait_ms=200)


def test_a_question_asked_while_the_local_engine_loads_says_to_wait_not_to_start_it(plugin, raster_layer, tmp_path):
    """Start local engine, then a question while the model loads: it failed at once with "not
    reachable ... Start it with Plugins > GeoVQA > Start local engine" (the engine that was
    starting). The batch dialog said the same in every row."""
    from conftest import run_batch_dialog, wait_until

    proc = _stand_in_for_the_plugins_engine(plugin, tmp_path)
    try:
        layer = raster_layer()
        dock = plugin.dock
        dock.set_layer(layer)
        done = []
        dock.answer_finished.connect(done.append)
        dock.ask("What is there?")
        wait_until(lambda: done, 30, "the answer")
        error = done[0].get("error") or ""
        assert "still loading the model" in error and "Ask again when the status line" in error, error
        assert "Start local engine" not in error, error
        assert "The local engine is starting" in _status_after_a_check(dock)

        _dlg, rows = run_batch_dialog(plugin, [layer], "What is there?")
        assert rows and all("still loading the model" in r["error"] for r in rows), rows
        assert not any("Start local engine" in r["error"] for r in rows), rows
    finally:
        proc.shutdown(wait_ms=200)


def test_an_engine_stopped_while_it_failed_to_start_leaves_no_stopping_state_behind(tmp_path):
    """stop() during a start that then fails (errorOccurred(FailedToStart), no finished) left the
    process marked as stopping: the next engine showed as "stopping" and its crash was reported
    as "stopped"."""
    import os
    import signal
    import time

    from conftest import free_port, set_settings, wait_until
    from geovqa.engine_process import EngineProcess

    python = tmp_path / "python"  # an executable file, whose interpreter does not exist
    python.write_text("#!/nonexistent/interpreter\n")
    os.chmod(python, 0o755)
    settings = set_settings(python=str(python), engine_dir=str(tmp_path), weights_dir="", extra_args="",
                            engine_url=f"http://127.0.0.1:{free_port()}")
    proc = EngineProcess()
    states = []
    proc.state_changed.connect(states.append)
    proc.start(settings)
    time.sleep(0.3)  # the exec fails meanwhile; QProcess learns it from the event loop
    proc.stop()
    wait_until(lambda: states[-1] == "failed", 10, "the failure to start")
    assert states == ["starting", "stopping", "failed"] and not proc.is_running()
    assert not proc.is_stopping()

    states.clear()
    proc.start(_stubborn_settings(tmp_path))  # the next engine, which runs
    try:
        wait_until(lambda: "running" in states and proc.lines and proc.lines[-1] == "ready", 30, "the next engine")
        assert not proc.is_stopping()
        os.kill(proc.proc.processId(), signal.SIGKILL)  # it crashes: a failure, not a stop
        wait_until(lambda: states[-1] in ("failed", "stopped"), 15, "the crash")
        assert states[-1] == "failed", states
    finally:
        proc.shutdown(wait_ms=200)


def test_a_stop_ended_by_a_signal_is_no_failure_in_qt6s_signal_order():
    """Qt6 ends the process (state NotRunning) before it emits errorOccurred(Crashed), then
    finished: a stop that needed a signal was reported "failed" twice (Qt5 emits the error while
    the process still runs). Replayed here in Qt6's order on a process that has ended."""
    from geovqa.engine_process import NOT_RUNNING, EngineProcess
    from qgis.PyQt.QtCore import QProcess

    class Ended:  # a QProcess after Qt6's cleanup()
        def state(self):
            return NOT_RUNNING

    proc = EngineProcess()
    states = []
    proc.state_changed.connect(states.append)
    proc.proc = proc._stopping = Ended()  # stop() was asked for
    proc._error(QProcess.ProcessError.Crashed)
    proc._finished(15)  # SIGTERM
    assert states == ["stopped"]

    states.clear()  # the same order for a crash nobody asked for is one failure
    proc.proc = Ended()
    proc._error(QProcess.ProcessError.Crashed)
    proc._finished(9)
    assert states == ["failed"]


def test_quitting_qgis_starts_no_engine_status_check(plugin, tmp_path):
    """aboutToQuit -> EngineProcess.shutdown() ends the engine, whose "stopped" made the dock queue
    a HealthTask while QGIS was quitting."""
    from conftest import wait_for_tasks
    from qgis.core import QgsApplication

    proc, states = _stubborn_engine(tmp_path)
    plugin.engine.shutdown()
    plugin.engine = plugin.dock.engine_process = proc
    proc.state_changed.connect(plugin._engine_state)
    wait_for_tasks()
    assert plugin.dock._health_task is None
    proc.shutdown(wait_ms=200)  # what QGIS quitting calls (aboutToQuit)
    assert not proc.is_running() and states[-1] == "stopped"
    assert plugin.dock._health_task is None
    assert not [t for t in QgsApplication.taskManager().activeTasks() if t.description() == "GeoVQA: engine status"]
    plugin.dock.refresh_health()  # nothing else starts one either, once the engine's shutdown began
    assert plugin.dock._health_task is None


# --- the engine's environment -----------------------------------------------------------------

ENV_REPORTING_ENGINE = '''
import json, os
print(json.dumps({name: os.environ.get(name) for name in ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP")}),
      flush=True)
'''


def test_qgis_python_settings_do_not_reach_the_local_engine(tmp_path, monkeypatch):
    """QGIS from OSGeo4W (Windows) runs with PYTHONHOME / PYTHONPATH set for the Python inside
    QGIS. Passed on, they made the engine's venv Python stop at once, for Start local engine and
    for Check memory alike."""
    import json

    from conftest import wait_until
    from geovqa.engine_process import MemoryCheck

    monkeypatch.setenv("PYTHONHOME", str(tmp_path / "qgis-python"))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "qgis-python" / "lib"))
    monkeypatch.setenv("PYTHONSTARTUP", str(tmp_path / "qgis-startup.py"))
    settings = _stand_in_settings(tmp_path, ENV_REPORTING_ENGINE)
    unset = {"PYTHONHOME": None, "PYTHONPATH": None, "PYTHONSTARTUP": None}

    with _stand_in_run(settings) as (proc, states):
        assert states[-1] == "stopped", proc.log_text()
        assert json.loads(proc.lines[0]) == unset

    check = MemoryCheck()
    done = []
    check.done.connect(lambda report, error: done.append((report, error)))
    check.start(settings)
    wait_until(lambda: done, 30, "the memory check")
    assert done == [(unset, "")]


# The real engine's CRS naming (engine/heatmap.py crs_member) and a CRS lookup, in the engine's
# venv; also which of the user's GDAL settings it got.
CRS_REPORTING_ENGINE = '''
import os, sys
del sys.modules["engine"]  # this stand-in; from here on the real engine of this checkout
sys.path.insert(0, {root!r})
from rasterio.crs import CRS
from engine.heatmap import crs_member
wkt = \'PROJCS["WGS 84 / UTM zone 33N",GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563]],PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433]],PROJECTION["Transverse_Mercator"],PARAMETER["latitude_of_origin",0],PARAMETER["central_meridian",15],PARAMETER["scale_factor",0.9996],PARAMETER["false_easting",500000],PARAMETER["false_northing",0],UNIT["metre",1],AUTHORITY["EPSG","32633"]]\'
print("anchors crs:", crs_member(wkt)["properties"]["name"][:40], flush=True)
try:
    CRS.from_epsg(32633)
    print("crs ok", flush=True)
except Exception as exc:
    print("crs failed:", exc, flush=True)
print("GDAL_CACHEMAX", os.environ.get("GDAL_CACHEMAX"), flush=True)
'''


@pytest.mark.skipif(not Path("/usr/share/proj/proj.db").is_file(), reason="needs another PROJ's data (the system's)")
def test_qgis_gdal_and_proj_data_do_not_reach_the_local_engine(tmp_path, monkeypatch):
    """QGIS on Windows (OSGeo4W, the standalone installer) runs with GDAL_DATA, GDAL_DRIVER_PATH
    and PROJ_DATA / PROJ_LIB pointing at its own GDAL and PROJ; QGIS.app sets GDAL_DRIVER_PATH.
    The engine's rasterio (a wheel) has its own: fed QGIS's proj.db, every CRS lookup failed and
    the anchors GeoJSON named its CRS by raw WKT. Here the system's PROJ data plays QGIS's part
    (another PROJ version than rasterio's wheel). The user's GDAL options still reach it."""
    from conftest import ENGINE_PY

    monkeypatch.setenv("PROJ_DATA", "/usr/share/proj")
    monkeypatch.setenv("PROJ_LIB", "/usr/share/proj")
    monkeypatch.setenv("GDAL_DATA", "/usr/share/gdal")
    monkeypatch.setenv("GDAL_DRIVER_PATH", str(tmp_path / "qgis-gdal-plugins"))
    monkeypatch.setenv("GDAL_CACHEMAX", "512")
    settings = _stand_in_settings(tmp_path, CRS_REPORTING_ENGINE.format(root=str(ROOT)), python=str(ENGINE_PY))
    with _stand_in_run(settings, timeout=60) as (proc, _):
        lines = [ln for ln in proc.lines if not ln.startswith("ERROR")]
        assert lines[:3] == ["anchors crs: urn:ogc:def:crs:EPSG::32633", "crs ok", "GDAL_CACHEMAX 512"], \
            proc.log_text()
        assert not any(ln.startswith("ERROR") for ln in proc.lines), proc.log_text()  # PROJ's complaints


NON_ASCII_REFUSAL = '''
raise SystemExit("error: state folder C:\\\\Users\\\\Jos\\u00e9\\\\AppData\\\\Local\\\\geovqa\\\\server is in use "
                 "by another engine server.")
'''


def test_the_engines_refusal_naming_a_non_ascii_folder_reads_right_on_windows(tmp_path, monkeypatch):
    """Windows' Python writes a pipe in the ANSI code page (cp1252 on western Windows), and the
    plugin reads the engine's output as UTF-8: "C:\\Users\\José" came out garbled.
    PYTHONIOENCODING=cp1252 in QGIS's environment stands for that default here."""
    monkeypatch.setenv("PYTHONIOENCODING", "cp1252")
    with _stand_in_run(_stand_in_settings(tmp_path, NON_ASCII_REFUSAL)) as (proc, states):
        assert states[-1] == "failed"
        assert "C:\\Users\\José\\AppData" in proc.failure_reason(), proc.failure_reason()


PARENT_PID_REPORTING_ENGINE = '''
import os
print("parent", os.environ.get("GEOVQA_PARENT_PID"), flush=True)
'''


def test_the_local_engine_is_told_which_qgis_to_end_with(tmp_path):
    """A QGIS that crashed (or was killed) left its engine running, holding the port and the GPU
    memory; the engine now ends when the process in GEOVQA_PARENT_PID has ended
    (tests/engine/test_server_startup.py), and the plugin sets it to QGIS's own pid."""
    import os

    with _stand_in_run(_stand_in_settings(tmp_path, PARENT_PID_REPORTING_ENGINE)) as (proc, _):
        assert list(proc.lines)[0] == f"parent {os.getpid()}", proc.log_text()


def test_stop_local_engine_says_when_this_qgis_started_none(plugin, qgis_iface):
    """An engine this QGIS did not start (a terminal's, another QGIS's): Stop local engine
    silently did nothing."""
    from qgis.core import Qgis

    bar = qgis_iface.messageBar()
    bar.clear_messages()
    assert plugin.stop_engine() is False
    texts = bar.get_messages(Qgis.MessageLevel.Warning)
    assert any("No local engine started from this QGIS is running" in t for t in texts), texts
