"""Batch dialog usability (from a walkthrough): the results table gets the room, cells show their
full text, inputs are frozen while a batch runs, the end-of-run wording counts questions, the
autosave file can be opened, reopening the dialog keeps the user's ticks, and Export writes the
format chosen."""

from __future__ import annotations

import pytest
from conftest import run_batch_dialog, set_settings, wait_for_tasks, wait_until


def _settle():
    from qgis.core import QgsApplication

    for _ in range(5):
        QgsApplication.processEvents()


def _start(dlg, layers, questions):
    """Check ``layers``, type ``questions`` (one a line) and press Run."""
    dlg.set_checked_layers({lyr.id() for lyr in layers})
    dlg.questions_edit.setPlainText("\n".join(questions))
    dlg.run()


def _run(dlg, layers, questions, done):
    """:func:`_start`, then wait for the batch to end (``done``: its batch_finished calls)."""
    n = len(done)
    _start(dlg, layers, questions)
    wait_until(lambda: len(done) > n, 60, "the batch")
    wait_for_tasks()


def test_the_results_table_gets_most_of_the_height_and_shows_full_texts(plugin, raster_layer, stub_engine):
    from qgis.PyQt.QtCore import Qt
    from qgis.PyQt.QtTest import QTest
    from qgis.PyQt.QtWidgets import QHeaderView

    a = raster_layer("ortho_south_with_a_rather_long_layer_name_2023")
    dlg = plugin.open_batch()
    dlg.resize(760, 560)
    dlg.show()
    _settle()
    row_h = dlg.table.verticalHeader().defaultSectionSize()
    # at the default size the table showed about 1.5 rows; now at least 5 fit
    assert dlg.table.viewport().height() >= 5 * row_h
    header = dlg.table.horizontalHeader()
    assert header.sectionResizeMode(2) == QHeaderView.ResizeMode.Stretch
    done = []
    dlg.batch_finished.connect(done.append)
    _run(dlg, [a], ["How big?"], done)
    stub_engine.fail_with = {"code": "out_of_memory", "message": "The GPU ran out of memory.",
                             "hint": "Lower the token budget."}
    dlg.questions_edit.setPlainText("How big?\nAgain?")
    dlg.run()
    wait_until(lambda: len(done) == 2, 60, "the failing batch")
    wait_for_tasks()
    assert dlg.table.rowCount() == 2
    for c in range(dlg.table.columnCount()):
        cell = dlg.table.item(0, c)
        assert cell.toolTip() == cell.text()
    assert dlg.table.item(0, 0).toolTip() == "ortho_south_with_a_rather_long_layer_name_2023"
    error_text = dlg.table.item(1, 2).text()
    assert error_text.startswith("ERROR:") and "ran out of memory" in error_text
    cell = dlg.table.visualItemRect(dlg.table.item(1, 0)).center()
    for click in (QTest.mouseClick, QTest.mouseDClick):  # a double-click: a click, then the second press
        click(dlg.table.viewport(), Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, cell)
    viewer = dlg.row_viewer
    assert viewer is not None and viewer.isVisible()
    shown = dlg._row_viewer_text.toPlainText()
    assert dlg._row_viewer_text.isReadOnly()
    assert error_text in shown and "ortho_south_with_a_rather_long_layer_name_2023" in shown and "Again?" in shown
    viewer.close()
    dlg.close()


