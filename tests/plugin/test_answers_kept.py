"""Nothing lost: the chat is saved with the project and comes back with it; a batch writes every
answer to an autosave file as it arrives; the Processing batch appends its CSV row by row."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import python_errors, wait_for_tasks, wait_until


def _entry():
    from qgis.core import QgsProject

    text, found = QgsProject.instance().readEntry("geovqa", "conversations", "")
    return json.loads(text) if found else None


def _answered(dock, layer, n=1):
    return lambda: sum(1 for t in dock.conversations.get(layer.id(), []) if t.get("done")) >= n


def _log_messages():
    """Messages of the QGIS log (tag, text), as they arrive."""
    from qgis.core import QgsApplication

    got = []
    QgsApplication.messageLog().messageReceived.connect(lambda text, tag, level: got.append((tag, text)))
    return got


# -- chat dock ----------------------------------------------------------------------------------
def test_the_conversation_is_saved_with_the_project_and_comes_back(
        plugin, raster_layer, stub_engine, tmp_path, qgis_iface):
    from qgis.core import QgsProject

    project = QgsProject.instance()
    a, b = raster_layer("a"), raster_layer("b", width=32, height=32)
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(a.crs())
    canvas.setExtent(a.extent())
    dock = plugin.dock
    dock.set_layer(a)
    dock.set_aoi_mode("extent")  # its retry area holds a QgsGeometry: never written
    dock.ask("first?")
    wait_until(_answered(dock, a), 30)
    assert "_area" in dock.turns(a)[0] and not dock.turns(a)[0].get("error")
    dock.set_aoi_mode("layer")
    dock.set_layer(b)
    dock.ask("second?")
    wait_until(_answered(dock, b), 30)
    wait_for_tasks()
    assert project.isDirty()  # QGIS asks to save
    saved = _entry()["conversations"]
    assert [t["question"] for t in saved[a.id()]] == ["first?"] and "_area" not in saved[a.id()][0]
    path = str(tmp_path / "p.qgs")
    assert project.write(path) and not project.isDirty()
    a_id, b_id = a.id(), b.id()

    project.clear()  # File > New: the conversations belonged to the project closed
    assert dock.conversations == {} and "first?" not in dock.view.toPlainText()
    assert project.read(path)
    a2, b2 = project.mapLayer(a_id), project.mapLayer(b_id)
    assert a2 is not None and b2 is not None and not project.isDirty()  # reading marks nothing modified
    assert [(t["question"], t["answer"]) for t in dock.turns(a2)] == [("first?", "The area is 64 x 48 pixels with 3 bands.")]
    assert [t["question"] for t in dock.turns(b2)] == ["second?"]
    assert dock.turns(a2)[0]["result"]["tokens"]["visual_kept"] == 4
    dock.set_layer(a2)
    assert "first?" in dock.view.toPlainText() and "64 x 48" in dock.view.toPlainText()

    plugin.unload()  # a plugin loaded while the project is open (reload, first start) finds it too
    import geovqa

    again = geovqa.classFactory(plugin.iface)
    again.initGui()
    try:
        assert [t["question"] for t in again.dock.turns(a2)] == ["first?"]
    finally:
        again.unload()


def _ask_about_a_file_then_render_a_virtual_layer(dock, raster_layer):
    """One answered question about a file layer, then one about a virtual raster layer left
    rendering (the plugin renders such a layer before asking)."""
    from conftest import virtual_raster_layer

    src = raster_layer("a")
    dock.set_layer(src)
    dock.ask("first?")
    wait_until(_answered(dock, src), 30)
    wait_for_tasks()
    virtual = virtual_raster_layer(src)
    dock.set_layer(virtual)
    assert dock.ask("rendering?")
    assert dock.renderer is not None and dock.is_asking()


def test_file_new_while_a_question_renders_leaves_the_old_chat_out_of_the_new_project(
        plugin, raster_layer, stub_engine):
    """QGIS 3.22's clear() empties the project's entries, then removes its layers (the layer being
    rendered stopped the question, which wrote the chat into the emptied project), then says
    cleared: the new project held every conversation of the old one, and was not marked modified."""
    from qgis.core import QgsProject

    project = QgsProject.instance()
    dock = plugin.dock
    _ask_about_a_file_then_render_a_virtual_layer(dock, raster_layer)
    with python_errors() as errors:
        project.clear()  # File > New
    assert errors == []
    assert project.readEntry("geovqa", "conversations", "") == ("", False)
    assert project.entryList("geovqa", "") == [] and not project.isDirty()
    assert dock.conversations == {} and not dock.is_asking()
    assert "first?" not in dock.view.toPlainText()
    wait_for_tasks()
    assert project.readEntry("geovqa", "conversations", "") == ("", False) and not project.isDirty()


def test_opening_a_project_while_a_question_renders_leaves_the_old_chat_out_of_it(
        plugin, raster_layer, stub_engine, tmp_path):
    from qgis.core import QgsProject

    project = QgsProject.instance()
    other = str(tmp_path / "other.qgs")
    assert project.write(other)  # a project with no conversations
    dock = plugin.dock
    _ask_about_a_file_then_render_a_virtual_layer(dock, raster_layer)
    with python_errors() as errors:
        assert project.read(other)  # File > Open
    assert errors == []
    assert project.readEntry("geovqa", "conversations", "") == ("", False)
    assert project.entryList("geovqa", "") == [] and not project.isDirty()
    assert not any(dock.conversations.values()) and not dock.is_asking()
    wait_for_tasks()
    assert project.readEntry("geovqa", "conversations", "") == ("", False) and not project.isDirty()


def test_a_question_running_when_the_project_is_saved_is_stored_interrupted(
        plugin, raster_layer, stub_engine, tmp_path):
    from geovqa.history import INTERRUPTED
    from qgis.core import QgsProject

    project = QgsProject.instance()
    stub_engine.token_delay = 0.15
    layer = raster_layer()
    dock = plugin.dock
    dock.set_layer(layer)
    layer_id = layer.id()
    dock.ask("slow question")
    turn = dock.current_turn
    wait_until(lambda: turn["answer"], 10, "the first words")
    path = str(tmp_path / "p.qgs")
    assert project.write(path)
    (stored,) = _entry()["conversations"][layer_id]
    assert stored["interrupted"] and stored["done"] and stored["meta"] == INTERRUPTED
    assert stored["answer"] and turn["answer"].startswith(stored["answer"])  # its words so far
    wait_until(lambda: turn.get("done"), 30)
    wait_for_tasks()
    assert not turn.get("interrupted") and turn["answer"].endswith("bands.")
    assert project.isDirty()  # the answer arrived after the save: QGIS asks to save again

    assert project.read(path)  # what a crash right after that save would leave
    (restored,) = dock.turns(project.mapLayer(layer_id))
    assert restored["interrupted"] and restored["meta"] == INTERRUPTED and not restored["answer"].endswith("bands.")
    dock.set_layer(project.mapLayer(layer_id))
    view = dock.view.toPlainText()
    assert f"GeoVQA (incomplete): {restored['answer'].strip()}" in view and "interrupted" in view and "…" not in view
    assert f"A (incomplete): {restored['answer']}" in dock.conversation_text()


def test_answers_about_a_removed_layer_stay_under_their_own_item(plugin, raster_layer, stub_engine, tmp_path):
    from geovqa.dock import REMOVED_LAYERS_ITEM
    from qgis.core import QgsProject

    project = QgsProject.instance()
    gone, kept = raster_layer("gone"), raster_layer("kept")
    kept_id = kept.id()
    dock = plugin.dock
    for layer in (gone, kept):
        dock.set_layer(layer)
        dock.ask(f"about {layer.name()}?")
        wait_until(_answered(dock, layer), 30)
    wait_for_tasks()
    assert list(dock.layer_combo.additionalItems()) == []
    gone_id = gone.id()
    project.removeMapLayer(gone_id)
    assert list(dock.layer_combo.additionalItems()) == [REMOVED_LAYERS_ITEM]
    path = str(tmp_path / "p.qgs")
    assert project.write(path) and project.read(path)  # the project no longer has the layer
    assert project.mapLayer(gone_id) is None and gone_id in dock.conversations
    assert list(dock.layer_combo.additionalItems()) == [REMOVED_LAYERS_ITEM]

    dock.layer_combo.setCurrentIndex(dock.layer_combo.findText(REMOVED_LAYERS_ITEM))
    assert dock.showing_removed_layers()
    view = dock.view.toPlainText()
    assert "about gone?" in view and "about the layer 'gone', removed from the project" in view
    assert "about kept?" not in view
    assert "about gone?" in dock.conversation_text() and "removed layers" in dock.conversation_text()
    assert dock.ask("a new question?") is None  # no layer to ask about
    dock.clear_conversation()
    assert gone_id not in dock.conversations and list(dock.layer_combo.additionalItems()) == []
    assert [t["question"] for t in dock.turns(project.mapLayer(kept_id))] == ["about kept?"]
    assert list(_entry()["conversations"]) == [kept_id]


def test_a_saved_turn_keeps_what_is_shown_and_exported_without_the_crs_wkt_or_a_second_answer(
        plugin, raster_layer, stub_engine, tmp_path, qgis_iface):
    """Every turn stored the raster's CRS WKT and its answer twice (in the turn and in its result)."""
    from osgeo import gdal
    from qgis.core import QgsProject

    project = QgsProject.instance()
    layer = raster_layer()
    layer_id = layer.id()
    wkt = gdal.Open(layer.source()).GetProjection()
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(layer.crs())
    canvas.setExtent(layer.extent().buffered(-100))  # a part of it: the request has an area
    dock = plugin.dock
    dock.set_layer(layer)
    dock.set_aoi_mode("extent")
    for n, question in enumerate(("first?", "second?"), 1):
        dock.ask(question)
        wait_until(_answered(dock, layer, n), 30)
    dock.set_aoi_mode("layer")
    wait_for_tasks()
    live = [dict(t) for t in dock.turns(layer)]
    answer = live[0]["answer"]
    text = QgsProject.instance().readEntry("geovqa", "conversations", "")[0]
    assert wkt and wkt not in text and "crs_wkt" not in text and '"anchors"' not in text
    assert text.count(json.dumps(answer)) == 2  # once a turn
    for turn in live:
        assert {"anchors", "crs_wkt", "answer"}.isdisjoint(turn["result"])
        assert turn["request"]["aoi"] and turn["result"]["tokens"]["visual_kept"] == 4
        assert turn["result"]["timings"]["total"] == 0.1 and turn["result"]["local_heatmap_path"]

    path = str(tmp_path / "p.qgs")
    assert project.write(path) and project.read(path)
    dock.set_layer(project.mapLayer(layer_id))
    exported = json.loads(Path(dock.export_conversation(tmp_path / "c.json")).read_text(encoding="utf-8"))
    assert [{k: t[k] for k in ("question", "answer", "request", "result", "meta", "aoi_label")}
            for t in exported["turns"]] == [{k: t[k] for k in ("question", "answer", "request", "result", "meta",
                                                               "aoi_label")} for t in live]
    markdown = Path(dock.export_conversation(tmp_path / "c.md")).read_text(encoding="utf-8")
    assert markdown.count(f"A: {answer}") == 2 and "visual tokens kept" in markdown

    # an entry saved with the whole result event: read without those fields, saved so next time
    full = dict({k: v for k, v in live[0].items() if not k.startswith("_")}, result=dict(live[0]["result"], crs_wkt=wkt, answer=answer,
                                     anchors={"type": "FeatureCollection", "features": []}))
    project.writeEntry("geovqa", "conversations", json.dumps({"version": 1, "conversations": {layer_id: [full]}}))
    assert project.write(path) and project.read(path)
    (turn,) = dock.turns(project.mapLayer(layer_id))
    assert turn["result"] == live[0]["result"] and turn["answer"] == answer
    dock.set_layer(project.mapLayer(layer_id))
    assert dock.ask("third?"), dock.progress_label.text()
    wait_until(_answered(dock, project.mapLayer(layer_id), 2), 30)
    wait_for_tasks()
    assert wkt not in QgsProject.instance().readEntry("geovqa", "conversations", "")[0]


