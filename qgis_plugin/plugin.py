"""GeoVQAPlugin: wires the dock, batch dialog, options page, local engine and Processing
provider into QGIS, and removes every one of them again in ``unload()``.

Its menu actions are registered with QGIS's shortcut manager under stable object names (see
ACTION_NAMES), so Settings > Keyboard Shortcuts lists them and a shortcut given to one there
comes back with the plugin (also after a reload, which unregisters the old ones)."""

from __future__ import annotations

import configparser
from pathlib import Path

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon

from .compat import MSG_CRITICAL, MSG_INFO, MSG_WARNING, qaction_class
from .engine_process import EngineProcess, EngineProcessError
from .settings import Settings

HERE = Path(__file__).resolve().parent
ICON = str(HERE / "icons" / "geovqa.svg")
MENU = "&GeoVQA"
# object names of the actions: the shortcut manager keeps a user's shortcut under them
ACTION_NAMES = {"chat": "mActionGeoVQAChat", "batch": "mActionGeoVQABatchQuestions",
                "start": "mActionGeoVQAStartEngine", "stop": "mActionGeoVQAStopEngine",
                "settings": "mActionGeoVQASettings"}
QAction = qaction_class()


def plugin_version() -> str:
    cp = configparser.ConfigParser()
    cp.read(HERE / "metadata.txt", encoding="utf-8")
    return cp.get("general", "version", fallback="?")


