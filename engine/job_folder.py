"""Reading a batch job's folder (``<state_dir>/jobs/<id>/``, written by `engine.jobs`), checked.

The folder may have been damaged or edited since the engine wrote it (a disk error, a person, a
sync tool), and the server reads every unfinished job's folder as it starts: what it cannot use
is said in a sentence (a `JobFolderError`, or the numbers of the results lines it skipped) and
never raised as a KeyError or TypeError that would stop the start. Nothing here removes or
rewrites a file, except the half-written last line of ``results.jsonl`` (`read_results`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine import protocol
from engine.json_files import json_kind


class JobFolderError(ValueError):
    """A file of a job's folder that the engine cannot use; the message names the file."""


def read_json_object(path: Path) -> dict:
    """The JSON object in `path`; JobFolderError when it is not JSON or not an object (an
    OSError, such as a missing file, is left to the caller)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise JobFolderError(f"{path.name} is nested too deeply to read") from None
    except ValueError as exc:  # invalid JSON or UTF-8
        raise JobFolderError(f"{path.name} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise JobFolderError(f"{path.name} holds {json_kind(value)}, not a JSON object")
    return value


def read_state(directory: Path) -> dict:
    """The job's ``state.json``: an object whose ``state``, when given, is one of JOB_STATES."""
    state = read_json_object(directory / "state.json")
    if "state" in state and state["state"] not in protocol.JOB_STATES:
        raise JobFolderError(f"state.json's state {str(state['state'])[:40]!r} is not one of "
                             f"{', '.join(protocol.JOB_STATES)}")
    return state


def read_spec(directory: Path) -> dict:
    """The job's ``spec.json`` (the checked /batch body), with what `engine.jobs.BatchJob` reads
    of it: items (objects with a ``raster_path``) and questions (strings), neither empty."""
    spec = read_json_object(directory / "spec.json")
    items, questions = spec.get("items"), spec.get("questions")
    if not isinstance(items, list) or not items:
        raise JobFolderError("spec.json has no list of items")
    if not isinstance(questions, list) or not questions:
        raise JobFolderError("spec.json has no list of questions")
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("raster_path"), str):
            raise JobFolderError(f"spec.json's item {i + 1} is not an object with a 'raster_path'")
    if not all(isinstance(q, str) for q in questions):
        raise JobFolderError("spec.json's questions are not all text")
    return spec


def result_problem(line: Any, total: int | None = None) -> str | None:
    """Why a parsed results.jsonl line is not an answer the engine can use, said after "line N"
    ("holds a list, not an answer object"); None when it is. What the engine relies on: an
    object with a whole-number ``index`` from 0 (below the job's `total` answers, when given)."""
    if not isinstance(line, dict):
        return f"holds {json_kind(line)}, not an answer object"
    index = line.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        return "has no answer index (a whole number, 0 or more)"
    if total is not None and index >= total:
        return f"has the index {index}, beyond the job's {total} answers"
    return None


def read_results(path: Path, skipped: list[str] | None = None, total: int | None = None) -> list[dict]:
    """The answers of a job's results.jsonl; no file: none.

    A half-written last line (killed mid-write: no line end) is cut off the file. A whole line
    that is not valid JSON or not an answer (`result_problem`; `total`: the job's answers, when
    known) is skipped, not cut: the lines after it are answers too, and nothing but a
    half-written line is removed. Each skipped line is added to `skipped` ("line 3 holds a list,
    not an answer object")."""
    results: list[dict] = []
    if not path.exists():
        return results
    good_bytes = 0
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.endswith(b"\n"):
                break
            good_bytes += len(raw)
            try:
                line = json.loads(raw)
            except (ValueError, RecursionError):
                problem = "is not valid JSON"
            else:
                problem = result_problem(line, total)
            if problem is None:
                results.append(line)
            elif skipped is not None:
                skipped.append(f"line {number} {problem}")
    if good_bytes != path.stat().st_size:
        with open(path, "r+b") as fh:
            fh.truncate(good_bytes)
    return results


def skipped_note(skipped: list[str]) -> str:
    """The sentence a job's message and the log carry about the results lines it skipped."""
    listed = "; ".join(skipped[:5]) + (f"; and {len(skipped) - 5} more" if len(skipped) > 5 else "")
    return (f"Some of results.jsonl could not be read and was skipped (it stays in the file as "
            f"it is): {listed}.")
