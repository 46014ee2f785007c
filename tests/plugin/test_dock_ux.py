"""The chat dock as a user meets it (from a walkthrough): which layers it offers, what an input
mistake does, where the chat scrolls, what the status lines say, and how narrow it can be."""

from __future__ import annotations

import pytest
from conftest import ask_until_first_words, set_settings, wait_for_tasks, wait_until

LONG_ANSWER = ("The image shows agricultural fields separated by hedgerows, a meandering river crossing "
               "from west to east, and five bright buildings along the northern bank. ") * 12


def _done(dock, layer, n=1):
    return lambda: sum(1 for t in dock.conversations.get(layer.id(), []) if t.get("done")) >= n


def _answered(dock, layer, question):
    """Ask ``question`` about ``layer`` and wait for the answer and the tasks that keep it."""
    dock.ask(question)
    wait_until(_done(dock, layer), 30, "the answer")
    wait_for_tasks()


def _show(dock, w=380, h=640):
    from qgis.core import QgsApplication

    dock.setFloating(True)
    dock.resize(w, h)
    dock.show()
    for _ in range(5):
        QgsApplication.processEvents()


def _settle():
    from qgis.core import QgsApplication

    for _ in range(10):
        QgsApplication.processEvents()


def _combo_layers(dock):
    combo = dock.layer_combo
    return [combo.layer(i) for i in range(combo.count()) if combo.layer(i) is not None]


def _chat_of_long_answers(plugin, raster_layer, stub_engine, questions):
    """A shown dock on a new layer whose chat holds a long answer to each of `questions`."""
    layer = raster_layer()
    dock = plugin.dock
    _show(dock)
    dock.set_layer(layer)
    _long_answers(stub_engine)
    for i, question in enumerate(questions):
        dock.ask(question)
        wait_until(_done(dock, layer, i + 1), 30, "the answer")
    wait_for_tasks()
    return dock, layer


def _long_answers(stub_engine, answer=LONG_ANSWER):
    def events(req):
        rid = req["request_id"]
        yield {"type": "token", "request_id": rid, "text": answer}
        yield {"type": "result", "request_id": rid, "answer": answer, "strategy": "geollava",
               "tokens": {"visual_kept": 400, "visual_candidates": 12000}, "timings": {"total": 1.0}}

    stub_engine.events = events


def test_result_layers_are_not_layers_to_ask_about(plugin, raster_layer, stub_engine, tmp_path):
    """Every heatmap was a raster named "kept-token heatmap" in the Layer list; when the asked
    layer was removed the dock jumped to one, and the next question was about it."""
    from qgis.core import QgsProject

    layer, other = raster_layer("ortho_2021"), raster_layer("dem")
    dock = plugin.dock
    dock.set_layer(layer)
    _answered(dock, layer, "How many ships are in the harbour of the old town?")
    turn = dock.turns(layer)[-1]
    heat = QgsProject.instance().mapLayer(turn["heatmap_layer_id"])
    assert heat is not None and heat.name() == "heatmap: ortho_2021 — How many ships are in the harbour of th…"
    assert heat not in _combo_layers(dock) and {layer, other} <= set(_combo_layers(dock))

    QgsProject.instance().removeMapLayer(layer.id())
    assert dock.layer_combo.currentLayer() is not heat
    assert heat not in _combo_layers(dock)

    # saved and opened again: the heatmap is still marked as GeoVQA's, and still left out
    path = tmp_path / "p.qgs"
    assert QgsProject.instance().write(str(path))
    QgsProject.instance().clear()
    assert QgsProject.instance().read(str(path))
    _settle()
    names = [lyr.name() for lyr in _combo_layers(dock)]
    assert names == ["dem"], names
    assert any(lyr.name().startswith("heatmap: ortho_2021") for lyr in QgsProject.instance().mapLayers().values())


