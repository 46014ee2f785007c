"""The bands the model sees are the bands the user sees (bands.py), and every answer says which.

Before, the dock, the batch dialog and the Processing algorithms never sent ``bands``: an 8-band
scene styled 4,3,2 (true colour) in QGIS reached the model as bands 1,2,3, and nothing said so.
Now a layer sent as its file sends the bands of its renderer (*Multiband color* -> [r, g, b],
*Singleband gray* / *pseudocolor* -> [band]; a paletted layer none; a rendered one [1, 2, 3], its RGB
as it is), and the
result's ``bands`` / ``palette`` are shown under the answer, in the batch table, CSV and JSON, and
in the Processing log.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import (recording_feedback, run_batch_dialog, set_settings, virtual_raster_layer, wait_for_tasks,
                      wait_until)


def write_bands(path, count=8, width=64, height=48, dtype=None):
    """A georeferenced GeoTIFF with ``count`` bands, band b holding values around 20 * b (so a
    band can be told by its pixels), no colour tags."""
    from osgeo import gdal, osr

    ds = gdal.GetDriverByName("GTiff").Create(str(path), width, height, count, dtype or gdal.GDT_Byte)
    ds.SetGeoTransform((500000.0, 10.0, 0.0, 5000000.0, 0.0, -10.0))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    ds.SetProjection(srs.ExportToWkt())
    yy, xx = np.mgrid[0:height, 0:width]
    for b in range(1, count + 1):
        ds.GetRasterBand(b).WriteArray(((20 * b + (xx + yy) % 10) % 256).astype(np.uint8))
    ds = None
    return str(path)


def write_paletted(path, width=64, height=48):
    from osgeo import gdal, osr

    ds = gdal.GetDriverByName("GTiff").Create(str(path), width, height, 1, gdal.GDT_Byte)
    ds.SetGeoTransform((500000.0, 10.0, 0.0, 5000000.0, 0.0, -10.0))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    ds.SetProjection(srs.ExportToWkt())
    band = ds.GetRasterBand(1)
    band.WriteArray((np.arange(width * height).reshape(height, width) % 2).astype(np.uint8))
    table = gdal.ColorTable()
    table.SetColorEntry(0, (0, 0, 255, 255))
    table.SetColorEntry(1, (255, 0, 0, 255))
    band.SetRasterColorTable(table)
    band.SetRasterColorInterpretation(gdal.GCI_PaletteIndex)
    ds = None
    return str(path)


def add_layer(path, name):
    from qgis.core import QgsProject, QgsRasterLayer

    layer = QgsRasterLayer(str(path), name, "gdal")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    return layer


def styled(layer, *bands):
    """``layer`` styled as the user would: three bands -> Multiband color (red, green, blue; -1 =
    not set), one band -> Singleband gray."""
    from qgis.core import QgsMultiBandColorRenderer, QgsSingleBandGrayRenderer

    if len(bands) == 3:
        layer.setRenderer(QgsMultiBandColorRenderer(layer.dataProvider(), *bands))
    else:
        layer.setRenderer(QgsSingleBandGrayRenderer(layer.dataProvider(), bands[0]))
    return layer


@pytest.fixture
def layers(tmp_path, qgis_new_project):
    """An 8-band scene styled 4,3,2; the same file styled as band 2 in grey; a paletted file; a
    virtual (rendered) layer."""
    eight = write_bands(tmp_path / "eight.tif")
    made = {
        "true_colour": styled(add_layer(eight, "true_colour"), 4, 3, 2),
        "grey": styled(add_layer(eight, "grey"), 2),
        "paletted": add_layer(write_paletted(tmp_path / "pal.tif"), "paletted"),
    }
    made["virtual"] = virtual_raster_layer(made["paletted"])
    assert made["paletted"].renderer().type() == "paletted"  # QGIS's default for a colour table
    return made


# ---------------------------------------------------------------------------------------------
# the bands of a layer


def test_layer_bands_follow_the_renderer(layers, tmp_path):
    from geovqa.bands import layer_bands
    from qgis.core import QgsHillshadeRenderer, QgsRasterShader, QgsSingleBandPseudoColorRenderer

    assert layer_bands(layers["true_colour"]) == [4, 3, 2]
    assert layer_bands(layers["grey"]) == [2]
    assert layer_bands(layers["paletted"]) is None  # the engine uses the colour table
    default = add_layer(write_bands(tmp_path / "default.tif"), "default")
    assert layer_bands(default) == [1, 2, 3]  # QGIS's default renderer: what the engine took anyway
    not_set = styled(add_layer(write_bands(tmp_path / "ns.tif"), "ns"), 4, -1, 2)
    assert layer_bands(not_set) is None  # a channel "not set": the engine's default
    pseudo = add_layer(write_bands(tmp_path / "ps.tif"), "ps")
    pseudo.setRenderer(QgsSingleBandPseudoColorRenderer(pseudo.dataProvider(), 5, QgsRasterShader()))
    assert layer_bands(pseudo) == [5]
    pseudo.setRenderer(QgsHillshadeRenderer(pseudo.dataProvider(), 1, 315, 45))
    assert layer_bands(pseudo) is None



def _tagged(path, tags):
    """``path`` with its bands' colour interpretations set to ``tags`` (GDAL names)."""
    from osgeo import gdal

    ds = gdal.Open(str(path), gdal.GA_Update)
    for b, tag in enumerate(tags, start=1):
        ds.GetRasterBand(b).SetColorInterpretation(getattr(gdal, f"GCI_{tag}Band"))
    ds = None
    return str(path)


