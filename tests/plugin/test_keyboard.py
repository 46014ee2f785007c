"""The plugin's UI used from the keyboard and with a screen reader: real key events
(QTest.keyClick / keyClicks) sent to the real dock, batch dialog and options page, in real
QGIS 3.22 (offscreen). Also the names a screen reader says, and the actions QGIS's shortcut
manager lists.

A screen reader's name for a widget is what Qt's accessibility layer gives it
(QAccessibleWidget::text(Name), Qt 5): its accessibleName(), else the text of the QLabel whose
buddy it is, else (a button) its own text. PyQt5 does not wrap QAccessible, so
``accessible_name`` below follows that rule."""

from __future__ import annotations

import re

from conftest import run_batch_dialog, wait_for_tasks, wait_until


def _settle(n=10):
    from qgis.core import QgsApplication

    for _ in range(n):
        QgsApplication.processEvents()


def accessible_name(w) -> str:
    """What a screen reader says a widget is called (Qt 5's rule, see the module's doc)."""
    from qgis.PyQt.QtWidgets import QAbstractButton, QLabel

    if w.accessibleName():
        return w.accessibleName()
    parent = w.parentWidget()
    if parent is not None:
        for label in parent.findChildren(QLabel):
            if label.buddy() is w:
                return label.text().replace("&", "")
    if isinstance(w, QAbstractButton):
        return w.text().replace("&", "")
    return ""


def _focused_dock(plugin, qgis_iface, layer):
    """The dock, floating and active (a window of its own has the keyboard), about ``layer``."""
    from qgis.PyQt.QtWidgets import QApplication

    qgis_iface.mainWindow().show()
    dock = plugin.dock
    dock.set_layer(layer)
    dock.setFloating(True)
    dock.resize(380, 640)
    dock.show()
    dock.activateWindow()
    _settle()
    assert QApplication.activeWindow() is dock
    return dock


def _focus():
    from qgis.PyQt.QtWidgets import QApplication

    return QApplication.focusWidget()


def _answered(dock, layer, n=1):
    return lambda: sum(1 for t in dock.conversations.get(layer.id(), []) if t.get("done")) >= n


# -- the chat dock -------------------------------------------------------------------------------

def test_tab_goes_layer_area_conversation_question_ask_stop(plugin, qgis_iface, raster_layer, stub_engine):
    """The Tab order follows the dock's layout, top to bottom (the conversation is above the
    question box), and Tab leaves the read-only conversation (no keyboard trap)."""
    from qgis.PyQt.QtCore import Qt
    from qgis.PyQt.QtTest import QTest

    layer = raster_layer()
    dock = _focused_dock(plugin, qgis_iface, layer)
    dock.set_aoi_mode("rectangle")  # Draw enabled
    dock.question_edit.setText("How many fields?")
    stub_engine.token_delay = 0.2
    dock.layer_combo.setFocus()
    _settle()
    order = [_focus()]
    for _ in range(6):
        QTest.keyClick(_focus(), Qt.Key.Key_Tab)
        order.append(_focus())
    assert order == [dock.layer_combo, dock.aoi_combo, dock.draw_button, dock.view, dock.question_edit,
                     dock.ask_button, dock.options_box]
    dock.set_aoi_mode("layer")
    dock.ask()  # Stop is enabled while the answer streams: it follows Ask (disabled, empty box)
    dock.question_edit.setFocus()
    QTest.keyClick(dock.question_edit, Qt.Key.Key_Tab)
    assert _focus() is dock.stop_button
    QTest.keyClick(dock.stop_button, Qt.Key.Key_Space)
    assert not dock.is_asking()
    wait_for_tasks()


