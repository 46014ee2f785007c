"""Finished batch jobs are kept within bounds (engine.jobs, docs/protocol.md "Batch jobs"): only
the summaries of the most recent ones stay in memory, a start loads none of them, their folders
go after the output retention (GEOVQA_OUTPUT_RETENTION_DAYS), and a DELETE removes one at once."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import disk_full_at_the_second_result  # noqa: E402
from serverutil import wait_until  # noqa: E402

import engine.jobs  # noqa: E402
from engine.jobs import JobQueue  # noqa: E402

SPEC = {"items": [{"layer": "one", "raster_path": "/data/one.tif", "aoi": None, "bands": None}],
        "questions": ["Any roads?"], "max_new_tokens": 8}
DAY = 86400


class StandInEngine:
    """Answers every question with 'ok' at once (the queue is what is under test)."""

    def ask(self, request, cancel):
        yield {"type": "result", "answer": "ok", "request_id": request.get("request_id")}


def started(state_dir: Path) -> JobQueue:
    jobs = JobQueue(StandInEngine(), state_dir, make_request=dict)
    jobs.start()
    return jobs


def run_batches(jobs: JobQueue, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        job = jobs.submit_batch(json.loads(json.dumps(SPEC)))
        ids.append(job.job_id)
        wait_until(lambda: jobs.info(job.job_id)["state"] == "done", timeout=10)
    return ids


def backdate(jobs_dir: Path, job_id: str, days: float) -> None:
    path = jobs_dir / job_id / "state.json"
    state = json.loads(path.read_text(encoding="utf-8"))
    state["updated"] = time.time() - days * DAY
    path.write_text(json.dumps(state), encoding="utf-8")


@pytest.fixture(autouse=True)
def default_retention(monkeypatch):
    monkeypatch.delenv("GEOVQA_OUTPUT_RETENTION_DAYS", raising=False)


def test_finished_batch_jobs_are_held_in_memory_within_bounds(tmp_path, monkeypatch):
    """40 finished 'soak' batches were all held (spec and all) for the server's life, and every
    start loaded them all back."""
    monkeypatch.setattr(engine.jobs, "KEEP_FINISHED_IN_MEMORY", 5)
    state_dir = tmp_path / "state"
    jobs = started(state_dir)
    try:
        ids = run_batches(jobs, 12)
        assert set(jobs.held_job_ids()) == set(ids[-5:])  # the 5 most recent, summaries only
        assert all(jobs.info(job_id)["state"] == "done" for job_id in ids)  # older: from disk
        assert jobs.info(ids[0])["done"] == jobs.info(ids[0])["total"] == 1
        assert jobs.results(ids[0])[0]["answer"] == "ok"
    finally:
        jobs.stop()
    restarted = started(state_dir)
    try:
        assert restarted.held_job_ids() == []  # a start loads no finished job
        assert restarted.info(ids[0])["state"] == "done"
        assert restarted.results(ids[-1])[0]["answer"] == "ok"
    finally:
        restarted.stop()


def test_a_start_removes_finished_jobs_older_than_the_output_retention(tmp_path):
    state_dir = tmp_path / "state"
    jobs = started(state_dir)
    try:
        old, recent = run_batches(jobs, 2)
    finally:
        jobs.stop()
    # an unfinished job is never expired: it is resumed, however old
    waiting = state_dir / "jobs" / "0123456789abcdef"
    waiting.mkdir()
    (waiting / "spec.json").write_text(json.dumps(SPEC))
    (waiting / "state.json").write_text(json.dumps({"state": "queued", "message": None}))
    backdate(state_dir / "jobs", waiting.name, 30)
    backdate(state_dir / "jobs", old, 15)  # the default retention is 14 days
    backdate(state_dir / "jobs", recent, 13)
    restarted = started(state_dir)
    try:
        assert not (state_dir / "jobs" / old).exists()
        assert restarted.info(old) is None and restarted.results(old) is None
        assert restarted.info(recent)["state"] == "done"
        wait_until(lambda: restarted.info(waiting.name)["state"] == "done", timeout=10)
    finally:
        restarted.stop()


def test_a_retention_of_0_keeps_every_finished_job(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOVQA_OUTPUT_RETENTION_DAYS", "0")
    state_dir = tmp_path / "state"
    jobs = started(state_dir)
    try:
        (old,) = run_batches(jobs, 1)
    finally:
        jobs.stop()
    backdate(state_dir / "jobs", old, 400)
    restarted = started(state_dir)
    try:
        assert restarted.info(old)["state"] == "done"
    finally:
        restarted.stop()


@pytest.mark.parametrize("in_memory", [True, False])
def test_delete_removes_a_finished_batch_job(tmp_path, monkeypatch, in_memory):
    """DELETE on a finished job used to answer its info and keep it for good."""
    if not in_memory:
        monkeypatch.setattr(engine.jobs, "KEEP_FINISHED_IN_MEMORY", 0)
    jobs = started(tmp_path / "state")
    try:
        (job_id,) = run_batches(jobs, 1)
        assert (job_id in jobs.held_job_ids()) is in_memory  # 0 kept in memory: read from its folder
        kept = jobs.cancel(job_id)  # a cancel of a finished job changes nothing
        assert kept["state"] == "done" and "removed" not in kept and jobs.results(job_id)
        answer = jobs.cancel(job_id, remove=True)
        assert answer["state"] == "done" and answer["removed"] is True
        assert not (jobs.jobs_dir / job_id).exists()
        assert jobs.info(job_id) is None and jobs.results(job_id) is None
        assert jobs.cancel(job_id, remove=True) is None  # gone: the server answers not_found
        assert job_id not in jobs.held_job_ids()
    finally:
        jobs.stop()


def test_a_repeated_cancel_keeps_a_cancelled_batch_and_a_removal_removes_it(tmp_path):
    """A second DELETE (a second click, a client's retry) removed the cancelled job with every
    answer it had written; only an explicit removal (?remove=true) removes."""
    jobs = JobQueue(StandInEngine(), tmp_path / "state", make_request=dict)  # not started: waits
    job = jobs.submit_batch(json.loads(json.dumps(SPEC)))
    first = jobs.cancel(job.job_id)
    assert first["state"] == "cancelled" and "removed" not in first
    again = jobs.cancel(job.job_id)
    assert again["state"] == "cancelled" and "removed" not in again
    assert (jobs.jobs_dir / job.job_id).exists() and jobs.info(job.job_id)["state"] == "cancelled"
    assert jobs.cancel(job.job_id, remove=True)["removed"] is True
    assert jobs.info(job.job_id) is None


def test_a_job_folder_the_start_could_not_resume_does_not_read_as_waiting(tmp_path):
    """A folder whose spec.json is unreadable is skipped at the start (no worker runs it), but
    GET /jobs/{id} read its stale state.json and answered "queued" for good. It answers the job
    as failed, saying why (tests/engine/test_job_folder_damage.py), its folder kept."""
    jobs_dir = tmp_path / "state" / "jobs"
    folder = jobs_dir / "0123456789abcdef"
    folder.mkdir(parents=True)
    (folder / "spec.json").write_text("{not json", encoding="utf-8")
    (folder / "state.json").write_text(json.dumps({"state": "queued", "total": 2, "done": 0, "errors": 0}),
                                       encoding="utf-8")
    jobs = started(tmp_path / "state")
    try:
        info = jobs.info("0123456789abcdef")
        assert info["state"] == "failed" and "spec.json is not valid JSON" in info["message"]
        assert (folder / "spec.json").read_text(encoding="utf-8") == "{not json"
    finally:
        jobs.stop()


# ---------------------------------------------------------------------------------------------
# The same rule while serving (the output folder was pruned only when an engine started)

OLD_OUTPUT = "20240101-120000-any-roads-abc123_heatmap.tif"
NEW_OUTPUT = "20240102-120000-any-roads-def456_anchors.geojson"


def output_files(out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / name for name in (OLD_OUTPUT, NEW_OUTPUT, "survey_heatmap.tif")}
    for path in files.values():
        path.write_text("x")
    for name in (OLD_OUTPUT, "survey_heatmap.tif"):  # a user's own file is never touched
        stamp = time.time() - 15 * DAY
        os.utime(files[name], (stamp, stamp))
    return files


def ask_once(jobs: JobQueue) -> None:
    job = jobs.submit_ask({"question": "What is here?", "request_id": "r"})
    while job.events.get(timeout=10) is not None:
        pass
    wait_until(lambda: jobs.queue_length() == 0 and jobs.get(job.job_id) is None, timeout=10)


def test_a_running_server_prunes_old_outputs_and_jobs_after_a_job(tmp_path, monkeypatch):
    state_dir, out = tmp_path / "state", tmp_path / "out"
    jobs = JobQueue(StandInEngine(), state_dir, make_request=dict, output_dir=out)
    jobs.start()
    try:
        (old_job,) = run_batches(jobs, 1)
        backdate(state_dir / "jobs", old_job, 15)
        files = output_files(out)  # written after the start: only a pruning while serving sees them
        ask_once(jobs)  # within the hour since the start: nothing is looked at
        assert files[OLD_OUTPUT].exists() and (state_dir / "jobs" / old_job).exists()
        monkeypatch.setattr(engine.jobs, "HOUSEKEEPING_INTERVAL_S", 0.0)
        ask_once(jobs)
        wait_until(lambda: not files[OLD_OUTPUT].exists(), timeout=10)
        assert files[NEW_OUTPUT].exists() and files["survey_heatmap.tif"].exists()
        assert not (state_dir / "jobs" / old_job).exists()
        assert jobs.info(old_job) is None and old_job not in jobs.held_job_ids()
    finally:
        jobs.stop()


def test_the_server_gives_its_output_folder_to_the_job_queue(tmp_path):
    from engine.server import Settings, create_app

    settings = Settings(state_dir=tmp_path / "state", output_dir=tmp_path / "out", token="t")
    app = create_app(engine=None, settings=settings)
    assert app.state.jobs.output_dir == (tmp_path / "out").resolve()


def test_a_batch_stopped_by_the_disk_still_answers_get_once_out_of_memory(tmp_path, monkeypatch):
    """A batch stopped by the engine's disk is 'failed' (resumable: 'Free space ... restart the
    engine: it resumes the job'). Once its summary left memory (the 100 most recent finished jobs
    are held; here 0), GET /jobs/{id} read its folder and answered not_found: only a waiting or
    running state.json (a folder the start could not resume) reads as no job."""
    disk_full_at_the_second_result(monkeypatch)
    jobs = JobQueue(StandInEngine(), tmp_path / "state", make_request=dict, keep_finished=0)
    jobs.start()
    try:
        job = jobs.submit_batch(dict(json.loads(json.dumps(SPEC)), questions=["Any roads?", "Any ships?", "Any clouds?"]))
        wait_until(lambda: job.state not in ("queued", "running"), timeout=10)
        assert job.state == "failed" and job.resumable
        info = jobs.info(job.job_id)
        assert info is not None, "GET /jobs/{id} of a job the disk stopped answers not_found"
        assert info["state"] == "failed" and "restart the engine" in info["message"]
    finally:
        jobs.stop()


def _job_folder(jobs_dir: Path, job_id: str, state: dict, days_old: float) -> None:
    folder = jobs_dir / job_id
    folder.mkdir(parents=True)
    (folder / "spec.json").write_text(json.dumps(SPEC), encoding="utf-8")
    (folder / "results.jsonl").write_text("", encoding="utf-8")
    (folder / "state.json").write_text(json.dumps({**state, "updated": time.time() - days_old * DAY}),
                                       encoding="utf-8")


def test_an_old_failed_job_is_removed_but_one_the_disk_stopped_is_resumed(tmp_path):
    """A failed batch is over (removed after the retention, like a done one), unless the engine's
    disk stopped it: that one is resumed at the start, however old."""
    jobs_dir = tmp_path / "state" / "jobs"
    failed, stopped = "00000000000000aa", "00000000000000bb"
    _job_folder(jobs_dir, failed, {"state": "failed", "message": "a bug", "resumable": False}, 15)
    _job_folder(jobs_dir, stopped, {"state": "failed", "message": "disk full", "resumable": True}, 15)
    jobs = started(tmp_path / "state")
    try:
        assert not (jobs_dir / failed).exists() and jobs.info(failed) is None
        wait_until(lambda: jobs.info(stopped)["state"] == "done", timeout=10)
        assert [r["answer"] for r in jobs.results(stopped)] == ["ok"]
    finally:
        jobs.stop()


def test_only_job_ids_are_looked_up_in_the_jobs_folder(tmp_path):
    """GET and DELETE /jobs/{id} hand the id to the queue: a name that is no job id (another
    folder of the state dir, a path) is no job, whatever folder it names."""
    jobs_dir = tmp_path / "state" / "jobs"
    _job_folder(jobs_dir, "not-a-job", {"state": "done", "message": "x", "total": 1, "done": 1,
                                        "errors": 0}, 1)
    jobs = started(tmp_path / "state")
    try:
        for name in ("not-a-job", "../jobs/not-a-job"):
            assert jobs.info(name) is None
            assert jobs.cancel(name) is None
            assert jobs.results(name) is None
        assert (jobs_dir / "not-a-job").exists()
    finally:
        jobs.stop()


def test_unfinished_jobs_resume_in_the_order_they_were_submitted(tmp_path):
    """Job ids are random: the start took the jobs folder's (alphabetical) order, so a batch
    submitted last could run first after a restart."""
    jobs_dir = tmp_path / "state" / "jobs"
    asked: list[str] = []

    class Recording(StandInEngine):
        def ask(self, request, cancel):
            asked.append(request["raster_path"])
            yield from super().ask(request, cancel)

    submitted = ["00000000000000cc", "00000000000000aa", "00000000000000bb"]  # in this order
    for n, job_id in enumerate(submitted):
        _job_folder(jobs_dir, job_id, {"state": "queued"}, 0)
        spec = {**SPEC, "items": [{**SPEC["items"][0], "raster_path": f"/data/{job_id}.tif"}]}
        (jobs_dir / job_id / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
        os.utime(jobs_dir / job_id / "spec.json", (1_700_000_000 + n, 1_700_000_000 + n))
    jobs = JobQueue(Recording(), tmp_path / "state", make_request=dict)
    jobs.start()
    try:
        for job_id in submitted:
            wait_until(lambda: jobs.info(job_id)["state"] == "done", timeout=10)
        assert asked == [f"/data/{job_id}.tif" for job_id in submitted]
    finally:
        jobs.stop()
