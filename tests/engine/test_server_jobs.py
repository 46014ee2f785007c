"""engine.jobs.JobQueue in process with a stand-in engine: a batch step that raises outside its
own error handling ends the job failed, and a cancel of a running batch survives a crash."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import disk_full_at_the_second_result  # noqa: E402
from serverutil import wait_until  # noqa: E402

import engine.jobs  # noqa: E402
from engine.jobs import BatchJob, JobQueue, lock_state_dir  # noqa: E402

SPEC = {"items": [{"layer": "one", "raster_path": "/data/one.tif", "aoi": None, "bands": None}],
        "questions": ["Any roads?", "Any water?"], "max_new_tokens": 8}


class Engine:
    """Answers every question with 'ok'; holds each answer until `release` is set."""

    def __init__(self, hold: bool = False):
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.started = threading.Event()
        self.calls = 0

    def ask(self, request, cancel):
        self.calls += 1
        self.started.set()
        self.release.wait(30)
        yield {"type": "result", "answer": "ok", "request_id": request.get("request_id")}


def make_queue(engine: Engine, state_dir: Path) -> JobQueue:
    jobs = JobQueue(engine, state_dir, make_request=dict)
    jobs.start()
    return jobs


def saved_state(jobs: JobQueue, job_id: str) -> dict:
    return json.loads((jobs.jobs_dir / job_id / "state.json").read_text(encoding="utf-8"))


def test_a_step_failing_outside_its_try_fails_the_job(tmp_path, monkeypatch):
    def disk_full(self, line):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(BatchJob, "append_result", disk_full)
    jobs = make_queue(Engine(), tmp_path / "state")
    try:
        job = jobs.submit_batch(json.loads(json.dumps(SPEC)))
        wait_until(lambda: jobs.info(job.job_id)["state"] not in ("queued", "running"),
                   timeout=10)
        info = jobs.info(job.job_id)
        assert info["state"] == "failed"
        assert "No space left on device" in info["message"]
        assert saved_state(jobs, job.job_id)["state"] == "failed"
        # the worker goes on with the next job
        ask = jobs.submit_ask({"question": "What is here?", "request_id": "r1"})
        events = [ask.events.get(timeout=10)]
        while events[-1] is not None:
            events.append(ask.events.get(timeout=10))
        assert [e["type"] for e in events[:-1] if e["type"] != "queued"] == ["result"]
    finally:
        jobs.stop()


def test_a_batch_stopped_by_the_engines_disk_resumes_at_the_next_start(tmp_path, monkeypatch):
    """A full disk for a moment ended the batch as 'failed' for good: after space was freed and the
    engine restarted, the questions not answered were never asked (docs: the next start resumes
    every unfinished job). A job failed on something else stays failed."""
    state_dir = tmp_path / "state"
    real_append = disk_full_at_the_second_result(monkeypatch)
    first = make_queue(Engine(), state_dir)
    try:
        job = first.submit_batch(json.loads(json.dumps(SPEC)))
        wait_until(lambda: first.info(job.job_id)["state"] not in ("queued", "running"), timeout=10)
        info = first.info(job.job_id)
        assert info["state"] == "failed" and info["done"] == 1
        assert "Free space" in info["message"] and "restart the engine" in info["message"]
        assert saved_state(first, job.job_id)["resumable"] is True
    finally:
        first.stop()
    monkeypatch.setattr(BatchJob, "append_result", real_append)
    second = make_queue(Engine(), state_dir)
    try:
        wait_until(lambda: second.info(job.job_id)["state"] == "done", timeout=10)
        assert sorted(r["index"] for r in second.results(job.job_id)) == list(range(second.info(job.job_id)["total"]))
    finally:
        second.stop()


def test_a_batch_failed_on_a_bug_stays_failed_after_a_restart(tmp_path, monkeypatch):
    def bug(self, line):
        raise RuntimeError("a bug")

    monkeypatch.setattr(BatchJob, "append_result", bug)
    state_dir = tmp_path / "state"
    first = make_queue(Engine(), state_dir)
    try:
        job = first.submit_batch(json.loads(json.dumps(SPEC)))
        wait_until(lambda: first.info(job.job_id)["state"] == "failed", timeout=10)
        assert saved_state(first, job.job_id)["resumable"] is False
    finally:
        first.stop()
    engine = Engine()
    second = make_queue(engine, state_dir)
    try:
        assert second.info(job.job_id)["state"] == "failed" and engine.calls == 0
    finally:
        second.stop()


def test_a_cancel_of_a_running_batch_survives_a_crash(tmp_path):
    state_dir = tmp_path / "state"
    stuck = Engine(hold=True)
    lock = lock_state_dir(state_dir)
    first = JobQueue(stuck, state_dir, make_request=dict, state_lock=lock)
    first.start()
    second = None
    try:
        job = first.submit_batch(json.loads(json.dumps(SPEC)))
        assert stuck.started.wait(10)
        assert first.cancel(job.job_id)["state"] == "running"  # ends after the current answer
        assert saved_state(first, job.job_id)["cancel_requested"] is True
        # the "crash": the answer never ends, and the dead process's lock goes with it
        assert first.stop(timeout=0.1) is False
        lock.close()
        fresh = Engine()
        second = make_queue(fresh, state_dir)
        info = second.info(job.job_id)
        assert info["state"] == "cancelled", info
        assert second.queue_length() == 0
        assert saved_state(second, job.job_id)["state"] == "cancelled"
        assert fresh.calls == 0
    finally:
        stuck.release.set()
        if second is not None:
            second.stop()


@pytest.mark.parametrize("state", ["queued", "running"])
def test_an_unfinished_batch_without_a_cancel_resumes(tmp_path, state):
    state_dir = tmp_path / "state"
    directory = state_dir / "jobs" / "0123456789abcdef"
    directory.mkdir(parents=True)
    (directory / "spec.json").write_text(json.dumps(SPEC))
    (directory / "state.json").write_text(json.dumps({"state": state, "message": None}))
    jobs = make_queue(Engine(), state_dir)
    try:
        wait_until(lambda: jobs.info("0123456789abcdef")["state"] == "done", timeout=10)
        assert jobs.info("0123456789abcdef")["done"] == 2
    finally:
        jobs.stop()


def test_a_worker_still_busy_after_stop_keeps_the_state_dir_until_it_ends(tmp_path, caplog):
    """stop() used to release the lock after its join timed out, while the worker could still
    write the state dir: a second server could then take it and resume the same jobs."""
    state_dir = tmp_path / "state"
    stuck = Engine(hold=True)  # ignores the cancel stop() sets: a step that does not return
    jobs = make_queue(stuck, state_dir)
    try:
        jobs.submit_batch(json.loads(json.dumps(SPEC)))
        assert stuck.started.wait(10)
        with caplog.at_level("WARNING", logger="engine.jobs"):
            assert jobs.stop(timeout=0.1) is False
        assert f"the state folder {state_dir} stays locked" in caplog.text
        with pytest.raises(SystemExit, match="is in use by another engine server"):
            lock_state_dir(state_dir)
    finally:
        stuck.release.set()
    # the step ends, the worker with it, and only then is the state dir free
    wait_until(lambda: not jobs._thread.is_alive(), timeout=10)
    lock_state_dir(state_dir).close()


def test_stop_releases_the_state_dir_when_the_worker_ends_in_time(tmp_path):
    state_dir = tmp_path / "state"
    jobs = make_queue(Engine(), state_dir)
    assert jobs.stop() is True
    lock_state_dir(state_dir).close()


class CountingSet(set):
    """A set that counts membership tests and fails once there are more than `limit`."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.lookups = 0
        self.limit = limit

    def __contains__(self, item) -> bool:
        self.lookups += 1
        assert self.lookups <= self.limit, f"more than {self.limit} lookups: the batch is rescanned"
        return super().__contains__(item)


