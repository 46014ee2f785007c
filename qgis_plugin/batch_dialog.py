"""Batch dialog: several questions over the selected raster layers, with progress, cancel,
a results table and CSV/JSON export. The answers run in one :class:`tasks.BatchTask`;
non-file layers are first rendered (current map extent) with :class:`render.LayerRenderer`.

Every answer is also appended, as it arrives, to an autosave file (JSON Lines) in the results
folder, named in the dialog, so a crash or closing QGIS mid-batch loses none. A layer removed
from the project mid-batch gives an error row for each of its questions not asked yet; the
batch goes on with the others.

Inputs and results share a vertical splitter (the table gets most of the height); a cell's tooltip
is its full text (an error longer than MAX_SHOWN_CHARS, an engine's message of megabytes, cut; whole
in QGIS's log, the autosave file and the exports) and a double-click, or Enter, shows the whole row. An answer whose heatmap or
anchors could not be saved has a warning icon, the reason in its tooltip and row, and is counted at the end. While a batch runs, the inputs and Export
are disabled (the answers so far are in the autosave file; Export once the batch ends or is
cancelled), and the message counts the questions asked.

Keyboard: Enter presses a push button only when that button has the focus (the dialog has no
default button: Enter on a result row opens the row, it never runs the batch again); Tab leaves
the Questions box. Closing the dialog (Escape, Close, the window's x) while a batch runs says on
QGIS's message bar that the batch goes on."""

from __future__ import annotations

from functools import partial

from qgis.core import QgsApplication, QgsGeometry, QgsMessageLog, QgsProject
from qgis.PyQt.QtCore import Qt, QTimer, QUrl, pyqtSignal
from qgis.PyQt.QtGui import QDesktopServices
from qgis.PyQt.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from . import layers as result_layers
from .aoi import AoiError, check_placed_on_map, clip_to_layer, is_unreferenced_file
from .bands import RENDER_BANDS, bands_cell, layer_bands
from .client import health_read_budget
from .compat import MSG_CRITICAL, MSG_INFO, MSG_WARNING, is_raster_layer
from .engine_errors import MAX_SHOWN_CHARS, shown_text
from .engine_protocol import questions_too_long
from .paths import export_path
from .project_results import gather_into_project, moved_files, moved_path
from .render import LayerRenderer, layer_file_path, render_file
from .results_io import files_note, is_cancelled, is_failure, write_csv, write_json
from .settings import Settings, make_client
from .tasks import BatchTask, file_stem, rect_bounds

USER_ROLE = Qt.ItemDataRole.UserRole
CHECKED = Qt.CheckState.Checked
UNCHECKED = Qt.CheckState.Unchecked
TABLE_COLUMNS = ("Layer", "Question", "Answer", "Kept tokens", "Seconds", "Bands")
ANSWER_COLUMN = TABLE_COLUMNS.index("Answer")
# the table's header texts where the column's name is wider than its numbers need
HEADER_TEXTS = {"Kept tokens": "Kept\ntokens"}
WARNING_ICON = "/mIconWarning.svg"  # QGIS's own: the answer cell of an answer without its result layers
EXPORT_KINDS = ("csv", "json")  # the ending of the file decides the format written (export)
ENTER_KEYS = (Qt.Key.Key_Return, Qt.Key.Key_Enter)
ROW_TIP = "Double-click a row, or press Enter on it, to read all of it"
# said on QGIS's message bar when the dialog is closed while its batch runs, and when that batch ends
FINISHED_WHILE_HIDDEN = "Reopen Batch questions… to read and export the answers."
GOES_ON_IN_BACKGROUND = ("The batch goes on in the background (its progress is in QGIS's task bar); "
                         "reopen Batch questions… to see its answers.")
EXPORT_RUNNING_TIP = ("Export is available when the batch ends (or is cancelled); meanwhile every answer "
                      "so far is already in the autosave file named above.")