def test_unreadable_saved_conversations_are_ignored_with_a_log_message_and_kept(
        plugin, raster_layer, stub_engine, tmp_path):
    import geovqa
    from qgis.core import QgsProject

    project = QgsProject.instance()
    layer_id = raster_layer().id()
    path = str(tmp_path / "p.qgs")
    log = _log_messages()
    with python_errors() as errors:
        project.writeEntry("geovqa", "conversations", '{"version": 1, "conversations": {"x": [')
        assert project.write(path) and project.read(path)
        assert not any(plugin.dock.conversations.values())
        plugin.unload()
        again = geovqa.classFactory(plugin.iface)
        again.initGui()  # the plugin loads with the project open
        try:
            dock = again.dock
            assert not any(dock.conversations.values())
            assert any(tag == "GeoVQA" and "could not be read" in text for tag, text in log), log
            layer = project.mapLayer(layer_id)
            dock.set_layer(layer)
            dock.ask("still working?")
            wait_until(_answered(dock, layer), 30)
            wait_for_tasks()
        finally:
            again.unload()
    assert errors == []
    assert [t["question"] for t in _entry()["conversations"][layer_id]] == ["still working?"]
    assert _unreadable_items() == [{"entry": '{"version": 1, "conversations": {"x": ['}]

    # turns without a question are left out; odd values are shown as text
    project.writeEntry("geovqa", "conversations", json.dumps({"version": 1, "conversations": {
        layer_id: [{"question": 3}, "nonsense", {"question": "kept?", "answer": 42, "done": False}],
        "other": "not a list"}}))
    assert project.write(path) and project.read(path)
    again = geovqa.classFactory(plugin.iface)
    again.initGui()
    try:
        (turn,) = again.dock.turns(project.mapLayer(layer_id))
        assert turn["answer"] == "42" and turn["interrupted"] and turn["done"]
        assert any("3 GeoVQA conversation turns" in text for _, text in log), log
    finally:
        again.unload()


