"""What a run of the plugin tests leaves in the system's temporary folder: nothing of its own."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT


def test_a_plugin_test_run_leaves_no_folder_of_its_own_in_the_temporary_folder(tmp_path):
    """conftest's link folder (geovqa-pkg-*) and Processing's temporary folder were never
    removed: the run ends with os._exit, past their clean-up (hundreds piled up in /tmp)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp), QT_QPA_PLATFORM="offscreen")
    run = subprocess.run([sys.executable, "-m", "pytest", "tests/plugin/test_settings.py", "-q", "-p",
                          "no:cacheprovider", "-k", "test_bool_setting_round_trips", "--basetemp",
                          str(tmp_path / "base")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    # QGIS's own QGIS3-* folder and Qt's runtime folder are theirs, not the tests'
    left = sorted(p.name for p in tmp.iterdir() if p.name.startswith(("geovqa", "processing")))
    assert left == [], f"left in the temporary folder after the run: {left}"
