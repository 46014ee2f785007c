"""QgsTasks for every blocking job: engine health, one streamed answer, a batch of answers.

Rules kept here: ``run()`` executes in a worker thread and touches no widget and no layer; it
only talks to the engine through :mod:`client` and copies result files. Progress and events reach
the main thread through Qt signals (queued, since the task object lives in the main thread).
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

from qgis.core import QgsTask
from qgis.PyQt.QtCore import Qt, pyqtSignal

from .client import EngineClient
from .engine_errors import EngineError
from .engine_protocol import build_ask_request
from .results_io import CANCELLED, append_json_line

CAN_CANCEL = QgsTask.Flag.CanCancel
# Hidden (QGIS 3.26+) keeps the periodic health check out of the task list in the status bar.
_HIDDEN = getattr(QgsTask.Flag, "Hidden", None)
HEALTH_FLAGS = CAN_CANCEL | _HIDDEN if _HIDDEN is not None else CAN_CANCEL


RESULT_FILES = (("heatmap", ".tif", "heatmap layer"), ("anchors", ".geojson", "anchor layer"))


def fetch_result_file(event: dict, client: EngineClient, key: str, dest: Path, stream=None) -> str | None:
    """Copy (engine on this computer) or download one result file of ``event`` to ``dest``.
    ``stream``: the :class:`ask_stream.AskStream` of the answer, which then makes the download, so
    Stop (its ``abort()``) ends it at once.

    The anchors are also inline in the result event: they are written from there when the
    event names no file, or when its download fails (the engine pruned it, or restarted).
    Returns ``str(dest)``, or None when the event has no such file. Raises OSError /
    EngineError when it cannot be had. Runs in a worker thread.

    The event's ``*_path`` (a path on the engine's computer) is copied only from an engine on
    this computer: a path an engine on another one names is not its file here, and copying it
    would let that engine pick any file of this computer to land in the results folder."""
    src, name = event.get(f"{key}_path"), event.get(f"{key}_file")
    inline = event.get("anchors") if key == "anchors" and isinstance(event.get("anchors"), dict) else None
    if src and getattr(client, "is_local", False) and Path(src).is_file():
        shutil.copyfile(src, dest)
    elif name:
        try:
            (stream or client).download_file(name, str(dest))
        except EngineError as exc:
            if inline is None or exc.code == "cancelled":
                raise
            _write_json(dest, inline)
    elif inline is not None:
        _write_json(dest, inline)
    else:
        return None
    return str(dest)


def _write_json(dest: Path, obj) -> None:
    import json

    dest.write_text(json.dumps(obj), encoding="utf-8")


def result_offset(event: dict) -> tuple:
    """(dx, dy) from the engine's result coordinates to the raster's source pixels: the offset
    of the uploaded cut of a raster with no georeferencing (``upload_pixel_offset``, see
    :class:`ask_stream.AskStream`), else (0, 0)."""
    offset = event.get("upload_pixel_offset")
    if isinstance(offset, (list, tuple)) and len(offset) == 2:
        return float(offset[0]), float(offset[1])
    return 0.0, 0.0


def result_scale(event: dict) -> tuple:
    """(sx, sy): source pixels per pixel of the uploaded file of a raster with no georeferencing
    that was reduced to the engine's read budget (``upload_pixel_scale``), else (1, 1)."""
    scale = event.get("upload_pixel_scale")
    if isinstance(scale, (list, tuple)) and len(scale) == 2:
        return float(scale[0]), float(scale[1])
    return 1.0, 1.0