def test_enter_asks_and_the_box_is_emptied_for_the_next(plugin, qgis_iface, raster_layer, stub_engine):
    """Enter in the question box asks (README: "press Enter"); the box is a single line, so
    Shift+Enter asks too (there is no multi-line question)."""
    from qgis.PyQt.QtCore import Qt
    from qgis.PyQt.QtTest import QTest

    layer = raster_layer()
    dock = _focused_dock(plugin, qgis_iface, layer)
    dock.question_edit.setFocus()
    QTest.keyClicks(dock.question_edit, "How many fields?")
    QTest.keyClick(dock.question_edit, Qt.Key.Key_Return)
    wait_until(_answered(dock, layer), 30, "the answer")
    assert dock.turns(layer)[0]["question"] == "How many fields?"
    assert dock.question_edit.text() == "" and _focus() is dock.question_edit
    QTest.keyClicks(dock.question_edit, "And the river?")
    QTest.keyClick(dock.question_edit, Qt.Key.Key_Return, Qt.KeyboardModifier.ShiftModifier)
    wait_until(_answered(dock, layer, 2), 30, "the second answer")
    assert [t["question"] for t in dock.turns(layer)] == ["How many fields?", "And the river?"]
    wait_for_tasks()


def test_escape_stops_the_question_and_closes_nothing(plugin, qgis_iface, raster_layer, stub_engine):
    """Escape in the question box of a floating dock stops the question being answered (as Stop),
    closes nothing and keeps the draft typed meanwhile; the focus stays in the box."""
    from qgis.PyQt.QtCore import Qt
    from qgis.PyQt.QtTest import QTest

    layer = raster_layer()
    dock = _focused_dock(plugin, qgis_iface, layer)
    stub_engine.token_delay = 0.2
    dock.question_edit.setFocus()
    QTest.keyClicks(dock.question_edit, "How many fields?")
    QTest.keyClick(dock.question_edit, Qt.Key.Key_Return)
    QTest.keyClicks(dock.question_edit, "draft")
    QTest.keyClick(dock.question_edit, Qt.Key.Key_Escape)
    _settle()
    stopped = not dock.is_asking()
    dock.stop()
    wait_for_tasks()
    assert dock.isVisible() and dock.question_edit.text() == "draft"
    assert stopped
    assert dock.turns(layer)[0]["meta"] == "stopped" and _focus() is dock.question_edit


def test_escape_with_a_modifier_stops_nothing(plugin, qgis_iface, raster_layer, stub_engine):
    """Only a plain Escape stops the question: Shift+Escape or Ctrl+Escape (a shortcut of the
    desktop or of another program) lets it run."""
    from qgis.PyQt.QtCore import Qt
    from qgis.PyQt.QtTest import QTest

    layer = raster_layer()
    dock = _focused_dock(plugin, qgis_iface, layer)
    stub_engine.token_delay = 0.2
    dock.question_edit.setFocus()
    dock.ask("How many fields?")
    running = []
    for modifier in (Qt.KeyboardModifier.ShiftModifier, Qt.KeyboardModifier.ControlModifier):
        QTest.keyClick(dock.question_edit, Qt.Key.Key_Escape, modifier)
        _settle()
        running.append(dock.is_asking())
    dock.stop()
    wait_for_tasks()
    assert running == [True, True]


def test_the_conversation_can_be_selected_and_copied_with_the_keyboard(plugin, qgis_iface, raster_layer,
                                                                        stub_engine):
    """The conversation takes the focus (Tab reaches it); Ctrl+A / Ctrl+C copy it."""
    from qgis.PyQt.QtCore import Qt
    from qgis.PyQt.QtTest import QTest
    from qgis.PyQt.QtWidgets import QApplication

    layer = raster_layer()
    dock = _focused_dock(plugin, qgis_iface, layer)
    dock.ask("How many fields?")
    wait_until(_answered(dock, layer), 30, "the answer")
    wait_for_tasks()
    QApplication.clipboard().setText("")
    dock.view.setFocus()
    QTest.keyClick(dock.view, Qt.Key.Key_A, Qt.KeyboardModifier.ControlModifier)
    QTest.keyClick(dock.view, Qt.Key.Key_C, Qt.KeyboardModifier.ControlModifier)
    copied = QApplication.clipboard().text()
    assert "You: How many fields?" in copied and "GeoVQA:" in copied


