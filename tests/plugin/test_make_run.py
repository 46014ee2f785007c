"""`make run` (scripts/run.sh) for real: engine with the tiny demo model, then the QGIS desktop
(under xvfb-run) with the plugin installed in a throwaway profile and already configured."""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap

import pytest

from conftest import ROOT, free_port

SMOKE = textwrap.dedent('''
    import qgis.utils
    from qgis.PyQt.QtCore import QTimer
    from qgis.core import QgsApplication
    state = {"n": 0}
    def check():
        state["n"] += 1
        p = qgis.utils.plugins.get("geovqa")
        level = getattr(p.dock, "status_level", None) if p is not None and p.dock is not None else None
        if level in ("ok", "demo") or state["n"] > 60:
            with open(OUT, "w") as fh:
                fh.write(f"loaded={p is not None}\\nlevel={level}\\n")
                fh.write("provider=%s\\n" % (QgsApplication.processingRegistry().providerById("geovqa") is not None))
                fh.write("status=" + (p.dock.status_label.text() if p is not None and p.dock else "") + "\\n")
            QgsApplication.exit(0)
        else:
            if p is not None and p.dock is not None:
                p.dock.refresh_health()
            QTimer.singleShot(1000, check)
    QTimer.singleShot(2000, check)
''')


def test_make_run_starts_engine_and_qgis_with_the_plugin(tmp_path):
    for tool in ("qgis", "xvfb-run"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    engine_py = ROOT / ".venv" / "bin" / "python"
    if not engine_py.exists():
        pytest.skip("no engine environment .venv yet (make setup makes it)")
    if subprocess.run([str(engine_py), "-c", "import engine.server"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("the engine in .venv cannot serve yet")
    out = tmp_path / "smoke.out"
    smoke = tmp_path / "smoke.py"
    smoke.write_text(f"OUT = {str(out)!r}\n" + SMOKE)
    wrapper = tmp_path / "qgis.sh"
    wrapper.write_text(f"#!/bin/sh\nexec xvfb-run -a {shutil.which('qgis')} --nologo --noversioncheck "
                       f"--code {smoke} \"$@\"\n")
    wrapper.chmod(0o755)
    env = dict(os.environ, QGIS_BIN=str(wrapper), PORT=str(free_port()), PYTHONDONTWRITEBYTECODE="1",
               OMP_NUM_THREADS="1")
    env.pop("QT_QPA_PLATFORM", None)
    r = subprocess.run(["bash", str(ROOT / "scripts" / "run.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=420)
    log = r.stdout[-3000:] + r.stderr[-3000:]
    assert r.returncode == 0, log
    assert "TINY RANDOM DEMO MODEL" in r.stdout or "GeoLLaVA-8K checkpoint" in r.stdout
    assert "Stopping the engine" in r.stdout
    text = out.read_text()
    assert "loaded=True" in text and "provider=True" in text, text + log
    assert "level=demo" in text or "level=ok" in text, text + log


def test_make_run_reports_a_damaged_checkpoint_instead_of_the_demo(tmp_path):
    """A weights folder holding part of a checkpoint (a cut-off copy) stops `make run` with the
    engine's reason; it used to start the demo model with a banner saying the folder was empty."""
    engine_py = ROOT / ".venv" / "bin" / "python"
    if not engine_py.exists():
        pytest.skip("no engine environment .venv yet (make setup makes it)")
    if subprocess.run([str(engine_py), "-c", "import engine.server"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("the engine in .venv cannot serve yet")
    weights = tmp_path / "GeoLLaVA-8K"
    weights.mkdir()
    (weights / "config.json").write_text('{"model_type": "llava_qwen"')  # cut off mid-file
    env = dict(os.environ, WEIGHTS=str(weights), NO_QGIS="1", PORT=str(free_port()), PYTHONDONTWRITEBYTECODE="1")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "run.sh")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0
    assert "TINY RANDOM DEMO MODEL" not in r.stdout
    assert "config.json" in r.stderr and "The engine exited while starting" in r.stderr, r.stdout + r.stderr


@pytest.mark.parametrize("variable", ["WEIGHTS", "GEOVQA_WEIGHTS"])
def test_make_run_with_a_named_checkpoint_folder_that_is_missing_stops_instead_of_the_demo(tmp_path, variable):
    """`make run WEIGHTS=/data/GeoLLaVA-8k` (a typo), or GEOVQA_WEIGHTS naming a folder without a
    checkpoint: run.sh started the demo model under a banner saying weights/GeoLLaVA-8K was empty
    (GEOVQA_WEIGHTS was not read at all). A folder the user names is the engine's to judge."""
    engine_py = ROOT / ".venv" / "bin" / "python"
    if not engine_py.exists():
        pytest.skip("no engine environment .venv yet (make setup makes it)")
    missing = tmp_path / "GeoLLaVA-8k-typo"
    env = dict(os.environ, NO_QGIS="1", PORT=str(free_port()), PYTHONDONTWRITEBYTECODE="1")
    env.pop("WEIGHTS", None)
    env.pop("GEOVQA_WEIGHTS", None)
    env[variable] = str(missing)
    r = subprocess.run(["bash", str(ROOT / "scripts" / "run.sh")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0
    assert "TINY RANDOM DEMO MODEL" not in r.stdout, r.stdout
    assert f"Using the checkpoint in {missing} (named by {variable})" in r.stdout, r.stdout
    assert "does not exist" in r.stderr and "The engine exited while starting" in r.stderr, r.stdout + r.stderr


def test_make_runs_readiness_check_goes_past_an_http_proxy(tmp_path):
    """A shell with http_proxy set (and no no_proxy): run.sh's readiness check sent
    http://127.0.0.1:PORT/health to the proxy, so the engine never looked ready (10 minutes,
    then 'did not become ready'). The check, as run.sh runs it, must reach the engine directly."""
    import re
    import sys

    from stub_engine import StubEngine

    script = (ROOT / "scripts" / "run.sh").read_text()
    (check,) = [s for s in re.findall(r"<<'PYEOF'[^\n]*\n(.*?)\nPYEOF", script, re.S) if "/health" in s]
    engine = StubEngine(tmp_path / "stub_out")
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    env = dict(os.environ, http_proxy=dead_proxy, HTTP_PROXY=dead_proxy)
    env.pop("no_proxy", None)
    env.pop("NO_PROXY", None)
    try:
        done = subprocess.run([sys.executable, "-", engine.url], input=check, env=env, capture_output=True,
                              text=True, timeout=30)
    finally:
        engine.close()
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


def test_the_plugins_client_reaches_the_engine_past_an_http_proxy(tmp_path, monkeypatch):
    """The plugin's own calls (http.client) go straight to the engine: a proxy set for QGIS's
    environment never carries them (run.sh's check above did)."""
    from geovqa.client import EngineClient
    from stub_engine import StubEngine

    engine = StubEngine(tmp_path / "stub_out")
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, dead_proxy)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    try:
        assert EngineClient(engine.url, engine.token).health()["status"] == "ok"
    finally:
        engine.close()


def test_make_run_with_weights_naming_the_empty_default_folder_says_the_demo_model(tmp_path):
    """`make run WEIGHTS=weights/GeoLLaVA-8K` (the default folder, named, still empty): run.sh says
    'Using the checkpoint in weights/GeoLLaVA-8K (named by WEIGHTS)' and shows no banner, but the
    engine takes the empty default folder as not given and answers with the tiny RANDOM demo model."""
    import signal
    import time

    engine_py = ROOT / ".venv" / "bin" / "python"
    if not engine_py.exists():
        pytest.skip("no engine environment .venv yet (make setup makes it)")
    default = ROOT / "weights" / "GeoLLaVA-8K"
    if default.exists() and any(not p.name.startswith(".") for p in default.iterdir()):
        pytest.skip("the default weights folder holds a checkpoint here")
    env = dict(os.environ, NO_QGIS="1", PORT=str(free_port()), PYTHONDONTWRITEBYTECODE="1",
               WEIGHTS="weights/GeoLLaVA-8K")
    env.pop("GEOVQA_WEIGHTS", None)
    out = tmp_path / "run.out"
    with open(out, "w") as fh:
        p = subprocess.Popen(["bash", str(ROOT / "scripts" / "run.sh")], cwd=ROOT, env=env, stdout=fh,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and p.poll() is None and "Engine ready" not in out.read_text():
            time.sleep(1)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGINT)
            p.wait(timeout=60)
    text = out.read_text()
    engine_log = (ROOT / ".cache" / "run" / "engine.log").read_text()
    demo = "tiny RANDOM demo model" in engine_log
    # the engine ran the demo model: make run must say so (or stop, as for any other named folder)
    assert not demo or "TINY RANDOM DEMO MODEL" in text, text + engine_log[-2000:]
