"""The chat dock's conversations, saved with the QGIS project and read back with it.

QGIS keeps a plugin's per-project state in project entries (``QgsProject.writeEntry``, here
scope ``geovqa``): they are written into the .qgs/.qgz with the rest of the project, and the
project is marked modified when one changes, so QGIS asks to save it. The entry holds one JSON
text, ``{"version": 1, "conversations": {layer id: [turn, ...]}}``; layer ids are stable in a
saved project, so each conversation comes back to its layer.

Only the plain JSON-safe fields of a turn are kept (never a ``_`` field such as the QgsGeometry
of a retry); a turn still being answered is stored as interrupted. Of the engine's result event a
turn keeps what the conversation shows and exports (token counts, timings, strategy, cache hits,
the result files' paths), not what would only make every turn bigger (:data:`RESULT_NOT_KEPT`):
the anchors GeoJSON inline, the raster's CRS as WKT (the same in every turn about a layer; the
heatmap GeoTIFF and the anchors GeoJSON carry it) and a second copy of the answer. The request
sent is kept as it is: its area of interest is the only record of where the question was about.
The files' paths (the heatmap's and anchors' of the result, a render's and the request's
``raster_path`` of a render) are stored as QGIS stores layer sources (``QgsProject.writePath``:
relative to the project file unless the project is set to absolute paths) and read back with
``QgsProject.readPath``, so they stay true when the project's folder is moved; an absolute path
(an entry of an earlier version) is read as it is. An entry that cannot be read
(edited by hand, cut short, nested too deeply), or a single turn of it (a question that is no text, a layer's value
that is no list), is left out with a message in the QGIS log, never an error; when the
conversations are next saved it is kept aside, as it was, in the entry ``conversations_unreadable``
(``{"version": 1, "unreadable": [item, ...]}``, each item ``{"entry": text}``, ``{"layer_id": id,
"turn": turn}`` or ``{"layer_id": id, "turns": value}``), appended to what is already there, so
nothing of it is lost.
"""

from __future__ import annotations

import json
import math

from qgis.core import QgsMessageLog, QgsProject

from .compat import MSG_WARNING

SCOPE = "geovqa"
KEY = "conversations"
UNREADABLE_KEY = "conversations_unreadable"
VERSION = 1
LOG_TAG = "GeoVQA"
INTERRUPTED = "interrupted: the answer was not complete when the project was saved"
TEXT_FIELDS = ("answer", "error", "meta", "aoi_label", "layer", "layer_id")
# result event fields a turn does not keep: the anchors inline (their file is kept), the raster's
# CRS WKT (the result files carry it), the answer (the turn's own "answer")
RESULT_NOT_KEPT = ("anchors", "crs_wkt", "answer")
_MAX_DEPTH = 32
RESULT_PATHS = ("local_heatmap_path", "local_anchors_path")  # of a turn's "result"