def test_after_asking_with_the_ask_button_focus_is_back_in_the_question_box(plugin, qgis_iface, raster_layer,
                                                                             stub_engine):
    """A keyboard user types a question, tabs to Ask and presses Space (as a screen-reader user
    does): Ask turns disabled with the box emptied, and the focus goes back to the box (Qt
    moved it on to the "Strategy and token budget" box) for the next question."""
    from qgis.PyQt.QtCore import Qt
    from qgis.PyQt.QtTest import QTest

    layer = raster_layer()
    dock = _focused_dock(plugin, qgis_iface, layer)
    dock.question_edit.setFocus()
    QTest.keyClicks(dock.question_edit, "How many fields?")
    QTest.keyClick(dock.question_edit, Qt.Key.Key_Tab)
    assert _focus() is dock.ask_button
    QTest.keyClick(dock.ask_button, Qt.Key.Key_Space)
    wait_until(_answered(dock, layer), 30, "the answer")
    wait_for_tasks()
    _settle()
    assert dock.turns(layer)[0]["question"] == "How many fields?"
    focused = _focus()
    assert focused is dock.question_edit, f"focus is on {type(focused).__name__} {accessible_name(focused)!r}"


def test_opening_the_dock_from_its_action_puts_the_focus_in_the_question_box(plugin, qgis_iface, raster_layer):
    """GeoVQA chat (menu or toolbar) shows the dock with the focus in the question box: the
    user types at once."""
    from qgis.PyQt.QtCore import Qt

    layer = raster_layer()
    mw = qgis_iface.mainWindow()
    mw.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, plugin.dock)  # as QGIS's iface.addDockWidget
    plugin.dock.set_layer(layer)
    plugin.dock.hide()
    mw.show()
    mw.activateWindow()
    qgis_iface.mapCanvas().setFocus()
    _settle()
    plugin.toggle_action.trigger()
    _settle()
    assert plugin.dock.isVisible()
    focused = _focus()
    assert focused is plugin.dock.question_edit, f"focus is on {type(focused).__name__}"


def test_every_dock_control_has_a_name_a_screen_reader_can_say(plugin, qgis_iface, raster_layer):
    """Also the Area combo (its form row holds a layout, so QFormLayout gave its label no buddy),
    the question box (a placeholder is no name), the conversation, and the '⋯' button (else
    read out as "midline horizontal ellipsis")."""
    layer = raster_layer()
    dock = _focused_dock(plugin, qgis_iface, layer)
    dock.set_aoi_mode("rectangle")
    dock.question_edit.setText("q")
    widgets = {"layer": dock.layer_combo, "area": dock.aoi_combo, "draw": dock.draw_button,
               "conversation": dock.view, "question": dock.question_edit, "ask": dock.ask_button,
               "stop": dock.stop_button, "copy": dock.copy_button, "export": dock.export_button,
               "more": dock.more_button}
    names = {key: accessible_name(w) for key, w in widgets.items()}
    unnamed = {key: name for key, name in names.items() if not re.search(r"[A-Za-z]", name)}
    assert unnamed == {}
    assert names["more"] == "More actions" and names["area"] == "Area"


def test_the_engine_status_and_errors_are_said_in_words_not_only_colour(plugin, qgis_iface, raster_layer,
                                                                        stub_engine):
    """The status dot's colour comes with a sentence; an error turn says Error."""
    layer = raster_layer()
    dock = _focused_dock(plugin, qgis_iface, layer)
    wait_until(lambda: getattr(dock, "status_level", None) == "demo", 20, "the status check")
    assert "DEMO model" in dock.status_label.text()
    stub_engine.fail_with = {"code": "out_of_memory", "message": "The GPU ran out of memory."}
    dock.ask("How many fields?")
    wait_until(_answered(dock, layer), 30, "the error")
    wait_for_tasks()
    assert "Error: The GPU ran out of memory." in dock.view.toPlainText()


def test_stopping_with_the_stop_button_leaves_the_focus_in_the_question_box(plugin, qgis_iface, raster_layer,
                                                                            stub_engine):
    """Space on Stop stops the question; Stop turns disabled, and the focus goes back to the
    question box (not on to the next widget)."""
    from qgis.PyQt.QtCore import Qt
    from qgis.PyQt.QtTest import QTest

    layer = raster_layer()
    dock = _focused_dock(plugin, qgis_iface, layer)
    stub_engine.token_delay = 0.2
    dock.ask("How many fields?")
    dock.stop_button.setFocus()
    QTest.keyClick(dock.stop_button, Qt.Key.Key_Space)
    _settle()
    wait_for_tasks()
    assert not dock.is_asking() and dock.turns(layer)[0]["meta"] == "stopped"
    assert _focus() is dock.question_edit