def place_result_files(out: dict, clip_bounds=None, unreferenced: bool = False, pixel_offset=(0, 0),
                       pixel_scale=(1.0, 1.0)) -> None:
    """Move the kept files of ``out`` where QGIS shows the raster and clip them to it, in place
    (``clip_bounds`` and ``unreferenced`` as for :func:`keep_result_files`; ``pixel_offset``
    and ``pixel_scale`` as :func:`result_offset` and :func:`result_scale` give them, applied
    first: source pixel = offset + scale x result pixel)."""
    dx, dy = pixel_offset
    sx, sy = pixel_scale
    if dx or dy or (sx, sy) != (1.0, 1.0):  # results about an uploaded cut, in its pixels: back to the raster's
        from .unreferenced import shift_anchors, shift_heatmap

        if out["heatmap"]:
            shift_heatmap(out["heatmap"], dx, dy, sx, sy)
        if out["anchors"]:
            shift_anchors(out["anchors"], dx, dy, sx, sy)
    if unreferenced:  # before clipping: clip_bounds are in the layer's coordinates
        from .unreferenced import flip_anchors, flip_heatmap

        if out["heatmap"]:
            flip_heatmap(out["heatmap"])
        if out["anchors"]:
            flip_anchors(out["anchors"])
    if clip_bounds is not None:
        from .clip import clip_anchors, clip_heatmap

        if out["heatmap"]:
            raw = Path(out["heatmap"])
            clipped = clip_heatmap(str(raw), clip_bounds, str(raw.with_name(raw.stem + "_clip.tif")))
            if clipped != str(raw):
                raw.unlink()
                Path(clipped).rename(raw)
        if out["anchors"]:
            clip_anchors(out["anchors"], clip_bounds, out["anchors"])


def keep_result_files(event: dict, client: EngineClient, dest_dir: Path, stem: str, clip_bounds=None,
                      unreferenced: bool = False, stream=None) -> dict:
    """Copy (or download) the heatmap GeoTIFF and anchors GeoJSON of a result into ``dest_dir``.

    ``unreferenced``: the raster has no georeferencing (:func:`aoi.is_unreferenced_file`), so
    the engine's files are in source pixels (of the uploaded cut, when only the AOI's window
    was uploaded: the copies are first moved by the event's ``upload_pixel_offset``); the copies
    are moved to where QGIS shows the raster (see :mod:`unreferenced`). With ``clip_bounds`` (xmin, ymin, xmax, ymax in the
    layer's coordinates) both are then clipped to the source raster (see :mod:`clip`).
    Returns ``{"heatmap": path|None, "anchors": path|None}``. ``stream``: as for
    :func:`fetch_result_file`. Runs in a worker thread.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = {key: fetch_result_file(event, client, key, dest_dir / f"{stem}_{key}{suffix}", stream)
           for key, suffix, _ in RESULT_FILES}
    place_result_files(out, clip_bounds, unreferenced, result_offset(event), result_scale(event))
    return out


def _lost_text(what: str, exc: Exception, dest_dir: Path) -> str:
    """Why one result layer is missing, and what to do: a download failure is the engine's side,
    anything else (OSError, GDAL) the results folder's."""
    if isinstance(exc, EngineError):
        return f"its {what} could not be downloaded from the engine: {exc}"
    return (f"its {what} could not be saved in {dest_dir}: {exc}. "
            "Choose another results folder in Settings > Options > GeoVQA")


def discard_kept_files(event: dict) -> None:
    """Remove the heatmap and anchors :func:`keep_result_files` kept for a result ``event`` that
    nothing will show (its question was stopped or superseded once they were kept)."""
    for key in ("local_heatmap_path", "local_anchors_path"):
        _remove(event.get(key))


def keep_result_files_or_warn(event: dict, client: EngineClient, dest_dir: Path, stem: str, clip_bounds=None,
                              unreferenced: bool = False, stream=None) -> tuple:
    """:func:`keep_result_files`, but a failure to keep a file is a warning, not an error.

    The answer itself (text, token counts, timings) is complete at this point: a results
    folder that cannot be written (read-only project folder, full disk) or a failed download
    must only cost the layer concerned; each file is kept or lost on its own (a failed anchors
    download falls back to the anchors inline in the event). Returns ``(files, warning)``;
    ``warning`` is "" when both were kept. ``stream``: the answer's :class:`ask_stream.AskStream`,
    which makes the downloads (:func:`fetch_result_file`); once it is stopped no further file
    is fetched and those not kept are said to be stopped. Runs in a worker thread.
    """
    errors = (OSError, EngineError, RuntimeError)  # RuntimeError: GDAL with exceptions on
    out, lost = {"heatmap": None, "anchors": None}, []
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except errors as exc:
        return out, _warning([_lost_text("heatmap and anchor layers", exc, dest_dir)])
    for key, suffix, what in RESULT_FILES:
        dest = dest_dir / f"{stem}_{key}{suffix}"
        if stream is not None and stream.aborted:  # stopped: the files not fetched yet stay behind
            lost.append(f"its {what} was not fetched (stopped)")
            continue
        try:
            out[key] = fetch_result_file(event, client, key, dest, stream)
        except errors as exc:
            _remove(dest)  # no half-written file left behind
            lost.append(_lost_text(what, exc, dest_dir))
    try:
        place_result_files(out, clip_bounds, unreferenced, result_offset(event), result_scale(event))
    except errors as exc:  # files that cannot be placed would be shown in the wrong place
        for path in out.values():
            _remove(path)
        return {"heatmap": None, "anchors": None}, _warning([_lost_text("heatmap and anchor layers", exc, dest_dir)])
    return out, _warning(lost)


