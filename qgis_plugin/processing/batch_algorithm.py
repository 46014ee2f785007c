"""Processing algorithm "Batch questions": every question about every input raster, answers
written to a CSV (and optionally JSON) table. The CSV gets each row as its answer arrives, so
a cancel or a crash keeps the finished ones; the JSON is written at the end. For an engine on
another computer each raster is converted for the upload once for all its questions, as the
batch dialog's :class:`tasks.BatchTask` does (:func:`tasks.prepare_item_upload`). The optional
area of interest applies to every layer as "Ask a raster" applies its own
(:func:`common.question_source`); a layer it does not touch, or a world-wide web service with
no area of interest, gives that layer's rows an error and the batch goes on."""

from __future__ import annotations

from qgis.core import (
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterNumber,
    QgsProcessingParameterString,
    QgsProcessingUtils,
)

from ..client import EngineError
from ..compat import NUMBER_INTEGER, PROCESSING_RASTER
from ..results_io import CsvRows, write_json
from ..settings import DEFAULT_STRATEGY, Settings
from ..tasks import BatchProgress, prepare_item_upload
from .common import (
    aoi_refusal,
    area_of_interest,
    ask_once,
    engine_client,
    question_source,
    strategy_options,
    strategy_parameter_value,
    with_strategy_names,
)

# the help's second part: the area of interest (as "Ask a raster"'s) and the strategy
AREA_AND_STRATEGY_HELP = (
    "Area of interest: empty asks about each whole layer; else it applies to every layer, cut to each (a layer "
    "it does not touch gets an error in its rows, the others are asked); an extent with no area (zero width or "
    "height) is refused. Web and virtual layers are rendered to a GeoTIFF first, over the area of interest "
    "(never finer than a layer's own pixels, at most the render size of the GeoVQA options). A web service "
    "covering the whole world (XYZ or WMTS tiles) needs an area of interest (its rows get an error without "
    "one); one of a region, or a virtual raster, is rendered whole without one.\n\n"
    "Token strategy: its name (e.g. STRATEGY=pyramid in qgis_process) or its number in the list.")


