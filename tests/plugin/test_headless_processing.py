"""The installed zip, loaded the way qgis_process loads plugins (qgis.utils.startProcessingPlugin,
iface None), in a clean headless interpreter: algorithms registered and runnable."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import ROOT, free_port, qgis_process_with_plugin, write_raster

SCRIPT = textwrap.dedent('''
    import csv, sys
    from qgis.core import QgsApplication, QgsSettings
    app = QgsApplication([], False)
    app.initQgis()
    sys.path.insert(0, sys.argv[1])
    sys.path.append(QgsApplication.pkgDataPath() + "/python/plugins")  # processing, as qgis_process does
    import qgis.utils
    from processing.core.Processing import Processing
    Processing.initialize()
    assert qgis.utils.loadPlugin("geovqa")
    assert qgis.utils.startProcessingPlugin("geovqa")
    reg = QgsApplication.processingRegistry()
    assert reg.algorithmById("geovqa:ask_raster") is not None
    QgsSettings().setValue("geovqa/engine_url", sys.argv[3])
    QgsSettings().setValue("geovqa/output_dir", sys.argv[5])
    import processing
    res = processing.run("geovqa:batch_questions", {"LAYERS": [sys.argv[2]], "QUESTIONS": "a?\\nb?",
                         "STRATEGY": 0, "BUDGET": 0, "OUTPUT": sys.argv[4]})
    rows = list(csv.DictReader(open(res["OUTPUT"])))
    assert len(rows) == 2 and res["ERRORS"] == 2, rows
    assert all("not reachable" in r["error"] for r in rows), rows
    print("HEADLESS_OK")
''')


def test_loaded_like_qgis_process(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "package_plugin.py"), "--out", str(tmp_path / "dist"),
                        "--install", "--profile-dir", str(tmp_path / "profile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    plugins = tmp_path / "profile" / "python" / "plugins"
    raster = write_raster(tmp_path / "r.tif")
    script = tmp_path / "headless.py"
    script.write_text(SCRIPT)
    env = {"QT_QPA_PLATFORM": "offscreen", "QGIS_CUSTOM_CONFIG_PATH": str(tmp_path / "qgiscfg"),
           "HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run([sys.executable, str(script), str(plugins), raster, f"http://127.0.0.1:{free_port()}",
                        str(tmp_path / "out.csv"), str(tmp_path / "results")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert "HEADLESS_OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_qgis_process_batch_keeps_its_temporary_answers(stub_engine, tmp_path):
    """`qgis_process --json run geovqa:batch_questions -- LAYERS=r.tif QUESTIONS=q1` printed an
    OUTPUT in QGIS's temporary folder (/tmp/processing_*), which qgis_process deletes when it
    exits: every answer was lost. The answers (and a JSON asked for as a temporary output) are now
    new files in the results folder, still there after qgis_process has ended."""
    import csv
    import json

    results = tmp_path / "qp-results"
    qp, env = qgis_process_with_plugin(tmp_path, stub_engine, results)
    raster = write_raster(tmp_path / "r.tif")
    env["TMPDIR"] = str(tmp_path / "tmp")  # QGIS's temporary folder goes under it: seen deleted below
    (tmp_path / "tmp").mkdir()
    r = subprocess.run([qp, "--json", "run", "geovqa:batch_questions", "--", f"LAYERS={raster}",
                        "QUESTIONS=q1", "OUTPUT_JSON=TEMPORARY_OUTPUT"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(r.stdout[r.stdout.index("{"):])["results"]
    csv_out, json_out = Path(out["OUTPUT"]), Path(out["OUTPUT_JSON"])
    # the process has ended: its temporary folder is gone, the answers are not
    assert not list((tmp_path / "tmp").glob("processing_*"))
    assert csv_out.parent == results and json_out.parent == results and csv_out.is_file() and json_out.is_file()
    with open(csv_out, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["layer"], r["question"], r["answer"]) for r in rows] == [
        ("r", "q1", "The area is 64 x 48 pixels with 3 bands.")]
    assert json.loads(json_out.read_text(encoding="utf-8"))["results"][0]["answer"] == rows[0]["answer"]
    assert out["ANSWERED"] == 1 and len(stub_engine.requests) == 1