def _unreadable_items():
    from qgis.core import QgsProject

    text, found = QgsProject.instance().readEntry("geovqa", "conversations_unreadable", "")
    assert found, "nothing was kept aside"
    data = json.loads(text)
    assert data["version"] == 1
    return data["unreadable"]


def test_saved_turns_that_cannot_be_read_are_kept_aside_and_never_overwritten(
        plugin, raster_layer, stub_engine, tmp_path):
    """A single unreadable turn (a question that is no text, a layer's value that is no list) was
    counted and logged, then dropped by the next save; a second unreadable entry replaced the first."""
    from qgis.core import QgsProject

    project = QgsProject.instance()
    layer_id = raster_layer().id()
    path = str(tmp_path / "p.qgs")
    dock = plugin.dock
    bad_turn = {"question": 3, "answer": "an answer worth keeping"}
    project.writeEntry("geovqa", "conversations", json.dumps({"version": 1, "conversations": {
        layer_id: [bad_turn, {"question": "kept?", "answer": "yes", "done": True}],
        "other": {"question": "not a list"}}}))
    assert project.write(path) and project.read(path)
    layer = project.mapLayer(layer_id)
    assert [t["question"] for t in dock.turns(layer)] == ["kept?"]
    dock.set_layer(layer)
    dock.ask("new?")  # rewrites the entry without the turns it could not read
    wait_until(_answered(dock, layer, 2), 30)
    wait_for_tasks()
    assert [t["question"] for t in _entry()["conversations"][layer_id]] == ["kept?", "new?"]
    first = [{"layer_id": layer_id, "turn": bad_turn}, {"layer_id": "other", "turns": {"question": "not a list"}}]
    assert _unreadable_items() == first
    assert project.write(path) and project.read(path)  # read back: kept aside once, not again
    dock.set_layer(project.mapLayer(layer_id))
    dock.ask("again?")
    wait_until(_answered(dock, project.mapLayer(layer_id), 3), 30)
    wait_for_tasks()
    assert _unreadable_items() == first

    assert project.write(path) and project.read(path)  # (saving writes the dock's conversations)
    project.writeEntry("geovqa", "conversations", '{"version": 1, "conversations": {"x": [')  # cut short
    assert project.write(path) and project.read(path)
    assert not any(dock.conversations.values())
    dock.set_layer(project.mapLayer(layer_id))
    dock.ask("after the cut?")
    wait_until(_answered(dock, project.mapLayer(layer_id)), 30)
    wait_for_tasks()
    assert _unreadable_items() == first + [{"entry": '{"version": 1, "conversations": {"x": ['}]
    assert [t["question"] for t in _entry()["conversations"][layer_id]] == ["after the cut?"]


def test_an_unreadable_entry_kept_aside_as_plain_text_stays_when_more_is_kept(qgis_new_project):
    """A ``conversations_unreadable`` that is not the list (as first written) is kept as an item."""
    from geovqa.history import ProjectHistory
    from qgis.core import QgsProject

    project = QgsProject.instance()
    project.writeEntry("geovqa", "conversations_unreadable", "not JSON at all")
    project.writeEntry("geovqa", "conversations", "{also not JSON")
    history = ProjectHistory()
    assert history.read() == {}
    history.write({"a": [{"question": "q?", "answer": "a", "done": True}]})
    assert _unreadable_items() == [{"entry": "not JSON at all"}, {"entry": "{also not JSON"}]
    history.write({"a": []})  # nothing more to keep aside: left as it is
    assert _unreadable_items() == [{"entry": "not JSON at all"}, {"entry": "{also not JSON"}]


DEEP = '{"version": 1, "conversations": {"x": ' + "[" * 5000 + "]" * 5000 + "}}"


def test_a_saved_entry_nested_too_deeply_is_ignored_with_a_log_message_and_kept(
        plugin, raster_layer, stub_engine, tmp_path):
    """json.loads raises RecursionError, not ValueError, on JSON nested deeper than Python's
    recursion limit: opening such a project raised from the dock instead of logging and keeping
    the entry aside as for any other unreadable entry."""
    from qgis.core import QgsProject

    project = QgsProject.instance()
    layer_id = raster_layer().id()
    path = str(tmp_path / "p.qgs")
    log = _log_messages()
    with python_errors() as errors:
        project.writeEntry("geovqa", "conversations", DEEP)
        assert project.write(path) and project.read(path)
        dock = plugin.dock
        assert not any(dock.conversations.values())
        assert any(tag == "GeoVQA" and "could not be read: it is nested too deeply" in text
                   for tag, text in log), log
        layer = project.mapLayer(layer_id)
        dock.set_layer(layer)
        dock.ask("still working?")
        wait_until(_answered(dock, layer), 30)
        wait_for_tasks()
    assert errors == []
    assert [t["question"] for t in _entry()["conversations"][layer_id]] == ["still working?"]
    assert _unreadable_items() == [{"entry": DEEP}]