def test_the_answer_column_gets_the_room_the_number_columns_do_not_need(plugin, raster_layer, stub_engine):
    """At the dialog's own size (760 x 560) the Answer column, the one meant to stretch, was the
    narrowest (88 px: 'The ar…') while Kept tokens, Seconds and Bands took 100 px each."""
    from geovqa.batch_dialog import ANSWER_COLUMN, TABLE_COLUMNS

    a = raster_layer("scene_a")
    dlg, _rows = run_batch_dialog(plugin, [a], "What is in this image?")
    dlg.show()
    _settle()
    t = dlg.table
    assert dlg.size().width() == 760
    widths = {name: t.columnWidth(c) for c, name in enumerate(TABLE_COLUMNS)}
    numbers = [widths[n] for n in ("Kept tokens", "Seconds", "Bands")]
    assert t.columnWidth(ANSWER_COLUMN) >= 180 and t.columnWidth(ANSWER_COLUMN) > 2 * max(numbers), widths
    fm = t.horizontalHeader().fontMetrics()
    for c in range(ANSWER_COLUMN + 1, len(TABLE_COLUMNS)):  # each still shows its header whole
        lines = t.horizontalHeaderItem(c).text().split("\n")
        assert " ".join(lines) == TABLE_COLUMNS[c] and t.columnWidth(c) >= max(map(fm.horizontalAdvance, lines))
    # at the dialog's smallest size the table still shows its rows and a readable Answer column
    dlg.resize(dlg.minimumSizeHint())
    _settle()
    assert t.viewport().height() >= 2 * t.verticalHeader().defaultSectionSize()
    assert t.columnWidth(ANSWER_COLUMN) >= 64, {name: t.columnWidth(c) for c, name in enumerate(TABLE_COLUMNS)}
    dlg.close()
    wait_for_tasks()


def test_inputs_and_export_are_frozen_while_running_and_the_message_counts(plugin, raster_layer, stub_engine):
    a, b = raster_layer("a"), raster_layer("b")
    dlg = plugin.open_batch()
    done = []
    dlg.batch_finished.connect(done.append)
    inputs = (dlg.layer_list, dlg.questions_edit, dlg.layers_check, dlg.csv_button, dlg.json_button)
    stub_engine.token_delay = 0.1
    _start(dlg, [a, b], ["q1", "q2", "q3"])
    assert not any(w.isEnabled() for w in inputs) and not dlg.run_button.isEnabled()
    assert dlg.cancel_button.isEnabled()
    assert "autosave" in dlg.csv_button.toolTip()
    wait_until(lambda: len(dlg.rows) >= 2, 30, "two answers")
    assert dlg.message.text().startswith(f"Asked {len(dlg.rows)} of 6")
    assert not any(w.isEnabled() for w in inputs)
    stub_engine.token_delay = 0
    wait_until(lambda: done, 60, "the batch")
    wait_for_tasks()
    assert all(w.isEnabled() for w in inputs) and dlg.run_button.isEnabled() and not dlg.cancel_button.isEnabled()
    assert dlg.csv_button.toolTip() == ""
    # cancelled: enabled again
    stub_engine.token_delay = 0.2
    dlg.run()
    wait_until(lambda: stub_engine.requests, 10)
    dlg.cancel()
    wait_until(lambda: len(done) == 2, 30, "the cancelled batch")
    wait_for_tasks()
    assert all(w.isEnabled() for w in inputs) and dlg.run_button.isEnabled()
    assert "not answered" in dlg.message.text() and "(cancelled)" in dlg.message.text()


def test_a_batch_that_cannot_start_gives_the_inputs_back(plugin, raster_layer, stub_engine):
    a = raster_layer("a")
    dlg = plugin.open_batch()
    set_settings(engine_url="ftp://example.org")
    dlg.set_checked_layers({a.id()})
    dlg.questions_edit.setPlainText("q1")
    dlg.run()  # used to raise out of run() and leave Run disabled for good
    assert "could not start" in dlg.message.text() and "http://" in dlg.message.text()
    assert dlg.run_button.isEnabled() and dlg.layer_list.isEnabled() and dlg.questions_edit.isEnabled()
    assert dlg.task is None


