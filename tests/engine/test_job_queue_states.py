"""The job queue (engine/jobs.py) as a state machine: questions and batch jobs submitted,
answered one step at a time, cancelled, removed, aged past the retention and the engine
restarted (stopped, or killed: a copy of its state dir taken mid-answer), checked after every
step against a model of what the protocol promises (docs/protocol.md "One job at a time",
"Batch jobs"): no job lost or duplicated, positions 0..k-1 in order, one job running at a time,
nothing answered after a cancel, every batch item answered once (a restart resumes where the job
stopped), the retention never removing an unfinished job, nothing left of a removed job.

The engine is a stand-in whose every answer waits for the test's permit, so a step is quick and
the order of events is the test's. GEOVQA_QUEUE_STATES_EXAMPLES / _STEPS explore further."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, invariant, precondition, rule,
                                 run_state_machine_as_test)

import engine.jobs
from engine.jobs import JobQueue

SETTLE_S = 10.0  # every step must leave the worker parked or idle within this: no deadlock
KEEP_FINISHED = 2  # summaries held in memory; older finished jobs are read from their folder
ANSWER = {"ok?": None, "slow?": None, "fail?": "raster_unreadable", "oom?": "out_of_memory"}
STUBBORN = "slow?"  # the engine finishes this answer even when cancelled
UNKNOWN_ID = "ffffffffffffffff"


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError."""


