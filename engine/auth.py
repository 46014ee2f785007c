"""Bearer-token authentication for the engine server.

At the first start a random token is written to ``protocol.token_path()`` (the user's config
dir) with mode 0600; later starts reuse it, and an empty token file gets a new token in place.
A token file that is not ASCII text (UTF-16 from an editor, another file saved over it) is
refused with `TokenFileError`, naming the file and what to do; it is never overwritten. A UTF-8
byte-order mark in front of an ASCII token (Windows editors' "UTF-8 with BOM") is dropped, as the
plugin drops it, so both read the same token from the same file.
Clients send it as ``Authorization: Bearer <token>`` and the server compares it in constant
time.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
import tempfile
from pathlib import Path

from engine import protocol

TOKEN_BYTES = 32
UTF8_BOM = b"\xef\xbb\xbf"


class TokenFileError(ValueError):
    """The token file exists but holds no usable token; the message says how to mend it."""


def load_or_create_token(path: Path | None = None) -> str:
    """Return the server token, creating it (mode 0600, parent dir 0700) when missing.

    A token file that exists but holds nothing (``: > token``, a disk that filled up) gets a
    new token written in its place, so the server never starts without one.
    """
    path = Path(path) if path is not None else protocol.token_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = _read_token(path)
    if token is None:
        try:
            return _write_new_token(path, replace=False)
        except FileExistsError:  # another process created it meanwhile: use theirs
            token = _read_token(path) or ""
    if token:
        # Tighten the mode if someone loosened it; the token is a secret.
        if os.name == "posix" and stat.S_IMODE(path.stat().st_mode) & 0o077:
            os.chmod(path, 0o600)
        return token
    written = _write_new_token(path, replace=True)
    # Read it back: if two servers mend the same empty file at once, the last write wins and
    # both should serve the token that is in the file.
    return _read_token(path) or written


def _read_token(path: Path) -> str | None:
    """The token in `path` (stripped; '' when empty; a leading UTF-8 byte-order mark dropped), or
    None when there is no such file; TokenFileError when the file is not ASCII text."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    body = data.removeprefix(UTF8_BOM)
    try:
        return body.decode("ascii").strip()
    except UnicodeDecodeError as exc:
        why = (" (it starts with a UTF-16 byte-order mark: an editor saved it as 'Unicode' / UTF-16)"
               if data.startswith((b"\xff\xfe", b"\xfe\xff"))
               else f" (the first at byte {exc.start + len(data) - len(body)})")
        raise TokenFileError(
            f"The engine's token file {path} holds bytes that are not ASCII text{why}, so it holds "
            "no token the engine can use. Delete the file to have a new token made at the next "
            "start (clients on this computer read it from there; give it again to clients "
            "elsewhere), or write an ASCII token into it."
        ) from None


def _write_new_token(path: Path, *, replace: bool) -> str:
    """Write a fresh token to `path` atomically and return it.

    The token goes to a private (0600) temporary file in the same folder first, so `path`
    never holds a half-written token. ``replace=False`` links it into place and raises
    FileExistsError if `path` appeared meanwhile; ``replace=True`` overwrites `path`.
    """
    token = secrets.token_urlsafe(TOKEN_BYTES)
    fd, tmp_name = tempfile.mkstemp(prefix=".token-", dir=path.parent)  # mode 0600
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(token + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if os.name == "posix":
            os.chmod(tmp, 0o600)
        if replace:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path, token)
    finally:
        tmp.unlink(missing_ok=True)
    return token


def _link_new(tmp: Path, path: Path, token: str) -> None:
    """Put the finished `tmp` at `path`, raising FileExistsError when `path` exists."""
    try:
        os.link(tmp, path)  # unlike a rename, refuses to overwrite
    except FileExistsError:
        raise
    except OSError:  # no hard links here (FAT, some network shares): create it exclusively
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(token + "\n")


def bearer_from_header(value: str | None) -> str | None:
    """The token inside an ``Authorization`` header value, or None when absent or malformed."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != protocol.TOKEN_SCHEME.lower() or not token.strip():
        return None
    return token.strip()


def token_matches(expected: str, header_value: str | None) -> bool:
    """True when the Authorization header carries the expected token (constant-time compare)."""
    given = bearer_from_header(header_value)
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))