def test_the_end_of_run_counts_questions_and_the_autosave_folder_opens(plugin, raster_layer, stub_engine, monkeypatch):
    from geovqa import batch_dialog

    a, b = raster_layer("a"), raster_layer("b")
    dlg = plugin.open_batch()
    dlg.show()
    done = []
    dlg.batch_finished.connect(done.append)
    assert not dlg.open_folder_button.isVisible()
    stub_engine.fail_with = {"code": "out_of_memory", "message": "The GPU ran out of memory."}
    _run(dlg, [a, b], ["q1", "q2", "q3"], done)
    assert dlg.message.text() == "6 questions: 0 answered, 6 failed."
    stub_engine.fail_with = None
    _run(dlg, [a], ["q1", "q2"], done)
    assert dlg.message.text() == "2 questions: 2 answered, 0 failed."
    assert dlg.autosave_path.exists()
    assert dlg.autosave_label.text() == f"Answers saved to {dlg.autosave_path}"
    assert dlg.open_folder_button.isVisible()
    opened = []

    class FakeDesktop:
        @staticmethod
        def openUrl(url):  # noqa: N802
            opened.append(url)
            return True

    monkeypatch.setattr(batch_dialog, "QDesktopServices", FakeDesktop)
    dlg.open_folder_button.click()
    assert [u.toLocalFile() for u in opened] == [str(dlg.autosave_path.parent)]
    # a new run hides it until its own file is written
    stub_engine.token_delay = 0.1
    dlg.run()
    assert not dlg.open_folder_button.isVisible()
    dlg.cancel()
    wait_until(lambda: len(done) == 3, 30)
    wait_for_tasks()
    dlg.close()


def test_reopening_the_dialog_keeps_the_ticks(plugin, raster_layer, qgis_iface, monkeypatch):
    from qgis.PyQt.QtCore import Qt

    a, b = raster_layer("a"), raster_layer("b")
    dlg = plugin.open_batch()
    dlg.set_checked_layers({a.id()})

    class View:
        def __init__(self, layers):
            self.layers = layers

        def selectedLayers(self):  # noqa: N802
            return self.layers

    dlg.close()  # layers come while it is closed: new at the next opening
    raster_layer("c")
    d = raster_layer("d")
    monkeypatch.setattr(qgis_iface, "layerTreeView", lambda: View([b, d]), raising=False)
    assert plugin.open_batch() is dlg  # plugin.py refreshes the list
    states = {dlg.layer_list.item(i).text(): dlg.layer_list.item(i).checkState()
              for i in range(dlg.layer_list.count())}
    # a: ticked by the user; b: unticked by the user, though selected; c, d new: the tree's selection
    assert states == {"a": Qt.CheckState.Checked, "b": Qt.CheckState.Unchecked,
                      "c": Qt.CheckState.Unchecked, "d": Qt.CheckState.Checked}
    assert [lyr.name() for lyr in dlg.checked_layers()] == ["a", "d"]


def test_a_question_longer_than_the_engine_takes_is_refused_before_the_batch_runs(plugin, raster_layer,
                                                                                   stub_engine):
    """Each row of such a question was an error the engine gave after its turn (every other
    question still asked): it is said before anything runs, and the questions stay."""
    from geovqa.engine_protocol import MAX_QUESTION_CHARS

    a = raster_layer("a")
    dlg = plugin.open_batch()
    dlg.set_checked_layers({a.id()})
    questions = "How big?\n" + "x" * (MAX_QUESTION_CHARS + 1) + "\nWhere?"
    dlg.questions_edit.setPlainText(questions)
    dlg.run()
    said = dlg.message.text()
    assert f"Question 2 has {MAX_QUESTION_CHARS + 1} characters" in said and f"at most {MAX_QUESTION_CHARS}" in said
    assert dlg.task is None and dlg.run_button.isEnabled() and dlg.questions_edit.isEnabled()
    assert dlg.questions_edit.toPlainText() == questions and dlg.table.rowCount() == 0
    wait_for_tasks()
    assert stub_engine.requests == []


def test_a_question_too_long_after_blank_lines_is_named_by_its_line(plugin, raster_layer, stub_engine):
    """Blank lines are skipped, so "Question 2" of the batch was on the fourth line of the box; a
    batch of one question still says "The question", as the dock does."""
    from geovqa.engine_protocol import MAX_QUESTION_CHARS

    a = raster_layer("a")
    dlg = plugin.open_batch()
    dlg.set_checked_layers({a.id()})
    long = "x" * (MAX_QUESTION_CHARS + 1)
    for questions, named in ((f"How big?\n\n\n{long}\nWhere?", "Question 2 (line 4) has"),
                             (f"\n\n{long}\n", "The question has")):
        dlg.questions_edit.setPlainText(questions)
        dlg.run()
        assert dlg.message.text().startswith(f"{named} {MAX_QUESTION_CHARS + 1} characters"), dlg.message.text()
        assert dlg.task is None
    assert stub_engine.requests == []