def json_safe(value, depth: int = 0) -> bool:
    """True for plain JSON values (str, finite numbers, bools, None, lists and str-keyed dicts of them)."""
    if depth > _MAX_DEPTH:
        return False
    if value is None or isinstance(value, (str, bool, int)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(json_safe(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and json_safe(v, depth + 1) for k, v in value.items())
    return False


def kept_result(result: dict) -> dict:
    """What a turn keeps of the engine's result event (all but :data:`RESULT_NOT_KEPT`)."""
    return {k: v for k, v in result.items() if k not in RESULT_NOT_KEPT}


def plain_turn(turn: dict) -> dict:
    """The fields of ``turn`` worth keeping; one not finished is marked interrupted."""
    out = {k: v for k, v in turn.items() if isinstance(k, str) and not k.startswith("_") and json_safe(v)}
    if isinstance(out.get("result"), dict):
        out["result"] = kept_result(out["result"])
    if not out.get("done"):
        out.update(done=True, interrupted=True, meta=INTERRUPTED)
    return out


def with_paths(turn: dict, convert) -> dict:
    """``turn`` with its files' paths passed through ``convert`` (``QgsProject.writePath`` /
    ``readPath``); the dicts changed are copies."""
    def conv(value):
        return convert(value) if isinstance(value, str) and value else value

    out = dict(turn)
    if isinstance(out.get("result"), dict):
        out["result"] = {k: conv(v) if k in RESULT_PATHS else v for k, v in out["result"].items()}
    if out.get("rendered_path"):
        out["rendered_path"] = conv(out["rendered_path"])
        if isinstance(out.get("request"), dict) and "raster_path" in out["request"]:  # the render sent
            out["request"] = {**out["request"], "raster_path": conv(out["request"]["raster_path"])}
    return out


def dumps(conversations: dict, write_path=None) -> str:
    """The entry's text for ``conversations`` (layer id -> turns); empty conversations are left
    out. ``write_path``: how the files' paths are stored (``QgsProject.writePath``)."""
    kept = {lid: [plain_turn(t) for t in turns] for lid, turns in conversations.items() if turns}
    if write_path is not None:
        kept = {lid: [with_paths(t, write_path) for t in turns] for lid, turns in kept.items()}
    return json.dumps({"version": VERSION, "conversations": kept})  # ASCII: any text is safe in XML


def loads(text: str, read_path=None) -> tuple:
    """``(conversations, skipped)`` read from an entry's text; ``skipped`` lists what was not
    readable, as it was, to keep aside (``{"layer_id", "turn"}`` for one turn, ``{"layer_id",
    "turns"}`` for a layer's value that is no list). Raises ValueError, saying why, when the text as
    a whole is not readable. ``read_path``: how stored paths are read (``QgsProject.readPath``)."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"it is not JSON ({exc})") from exc
    except RecursionError as exc:  # JSON nested deeper than Python's recursion limit
        raise ValueError("it is nested too deeply to be read as JSON") from exc
    if not isinstance(data, dict) or not isinstance(data.get("conversations"), dict):
        raise ValueError("it holds no 'conversations' object")
    conversations, skipped = {}, []
    for layer_id, turns in data["conversations"].items():
        if not isinstance(turns, list):
            skipped.append({"layer_id": layer_id, "turns": turns})
            continue
        good = []
        for raw in turns:
            turn = _turn(layer_id, raw)
            if turn is None:
                skipped.append({"layer_id": layer_id, "turn": raw})
            else:
                good.append(with_paths(turn, read_path) if read_path is not None else turn)
        if good:
            conversations[layer_id] = good
    return conversations, skipped


def kept_aside(text: str, found: bool, items: list) -> str:
    """The ``conversations_unreadable`` entry's text with ``items`` appended to what it holds
    (``text``; one that is not that list, as an earlier version wrote it, becomes its first item)."""
    earlier = []
    if found and text:
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):  # not JSON, or nested too deeply to read
            data = None
        if isinstance(data, dict) and data.get("version") == VERSION and isinstance(data.get("unreadable"), list):
            earlier = data["unreadable"]
        else:
            earlier = [{"entry": text}]
    return json.dumps({"version": VERSION, "unreadable": earlier + list(items)})


def _turn(layer_id: str, turn) -> dict | None:
    """A stored turn made safe to show, or None when it has no question."""
    if not isinstance(turn, dict) or not isinstance(turn.get("question"), str):
        return None
    out = dict(turn)
    for key in TEXT_FIELDS:
        if out.get(key) is not None and not isinstance(out[key], str):
            out[key] = str(out[key])
    out.setdefault("layer_id", layer_id)
    if isinstance(out.get("result"), dict):  # saved by an earlier version, with all of the event
        out["result"] = kept_result(out["result"])
    if not out.get("done"):  # a turn can never be running in a project just opened
        out.update(done=True, interrupted=True, meta=out.get("meta") or INTERRUPTED)
    return out


def log(message: str) -> None:
    QgsMessageLog.logMessage(message, LOG_TAG, MSG_WARNING)


class ProjectHistory:
    """Reads and writes the conversations entry of a project (default: the current one)."""

    def __init__(self):
        self.unreadable = []  # what the last read could not read, kept aside at the next write

    def read(self, project: QgsProject | None = None) -> dict:
        """The conversations saved in the project ({} when none, or when they cannot be read)."""
        project = project or QgsProject.instance()
        self.unreadable = []
        text, found = project.readEntry(SCOPE, KEY, "")
        if not found or not text:
            return {}
        try:
            conversations, skipped = loads(text, project.readPath)
        except ValueError as exc:
            self.unreadable = [{"entry": text}]
            log(f"The GeoVQA conversations saved in this project could not be read: {exc}. They are "
                f"ignored (and kept in the project entry '{SCOPE}/{UNREADABLE_KEY}' when it is saved again).")
            return {}
        if skipped:
            self.unreadable = skipped
            log(f"{len(skipped)} GeoVQA conversation turns saved in this project could not be read and were left "
                f"out (they are kept in the project entry '{SCOPE}/{UNREADABLE_KEY}' when it is saved again).")
        return conversations

    def remove_written_while_cleared(self, project: QgsProject | None = None) -> None:
        """Remove every ``geovqa`` entry from a project that QGIS has just cleared, leaving its
        modified flag as it was. ``QgsProject.clear()`` (File > New, and the start of File > Open)
        empties the entries before it removes the layers; whatever the plugin wrote meanwhile
        (a question stopped because its layer went) belongs to the project that was closed."""
        project = project or QgsProject.instance()
        keys = list(project.entryList(SCOPE, "")) + list(project.subkeyList(SCOPE, ""))
        if not keys:
            return
        dirty = project.isDirty()
        for key in keys:
            project.removeEntry(SCOPE, key)
        project.setDirty(dirty)

    def write(self, conversations: dict, project: QgsProject | None = None) -> None:
        """Store ``conversations`` in the project (which QGIS then marks modified if they changed);
        what the last read could not read is added to the entry kept aside first."""
        project = project or QgsProject.instance()
        if self.unreadable:
            text, found = project.readEntry(SCOPE, UNREADABLE_KEY, "")
            project.writeEntry(SCOPE, UNREADABLE_KEY, kept_aside(text, found, self.unreadable))
            self.unreadable = []
        if any(conversations.values()):
            project.writeEntry(SCOPE, KEY, dumps(conversations, project.writePath))
        elif project.readEntry(SCOPE, KEY, "")[1]:
            project.removeEntry(SCOPE, KEY)
