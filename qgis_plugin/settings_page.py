"""The GeoVQA page in QGIS's Options dialog (engine URL, token, CA certificate, local engine,
outputs)."""

from __future__ import annotations

from pathlib import Path

from qgis.gui import QgsFileWidget, QgsOptionsPageWidget, QgsOptionsWidgetFactory
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import (QCheckBox, QComboBox, QFormLayout, QLabel, QLineEdit, QPushButton,
                                 QSpinBox, QVBoxLayout, QWidget)

from .settings import SEND_RASTERS_LABELS, STRATEGIES, STRATEGY_LABELS, TOKENS_PER_TILE_AUTO_TEXT, Settings, default_token_path, notifier
from .tls import CA_CERT_LABEL

ICON = str(Path(__file__).parent / "icons" / "geovqa.svg")
GET_DIRECTORY = getattr(getattr(QgsFileWidget, "StorageMode", QgsFileWidget), "GetDirectory")
PASSWORD = getattr(getattr(QLineEdit, "EchoMode", QLineEdit), "Password")
CA_CERT_FILTER = "PEM certificates (*.pem *.crt *.cer);;All files (*)"


class SettingsForm(QWidget):
    """Form bound to :class:`Settings`; ``apply()`` saves."""

    def __init__(self, parent=None):
        super().__init__(parent)
        s = Settings.load()
        form = QFormLayout(self)
        self.url = QLineEdit(s.engine_url)
        form.addRow("Engine URL", self.url)
        self.token = QLineEdit(s.token)
        self.token.setEchoMode(PASSWORD)
        self.token.setPlaceholderText(f"empty: read from {default_token_path()} (engine on this computer only)")
        form.addRow("Engine token", self.token)
        self.token_file = QgsFileWidget()
        self.token_file.setFilePath(s.token_file)
        form.addRow("Token file", self.token_file)
        self.ca_cert = QgsFileWidget()
        self.ca_cert.setFilter(CA_CERT_FILTER)
        self.ca_cert.setFilePath(s.ca_cert)
        self.ca_cert.setToolTip("For an https:// engine with a self-signed certificate: a copy of the file it "
                                "was started with as --tls-cert (never its key). Empty: the system's "
                                "trusted certificate authorities.")
        form.addRow(CA_CERT_LABEL, self.ca_cert)
        self.send_rasters = QComboBox()
        for value, label in SEND_RASTERS_LABELS.items():
            self.send_rasters.addItem(label, value)
        self.send_rasters.setCurrentIndex(max(0, self.send_rasters.findData(s.send_rasters)))
        form.addRow("Send rasters", self.send_rasters)
        form.addRow(QLabel("<b>Local engine</b> (Start/Stop from the GeoVQA menu)"))
        self.python = QgsFileWidget()
        self.python.setFilePath(s.python)
        form.addRow("Engine Python", self.python)
        self.engine_dir = QgsFileWidget()
        self.engine_dir.setStorageMode(GET_DIRECTORY)
        self.engine_dir.setFilePath(s.engine_dir)
        form.addRow("Engine folder", self.engine_dir)
        self.weights = QgsFileWidget()
        self.weights.setStorageMode(GET_DIRECTORY)
        self.weights.setFilePath(s.weights_dir)
        form.addRow("Weights folder", self.weights)
        self.extra = QLineEdit(s.extra_args)
        form.addRow("Extra engine arguments", self.extra)
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
        for name in STRATEGIES:
            self.strategy.addItem(STRATEGY_LABELS[name], name)
        self.strategy.setCurrentIndex(max(0, self.strategy.findData(s.strategy)))
        form.addRow("Default strategy", self.strategy)
        self.budget = QSpinBox()
        self.budget.setRange(0, 200000)
        self.budget.setSpecialValueText("engine default")
        self.budget.setValue(s.budget)
        form.addRow("Default token budget", self.budget)
        self.tpt = QSpinBox()
        self.tpt.setRange(0, 576)
        self.tpt.setSpecialValueText(TOKENS_PER_TILE_AUTO_TEXT)
        self.tpt.setValue(s.tokens_per_tile)
        form.addRow("Tokens per tile", self.tpt)
        self.faithful = QCheckBox("Send every tile's full count, as the released checkpoint")
        self.faithful.setToolTip(
            "GeoLLaVA-8K strategy only. The released model always reads 'tokens per tile' tokens "
            "a tile, zero tokens standing in for missing clusters in uniform tiles. Off (default): "
            "those empty slots are left out; the kept image tokens are the same.")
        self.faithful.setChecked(s.faithful_empty_slots)
        form.addRow("Empty cluster slots", self.faithful)
        self.max_new = QSpinBox()
        self.max_new.setRange(1, 4096)
        self.max_new.setValue(s.max_new_tokens)
        form.addRow("Max answer tokens", self.max_new)
        self.render_px = QSpinBox()
        self.render_px.setRange(256, 16384)
        self.render_px.setValue(s.render_max_px)
        form.addRow("Render size for web/virtual layers (px)", self.render_px)
        self.output = QgsFileWidget()
        self.output.setStorageMode(GET_DIRECTORY)
        self.output.setFilePath(s.output_dir)
        form.addRow("Results folder", self.output)
        form.addRow(QLabel("Empty results folder: 'geovqa_results' next to the project file, or the QGIS profile."))

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
        s = Settings.load()
        s.engine_url = self.url.text().strip() or s.engine_url
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
        notifier.saved.emit()


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
