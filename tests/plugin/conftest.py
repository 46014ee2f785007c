"""Fixtures for the plugin tests (pytest-qgis, real QGIS, offscreen).

* The plugin is imported as ``geovqa`` exactly as QGIS would (a ``geovqa`` folder on sys.path
  pointing at ``qgis_plugin/``).
* ``real_engine``: the real engine (``<repo>/.venv/bin/python -m engine serve``) on a free
  loopback port with the tiny random checkpoint (``-m engine tiny``), its own config dir and
  state dir; skipped only when ``<repo>/.venv`` cannot ``import engine.server``.
* ``stub_engine``: a protocol-following stand-in (tests/plugin/stub_engine.py) for cases the real
  engine cannot produce on demand (slow streams for supersede, injected errors).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
# The engine checkout to serve from (default: this repository; override to try another branch).
ENGINE_ROOT = Path(os.environ.get("GEOVQA_ENGINE_ROOT", str(ROOT)))
ENGINE_PY = ENGINE_ROOT / ".venv" / "bin" / "python"
_PKG_PARENT = Path(tempfile.mkdtemp(prefix="geovqa-pkg-"))
(_PKG_PARENT / "geovqa").symlink_to(ROOT / "qgis_plugin", target_is_directory=True)
sys.path.insert(0, str(_PKG_PARENT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stub_engine import StubEngine  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_engine_python(path: Path) -> Path:
    """An executable stand-in for an engine venv's python at ``path`` (folders made): enough for
    the plugin's checks of 'Engine Python'; it runs nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def set_settings(**values):
    from geovqa.settings import Settings

    s = Settings.load()
    for k, v in values.items():
        setattr(s, k, v)
    s.save()
    return s


@pytest.fixture(autouse=True)
def clean_settings(qgis_app, tmp_path):
    """Every test starts from default settings with a results folder of its own."""
    from qgis.core import QgsSettings

    QgsSettings().remove("geovqa")
    set_settings(output_dir=str(tmp_path / "results"), engine_url=f"http://127.0.0.1:{free_port()}", token="x")
    yield
    QgsSettings().remove("geovqa")