def _warning(lost: list) -> str:
    return f"The answer is kept, but {'; '.join(lost)}." if lost else ""


def _remove(path) -> None:
    if path:
        try:
            Path(path).unlink()
        except OSError:
            pass


def prepare_item_upload(client: EngineClient, raster_path: str | None, aoi: dict | None = None,
                        cancelled=None, progress=None) -> tuple:
    """``(upload.Upload | None, error)``: the file sent with every question about one raster and
    area of interest in a batch (the batch dialog's :class:`BatchTask`, the Processing batch).

    For an engine that gets uploads (:attr:`client.EngineClient.uploads`) the raster is converted
    and cut to ``aoi`` once (:func:`upload.prepare_upload`); the caller passes the Upload to
    ``client.ask(request, prepared=...)`` for each question and calls its ``cleanup()`` when they
    are done (also on cancel or failure). None when rasters are sent by path (or there is no
    raster); ``error`` is a sentence when it could not be prepared (also when it would be larger
    than the engine's upload limit: the conversion is stopped then), else None. ``cancelled()``
    stops a conversion under way; ``progress(fraction)`` is told how far it is. Runs in a
    worker thread."""
    if not raster_path or not client.uploads:
        return None, None
    from .upload import prepare_upload

    try:
        return prepare_upload(raster_path, aoi, cancelled=cancelled, progress=progress,
                              max_bytes=client.upload_limit, max_pixels=client.read_budget), None
    except EngineError as exc:
        return None, str(exc)
    except (OSError, RuntimeError) as exc:  # the temporary folder; RuntimeError: GDAL with exceptions on
        return None, f"The raster could not be prepared for the upload to the engine: {exc}"


ANSWERING = "Answering…"
# the engine's status stages (protocol.STAGES), in words (the chat dock's line, Processing's text)
STAGE_WORDS = {
    "queued": "Waiting for the engine",
    "read": "Reading the raster",
    "tile": "Cutting the raster into tiles",
    "vision": "Encoding tiles",
    "select": "Choosing tokens",
    "prefill": "Reading the image tokens",
    "generate": ANSWERING,
    "write": "Writing the result files",
    "done": "Finishing",
}


# the plugin's own stages before the engine's, for a raster uploaded to an engine on another
# computer (status events the plugin makes: :class:`UploadStages`)
PREPARE_STAGE, UPLOAD_STAGE = "prepare", "upload"
PLUGIN_STAGE_WORDS = {
    PREPARE_STAGE: "Preparing the raster for upload",  # converted or cut to a GeoTIFF (upload.py)
    UPLOAD_STAGE: "Sending the raster to the engine",
}


def preparing_words(layer_name: str | None = None) -> str:
    """"Preparing the raster for upload", or, naming the layer, "Preparing the raster of 'a' for
    upload" (a batch prepares one raster after another)."""
    words = PLUGIN_STAGE_WORDS[PREPARE_STAGE]
    return words.replace("the raster", f"the raster of '{layer_name}'", 1) if layer_name else words


def stage_text(ev: dict) -> str:
    """A status event in words: "Reading the raster", "Encoding tiles 40 %"…"""
    stage = ev.get("stage") or ""
    text = ev.get("message") or stage or "Working"
    words = (STAGE_WORDS.get(stage) or PLUGIN_STAGE_WORDS.get(stage)
             or text[:1].upper() + text[1:])  # keeps "GeoLLaVA-8K", paths
    p = ev.get("progress")
    if isinstance(p, (int, float)) and not isinstance(p, bool) and 0 < p < 1:
        return f"{words} {100 * p:.0f} %"
    return words if words.endswith("…") else words + " …"


