"""Processing algorithm "Ask a raster": one question about one raster layer (optional extent),
outputs the answer text, the kept-token heatmap (a raster layer output: GeoTIFF) and the anchor
tokens (a vector layer output: GeoJSON, or a GeoPackage converted by GDAL). As layer outputs
they get the toolbox's "Open output file after running algorithm" box: ticked, QGIS loads them
into the project when the run ends, and :meth:`AskRasterAlgorithm.postProcessAlgorithm` names,
marks and styles them as the chat dock's result layers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from qgis.core import (
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingOutputString,
    QgsProcessingParameterExtent,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
)

from ..bands import bands_text
from ..compat import NUMBER_INTEGER, PARAM_ADVANCED, PROCESSING_VECTOR_POLYGON
from ..engine_errors import EngineError
from ..layers import anchors_name, heatmap_name
from ..settings import Settings
from .common import (
    aoi_refusal,
    area_of_interest,
    ask_once,
    calls_stopped_by,
    discard_render,
    engine_client,
    forget_result_layer,
    holds_no_anchors,
    load_result_layer,
    question_refusal,
    question_source,
    render_source,
    strategy_parameter,
    strategy_parameter_value,
    with_strategy_names,
)

# the files the outputs can be written to (the provider's lists; the first is the default): the
# engine's GeoTIFF and GeoJSON are copied, a GeoPackage is converted from the GeoJSON by GDAL
RASTER_EXTENSIONS = ("tif", "tiff")
VECTOR_EXTENSIONS = ("geojson", "gpkg")
UNDEFINED_CARTESIAN = 'LOCAL_CS["Undefined Cartesian SRS"]'  # GDAL writes it as GeoPackage srs_id -1


def write_anchors(src: str, dest: str, crs_wkt: str | None = None) -> None:
    """The anchors GeoJSON ``src`` written to ``dest``: copied, or converted to a GeoPackage
    (``.gpkg``, one layer named after the file; a file already there is replaced, as QGIS
    replaces its own outputs). ``crs_wkt``: the CRS of the raster asked about, the GeoPackage's
    ("" for a raster without CRS: the GeoPackage's undefined Cartesian SRS, where OGR would
    read the GeoJSON as EPSG:4326; None: as GDAL reads the GeoJSON). Raises OSError when it
    cannot be written."""
    if Path(dest).suffix.lower() != ".gpkg":
        shutil.copyfile(src, dest)
        return
    from osgeo import gdal

    if os.path.exists(dest):
        os.remove(dest)
    try:
        # -a_srs (assigned, not reprojected); no CRS: GeoPackage's "undefined Cartesian" (srs_id -1),
        # not GDAL's default for none, "undefined geographic" (0)
        srs = {} if crs_wkt is None else {"dstSRS": crs_wkt or UNDEFINED_CARTESIAN, "reproject": False}
        ds = gdal.VectorTranslate(dest, src, format="GPKG", layerName=Path(dest).stem, **srs)
    except RuntimeError as exc:  # gdal.UseExceptions() is on
        raise OSError(str(exc)) from exc
    if ds is None:
        raise OSError(gdal.GetLastErrorMsg() or "GDAL could not write the GeoPackage")
    ds = None  # closed: written


def output_skipped(parameters, name) -> bool:
    """Whether output ``name`` is given with no value: skipped (the toolbox's "Skip Output",
    ``HEATMAP=`` in qgis_process, None in processing.run). One left out is not: it is the
    parameter's default, a temporary file."""
    # None, "" or qgis_process's NULL (a null QVariant): each is falsy, as the dialog tests it
    return name in parameters and not parameters[name]