def test_an_answer_coming_while_stop_has_the_focus_leaves_it_in_the_question_box(plugin, qgis_iface, raster_layer,
                                                                                 stub_engine):
    """The user tabbed to Stop and the answer came: Stop turns disabled, the focus goes back to
    the question box."""
    layer = raster_layer()
    dock = _focused_dock(plugin, qgis_iface, layer)
    stub_engine.token_delay = 0.05
    dock.ask("How many fields?")
    dock.stop_button.setFocus()
    _settle()
    assert _focus() is dock.stop_button
    wait_until(_answered(dock, layer), 30, "the answer")
    wait_for_tasks()
    _settle()
    assert dock.turns(layer)[0]["answer"] and _focus() is dock.question_edit


def test_escape_in_an_open_list_or_on_the_map_stops_nothing(plugin, qgis_iface, raster_layer, stub_engine):
    """Escape stops only where no one else uses it: in an open list of the dock (Area,
    Strategy) it closes the list; on the map (where a drawing tool takes Escape) it stops
    nothing; with no question running the dock lets it go on (to QGIS) untouched."""
    from qgis.PyQt.QtCore import Qt
    from qgis.PyQt.QtGui import QKeyEvent
    from qgis.PyQt.QtTest import QTest
    from qgis.PyQt.QtWidgets import QApplication

    layer = raster_layer()
    dock = _focused_dock(plugin, qgis_iface, layer)
    idle_escape = QKeyEvent(QKeyEvent.Type.KeyPress, Qt.Key.Key_Escape, Qt.KeyboardModifier.NoModifier)
    idle_escape.accept()
    dock.keyPressEvent(idle_escape)
    assert not idle_escape.isAccepted()  # no question running: not the dock's
    stub_engine.token_delay = 0.2
    dock.ask("How many fields?")
    dock.options_box.setCollapsed(False)
    lists_closed, asking = [], []
    for combo in (dock.aoi_combo, dock.strategy_combo):
        combo.setFocus()
        combo.showPopup()
        _settle()
        assert combo.view().isVisible()
        QTest.keyClick(QApplication.focusWidget(), Qt.Key.Key_Escape)
        _settle()
        lists_closed.append(not combo.view().isVisible())
        asking.append(dock.is_asking())
    mw, canvas = qgis_iface.mainWindow(), qgis_iface.mapCanvas()
    mw.activateWindow()
    canvas.setFocus()
    _settle()
    QTest.keyClick(canvas, Qt.Key.Key_Escape)
    _settle()
    asking.append(dock.is_asking())
    dock.stop()
    wait_for_tasks()
    assert lists_closed == [True, True] and asking == [True, True, True]


def test_part_of_an_answer_can_be_selected_with_shift_and_the_arrows(plugin, qgis_iface, raster_layer,
                                                                     stub_engine):
    """The conversation has a keyboard caret: Shift+arrows select a part of it (to copy only
    that); its links stay reachable with the keyboard."""
    from qgis.PyQt.QtCore import Qt
    from qgis.PyQt.QtTest import QTest

    layer = raster_layer()
    dock = _focused_dock(plugin, qgis_iface, layer)
    dock.ask("How many fields?")
    wait_until(_answered(dock, layer), 30, "the answer")
    wait_for_tasks()
    dock.view.setFocus()
    QTest.keyClick(dock.view, Qt.Key.Key_Home, Qt.KeyboardModifier.ControlModifier)
    for _ in range(3):
        QTest.keyClick(dock.view, Qt.Key.Key_Right, Qt.KeyboardModifier.ShiftModifier)
    assert dock.view.textCursor().selectedText() == "You"
    assert dock.view.textInteractionFlags() & Qt.TextInteractionFlag.LinksAccessibleByKeyboard


