"""A file whose geotransform places no pixel on the map (NaN or infinite terms, a pixel size of
zero, rows along the columns): the engine refuses it (engine/georeferencing.py
``_check_geotransform``), and the plugin says so, in the engine's words, before anything is asked,
from the chat dock, the batch dialog and Processing alike."""

from __future__ import annotations

import pytest
from conftest import run_batch_dialog, wait_for_tasks
from test_aoi_layers import _geotiff_with_transform
from test_processing_aoi import _errors_of_a_failed_run

UNPLACED = {
    "zero pixel height": (500000.0, 10.0, 0.0, 5000000.0, 0.0, 0.0),
    "rows along the columns": (500000.0, 1.0, 2.0, 5000000.0, 2.0, 4.0),
    "a NaN pixel size": (500000.0, float("nan"), 0.0, 5000000.0, 0.0, -10.0),
}
SAID = "has a geotransform that places no pixel on the map"
# a rectangle where the raster would lie with 10 m pixels
AREA = (500050.0, 4999700.0, 500150.0, 4999950.0)


def _unplaced_layer(tmp_path, name, in_project=True):
    from qgis.core import QgsProject, QgsRasterLayer

    path = _geotiff_with_transform(tmp_path / f"{name.replace(' ', '_')}.tif", UNPLACED[name], 40, 30)
    layer = QgsRasterLayer(path, name, "gdal")
    assert layer.isValid()
    if in_project:
        QgsProject.instance().addMapLayer(layer)
    return layer, path


@pytest.mark.parametrize("name", list(UNPLACED))
def test_no_area_of_interest_is_made_on_an_unplaced_file(tmp_path, qgis_new_project, name):
    """The AOI came out as an empty polygon (NaN: polygon_wkt ''), or as None: the whole raster
    asked about instead of the area drawn (a pixel of no area); now AoiError with the engine's
    sentence, with an area and without one."""
    from geovqa.aoi import AoiError, request_aoi
    from geovqa.georef import geotransform_problem, open_with_gdal
    from qgis.core import QgsGeometry, QgsRectangle

    layer, path = _unplaced_layer(tmp_path, name, in_project=False)
    said = []
    for geometry in (QgsGeometry.fromRect(QgsRectangle(*AREA)), None):
        try:
            request_aoi(geometry, layer.crs(), layer)
        except AoiError as exc:  # caught here: a traceback kept holding the layer crashed the GC at exit
            said.append(str(exc))
    expected = geotransform_problem(open_with_gdal(path), path)
    assert said == [expected, expected], said
    assert SAID in expected and f"gdal_edit.py -unsetgt '{path}'" in expected


def test_the_sentence_is_the_engines():
    """The same rule and words as engine/georeferencing.py (its coefficients in the order of the
    engine's Affine); a usable geotransform (rotated, south-up) and none at all are no problem."""
    from geovqa.georef import geotransform_problem

    class Ds:
        def __init__(self, gt):
            self.gt = gt

        def GetGeoTransform(self, can_return_null=False):  # noqa: N802 - GDAL's name
            return self.gt

    said = geotransform_problem(Ds((500000.0, 10.0, 0.0, 5000000.0, 0.0, 0.0)), "/d/a.tif")
    assert said == ("'/d/a.tif' has a geotransform that places no pixel on the map (its pixels have no area: "
                    "a pixel size of zero, or rows that run along the columns: 10, 0, 500000, 0, 0, 5e+06). Fix its "
                    "georeferencing (e.g. gdal_edit.py -a_ullr <ulx> <uly> <lrx> <lry> '/d/a.tif'), or remove it "
                    "(gdal_edit.py -unsetgt '/d/a.tif') to read it in pixel coordinates, and try again.")
    assert "not numbers" in geotransform_problem(Ds((500000.0, 10.0, 0.0, float("inf"), 0.0, -10.0)), "a")
    assert "too large" in geotransform_problem(Ds((0.0, 1e200, 0.0, 0.0, 0.0, -1e200)), "a")
    for usable in ((500000.0, 10.0, 0.0, 5000000.0, 0.0, -10.0), (500000.0, 10.0, 0.0, 4999200.0, 0.0, 10.0),
                   (500000.0, 9.4, 3.4, 5000000.0, 3.4, -9.4), None):
        assert geotransform_problem(Ds(usable), "a") is None


def test_the_dock_says_it_and_asks_nothing(plugin, stub_engine, tmp_path, qgis_new_project):
    from qgis.core import QgsGeometry, QgsRectangle

    layer, _path = _unplaced_layer(tmp_path, "zero pixel height")
    dock = plugin.dock
    dock.set_layer(layer)
    for mode in ("layer", "rectangle"):
        dock.set_aoi_mode(mode)
        if mode == "rectangle":
            dock.set_aoi_geometry(QgsGeometry.fromRect(QgsRectangle(*AREA)), layer.crs())
        dock.question_edit.setText("what is here?")
        assert dock.ask() is None
        assert SAID in dock.progress_label.text()
        assert dock.turns(layer) == [] and not stub_engine.requests
    wait_for_tasks()


def test_processing_and_the_batch_say_it_and_ask_nothing(plugin, stub_engine, qgis_processing, tmp_path,
                                                         qgis_new_project):
    layer, _path = _unplaced_layer(tmp_path, "a NaN pixel size")
    said = _errors_of_a_failed_run("geovqa:ask_raster", {"INPUT": layer, "QUESTION": "How big?"})
    assert SAID in said, said
    said = _errors_of_a_failed_run("geovqa:ask_raster", {"INPUT": layer, "QUESTION": "How big?",
                                                         "AOI": "500050,500150,4999700,4999950 [EPSG:32633]"})
    assert SAID in said, said
    _dlg, rows = run_batch_dialog(plugin, [layer], "How big?")
    assert len(rows) == 1 and rows[0]["answer"] is None and SAID in rows[0]["error"], rows
    assert not stub_engine.requests
