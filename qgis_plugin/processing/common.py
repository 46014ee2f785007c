"""Helpers shared by the GeoVQA Processing algorithms: engine client, the strategy parameter,
the area of interest and what is asked about each layer within it (file layers as they are,
other layers rendered to a GeoTIFF), streamed answer with feedback, and the naming and marking
of the result layers QGIS loads after a run."""

from __future__ import annotations

import contextlib
import os

from collections import deque
from pathlib import Path

from qgis.core import (
    QgsGeometry,
    QgsProcessingException,
    QgsProcessingLayerPostProcessorInterface,
    QgsProcessingParameterEnum,
    QgsProject,
)
from qgis.PyQt.QtCore import Qt

from .. import layers as result_layers
from ..aoi import AoiError, clip_to_layer, is_unreferenced_file, request_aoi
from ..bands import RENDER_BANDS, layer_bands
from ..engine_errors import EngineError
from ..engine_protocol import build_ask_request, question_too_long, questions_too_long
from ..render import NothingRendered, PreparedRender, covers_the_world, layer_file_path, render_file, size_note
from ..settings import DEFAULT_STRATEGY, STRATEGY_CHOICES, Settings, make_client
from ..tasks import BatchProgress, file_stem, keep_result_files_or_warn, preparing_words, rect_bounds


def strategy_options():
    """The STRATEGY enum's options: the engine's strategies, then ``engine`` ("Engine's
    default": the adapter's, else the engine's), appended last so that the numbers stored by
    models and scripts saved before it came keep their meaning."""
    return list(STRATEGY_CHOICES)


def strategy_parameter(name: str) -> QgsProcessingParameterEnum:
    """The "Token strategy" parameter of both algorithms: the strategies' names are its values
    (qgis_process STRATEGY=pyramid; models store the name, which no reordering of the list
    changes); a number is still taken (:func:`with_strategy_names`)."""
    param = QgsProcessingParameterEnum(name, "Token strategy", options=strategy_options(),
                                       defaultValue=DEFAULT_STRATEGY)
    param.setUsesStaticStrings(True)
    return param


