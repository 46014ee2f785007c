"""Numeric settings the engine reads from environment variables (retention days, feature-cache
bytes, heartbeat seconds): one rule for all of them. Read when an engine starts, not at import,
so a bad value stops only what uses it, with a message that names the variable and says what
it takes."""

from __future__ import annotations

import math
import os
from typing import Callable, TypeVar

T = TypeVar("T")


def env_number(name: str, default: T, parse: Callable[[str], T | None], takes: str) -> T:
    """The value of environment variable `name` read by `parse` (None: not acceptable), `default`
    when it is unset or blank; ValueError "NAME must be <takes>, not '<text>'." otherwise."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    value = parse(text)
    if value is None:
        raise ValueError(f"{name} must be {takes}, not {text!r}.")
    return value


def finite_number(text: str) -> float | None:
    """`text` as a finite float, else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def positive_number(text: str) -> float | None:
    """`text` as a finite float above 0, else None."""
    value = finite_number(text)
    return value if value is not None and value > 0 else None


def whole_number(text: str) -> int | None:
    """`text` as a whole number of 0 or more (digits only), else None."""
    return int(text) if text.isdigit() else None


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def env_flag(name: str, takes: str) -> bool:
    """Environment variable `name` as an on/off switch: True for 1, true, yes or on, False when it
    is unset, blank, 0, false, no or off (any case); ValueError "NAME must be <takes>, not
    '<text>'." for anything else. Anything but "" and "0" used to count as on, so
    ``=false`` or ``=no`` turned the switch on."""
    text = os.environ.get(name, "").strip()
    if not text or text.lower() in FALSE_WORDS:
        return False
    if text.lower() in TRUE_WORDS:
        return True
    raise ValueError(f"{name} must be {takes}, not {text!r}.")