def test_the_ask_button_says_enter_asks(plugin):
    """Its tooltip names the key (the question box's placeholder holds an example question)."""
    assert "Enter" in plugin.dock.ask_button.toolTip()
    assert "Escape" in plugin.dock.stop_button.toolTip()


# -- the plugin's actions ------------------------------------------------------------------------

def test_the_plugins_actions_can_be_given_shortcuts_in_qgis(qgis_iface, monkeypatch):
    """Settings > Keyboard Shortcuts lists what is registered with QGIS's shortcut manager: the
    plugin registers its actions with iface.registerMainWindowAction (QGIS forwards it to
    QgsGui.shortcutsManager().registerAction; pytest-qgis's iface only mocks it, so it is
    forwarded here as QGIS does), under stable object names, and unregisters them on unload;
    a shortcut given to one comes back after a plugin reload."""
    import geovqa
    from qgis.gui import QgsGui

    manager = QgsGui.shortcutsManager()
    registered = []

    def register(action, shortcut):  # what QgisAppInterface::registerMainWindowAction does
        registered.append(action)
        return manager.registerAction(action, shortcut)

    monkeypatch.setattr(qgis_iface, "registerMainWindowAction", register, raising=False)
    monkeypatch.setattr(qgis_iface, "unregisterMainWindowAction", manager.unregisterAction, raising=False)
    wanted = ("GeoVQA chat", "Batch questions…", "Start local engine", "Stop local engine", "Settings…")
    p = geovqa.classFactory(qgis_iface)
    p.initGui()
    try:
        texts = {a.text() for a in manager.listActions()}
        missing = [t for t in wanted if t not in texts]
        assert missing == []
        batch = next(a for a in manager.listActions() if a.text() == "Batch questions…")
        assert batch.objectName() == "mActionGeoVQABatchQuestions"
        manager.setKeySequence(batch, "Ctrl+Alt+B")  # as Settings > Keyboard Shortcuts does
    finally:
        p.unload()
    assert not {a.text() for a in manager.listActions()} & set(wanted)
    p = geovqa.classFactory(qgis_iface)  # the plugin reloaded
    p.initGui()
    try:
        batch = next(a for a in manager.listActions() if a.text() == "Batch questions…")
        assert batch.shortcut().toString() == "Ctrl+Alt+B"
    finally:
        manager.setKeySequence(batch, "")
        p.unload()


# -- the batch dialog ----------------------------------------------------------------------------

def _shown(dlg):
    from qgis.PyQt.QtWidgets import QApplication

    dlg.show()
    dlg.activateWindow()
    _settle()
    assert QApplication.activeWindow() is dlg


def test_enter_on_a_result_row_does_not_run_the_whole_batch_again(plugin, raster_layer, stub_engine):
    """A keyboard user steps through the results with the arrow keys and presses Enter on a row
    (to read it, as a double-click does): the dialog has no default button, so the Enter no
    longer goes to Run, which emptied the table and started the whole batch again."""
    from qgis.PyQt.QtCore import Qt
    from qgis.PyQt.QtTest import QTest

    a, b = raster_layer("a"), raster_layer("b")
    dlg = plugin.open_batch()
    _shown(dlg)
    dlg, rows = run_batch_dialog(plugin, [a, b], "How many fields?\nAnd the river?", dlg=dlg)
    assert dlg.table.rowCount() == 4
    asked = len(stub_engine.requests)
    dlg.table.setFocus()
    dlg.table.setCurrentCell(1, 2)
    QTest.keyClick(dlg.table, Qt.Key.Key_Down)
    assert dlg.table.currentRow() == 2
    QTest.keyClick(dlg.table, Qt.Key.Key_Return)
    started_again = dlg.task is not None or dlg.table.rowCount() != 4
    dlg.cancel()
    wait_for_tasks()
    assert not started_again, f"Enter on a row ran the batch again; the table has {dlg.table.rowCount()} rows"
    assert len(stub_engine.requests) == asked


