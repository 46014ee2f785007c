"""Which bands the model saw: `RasterImage.bands` / `.palette`, the ``result`` event's ``bands`` and
``palette`` (engine/protocol.py EVENT_TYPES), the feature cache keyed by bands, and `ask`'s
summary. Before, the engine chose bands silently: nothing told the user that an 8-band scene
shown as 4,3,2 in QGIS reached the model as bands 1,2,3."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine import protocol
from engine.raster import read_raster

try:
    from tests.engine.rasters import write_geotiff
except ImportError:  # pragma: no cover
    from rasters import write_geotiff

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rasters(tmp_path_factory):
    d = tmp_path_factory.mktemp("bands")
    rng = np.random.default_rng(7)
    # each band its own level, so the band a channel came from can be told from its pixels
    eight = np.stack([rng.integers(0, 50, (60, 80)) + 100 * b for b in range(8)]).astype(np.uint16)
    pal = (rng.integers(0, 2, (60, 80))).astype(np.uint8)
    return {
        "eight": write_geotiff(d / "eight.tif", eight),
        "rgb": write_geotiff(d / "rgb.tif", rng.integers(0, 255, (3, 60, 80), dtype=np.uint8)),
        "palette": write_geotiff(d / "pal.tif", pal,
                                 colormap={0: (0, 0, 255, 255), 1: (255, 0, 0, 255)}),
    }


@pytest.mark.parametrize("name, bands, seen, palette", [
    ("eight", [4, 3, 2], (4, 3, 2), False),
    ("eight", [2], (2, 2, 2), False),
    ("eight", None, (1, 2, 3), False),  # no colour tags: the first three
    ("rgb", None, (1, 2, 3), False),
    ("palette", None, (1, 1, 1), True),  # a paletted band: its colour table
    ("palette", [1], (1, 1, 1), False),  # asked for as a band: grey
])
def test_the_image_records_the_bands_it_was_made_of(rasters, name, bands, seen, palette):
    from engine.geometry import TokenGeometry
    from engine.tiling import plan_tiles

    image = read_raster(rasters[name], bands=bands)
    assert image.bands == seen and image.palette is palette
    geometry = TokenGeometry.build(image, plan_tiles(image.size))
    assert geometry.bands == seen and geometry.palette is palette


def test_bands_text():
    from engine.cli import bands_text

    assert bands_text([4, 3, 2]) == "bands 4, 3, 2 (red, green, blue)"
    assert bands_text([2, 2, 2]) == "band 2 as grey"
    assert bands_text([1, 1, 1], True) == "band 1 through its colour table"
    assert bands_text(None) == "" and bands_text([]) == ""


def test_the_protocol_documents_the_result_fields():
    result = protocol.EVENT_TYPES["result"]
    assert "bands" in result and "palette" in result
    assert {"bands", "palette"} <= set(protocol.BATCH_RESULT_FIELDS)
    assert "'bands'" in protocol.BATCH_FIELDS["items"]
    assert protocol.PROTOCOL_VERSION == 1  # an added field: the version stays (docs/protocol.md)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, tmp_path_factory):
    from engine.pipeline import Engine

    return Engine(tiny_checkpoint, output_dir=tmp_path_factory.mktemp("out"))


def _result(engine, path, bands=None, question="What is here?"):
    from engine.pipeline import AskRequest

    events = list(engine.ask(AskRequest(str(path), question, bands=bands, max_new_tokens=2)))
    assert events[-1]["type"] == "result", events[-1]
    return events[-1]


def test_the_result_says_which_bands_the_model_saw(engine, rasters):
    engine.features.clear()
    engine.prefixes.clear()
    first = _result(engine, rasters["eight"], [4, 3, 2])
    assert set(protocol.EVENT_TYPES["result"]) <= set(first)
    assert first["bands"] == [4, 3, 2] and first["palette"] is False
    # the same bands again: the cached features, which still know their bands
    again = _result(engine, rasters["eight"], [4, 3, 2], "Is there water?")
    assert again["cache"]["features"] is True and again["bands"] == [4, 3, 2]
    # other bands are another read (the cache key holds the bands), not stale features
    grey = _result(engine, rasters["eight"], [2])
    assert grey["cache"]["features"] is False and grey["bands"] == [2, 2, 2]
    default = _result(engine, rasters["eight"])
    assert default["cache"]["features"] is False and default["bands"] == [1, 2, 3]
    pal = _result(engine, rasters["palette"])
    assert pal["bands"] == [1, 1, 1] and pal["palette"] is True


def test_a_batch_line_carries_the_bands(engine, rasters, tmp_path):
    """POST /batch items may name bands (validate_batch keeps them); each answer's line in
    results.jsonl says which bands the model saw, as the result event does."""
    from engine.jobs import JobQueue
    from engine.request_checks import request_factory, validate_batch

    jobs = JobQueue(engine, tmp_path / "state", request_factory(engine))
    jobs.start()
    try:
        spec = validate_batch({"items": [{"layer": "eight", "raster_path": rasters["eight"],
                                          "bands": [4, 3, 2]},
                                         {"layer": "pal", "raster_path": rasters["palette"]}],
                               "questions": ["What is here?"], "max_new_tokens": 2},
                              protocol.STRATEGIES)
        job = jobs.submit_batch(spec)
        import time

        deadline = time.time() + 120
        while jobs.info(job.job_id)["state"] not in ("done", "failed") and time.time() < deadline:
            time.sleep(0.1)
        lines = sorted(jobs.results(job.job_id), key=lambda r: r["index"])
    finally:
        jobs.stop()
    assert [line["error"] for line in lines] == [None, None]
    assert all(set(protocol.BATCH_RESULT_FIELDS) <= set(line) for line in lines)
    assert (lines[0]["bands"], lines[0]["palette"]) == ([4, 3, 2], False)
    assert (lines[1]["bands"], lines[1]["palette"]) == ([1, 1, 1], True)


def test_cli_ask_says_which_bands_the_model_saw(tiny_checkpoint, rasters, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "ask", rasters["eight"], "What is here?", "--bands", "4,3,2",
         "--weights", str(tiny_checkpoint), "--max-new-tokens", "2", "--output-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "the model saw bands 4, 3, 2 (red, green, blue)" in proc.stderr


def test_the_cli_line_never_says_more_kept_than_there_were():
    """'visual tokens: 600 kept of 288' for a strategy keeping single patches (600 sent, 288 the
    unreduced path's count)."""
    from engine.cli import visual_tokens_text

    assert visual_tokens_text({"visual_kept": 600, "visual_candidates": 288}) == "600 (unreduced path: 288)"
    assert visual_tokens_text({"visual_kept": 24, "visual_candidates": 288}) == "24 kept of 288"