def test_a_default_style_at_odds_with_the_colour_tags_lets_the_engine_choose(tmp_path, qgis_new_project):
    """QGIS 3.22's default style is bands 1, 2, 3 whatever the file's colour tags say: sending it
    showed a BGR file with red and blue swapped, and an alpha-first file's alpha band as red,
    where the engine's own choice (by the tags) is true colour."""
    from geovqa.bands import layer_bands

    bgr = add_layer(_tagged(write_bands(tmp_path / "bgr.tif", count=3), ("Blue", "Green", "Red")), "bgr")
    argb = add_layer(_tagged(write_bands(tmp_path / "argb.tif", count=4), ("Alpha", "Red", "Green", "Blue")), "argb")
    rgb = add_layer(_tagged(write_bands(tmp_path / "rgb.tif", count=3), ("Red", "Green", "Blue")), "rgb")
    assert [layer_bands(layer) for layer in (bgr, argb, rgb)] == [None, None, [1, 2, 3]]
    # a style the user chose is sent, tags or not; one showing the alpha band is not
    assert layer_bands(styled(bgr, 3, 2, 1)) == [3, 2, 1]
    assert layer_bands(styled(bgr, 1, 1, 1)) == [1, 1, 1]
    assert layer_bands(styled(argb, 2, 3, 4)) == [2, 3, 4]
    assert layer_bands(styled(argb, 1, 3, 4)) is None

def test_bands_in_words():
    from geovqa.bands import bands_cell, bands_text

    assert bands_text([4, 3, 2]) == "bands 4, 3, 2"
    assert bands_text([2, 2, 2]) == "band 2 as grey"
    assert bands_text([1, 1, 1], True) == "band 1 through its colour table"
    assert bands_text([1, 2, 3], rendered=True) == "rendered view"
    assert bands_text(None) == bands_text([]) == ""  # an engine older than the field
    assert (bands_cell([4, 3, 2]), bands_cell([2, 2, 2]), bands_cell([1, 1, 1], True), bands_cell(None)) == (
        "4,3,2", "2 (grey)", "1 (colour table)", "")
    assert bands_cell([1, 2, 3], rendered=True) == "rendered view"  # the render's bands, not the layer's


# ---------------------------------------------------------------------------------------------
# the dock


def _ask(dock, layer, question="What is here?"):
    dock.set_layer(layer)
    n = len(dock.turns(layer))
    dock.ask(question)
    wait_until(lambda: len(dock.turns(layer)) > n and dock.turns(layer)[-1].get("done"), 60, "the answer")
    wait_for_tasks()
    turn = dock.turns(layer)[-1]
    assert not turn.get("error"), turn
    return turn


@pytest.mark.parametrize("name, sent, seen", [
    ("true_colour", [4, 3, 2], "bands 4, 3, 2"),
    ("grey", [2], "band 2 as grey"),
    ("paletted", None, "band 1 through its colour table"),
    ("virtual", [1, 2, 3], "rendered view"),  # a render's RGB, named (an adapter's bands must not reorder it)
])
def test_the_dock_sends_the_bands_the_layer_shows_and_says_which_the_model_saw(
        plugin, stub_engine, layers, name, sent, seen):
    from geovqa import history

    turn = _ask(plugin.dock, layers[name])
    assert stub_engine.requests[-1]["bands"] == sent
    assert turn["request"]["bands"] == sent
    assert turn["meta"].endswith(f", {seen}"), turn["meta"]
    assert seen in plugin.dock.view.toPlainText() and seen in plugin.dock.conversation_text()
    # saved with the turn: the line under the answer, and the result's own fields
    (saved,) = json.loads(history.dumps({"x": [turn]}))["conversations"]["x"]
    assert saved["meta"] == turn["meta"] and "bands" in saved["result"] and "palette" in saved["result"]