def test_a_kept_aside_entry_nested_too_deeply_stays_when_more_is_kept(qgis_new_project):
    """Keeping more aside reads the ``conversations_unreadable`` entry first: one nested too
    deeply to parse raised RecursionError there (the save failed); it is kept as an item."""
    from geovqa.history import ProjectHistory
    from qgis.core import QgsProject

    project = QgsProject.instance()
    project.writeEntry("geovqa", "conversations_unreadable", DEEP)
    project.writeEntry("geovqa", "conversations", "{also not JSON")
    history = ProjectHistory()
    assert history.read() == {}
    history.write({"a": [{"question": "q?", "answer": "a", "done": True}]})
    assert _unreadable_items() == [{"entry": DEEP}, {"entry": "{also not JSON"}]


# -- batch dialog -------------------------------------------------------------------------------
def _run_batch(plugin, layers, questions, with_layers=False):
    dlg = plugin.open_batch()
    dlg.set_checked_layers({lyr.id() for lyr in layers})
    dlg.questions_edit.setPlainText("\n".join(questions))
    dlg.layers_check.setChecked(with_layers)
    done = []
    dlg.batch_finished.connect(done.append)
    dlg.run()
    return dlg, done


def test_each_batch_answer_is_saved_as_it_arrives(plugin, raster_layer, stub_engine, tmp_path):
    stub_engine.token_delay = 0.1  # about a second an answer
    a = raster_layer("a")
    dlg, done = _run_batch(plugin, [a], ["q1", "q2"])
    wait_until(lambda: dlg.rows, 30, "the first answer")
    path = Path(dlg.autosave_path)
    assert path.parent == tmp_path / "results" and path.suffix == ".jsonl"  # with the batch's heatmaps
    assert str(path) in dlg.autosave_label.text()
    (first,) = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert not done and first["question"] == "q1" and first["answer"] == "The area is 64 x 48 pixels with 3 bands."
    wait_until(lambda: done, 30, "the batch")
    wait_for_tasks()
    saved = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert saved == json.loads(json.dumps(done[0], default=str))  # every row, as Export JSON has them
    assert [r["question"] for r in saved] == ["q1", "q2"] and saved[1]["heatmap_path"]


def test_a_batch_says_when_its_answers_cannot_be_autosaved(plugin, raster_layer, stub_engine, tmp_path):
    from conftest import set_settings

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    set_settings(output_dir=str(blocker / "results"))
    dlg, done = _run_batch(plugin, [raster_layer("a")], ["q1", "q2"])
    wait_until(lambda: done, 60, "the batch")
    wait_for_tasks()
    assert [r["answer"] for r in done[0]] == ["The area is 64 x 48 pixels with 3 bands."] * 2  # the batch went on
    assert "could not be saved as they arrive" in dlg.autosave_label.text()
    assert "Export them" in dlg.autosave_label.text()


def _groups():
    from qgis.core import QgsProject

    return [g.name() for g in QgsProject.instance().layerTreeRoot().findGroups()]


def test_a_layer_removed_mid_batch_gives_error_rows_and_the_batch_goes_on(plugin, raster_layer, stub_engine):
    from qgis.core import QgsProject

    stub_engine.token_delay = 0.05
    a, b = raster_layer("a"), raster_layer("b", width=32, height=40)
    dlg, done = _run_batch(plugin, [a, b], ["q1", "q2"], with_layers=True)
    with python_errors() as errors:
        wait_until(lambda: dlg.rows, 30, "the first answer")
        QgsProject.instance().removeMapLayer(b.id())
        wait_until(lambda: done, 30, "the batch")
        wait_for_tasks()
    assert errors == []
    rows = done[0]
    assert [(r["layer"], r["question"]) for r in rows] == [("a", "q1"), ("a", "q2"), ("b", "q1"), ("b", "q2")]
    assert all(r["answer"] and r["error"] is None for r in rows[:2])
    assert all(r["answer"] is None and "'b' was removed from the project" in r["error"] for r in rows[2:])
    assert len(stub_engine.requests) == 2 and len(_groups()) == 2  # result layers of a's answers only
    assert [dlg.layer_list.item(i).text() for i in range(dlg.layer_list.count())] == ["a"]
    assert dlg.run_button.isEnabled()


def test_layers_removed_while_the_batch_prepares_them_give_error_rows(plugin, raster_layer, stub_engine, qgis_iface):
    """A web/virtual layer is rendered before the batch asks: removing one that waits for its
    turn stopped the batch for good (its deleted layer was read), one being rendered went on."""
    from qgis.core import QgsProject

    from conftest import virtual_raster_layer

    src = raster_layer("src")
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(src.crs())
    canvas.setExtent(src.extent())
    for removed in ("v1", "v2"):  # the one being rendered, then one waiting for its turn
        layers = {name: virtual_raster_layer(src, name) for name in ("v1", "v2", "v3")}
        ids = {name: layer.id() for name, layer in layers.items()}
        with python_errors() as errors:
            dlg, done = _run_batch(plugin, list(layers.values()), ["q1"])
            assert dlg._rendering is not None and dlg._rendering[0] == ids["v1"]
            QgsProject.instance().removeMapLayer(ids[removed])
            wait_until(lambda: done, 30, "the batch")
            wait_for_tasks()
        assert errors == []
        rows = {r["layer"]: r for r in done[0]}
        assert list(rows) == ["v1", "v2", "v3"]
        assert rows[removed]["answer"] is None and "was removed from the project" in rows[removed]["error"]
        assert all(r["answer"] and r["error"] is None for name, r in rows.items() if name != removed)
        QgsProject.instance().removeMapLayers([lid for lid in ids.values() if QgsProject.instance().mapLayer(lid)])
        stub_engine.requests.clear()


def test_closing_the_project_mid_batch_ends_it_without_adding_layers_to_the_next(plugin, raster_layer, stub_engine):
    from qgis.core import QgsProject

    stub_engine.token_delay = 0.05
    a, b = raster_layer("a"), raster_layer("b")
    dlg, done = _run_batch(plugin, [a, b], ["q1", "q2", "q3"], with_layers=True)
    with python_errors() as errors:
        wait_until(lambda: dlg.rows, 30, "the first answer")
        QgsProject.instance().clear()
        groups_after_clear = _groups()
        wait_until(lambda: done, 30, "the batch")
        wait_for_tasks()
    assert errors == [] and groups_after_clear == [] and _groups() == []
    rows = done[0]
    assert len(rows) == 6 and len(stub_engine.requests) <= 2  # the first answer, maybe the one streaming
    assert all("was removed from the project" in r["error"] for r in rows[2:])


