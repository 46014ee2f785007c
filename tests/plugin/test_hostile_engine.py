"""The client against a misbehaving or hostile engine: error bodies, /health answers and answer
streams of the wrong shape, odd statuses, endless or oversized answers. Every one must end as an
EngineError with a sentence the dock can show (or, for a detail of the wrong shape, cost only that
detail), never a Python traceback, a hang or a lost answer. The generated cases are few and
derandomized (fast, deterministic); the fuzzing that found the bugs ran with many more."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FAST = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# any JSON value the engine could send: NaN, infinities and integers too large for a float included
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-10**400, max_value=10**400),
                         st.floats(allow_nan=True), st.text(max_size=6))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)), max_leaves=6)


def _said_in_words(exc) -> None:
    """``exc`` is an EngineError the dock can show: text for its code, message and hint."""
    from geovqa.engine_errors import EngineError

    assert isinstance(exc, EngineError), exc
    assert isinstance(exc.code, str) and exc.code
    assert isinstance(exc.message, str) and exc.message.strip()
    assert exc.hint is None or isinstance(exc.hint, str)
    assert str(exc).startswith(exc.message)


ERROR_BODIES = st.one_of(
    st.binary(max_size=40),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"error": st.fixed_dictionaries(
        {}, optional={"code": JSON_VALUES, "message": JSON_VALUES, "hint": JSON_VALUES})}).map(
        lambda v: json.dumps(v).encode()))


@FAST
@given(status=st.sampled_from([400, 401, 403, 404, 413, 422, 429, 500, 502, 503, 507]), body=ERROR_BODIES)
def test_any_error_body_is_an_engine_error_said_in_words(status, body):
    """An error body whose code, message or hint is not text (a list, a number, an object: a
    broken or hostile engine, a proxy's own JSON) made an EngineError whose str() raised
    TypeError ("can only concatenate list (not "str") to list"): the dock's error line, the batch
    row and Processing's log failed with a traceback instead of saying the error."""
    from geovqa.engine_errors import error_from_body

    _said_in_words(error_from_body(status, body))


def test_an_error_message_that_is_not_text_is_said_by_its_status():
    from geovqa.engine_errors import error_from_body

    err = error_from_body(503, json.dumps({"error": {"code": ["busy"], "message": {"text": "later"},
                                                     "hint": 5}}).encode())
    assert (err.code, err.message, err.hint) == ("internal", "The engine answered HTTP 503.", None)
    err = error_from_body(400, json.dumps({"error": {"code": "bad_aoi", "message": "No area.",
                                                     "hint": ["draw one"]}}).encode())
    assert (err.code, str(err)) == ("bad_aoi", "No area.")


EVENT_TYPES = ("queued", "status", "token", "result", "error", "heartbeat")
EVENT_FIELDS = ("text", "stage", "progress", "position", "message", "code", "hint", "answer", "tokens", "timings",
                "bands", "palette", "strategy", "retry_budget", "heatmap_file", "anchors", "request_id",
                "upload_pixel_offset", "upload_reduced")
EVENTS = st.fixed_dictionaries({"type": st.one_of(st.sampled_from(EVENT_TYPES), JSON_VALUES)},
                               optional={name: JSON_VALUES for name in EVENT_FIELDS})


@FAST
@given(event=EVENTS)
def test_an_event_of_any_shape_is_read_or_refused_in_words(event):
    """Events whose fields have the wrong type (a status's stage a list, its progress an integer
    too large for a float, a message that is a number, the bands [1e999]) raised TypeError /
    OverflowError in the words and the progress the dock, the batch and Processing make of them
    (tasks.event_text, BatchProgress.event, bands.bands_text): the answer under way was lost as
    'Unexpected error in the GeoVQA plugin', or the dock's slot failed with a traceback. Such a
    field now counts as left out; only an event whose type is no name is refused, in words."""
    from geovqa.ask_stream import parse_event
    from geovqa.bands import bands_text
    from geovqa.engine_errors import EngineError
    from geovqa.tasks import BatchProgress, event_text

    try:
        ev = parse_event(json.dumps(event).encode() + b"\n")
    except EngineError as exc:
        _said_in_words(exc)
        return
    progress = BatchProgress(2, lambda _percent: None)
    progress.event(ev, 256)
    assert 0.0 <= progress.fraction <= 1.0
    assert event_text(ev) is None or isinstance(event_text(ev), str)
    assert isinstance(bands_text(ev.get("bands"), ev.get("palette")), str)
    # what the dock and the batch do with them: words joined, a message with its hint, the time
    assert isinstance("" + ev.get("text", "") + ev.get("answer", ""), str)
    assert isinstance((ev.get("message") or "") + " " + (ev.get("hint") or ""), str)
    float((ev.get("timings") or {}).get("total") or 0)
    assert not {"upload_pixel_offset", "upload_reduced"} & set(ev)  # the plugin's own, never the engine's


def _odd_events(stub_engine, change):
    """Make ``stub_engine`` send its events passed through ``change(event) -> [events]``."""
    from stub_engine import StubEngine

    def events(req):
        for ev in StubEngine.events(stub_engine, req):
            yield from change(dict(ev))

    stub_engine.events = events


def test_an_answer_with_odd_fields_and_no_request_ids_is_shown_whole(plugin, raster_layer, stub_engine):
    """An engine that leaves request_id out of its events (the protocol says each echoes it) had its
    answer taken for a stopped question's by the dock: every event dropped, the result files
    discarded, the question 'Answering…' for ever. Odd fields (a stage that is a list, a progress
    too large for a float, a token's text a number, token counts in a list, a time that is text)
    ended the answer as 'Unexpected error in the GeoVQA plugin' or raised in the dock's slot."""
    from conftest import python_errors, wait_for_tasks, wait_until

    def change(ev):
        ev.pop("request_id", None)
        if ev["type"] == "status":
            yield dict(ev, stage=["read"], progress=10**400, message={"m": 1})
        if ev["type"] == "token":
            yield {"type": "token", "text": 5}
        if ev["type"] == "result":
            ev.update(tokens=[1, 2], timings={"total": "soon"}, bands=[1e999], strategy=["x"],
                      upload_pixel_offset=["a", "b"], upload_reduced={"sent": [1], "of": "x"})
        yield ev

    _odd_events(stub_engine, change)
    layer = raster_layer()
    dock = plugin.dock
    dock.set_layer(layer)
    with python_errors() as errors:
        dock.ask("What is here?")
        wait_until(lambda: dock.turns() and dock.turns()[-1].get("done"), 30, "the answer")
        wait_for_tasks()
    assert not errors, errors[0]
    turn = dock.turns()[-1]
    assert turn.get("error") is None, turn
    assert turn["answer"] == "The area is 64 x 48 pixels with 3 bands."
    assert turn.get("heatmap_layer_id") and turn.get("anchors_layer_id")


def test_a_result_without_its_answer_keeps_the_streamed_words_everywhere(stub_engine, tmp_path):
    """A result that leaves out its answer (or sends a number) gave the batch and Processing an
    empty answer although its words had streamed: now every reader gets those words."""
    from geovqa.client import EngineClient
    from geovqa.engine_protocol import build_ask_request

    _odd_events(stub_engine, lambda ev: [dict(ev, answer=42) if ev["type"] == "result" else ev])
    from conftest import write_raster

    path = write_raster(tmp_path / "scene.tif")
    client = EngineClient(stub_engine.url, stub_engine.token, send_rasters="path")
    events = list(client.ask(build_ask_request("What?", path)).events())
    assert events[-1]["type"] == "result"
    assert events[-1]["answer"] == "The area is 64 x 48 pixels with 3 bands. "


def test_an_event_of_another_question_is_refused_in_words(stub_engine, tmp_path):
    """An event echoing another question's request_id (streams mixed up: an engine's bug, a
    proxy) is not taken for this question's answer."""
    from geovqa.client import EngineClient
    from geovqa.engine_errors import EngineError
    from geovqa.engine_protocol import build_ask_request

    _odd_events(stub_engine, lambda ev: [dict(ev, request_id="another") if ev["type"] == "result" else ev])
    from conftest import write_raster

    client = EngineClient(stub_engine.url, stub_engine.token, send_rasters="path")
    with pytest.raises(EngineError, match="another question") as err:
        list(client.ask(build_ask_request("What?", write_raster(tmp_path / "scene.tif"))).events())
    _said_in_words(err.value)
    assert err.value.code == "bad_response"


def test_an_out_of_memory_retry_budget_too_large_for_the_budget_box_is_no_crash(plugin, raster_layer, stub_engine):
    """retry_budget 10**12 (an int) went into the dock's budget box, whose setValue raised
    OverflowError in the dock's slot when the retry was clicked; 10**400 before that in the
    error event."""
    from conftest import python_errors, wait_for_tasks, wait_until

    stub_engine.fail_with = {"code": "out_of_memory", "message": "Out of GPU memory.", "hint": "Retry smaller.",
                             "retry_budget": 10**12}
    dock = plugin.dock
    dock.set_layer(raster_layer())
    with python_errors() as errors:
        dock.ask("What is here?")
        wait_until(lambda: dock.turns() and dock.turns()[-1].get("done"), 30, "the error")
        wait_for_tasks()
        dock.retry_smaller()
    assert not errors, errors[0]
    assert dock.turns()[-1]["error"].startswith("Out of GPU memory.")


HEALTH_FIELDS = ("status", "model", "device", "gpu_name", "quantization", "four_bit", "compute", "weights_present",
                 "demo_model", "message", "strategies", "max_upload_bytes", "max_read_pixels", "heartbeat_s",
                 "queue_length")
TRAINED = st.fixed_dictionaries(  # an adapter's training settings (/health adapter_settings)
    {"bands": st.one_of(st.integers(), JSON_VALUES)},
    optional={name: JSON_VALUES for name in ("strategy", "tokens_per_tile", "budget", "faithful_empty_slots")})
HEALTHS = st.fixed_dictionaries(
    {"protocol": JSON_VALUES, "adapter": st.one_of(st.none(), st.text(min_size=1, max_size=8)),
     "adapter_settings": st.one_of(JSON_VALUES, TRAINED)},
    optional={name: JSON_VALUES for name in HEALTH_FIELDS})


@FAST
@given(health=HEALTHS)
def test_a_health_answer_of_any_shape_is_said_on_the_status_line(health):
    """An adapter's training settings whose bands are a number (True, 3) made the status line's
    summary raise TypeError ("'int' object is not iterable") in the dock's slot: the status line
    stayed on its last words and QGIS showed a traceback after every health check."""
    from geovqa import status
    from geovqa.client import health_read_budget

    level, text = status.summary(health)
    assert level in status.COLORS and isinstance(text, str) and text
    budget = health_read_budget(health)
    assert budget is None or (isinstance(budget, int) and budget > 0)


def test_an_adapter_whose_bands_are_a_number_is_said_without_them():
    from geovqa import status

    health = {"status": "ok", "protocol": 1, "model": "GeoLLaVA-8K", "adapter": "/w/out/adapter",
              "adapter_settings": {"strategy": "anchored", "bands": 3}}
    assert status.summary(health)[1].endswith("with adapter out/adapter (trained with anchored)")