STARTING = "Starting …"  # a queued question with no job ahead of it


def visual_tokens_text(tokens) -> str:
    """The visual tokens of an answer's ``tokens`` (its ``visual_kept`` and
    ``visual_candidates``), in words: "288/576 visual tokens kept", or, when more were sent than
    the candidates (``visual_candidates`` is the unreduced path's count, every tile pooled 2 x 2;
    a strategy keeping single patches, e.g. 600 tokens a tile, sends more), "600 visual tokens
    (unreduced: 288)", which never reads as more kept than there were. Exports keep both numbers
    as they came (results_io)."""
    tokens = tokens if isinstance(tokens, dict) else {}
    kept, candidates = tokens.get("visual_kept"), tokens.get("visual_candidates")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (kept, candidates))
    if numbers and kept > candidates:
        return f"{kept} visual tokens (unreduced: {candidates})"
    return f"{'?' if kept is None else kept}/{'?' if candidates is None else candidates} visual tokens kept"


def event_text(ev: dict) -> str | None:
    """What the engine does, in words, after the stream event ``ev`` (None: no change):
    "Queued (2 ahead) …", "Starting …" (queued with nothing ahead: it starts now), "Encoding
    tiles 40 %", "Answering…" (the first answer token)."""
    kind = ev.get("type")
    if kind == "queued":
        ahead = ev.get("position") or 0
        return f"Queued ({ahead} ahead) …" if ahead else STARTING
    if kind == "status":
        return stage_text(ev)
    if kind == "token":
        return ANSWERING
    return None


class UploadStages:
    """The preparation (conversion, cut) and the upload of a raster as status events of the
    plugin's own stages (:data:`PLUGIN_STAGE_WORDS`: "Preparing the raster for upload 12 %",
    "Sending the raster to the engine 40 %"), given to ``emit`` only when their words change (once
    a whole percent), so a conversion of minutes is seen to move. Worker thread."""

    def __init__(self, emit, request_id=None):
        self.emit, self.request_id = emit, request_id
        self.text = None

    def prepared(self, fraction: float) -> None:
        self._say(PREPARE_STAGE, fraction)

    def uploaded(self, sent: int, total: int) -> None:
        self._say(UPLOAD_STAGE, sent / max(1, total))

    def _say(self, stage: str, fraction: float) -> None:
        ev = {"type": "status", "request_id": self.request_id, "stage": stage, "progress": fraction,
              "message": None}
        text = stage_text(ev)
        if text != self.text:
            self.text = text
            self.emit(ev)


class AnswerProgress:
    """How far the engine is with one answer (0..1), from its stream's events: each stage takes
    its part (:attr:`STAGES`): reading, the vision tower (its own progress, tile batch by tile
    batch), the token choice, the prefill, then the generation, which moves on with each
    streamed answer token against ``max_new_tokens`` (an answer that ends early jumps ahead),
    and writing the result files. 1.0 only with the result. It never goes back."""

    # (first, last) of each stage's part; a stage with a progress of its own moves in between
    STAGES = {
        "queued": (0.0, 0.0),
        "read": (0.0, 0.04),
        "tile": (0.04, 0.05),
        "vision": (0.05, 0.60),
        "select": (0.60, 0.65),
        "prefill": (0.65, 0.72),
        "generate": (0.72, 0.97),
        "write": (0.97, 0.99),
        "done": (0.99, 0.99),
    }

    def __init__(self, max_new_tokens: int | None = None):
        self.max_new_tokens = max(1, int(max_new_tokens or 256))
        self.fraction = 0.0
        self.tokens = 0

    def event(self, ev: dict) -> float:
        """The fraction after the stream event ``ev``."""
        kind = ev.get("type")
        if kind == "status":
            first, last = self.STAGES.get(ev.get("stage"), (self.fraction, self.fraction))
            p = ev.get("progress")
            if isinstance(p, (int, float)) and not isinstance(p, bool):
                first += (last - first) * min(1.0, max(0.0, float(p)))
            self._to(first)
        elif kind == "token":
            self.tokens += 1
            first, last = self.STAGES["generate"]
            self._to(first + (last - first) * min(1.0, self.tokens / self.max_new_tokens))
        elif kind == "result":
            self._to(1.0)
        return self.fraction

    def _to(self, fraction: float) -> None:
        self.fraction = max(self.fraction, min(1.0, fraction))


