"""Dock behaviour against the protocol stand-in: streaming, supersede, errors, engine down,
non-file layers rendered to a GeoTIFF, conversation per layer and export."""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

import pytest

from conftest import ask_until_first_words, set_settings, wait_for_tasks, wait_until


def _finished(dock, n=1):
    return lambda: sum(1 for t in dock.conversations.get(dock.layer_combo.currentLayer().id(), []) if t.get("done")) >= n


def test_ask_streams_answer_and_adds_layers(plugin, raster_layer, stub_engine, tmp_path):
    from geovqa.layers import group_name
    from qgis.core import QgsProject

    layer = raster_layer()
    dock = plugin.dock
    dock.set_layer(layer)
    dock.question_edit.setText("What is in this image?")
    dock.ask()
    wait_until(_finished(dock), 30, "the answer")
    turn = dock.turns()[-1]
    assert turn.get("error") is None, turn
    assert turn["answer"] == "The area is 64 x 48 pixels with 3 bands."
    assert "64 x 48" in dock.view.toPlainText()
    assert stub_engine.requests[-1]["raster_path"] == layer.source()
    group = QgsProject.instance().layerTreeRoot().findGroup(group_name("What is in this image?"))
    assert group is not None
    heat = QgsProject.instance().mapLayer(turn["heatmap_layer_id"])
    assert heat.crs() == layer.crs() and heat.extent() == layer.extent()
    assert Path(heat.source()).parent == tmp_path / "results"  # saved with the results, not in a temp dir
    out = dock.export_conversation(str(tmp_path / "conv.json"))
    data = json.loads(Path(out).read_text())
    assert data["turns"][0]["answer"] == turn["answer"]
    md = Path(dock.export_conversation(str(tmp_path / "conv.md"))).read_text()
    assert "Q: What is in this image?" in md and "A: The area is" in md
    wait_for_tasks()


def test_an_exported_conversation_keeps_its_text_readable(plugin, raster_layer, stub_engine, tmp_path):
    """The JSON export holds the questions as they were typed (UTF-8), not as \\u00e9 escapes,
    as the batch answers files do."""
    dock = plugin.dock
    dock.set_layer(raster_layer("rivière"))
    dock.ask("Où coule la rivière ?")
    wait_until(_finished(dock), 30, "the answer")
    text = Path(dock.export_conversation(tmp_path / "conv.json")).read_text(encoding="utf-8")
    assert '"question": "Où coule la rivière ?"' in text and "\\u00" not in text
    assert json.loads(text)["layer"] == "rivière"
    wait_for_tasks()


def test_a_json_export_named_in_capitals_is_json_and_names_its_layer_once(plugin, raster_layer, stub_engine,
                                                                         tmp_path):
    """A file typed as CHAT.JSON is written as JSON (not Markdown); the layer's name is the
    file's, not repeated in every turn, and the dock's own keys (the area kept for a retry) stay
    out."""
    dock = plugin.dock
    dock.set_layer(raster_layer("scene"))
    dock.ask("What is here?")
    wait_until(_finished(dock), 30, "the answer")
    data = json.loads(Path(dock.export_conversation(tmp_path / "CHAT.JSON")).read_text(encoding="utf-8"))
    assert data["layer"] == "scene" and [t["question"] for t in data["turns"]] == ["What is here?"]
    assert not [k for t in data["turns"] for k in t if k == "layer" or k.startswith("_")]
    wait_for_tasks()


def test_the_json_export_leaves_out_a_web_layers_password(plugin, qgis_new_project, tmp_path):
    """The JSON export's "source" was the layer's source as it is: the username *and password*
    (and authcfg id) of an XYZ / WMS layer with basic authentication ended up in a file meant to be
    shared."""
    from qgis.core import QgsProject, QgsRasterLayer

    (tmp_path / "t").mkdir()
    url = (tmp_path / "t").as_uri() + "/{z}/{x}/{y}.png"
    layer = QgsRasterLayer(f"type=xyz&url={url}&zmin=0&zmax=1&username=alice&password=s3cret&authcfg=ab12cd3",
                           "tiles", "wms")
    assert layer.isValid(), layer.error().summary()
    QgsProject.instance().addMapLayer(layer)
    dock = plugin.dock
    dock.set_layer(layer)
    text = Path(dock.export_conversation(str(tmp_path / "c.json"))).read_text(encoding="utf-8")
    assert "s3cret" not in text and "ab12cd3" not in text
    assert json.loads(text)["source"] == f"type=xyz&url={url}&zmin=0&zmax=1&username=alice"


@pytest.mark.parametrize("source, public", [
    ("/data/a.tif", "/data/a.tif"),
    ("password=pw&crs=EPSG:3857&url=http://h/wms", "crs=EPSG:3857&url=http://h/wms"),
    ("dbname='d' host=h user='u' password='p w' sslmode=disable", "dbname='d' host=h user='u' sslmode=disable"),
    ("/vsicurl/https://alice:s3cret@h/x.tif", "/vsicurl/https://alice@h/x.tif"),
    ("url=http://h/wms&PassWord=pw&AUTHCFG=ab12cd3", "url=http://h/wms"),
])
def test_a_public_source_has_no_password(source, public):
    from geovqa.paths import public_source

    assert public_source(source) == public


def test_exported_answers_leave_out_a_login_in_the_raster_url(tmp_path):
    """A GDAL layer opened from a URL with its login (/vsicurl/https://user:password@…) wrote the
    password into the batch CSV / JSON / autosave and the conversation's JSON export."""
    import csv

    from geovqa.dock import ChatDock
    from geovqa.results_io import CsvRows, append_json_line, write_json

    url = "/vsicurl/https://alice:s3cret@example.org/x.tif"
    row = {"index": 0, "layer": "x", "raster_path": url, "question": "q", "answer": "a", "error": None}
    table = CsvRows(str(tmp_path / "a.csv"))
    table.write(row)
    table.close()
    write_json([row], str(tmp_path / "a.json"))
    append_json_line(tmp_path / "a.jsonl", row)
    for name in ("a.csv", "a.json", "a.jsonl"):
        text = (tmp_path / name).read_text(encoding="utf-8")
        assert "s3cret" not in text and "https://alice@example.org/x.tif" in text, name
    with open(tmp_path / "a.csv", newline="", encoding="utf-8-sig") as fh:
        assert next(csv.DictReader(fh))["raster_path"] == "/vsicurl/https://alice@example.org/x.tif"
    assert row["raster_path"] == url  # the row itself (what the engine is asked about) keeps it
    turn = {"question": "q", "answer": "a", "done": True, "request": {"raster_path": url, "question": "q"}}
    exported = ChatDock._exported_turn(turn, with_layer=False)
    assert exported["request"]["raster_path"] == "/vsicurl/https://alice@example.org/x.tif"
    assert turn["request"]["raster_path"] == url


