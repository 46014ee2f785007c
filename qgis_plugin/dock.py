"""The GeoVQA chat dock: pick a raster, an area of interest, ask, watch the answer stream in.

All engine and file work runs in QgsTasks (:mod:`tasks`, :mod:`render`); this module only
reacts to their signals in the main thread. Each layer keeps its own conversation. A newer
question supersedes an unfinished one: the old task is cancelled and any late event carrying
the old request_id is ignored.

The conversations are saved with the project (:mod:`history`) and come back when it is opened
again; those about layers no longer in the project are shown under "Answers about removed
layers" at the end of the layer list.

Keyboard: Enter in the question box asks; Escape in the dock stops a question being answered
(only then, and only an Escape none of its widgets used: see keyPressEvent). After asking or
stopping with the buttons, or an answer coming while Stop has the focus, the focus goes back to
the question box (Qt moved it on to the next widget when Ask or Stop turned disabled), as it
does when the dock is shown with its action. The conversation is read with the keyboard too
(Tab reaches it, Shift+arrows select a part).
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

from qgis.core import QgsApplication, QgsGeometry, QgsMessageLog, QgsProject
from qgis.gui import QgsCollapsibleGroupBox, QgsDockWidget, QgsMapLayerComboBox
from qgis.PyQt.QtCore import Qt, QTimer, pyqtSignal
from qgis.PyQt.QtWidgets import (
    QApplication,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMenu,
    QPushButton,
    QSpinBox,
    QTextBrowser,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from . import layers as result_layers
from . import status as engine_status
from .addresses import engine_address, host_port
from .aoi import (AOI_LABELS, AOI_MODES, AoiError, PolygonTool, RectangleTool, clip_to_layer, is_unreferenced_file,
                  request_aoi)
from .bands import RENDER_BANDS, bands_text, layer_bands
from .client import health_read_budget
from .compat import MSG_CRITICAL, MSG_INFO, MSG_WARNING, RASTER_LAYER_FILTER, qaction_class
from .engine_errors import MAX_SHOWN_CHARS, EngineError, shown_text
from .engine_protocol import build_ask_request, new_request_id, question_too_long
from .history import LOG_TAG, RESULT_PATHS, ProjectHistory, kept_result
from .paths import export_path, public_source
from .project_results import gather_into_project, moved_files, moved_path
from .render import RENDERS, WEB_PROVIDERS, LayerRenderer, layer_file_path, render_file
from .settings import (STRATEGY_CHOICES, STRATEGY_SHORT_LABELS, STRATEGY_TIPS, TOKENS_PER_TILE_AUTO_SHORT,
                       TOKENS_PER_TILE_AUTO_TEXT, Settings, make_client)
from .settings import notifier as settings_notifier
from .tasks import ANSWERING, AskTask, HealthTask, discard_kept_files, event_text, rect_bounds, visual_tokens_text

HEALTH_INTERVAL_MS = 30000  # engine ready: check now and then
HEALTH_INTERVAL_BUSY_MS = 3000  # engine down or loading: check often so the line turns green quickly
# a question failing so may mean the engine went away (died mid-answer, restarted, loading):
# the status line is checked at once, not at the next interval
HEALTH_AFTER_ERRORS = ("engine_down", "model_loading", "stream_broken", "io_error", "no_answer", "not_an_engine",
                       "wrong_protocol")
# Streamed tokens are redrawn at most this often: each redraw lays out the whole conversation,
# so one redraw per token made a long answer quadratic and froze QGIS.
RENDER_INTERVAL_MS = 100
SCROLL_BOTTOM_SLACK_PX = 4  # "at the bottom" tolerates a few pixels of rounding
USER_ROLE = Qt.ItemDataRole.UserRole
# the layer list's last item when the project holds answers about layers it no longer has
REMOVED_LAYERS_ITEM = "Answers about removed layers"
EXPORT_FILTERS = "Markdown (*.md);;JSON (*.json)"
READ_ONLY_PLACEHOLDER = "These answers are read-only: pick a layer to ask about it."
QUESTION_PLACEHOLDER = "Ask about the layer, e.g. How many ships are in the harbour?"
ASK_TIP = "Ask the question (or press Enter in the question box)"
STOP_TIP = "Stop the question being answered (or press Escape in the dock)"
AOI_SET = "Area of interest set."
STILL_ANSWERING = "still being answered"  # a turn copied or exported while its answer streams


class ChatView(QTextBrowser):
    """The conversation. A reader at its end stays at the end whenever the scroll range grows
    (the chat got shorter for a Retry button or a longer status line below it, the text was
    laid out further), so the last line is not cut off; one who scrolled up keeps their place."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._at_end = True
        self._holding = False  # while the text is replaced: its scroll moves are no reader's
        sb = self.verticalScrollBar()
        sb.valueChanged.connect(self._scrolled)
        sb.rangeChanged.connect(self._range_changed)

    def at_end(self) -> bool:
        sb = self.verticalScrollBar()
        return sb.value() >= sb.maximum() - SCROLL_BOTTOM_SLACK_PX

    def _scrolled(self, _value):
        if not self._holding:
            self._at_end = self.at_end()

    def _range_changed(self, _minimum, maximum):
        if self._at_end and not self._holding:
            self.verticalScrollBar().setValue(maximum)

    def set_conversation(self, text: str, follow_end: bool = False):
        """Show ``text`` (HTML); at its end when ``follow_end`` or when the reader was at the end,
        else where the reader was."""
        sb = self.verticalScrollBar()
        at_end = follow_end or self.at_end()
        position = sb.value()
        self._holding = True
        try:
            self.setHtml(text)
        finally:
            self._holding = False
        self._at_end = at_end
        sb.setValue(sb.maximum() if at_end else position)


