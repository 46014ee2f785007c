"""An engine's error message of megabytes (a broken or hostile engine, a traceback) is shown cut
to its first MAX_SHOWN_CHARS characters with an ellipsis, in QGIS's message bar, the chat, the
dock's status line and the batch dialog's table; the whole text is kept in QGIS's log and in
Diagnostics (a batch's also in its autosave file and exports)."""

from __future__ import annotations

from conftest import wait_for_tasks, wait_until

HUGE = "The engine failed: " + "x" * (2 << 20)  # 2 MiB of message
SHOWN = 500  # engine_errors.MAX_SHOWN_CHARS (checked below)


def test_shown_text_cuts_long_text_and_keeps_short_text():
    from geovqa.engine_errors import MAX_SHOWN_CHARS, shown_text

    assert MAX_SHOWN_CHARS == SHOWN
    assert shown_text("short.") == "short."
    exact = "a" * MAX_SHOWN_CHARS
    assert shown_text(exact) == exact
    cut = shown_text(HUGE)
    assert cut.startswith(HUGE[:MAX_SHOWN_CHARS] + "…") and len(cut) < MAX_SHOWN_CHARS + 200
    assert f"{len(HUGE)} characters" in cut and "log" in cut


def _logged(messages):
    from qgis.core import QgsApplication

    def keep(message, tag, _level):
        if tag == "GeoVQA":
            messages.append(message)

    QgsApplication.messageLog().messageReceived.connect(keep)
    return keep


def test_a_huge_engine_error_is_shown_cut_and_kept_whole(plugin, raster_layer, stub_engine, qgis_iface):
    """The 2 MiB message went whole into the message bar, the chat turn (and the project) and the
    progress line."""
    MAX_SHOWN_CHARS = SHOWN  # noqa: N806
    from qgis.core import QgsApplication

    stub_engine.fail_with = {"code": "internal", "message": HUGE, "hint": None}
    logged = []
    keep = _logged(logged)
    try:
        layer = raster_layer()
        dock = plugin.dock
        dock.set_layer(layer)
        qgis_iface.messageBar().clear_messages()
        dock.ask("why?")
        wait_until(lambda: dock.turns(layer) and dock.turns(layer)[-1]["done"], 30, "the answer")
        turn = dock.turns(layer)[-1]
        assert len(turn["error"]) < MAX_SHOWN_CHARS + 200 and turn["error"].startswith(HUGE[:MAX_SHOWN_CHARS])
        bar = [m for level in qgis_iface.messageBar().messages.values() for m in level]
        assert bar and all(len(m) < MAX_SHOWN_CHARS + 300 for m in bar), [len(m) for m in bar]
        assert any(HUGE[:100] in m for m in bar)
        wait_until(lambda: any(HUGE in m for m in logged), 5, "the whole message in the log")
        assert HUGE in dock.diagnostics_text()
    finally:
        QgsApplication.messageLog().messageReceived.disconnect(keep)
        wait_for_tasks()


def test_a_huge_engine_status_message_is_shown_cut(plugin, stub_engine):
    MAX_SHOWN_CHARS = SHOWN  # noqa: N806
    from stub_engine import StubEngine

    stub_engine.health = lambda: dict(StubEngine.health(stub_engine), status="error", message=HUGE)
    dock = plugin.dock
    dock.refresh_health()
    wait_until(lambda: dock._health_task is None and dock.status_level == "error", 20, "the health check")
    assert HUGE[:100] in dock.status_label.text() and len(dock.status_label.text()) < MAX_SHOWN_CHARS + 300
    assert HUGE in dock.diagnostics_text()
    wait_for_tasks()


def test_a_huge_engine_error_in_a_batch_is_shown_cut_and_exported_whole(plugin, raster_layer, stub_engine, tmp_path):
    """The batch dialog put the 2 MiB message whole into its row's Answer cell, the cell's tooltip
    and the row viewer (the table's layout and every hover over it went through megabytes). They
    now show it cut as the dock does; QGIS's log, the autosave file and the exports keep it whole."""
    MAX_SHOWN_CHARS = SHOWN  # noqa: N806
    import csv
    import json

    from conftest import run_batch_dialog
    from qgis.core import QgsApplication

    stub_engine.fail_with = {"code": "internal", "message": HUGE, "hint": None}
    logged = []
    keep = _logged(logged)
    try:
        dlg, rows = run_batch_dialog(plugin, [raster_layer("scene")], "why?")
        assert [r["error"] for r in rows] == [HUGE]  # the row as it came
        cell = dlg.table.item(0, 2)
        for text in (cell.text(), cell.toolTip(), dlg.row_text(0)):
            assert len(text) < MAX_SHOWN_CHARS + 300, len(text)
            assert ("ERROR: " + HUGE[:MAX_SHOWN_CHARS]) in text and f"{len(HUGE)} characters" in text
        assert "1 question: 0 answered, 1 failed" in dlg.message.text()
        wait_until(lambda: any(HUGE in m for m in logged), 5, "the whole message in the log")
        exported = json.loads(open(dlg.export(str(tmp_path / "answers.json")), encoding="utf-8").read())
        assert [r["error"] for r in exported["results"]] == [HUGE]
        with open(dlg.export(str(tmp_path / "answers.csv")), encoding="utf-8-sig", newline="") as fh:
            csv.field_size_limit(1 << 30)
            assert [r["error"] for r in csv.DictReader(fh)] == [HUGE]
        autosaved = [json.loads(line) for line in dlg.autosave_path.read_text(encoding="utf-8").splitlines()]
        assert [r["error"] for r in autosaved] == [HUGE]
    finally:
        QgsApplication.messageLog().messageReceived.disconnect(keep)
        wait_for_tasks()