class BatchProgress:
    """The progress (0..100) of a batch of ``total`` answers, for the batch dialog's
    :class:`BatchTask`, the Processing batch and single answers (a batch of one: the chat
    dock's :class:`AskTask`, "Ask a raster") alike: the answers done plus the current one, whose
    raster upload (when it is uploaded) takes the first :attr:`UPLOAD_SHARE` of its share, then
    the engine's work the rest, split between its stages as :class:`AnswerProgress` does (the
    answer's share is full only with its result). Within an answer it never goes back.

    ``set_progress``: where the percentage goes (``QgsTask.setProgress``,
    ``QgsProcessingFeedback.setProgress``)."""

    UPLOAD_SHARE = 0.5  # of one answer's progress, while its raster is uploaded

    def __init__(self, total: int, set_progress):
        self.total = max(1, int(total))
        self.set_progress = set_progress
        self.index = 0  # answers done
        self.fraction = 0.0  # of the current answer, 0..1
        self.upload_share = 0.0
        self.answer = AnswerProgress()
        self.text = None  # the words of the current answer's last event (event())

    def start(self, index: int, uploading: bool) -> None:
        """The answer after ``index`` done ones begins; ``uploading``: its raster is uploaded."""
        self.index, self.fraction = index, 0.0
        self.upload_share = self.UPLOAD_SHARE if uploading else 0.0
        self.answer, self.text = AnswerProgress(), None

    def uploaded(self, sent: int, total: int) -> None:
        """``sent`` of the upload's ``total`` bytes are sent (``ask_stream.AskStream.on_upload_progress``)."""
        self._report(self.upload_share * sent / max(1, total))

    def engine(self, progress: float) -> None:
        """The engine's part of the current answer is ``progress`` (0..1) done."""
        self._report(self.upload_share + (1.0 - self.upload_share) * float(progress))

    def event(self, ev: dict, max_new_tokens: int | None = None) -> str | None:
        """The current answer's stream event ``ev`` (``max_new_tokens``: the request's, which
        the generation's part counts the answer tokens against). Returns what the engine does
        now in words (:func:`event_text`) when that changed, else None: a caller that shows it
        (a log line each time, in Processing) says it once, not once per answer token."""
        if max_new_tokens:
            self.answer.max_new_tokens = max(1, int(max_new_tokens))
        self.engine(self.answer.event(ev))
        text = event_text(ev)
        if text is None or text == self.text:
            return None
        self.text = text
        return text

    def done(self, answers: int) -> None:
        """``answers`` answers are done."""
        self.index, self.fraction = answers, 0.0
        self.set_progress(100.0 * answers / self.total)

    def _report(self, fraction: float) -> None:
        self.fraction = max(self.fraction, min(1.0, max(0.0, fraction)))
        self.set_progress(100.0 * (self.index + self.fraction) / self.total)


def rect_bounds(rect) -> tuple:
    """QgsRectangle -> (xmin, ymin, xmax, ymax)."""
    return (rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum())


def file_stem(question: str) -> str:
    """A short file-name-safe stem for one answer's files."""
    words = "".join(c if c.isalnum() else "_" for c in question.lower())[:40].strip("_")
    return f"{time.strftime('%Y%m%d_%H%M%S')}_{words or 'answer'}_{int(time.time() * 1000) % 1000:03d}"