def _batch(tmp_path, n_items: int, n_questions: int) -> BatchJob:
    spec = {"items": [{"layer": f"l{i}", "raster_path": f"/d/{i}.tif"} for i in range(n_items)],
            "questions": [f"q{j}?" for j in range(n_questions)]}
    return BatchJob("b" * 12, spec, tmp_path)


def test_a_large_batch_finds_its_next_item_without_rescanning(tmp_path):
    """next_index scanned from item 0 at every step: 50 million lookups for 10,000 items."""
    job = _batch(tmp_path, 100, 100)
    n = job.total
    job.done_indexes = CountingSet(limit=3 * n)
    order = []
    while (index := job.next_index()) is not None:
        order.append(index)
        job.done_indexes.add(index)  # what append_result records
    assert order == list(range(n)) and len(order) == 10_000
    assert job.done_indexes.lookups <= 2 * n


def test_a_resumed_batch_answers_its_gaps_in_order(tmp_path):
    """Items without a line in results.jsonl (a resume) are found, lowest first, failed ones skipped."""
    job = _batch(tmp_path, 4, 2)
    job.done_indexes.update({0, 1, 3, 6})
    found = []
    while (index := job.next_index()) is not None:
        found.append(index)
        assert job.next_index() == index  # asking again without an answer keeps the item
        job.done_indexes.add(index)
    assert found == [2, 4, 5, 7] and job.next_index() is None


