"""What `ask` prints around the answer. With `--weights weights/GeoLLaVA-8K` (the default folder,
as `make serve` and the README's examples name it) and no checkpoint there, the engine falls back to
the demo model 'as if not given' (engine/pipeline.py resolve_weights), but the NOTE said the folder
itself was the demo model. And the [stage] lines (stderr) ran into the streamed answer (stdout)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

try:
    from tests.engine.rasters import write_geotiff
except ImportError:  # pragma: no cover
    from rasters import write_geotiff

REPO = Path(__file__).resolve().parents[2]


def test_ask_with_the_missing_default_folder_says_no_weights_found(tmp_path):
    scene = write_geotiff(tmp_path / "scene.tif", np.full((3, 64, 80), 90, np.uint8), crs="EPSG:32633")
    default = REPO / "weights" / "GeoLLaVA-8K"
    if default.exists():
        pytest.skip("this checkout has weights/GeoLLaVA-8K")
    env = dict(os.environ, GEOVQA_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("GEOVQA_WEIGHTS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "ask", str(scene), "q?", "--weights", "weights/GeoLLaVA-8K",
         "--max-new-tokens", "2", "--output-dir", str(tmp_path / "out")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    # the folder does not exist; it is not "the tiny RANDOM demo model"
    assert "weights/GeoLLaVA-8K is the tiny RANDOM demo model" not in proc.stderr, proc.stderr[-600:]
    assert "no GeoLLaVA-8K weights found" in proc.stderr, proc.stderr[-600:]


def test_ask_status_lines_start_their_own_line_after_the_answer(tmp_path):
    """In a terminal stdout (the streamed answer) and stderr (the [stage] lines) share one screen:
    the answer ends without a newline and '[write] writing the heatmap' is glued to its last
    word ('^ botock[write] writing the heatmap')."""
    scene = write_geotiff(tmp_path / "scene.tif", np.full((3, 64, 80), 90, np.uint8), crs="EPSG:32633")
    env = dict(os.environ, GEOVQA_CACHE_DIR=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    env.pop("GEOVQA_WEIGHTS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "ask", str(scene), "q?", "--max-new-tokens", "3",
         "--output-dir", str(tmp_path / "out")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout
    glued = [line for line in proc.stdout.splitlines() if "[write]" in line and not line.startswith("[write]")]
    assert not glued, glued