def test_a_heatmap_of_a_project_saved_before_the_mark_is_left_out_too(plugin, raster_layer, stub_engine):
    from geovqa.layers import LEGACY_HEATMAP_NAME, RESULT_LAYER_PROPERTY
    from qgis.core import QgsProject

    layer = raster_layer("scene")
    dock = plugin.dock
    dock.set_layer(layer)
    _answered(dock, layer, "Where?")
    heat = QgsProject.instance().mapLayer(dock.turns(layer)[-1]["heatmap_layer_id"])
    heat.removeCustomProperty(RESULT_LAYER_PROPERTY)
    heat.setName(LEGACY_HEATMAP_NAME)
    dock._update_excepted_layers()
    assert heat not in _combo_layers(dock)
    plain = raster_layer(LEGACY_HEATMAP_NAME)  # a user's own layer of that name, outside a GeoVQA group
    assert QgsProject.instance().layerTreeRoot().findLayer(plain.id()) is not None
    dock._update_excepted_layers()  # looked at again now that it is in the layer tree
    assert plain in _combo_layers(dock) and heat not in _combo_layers(dock)


def test_an_input_mistake_is_said_not_stored_and_the_question_stays(plugin, raster_layer, stub_engine):
    from qgis.core import QgsProject

    layer = raster_layer()
    dock = plugin.dock
    dock.set_layer(layer)
    QgsProject.instance().setDirty(False)
    dock.set_aoi_mode("rectangle")  # nothing drawn
    dock.question_edit.setText("what is here?")
    assert dock.ask() is None
    assert dock.turns(layer) == [] and not QgsProject.instance().isDirty()
    assert dock.question_edit.text() == "what is here?"
    assert "Draw the area of interest" in dock.progress_label.text()
    assert not stub_engine.requests and not dock.stop_button.isEnabled()


def test_ask_is_enabled_only_with_a_question(plugin, raster_layer):
    layer = raster_layer()
    dock = plugin.dock
    dock.set_layer(layer)
    dock.question_edit.setText("")
    assert not dock.ask_button.isEnabled()
    dock.question_edit.setText("   ")
    assert not dock.ask_button.isEnabled()
    dock.question_edit.setText("How many fields?")
    assert dock.ask_button.isEnabled()


def test_the_question_just_asked_is_scrolled_into_view(plugin, raster_layer, stub_engine):
    dock, layer = _chat_of_long_answers(plugin, raster_layer, stub_engine,
                                        [f"Describe the scene, part {i}" for i in range(3)])
    _settle()
    sb = dock.view.verticalScrollBar()
    assert sb.maximum() > 0
    sb.setValue(0)  # reading the first answer
    stub_engine.token_delay = 0.2
    dock.ask("And the river?")
    assert sb.value() == sb.maximum() > 0
    assert "And the river?" in dock.view.toPlainText()
    # while the answer streams, someone scrolling back to read keeps their place
    sb.setValue(0)
    dock.render_conversation()
    assert sb.value() == 0
    dock.stop()
    wait_for_tasks()


def test_progress_line_wraps_and_is_cleared_on_another_layer(plugin, raster_layer, stub_engine):
    """A long message widened the dock to 1385 px; "Done." stayed beside another conversation."""
    from geovqa.compat import MSG_WARNING

    layer, other = raster_layer("a"), raster_layer("b")
    dock = plugin.dock
    _show(dock)
    dock.set_layer(layer)
    dock._notify("The layer 'a very long layer name indeed' was removed before GeoVQA answered. The answer is "
                 "kept, without result layers, under 'Answers about removed layers' in the layer list.", MSG_WARNING)
    _settle()
    assert dock.progress_label.wordWrap()
    assert dock.widget().minimumSizeHint().width() < 420
    _answered(dock, layer, "Where?")
    assert dock.progress_label.text().startswith("Answered")
    dock.set_layer(other)
    assert dock.progress_label.text() == ""


def test_answers_about_removed_layers_are_read_only(plugin, raster_layer, stub_engine):
    from geovqa.dock import READ_ONLY_PLACEHOLDER, REMOVED_LAYERS_ITEM
    from qgis.core import QgsProject

    layer, other = raster_layer("gone"), raster_layer("stays")
    dock = plugin.dock
    dock.set_layer(layer)
    _answered(dock, layer, "about a layer that goes away")
    QgsProject.instance().removeMapLayer(layer.id())
    dock.layer_combo.setCurrentIndex(dock.layer_combo.findText(REMOVED_LAYERS_ITEM))
    assert dock.showing_removed_layers()
    dock.question_edit.setText("follow-up?")
    for w in (dock.aoi_combo, dock.draw_button, dock.question_edit, dock.ask_button):
        assert not w.isEnabled(), w
    assert dock.question_edit.placeholderText() == READ_ONLY_PLACEHOLDER
    assert dock.ask() is None and "read-only" in dock.progress_label.text()
    dock.set_layer(other)
    assert dock.question_edit.isEnabled() and dock.aoi_combo.isEnabled() and dock.ask_button.isEnabled()
    assert "Ask about the layer" in dock.question_edit.placeholderText()