def test_copy_and_export_while_the_answer_streams_mark_it_incomplete(plugin, raster_layer, stub_engine, tmp_path):
    """Copy or Export during the answer gave its first words as if they were the answer ("A: The ")."""
    from qgis.PyQt.QtWidgets import QApplication

    dock = plugin.dock
    turn, _ = ask_until_first_words(dock, raster_layer(), stub_engine, "What is in this image?")
    dock.copy_conversation()
    copied = QApplication.clipboard().text()
    md = Path(dock.export_conversation(str(tmp_path / "conv.md"))).read_text(encoding="utf-8")
    data = json.loads(Path(dock.export_conversation(str(tmp_path / "conv.json"))).read_text(encoding="utf-8"))
    assert not turn["done"]
    for text in (copied, md):
        assert "\nA (incomplete): The" in text and "(still being answered)" in text, text
    assert data["turns"][0]["incomplete"] is True and data["turns"][0]["done"] is False

    wait_until(lambda: turn["done"], 30, "the answer")
    dock.copy_conversation()
    copied = QApplication.clipboard().text()
    data = json.loads(Path(dock.export_conversation(str(tmp_path / "conv.json"))).read_text(encoding="utf-8"))
    assert f"\nA: {turn['answer']}" in copied and "incomplete" not in copied and "still being" not in copied
    assert "incomplete" not in data["turns"][0]
    wait_for_tasks()


def test_one_conversation_per_layer(plugin, raster_layer, stub_engine):
    a, b = raster_layer("a"), raster_layer("b", width=32, height=32)
    dock = plugin.dock
    dock.set_layer(a)
    dock.ask("first?")
    wait_until(_finished(dock), 30)
    dock.set_layer(b)
    assert dock.turns() == [] and "first?" not in dock.view.toPlainText()
    dock.ask("second?")
    wait_until(_finished(dock), 30)
    assert [t["question"] for t in dock.turns(b)] == ["second?"]
    assert [t["question"] for t in dock.turns(a)] == ["first?"]
    dock.set_layer(a)
    assert "first?" in dock.view.toPlainText()
    wait_for_tasks()


def test_newer_question_supersedes_stale_reply(plugin, raster_layer, stub_engine):
    stub_engine.token_delay = 0.15
    layer = raster_layer()
    dock = plugin.dock
    dock.set_layer(layer)
    first = dock.ask("slow question")
    wait_until(lambda: len(stub_engine.requests) == 1, 10)
    stub_engine.token_delay = 0.0
    second = dock.ask("fast question")
    wait_until(lambda: dock.turns()[-1].get("done"), 30)
    wait_for_tasks()
    t1, t2 = dock.turns()
    assert first != second
    assert t1["meta"] == "superseded by a newer question" and not t1["answer"].endswith("bands. ")
    assert t2["answer"].startswith("The area is") and t2.get("error") is None


def test_engine_down_gives_a_message_not_a_crash(plugin, raster_layer, qgis_iface):
    from qgis.core import Qgis

    layer = raster_layer()
    dock = plugin.dock
    dock.set_layer(layer)
    qgis_iface.messageBar().clear_messages()
    dock.ask("anyone there?")
    wait_until(_finished(dock), 30)
    turn = dock.turns()[-1]
    assert "not reachable" in turn["error"] and "Start local engine" in turn["error"] and "make serve" not in turn["error"]
    # the chat turn keeps the hint; the message bar says the error once, in one line, without it
    (bar,) = [m for m in qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Critical) if "not reachable" in m]
    assert "Start local engine" not in bar and "\n" not in bar
    dock.refresh_health()
    wait_until(lambda: dock._health_task is None and getattr(dock, "status_level", None) == "down", 20)
    assert "not reachable" in dock.status_label.text()
    assert "health: unavailable" in dock.diagnostics_text()
    # no tokens-a-tile set: the checkpoint's own, shown so and sent as null
    assert "tokens/tile: the checkpoint's own" in dock.diagnostics_text()
    assert dock.tpt_spin.value() == 0 and dock.tpt_spin.text() == "auto" and "checkpoint's own" in dock.tpt_spin.toolTip()
    wait_for_tasks()


@pytest.mark.parametrize("answer", [["up"], "ok", {"status": "ok"}])
def test_another_program_answering_health_is_not_taken_for_an_engine(plugin, answer):
    """Another program on the engine's port answering /health with JSON that is not an object (a
    list): the dock's health slot raised AttributeError, a QGIS Python error dialog at every
    status check. An object without the protocol field is no engine either."""
    import threading
    from http.server import ThreadingHTTPServer

    from conftest import python_errors
    from stub_engine import JsonHandler

    class OtherProgram(JsonHandler):
        def do_GET(self):
            self._json(200, answer)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), OtherProgram)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        set_settings(engine_url=f"http://127.0.0.1:{srv.server_address[1]}")
        dock = plugin.dock
        with python_errors() as errors:
            dock.refresh_health()
            wait_until(lambda: dock._health_task is None, 10, "the health check")
            wait_for_tasks()
        assert errors == [], errors[0][-600:]
        assert dock.status_level == "down" and dock.health is None
        assert "Not a GeoVQA engine at 127.0.0.1:" in dock.status_label.text()  # one short line
        assert "is not a GeoVQA engine" in dock.status_label.toolTip()
        assert "Check the engine URL" in dock.status_label.toolTip()
    finally:
        srv.shutdown()
        srv.server_close()


def test_engine_error_event_and_loading_status(plugin, raster_layer, stub_engine, qgis_iface):
    from qgis.core import Qgis

    layer = raster_layer()
    dock = plugin.dock
    dock.set_layer(layer)
    stub_engine.fail_with = {"code": "out_of_memory", "message": "The GPU ran out of memory.", "hint": "Lower the budget."}
    dock.ask("too big?")
    wait_until(_finished(dock), 30)
    assert dock.turns()[-1]["error"] == "The GPU ran out of memory. Lower the budget."
    # every error is reported so: the hint in the chat, not again in the message bar
    assert "The GPU ran out of memory." in " ".join(qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Critical))
    assert not any("Lower the budget" in m for m in qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Critical))
    stub_engine.status = "loading"
    dock.refresh_health()
    wait_until(lambda: getattr(dock, "status_level", None) == "loading", 20)
    assert "still loading" in dock.status_label.text()
    wait_for_tasks()


def test_non_file_layer_is_rendered_and_georeferenced(plugin, raster_layer, stub_engine, tmp_path):
    """A virtual raster (raster calculator provider) has no file: the dock renders it."""
    from osgeo import gdal
    from qgis.core import QgsProject

    from conftest import virtual_raster_layer

    src = raster_layer("src")
    virt = virtual_raster_layer(src)
    dock = plugin.dock
    dock.set_layer(virt)
    dock.ask("what is this?")
    wait_until(_finished(dock), 60)
    turn = dock.turns()[-1]
    assert turn.get("error") is None, turn
    rendered = turn["rendered_path"]
    assert rendered.startswith(str(tmp_path / "results" / "renders"))
    ds = gdal.Open(rendered)
    gt = ds.GetGeoTransform()
    e = src.extent()
    assert abs(gt[0] - e.xMinimum()) < 1e-6 and abs(gt[3] - e.yMaximum()) < 1e-6
    assert abs(gt[0] + gt[1] * ds.RasterXSize - e.xMaximum()) < 1e-3
    assert ds.RasterCount == 3
    heat = QgsProject.instance().mapLayer(turn["heatmap_layer_id"])
    assert heat.crs() == src.crs()
    wait_for_tasks()