def write_raster(path, width=64, height=48, epsg=32633, origin=(500000.0, 5000000.0), pixel=10.0, bands=3,
                 georeferenced=True, nodata_half=False):
    """A small georeferenced GeoTIFF with a gradient pattern (GDAL from QGIS's Python); ``pixel``:
    the pixels' side in CRS units, or their (width, height).

    ``georeferenced=False``: no geotransform, no GCPs, no CRS (a plain image; QGIS shows it
    at x 0..width, y -height..0). ``nodata_half``: its right half is nodata (0, which the scene
    never is): QGIS draws it transparent, as a web service's area it does not cover or a
    mosaic's gaps."""
    from osgeo import gdal, osr

    ds = gdal.GetDriverByName("GTiff").Create(str(path), width, height, bands, gdal.GDT_Byte)
    if georeferenced:
        pixel_w, pixel_h = pixel if isinstance(pixel, tuple) else (pixel, pixel)
        ds.SetGeoTransform((origin[0], pixel_w, 0.0, origin[1], 0.0, -pixel_h))
        srs = osr.SpatialReference()
        srs.ImportFromEPSG(epsg)
        ds.SetProjection(srs.ExportToWkt())
    for b, band in enumerate(scene_pixels(width, height)[:bands]):
        if nodata_half:
            band[:, width // 2:] = 0
            ds.GetRasterBand(b + 1).SetNoDataValue(0)
        ds.GetRasterBand(b + 1).WriteArray(band)
    ds = None
    return str(path)


def write_gcp_file(path, width, height, points, bands=3):
    """A ``width`` x ``height`` px Byte GeoTIFF with no geotransform, placed by GCPs ``points``
    ((x, y, col, row): map coordinates in EPSG:32633 of pixel corner (col, row)); its path."""
    from osgeo import gdal, osr

    ds = gdal.GetDriverByName("GTiff").Create(str(path), width, height, bands, gdal.GDT_Byte)
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    ds.SetGCPs([gdal.GCP(x, y, 0, col, row) for x, y, col, row in points], srs.ExportToWkt())
    ds = None
    return str(path)


def write_gcp_raster(path, displaced_px=0.0):
    """A 200 x 100 px file placed by four GCPs (10 m pixels, EPSG:32633); the last one moved by
    ``displaced_px`` pixels off the affine grid the others make."""
    points = [(500000 + 10 * col, 5000000 - 10 * row, col, row) for col, row in ((0, 0), (200, 0), (0, 100))]
    points.append((500000 + 10 * (200 + displaced_px), 5000000 - 10 * 100, 200, 100))
    return write_gcp_file(path, 200, 100, points)

def scene_pixels(width, height):
    """A simple synthetic scene: fields, a river, a few bright buildings (3 x H x W uint8)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 90 + 40 * np.sin(xx / 9.0) * np.cos(yy / 11.0)
    g = 120 + 30 * np.cos(xx / 13.0)
    b = 70 + 10 * np.sin(yy / 7.0)
    river = np.abs(yy - (0.45 * height + 0.15 * height * np.sin(xx / (0.18 * width + 1)))) < 0.05 * height + 1
    r[river], g[river], b[river] = 40, 80, 160
    for i in range(5):
        cx, cy = int(width * (0.15 + 0.17 * i)), int(height * (0.2 + 0.13 * (i % 3)))
        r[cy:cy + max(2, height // 15), cx:cx + max(2, width // 15)] = 235
        g[cy:cy + max(2, height // 15), cx:cx + max(2, width // 15)] = 225
        b[cy:cy + max(2, height // 15), cx:cx + max(2, width // 15)] = 210
    return [np.clip(c, 0, 255).astype(np.uint8) for c in (r, g, b)]


def valid_cells_extent(path):
    """The box (QgsRectangle) of a heatmap's cells that hold a score (pruned tokens are nodata)."""
    from osgeo import gdal
    from qgis.core import QgsRectangle

    ds = gdal.Open(str(path))
    a = ds.GetRasterBand(1).ReadAsArray()
    nodata = ds.GetRasterBand(1).GetNoDataValue()
    rows, cols = np.nonzero(~np.isnan(a) if nodata is None or np.isnan(nodata) else a != nodata)
    gt = ds.GetGeoTransform()
    xs = (gt[0] + cols.min() * gt[1], gt[0] + (cols.max() + 1) * gt[1])
    ys = (gt[3] + rows.min() * gt[5], gt[3] + (rows.max() + 1) * gt[5])
    return QgsRectangle(min(xs), min(ys), max(xs), max(ys))


def cell_coverage_problems(path, bounds) -> list:
    """What is wrong with how a (north-up) heatmap's grid covers ``bounds`` = (xmin, ymin, xmax,
    ymax): a side of the bounds no kept cell reaches (part of the raster without heatmap), or a
    row or column of cells lying wholly outside them. Empty when every cell over the bounds is
    kept and none beyond them."""
    from osgeo import gdal

    ds = gdal.Open(str(path))
    gt = ds.GetGeoTransform()
    cx, cy = gt[1], -gt[5]
    hx0, hy1 = gt[0], gt[3]
    hx1, hy0 = hx0 + cx * ds.RasterXSize, hy1 - cy * ds.RasterYSize
    xmin, ymin, xmax, ymax = bounds
    tol = 1e-6 * max(cx, cy)
    problems = []
    for side, uncovered, outside in (
            ("left", hx0 > xmin + tol, hx0 <= xmin - cx + tol),
            ("right", hx1 < xmax - tol, hx1 >= xmax + cx - tol),
            ("bottom", hy0 > ymin + tol, hy0 <= ymin - cy + tol),
            ("top", hy1 < ymax - tol, hy1 >= ymax + cy - tol)):
        if uncovered:
            problems.append(f"the {side} of the raster has no heatmap cells")
        if outside:
            problems.append(f"a {side} line of cells lies wholly outside the raster")
    return problems


def extent_on_map(layer, map_crs):
    """Where ``layer`` lies on a map in ``map_crs`` (its extent as the map canvas places it:
    transformed from the layer's CRS; as it is when either CRS is empty)."""
    from qgis.core import QgsMapSettings

    ms = QgsMapSettings()
    ms.setDestinationCrs(map_crs)
    return ms.layerExtentToOutputExtent(layer, layer.extent())


@pytest.fixture
def raster_layer(tmp_path, qgis_new_project):
    from qgis.core import QgsProject, QgsRasterLayer

    def make(name="scene", **kw):
        path = write_raster(tmp_path / f"{name}.tif", **kw)
        layer = QgsRasterLayer(path, name, "gdal")
        assert layer.isValid()
        QgsProject.instance().addMapLayer(layer)
        return layer

    return make


@pytest.fixture
def opened_addresses(monkeypatch):
    """The (host, port) of every socket the plugin opens (dialling.open_socket, which looks the
    host up and connects, and socket.create_connection, the TLS probes'), recorded on the way
    to the real one."""
    from geovqa import dialling

    opened = []

    def recording(real):
        def record(address, *args, **kwargs):
            opened.append(tuple(address))
            return real(address, *args, **kwargs)

        return record

    monkeypatch.setattr(socket, "create_connection", recording(socket.create_connection))
    monkeypatch.setattr(dialling, "open_socket", recording(dialling.open_socket))
    return opened


@pytest.fixture
def stub_engine(tmp_path):
    eng = StubEngine(tmp_path / "stub_out")
    set_settings(engine_url=eng.url, token=eng.token)
    yield eng
    eng.close()


def _engine_importable() -> tuple[bool, str]:
    if not ENGINE_PY.exists():
        return False, f"{ENGINE_PY} does not exist"
    r = subprocess.run([str(ENGINE_PY), "-c", "import engine.server, engine.tiny"], cwd=ENGINE_ROOT,
                       capture_output=True, text=True, timeout=120)
    return r.returncode == 0, (r.stderr.strip().splitlines() or ["?"])[-1]


class RealEngine:
    def __init__(self, url, token, proc, log_path, tiny_dir):
        self.url, self.token, self.proc, self.log_path, self.tiny_dir = url, token, proc, log_path, tiny_dir

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-4000:]
        except OSError:
            return ""


