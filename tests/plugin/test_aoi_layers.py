"""AOI reprojection into pixel windows / polygons, and heatmap + anchor layer loading."""

from __future__ import annotations

import json

import tempfile
from pathlib import Path

import pytest


def test_aoi_same_crs_gives_pixel_window(raster_layer):
    from geovqa.aoi import request_aoi
    from qgis.core import QgsGeometry, QgsRectangle

    layer = raster_layer()  # 64 x 48 px, 10 m, origin 500000/5000000, EPSG:32633
    geom = QgsGeometry.fromRect(QgsRectangle(500100, 4999700, 500300, 4999900))
    assert request_aoi(geom, layer.crs(), layer) == {"window": [10, 10, 20, 20]}
    whole = QgsGeometry.fromRect(QgsRectangle(499000, 4990000, 501000, 5001000))
    assert request_aoi(whole, layer.crs(), layer) is None
    assert request_aoi(None, layer.crs(), layer) is None


def test_aoi_in_another_crs_is_reprojected(raster_layer):
    from geovqa.aoi import request_aoi
    from qgis.core import (QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsGeometry, QgsProject,
                           QgsRectangle)

    layer = raster_layer()
    wgs84 = QgsCoordinateReferenceSystem("EPSG:4326")
    inner = QgsRectangle(500100, 4999700, 500300, 4999900)
    xf = QgsCoordinateTransform(layer.crs(), wgs84, QgsProject.instance())
    geo_rect = xf.transformBoundingBox(inner)
    aoi = request_aoi(QgsGeometry.fromRect(geo_rect), wgs84, layer)
    assert set(aoi) == {"polygon_wkt"}
    poly = QgsGeometry.fromWkt(aoi["polygon_wkt"])
    box = poly.boundingBox()
    # the lat/lon box of the UTM rectangle covers it, within a couple of metres
    assert box.xMinimum() <= inner.xMinimum() + 1 and box.xMaximum() >= inner.xMaximum() - 1
    assert box.yMinimum() <= inner.yMinimum() + 1 and box.yMaximum() >= inner.yMaximum() - 1
    assert box.width() < inner.width() + 20 and box.height() < inner.height() + 20
    assert poly.within(QgsGeometry.fromRect(layer.extent()).buffer(0.001, 2))


def test_aoi_outside_layer_is_a_clear_error(raster_layer):
    from geovqa.aoi import AoiError, request_aoi
    from qgis.core import QgsGeometry, QgsRectangle

    layer = raster_layer()
    with pytest.raises(AoiError, match="does not overlap"):
        request_aoi(QgsGeometry.fromRect(QgsRectangle(0, 0, 10, 10)), layer.crs(), layer)


def _write_results(tmp_path, layer):
    from osgeo import gdal
    import numpy as np

    heat = tmp_path / "heat.tif"
    ds = gdal.GetDriverByName("GTiff").Create(str(heat), layer.width(), layer.height(), 1, gdal.GDT_Float32)
    e = layer.extent()
    ds.SetGeoTransform((e.xMinimum(), layer.rasterUnitsPerPixelX(), 0, e.yMaximum(), 0, -layer.rasterUnitsPerPixelY()))
    ds.SetProjection(layer.crs().toWkt())
    ds.GetRasterBand(1).SetNoDataValue(-1)
    ds.GetRasterBand(1).WriteArray(np.random.default_rng(0).random((layer.height(), layer.width())).astype("float32"))
    ds = None
    ring = [[e.xMinimum(), e.yMaximum()], [e.xMinimum() + 50, e.yMaximum()], [e.xMinimum() + 50, e.yMaximum() - 50],
            [e.xMinimum(), e.yMaximum() - 50], [e.xMinimum(), e.yMaximum()]]
    anchors = tmp_path / "anchors.geojson"
    anchors.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
         "properties": {"rank": 0, "score": 0.9, "role": "anchor", "tile": 0, "n_patches": 9}}]}))
    return heat, anchors


def test_result_layers_are_grouped_styled_and_aligned(raster_layer, tmp_path):
    from geovqa.layers import ANCHORS_NAME, HEATMAP_NAME, HEATMAP_OPACITY, add_result_layers, group_name
    from qgis.core import QgsProject, QgsSingleBandPseudoColorRenderer

    layer = raster_layer()
    heat, anchors = _write_results(tmp_path, layer)
    group, hl, al = add_result_layers("Where are the ships?", str(heat), str(anchors), source_layer=layer)
    assert group.name() == group_name("Where are the ships?") and "Where are the ships?" in group.name()
    assert QgsProject.instance().layerTreeRoot().findGroup(group.name()) is group
    assert [c.layer().name() for c in group.findLayers()] == [ANCHORS_NAME, HEATMAP_NAME]
    assert hl.crs() == layer.crs() and al.crs() == layer.crs()
    assert hl.extent() == layer.extent()
    assert layer.extent().contains(al.extent())
    assert isinstance(hl.renderer(), QgsSingleBandPseudoColorRenderer)
    assert hl.renderer().opacity() == pytest.approx(HEATMAP_OPACITY)
    assert al.featureCount() == 1


def test_results_folder_next_to_project(tmp_path, qgis_new_project):
    from geovqa.settings import RESULTS_FOLDER, Settings
    from qgis.core import QgsProject

    s = Settings()
    project = QgsProject.instance()
    project.setFileName(str(tmp_path / "proj" / "map.qgz"))
    assert s.results_dir(project) == tmp_path / "proj" / RESULTS_FOLDER
    s.output_dir = str(tmp_path / "mine")
    assert s.results_dir(project) == tmp_path / "mine"
    project.setFileName("")
    s.output_dir = ""
    # unsaved project: a folder inside the QGIS profile, not a temp dir
    from qgis.core import QgsApplication

    profile = Path(QgsApplication.qgisSettingsDirPath()).resolve()
    assert s.results_dir(project).resolve().is_relative_to(profile)
    assert s.results_dir(project).resolve() != Path(tempfile.gettempdir()).resolve()