class GeoVQAPlugin:
    def __init__(self, iface):
        self.iface = iface
        self.provider = None
        self.dock = None
        self.batch_dialog = None
        self.options_factory = None
        self.engine = None
        self.actions = []
        self.toolbar = None

    # -- Processing (also called by qgis_process, where iface is None) ------------------------
    def initProcessing(self):  # noqa: N802
        from .processing.provider import GeoVQAProvider

        if self.provider is None:
            self.provider = GeoVQAProvider()
            QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self):  # noqa: N802
        self.initProcessing()
        if self.iface is None:
            return
        from .dock import ChatDock
        from .settings_page import PAGE_OBJECT_NAME, GeoVQAOptionsFactory

        self.engine = EngineProcess()
        self.engine.state_changed.connect(self._engine_state)
        self.dock = ChatDock(self.iface, self.engine, plugin_version(), self.iface.mainWindow())
        self.iface.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.dock)
        self.iface.currentLayerChanged.connect(self.dock.follow_active_layer)
        self.dock.follow_active_layer(self.iface.activeLayer())

        self.options_factory = GeoVQAOptionsFactory()
        self.iface.registerOptionsWidgetFactory(self.options_factory)

        icon = QIcon(ICON)
        self.toggle_action = self.dock.toggleViewAction()
        self.toggle_action.setIcon(icon)
        self.toggle_action.setText("GeoVQA chat")
        self._add_action(self.toggle_action, "chat", self._chat_toggled, toolbar=True, own=False)
        self._add_action(QAction(icon, "Batch questions…", self.iface.mainWindow()), "batch", self.open_batch)
        self.start_action = self._add_action(QAction("Start local engine", self.iface.mainWindow()), "start",
                                             self.start_engine)
        self.stop_action = self._add_action(QAction("Stop local engine", self.iface.mainWindow()), "stop",
                                            self.stop_engine)
        self._add_action(QAction("Settings…", self.iface.mainWindow()), "settings",
                         lambda: self.iface.showOptionsDialog(self.iface.mainWindow(), currentPage=PAGE_OBJECT_NAME))

    def _add_action(self, action, key, callback=None, toolbar=False, own=True):
        """Into the GeoVQA menu (and the toolbar), and the shortcut manager as ACTION_NAMES[key]."""
        action.setObjectName(ACTION_NAMES[key])
        if callback is not None:
            action.triggered.connect(callback)
        self.iface.addPluginToMenu(MENU, action)
        if toolbar:
            self.iface.addToolBarIcon(action)
        self.iface.registerMainWindowAction(action, "")  # no default key: the user gives one
        self.actions.append((action, toolbar, own))
        return action

    def _chat_toggled(self, shown):
        """GeoVQA chat showed the dock: the question box has the focus, to type at once."""
        if shown and self.dock is not None:
            self.dock.show_for_typing()

    def unload(self):
        for action, toolbar, own in self.actions:
            self.iface.unregisterMainWindowAction(action)
            self.iface.removePluginMenu(MENU, action)
            if toolbar:
                self.iface.removeToolBarIcon(action)
            if own:
                action.deleteLater()
        self.actions = []
        if self.dock is not None:
            try:
                self.iface.currentLayerChanged.disconnect(self.dock.follow_active_layer)
            except TypeError:
                pass
            self.dock.shutdown()
            self.iface.removeDockWidget(self.dock)
            self.dock.setParent(None)
            self.dock.deleteLater()
            self.dock = None
        if self.batch_dialog is not None:
            self.batch_dialog.shutdown()
            self.batch_dialog.close()
            self.batch_dialog.deleteLater()
            self.batch_dialog = None
        if self.options_factory is not None:
            self.iface.unregisterOptionsWidgetFactory(self.options_factory)
            self.options_factory = None
        if self.engine is not None:
            self.engine.shutdown()  # a short, bounded wait: the engine must not outlive QGIS
            self.engine = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None

    # -- actions --------------------------------------------------------------------------------
    def open_batch(self):
        from .batch_dialog import BatchDialog

        if self.batch_dialog is None:
            # renders no larger than the engine reads, as the dock's last status check says
            self.batch_dialog = BatchDialog(self.iface, engine_health=self._engine_health)
        else:
            self.batch_dialog.refresh_layers()
        self.batch_dialog.show()
        self.batch_dialog.raise_()
        return self.batch_dialog

    def _engine_health(self):
        """The engine's last ``/health`` answer, as the chat dock's status check got it (or None)."""
        return self.dock.health if self.dock is not None else None

    def start_engine(self):
        try:
            self.engine.start(Settings.load())
        except EngineProcessError as exc:
            self.iface.messageBar().pushMessage("GeoVQA", str(exc), level=MSG_CRITICAL, duration=10)
            return False
        self.iface.messageBar().pushMessage("GeoVQA", "Starting the local engine; the model takes a while to load.",
                                            level=MSG_INFO, duration=5)
        return True

    def stop_engine(self):
        """Stop the engine started from this QGIS; say so when none runs (an engine started
        elsewhere cannot be stopped from here). Returns True when one was asked to stop."""
        if self.engine is None:
            return False
        if not self.engine.is_running():
            self.iface.messageBar().pushMessage(
                "GeoVQA", "No local engine started from this QGIS is running, so there is nothing to stop. "
                "An engine started elsewhere (a terminal, make serve, another QGIS) is stopped there; one "
                "left running by a QGIS that crashed ends by itself within seconds.",
                level=MSG_WARNING, duration=10)
            return False
        self.engine.stop()
        return True

    def _engine_state(self, state):
        if self.engine is None or self.engine.shutting_down:
            return  # QGIS is quitting (or the plugin unloading): no status check, no message
        if self.dock is not None:
            self.dock.refresh_health()
        if state == "failed":
            reason = self.engine.failure_reason() if self.engine is not None else ""
            if len(reason) > 400:
                reason = reason[:400] + " …"
            if self.engine is not None and self.engine.start_error:
                text = f"The local engine could not be started: {reason}"
            else:
                text = (f"The local engine stopped: {reason}" if reason
                        else "The local engine stopped with an error")
            self.iface.messageBar().pushMessage(
                "GeoVQA", text + " (its log is in Copy diagnostics, in the GeoVQA dock's ⋯ menu).",
                level=MSG_CRITICAL, duration=15)
