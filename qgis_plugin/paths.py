"""The one rule for paths typed in the plugin's settings (standard library only).

A path setting may be typed with ``~`` for the home folder (``~/geovqa/token``); every place
that uses one (token file, CA certificate, engine Python, engine and weights folders, output
folder) goes through :func:`user_path`, so ``~`` means the same everywhere.
"""

from __future__ import annotations

import os
import re


def user_path(text: str) -> str:
    """``text`` without surrounding blanks and with a leading ``~`` / ``~user`` expanded to that
    home folder; '' stays '' (the setting is not set)."""
    text = (text or "").strip()
    return os.path.expanduser(text) if text else ""


def export_path(path: str, kinds: tuple, chosen: str) -> str:
    """The file an export writes for ``path`` as typed in a save dialog: with the ``chosen``
    kind's ending added when it ends with none of ``kinds`` ("md", "json", "csv"): Qt's dialog
    adds none on Linux or macOS, and the ending decides the format written."""
    ending = os.path.splitext(path)[1].lower().lstrip(".")
    return path if ending in kinds else f"{path}.{chosen}"


# a data source's secrets: ``password=…`` / ``authcfg=…`` (a WMS / XYZ URI, a PostGIS one, quoted
# or not) and the password of a URL's ``user:password@``
_SECRET_KEYS = re.compile(r"""(^|[&\s])(password|authcfg)=('[^']*'|"[^"]*"|[^&\s]*)""", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(://[^/:@\s]*):[^/@\s]*@")


def public_source(source: str) -> str:
    """A layer's data source as it may be written into a file a user shares (an exported
    conversation): without its password or authentication configuration id (QGIS's own
    ``QgsDataSourceUri.removePassword`` leaves a WMS / XYZ URI's ``password=`` in)."""
    source = source or ""
    text = _SECRET_KEYS.sub("", source)
    if text.startswith("&") and not source.startswith("&"):  # the secret came first
        text = text[1:]
    return _URL_PASSWORD.sub(r"\1@", text)