class FailingEngine:
    """Fails the questions whose text is in `fail` (a raster it cannot read), answers the rest."""

    def __init__(self, fail):
        self.fail = set(fail)

    def ask(self, request, cancel):
        if request["question"] in self.fail:
            raise ValueError("raster_unreadable: the raster cannot be read")
        yield {"type": "result", "answer": "ok", "request_id": request.get("request_id")}


@pytest.mark.parametrize("fail, state", [(SPEC["questions"], "failed"), (SPEC["questions"][:1], "done")])
def test_a_batch_whose_every_item_failed_ends_failed(tmp_path, fail, state):
    jobs = JobQueue(FailingEngine(fail), tmp_path / "state", make_request=dict)
    jobs.start()
    try:
        job = jobs.submit_batch(json.loads(json.dumps(SPEC)))
        wait_until(lambda: jobs.info(job.job_id)["state"] not in ("queued", "running"), timeout=10)
        info = jobs.info(job.job_id)
        assert (info["state"], info["done"], info["errors"]) == (state, 2, len(fail))
        assert saved_state(jobs, job.job_id)["state"] == state
        errors = [r["error_code"] for r in jobs.results(job.job_id) if r["error"]]
        assert errors == ["raster_unreadable"] * len(fail)
    finally:
        jobs.stop()


def test_a_cancel_as_a_question_ends_leaves_it_answered(tmp_path):
    """A DELETE that comes after the answer, while the job is still being cleaned up (its upload
    removed), finds a finished job: it stays done and is not called cancelled."""
    jobs = make_queue(Engine(), tmp_path / "state")
    seen = {}

    def cleanup():  # the worker runs it after the answer, before the job leaves the queue
        seen["info"] = jobs.cancel(job.job_id)

    try:
        job = jobs.submit_ask({"question": "What is here?", "request_id": "r1"}, cleanup=cleanup)
        events = [job.events.get(timeout=10)]
        while events[-1] is not None:
            events.append(job.events.get(timeout=10))
        assert [e["type"] for e in events[:-1] if e["type"] != "queued"] == ["result"]
        assert seen["info"]["state"] == "done"
        assert seen["info"]["message"] is None and not job.cancel.is_set()
    finally:
        jobs.stop()


