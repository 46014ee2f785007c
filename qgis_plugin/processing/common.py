"""Helpers shared by the GeoVQA Processing algorithms: engine client, raster resolution
(file layers as they are, other layers rendered to a GeoTIFF), streamed answer with feedback,
and the naming and marking of the result layers QGIS loads after a run."""

from __future__ import annotations

from collections import deque
from pathlib import Path

from qgis.core import QgsProcessingException, QgsProcessingLayerPostProcessorInterface

from .. import layers as result_layers
from ..aoi import is_unreferenced_file
from ..client import EngineError, build_ask_request
from ..render import layer_file_path, render_sync
from ..settings import STRATEGIES, Settings, make_client
from ..tasks import BatchProgress, file_stem, keep_result_files_or_warn, rect_bounds


def strategy_options():
    return list(STRATEGIES)


def engine_client():
    try:
        return make_client(Settings.load())
    except EngineError as exc:
        raise QgsProcessingException(str(exc)) from exc


def raster_source(layer, feedback, extent=None) -> tuple:
    """(file path the engine can read for ``layer``, its bounds, whether that file has no
    georeferencing at all); non-file layers are rendered (to a georeferenced GeoTIFF)."""
    path = layer_file_path(layer)
    if path is not None:
        return path, rect_bounds(layer.extent()), is_unreferenced_file(layer)
    settings = Settings.load()
    ext = extent if extent is not None and not extent.isEmpty() else layer.extent()
    out = settings.results_dir() / "renders" / f"{file_stem(layer.name())}_render.tif"
    if feedback is not None:
        feedback.pushInfo(f"Rendering the non-file layer '{layer.name()}' to {out}")
    path, visible = render_sync(layer, ext, str(out), settings.render_max_px)
    return path, rect_bounds(visible), False


def ask_once(client, question, raster_path, aoi, options, feedback, results_dir: Path, clip_bounds=None,
             unreferenced: bool = False, prepared=None, progress=None) -> dict:
    """Stream one answer; returns the result event with local_heatmap_path / local_anchors_path
    (``clip_bounds`` and ``unreferenced`` as for :func:`tasks.keep_result_files`). A file that
    could not be kept is None and ``files_warning`` says why (also reported to
    ``feedback``): the answer is not lost for them. ``prepared``: the upload made once for
    several questions about this raster (:func:`tasks.prepare_item_upload`), sent as it is.
    ``progress``: the :class:`tasks.BatchProgress` of a batch this answer is one of (its upload
    then takes the first part of this answer's share, the engine's stages the rest, the
    generation counted in answer tokens: :meth:`tasks.BatchProgress.event`); without it the
    ``feedback``'s bar is this one answer's, split the same way (a batch of one)."""
    request = build_ask_request(question, raster_path, aoi=aoi, **options)
    stream = client.ask(request, prepared=prepared)
    if progress is None and feedback is not None:
        progress = BatchProgress(1, feedback.setProgress)
        progress.start(0, stream.upload_path is not None or stream.prepared is not None)
    if progress is not None:
        stream.on_upload_progress = progress.uploaded
    if feedback is not None:
        feedback.canceled.connect(stream.abort)
    result = None
    try:
        for ev in stream.events():
            if feedback is not None and feedback.isCanceled():
                stream.abort()
                break
            kind = ev.get("type")
            if progress is not None:  # the bar moves through every stage up to the result, as in
                # the batch dialog; the text says which stage runs, once each ("Answering…")
                text = progress.event(ev, request.get("max_new_tokens"))
                if text and feedback is not None:
                    feedback.setProgressText(text)
            if kind == "result":
                files, warning = keep_result_files_or_warn(ev, client, results_dir, file_stem(question), clip_bounds,
                                                           unreferenced)
                if warning and feedback is not None:
                    feedback.reportError(warning)
                result = dict(ev, local_heatmap_path=files["heatmap"], local_anchors_path=files["anchors"],
                              files_warning=warning)
            elif kind == "error":
                raise EngineError(ev.get("code") or "internal", ev.get("message") or "The engine failed.", ev.get("hint"))
    finally:
        stream.on_upload_progress = None
        if feedback is not None:
            try:
                feedback.canceled.disconnect(stream.abort)
            except TypeError:
                pass
    if result is None:
        if feedback is not None and feedback.isCanceled():
            raise QgsProcessingException("Cancelled.")
        raise QgsProcessingException("The engine sent no result.")
    return result


class ResultLayerPostProcessor(QgsProcessingLayerPostProcessorInterface):
    """Runs on a result layer (heatmap or anchors) Processing loaded into the project: marks it
    as GeoVQA's own (the chat dock leaves it out of its layer list), names and styles it as the
    dock does."""

    def __init__(self, kind: str, name: str):
        super().__init__()
        self.kind, self.name = kind, name

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802
        if layer is None:
            return
        result_layers.mark_result_layer(layer, self.kind)
        layer.setName(self.name)
        try:
            if self.kind == "heatmap":
                result_layers.style_heatmap(layer)
            elif not result_layers.has_no_features(layer):
                result_layers.style_anchors(layer)
        except Exception as exc:  # noqa: BLE001 - the mark is what matters; the style is a nicety
            if feedback is not None:
                feedback.reportError(f"Could not style the {self.kind} layer: {exc}")


# Processing keeps only a pointer to a layer's post-processor: they are kept alive here until
# the layers are loaded (a few runs' worth)
_POST_PROCESSORS = deque(maxlen=32)


def load_result_layer(context, path: str, kind: str, name: str) -> None:
    """Name and mark (:class:`ResultLayerPostProcessor`, RESULT_LAYER_PROPERTY) the layer QGIS
    loads from ``path`` when the algorithm completes: QGIS's ``parameterAsOutputLayer`` put it
    on the context's layers to load when the output's value has a destination project (the
    toolbox's "Open output file after running algorithm"). A file QGIS does not load is left
    alone. Main thread (postProcessAlgorithm)."""
    if not context.willLoadLayerOnCompletion(path):
        return
    details = context.layerToLoadOnCompletionDetails(path)
    details.name = name
    post = ResultLayerPostProcessor(kind, name)
    _POST_PROCESSORS.append(post)
    details.setPostProcessor(post)


def forget_result_layer(context, path: str) -> None:
    """Take ``path`` off the layers QGIS loads when the algorithm completes: an output file that
    was not written (QGIS would report it as a layer it could not load). Main thread."""
    layers = context.layersToLoadOnCompletion()
    if layers.pop(path, None) is not None:
        context.setLayersToLoadOnCompletion(layers)