@pytest.mark.parametrize("kind, typed, written", [
    ("json", "answers", "answers.json"),  # Qt's dialog adds no ending on Linux or macOS
    ("csv", "answers", "answers.csv"),
    ("csv", "answers.json", "answers.json"),  # an ending typed is the user's choice
    ("json", "answers.csv", "answers.csv"),
    ("json", "answers.v2", "answers.v2.json"),
])
def test_export_writes_the_format_chosen_in_the_dialog(plugin, raster_layer, stub_engine, tmp_path, monkeypatch,
                                                       kind, typed, written):
    """Export JSON… with a name typed without ".json" wrote a CSV, to "answers"."""
    import json

    from qgis.PyQt.QtWidgets import QFileDialog

    dlg, _ = run_batch_dialog(plugin, [raster_layer("a")], "How big?")
    folder = tmp_path / "out"
    folder.mkdir()
    chosen = "CSV (*.csv)" if kind == "csv" else "JSON (*.json)"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(folder / typed), chosen))
    dlg._export(kind)
    assert [p.name for p in folder.iterdir()] == [written]
    text = (folder / written).read_text(encoding="utf-8-sig")
    if written.endswith(".json"):
        assert json.loads(text)["results"][0]["question"] == "How big?"
    else:
        assert text.startswith("index,layer,raster_path,question,answer") and "How big?" in text


def test_an_export_that_cannot_be_written_is_said_and_one_written_says_where(
        plugin, raster_layer, stub_engine, tmp_path, monkeypatch, qgis_iface):
    """It raised out of the button (NotADirectoryError: QGIS's Python error dialog), and the
    dialog said nothing, neither then nor when the export was written."""
    from conftest import python_errors
    from qgis.core import Qgis
    from qgis.PyQt.QtWidgets import QFileDialog

    dlg, _ = run_batch_dialog(plugin, [raster_layer("a")], "How big?")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    qgis_iface.messageBar().clear_messages()
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(blocker / "answers"), "JSON (*.json)"))
    with python_errors() as errors:
        dlg.json_button.click()
    assert errors == []
    said = f"Could not export the answers to {blocker / 'answers.json'}: File exists ({blocker})"
    assert dlg.message.text() == f"1 question: 1 answered, 0 failed. {said}"  # the run's counts stay
    assert f"GeoVQA:{said}" in qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning)
    out = tmp_path / "answers.csv"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(out), "CSV (*.csv)"))
    dlg.csv_button.click()
    assert out.is_file()
    assert dlg.message.text() == f"1 question: 1 answered, 0 failed. Answers exported to {out}."


def test_an_answer_without_its_result_layers_says_so_in_its_row_and_the_counts(
        plugin, raster_layer, stub_engine, tmp_path):
    """Why the heatmap and anchors were missing was on the message line only until the next row
    arrived: the table, its tooltips and the row viewer showed a plain answer, and the end said
    "2 answered, 0 failed" as for a batch that kept everything."""
    import json

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    set_settings(output_dir=str(blocker / "results"))
    a, b = raster_layer("a"), raster_layer("b", width=32, height=40)
    dlg, rows = run_batch_dialog(plugin, [a, b], "How big?")
    answer = "The area is 64 x 48 pixels with 3 bands."
    note = rows[0]["error"]
    assert rows[0]["answer"] == answer and note.startswith("The answer is kept, but its heatmap and anchor layers")
    cell = dlg.table.item(0, 2)
    assert cell.text() == answer and not cell.icon().isNull()  # the answer as it is, marked
    assert cell.toolTip() == f"{answer}\n\n⚠ {note}"
    assert f"Answer: {answer}\n\nKept tokens" in dlg.row_text(0) and dlg.row_text(0).endswith(f"Result layers: {note}")
    assert dlg.message.text() == "2 questions: 2 answered (2 with result layers missing), 0 failed."
    exported = json.loads(open(dlg.export(str(tmp_path / "answers.json")), encoding="utf-8").read())["results"]
    assert [(r["answer"], r["error"]) for r in exported] == [(r["answer"], r["error"]) for r in rows]
    # a row with its layers: no mark, no note
    set_settings(output_dir=str(tmp_path / "results"))
    dlg, rows = run_batch_dialog(plugin, [a], "How big?", dlg=dlg)
    cell = dlg.table.item(0, 2)
    assert cell.icon().isNull() and cell.toolTip() == answer and "Result layers" not in dlg.row_text(0)
    assert dlg.message.text() == "1 question: 1 answered, 0 failed."