class GatedEngine:
    """Holds the n-th answer until `gates[n]` is set, ignoring a cancel (an answer that ends
    anyway, as one whose cancel comes after its last word)."""

    def __init__(self, n: int):
        self.gates = [threading.Event() for _ in range(n)]
        self.started = [threading.Event() for _ in range(n)]
        self.calls = 0

    def ask(self, request, cancel):
        n = self.calls
        self.calls += 1
        self.started[n].set()
        self.gates[n].wait(30)
        yield {"type": "result", "answer": "ok", "request_id": request.get("request_id")}


def test_a_batch_cancelled_while_answering_ends_with_that_answer(tmp_path):
    """A running batch answers DELETE with 'running' and 'becomes cancelled when its current
    answer ends' (docs/protocol.md). It went back to the end of the queue instead, read as
    'queued' with a position behind the questions waiting, and was called cancelled only at its
    next turn."""
    engine = GatedEngine(2)
    jobs = make_queue(engine, tmp_path / "state")
    try:
        batch = jobs.submit_batch(json.loads(json.dumps(SPEC)))
        assert engine.started[0].wait(10)
        ask = jobs.submit_ask({"question": "What is here?", "request_id": "r1"})
        assert jobs.cancel(batch.job_id)["state"] == "running"
        engine.gates[0].set()  # the answer ends, cancel or not
        assert engine.started[1].wait(10)  # the question runs next
        info = jobs.info(batch.job_id)
        assert (info["state"], info["position"], info["done"]) == ("cancelled", None, 1), info
        assert saved_state(jobs, batch.job_id)["state"] == "cancelled"
        assert jobs.queue_length() == 0
        engine.gates[1].set()
        wait_until(lambda: jobs.get(ask.job_id) is None, timeout=10)
        assert [r["index"] for r in jobs.results(batch.job_id)] == [0]
        assert engine.calls == 2  # nothing asked for the batch after the cancel
    finally:
        for gate in engine.gates:
            gate.set()
        jobs.stop()


def _state_writes_fail(monkeypatch) -> None:
    """Every state.json (and spec.json) write fails as on a full disk from now on."""
    def full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine.jobs, "_write_json_atomic", full)


def test_a_full_disk_does_not_stop_the_start(tmp_path, monkeypatch):
    """The start rewrites every resumed job's state.json: on a full disk it raised OSError and
    the engine did not start at all (no /ask either), though the job's message says to restart
    the engine once space is freed. It starts; the job's first step ends it failed, saying why."""
    state_dir = tmp_path / "state"
    directory = state_dir / "jobs" / "0123456789abcdef"
    directory.mkdir(parents=True)
    (directory / "spec.json").write_text(json.dumps(SPEC))
    (directory / "state.json").write_text(json.dumps({"state": "running", "message": None}))
    _state_writes_fail(monkeypatch)
    engine_ = Engine()
    jobs = make_queue(engine_, state_dir)
    try:
        wait_until(lambda: jobs.info("0123456789abcdef")["state"] == "failed", timeout=10)
        assert "Free space" in jobs.info("0123456789abcdef")["message"]
        ask = jobs.submit_ask({"question": "What is here?", "request_id": "r1"})
        events = [ask.events.get(timeout=10)]
        while events[-1] is not None:
            events.append(ask.events.get(timeout=10))
        assert events[-2]["type"] == "result"
    finally:
        jobs.stop()


def test_a_waiting_batch_cancelled_on_a_full_disk_leaves_the_queue(tmp_path, monkeypatch):
    """The cancel raised OSError (DELETE answered 500) half done: the job was out of the queue
    but never retired, so the jobs behind it kept their positions and ?remove=true could never
    remove it. It is cancelled, its message says the cancel is not stored."""
    jobs = JobQueue(Engine(), tmp_path / "state", make_request=dict)  # not started: jobs wait
    first = jobs.submit_batch(json.loads(json.dumps(SPEC)))
    second = jobs.submit_batch(json.loads(json.dumps(SPEC)))
    _state_writes_fail(monkeypatch)
    info = jobs.cancel(first.job_id)
    assert info["state"] == "cancelled" and "could not store the cancel" in info["message"]
    assert jobs.queue_length() == 1 and jobs.info(second.job_id)["position"] == 0
    assert jobs.cancel(first.job_id, remove=True)["removed"] is True
    assert not (jobs.jobs_dir / first.job_id).exists()


