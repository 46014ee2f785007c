"""Processing algorithm "Batch questions": every question about every input raster, answers
written to a CSV (and optionally JSON) table. The CSV gets each row as its answer arrives, so
a cancel or a crash keeps the finished ones; the JSON is written at the end. For an engine on
another computer each raster is converted for the upload once for all its questions, as the
batch dialog's :class:`tasks.BatchTask` does (:func:`tasks.prepare_item_upload`)."""

from __future__ import annotations

from qgis.core import (
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingParameterEnum,
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
from .common import ask_once, engine_client, raster_source, strategy_options


class BatchQuestionsAlgorithm(QgsProcessingAlgorithm):
    LAYERS = "LAYERS"
    QUESTIONS = "QUESTIONS"
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

    def group(self):
        return "Question answering"

    def groupId(self):  # noqa: N802
        return "qa"

    def shortHelpString(self):  # noqa: N802
        return ("Asks every question (one a line) about every input raster with the GeoVQA engine and "
                "writes the answers, token counts, timings and heatmap/anchor paths to a CSV table "
                "(and optionally JSON). Failed answers are rows with an error, not a failed run. The CSV "
                "gets each row as its answer arrives, so a cancelled run keeps the answers it finished.")

    def createInstance(self):  # noqa: N802
        return BatchQuestionsAlgorithm()

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterMultipleLayers(self.LAYERS, "Raster layers", PROCESSING_RASTER))
        self.addParameter(QgsProcessingParameterString(self.QUESTIONS, "Questions (one a line)", multiLine=True))
        strategies = strategy_options()
        self.addParameter(QgsProcessingParameterEnum(self.STRATEGY, "Token strategy", options=strategies,
                                                     defaultValue=strategies.index(DEFAULT_STRATEGY)))
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

    def prepareAlgorithm(self, parameters, context, feedback):  # noqa: N802 - main thread
        layers = self.parameterAsLayerList(parameters, self.LAYERS, context)
        if not layers:
            raise QgsProcessingException("Choose at least one raster layer.")
        self.items = []
        for lyr in layers:
            path, bounds, unreferenced = raster_source(lyr, feedback)
            self.items.append({"layer": lyr.name(), "raster_path": path, "bounds": bounds,
                               "unreferenced": unreferenced})
        self.client = engine_client()
        self.settings = Settings.load()
        return True

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        questions = [q.strip() for q in self.parameterAsString(parameters, self.QUESTIONS, context).splitlines() if q.strip()]
        if not questions:
            raise QgsProcessingException("Type at least one question.")
        options = self.settings.request_options(
            strategy=strategy_options()[self.parameterAsEnum(parameters, self.STRATEGY, context)],
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
                upload, error = prepare_item_upload(self.client, item["raster_path"], None, feedback.isCanceled)
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
        if prepare_error:
            row["error"] = prepare_error
            feedback.reportError(f"{item['layer']} / {question}: {prepare_error}")
            return row
        try:
            res = ask_once(self.client, question, item["raster_path"], None, options, feedback,
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
