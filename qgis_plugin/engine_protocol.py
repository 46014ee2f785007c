"""The engine protocol as the plugin speaks it (the engine's side: engine/protocol.py; the page
that explains it: docs/protocol.md): its version, endpoints, event types, heartbeat header and
question limit, and the ``POST /ask`` request body, built and checked here before it is sent
(build_ask_request, question_too_long), so a question the engine would refuse is said at once;
and whether an engine speaks this version (protocol_error, of its ``/health`` answer).
"""

from __future__ import annotations

import json
import uuid

from .engine_errors import EngineError, EngineUnavailable

PROTOCOL_VERSION = 1
ASK_ENDPOINT = "/ask"
HEALTH_ENDPOINT = "/health"
BATCH_ENDPOINT = "/batch"
JOBS_ENDPOINT = "/jobs"
FILES_ENDPOINT = "/files"
FINAL_EVENTS = ("result", "error")
# heartbeat: nothing else happened for a while; the stream is alive
KNOWN_EVENTS = ("queued", "status", "token", "result", "error", "heartbeat")
MAX_QUESTION_CHARS = 2000
HEARTBEAT_HEADER = "X-Heartbeat-S"  # engine/protocol.py HEARTBEAT_HEADER


def protocol_error(health: dict, base_url: str) -> EngineUnavailable | None:
    """EngineUnavailable 'wrong_protocol' when the engine's ``/health`` answer ``health`` reports a
    protocol other than PROTOCOL_VERSION, or one that is no whole number; None when it is ours.

    The version is one whole number (docs/protocol.md, *Versioning*): fields may be added within a
    version, so an engine of the same version is used whatever else it adds; removing or
    changing a field makes the next version, whose answers this plugin would misread, so no
    question is asked of it. The sentence names both versions and which side to update."""
    theirs = health.get("protocol")
    whole = isinstance(theirs, int) and not isinstance(theirs, bool)
    if whole and theirs == PROTOCOL_VERSION:
        return None
    if whole:  # the side that is behind is the one to update
        hint = (f"Update the GeoVQA plugin (Plugins > Manage and Install Plugins) to a version for protocol {theirs}, "
                f"or run an engine of protocol {PROTOCOL_VERSION}." if theirs > PROTOCOL_VERSION else
                f"Update the engine to the version that came with this plugin (protocol {PROTOCOL_VERSION}), "
                "or use a GeoVQA plugin for its protocol.")
        return EngineUnavailable(
            "wrong_protocol",
            f"The engine at {base_url} speaks protocol version {theirs}; this plugin speaks version "
            f"{PROTOCOL_VERSION}, so it asks that engine nothing.", hint)
    try:
        shown = json.dumps(theirs)
    except (TypeError, ValueError):
        shown = repr(theirs)
    shown = shown if len(shown) <= 40 else shown[:39] + "…"
    return EngineUnavailable(
        "wrong_protocol",
        f"The engine at {base_url} reports a protocol version that is not a whole number ({shown}); this "
        f"plugin speaks version {PROTOCOL_VERSION}, so it asks that engine nothing.",
        "Look at the engine's version and log, and update the engine or the plugin so that both speak the "
        "same protocol.")


def new_request_id() -> str:
    return uuid.uuid4().hex


def question_too_long(question: str) -> str | None:
    """Why ``question`` (stripped, as it is sent) is longer than the engine takes
    (MAX_QUESTION_CHARS, engine/protocol.py), with what to do; None when it is not."""
    n = len(question.strip()) if isinstance(question, str) else 0
    if n <= MAX_QUESTION_CHARS:
        return None
    return (f"The question has {n} characters; the engine takes at most {MAX_QUESTION_CHARS}: "
            "shorten it.")


def questions_too_long(text: str) -> str | None:
    """:func:`question_too_long` of the first of a batch's questions (``text``: one a line, blank
    lines skipped) that is longer than the engine takes, naming it by its number and, when blank
    lines come before it, by the line it is on ("Question 3 (line 5) has ..."); None when none is."""
    questions = [(line, q) for line, q in enumerate(text.splitlines(), 1) if q.strip()]
    for number, (line, question) in enumerate(questions, 1):
        too_long = question_too_long(question)
        if too_long and len(questions) > 1:
            where = f"Question {number}" if line == number else f"Question {number} (line {line})"
            return too_long.replace("The question has", f"{where} has", 1)
        if too_long:
            return too_long
    return None


def build_ask_request(
    question: str,
    raster_path: str | None,
    *,
    aoi: dict | None = None,
    bands: list | None = None,
    strategy: str | None = "geollava",
    budget: int | None = None,
    tokens_per_tile: int | None = None,
    max_new_tokens: int = 256,
    seed: int | None = None,
    request_id: str | None = None,
    faithful_empty_slots: bool | None = False,
) -> dict:
    """The JSON body of ``POST /ask`` (protocol ASK_FIELDS), validated on the client side.
    ``strategy`` and ``faithful_empty_slots`` None are sent as null: the engine then uses the
    loaded adapter's training settings, else its defaults."""
    if not isinstance(question, str) or not question.strip():
        raise EngineError("empty_question", "Please type a question.")
    question = question.strip()
    too_long = question_too_long(question)
    if too_long:
        raise EngineError("question_too_long", too_long)
    return {
        "raster_path": raster_path,
        "question": question,
        "aoi": aoi,
        "bands": list(bands) if bands else None,
        "strategy": strategy,
        "budget": int(budget) if budget else None,
        "tokens_per_tile": int(tokens_per_tile) if tokens_per_tile else None,
        "max_new_tokens": int(max_new_tokens),
        "seed": seed,
        "request_id": request_id or new_request_id(),
        "faithful_empty_slots": None if faithful_empty_slots is None else bool(faithful_empty_slots),
    }