class ClosingStream:
    """An answer stream that runs `on_close` when the worker closes it: after its result, before
    the job is called done."""

    def __init__(self, events, on_close):
        self._events = iter(events)
        self.on_close = on_close

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._events)

    def close(self):
        self.on_close()


LATE = "It finished before the cancel took effect."


def test_a_cancel_landing_as_a_question_ends_is_not_its_message(tmp_path):
    """A DELETE after the last answer, while the job still runs (it answers 'running'), used to
    leave the job done with the message "Cancelled by the user."."""
    seen = {}

    class EndingEngine:
        def ask(self, request, cancel):
            return ClosingStream([{"type": "result", "answer": "ok"}],
                                 lambda: seen.setdefault("info", jobs.cancel(job.job_id)))

    jobs = make_queue(EndingEngine(), tmp_path / "state")
    try:
        job = jobs.submit_ask({"question": "What is here?", "request_id": "r1"})
        events = [job.events.get(timeout=10)]
        while events[-1] is not None:
            events.append(job.events.get(timeout=10))
        assert seen["info"]["state"] == "running"  # the cancel came while the job ran
        assert [e["type"] for e in events[:-1] if e["type"] != "queued"] == ["result"]
        assert job.state == "done"
        assert job.message == LATE
    finally:
        jobs.stop()


def test_a_cancel_landing_as_a_batch_ends_is_not_its_message(tmp_path, monkeypatch):
    """The worker checks the cancel, finds none and ends the batch done, while a DELETE that saw
    it running sets the cancel and then its message: the job ended done with the message
    "Cancelled by the user.", in memory and in state.json. The interleaving is forced: the
    worker waits at its last check until the cancel is set, and the cancel waits (inside its
    `set`) until the worker has ended the job or waits on the queue's lock to do so."""
    at_check, go, ending = threading.Event(), threading.Event(), threading.Event()
    held = Engine(hold=True)
    jobs = make_queue(held, tmp_path / "state")
    real_end = getattr(JobQueue, "_end", None)
    if real_end is not None:  # the worker announces that it ends the job (then takes the lock)
        def announced_end(self, *a, **kw):
            ending.set()
            return real_end(self, *a, **kw)
        monkeypatch.setattr(JobQueue, "_end", announced_end)

    class HandshakeEvent(threading.Event):
        def is_set(self):
            value = super().is_set()
            caller = sys._getframe(1)
            if caller.f_code.co_name == "_run_batch_step" and caller.f_locals.get("index", 0) is None \
                    and not at_check.is_set():  # the last step's check: nothing left to answer
                at_check.set()
                assert go.wait(10)
            return value

        def set(self):  # called by JobQueue.cancel once it has seen the job running
            super().set()
            go.set()
            wait_until(lambda: ending.is_set() or (batch.message or "").startswith("2 answers"), timeout=10)

    try:
        batch = jobs.submit_batch(json.loads(json.dumps(SPEC)))
        assert held.started.wait(10)  # its first answer runs: the event is swapped meanwhile
        batch.cancel = HandshakeEvent()
        held.release.set()
        assert at_check.wait(10)
        reply = jobs.cancel(batch.job_id)
        wait_until(lambda: jobs.info(batch.job_id)["state"] not in ("queued", "running"), timeout=10)
        info = jobs.info(batch.job_id)
        assert (info["state"], info["done"]) == ("done", 2)
        expected = f"2 answers, 0 errors. {LATE}"
        assert info["message"] == expected
        assert saved_state(jobs, batch.job_id)["message"] == expected
        assert reply["state"] == "running"  # the cancel was taken while the job ran
    finally:
        go.set()
        held.release.set()
        jobs.stop()