# -- Processing ---------------------------------------------------------------------------------
def test_the_processing_batch_writes_each_csv_row_as_its_answer_arrives(
        plugin, raster_layer, stub_engine, tmp_path, qgis_processing, monkeypatch):
    import processing
    from geovqa import results_io
    from geovqa.processing import batch_algorithm
    from geovqa.results_io import write_csv

    out = tmp_path / "answers.csv"
    asked, written = [], []  # the answers in the file as each question is asked / each row written

    def rows_in_file():
        with open(out, newline="", encoding="utf-8") as fh:
            return [r["answer"] for r in csv.DictReader(fh)]

    ask_once, write = batch_algorithm.ask_once, results_io.CsvRows.write
    monkeypatch.setattr(batch_algorithm, "ask_once",
                        lambda *a, **kw: asked.append(rows_in_file()) or ask_once(*a, **kw))
    monkeypatch.setattr(results_io.CsvRows, "write",
                        lambda self, row: write(self, row) or written.append(rows_in_file()))
    res = processing.run("geovqa:batch_questions", {
        "LAYERS": [raster_layer("a"), raster_layer("b", width=32, height=40)], "QUESTIONS": "q1\nq2",
        "OUTPUT": str(out), "OUTPUT_JSON": str(tmp_path / "answers.json")})
    a_answer, b_answer = "The area is 64 x 48 pixels with 3 bands.", "The area is 32 x 40 pixels with 3 bands."
    in_order = [[a_answer], [a_answer] * 2, [a_answer] * 2 + [b_answer], [a_answer] * 2 + [b_answer] * 2]
    assert asked == [[]] + in_order[:3]  # the header first; each answer is in the file before the next question
    assert written == in_order  # each row is in the file (flushed) as soon as it is written
    # the same file as when it was written at the end
    rows = json.loads((tmp_path / "answers.json").read_text(encoding="utf-8"))["results"]
    reference = write_csv(rows, str(tmp_path / "reference.csv"))
    assert out.read_bytes() == Path(reference).read_bytes() and res["ANSWERED"] == 4


def test_a_cancelled_processing_batch_keeps_the_answers_it_finished(
        plugin, raster_layer, stub_engine, tmp_path, qgis_processing, monkeypatch):
    import processing
    from geovqa import results_io
    from qgis.core import QgsProcessingFeedback

    out = tmp_path / "answers.csv"
    feedback = QgsProcessingFeedback()
    write = results_io.CsvRows.write
    monkeypatch.setattr(results_io.CsvRows, "write",  # cancelled as the first answer's row is written
                        lambda self, row: write(self, row) or feedback.cancel())
    processing.run("geovqa:batch_questions", {
        "LAYERS": [raster_layer("a")], "QUESTIONS": "q1\nq2\nq3", "OUTPUT": str(out)}, feedback=feedback)
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["question"], r["answer"]) for r in rows] == [("q1", "The area is 64 x 48 pixels with 3 bands.")]
    assert len(stub_engine.requests) == 1


def _result_layers(dock, layer):
    from qgis.core import QgsProject

    turn = dock.turns(layer)[-1]
    project = QgsProject.instance()
    return project.mapLayer(turn["heatmap_layer_id"]), project.mapLayer(turn["anchors_layer_id"])


def test_result_files_asked_before_the_first_save_go_with_the_project(plugin, raster_layer, stub_engine, tmp_path,
                                                                      qgis_iface, request):
    """Answers asked before the project was first saved kept their files in the QGIS profile:
    the project stored paths leading out of its folder, and a project moved or shared with its
    folder came back with its heatmap and anchors layers broken."""
    import shutil

    from conftest import set_settings
    from qgis.core import Qgis, QgsProject

    set_settings(output_dir="")  # the rule: next to the project file, else the QGIS profile
    project = QgsProject.instance()
    scene_dir = tmp_path / "proj"
    scene_dir.mkdir()
    a = raster_layer("a")
    dock = plugin.dock
    dock.set_layer(a)
    dock.ask("first?")
    wait_until(_answered(dock, a), 30)
    wait_for_tasks()
    heat, anchors = _result_layers(dock, a)
    before = (heat.source(), anchors.source())
    for old in before:  # files of the test profile, not of this test's folder (GDAL's .aux.xml too)
        old = Path(old.split("|")[0])
        request.addfinalizer(lambda old=old: [p.unlink() for p in old.parent.glob(old.name + "*")])
    assert not heat.source().startswith(str(scene_dir))  # in the profile: no project folder yet
    renderer, opacity = heat.renderer().type(), heat.renderer().opacity()
    qgis_iface.messageBar().clear_messages()

    project.setFileName(str(scene_dir / "p.qgz"))  # what QGIS's Save does first, then write()
    assert project.write()
    results = scene_dir / "geovqa_results"
    for layer, old in zip((heat, anchors), before):
        assert layer.isValid() and layer.source().startswith(str(results)), layer.source()
        assert Path(old.split("|")[0]).is_file()  # the originals stay
    assert (heat.renderer().type(), heat.renderer().opacity()) == (renderer, opacity)  # its style kept
    result = dock.turns(a)[-1]["result"]
    assert result["local_heatmap_path"] == heat.source()
    assert any(str(results) in m for m in qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Info))
    heat_id, anchors_id, a_id = heat.id(), anchors.id(), a.id()

    # the project folder moved elsewhere (the raster with it): everything comes back
    project.clear()
    moved = tmp_path / "elsewhere" / "deeper"
    shutil.copytree(scene_dir, moved / "proj")
    shutil.copy(tmp_path / "a.tif", moved / "a.tif")  # the raster, beside the project folder as before
    shutil.rmtree(scene_dir)
    assert project.read(str(moved / "proj" / "p.qgz"))
    for lid in (heat_id, anchors_id):
        layer = project.mapLayer(lid)
        assert layer is not None and layer.isValid(), lid
        assert layer.source().startswith(str(moved / "proj" / "geovqa_results")), layer.source()
    assert project.mapLayer(heat_id).renderer().type() == renderer
    assert [t["question"] for t in dock.turns(project.mapLayer(a_id))] == ["first?"]