def _tiny_checkpoint(env) -> Path:
    """The tiny random checkpoint, built once per engine version into <repo>/.cache/ (keyed by
    a hash of engine/tiny.py and engine/modeling.py, so a changed layout is rebuilt)."""
    import hashlib

    h = hashlib.sha256()
    for name in ("tiny.py", "modeling.py"):
        f = ENGINE_ROOT / "engine" / name
        h.update(f.read_bytes() if f.is_file() else b"-")
    cached = ROOT / ".cache" / f"tiny-geollava-test-{h.hexdigest()[:10]}"
    if (cached / "config.json").is_file() and list(cached.glob("*.safetensors")):
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="tiny-", dir=cached.parent))
    r = subprocess.run([str(ENGINE_PY), "-m", "engine", "tiny", "--dest", str(staging / "tiny")], cwd=ENGINE_ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"engine tiny failed:\n{r.stdout}\n{r.stderr}"
    try:
        (staging / "tiny").rename(cached)
    except OSError:  # built by a concurrent run meanwhile
        pass
    shutil.rmtree(staging, ignore_errors=True)
    return cached


@pytest.fixture(scope="session")
def real_engine_process():
    ok, why = _engine_importable()
    if not ok:
        pytest.skip(f"the engine in {ENGINE_ROOT}/.venv cannot be imported yet (import engine.server: {why})")
    base = Path(tempfile.mkdtemp(prefix="geovqa-engine-"))
    env = dict(os.environ, GEOVQA_CONFIG_DIR=str(base / "config"), PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("QT_QPA_PLATFORM", None)
    tiny = _tiny_checkpoint(env)
    port = free_port()
    log_path = base / "engine.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([str(ENGINE_PY), "-m", "engine", "serve", "--weights", str(tiny), "--port", str(port),
                             "--state-dir", str(base / "state")], cwd=ENGINE_ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    health = None
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"engine serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                health = json.loads(resp.read())
            if health.get("status") == "ok":
                break
        except OSError:
            pass
        time.sleep(0.5)
    else:
        proc.terminate()
        raise AssertionError(f"engine not ready in time (last health {health}):\n{log_path.read_text()[-4000:]}")
    token = (base / "config" / "token").read_text().strip()
    eng = RealEngine(url, token, proc, log_path, tiny)
    yield eng
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def real_engine(real_engine_process):
    set_settings(engine_url=real_engine_process.url, token=real_engine_process.token, max_new_tokens=8)
    return real_engine_process


@pytest.fixture
def plugin(qgis_iface):
    import geovqa

    p = geovqa.classFactory(qgis_iface)
    p.initGui()
    yield p
    p.unload()


def wait_until(predicate, timeout=60.0, message="condition"):
    """Spin the Qt event loop until ``predicate()`` is true (no pytest-qt needed)."""
    from qgis.core import QgsApplication
    from qgis.PyQt.QtCore import QEventLoop

    deadline = time.time() + timeout
    while time.time() < deadline:
        QgsApplication.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {message}")


def ask_until_first_words(dock, layer, stub_engine, question="slow question", delay=0.1, timeout=10.0) -> tuple:
    """The chat ``dock`` asks ``question`` about ``layer`` with the stand-in engine sending a word
    every ``delay`` s, and waits (at most ``timeout`` s) for the first words: ``(turn, task)`` of
    the answer, still streaming (the task as it was when the question was asked)."""
    stub_engine.token_delay = delay
    dock.set_layer(layer)
    dock.ask(question)
    turn, task = dock.current_turn, dock.task
    wait_until(lambda: turn["answer"], timeout, "the first words")
    return turn, task


def wait_for_tasks(timeout=60.0):
    from qgis.core import QgsApplication

    wait_until(lambda: QgsApplication.taskManager().countActiveTasks() == 0, timeout, "background tasks")


# ---------------------------------------------------------------------------------------------
# Ending the test process. After every test has run and the summary is printed, the final
# garbage collection of Debian's QGIS 3.22 / PyQt5 bindings (after QgsApplication.exitQgis)
# sometimes aborts with "double free or corruption" (about 1 run in 6 here), turning a passing
# run into exit code 134. QGIS itself never goes through this teardown, so the process ends
# here with the tests' own exit status instead of running it.

def pytest_sessionfinish(session, exitstatus):
    session.config._geovqa_exitstatus = int(exitstatus)


def _remove_temporary_folders():
    """The folder of the ``geovqa`` package link, and Processing's temporary folder of this run:
    ending with os._exit skips their removal (one geovqa-pkg-* folder was left a run)."""
    shutil.rmtree(_PKG_PARENT, ignore_errors=True)
    try:
        from qgis.core import QgsProcessingUtils

        shutil.rmtree(QgsProcessingUtils.tempFolder(), ignore_errors=True)
    except Exception:  # noqa: BLE001 - QGIS not initialised: no such folder
        pass


@pytest.hookimpl(tryfirst=True)
def pytest_unconfigure(config):
    _remove_temporary_folders()
    status = getattr(config, "_geovqa_exitstatus", None)
    if status is None or os.environ.get("GEOVQA_FULL_TEARDOWN"):  # set it to see the teardown
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def virtual_raster_layer(src, name: str = "virtual", size=None):
    """A layer with no file behind it (raster calculator provider) computed from `src`, added to
    the project: the plugin renders such a layer before asking about it. ``size``: its own
    (width, height) in pixels over `src`'s extent (default `src`'s): a render is never finer."""
    from qgis.core import QgsProject, QgsRasterLayer

    width, height = size or (src.width(), src.height())
    uri = (f"?crs={src.crs().authid()}&extent={src.extent().toString().replace(' : ', ',').replace(' ', '')}"
           f"&width={width}&height={height}&formula=%22{src.name()}@1%22"
           f"&{src.name()}:uri={src.source()}&{src.name()}:provider=gdal")
    layer = QgsRasterLayer(uri, name, "virtualraster")
    assert layer.isValid(), layer.error().summary()
    QgsProject.instance().addMapLayer(layer)
    return layer


def qgis_process_with_plugin(tmp_path, engine, results) -> tuple:
    """``(qgis_process, environment)``: the packaged plugin installed in a fresh QGIS profile under
    ``tmp_path``, enabled and set to ask ``engine`` (url, token), its results in ``results``.
    Skips when qgis_process is not installed. Debian's /usr/bin/qgis_process wrapper passes
    --noversioncheck (from /etc/default/qgis), which qgis_process refuses: the real binary is
    called when it is there."""
    import configparser

    qp = next((c for c in ("/usr/bin/qgis_process.bin", shutil.which("qgis_process")) if c and Path(c).exists()),
              None)
    if qp is None:
        pytest.skip("qgis_process is not installed (Debian package qgis)")
    cfg = tmp_path / "qgiscfg"
    profile = cfg / "profiles" / "default"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "package_plugin.py"), "--out", str(tmp_path / "dist"),
                        "--install", "--profile-dir", str(profile)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ini = profile / "QGIS" / "QGIS3.ini"
    ini.parent.mkdir(parents=True, exist_ok=True)
    cp = configparser.RawConfigParser()
    cp.optionxform = str
    cp["PythonPlugins"] = {"geovqa": "true"}
    cp["geovqa"] = {"engine_url": engine.url, "token": engine.token, "output_dir": str(results)}
    with open(ini, "w") as fh:
        cp.write(fh, space_around_delimiters=False)
    env = dict(os.environ, QGIS_CUSTOM_CONFIG_PATH=str(cfg), QT_QPA_PLATFORM="offscreen", PYTHONDONTWRITEBYTECODE="1")
    return qp, env