class BatchQuestionsAlgorithm(QgsProcessingAlgorithm):
    LAYERS = "LAYERS"
    QUESTIONS = "QUESTIONS"
    AOI = "AOI"
    STRATEGY = "STRATEGY"
    BUDGET = "BUDGET"
    OUTPUT = "OUTPUT"
    OUTPUT_JSON = "OUTPUT_JSON"
    ANSWERED = "ANSWERED"
    ERRORS = "ERRORS"

    def name(self):
        return "batch_questions"

    def displayName(self):  # noqa: N802
        return "Batch questions"

    def shortDescription(self):  # noqa: N802
        return "Asks every question about every input raster with the GeoVQA engine: a table of the answers."

    def group(self):
        return "Question answering"

    def groupId(self):  # noqa: N802
        return "qa"

    def shortHelpString(self):  # noqa: N802
        return f"{self.answers_help()}\n\n{AREA_AND_STRATEGY_HELP}"

    def answers_help(self):
        """The help's first part: what is asked and where the answers go."""
        return ("Asks every question (one a line) about every input raster with the GeoVQA engine and "
                "writes the answers, token counts, timings and heatmap/anchor paths to a CSV table "
                "(and optionally JSON). Failed answers are rows with an error, not a failed run. The CSV "
                "gets each row as its answer arrives, so a cancelled run keeps the answers it finished.")

    def createInstance(self):  # noqa: N802
        return BatchQuestionsAlgorithm()

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterMultipleLayers(self.LAYERS, "Raster layers", PROCESSING_RASTER))
        self.addParameter(QgsProcessingParameterString(self.QUESTIONS, "Questions (one a line)", multiLine=True))
        self.addParameter(QgsProcessingParameterExtent(self.AOI, "Area of interest (empty: each whole layer)",
                                                       optional=True))
        # the strategies' names are the values, as "Ask a raster"'s (a number is still taken)
        strategy = QgsProcessingParameterEnum(self.STRATEGY, "Token strategy", options=strategy_options(),
                                              defaultValue=DEFAULT_STRATEGY)
        strategy.setUsesStaticStrings(True)
        self.addParameter(strategy)
        self.addParameter(QgsProcessingParameterNumber(self.BUDGET, "Token budget (0: engine default)", NUMBER_INTEGER,
                                                       defaultValue=0, minValue=0))
        # a temporary CSV by default, so `qgis_process run geovqa:batch_questions` needs no OUTPUT
        self.addParameter(QgsProcessingParameterFileDestination(self.OUTPUT, "Answers (CSV)", "CSV (*.csv)",
                                                                defaultValue=QgsProcessing.TEMPORARY_OUTPUT,
                                                                optional=True))
        self.addParameter(QgsProcessingParameterFileDestination(self.OUTPUT_JSON, "Answers (JSON)", "JSON (*.json)",
                                                                optional=True, createByDefault=False))
        self.addOutput(QgsProcessingOutputNumber(self.ANSWERED, "Answers"))
        self.addOutput(QgsProcessingOutputNumber(self.ERRORS, "Errors"))

    def checkParameterValues(self, parameters, context):  # noqa: N802
        # a strategy given by its number in the list (models and scripts saved before it took names)
        ok, message = super().checkParameterValues(with_strategy_names(parameters, self.STRATEGY), context)
        refusal = aoi_refusal(self, parameters, self.AOI, context) if ok else None
        return (False, refusal) if refusal else (ok, message)

    def prepareAlgorithm(self, parameters, context, feedback):  # noqa: N802 - main thread
        layers = self.parameterAsLayerList(parameters, self.LAYERS, context)
        if not layers:
            raise QgsProcessingException("Choose at least one raster layer.")
        self.strategy = strategy_parameter_value(self, parameters, self.STRATEGY, context)
        geom, crs = area_of_interest(self, parameters, self.AOI, context)  # (None, None): each whole layer
        self.items = []
        for lyr in layers:
            item = {"layer": lyr.name(), "raster_path": None, "bounds": None, "unreferenced": False, "aoi": None,
                    "error": None}
            try:  # as "Ask a raster" does: a file with the AOI cut to it, any other layer rendered over it
                item.update(question_source(lyr, geom, crs, feedback))
            except QgsProcessingException as exc:  # this layer's rows say why; the others are asked
                item["error"] = str(exc)
            self.items.append(item)
        self.client = engine_client()
        self.settings = Settings.load()
        return True

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        questions = [q.strip() for q in self.parameterAsString(parameters, self.QUESTIONS, context).splitlines() if q.strip()]
        if not questions:
            raise QgsProcessingException("Type at least one question.")
        options = self.settings.request_options(
            strategy=self.strategy,
            budget=self.parameterAsInt(parameters, self.BUDGET, context) or None,
        )
        total = len(self.items) * len(questions)
        csv_path = (self.parameterAsFileOutput(parameters, self.OUTPUT, context)
                    or QgsProcessingUtils.generateTempFilename("answers.csv"))  # the answers are always kept
        try:
            table = CsvRows(csv_path)  # before the first question, not after the last one
        except OSError as exc:
            raise QgsProcessingException(f"Could not write the answers table {csv_path}: {exc}") from exc
        rows = []
        progress = BatchProgress(total, feedback.setProgress)  # as the batch dialog's BatchTask counts it
        with table:
            for item in self.items:
                if feedback.isCanceled():
                    break
                # an engine on another computer: the raster is converted once for all its questions
                upload, error = prepare_item_upload(self.client, item["raster_path"], item["aoi"], feedback.isCanceled)
                try:
                    for question in questions:
                        if feedback.isCanceled():
                            break
                        progress.start(len(rows), upload is not None and not error)
                        rows.append(self._ask(item, question, options, feedback, len(rows), upload, error, progress))
                        try:
                            table.write(rows[-1])
                        except OSError as exc:
                            raise QgsProcessingException(
                                f"Could not write the answers table {csv_path}: {exc}. It holds the answers "
                                "before this one.") from exc
                        progress.done(len(rows))
                finally:
                    if upload is not None:
                        upload.cleanup()  # its temporary copy, also on cancel or failure
        out = {self.OUTPUT: csv_path, self.ANSWERED: sum(1 for r in rows if r["answer"] is not None),
               self.ERRORS: sum(1 for r in rows if r["error"])}
        json_path = self.parameterAsFileOutput(parameters, self.OUTPUT_JSON, context)
        if json_path:
            out[self.OUTPUT_JSON] = write_json(rows, json_path)
        return out

    def _ask(self, item, question, options, feedback, index, upload=None, prepare_error=None, progress=None) -> dict:
        """One row of the table: the answer, or the error that replaced it (``upload``,
        ``prepare_error``: :func:`tasks.prepare_item_upload` for the item; ``progress``: the
        batch's :class:`tasks.BatchProgress`)."""
        row = {"index": index, "layer": item["layer"], "raster_path": item["raster_path"],
               "question": question, "answer": None, "error": None, "heatmap_path": None,
               "anchors_path": None, "tokens": {}, "timings": {}, "strategy": options["strategy"]}
        prepare_error = item["error"] or prepare_error  # the layer could not be prepared (area, render)
        if prepare_error:
            row["error"] = prepare_error
            feedback.reportError(f"{item['layer']} / {question}: {prepare_error}")
            return row
        try:
            res = ask_once(self.client, question, item["raster_path"], item["aoi"], options, feedback,
                           self.settings.results_dir(), item["bounds"], item["unreferenced"], prepared=upload,
                           progress=progress)
            row.update(answer=res.get("answer", ""), tokens=res.get("tokens") or {},
                       timings=res.get("timings") or {}, heatmap_path=res.get("local_heatmap_path"),
                       anchors_path=res.get("local_anchors_path"),
                       error=res.get("files_warning") or None)  # answer kept, files missing
        except (EngineError, QgsProcessingException) as exc:
            row["error"] = str(exc)
            feedback.reportError(f"{item['layer']} / {question}: {exc}")
        except OSError as exc:  # the results folder: this answer's files could not be kept
            row["error"] = f"Could not save the result files in {self.settings.results_dir()}: {exc}"
            feedback.reportError(f"{item['layer']} / {question}: {row['error']}")
        return row
