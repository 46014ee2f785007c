"""Batch jobs survive a crash: kill the server (SIGKILL) mid-job, restart it on the same state
dir, and the job finishes without redoing the answers already in results.jsonl."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from server_rasters import make_inputs  # noqa: E402
from serverutil import stub_server, wait_until  # noqa: E402




def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_batch_resumes_after_kill(tmp_path):
    inputs = make_inputs(tmp_path / "rasters")
    config, state = tmp_path / "config", tmp_path / "state"
    first = stub_server(0.05, config_dir=config, state_dir=state).start()
    spec = {"items": [{"layer": "one", "raster_path": str(inputs["raster"])},
                      {"layer": "two", "raster_path": str(inputs["raster2"])}],
            "questions": ["Any roads?", "Any water?", "Any buildings?"], "max_new_tokens": 12}
    try:
        status, job = first.request("POST", "/batch", spec)
        assert status == 200
        results_path = Path(job["results_path"])
        assert results_path.parent.parent == state / "jobs"
        wait_until(lambda: len(read_lines(results_path)) >= 2)
        first.kill(signal.SIGKILL)
    finally:
        first.cleanup()
    before = read_lines(results_path)
    assert 2 <= len(before) < 6, "killed mid-job"
    assert [json.loads(line)["index"] for line in before] == list(range(len(before)))

    second = stub_server(0.05, config_dir=config, state_dir=state).start()
    try:
        assert second.token == first.token  # the token survives restarts
        wait_until(lambda: second.request("GET", f"/jobs/{job['job_id']}")[1]["state"] == "done")
        status, info = second.request("GET", f"/jobs/{job['job_id']}")
        assert info["done"] == 6 and info["errors"] == 0
        after = read_lines(results_path)
        assert after[: len(before)] == before, "finished answers are kept as they were"
        indexes = [json.loads(line)["index"] for line in after]
        assert sorted(indexes) == list(range(6)) and len(indexes) == 6, "nothing is redone"
        layers = [json.loads(line)["layer"] for line in after]
        assert layers == ["one"] * 3 + ["two"] * 3
        # DELETE on a finished job keeps it; ?remove=true removes it, folder and all
        status, kept = second.request("DELETE", f"/jobs/{job['job_id']}")
        assert status == 200 and kept["state"] == "done" and "removed" not in kept
        assert results_path.exists()
        status, removed = second.request("DELETE", f"/jobs/{job['job_id']}?remove=true")
        assert status == 200 and removed["state"] == "done" and removed["removed"] is True
        assert not results_path.parent.exists()
        assert second.request("GET", f"/jobs/{job['job_id']}")[0] == 404
        assert second.request("DELETE", f"/jobs/{job['job_id']}?remove=true")[0] == 404
    finally:
        second.cleanup()
