"""TLS for ``serve``: the ``--tls-cert`` / ``--tls-key`` pair, checked before the model loads.

uvicorn reads the two PEM files itself (``ssl_certfile`` / ``ssl_keyfile``) when it starts to
listen, which is after the model has loaded (minutes with real weights). `check_pair` loads them
the way it will, first, so a missing or unreadable file, a file that is not PEM, a key protected
by a passphrase (uvicorn would ask for it on a terminal the plugin does not have) or a key that
belongs to another certificate stops ``serve`` at once with one sentence.

No certificate is made here: the engine does not depend on `cryptography`. docs/protocol.md
("Starting the engine") gives the one `openssl req -x509 ...` command for a self-signed one.
"""

from __future__ import annotations

import logging
import os
import ssl
import stat
from pathlib import Path

log = logging.getLogger("engine.server")

CERT_MARK = b"-----BEGIN CERTIFICATE-----"
KEY_MARK = b"PRIVATE KEY-----"  # BEGIN PRIVATE KEY, BEGIN RSA/EC/ENCRYPTED PRIVATE KEY
# OpenSSL's reasons for a key of another certificate: of the same type, of another type (an RSA
# key for an EC certificate goes to the RSA slot, which then has no certificate)
NOT_A_PAIR = ("KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED", "KEY_TYPE_MISMATCH")
HOW_TO_MAKE = "docs/protocol.md, 'Starting the engine', shows how to make a self-signed pair"


class TLSFileError(ValueError):
    """The certificate or key given to ``serve`` cannot be used; the message says why."""


def check_pair(cert: str | os.PathLike, key: str | os.PathLike) -> None:
    """Raise TLSFileError unless `cert` is a PEM certificate and `key` its unencrypted PEM
    private key, both readable; warn when other users can read the key."""
    cert_bytes = _read(cert, "--tls-cert", "certificate")
    key_bytes = _read(key, "--tls-key", "private key")
    if CERT_MARK not in cert_bytes:
        why = (": it holds a private key (are --tls-cert and --tls-key swapped?)"
               if KEY_MARK in cert_bytes else " (text starting with '-----BEGIN CERTIFICATE-----')")
        raise TLSFileError(f"--tls-cert {cert} holds no PEM certificate{why}; {HOW_TO_MAKE}.")
    if KEY_MARK not in key_bytes:
        why = (": it holds a certificate (are --tls-cert and --tls-key swapped?)"
               if CERT_MARK in key_bytes else " (text starting with '-----BEGIN PRIVATE KEY-----')")
        raise TLSFileError(f"--tls-key {key} holds no PEM private key{why}; {HOW_TO_MAKE}.")
    asked = []

    def password() -> bytes:  # only called for a key protected by a passphrase
        asked.append(True)
        return b""

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(os.fspath(cert), os.fspath(key), password=password)
    except ssl.SSLError as exc:
        if asked:
            raise _passphrase_error(key) from None
        if exc.reason in NOT_A_PAIR:
            raise TLSFileError(
                f"--tls-key {key} is not the private key of the certificate in --tls-cert {cert} "
                "(they are not a pair): give the key that was made with that certificate, or "
                f"make both again; {HOW_TO_MAKE}.") from None
        raise TLSFileError(f"--tls-cert {cert} and --tls-key {key} cannot be used for TLS "
                           f"(OpenSSL: {exc.reason or exc}); {HOW_TO_MAKE}.") from None
    except OSError as exc:  # read just now; gone or changed since
        raise TLSFileError(f"--tls-cert {cert} or --tls-key {key} cannot be read: "
                           f"{exc.strerror or exc}.") from None
    if asked:  # an empty passphrase opened it here, but uvicorn would ask on the terminal
        raise _passphrase_error(key)
    _warn_if_others_can_read(key)


def _passphrase_error(key: str | os.PathLike) -> TLSFileError:
    return TLSFileError(
        f"--tls-key {key} is protected by a passphrase, which the engine cannot ask for. "
        f"Write a copy without it, readable by you only (openssl pkey -in {key} -out "
        "engine-key.pem; chmod 600 engine-key.pem), and give that to --tls-key.")


def _read(path: str | os.PathLike, option: str, what: str) -> bytes:
    p = Path(path)
    if p.is_dir():
        raise TLSFileError(f"{option} {path} is a folder, not the {what} file.")
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise TLSFileError(f"{option} {path} does not exist (the TLS {what} file).") from None
    except OSError as exc:
        raise TLSFileError(f"{option} {path} cannot be read: {exc.strerror or exc}.") from None


def _warn_if_others_can_read(key: str | os.PathLike) -> None:
    if os.name != "posix":
        return
    try:
        mode = os.stat(key).st_mode
    except OSError:
        return
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("The TLS private key %s can be read by other users of this computer; "
                    "make it readable by you only (chmod 600 %s).", key, key)
