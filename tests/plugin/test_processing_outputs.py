""""Ask a raster" run from QGIS 3.22's real toolbox dialog (processing.gui.AlgorithmDialog).

Its HEATMAP and ANCHORS outputs were file destinations: the toolbox gives those no "Open output
file after running algorithm" box (OPEN_AFTER_RUNNING False), so it never set a destination
project and the heatmap and anchors were never loaded. They are now a raster and a vector layer
output: ticked by default, QGIS loads them after the run, once each, named, marked and styled as
the chat dock's result layers; unticked, nothing is loaded. The provider says which files it
writes (.tif; .geojson, or .gpkg converted by GDAL): any other is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_then_load, wait_for_tasks

QUESTION = "How big?"
ANSWER = "The area is 64 x 48 pixels with 3 bands."


@pytest.fixture(autouse=True)
def browser_model(qgis_iface, monkeypatch):
    """The toolbox's parameters panel asks iface for its browser model (pytest-qgis's iface
    has none)."""
    from qgis.gui import QgsBrowserGuiModel

    model = QgsBrowserGuiModel()
    monkeypatch.setattr(qgis_iface, "browserModel", lambda: model, raising=False)
    yield model


def _dialog(alg_id="geovqa:ask_raster"):
    from processing.gui.AlgorithmDialog import AlgorithmDialog
    from qgis.core import QgsApplication

    return AlgorithmDialog(QgsApplication.processingRegistry().algorithmById(alg_id).create())


def _open_after_running_boxes(dlg, name):
    """The "Open output file after running algorithm" check boxes of output ``name``'s widget."""
    from qgis.PyQt.QtWidgets import QCheckBox

    widget = dlg.mainWidget().wrappers[name].wrappedWidget()
    return [box for box in widget.findChildren(QCheckBox) if "Open output file" in box.text()]


def _dialog_parameters(layer, open_after_running=True, **values):
    """The parameters the real dialog sends for "Ask a raster" about ``layer`` (INPUT and QUESTION
    filled in, ``values`` for other parameters), with the outputs' boxes as they are by default
    or unticked."""
    dlg = _dialog()
    panel = dlg.mainWidget()
    panel.setParameters(dict({"INPUT": layer.id(), "QUESTION": QUESTION}, **values))
    if not open_after_running:
        for name in ("HEATMAP", "ANCHORS"):
            for box in _open_after_running_boxes(dlg, name):
                box.setChecked(False)
    return dlg, panel.createProcessingParameters()


def _new_layers(project, *old):
    return [lyr for lyr in project.mapLayers().values() if lyr not in old]


def test_the_toolbox_dialog_loads_the_heatmap_and_anchors_named_and_marked(
        plugin, raster_layer, stub_engine, qgis_processing, qgis_new_project):
    from geovqa.layers import HEATMAP_OPACITY, RESULT_LAYER_PROPERTY, anchors_name, heatmap_name
    from qgis.core import QgsProject, QgsRasterLayer, QgsVectorLayer

    layer = raster_layer("a")
    project = QgsProject.instance()
    dlg, parameters = _dialog_parameters(layer)
    for name in ("HEATMAP", "ANCHORS"):  # as the toolbox shows them: the box is there, ticked
        assert dlg.mainWidget().wrappers[name].customProperties().get("OPEN_AFTER_RUNNING") is True, name
        assert [box.isChecked() for box in _open_after_running_boxes(dlg, name)] == [True], name
        assert parameters[name].destinationProject is project, name

    results, loaded, errors = run_then_load(dlg.algorithm(), parameters)
    assert results["ANSWER"] == ANSWER and loaded and not errors
    new = _new_layers(project, layer)
    heats = [lyr for lyr in new if isinstance(lyr, QgsRasterLayer)]
    anchors = [lyr for lyr in new if isinstance(lyr, QgsVectorLayer)]
    assert len(new) == 2 and len(heats) == 1 and len(anchors) == 1, [lyr.name() for lyr in new]  # each once
    (heat,), (anch,) = heats, anchors
    assert heat.source() == results["HEATMAP"] and results["HEATMAP"].endswith(".tif")
    assert anch.source() == results["ANCHORS"] and results["ANCHORS"].endswith(".geojson")
    assert heat.name() == heatmap_name(QUESTION, layer) and anch.name() == anchors_name(QUESTION, layer)
    assert heat.customProperty(RESULT_LAYER_PROPERTY) == f"heatmap:{heat.id()}"
    assert anch.customProperty(RESULT_LAYER_PROPERTY) == f"anchors:{anch.id()}"
    # styled as the dock styles them, not with Processing's default style
    assert heat.renderer().type() == "singlebandpseudocolor" and heat.renderer().opacity() == HEATMAP_OPACITY
    assert anch.featureCount() == 2 and anch.renderer().type() == "RuleRenderer" and anch.labelsEnabled()
    # the dock does not offer them as rasters to ask about
    listed = [plugin.dock.layer_combo.layer(i) for i in range(plugin.dock.layer_combo.count())]
    assert layer in listed and heat not in listed