def test_a_drawn_polygon_on_a_rendered_layer_is_sent_and_a_rectangle_is_the_render(plugin, raster_layer,
                                                                                   stub_engine):
    """A layer with no file is rendered over the area's bounding box: a drawn polygon is sent
    with it (the engine keeps to its inside); a drawn rectangle is the render itself, sent with
    no area."""
    from qgis.core import QgsGeometry, QgsPointXY

    from conftest import virtual_raster_layer

    virt = virtual_raster_layer(raster_layer("src"))
    e = virt.extent()
    x0, y0 = e.xMinimum() + 100, e.yMinimum() + 100
    triangle = QgsGeometry.fromPolygonXY([[QgsPointXY(x0, y0), QgsPointXY(x0 + 300, y0),
                                           QgsPointXY(x0, y0 + 200), QgsPointXY(x0, y0)]])
    dock = plugin.dock
    dock.set_layer(virt)
    sent = {}
    for mode, geom in (("polygon", triangle), ("rectangle", QgsGeometry.fromRect(triangle.boundingBox()))):
        dock.set_aoi_mode(mode)
        dock.set_aoi_geometry(geom, virt.crs())
        dock.ask(f"what is in the {mode}?")
        wait_until(_finished(dock, len(sent) + 1), 60)
        sent[mode] = stub_engine.requests[-1].get("aoi")
    assert set(sent["polygon"] or ()) == {"polygon_wkt"} and sent["rectangle"] is None
    assert QgsGeometry.fromWkt(sent["polygon"]["polygon_wkt"]).area() == pytest.approx(triangle.area(), rel=0.01)
    dock.set_aoi_mode("layer")
    wait_for_tasks()


def test_a_render_holds_no_more_pixels_than_the_engine_reads(plugin, raster_layer, stub_engine, qgis_iface):
    """A render at the Render size (here 4096 x 3072 px) when the engine's /health says it reads at
    most 256 x 192 px (max_read_pixels) cost its time and memory for nothing: the engine only read
    it reduced. The dock and the batch dialog render at the engine's budget, aspect kept, and say so."""
    from osgeo import gdal
    from qgis.core import QgsApplication

    from conftest import run_batch_dialog, virtual_raster_layer
    from geovqa.upload import reduced_size

    budget = 256 * 192
    stub_engine.max_read_pixels = budget
    set_settings(render_max_px=4096)
    src = raster_layer("src")
    virt = virtual_raster_layer(src, size=(4096, 3072))
    dock = plugin.dock
    dock.refresh_health()
    wait_until(lambda: (dock.health or {}).get("max_read_pixels") == budget, 20, "the engine's status")
    logged = []
    log = QgsApplication.messageLog()
    log.messageReceived.connect(lambda message, tag, level: logged.append(message))
    dock.set_layer(virt)
    dock.ask("what is this?")
    assert "256 x 192 px" in dock.progress_label.text() and "max_read_pixels" in dock.progress_label.text()
    wait_until(_finished(dock), 60, "the answer")
    turn = dock.turns()[-1]
    assert turn.get("error") is None, turn
    ds = gdal.Open(turn["rendered_path"])
    assert (ds.RasterXSize, ds.RasterYSize) == reduced_size((4096, 3072), budget) == (256, 192)
    assert any("256 x 192 px" in m and "Render size" in m for m in logged), logged
    # the batch dialog renders by the dock's status too
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(src.crs())
    canvas.setExtent(src.extent())
    _dlg, rows = run_batch_dialog(plugin, [virt], "q1")
    assert rows and rows[0].get("error") is None, rows
    ds = gdal.Open(stub_engine.requests[-1]["raster_path"])
    assert ds.RasterXSize * ds.RasterYSize <= budget + ds.RasterXSize + ds.RasterYSize  # reduced_size's rounding
    wait_for_tasks()


def test_render_size_is_capped_to_the_read_budget_aspect_kept():
    """output_size: the Render size and the layer's pixels first, then about max_pixels in all."""
    from qgis.core import QgsRectangle

    from geovqa.render import output_size

    ext = QgsRectangle(0, 0, 16000, 4000)
    assert (output_size(ext, 16384).width(), output_size(ext, 16384).height()) == (16384, 4096)
    capped = output_size(ext, 16384, max_pixels=8064 * 8064)
    assert abs(capped.width() / capped.height() - 4.0) < 1e-3
    assert 8064 * 8064 <= capped.width() * capped.height() <= 8064 * 8064 + capped.width() + capped.height()
    assert output_size(ext, 2048, max_pixels=8064 * 8064).width() == 2048  # under the budget: unchanged
    assert output_size(ext, 16384, 10.0, max_pixels=8064 * 8064).width() == 1600  # the layer's pixels first


def test_a_renders_rgba_conversion_runs_in_the_write_tasks_thread(plugin, raster_layer, stub_engine, tmp_path,
                                                                  monkeypatch):
    """Turning the rendered image into RGBA pixels (0.3 to 1.6 s at 16384 px) ran on the main
    thread, in the map job's finished(), freezing QGIS: it runs in the write task's worker thread,
    and the GeoTIFF written holds the same pixels as a render made in one go (render_sync)."""
    from osgeo import gdal

    import geovqa.render as render
    from conftest import virtual_raster_layer

    set_settings(render_max_px=512)
    src = raster_layer("src")
    virt = virtual_raster_layer(src, size=(512, 384))
    threads = []
    convert = render.image_to_rgba

    def recording(image):
        threads.append(threading.current_thread())
        return convert(image)

    monkeypatch.setattr(render, "image_to_rgba", recording)
    dock = plugin.dock
    dock.set_layer(virt)
    dock.ask("what is this?")
    wait_until(_finished(dock), 60, "the answer")
    turn = dock.turns()[-1]
    assert turn.get("error") is None, turn
    assert len(threads) == 1 and threads[0] is not threading.main_thread(), threads
    monkeypatch.setattr(render, "image_to_rgba", convert)
    ds = gdal.Open(turn["rendered_path"])
    once = gdal.Open(render.render_sync(virt, virt.extent(), str(tmp_path / "once.tif"), 512)[0])
    assert (ds.RasterXSize, ds.RasterYSize) == (once.RasterXSize, once.RasterYSize) == (512, 384)
    for b in (1, 2, 3):
        assert (ds.GetRasterBand(b).ReadAsArray() == once.GetRasterBand(b).ReadAsArray()).all()
    wait_for_tasks()


def test_a_write_task_cancelled_during_its_conversion_writes_nothing(tmp_path):
    """Cancel (the x on the task's bar) while the worker converts the image: no GeoTIFF is made."""
    from qgis.core import QgsRectangle
    from qgis.PyQt.QtGui import QColor, QImage

    from geovqa.render import FORMAT_ARGB32, _WriteTask

    image = QImage(64, 48, FORMAT_ARGB32)
    image.fill(QColor(10, 20, 30))
    out = tmp_path / "w.tif"
    task = _WriteTask(image, "layer", QgsRectangle(0, 0, 64, 48), "EPSG:32633", str(out))
    task.cancel()  # as it would be while rendered_rgba runs: the write is not started
    assert task.run() is False and not out.exists() and task.args is None
    task = _WriteTask(image, "layer", QgsRectangle(0, 0, 64, 48), "EPSG:32633", str(out))
    assert task.run() is True and out.exists()