def run_then_load(alg, parameters):
    """Runs the Processing algorithm ``alg`` with ``parameters`` as the toolbox dialog does (a
    QgsProcessingAlgRunnerTask, the algorithm's own thread) and then loads its results as the
    dialog then does (handleAlgorithmResults); returns (results, handleAlgorithmResults's ok,
    errors reported)."""
    from processing.gui.Postprocessing import handleAlgorithmResults
    from processing.tools import dataobjects
    from qgis.core import QgsApplication, QgsProcessingAlgRunnerTask, QgsProcessingFeedback

    errors = []

    class Feedback(QgsProcessingFeedback):
        def reportError(self, error, fatalError=False):  # noqa: N802, N803
            errors.append(error)
            super().reportError(error, fatalError)

    feedback = Feedback()
    context = dataobjects.createContext(feedback)
    done = []
    task = QgsProcessingAlgRunnerTask(alg, parameters, context, feedback)
    task.executed.connect(lambda ok, results: done.append((ok, results)))
    QgsApplication.taskManager().addTask(task)
    wait_until(lambda: done, 60, "the algorithm run")
    ok, results = done[0]
    assert ok, errors
    loaded = handleAlgorithmResults(alg, context, feedback, False, results)
    wait_for_tasks()
    return results, loaded, errors