def test_result_files_stay_in_a_results_folder_the_user_chose(plugin, raster_layer, stub_engine, tmp_path):
    from qgis.core import QgsProject

    a = raster_layer("a")  # the tests' own results folder is set in the options
    dock = plugin.dock
    dock.set_layer(a)
    dock.ask("first?")
    wait_until(_answered(dock, a), 30)
    wait_for_tasks()
    heat, _anchors = _result_layers(dock, a)
    source = heat.source()
    assert source.startswith(str(tmp_path / "results"))
    (tmp_path / "proj").mkdir()
    QgsProject.instance().setFileName(str(tmp_path / "proj" / "p.qgz"))
    assert QgsProject.instance().write()
    assert heat.source() == source and not (tmp_path / "proj" / "geovqa_results").exists()


@pytest.mark.parametrize("first_save", [True, False], ids=["save", "save-as"])
def test_result_files_of_an_answer_streaming_while_the_project_is_saved_go_with_it(
        plugin, raster_layer, stub_engine, tmp_path, request, first_save):
    """The project saved (Save of a new project, or Save As) while an answer streamed: its heatmap
    and anchors stayed in the QGIS profile (or the old project's geovqa_results), where the task
    was told to write them when asked, and no later Save copied them: the project moved or shared
    with its folder lost those layers."""
    from conftest import set_settings
    from qgis.core import QgsProject

    set_settings(output_dir="")
    project = QgsProject.instance()
    for d in ("old", "new"):
        (tmp_path / d).mkdir()
    if not first_save:
        project.setFileName(str(tmp_path / "old" / "p.qgz"))
        assert project.write()
    stub_engine.token_delay = 0.15
    a = raster_layer("a")
    dock = plugin.dock
    dock.set_layer(a)
    dock.ask("streaming during the save?")
    turn = dock.current_turn
    wait_until(lambda: turn["answer"], 10, "the first words")
    project.setFileName(str(tmp_path / "new" / "p.qgz"))  # Save / Save As: a name, then write()
    assert project.write()
    wait_until(lambda: turn.get("done"), 30, "the answer")
    wait_for_tasks()
    heat, anchors = _result_layers(dock, a)
    if first_save:  # the originals, in the test profile (GDAL's .aux.xml too)
        from geovqa.settings import profile_results_dir

        for layer in (heat, anchors):
            name = Path(layer.source().split("|")[0]).name
            request.addfinalizer(lambda name=name: [p.unlink() for p in profile_results_dir().glob(name + "*")])
    results = tmp_path / "new" / "geovqa_results"
    for layer in (heat, anchors):
        assert layer.isValid() and layer.source().startswith(str(results)), layer.source()
    assert turn["result"]["local_heatmap_path"] == heat.source()
    assert str(results) in dock.progress_label.text()


def test_result_files_of_a_batch_running_while_the_project_is_saved_go_with_it(
        plugin, raster_layer, stub_engine, tmp_path):
    """Same for the batch dialog: it writes into the results folder of when it started."""
    from conftest import set_settings
    from qgis.core import QgsProject

    set_settings(output_dir="")
    project = QgsProject.instance()
    for d in ("old", "new"):
        (tmp_path / d).mkdir()
    project.setFileName(str(tmp_path / "old" / "p.qgz"))
    assert project.write()
    stub_engine.token_delay = 0.1
    a = raster_layer("a")
    dlg, done = _run_batch(plugin, [a], ["q1", "q2"], with_layers=True)
    wait_until(lambda: dlg.rows, 30, "the first answer")
    project.setFileName(str(tmp_path / "new" / "p.qgz"))  # File > Save As
    assert project.write()
    wait_until(lambda: done, 30, "the batch")
    wait_for_tasks()
    results = tmp_path / "new" / "geovqa_results"
    sources = [lyr.source() for lyr in project.mapLayers().values() if lyr.name().startswith(("heatmap", "anchors"))]
    assert len(sources) == 4 and all(s.startswith(str(results)) for s in sources), sources
    assert done[0][-1]["heatmap_path"].startswith(str(results)), done[0]  # answered after the Save As
    # answered before it: the rows (and so the exports) followed the copies too; they kept the
    # old project's paths while their layers showed the new ones
    assert all(r[k].startswith(str(results)) for r in done[0] for k in ("heatmap_path", "anchors_path")), done[0]
    dlg.export(str(tmp_path / "rows.json"))
    exported = json.loads((tmp_path / "rows.json").read_text())["results"]
    assert [r["heatmap_path"] for r in exported] == [r["heatmap_path"] for r in done[0]]


def _drop_new_profile_files(request):
    """Answers asked before a first save write into the (test) profile: what the test adds there
    is removed after it."""
    from geovqa.settings import profile_results_dir

    profile = profile_results_dir()
    before = set(profile.rglob("*")) if profile.exists() else set()  # renders/ too
    request.addfinalizer(lambda: [p.unlink() for p in (set(profile.rglob("*")) if profile.exists() else set()) - before
                                  if p.is_file()])


def _saved_or_new_project(tmp_path, request, first_save):
    """The project of a test of Save (``first_save``: a new project) or Save As (first saved in
    ``tmp_path/old``): the results folder its own (the options' empty), the profile's new files
    removed after the test, the folders ``old`` and ``new`` made in ``tmp_path``."""
    from conftest import set_settings
    from qgis.core import QgsProject

    set_settings(output_dir="")
    _drop_new_profile_files(request)
    project = QgsProject.instance()
    for d in ("old", "new"):
        (tmp_path / d).mkdir()
    if not first_save:
        project.setFileName(str(tmp_path / "old" / "p.qgs"))
        assert project.write()
    return project


def _moved_and_read_back(project, folder, tmp_path):
    """The project's folder moved elsewhere (the raster a.tif beside it, as before) and read back."""
    import shutil

    project.clear()
    moved = tmp_path / "elsewhere"
    shutil.copytree(folder, moved / folder.name)
    shutil.copy(tmp_path / "a.tif", moved / "a.tif")
    shutil.rmtree(folder)
    assert project.read(str(moved / folder.name / "p.qgs"))
    return moved / folder.name


def _files_of(turns):
    from geovqa.history import RESULT_PATHS

    return [Path(t["result"][k]) for t in turns for k in RESULT_PATHS]