def test_a_result_row_can_be_read_in_full_from_the_keyboard(plugin, raster_layer, stub_engine):
    """Enter, the key a list or table opens an item with, shows the row as a double-click does
    (the table's tooltip says so), in front with the focus."""
    from qgis.PyQt.QtCore import Qt
    from qgis.PyQt.QtTest import QTest

    a = raster_layer("a")
    dlg = plugin.open_batch()
    _shown(dlg)
    dlg, rows = run_batch_dialog(plugin, [a], "How many fields?", dlg=dlg)
    dlg.table.setFocus()
    dlg.table.setCurrentCell(0, 2)
    QTest.keyClick(dlg.table, Qt.Key.Key_Return)
    _settle()
    dlg.cancel()
    wait_for_tasks()
    assert dlg.row_viewer is not None and dlg.row_viewer.isVisible()
    assert "How many fields?" in dlg._row_viewer_text.toPlainText()
    assert "Enter" in dlg.table.toolTip()


def test_tab_leaves_the_questions_box(plugin, raster_layer):
    """Tab in 'Questions' (one question a line) moves on to the next field; it typed a tab
    character into the question."""
    from qgis.PyQt.QtCore import Qt
    from qgis.PyQt.QtTest import QTest

    raster_layer("a")
    dlg = plugin.open_batch()
    _shown(dlg)
    dlg.questions_edit.setFocus()
    QTest.keyClicks(dlg.questions_edit, "How many fields?")
    QTest.keyClick(dlg.questions_edit, Qt.Key.Key_Tab)
    assert dlg.questions_edit.toPlainText() == "How many fields?"
    assert _focus() is dlg.layers_check


def test_the_batch_inputs_run_and_close_are_reachable_with_shift_tab(plugin, raster_layer):
    """The layer list (Space ticks a layer), the checkbox, Run, the table and Close are focus
    stops, walked with Shift+Tab."""
    from qgis.PyQt.QtCore import Qt
    from qgis.PyQt.QtTest import QTest

    a = raster_layer("a")
    dlg = plugin.open_batch()
    _shown(dlg)
    dlg.set_checked_layers(set())
    dlg.layer_list.setFocus()
    dlg.layer_list.setCurrentRow(0)
    QTest.keyClick(dlg.layer_list, Qt.Key.Key_Space)
    assert [lyr.id() for lyr in dlg.checked_layers()] == [a.id()]
    seen = [_focus()]
    for _ in range(12):
        QTest.keyClick(_focus(), Qt.Key.Key_Backtab, Qt.KeyboardModifier.ShiftModifier)
        seen.append(_focus())
    for w in (dlg.layer_list, dlg.questions_edit, dlg.layers_check, dlg.run_button, dlg.table):
        assert w in seen, type(w).__name__
    assert any(getattr(w, "text", lambda: "")() == "Close" for w in seen)


def test_enter_on_the_focused_run_button_runs(plugin, raster_layer):
    """With no default button, Enter still presses the button that has the focus (as Space)."""
    from qgis.PyQt.QtCore import Qt
    from qgis.PyQt.QtTest import QTest

    raster_layer("a")
    dlg = plugin.open_batch()
    _shown(dlg)
    dlg.set_checked_layers(set())
    assert not any(b.isDefault() or b.autoDefault() for b in (dlg.run_button, dlg.cancel_button, dlg.csv_button))
    dlg.run_button.setFocus()
    QTest.keyClick(dlg.run_button, Qt.Key.Key_Return)
    assert dlg.message.text() == "Tick at least one raster layer and type at least one question."