def test_a_web_layer_that_rendered_nothing_says_so_in_the_dock(plugin, stub_engine, qgis_iface, tmp_path):
    """The check that anything was drawn moved into the write task with the conversion: an XYZ
    layer whose tiles are not there still fails with "rendered nothing", and nothing is asked."""
    from qgis.core import QgsCoordinateReferenceSystem, QgsProject, QgsRasterLayer, QgsRectangle

    set_settings(render_max_px=256)
    url = (tmp_path / "no-tiles").as_uri() + "/{z}/{x}/{y}.png"
    layer = QgsRasterLayer(f"type=xyz&url={url}&zmin=0&zmax=1", "gone tiles", "wms")
    assert layer.isValid(), layer.error().summary()
    QgsProject.instance().addMapLayer(layer)
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    canvas.setExtent(QgsRectangle(-5000000, 3000000, -3000000, 4000000))
    dock = plugin.dock
    dock.set_layer(layer)
    dock.ask("what is here?")
    wait_until(_finished(dock), 60, "the answer")
    assert "The layer 'gone tiles' rendered nothing over this extent" in (dock.turns()[-1].get("error") or "")
    assert stub_engine.requests == []
    wait_for_tasks()


def _renderers_left(owner):
    """The LayerRenderers still alive under ``owner`` once the pending deleteLater()s ran."""
    from qgis.PyQt.QtCore import QCoreApplication, QEvent

    from geovqa.render import LayerRenderer

    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    return owner.findChildren(LayerRenderer)


def test_the_dock_lets_go_of_each_questions_render(plugin, raster_layer, stub_engine):
    """Every question about a rendered layer (web service, GeoPackage table, virtual raster) left
    its LayerRenderer alive as a child of the dock, with its map job's image and the RGBA copy of
    its write task: 2 x 4 x render_max_px^2 bytes more with each question (32 MB at 2048 px)."""
    from conftest import virtual_raster_layer

    virt = virtual_raster_layer(raster_layer("src"))
    dock = plugin.dock
    dock.set_layer(virt)
    for i in range(3):
        dock.ask(f"question {i}?")
        wait_until(_finished(dock, i + 1), 60, "the answer")
        wait_for_tasks()
        assert dock.turns()[-1].get("error") is None, dock.turns()[-1]
    assert _renderers_left(dock) == [] and dock.renderer is None


def test_a_render_stopped_while_it_draws_is_let_go_of(plugin, raster_layer, stub_engine):
    """*Stop* during the render: the renderer goes once its map job has stopped, and nothing of it
    arrives afterwards (no error, no request)."""
    from conftest import python_errors, virtual_raster_layer

    set_settings(render_max_px=4096)
    virt = virtual_raster_layer(raster_layer("src"), size=(4096, 3072))
    dock = plugin.dock
    dock.set_layer(virt)
    with python_errors() as errors:
        dock.ask("what is this?")
        renderer = dock.renderer
        assert renderer.job is not None and renderer.job.isActive()
        dock.stop()
        wait_until(lambda: renderer.released, 60, "the cancelled job to end")
        wait_for_tasks()
        assert _renderers_left(dock) == []
        renderer.cancel()  # again, after it let go of itself: harmless
    assert errors == [] and stub_engine.requests == []
    assert dock.turns()[-1]["meta"] == "stopped"


def test_a_file_placed_by_gcps_that_need_a_warp_is_rendered(plugin, stub_engine, tmp_path, qgis_new_project):
    """The engine refuses such a file ('warp it first'); QGIS shows it warped, so the dock sends
    a render of that view instead of failing every question."""
    from conftest import write_gcp_raster
    from qgis.core import QgsProject, QgsRasterLayer

    layer = QgsRasterLayer(write_gcp_raster(tmp_path / "gcps.tif", displaced_px=20), "gcps", "gdal")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    dock = plugin.dock
    dock.set_layer(layer)
    dock.ask("what is this?")
    wait_until(_finished(dock), 60)
    turn = dock.turns()[-1]
    assert turn.get("error") is None, turn
    assert stub_engine.requests[-1]["raster_path"] == turn["rendered_path"] != layer.source()
    heat = QgsProject.instance().mapLayer(turn["heatmap_layer_id"])
    assert heat.crs() == layer.crs()
    assert layer.extent().buffered(layer.rasterUnitsPerPixelX()).contains(heat.extent())
    wait_for_tasks()


def test_wrong_token_is_explained(plugin, raster_layer, stub_engine):
    set_settings(token="not-the-token")
    layer = raster_layer()
    dock = plugin.dock
    dock.set_layer(layer)
    dock.ask("hello?")
    wait_until(_finished(dock), 30)
    err = dock.turns()[-1]["error"]
    assert "Wrong token." in err and "token" in err.split("Wrong token.")[1]
    wait_for_tasks()


def test_out_of_memory_offers_a_retry_with_the_suggested_budget(plugin, raster_layer, stub_engine):
    layer = raster_layer()
    dock = plugin.dock
    dock.set_layer(layer)
    dock.budget_spin.setValue(0)
    stub_engine.fail_with = {"code": "out_of_memory", "message": "The GPU ran out of memory.",
                             "hint": "Retry with a smaller token budget.", "retry_budget": 1024}
    dock.ask("how many ships?")
    wait_until(_finished(dock), 30)
    assert not dock.retry_button.isHidden() and dock.retry_button.text() == "Retry with budget 1024"
    assert stub_engine.requests[-1]["budget"] is None

    stub_engine.fail_with = None
    dock.retry_button.click()
    wait_until(_finished(dock, 2), 30)
    assert stub_engine.requests[-1]["budget"] == 1024
    assert stub_engine.requests[-1]["question"] == "how many ships?"
    assert dock.turns()[-1]["answer"] and not dock.turns()[-1].get("error")
    assert dock.retry_button.isHidden() and dock.budget_spin.value() == 1024

    # an error without a suggested budget offers nothing
    stub_engine.fail_with = {"code": "raster_unreadable", "message": "Cannot read it.", "hint": None}
    dock.ask("and now?")
    wait_until(_finished(dock, 3), 30)
    assert dock.retry_button.isHidden()
    stub_engine.fail_with = None
    wait_for_tasks()


def test_clear_withdraws_the_retry_of_the_cleared_question(plugin, raster_layer, stub_engine):
    """*Retry with budget N* stayed after Clear and asked the cleared question again."""
    layer, other = raster_layer("a"), raster_layer("b")
    dock = plugin.dock
    dock.set_layer(layer)
    stub_engine.fail_with = {"code": "out_of_memory", "message": "The GPU ran out of memory.", "hint": None,
                             "retry_budget": 512}
    dock.ask("how many ships?")
    wait_until(_finished(dock), 30)
    wait_for_tasks()
    stub_engine.fail_with = None
    dock.set_layer(other)
    dock.clear_conversation()  # another layer's conversation: the offer stays with its own
    dock.set_layer(layer)
    assert not dock.retry_button.isHidden() and dock.retry_button.text() == "Retry with budget 512"
    dock.clear_conversation()
    assert dock.retry_button.isHidden() and dock.turns() == []
    asked = len(stub_engine.requests)
    assert dock.retry_smaller() is None and len(stub_engine.requests) == asked and dock.turns() == []
    dock.set_layer(other)
    dock.set_layer(layer)
    assert dock.retry_button.isHidden()