def test_the_dock_can_be_narrow(plugin, raster_layer):
    """The Strategy list's long labels and the tokens-per-tile text held the dock at ~730 px."""
    from geovqa.settings import STRATEGY_LABELS

    dock = plugin.dock
    dock.set_layer(raster_layer())
    _show(dock, 300, 640)
    assert dock.options_box.isCollapsed()
    assert dock.minimumSizeHint().width() < 420, dock.minimumSizeHint()
    dock.options_box.setCollapsed(False)
    _settle()
    assert dock.minimumSizeHint().width() < 420, dock.minimumSizeHint()
    combo = dock.strategy_combo
    i = combo.findData("geollava")
    assert combo.itemText(i) == "GeoLLaVA-8K"
    assert combo.itemData(i, 3) == STRATEGY_LABELS["geollava"]  # 3: ToolTipRole
    assert len(dock.tpt_spin.specialValueText()) <= 8


def test_the_dock_fits_a_narrow_panel_and_keeps_every_action(plugin, raster_layer, stub_engine):
    """The row Copy | Export… | Clear | Diagnostics held the dock at 384 px or wider (406 px with
    'Strategy and token budget' open): asked for 300 px it stayed 384 px wide, a third of a 1366 px
    laptop screen. Clear and Diagnostics are now in the '⋯' menu beside Copy and Export…."""
    from qgis.PyQt.QtCore import Qt
    from qgis.PyQt.QtWidgets import QApplication, QMainWindow, QWidget

    dock = plugin.dock
    layer = raster_layer()
    dock.set_layer(layer)
    dock.ask("What is in this image?")
    wait_until(lambda: dock.turns() and dock.turns()[-1].get("done"), 30, "the answer")
    wait_for_tasks()
    mw = QMainWindow()
    mw.setCentralWidget(QWidget())
    mw.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, dock)
    mw.resize(1000, 700)
    mw.show()
    try:
        for collapsed in (True, False):
            dock.options_box.setCollapsed(collapsed)
            _settle()
            mw.resizeDocks([dock], [300], Qt.Orientation.Horizontal)
            _settle()
            assert dock.width() <= 310, (collapsed, dock.width(), dock.minimumSizeHint().width())
        # every action is still there: Copy, Export… as buttons, Clear and Diagnostics in the menu
        assert dock.copy_button.isVisible() and dock.export_button.isVisible() and dock.more_button.isVisible()
        assert dock.more_button.menu().actions() == [dock.clear_action, dock.diag_action]
        dock.diag_action.trigger()
        assert "GeoVQA" in QApplication.clipboard().text() and "clipboard" in dock.progress_label.text()
        dock.clear_action.trigger()
        assert dock.turns() == []
    finally:
        mw.removeDockWidget(dock)
        dock.setParent(None)


def test_the_line_under_an_answer_names_the_strategy_as_the_user_knows_it(plugin, raster_layer, stub_engine):
    layer = raster_layer()
    dock = plugin.dock
    dock.set_layer(layer)
    _long_answers(stub_engine, "Fields.")
    _answered(dock, layer, "Where?")
    meta = dock.turns(layer)[-1]["meta"]
    assert meta.startswith("GeoLLaVA-8K: 400/12000 visual tokens kept"), meta


def test_the_retry_button_does_not_hide_the_end_of_the_chat(plugin, raster_layer, stub_engine):
    dock, layer = _chat_of_long_answers(plugin, raster_layer, stub_engine,
                                        [f"Describe part {i}" for i in range(2)])
    del stub_engine.events  # the stand-in's own events again
    stub_engine.fail_with = {"code": "out_of_memory", "message": "The GPU ran out of memory.",
                             "hint": "Lower the token budget.", "retry_budget": 1024}
    dock.ask("Count the ships")
    sb = dock.view.verticalScrollBar()
    wait_until(_done(dock, layer, 3), 30)
    wait_for_tasks()
    _settle()
    assert dock.retry_button.isVisible()
    sb = dock.view.verticalScrollBar()
    assert sb.maximum() > 0 and sb.value() == sb.maximum()