def test_an_old_saved_conversation_without_bands_still_loads(plugin, layers, qgis_new_project):
    from qgis.core import QgsProject

    layer = layers["true_colour"]
    old = {"question": "Old?", "answer": "An old answer.", "done": True, "layer_id": layer.id(),
           "layer": layer.name(), "meta": "GeoLLaVA-8K: 4/576 visual tokens kept, 0.1 s",
           "result": {"tokens": {"visual_kept": 4, "visual_candidates": 576}, "timings": {"total": 0.1},
                      "strategy": "geollava"}}
    project = QgsProject.instance()
    project.writeEntry("geovqa", "conversations", json.dumps({"version": 1, "conversations": {layer.id(): [old]}}))
    plugin.dock._project_read(None)
    plugin.dock.set_layer(layer)
    (turn,) = plugin.dock.turns(layer)
    assert turn["meta"] == old["meta"] and "bands" not in turn["result"]
    assert "An old answer." in plugin.dock.view.toPlainText()


def test_the_real_engine_says_which_bands_the_model_saw_and_the_dock_shows_them(plugin, real_engine, layers):
    for name, result_bands, seen in (("true_colour", [4, 3, 2], "bands 4, 3, 2"),
                                     ("grey", [2, 2, 2], "band 2 as grey"),
                                     ("paletted", [1, 1, 1], "band 1 through its colour table")):
        turn = _ask(plugin.dock, layers[name])
        assert turn["result"]["bands"] == result_bands, name
        assert turn["result"]["palette"] is (name == "paletted")
        assert turn["meta"].endswith(f", {seen}"), turn["meta"]


# ---------------------------------------------------------------------------------------------
# the batch dialog


def test_the_batch_dialog_sends_each_layers_bands_and_keeps_what_the_model_saw(
        plugin, stub_engine, layers, tmp_path):
    from geovqa.batch_dialog import TABLE_COLUMNS

    order = ["true_colour", "grey", "paletted", "virtual"]
    canvas = plugin.iface.mapCanvas()  # a virtual layer is asked about as the map shows it
    canvas.setDestinationCrs(layers["virtual"].crs())
    canvas.setExtent(layers["virtual"].extent())
    dlg, done_rows = run_batch_dialog(plugin, [layers[n] for n in order], "What is here?")
    rows = {r["layer"]: r for r in done_rows}
    assert all(r["error"] is None for r in rows.values()), rows
    by_path = [(req["raster_path"], req["bands"]) for req in stub_engine.requests]
    assert (layers["true_colour"].source(), [4, 3, 2]) in by_path
    assert (layers["grey"].source(), [2]) in by_path
    assert (layers["paletted"].source(), None) in by_path
    # a render's RGB is named: an engine with an adapter trained on other bands must not reorder it
    assert any(path.endswith("_render.tif") and bands == [1, 2, 3] for path, bands in by_path)
    assert len(by_path) == 4
    assert [rows[n]["bands"] for n in order] == [[4, 3, 2], [2, 2, 2], [1, 1, 1], [1, 2, 3]]
    assert rows["paletted"]["palette"] is True and rows["true_colour"]["palette"] is False
    column = TABLE_COLUMNS.index("Bands")
    shown = {dlg.table.item(r, 0).text(): dlg.table.item(r, column).text() for r in range(dlg.table.rowCount())}
    assert shown["true_colour"] == "4,3,2" and shown["grey"] == "2 (grey)" and shown["paletted"] == "1 (colour table)"
    assert shown["virtual"] == "rendered view"  # as the dock says it, not the render file's "1,2,3"
    with open(dlg.export(str(tmp_path / "answers.csv")), newline="", encoding="utf-8") as fh:
        table = {r["layer"]: r["bands"] for r in csv.DictReader(fh)}
    assert table == {"true_colour": "4,3,2", "grey": "2 (grey)", "paletted": "1 (colour table)",
                     "virtual": "rendered view"}
    exported = json.loads(open(dlg.export(str(tmp_path / "answers.json")), encoding="utf-8").read())["results"]
    assert {r["layer"]: r["bands"] for r in exported}["true_colour"] == [4, 3, 2]
    assert {r["layer"]: r["rendered"] for r in exported} == {n: n == "virtual" for n in order}
    autosaved = [json.loads(line) for line in open(dlg.autosave_path, encoding="utf-8")]
    assert {r["layer"]: r["bands"] for r in autosaved}["true_colour"] == [4, 3, 2]
    assert {r["layer"]: r["rendered"] for r in autosaved} == {n: n == "virtual" for n in order}