def test_clearing_the_removed_layers_answers_withdraws_the_retry_of_one(plugin, raster_layer, stub_engine):
    from geovqa.dock import REMOVED_LAYERS_ITEM
    from qgis.core import QgsProject

    layer, other = raster_layer("a"), raster_layer("b")
    dock = plugin.dock
    dock.set_layer(layer)
    stub_engine.fail_with = {"code": "out_of_memory", "message": "The GPU ran out of memory.", "hint": None,
                             "retry_budget": 512}
    dock.ask("how many ships?")
    wait_until(_finished(dock), 30)
    wait_for_tasks()
    stub_engine.fail_with = None
    QgsProject.instance().removeMapLayer(layer.id())
    dock.layer_combo.setCurrentIndex(dock.layer_combo.findText(REMOVED_LAYERS_ITEM))
    assert dock.showing_removed_layers()
    dock.clear_conversation()
    assert dock.retry_smaller() is None  # nothing to retry: not even a word about the layer gone
    assert "no longer in the project" not in dock.progress_label.text()
    dock.set_layer(other)
    assert dock.retry_button.isHidden()


def test_an_unwritable_results_folder_keeps_the_answer(plugin, raster_layer, stub_engine, tmp_path, qgis_iface):
    """A read-only project folder or a full disk costs the heatmap and anchor layers, not the answer."""
    from qgis.core import Qgis

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # a results folder cannot be created under a file (root ignores chmod)
    set_settings(output_dir=str(blocker / "results"))
    layer = raster_layer()
    dock = plugin.dock
    dock.set_layer(layer)
    qgis_iface.messageBar().clear_messages()
    dock.ask("What is in this image?")
    wait_until(_finished(dock), 30, "the answer")
    wait_for_tasks()
    turn = dock.turns()[-1]
    assert turn.get("error") is None, turn
    assert turn["answer"] == "The area is 64 x 48 pixels with 3 bands."
    assert turn["result"]["tokens"]["visual_kept"] == 4 and "visual tokens kept" in turn["meta"]
    assert "64 x 48" in dock.view.toPlainText()
    assert "A: The area is 64 x 48" in dock.conversation_text()
    assert "heatmap_layer_id" not in turn  # nothing half-made was added
    warnings = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning)
    assert any("could not be saved" in m and str(blocker) in m for m in warnings), warnings


def _tokens_then(tail):
    """Stub events: a few tokens of an answer, then ``tail(rid)`` (an error event, or a crash)."""
    def events(req):
        rid = req["request_id"]
        yield {"type": "queued", "request_id": rid, "position": 0}
        for word in ("There ", "are ", "twelve ", "ships "):
            yield {"type": "token", "request_id": rid, "text": word}
        yield from tail(rid)
    return events


def _oom(rid):
    yield {"type": "error", "request_id": rid, "code": "out_of_memory", "message": "The GPU ran out of memory.",
           "hint": None}


def _engine_dies(rid):
    raise SystemExit("engine killed")  # the handler dies: the connection closes without the last chunk
    yield


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the stub's handler dies
def test_a_partial_answer_stays_when_an_error_follows(plugin, raster_layer, stub_engine, tmp_path):
    layer = raster_layer()
    dock = plugin.dock
    dock.set_layer(layer)
    for n, tail in enumerate((_oom, _engine_dies), 1):
        stub_engine.events = _tokens_then(tail)
        dock.ask("how many ships?")
        wait_until(_finished(dock, n), 30)
        turn = dock.turns()[-1]
        assert turn["answer"] == "There are twelve ships " and turn["error"]
        view = dock.view.toPlainText()
        assert "GeoVQA (incomplete): There are twelve ships" in view and "Error:" in view
        assert view.index("twelve") < view.rindex("Error:")
        md = Path(dock.export_conversation(str(tmp_path / "conv.md"))).read_text()
        assert md.count("A (incomplete): There are twelve ships") == n
        assert f"ERROR {turn['error']}" in md
    assert "ERROR The GPU ran out of memory." in dock.conversation_text()
    wait_for_tasks()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the stub's handler dies
@pytest.mark.parametrize("code", ["stream_broken", "io_error"])
def test_the_status_line_is_checked_at_once_when_the_engine_fails_mid_answer(plugin, raster_layer, stub_engine,
                                                                             monkeypatch, code):
    """An engine that died mid-answer (restarted since, loading its model) was still shown ready
    on the top line until the next check, 30 s later."""
    import geovqa.tasks

    layer = raster_layer()
    dock = plugin.dock
    dock.set_layer(layer)
    wait_until(lambda: getattr(dock, "status_level", None) == "demo", 10, "the engine shown ready")
    assert dock.timer.interval() == 30000  # ready: the next regular check is 30 s away

    def dies(rid):
        stub_engine.status = "loading"  # it is restarted meanwhile
        if code == "stream_broken":
            yield from _engine_dies(rid)
        else:
            yield {"type": "result", "request_id": rid, "answer": "There are twelve ships", "tokens": {},
                   "timings": {}}

    def unreachable(*_args, **_kw):
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(geovqa.tasks, "keep_result_files_or_warn", unreachable)
    stub_engine.events = _tokens_then(dies)
    dock.ask("how many ships?")
    wait_until(_finished(dock), 30)
    assert dock.current_turn["error"]
    # (the check made at once may already have come back: it then polls faster while loading)
    wait_until(lambda: dock.status_level == "loading", 5, "the status line to follow the engine")
    assert "still loading" in dock.status_label.text()
    wait_for_tasks()


def test_a_long_streamed_answer_is_redrawn_in_batches_not_per_token(plugin, raster_layer, stub_engine):
    """Every token used to re-lay out the whole conversation (quadratic: QGIS froze on long answers)."""
    import time

    n = 3000
    words = [f"w{i} " for i in range(n)]

    def events(req):
        rid = req["request_id"]
        yield {"type": "queued", "request_id": rid, "position": 0}
        for w in words:
            yield {"type": "token", "request_id": rid, "text": w}
        yield {"type": "result", "request_id": rid, "answer": "".join(words), "tokens": {}, "timings": {}}

    stub_engine.events = events
    dock = plugin.dock
    dock.set_layer(raster_layer())
    redraws = []
    set_html = dock.view.setHtml
    dock.view.setHtml = lambda text: (redraws.append(1), set_html(text))
    started = time.monotonic()
    dock.ask("a long one?")
    wait_until(_finished(dock), 120)
    elapsed = time.monotonic() - started
    assert dock.turns()[-1]["answer"] == "".join(words)
    assert "w2999" in dock.view.toPlainText()
    # at most one redraw per RENDER_INTERVAL_MS, plus the question and the final answer
    assert len(redraws) <= 3 + elapsed / 0.1, (len(redraws), elapsed)
    wait_for_tasks()