def test_progress_says_stages_in_words_and_where_the_results_went(plugin, raster_layer, stub_engine, tmp_path):
    from geovqa.tasks import stage_text

    assert stage_text({"stage": "read", "progress": 0.2, "message": "reading"}) == "Reading the raster 20 %"
    assert stage_text({"stage": "vision", "progress": 0.4}) == "Encoding tiles 40 %"
    assert stage_text({"stage": "select", "progress": None}) == "Choosing tokens …"
    assert stage_text({"stage": "generate"}) == "Answering…"

    layer = raster_layer()
    dock = plugin.dock
    turn, _ = ask_until_first_words(dock, layer, stub_engine, "What is in this image?", delay=0.2, timeout=30)
    assert dock.progress_label.text() == "Answering…"
    stub_engine.token_delay = 0.0
    wait_until(_done(dock, layer), 30, "the answer")
    wait_for_tasks()
    text = dock.progress_label.text()
    assert turn["group"] in text and str(tmp_path / "results") in text, text


def test_engine_down_is_one_short_status_line(plugin, raster_layer, qgis_iface):
    from geovqa.addresses import engine_address
    from geovqa.settings import Settings

    dock = plugin.dock
    dock.set_layer(raster_layer())
    dock.refresh_health()
    wait_until(lambda: dock._health_task is None and getattr(dock, "status_level", None) == "down", 20)
    _, host, port, _ = engine_address(Settings.load().engine_url)
    text = dock.status_label.text()
    assert text.endswith(f"Engine not reachable at {host}:{port}"), text
    tip = dock.status_label.toolTip()
    assert "Errno" in tip and "Start local engine" in tip and "make serve" not in tip
    assert "Errno" in dock.diagnostics_text()
    wait_for_tasks()


def test_an_unusable_engine_url_still_says_what_is_wrong(plugin, raster_layer):
    set_settings(engine_url="ftp://nowhere")
    dock = plugin.dock
    dock.refresh_health()
    wait_until(lambda: getattr(dock, "status_level", None) == "down", 20)
    assert "http://" in dock.status_label.text()


# --- found by a review of the UX changes ------------------------------------------------------


def _answer_with_heatmap(plugin, raster_layer, name="ortho"):
    from qgis.core import QgsProject

    layer = raster_layer(name)
    dock = plugin.dock
    dock.set_layer(layer)
    _answered(dock, layer, "How many ships?")
    heat = QgsProject.instance().mapLayer(dock.turns(layer)[-1]["heatmap_layer_id"])
    assert heat is not None
    return dock, layer, heat


def test_clicking_a_heatmap_in_the_layers_panel_keeps_the_dock_layer(plugin, raster_layer, stub_engine):
    """plugin.py connects iface.currentLayerChanged -> dock.follow_active_layer: a heatmap (raster)
    made current in the Layers panel is excepted from the combo, so setLayer() finds no row."""
    dock, layer, heat = _answer_with_heatmap(plugin, raster_layer)
    assert dock.layer_combo.currentLayer() is layer
    dock.question_edit.setText("next question")
    dock.follow_active_layer(heat)  # the user clicks the heatmap to look at it
    assert dock.layer_combo.currentLayer() is layer, dock.layer_combo.currentLayer()
    assert dock.ask_button.isEnabled()


def test_clicking_a_vector_layer_in_the_layers_panel_keeps_the_dock_layer(plugin, raster_layer):
    """Only a raster is a layer to ask about: a vector layer made current leaves the dock's
    layer (and the batch dialog's list) as they are."""
    from qgis.core import QgsProject, QgsVectorLayer

    layer = raster_layer()
    roads = QgsVectorLayer("LineString?crs=EPSG:32633", "roads", "memory")
    QgsProject.instance().addMapLayer(roads)
    dock = plugin.dock
    dock.set_layer(layer)
    dock.follow_active_layer(roads)
    assert dock.layer_combo.currentLayer() is layer
    dlg = plugin.open_batch()
    assert [dlg.layer_list.item(i).text() for i in range(dlg.layer_list.count())] == ["scene"]


