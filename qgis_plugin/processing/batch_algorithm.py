"""Processing algorithm "Batch questions": every question about every input raster, answers
written to a CSV (and optionally JSON) table. The CSV gets each row as its answer arrives, so
a cancel or a crash keeps the finished ones; the JSON is written at the end. For an engine on
another computer each raster is converted for the upload once for all its questions, as the
batch dialog's :class:`tasks.BatchTask` does (:func:`tasks.prepare_item_upload`). The optional
area of interest applies to every layer as "Ask a raster" applies its own
(:func:`common.question_source`); a layer it does not touch, or a world-wide web service with
no area of interest, gives that layer's rows an error and the batch goes on."""

from __future__ import annotations

import contextlib
import os

from qgis.core import (
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterNumber,
    QgsProcessingParameterString,
    QgsProcessingUtils,
)

from ..compat import NUMBER_INTEGER, PROCESSING_RASTER
from ..engine_errors import EngineError
from ..results_io import CANCELLED, CsvRows, is_cancelled, is_failure, write_json
from ..settings import Settings
from ..tasks import BatchProgress, prepare_item_upload
from .common import (
    aoi_refusal,
    area_of_interest,
    ask_once,
    calls_stopped_by,
    discard_render,
    engine_client,
    question_source,
    questions_refusal,
    render_source,
    say_preparing,
    strategy_parameter,
    strategy_parameter_value,
    with_strategy_names,
)