def test_streaming_scrolls_only_a_reader_who_is_at_the_end(plugin, raster_layer, stub_engine):
    layer = raster_layer()
    dock = plugin.dock
    dock.set_layer(layer)
    dock.setFloating(True)
    dock.resize(400, 500)
    dock.show()
    dock.conversations[layer.id()] = [{"question": f"q{i}", "answer": "building " * 300, "done": True}
                                      for i in range(5)]
    sb = dock.view.verticalScrollBar()
    for reader_at_end in (False, True):
        turn = {"question": "now", "answer": "", "done": False, "request_id": "r"}
        dock.turns().append(turn)
        dock.current_request_id, dock.current_turn = "r", turn
        dock.render_conversation()
        assert sb.maximum() > 0
        sb.setValue(sb.maximum() if reader_at_end else 0)
        for _ in range(50):
            dock._on_event({"type": "token", "request_id": "r", "text": "more words\n"})
        dock.render_conversation()  # what the timer does
        assert sb.value() == (sb.maximum() if reader_at_end else 0)
    dock.current_request_id = dock.current_turn = None


def test_retry_asks_about_the_layer_and_area_that_ran_out_of_memory(plugin, raster_layer, stub_engine, qgis_iface):
    from qgis.core import QgsRectangle

    a, b = raster_layer("a"), raster_layer("b", width=32, height=32)
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(a.crs())
    canvas.setExtent(QgsRectangle(500100, 4999700, 500300, 4999900))
    dock = plugin.dock
    dock.set_layer(a)
    dock.set_aoi_mode("extent")
    stub_engine.fail_with = {"code": "out_of_memory", "message": "OOM.", "hint": None, "retry_budget": 1024}
    dock.ask("how many ships?")
    wait_until(_finished(dock), 30)
    stub_engine.fail_with = None
    first = stub_engine.requests[-1]
    assert first["aoi"] is not None and not dock.retry_button.isHidden()

    dock.set_layer(b)  # the button belongs to layer a's conversation
    assert dock.retry_button.isHidden()
    dock.set_layer(a)
    assert not dock.retry_button.isHidden()

    canvas.setExtent(a.extent())  # the map moved meanwhile
    dock.set_layer(b)
    dock.retry_smaller()
    wait_until(lambda: dock.turns(a)[-1].get("done") and len(dock.turns(a)) == 2, 30)
    retry = stub_engine.requests[-1]
    assert retry["raster_path"] == a.source() and retry["aoi"] == first["aoi"] and retry["budget"] == 1024
    assert dock.turns(b) == [] and dock.turns(a)[-1]["answer"].startswith("The area is")
    wait_for_tasks()


def _groups():
    from qgis.core import QgsProject

    return [g.name() for g in QgsProject.instance().layerTreeRoot().findGroups()]


def test_closing_the_project_stops_the_question(plugin, raster_layer, stub_engine, tmp_path):
    """File > New (clear) or File > Open (read) mid-question: nothing may land in the next project."""
    from qgis.core import QgsProject

    stub_engine.token_delay = 0.1
    dock = plugin.dock
    saved = tmp_path / "other.qgs"
    for close in (QgsProject.instance().clear, lambda: QgsProject.instance().read(str(saved))):
        layer = raster_layer()
        QgsProject.instance().write(str(saved))
        dock.set_layer(layer)
        dock.ask("about the old project")
        turn = dock.current_turn
        wait_until(lambda: len(stub_engine.requests) and turn["answer"], 10)
        close()
        assert turn["done"] and turn["meta"] == "stopped: the project was closed"
        assert not dock.stop_button.isEnabled() and "project was closed" in dock.progress_label.text()
        wait_for_tasks()
        assert _groups() == [] and "bands." not in turn["answer"]
        stub_engine.requests.clear()


def test_an_answer_about_a_removed_layer_is_kept_without_result_layers(
        plugin, raster_layer, stub_engine, tmp_path, qgis_iface):
    """It goes under "Answers about removed layers" with the other turns of its layer, labelled with
    the layer's name, where it was moved into whatever conversation was on screen."""
    import json

    from geovqa.dock import REMOVED_LAYERS_ITEM
    from qgis.core import Qgis, QgsProject

    project = QgsProject.instance()
    stub_engine.token_delay = 0.05
    layer, other = raster_layer(), raster_layer("other")
    layer_id = layer.id()
    dock = plugin.dock
    dock.set_layer(layer)
    dock.ask("an earlier question")
    wait_until(_finished(dock), 30)
    qgis_iface.messageBar().clear_messages()
    dock.ask("about a layer that goes away")
    turn = dock.current_turn
    wait_until(lambda: stub_engine.requests and turn["answer"], 10)
    project.removeMapLayer(layer_id)
    dock.set_layer(other)
    wait_until(lambda: turn.get("done"), 30)
    wait_for_tasks()
    groups = [g for g in _groups() if "goes away" in g]
    assert groups == [] and turn["answer"].startswith("The area is") and not turn.get("error")
    assert dock.turns(other) == [] and "goes away" not in dock.view.toPlainText()  # not in another's chat
    assert dock.conversations[layer_id][-1] is turn and "removed since" not in turn["aoi_label"]
    warnings = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning)
    assert any("was removed" in m and REMOVED_LAYERS_ITEM in m for m in warnings), warnings

    assert list(dock.layer_combo.additionalItems()) == [REMOVED_LAYERS_ITEM]
    dock.layer_combo.setCurrentIndex(dock.layer_combo.findText(REMOVED_LAYERS_ITEM))
    view = dock.view.toPlainText()
    assert view.count("about the layer 'scene', removed from the project") == 2  # with its earlier turn
    assert "about a layer that goes away" in view and turn["answer"].strip() in view
    copied = dock.conversation_text()
    assert "Q: about a layer that goes away  [Whole layer · about the layer 'scene'" in copied
    assert f"A: {turn['answer']}" in copied
    dock.export_conversation(tmp_path / "removed.md")
    assert f"A: {turn['answer']}" in (tmp_path / "removed.md").read_text(encoding="utf-8")
    exported = json.loads(dock.export_conversation(tmp_path / "removed.json") and
                          (tmp_path / "removed.json").read_text(encoding="utf-8"))
    assert [(t["question"], t["layer"]) for t in exported["turns"]] == [
        ("an earlier question", "scene"), ("about a layer that goes away", "scene")]
    assert exported["turns"][1]["answer"] == turn["answer"]

    path = str(tmp_path / "p.qgs")
    assert project.write(path) and project.read(path)  # saved with the project, back under the item
    dock.layer_combo.setCurrentIndex(dock.layer_combo.findText(REMOVED_LAYERS_ITEM))
    assert [(t["question"], t["answer"]) for t in dock.turns()][-1] == ("about a layer that goes away",
                                                                       turn["answer"])


def test_clearing_the_removed_layers_answers_stops_a_question_about_one(plugin, raster_layer, stub_engine):
    """The running answer about a removed layer is listed there; Clear forgot it but let it run on."""
    from geovqa.dock import REMOVED_LAYERS_ITEM
    from qgis.core import QgsProject

    stub_engine.token_delay = 0.1
    layer = raster_layer()
    layer_id = layer.id()
    dock = plugin.dock
    dock.set_layer(layer)
    dock.ask("slow question")
    turn = dock.current_turn
    wait_until(lambda: stub_engine.requests and turn["answer"], 10)
    QgsProject.instance().removeMapLayer(layer_id)
    dock.layer_combo.setCurrentIndex(dock.layer_combo.findText(REMOVED_LAYERS_ITEM))
    assert "slow question" in dock.view.toPlainText()  # streaming, under the item
    dock.clear_conversation()
    assert not dock.is_asking() and turn["done"] and "cleared" in dock.progress_label.text()
    wait_for_tasks()
    assert layer_id not in dock.conversations and list(dock.layer_combo.additionalItems()) == []


