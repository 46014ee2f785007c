"""Batch dialog: several questions over the selected raster layers, with progress, cancel,
a results table and CSV/JSON export. The answers run in one :class:`tasks.BatchTask`;
non-file layers are first rendered (current map extent) with :class:`render.LayerRenderer`."""

from __future__ import annotations

from qgis.core import QgsApplication, QgsGeometry, QgsProject
from qgis.PyQt.QtCore import Qt, pyqtSignal
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
        self._build()
        self.refresh_layers()

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
        run_id = self._run_id

        def done(p, err):
            if run_id != self._run_id:  # the run this render was for was cancelled
                return
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
        self.task = BatchTask(make_client(self.settings), self._items, self._questions,
                              self.settings.request_options(), self.settings.results_dir())
        for signal, slot in self._task_connections(self.task):
            signal.connect(slot)
        self.message.setText(f"Asking {self.task.total} questions …")
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
        self._run_id += 1
        self._stop_renderers()
        self._drop_task()

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
        has_files = row.get("heatmap_path") or row.get("anchors_path")
        if self.layers_check.isChecked() and row.get("answer") is not None and has_files:
            layer = QgsProject.instance().mapLayer(row.get("layer_id") or "")
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
