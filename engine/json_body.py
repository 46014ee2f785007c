"""Reading a JSON request body (a plain /ask or /batch body, or the ``request`` part of an
upload) into Python values, or refusing it with ``bad_request`` and a sentence for a person.

Besides invalid UTF-8 and invalid JSON this refuses what `json.loads` lets through or fails on
badly: ``NaN``, ``Infinity`` and numbers too large for a float (``1e400``), which JSON does not
have; whole numbers longer than Python converts (4300 digits; its error tells the client to
raise that limit); nesting too deep for the parser (a RecursionError); and lone UTF-16
surrogates written as escapes (``"\\ud800"``), which no later step can encode as UTF-8.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from engine.jobs import JobError
from engine.json_files import text_is_encodable


def parse_json(raw: bytes, what: str = "The request body") -> Any:
    """`raw` as JSON; `what` names it in the messages ("The 'request' part")."""
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise JobError("bad_request", f"{what} is nested too deeply.") from None
    except ValueError as exc:
        if "integer string conversion" in str(exc):  # Python's limit on digits, whose message
            # tells the client to call sys.set_int_max_str_digits() (a parse_int hook checking
            # each number would cost a fifth more on a body of numbers, on the event loop)
            raise JobError("bad_request", f"{what} has a whole number of more than "
                           f"{sys.get_int_max_str_digits()} digits, too many for any field.") from None
        raise JobError("bad_request", f"{what} is not valid JSON: {exc}") from None
    if not text_is_encodable(value):
        raise JobError("bad_request", f"{what} has text that contains invalid characters "
                       "(a lone UTF-16 surrogate such as \\ud800).")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large")
    return value
