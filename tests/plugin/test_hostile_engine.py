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
