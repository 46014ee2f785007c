"""The errors of talking to the engine, each written for a person (EngineError, with a code of
docs/protocol.md, a message and what to do), and the readers that make them of what the engine
sends back: its JSON (engine_json), its error answers (error_from_body, error_body); how a
connection ended and how big an upload is, in the words those errors use (connection_words,
size_text); and how much of an error is shown at once (shown_text). Standard library only; every other module of the client imports its errors from here.
"""

from __future__ import annotations

import http.client
import json


class EngineError(Exception):
    """A failure talking to the engine, with a message written for a person."""

    def __init__(self, code: str, message: str, hint: str | None = None, status: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint
        self.status = status

    def __str__(self) -> str:
        return self.message + (f" {self.hint}" if self.hint else "")


class EngineUnavailable(EngineError):
    """The engine cannot be reached (not started, wrong URL, or it crashed)."""


def engine_json(text: str, message: str):
    """``text`` from the engine read as JSON, or ``EngineError('bad_response')`` with ``message``,
    whose ``{why}`` says what is wrong: not JSON, or JSON nested deeper than Python can read (which
    ``json.loads`` raises as RecursionError, not ValueError: a broken or hostile remote engine).
    Every place the client reads the engine's JSON goes through here."""
    try:
        return json.loads(text)
    except RecursionError as exc:
        why, cause = "JSON nested too deeply to be read", exc
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        why, cause = "not JSON", exc
    raise EngineError("bad_response", message.replace("{why}", why)) from cause


# what to do about an error status that came without the engine's own words (a proxy in front
# of the engine, a web server on its address, an engine dying): the engine's own errors say it
_PROXY_DOWN = ("The engine, or a proxy in front of it, is not available: wait a moment and ask again; if it "
               "lasts, look at the engine's log (it may have stopped) and at the engine URL in Settings > "
               "Options > GeoVQA.")
STATUS_HINTS = {
    403: "Something refused the request: check the engine URL and token in Settings > Options > GeoVQA (a proxy "
         "between this computer and the engine may refuse it).",
    404: "Check the path in the engine URL (Settings > Options > GeoVQA): it is the engine's base URL, such as "
         "http://127.0.0.1:8765, without an endpoint.",
    413: "The request was too large for the engine or a proxy in front of it: ask about a smaller area of "
         "interest (a proxy may take less than the engine's upload limit).",
    429: "Too many requests for the engine or a proxy in front of it: wait a moment and ask again.",
    502: _PROXY_DOWN, 503: _PROXY_DOWN, 504: _PROXY_DOWN,
}


def error_from_body(status: int, body: bytes) -> EngineError:
    """Turn an HTTP error response (protocol error_body) into an EngineError."""
    try:  # a body that cannot be read says no more than its status
        err = engine_json(body.decode("utf-8", errors="replace"), "{why}").get("error") or {}
    except (EngineError, AttributeError):
        err = {}
    if not isinstance(err, dict):
        err = {}
    # a field that is not text (a list, a number: a broken or hostile engine, a proxy's JSON)
    # counts as left out: the error is said in words, never with a TypeError
    code = _text(err.get("code")) or ("unauthorized" if status == 401 else "internal")
    message = _text(err.get("message")) or f"The engine answered HTTP {status}."
    hint = _text(err.get("hint"))
    if status == 401 and not hint:
        hint = "Check the engine token in Settings > Options > GeoVQA."
    if not _text(err.get("message")) and not hint:  # not the engine's words: a proxy's, a web server's
        hint = STATUS_HINTS.get(status)
    if code == "model_loading":
        return EngineUnavailable(code, message or "The engine is still loading the model.", hint, status)
    return EngineError(code, message, hint, status)


def not_the_answer(status: int, reason: str, location: str | None, asked: str, base_url: str) -> EngineError:
    """EngineError 'bad_response' for an answer to ``asked`` ("/health", "the question") with a
    status that is neither an error nor what the protocol answers with: a redirect (a proxy, a
    web server on the engine's address; the plugin follows none: a token sent on to another
    address would leave this computer) or a 2xx other than 200 (an answer without the stream)."""
    reason = " ".join(str(reason or "").split())[:60]
    status_words = f"HTTP {status}" + (f" {reason}" if reason else "")
    if 300 <= status < 400:
        where = " ".join(str(location or "").split())[:200]
        return EngineError(
            "bad_response",
            f"The engine at {base_url} answered {asked} with a redirect ({status_words})"
            + (f" to {where}" if where else "") + ".",
            "The plugin follows no redirect: put the address the engine itself answers at in the engine URL "
            "(Settings > Options > GeoVQA).", status)
    return EngineError(
        "bad_response", f"The engine at {base_url} answered {asked} with {status_words}, not with its answer.",
        "Check the engine URL (host and port) in Settings > Options > GeoVQA: another program may answer there.",
        status)


def _text(value) -> str | None:
    """``value`` when it is text with something in it, else None."""
    return value if isinstance(value, str) and value.strip() else None


# the most bytes of an error answer read (an engine's error body is a few hundred): one that
# never ends (a hostile or broken engine, a proxy streaming a page) is not read into memory
MAX_ERROR_BYTES = 1 << 20


def error_body(resp: http.client.HTTPResponse) -> bytes:
    """The body of an HTTP error answer ``resp``, as much of it as came, at most MAX_ERROR_BYTES:
    one cut short (the connection reset while it was read: an engine dying, a proxy) is what
    arrived, and :func:`error_from_body` then says the status alone, as it does for one too long
    (cut at the limit: not JSON)."""
    try:
        return resp.read(MAX_ERROR_BYTES)
    except http.client.IncompleteRead as exc:
        return exc.partial
    except (OSError, http.client.HTTPException):
        return b""


def connection_words(exc: Exception) -> str:
    """How a connection ended, in words: "the engine closed it", "reset" ..., for
    :meth:`client.EngineClient._unavailable` and :func:`ask_stream.stream_broken` (not the
    exception's repr, "IncompleteRead(0 bytes read)")."""
    if isinstance(exc, http.client.IncompleteRead):
        return "it was closed before the answer was complete"
    if isinstance(exc, (http.client.RemoteDisconnected, ConnectionAbortedError)):
        return "it was closed"
    if isinstance(exc, ConnectionResetError):
        return "it was reset"
    if isinstance(exc, BrokenPipeError):
        return "the engine stopped reading"
    return getattr(exc, "strerror", None) or exc.__class__.__name__


def size_text(n: int) -> str:
    """A byte count for a person: bytes below 1 MiB, else MiB / GiB (of 2^20 / 2^30 bytes) with one
    decimal, as the engine says sizes. Every size the plugin says about an upload uses it
    (:mod:`upload` too), so the engine's 2 GiB limit reads "2.0 GiB" everywhere."""
    if n < 1 << 20:
        return f"{n} bytes"
    if n < 1 << 30:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / (1 << 30):.1f} GiB"


# the most characters of an error shown at once (QGIS's message bar, the chat, the status line):
# an engine's message of megabytes (a broken or hostile engine, a traceback) is cut here; the
# whole text goes to QGIS's log (and Diagnostics)
MAX_SHOWN_CHARS = 500
LOG_WHERE = "the whole message is in QGIS's log (View > Panels > Log Messages, GeoVQA)"


def shown_text(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """``text`` whole when it has at most ``limit`` characters, else its first ``limit`` with an
    ellipsis and how long it was, and where the whole is (its caller logs it)."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit].rstrip()}… ({len(text)} characters; {LOG_WHERE})"