def test_the_toolbox_dialog_with_the_boxes_unticked_loads_nothing(
        plugin, raster_layer, stub_engine, qgis_processing, qgis_new_project, tmp_path):
    from qgis.core import QgsProject, QgsRasterLayer

    layer = raster_layer("a")
    project = QgsProject.instance()
    dlg, parameters = _dialog_parameters(layer, open_after_running=False, HEATMAP=str(tmp_path / "h.tif"))
    for name in ("HEATMAP", "ANCHORS"):
        assert not dlg.mainWidget().wrappers[name].customProperties().get("OPEN_AFTER_RUNNING"), name
    results, loaded, errors = run_then_load(dlg.algorithm(), parameters)
    assert results["ANSWER"] == ANSWER and loaded and not errors
    assert _new_layers(project, layer) == []
    assert results["HEATMAP"] == str(tmp_path / "h.tif") and QgsRasterLayer(results["HEATMAP"], "h").isValid()


def test_anchors_saved_to_a_geopackage(plugin, raster_layer, stub_engine, qgis_processing, qgis_new_project, tmp_path):
    """A .gpkg anchors output is a GeoPackage GDAL converted from the engine's GeoJSON (the same
    features), loaded from it when the box is ticked; running again replaces it."""
    import processing
    from geovqa.layers import RESULT_LAYER_PROPERTY
    from osgeo import ogr
    from qgis.core import QgsProject, QgsVectorLayer

    layer = raster_layer("a")
    gpkg = str(tmp_path / "anchors.gpkg")
    geojson = str(tmp_path / "anchors.geojson")
    res = processing.run("geovqa:ask_raster", {"INPUT": layer, "QUESTION": QUESTION, "ANCHORS": geojson})
    ds = ogr.Open(res["ANCHORS"])  # kept while its layer is read
    expected = [(f.GetField("rank"), f.GetGeometryRef().ExportToWkt()) for f in ds.GetLayer(0)]
    ds = None
    assert len(expected) == 2

    for _ in range(2):
        dlg, parameters = _dialog_parameters(layer, ANCHORS=gpkg)
        results, loaded, errors = run_then_load(dlg.algorithm(), parameters)
        assert results["ANCHORS"] == gpkg and loaded and not errors
        ds = ogr.Open(gpkg)
        assert ds.GetDriver().GetName() == "GPKG" and ds.GetLayerCount() == 1
        got = [(f.GetField("rank"), f.GetGeometryRef().ExportToWkt()) for f in ds.GetLayer(0)]
        assert got == expected  # the same features, not appended to the ones there before
        ds = None
    anchors = [lyr for lyr in _new_layers(QgsProject.instance(), layer) if isinstance(lyr, QgsVectorLayer)]
    # (QGIS loads the second run's file as the project's layer of that file, already there)
    assert anchors and all(a.isValid() and a.featureCount() == 2 and a.customProperty(RESULT_LAYER_PROPERTY)
                           for a in anchors)


