"""Plugin settings stored in QgsSettings (engine URL, token, local engine launch, outputs).

Only plain values live here; :mod:`settings_page` shows them in QGIS's Options dialog.
The token is read from the setting if one is typed in, else from the token file the engine
writes at its first start (same location rules as ``engine/protocol.py``, duplicated here
because the plugin never imports the engine).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from qgis.core import QgsProject, QgsSettings
from qgis.PyQt.QtCore import QObject, pyqtSignal

from .paths import user_path, write_error

PREFIX = "geovqa/"
DEFAULT_URL = "http://127.0.0.1:8765"
DEFAULT_STRATEGY = "geollava"
STRATEGIES = ("geollava", "background", "anchored", "pyramid", "budget", "none", "uniform", "random")
# the plugin's own choice "Engine's default": the request leaves strategy and faithful_empty_slots
# out (null), so the engine uses the loaded adapter's training settings, else its own defaults
# (protocol ASK_FIELDS). Not an engine strategy; last in STRATEGY_CHOICES, so the Processing
# STRATEGY enum's numbers that models and scripts stored before it came keep their meaning.
ENGINE_DEFAULT_STRATEGY = "engine"
STRATEGY_CHOICES = STRATEGIES + (ENGINE_DEFAULT_STRATEGY,)
DEFAULT_TOKENS_PER_TILE = 24  # the engine protocol's DEFAULT_TOKENS_PER_TILE (checked by the tests)
# what a tokens-per-tile box shows at 0: the engine uses the checkpoint's own MAX_TOKENS
TOKENS_PER_TILE_AUTO_TEXT = f"checkpoint's own ({DEFAULT_TOKENS_PER_TILE} for GeoLLaVA-8K)"
STRATEGY_LABELS = {
    "geollava": "GeoLLaVA-8K (background pruning + anchors, as trained)",
    "background": "Background pruning only",
    "anchored": "Anchored selection only",
    "pyramid": "Pyramid (coarse to fine)",
    "budget": "Budget-aware",
    "none": "None (LongVA 2x2 pooling)",
    "uniform": "Uniform grid",
    "random": "Random",
    ENGINE_DEFAULT_STRATEGY: "Engine's default (the adapter's, else GeoLLaVA-8K)",
}
# short names for narrow places (the chat dock's Strategy list, the line under each answer);
# STRATEGY_LABELS says more, in their tooltips
STRATEGY_SHORT_LABELS = {
    "geollava": "GeoLLaVA-8K",
    "background": "Background pruning",
    "anchored": "Anchored selection",
    "pyramid": "Pyramid",
    "budget": "Budget-aware",
    "none": "None (2x2 pooling)",
    "uniform": "Uniform grid",
    "random": "Random",
    ENGINE_DEFAULT_STRATEGY: "Engine's default",
}
# the tooltips of the strategy lists: the long label, and for "Engine's default" what it does
STRATEGY_TIPS = dict(STRATEGY_LABELS, **{
    ENGINE_DEFAULT_STRATEGY: (
        "Engine's default: the question is sent without a strategy and without 'empty cluster "
        "slots', so an engine running a fine-tuned adapter uses the settings the adapter was "
        "trained with (no mismatch note), and any other engine its own default, GeoLLaVA-8K "
        "with empty slots dropped. The line under each answer names the strategy it used."),
})
TOKENS_PER_TILE_AUTO_SHORT = "auto"  # the same as TOKENS_PER_TILE_AUTO_TEXT, for the narrow dock
RESULTS_FOLDER = "geovqa_results"
SEND_RASTERS_LABELS = {  # client.SEND_RASTERS; short: the options page's width follows them
    "auto": "auto (by engine address)",
    "upload": "always upload",
    "path": "never upload (file paths)",
}
SEND_RASTERS_TIPS = {  # the details, as each entry's tooltip
    "auto": "Upload the raster when the engine is not on this computer (decided by its address); "
            "send the file path when it is.",
    "upload": "Always upload the raster, e.g. for an SSH tunnel on 127.0.0.1 to a remote engine.",
    "path": "Never upload: send file paths; the engine must see the same files.",
}


class _SettingsNotifier(QObject):
    """``saved`` is emitted after the options page saves, so an open dock takes the new values."""

    saved = pyqtSignal()


notifier = _SettingsNotifier()


@dataclass
class Settings:
    """Every user-facing option of the plugin with its default."""

    engine_url: str = DEFAULT_URL
    token: str = ""
    token_file: str = ""
    python: str = ""
    engine_dir: str = ""
    weights_dir: str = ""
    extra_args: str = ""
    output_dir: str = ""
    strategy: str = DEFAULT_STRATEGY
    budget: int = 0  # 0 = engine default (no cap)
    tokens_per_tile: int = 0  # 0: the checkpoint's own (the engine reads it from its config; 24 for GeoLLaVA-8K)
    max_new_tokens: int = 256
    faithful_empty_slots: bool = False  # geollava: 24 tokens every tile, as the checkpoint
    render_max_px: int = 2048
    request_timeout_s: int = 900
    send_rasters: str = "auto"  # client.SEND_RASTERS
    ca_cert: str = ""  # PEM file trusted for an https:// engine (its self-signed cert); '': system store

    @classmethod
    def load(cls) -> "Settings":
        s = QgsSettings()
        out = cls()
        for name, default in cls._fields().items():
            value = s.value(PREFIX + name, default)
            if isinstance(default, bool):  # before int: bool is an int; QSettings may give 'false'
                value = value if isinstance(value, bool) else str(value).strip().lower() in ("true", "1")
            elif isinstance(default, int):
                try:
                    value = int(value)
                except (TypeError, ValueError):
                    value = default
            else:
                value = default if value is None else str(value)
            setattr(out, name, value)
        if out.strategy not in STRATEGY_CHOICES:
            out.strategy = DEFAULT_STRATEGY
        if out.send_rasters not in SEND_RASTERS_LABELS:
            out.send_rasters = "auto"
        return out

    def save(self) -> None:
        s = QgsSettings()
        for name in self._fields():
            s.setValue(PREFIX + name, getattr(self, name))

    @classmethod
    def _fields(cls) -> dict:
        base = cls()
        return {k: v for k, v in vars(base).items() if not k.startswith("_")}

    # -- derived values ---------------------------------------------------------------------
    def request_options(self, **overrides) -> dict:
        """The model options of an ask request (keyword arguments of
        ``engine_protocol.build_ask_request``), from these settings; ``overrides`` are what a dialog or
        algorithm sets itself (e.g. the strategy chosen there)."""
        options = {
            "strategy": self.strategy,
            "budget": self.budget or None,
            "tokens_per_tile": self.tokens_per_tile or None,
            "max_new_tokens": self.max_new_tokens,
            "faithful_empty_slots": self.faithful_empty_slots,
        }
        unknown = set(overrides) - set(options)
        if unknown:
            raise TypeError(f"unknown request options: {', '.join(sorted(unknown))}")
        options.update(overrides)
        if options["strategy"] in (ENGINE_DEFAULT_STRATEGY, None):
            # "Engine's default": both left out, for the adapter's (else the engine's) settings
            options["strategy"] = options["faithful_empty_slots"] = None
        return options

    def resolved_token(self) -> str:
        """The bearer token: typed-in setting, else the chosen token file, else (for an engine on
        this computer only) the local engine's token file, else ''.

        The local engine's token is never sent to another host: it would hand that host the key
        to the engine on this computer. The client then asks for the remote engine's token.
        "Send rasters: always upload" on a 127.0.0.1 URL is the SSH-tunnel set-up, whose engine
        is on another computer: it gets no local token either.
        A token file that is not text (saved as UTF-16 "Unicode", another file saved over it), that
        cannot be read (no permission, a folder), or that was chosen and does not exist, raises
        ``engine_errors.EngineError('unauthorized')`` naming the file, why, and how to mend it; only the
        local engine's own token file not existing (yet: the engine makes it when it first
        starts), chosen or not, means no token."""
        if self.token.strip():
            return self.token.strip()
        chosen = bool(self.token_file.strip())
        if chosen:
            path = Path(user_path(self.token_file))
        elif is_loopback_url(self.engine_url) and self.send_rasters != "upload":
            path = default_token_path()
        else:
            return ""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            if chosen and not _same_file(path, default_token_path()):
                raise token_file_missing_error(path) from None
            return ""
        except OSError as exc:
            raise token_file_unreadable_error(path, exc, chosen) from None
        try:
            return data.decode("utf-8").strip()  # a UTF-8 byte-order mark is dropped by client.clean_token
        except UnicodeDecodeError as exc:
            raise token_file_error(path, data, exc.start, chosen) from None

    def results_dir(self, project: QgsProject | None = None) -> Path:
        """Where heatmaps, anchors and renders are saved so the project finds them again.

        Order: the configured output folder; ``geovqa_results/`` next to the saved project file;
        otherwise a folder in the QGIS profile (never only a temp dir).
        """
        if self.output_dir.strip():
            return Path(user_path(self.output_dir))
        project = project or QgsProject.instance()
        home = project.homePath() if project is not None else ""
        if project is not None and project.fileName() and home:
            return Path(home) / RESULTS_FOLDER
        return profile_results_dir()


def profile_results_dir() -> Path:
    """The results folder of a project not saved yet (with no folder set in the options)."""
    from qgis.core import QgsApplication

    return Path(QgsApplication.qgisSettingsDirPath()) / "geovqa" / "results"


def folder_problem(folder: Path) -> str:
    """Why results cannot be written in ``folder`` ('' when they can): it is a file, or a file
    cannot be made in it, or, when it does not exist yet, a folder cannot be made in the nearest
    existing folder above it (found by trying: :func:`paths.write_error`, which makes and removes
    a probe; ``os.access`` lets every folder pass on Windows)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        return f"{folder} is a file, not a folder."
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return f"{folder} cannot be made: {probe} is a file."
    error = write_error(probe, make_folder=probe != folder)
    if error is not None:
        why = "no permission" if isinstance(error, PermissionError) else (error.strerror or str(error))
        return (f"{folder} cannot be written ({why})." if probe == folder
                else f"{folder} cannot be made: {probe} cannot be written ({why}).")
    return ""


