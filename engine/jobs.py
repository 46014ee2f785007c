"""The single GPU worker: one job at a time through a queue, batch jobs persisted and resumed.

Interactive questions (`AskJob`) and batch jobs (`BatchJob`) wait in one FIFO queue; a single
worker thread runs them, so the GPU only ever holds one request. A batch job answers one item per
turn and then goes to the back of the queue when others are waiting, so an analyst's question is
never stuck behind a 10,000-item batch. Waiting jobs are told their position (the number of jobs
ahead of them, the running one included).

Batch jobs live in ``<state_dir>/jobs/<job_id>/``: ``spec.json`` (what to do), ``state.json``
(queued / running / done / failed / cancelled, and whether a cancel was asked for) and
``results.jsonl`` (one line per finished answer, appended and fsynced as each completes). A
server restarted on the same state dir resumes every unfinished job from the first item without a
line in ``results.jsonl``, and ends as cancelled one whose cancel came before the crash.

Finished batch jobs (done, failed, cancelled) are kept within bounds: in memory only the summary
(`info`) of the `KEEP_FINISHED_IN_MEMORY` most recent ones, never their spec; older ones are
answered from their folder (``state.json``, ``results.jsonl``), which a start does not load. A
finished job's folder is removed when it is older than the output retention
(GEOVQA_OUTPUT_RETENTION_DAYS, `engine.pipeline.output_retention_days`), or at once by
``DELETE /jobs/{id}?remove=true`` (`JobQueue.cancel` with ``remove``; a plain DELETE leaves a
finished job as it is).

The same age rule runs while the server runs: after a job ends, at most once every
`HOUSEKEEPING_INTERVAL_S`, the worker removes finished job folders and the engine's heatmap /
anchors files (`engine.pipeline.prune_outputs`) older than the retention.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import re
import secrets
import shutil
import threading
import time
from pathlib import Path
from collections import OrderedDict
from typing import IO, Any, Callable

from engine import protocol
from engine.errors import free_gpu_memory
from engine.job_folder import read_results, read_spec, read_state, skipped_note
from engine.pipeline import output_retention_days, prune_outputs

log = logging.getLogger("engine.jobs")

JOB_ID_RE = re.compile(r"^[0-9a-f]{16}$")
FINISHED_STATES = ("done", "failed", "cancelled")
CANCEL_MESSAGE = "Cancelled by the user."
# the message of a job that ended done although a cancel came (after its last answer, before its end)
LATE_CANCEL_NOTE = "It finished before the cancel took effect."
# the summaries of this many finished batch jobs stay in memory (a few hundred bytes each);
# older ones are read from their folder when asked for
KEEP_FINISHED_IN_MEMORY = 100
# while serving, old outputs and finished jobs are looked for at most this often (after a job ends)
HOUSEKEEPING_INTERVAL_S = 3600.0
OOM_HINT = "Retry with a smaller token budget (for example {budget}) or a smaller area of interest."


class JobError(Exception):
    """A failure with a protocol error code and a message for a person."""

    def __init__(self, code: str, message: str, hint: str | None = None, **extra: Any):
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint
        self.extra = extra  # additional fields, e.g. retry_budget after an out-of-memory

    def body(self) -> dict:
        body = protocol.error_body(self.code, self.message, self.hint)
        body["error"].update(self.extra)
        return body


# ---------------------------------------------------------------------------------------------
# Exceptions -> protocol error codes

_RASTER_CODE_BY_NAME = (
    ("outside", "aoi_outside_raster"),
    ("aoi", "bad_aoi"),
    ("window", "bad_aoi"),
    ("notaraster", "not_a_raster"),
    ("notraster", "not_a_raster"),
)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch.cuda.OutOfMemoryError, engine.errors.OutOfMemory and friends."""
    name = type(exc).__name__.lower().replace("_", "")
    if "outofmemory" in name:
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def error_for_exception(exc: BaseException, budget: int | None = None) -> JobError:
    """Map anything the engine raises to a JobError with a protocol code and a readable message."""
    if isinstance(exc, JobError):
        return exc
    if is_out_of_memory(exc):
        budget = getattr(exc, "applied_budget", budget)  # the budget that ran (Engine.ask says it)
        smaller = max(64, (budget or 2048) // 2)
        what = getattr(exc, "what", None) or "answering this question"
        return JobError(
            "out_of_memory",
            f"The GPU ran out of memory while {what}. The server is still running.",
            OOM_HINT.format(budget=smaller),
            retry_budget=smaller,
        )
    code = getattr(exc, "code", None)
    message = str(exc).strip() or type(exc).__name__
    names = [cls.__name__ for cls in type(exc).__mro__]
    if "Cancelled" in names:
        return JobError("cancelled", "The question was cancelled.")
    if isinstance(code, str) and code in protocol.ERROR_CODES:
        return JobError(code, message, getattr(exc, "hint", None))
    if "RasterError" in names:
        lowered = type(exc).__name__.lower()
        for needle, mapped in _RASTER_CODE_BY_NAME:
            if needle in lowered:
                return JobError(mapped, message)
        return JobError("raster_unreadable", message)
    if "SelectionError" in names:
        if "unknown" in message.lower():
            return JobError("unknown_strategy", message)
        return JobError("bad_request", message)
    # "code: message" style ValueErrors (protocol.validate_question)
    if isinstance(exc, ValueError):
        head, sep, tail = message.partition(":")
        if sep and head.strip() in protocol.ERROR_CODES:
            return JobError(head.strip(), tail.strip())
        return JobError("bad_request", message)
    log.exception("internal error", exc_info=exc)
    return JobError("internal", f"The engine failed unexpectedly: {type(exc).__name__}: {message}")


def json_default(value: Any) -> Any:
    """Make engine values JSON-friendly: numpy scalars/arrays, paths, sets, anything else as str."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)


def new_job_id() -> str:
    return secrets.token_hex(8)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Jobs


class AskJob:
    """One interactive question; its events go to `events` (None marks the end)."""

    kind = "ask"

    def __init__(self, job_id: str, request: Any, cleanup: Callable[[], None] | None = None,
                 public_error: Callable[[JobError], JobError] | None = None):
        self.job_id = job_id
        self.request = request
        self.events: "queue.Queue[dict | None]" = queue.Queue()
        self.cancel = threading.Event()
        self.cleanup = cleanup
        # how the job's error is told to the client (an upload's names "the uploaded raster",
        # not the engine's temporary file: engine/uploads.py Upload.public)
        self.public_error = public_error
        self.state = "queued"
        self.position: int | None = None
        self.message: str | None = None

    def info(self) -> dict:
        return {
            "job_id": self.job_id, "state": self.state, "position": self.position,
            "done": 1 if self.state == "done" else 0, "total": 1, "errors": 0,
            "results_path": "", "message": self.message, "kind": self.kind,
        }


class BatchJob:
    """Layers x questions, answered one item per queue turn, persisted in its own directory."""

    kind = "batch"

    def __init__(self, job_id: str, spec: dict, directory: Path):
        self.job_id = job_id
        self.spec = spec
        self.dir = directory
        self.cancel = threading.Event()
        self.state = "queued"
        self.position: int | None = None
        self.message: str | None = None
        # items answered (or failed) so far; only ever added to (`append_result`, a resume)
        self.done_indexes: set[int] = set()
        self._next = 0  # every index below it is in done_indexes (`next_index`)
        self.errors = 0
        # failed on the engine's disk (full, an I/O error), not on the job: resumed at the next start
        self.resumable = False
        # what a resume could not read of results.jsonl (job_folder.skipped_note), kept in the
        # job's message to its end
        self.note: str | None = None
        # when it was submitted (time.time()), kept in state.json: a start resumes in this order
        self.submitted: float | None = None
        self.lock = threading.Lock()
        self._state_lock = threading.Lock()  # the worker and a DELETE both write state.json

    @property
    def total(self) -> int:
        return len(self.spec["items"]) * len(self.spec["questions"])

    @property
    def results_path(self) -> Path:
        return self.dir / "results.jsonl"

    def item(self, index: int) -> tuple[dict, str]:
        n_q = len(self.spec["questions"])
        return self.spec["items"][index // n_q], self.spec["questions"][index % n_q]

    def next_index(self) -> int | None:
        """The first item not answered yet (a failed item counts as answered), None when all are.

        `done_indexes` only grows, so that first index never moves back: a cursor moves forward
        past answered items and each index is looked at about once over the whole job (O(1)
        amortised), where a scan from 0 at every step was quadratic in a 10,000-item batch. A
        resumed job's gaps (items without a line in results.jsonl) are found as the cursor
        reaches them."""
        total = self.total
        while self._next < total and self._next in self.done_indexes:
            self._next += 1
        return self._next if self._next < total else None

    def info(self) -> dict:
        return {
            "job_id": self.job_id, "state": self.state, "position": self.position,
            "done": len(self.done_indexes), "total": self.total, "errors": self.errors,
            "results_path": str(self.results_path), "message": self.message, "kind": self.kind,
        }

    def save_state(self) -> None:
        """Write state.json; a cancel asked for is kept there so it outlives a crash."""
        with self._state_lock:
            _write_json_atomic(self.dir / "state.json", {
                "state": self.state, "message": self.message, "updated": time.time(),
                "submitted": self.submitted,
                "cancel_requested": self.cancel.is_set(), "resumable": self.resumable,
                # what `GET /jobs/{id}` answers once the job is no longer held in memory
                "total": self.total, "done": len(self.done_indexes), "errors": self.errors,
            })

    def append_result(self, line: dict) -> None:
        with open(self.results_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, ensure_ascii=False, default=json_default) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.done_indexes.add(int(line["index"]))
        if line.get("error"):
            self.errors += 1

    def load_results(self) -> list[dict]:
        """Read results.jsonl; a half-written last line (killed mid-write) is cut off, a line
        that is not one of this job's answers skipped (`engine.job_folder.read_results`)."""
        return read_results(self.results_path, total=self.total)


def _submitted_at(directory: Path, state: dict) -> float:
    """When a batch job was submitted: its state.json's ``submitted``, else (a job written before
    it was kept) its spec.json's time, written once at the submit but only as fine as the
    file system's clock tick; 0 when neither can be read, so such a job comes first."""
    submitted = state.get("submitted")
    if isinstance(submitted, (int, float)) and not isinstance(submitted, bool) and math.isfinite(submitted):
        return float(submitted)
    try:
        return (directory / "spec.json").stat().st_mtime
    except OSError:
        return 0.0


def finished_info_from_disk(directory: Path) -> dict | None:
    """`BatchJob.info` of a job not held in memory, from its folder: ``state.json`` (which says
    total / done / errors since this version; else they are counted from ``spec.json`` and
    ``results.jsonl``). None when the folder holds no readable job, or one still waiting or
    running: such a job not in memory is one the start could not resume (its spec unreadable),
    which no worker will ever run, so it must not read as waiting. (A failure the engine's disk
    caused reads as it is: failed, resumed by the next start.)"""
    try:
        state = json.loads((directory / "state.json").read_text(encoding="utf-8"))
        if not isinstance(state, dict) or state.get("state", "failed") not in FINISHED_STATES:
            return None
        results_path = directory / "results.jsonl"
        if "total" in state:
            total, done, errors = int(state["total"]), int(state["done"]), int(state["errors"])
        else:  # a folder written by an older engine
            spec = json.loads((directory / "spec.json").read_text(encoding="utf-8"))
            total = len(spec["items"]) * len(spec["questions"])
            lines = read_results(results_path)
            done = len({int(line["index"]) for line in lines})
            errors = sum(1 for line in lines if line.get("error"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {
        "job_id": directory.name, "state": state.get("state", "failed"), "position": None,
        "done": done, "total": total, "errors": errors, "results_path": str(results_path),
        "message": state.get("message"), "kind": "batch",
    }


def job_finished_at(directory: Path, state: dict) -> float:
    """When the job in `directory` last changed state (state.json's ``updated``, else the file's
    modification time)."""
    updated = state.get("updated")
    if isinstance(updated, (int, float)) and not isinstance(updated, bool):
        return float(updated)
    try:
        return (directory / "state.json").stat().st_mtime
    except OSError:
        return time.time()


def is_finished(state: dict) -> bool:
    """A job's state.json says it is over for good (a failed job the engine's disk stopped is
    resumed at the next start: not finished)."""
    return state.get("state") in FINISHED_STATES and not (
        state.get("state") == "failed" and state.get("resumable"))


def lock_state_dir(state_dir: Path) -> IO:
    """Hold an exclusive lock on `state_dir` (made if missing) for as long as the returned file
    stays open: two servers must not resume the same batch jobs.

    Raises SystemExit with an ``error: ...`` sentence (what the plugin shows) when another
    server holds it."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = exclusive_lock(state_dir / "server.lock")
    if lock is None:
        raise SystemExit(
            f"error: state folder {state_dir} is in use by another engine server. Stop it, or "
            "start this one with a different --state-dir.")
    return lock


def exclusive_lock(path: Path) -> IO | None:
    """An exclusive lock on the file `path` (made if missing), held while the returned file stays
    open and released when the process ends however it ends; None when another process holds it."""
    lock_file = open(path, "a+")
    try:
        try:
            import fcntl

            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # Windows
            import msvcrt

            lock_file.seek(0)
            msvcrt.locking(lock_file.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError:
        lock_file.close()
        return None
    return lock_file


# ---------------------------------------------------------------------------------------------
# The queue and its single worker


class JobQueue:
    """FIFO of GPU jobs served by one worker thread."""

    def __init__(self, engine: Any, state_dir: Path, make_request: Callable[[dict], Any],
                 state_lock: IO | None = None, retention_days: float | None = None,
                 keep_finished: int | None = None, output_dir: Path | None = None):
        """`state_lock`: the lock of `lock_state_dir(state_dir)` when the caller took it already
        (``serve`` does, before loading the model); else `start` takes it.

        `retention_days`: finished batch jobs older than this are removed (0 keeps them all);
        None: GEOVQA_OUTPUT_RETENTION_DAYS, the outputs' rule. `keep_finished`: how many finished
        batch jobs' summaries stay in memory (older ones are read from disk when asked for);
        None: `KEEP_FINISHED_IN_MEMORY`. `output_dir`: the engine's heatmaps / anchors, pruned
        by the same rule while serving (None: not pruned here)."""
        self.engine = engine
        self.state_dir = Path(state_dir)
        self.jobs_dir = self.state_dir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.make_request = make_request
        self._cond = threading.Condition()
        self._waiting: list[AskJob | BatchJob] = []
        self._running: AskJob | BatchJob | None = None
        self._jobs: dict[str, AskJob | BatchJob] = {}  # waiting and running jobs
        # summaries (`info`) of the most recently finished batch jobs, oldest first
        self._finished: "OrderedDict[str, dict]" = OrderedDict()
        self.keep_finished = KEEP_FINISHED_IN_MEMORY if keep_finished is None else keep_finished
        self.retention_days = (output_retention_days() if retention_days is None
                               else retention_days)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self._last_housekeeping = time.monotonic()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._worker_alive = False  # from start() until the worker thread has left its loop
        self._release_when_worker_ends = False
        self._lock_file = state_lock

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        # Resuming batch jobs is only safe for the one server that holds the state dir.
        if self._lock_file is None:
            self._lock_file = lock_state_dir(self.state_dir)
        self._resume_batches()  # removes the finished jobs older than the retention
        # (the output folder was pruned when the engine writing it started: Engine.__init__)
        self._last_housekeeping = time.monotonic()
        self._thread = threading.Thread(target=self._worker, name="gpu-worker", daemon=True)
        self._worker_alive = True
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop taking jobs, cancel a running question and wait up to `timeout` s for the worker;
        then release the state dir's lock. True when the worker has ended.

        A worker still busy after `timeout` (a step that does not return) may still write to the
        state dir, so the lock stays held until that step ends (the worker releases it then) or
        the process exits; another server cannot take the state dir meanwhile."""
        with self._cond:
            self._stop = True
            if self._running is not None and self._running.kind == "ask":
                self._running.cancel.set()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        if not self.release_state_lock():
            running = self._running
            log.warning(
                "the job worker is still busy %.0f s after the stop (job %s); the state folder %s "
                "stays locked until that job's current step ends or this process exits",
                timeout, running.job_id if running is not None else "?", self.state_dir)
            return False
        return True

    def release_state_lock(self) -> bool:
        """Release the state dir's lock now if the worker is not running, else when it ends.
        True when released (or not held)."""
        with self._cond:
            if self._worker_alive:
                self._release_when_worker_ends = True
                return False
            self._close_lock()
            return True

    def _close_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # -- submission ----------------------------------------------------------------------------
    def submit_ask(self, request: Any, cleanup: Callable[[], None] | None = None,
                   public_error: Callable[[JobError], JobError] | None = None) -> AskJob:
        job = AskJob(new_job_id(), request, cleanup, public_error)
        with self._cond:
            self._jobs[job.job_id] = job
            self._waiting.append(job)
            self._update_positions()
            self._cond.notify_all()
        return job

    def submit_batch(self, spec: dict) -> BatchJob:
        job_id = new_job_id()
        directory = self.jobs_dir / job_id
        directory.mkdir(parents=True)
        _write_json_atomic(directory / "spec.json", spec)
        job = BatchJob(job_id, spec, directory)
        job.submitted = time.time()
        job.results_path.touch()
        job.save_state()
        with self._cond:
            self._jobs[job_id] = job
            self._waiting.append(job)
            self._update_positions()
            self._cond.notify_all()
        return job

    # -- queries -------------------------------------------------------------------------------
    def queue_length(self) -> int:
        with self._cond:
            return len(self._waiting)

    def get(self, job_id: str) -> AskJob | BatchJob | None:
        """A waiting or running job (finished batch jobs are only summaries: `info`)."""
        with self._cond:
            return self._jobs.get(job_id)

    def held_job_ids(self) -> list[str]:
        """The jobs held in memory: waiting, running and the most recently finished batch jobs."""
        with self._cond:
            return [*self._jobs, *self._finished]

    def info(self, job_id: str) -> dict | None:
        """`GET /jobs/{id}`: a job held in memory, else a finished batch job from its folder."""
        if not JOB_ID_RE.match(job_id):
            return None
        with self._cond:
            job = self._jobs.get(job_id)
            if job is not None:
                return job.info()
            if job_id in self._finished:
                return dict(self._finished[job_id])
        return finished_info_from_disk(self.jobs_dir / job_id)

    def results(self, job_id: str) -> list[dict] | None:
        """`GET /jobs/{id}/results` of a batch job, held in memory or not; None for no such job."""
        job = self.get(job_id)
        if isinstance(job, BatchJob):
            with job.lock:
                return job.load_results()
        info = None if job is not None else self.info(job_id)
        if info is None:
            return None
        try:  # total 0: a job whose folder the start could not read, its answers' count unknown
            return read_results(self.jobs_dir / job_id / "results.jsonl", total=info["total"] or None)
        except OSError:  # removed meanwhile (DELETE, retention)
            return None

    def cancel(self, job_id: str, remove: bool = False) -> dict | None:
        """Cancel a waiting or running job; a finished one is left as it is, unless `remove`:
        then a finished batch job is removed (its summary and its folder; the heatmaps it wrote
        follow the outputs' retention). Only an explicit removal removes: a repeated cancel (a
        second click, a client's retry, a cancel just as the job ended) must not erase the
        answers written. The answer is the job's `info`, with ``removed: true`` when it was
        removed; None when there is no such job."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None and remove:
                return self._remove_finished(job_id)
        if job is None:  # a finished job, perhaps read from its folder: not under the queue's lock
            return self.info(job_id)
        with self._cond:
            if job.state in FINISHED_STATES:
                return job.info()  # ending this very moment (the worker retires it)
            job.cancel.set()
            job.message = CANCEL_MESSAGE
            if job in self._waiting:
                self._waiting.remove(job)
                self._finish_cancelled(job)
                self._update_positions()
            elif isinstance(job, BatchJob):
                self._try_save_state(job)  # a restart before the current answer ends still cancels it
            # a running job notices the event between steps and stops itself
            return job.info()

    # -- internals -----------------------------------------------------------------------------
    def _remove_finished(self, job_id: str) -> dict | None:
        """Called with the lock held: drop a finished batch job's summary and folder; its info
        with ``removed: true``, None when there is no such job."""
        info = self._finished.pop(job_id, None) if JOB_ID_RE.match(job_id) else None
        if info is None and JOB_ID_RE.match(job_id):
            info = finished_info_from_disk(self.jobs_dir / job_id)
        if info is None:
            return None
        shutil.rmtree(self.jobs_dir / job_id, ignore_errors=True)
        log.info("removed finished batch job %s", job_id)
        return {**info, "removed": True}

    def _retire(self, job: BatchJob) -> None:
        """Called with the lock held: a batch job has finished; keep only its summary, and only
        the `keep_finished` most recent summaries."""
        self._jobs.pop(job.job_id, None)
        self._keep_summary(job.job_id, job.info())

    def _keep_summary(self, job_id: str, info: dict) -> None:
        """Called with the lock held (or before the worker starts): hold a finished job's
        summary, and only the `keep_finished` most recent ones."""
        self._finished[job_id] = info
        self._finished.move_to_end(job_id)
        while len(self._finished) > max(0, self.keep_finished):
            self._finished.popitem(last=False)

    def _finish_cancelled(self, job: AskJob | BatchJob, cancel_on_disk: bool = False) -> None:
        """End a job cancelled before its turn; `cancel_on_disk`: its state.json says the cancel
        already (a start)."""
        job.state = "cancelled"
        job.position = None
        job.message = CANCEL_MESSAGE
        if isinstance(job, BatchJob):
            if not self._try_save_state(job) and not cancel_on_disk:
                job.message += (" The engine could not store the cancel on its disk (its "
                                "--state-dir): the next start resumes the job.")
            self._retire(job)
        else:
            job.events.put(self._event(job, {"type": "error", **protocol.error_body(
                "cancelled", "The question was cancelled before it started.")["error"]}))
            self._run_cleanup(job)
            job.events.put(None)
            self._jobs.pop(job.job_id, None)

    @staticmethod
    def _try_save_state(job: BatchJob) -> bool:
        """`BatchJob.save_state` where the engine's disk refusing it (full, an I/O error) must
        not stop what called it (a start, a cancel): said in the log; False then."""
        try:
            job.save_state()
        except OSError as exc:
            log.warning("cannot write the state of batch job %s: %s", job.job_id, exc)
            return False
        return True

    def _update_positions(self) -> None:
        """Called with the lock held: tell every waiting job how many jobs are ahead of it."""
        ahead = 1 if self._running is not None else 0
        for i, job in enumerate(self._waiting):
            pos = i + ahead
            if job.position != pos:
                job.position = pos
                if isinstance(job, AskJob):
                    job.events.put(self._event(job, {"type": "queued", "position": pos,
                                                     "job_id": job.job_id}))

    @staticmethod
    def _event(job: AskJob | BatchJob, event: dict) -> dict:
        rid = getattr(getattr(job, "request", None), "request_id", None)
        event = dict(event)
        event.setdefault("request_id", rid)
        return event

    def _worker(self) -> None:
        try:
            self._work()
        finally:
            with self._cond:
                self._worker_alive = False
                if self._release_when_worker_ends:
                    self._close_lock()
                    log.info("the job worker has ended; the state folder %s is free",
                             self.state_dir)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                job = self._waiting.pop(0)
                self._running = job
                job.position = None
                job.state = "running"
                self._update_positions()
            finished = True
            try:
                if isinstance(job, AskJob):
                    self._run_ask(job)
                else:
                    finished = self._run_batch_step(job)
            except Exception as exc:  # never let the worker die, nor leave the job "running"
                log.exception("job %s failed", job.job_id)
                self._fail(job, exc)
                finished = True
            with self._cond:
                self._running = None
                if finished and isinstance(job, BatchJob):
                    self._retire(job)
                elif not finished and not self._stop:
                    job.state = "queued"
                    self._waiting.append(job)
                # positions are updated when the next job is taken, a moment from now
                self._cond.notify_all()
            if time.monotonic() - self._last_housekeeping >= HOUSEKEEPING_INTERVAL_S:
                self.housekeep()

    def _end(self, job: AskJob | BatchJob, state: str, message: str | None = None) -> None:
        """Give a running job its end `state` and `message`, under the queue's lock.

        `cancel` checks that a job is not finished and sets its message under the same lock, so a
        cancel landing just as the job ends either finds it finished (and leaves it) or comes
        first: then a job that still ends done (its answer was complete) says it finished before
        the cancel took effect, instead of keeping the cancel's "Cancelled by the user." (which
        the worker's done used to leave in place, or the cancel wrote over the done message)."""
        with self._cond:
            if state == "done" and job.cancel.is_set():
                message = f"{message} {LATE_CANCEL_NOTE}" if message else LATE_CANCEL_NOTE
            job.state = state
            job.message = message

    def _fail(self, job: AskJob | BatchJob, exc: Exception) -> None:
        """End a job whose step raised outside its own error handling (a full disk, a bug). A
        batch stopped by the engine's disk (OSError: full, an I/O error) is resumed at the next
        start, from the first answer not stored."""
        message = f"The job stopped on an unexpected error: {type(exc).__name__}: {exc}"
        if isinstance(job, BatchJob) and isinstance(exc, OSError):
            job.resumable = True
            message = (f"The job stopped: the engine could not store its answers "
                       f"({exc.strerror or exc}). Free space on the engine's disk (its --state-dir) "
                       "and restart the engine: it resumes the job from the first answer not stored.")
        self._end(job, "failed", message)
        if isinstance(job, BatchJob):
            try:
                job.save_state()
            except Exception:  # noqa: BLE001 - the same disk may refuse this too
                log.exception("cannot save the failed state of job %s", job.job_id)

    @staticmethod
    def _run_cleanup(job: AskJob) -> None:
        if job.cleanup is not None:
            try:
                job.cleanup()
            except Exception:
                log.warning("cleanup of job %s failed", job.job_id, exc_info=True)
            job.cleanup = None

    def _run_ask(self, job: AskJob) -> None:
        budget = getattr(job.request, "budget", None)
        got_result = False
        try:
            if job.cancel.is_set():
                raise JobError("cancelled", "The question was cancelled.")
            stream = self.engine.ask(job.request, job.cancel)
            try:
                for event in stream:
                    event = self._event(job, event)
                    if event.get("type") == "result":
                        got_result = True
                    job.events.put(event)
                    if job.cancel.is_set() and not got_result:
                        break
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()
            if job.cancel.is_set() and not got_result:
                raise JobError("cancelled", "The question was cancelled.")
            self._end(job, "done")
        except BaseException as exc:  # noqa: BLE001 - mapped to an error event
            err = error_for_exception(exc, budget)
            if job.public_error is not None:
                err = job.public_error(err)
            if err.code in ("out_of_memory", "cancelled"):
                free_gpu_memory()
            self._end(job, "cancelled" if err.code == "cancelled" else "failed", err.message)
            job.events.put(self._event(job, {"type": "error", **err.body()["error"]}))
        finally:
            self._run_cleanup(job)  # before the end of the stream: the client sees it done
            job.events.put(None)
            with self._cond:
                self._jobs.pop(job.job_id, None)

    def _run_batch_step(self, job: BatchJob) -> bool:
        """Answer one item; True when the job is over."""
        index = job.next_index()
        if job.cancel.is_set():
            return self._end_cancelled(job)
        if index is None:
            self._end(job, "failed" if job.errors == job.total and job.total else "done",
                      f"{len(job.done_indexes)} answers, {job.errors} errors." + (
                          f" {job.note}" if job.note else ""))
            job.save_state()
            return True
        job.save_state()
        item, question = job.item(index)
        fields = {
            "raster_path": item["raster_path"], "aoi": item.get("aoi"), "question": question,
            "bands": item.get("bands"),
            **{k: job.spec[k] for k in ("strategy", "budget", "tokens_per_tile", "max_new_tokens",
                                        "seed", "faithful_empty_slots")
               if job.spec.get(k) is not None},
            "request_id": f"{job.job_id}:{index}",
        }
        line: dict[str, Any] = {
            "index": index, "layer": item.get("layer") or Path(item["raster_path"]).stem,
            "raster_path": item["raster_path"], "question": question, "answer": None,
            "error": None, "heatmap_path": None, "anchors_path": None, "tokens": {},
            "timings": {}, "bands": None, "palette": None,
        }
        result = None
        try:
            request = self.make_request(fields)
            stream = self.engine.ask(request, job.cancel)
            try:
                for event in stream:
                    if event.get("type") == "result":
                        result = event
                    if job.cancel.is_set():
                        break
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:  # noqa: BLE001
            err = error_for_exception(exc, fields.get("budget"))
            if err.code == "out_of_memory":
                free_gpu_memory()
            if err.code != "cancelled" and not job.cancel.is_set():
                line["error"] = f"{err.code}: {err.message}"
                line["error_code"] = err.code
        if job.cancel.is_set() and result is None:
            return self._end_cancelled(job)
        if result is not None:
            for key in ("answer", "heatmap_path", "anchors_path", "tokens", "timings", "cache",
                        "strategy", "budget", "bands", "palette"):
                if key in result:
                    line[key] = result[key]
        elif line["error"] is None:
            line["error"] = "internal: the engine ended without an answer."
        with job.lock:
            job.append_result(line)
        if job.cancel.is_set():  # cancelled while this answer ran: the job ends with it
            return self._end_cancelled(job)
        return False

    def _end_cancelled(self, job: BatchJob) -> bool:
        """End a running batch job whose cancel came (`cancel` gave it its message); True, the
        job is over."""
        self._end(job, "cancelled", CANCEL_MESSAGE)
        job.save_state()
        return True

    def _resume_batches(self) -> None:
        """Load and queue the unfinished batch jobs of the state dir; finished ones stay on disk
        (read when asked for), and those older than the retention are removed. A folder that
        cannot be read (engine/job_folder.py) never stops the start: its job is held as failed,
        with a message saying why, and its folder is kept as it is."""
        resumed: list[tuple[float, str, BatchJob]] = []
        for directory in sorted(self.jobs_dir.iterdir()) if self.jobs_dir.exists() else []:
            if not JOB_ID_RE.match(directory.name):
                continue
            try:
                state = read_state(directory)
                if is_finished(state):
                    self._expire(directory, state)
                    continue
                job = BatchJob(directory.name, read_spec(directory), directory)
                skipped: list[str] = []
                lines = read_results(job.results_path, skipped, total=job.total)
            except (OSError, ValueError) as exc:
                self._hold_unreadable(directory, exc)
                continue
            for line in lines:
                job.done_indexes.add(line["index"])
                if line.get("error"):
                    job.errors += 1
            if skipped:
                job.note = skipped_note(skipped)
                log.warning("batch job %s: %s", job.job_id, job.note)
            job.state = state.get("state", "queued")
            job.message = state.get("message")
            job.submitted = _submitted_at(directory, state)
            self._jobs[job.job_id] = job
            unfinished = job.state in ("queued", "running") or (job.state == "failed" and state.get("resumable"))
            if unfinished and state.get("cancel_requested"):
                job.cancel.set()
                self._finish_cancelled(job, cancel_on_disk=True)
                log.info("batch job %s was cancelled before a restart", job.job_id)
            elif unfinished:
                job.state = "queued"
                job.message = (f"Resumed after a restart at {len(job.done_indexes)} of "
                               f"{job.total} answers." + (f" {job.note}" if job.note else ""))
                self._try_save_state(job)  # its first step says a full disk to its owner
                resumed.append((job.submitted, job.job_id, job))
                log.info("resuming batch job %s (%d/%d done)", job.job_id,
                         len(job.done_indexes), job.total)
        # in the order they were submitted (their ids are random: the folders' order is not it)
        self._waiting.extend(job for _, _, job in sorted(resumed, key=lambda r: r[:2]))
        self._update_positions()

    def _hold_unreadable(self, directory: Path, exc: Exception) -> None:
        """A job folder the start cannot read: said in the log and in the job's info (failed,
        as `GET /jobs/{id}` answers it until it leaves the finished summaries); the folder stays
        as it is (the retention passes over it too), for its owner to mend or remove."""
        if isinstance(exc, OSError):
            where = Path(exc.filename).name if exc.filename else "a file of its folder"
            reason = f"{where} cannot be read ({exc.strerror or exc})"
        else:
            reason = str(exc)
        log.warning("batch job %s cannot be resumed: %s (its folder %s is kept)", directory.name,
                    reason, directory)
        info = {
            "job_id": directory.name, "state": "failed", "position": None, "done": 0,
            "total": 0, "errors": 0, "results_path": str(directory / "results.jsonl"),
            "message": (f"The job could not be resumed after a restart: {reason}. Its folder "
                        f"{directory} is kept as it is; submit the batch again, or remove the "
                        f"job with DELETE /jobs/{directory.name}?remove=true."),
            "kind": "batch"}
        self._keep_summary(directory.name, info)

    def _expire(self, directory: Path, state: dict) -> bool:
        """Remove the folder of a finished job older than the retention; True when removed."""
        if self.retention_days <= 0:
            return False
        if time.time() - job_finished_at(directory, state) < self.retention_days * 86400:
            return False
        shutil.rmtree(directory, ignore_errors=True)
        log.info("removed batch job %s, finished over %g days ago", directory.name,
                 self.retention_days)
        return True

    def housekeep(self) -> None:
        """Apply the retention while serving: remove the folders of finished jobs and the engine's
        output files older than it (the worker calls this after a job, at most once every
        `HOUSEKEEPING_INTERVAL_S`). A failure is logged, never raised."""
        self._last_housekeeping = time.monotonic()
        try:
            self._expire_finished_jobs()
            self._prune_outputs()
        except Exception:  # noqa: BLE001 - housekeeping never stops the worker
            log.warning("removing old jobs and outputs failed", exc_info=True)

    def _expire_finished_jobs(self) -> None:
        if self.retention_days <= 0 or not self.jobs_dir.is_dir():
            return
        for directory in sorted(self.jobs_dir.iterdir()):
            if not JOB_ID_RE.match(directory.name):
                continue
            with self._cond:
                if directory.name in self._jobs:  # waiting or running
                    continue
            try:
                state = read_state(directory)
            except (OSError, ValueError):  # an unreadable job is never removed by age
                continue
            if is_finished(state) and self._expire(directory, state):
                with self._cond:
                    self._finished.pop(directory.name, None)

    def _prune_outputs(self) -> None:
        if self.output_dir is not None:
            removed = prune_outputs(self.output_dir, self.retention_days)
            if removed:
                log.info("removed %d output files older than %g days from %s", removed,
                         self.retention_days, self.output_dir)