def test_pasting_the_heatmap_style_onto_own_raster_keeps_it_askable(plugin, raster_layer, stub_engine):
    """Copy Style / Paste Style (or a saved .qml) carries custom properties."""
    from qgis.core import QgsMapLayer, QgsReadWriteContext
    from qgis.PyQt.QtXml import QDomDocument
    dock, layer, heat = _answer_with_heatmap(plugin, raster_layer)
    dem = raster_layer("dem")
    doc = QDomDocument()
    heat.exportNamedStyle(doc, QgsReadWriteContext(), QgsMapLayer.StyleCategory.AllStyleCategories)
    ok, err = dem.importNamedStyle(doc, QgsMapLayer.StyleCategory.AllStyleCategories)
    assert ok, err
    dock._update_excepted_layers()  # what any later layersAdded/layersRemoved/project read does
    assert dem in _combo_layers(dock), dem.customProperty("geovqa/result_layer")
    assert heat not in _combo_layers(dock)  # the heatmap itself stays out


def test_the_batch_dialog_leaves_result_layers_out_as_the_dock_does(plugin, raster_layer, stub_engine, qgis_iface):
    from geovqa.batch_dialog import USER_ROLE, BatchDialog

    dock, layer, heat = _answer_with_heatmap(plugin, raster_layer)
    dlg = BatchDialog(qgis_iface)
    ids = [dlg.layer_list.item(i).data(USER_ROLE) for i in range(dlg.layer_list.count())]
    assert layer.id() in ids and heat.id() not in ids
    dlg.shutdown()


def test_stage_text_keeps_the_case_of_the_engines_message():
    from geovqa.tasks import stage_text
    assert stage_text({"stage": "warmup", "message": "Loading GeoLLaVA-8K weights"}).startswith(
        "Loading GeoLLaVA-8K")


def test_a_layer_already_in_the_project_is_watched_for_the_result_mark(qgis_iface, raster_layer):
    """The plugin enabled with a project open: a layer there before the dock was made and marked
    later (as Processing's post-processor does) left the layer list only at the next add/remove."""
    import geovqa
    from geovqa.layers import mark_result_layer

    layer = raster_layer("before_the_dock")
    p = geovqa.classFactory(qgis_iface)
    p.initGui()
    try:
        combo = p.dock.layer_combo
        assert layer in [combo.layer(i) for i in range(combo.count())]
        mark_result_layer(layer, "heatmap")
        assert layer not in [combo.layer(i) for i in range(combo.count())]
    finally:
        p.unload()


def test_a_question_asked_by_code_or_retry_keeps_the_draft_in_the_box(plugin, raster_layer, stub_engine):
    """ask(question=...) (a retry, the API) cleared whatever the user was typing."""
    layer = raster_layer("draft")
    dock = plugin.dock
    dock.set_layer(layer)
    dock.question_edit.setText("half-typed next question")
    assert dock.ask("Asked by code?") is not None
    assert dock.question_edit.text() == "half-typed next question"
    wait_until(lambda: any(t.get("done") for t in dock.turns(layer)), 30, "the answer")
    wait_for_tasks()
    assert dock.turns(layer)[-1]["question"] == "Asked by code?"
    assert dock.ask() is not None  # the box's own question: asked, and the box emptied
    assert dock.question_edit.text() == ""
    assert dock.turns(layer)[-1]["question"] == "half-typed next question"
    wait_until(lambda: dock.turns(layer)[-1].get("done"), 30, "the second answer")
    wait_for_tasks()


