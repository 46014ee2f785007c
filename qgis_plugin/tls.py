"""TLS for an engine on an ``https://`` URL: which certificates the client trusts, and a sentence
for each way a secure connection fails. Standard library only (``ssl``).

Trust: the system's trust store; or, when the *CA certificate* setting names a PEM file, that
file (the engine's own self-signed ``--tls-cert``, or the CA that signed it). There is no switch
to skip the check: a certificate that is not trusted is an error saying what to do.

:func:`explain` turns a failed connection into an ``EngineError`` when TLS is the reason:
a certificate not trusted, made out for another host or expired; an engine that speaks plain
HTTP on an ``https://`` URL; an https engine asked with ``http://``. The last two are told by
a short probe of the engine's port (nothing is sent over it but a TLS hello or ``GET /health``
without the token).
"""

from __future__ import annotations

import http.client
import socket
import ssl

from .addresses import dial_host
from .dialling import dialled
from .engine_errors import EngineError
from .paths import user_path

CA_CERT_LABEL = "CA certificate (PEM)"  # its row in the options page (a self-signed https engine)
CA_SETTING = f"Settings > Options > GeoVQA > {CA_CERT_LABEL}"
MAKE_CERT = "docs/protocol.md, 'Starting the engine'"
PROBE_TIMEOUT = 5.0
# X509_V_ERR_* codes (ssl.SSLCertVerificationError.verify_code)
NOT_YET_VALID, EXPIRED = 9, 10
HOST_MISMATCH, EMAIL_MISMATCH, IP_MISMATCH = 62, 63, 64


def context(ca_file: str = "") -> ssl.SSLContext:
    """The client's TLS context: the system trust store, or only the PEM file `ca_file`.

    Raises ``EngineError('tls_ca_file')`` when that file cannot be used."""
    path = user_path(ca_file)
    if not path:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=path)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ca_file_error(path, exc) from None


def ca_file_error(path: str, exc: Exception):
    if isinstance(exc, FileNotFoundError):
        why = "does not exist"
    elif isinstance(exc, IsADirectoryError):
        why = "is a folder, not a certificate file"
    elif isinstance(exc, ssl.SSLError):
        why = ("holds no PEM certificate (text starting with '-----BEGIN CERTIFICATE-----'; a binary "
               ".cer/.der file can be converted with: openssl x509 -inform der -in FILE -out FILE.pem)")
    else:
        why = f"cannot be read ({getattr(exc, 'strerror', None) or exc})"
    return EngineError("tls_ca_file", f"The CA certificate file {path} {why}.",
                       f"Choose the engine's certificate (the file it was started with as --tls-cert, "
                       f"copied to this computer) in {CA_SETTING}, or clear that setting to trust the "
                       "system's certificate authorities.")


def explain(client, exc: Exception):
    """The ``EngineError`` for `exc`, a failed connection of `client` (an ``EngineClient``),
    when TLS explains it; None when it does not (the caller then says 'not reachable')."""
    url = client.base_url
    if isinstance(exc, ssl.SSLCertVerificationError):
        return certificate_error(client, exc)
    if client.scheme == "https" and isinstance(exc, ssl.SSLError):
        if speaks_plain_http(client.host, client.port):
            return EngineError(
                "tls_not_https", f"The engine at {client.host}:{client.port} speaks plain HTTP, not HTTPS, "
                f"so {url} cannot reach it.",
                "Start the engine with --tls-cert and --tls-key for an encrypted connection, or (for an "
                "engine on this computer, or through an SSH tunnel) change the engine URL to http:// in "
                "Settings > Options > GeoVQA.")
        return None
    if client.scheme == "http" and isinstance(exc, (ConnectionResetError, http.client.BadStatusLine)):
        if speaks_tls(client.host, client.port):
            https = "https://" + url.split("://", 1)[1]
            return EngineError(
                "tls_needs_https", f"The engine at {url} only speaks HTTPS (it was started with --tls-cert).",
                f"Change the engine URL to {https} in Settings > Options > GeoVQA (and, for a self-signed "
                f"certificate, choose it in {CA_SETTING}).")
    return None


def certificate_error(client, exc: ssl.SSLCertVerificationError):
    code, reason = exc.verify_code, (exc.verify_message or exc.reason or str(exc)).rstrip(".")
    if code in (HOST_MISMATCH, EMAIL_MISMATCH, IP_MISMATCH):
        return EngineError(
            "tls_host_mismatch", f"The engine's certificate is not made out for {client.host}, the host in "
            f"the engine URL {client.base_url} ({reason}).",
            f"Use a host name or address the certificate names in the engine URL, or make the "
            f"certificate again with {client.host} in its subjectAltName ({MAKE_CERT}).")
    ca = (client.ca_file or "").strip()
    if code in (EXPIRED, NOT_YET_VALID):
        hint = ("Make a new certificate on the engine's computer and start the engine with it (then choose "
                f"the new one in {CA_SETTING}), or check the clocks of both computers.")
    elif ca:
        hint = (f"The CA certificate chosen in {CA_SETTING} ({ca}) is not the one the engine uses: choose "
                "the file the engine was started with as --tls-cert (a certificate made again must be "
                "copied again), and check that the URL points to your engine.")
    else:
        hint = ("If the engine uses a self-signed certificate, copy its certificate file (the one given to "
                f"--tls-cert, never the key) to this computer and choose it in {CA_SETTING}. "
                "Otherwise check that the URL points to your engine.")
    return EngineError("tls_untrusted", f"The engine at {client.base_url} presents a certificate this "
                       f"computer does not trust ({reason}).", hint)


def speaks_plain_http(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> bool:
    """True when ``GET /health`` over plain HTTP at host:port gets an HTTP answer (no token sent).
    ``localhost`` is dialled at 127.0.0.1, as the client dials it (:func:`addresses.dial_host`)."""
    conn = dialled(http.client.HTTPConnection(host, port, timeout=timeout))
    try:
        conn.request("GET", "/health")
        conn.getresponse().read()
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def speaks_tls(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> bool:
    """True when host:port completes a TLS handshake, or fails it only on the certificate (which
    still proves TLS). Certificates are checked as always (against ``host``); nothing is sent
    after the hello. ``localhost`` is dialled at 127.0.0.1 (:func:`addresses.dial_host`)."""
    try:
        with socket.create_connection((dial_host(host), port), timeout=timeout) as raw:
            with ssl.create_default_context().wrap_socket(raw, server_hostname=host):
                return True
    except ssl.SSLCertVerificationError:
        return True
    except (OSError, ValueError):
        return False