@pytest.mark.parametrize("first_save", [True, False], ids=["save", "save-as"])
def test_result_files_of_answers_whose_layers_were_removed_go_with_the_project_saved_under_a_new_name(
        plugin, raster_layer, stub_engine, tmp_path, request, first_save):
    """Save (of a new project) or Save As copied only the files of result layers still in the
    project: an answer whose layers the user had removed kept its heatmap and anchors paths in
    the QGIS profile (or the old project's geovqa_results), and the project moved or shared with
    its folder lost them."""
    project = _saved_or_new_project(tmp_path, request, first_save)
    a = raster_layer("a")
    a_id = a.id()
    dock = plugin.dock
    dock.set_layer(a)
    for n, question in enumerate(("kept?", "removed?"), 1):
        dock.ask(question)
        wait_until(_answered(dock, a, n), 30)
        wait_for_tasks()
    before = _files_of(dock.turns(a))
    heat, anchors = _result_layers(dock, a)  # of "removed?"
    project.removeMapLayers([heat.id(), anchors.id()])

    project.setFileName(str(tmp_path / "new" / "p.qgs"))  # Save / Save As: a name, then write()
    assert project.write()
    results = tmp_path / "new" / "geovqa_results"
    assert [p.parent for p in _files_of(dock.turns(a))] == [results] * 4
    assert all(p.is_file() for p in before + _files_of(dock.turns(a)))  # copied, the originals kept
    saved = [t["result"] for t in _entry()["conversations"][a_id]]
    assert all(r[k].startswith("./geovqa_results/") for r in saved for k in ("local_heatmap_path",
                                                                             "local_anchors_path")), saved

    folder = _moved_and_read_back(project, tmp_path / "new", tmp_path)
    files = _files_of(dock.conversations[a_id])
    assert all(p.is_file() and p.parent == folder / "geovqa_results" for p in files), files


@pytest.mark.parametrize("first_save", [True, False], ids=["save", "save-as"])
def test_result_files_of_an_answer_that_came_after_its_raster_was_removed_go_with_the_project(
        plugin, raster_layer, stub_engine, tmp_path, request, first_save):
    """The project saved under a new name while an answer streamed, its raster then removed: the
    answer got no layers, and so its files stayed where the task wrote them (the QGIS profile, the
    old project's geovqa_results), outside the project its turn is saved in."""
    project = _saved_or_new_project(tmp_path, request, first_save)
    stub_engine.token_delay = 0.15
    a = raster_layer("a")
    a_id = a.id()
    dock = plugin.dock
    dock.set_layer(a)
    dock.ask("answered after its raster was removed?")
    turn = dock.current_turn
    wait_until(lambda: turn["answer"], 10, "the first words")
    project.setFileName(str(tmp_path / "new" / "p.qgs"))  # Save / Save As: a name, then write()
    assert project.write()
    project.removeMapLayer(a_id)
    wait_until(lambda: turn.get("done"), 30, "the answer")
    wait_for_tasks()
    assert turn.get("heatmap_layer_id") is None and not turn.get("error"), turn
    results = tmp_path / "new" / "geovqa_results"
    files = _files_of([turn])
    assert all(p.is_file() and p.parent == results for p in files), files
    assert project.write()
    folder = _moved_and_read_back(project, tmp_path / "new", tmp_path)
    files = _files_of(dock.conversations[a_id])
    assert all(p.is_file() and p.parent == folder / "geovqa_results" for p in files), files


def _render_of(turn) -> Path:
    """A turn's render, which its request sent."""
    assert turn["rendered_path"] and turn["request"]["raster_path"] == turn["rendered_path"], turn
    return Path(turn["rendered_path"])


@pytest.mark.parametrize("first_save", [True, False], ids=["save", "save-as"])
def test_the_render_an_answer_was_about_goes_with_the_project_saved_under_a_new_name(
        plugin, raster_layer, stub_engine, tmp_path, request, first_save):
    """A non-file layer (WMS, XYZ, a virtual raster) is rendered into the results folder's
    renders/ and the render sent: Save (of a new project) or Save As copied the answer's heatmap
    and anchors but not its render, which the turn (its rendered_path and its request's
    raster_path) kept in the QGIS profile or the old project's folder; the project moved or shared
    with its folder had answers about an image it no longer held."""
    from conftest import virtual_raster_layer

    project = _saved_or_new_project(tmp_path, request, first_save)
    virt = virtual_raster_layer(raster_layer("a"))
    v_id = virt.id()
    dock = plugin.dock
    dock.set_layer(virt)
    for n, question in enumerate(("first?", "second?"), 1):
        dock.ask(question)
        wait_until(_answered(dock, virt, n), 60)
        wait_for_tasks()
    before = [_render_of(t) for t in dock.turns(virt)]
    assert all(p.is_file() and p.parent.name == "renders" for p in before), before

    project.setFileName(str(tmp_path / "new" / "p.qgs"))  # Save / Save As: a name, then write()
    assert project.write()
    renders = tmp_path / "new" / "geovqa_results" / "renders"
    after = [_render_of(t) for t in dock.turns(virt)]
    assert [p.parent for p in after] == [renders] * 2 and len(set(after)) == 2, after
    assert [p.name for p in after] == [p.name for p in before]
    assert all(p.is_file() for p in before + after)  # copied, the originals kept
    saved = _entry()["conversations"][v_id]
    assert all(t["rendered_path"] == t["request"]["raster_path"] and t["rendered_path"].startswith(
        "./geovqa_results/renders/") for t in saved), saved

    folder = _moved_and_read_back(project, tmp_path / "new", tmp_path)
    moved = [_render_of(t) for t in dock.conversations[v_id]]
    assert all(p.is_file() and p.parent == folder / "geovqa_results" / "renders" for p in moved), moved


