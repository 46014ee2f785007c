"""The one rule for paths typed in the plugin's settings (standard library only).

A path setting may be typed with ``~`` for the home folder (``~/geovqa/token``); every place
that uses one (token file, CA certificate, engine Python, engine and weights folders, output
folder) goes through :func:`user_path`, so ``~`` means the same everywhere. Whether a folder
can be written is found by writing in it (:func:`write_error`), never with ``os.access``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile


def user_path(text: str) -> str:
    """``text`` without surrounding blanks and with a leading ``~`` / ``~user`` expanded to that
    home folder; '' stays '' (the setting is not set)."""
    text = (text or "").strip()
    return os.path.expanduser(text) if text else ""


def write_error(folder, make_folder: bool = False) -> OSError | None:
    """The error that making a file (``make_folder``: a folder) in the existing folder
    ``folder`` gets; None when it can be made. The probe is made and removed at once.

    ``os.access(folder, os.W_OK)`` cannot tell: on Windows it checks only the read-only
    attribute, which folders ignore, so every folder passes, also one whose permissions (ACL)
    forbid writing; and a folder in which files may not be made can still take new folders
    (a drive's root on Windows), which is what ``make_folder`` asks about."""
    try:
        if make_folder:
            shutil.rmtree(tempfile.mkdtemp(prefix=".geovqa-probe-", dir=folder), ignore_errors=True)
        else:
            handle, name = tempfile.mkstemp(prefix=".geovqa-probe-", dir=folder)
            os.close(handle)
            os.unlink(name)
    except OSError as exc:
        return exc
    return None


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