def start_batch(plugin, layers, questions: str, dlg=None) -> tuple:
    """The batch dialog (``dlg``, already set up by the test, or a new one) asked ``questions``
    (one a line) about ``layers``, started and not waited for: ``(dialog, done)``, where ``done``
    gets the rows of the run once it has finished (batch_finished)."""
    dlg = dlg or plugin.open_batch()
    dlg.set_checked_layers({layer.id() for layer in layers})
    dlg.questions_edit.setPlainText(questions)
    done = []
    dlg.batch_finished.connect(done.append)
    dlg.run()
    return dlg, done


def run_batch_dialog(plugin, layers, questions: str, timeout=60.0, dlg=None) -> tuple:
    """:func:`start_batch`, run to its end (and its tasks with it): ``(dialog, rows of the run)``."""
    dlg, done = start_batch(plugin, layers, questions, dlg)
    wait_until(lambda: done, timeout, "the batch")
    wait_for_tasks()
    return dlg, done[0]


def batch_of_two_rendered_layers(plugin, raster_layer, qgis_iface):
    """The batch dialog set to ask "q1" about two virtual raster layers v1, v2 (each rendered before
    it is asked about), not run yet; `finished` collects the rows of each finished run. Each has
    pixels enough for a full-size render (2048 x 1536 px): a render of 64 x 48 px (its source's
    size; a render is never finer than the layer's pixels) can start and end between two looks
    of a test waiting to see it running."""
    src = raster_layer("src")
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(src.crs())
    canvas.setExtent(src.extent())
    v1, v2 = (virtual_raster_layer(src, name, size=(2048, 1536)) for name in ("v1", "v2"))
    dlg = plugin.open_batch()
    dlg.set_checked_layers({v1.id(), v2.id()})
    dlg.questions_edit.setPlainText("q1")
    finished = []
    dlg.batch_finished.connect(lambda rows: finished.append(list(rows)))
    return dlg, v1, v2, finished