class HealthTask(QgsTask):
    """GET /health once; emits ``done(dict | None, str)`` (health, error message). The call ends
    within the client's short timeout as a whole (:meth:`client.EngineClient.request_json`), and
    cancelling the task stops it at once."""

    done = pyqtSignal(object, str)

    def __init__(self, client: EngineClient):
        super().__init__("GeoVQA: engine status", HEALTH_FLAGS)
        self.client = client
        self.health = None
        self.error = ""
        self.error_code = None  # EngineError.code of the failure ('engine_down': nothing answered)
        self.error_message = ""  # its message, without what to do

    def cancel(self) -> None:
        super().cancel()
        self.client.abort_calls()

    def run(self) -> bool:
        try:
            self.health = self.client.health()
        except EngineError as exc:
            self.error = str(exc)
            self.error_code = exc.code
            self.error_message = exc.message
        return True

    def finished(self, result: bool) -> None:  # main thread
        self.done.emit(self.health, self.error)


class AskTask(QgsTask):
    """Stream one answer. Emits ``event(dict)`` per protocol event (queued to the main thread).

    When the result arrives, its heatmap/anchors are copied into ``results_dir`` and the result
    event gets ``local_heatmap_path`` / ``local_anchors_path`` (None, with the reason in
    ``files_warning``, when they could not be kept: the answer still arrives). A failure becomes one synthetic
    ``error`` event with the same request_id, so the receiver has a single code path.
    """

    # not `event`: that name would hide QObject.event(), which Qt itself calls on the task
    engine_event = pyqtSignal(object)

    def __init__(self, client: EngineClient, request: dict, results_dir: Path, description: str = "GeoVQA: answer",
                 clip_bounds=None, unreferenced: bool = False):
        super().__init__(description, CAN_CANCEL)
        self.clip_bounds = clip_bounds
        self.unreferenced = unreferenced
        self.client = client
        self.request = request
        self.request_id = request.get("request_id")
        self.results_dir = Path(results_dir)
        self.stream = client.ask(request)
        self.final = None

    def cancel(self) -> None:
        # the flag first: the worker, woken by the abort, must see it (else the run ended as
        # completed with no final event, and the dock never heard the question had stopped)
        super().cancel()
        self.stream.abort()
        self.client.abort_calls()  # the /health it asks first for an upload's limits (its own client)

    def run(self) -> bool:
        # a batch of one: the upload to a remote engine (when the raster is uploaded) takes the
        # first half, then the engine's stages; 100 % only with the result
        progress = BatchProgress(1, self.setProgress)
        progress.start(0, self.stream.upload_path is not None or self.stream.prepared is not None)
        # the line under the question says that the raster is converted / sent, and how far
        stages = UploadStages(self.engine_event.emit, self.request_id)

        def uploaded(sent, total):
            progress.uploaded(sent, total)
            stages.uploaded(sent, total)

        # Set here and cleared at the end, not in __init__: the stream holds no reference to the
        # task (a cycle) longer than the run. (A cycle once let Qt reach a signal that was named
        # `event` and hid QObject.event: "native Qt signal is not callable".)
        self.stream.on_upload_progress = uploaded
        self.stream.on_prepare_progress = stages.prepared
        try:
            return self._run(progress)
        finally:
            self.stream.on_upload_progress = None
            self.stream.on_prepare_progress = None

    def _run(self, progress: BatchProgress) -> bool:
        try:
            for ev in self.stream.events():
                if self.isCanceled():
                    break
                progress.event(ev, self.request.get("max_new_tokens"))
                if ev.get("type") == "result":
                    ev = dict(ev)
                    files, warning = keep_result_files_or_warn(
                        ev, self.client, self.results_dir, file_stem(self.request["question"]),
                        self.clip_bounds, self.unreferenced, stream=self.stream)
                    ev["local_heatmap_path"] = files["heatmap"]
                    ev["local_anchors_path"] = files["anchors"]
                    ev["files_warning"] = warning
                if ev.get("type") in ("result", "error"):
                    self.final = ev
                self.engine_event.emit(ev)
        except EngineError as exc:
            self.final = {
                "type": "error", "request_id": self.request_id, "code": exc.code,
                "message": exc.message, "hint": exc.hint,
            }
            self.engine_event.emit(self.final)
        except OSError as exc:
            self.final = {
                "type": "error", "request_id": self.request_id, "code": "io_error",
                "message": f"Could not save the result files: {exc}.", "hint": None,
            }
            self.engine_event.emit(self.final)
        except Exception as exc:  # noqa: BLE001 - a task must always end with a final event
            self.final = {
                "type": "error", "request_id": self.request_id, "code": "internal",
                "message": f"Unexpected error in the GeoVQA plugin: {exc.__class__.__name__}: {exc}.",
                "hint": "Please report it with the diagnostics report (Copy diagnostics, in the dock's ⋯ menu).",
            }
            self.engine_event.emit(self.final)
        return not (self.isCanceled() or (self.final is None and self.stream.aborted))