def test_a_question_longer_than_the_engine_takes_is_said_as_typed_and_not_stored(plugin, raster_layer,
                                                                                 stub_engine):
    """The box took any length and Ask stayed enabled; the turn was recorded, refused, saved with
    the project as a red error, and the question box emptied."""
    from geovqa.engine_protocol import MAX_QUESTION_CHARS
    from qgis.core import QgsProject

    layer = raster_layer()
    dock = plugin.dock
    dock.set_layer(layer)
    QgsProject.instance().setDirty(False)
    long_question = "How many ships are in the harbour? " + "x" * MAX_QUESTION_CHARS
    dock.question_edit.setText(long_question)
    # said as it is typed: Ask is off, and the line under the question says why and what to do
    assert not dock.ask_button.isEnabled()
    said = dock.length_label.text()
    assert not dock.length_label.isHidden()
    assert f"{len(long_question)} characters" in said and f"at most {MAX_QUESTION_CHARS}" in said
    assert "shorten" in said and dock.question_edit.toolTip() == said
    assert dock.ask() is None  # Enter in the box
    assert dock.turns(layer) == [] and not QgsProject.instance().isDirty()
    assert dock.question_edit.text() == long_question  # kept, to be shortened
    assert not stub_engine.requests and not dock.stop_button.isEnabled()
    dock.question_edit.setText(long_question[:MAX_QUESTION_CHARS])  # short enough: the note goes
    assert dock.ask_button.isEnabled() and dock.question_edit.toolTip() == ""
    assert dock.length_label.text() == "" and dock.length_label.isHidden()
    dock.question_edit.setText(" " + "y" * MAX_QUESTION_CHARS + " ")  # as sent: stripped
    assert dock.ask_button.isEnabled()


def test_typing_a_too_long_question_while_an_answer_runs_keeps_its_progress(plugin, raster_layer, stub_engine):
    """The length note took the progress line: "Answering …" was replaced by it until the next
    engine event, which then replaced the note while the question was still too long."""
    from geovqa.engine_protocol import MAX_QUESTION_CHARS
    from geovqa.tasks import ANSWERING

    layer = raster_layer()
    dock = plugin.dock
    _show(dock)
    dock.set_layer(layer)
    stub_engine.token_delay = 0.2
    dock.ask("Describe the scene.")
    wait_until(lambda: dock.progress_label.text() == ANSWERING, 30, "the answer streaming")
    dock.question_edit.setText("y" * (MAX_QUESTION_CHARS + 1))
    assert dock.progress_label.text() == ANSWERING
    note = dock.length_label.text()
    assert f"{MAX_QUESTION_CHARS + 1} characters" in note and dock.length_label.isVisible()
    answer_so_far = len(dock.turns(layer)[-1]["answer"])
    wait_until(lambda: len(dock.turns(layer)[-1]["answer"]) > answer_so_far, 30, "more of the answer")
    assert dock.length_label.text() == note and dock.length_label.isVisible()  # the events leave it
    dock.question_edit.setText("Where?")
    assert dock.length_label.isHidden() and dock.progress_label.text() == ANSWERING
    dock.stop()
    wait_for_tasks()


@pytest.mark.parametrize("mode", ["rectangle", "polygon"])
def test_an_area_smaller_than_one_pixel_is_said_not_stored(plugin, raster_layer, stub_engine, mode):
    """A polygon holding no pixel's centre was refused by the engine after its turn was recorded
    ("smaller than one pixel … draw a larger area"); the same area drawn as a rectangle was sent
    as a 1 x 1 px window and answered about one pixel stretched to a tile, without a word."""
    from qgis.core import QgsGeometry, QgsProject, QgsRectangle

    layer = raster_layer()  # 64 x 48 px of 10 m from 500000/5000000: pixel centres at ...5 m
    dock = plugin.dock
    dock.set_layer(layer)
    QgsProject.instance().setDirty(False)
    dock.set_aoi_mode(mode)
    tiny = (QgsGeometry.fromRect(QgsRectangle(500100, 4999900, 500100.5, 4999900.5)) if mode == "rectangle" else
            QgsGeometry.fromWkt("POLYGON((500100 4999900.5, 500100.5 4999900, 500100 4999900, 500100 4999900.5))"))
    dock.set_aoi_geometry(tiny, layer.crs())
    dock.question_edit.setText("what is here?")
    assert dock.ask() is None
    assert dock.turns(layer) == [] and not QgsProject.instance().isDirty()
    assert dock.question_edit.text() == "what is here?"
    assert "smaller than one pixel" in dock.progress_label.text() and "larger area" in dock.progress_label.text()
    assert not stub_engine.requests and not dock.stop_button.isEnabled()
    # a small area holding a pixel's centre is still asked about
    small = QgsRectangle(500104, 4999894, 500106, 4999896)
    dock.set_aoi_geometry(QgsGeometry.fromRect(small) if mode == "rectangle" else
                          QgsGeometry.fromWkt("POLYGON((500104 4999894, 500106 4999894, 500105 4999896, "
                                              "500104 4999894))"), layer.crs())
    assert dock.ask() is not None
    wait_until(_done(dock, layer), 30, "the answer")
    wait_for_tasks()
    assert dock.turns(layer)[-1].get("error") is None
    if mode == "rectangle":
        assert stub_engine.requests[-1]["aoi"] == {"window": [10, 10, 1, 1]}


