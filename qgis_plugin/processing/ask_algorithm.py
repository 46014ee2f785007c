"""Processing algorithm "Ask a raster": one question about one raster layer (optional extent),
outputs the answer text, the kept-token heatmap GeoTIFF and the anchors GeoJSON."""

from __future__ import annotations

import shutil

from qgis.core import (
    QgsGeometry,
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingException,
    QgsProcessingOutputString,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
)

from ..aoi import AoiError, clip_to_layer, request_aoi
from ..client import EngineError
from ..compat import NUMBER_INTEGER, PARAM_ADVANCED
from ..layers import anchors_name, heatmap_name
from ..render import layer_file_path
from ..settings import DEFAULT_STRATEGY, Settings
from .common import ask_once, engine_client, load_result_layer, raster_source, strategy_options, wants_loading


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

    def group(self):
        return "Question answering"

    def groupId(self):  # noqa: N802
        return "qa"

    def shortHelpString(self):  # noqa: N802
        return ("Asks the GeoVQA engine one question about a raster layer (optionally only inside an "
                "extent) and returns the answer, the kept-token heatmap (GeoTIFF, the raster's CRS) and "
                "the anchor tokens (GeoJSON). Web and virtual layers are rendered to a GeoTIFF first. "
                "The engine URL and token come from Settings > Options > GeoVQA.")

    def createInstance(self):  # noqa: N802
        return AskRasterAlgorithm()

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, "Raster layer"))
        self.addParameter(QgsProcessingParameterString(self.QUESTION, "Question"))
        self.addParameter(QgsProcessingParameterExtent(self.AOI, "Area of interest (empty: whole layer)", optional=True))
        strategies = strategy_options()
        self.addParameter(QgsProcessingParameterEnum(self.STRATEGY, "Token strategy", options=strategies,
                                                     defaultValue=strategies.index(DEFAULT_STRATEGY)))
        self.addParameter(QgsProcessingParameterNumber(self.BUDGET, "Token budget (0: engine default)", NUMBER_INTEGER,
                                                       defaultValue=0, minValue=0))
        p = QgsProcessingParameterNumber(self.MAX_NEW_TOKENS, "Max answer tokens", NUMBER_INTEGER,
                                         defaultValue=256, minValue=1, maxValue=4096)
        p.setFlags(p.flags() | PARAM_ADVANCED)
        self.addParameter(p)
        # optional, temporary files by default: `qgis_process run geovqa:ask_raster -- INPUT=.. QUESTION=..`
        # works as documented (it refused to run without both)
        for name, label, filt in ((self.HEATMAP, "Kept-token heatmap", "GeoTIFF (*.tif)"),
                                  (self.ANCHORS, "Anchor tokens", "GeoJSON (*.geojson)")):
            self.addParameter(QgsProcessingParameterFileDestination(
                name, label, filt, defaultValue=QgsProcessing.TEMPORARY_OUTPUT, optional=True))
        self.addOutput(QgsProcessingOutputString(self.ANSWER, "Answer"))

    def prepareAlgorithm(self, parameters, context, feedback):  # noqa: N802 - main thread
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        if layer is None:
            raise QgsProcessingException("The input raster layer could not be loaded.")
        self.layer_name = layer.name()
        geom = None
        crs = None
        if parameters.get(self.AOI):
            ext = self.parameterAsExtent(parameters, self.AOI, context)
            crs = self.parameterAsExtentCrs(parameters, self.AOI, context)
            if not crs.isValid():
                crs = layer.crs()
            if not ext.isEmpty():
                geom = QgsGeometry.fromRect(ext)
        try:
            if layer_file_path(layer) is not None:
                self.raster_path, self.bounds, self.unreferenced = raster_source(layer, feedback)
                self.aoi = request_aoi(geom, crs, layer) if geom is not None else None
            else:  # rendered over the AOI's box: the whole rendered image is the AOI
                render_extent = clip_to_layer(geom, crs, layer).boundingBox() if geom is not None else None
                self.raster_path, self.bounds, self.unreferenced = raster_source(layer, feedback, render_extent)
                self.aoi = None
        except AoiError as exc:
            raise QgsProcessingException(str(exc)) from exc
        self.client = engine_client()
        self.settings = Settings.load()
        return True

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        question = self.parameterAsString(parameters, self.QUESTION, context)
        strategy = strategy_options()[self.parameterAsEnum(parameters, self.STRATEGY, context)]
        options = self.settings.request_options(
            strategy=strategy,
            budget=self.parameterAsInt(parameters, self.BUDGET, context) or None,
            max_new_tokens=self.parameterAsInt(parameters, self.MAX_NEW_TOKENS, context),
        )
        heat_dest = self.parameterAsFileOutput(parameters, self.HEATMAP, context)
        anchors_dest = self.parameterAsFileOutput(parameters, self.ANCHORS, context)
        try:
            result = ask_once(self.client, question, self.raster_path, self.aoi, options, feedback,
                              self.settings.results_dir(), self.bounds, self.unreferenced)
        except EngineError as exc:
            raise QgsProcessingException(str(exc)) from exc
        except OSError as exc:
            raise QgsProcessingException(f"Could not save the result files in {self.settings.results_dir()}: "
                                         f"{exc}. Choose another results folder in Settings > Options > GeoVQA.") from exc
        feedback.pushInfo(f"Answer: {result.get('answer', '')}")
        # the heatmap/anchors could not be kept (ask_once reported why): the answer is still the output
        out = {self.ANSWER: result.get("answer", "")}
        if heat_dest and result.get("local_heatmap_path"):
            shutil.copyfile(result["local_heatmap_path"], heat_dest)
            out[self.HEATMAP] = heat_dest
        if anchors_dest and result.get("local_anchors_path"):
            shutil.copyfile(result["local_anchors_path"], anchors_dest)
            out[self.ANCHORS] = anchors_dest
        # loaded by postProcessAlgorithm (main thread), marked as GeoVQA's result layers
        self.to_load = []
        for key, name in ((self.HEATMAP, heatmap_name), (self.ANCHORS, anchors_name)):
            if out.get(key):
                value = parameters.get(key)
                project = value.destinationProject if wants_loading(value) else None
                self.to_load.append((key, out[key], name(question, self.layer_name), project))
        return out

    def postProcessAlgorithm(self, context, feedback):  # noqa: N802 - main thread
        """The heatmap and anchors loaded into the project (the toolbox's "Open output file after
        running algorithm", or QGIS loading the files itself) are marked as GeoVQA's result layers,
        so the chat dock does not offer them as rasters to ask about, and named as the dock names
        them ("heatmap: <layer> — <question…>")."""
        for key, path, name, project in getattr(self, "to_load", ()):
            load_result_layer(context, path, "heatmap" if key == self.HEATMAP else "anchors", name, key, project)
        return {}