def test_a_question_cancelled_mid_answer_is_counted_with_the_cancelled_ones_not_as_failed(
        plugin, raster_layer, stub_engine, tmp_path):
    """The question streaming when Cancel was pressed read "ERROR: cancelled" and the end said
    "3 questions: 1 answered, 1 failed, 1 not asked (cancelled)"."""
    import csv
    import json

    a = raster_layer("a")
    dlg = plugin.open_batch()
    done = []
    dlg.batch_finished.connect(done.append)
    stub_engine.token_delay = 0.02
    _start(dlg, [a], ["q1", "q2", "q3"])
    wait_until(lambda: dlg.rows, 30, "the first answer")
    stub_engine.token_delay = 0.5  # the second answer streams slowly
    wait_until(lambda: len(stub_engine.requests) == 2, 30, "the second question")
    dlg.cancel()
    wait_until(lambda: done, 30, "the cancelled batch")
    wait_for_tasks()
    rows = done[0]
    assert [(r["question"], r["answer"] is not None, r["error"]) for r in rows] == [("q1", True, None),
                                                                                  ("q2", False, "cancelled")]
    assert dlg.table.item(1, 2).text() == "Cancelled"
    assert dlg.row_text(1).startswith("Layer: a\n\nQuestion: q2\n\nAnswer: Cancelled")
    assert dlg.message.text() == "3 questions: 1 answered, 0 failed, 2 not answered (cancelled)."
    saved = [json.loads(line) for line in dlg.autosave_path.read_text(encoding="utf-8").splitlines()]
    assert saved[1]["question"] == "q2" and saved[1]["error"] == "cancelled"
    with open(dlg.export(str(tmp_path / "answers.csv")), newline="", encoding="utf-8") as fh:
        assert [(r["question"], r["error"]) for r in csv.DictReader(fh)] == [("q1", ""), ("q2", "cancelled")]


def test_the_layer_list_follows_the_project_while_the_dialog_is_open(plugin, raster_layer, tmp_path):
    """Layers added, renamed, marked as GeoVQA results, removed, and a project read while the
    dialog is open show in its list at once; the user's ticks are kept; the plugin's unload lets
    go of the layers' signals."""
    from qgis.core import QgsProject
    from qgis.PyQt.QtCore import Qt

    import geovqa.layers as result_layers

    def names(dlg):
        return [dlg.layer_list.item(i).text() for i in range(dlg.layer_list.count())]

    a = raster_layer("a")
    dlg = plugin.open_batch()
    dlg.set_checked_layers({a.id()})
    assert names(dlg) == ["a"]

    b = raster_layer("b")  # added while open: listed, not ticked
    assert sorted(names(dlg)) == ["a", "b"]
    assert [lyr.name() for lyr in dlg.checked_layers()] == ["a"]

    a.setName("a renamed")
    assert sorted(names(dlg)) == ["a renamed", "b"]
    assert [lyr.name() for lyr in dlg.checked_layers()] == ["a renamed"]  # the tick follows the layer

    heat = raster_layer("heat")  # a result layer: listed until its mark comes, then out
    result_layers.mark_result_layer(heat, "heatmap")
    assert sorted(names(dlg)) == ["a renamed", "b"]

    QgsProject.instance().removeMapLayer(b.id())
    assert names(dlg) == ["a renamed"]

    path = str(tmp_path / "p.qgz")
    assert QgsProject.instance().write(path)
    QgsProject.instance().clear()
    assert names(dlg) == []
    assert QgsProject.instance().read(path)
    assert sorted(names(dlg)) == ["a renamed"]  # the heatmap stays out, its mark was saved
    item = dlg.layer_list.item(0)
    assert item.checkState() == Qt.CheckState.Unchecked

    # shut down (plugin unload) the dialog no longer listens: a layer renamed or added touches nothing
    layer = QgsProject.instance().mapLayer(item.data(Qt.ItemDataRole.UserRole))
    dlg.shutdown()
    layer.setName("after shutdown")
    raster_layer("c")
    assert names(dlg) == ["a renamed"]