def export_failure(exc: Exception, path: str) -> str:
    """Why an export failed, in words: the system's reason, with the path it is about when that is
    not the export's file (a file where its folder should be: "File exists (…/a-file)")."""
    why = getattr(exc, "strerror", None) or str(exc)
    where = getattr(exc, "filename", None)
    return f"{why} ({where})" if where and str(where) != str(path) else why


def answer_cell(row: dict) -> str:
    """The Answer column's text: the answer, "Cancelled" for a question Cancel stopped, else the
    error that replaced the answer, after the words that came of an answer that broke off. An
    error longer than MAX_SHOWN_CHARS (an engine's message of megabytes) is cut
    (:func:`engine_errors.shown_text`; :func:`log_long_error` logs it whole, the exports keep it)."""
    if row.get("answer") is not None:
        return row["answer"]
    if is_cancelled(row):
        return "Cancelled"
    partial = row.get("incomplete_answer")
    return (f"(incomplete) {partial} — " if partial else "") + f"ERROR: {shown_text(row.get('error'))}"


def log_long_error(row: dict) -> None:
    """The whole error of ``row`` in QGIS's log when the table shows it cut (longer than
    MAX_SHOWN_CHARS), as the chat dock logs an engine's error of megabytes: the cut says so."""
    error = row.get("error")
    if isinstance(error, str) and len(error) > MAX_SHOWN_CHARS:
        QgsMessageLog.logMessage(f"Batch question '{row.get('question', '')}' about '{row.get('layer', '')}': "
                                 f"{error}", "GeoVQA", MSG_CRITICAL if row.get("answer") is None else MSG_WARNING)


