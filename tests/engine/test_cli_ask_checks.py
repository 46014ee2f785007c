"""`python -m engine ask` checks its request as the server does (engine/request_checks.py) before
it loads a model: with the real checkpoint a load takes minutes, and a typo in the raster path
used to surface only after it."""

from __future__ import annotations

import numpy as np
import pytest

import engine.pipeline
from engine.cli import main
from rasters import write_geotiff


class RecordingEngine:
    """Stands in for `Engine` to see whether (and with what) `ask` would have loaded a model."""

    made: list = []
    asked: list = []

    def __init__(self, *args, **kwargs):
        RecordingEngine.made.append(kwargs)

    def health(self):
        return {"demo_model": False}

    def ask(self, req):
        RecordingEngine.asked.append(req)
        return iter(())


@pytest.fixture
def recorder(monkeypatch):
    RecordingEngine.made, RecordingEngine.asked = [], []
    monkeypatch.setattr(engine.pipeline, "Engine", RecordingEngine)
    return RecordingEngine


@pytest.fixture
def rgb(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (3, 64, 80), dtype=np.uint8)
    return write_geotiff(tmp_path / "scene.tif", data)


@pytest.mark.parametrize("make_args, expected", [
    (lambda d, r: [str(d / "missing.tif"), "How many ships?"], "There is no file at"),
    (lambda d, r: [str(d), "How many ships?"], "is a folder, not a raster file"),
    (lambda d, r: [r, "   "], "Please type a question"),
    (lambda d, r: [r, "How many ships?", "--bands", "5"], "Band(s) [5] do not exist; the raster has 3"),
    (lambda d, r: [r, "How many ships?", "--aoi", "500,500,10,10"], "lies outside the raster"),
    (lambda d, r: [r, "How many ships?", "--aoi", "POLYGON((0 0, 1 0, 1 1, 0 0))"],
     "does not overlap the raster"),
    (lambda d, r: [r, "How many ships?", "--aoi", "LINESTRING(0 0, 1 1)"], "must be a polygon"),
])
def test_a_bad_request_is_refused_before_any_model_loads(tmp_path, rgb, recorder, capsys,
                                                          make_args, expected):
    rc = main(["ask", *make_args(tmp_path, rgb), "--weights", str(tmp_path / "no-weights"),
               "--no-demo"])
    err = capsys.readouterr().err
    assert rc == 2
    assert expected in err and err.startswith("error:")
    assert recorder.made == []  # no Engine, so no weights were even looked for


def test_missing_raster_is_named_before_missing_weights(tmp_path, capsys):
    """The real Engine, no stand-in: of two mistakes, the one found without loading comes first."""
    rc = main(["ask", str(tmp_path / "missing.tif"), "q?", "--weights", str(tmp_path / "none"),
               "--no-demo"])
    err = capsys.readouterr().err
    assert rc == 2 and "There is no file at" in err and "no weights" not in err


def test_bands_must_be_numbers(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["ask", "scene.tif", "q?", "--bands", "red,green,blue"])
    assert exc.value.code == 2
    assert "--bands: bands must be 1-based band numbers" in capsys.readouterr().err


def test_a_good_request_reaches_the_engine_checked(tmp_path, rgb, recorder, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a path relative to where the user stands
    rc = main(["ask", "scene.tif", "  How many ships?  ", "--bands", "3,2,1",
               "--aoi", "10,10,20,20", "--budget", "64", "--max-new-tokens", "7"])
    assert rc == 0 and len(recorder.made) == 1
    (req,) = recorder.asked
    assert req.raster_path == str(tmp_path / "scene.tif")
    assert req.question == "How many ships?"
    assert (req.bands, req.aoi, req.budget, req.max_new_tokens) == (
        [3, 2, 1], {"window": [10, 10, 20, 20]}, 64, 7)
