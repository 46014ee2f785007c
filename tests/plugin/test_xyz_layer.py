"""An XYZ tile layer (the web-service path) is rendered over the map extent and sent as a GeoTIFF."""

from __future__ import annotations

from conftest import scene_pixels, wait_for_tasks, wait_until


def _tiles(root):
    """Zoom levels 0-1 of a tiny local XYZ tile set (file:// URLs, no network)."""
    from qgis.PyQt.QtGui import QColor, QImage

    r, g, b = scene_pixels(512, 512)
    for z, n in ((0, 1), (1, 2)):
        for x in range(n):
            for y in range(n):
                img = QImage(256, 256, QImage.Format.Format_RGB32)
                step = 512 // (256 * n)
                for yy in range(0, 256, 8):
                    for xx in range(0, 256, 8):
                        sx, sy = (x * 256 + xx) * step // 1, (y * 256 + yy) * step // 1
                        c = QColor(int(r[sy % 512, sx % 512]), int(g[sy % 512, sx % 512]), int(b[sy % 512, sx % 512]))
                        for dy in range(8):
                            for dx in range(8):
                                img.setPixelColor(xx + dx, yy + dy, c)
                path = root / str(z) / str(x) / f"{y}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                assert img.save(str(path))


def test_xyz_layer_rendered_at_map_extent(plugin, stub_engine, qgis_iface, qgis_new_project, tmp_path):
    from osgeo import gdal
    from qgis.core import QgsCoordinateReferenceSystem, QgsProject, QgsRasterLayer, QgsRectangle

    _tiles(tmp_path / "tiles")
    url = (tmp_path / "tiles").as_uri() + "/{z}/{x}/{y}.png"
    layer = QgsRasterLayer(f"type=xyz&url={url}&zmin=0&zmax=1", "web tiles", "wms")
    assert layer.isValid(), layer.error().summary()
    QgsProject.instance().addMapLayer(layer)
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    view = QgsRectangle(-5e6, -3e6, 5e6, 4e6)
    canvas.setExtent(view)
    shown = canvas.extent()
    dock = plugin.dock
    dock.set_layer(layer)
    dock.ask("what is on the tiles?")
    wait_until(lambda: dock.turns() and dock.turns()[-1].get("done"), 60, "the answer")
    wait_for_tasks()
    turn = dock.turns()[-1]
    assert turn.get("error") is None, turn
    ds = gdal.Open(turn["rendered_path"])
    gt = ds.GetGeoTransform()
    assert abs(gt[0] - shown.xMinimum()) < shown.width() * 1e-3 and abs(gt[3] - shown.yMaximum()) < shown.height() * 1e-3
    assert "3857" in ds.GetProjection() or "Pseudo-Mercator" in ds.GetProjection()
    band = ds.GetRasterBand(2).ReadAsArray()
    assert band.max() > 0, "the render is empty"
    assert stub_engine.requests[-1]["raster_path"] == turn["rendered_path"]