class AskRasterAlgorithm(QgsProcessingAlgorithm):
    INPUT = "INPUT"
    QUESTION = "QUESTION"
    AOI = "AOI"
    STRATEGY = "STRATEGY"
    BUDGET = "BUDGET"
    MAX_NEW_TOKENS = "MAX_NEW_TOKENS"
    HEATMAP = "HEATMAP"
    ANCHORS = "ANCHORS"
    ANSWER = "ANSWER"

    def name(self):
        return "ask_raster"

    def displayName(self):  # noqa: N802
        return "Ask a raster"

    def shortDescription(self):  # noqa: N802
        return "Asks the GeoVQA engine one question about a raster layer: the answer, its heatmap and anchors."

    def group(self):
        return "Question answering"

    def groupId(self):  # noqa: N802
        return "qa"

    def shortHelpString(self):  # noqa: N802
        return ("Asks the GeoVQA engine one question about a raster layer (optionally only inside an "
                "area of interest) and returns the answer, the kept-token heatmap (GeoTIFF, the raster's CRS) and "
                "the anchor tokens (GeoJSON, or a GeoPackage for a .gpkg file). With \"Open output file after "
                "running algorithm\" both are loaded into the project, as the GeoVQA dock adds them (the anchors only "
                "when an anchor was kept: a file with none is written but not loaded); copies that "
                "stay are kept in the GeoVQA results folder (the log names them), also when the outputs are "
                "temporary files or skipped.\n\n"
                "Either output can be skipped (\"Skip Output\"; HEATMAP= in qgis_process): it is then neither "
                "written nor loaded. Left out of a qgis_process or processing.run call, it is a temporary file.\n\n"
                "Area of interest: empty asks about the whole layer; an extent with no area (zero width or height) "
                "is refused. Web and virtual layers are rendered to a GeoTIFF first, over the area of interest "
                "(never finer than a layer's own pixels, or the finer side of non-square ones; at most the "
                "render size of the GeoVQA options). A web "
                "service covering the whole world (XYZ or WMTS tiles) needs an area of interest, e.g. the map "
                "canvas extent; one of a region, or a virtual raster, is rendered whole without one.\n\n"
                "Token strategy: its name (e.g. STRATEGY=pyramid in qgis_process) or its number in the list. "
                "The last, engine (Engine's default), sends none: the engine uses its adapter's training "
                "settings, else its own default (geollava).\n\n"
                "The engine URL and token come from Settings > Options > GeoVQA.")

    def createInstance(self):  # noqa: N802
        return AskRasterAlgorithm()

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, "Raster layer"))
        self.addParameter(QgsProcessingParameterString(self.QUESTION, "Question"))
        self.addParameter(QgsProcessingParameterExtent(self.AOI, "Area of interest (empty: whole layer)", optional=True))
        self.addParameter(strategy_parameter(self.STRATEGY))
        self.addParameter(QgsProcessingParameterNumber(self.BUDGET, "Token budget (0: engine default)", NUMBER_INTEGER,
                                                       defaultValue=0, minValue=0))
        p = QgsProcessingParameterNumber(self.MAX_NEW_TOKENS, "Max answer tokens", NUMBER_INTEGER,
                                         defaultValue=256, minValue=1, maxValue=4096)
        p.setFlags(p.flags() | PARAM_ADVANCED)
        self.addParameter(p)
        # optional, temporary files by default: `qgis_process run geovqa:ask_raster -- INPUT=.. QUESTION=..`
        # works as documented (it refused to run without both). Layer outputs, not file outputs: the
        # toolbox gives them "Open output file after running algorithm" (ticked), file outputs not
        self.addParameter(QgsProcessingParameterRasterDestination(
            self.HEATMAP, "Kept-token heatmap", defaultValue=QgsProcessing.TEMPORARY_OUTPUT, optional=True))
        self.addParameter(QgsProcessingParameterVectorDestination(
            self.ANCHORS, "Anchor tokens", PROCESSING_VECTOR_POLYGON, defaultValue=QgsProcessing.TEMPORARY_OUTPUT,
            optional=True))
        self.addOutput(QgsProcessingOutputString(self.ANSWER, "Answer"))

    def output_refusal(self, parameters):
        """Why an output cannot be written where ``parameters`` say (None when both can): a file
        type the provider does not write (QGIS's ``isSupportedOutputValue``, from its lists) or a
        GeoPackage table (``ogr:dbname=...``) instead of a file."""
        for name in (self.HEATMAP, self.ANCHORS):
            value = parameters.get(name)
            if not value:  # left out (the temporary default) or skipped
                continue
            param = self.parameterDefinition(name)
            # a context of its own: with a destination project set, asking for the path registers
            # it to be loaded into the project, and a temporary output gets a new name each time
            scratch = QgsProcessingContext()
            ok, error = param.isSupportedOutputValue(value, scratch)
            if ok and self.parameterAsOutputLayer({name: value}, name, scratch).startswith("ogr:"):
                ok, error = False, "a GeoPackage table cannot be written, only a file"
            if not ok:
                kinds = RASTER_EXTENSIONS if name == self.HEATMAP else VECTOR_EXTENSIONS
                return f"{param.description()}: {error}. Save it as {' or '.join('.' + k for k in kinds)}."
        return None

    def preprocessParameters(self, parameters):  # noqa: N802
        """The parameters the toolbox dialog made (only its dialogs call this): an output the user
        skipped is left out there (QGIS 3.22), and is given as None here, skipped rather than
        the temporary file a left-out output is."""
        parameters = dict(super().preprocessParameters(parameters))
        for name in (self.HEATMAP, self.ANCHORS):
            parameters.setdefault(name, None)
        return parameters

    def output_path(self, parameters, name, context) -> str:
        """Where output ``name`` is to be written ("" when it is skipped)."""
        if output_skipped(parameters, name):
            return ""
        return self.parameterAsOutputLayer(parameters, name, context)

    def checkParameterValues(self, parameters, context):  # noqa: N802
        # a strategy given by its number in the list (models and scripts saved before it took names)
        ok, message = super().checkParameterValues(with_strategy_names(parameters, self.STRATEGY), context)
        refusal = (self.output_refusal(parameters) or aoi_refusal(self, parameters, self.AOI, context)
                   or question_refusal(self.parameterAsString(parameters, self.QUESTION, context))) if ok else None
        return (False, refusal) if refusal else (ok, message)

    def prepareAlgorithm(self, parameters, context, feedback):  # noqa: N802 - main thread
        # qgis_process and models may not check the values first
        refusal = (self.output_refusal(parameters)
                   or question_refusal(self.parameterAsString(parameters, self.QUESTION, context)))
        if refusal:
            raise QgsProcessingException(refusal)
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        if layer is None:
            raise QgsProcessingException("The input raster layer could not be loaded.")
        self.layer_name = layer.name()
        # the result layers loaded at the end get it, also none (a GeoJSON would read as EPSG:4326)
        self.layer_crs_wkt = layer.crs().toWkt() if layer.crs().isValid() else ""
        self.strategy = strategy_parameter_value(self, parameters, self.STRATEGY, context)
        geom, crs = area_of_interest(self, parameters, self.AOI, context)  # (None, None): the whole layer
        # a file: the AOI cut to it, in the request; any other layer: rendered over the AOI, in
        # processAlgorithm (the task's thread); kept here with its clone of the layer until then
        self.source = question_source(layer, geom, crs, feedback)
        try:
            self.client = engine_client()
        except QgsProcessingException:
            discard_render(self.source)  # drawn already when the layer had to be drawn here
            raise
        self.settings = Settings.load()
        return True

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        """Render a non-file layer, ask, write the outputs. A run that fails or is cancelled
        removes the render it made (:func:`discard_render`); a run that answers keeps it."""
        try:
            with calls_stopped_by(feedback, self.client):  # Cancel ends a /health call under way
                return self._ask(parameters, context, feedback)
        except BaseException:
            discard_render(self.source)
            raise

    def _ask(self, parameters, context, feedback) -> dict:
        source = render_source(self.source, feedback, self.client)  # a non-file layer is rendered here
        self.raster_path, self.bounds = source["raster_path"], source["bounds"]
        self.unreferenced, self.aoi = source["unreferenced"], source["aoi"]
        self.bands, self.rendered = source["bands"], source["rendered"]
        question = self.parameterAsString(parameters, self.QUESTION, context)
        options = self.settings.request_options(
            strategy=self.strategy,
            budget=self.parameterAsInt(parameters, self.BUDGET, context) or None,
            max_new_tokens=self.parameterAsInt(parameters, self.MAX_NEW_TOKENS, context),
        )
        # with a destination project (the toolbox's "Open output file after running algorithm"),
        # QGIS registers each path here to be loaded into it when the run ends
        dests = {key: self.output_path(parameters, key, context) for key in (self.HEATMAP, self.ANCHORS)}
        try:
            result = ask_once(self.client, question, self.raster_path, self.aoi, options, feedback,
                              self.settings.results_dir(), self.bounds, self.unreferenced, bands=self.bands)
        except EngineError as exc:
            raise QgsProcessingException(str(exc)) from exc
        except OSError as exc:
            raise QgsProcessingException(f"Could not save the result files in {self.settings.results_dir()}: "
                                         f"{exc}. Choose another results folder in Settings > Options > GeoVQA.") from exc
        feedback.pushInfo(f"Answer: {result.get('answer', '')}")
        seen = bands_text(result.get("bands"), result.get("palette"))
        if self.rendered:
            feedback.pushInfo("The model saw the layer as QGIS draws it (rendered in RGB).")
        elif seen:  # an engine older than the result's "bands" does not say
            feedback.pushInfo(f"The model saw {seen} (layer '{self.layer_name}').")
        kept = [f"{what} {path}" for what, path in (("heatmap", result.get("local_heatmap_path")),
                                                    ("anchors", result.get("local_anchors_path"))) if path]
        if kept:  # the outputs may be temporary files, which qgis_process deletes when it ends
            feedback.pushInfo(f"Lasting copies kept in the GeoVQA results folder {self.settings.results_dir()}: "
                              + ", ".join(kept))
        # a heatmap/anchors file that could not be kept (ask_once reported why) is left out: the
        # answer is still the output
        out = {self.ANSWER: result.get("answer", "")}
        # for postProcessAlgorithm (main thread): (output, path, layer name; None: not written)
        self.result_files = []
        for key, local, write, name in (
                (self.HEATMAP, result.get("local_heatmap_path"), shutil.copyfile, heatmap_name),
                (self.ANCHORS, result.get("local_anchors_path"),
                 lambda src, dest: write_anchors(src, dest, self.layer_crs_wkt), anchors_name)):
            dest = dests[key]
            if not dest:
                continue
            if local:
                try:
                    write(local, dest)
                except OSError as exc:
                    raise QgsProcessingException(f"Could not write {dest}: {exc}") from exc
                out[key] = dest
            self.result_files.append((key, dest, name(question, self.layer_name) if local else None))
        return out

    def postProcessAlgorithm(self, context, feedback):  # noqa: N802 - main thread
        """The heatmap and anchors QGIS loads into the project when the run ends (the toolbox's
        "Open output file after running algorithm", ``processing.runAndLoadResults``) are marked
        as GeoVQA's result layers, so the chat dock does not offer them as rasters to ask about,
        named as the dock names them ("heatmap: <layer> — <question…>") and styled as its own.
        A file that could not be kept (ask_once reported why) is not loaded: the answer is still
        the output, and QGIS does not report a layer it could not load. Anchors with no feature
        (no anchor kept) are written, and are the ANCHORS output, but not loaded, as the dock
        adds no anchors layer then (as with the box unticked)."""
        files = getattr(self, "result_files", ())
        loaded = []
        for key, path, name in files:  # first: forgetting copies the layers' details
            if name is None:
                forget_result_layer(context, path)
            elif (key == self.ANCHORS and context.willLoadLayerOnCompletion(path)
                  and holds_no_anchors(path)):
                forget_result_layer(context, path)
                if feedback is not None:
                    feedback.pushInfo(f"No anchor token was kept: the anchors file {path} holds none and is "
                                      "not loaded.")
            else:
                loaded.append((key, path, name))
        run = {}  # the two layers' ids, so the anchors go above the heatmap
        for key, path, name in loaded:
            load_result_layer(context, path, "heatmap" if key == self.HEATMAP else "anchors", name,
                              getattr(self, "layer_crs_wkt", None), run)
        return {}