class ChatDock(QgsDockWidget):
    """Dock widget; ``answer_finished(dict)`` fires after each completed turn (tests use it)."""

    answer_finished = pyqtSignal(object)
    health_updated = pyqtSignal(object, str)

    def __init__(self, iface, engine_process=None, plugin_version="", parent=None):
        super().__init__("GeoVQA", parent)
        self.setObjectName("GeoVQADock")
        self.iface = iface
        self.canvas = iface.mapCanvas()
        self.engine_process = engine_process
        self.plugin_version = plugin_version
        self.history = ProjectHistory()
        self.conversations = self.history.read()  # layer id -> list of turns, saved with the project
        self._history_changed = False  # since the project was opened: rewrite the entry when it is saved
        self.current_request_id = None
        self.current_turn = None
        self.task = None
        self.renderer = None
        self.health = None
        self.health_error = ""
        self.health_error_code = None  # EngineError.code of the last status check's failure
        self.last_error = ""
        self.aoi_geometry = None  # canvas CRS
        self.aoi_crs = None
        self.tool = None
        self._health_task = None
        self._health_again = False  # asked while a check ran (the local engine started or stopped meanwhile)
        self._shut_down = False  # shutdown() began: nothing new is started
        self._shown_layer_id = None  # the layer whose conversation is shown
        self._excepted_ids = set()  # GeoVQA's result layers left out of the layer list
        self._render_timer = QTimer(self)  # before _build: choosing a layer renders
        self._render_timer.setSingleShot(True)
        self._render_timer.setInterval(RENDER_INTERVAL_MS)
        self._render_timer.timeout.connect(self.render_conversation)
        self._build()
        self._load_options()
        self.timer = QTimer(self)
        self.timer.setInterval(HEALTH_INTERVAL_MS)
        self.timer.timeout.connect(self.refresh_health)
        self.timer.start()
        settings_notifier.saved.connect(self._settings_saved)
        project = QgsProject.instance()
        self._project_signals = ((project.cleared, self._project_cleared),
                                 (project.readProject, self._project_read),
                                 (project.writeProject, self._project_saving),
                                 (project.fileNameChanged, self._project_file_named),
                                 (moved_files.moved, self._follow_moved_files),
                                 (project.layerWillBeRemoved, self._layer_will_be_removed),
                                 (project.layersRemoved, self._update_removed_item),
                                 (project.layersAdded, self._layers_added),
                                 (project.layersRemoved, self._update_excepted_layers))
        if hasattr(project, "aboutToBeCleared"):  # newer QGIS (not 3.22): stop before the layers go, save nothing
            self._project_signals += ((project.aboutToBeCleared, self._project_closed),)
        for signal, slot in self._project_signals:
            signal.connect(slot)
        # layers already in the project (the plugin enabled with a project open) are watched for
        # a result-layer mark too, as added ones are
        self._layers_added(list(project.mapLayers().values()))
        self._update_removed_item()
        self._update_inputs()
        self.render_conversation()  # the conversation saved in a project already open
        QTimer.singleShot(0, self.refresh_health)

    # -- UI ---------------------------------------------------------------------------------
    def _build(self):
        w = QWidget()
        v = QVBoxLayout(w)
        self.status_label = QLabel("Engine: checking…")
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        v.addWidget(self.status_label)

        form = QFormLayout()
        # a narrow dock puts a label above its field rather than growing wider
        form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        self.layer_combo = QgsMapLayerComboBox()
        self.layer_combo.setFilters(RASTER_LAYER_FILTER)
        self.layer_combo.setToolTip("The raster layer to ask about (GeoVQA's own heatmaps are not listed).")
        self.layer_combo.layerChanged.connect(self._layer_changed)
        # choosing the removed layers' item changes no layer: layerChanged says nothing then
        self.layer_combo.currentIndexChanged.connect(self._combo_index_changed)
        form.addRow("Layer", self.layer_combo)
        aoi_row = QHBoxLayout()
        self.aoi_combo = QComboBox()
        for mode in AOI_MODES:
            self.aoi_combo.addItem(AOI_LABELS[mode], mode)
        self.aoi_combo.currentIndexChanged.connect(self._aoi_mode_changed)
        self.draw_button = QPushButton("Draw")
        self.draw_button.setToolTip("Draw the rectangle or polygon on the map (right click closes a polygon).")
        self.draw_button.clicked.connect(self.activate_draw_tool)
        self.draw_button.setEnabled(False)
        aoi_row.addWidget(self.aoi_combo, 1)
        aoi_row.addWidget(self.draw_button)
        # the row holds a layout, so QFormLayout makes its label the buddy of nothing: named here
        area_label = QLabel("Area")
        area_label.setBuddy(self.aoi_combo)
        self.aoi_combo.setAccessibleName("Area")
        form.addRow(area_label, aoi_row)
        v.addLayout(form)

        self.view = ChatView()
        self.view.setOpenExternalLinks(False)
        self.view.setAccessibleName("Conversation")
        # a caret for the keyboard: Shift+arrows select part of an answer (links stay reachable)
        self.view.setTextInteractionFlags(self.view.textInteractionFlags()
                                          | Qt.TextInteractionFlag.TextSelectableByKeyboard)
        v.addWidget(self.view, 1)

        q_row = QHBoxLayout()
        self.question_edit = QLineEdit()
        self.question_edit.setPlaceholderText(QUESTION_PLACEHOLDER)
        self.question_edit.setAccessibleName("Question")
        self.question_edit.returnPressed.connect(self.ask)
        self.question_edit.textChanged.connect(self._update_inputs)
        self.question_edit.textChanged.connect(self._say_question_length)
        self.ask_button = QPushButton("Ask")
        self.ask_button.setToolTip(ASK_TIP)
        self.ask_button.clicked.connect(self.ask)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip(STOP_TIP)
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self.stop)
        q_row.addWidget(self.question_edit, 1)
        q_row.addWidget(self.ask_button)
        q_row.addWidget(self.stop_button)
        v.addLayout(q_row)
        # its own line, not the progress line: typing while an answer runs keeps both in view
        self.length_label = QLabel("")
        self.length_label.setWordWrap(True)
        self.length_label.hide()
        v.addWidget(self.length_label)
        self.progress_label = QLabel("")
        self.progress_label.setWordWrap(True)  # a long message wraps instead of widening the dock
        self.retry_button = QPushButton("")
        self.retry_button.setToolTip("Ask the same question again with the smaller token budget the "
                                     "engine suggests after running out of memory.")
        self.retry_button.clicked.connect(self.retry_smaller)
        self.retry_button.hide()
        self._retry = None  # what to ask again after running out of memory: see _offer_retry
        status_row = QHBoxLayout()
        status_row.addWidget(self.progress_label, 1)
        status_row.addWidget(self.retry_button)
        v.addLayout(status_row)

        opts = QgsCollapsibleGroupBox("Strategy and token budget")
        self.options_box = opts
        of = QFormLayout(opts)
        of.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        self.strategy_combo = QComboBox()
        # short names keep the dock narrow; the long ones are in the tooltips
        self.strategy_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.strategy_combo.setMinimumContentsLength(12)
        for i, name in enumerate(STRATEGY_CHOICES):  # the last: "Engine's default" (the adapter's)
            self.strategy_combo.addItem(STRATEGY_SHORT_LABELS[name], name)
            self.strategy_combo.setItemData(i, STRATEGY_TIPS[name], Qt.ItemDataRole.ToolTipRole)
        self.strategy_combo.currentIndexChanged.connect(self._strategy_tooltip)
        of.addRow("Strategy", self.strategy_combo)
        self.budget_spin = QSpinBox()
        self.budget_spin.setRange(0, 200000)
        self.budget_spin.setSingleStep(256)
        self.budget_spin.setSpecialValueText("engine default")
        self.budget_spin.setToolTip("Hard cap on visual tokens entering the language model (0 = engine default).")
        of.addRow("Token budget", self.budget_spin)
        self.tpt_spin = QSpinBox()
        self.tpt_spin.setRange(0, 576)
        self.tpt_spin.setSpecialValueText(TOKENS_PER_TILE_AUTO_SHORT)
        self.tpt_spin.setToolTip(f"Visual tokens kept per tile; {TOKENS_PER_TILE_AUTO_SHORT} (0) = the "
                                 f"{TOKENS_PER_TILE_AUTO_TEXT}.")
        of.addRow("Tokens per tile", self.tpt_spin)
        self.max_new_spin = QSpinBox()
        self.max_new_spin.setRange(1, 4096)
        of.addRow("Max answer tokens", self.max_new_spin)
        self.heatmap_check = QCheckBox("Add result layers")
        self.heatmap_check.setToolTip("Add the kept-token heatmap and the anchor tokens as layers after each answer.")
        self.heatmap_check.setChecked(True)
        of.addRow(self.heatmap_check)
        opts.setCollapsed(True)  # the defaults come from Settings > Options > GeoVQA
        v.addWidget(opts)

        b_row = QHBoxLayout()
        self.copy_button = QPushButton("Copy")
        self.copy_button.setToolTip("Copy this layer's conversation")
        self.copy_button.clicked.connect(self.copy_conversation)
        self.export_button = QPushButton("Export…")
        self.export_button.clicked.connect(self._export_clicked)
        # the rarely used ones in a menu: four buttons in a row held the dock at 384 px or wider
        action = qaction_class()
        self.clear_action = action("Clear conversation", self)
        self.clear_action.setToolTip("Remove this layer's conversation from the dock (the result layers stay)")
        self.clear_action.triggered.connect(self.clear_conversation)
        self.diag_action = action("Copy diagnostics", self)
        self.diag_action.setToolTip("Copy a diagnostics report (engine status, settings, log) to the clipboard")
        self.diag_action.triggered.connect(self.copy_diagnostics)
        self.more_menu = QMenu(self)
        self.more_menu.setToolTipsVisible(True)
        self.more_menu.addAction(self.clear_action)
        self.more_menu.addAction(self.diag_action)
        self.more_button = QToolButton()
        self.more_button.setText("⋯")
        self.more_button.setAccessibleName("More actions")  # else read out as its character's name
        self.more_button.setToolTip("More: Clear conversation, Copy diagnostics")
        self.more_button.setMenu(self.more_menu)
        self.more_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        for b in (self.copy_button, self.export_button):
            b_row.addWidget(b)
        b_row.addStretch(1)
        b_row.addWidget(self.more_button)
        v.addLayout(b_row)
        self.setWidget(w)

    def _strategy_tooltip(self, _index=None):
        self.strategy_combo.setToolTip(STRATEGY_TIPS.get(self.strategy_combo.currentData(), ""))

    @staticmethod
    def _option_defaults() -> dict:
        s = Settings.load()
        return {"strategy": s.strategy, "budget": s.budget, "tokens_per_tile": s.tokens_per_tile,
                "max_new_tokens": s.max_new_tokens}

    def _load_options(self, only_changed: bool = False):
        """The options page's defaults into the dock's options. ``only_changed``: those whose
        default the page changed since they were last taken; the others keep what was chosen
        here (a strategy picked for this conversation, a budget from *Retry with budget*)."""
        defaults, before = self._option_defaults(), getattr(self, "_defaults_taken", {})
        new = {k: v for k, v in defaults.items() if not only_changed or before.get(k) != v}
        self._defaults_taken = defaults
        if "strategy" in new:
            self.strategy_combo.setCurrentIndex(max(0, self.strategy_combo.findData(new["strategy"])))
        for key, spin in (("budget", self.budget_spin), ("tokens_per_tile", self.tpt_spin),
                          ("max_new_tokens", self.max_new_spin)):
            if key in new:
                spin.setValue(new[key])
        self._strategy_tooltip()

    def _settings_saved(self):
        """The options page saved: the defaults it changed, and maybe a new engine."""
        self._load_options(only_changed=True)
        self.refresh_health()

    def options(self) -> dict:
        return Settings.load().request_options(
            strategy=self.strategy_combo.currentData(),
            budget=self.budget_spin.value() or None,
            tokens_per_tile=self.tpt_spin.value(),
            max_new_tokens=self.max_new_spin.value(),
        )

    # -- layer / conversation ----------------------------------------------------------------
    def set_layer(self, layer):
        self.layer_combo.setLayer(layer)

    def follow_active_layer(self, layer):
        from .compat import is_raster_layer

        # a result layer (a heatmap clicked to change its opacity) is no layer to ask about: the
        # combo would find no row for it and drop the layer being talked about
        if layer is not None and is_raster_layer(layer) and not result_layers.is_result_layer(layer):
            self.layer_combo.setLayer(layer)

    def _layer_changed(self, layer):
        left, self._shown_layer_id = self._shown_layer_id, layer.id() if layer is not None else None
        if (not self.is_asking() and left is not None and left != self._shown_layer_id
                and QgsProject.instance().mapLayer(left) is not None):
            # the user chose another layer: "Answered…" and the like were about the one left
            # (a line saying why a question stopped, when its layer or project went, stays)
            self.progress_label.setText("")
        self._update_retry_button()
        self._update_inputs()
        self.render_conversation()

    def _combo_index_changed(self, _index):
        if self.layer_combo.currentLayer() is None:
            self._layer_changed(None)

    def _update_inputs(self, *_):
        """Area, Draw, the question box and Ask: read-only under the removed layers' item; Ask
        needs a layer and a question that is not blank."""
        removed = self.showing_removed_layers()
        for w in (self.aoi_combo, self.question_edit):
            w.setEnabled(not removed)
        self.draw_button.setEnabled(not removed and self.aoi_mode() in ("rectangle", "polygon"))
        self.question_edit.setPlaceholderText(READ_ONLY_PLACEHOLDER if removed else QUESTION_PLACEHOLDER)
        text = self.question_edit.text()
        can_ask = (not removed and self.layer_combo.currentLayer() is not None
                   and bool(text.strip()) and not question_too_long(text))
        if not can_ask and self.ask_button.hasFocus():
            self._focus_question()  # asked with the button: the box was emptied
        self.ask_button.setEnabled(can_ask)

    def _focus_question(self):
        """The focus into the question box (where the next question is typed), when it takes input."""
        if self.question_edit.isEnabled():
            self.question_edit.setFocus(Qt.FocusReason.OtherFocusReason)

    def show_for_typing(self):
        """The dock was shown (its action): in front of other docks tabbed with it, its window
        active, the question box focused, so the user can type at once."""
        self.raise_()
        if self.isFloating():
            self.activateWindow()
        if self.question_edit.isEnabled():
            self.question_edit.setFocus(Qt.FocusReason.ShortcutFocusReason)
        else:  # the removed layers' answers are shown: a layer is to be picked first
            self.layer_combo.setFocus(Qt.FocusReason.ShortcutFocusReason)

    def _set_stop_enabled(self, enabled: bool):
        """Stop: on while a question runs. Stop turning off with the focus on it (pressed, or the
        answer came) gives the focus back to the question box."""
        if not enabled and self.stop_button.hasFocus():
            self._focus_question()
        self.stop_button.setEnabled(enabled)

    def keyPressEvent(self, event):  # noqa: N802
        """Escape, with the focus in the dock and a question running, stops it (as Stop). Only an
        Escape no widget of the dock took comes here, not a shortcut: an open list (a combo's)
        or menu closes with it as before, the map's drawing tools keep theirs, and with no
        question running it goes on to QGIS as it did."""
        if (event.key() == Qt.Key.Key_Escape and event.modifiers() == Qt.KeyboardModifier.NoModifier
                and self.is_asking()):
            self.stop()
            event.accept()
            return
        super().keyPressEvent(event)

    def _say_question_length(self, text):
        """A question longer than the engine takes is said as it is typed, on a line of its own
        under the question (and in the box's tooltip), which goes once it is short enough; Ask
        stays disabled until then. The text is kept as typed, to be shortened."""
        too_long = question_too_long(text) or ""
        self.question_edit.setToolTip(too_long)
        self.length_label.setText(too_long)
        self.length_label.setVisible(bool(too_long))

    def _layers_added(self, layers):
        """A layer may be marked as a result layer only once it is in the project (the layers
        "Ask a raster" loads are marked by Processing's post-processor after it added them): the
        mark, when it comes, takes it out of the layer list too."""
        for lyr in layers or ():
            if hasattr(lyr, "customPropertyChanged"):  # QGIS 3.18 and later
                lyr.customPropertyChanged.connect(self._layer_property_changed)
        self._update_excepted_layers()

    def _layer_property_changed(self, key):
        if key == result_layers.RESULT_LAYER_PROPERTY and not self._shut_down:
            self._update_excepted_layers()

    def _update_excepted_layers(self, *_):
        """GeoVQA's own result layers (also those of a saved project) are not layers to ask about."""
        project = QgsProject.instance()
        excepted = [lyr for lyr in project.mapLayers().values() if result_layers.is_result_layer(lyr, project)]
        ids = {lyr.id() for lyr in excepted}
        # (the combo's own list may hold layers deleted meanwhile: never read back)
        if ids != self._excepted_ids:
            self._excepted_ids = ids
            self.layer_combo.setExceptedLayerList(excepted)

    def turns(self, layer=None) -> list:
        """The conversation of ``layer`` (default: the chosen one); with the removed layers' item
        chosen, a new list of the turns about layers no longer in the project."""
        layer = layer or self.layer_combo.currentLayer()
        if layer is not None:
            return self.conversations.setdefault(layer.id(), [])
        return self.removed_layer_turns() if self.showing_removed_layers() else []

    # -- conversations of removed layers, and saving with the project --------------------------
    def _removed_layer_ids(self) -> list:
        project = QgsProject.instance()
        return [lid for lid, turns in self.conversations.items() if turns and project.mapLayer(lid) is None]

    def removed_layer_turns(self) -> list:
        return [t for lid in self._removed_layer_ids() for t in self.conversations[lid]]

    def showing_removed_layers(self) -> bool:
        combo = self.layer_combo
        return combo.currentLayer() is None and combo.currentText() == REMOVED_LAYERS_ITEM

    def _update_removed_item(self, *_):
        """Offer the removed layers' item exactly while there are answers about removed layers."""
        wanted = [REMOVED_LAYERS_ITEM] if self._removed_layer_ids() else []
        if list(self.layer_combo.additionalItems()) != wanted:
            self.layer_combo.setAdditionalItems(wanted)
        self._update_inputs()

    def _turn_label(self, turn, removed: bool) -> str:
        label = turn.get("aoi_label", "")
        if removed:
            label = f"{label} · about the layer '{turn.get('layer') or '?'}', removed from the project"
        return label

    def _conversations_changed(self):
        """A question, an answer or a Clear: store the conversations in the project, which QGIS
        then marks modified (it asks to save it)."""
        self._history_changed = True
        self.history.write(self.conversations)

    def _project_file_named(self):
        """QGIS gave the project a (new) file name, to save it there (Save, Save As): the result
        files outside its results folder (asked before its first save, or of the project it was
        saved from) are copied into it, so the project keeps its layers wherever it goes
        (:mod:`project_results`); so are the files of answers without their layers (removed by
        hand, or never added), which the turns still refer to. The conversations' entry is
        written again when it is saved:
        the files' paths in it are stored relative to the project file (:mod:`history`)."""
        if any(self.conversations.values()):
            self._history_changed = True
        self._gather_results()

    def _follow_moved_files(self, moved: dict):
        """Result files were copied into the project's folder (whoever gathered them): the
        turns' record of the files follows the copies (their render's too, and the request's
        ``raster_path`` where that is the render sent, as :func:`history.with_paths` has it)."""
        changed = False
        for turns in self.conversations.values():
            for turn in turns:
                result = turn.get("result") or {}
                for key in RESULT_PATHS:
                    if result.get(key) in moved:
                        result[key] = moved[result[key]]
                        changed = True
                if turn.get("rendered_path") in moved:
                    turn["rendered_path"] = moved[turn["rendered_path"]]
                    changed = True
                request = turn.get("request")
                if turn.get("rendered_path") and isinstance(request, dict) and request.get("raster_path") in moved:
                    turn["request"] = {**request, "raster_path": moved[request["raster_path"]]}
                    changed = True
        if changed:
            self._conversations_changed()

    def _turn_files(self) -> tuple:
        """``(result files, renders)`` the turns refer to (each once; a turn's layers may be
        gone; renders: of the non-file layers asked about)."""
        files, renders = {}, {}
        for turns in self.conversations.values():
            for turn in turns:
                result = turn.get("result") or {}
                for key in RESULT_PATHS:
                    if isinstance(result.get(key), str) and result[key]:
                        files[result[key]] = None
                if isinstance(turn.get("rendered_path"), str) and turn["rendered_path"]:
                    renders[turn["rendered_path"]] = None
        return list(files), list(renders)

    def _gather_results(self, paths=None):
        """Copy the project's result files lying outside its results folder into it (those of
        its result layers and those the turns refer to, their renders too; with ``paths``, an
        answer's files: only when one of them is outside), the turns' record of the files
        following the copies; the message bar says so."""
        files, renders = self._turn_files()
        gathered = gather_into_project(QgsProject.instance(), paths, files, renders)
        if gathered is None:
            return {}
        folder, moved, problems = gathered
        if moved:
            self._notify(f"The project's result files were copied into {folder}, to stay with the project.",
                         MSG_INFO)
        if problems:
            self._notify(f"Some result files could not be copied into {folder} (their layers and answers "
                         f"keep the old files, outside the project's folder): {'; '.join(problems)}",
                         MSG_WARNING)
        return moved

    def _project_saving(self, _doc):
        """The project is being written: its entry gets the answers streamed since (a question
        still running is stored interrupted, with its answer so far)."""
        if self._history_changed:
            self.history.write(self.conversations)

    def _project_read(self, _doc):
        """A project was opened: its conversations come back to their layers."""
        self._project_closed()
        self.conversations = self.history.read()
        self._history_changed = False
        self._update_excepted_layers()
        self._update_removed_item()
        self.render_conversation()

    def _project_cleared(self):
        """File > New / Open, or closing QGIS: the conversations belonged to that project (saved
        with it, if the user chose to save it).

        QGIS 3.22's clear() empties the project's entries first, then removes its layers, and
        says cleared last: a question whose layer was being rendered stopped on the way and
        wrote the chat into the emptied project, so those entries are removed here (the new
        project is left as clean as QGIS made it)."""
        self._project_closed()
        self.history.remove_written_while_cleared()
        self.conversations = {}
        self.history.unreadable = []
        self._history_changed = False
        self._update_removed_item()
        self.render_conversation()

    def schedule_render(self):
        """Redraw soon, once for all the tokens that arrive meanwhile (see RENDER_INTERVAL_MS)."""
        if not self._render_timer.isActive():
            self._render_timer.start()

    def render_conversation(self, follow_end: bool = False):
        """Redraw the conversation now (also flushes a scheduled redraw). ``follow_end``: show
        its end whatever was read before (the user just asked); else a reader at the end stays
        at the end and one reading an earlier answer keeps their place."""
        self._render_timer.stop()
        parts = []
        removed = self.showing_removed_layers()
        for t in self.turns():
            parts.append(f"<p><b>You:</b> {html.escape(t['question'])}"
                         f"<br><small>{html.escape(self._turn_label(t, removed))}</small></p>")
            answer = html.escape(t.get("answer") or "").replace("\n", "<br>")
            if t.get("error"):
                if answer:  # tokens streamed before the error: keep them, marked as cut short
                    parts.append(f"<p><b>GeoVQA (incomplete):</b> {answer}</p>")
                parts.append(f"<p style='color:#b00020'><b>Error:</b> {html.escape(t['error'])}</p>")
            else:
                cursor = "" if t.get("done") else " <i>…</i>"
                who = "GeoVQA (incomplete)" if t.get("interrupted") else "GeoVQA"
                parts.append(f"<p><b>{who}:</b> {answer}{cursor}</p>")
            if t.get("meta"):
                parts.append(f"<p><small>{html.escape(t['meta'])}</small></p>")
        # follow the answer only when the reader is at the end (or just asked); someone reading
        # an earlier answer keeps their place while tokens stream
        self.view.set_conversation("".join(parts) or "<p><i>Pick a raster layer and ask a question.</i></p>",
                                   follow_end)

    def conversation_text(self, layer=None) -> str:
        layer = layer or self.layer_combo.currentLayer()
        removed = layer is None and self.showing_removed_layers()
        about = layer.name() if layer else ("removed layers" if removed else "-")
        lines = [f"# GeoVQA conversation about {about}"]
        for t in self.turns(layer):
            lines.append(f"\nQ: {t['question']}  [{self._turn_label(t, removed)}]")
            lines.extend(self._answer_lines(t))
            if t.get("meta"):
                lines.append(f"   ({t['meta']})")
            elif not t.get("done"):
                lines.append(f"   ({STILL_ANSWERING})")
        return "\n".join(lines)

    @staticmethod
    def _incomplete(turn) -> bool:
        """Its answer is not the whole answer: still streaming, interrupted (saved while it
        streamed), or cut short by an error after some of it came."""
        return (not turn.get("done") or bool(turn.get("interrupted"))
                or bool(turn.get("error") and turn.get("answer")))

    @classmethod
    def _answer_lines(cls, turn) -> list:
        """The answer of one turn for Copy / Markdown; a partial answer stays, marked incomplete
        (also one still streaming)."""
        if not turn.get("error"):
            return [f"A{' (incomplete)' if cls._incomplete(turn) else ''}: {turn.get('answer', '')}"]
        if turn.get("answer"):
            return [f"A (incomplete): {turn['answer']}", f"   ERROR {turn['error']}"]
        return [f"A: ERROR {turn['error']}"]

    def copy_conversation(self):
        QApplication.clipboard().setText(self.conversation_text())

    def export_conversation(self, path: str) -> str:
        layer = self.layer_combo.currentLayer()
        path = str(path)
        if path.lower().endswith(".json"):
            data = {"layer": layer.name() if layer else None, "source": public_source(layer.source()) if layer else None,
                    "turns": [self._exported_turn(t, layer is None) for t in self.turns(layer)]}
            Path(path).write_text(json.dumps(data, indent=2, default=str, ensure_ascii=False), encoding="utf-8")
        else:
            Path(path).write_text(self.conversation_text(layer) + "\n", encoding="utf-8")
        return path

    @classmethod
    def _exported_turn(cls, turn, with_layer: bool) -> dict:
        """One turn for the JSON export: its plain fields (its layer's name only where turns of
        several layers are exported), ``"incomplete": true`` when its answer is not whole."""
        out = {k: v for k, v in turn.items() if (k != "layer" or with_layer) and not k.startswith("_")}
        if isinstance(out.get("request"), dict) and out["request"].get("raster_path"):
            # a URL's login is not for a shared file (as the layer's source, ``public_source``)
            out["request"] = {**out["request"], "raster_path": public_source(str(out["request"]["raster_path"]))}
        if cls._incomplete(turn):
            out["incomplete"] = True
        return out

    def _export_clicked(self):
        path, chosen = QFileDialog.getSaveFileName(self, "Export conversation", "", EXPORT_FILTERS)
        if not path:
            return
        path = export_path(path, ("md", "json"), "json" if chosen.startswith("JSON") else "md")
        try:
            self.export_conversation(path)
        except OSError as exc:  # a folder that cannot be written, a full disk: said, not a Python error
            self._notify(f"Could not export the conversation to {path}: {exc.strerror or exc}", MSG_WARNING)
            return
        self.progress_label.setText(f"Conversation exported to {path}.")

    def clear_conversation(self):
        """Forget the conversation on screen; a question of it still running stops too (its
        answer would have nowhere to go, and its result layers would appear out of nowhere)."""
        layer = self.layer_combo.currentLayer()
        if layer is not None:
            turn = self.current_turn
            if self.is_asking() and turn is not None and turn.get("layer_id") == layer.id():
                self.stop(reason="stopped: the conversation was cleared")
            self._withdraw_retry_about([layer.id()])
            self.conversations[layer.id()] = []
            self._conversations_changed()
        elif self.showing_removed_layers():
            removed = self._removed_layer_ids()
            turn = self.current_turn  # an answer still streaming about a layer removed meanwhile
            if self.is_asking() and turn is not None and turn.get("layer_id") in removed:
                self.stop(reason="stopped: the conversation was cleared")
            self._withdraw_retry_about(removed)
            for lid in removed:
                del self.conversations[lid]
            self._conversations_changed()
            self._update_removed_item()
        self.render_conversation()

    # -- AOI ----------------------------------------------------------------------------------
    def aoi_mode(self) -> str:
        return self.aoi_combo.currentData()

    def set_aoi_mode(self, mode: str):
        self.aoi_combo.setCurrentIndex(self.aoi_combo.findData(mode))

    def _aoi_mode_changed(self, _i):
        """Another kind of area: a rectangle or polygon drawn before is taken off the map and
        forgotten (a polygon is drawn anew for *Drawn polygon*, never the old rectangle)."""
        self._update_inputs()
        self._remove_tool()
        self._drop_aoi_geometry()

    def activate_draw_tool(self):
        """*Draw*: the area drawn before is taken off the map and forgotten; until the new one
        is drawn, asking says to draw it first."""
        self._remove_tool()
        self._drop_aoi_geometry()
        mode = self.aoi_mode()
        self.tool = RectangleTool(self.canvas) if mode == "rectangle" else PolygonTool(self.canvas)
        self.tool.drawn.connect(self.set_aoi_geometry)
        self.tool.started.connect(self._drop_aoi_geometry)  # a new shape replaces the one shown
        self.canvas.setMapTool(self.tool)

    def _drop_aoi_geometry(self):
        """The drawn area is no longer on the map: nothing drawn is asked about."""
        self.aoi_geometry = None
        self.aoi_crs = None
        if self.progress_label.text() == AOI_SET:
            self.progress_label.setText("")

    def set_aoi_geometry(self, geometry, crs=None):
        """Set the drawn AOI (in ``crs``, default the canvas CRS)."""
        self.aoi_geometry = QgsGeometry(geometry)
        self.aoi_crs = crs or self.canvas.mapSettings().destinationCrs()
        self.progress_label.setText(AOI_SET)

    def _remove_tool(self):
        if self.tool is not None:
            if self.canvas.mapTool() is self.tool:
                self.canvas.unsetMapTool(self.tool)
            self.tool.remove()
            self.tool.deleteLater()
            self.tool = None

    def _aoi_geometry_and_crs(self):
        mode = self.aoi_mode()
        crs = self.canvas.mapSettings().destinationCrs()
        if mode == "layer":
            return None, None
        if mode == "extent":
            return QgsGeometry.fromRect(self.canvas.extent()), crs
        if self.aoi_geometry is None:
            raise AoiError("Draw the area of interest on the map first (button Draw).")
        return self.aoi_geometry, self.aoi_crs or crs

    def _current_area(self) -> dict:
        """The area the next question is about, frozen now (the map may move before a retry)."""
        geom, crs = self._aoi_geometry_and_crs()
        return {"mode": self.aoi_mode(), "geometry": QgsGeometry(geom) if geom is not None else None, "crs": crs}

    # -- asking -----------------------------------------------------------------------------
    def ask(self, question: str | None = None, layer=None, area: dict | None = None):
        """Ask about ``layer`` (default: the chosen one) inside ``area`` (a :meth:`_current_area`;
        default: the area chosen now). Returns the request id, or None when nothing was asked."""
        from_box = not isinstance(question, str)  # else a retry or a caller's: the box may hold a draft
        question = (self.question_edit.text() if from_box else question).strip()
        layer = layer or self.layer_combo.currentLayer()
        if layer is None:
            self._notify(READ_ONLY_PLACEHOLDER if self.showing_removed_layers() else "Pick a raster layer first.",
                         MSG_WARNING)
            return None
        if not question:
            self._notify("Please type a question.", MSG_WARNING)
            return None
        # A mistake in the input (a question longer than the engine takes, no area drawn, an area
        # off the layer or smaller than one of its pixels) is only said: it is no turn of the
        # conversation, and the question stays in its box to be asked again.
        too_long = question_too_long(question)
        if too_long:
            self._notify(too_long, MSG_WARNING)
            return None
        if self.health_error_code == "wrong_protocol":  # the status check found an engine of another protocol
            self._notify(self.health_error, MSG_WARNING)
            self.refresh_health()  # it may have been updated since: the next question is asked then
            return None
        try:
            area = area or self._current_area()
            geom, crs = area["geometry"], area["crs"]
            path = layer_file_path(layer)
            if path is not None:  # the request's AOI, made here: it raises for an area off the layer or
                aoi = request_aoi(geom, crs, layer)  # smaller than one of its pixels (a rectangle too)
            elif geom is not None and not geom.isEmpty():
                clip_to_layer(geom, crs, layer)  # raises when it is off the layer (rendered over it below)
        except AoiError as exc:
            self._notify(str(exc), MSG_WARNING)
            return None
        self.stop(silent=True)  # a newer question supersedes the stale one
        self._offer_retry(None)
        settings = Settings.load()
        request_id = new_request_id()
        self.current_request_id = request_id
        turn = {"question": question, "answer": "", "done": False, "layer_id": layer.id(),
                "layer": layer.name(), "request_id": request_id,
                "aoi_label": AOI_LABELS[area["mode"] if area else self.aoi_mode()],
                "started": time.time()}
        self.turns(layer).append(turn)
        self.current_turn = turn
        self._conversations_changed()
        if from_box:  # a draft typed meanwhile stays when a retry asks again
            self.question_edit.clear()
        self.render_conversation(follow_end=True)  # the question just asked is in view
        self._set_stop_enabled(True)
        try:
            turn["_area"] = area  # for a retry (keys starting with _ stay out of the JSON export)
            if path is not None:
                # the bands the layer shows (its renderer now); a render below is RGB already
                self._start_ask(turn, path, aoi, settings, rect_bounds(layer.extent()), is_unreferenced_file(layer),
                                bands=layer_bands(layer))
            else:
                self._render_then_ask(turn, layer, geom, crs, settings, area["mode"])
        except (AoiError, EngineError, ValueError) as exc:
            self._fail(turn, str(exc), getattr(exc, "message", None))
        return request_id

    def _render_then_ask(self, turn, layer, geom, crs, settings, mode):
        ext = layer.extent()
        if geom is None:
            # Tiled services cover the world: send what the map shows instead.
            if layer.providerType() in WEB_PROVIDERS or ext.width() * ext.height() == 0:
                geom, crs = QgsGeometry.fromRect(self.canvas.extent()), self.canvas.mapSettings().destinationCrs()
        aoi = None
        if geom is not None:
            clipped = clip_to_layer(geom, crs, layer)
            ext = clipped.boundingBox()
            if mode == "polygon":
                aoi = {"polygon_wkt": clipped.asWkt(6)}
        out = render_file(settings.results_dir(), turn["question"])
        # no larger than the engine reads (its last status check's max_read_pixels, when it said)
        renderer = self.renderer = LayerRenderer(layer, ext, str(out), settings.render_max_px, self,
                                                 max_pixels=health_read_budget(self.health))
        self.progress_label.setText(f"Rendering {layer.name()} at {renderer.size_note} …")
        if renderer.capped:  # the status line is soon replaced: QGIS's log keeps it
            QgsMessageLog.logMessage(f"'{layer.name()}' is rendered at {renderer.size_note}; a larger "
                                     "Render size (Settings > Options > GeoVQA) adds nothing.", LOG_TAG, MSG_INFO)
        rid = turn["request_id"]

        def rendered(path, error):
            if rid != self.current_request_id:
                return
            self.renderer = None
            if error:
                self._fail(turn, error)
                return
            turn["rendered_path"] = path
            try:
                self._start_ask(turn, path, aoi, settings, rect_bounds(renderer.settings.visibleExtent()),
                                bands=RENDER_BANDS)
            except (EngineError, ValueError) as exc:
                self._fail(turn, str(exc), getattr(exc, "message", None))

        self.renderer.done.connect(rendered)
        self.renderer.start()

    def _start_ask(self, turn, raster_path, aoi, settings, clip_bounds=None, unreferenced=False, bands=None):
        request = build_ask_request(turn["question"], raster_path, aoi=aoi, bands=bands, request_id=turn["request_id"],
                                    **self.options())
        turn["request"] = request
        client = make_client(settings)
        self.task = AskTask(client, request, settings.results_dir(), f"GeoVQA: {turn['question'][:40]}",
                            clip_bounds=clip_bounds, unreferenced=unreferenced)
        self.task.engine_event.connect(self._on_event)
        # cancelled elsewhere (the x on its bar in QGIS's task list): the turn ends as stopped
        rid = turn["request_id"]
        self.task.taskTerminated.connect(lambda: self._task_terminated(rid))
        self.progress_label.setText("Sending the question to the engine …")
        QgsApplication.taskManager().addTask(self.task)

    def stop(self, silent=False, reason=None, save=True):
        """Stop the running question; ``reason`` (e.g. "stopped: the project was closed") is
        shown with it, ``silent`` (a newer question supersedes it) keeps the status line empty.
        ``save=False``: the project it belonged to is gone, nothing is stored in the next one."""
        if self.renderer is not None:
            self.renderer.cancel()
            self.renderer = None
        task, self.task = self.task, None
        if task is not None:
            try:
                task.cancel()
            except RuntimeError:  # "wrapped C/C++ object has been deleted": it ended, nothing to stop
                pass
        if self.current_turn is not None and not self.current_turn.get("done"):
            self.current_turn["done"] = True
            self.current_turn["meta"] = reason or ("stopped" if not silent else "superseded by a newer question")
            if save:
                self._conversations_changed()
            self.render_conversation()
        self.current_request_id = None
        self._set_stop_enabled(False)
        self.progress_label.setText("" if silent else (reason or "stopped").capitalize() + ".")

    def _task_terminated(self, request_id):
        """The question's task ended without an answer or an error: it was cancelled outside
        the dock (the x on its bar in QGIS's task list). The turn ends as *Stop* ends it. A
        question the dock stopped or superseded itself is no longer the current one: nothing
        more is said of it."""
        # self.task None: the dock's own stop() is cancelling it (a queued task ends inside
        # cancel()), and says why itself
        if self.task is None or request_id != self.current_request_id or self._shut_down:
            return
        self.task = None  # the task manager deletes it
        self.stop()

    def is_asking(self) -> bool:
        return self.current_request_id is not None

    def _project_closed(self, *_):
        """File > New / Open (or clear()): the question's layer and its result group would land
        in the next project, so the question stops here."""
        self._offer_retry(None)  # its layer is gone too
        if self.is_asking():
            self.stop(reason="stopped: the project was closed", save=False)

    def _layer_will_be_removed(self, layer_id):
        """A layer still being rendered for the question cannot be rendered any further."""
        turn = self.current_turn
        if self.renderer is not None and turn is not None and turn.get("layer_id") == layer_id and self.is_asking():
            self.stop(reason="stopped: the layer was removed")

    def _layer_removed_meanwhile(self, turn) -> bool:
        """The layer asked about was removed while the answer streamed: the turn stays in that
        layer's conversation, which is now listed under "Answers about removed layers" (each turn
        labelled with its layer's name; copied, exported and saved with the project from there),
        and the user is told where it went. Returns True when the layer is gone (then no result
        layers are added)."""
        if QgsProject.instance().mapLayer(turn["layer_id"]) is not None:
            return False
        self._update_removed_item()
        self._notify(f"The layer '{turn['layer']}' was removed before GeoVQA answered. The answer is kept, "
                     f"without result layers, under '{REMOVED_LAYERS_ITEM}' in the layer list.", MSG_WARNING)
        return True

    def _on_event(self, ev: dict):
        if ev.get("request_id") != self.current_request_id or self.current_turn is None:
            # stale reply from a question stopped or superseded; its task may have kept the
            # answer's files just before (a Stop at the last moment): no turn refers to them
            if ev.get("type") == "result":
                discard_kept_files(ev)
            return
        turn = self.current_turn
        kind = ev.get("type")
        if kind in ("queued", "status"):
            self.progress_label.setText(event_text(ev))
        elif kind == "token":
            turn["answer"] += ev.get("text", "")
            if self.progress_label.text() != ANSWERING:
                self.progress_label.setText(ANSWERING)
            self.schedule_render()
        elif kind == "result":
            self._finish(turn, ev)
        elif kind == "error":
            short = msg = ev.get("message") or "The engine reported an error."
            if ev.get("hint"):
                msg += " " + ev["hint"]
            budget = ev.get("retry_budget")  # a positive int (engine_events); one the budget box can hold
            if ev.get("code") == "out_of_memory" and isinstance(budget, int) and budget <= self.budget_spin.maximum():
                # before the error is drawn: the button takes its room first, the chat then
                # shows its end in what is left
                self._offer_retry({"question": turn["question"], "budget": ev["retry_budget"],
                                   "layer_id": turn["layer_id"], "area": turn.get("_area")})
            self._fail(turn, msg, short)
            if ev.get("code") in HEALTH_AFTER_ERRORS:
                self.refresh_health()

    def _offer_retry(self, retry):
        """Offer (or withdraw, for None) to ask again with a smaller budget.

        ``retry``: ``{"question", "budget", "layer_id", "area"}`` of the question that ran out
        of memory; the retry asks about that layer and area, whatever is chosen meanwhile."""
        self._retry = retry
        if retry is not None:
            self.retry_button.setText(f"Retry with budget {retry['budget']}")
        self._update_retry_button()

    def _withdraw_retry_about(self, layer_ids):
        """The conversations of ``layer_ids`` were cleared: a retry of their question is no
        longer offered (it would ask a question no longer in the chat)."""
        if self._retry is not None and self._retry["layer_id"] in layer_ids:
            self._offer_retry(None)

    def _update_retry_button(self):
        """The button only shows beside the conversation of the layer that ran out of memory."""
        layer = self.layer_combo.currentLayer()
        shown = self._retry is not None and layer is not None and layer.id() == self._retry["layer_id"]
        self.retry_button.setVisible(shown)

    def retry_smaller(self):
        """Ask the question that ran out of memory again, about the same layer and area, with
        the budget the engine suggested (it stays in the budget box for the next questions)."""
        if self._retry is None:
            return None
        retry = self._retry
        layer = QgsProject.instance().mapLayer(retry["layer_id"])
        if layer is None:
            self._offer_retry(None)
            self._notify("The layer that ran out of memory is no longer in the project.", MSG_WARNING)
            return None
        self.budget_spin.setValue(retry["budget"])
        return self.ask(retry["question"], layer=layer, area=retry["area"])

    def _finish(self, turn, ev):
        turn["answer"] = ev.get("answer", turn["answer"])
        turn["done"] = True
        tokens = ev.get("tokens") or {}
        timings = ev.get("timings") or {}
        turn["result"] = kept_result(ev)  # not the anchors, the CRS WKT nor the answer again
        strategy = ev.get("strategy")
        turn["meta"] = (f"{STRATEGY_SHORT_LABELS.get(strategy, strategy)}: {visual_tokens_text(tokens)}, "
                        f"{float(timings.get('total') or 0):.1f} s")
        # which bands the model saw (the result's bands; an older engine does not say)
        seen = bands_text(ev.get("bands"), ev.get("palette"), rendered=bool(turn.get("rendered_path")))
        if seen:
            turn["meta"] += f", {seen}"
        reduced = ev.get("upload_reduced")  # an upload reduced to what the engine reads (upload.py)
        if isinstance(reduced, dict) and len(reduced.get("sent") or ()) == 2 and len(reduced.get("of") or ()) == 2:
            (w, h), (ow, oh) = reduced["sent"], reduced["of"]
            turn["meta"] += f", sent at {w} x {h} of {ow} x {oh}"
        self.task = None
        self.current_request_id = None
        self._set_stop_enabled(False)
        self.progress_label.setText("Answered.")
        layer = QgsProject.instance().mapLayer(turn["layer_id"])
        if self._layer_removed_meanwhile(turn):
            pass  # result layers without their raster would only confuse
        elif self.heatmap_check.isChecked() and (ev.get("local_heatmap_path") or ev.get("local_anchors_path")):
            try:
                group, heat, anchors = result_layers.add_result_layers(
                    turn["question"], ev.get("local_heatmap_path"), ev.get("local_anchors_path"),
                    source_layer=layer, crs_wkt=ev.get("crs_wkt"))
                turn["group"] = group.name()
                turn["heatmap_layer_id"] = heat.id() if heat else None
                turn["anchors_layer_id"] = anchors.id() if anchors else None
            except result_layers.ResultLayerError as exc:
                self._notify(str(exc), MSG_WARNING)
        # its render, when written in a results folder (one in the temporary folder means the
        # results folder could not be written: the answer's files warning says so already)
        render = turn.get("rendered_path") if Path(turn.get("rendered_path") or "").parent.name == RENDERS else None
        if any(ev.get(k) for k in RESULT_PATHS) or render:
            # asked before a Save / Save As gave the project its results folder: its files (with
            # its layers, or without: its raster removed meanwhile, no layers wanted) and its
            # render go there
            moved = self._gather_results([ev.get(k) for k in RESULT_PATHS] + [render])
            ev = {**ev, **{k: moved_path(ev.get(k), moved) for k in RESULT_PATHS}}
        self._say_where_results_went(turn, ev)
        if ev.get("files_warning"):  # the answer is complete; only its layers are missing
            turn["files_warning"] = ev["files_warning"]
            self._notify(ev["files_warning"], MSG_WARNING)
        self._conversations_changed()
        self._update_removed_item()
        self.render_conversation()
        self.answer_finished.emit(turn)

    def _say_where_results_went(self, turn, ev):
        """The status line after an answer: where its layers (the group) and files went."""
        if turn.get("files_warning") or self.progress_label.text() != "Answered.":
            return  # a warning said what went wrong instead
        files = [ev.get(k) for k in ("local_heatmap_path", "local_anchors_path") if ev.get(k)]
        where = []
        if turn.get("group"):
            where.append(f"layers in the group '{turn['group']}'")
        if files:
            where.append(f"files in {Path(files[0]).parent}")
        self.progress_label.setText("Answered" + (": " + ", ".join(where) if where else "") + ".")

    def _fail(self, turn, message, short=None):
        """``message``: the whole error, with its hint, kept in the chat turn (the record);
        ``short``: the error without the hint, for the message bar (one line; the hint is read
        in the chat). Every failed question is reported so. A message longer than
        MAX_SHOWN_CHARS (an engine's of megabytes) is shown cut (:func:`engine_errors.shown_text`)
        and kept whole in QGIS's log and in Diagnostics (``last_error``)."""
        if len(message) > MAX_SHOWN_CHARS:  # megabytes of an engine's message: the whole in the log
            QgsMessageLog.logMessage(f"Question '{turn.get('question', '')}' failed: {message}", "GeoVQA",
                                     MSG_CRITICAL)
        turn["error"] = shown_text(message)  # the chat turn (saved with the project)
        turn["done"] = True
        self._layer_removed_meanwhile(turn)
        self.last_error = message
        self.task = None
        self.renderer = None
        self.current_request_id = None
        self._set_stop_enabled(False)
        self.progress_label.setText("")
        self._conversations_changed()
        self._update_removed_item()
        self.render_conversation()
        self._notify(" ".join((short or message).split()), MSG_CRITICAL)
        self.answer_finished.emit(turn)

    def _notify(self, message, level):
        message = shown_text(message)  # the whole of a longer one is logged by its caller
        try:
            self.iface.messageBar().pushMessage("GeoVQA", message, level=level, duration=8)
        except Exception:  # noqa: BLE001 - never let a message bar problem hide the error
            pass
        if level != MSG_WARNING:
            return
        self.progress_label.setText(message)

    # -- engine status ------------------------------------------------------------------------
    def refresh_health(self):
        if self._shut_down or (self.engine_process is not None and self.engine_process.shutting_down):
            return  # the dock is going away, or QGIS is quitting: no new task
        if self._health_task is not None:
            self._health_again = True  # its answer may be from before the change: check again
            return
        settings = Settings.load()
        try:
            client = make_client(settings)
        except EngineError as exc:
            self._health_done(None, str(exc))
            return
        self._health_task = HealthTask(client)
        self._health_task.done.connect(self._health_done)
        QgsApplication.taskManager().addTask(self._health_task)

    @staticmethod
    def _engine_host_port() -> str:
        try:
            _scheme, host, port, _prefix = engine_address(Settings.load().engine_url)
        except (EngineError, ValueError):
            return Settings.load().engine_url
        return host_port(host, port)

    def _health_done(self, health, error):
        code = getattr(self._health_task, "error_code", None)
        said = getattr(self._health_task, "error_message", "")
        self._health_task = None
        self.health, self.health_error, self.health_error_code = health, error, code
        level, text = engine_status.summary(health, error, Settings.load().engine_url)
        if self.engine_process is not None and self.engine_process.is_stopping():
            level, text = "loading", "The local engine is stopping …"
        elif (level == "down" and code == "engine_down" and self.engine_process is not None
              and self.engine_process.serves(Settings.load().engine_url)):
            # nothing answers where the engine started here will listen: it is loading its model
            # (another error, or another URL, is said as it is)
            level, text = "loading", "The local engine is starting (loading the model) …"
        if len(text) > MAX_SHOWN_CHARS or len(error or "") > MAX_SHOWN_CHARS:
            QgsMessageLog.logMessage(f"Engine status: {error or text}", "GeoVQA", MSG_WARNING)
        text = shown_text(text)  # an engine's message of megabytes, cut (the whole is logged)
        tooltip = shown_text(error or "")
        short = {"engine_down": "Engine not reachable at {}", "no_answer": "No answer from the engine at {}",
                 "not_an_engine": "Not a GeoVQA engine at {}"}.get(code)
        if level == "down" and short:
            # one short line; what the connection said and what to do are in the tooltip and
            # in Diagnostics
            text = short.format(self._engine_host_port())
        elif level == "down" and code == "wrong_protocol" and said:
            text = said  # both versions; which side to update is in the tooltip and in Diagnostics
        color = engine_status.COLORS[level]
        self.status_label.setText(f"<span style='color:{color}'>●</span> {html.escape(text)}")
        self.status_label.setToolTip(tooltip)
        self.status_level = level
        self.timer.setInterval(HEALTH_INTERVAL_MS if level in ("ok", "demo") else HEALTH_INTERVAL_BUSY_MS)
        self.health_updated.emit(health, error)
        if self._health_again:
            self._health_again = False
            self.refresh_health()

    def diagnostics_text(self) -> str:
        proc = self.engine_process
        return engine_status.diagnostics(
            self.plugin_version, Settings.load(), self.health, self.health_error,
            engine_log=proc.log_text() if proc else "", last_error=self.last_error,
            command=proc.command if proc else None)

    def copy_diagnostics(self):
        QApplication.clipboard().setText(self.diagnostics_text())
        self.progress_label.setText("Diagnostics copied to the clipboard.")

    # -- teardown -------------------------------------------------------------------------------
    def shutdown(self):
        self._shut_down = True
        self.timer.stop()
        self._render_timer.stop()
        try:
            settings_notifier.saved.disconnect(self._settings_saved)
        except TypeError:
            pass
        for signal, slot in self._project_signals:
            try:
                signal.disconnect(slot)
            except TypeError:
                pass
        self.stop(reason="stopped: the plugin was unloaded")  # so stored with the project
        if self._health_task is not None:
            try:
                self._health_task.done.disconnect(self._health_done)
            except TypeError:
                pass
            self._health_task.cancel()  # its call ends at once, not after the short timeout
            self._health_task = None
        self._remove_tool()