def test_the_render_of_a_question_asked_as_the_project_is_saved_under_a_new_name_goes_with_it(
        plugin, raster_layer, stub_engine, tmp_path, request):
    """The project given its file name while the layer was being rendered: the render was written
    into the results folder of when it was asked (the profile's), the answer's heatmap and anchors
    into the project's; nothing gathered the render afterwards."""
    from conftest import set_settings, virtual_raster_layer
    from qgis.core import QgsProject

    set_settings(output_dir="")
    _drop_new_profile_files(request)
    project = QgsProject.instance()
    virt = virtual_raster_layer(raster_layer("a"))
    dock = plugin.dock
    dock.set_layer(virt)
    dock.ask("rendered as the project was saved?")
    turn = dock.current_turn
    assert dock.renderer is not None and "rendered_path" not in turn  # still rendering
    (tmp_path / "new").mkdir()
    project.setFileName(str(tmp_path / "new" / "p.qgs"))  # Save: a name, then write()
    assert project.write()
    wait_until(lambda: turn.get("done"), 60, "the answer")
    wait_for_tasks()
    results = tmp_path / "new" / "geovqa_results"
    assert not turn.get("error") and Path(turn["result"]["local_heatmap_path"]).parent == results, turn
    assert _render_of(turn).is_file() and _render_of(turn).parent == results / "renders", turn


def test_saved_result_paths_follow_the_project_folder_when_it_is_moved(plugin, raster_layer, stub_engine, tmp_path):
    """The result layers came back from a moved project folder (QGIS stores their sources relative),
    but the saved turns kept the files' absolute paths: the exported conversation pointed at
    files that were no longer there."""
    import shutil

    from conftest import set_settings
    from qgis.core import QgsProject

    set_settings(output_dir="")
    project = QgsProject.instance()
    proj = tmp_path / "proj"
    proj.mkdir()
    project.setFileName(str(proj / "p.qgs"))
    assert project.write()
    a = raster_layer("a")
    a_id = a.id()
    dock = plugin.dock
    dock.set_layer(a)
    dock.ask("first?")
    wait_until(_answered(dock, a), 30)
    wait_for_tasks()
    heat_id = dock.turns(a)[0]["heatmap_layer_id"]
    assert project.write()
    (saved,) = _entry()["conversations"][a_id]
    assert saved["result"]["local_heatmap_path"].startswith("./geovqa_results/")  # as QGIS stores sources
    project.clear()
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copytree(proj, moved / "proj")
    shutil.copy(tmp_path / "a.tif", moved / "a.tif")
    shutil.rmtree(proj)
    assert project.read(str(moved / "proj" / "p.qgs"))
    heat = project.mapLayer(heat_id)
    assert heat.isValid() and Path(heat.source()).is_file()
    dock.set_layer(project.mapLayer(a_id))
    (turn,) = dock.turns()
    assert turn["result"]["local_heatmap_path"] == heat.source()
    assert Path(turn["result"]["local_anchors_path"]).is_file()
    exported = json.loads(Path(dock.export_conversation(str(tmp_path / "c.json"))).read_text(encoding="utf-8"))
    assert exported["turns"][0]["result"]["local_heatmap_path"] == heat.source()
    assert not project.isDirty()


def test_saved_absolute_result_paths_of_an_earlier_version_are_read_as_they_are(plugin, qgis_new_project, tmp_path):
    from geovqa import history
    from qgis.core import QgsProject

    project = QgsProject.instance()
    project.setFileName(str(tmp_path / "p.qgs"))
    turn = {"question": "q?", "answer": "a", "done": True, "rendered_path": "/elsewhere/r.tif",
            "request": {"raster_path": "/elsewhere/r.tif"},
            "result": {"local_heatmap_path": "/elsewhere/h.tif", "local_anchors_path": "/elsewhere/a.geojson"}}
    project.writeEntry("geovqa", "conversations", history.json.dumps({"version": 1, "conversations": {"L": [turn]}}))
    (read,) = history.ProjectHistory().read(project)["L"]
    assert read["rendered_path"] == read["request"]["raster_path"] == "/elsewhere/r.tif"
    assert read["result"]["local_heatmap_path"] == "/elsewhere/h.tif"
    assert read["result"]["local_anchors_path"] == "/elsewhere/a.geojson"


def test_a_turn_is_saved_as_standard_json_without_values_json_cannot_hold():
    """The entry is read back by anything that reads JSON: a value JSON has no number for (a NaN
    or infinite timing) is left out rather than written as NaN / Infinity; finite values stay."""
    from geovqa.history import dumps, loads

    def strict(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"the entry holds {name}"))

    turn = {"question": "q", "answer": "a", "done": True, "elapsed": float("nan"), "speed": float("inf"),
            "timings": {"total": 3.5, "queue": float("nan")}, "budget": 2.0}
    text = dumps({"L1": [turn]})
    saved = strict(text)["conversations"]["L1"][0]
    assert "elapsed" not in saved and "speed" not in saved
    assert saved["budget"] == 2.0
    assert loads(text)[0]["L1"][0]["answer"] == "a"


def test_a_turns_private_fields_stay_out_of_the_project():
    """Fields starting with "_" are the dock's own (the area frozen for a retry): they are not
    saved with the project, even when they hold plain values."""
    from geovqa.history import dumps

    turn = {"question": "q", "answer": "a", "done": True, "_area": {"mode": "layer", "geometry": None, "crs": None}}
    saved = json.loads(dumps({"L1": [turn]}))["conversations"]["L1"][0]
    assert "_area" not in saved and saved["question"] == "q"


def test_conversations_cleared_before_a_save_do_not_come_back(qgis_new_project):
    """Clearing every conversation and saving removes the project's entry: the project opened
    again has no conversation, not the one saved before."""
    from geovqa.history import ProjectHistory
    from qgis.core import QgsProject

    project = QgsProject.instance()
    history = ProjectHistory()
    history.write({"L1": [{"question": "q", "answer": "a", "done": True, "layer_id": "L1"}]}, project)
    assert history.read(project)["L1"][0]["answer"] == "a"
    history.write({"L1": []}, project)
    assert history.read(project) == {}
    assert not project.readEntry("geovqa", "conversations", "")[1]


def test_a_saved_turn_without_its_layer_id_takes_the_layer_it_is_saved_under():
    """An entry whose turns do not name their layer (written by an earlier version, or by hand)
    gives each turn the layer id it is saved under: a retry and the layer's answers use it."""
    from geovqa.history import loads

    conversations, skipped = loads(json.dumps(
        {"version": 1, "conversations": {"L1": [{"question": "q", "answer": "a", "done": True}],
                                         "L2": [{"question": "r", "done": True, "layer_id": "L2"}]}}))
    assert skipped == []
    assert [t["layer_id"] for t in conversations["L1"] + conversations["L2"]] == ["L1", "L2"]
