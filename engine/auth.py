"""Bearer-token authentication for the engine server.

At the first start a random token is written to ``protocol.token_path()`` (the user's config
dir) with mode 0600; later starts reuse it. Clients send it as ``Authorization: Bearer <token>``
and the server compares it in constant time.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path

from engine import protocol

TOKEN_BYTES = 32


def load_or_create_token(path: Path | None = None) -> str:
    """Return the server token, creating it (mode 0600, parent dir 0700) when missing."""
    path = Path(path) if path is not None else protocol.token_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        token = ""
    if token:
        # Tighten the mode if someone loosened it; the token is a secret.
        if os.name == "posix" and stat.S_IMODE(path.stat().st_mode) & 0o077:
            os.chmod(path, 0o600)
        return token
    token = secrets.token_urlsafe(TOKEN_BYTES)
    # O_EXCL: if another process created it meanwhile, read theirs instead of overwriting.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_or_create_token(path)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(token + "\n")
    if os.name == "posix":
        os.chmod(path, 0o600)
    return token


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
