"""Engine addresses: an engine URL read into its scheme, host, port and path (engine_address,
with the engine's default port for a URL that names none), a URL pasted with an endpoint at its
end (endpoint_in_url), whether a host is this computer (is_own_host: decides uploads and the
token), and the address a host is dialled at (dial_host).

A ``localhost`` URL is dialled at 127.0.0.1, where a local engine listens: Windows and macOS look
``localhost`` up as ::1 first, and Windows tries a refused ::1 for about two seconds before
127.0.0.1, on every call (health polls too). The request's ``Host`` header and the TLS server
name stay ``localhost`` (:func:`dialling.dialled`), so a certificate made out for it still
verifies. Host names are never looked up here.
"""

from __future__ import annotations

import ipaddress
import urllib.parse

from .engine_errors import EngineError
from .engine_protocol import ASK_ENDPOINT, BATCH_ENDPOINT, FILES_ENDPOINT, HEALTH_ENDPOINT, JOBS_ENDPOINT

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# the address a connection to a loopback name is opened to: where an engine started for it
# listens (engine_process.served_host; the engine's own default host, engine/protocol.py)
LOOPBACK_NAMES = {"localhost": "127.0.0.1"}
DEFAULT_ENGINE_URL = "http://127.0.0.1:8765"
DEFAULT_PORT = 8765  # engine/protocol.py DEFAULT_PORT


def host_port(host: str, port: int) -> str:
    """``host:port`` as a URL writes it (an IPv6 address in brackets: ``[::1]:8765``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def engine_address(url: str) -> tuple:
    """``(scheme, host, port, path_prefix)`` of an engine URL, or EngineError('bad_url').

    A URL without a port means the engine's default port (8765) on this computer, and 443 / 80
    elsewhere; *Start local engine* starts the engine on exactly this host and port.
    """
    text = (url or "").strip() or DEFAULT_ENGINE_URL
    parsed = urllib.parse.urlsplit(text)
    if parsed.scheme not in ("http", "https"):
        raise EngineError("bad_url", f"The engine URL must start with http:// or https:// (got {url!r}).")
    host = parsed.hostname
    if not host:
        raise EngineError("bad_url", f"The engine URL {url!r} names no host; e.g. {DEFAULT_ENGINE_URL}.")
    if any(ch.isspace() for ch in parsed.netloc):  # "127.0.0.1 :8765": no host has a space
        raise EngineError("bad_url", f"The engine URL {url!r} has a space in its host or port; "
                          f"e.g. {DEFAULT_ENGINE_URL}.")
    try:
        port = parsed.port
        if port == 0:  # urllib takes it; nothing listens there
            raise ValueError(port)
    except ValueError:
        raise EngineError("bad_url", f"The engine URL {url!r} has an invalid port; ports are 1 to 65535, "
                          f"e.g. {DEFAULT_ENGINE_URL}.") from None
    if port is None:
        port = DEFAULT_PORT if host in LOOPBACK_HOSTS else (443 if parsed.scheme == "https" else 80)
    return parsed.scheme, host, port, parsed.path.rstrip("/")


ENDPOINT_NAMES = tuple(e.strip("/") for e in (HEALTH_ENDPOINT, ASK_ENDPOINT, BATCH_ENDPOINT, JOBS_ENDPOINT,
                                               FILES_ENDPOINT))


def endpoint_in_url(url: str) -> str:
    """The engine URL ``url`` without an endpoint its path ends in (``.../health``, ``.../ask``,
    ``.../jobs/ID``: pasted from a test with curl), when it ends in one; '' when it does not (or
    cannot be read). Every call appends its endpoint to the URL, so such a URL reaches none."""
    try:
        _scheme, _host, _port, prefix = engine_address(url)
    except EngineError:
        return ""
    parts = [p for p in prefix.split("/") if p]
    for i, part in enumerate(parts):
        if part.lower() in ENDPOINT_NAMES and (i == len(parts) - 1 or part.lower() in ("jobs", "files")):
            parsed = urllib.parse.urlsplit(url.strip())
            base = "/".join([""] + parts[:i])
            return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, base, "", ""))
    return ""


def is_own_host(host: str, own_addresses=()) -> bool:
    """True when ``host`` (an engine URL's host) is this computer: a loopback name or address, or
    an IP address among ``own_addresses`` (this computer's interface addresses, e.g. its LAN
    address 192.168.1.20 for an engine serving on 0.0.0.0).

    Host names other than ``localhost`` are never looked up: a lookup may take seconds (this is
    decided when the client is made, on the user-interface thread), and the connection looks the
    name up again, so a name that answered with our address may reach another computer, which
    must never get this computer's engine token. Such a URL counts as another computer."""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a host name
        return False
    if address.is_loopback:  # 127.0.0.2, 127.1.2.3: this computer too
        return True
    if address.is_unspecified or address.is_multicast:
        return False
    own = set()
    for text in own_addresses or ():
        try:
            own.add(ipaddress.ip_address(str(text)))
        except ValueError:
            continue
    return address in own


def dial_host(host: str) -> str:
    """The address a connection to an engine URL's ``host`` is opened to: 127.0.0.1 for
    ``localhost``, which Windows and macOS resolve to ::1 first, where no local engine listens
    (Windows then waits about two seconds before trying 127.0.0.1); any other host as it is."""
    return LOOPBACK_NAMES.get(host, host)