class GatedEngine:
    """Answers a question only when the test gives a permit (`auto`: at once); a cancel ends the
    answer without a result, except for the STUBBORN question. Notes how many answers run at
    once and every request it got."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.parked: tuple[str, str, threading.Event] | None = None
        self.permits = 0
        self.auto = False
        self.active = 0
        self.max_active = 0
        self.calls: list[str] = []

    def ask(self, request, cancel):
        rid, question = request["request_id"], request["question"]
        with self.cond:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.calls.append(rid)
        try:
            yield {"type": "token", "text": "The"}
            with self.cond:
                self.parked = (rid, question, cancel)
                while not (self.permits or self.auto
                           or (cancel.is_set() and question != STUBBORN)):
                    self.cond.wait(0.002)
                if self.permits:
                    self.permits -= 1
                self.parked = None
            if cancel.is_set() and question != STUBBORN:
                return
            if ANSWER[question] == "raster_unreadable":
                raise ValueError("raster_unreadable: the raster cannot be read")
            if ANSWER[question] == "out_of_memory":
                raise OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            yield {"type": "result", "answer": f"answer to {rid}"}
        finally:
            with self.cond:
                self.active -= 1

    def quiet(self) -> bool | None:
        """True: parked waiting for a permit; None: not in an answer at all; False: busy."""
        with self.cond:
            if self.parked is None:
                return None if self.active == 0 else False
            _, question, cancel = self.parked
            return not self.permits and (not cancel.is_set() or question == STUBBORN)


@dataclass
class Job:
    """The model of one submitted job."""

    job_id: str
    kind: str
    questions: list[str]
    total: int
    state: str = "queued"
    cancel: bool = False
    resumable: bool = False  # failed on the engine's disk: the next start resumes it
    gone: bool = False  # removed, expired, or an ask that ended or went with a restart
    checked_events: bool = True  # an ask whose stream this test still follows
    answered: list[tuple[int, bool]] = field(default_factory=list)  # (index, failed), in order
    events: list[dict] = field(default_factory=list)
    ended: bool = False  # the ask's stream got its end (None)
    outcome: str | None = None  # an ask's last event: "result" or an error code
    handle: engine.jobs.AskJob | None = None  # an ask's job in the queue (its events)

    @property
    def errors(self) -> int:
        return sum(failed for _, failed in self.answered)

    @property
    def finished(self) -> bool:
        return self.state in engine.jobs.FINISHED_STATES

    def next_index(self) -> int | None:
        done = {i for i, _ in self.answered}
        return next((i for i in range(self.total) if i not in done), None)


class QueueMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        engine.jobs.new_job_id = _deterministic_ids()  # (the test puts the real one back)
        self.root = Path(tempfile.mkdtemp(prefix="geovqa-queue-"))
        self.generation = 0
        self.state_dir = self.root / "state-0"
        self.engine = GatedEngine()
        self.jobs = self._queue()
        self.model: dict[str, Job] = {}
        self.waiting: list[Job] = []
        self.running: Job | None = None
        self.asks = itertools.count()

    def _queue(self) -> JobQueue:
        jobs = JobQueue(self.engine, self.state_dir, make_request=dict, retention_days=1,
                        keep_finished=KEEP_FINISHED)
        jobs.start()
        return jobs

    def teardown(self) -> None:
        self.engine.auto = True
        assert self.jobs.stop(timeout=SETTLE_S), "the worker did not stop"
        shutil.rmtree(self.root, ignore_errors=True)

    # -- the model's worker ------------------------------------------------------------------
    def advance(self) -> None:
        """What the worker does until it waits for the engine or for a job."""
        while self.running is None and self.waiting:
            job = self.waiting.pop(0)
            if job.kind == "batch":
                if job.cancel:
                    job.state = "cancelled"
                    continue
                if job.next_index() is None:
                    job.state = "failed" if job.errors == job.total else "done"
                    continue
            job.state = "running"
            self.running = job

    def answer_running(self, stopping: bool = False) -> None:
        """The running job's answer ends (a permit, or the engine let go as the queue stops)."""
        job, self.running = self.running, None
        if job.kind == "ask":
            question = job.questions[0]
            if (job.cancel or stopping) and question != STUBBORN:  # stop() cancels a question
                job.outcome, job.state = "cancelled", "cancelled"
            else:
                job.outcome = ANSWER[question] or "result"
                job.state = "done" if ANSWER[question] is None else "failed"
            job.gone = True  # an ask leaves the queue as it ends
            return
        self.answer_running_index(job)
        if job.cancel:  # cancelled while answering: "cancelled when its current answer ends"
            job.state = "cancelled"
        elif not stopping:
            job.state = "queued"
            self.waiting.append(job)

    def positions(self) -> dict[str, int]:
        ahead = 1 if self.running is not None else 0
        return {job.job_id: i + ahead for i, job in enumerate(self.waiting)}

    # -- waiting for the real worker ---------------------------------------------------------
    def settle(self) -> None:
        deadline = time.monotonic() + SETTLE_S
        while time.monotonic() < deadline:
            quiet = self.engine.quiet()
            if quiet:
                return
            if quiet is None:
                with self.jobs._cond:
                    if self.jobs._running is None and not self.jobs._waiting:
                        return
            time.sleep(0.001)
        raise AssertionError("the queue did not come to rest: a deadlock, or a worker stuck")

    # -- rules -------------------------------------------------------------------------------
    @rule(question=st.sampled_from(sorted(ANSWER)))
    def submit_ask(self, question):
        rid = f"ask-{next(self.asks)}"
        job = self.jobs.submit_ask({"question": question, "request_id": rid})
        assert job.job_id not in self.model
        self.model[job.job_id] = Job(job.job_id, "ask", [question], 1, handle=job)
        self.waiting.append(self.model[job.job_id])
        self.advance()
        self.settle()

    @rule(n_items=st.integers(1, 3),
          questions=st.lists(st.sampled_from(sorted(ANSWER)), min_size=1, max_size=2))
    def submit_batch(self, n_items, questions):
        spec = {"items": [{"layer": f"l{i}", "raster_path": f"/data/{i}.tif"} for i in range(n_items)],
                "questions": questions, "max_new_tokens": 8}
        job = self.jobs.submit_batch(spec)
        assert job.job_id not in self.model
        assert job.info()["total"] == n_items * len(questions)
        self.model[job.job_id] = Job(job.job_id, "batch", questions, n_items * len(questions))
        self.waiting.append(self.model[job.job_id])
        self.advance()
        self.settle()

    @precondition(lambda self: self.running is not None)
    @rule()
    def answer(self):
        with self.engine.cond:
            assert self.engine.parked is not None, "the model has a job running, the engine none"
            self.engine.permits += 1
        self.answer_running()
        self.advance()
        self.settle()

    @precondition(lambda self: self.running is not None and self.running.kind == "batch")
    @rule()
    def answer_onto_a_full_disk(self):
        """The answer cannot be stored (the engine's disk is full): the job fails, resumable."""
        def disk_full(line):
            raise OSError(28, "No space left on device")

        self.jobs.get(self.running.job_id).append_result = disk_full  # this job, this run only
        with self.engine.cond:
            self.engine.permits += 1
        job, self.running = self.running, None
        job.state, job.resumable = "failed", True
        self.advance()
        self.settle()

    def answer_running_index(self, job: Job) -> None:
        index = job.next_index()
        job.answered.append((index, ANSWER[job.questions[index % len(job.questions)]] is not None))

    @rule(data=st.data(), remove=st.booleans())
    def cancel(self, data, remove):
        ids = [*self.model, UNKNOWN_ID]  # in the order submitted
        self.cancel_job(data.draw(st.sampled_from(ids), label="job"), remove)

    @precondition(lambda self: self.running is not None)
    @rule(remove=st.booleans())
    def cancel_the_running_job(self, remove):
        self.cancel_job(self.running.job_id, remove)

    def cancel_job(self, job_id, remove):
        job = self.model.get(job_id)
        before = None if job is None or job.kind == "ask" or job.gone else self.jobs.info(job_id)
        got = self.jobs.cancel(job_id, remove=remove)
        if job is None or job.gone:
            assert got is None, got
            return
        if job.finished:  # a finished batch: as it was, unless removed
            assert got == ({**before, "removed": True} if remove else before), (got, before)
            job.gone = remove
            return
        job.cancel = True
        if job in self.waiting:
            self.waiting.remove(job)
            job.state = "cancelled"
            if job.kind == "ask":
                job.outcome, job.gone = "cancelled", True
            assert got["state"] == "cancelled", got
        else:
            assert job is self.running
            # "running"; "cancelled" when the worker saw the cancel before the answer was made
            assert got["state"] in ("running", "cancelled"), got
            if not self._stubborn_now(job):
                self.running = None
                job.state = "cancelled"
                if job.kind == "ask":
                    job.outcome, job.gone = "cancelled", True
        self.advance()
        self.settle()

    def _current_is_stubborn(self, job: Job) -> bool:
        index = job.next_index()
        return job.questions[index % len(job.questions)] == STUBBORN

    def _stubborn_now(self, job: Job) -> bool:
        return self._current_is_stubborn(job) if job.kind == "batch" else job.questions[0] == STUBBORN

    @rule(killed=st.booleans(), torn=st.booleans())
    def restart(self, killed, torn):
        """Stop the engine and start a new one on the same state (killed: on a copy of the
        state dir taken while an answer runs, as a kill -9 leaves it)."""
        old_jobs, old_engine = self.jobs, self.engine
        if killed:
            self.generation += 1
            new_dir = self.root / f"state-{self.generation}"
            shutil.copytree(self.state_dir, new_dir, ignore=shutil.ignore_patterns("server.lock"))
            if torn and self.running is not None and self.running.kind == "batch":
                with open(new_dir / "jobs" / self.running.job_id / "results.jsonl", "a") as fh:
                    fh.write('{"index": 0, "answer": "half wri')
            self.state_dir = new_dir
            old_engine.auto = True  # the old queue ends its answer in the old folder: not looked at
            assert old_jobs.stop(timeout=SETTLE_S), "the worker did not stop"
        else:
            old_engine.auto = True
            assert old_jobs.stop(timeout=SETTLE_S), "the worker did not stop"
            if self.running is not None:
                self.answer_running(stopping=True)
        self.running = None
        for job in self.model.values():
            if job.kind == "ask" and not job.gone:
                job.gone, job.checked_events = True, False  # its stream went with the server
        for job in self.waiting:
            if job.kind == "ask":
                job.checked_events = False
        resumed = [j for j in self.model.values()  # in the order they were submitted
                   if j.kind == "batch" and not j.gone and (not j.finished or j.resumable)]
        self.waiting = []
        for job in resumed:
            job.resumable = False
            if job.cancel:
                job.state = "cancelled"
            else:
                job.state = "queued"
                self.waiting.append(job)
        self.engine = GatedEngine()
        self.jobs = self._queue()
        self.advance()
        self.settle()

    @rule(then_restart=st.booleans())
    def age_past_the_retention(self, then_restart):
        """Every job folder's state.json two days old (the retention is one day), then the
        housekeeping the worker runs after a job (or a start): finished jobs go, unfinished ones
        stay."""
        for state_path in self.jobs.jobs_dir.glob("*/state.json"):
            state = json.loads(state_path.read_text(encoding="utf-8"))
            state["updated"] = time.time() - 2 * 86400
            state_path.write_text(json.dumps(state), encoding="utf-8")
        aged = [job for job in self.model.values()
                if job.kind == "batch" and job.finished and not job.resumable]
        if then_restart:
            self.restart(killed=False, torn=False)  # a start removes them as it resumes the rest
        else:
            self.jobs.housekeep()
        for job in aged:
            job.gone = True

    # -- invariants --------------------------------------------------------------------------
    @invariant()
    def one_job_runs_at_a_time(self):
        assert self.engine.max_active <= 1
        calls = self.engine.calls  # since the last start: a killed engine's answer is asked again
        assert len(set(calls)) == len(calls), f"a question or item asked twice: {calls}"

    @invariant()
    def every_job_reads_as_the_model_says(self):
        positions = self.positions()
        assert self.jobs.queue_length() == len(self.waiting)
        for job_id, job in self.model.items():
            info = self.jobs.info(job_id)
            if job.gone:
                assert info is None, (job, info)
                assert self.jobs.results(job_id) is None
                continue
            assert info is not None, f"job {job_id} lost: {job}"
            seen = (info["state"], info["position"], info["done"], info["total"], info["errors"])
            want = (job.state, positions.get(job_id), len(job.answered), job.total, job.errors)
            assert seen == want, (job_id, seen, want)
        held = set(self.jobs.held_job_ids())
        unfinished = {j.job_id for j in self.waiting} | (
            {self.running.job_id} if self.running else set())
        assert unfinished <= held, "an unfinished job is not held"
        assert len(held - unfinished) <= KEEP_FINISHED

    @invariant()
    def batch_results_hold_each_answer_once(self):
        for job_id, job in self.model.items():
            if job.kind != "batch" or job.gone:
                continue
            results = self.jobs.results(job_id)
            got = [(r["index"], r["error"] is not None) for r in results]
            assert got == job.answered, (job_id, got, job.answered)

    @invariant()
    def nothing_left_of_a_removed_job(self):
        folders = {p.name for p in self.jobs.jobs_dir.iterdir()}
        want = {j.job_id for j in self.model.values() if j.kind == "batch" and not j.gone}
        assert folders == want, (folders, want)
        for folder in self.jobs.jobs_dir.iterdir():
            assert sorted(p.name for p in folder.iterdir()) == [
                "results.jsonl", "spec.json", "state.json"], list(folder.iterdir())

    @staticmethod
    def read_events(job: Job) -> None:
        while True:
            try:
                event = job.handle.events.get_nowait()
            except queue.Empty:
                return
            assert not job.ended, f"an event after the end: {event}"
            if event is None:
                job.ended = True
            else:
                job.events.append(event)

    @invariant()
    def questions_are_told_their_place_and_their_end(self):
        positions = self.positions()
        for job in self.model.values():
            if job.kind != "ask" or not job.checked_events:
                continue
            self.read_events(job)
            queued = [e["position"] for e in job.events if e["type"] == "queued"]
            if job in self.waiting:
                assert queued and queued[-1] == positions[job.job_id], (queued, positions)
            results = [e for e in job.events if e["type"] == "result"]
            if job.outcome is None:
                assert not job.ended and not results
                continue
            assert job.ended, f"the ask {job.job_id} ended ({job.outcome}) without its end"
            last = job.events[-1]
            got = "result" if last["type"] == "result" else last.get("code")
            assert got == job.outcome, (job.events, job.outcome)
            assert len(results) == (job.outcome == "result")


def _deterministic_ids():
    """Job ids from a counter, hashed so their order is not the order of submission."""
    counter = itertools.count()
    return lambda: hashlib.sha256(str(next(counter)).encode()).hexdigest()[:16]


def test_the_job_queue_keeps_its_promises(monkeypatch):
    monkeypatch.setattr(engine.jobs, "new_job_id", engine.jobs.new_job_id)  # put back after
    examples = int(os.environ.get("GEOVQA_QUEUE_STATES_EXAMPLES", "30"))
    steps = int(os.environ.get("GEOVQA_QUEUE_STATES_STEPS", "20"))
    run_state_machine_as_test(QueueMachine, settings=settings(
        max_examples=examples, stateful_step_count=steps, deadline=None,
        derandomize=examples <= 60))  # more: exploring, at random
