"""The GeoVQA page in QGIS's Options dialog (engine URL, token, CA certificate, local engine,
outputs).

Kept narrow (short labels, combo texts and placeholders, the details in tooltips). The engine URL
is checked as it is typed and when saved: a URL the client cannot use (addresses.engine_address) is
not saved, and the page and QGIS's message bar say why. The CA certificate applies to https:// URLs only and is
greyed out otherwise."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

from qgis.gui import QgsFileWidget, QgsOptionsPageWidget, QgsOptionsWidgetFactory
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import (QCheckBox, QComboBox, QFormLayout, QLabel, QLineEdit, QPushButton,
                                 QSpinBox, QVBoxLayout, QWidget)

from .addresses import DEFAULT_ENGINE_URL, endpoint_in_url, engine_address
from .engine_errors import EngineError
from .settings import (SEND_RASTERS_LABELS, SEND_RASTERS_TIPS, STRATEGY_CHOICES, STRATEGY_LABELS, STRATEGY_TIPS,
                       TOKENS_PER_TILE_AUTO_TEXT,
                       Settings, default_token_path, folder_problem, notifier)
from .tls import CA_CERT_LABEL

ICON = str(Path(__file__).parent / "icons" / "geovqa.svg")
GET_DIRECTORY = getattr(getattr(QgsFileWidget, "StorageMode", QgsFileWidget), "GetDirectory")
PASSWORD = getattr(getattr(QLineEdit, "EchoMode", QLineEdit), "Password")
CA_CERT_FILTER = "PEM certificates (*.pem *.crt *.cer);;All files (*)"
TOOLTIP_ROLE = Qt.ItemDataRole.ToolTipRole
RESULTS_NOTE = "Empty results folder: 'geovqa_results' next to the project file, or the QGIS profile."


# what an empty 'Weights folder' means: the engine looks there (engine/weights.py DEFAULT_WEIGHTS)
WEIGHTS_DEFAULT = "<engine folder>/weights/GeoLLaVA-8K"
# Placeholders fit their field at the page's own width (a cut-off one says nothing): short, with
# the whole rule in the field's tooltip.
WEIGHTS_PLACEHOLDER = "empty: weights/GeoLLaVA-8K"


def url_problem(text: str) -> str:
    """Why the engine URL ``text`` cannot be used ('' when it can; empty keeps the saved one)."""
    if not text.strip():
        return ""
    try:
        engine_address(text)
    except EngineError as exc:
        return str(exc)
    base = endpoint_in_url(text)
    if base:
        return (f"The engine URL {text.strip()} ends in one of the engine's endpoints; every call adds "
                f"its own. Use the engine's base URL: {base}")
    return ""


def _narrow_combo(combo: QComboBox, chars: int = 18):
    """The combo's width no longer follows its longest entry (the entries' tooltips say it all)."""
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(chars)


class SettingsForm(QWidget):
    """Form bound to :class:`Settings`; ``apply()`` saves."""

    def __init__(self, parent=None):
        super().__init__(parent)
        s = Settings.load()
        form = QFormLayout(self)
        self._saved_url = s.engine_url
        self.url_problem = ""  # why the URL was not saved by the last apply()
        self.url = QLineEdit(s.engine_url)
        self.url.setPlaceholderText(f"empty: keep {s.engine_url or DEFAULT_ENGINE_URL}")
        self.url.setToolTip("Where the plugin calls the engine, e.g. http://127.0.0.1:8765 (an engine on this "
                            "computer: Start local engine serves on this host and port), or https://host:port "
                            "for one on another computer.")
        form.addRow("Engine URL", self.url)
        form.labelForField(self.url).setToolTip(self.url.toolTip())
        self.url_error = QLabel("")
        self.url_error.setWordWrap(True)
        self.url_error.setStyleSheet("color: #b00020")
        self.url_error.setVisible(False)
        form.addRow(self.url_error)
        self.token = QLineEdit(s.token)
        self.token.setEchoMode(PASSWORD)
        self.token.setPlaceholderText("empty: the local engine's token file")
        self.token.setToolTip("The engine's access token. Empty: the plugin reads the token file the engine "
                              f"writes at its first start ({default_token_path()}), which works for an engine "
                              "on this computer only; copy the token here for one on another computer. A token "
                              "typed here is kept in plain text in the QGIS profile's settings; to keep it out "
                              "of them, save it in a file only you may read and choose that file below.")
        form.addRow("Engine token", self.token)
        form.labelForField(self.token).setToolTip(self.token.toolTip())
        self.token_file = QgsFileWidget()
        self.token_file.setFilePath(s.token_file)
        self.token_file.setToolTip("A file holding the engine token. A token typed in 'Engine token' wins "
                                   "over this file; with both empty, the engine's own token file on this "
                                   "computer is read. A file keeps the token out of the QGIS profile's settings "
                                   "(make it readable by you only, e.g. chmod 600).")
        form.addRow("Token file", self.token_file)
        self.ca_cert = QgsFileWidget()
        self.ca_cert.setFilter(CA_CERT_FILTER)
        self.ca_cert.setFilePath(s.ca_cert)
        self.ca_cert.setToolTip("For an https:// engine with a self-signed certificate: a copy of the file it "
                                "was started with as --tls-cert (never its key). Empty: the system's "
                                "trusted certificate authorities. Used for https:// engine URLs only.")
        form.addRow(CA_CERT_LABEL, self.ca_cert)
        form.labelForField(self.ca_cert).setToolTip(self.ca_cert.toolTip())
        self.send_rasters = QComboBox()
        for value, label in SEND_RASTERS_LABELS.items():
            self.send_rasters.addItem(label, value)
            self.send_rasters.setItemData(self.send_rasters.count() - 1, SEND_RASTERS_TIPS[value], TOOLTIP_ROLE)
        self.send_rasters.setCurrentIndex(max(0, self.send_rasters.findData(s.send_rasters)))
        self.send_rasters.currentIndexChanged.connect(self._send_rasters_tip)
        self._send_rasters_tip()
        form.addRow("Send rasters", self.send_rasters)
        form.addRow(QLabel("<b>Local engine</b> (Start/Stop from the GeoVQA menu)"))
        self.python = QgsFileWidget()
        self.python.setFilePath(s.python)
        # as engine_process.engine_command resolves them
        self.python.lineEdit().setPlaceholderText("empty: the engine folder's .venv")
        self.python.setToolTip("The python of the venv with torch, e.g. <repo>/.venv/bin/python. Empty: the "
                               "engine folder's .venv (bin/python, or Scripts/python.exe on Windows).")
        form.addRow("Engine Python", self.python)
        self.engine_dir = QgsFileWidget()
        self.engine_dir.setStorageMode(GET_DIRECTORY)
        self.engine_dir.setFilePath(s.engine_dir)
        self.engine_dir.lineEdit().setPlaceholderText("empty: above the Python's .venv")
        self.engine_dir.setToolTip("The folder the engine runs in. Empty: the folder holding the engine "
                                   "Python's venv (<repo> for <repo>/.venv/bin/python).")
        form.addRow("Engine folder", self.engine_dir)
        self.weights = QgsFileWidget()
        self.weights.setStorageMode(GET_DIRECTORY)
        self.weights.setFilePath(s.weights_dir)
        self.weights.lineEdit().setPlaceholderText(WEIGHTS_PLACEHOLDER)
        self.weights.setToolTip(
            "The GeoLLaVA-8K checkpoint folder the local engine loads (passed as --weights). Empty: the "
            f"engine uses $GEOVQA_WEIGHTS when set, else {WEIGHTS_DEFAULT} (where `make "
            "weights` downloads it); with no checkpoint there it answers with the tiny RANDOM demo model "
            "(meaningless answers). A folder named here must hold a checkpoint.")
        form.addRow("Weights folder", self.weights)
        form.labelForField(self.weights).setToolTip(self.weights.toolTip())
        self.extra = QLineEdit(s.extra_args)
        self.extra.setPlaceholderText("e.g. --device cpu --quantization bf16")
        self.extra.setToolTip(
            "More options of `python -m engine serve` for the local engine, separated by spaces (quote a "
            "path with spaces), e.g. --device cpu, --quantization bf16 (auto, nf4, bf16, fp16, fp32), --adapter DIR "
            "(a fine-tuned LoRA adapter), --no-demo. The host and port come from the Engine URL: do not "
            "put --port here.")
        form.addRow("Extra engine arguments", self.extra)
        form.labelForField(self.extra).setToolTip(self.extra.toolTip())
        self.memory_button = QPushButton("Check memory")
        self.memory_button.setToolTip("Ask the engine (without loading the model) how much memory each "
                                      "weight format needs on this computer and what is free.")
        self.memory_button.clicked.connect(self.check_memory)
        self.memory_label = QLabel("")
        self.memory_label.setWordWrap(True)
        form.addRow(self.memory_button, self.memory_label)
        self._memory_check = None
        form.addRow(QLabel("<b>Answers</b>"))
        self.strategy = QComboBox()
        for name in STRATEGY_CHOICES:  # the last: "Engine's default" (the adapter's)
            self.strategy.addItem(STRATEGY_LABELS[name], name)
            self.strategy.setItemData(self.strategy.count() - 1, STRATEGY_TIPS[name], TOOLTIP_ROLE)
        _narrow_combo(self.strategy)
        self.strategy.setCurrentIndex(max(0, self.strategy.findData(s.strategy)))
        form.addRow("Default strategy", self.strategy)
        self.budget = QSpinBox()
        self.budget.setRange(0, 200000)
        self.budget.setSpecialValueText("engine default")
        self.budget.setValue(s.budget)
        self.budget.setToolTip("How many image tokens the model may read at most for an answer (the dock's "
                               "starting value). Fewer: faster and less memory, but small things may be "
                               "dropped. 0: the engine's default.")
        form.addRow("Default token budget", self.budget)
        form.labelForField(self.budget).setToolTip(self.budget.toolTip())
        self.tpt = QSpinBox()
        self.tpt.setRange(0, 576)
        self.tpt.setSpecialValueText(TOKENS_PER_TILE_AUTO_TEXT)
        self.tpt.setValue(s.tokens_per_tile)
        self.tpt.setToolTip("Image tokens kept for each 336 px tile (at most 576), the dock's starting value; "
                            f"{self.tpt.specialValueText()} (0): the {TOKENS_PER_TILE_AUTO_TEXT}.")
        form.addRow("Tokens per tile", self.tpt)
        form.labelForField(self.tpt).setToolTip(self.tpt.toolTip())
        self.faithful = QCheckBox("Full count a tile, as released")
        self.faithful.setToolTip(
            "GeoLLaVA-8K strategy only. The released model always reads 'tokens per tile' tokens "
            "a tile, zero tokens standing in for missing clusters in uniform tiles. Off (default): "
            "those empty slots are left out; the kept image tokens are the same. With the strategy "
            "\"Engine's default\" this is not sent: the adapter's setting (else off) is used.")
        self.faithful.setChecked(s.faithful_empty_slots)
        form.addRow("Empty cluster slots", self.faithful)
        self.max_new = QSpinBox()
        self.max_new.setRange(1, 4096)
        self.max_new.setValue(s.max_new_tokens)
        self.max_new.setToolTip("The longest answer, in text tokens (about 3/4 of a word each); the answer "
                                "stops there.")
        form.addRow("Max answer tokens", self.max_new)
        form.labelForField(self.max_new).setToolTip(self.max_new.toolTip())
        self.render_px = QSpinBox()
        self.render_px.setRange(256, 16384)
        self.render_px.setValue(s.render_max_px)
        # the maximum stays 16384: a long, narrow area (16000 x 4000 px) is still within what the
        # engine reads; a render is capped to the engine's read budget where it is known
        self.render_px.setToolTip(
            "Longest side, in pixels, of the image rendered from a web or virtual layer (what the map shows "
            "of it) before it is asked about. A render never holds more pixels than the engine reads of a "
            "raster (its max_read_pixels, in its status: 8064 x 8064 for GeoLLaVA-8K): where the engine "
            "says so, a larger one is made at that many pixels, aspect kept, and the status line says so. "
            "So above 8064 this helps only long, narrow areas (e.g. 16000 x 4000 px).")
        form.addRow("Render size (px)", self.render_px)
        form.labelForField(self.render_px).setToolTip(self.render_px.toolTip())
        self.output = QgsFileWidget()
        self.output.setStorageMode(GET_DIRECTORY)
        self.output.setFilePath(s.output_dir)
        form.addRow("Results folder", self.output)
        self.results_note = QLabel("")
        self.results_note.setWordWrap(True)
        self.results_note.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        form.addRow(self.results_note)
        self.output.fileChanged.connect(self._update_results_note)
        self._update_results_note()
        self.url.textChanged.connect(self._url_changed)
        self._url_changed()

    def _send_rasters_tip(self, *_):
        self.send_rasters.setToolTip(SEND_RASTERS_TIPS.get(self.send_rasters.currentData(), ""))

    def _update_results_note(self, *_):
        """The folder in use now (with the field as it stands), besides the rule for an empty field."""
        s = Settings.load()
        s.output_dir = self.output.filePath()
        folder = s.results_dir()
        problem = folder_problem(folder)  # said now, not first at the next answer
        self.results_note.setText(f"{RESULTS_NOTE} In use now: {folder}"
                                  + (f"\n{problem} Choose another folder." if problem else ""))

    def _url_changed(self, *_):
        text = self.url.text().strip()
        problem = url_problem(text)
        self.url_error.setText(problem)
        self.url_error.setVisible(bool(problem))
        scheme = urllib.parse.urlsplit(text or self._saved_url or DEFAULT_ENGINE_URL).scheme.lower()
        self.ca_cert.setEnabled(scheme == "https")

    def check_memory(self):
        """Run `engine info --memory` with the local-engine fields as they stand in the form."""
        from .engine_process import MemoryCheck

        s = self._with_local_engine_fields(Settings.load())
        if self._memory_check is None:
            self._memory_check = MemoryCheck(self)
            self._memory_check.done.connect(self._memory_done)
        self.memory_button.setEnabled(False)
        self.memory_label.setText("Checking …")
        self._memory_check.start(s)

    def _memory_done(self, report, error):
        from .engine_process import memory_summary

        self.memory_button.setEnabled(True)
        self.memory_label.setText(memory_summary(report) if report else f"Cannot tell: {error}")

    def _with_local_engine_fields(self, s: Settings) -> Settings:
        """`s` with the form's local-engine fields (Python, folder, weights, extra arguments)."""
        s.python = self.python.filePath()
        s.engine_dir = self.engine_dir.filePath()
        s.weights_dir = self.weights.filePath()
        s.extra_args = self.extra.text()
        return s

    def apply(self):
        """Save the form. An engine URL the client cannot use is not saved (the one saved before
        stays), nor are the connection fields typed with it (token, token file, CA certificate,
        Send rasters: a token for engine B never goes to engine A): the page and QGIS's message
        bar say why."""
        s = Settings.load()
        url = self.url.text().strip()
        self.url_problem = url_problem(url)
        if self.url_problem:
            self.url_error.setText(self.url_problem)
            self.url_error.setVisible(True)
            self._warn(f"The engine URL and its connection settings (token, token file, CA "
                       f"certificate, Send rasters) were not saved (still those of {s.engine_url}): "
                       f"{self.url_problem}")
        else:  # the token typed with a URL is for that URL's engine: never saved for another
            s.engine_url = url or s.engine_url
            s.token = self.token.text().strip()
            s.token_file = self.token_file.filePath()
            s.ca_cert = self.ca_cert.filePath().strip()
            s.send_rasters = self.send_rasters.currentData()
        self._with_local_engine_fields(s)
        s.strategy = self.strategy.currentData()
        s.budget = self.budget.value()
        s.tokens_per_tile = self.tpt.value()
        s.faithful_empty_slots = self.faithful.isChecked()
        s.max_new_tokens = self.max_new.value()
        s.render_max_px = self.render_px.value()
        s.output_dir = self.output.filePath()
        s.save()
        self._saved_url = s.engine_url
        notifier.saved.emit()

    @staticmethod
    def _warn(text: str):
        try:
            from qgis.utils import iface
        except ImportError:  # noqa: BLE001 - not inside QGIS
            iface = None
        if iface is not None:
            try:
                iface.messageBar().pushWarning("GeoVQA", text)
            except Exception:  # noqa: BLE001 - a test double without a message bar
                pass


PAGE_OBJECT_NAME = "mOptionsPageGeoVQA"


class GeoVQAOptionsPage(QgsOptionsPageWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName(PAGE_OBJECT_NAME)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.form = SettingsForm(self)
        lay.addWidget(self.form)

    def apply(self):
        self.form.apply()


class GeoVQAOptionsFactory(QgsOptionsWidgetFactory):
    def __init__(self):
        super().__init__()
        self.setTitle("GeoVQA")

    def icon(self):
        return QIcon(ICON)

    def createWidget(self, parent):  # noqa: N802
        return GeoVQAOptionsPage(parent)