@pytest.mark.parametrize("anchors_file", [None, "anchors.gpkg"])
def test_anchors_with_no_feature_are_written_but_not_loaded_as_in_the_dock(
        plugin, raster_layer, stub_engine, qgis_processing, qgis_new_project, tmp_path, anchors_file):
    """An answer with no anchor kept: the dock adds no anchors layer, but Processing loaded the
    empty file (unstyled: OGR knows no geometry type for it). The file is still written and is
    the ANCHORS output (for models and qgis_process); only the heatmap is loaded."""
    from geovqa.layers import add_result_layers
    from qgis.core import QgsProject, QgsRasterLayer, QgsVectorLayer

    stub_engine.no_anchors = True
    layer = raster_layer("a")
    project = QgsProject.instance()
    given = {"ANCHORS": str(tmp_path / anchors_file)} if anchors_file else {}  # else a temporary file
    dlg, parameters = _dialog_parameters(layer, **given)
    results, loaded, errors = run_then_load(dlg.algorithm(), parameters)
    assert results["ANSWER"] == ANSWER and loaded and not errors
    written = QgsVectorLayer(results["ANCHORS"], "written", "ogr")
    assert written.isValid() and written.featureCount() == 0
    new = _new_layers(project, layer)
    assert [type(lyr) for lyr in new] == [QgsRasterLayer], [lyr.name() for lyr in new]
    assert new[0].source() == results["HEATMAP"]
    _, dock_heat, dock_anchors = add_result_layers(QUESTION, results["HEATMAP"], results["ANCHORS"], layer)
    assert dock_heat is not None and dock_anchors is None  # the dock, given the same files


def test_a_file_type_the_provider_does_not_write_is_refused(plugin, raster_layer, stub_engine, qgis_processing,
                                                            tmp_path):
    import processing
    from processing.gui.AlgorithmDialogBase import AlgorithmDialogBase
    from qgis.core import QgsApplication, QgsProcessingContext, QgsProcessingException

    layer = raster_layer("a")
    alg = QgsApplication.processingRegistry().algorithmById("geovqa:ask_raster")
    context = QgsProcessingContext()
    heat, anchors = alg.parameterDefinition("HEATMAP"), alg.parameterDefinition("ANCHORS")
    assert heat.isSupportedOutputValue(str(tmp_path / "h.png"), context) == (
        False, "“.png” files are not supported as outputs for this algorithm")
    assert not anchors.isSupportedOutputValue(str(tmp_path / "a.shp"), context)[0]
    assert not anchors.isSupportedOutputValue("memory:", context)[0]  # only files are written
    assert all(heat.isSupportedOutputValue(str(tmp_path / f"h.{ext}"), context)[0] for ext in ("tif", "tiff", "TIF"))
    assert all(anchors.isSupportedOutputValue(str(tmp_path / f"a.{ext}"), context)[0] for ext in ("geojson", "gpkg"))

    # the toolbox dialog refuses it before running
    dlg = _dialog()
    dlg.mainWidget().setParameters({"INPUT": layer.id(), "QUESTION": QUESTION, "HEATMAP": str(tmp_path / "h.png")})
    with pytest.raises(AlgorithmDialogBase.InvalidOutputExtension):
        dlg.mainWidget().createProcessingParameters()
    # and so does the algorithm (processing.run, qgis_process, models), before asking the engine
    for outputs, said in (({"HEATMAP": str(tmp_path / "h.png")}, "“.png” files are not supported"),
                          ({"ANCHORS": str(tmp_path / "a.shp")}, "“.shp” files are not supported"),
                          ({"ANCHORS": f"ogr:dbname='{tmp_path / 'a.gpkg'}' table=\"a\" (geom)"}, "only a file")):
        with pytest.raises(QgsProcessingException, match=said):
            processing.run("geovqa:ask_raster", dict({"INPUT": layer, "QUESTION": QUESTION}, **outputs))
    assert stub_engine.requests == []
    assert not (tmp_path / "h.png").exists() and not (tmp_path / "a.shp").exists()

    # the batch algorithm's CSV/JSON outputs are not concerned by the provider's layer formats
    dlg = _dialog("geovqa:batch_questions")
    dlg.mainWidget().setParameters({"LAYERS": [layer.id()], "QUESTIONS": QUESTION,
                                    "OUTPUT": str(tmp_path / "b.csv"), "OUTPUT_JSON": str(tmp_path / "b.json")})
    parameters = dlg.mainWidget().createProcessingParameters()
    assert parameters["OUTPUT"] == str(tmp_path / "b.csv") and parameters["OUTPUT_JSON"] == str(tmp_path / "b.json")
    results, loaded, errors = run_then_load(dlg.algorithm(), parameters)
    assert results["ANSWERED"] == 1 and loaded and not errors and (tmp_path / "b.json").is_file()