# the help's second part: the area of interest (as "Ask a raster"'s) and the strategy
AREA_AND_STRATEGY_HELP = (
    "Area of interest: empty asks about each whole layer; else it applies to every layer, cut to each (a layer "
    "it does not touch gets an error in its rows, the others are asked); an extent with no area (zero width or "
    "height) is refused. Web and virtual layers are rendered to a GeoTIFF first, over the area of interest "
    "(never finer than a layer's own pixels, or the finer side of non-square ones; at most the render "
    "size of the GeoVQA options). A web service "
    "covering the whole world (XYZ or WMTS tiles) needs an area of interest (its rows get an error without "
    "one); one of a region, or a virtual raster, is rendered whole without one.\n\n"
    "Token strategy: its name (e.g. STRATEGY=pyramid in qgis_process) or its number in the list. "
    "The last, engine (Engine's default), sends none: the engine uses its adapter's training "
    "settings, else its own default (geollava).")


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
                "writes the answers, the strategy, the bands the model saw, token counts, timings and "
                "heatmap/anchor paths to a CSV table "
                "(and optionally JSON, UTF-8). Failed answers are rows with an error, not a failed run (an answer "
                "that broke off keeps the words that came in the incomplete_answer column; a question "
                "stopped by Cancel before its answer came is a row with the error \"cancelled\", counted as "
                "neither an answer nor an error). The CSV "
                "gets each row as its answer arrives, so a cancelled run keeps the answers it finished; the log "
                "says where the files are before the first question, and again when the run is cancelled or "
                "fails. Answers left as temporary files are written to new files "
                "(answers_<date>_<time>.csv / .json) in the GeoVQA results folder (Settings > Options > "
                "GeoVQA), which last after the run, also with qgis_process; their paths are the outputs.")

    def createInstance(self):  # noqa: N802
        return BatchQuestionsAlgorithm()

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterMultipleLayers(self.LAYERS, "Raster layers", PROCESSING_RASTER))
        self.addParameter(QgsProcessingParameterString(self.QUESTIONS, "Questions (one a line)", multiLine=True))
        self.addParameter(QgsProcessingParameterExtent(self.AOI, "Area of interest (empty: each whole layer)",
                                                       optional=True))
        self.addParameter(strategy_parameter(self.STRATEGY))
        self.addParameter(QgsProcessingParameterNumber(self.BUDGET, "Token budget (0: engine default)", NUMBER_INTEGER,
                                                       defaultValue=0, minValue=0))
        # a temporary CSV by default, so `qgis_process run geovqa:batch_questions` needs no OUTPUT;
        # temporary answers go to a new file in the results folder (qgis_process deletes its
        # temporary folder when it exits), see _answer_files
        where = ("Left as a temporary file, the answers are written to a new file, answers_<date>_<time>{}, in the "
                 "GeoVQA results folder (Settings > Options > GeoVQA), which is kept after the run, also after "
                 "qgis_process exits.")
        p = QgsProcessingParameterFileDestination(self.OUTPUT, "Answers (CSV; temporary: in the results folder)",
                                                  "CSV (*.csv)", defaultValue=QgsProcessing.TEMPORARY_OUTPUT,
                                                  optional=True)
        p.setHelp(where.format(".csv") + " The rows are written as the answers arrive.")
        self.addParameter(p)
        p = QgsProcessingParameterFileDestination(self.OUTPUT_JSON, "Answers (JSON; temporary: in the results folder)",
                                                  "JSON (*.json)", optional=True, createByDefault=False)
        p.setHelp(where.format(".json") + " Written when the run ends (UTF-8).")
        self.addParameter(p)
        self.addOutput(QgsProcessingOutputNumber(self.ANSWERED, "Answers"))
        self.addOutput(QgsProcessingOutputNumber(self.ERRORS, "Errors"))

    def checkParameterValues(self, parameters, context):  # noqa: N802
        # a strategy given by its number in the list (models and scripts saved before it took names)
        ok, message = super().checkParameterValues(with_strategy_names(parameters, self.STRATEGY), context)
        refusal = (aoi_refusal(self, parameters, self.AOI, context)
                   or questions_refusal(self.parameterAsString(parameters, self.QUESTIONS, context))) if ok else None
        return (False, refusal) if refusal else (ok, message)

    def _questions(self, parameters, context) -> list:
        """The questions, one a line, blank lines left out."""
        return [q.strip() for q in self.parameterAsString(parameters, self.QUESTIONS, context).splitlines() if q.strip()]

    def prepareAlgorithm(self, parameters, context, feedback):  # noqa: N802 - main thread
        layers = self.parameterAsLayerList(parameters, self.LAYERS, context)
        if not layers:
            raise QgsProcessingException("Choose at least one raster layer.")
        # qgis_process may not check first
        refusal = questions_refusal(self.parameterAsString(parameters, self.QUESTIONS, context))
        if refusal:
            raise QgsProcessingException(refusal)
        self.strategy = strategy_parameter_value(self, parameters, self.STRATEGY, context)
        geom, crs = area_of_interest(self, parameters, self.AOI, context)  # (None, None): each whole layer
        self.items = []
        for lyr in layers:
            item = {"layer": lyr.name(), "raster_path": None, "bounds": None, "unreferenced": False, "aoi": None,
                    "bands": None, "rendered": False, "render": None, "error": None}
            try:  # as "Ask a raster" does: a file with the AOI cut to it, any other layer rendered over it
                # (in processAlgorithm, in the task's thread: the item keeps its render, with its clone
                # of the layer, until then)
                item.update(question_source(lyr, geom, crs, feedback))
            except QgsProcessingException as exc:  # this layer's rows say why; the others are asked
                item["error"] = str(exc)
            self.items.append(item)
        self.client = engine_client()
        self.settings = Settings.load()
        return True

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        questions = self._questions(parameters, context)
        if not questions:
            raise QgsProcessingException("Type at least one question.")
        options = self.settings.request_options(
            strategy=self.strategy,
            budget=self.parameterAsInt(parameters, self.BUDGET, context) or None,
        )
        total = len(self.items) * len(questions)
        csv_path, json_path = self._answer_files(parameters, context, feedback)
        try:
            table = CsvRows(csv_path)  # before the first question, not after the last one
        except OSError as exc:
            raise QgsProcessingException(f"Could not write the answers table {csv_path}: {exc}") from exc
        # said before the first question: a cancelled or failed run (which the toolbox reports as
        # "Execution failed", without its outputs) keeps the answers it finished there
        feedback.pushInfo(f"The answers are written to {csv_path} as they arrive"
                          + (f", and to {json_path} at the end." if json_path else "."))
        rows = []
        progress = BatchProgress(total, feedback.setProgress)  # as the batch dialog's BatchTask counts it
        try:
            # Cancel also ends a /health call under way (the protocol check, the upload limit)
            with table, self._said_on_failure(feedback, rows, csv_path, json_path), \
                    calls_stopped_by(feedback, self.client):
                for item in self.items:
                    if feedback.isCanceled():
                        break
                    self._answer_item(item, questions, options, feedback, rows, table, csv_path, progress)
        finally:
            # a render no answer came from (its questions failed, or were cancelled or never
            # asked) is nothing anyone will look at: it goes, as a failed "Ask a raster" run's does
            sent = {row["raster_path"] for row in rows if row["answer"] is not None}
            for item in self.items:
                if item["raster_path"] not in sent:
                    discard_render(item)
        out = {self.OUTPUT: csv_path, self.ANSWERED: sum(1 for r in rows if r["answer"] is not None),
               # failed questions, as the batch dialog counts them: not a cancel, nor an answer kept
               # without its heatmap/anchors (its error column says what is missing)
               self.ERRORS: sum(1 for r in rows if is_failure(r))}
        if json_path:
            try:
                out[self.OUTPUT_JSON] = write_json(rows, json_path)
            except (OSError, ValueError) as exc:
                raise QgsProcessingException(f"Could not write the answers {json_path}: {exc}. They are all in "
                                             f"{csv_path}.") from exc
        if feedback.isCanceled():
            finished = sum(1 for r in rows if not is_cancelled(r))
            feedback.pushInfo(f"Cancelled after {self._count(finished)} of {total}: the answers so far are in "
                              + " and ".join(p for p in (csv_path, json_path) if p) + ".")
        return out

    def _answer_item(self, item, questions, options, feedback, rows, table, csv_path, progress) -> None:
        """Ask ``item`` (rendered first when it is not a file) every question, each row appended
        to ``rows`` and written to ``table`` as it comes; Cancel ends it between steps."""
        if not item["error"]:
            try:  # a non-file layer: rendered now, off the main thread (Cancel stops it)
                render_source(item, feedback, self.client)
            except QgsProcessingException as exc:  # this layer's rows say why
                item["error"] = str(exc)
            if feedback.isCanceled():
                return
        # an engine on another computer: the raster is converted once for all its questions
        upload, error = prepare_item_upload(self.client, item["raster_path"], item["aoi"], feedback.isCanceled,
                                            say_preparing(feedback, item["layer"]))
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

    @contextlib.contextmanager
    def _said_on_failure(self, feedback, rows, csv_path, json_path):
        """A run that fails (the toolbox then shows no outputs) says where the answers so far are;
        the JSON, written at the end otherwise, gets them too."""
        try:
            yield
        except BaseException:
            kept = [csv_path]
            if json_path:
                try:
                    kept.append(write_json(rows, json_path))
                except (OSError, ValueError):
                    pass
            feedback.pushInfo(f"The run failed after {self._count(len(rows))}: the answers so far are in "
                              + " and ".join(kept) + ".")
            raise

    @staticmethod
    def _count(n: int) -> str:
        return f"{n} answer{'' if n == 1 else 's'}"

    def _answer_files(self, parameters, context, feedback) -> tuple:
        """(CSV path, JSON path or None) of the answers. A temporary output (the default
        TEMPORARY_OUTPUT, or no value) would be in QGIS's temporary folder, which qgis_process
        deletes when it exits: those answers go to new files in the results folder instead
        (``answers_<date>_<time>.csv`` / ``.json``, never one already there), and those paths are
        the outputs. When the results folder cannot be written, the temporary files are kept and
        the log says that they do not last."""
        from ..results_io import new_answers_files

        csv_path = self.parameterAsFileOutput(parameters, self.OUTPUT, context)
        json_path = self.parameterAsFileOutput(parameters, self.OUTPUT_JSON, context) or None
        # TEMPORARY_OUTPUT is a new file in QgsProcessingUtils.tempFolder(), however it is given
        # (a string, the toolbox's output definition, a model's child output)
        temp = os.path.realpath(QgsProcessingUtils.tempFolder())
        temporary = [ext for ext, path in ((".csv", csv_path), (".json", json_path))
                     if path is not None and (not path or os.path.realpath(path).startswith(temp + os.sep))]
        if not temporary:
            return csv_path, json_path
        folder = self.settings.results_dir()
        try:
            lasting = dict(zip(temporary, new_answers_files(folder, temporary)))
        except OSError as exc:
            feedback.reportError(f"The answers cannot be saved in the results folder {folder}: {exc}. They go "
                                 "to temporary files, deleted when QGIS (or qgis_process) exits: choose the "
                                 "output files, or another results folder in Settings > Options > GeoVQA.")
            return (csv_path or QgsProcessingUtils.generateTempFilename("answers.csv")), json_path
        return lasting.get(".csv", csv_path), lasting.get(".json", json_path)

    def _ask(self, item, question, options, feedback, index, upload=None, prepare_error=None, progress=None) -> dict:
        """One row of the table: the answer, or the error that replaced it (``upload``,
        ``prepare_error``: :func:`tasks.prepare_item_upload` for the item; ``progress``: the
        batch's :class:`tasks.BatchProgress`)."""
        row = {"index": index, "layer": item["layer"], "raster_path": item["raster_path"],
               "question": question, "answer": None, "error": None, "heatmap_path": None,
               "anchors_path": None, "tokens": {}, "timings": {}, "strategy": options["strategy"],
               "bands": None, "palette": None, "rendered": False, "incomplete_answer": None}
        prepare_error = item["error"] or prepare_error  # the layer could not be prepared (area, render)
        if prepare_error:
            row["error"] = prepare_error
            feedback.reportError(f"{item['layer']} / {question}: {prepare_error}")
            return row
        try:
            res = ask_once(self.client, question, item["raster_path"], item["aoi"], options, feedback,
                           self.settings.results_dir(), item["bounds"], item["unreferenced"], prepared=upload,
                           progress=progress, bands=item["bands"])
            row.update(answer=res.get("answer", ""), tokens=res.get("tokens") or {},
                       bands=res.get("bands"), palette=res.get("palette"),  # what the model saw
                       rendered=item["rendered"],  # those bands are the render's
                       timings=res.get("timings") or {}, heatmap_path=res.get("local_heatmap_path"),
                       anchors_path=res.get("local_anchors_path"),
                       error=res.get("files_warning") or None)  # answer kept, files missing
        except (EngineError, QgsProcessingException) as exc:
            if feedback.isCanceled():  # stopped by Cancel while it was answered: said, no error
                row["error"] = CANCELLED
                # the words that came, as the batch dialog keeps them
                row["incomplete_answer"] = getattr(exc, "partial_answer", None)
                feedback.pushInfo(f"{item['layer']} / {question}: cancelled before its answer came.")
                return row
            row["error"] = str(exc)
            row["incomplete_answer"] = getattr(exc, "partial_answer", None)  # the words that came
            feedback.reportError(f"{item['layer']} / {question}: {exc}")
        except OSError as exc:  # the results folder: this answer's files could not be kept
            row["error"] = f"Could not save the result files in {self.settings.results_dir()}: {exc}"
            feedback.reportError(f"{item['layer']} / {question}: {row['error']}")
        return row