@pytest.mark.parametrize("typed, chosen, written", [
    ("talk", "JSON (*.json)", "talk.json"),  # Qt's dialog adds no ending on Linux or macOS
    ("talk", "Markdown (*.md)", "talk.md"),
    ("talk.md", "JSON (*.json)", "talk.md"),  # an ending typed is the user's choice
    ("talk.v2", "JSON (*.json)", "talk.v2.json"),
])
def test_export_writes_the_format_chosen_in_the_dialog(plugin, raster_layer, stub_engine, tmp_path, monkeypatch,
                                                       typed, chosen, written):
    """JSON chosen with a name typed without ".json" was written as Markdown, to "talk"."""
    import json

    from qgis.PyQt.QtWidgets import QFileDialog

    dock = plugin.dock
    layer = raster_layer()
    dock.set_layer(layer)
    _answered(dock, layer, "How big?")
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(tmp_path / typed), chosen))
    dock._export_clicked()
    out = tmp_path / written
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("talk")) == [written]
    text = out.read_text(encoding="utf-8")
    if written.endswith(".json"):
        assert json.loads(text)["turns"][0]["question"] == "How big?"
    else:
        assert text.startswith("# GeoVQA conversation about scene") and "\nQ: How big?" in text
    assert str(out) in dock.progress_label.text()


def test_an_export_that_cannot_be_written_is_said(plugin, raster_layer, stub_engine, tmp_path, monkeypatch,
                                                 qgis_iface):
    """It raised out of the button (QGIS's Python error dialog), the dock said nothing."""
    from qgis.core import Qgis
    from qgis.PyQt.QtWidgets import QFileDialog

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    dock = plugin.dock
    dock.set_layer(raster_layer())
    qgis_iface.messageBar().clear_messages()
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(blocker / "talk.md"), "Markdown (*.md)"))
    dock._export_clicked()
    said = dock.progress_label.text()
    assert said.startswith(f"Could not export the conversation to {blocker / 'talk.md'}") and "Not a directory" in said
    assert f"GeoVQA:{said}" in qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning)


def test_only_a_heatmap_of_the_old_name_inside_a_geovqa_group_counts_as_a_result_layer(raster_layer):
    """Before the result mark, a heatmap was told by its name inside a GeoVQA result group: a
    user's own layer of that name, at the top of the tree or in a group of their own, is theirs."""
    from geovqa.layers import LEGACY_HEATMAP_NAME, is_result_layer
    from qgis.core import QgsProject

    project = QgsProject.instance()
    root = project.layerTreeRoot()
    plain = raster_layer(LEGACY_HEATMAP_NAME)
    assert root.findLayer(plain.id()) is not None
    assert not is_result_layer(plain, project)
    own_group = root.addGroup("my layers")
    in_own = raster_layer(LEGACY_HEATMAP_NAME)
    node = root.findLayer(in_own.id())
    own_group.addChildNode(node.clone())
    root.removeChildNode(node)
    assert not is_result_layer(in_own, project)
    result_group = root.addGroup("GeoVQA: Where?")
    result_group.setCustomProperty("geovqa/question", "Where?")
    old = raster_layer(LEGACY_HEATMAP_NAME)
    node = root.findLayer(old.id())
    result_group.addChildNode(node.clone())
    root.removeChildNode(node)
    assert is_result_layer(old, project)


def test_choosing_another_layer_while_an_answer_streams_keeps_its_progress(plugin, raster_layer, stub_engine):
    """The line under the chat says what the running question does, whichever conversation is
    shown; only a finished question's line ("Answered …") goes with its layer."""
    from geovqa.tasks import ANSWERING

    layer, other = raster_layer("a"), raster_layer("b")
    dock = plugin.dock
    ask_until_first_words(dock, layer, stub_engine, delay=0.2)
    wait_until(lambda: dock.progress_label.text() == ANSWERING, 10, "the answering line")
    dock.set_layer(other)
    assert dock.progress_label.text() == ANSWERING
    dock.stop()
    wait_for_tasks()