def strategy_index(value) -> int | None:
    """The strategy number ``value`` stands for (an int, or a string of digits such as
    ``STRATEGY=3`` from qgis_process), None when it is none: what the STRATEGY parameter held
    before it took the strategies' names (models and scripts saved then store the number)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().isdigit() and value not in STRATEGY_CHOICES:
        value = int(value.strip())
    if isinstance(value, int) and 0 <= value < len(STRATEGY_CHOICES):
        return value
    return None


def with_strategy_names(parameters, name: str):
    """``parameters`` with the strategy parameter ``name`` given by number (see
    :func:`strategy_index`) turned into that strategy's name, which the parameter (static
    strings) takes; ``parameters`` itself when it needs no change."""
    index = strategy_index(parameters.get(name)) if name in parameters else None
    if index is None:
        return parameters
    return dict(parameters, **{name: STRATEGY_CHOICES[index]})


def strategy_parameter_value(alg, parameters, name: str, context) -> str:
    """The strategy named by the algorithm's STRATEGY parameter (its name, e.g. ``pyramid``, or
    the number it had in the list before the parameter took names); ``engine`` ("Engine's
    default") is what ``Settings.request_options`` sends as no strategy."""
    index = strategy_index(parameters.get(name))
    if index is not None:
        return STRATEGY_CHOICES[index]
    return alg.parameterAsEnumString(parameters, name, context) or DEFAULT_STRATEGY


def engine_client():
    try:
        return make_client(Settings.load())
    except EngineError as exc:
        raise QgsProcessingException(str(exc)) from exc


def _empty_parameter(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def aoi_refusal(alg, parameters, name: str, context) -> str | None:
    """Why the extent parameter ``name`` (the AOI of both algorithms) cannot be used, or None:
    an extent with no area (zero width or height, e.g. two equal corners), which used to be
    taken silently as the whole layer. An empty parameter is fine: each whole layer."""
    if _empty_parameter(parameters.get(name)):
        return None
    ext = alg.parameterAsExtent(parameters, name, context)
    if ext.isNull() or ext.width() <= 0 or ext.height() <= 0:
        return (f"The area of interest ({ext.toString(6)}) has no area: its width or height is 0. Give an extent "
                "with an area, or leave the parameter empty to ask about the whole layer.")
    return None


def area_of_interest(alg, parameters, name: str, context) -> tuple:
    """``(geometry, crs)`` of the extent parameter ``name`` (the AOI of both algorithms), or
    ``(None, None)`` when it is empty: each whole layer. ``crs`` is None when the extent names
    none (then it is in each layer's own CRS). Raises QgsProcessingException for an extent with
    no area (:func:`aoi_refusal`; also said by the algorithms' checkParameterValues, before a
    run, but qgis_process and models may not check first)."""
    if _empty_parameter(parameters.get(name)):
        return None, None
    refusal = aoi_refusal(alg, parameters, name, context)
    if refusal:
        raise QgsProcessingException(refusal)
    ext = alg.parameterAsExtent(parameters, name, context)
    crs = alg.parameterAsExtentCrs(parameters, name, context)
    return QgsGeometry.fromRect(ext), (crs if crs.isValid() else None)


def question_source(layer, geometry, crs, feedback) -> dict:
    """What the engine is asked about for ``layer`` within the area ``geometry`` (in ``crs``;
    None: the whole layer), as both algorithms ask it: ``raster_path``, ``bounds`` (for the
    result files), ``unreferenced``, the request's ``aoi`` and ``bands``, ``rendered``, and
    ``render``: the :class:`render.PreparedRender` of a layer still to be rendered, else None.

    A file layer is sent as it is, with the area as the request's AOI, cut to the layer, and the
    bands its renderer shows (:func:`bands.layer_bands`: the layer as loaded; qgis_process loads
    it with QGIS's default renderer, whose 1, 2, 3 is sent only when the colour tags agree). Any
    other layer is rendered over the area's part of it, which is then the whole image (no
    request AOI), or whole when there is no area; a web service covering the whole world (XYZ or
    WMTS tiles: :func:`render.covers_the_world`) is refused then, as a render of the planet
    tells nothing.

    Called in prepareAlgorithm, on the main thread: a render is only made ready there (its map
    settings, with a clone of the layer: :func:`prepare_render`), and drawn by
    :func:`render_source` in processAlgorithm, in the task's thread, so the user interface does
    not freeze and Cancel stops it; ``raster_path`` and ``bounds`` are None until then. Raises
    QgsProcessingException with a sentence: an area that does not touch the layer, that
    refusal, a render that could not be made (or, made here, written)."""
    try:
        path = layer_file_path(layer)
        if path is not None:
            # None without an area; a file the engine refuses (check_placed_on_map) is said here,
            # before anything is asked, with or without one
            aoi = request_aoi(geometry, crs, layer)
            return {"raster_path": path, "bounds": rect_bounds(layer.extent()),
                    "unreferenced": is_unreferenced_file(layer), "aoi": aoi, "bands": layer_bands(layer),
                    "rendered": False, "render": None}
        if geometry is None:
            if covers_the_world(layer):
                raise QgsProcessingException(
                    f"The layer '{layer.name()}' is a web map service covering the whole world: give an area of "
                    "interest (e.g. the map canvas extent) to say which part of it to ask about.")
            extent = None
        else:  # rendered over the area's box: the whole rendered image is the AOI
            extent = clip_to_layer(geometry, crs, layer).boundingBox()
    except AoiError as exc:
        raise QgsProcessingException(str(exc)) from exc
    source = {"raster_path": None, "bounds": None, "unreferenced": False, "aoi": None,
              "bands": RENDER_BANDS, "rendered": True,  # a render is the layer as QGIS draws it, in RGB
              "render": prepare_render(layer, extent)}
    if not source["render"].movable:
        # no usable clone: the layer itself is drawn, which only the main thread may use, so it
        # is rendered here, in prepareAlgorithm, as all renders were before (the UI waits for it)
        render_source(source, feedback)
    return source


def prepare_render(layer, extent=None) -> PreparedRender:
    """The render of the non-file ``layer`` over ``extent`` (layer CRS; None or empty: the whole
    layer) to the results folder's renders, made ready (main thread). Raises
    QgsProcessingException for an extent that cannot be rendered."""
    settings = Settings.load()
    ext = extent if extent is not None and not extent.isEmpty() else layer.extent()
    out = render_file(settings.results_dir(), layer.name())
    try:
        return PreparedRender(layer, ext, str(out), settings.render_max_px)
    except ValueError as exc:  # an empty extent
        raise QgsProcessingException(f"Could not render the layer '{layer.name()}': {exc}") from exc


def question_refusal(question: str) -> str | None:
    """Why Ask a raster cannot take ``question``, said before anything runs (a web layer would be
    rendered first): empty or only blanks (QGIS refuses only ""), or longer than the engine takes."""
    if not question.strip():
        return "Please type a question."
    return question_too_long(question)


def questions_refusal(text: str) -> str | None:
    """The same for Batch questions' QUESTIONS (one a line): no question on any line, or one too long."""
    if not any(line.strip() for line in text.splitlines()):
        return "Type at least one question."
    return questions_too_long(text)


def render_source(source, feedback, client=None) -> dict:
    """Draw and write the render of ``source`` (:func:`question_source`) that is still to be
    made, in the calling thread (processAlgorithm's; ``feedback``'s Cancel stops it); it then has
    its ``raster_path`` and ``bounds``. A source with nothing to render is left as it is. The
    render (with the layer's clone) stays in ``source``: its owner, the algorithm, lets go of it.
    ``client``: the engine's, whose ``max_read_pixels`` (:meth:`client.EngineClient.read_budget`)
    caps the render's pixels, as the chat dock's are (an engine that cannot say: not capped; its
    error is the question's to report). Raises QgsProcessingException with a sentence: nothing
    drawn, a file that could not be written (what was written of it is removed), Cancel."""
    job = source.get("render")
    if job is None or source["raster_path"] is not None:
        return source
    budget = None
    if client is not None:
        try:
            budget = client.read_budget()
        except EngineError:
            budget = None
    capped = job.limit_pixels(budget)
    if feedback is not None:
        feedback.pushInfo(f"Rendering the non-file layer '{job.name}' to {job.path} at "
                          + size_note(job.settings.outputSize(), capped, budget))
    existed = os.path.exists(job.path)
    try:
        done = job.run(feedback)
    except NothingRendered as exc:  # says the layer's name itself
        raise QgsProcessingException(str(exc)) from exc
    except (OSError, ValueError) as exc:  # a file GDAL could not write (what it wrote of it goes)
        if not existed:
            with contextlib.suppress(OSError):
                os.remove(job.path)
        raise QgsProcessingException(f"Could not render the layer '{job.name}': {exc}") from exc
    if done is None:
        raise QgsProcessingException("Cancelled.")
    path, visible = done
    if feedback is not None and feedback.isCanceled():  # cancelled while the file was written
        with contextlib.suppress(OSError):
            os.remove(path)
        raise QgsProcessingException("Cancelled.")
    source.update(raster_path=path, bounds=rect_bounds(visible))
    return source


def discard_render(source) -> None:
    """Remove the render :func:`render_source` wrote for ``source`` (:func:`question_source`), if
    it wrote one: what a run that failed or was cancelled made of a web or virtual layer, which
    nothing refers to then. A file layer's own file, or a render not made yet, is left alone."""
    job = source.get("render") if source else None
    if job is None or source.get("raster_path") != job.path:
        return
    with contextlib.suppress(OSError):
        os.remove(job.path)


def say_preparing(feedback, layer_name: str | None = None):
    """A ``progress(fraction)`` for a raster's conversion for the upload (:mod:`upload`) that says
    once, as the other stages are said, that it runs: "Preparing the raster for upload …"."""
    said = []

    def progress(_fraction):
        if not said and feedback is not None:
            said.append(True)
            feedback.setProgressText(preparing_words(layer_name) + " …")

    return progress


def starts_now(ev: dict) -> bool:
    """Whether ``ev`` is a ``queued`` event with no job ahead (position 0: the question starts
    now). Processing logs each progress text as a line, where "Queued (0 ahead) …" said once an
    answer that nothing waited: only a queue with a job ahead is said ("Queued (2 ahead) …", the
    chat dock's words, again each time it moves up)."""
    return ev.get("type") == "queued" and not ev.get("position")


def _cancelled(feedback) -> bool:
    return feedback is not None and feedback.isCanceled()


@contextlib.contextmanager
def calls_stopped_by(feedback, client):
    """While the block runs, ``feedback``'s Cancel also stops ``client``'s short calls under way
    (:meth:`client.EngineClient.abort_calls`: the protocol check, the engine's upload limit and
    read budget, each a ``GET /health``), as the batch dialog's Cancel does (BatchTask.cancel):
    else Cancel waited up to the short timeout for an engine that is slow to answer them.
    Worker thread (processAlgorithm); ``feedback`` None: nothing to stop them."""
    if feedback is None:
        yield
        return
    # direct: a plain callable connected in this worker thread would be called in it, queued to
    # an event loop it does not run (never); abort_calls is safe from the thread that cancels
    feedback.canceled.connect(client.abort_calls, Qt.ConnectionType.DirectConnection)
    try:
        yield
    finally:
        try:
            feedback.canceled.disconnect(client.abort_calls)
        except TypeError:
            pass


def ask_once(client, question, raster_path, aoi, options, feedback, results_dir: Path, clip_bounds=None,
             unreferenced: bool = False, prepared=None, progress=None, bands=None) -> dict:
    """Stream one answer; returns the result event with local_heatmap_path / local_anchors_path
    (``clip_bounds`` and ``unreferenced`` as for :func:`tasks.keep_result_files`). A file that
    could not be kept is None and ``files_warning`` says why (also reported to
    ``feedback``): the answer is not lost for them. ``prepared``: the upload made once for
    several questions about this raster (:func:`tasks.prepare_item_upload`), sent as it is.
    ``progress``: the :class:`tasks.BatchProgress` of a batch this answer is one of (its upload
    then takes the first part of this answer's share, the engine's stages the rest, the
    generation counted in answer tokens: :meth:`tasks.BatchProgress.event`); without it the
    ``feedback``'s bar is this one answer's, split the same way (a batch of one). ``bands``: the
    request's (:func:`question_source`); the result's ``bands``/``palette`` say what the model saw.
    The queue is said only while a job is ahead of the question (:func:`starts_now`).
    An answer that breaks off (or fails) after some of its words came raises its EngineError with
    those words as ``partial_answer``, also said in the log ("The answer so far (incomplete): …");
    a cancelled one raises QgsProcessingException("Cancelled.") with them as ``partial_answer``."""
    request = build_ask_request(question, raster_path, aoi=aoi, bands=bands, **options)
    if not _cancelled(feedback):
        # an engine of another protocol is asked nothing (once per run); Cancel ends the check
        # at once when the algorithm runs it in calls_stopped_by, and then nothing is asked
        client.check_protocol()
    if _cancelled(feedback):
        exc = QgsProcessingException("Cancelled.")
        exc.partial_answer = None
        raise exc
    stream = client.ask(request, prepared=prepared)
    if progress is None and feedback is not None:
        progress = BatchProgress(1, feedback.setProgress)
        progress.start(0, stream.upload_path is not None or stream.prepared is not None)
    if progress is not None:
        stream.on_upload_progress = progress.uploaded
    stream.on_prepare_progress = say_preparing(feedback)
    if feedback is not None:
        # direct, as in calls_stopped_by: connected in this worker thread (no event loop), the
        # abort was never called, and Cancel waited for the stream's next event (for ever
        # against an engine trickling bytes and no event)
        feedback.canceled.connect(stream.abort, Qt.ConnectionType.DirectConnection)
        if feedback.isCanceled():  # pressed before the connection was made
            stream.abort()
    result = None
    words = []  # the answer's words as they stream (kept when it breaks off)
    try:
        for ev in stream.events():
            if feedback is not None and feedback.isCanceled():
                stream.abort()
                break
            kind = ev.get("type")
            if kind == "token":
                words.append(ev.get("text", ""))
            if progress is not None:  # the bar moves through every stage up to the result, as in
                # the batch dialog; the text says which stage runs, once each ("Answering…")
                text = progress.event(ev, request.get("max_new_tokens"))
                if text and feedback is not None and not starts_now(ev):
                    feedback.setProgressText(text)
            if kind == "result":
                files, warning = keep_result_files_or_warn(ev, client, results_dir, file_stem(question), clip_bounds,
                                                           unreferenced, stream=stream)
                if warning and feedback is not None:
                    feedback.reportError(warning)
                result = dict(ev, local_heatmap_path=files["heatmap"], local_anchors_path=files["anchors"],
                              files_warning=warning)
            elif kind == "error":
                raise EngineError(ev.get("code") or "internal", ev.get("message") or "The engine failed.", ev.get("hint"))
    except EngineError as exc:
        partial = "".join(words)
        if partial.strip():
            exc.partial_answer = partial
            if feedback is not None:
                feedback.pushInfo(f"The answer so far (incomplete): {partial}")
        raise
    finally:
        stream.on_upload_progress = None
        stream.on_prepare_progress = None
        if feedback is not None:
            try:
                feedback.canceled.disconnect(stream.abort)
            except TypeError:
                pass
    if result is None:
        exc = QgsProcessingException(
            "Cancelled." if feedback is not None and feedback.isCanceled() else "The engine sent no result.")
        exc.partial_answer = "".join(words) if "".join(words).strip() else None  # the words that came
        raise exc
    return result


class ResultLayerPostProcessor(QgsProcessingLayerPostProcessorInterface):
    """Runs on a result layer (heatmap or anchors) Processing loaded into the project: marks it
    as GeoVQA's own (the chat dock leaves it out of its layer list), names and styles it as the
    dock does, and gives it the CRS of the raster asked about (``crs_wkt``; "" when that raster
    has none, as the dock does: OGR reads a GeoJSON without CRS as EPSG:4326; None: as loaded)."""

    def __init__(self, kind: str, name: str, crs_wkt: str | None = None, run: dict | None = None):
        super().__init__()
        self.kind, self.name, self.crs_wkt = kind, name, crs_wkt
        self.run = run if run is not None else {}  # {kind: layer id} of the run's result layers

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802
        if layer is None:
            return
        self.run[self.kind] = layer.id()
        # QGIS loads the outputs in the order of their paths, each on top: the anchors go above
        # the heatmap, as the dock puts them (its warm cells hid the top anchors' outlines)
        stack_anchors_above_heatmap(context.project() or QgsProject.instance(), self.run)
        result_layers.mark_result_layer(layer, self.kind)
        layer.setName(self.name)
        if self.crs_wkt is not None:
            result_layers.set_result_crs(layer, result_layers.crs_from_wkt(self.crs_wkt))
        try:
            if self.kind == "heatmap":
                result_layers.style_heatmap(layer)
            elif not result_layers.has_no_features(layer):
                result_layers.style_anchors(layer)
        except Exception as exc:  # noqa: BLE001 - the mark is what matters; the style is a nicety
            if feedback is not None:
                feedback.reportError(f"Could not style the {self.kind} layer: {exc}")


def stack_anchors_above_heatmap(project, run: dict) -> None:
    """Move the anchors layer of ``run`` ({kind: layer id}) right above its heatmap in the layer
    tree, when both are loaded into one group and the anchors are below."""
    root = project.layerTreeRoot()
    heat = root.findLayer(run.get("heatmap") or "")
    anchors = root.findLayer(run.get("anchors") or "")
    if heat is None or anchors is None or heat.parent() is not anchors.parent():
        return
    parent = heat.parent()
    children = parent.children()
    at = children.index(heat)
    if children.index(anchors) < at:  # above already (the first child is drawn on top)
        return
    parent.insertChildNode(at, anchors.clone())
    parent.removeChildNode(anchors)


# Processing keeps only a pointer to a layer's post-processor: they are kept alive here until
# the layers are loaded (a few runs' worth)
_POST_PROCESSORS = deque(maxlen=32)


def load_result_layer(context, path: str, kind: str, name: str, crs_wkt: str | None = None,
                      run: dict | None = None) -> None:
    """Name and mark (:class:`ResultLayerPostProcessor`, RESULT_LAYER_PROPERTY) the layer QGIS
    loads from ``path`` when the algorithm completes: QGIS's ``parameterAsOutputLayer`` put it
    on the context's layers to load when the output's value has a destination project (the
    toolbox's "Open output file after running algorithm"); ``crs_wkt``: the CRS of the raster
    asked about ("" for none), which the layer gets; ``run``: one dict shared by the run's result
    layers (their ids), so its anchors go above its heatmap. A file QGIS does not load is left alone.
    Main thread (postProcessAlgorithm)."""
    if not context.willLoadLayerOnCompletion(path):
        return
    details = context.layerToLoadOnCompletionDetails(path)
    details.name = name
    post = ResultLayerPostProcessor(kind, name, crs_wkt, run)
    _POST_PROCESSORS.append(post)
    details.setPostProcessor(post)


def holds_no_anchors(path: str) -> bool:
    """Whether the anchors file ``path`` (GeoJSON or GeoPackage) holds no feature: no anchor was
    kept, or clipping to the raster left none. The chat dock adds no anchors layer then
    (:func:`layers.add_result_layers`, by :func:`layers.has_no_features`), and neither does
    Processing. A file OGR cannot open is not judged here (False). Main thread."""
    from qgis.core import QgsVectorLayer

    layer = QgsVectorLayer(path, "anchors", "ogr")
    return layer.isValid() and result_layers.has_no_features(layer)


def forget_result_layer(context, path: str) -> None:
    """Take ``path`` off the layers QGIS loads when the algorithm completes: an output file that
    was not written (QGIS would report it as a layer it could not load). Main thread."""
    layers = context.layersToLoadOnCompletion()
    if layers.pop(path, None) is not None:
        context.setLayersToLoadOnCompletion(layers)
