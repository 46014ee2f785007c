"""A batch job's folder damaged or edited between two runs (engine/job_folder.py): the start reads
every unfinished job's state.json, spec.json and results.jsonl, and a file of the wrong shape
stopped it with a KeyError, TypeError or AttributeError, so the engine did not start at all. Now
the engine starts, resumes the other jobs, says which job (and which line) it could not read,
and keeps every file as it was."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from serverutil import wait_until  # noqa: E402

from engine.jobs import JobQueue  # noqa: E402

SPEC = {"items": [{"layer": "one", "raster_path": "/data/one.tif", "aoi": None, "bands": None}],
        "questions": ["Any roads?", "Any water?", "Any ships?"], "max_new_tokens": 8}
BAD, GOOD = "0123456789abcdef", "fedcba9876543210"  # the bad one is read first


class StandInEngine:
    """Answers every question with 'ok' at once; counts the questions asked."""

    def __init__(self):
        self.asked = []

    def ask(self, request, cancel):
        self.asked.append(request["request_id"])
        yield {"type": "result", "answer": "ok", "request_id": request["request_id"]}


def job_folder(state_dir: Path, job_id: str, *, spec: str | None = None, state: str | None = None,
               results: str | None = None) -> Path:
    """An unfinished job's folder as the engine writes it, with any file replaced by raw text."""
    folder = state_dir / "jobs" / job_id
    folder.mkdir(parents=True)
    (folder / "spec.json").write_text(json.dumps(SPEC) if spec is None else spec, encoding="utf-8")
    (folder / "state.json").write_text(json.dumps({"state": "running", "message": None})
                                       if state is None else state, encoding="utf-8")
    if results is not None:
        (folder / "results.jsonl").write_text(results, encoding="utf-8")
    return folder


def answer(index: int) -> str:
    return json.dumps({"index": index, "question": SPEC["questions"][index], "answer": "kept",
                       "error": None}) + "\n"


def files_of(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("damage, said", [
    ({"state": "[]"}, "state.json holds a list, not a JSON object"),
    ({"state": '"running"'}, "state.json holds a string, not a JSON object"),
    ({"state": '{"state": "paused"}'}, "state.json's state 'paused' is not one of"),
    ({"state": "{not json"}, "state.json is not valid JSON"),
    ({"spec": "[]"}, "spec.json holds a list, not a JSON object"),
    ({"spec": "{}"}, "spec.json has no list of items"),
    ({"spec": json.dumps({**SPEC, "items": [1]})}, "spec.json's item 1 is not an object with a 'raster_path'"),
    ({"spec": json.dumps({**SPEC, "questions": "Any roads?"})}, "spec.json has no list of questions"),
])
def test_a_state_or_spec_of_the_wrong_shape_does_not_stop_the_start(tmp_path, caplog, damage, said):
    state_dir = tmp_path / "state"
    good = job_folder(state_dir, GOOD)
    bad = job_folder(state_dir, BAD, **damage)
    before = files_of(bad)
    engine = StandInEngine()
    jobs = JobQueue(engine, state_dir, make_request=dict)
    jobs.start()  # raised AttributeError / TypeError / KeyError here
    try:
        wait_until(lambda: jobs.info(GOOD)["state"] == "done", timeout=10)  # the other job goes on
        assert jobs.info(GOOD)["done"] == 3
        info = jobs.info(BAD)
        assert info["state"] == "failed" and info["kind"] == "batch"
        assert said in info["message"] and "could not be resumed" in info["message"]
        assert said in caplog.text and BAD in caplog.text
        assert not any(rid.startswith(BAD) for rid in engine.asked)
        # the age rule passes over it, and on to the next folder: the good job, done, goes
        jobs.retention_days = 1e-9
        jobs.housekeep()
        assert "removing old jobs" not in caplog.text and not good.exists()
        assert files_of(bad) == before  # nothing the user had is changed or removed
    finally:
        jobs.stop()


@pytest.mark.parametrize("line, said", [
    ("[1]\n", "line 2 holds a list, not an answer object"),
    ('"an answer"\n', "line 2 holds a string, not an answer object"),
    ('{"answer": "no index"}\n', "line 2 has no answer index"),
    ('{"index": "1"}\n', "line 2 has no answer index"),
    ('{"index": true}\n', "line 2 has no answer index"),
    ('{"index": -1}\n', "line 2 has no answer index"),
    ('{"index": 99}\n', "line 2 has the index 99, beyond the job's 3 answers"),
    ("{not json\n", "line 2 is not valid JSON"),
])
def test_a_results_line_that_is_not_an_answer_is_skipped_and_named(tmp_path, caplog, line, said):
    """The job resumes: the answers of the lines around the bad one count as done, the bad line
    and every line after it stay in the file (an invalid JSON line cut the file there, losing
    the answers after it), and the job's message (to its end) and the log name the line."""
    state_dir = tmp_path / "state"
    text = answer(0) + line + answer(2)
    folder = job_folder(state_dir, GOOD, results=text)
    engine = StandInEngine()
    jobs = JobQueue(engine, state_dir, make_request=dict)
    jobs.start()
    try:
        wait_until(lambda: jobs.info(GOOD)["state"] == "done", timeout=10)
        assert engine.asked == [f"{GOOD}:1"]  # only the answer the bad line did not give
        assert (folder / "results.jsonl").read_text(encoding="utf-8").startswith(text)
        info = jobs.info(GOOD)
        assert info["done"] == 3 and said in info["message"] and "stays in the file" in info["message"]
        assert said in caplog.text and GOOD in caplog.text
        results = jobs.results(GOOD)  # GET /jobs/{id}/results: answers only
        assert sorted(r["index"] for r in results) == [0, 1, 2]
        assert [r["answer"] for r in sorted(results, key=lambda r: r["index"])] == ["kept", "ok", "kept"]
    finally:
        jobs.stop()


def test_a_half_written_last_line_is_still_cut_off(tmp_path):
    """docs/protocol.md: a half-written last line (no line end: killed mid-write) is cut off."""
    state_dir = tmp_path / "state"
    folder = job_folder(state_dir, GOOD, results=answer(0) + '{"index": 1, "answ')
    engine = StandInEngine()
    jobs = JobQueue(engine, state_dir, make_request=dict)
    jobs.start()
    try:
        wait_until(lambda: jobs.info(GOOD)["state"] == "done", timeout=10)
        assert engine.asked == [f"{GOOD}:1", f"{GOOD}:2"]
        lines = (folder / "results.jsonl").read_text(encoding="utf-8").split("\n")
        assert lines[0] == answer(0).strip() and [json.loads(x)["index"] for x in lines[1:-1]] == [1, 2]
        assert jobs.info(GOOD)["message"] == "3 answers, 0 errors."
    finally:
        jobs.stop()


def test_an_unreadable_job_folder_can_still_be_removed_on_request(tmp_path):
    state_dir = tmp_path / "state"
    bad = job_folder(state_dir, BAD, state="[]")
    jobs = JobQueue(StandInEngine(), state_dir, make_request=dict)
    jobs.start()
    try:
        assert jobs.cancel(BAD)["state"] == "failed" and bad.exists()  # a plain cancel keeps it
        assert jobs.cancel(BAD, remove=True)["removed"] is True and not bad.exists()
        assert jobs.info(BAD) is None
    finally:
        jobs.stop()