# ---------------------------------------------------------------------------------------------
# Processing


def test_processing_ask_sends_the_layers_bands_and_logs_what_the_model_saw(
        plugin, stub_engine, layers, tmp_path, qgis_processing):
    import processing

    for name, sent, said in (("true_colour", [4, 3, 2], "The model saw bands 4, 3, 2 (layer 'true_colour')."),
                             ("grey", [2], "The model saw band 2 as grey (layer 'grey')."),
                             ("paletted", None, "The model saw band 1 through its colour table (layer 'paletted')."),
                             ("virtual", [1, 2, 3], "The model saw the layer as QGIS draws it (rendered in RGB).")):
        feedback = recording_feedback()
        processing.run("geovqa:ask_raster", {"INPUT": layers[name], "QUESTION": "What is here?", "STRATEGY": 0,
                                             "BUDGET": 0, "HEATMAP": str(tmp_path / f"{name}.tif"),
                                             "ANCHORS": str(tmp_path / f"{name}.geojson")}, feedback=feedback)
        assert stub_engine.requests[-1]["bands"] == sent, name
        assert said in feedback.of("info"), feedback.of("info")


def test_processing_batch_sends_each_layers_bands_and_writes_what_the_model_saw(
        plugin, stub_engine, layers, tmp_path, qgis_processing):
    import processing

    order = ["true_colour", "grey", "paletted", "virtual"]
    res = processing.run("geovqa:batch_questions", {
        "LAYERS": [layers[n] for n in order], "QUESTIONS": "What is here?", "STRATEGY": 0, "BUDGET": 0,
        "OUTPUT": str(tmp_path / "batch.csv"), "OUTPUT_JSON": str(tmp_path / "batch.json")})
    assert res["ANSWERED"] == 4 and res["ERRORS"] == 0
    assert [r["bands"] for r in stub_engine.requests] == [[4, 3, 2], [2], None, [1, 2, 3]]
    with open(res["OUTPUT"], newline="", encoding="utf-8") as fh:
        assert [r["bands"] for r in csv.DictReader(fh)] == ["4,3,2", "2 (grey)", "1 (colour table)", "rendered view"]
    rows = json.loads(open(res["OUTPUT_JSON"], encoding="utf-8").read())["results"]
    assert [(r["bands"], r["palette"], r["rendered"]) for r in rows] == [
        ([4, 3, 2], False, False), ([2, 2, 2], False, False), ([1, 1, 1], True, False), ([1, 2, 3], False, True)]


# ---------------------------------------------------------------------------------------------
# uploads to a remote engine keep every band, so the numbers still hold


def test_an_upload_keeps_every_band_so_the_band_numbers_hold(plugin, stub_engine, layers, tmp_path, qgis_processing):
    import processing
    from osgeo import gdal

    set_settings(send_rasters="upload")
    layer = layers["true_colour"]
    processing.run("geovqa:ask_raster", {
        "INPUT": layer, "QUESTION": "What is here?", "AOI": "500100,500300,4999700,4999900 [EPSG:32633]",
        "STRATEGY": 0, "BUDGET": 0, "HEATMAP": str(tmp_path / "h.tif"), "ANCHORS": str(tmp_path / "a.geojson")})
    (up,) = stub_engine.uploads
    assert up["request"]["bands"] == [4, 3, 2] and up["request"]["aoi"] == {"window": [0, 0, 20, 20]}
    got, src = gdal.Open(up["path"]), gdal.Open(layer.source())
    assert (got.RasterXSize, got.RasterYSize, got.RasterCount) == (20, 20, 8)  # a cut, every band
    for b in range(1, 9):  # band b of the cut is band b of the layer, over the window
        assert (got.GetRasterBand(b).ReadAsArray() == src.GetRasterBand(b).ReadAsArray(10, 10, 20, 20)).all()