def config_dir() -> Path:
    """Engine config dir (same rules as engine.protocol.config_dir)."""
    override = os.environ.get("GEOVQA_CONFIG_DIR")
    if override:
        return Path(override)
    if sys.platform.startswith("win"):
        base = Path(os.environ.get("APPDATA", Path.home() / "AppData" / "Roaming"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    return base / "geovqa"


def is_loopback_url(url: str) -> bool:
    """True when ``url`` names this computer: a loopback host, or one of this computer's own
    addresses (:func:`this_computer_addresses`); an unparsable URL is not: no token goes there."""
    from .addresses import engine_address, is_own_host
    from .engine_errors import EngineError

    try:
        host = engine_address(url)[1]
    except EngineError:
        return False
    return is_own_host(host, this_computer_addresses())


def this_computer_addresses() -> tuple:
    """The IP addresses of this computer's network interfaces, as text (QNetworkInterface: read
    from the system, no name lookup, so cheap enough for the user-interface thread)."""
    from qgis.PyQt.QtNetwork import QNetworkInterface

    return tuple(a.toString() for a in QNetworkInterface.allAddresses())


def token_file_error(path: Path, data: bytes, start: int, chosen: bool):
    """The ``engine_errors.EngineError`` for a token file at ``path`` holding ``data``, which is not
    UTF-8 text from byte ``start`` on (engine/auth.py says the same of its own token file)."""
    from .engine_errors import EngineError

    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        why = " (it starts with a UTF-16 byte-order mark: an editor saved it as 'Unicode' / UTF-16)"
    else:
        why = f" (the first at byte {start})"
    if chosen:
        hint = ("Write the engine's token into it as ASCII text (not UTF-16), or type "
                "the token in Settings > Options > GeoVQA > Engine token.")
    else:  # the local engine's own file, which it refuses too
        hint = ("Delete the file and start the engine again to have a new token made, or write an ASCII "
                "token into it (not UTF-16); or type the token in Settings > Options > "
                "GeoVQA > Engine token.")
    return EngineError("unauthorized", f"The engine token file {path} holds bytes that are not text{why}, "
                       "so no token can be read from it.", hint)


def token_file_missing_error(path: Path):
    """The ``engine_errors.EngineError`` for a token file chosen in the settings that does not exist."""
    from .engine_errors import EngineError

    return EngineError("unauthorized", f"The engine token file {path} chosen in the GeoVQA settings does not "
                       "exist, so no token can be read from it.",
                       "Choose the token file again (the engine writes it as 'token' in its configuration "
                       "folder on its computer, ~/.config/geovqa/token on Linux), or type the token in "
                       "Settings > Options > GeoVQA > Engine token.")


def _same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` name the same path (neither needs to exist)."""
    try:
        return a.expanduser().resolve() == b.expanduser().resolve()
    except (OSError, RuntimeError):
        return False


def token_file_unreadable_error(path: Path, exc: OSError, chosen: bool):
    """The ``engine_errors.EngineError`` for a token file at ``path`` that reading failed on with ``exc``
    (no permission, a folder, a disk error)."""
    from .engine_errors import EngineError

    why = exc.strerror or exc.__class__.__name__
    if isinstance(exc, PermissionError):
        mend = "Give your user permission to read it"
    elif isinstance(exc, IsADirectoryError):
        mend = "Choose the token file itself, not a folder" if chosen else "Remove that folder"
    else:
        mend = "Check the file"
    if chosen:
        hint = f"{mend}, or type the token in Settings > Options > GeoVQA > Engine token."
    else:  # the local engine's own file, which it makes again when it is gone
        gone = " and start" if isinstance(exc, IsADirectoryError) else ", or delete it and start"
        hint = (f"{mend}{gone} the engine again to have a new token made; or type the token in "
                "Settings > Options > GeoVQA > Engine token.")
    return EngineError("unauthorized", f"The engine token file {path} cannot be read ({why}), so no token can be "
                       "read from it.", hint)


def default_token_path() -> Path:
    """Where the engine keeps its bearer token."""
    return config_dir() / "token"


def make_client(settings: "Settings | None" = None):
    """An :class:`client.EngineClient` configured from the saved settings."""
    from .client import EngineClient

    from .engine_errors import EngineError

    settings = settings or Settings.load()
    try:
        token, token_error = settings.resolved_token(), None
    except EngineError as exc:  # an unreadable token file: /health needs no token, the rest says why
        token, token_error = "", exc
    client = EngineClient(settings.engine_url, token, stream_timeout=float(settings.request_timeout_s),
                          send_rasters=settings.send_rasters, ca_file=user_path(settings.ca_cert),
                          own_addresses=this_computer_addresses())
    if token_error is not None:
        client.token_error = token_error
    from .engine_process import local_engine_serves

    url = settings.engine_url
    client.local_engine_loading = lambda: local_engine_serves(url)
    return client