def test_closing_the_dialog_mid_batch_says_the_batch_goes_on(plugin, qgis_iface, raster_layer, stub_engine):
    """Escape (or Close, or the window's x) hides the dialog; a batch running goes on, and the
    message bar says so and how to see it again. Closed with no batch running, nothing is said."""
    from qgis.core import Qgis
    from qgis.PyQt.QtCore import Qt
    from qgis.PyQt.QtTest import QTest

    a = raster_layer("a")
    dlg = plugin.open_batch()
    _shown(dlg)
    bar = qgis_iface.messageBar()
    bar.clear_messages()
    QTest.keyClick(dlg, Qt.Key.Key_Escape)
    assert not dlg.isVisible() and bar.get_messages(Qgis.MessageLevel.Info) == []
    dlg = plugin.open_batch()  # shown again (the key events below go to its widgets)
    stub_engine.token_delay = 0.2
    dlg.set_checked_layers({a.id()})
    dlg.questions_edit.setPlainText("How many fields?")
    dlg.run()
    dlg.table.setFocus()
    QTest.keyClick(dlg.table, Qt.Key.Key_Escape)
    running = dlg.task is not None
    said = bar.get_messages(Qgis.MessageLevel.Info)
    dlg.cancel()
    wait_for_tasks()
    assert not dlg.isVisible() and running
    assert said == ["GeoVQA:The batch goes on in the background (its progress is in QGIS's task bar); "
                    "reopen Batch questions… to see its answers."]


def test_a_batch_ending_while_its_dialog_is_closed_says_so(plugin, qgis_iface, raster_layer, stub_engine):
    """Closed mid-batch, the dialog's end of run (its counts, Export) passed unseen: the message
    bar says the batch finished, with its counts, and how to see the answers; a cancelled one
    says nothing more."""
    from qgis.core import Qgis
    from qgis.PyQt.QtCore import Qt
    from qgis.PyQt.QtTest import QTest

    a = raster_layer("a")
    dlg = plugin.open_batch()
    _shown(dlg)
    bar = qgis_iface.messageBar()
    stub_engine.token_delay = 0.05
    dlg.set_checked_layers({a.id()})
    dlg.questions_edit.setPlainText("How many fields?")
    dlg.run()
    QTest.keyClick(dlg.table, Qt.Key.Key_Escape)
    bar.clear_messages()
    wait_until(lambda: dlg.task is None, 30, "the batch")
    wait_for_tasks()
    assert bar.get_messages(Qgis.MessageLevel.Info) == [
        "GeoVQA:Batch questions finished: 1 question: 1 answered, 0 failed. "
        "Reopen Batch questions… to read and export the answers."]


def test_every_batch_dialog_control_has_a_name_a_screen_reader_can_say(plugin, raster_layer):
    """Also the results table and the progress bar, which have no label."""
    raster_layer("a")
    dlg = plugin.open_batch()
    widgets = {"layers": dlg.layer_list, "questions": dlg.questions_edit, "layers check": dlg.layers_check,
               "run": dlg.run_button, "cancel": dlg.cancel_button, "progress": dlg.progress, "results": dlg.table,
               "csv": dlg.csv_button, "json": dlg.json_button}
    unnamed = [key for key, w in widgets.items() if not re.search(r"[A-Za-z]", accessible_name(w))]
    assert unnamed == []


# -- the options page ----------------------------------------------------------------------------

def test_the_options_page_fields_are_tab_stops_with_names(qgis_app):
    """Every field of Settings > Options > GeoVQA is reached by Tab and has a label a screen
    reader says (QFormLayout's buddies)."""
    from geovqa.settings_page import SettingsForm
    from qgis.gui import QgsFileWidget
    from qgis.PyQt.QtCore import Qt
    from qgis.PyQt.QtTest import QTest
    from qgis.PyQt.QtWidgets import QApplication

    form = SettingsForm()
    form.show()
    form.activateWindow()
    _settle()
    assert QApplication.activeWindow() is form
    form.url.setFocus()
    seen = [_focus()]
    for _ in range(40):
        QTest.keyClick(_focus(), Qt.Key.Key_Tab)
        seen.append(_focus())
    fields = [form.url, form.token, form.send_rasters, form.extra, form.memory_button, form.strategy, form.budget,
              form.tpt, form.faithful, form.max_new, form.render_px]
    missing = [accessible_name(f) or type(f).__name__ for f in fields if not any(f is s or f.isAncestorOf(s)
                                                                              for s in seen)]
    assert missing == []
    for fw in (form.token_file, form.python, form.engine_dir, form.weights, form.output):
        assert isinstance(fw, QgsFileWidget)
        assert any(fw.isAncestorOf(s) for s in seen)
    unnamed = [type(f).__name__ for f in fields if not accessible_name(f)]
    form.close()
    assert unnamed == []