def test_an_export_named_in_capitals_is_json_and_a_failure_names_its_file_once(
        plugin, raster_layer, stub_engine, tmp_path, monkeypatch):
    """ANSWERS.JSON is written as JSON, not CSV; an export that cannot be written says the
    system's reason, without the export's own path a second time."""
    import json
    from pathlib import Path

    from qgis.PyQt.QtWidgets import QFileDialog

    dlg, _ = run_batch_dialog(plugin, [raster_layer("a")], "How big?")
    data = json.loads(Path(dlg.export(tmp_path / "ANSWERS.JSON")).read_text(encoding="utf-8"))
    assert [r["question"] for r in data["results"]] == ["How big?"]
    folder = tmp_path / "answers.csv"
    folder.mkdir()  # a folder where the file should go
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(folder), "CSV (*.csv)"))
    dlg.csv_button.click()
    said = f"Could not export the answers to {folder}: Is a directory"
    assert dlg.message.text() == f"1 question: 1 answered, 0 failed. {said}"


def test_a_batch_cancelled_in_the_task_list_ends_as_cancelled(plugin, raster_layer, stub_engine):
    """The x on the batch's bar in QGIS's task list ends the run as Cancel in the dialog does:
    its end says "(cancelled)"."""
    a = raster_layer("a")
    dlg = plugin.open_batch()
    done = []
    dlg.batch_finished.connect(done.append)
    stub_engine.token_delay = 0.5
    _start(dlg, [a], ["q1", "q2"])
    task = dlg.task
    wait_until(lambda: stub_engine.requests, 30, "the first question")
    task.cancel()  # as QGIS's task list does
    wait_until(lambda: done, 30, "the cancelled batch")
    wait_for_tasks()
    assert dlg.message.text().endswith(" (cancelled).") and dlg.run_button.isEnabled()


def test_unticked_result_layers_are_not_added(plugin, raster_layer, stub_engine):
    """"Add heatmap/anchors layers" unticked: the answers come without layers in the project
    (their files are still written); a result row outside the table opens nothing."""
    from qgis.core import QgsProject

    a = raster_layer("a")
    dlg = plugin.open_batch()
    dlg.layers_check.setChecked(False)
    dlg, rows = run_batch_dialog(plugin, [a], "How big?", dlg=dlg)
    assert rows[0]["answer"] is not None and rows[0]["heatmap_path"]
    assert list(QgsProject.instance().mapLayers().values()) == [a]
    assert dlg.show_row(len(rows)) is None


def test_a_layer_removed_while_another_is_rendered_gets_error_rows(plugin, raster_layer, stub_engine, qgis_iface):
    """A file layer ready to be asked, removed while the batch still renders a layer with no
    file: its questions are not asked (its rows say why), the other layer's are."""
    from qgis.core import QgsProject

    from conftest import start_batch, virtual_raster_layer

    a, src = raster_layer("a"), raster_layer("src")
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(src.crs())
    canvas.setExtent(src.extent())
    virt = virtual_raster_layer(src, size=(2048, 1536))  # a render long enough to act during it
    dlg, done = start_batch(plugin, [a, virt], "How big?")
    assert dlg._rendering is not None  # the file is prepared, the virtual layer is being rendered
    QgsProject.instance().removeMapLayer(a.id())
    wait_until(lambda: done, 60, "the batch")
    wait_for_tasks()
    rows = {r["layer"]: r for r in done[0]}
    assert rows["a"]["answer"] is None and "was removed from the project" in rows["a"]["error"]
    assert rows["virtual"]["answer"] is not None
    assert not [r for r in stub_engine.requests if r["raster_path"].endswith("a.tif")]
