"""Batch dialog: several questions over the selected raster layers, with progress, cancel,
a results table and CSV/JSON export. The answers run in one :class:`tasks.BatchTask`;
non-file layers are first rendered (current map extent) with :class:`render.LayerRenderer`.

Every answer is also appended, as it arrives, to an autosave file (JSON Lines) in the results
folder, named in the dialog, so a crash or closing QGIS mid-batch loses none. A layer removed
from the project mid-batch gives an error row for each of its questions not asked yet; the
batch goes on with the others."""

from __future__ import annotations

from functools import partial

from qgis.core import QgsApplication, QgsGeometry, QgsProject
from qgis.PyQt.QtCore import Qt, QTimer, pyqtSignal
from qgis.PyQt.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QDialog,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
)

from . import layers as result_layers
from .aoi import AoiError, clip_to_layer, is_unreferenced_file
from .compat import is_raster_layer
from .render import LayerRenderer, layer_file_path
from .results_io import write_csv, write_json
from .settings import Settings, make_client
from .tasks import BatchTask, file_stem, rect_bounds

USER_ROLE = Qt.ItemDataRole.UserRole
CHECKED = Qt.CheckState.Checked
UNCHECKED = Qt.CheckState.Unchecked
TABLE_COLUMNS = ("Layer", "Question", "Answer", "Kept tokens", "Seconds")