def test_clear_stops_the_running_question(plugin, raster_layer, stub_engine):
    stub_engine.token_delay = 0.1
    layer = raster_layer()
    dock = plugin.dock
    dock.set_layer(layer)
    dock.ask("slow question")
    wait_until(lambda: stub_engine.requests, 10)
    dock.clear_conversation()
    assert dock.turns() == [] and dock.current_request_id is None and not dock.stop_button.isEnabled()
    assert "cleared" in dock.progress_label.text()
    wait_for_tasks()
    assert dock.turns() == [] and _groups() == []
    stub_engine.token_delay = 0.0
    dock.ask("next question")  # the dock is ready for the next one
    wait_until(_finished(dock), 30)
    assert [t["question"] for t in dock.turns()] == ["next question"] and dock.turns()[0]["answer"]
    wait_for_tasks()


def test_clearing_another_layers_conversation_lets_the_question_run(plugin, raster_layer, stub_engine):
    """Clear forgets the conversation shown: a question about another layer still being answered
    goes on, and its answer arrives in that layer's conversation."""
    layer, other = raster_layer("a"), raster_layer("b")
    dock = plugin.dock
    turn, _task = ask_until_first_words(dock, layer, stub_engine, delay=0.05)
    dock.set_layer(other)
    dock.clear_conversation()
    assert dock.is_asking() and dock.turns(layer) == [turn]
    wait_until(lambda: turn.get("done"), 30, "the answer")
    assert turn.get("error") is None and "meta" in turn and "stopped" not in turn["meta"]
    wait_for_tasks()


def test_cancelling_the_question_in_the_task_list_ends_it_as_stop_does(plugin, raster_layer, stub_engine):
    """The x on the question's bar in QGIS's task list (QgsTask.cancel): the dock used to stay at
    "Answering…" with Stop enabled, holding the task QGIS then deleted, and the next Ask, Stop,
    Clear or unload raised "wrapped C/C++ object of type AskTask has been deleted"."""
    from qgis.PyQt import sip

    dock = plugin.dock
    turn, task = ask_until_first_words(dock, raster_layer(), stub_engine)
    task.cancel()  # what the task list's cancel does
    wait_until(lambda: turn.get("done"), 10, "the turn to end")
    assert turn["meta"] == "stopped" and turn["answer"] and not turn.get("error")
    assert dock.task is None and not dock.is_asking() and not dock.stop_button.isEnabled()
    assert dock.progress_label.text() == "Stopped."
    wait_for_tasks()
    answer = turn["answer"]
    assert turn["answer"] == answer and turn["meta"] == "stopped"  # nothing of it came later
    # the dock goes on: Stop, Clear and the next question raise nothing
    dock.stop()
    stub_engine.token_delay = 0.0
    dock.ask("next question")
    wait_until(_finished(dock, 2), 30)
    assert dock.turns()[-1]["answer"] and not dock.turns()[-1].get("error")
    dock.clear_conversation()
    wait_for_tasks()
    # a task QGIS deleted meanwhile is let go of, not cancelled
    assert sip.isdeleted(task)
    dock.task = task
    dock.stop()
    assert dock.task is None


@contextlib.contextmanager
def every_worker_busy():
    """Every thread of the pool QGIS's tasks run in is taken while inside, so a task added then
    stays queued. The blockers are QGIS tasks, owned by its task manager: plain QRunnables made in
    Python could be freed by the test while a pool thread was still leaving their run() (a
    segmentation fault in a later test, now and then)."""
    from qgis.core import QgsApplication, QgsTask
    from qgis.PyQt.QtCore import QThreadPool

    release = threading.Event()
    pool = QThreadPool.globalInstance()
    threads = pool.maxThreadCount()
    # kept here until they are done: a task from fromFunction runs its function through this
    # Python object, and one already collected would end at once
    blockers = [QgsTask.fromFunction(f"busy {i}", lambda _task: release.wait(30)) for i in range(threads)]
    for blocker in blockers:
        QgsApplication.taskManager().addTask(blocker)
    try:
        wait_until(lambda: pool.activeThreadCount() >= threads, 10, "the workers to be busy")
        yield
    finally:
        release.set()
        wait_for_tasks()


def test_cancelling_the_question_while_qgis_still_queues_its_task_ends_it_as_stop_does(
        plugin, raster_layer, stub_engine):
    """The task list's x on a question whose task QGIS has not started yet (every worker thread
    busy): a queued task ends inside cancel(); the turn ends as Stop ends it, and the next
    question is asked as usual."""
    from qgis.core import QgsTask

    with every_worker_busy():
        layer = raster_layer()
        dock = plugin.dock
        dock.set_layer(layer)
        dock.ask("queued question")
        turn = dock.current_turn
        wait_until(lambda: dock.task is not None, 10, "the question's task")
        task = dock.task
        assert task.status() == QgsTask.TaskStatus.Queued
        task.cancel()  # what the task list's cancel does
        wait_until(lambda: turn.get("done"), 10, "the turn to end")
        assert turn["meta"] == "stopped" and not turn["answer"] and not turn.get("error")
        assert dock.task is None and not dock.is_asking() and not dock.stop_button.isEnabled()
        assert dock.progress_label.text() == "Stopped."
    assert turn["meta"] == "stopped" and not turn["answer"]  # nothing of it came later
    dock.ask("next question")
    wait_until(_finished(dock, 2), 30)
    assert dock.turns()[-1]["answer"] and not dock.turns()[-1].get("error")
    wait_for_tasks()


def test_stop_in_the_dock_says_stopped_once(plugin, raster_layer, stub_engine, qgis_iface):
    """Stop cancels the task too: its end (taskTerminated) adds nothing to what Stop said."""
    dock = plugin.dock
    turn, _ = ask_until_first_words(dock, raster_layer(), stub_engine)
    qgis_iface.messageBar().clear_messages()
    dock.stop()
    assert turn["done"] and turn["meta"] == "stopped" and dock.progress_label.text() == "Stopped."
    finished = []
    dock.answer_finished.connect(finished.append)
    wait_for_tasks()
    assert turn["meta"] == "stopped" and dock.progress_label.text() == "Stopped." and finished == []
    assert [t["meta"] for t in dock.turns()] == ["stopped"]
    assert not any(qgis_iface.messageBar().messages.values())


def _slow_start(stub_engine, seconds=0.5):
    """The stand-in's stream begins after ``seconds``: time to connect to a task just started."""
    import time

    events = stub_engine.events

    def slow(req):
        time.sleep(seconds)
        yield from events(req)

    stub_engine.events = slow