def test_draw_is_offered_only_for_a_drawn_area(plugin, raster_layer):
    """Draw with "Whole layer" or "Current map extent" chosen would start drawing a polygon that
    is never asked about."""
    dock = plugin.dock
    dock.set_layer(raster_layer())
    enabled = {}
    for mode in ("layer", "extent", "rectangle", "polygon"):
        dock.set_aoi_mode(mode)
        enabled[mode] = dock.draw_button.isEnabled()
    assert enabled == {"layer": False, "extent": False, "rectangle": True, "polygon": True}


def test_another_area_keeps_the_line_saying_where_the_answer_went(plugin, raster_layer, stub_engine):
    """Choosing another kind of area forgets a drawn one and its "Area of interest set." line,
    not the line about the last answer."""
    layer = raster_layer()
    dock = plugin.dock
    dock.set_layer(layer)
    _answered(dock, layer, "Where?")
    said = dock.progress_label.text()
    assert said.startswith("Answered")
    dock.set_aoi_mode("extent")
    assert dock.progress_label.text() == said


def test_an_area_given_in_the_layers_crs_is_asked_in_it_whatever_the_map_shows(plugin, qgis_iface, raster_layer,
                                                                                stub_engine):
    """An area set with its own CRS is not read in the map's CRS (a UTM rectangle on a lat/lon
    map would lie off the layer)."""
    from qgis.core import QgsCoordinateReferenceSystem, QgsGeometry, QgsRectangle

    layer = raster_layer()  # EPSG:32633, 64 x 48 pixels of 10 m
    canvas = qgis_iface.mapCanvas()
    before = canvas.mapSettings().destinationCrs()
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:4326"))
    try:
        e = layer.extent()
        inner = QgsRectangle(e.xMinimum() + 100, e.yMinimum() + 100, e.xMinimum() + 400, e.yMinimum() + 300)
        dock = plugin.dock
        dock.set_layer(layer)
        dock.set_aoi_mode("rectangle")
        dock.set_aoi_geometry(QgsGeometry.fromRect(inner), layer.crs())
        assert dock.ask("What is inside?") is not None
        wait_until(_done(dock, layer), 30, "the answer")
        # the layer's 10 m pixels from its top-left corner: columns 10-40, rows 18-38
        assert dock.turns(layer)[-1]["request"]["aoi"] == {"window": [10, 18, 30, 20]}
    finally:
        canvas.setDestinationCrs(before)
        wait_for_tasks()


def test_only_a_warning_takes_the_line_under_the_chat(plugin, raster_layer, stub_engine):
    """A warning (something the user must act on) is also said under the chat; a remark (the
    result files copied into the project's folder) goes to the message bar only, and the line
    keeps saying where the answer went."""
    from geovqa.compat import MSG_INFO, MSG_WARNING

    layer = raster_layer()
    dock = plugin.dock
    dock.set_layer(layer)
    _answered(dock, layer, "Where?")
    said = dock.progress_label.text()
    dock._notify("The files of the project's result layers were copied.", MSG_INFO)
    assert dock.progress_label.text() == said
    dock._notify("Some result files could not be copied.", MSG_WARNING)
    assert dock.progress_label.text() == "Some result files could not be copied."


def test_the_engine_status_is_checked_often_until_the_engine_is_ready(plugin, stub_engine):
    """Down or loading, the status is checked every few seconds, so the line turns green soon
    after the engine is up; a ready engine is checked now and then."""
    from conftest import free_port
    from geovqa.dock import HEALTH_INTERVAL_BUSY_MS, HEALTH_INTERVAL_MS

    dock = plugin.dock
    dock.refresh_health()
    wait_until(lambda: getattr(dock, "status_level", None) in ("ok", "demo") and dock._health_task is None, 20, "ready")
    assert dock.timer.interval() == HEALTH_INTERVAL_MS
    set_settings(engine_url=f"http://127.0.0.1:{free_port()}")
    dock.refresh_health()
    wait_until(lambda: dock.status_level == "down" and dock._health_task is None, 20, "down")
    assert dock.timer.interval() == HEALTH_INTERVAL_BUSY_MS < HEALTH_INTERVAL_MS