class MainThreadStallMeter:
    """A QTimer ticking every ``interval_ms`` on the main thread from its creation; ``worst`` is
    the longest gap between two ticks so far: how long the user interface froze (a main thread
    blocked by a render or a network wait shows as a gap). ``stop()`` ends it and returns
    ``worst``."""

    def __init__(self, interval_ms: int = 20):
        from qgis.PyQt.QtCore import QTimer

        self.last = time.perf_counter()
        self.worst = 0.0
        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self.tick)
        self.timer.start()

    def tick(self):
        now = time.perf_counter()
        self.worst = max(self.worst, now - self.last)
        self.last = now

    def stop(self) -> float:
        self.tick()
        self.timer.stop()
        return self.worst


def recording_feedback():
    """A QgsProcessingFeedback that keeps, in order, what the algorithm reported: ("progress",
    percent), ("text", progress text), ("info", pushInfo line), ("error", reportError line)."""
    from qgis.core import QgsProcessingFeedback

    class Recording(QgsProcessingFeedback):
        def __init__(self):
            super().__init__()
            self.log = []
            self.progressChanged.connect(lambda p: self.log.append(("progress", p)))

        def setProgressText(self, text):  # noqa: N802
            self.log.append(("text", text))
            super().setProgressText(text)

        def pushInfo(self, info):  # noqa: N802
            self.log.append(("info", info))
            super().pushInfo(info)

        def reportError(self, error, fatalError=False):  # noqa: N802, N803
            self.log.append(("error", error))
            super().reportError(error, fatalError)

        def of(self, kind):
            return [v for k, v in self.log if k == kind]

    return Recording()


@contextlib.contextmanager
def python_errors():
    """The Python errors raised in Qt slots and callbacks (sys.excepthook) while the block runs, as
    formatted tracebacks: QGIS shows each in an error dialog."""
    import traceback

    errors: list[str] = []
    old_hook = sys.excepthook
    sys.excepthook = lambda *exc: errors.append("".join(traceback.format_exception(*exc)))
    try:
        yield errors
    finally:
        sys.excepthook = old_hook