class BatchDialog(QDialog):
    """``batch_finished(list)`` fires with every result row when the batch ends or is cancelled.

    ``engine_health``: gives the engine's last ``/health`` answer (the chat dock's status check)
    or None; a render is made no larger than the engine reads (its ``max_read_pixels``)."""

    batch_finished = pyqtSignal(object)

    def __init__(self, iface, parent=None, engine_health=None):
        super().__init__(parent or iface.mainWindow())
        self.engine_health = engine_health or (lambda: None)
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
        self._total = 0  # questions of the run (layers x questions)
        self.row_viewer = None  # the dialog a double-click on a row opens
        self._end_text = ""  # what the message said when the last run ended (an export adds to it)
        self._row_viewer_text = None
        self._running = False  # a batch runs (renders or answers), not cancelled
        self._shut_down = False
        self._watched = {}  # layer id -> (layer, [(signal, slot)]): a rename or result mark refreshes the list
        self._build()
        project = QgsProject.instance()
        # the list follows the project while the dialog is open: layers added (also by a project
        # read), renamed, marked as GeoVQA results, removed (also by a project closed)
        self._project_signals = ((project.layerWillBeRemoved, self._layer_will_be_removed),
                                 (project.layersAdded, self._layers_added),
                                 # result files copied into the project's folder on a Save As
                                 (moved_files.moved, self._follow_moved_files))
        for signal, slot in self._project_signals:
            signal.connect(slot)
        self._watch(project.mapLayers().values())
        self.refresh_layers()

    def _build(self):
        v = QVBoxLayout(self)
        # inputs above, run controls and results below, in a splitter: the table gets the height
        self.splitter = QSplitter(Qt.Orientation.Vertical)
        self.splitter.setChildrenCollapsible(False)
        inputs = QWidget()
        form = QFormLayout(inputs)
        form.setContentsMargins(0, 0, 0, 0)
        self.layer_list = QListWidget()
        form.addRow("Raster layers", self.layer_list)
        self.questions_edit = QPlainTextEdit()
        self.questions_edit.setPlaceholderText("One question a line")
        self.questions_edit.setTabChangesFocus(True)  # Tab moves on, as in the other fields
        form.addRow("Questions", self.questions_edit)
        self.layers_check = QCheckBox("Add heatmap and anchor layers for every answer")
        form.addRow(self.layers_check)
        self.splitter.addWidget(inputs)
        results = QWidget()
        rv = QVBoxLayout(results)
        rv.setContentsMargins(0, 0, 0, 0)
        row = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.progress = QProgressBar()
        self.progress.setAccessibleName("Batch progress")
        row.addWidget(self.run_button)
        row.addWidget(self.cancel_button)
        row.addWidget(self.progress, 1)
        rv.addLayout(row)
        self.message = QLabel("")
        self.message.setWordWrap(True)
        rv.addWidget(self.message)
        autosave_row = QHBoxLayout()
        self.autosave_label = QLabel("")
        self.autosave_label.setWordWrap(True)
        self.autosave_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        autosave_row.addWidget(self.autosave_label, 1)
        self.open_folder_button = QPushButton("Open folder")
        self.open_folder_button.setToolTip("Open the folder of the autosave file")
        self.open_folder_button.clicked.connect(self.open_autosave_folder)
        self.open_folder_button.setVisible(False)
        autosave_row.addWidget(self.open_folder_button)
        rv.addLayout(autosave_row)
        self.table = QTableWidget(0, len(TABLE_COLUMNS))
        self.table.setHorizontalHeaderLabels([HEADER_TEXTS.get(name, name) for name in TABLE_COLUMNS])
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setWordWrap(False)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(ANSWER_COLUMN, QHeaderView.ResizeMode.Stretch)
        for c in range(ANSWER_COLUMN + 1, len(TABLE_COLUMNS)):  # short numbers: as wide as they need,
            header.setSectionResizeMode(c, QHeaderView.ResizeMode.ResizeToContents)  # the Answer the rest
        header.setMinimumSectionSize(64)  # a narrow dialog keeps a few words of the Answer (it scrolls)
        self.table.setColumnWidth(0, 120)
        self.table.setColumnWidth(1, 170)
        # at the dialog's smallest size the table still shows a few rows (the splitter gave it none)
        self.table.setMinimumHeight(header.sizeHint().height() + 2 * self.table.frameWidth()
                                    + 3 * self.table.verticalHeader().defaultSectionSize())
        self.table.setAccessibleName("Batch results")
        self.table.setToolTip(ROW_TIP)
        # a double-click, Enter, or (styles that activate on one) a click
        self.table.activated.connect(lambda index: self.show_row(index.row()))
        rv.addWidget(self.table, 1)
        self.splitter.addWidget(results)
        self.splitter.setStretchFactor(0, 0)
        self.splitter.setStretchFactor(1, 1)
        self.splitter.setSizes([190, 330])
        v.addWidget(self.splitter, 1)
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
        for button in self.findChildren(QPushButton):  # no default button: see keyPressEvent
            button.setAutoDefault(False)
            button.setDefault(False)
        self.resize(760, 560)

    def keyPressEvent(self, event):  # noqa: N802
        """Enter presses the push button that has the focus, as Space does; elsewhere (a result
        row, the layer list) it presses none. A QDialog gives such an Enter to its default
        button, which was Run: the results were cleared and the batch ran again."""
        if event.key() in ENTER_KEYS:
            focused = self.focusWidget()
            if isinstance(focused, QPushButton) and focused.isEnabled():
                focused.click()
            event.accept()
            return
        super().keyPressEvent(event)

    def reject(self):
        """Escape, Close or the window's x hide the dialog; a batch running goes on, and the
        message bar says so (the dialog was gone with no sign of it)."""
        if self._running and not self._shut_down and self.isVisible():
            try:
                self.iface.messageBar().pushMessage("GeoVQA", GOES_ON_IN_BACKGROUND, level=MSG_INFO, duration=8)
            except Exception:  # noqa: BLE001 - never let a message bar problem keep the dialog open
                pass
        super().reject()

    def _set_running(self, running: bool):
        """Inputs and Export are off while a batch runs (they would change nothing of it)."""
        for w in (self.layer_list, self.questions_edit, self.layers_check, self.csv_button, self.json_button):
            w.setEnabled(not running)
        for w in (self.csv_button, self.json_button):
            w.setToolTip(EXPORT_RUNNING_TIP if running else "")
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        self._running = running

    def row_text(self, r: int) -> str:
        """Row ``r`` of the table in full: every column's name and text, and why an answer has no
        result layers (which only the exports' error column held)."""
        parts = []
        for c, name in enumerate(TABLE_COLUMNS):
            item = self.table.item(r, c)
            parts.append(f"{name}: {item.text() if item is not None else ''}")
        note = files_note(self.rows[r]) if r < len(self.rows) else ""
        if note:
            parts.append(f"Result layers: {shown_text(note)}")
        return "\n\n".join(parts)

    def show_row(self, r: int):
        """A read-only window with row ``r`` in full (answer or error), not modal."""
        if not 0 <= r < self.table.rowCount():
            return None
        if self.row_viewer is None:
            self.row_viewer = QDialog(self)
            self.row_viewer.setWindowTitle("GeoVQA batch answer")
            lay = QVBoxLayout(self.row_viewer)
            self._row_viewer_text = QPlainTextEdit()
            self._row_viewer_text.setReadOnly(True)
            lay.addWidget(self._row_viewer_text)
            buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
            buttons.rejected.connect(self.row_viewer.close)
            lay.addWidget(buttons)
            self.row_viewer.resize(560, 400)
        self._row_viewer_text.setPlainText(self.row_text(r))
        self.row_viewer.show()
        self.row_viewer.raise_()
        self.row_viewer.activateWindow()  # opened with Enter: the keyboard reads it (Escape closes it)
        return self.row_viewer

    def open_autosave_folder(self):
        if self.autosave_path is not None:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.autosave_path.parent)))

    def refresh_layers(self, tick_selected: bool = True):
        """List the project's raster layers, GeoVQA's own result layers left out (as in the dock).
        A layer listed before keeps its tick (by layer id); a new one is ticked when it is
        selected in the layer tree (``tick_selected``: the dialog opened) and left unticked when
        it came while the dialog was open."""
        kept = {}
        for i in range(self.layer_list.count()):
            item = self.layer_list.item(i)
            kept[item.data(USER_ROLE)] = item.checkState()
        self.layer_list.clear()
        selected = set()
        if tick_selected:
            try:
                selected = {lyr.id() for lyr in self.iface.layerTreeView().selectedLayers()}
            except Exception:  # noqa: BLE001 - no layer tree view (tests, other hosts)
                pass
        for layer in QgsProject.instance().mapLayers().values():
            if not is_raster_layer(layer) or result_layers.is_result_layer(layer):
                continue
            item = QListWidgetItem(layer.name())
            item.setData(USER_ROLE, layer.id())
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            state = kept.get(layer.id(), CHECKED if layer.id() in selected else UNCHECKED)
            item.setCheckState(state)
            self.layer_list.addItem(item)

    def _layers_added(self, layers):
        self._watch(layers)
        self._layer_changed()

    def _watch(self, layers):
        for layer in layers or ():
            if layer.id() in self._watched:
                continue
            signals = [(layer.nameChanged, self._layer_changed)]
            if hasattr(layer, "customPropertyChanged"):  # QGIS 3.18 and later: the result-layer mark
                signals.append((layer.customPropertyChanged, self._layer_property_changed))
            for signal, slot in signals:
                signal.connect(slot)
            self._watched[layer.id()] = (layer, signals)

    def _layer_changed(self, *_):
        """Shown, the list follows at once (a layer come meanwhile is left unticked); hidden, it
        is listed anew when the dialog opens again, a new layer ticked when selected then."""
        if self.isVisible():
            self.refresh_layers(tick_selected=False)

    def _layer_property_changed(self, key):
        if key == result_layers.RESULT_LAYER_PROPERTY:
            self._layer_changed()

    def _unwatch(self, layer_id=None):
        """Let go of one layer's signals (it leaves the project) or, without an id, of all."""
        ids = [layer_id] if layer_id is not None else list(self._watched)
        for lid in ids:
            _layer, signals = self._watched.pop(lid, (None, ()))
            for signal, slot in signals:
                try:
                    signal.disconnect(slot)
                except (TypeError, RuntimeError):  # already gone with its layer
                    pass

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
        # said before anything runs, naming the line it is on; the questions stay
        too_long = questions_too_long(self.questions_edit.toPlainText())
        if too_long:
            self.message.setText(too_long)
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
        self._total = len(layers) * len(questions)
        self.autosave_path = None
        self.autosave_label.setText("")
        self.open_folder_button.setVisible(False)
        self._set_running(True)
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
        # a file: the bands the layer shows (its renderer); a render: its RGB as it is
        item = {"layer": layer.name(), "layer_id": layer.id(), "raster_path": path, "aoi": None,
                "crs_wkt": layer.crs().toWkt(), "clip_bounds": rect_bounds(layer.extent()),
                "unreferenced": is_unreferenced_file(layer),
                "bands": layer_bands(layer) if path is not None else RENDER_BANDS, "rendered": False}
        if path is not None:
            try:
                check_placed_on_map(layer)  # a file the engine refuses: its rows say why, nothing is sent
            except AoiError as exc:
                item["error"] = str(exc)
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
        out = render_file(self.settings.results_dir(), layer.name())
        renderer = LayerRenderer(layer, geom.boundingBox(), str(out), self.settings.render_max_px, self,
                                 max_pixels=health_read_budget(self.engine_health()))
        self.message.setText(f"Rendering {layer.name()} at {renderer.size_note} …")
        self._renderers.append(renderer)
        self._rendering = (layer.id(), item, renderer)
        run_id = self._run_id

        def done(p, err):
            # the renderer lets go of itself after this (render.LayerRenderer): not kept here
            if renderer in self._renderers:
                self._renderers.remove(renderer)
            if run_id != self._run_id:  # the run this render was for was cancelled
                return
            self._rendering = None
            if err:
                self.message.setText(err)
                self._items.append(dict(item, error=err))  # a row per question says so
            else:
                item["raster_path"], item["rendered"] = p, True
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
        try:
            client = make_client(self.settings)
        except Exception as exc:  # noqa: BLE001 - e.g. a bad engine URL: say so, end the run
            self._done()
            self.message.setText(f"The batch could not start: {exc}")
            return
        self.autosave_path = results_dir / f"{file_stem('batch answers')}.jsonl"
        self.task = BatchTask(client, self._items, self._questions,
                              self.settings.request_options(), results_dir, autosave_path=self.autosave_path)
        for signal, slot in self._task_connections(self.task):
            signal.connect(slot)
        self._total = self.task.total
        self.message.setText(f"Asked 0 of {self._total} …")
        self.autosave_label.setText(f"Each answer is saved as it arrives to {self.autosave_path}")
        QgsApplication.taskManager().addTask(self.task)

    def _task_connections(self, task):
        # bound methods, not lambdas: a lambda outlives the dialog's widgets (plugin reload)
        return ((task.row, self._add_row), (task.progressChanged, self._task_progress),
                (task.stage, self._task_stage), (task.taskCompleted, self._done), (task.taskTerminated, self._done))

    def _task_stage(self, text):
        """What the batch does between answers (a raster prepared for the upload); "": done."""
        self.message.setText(text or f"Asked {len(self.rows)} of {self._total} …")

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
            if renderer.released:  # it let go of itself (deleted): nothing more comes of it
                continue
            try:
                renderer.done.disconnect()
            except TypeError:
                pass
            renderer.cancel()  # it lets go of itself once its map job has stopped
        self._renderers = []

    def cancel(self):
        self.cancel_button.setEnabled(False)
        self._cancelled = True
        self._running = False  # it is ending: nothing goes on in the background
        self._run_id += 1  # late renders of this run are ignored
        self._stop_renderers()
        if self.task is not None:
            self.task.cancel()  # its rows so far stay; taskTerminated ends the run
        else:
            self._done()

    def shutdown(self):
        """Plugin unload: stop everything and let go of the task before the widgets go away."""
        self._shut_down = True
        for signal, slot in self._project_signals:
            try:
                signal.disconnect(slot)
            except TypeError:
                pass
        self._unwatch()
        self._run_id += 1
        self._stop_renderers()
        self._drop_task()

    def _layer_will_be_removed(self, layer_id):
        """A layer leaves the project (removed, or the project closed): it leaves the list, and
        in a running batch each of its questions not asked yet becomes an error row."""
        self._unwatch(layer_id)
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
        self.rows.append(row)  # as it came: the exports and the autosave keep its error whole
        log_long_error(row)
        r = self.table.rowCount()
        self.table.insertRow(r)
        kept = (row.get("tokens") or {}).get("visual_kept", "")
        secs = (row.get("timings") or {}).get("total", "")
        values = (row["layer"], row["question"], answer_cell(row), str(kept), f"{secs:.1f}" if isinstance(secs, (int, float)) else "",
                  bands_cell(row.get("bands"), row.get("palette"), row.get("rendered")))
        for c, val in enumerate(values):
            cell = QTableWidgetItem(val)
            cell.setToolTip(val)  # the whole text, which the column may cut
            self.table.setItem(r, c, cell)
        self._mark_files_note(self.table.item(r, ANSWER_COLUMN), files_note(row))
        self.message.setText(f"Asked {len(self.rows)} of {self._total} …")
        if row.get("answer") is not None and row.get("error"):
            self._note(shown_text(row["error"]))  # an answer whose heatmap/anchors could not be saved
        if self.task is not None and self.task.autosave_error:
            self.autosave_label.setText(self.task.autosave_error)
        has_files = row.get("heatmap_path") or row.get("anchors_path")
        if self.layers_check.isChecked() and row.get("answer") is not None and has_files:
            layer = QgsProject.instance().mapLayer(row.get("layer_id") or "")
            if layer is None:  # result layers without their raster would only confuse
                self._note(f"The layer '{row['layer']}' was removed from the project: its answer "
                           "is kept without result layers.")
                return
            try:
                result_layers.add_result_layers(row["question"], row.get("heatmap_path"), row.get("anchors_path"),
                                                source_layer=layer, crs_wkt=row.get("crs_wkt"))
            except result_layers.ResultLayerError as exc:
                self._note(str(exc))
            else:
                self._gather_results(row)

    def _gather_results(self, row):
        """The project was saved under a (new) name while the batch ran (its results folder is
        the one of when it started): the row's files go into the project's results folder as
        the Save would have put them, the rows' paths following the copies."""
        gathered = gather_into_project(QgsProject.instance(), [row.get("heatmap_path"), row.get("anchors_path")])
        if gathered is None:
            return
        folder, moved, problems = gathered
        if moved:
            self._note(f"Its result files were copied into {folder}, to stay with the project.")
        if problems:
            self._note(f"Some result files could not be copied into {folder}: {'; '.join(problems)}")

    def _follow_moved_files(self, moved: dict):
        """Result files were copied into the project's folder (a Save As, whoever gathered them):
        the rows' paths, and so the exports, follow the copies."""
        for r in self.rows:
            for key in ("heatmap_path", "anchors_path"):
                if key in r:
                    r[key] = moved_path(r[key], moved)

    @staticmethod
    def _mark_files_note(cell, note: str):
        """An answer whose heatmap/anchors could not be saved: a warning icon on its cell and the
        reason under the answer in its tooltip (the answer itself, as exported, stays as it is).
        Else the reason was on the message line only until the next row came."""
        if note:
            cell.setIcon(QgsApplication.getThemeIcon(WARNING_ICON))
            cell.setToolTip(f"{cell.text()}\n\n⚠ {shown_text(note)}")

    def _note(self, text: str):
        """A remark about the latest row, after the count of questions asked."""
        self.message.setText(f"{self.message.text()} {text}")

    def summary(self) -> str:
        """'6 questions: 4 answered, 2 failed' (+ how many were not answered when cancelled: the
        question Cancel stopped mid-answer with those not asked, not as a failure). An answer
        whose heatmap or anchors could not be saved counts as answered, and is counted apart:
        '4 answered (1 with result layers missing)'."""
        answered = sum(1 for r in self.rows if r.get("answer") is not None)
        failed = sum(1 for r in self.rows if is_failure(r))
        total = max(self._total, len(self.rows))
        text = f"{total} question{'s' if total != 1 else ''}: {answered} answered"
        missing = sum(1 for r in self.rows if files_note(r))
        if missing:
            text += f" ({missing} with result layers missing)"
        text += f", {failed} failed"
        not_answered = total - answered - failed
        if not_answered > 0:
            text += f", {not_answered} not answered"
        return text

    def _done(self, *_):
        task = self.task
        cancelled = self._cancelled or (task is not None and task.isCanceled())
        self._end_text = self.summary() + (" (cancelled)" if cancelled else "") + "."
        self.message.setText(self._end_text)
        autosave_error = task.autosave_error if task is not None else ""
        self.task = None
        self._set_running(False)
        if autosave_error:
            self.autosave_label.setText(autosave_error)
        elif self.autosave_path is not None and self.autosave_path.exists():
            self.autosave_label.setText(f"Answers saved to {self.autosave_path}")
            self.open_folder_button.setVisible(True)
        if not cancelled and not self._shut_down and not self.isVisible():
            # closed while it ran: the end would pass unseen (its progress bar was in the task bar)
            try:
                self.iface.messageBar().pushMessage(
                    "GeoVQA", f"Batch questions finished: {self._end_text} {FINISHED_WHILE_HIDDEN}",
                    level=MSG_INFO, duration=0)
            except Exception:  # noqa: BLE001 - never let a message bar problem break the end of a run
                pass
        self.batch_finished.emit(list(self.rows))

    def export(self, path: str) -> str:
        """Write the rows to ``path``: JSON for a name ending in .json, else CSV."""
        return write_json(self.rows, path) if str(path).lower().endswith(".json") else write_csv(self.rows, path)

    def _export(self, kind):
        """Export CSV… / JSON…: Qt's save dialog adds no ending on Linux or macOS, so a name typed
        without one gets the chosen kind's (else JSON chosen was written as CSV); an ending of the
        other kind typed on purpose stays the user's choice."""
        filt = "CSV (*.csv)" if kind == "csv" else "JSON (*.json)"
        path, _ = QFileDialog.getSaveFileName(self, "Export answers", f"geovqa_batch.{kind}", filt)
        if not path:
            return
        path = export_path(path, EXPORT_KINDS, kind)
        try:
            self.export(path)
        except (OSError, ValueError) as exc:  # a folder that cannot be written, a full disk: said, not raised
            self._export_said(f"Could not export the answers to {path}: {export_failure(exc, path)}", MSG_WARNING)
            return
        self._export_said(f"Answers exported to {path}.")

    def _export_said(self, text: str, level=None):
        """What an export did, after the end of run's counts on the message line; a failure also
        on QGIS's message bar (the dialog may be behind the main window)."""
        self.message.setText(f"{self._end_text} {text}".strip())
        if level is None:
            return
        try:
            self.iface.messageBar().pushMessage("GeoVQA", text, level=level, duration=8)
        except Exception:  # noqa: BLE001 - never let a message bar problem hide the failure
            pass