class BatchDialog(QDialog):
    """``batch_finished(list)`` fires with every result row when the batch ends or is cancelled."""

    batch_finished = pyqtSignal(object)

    def __init__(self, iface, parent=None):
        super().__init__(parent or iface.mainWindow())
        self.setWindowTitle("GeoVQA batch questions")
        self.iface = iface
        self.task = None
        self.rows = []
        self._renderers = []
        # Each Run gets a number; a render that finishes after its run was cancelled (or the
        # dialog shut down) belongs to an older number and is ignored.
        self._run_id = 0
        self._cancelled = False
        self._items, self._pending = [], []  # of the run: items prepared, layers still to prepare
        self._rendering = None  # (layer id, item, renderer) of the layer being rendered
        self.autosave_path = None
        self._build()
        self.refresh_layers()
        QgsProject.instance().layerWillBeRemoved.connect(self._layer_will_be_removed)

    def _build(self):
        v = QVBoxLayout(self)
        form = QFormLayout()
        self.layer_list = QListWidget()
        form.addRow("Raster layers", self.layer_list)
        self.questions_edit = QPlainTextEdit()
        self.questions_edit.setPlaceholderText("One question a line")
        form.addRow("Questions", self.questions_edit)
        self.layers_check = QCheckBox("Add heatmap and anchor layers for every answer")
        form.addRow(self.layers_check)
        v.addLayout(form)
        row = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.progress = QProgressBar()
        row.addWidget(self.run_button)
        row.addWidget(self.cancel_button)
        row.addWidget(self.progress, 1)
        v.addLayout(row)
        self.message = QLabel("")
        self.message.setWordWrap(True)
        v.addWidget(self.message)
        self.autosave_label = QLabel("")
        self.autosave_label.setWordWrap(True)
        self.autosave_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        v.addWidget(self.autosave_label)
        self.table = QTableWidget(0, len(TABLE_COLUMNS))
        self.table.setHorizontalHeaderLabels(list(TABLE_COLUMNS))
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        v.addWidget(self.table, 1)
        row2 = QHBoxLayout()
        self.csv_button = QPushButton("Export CSV…")
        self.csv_button.clicked.connect(lambda: self._export("csv"))
        self.json_button = QPushButton("Export JSON…")
        self.json_button.clicked.connect(lambda: self._export("json"))
        close = QPushButton("Close")
        close.clicked.connect(self.close)
        row2.addWidget(self.csv_button)
        row2.addWidget(self.json_button)
        row2.addStretch(1)
        row2.addWidget(close)
        v.addLayout(row2)
        self.resize(760, 560)

    def refresh_layers(self):
        self.layer_list.clear()
        try:
            selected = {lyr.id() for lyr in self.iface.layerTreeView().selectedLayers()}
        except Exception:  # noqa: BLE001 - no layer tree view (tests, other hosts)
            selected = set()
        for layer in QgsProject.instance().mapLayers().values():
            if not is_raster_layer(layer):
                continue
            item = QListWidgetItem(layer.name())
            item.setData(USER_ROLE, layer.id())
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(CHECKED if layer.id() in selected else UNCHECKED)
            self.layer_list.addItem(item)

    def set_checked_layers(self, layer_ids):
        for i in range(self.layer_list.count()):
            item = self.layer_list.item(i)
            item.setCheckState(CHECKED if item.data(USER_ROLE) in layer_ids else UNCHECKED)

    def checked_layers(self) -> list:
        out = []
        for i in range(self.layer_list.count()):
            item = self.layer_list.item(i)
            if item.checkState() == CHECKED:
                layer = QgsProject.instance().mapLayer(item.data(USER_ROLE))
                if layer is not None:
                    out.append(layer)
        return out

    def questions(self) -> list:
        return [q.strip() for q in self.questions_edit.toPlainText().splitlines() if q.strip()]

    # -- running ------------------------------------------------------------------------------
    def run(self):
        layers, questions = self.checked_layers(), self.questions()
        if not layers or not questions:
            self.message.setText("Tick at least one raster layer and type at least one question.")
            return
        if self.task is not None:  # still running (Run is disabled then; a script may call run())
            self.message.setText("A batch is still running: cancel it first.")
            return
        self._stop_renderers()
        self._run_id += 1
        self._cancelled = False
        self.rows = []
        self.table.setRowCount(0)
        self.progress.setValue(0)
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.settings = Settings.load()
        self._items, self._pending = [], list(layers)
        self._questions = questions
        self._next_item()

    def _next_item(self):
        if not self._pending:
            self._start_task()
            return
        layer = self._pending.pop(0)
        if isinstance(layer, dict):  # removed from the project before its turn: an error item
            self._items.append(layer)
            self._next_item()
            return
        path = layer_file_path(layer)
        item = {"layer": layer.name(), "layer_id": layer.id(), "raster_path": path, "aoi": None,
                "crs_wkt": layer.crs().toWkt(), "clip_bounds": rect_bounds(layer.extent()),
                "unreferenced": is_unreferenced_file(layer)}
        if path is not None:
            self._items.append(item)
            self._next_item()
            return
        canvas = self.iface.mapCanvas()
        try:  # web layers: what the map shows of them
            geom = clip_to_layer(QgsGeometry.fromRect(canvas.extent()), canvas.mapSettings().destinationCrs(), layer)
        except AoiError as exc:
            self._items.append(dict(item, error=f"{exc} Pan the map over it to ask about it."))
            self._next_item()
            return
        out = self.settings.results_dir() / "renders" / f"{file_stem(layer.name())}_render.tif"
        self.message.setText(f"Rendering {layer.name()} …")
        renderer = LayerRenderer(layer, geom.boundingBox(), str(out), self.settings.render_max_px, self)
        self._renderers.append(renderer)
        self._rendering = (layer.id(), item, renderer)
        run_id = self._run_id

        def done(p, err):
            if run_id != self._run_id:  # the run this render was for was cancelled
                return
            self._rendering = None
            if err:
                self.message.setText(err)
                self._items.append(dict(item, error=err))  # a row per question says so
            else:
                item["raster_path"] = p
                item["clip_bounds"] = rect_bounds(renderer.settings.visibleExtent())
                self._items.append(item)
            self._next_item()

        renderer.done.connect(done)
        renderer.start()

    def _start_task(self):
        self._renderers = []
        if not self._items:
            self._done()
            return
        self._drop_task()  # never leave an older task running unwatched
        results_dir = self.settings.results_dir()
        self.autosave_path = results_dir / f"{file_stem('batch answers')}.jsonl"
        self.task = BatchTask(make_client(self.settings), self._items, self._questions,
                              self.settings.request_options(), results_dir, autosave_path=self.autosave_path)
        for signal, slot in self._task_connections(self.task):
            signal.connect(slot)
        self.message.setText(f"Asking {self.task.total} questions …")
        self.autosave_label.setText(f"Each answer is saved as it arrives to {self.autosave_path}")
        QgsApplication.taskManager().addTask(self.task)

    def _task_connections(self, task):
        # bound methods, not lambdas: a lambda outlives the dialog's widgets (plugin reload)
        return ((task.row, self._add_row), (task.progressChanged, self._task_progress),
                (task.taskCompleted, self._done), (task.taskTerminated, self._done))

    def _task_progress(self, percent):
        self.progress.setValue(int(percent))

    def _drop_task(self):
        """Cancel the task and stop listening to it (nothing of it reaches the dialog again)."""
        task, self.task = self.task, None
        if task is None:
            return
        for signal, slot in self._task_connections(task):
            try:
                signal.disconnect(slot)
            except TypeError:
                pass
        task.cancel()

    def _stop_renderers(self):
        self._rendering = None
        for renderer in self._renderers:
            try:
                renderer.done.disconnect()
            except TypeError:
                pass
            renderer.cancel()
        self._renderers = []

    def cancel(self):
        self.cancel_button.setEnabled(False)
        self._cancelled = True
        self._run_id += 1  # late renders of this run are ignored
        self._stop_renderers()
        if self.task is not None:
            self.task.cancel()  # its rows so far stay; taskTerminated ends the run
        else:
            self._done()

    def shutdown(self):
        """Plugin unload: stop everything and let go of the task before the widgets go away."""
        try:
            QgsProject.instance().layerWillBeRemoved.disconnect(self._layer_will_be_removed)
        except TypeError:
            pass
        self._run_id += 1
        self._stop_renderers()
        self._drop_task()

    def _layer_will_be_removed(self, layer_id):
        """A layer leaves the project (removed, or the project closed): it leaves the list, and
        in a running batch each of its questions not asked yet becomes an error row."""
        for i in reversed(range(self.layer_list.count())):
            if self.layer_list.item(i).data(USER_ROLE) == layer_id:
                self.layer_list.takeItem(i)
        layer = QgsProject.instance().mapLayer(layer_id)
        name = layer.name() if layer is not None else layer_id
        reason = f"The layer '{name}' was removed from the project before GeoVQA asked about it."
        if self.task is not None:
            self.task.drop_layer(layer_id, reason)
            return
        for item in self._items:  # prepared, not asked yet: the task starts when all are
            if item.get("layer_id") == layer_id and not item.get("error"):
                item["error"] = reason
        error_item = {"layer": name, "layer_id": layer_id, "raster_path": None, "aoi": None, "error": reason}
        self._pending = [error_item if not isinstance(p, dict) and p.id() == layer_id else p for p in self._pending]
        if self._rendering is not None and self._rendering[0] == layer_id:
            _, item, renderer = self._rendering
            self._rendering = None
            renderer.cancel()  # nothing more of it arrives
            self._renderers.remove(renderer)
            self._items.append(dict(item, error=reason))
            # after the removal, not inside it: the next layer may be on its way out too (project closed)
            QTimer.singleShot(0, partial(self._resume, self._run_id))

    def _resume(self, run_id):
        if run_id == self._run_id:  # not cancelled (nor unloaded) meanwhile
            self._next_item()

    def _add_row(self, row: dict):
        self.rows.append(row)
        r = self.table.rowCount()
        self.table.insertRow(r)
        kept = (row.get("tokens") or {}).get("visual_kept", "")
        secs = (row.get("timings") or {}).get("total", "")
        values = (row["layer"], row["question"], row["answer"] if row.get("answer") is not None else f"ERROR: {row.get('error')}",
                  str(kept), f"{secs:.1f}" if isinstance(secs, (int, float)) else "")
        for c, val in enumerate(values):
            self.table.setItem(r, c, QTableWidgetItem(val))
        if row.get("answer") is not None and row.get("error"):
            self.message.setText(row["error"])  # an answer whose heatmap/anchors could not be saved
        if self.task is not None and self.task.autosave_error:
            self.autosave_label.setText(self.task.autosave_error)
        has_files = row.get("heatmap_path") or row.get("anchors_path")
        if self.layers_check.isChecked() and row.get("answer") is not None and has_files:
            layer = QgsProject.instance().mapLayer(row.get("layer_id") or "")
            if layer is None:  # result layers without their raster would only confuse
                self.message.setText(f"The layer '{row['layer']}' was removed from the project: its answer "
                                     "is kept without result layers.")
                return
            try:
                result_layers.add_result_layers(row["question"], row.get("heatmap_path"), row.get("anchors_path"),
                                                source_layer=layer, crs_wkt=row.get("crs_wkt"))
            except result_layers.ResultLayerError as exc:
                self.message.setText(str(exc))

    def _done(self, *_):
        errors = sum(1 for r in self.rows if r.get("error"))
        cancelled = self._cancelled or (self.task is not None and self.task.isCanceled())
        self.message.setText(f"{len(self.rows)} answers, {errors} errors" + (" (cancelled)" if cancelled else "") + ".")
        self.task = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.batch_finished.emit(list(self.rows))

    def export(self, path: str) -> str:
        return write_json(self.rows, path) if str(path).lower().endswith(".json") else write_csv(self.rows, path)

    def _export(self, kind):
        filt = "CSV (*.csv)" if kind == "csv" else "JSON (*.json)"
        path, _ = QFileDialog.getSaveFileName(self, "Export answers", f"geovqa_batch.{kind}", filt)
        if path:
            self.export(path)