def test_a_heatmap_that_could_not_be_kept_is_not_loaded_and_the_run_is_not_failed(
        plugin, raster_layer, stub_engine, qgis_processing, qgis_new_project, tmp_path):
    """The results folder cannot be written: the answer is still the output; the outputs QGIS was
    to load are not loaded and not reported as layers it could not load."""
    from conftest import set_settings
    from qgis.core import QgsProject

    layer = raster_layer("a")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    set_settings(output_dir=str(blocker / "results"))
    dlg, parameters = _dialog_parameters(layer)
    results, loaded, errors = run_then_load(dlg.algorithm(), parameters)
    assert results["ANSWER"] == ANSWER and "HEATMAP" not in results and "ANCHORS" not in results
    assert loaded and not any("not correctly generated" in e for e in errors), errors
    assert _new_layers(QgsProject.instance(), layer) == []


@pytest.mark.parametrize("anchors_file", ["anchors.geojson", "anchors.gpkg"])
def test_the_loaded_anchors_of_a_raster_without_crs_lie_over_it(
        plugin, stub_engine, qgis_processing, qgis_new_project, tmp_path, anchors_file):
    """As in the dock: OGR reads a GeoJSON without "crs" member as EPSG:4326 (and GDAL wrote the
    GeoPackage so), while the raster and its heatmap have no CRS; with the project in
    EPSG:32633 the anchors Processing loaded spread over the whole map."""
    from conftest import extent_on_map, write_raster
    from osgeo import ogr
    from qgis.core import QgsCoordinateReferenceSystem, QgsProject, QgsRasterLayer, QgsVectorLayer

    utm = QgsCoordinateReferenceSystem("EPSG:32633")
    project = QgsProject.instance()
    project.setCrs(utm)
    layer = QgsRasterLayer(write_raster(tmp_path / "plain.tif", 200, 150, georeferenced=False), "plain", "gdal")
    assert layer.isValid() and not layer.crs().isValid()
    project.addMapLayer(layer)
    dlg, parameters = _dialog_parameters(layer, ANCHORS=str(tmp_path / anchors_file))
    results, loaded, errors = run_then_load(dlg.algorithm(), parameters)
    assert loaded and not errors
    new = _new_layers(project, layer)
    (anch,) = [lyr for lyr in new if isinstance(lyr, QgsVectorLayer)]
    (heat,) = [lyr for lyr in new if isinstance(lyr, QgsRasterLayer)]
    assert not anch.crs().isValid() and not heat.crs().isValid()
    assert anch.featureCount() == 2
    on_map = extent_on_map(layer, utm)
    assert on_map.contains(extent_on_map(anch, utm)), extent_on_map(anch, utm).toString()
    if anchors_file.endswith(".gpkg"):  # the file itself says "no CRS" as GeoPackage can: undefined Cartesian
        ds = ogr.Open(results["ANCHORS"])
        srs = ds.GetLayer(0).GetSpatialRef()
        assert srs is None or not srs.IsGeographic(), srs.ExportToWkt()
        ds = None


def _skip_output(dlg, name):
    """Picks "Skip Output" in the menu of output ``name``'s "…" button, as a user does."""
    from qgis.PyQt.QtCore import QTimer
    from qgis.PyQt.QtWidgets import QApplication, QToolButton

    picked = []

    def pick():
        menu = QApplication.activePopupWidget()
        (skip,) = [a for a in menu.actions() if a.text() == "Skip Output"]
        menu.close()
        skip.trigger()
        picked.append(skip)

    QTimer.singleShot(100, pick)
    dlg.mainWidget().wrappers[name].wrappedWidget().findChild(QToolButton).click()  # the menu runs until picked
    assert picked and dlg.mainWidget().wrappers[name].parameterValue() is None


def _processing_temp_files():
    from pathlib import Path

    from qgis.core import QgsProcessingUtils

    return {p for p in Path(QgsProcessingUtils.tempFolder()).rglob("*") if p.is_file()}