class BatchTask(QgsTask):
    """Ask every question about every item, one streamed answer at a time.

    ``items``: list of dicts ``{"layer", "layer_id", "raster_path", "aoi", "crs_wkt", "clip_bounds",
    "unreferenced", "bands", "rendered"}`` (``clip_bounds`` and ``unreferenced`` as for
    :func:`keep_result_files`; ``bands`` the request's, :func:`bands.layer_bands`, None to let the
    engine choose; ``rendered``: ``raster_path`` is a render of the layer); an item with
    ``"error"`` (a layer that could not be prepared) gives a row with that error per question.
    Emits ``row(dict)`` per finished answer (protocol BATCH_RESULT_FIELDS, ``bands`` and
    ``palette`` those the model saw, ``rendered`` when it saw a render, plus local paths); a row
    whose answer broke off (or failed) mid-way has no ``answer``, its ``error``, and the words
    that came in ``incomplete_answer``.

    For an engine on another computer each item's raster is converted and cut to its AOI once
    (:func:`prepare_item_upload`) and that file is sent with every question about it; it is
    deleted when the item's questions are done, also when the batch is cancelled or fails. The
    progress counts the answers done plus the current one: its upload (the first half of its share
    when a raster is uploaded), then the engine's stages, the generation counted in answer tokens
    (:class:`BatchProgress`).
    """

    row = pyqtSignal(object)
    # what the batch does between answers, in words ("Preparing the raster of 'a' for upload 12 %");
    # "" when that is over (the dialog then counts the questions asked again)
    stage = pyqtSignal(str)

    def __init__(self, client: EngineClient, items: list, questions: list, options: dict, results_dir: Path,
                 autosave_path: Path | None = None):
        super().__init__("GeoVQA: batch questions", CAN_CANCEL)
        self.client = client
        self.items = [dict(item) for item in items]  # its own: drop_layer marks them
        self.questions = [q.strip() for q in questions if q and q.strip()]
        self.options = dict(options)
        self.results_dir = Path(results_dir)
        self.results = []
        self.autosave_path = Path(autosave_path) if autosave_path else None
        self.autosave_error = ""
        # direct: in the worker thread, before the row reaches the dialog (queued)
        self.row.connect(self._autosave, Qt.ConnectionType.DirectConnection)
        self._stream = None
        self._lock = threading.Lock()
        self._progress = BatchProgress(self.total, self.setProgress)

    @property
    def total(self) -> int:
        return len(self.items) * len(self.questions)

    def cancel(self) -> None:
        super().cancel()  # the flag first, as AskTask.cancel
        self.client.abort_calls()  # its protocol check (/health) too
        with self._lock:
            if self._stream is not None:
                self._stream.abort()

    def drop_layer(self, layer_id: str, reason: str) -> None:
        """The layer was removed from the project (main thread): each of its questions not asked
        yet becomes a row with ``reason`` as its error; an answer already streaming is kept."""
        for item in self.items:
            if item.get("layer_id") == layer_id and not item.get("error"):
                item["error"] = reason

    def _autosave(self, row: dict) -> None:
        """Each row, as it is emitted, is appended to ``autosave_path`` (JSON Lines, on the disk at
        once), so closing QGIS or a crash mid-batch keeps it. A failure is said once in
        ``autosave_error`` and the batch goes on (the rows are still in the dialog)."""
        if self.autosave_path is None or self.autosave_error:
            return
        try:
            append_json_line(self.autosave_path, row)
        except (OSError, ValueError) as exc:
            self.autosave_error = (f"The answers could not be saved as they arrive to {self.autosave_path}: {exc}. "
                                   "Export them before closing the dialog.")

    def run(self) -> bool:
        index = 0
        for item in self.items:
            if self.isCanceled():
                return False
            upload, error = self._prepare(item)
            try:
                for question in self.questions:
                    if self.isCanceled():
                        return False
                    self.results.append(self._one(index, item, question, upload, error))
                    self.row.emit(self.results[-1])
                    index += 1
                    self._progress.done(index)
            finally:
                if upload is not None:
                    upload.cleanup()
        return True

    def _prepare(self, item: dict) -> tuple:
        """``(upload.Upload | None, error)`` for ``item``: its raster converted and cut once for all
        its questions when rasters are uploaded; the error (a sentence) when that failed."""
        if item.get("error"):
            return None, None
        said = []

        def progress(fraction):  # said once a whole percent
            text = f"{preparing_words(item['layer'])} {100 * fraction:.0f} %"
            if not said or said[-1] != text:
                said.append(text)
                self.stage.emit(text)

        try:
            return prepare_item_upload(self.client, item.get("raster_path"), item.get("aoi"), self.isCanceled,
                                       progress)
        finally:
            if said:
                self.stage.emit("")

    def _one(self, index: int, item: dict, question: str, upload=None, prepare_error: str | None = None) -> dict:
        row = {
            "index": index, "layer": item["layer"], "layer_id": item.get("layer_id"),
            "raster_path": item["raster_path"], "question": question, "answer": None,
            "error": None, "heatmap_path": None, "anchors_path": None, "tokens": {}, "timings": {},
            "bands": None, "palette": None, "rendered": False, "crs_wkt": item.get("crs_wkt"),
            "strategy": self.options.get("strategy"), "incomplete_answer": None,
        }
        words = []  # the answer's words as they stream: kept as incomplete_answer when it breaks off
        if item.get("error") or prepare_error:  # the layer could not be prepared (not in view, render failed)
            row["error"] = item.get("error") or prepare_error
            return row
        self._progress.start(index, upload is not None)
        stream = None
        try:
            self.client.check_protocol()  # an engine of another protocol is asked nothing (once per batch)
            request = build_ask_request(question, item["raster_path"], aoi=item.get("aoi"), bands=item.get("bands"),
                                        **self.options)
            stream = self.client.ask(request, prepared=upload) if upload is not None else self.client.ask(request)
            stream.on_upload_progress = self._progress.uploaded
            with self._lock:
                self._stream = stream
            if self.isCanceled():  # cancelled before the stream could be aborted
                stream.abort()
            for ev in stream.events():
                self._progress.event(ev, self.options.get("max_new_tokens"))
                if ev.get("type") == "token":
                    words.append(ev.get("text", ""))
                if ev.get("type") == "result":
                    row["answer"] = ev.get("answer", "")
                    row["tokens"] = ev.get("tokens") or {}
                    row["timings"] = ev.get("timings") or {}
                    row["bands"], row["palette"] = ev.get("bands"), ev.get("palette")  # what the model saw
                    row["rendered"] = bool(item.get("rendered"))  # those bands are the render's
                    row["strategy"] = ev.get("strategy") or row["strategy"]  # the one the engine used
                    files, warning = keep_result_files_or_warn(ev, self.client, self.results_dir, file_stem(question),
                                                               item.get("clip_bounds"), bool(item.get("unreferenced")),
                                                               stream=stream)
                    row["heatmap_path"], row["anchors_path"] = files["heatmap"], files["anchors"]
                    row["error"] = warning or None  # the answer stays; the error column says what is missing
                    row["crs_wkt"] = ev.get("crs_wkt") or row["crs_wkt"]
                elif ev.get("type") == "error":
                    row["error"] = ev.get("message") or ev.get("code") or "unknown error"
            if row["answer"] is None and row["error"] is None:
                row["error"] = CANCELLED if stream.aborted else "no answer"
        except (EngineError, OSError) as exc:
            row["error"] = str(exc)
        except Exception as exc:  # noqa: BLE001 - one bad item must not stop the batch
            row["error"] = f"Unexpected error: {exc.__class__.__name__}: {exc}"
        finally:
            with self._lock:
                self._stream = None
            if stream is not None:
                stream.on_upload_progress = None  # no reference from the stream to the task left
        if row["answer"] is None and "".join(words).strip():  # broke off (or failed) mid-answer
            row["incomplete_answer"] = "".join(words)
        return row