def test_the_answer_task_is_at_100_percent_only_with_the_answer(plugin, raster_layer, stub_engine):
    """The chat's AskTask (its bar in QGIS's task list) followed only the "vision" status events:
    at 100 % once the vision tower was done, while the answer was still generated. It now goes
    through the engine's stages, the generation moving with the answer tokens, 100 % only with
    the result; the line under the question is unchanged."""
    from conftest import set_settings

    set_settings(max_new_tokens=20)
    stub_engine.engine_stages = True
    _slow_start(stub_engine)
    dock = plugin.dock
    dock.set_layer(raster_layer())
    dock.question_edit.setText("How big?")
    dock.ask()
    log, labels = [], []
    dock.task.progressChanged.connect(lambda p: log.append(("progress", p)))
    dock.task.engine_event.connect(lambda ev: log.append((ev["type"], ev.get("stage"))))
    dock.task.engine_event.connect(lambda ev: labels.append(dock.progress_label.text()))
    wait_until(_finished(dock), 30, "the answer")
    wait_for_tasks()
    progress = [v for k, v in log if k == "progress"]
    assert progress == sorted(progress) and progress[-1] == 100 and progress.count(100) == 1, log
    tokens = [i for i, (k, _) in enumerate(log) if k == "token"]
    assert len(tokens) == 10
    before = lambda i: [v for k, v in log[:i] if k == "progress"][-1]  # noqa: E731
    assert before(log.index(("status", "select"))) <= 60  # the vision tower is done
    at_tokens = [before(i + 1) for i in tokens]  # each token has moved the bar (set before the event goes out)
    assert len(set(at_tokens)) == 10 and 70 < at_tokens[0] and at_tokens[-1] < 90, log
    assert before(log.index(("status", "write")) + 1) < 100 and log[-1] == ("result", None)
    # the line under the question says each stage, as before
    assert "Encoding tiles 50 %" in labels and "Answering…" in labels and "Choosing tokens …" in labels


def test_an_unwritable_results_folder_keeps_the_answer_about_a_rendered_layer(plugin, raster_layer, stub_engine,
                                                                              tmp_path, qgis_iface):
    """A web or virtual layer got no answer at all, only "Could not write the rendered raster:
    [Errno 20] Not a directory": its render went to the results folder too."""
    from conftest import virtual_raster_layer
    from qgis.core import Qgis

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    set_settings(output_dir=str(blocker / "results"))
    virt = virtual_raster_layer(raster_layer("src"))
    dock = plugin.dock
    dock.set_layer(virt)
    qgis_iface.messageBar().clear_messages()
    dock.ask("What is in this image?")
    wait_until(_finished(dock), 60, "the answer")
    wait_for_tasks()
    turn = dock.turns()[-1]
    assert turn.get("error") is None, turn
    assert turn["answer"] == "The area is 64 x 48 pixels with 3 bands."
    assert stub_engine.requests[-1]["raster_path"] == turn["rendered_path"]
    assert not turn["rendered_path"].startswith(str(blocker))
    warnings = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning)
    assert any("could not be saved" in m and str(blocker) in m for m in warnings), warnings


@pytest.mark.parametrize("how", ["supersede", "reason"])
def test_a_question_stopped_while_still_queued_keeps_its_reason(plugin, raster_layer, stub_engine, how):
    """A task still waiting in QGIS's queue ends inside cancel(): its taskTerminated came while the
    dock's stop() was running and a second, plain stop() overwrote the reason ("superseded by a
    newer question", "stopped: the layer was removed") with "stopped"."""
    from qgis.core import QgsTask

    layer = raster_layer()
    dock = plugin.dock
    dock.set_layer(layer)
    wait_for_tasks()
    with every_worker_busy():
        dock.ask("first question")
        turn = dock.current_turn
        assert dock.task.status() == QgsTask.TaskStatus.Queued
        if how == "supersede":
            dock.ask("second question")
            expected = "superseded by a newer question"
        else:
            dock.stop(reason="stopped: the layer was removed")
            expected = "stopped: the layer was removed"
        assert turn["done"] and turn["meta"] == expected
    assert turn["meta"] == expected


def test_the_dock_says_a_queue_only_while_a_job_is_ahead(plugin, raster_layer, stub_engine):
    """A question queued with nothing ahead (position 0) starts now: the dock said "Queued (0
    ahead) …" until the engine's first stage; a real wait keeps its count."""
    layer = raster_layer()
    dock = plugin.dock
    dock.set_layer(layer)
    turn = {"question": "now", "answer": "", "done": False, "request_id": "r"}
    dock.turns().append(turn)
    dock.current_request_id, dock.current_turn = "r", turn
    try:
        dock._on_event({"type": "queued", "request_id": "r", "position": 2, "job_id": "j"})
        assert dock.progress_label.text() == "Queued (2 ahead) …"
        dock._on_event({"type": "queued", "request_id": "r", "position": 0, "job_id": "j"})
        assert dock.progress_label.text() == "Starting …"
        dock._on_event({"type": "status", "request_id": "r", "stage": "tiling", "progress": 0.5})
        assert dock.progress_label.text() not in ("Starting …", "")
    finally:
        dock.current_request_id = dock.current_turn = None


def _files_kept_before_the_dock_heard(dock, question):
    """Ask ``question`` and wait, without running the event loop (a busy main thread), until
    the task has kept the answer's files and queued its result event; returns that event."""
    import time

    dock.ask(question)
    task = dock.task
    deadline = time.time() + 30
    while getattr(task, "final", None) is None and time.time() < deadline:
        time.sleep(0.01)
    assert task.final is not None and task.final["type"] == "result", task.final
    assert Path(task.final["local_heatmap_path"]).is_file()
    return task.final


@pytest.mark.parametrize("how", ["stopped", "superseded"])
def test_a_question_ended_once_its_files_were_kept_leaves_no_files_behind(how, plugin, raster_layer, stub_engine):
    """Stop (or a newer question) came after the task had kept the answer's heatmap and anchors
    but before the dock handled the result: the turn ended without them, no layer was added, and
    the two files stayed in the results folder with nothing referring to them."""
    layer = raster_layer("a")
    dock = plugin.dock
    dock.set_layer(layer)
    late = _files_kept_before_the_dock_heard(dock, "late question?")
    if how == "stopped":
        dock.stop()
    else:
        dock.ask("second question?")
        wait_until(lambda: dock.turns(layer)[-1].get("done"), 30, "the second answer")
    wait_for_tasks()
    wait_until(lambda: not dock.is_asking(), 10, "the dock to be idle")
    first = dock.turns(layer)[0]
    assert first["done"] and not first.get("result")
    for key in ("local_heatmap_path", "local_anchors_path"):
        assert not Path(late[key]).exists(), f"{key} of a {how} question left behind"
    if how == "superseded":  # the answer shown keeps its own files
        shown = dock.turns(layer)[-1]["result"]
        assert Path(shown["local_heatmap_path"]).is_file()


def test_an_export_gets_the_ending_of_the_chosen_kind_unless_it_has_one_of_the_kinds():
    """Qt's save dialog adds no ending on Linux or macOS, and the ending decides what is written:
    a name without one of the kinds' endings gets the chosen kind's (also after a dot of its own)."""
    from geovqa.paths import export_path

    assert export_path("/x/answers", ("md", "json"), "md") == "/x/answers.md"
    assert export_path("/x/answers.JSON", ("md", "json"), "md") == "/x/answers.JSON"
    assert export_path("/x/report.v2", ("md", "json"), "json") == "/x/report.v2.json"
    assert export_path("/x/answers.csv", ("csv", "json"), "json") == "/x/answers.csv"
