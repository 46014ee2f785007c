"""Small JSON files that sit next to weights or adapters (``generation_config.json``,
``geovqa_training.json``): read one as a JSON object, or say in the caller's words why it cannot
be used; the lines of a JSON Lines text (:func:`json_lines`); json.loads that fails only with
ValueError (:func:`loads`); whether every string of a parsed value can be written as UTF-8
(:func:`text_is_encodable`); what a JSON value is, in words (:func:`json_kind`). Standard library only (the
loader reads them before anything heavy is imported)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_json_object(path: str | os.PathLike, error: type[Exception], *, unreadable_advice: str = "",
                     not_object_advice: str = "") -> dict[str, Any] | None:
    """The JSON object in `path`, or None when there is no such file (an optional file). A file
    that cannot be read or parsed raises `error` "PATH cannot be read (why)" + `unreadable_advice`;
    one that holds something other than an object, "PATH is not a JSON object" + `not_object_advice`
    (each advice is appended as given, e.g. ". Run `make weights` again ...")."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise error(f"{path} cannot be read ({exc}){unreadable_advice}") from exc
    if not isinstance(data, dict):
        raise error(f"{path} is not a JSON object{not_object_advice}")
    return data


def json_lines(text: str) -> list[str]:
    """The lines of a JSON Lines text (read in text mode, so ``\\r\\n`` is ``\\n`` already), split
    at ``\\n`` only. Not ``str.splitlines()``: it also ends a line at U+2028, U+2029 and U+0085,
    which JSON allows unescaped inside a string (``json.dumps(..., ensure_ascii=False)`` writes
    them so), and a record whose text holds one was read as two broken lines."""
    return text.split("\n")


def loads(text: str) -> Any:
    """json.loads, with nesting too deep for the parser (RecursionError) a ValueError "nested too
    deeply", as its other failures are (JSONDecodeError, an integer of more than 4,300 digits)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def text_is_encodable(value: Any) -> bool:
    """True when every string (keys too) in the parsed JSON `value` can be written as UTF-8: a
    lone UTF-16 surrogate written as an escape (``"\\ud800"``) parses, but no report, prediction
    file, tokenizer or console takes it."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def json_kind(value: Any) -> str:
    """What a parsed JSON value is, for a person ("a list", "a string", "null") in a message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    return {dict: "an object", list: "a list", str: "a string"}.get(type(value), "a number")