@pytest.mark.parametrize("skipped", ["HEATMAP", "ANCHORS"])
def test_an_output_skipped_in_the_toolbox_dialog_is_neither_written_nor_loaded(
        plugin, raster_layer, stub_engine, qgis_processing, qgis_new_project, tmp_path, skipped):
    """"Skip Output" left the output out of the dialog's parameters (QGIS 3.22), where it fell
    back to its default, a temporary file, which was written and loaded. The other output is
    still written and loaded; the lasting copies in the results folder are kept as before."""
    from qgis.core import QgsProject, QgsRasterLayer

    layer = raster_layer("a")
    dlg, _ = _dialog_parameters(layer)
    _skip_output(dlg, skipped)
    parameters = dlg.mainWidget().createProcessingParameters()
    before = _processing_temp_files()
    results, loaded, errors = run_then_load(dlg.algorithm(), parameters)
    assert results["ANSWER"] == ANSWER and loaded and not errors
    kept = "ANCHORS" if skipped == "HEATMAP" else "HEATMAP"
    assert skipped not in results and kept in results
    assert [p.name for p in _processing_temp_files() - before] == [Path(results[kept]).name]
    (new,) = _new_layers(QgsProject.instance(), layer)
    assert new.source() == results[kept] and isinstance(new, QgsRasterLayer) == (kept == "HEATMAP")
    assert len(list((tmp_path / "results").glob("*_heatmap.tif"))) == 1
    assert len(list((tmp_path / "results").glob("*_anchors.geojson"))) == 1


def test_outputs_given_empty_are_skipped_and_left_out_are_temporary_files(
        plugin, raster_layer, stub_engine, qgis_processing, qgis_new_project):
    import processing

    layer = raster_layer("a")
    before = _processing_temp_files()
    res = processing.run("geovqa:ask_raster", {"INPUT": layer, "QUESTION": QUESTION, "HEATMAP": None, "ANCHORS": ""})
    assert res["ANSWER"] == ANSWER and "HEATMAP" not in res and "ANCHORS" not in res
    assert _processing_temp_files() == before
    res = processing.run("geovqa:ask_raster", {"INPUT": layer, "QUESTION": QUESTION})
    assert {Path(res["HEATMAP"]).name, Path(res["ANCHORS"]).name} == {"HEATMAP.tif", "ANCHORS.geojson"}
    assert Path(res["HEATMAP"]).is_file() and Path(res["ANCHORS"]).is_file()


def test_qgis_process_skips_an_output_given_empty(stub_engine, tmp_path):
    """`qgis_process run geovqa:ask_raster -- ... HEATMAP=` (a null value) skips the heatmap; the
    anchors, left out, are a temporary file as before."""
    import json
    import subprocess

    from conftest import qgis_process_with_plugin, write_raster

    qp, env = qgis_process_with_plugin(tmp_path, stub_engine, tmp_path / "results")
    raster = write_raster(tmp_path / "r.tif")
    r = subprocess.run([qp, "--json", "run", "geovqa:ask_raster", "--", f"INPUT={raster}", f"QUESTION={QUESTION}",
                        "HEATMAP="], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads(r.stdout[r.stdout.index("{"):])["results"]
    assert results["ANSWER"] == ANSWER and "HEATMAP" not in results
    assert results["ANCHORS"].endswith("ANCHORS.geojson")
    assert len(list((tmp_path / "results").glob("*_heatmap.tif"))) == 1  # the lasting copy is still kept


def test_saving_the_project_keeps_a_temporary_output_and_leaves_one_the_user_placed(
        plugin, raster_layer, stub_engine, qgis_processing, qgis_new_project, tmp_path):
    """A heatmap left temporary is deleted when QGIS exits: saved with the project, it is copied
    into the project's geovqa_results (project_results); anchors written where the user said
    stay there."""
    import processing
    from conftest import set_settings
    from geovqa.layers import is_result_layer
    from qgis.core import QgsProcessing, QgsProject, QgsRasterLayer

    set_settings(output_dir="")
    layer = raster_layer("a")
    mine = tmp_path / "mine.geojson"
    res = processing.runAndLoadResults("geovqa:ask_raster", {
        "INPUT": layer, "QUESTION": QUESTION, "HEATMAP": QgsProcessing.TEMPORARY_OUTPUT, "ANCHORS": str(mine)})
    project = QgsProject.instance()
    loaded = [lyr for lyr in project.mapLayers().values() if is_result_layer(lyr)]
    (heat,) = [lyr for lyr in loaded if isinstance(lyr, QgsRasterLayer)]
    (anchors,) = [lyr for lyr in loaded if lyr is not heat]
    assert heat.source() == res["HEATMAP"] and not heat.source().startswith(str(tmp_path))
    (tmp_path / "proj").mkdir()
    project.setFileName(str(tmp_path / "proj" / "p.qgz"))
    assert project.write()
    assert heat.isValid() and heat.source().startswith(str(tmp_path / "proj" / "geovqa_results")), heat.source()
    assert anchors.source().split("|")[0] == str(mine)
    wait_for_tasks()
