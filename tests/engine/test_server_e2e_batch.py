"""End to end batch resume: `python -m engine serve` with the real Engine and the tiny
checkpoint, killed with SIGKILL mid-job and restarted on the same state dir; the job finishes
without redoing the answers already in results.jsonl."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from server_rasters import write_geotiff  # noqa: E402
from test_server_e2e import start, wait_until, weights  # noqa: E402,F401


def test_batch_resume_after_kill(weights, tmp_path):
    scene = write_geotiff(tmp_path / "scene.tif", width=400, height=300, seed=5)
    config, state = tmp_path / "config", tmp_path / "state"
    first = start(weights, config_dir=config, state_dir=state)
    # enough answers that the job is still running when it is killed after its first one (the
    # tiny model answers a cached raster in a few tens of milliseconds)
    n = 40
    spec = {"items": [{"layer": "scene", "raster_path": str(scene)}],
            "questions": [f"Question number {i}?" for i in range(n)], "max_new_tokens": 48}
    try:
        status, job = first.request("POST", "/batch", spec)
        assert status == 200, job
        results = Path(job["results_path"])
        wait_until(lambda: len(results.read_text().splitlines()) >= 1)
        first.kill(signal.SIGKILL)
    finally:
        first.cleanup()
    before = results.read_text().splitlines()
    assert 1 <= len(before) < n
    second = start(weights, config_dir=config, state_dir=state)
    try:
        wait_until(lambda: second.request("GET", f"/jobs/{job['job_id']}")[1]["state"] == "done")
        after = results.read_text().splitlines()
        assert after[: len(before)] == before
        assert sorted(json.loads(x)["index"] for x in after) == list(range(n))
        assert all(json.loads(x)["answer"] for x in after)
    finally:
        second.cleanup()
