"""The answer stream's events checked against their documented shapes (engine/protocol.py
EVENT_TYPES, docs/protocol.md) before anything of the plugin reads them (checked_event).

A field of the wrong type (a list for a number, a string for an object, NaN, a number too large
for a float) is dropped, as if the engine had left it out, so an odd engine costs that detail,
never the answer nor a traceback in the dock (a result's answer left out is the words streamed
before it: :class:`ask_stream.AskStream`); an event whose type is not a name is an EngineError
'bad_response'. The fields the plugin adds to a result itself (:class:`ask_stream.AskStream`,
:class:`tasks.AskTask`) are never taken from the engine. Standard library only.
"""

from __future__ import annotations

import math

from .engine_errors import EngineError

# fields the plugin itself adds to a result event: an engine's would move or replace its files
PLUGIN_FIELDS = ("upload_pixel_offset", "upload_pixel_scale", "upload_reduced", "local_heatmap_path",
                 "local_anchors_path", "files_warning")


def _text(value) -> bool:
    return isinstance(value, str)


def _number(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0 and _number(value)


def _positive_count(value) -> bool:
    return _count(value) and value > 0


def _flag(value) -> bool:
    return isinstance(value, bool)


def _object(value) -> bool:
    return isinstance(value, dict)


def _bands(value) -> bool:
    return isinstance(value, list) and bool(value) and all(_positive_count(b) for b in value)


def _numbers(value) -> bool:
    """A dict of numbers (``tokens``, ``timings``): its entries that are not are dropped."""
    return isinstance(value, dict)


# the fields of the events (of every type: no name has two meanings) the plugin reads, with the
# test of their documented type
FIELDS = {
    # queued, heartbeat
    "position": _count, "job_id": _text,
    # status
    "stage": _text, "progress": _number, "message": _text,
    # token
    "text": _text,
    # result
    "answer": _text, "tokens": _numbers, "timings": _numbers, "peak_memory_bytes": _count, "cache": _object,
    "heatmap_path": _text, "heatmap_file": _text, "anchors_path": _text, "anchors_file": _text,
    "anchors": _object, "crs_wkt": _text, "bands": _bands, "palette": _flag, "strategy": _text,
    "stopped": _text, "budget": _count,
    # error (also message)
    "code": _text, "hint": _text, "retry_budget": _positive_count,
}


def checked_event(event: dict) -> dict:
    """``event`` (a JSON object with a ``type``) with every field of :data:`FIELDS` that is null or
    of the wrong type dropped (``tokens`` and ``timings``: their entries that are not finite
    numbers), and the plugin's own :data:`PLUGIN_FIELDS` dropped; EngineError('bad_response') when its ``type`` is
    not text."""
    kind = event.get("type")
    if not isinstance(kind, str):
        raise EngineError("bad_response", f"The engine sent an event whose type is not a name: {kind!r:.120}.",
                          "Look at the engine's version and log: it does not speak this plugin's protocol.")
    out = {k: v for k, v in event.items() if k not in PLUGIN_FIELDS}
    for name, fits in FIELDS.items():
        if name not in out:
            continue
        if out[name] is None or not fits(out[name]):  # null: as left out (readers use .get(name, default))
            del out[name]
        elif fits is _numbers:
            out[name] = {k: v for k, v in out[name].items() if _number(v)}
    return out
