"""Map tools (rectangle, polygon), the options page, following the active layer."""

from __future__ import annotations


def _event(canvas, kind, x, y, button):
    from qgis.gui import QgsMapMouseEvent
    from qgis.PyQt.QtCore import QEvent, QPoint, Qt

    types = {"press": QEvent.Type.MouseButtonPress, "move": QEvent.Type.MouseMove,
             "release": QEvent.Type.MouseButtonRelease}
    btn = {"left": Qt.MouseButton.LeftButton, "right": Qt.MouseButton.RightButton, None: Qt.MouseButton.NoButton}[button]
    return QgsMapMouseEvent(canvas, types[kind], QPoint(x, y), btn, btn, Qt.KeyboardModifier.NoModifier)


def _px(canvas, layer, fx, fy):
    """Canvas pixel of the point at fractions (fx, fy) of the layer extent (from top-left)."""
    from qgis.core import QgsPointXY

    e = layer.extent()
    p = canvas.getCoordinateTransform().transform(
        QgsPointXY(e.xMinimum() + fx * e.width(), e.yMaximum() - fy * e.height()))
    return int(round(p.x())), int(round(p.y()))


def _canvas_on(qgis_iface, layer):
    from qgis.PyQt.QtCore import QSize

    canvas = qgis_iface.mapCanvas()
    canvas.resize(QSize(400, 300))
    canvas.setDestinationCrs(layer.crs())
    canvas.setExtent(layer.extent())
    return canvas


def test_rectangle_tool_sets_the_dock_aoi(plugin, raster_layer, qgis_iface):
    from geovqa.aoi import request_aoi

    layer = raster_layer(width=200, height=150)
    canvas = _canvas_on(qgis_iface, layer)
    dock = plugin.dock
    dock.set_layer(layer)
    dock.set_aoi_mode("rectangle")
    assert dock.draw_button.isEnabled()
    dock.activate_draw_tool()
    tool = dock.tool
    assert canvas.mapTool() is tool
    (x0, y0), (x1, y1) = _px(canvas, layer, 0.2, 0.2), _px(canvas, layer, 0.7, 0.8)
    tool.canvasPressEvent(_event(canvas, "press", x0, y0, "left"))
    tool.canvasMoveEvent(_event(canvas, "move", (x0 + x1) // 2, (y0 + y1) // 2, "left"))
    tool.canvasReleaseEvent(_event(canvas, "release", x1, y1, "left"))
    assert dock.aoi_geometry is not None
    box = dock.aoi_geometry.boundingBox()
    p0, p1 = tool.toMapCoordinates(_event(canvas, "press", x0, y0, "left").pos()), tool.toMapCoordinates(
        _event(canvas, "press", x1, y1, "left").pos())
    assert abs(box.xMinimum() - p0.x()) < 1e-6 and abs(box.yMinimum() - p1.y()) < 1e-6
    aoi = request_aoi(dock.aoi_geometry, dock.aoi_crs, layer)
    assert set(aoi) == {"window"} and aoi["window"][2] > 0 and aoi["window"][3] > 0
    dock.set_aoi_mode("layer")
    assert dock.tool is None and canvas.mapTool() is None


def test_polygon_tool_closes_on_right_click(plugin, raster_layer, qgis_iface):
    from geovqa.aoi import request_aoi

    layer = raster_layer(width=200, height=150)
    canvas = _canvas_on(qgis_iface, layer)
    dock = plugin.dock
    dock.set_layer(layer)
    dock.set_aoi_mode("polygon")
    dock.activate_draw_tool()
    tool = dock.tool
    for fx, fy in ((0.1, 0.1), (0.9, 0.2), (0.5, 0.9)):
        x, y = _px(canvas, layer, fx, fy)
        tool.canvasPressEvent(_event(canvas, "press", x, y, "left"))
    tool.canvasPressEvent(_event(canvas, "press", 0, 0, "right"))
    assert dock.aoi_geometry is not None and dock.aoi_geometry.area() > 0
    aoi = request_aoi(dock.aoi_geometry, dock.aoi_crs, layer)
    assert set(aoi) == {"polygon_wkt"} and aoi["polygon_wkt"].startswith("Polygon")
    dock.set_aoi_mode("layer")


def test_options_page_saves_settings(qgis_app, tmp_path):
    from geovqa.settings import Settings
    from geovqa.settings_page import GeoVQAOptionsFactory

    factory = GeoVQAOptionsFactory()
    page = factory.createWidget(None)
    page.form.url.setText("http://127.0.0.1:9999")
    page.form.python.setFilePath("/opt/venv/bin/python")
    page.form.strategy.setCurrentIndex(page.form.strategy.findData("pyramid"))
    page.form.budget.setValue(4096)
    assert not page.form.faithful.isChecked()
    page.form.faithful.setChecked(True)
    page.apply()
    s = Settings.load()
    assert (s.engine_url, s.python, s.strategy, s.budget) == ("http://127.0.0.1:9999", "/opt/venv/bin/python", "pyramid", 4096)
    assert s.faithful_empty_slots is True
    assert factory.createWidget(None).form.faithful.isChecked()  # shown as saved


def test_dock_follows_the_current_layer(plugin, raster_layer, qgis_iface):
    a, b = raster_layer("a"), raster_layer("b")
    qgis_iface.currentLayerChanged.emit(None)
    plugin.dock.follow_active_layer(b)
    assert plugin.dock.layer_combo.currentLayer() is b
    plugin.dock.follow_active_layer(a)
    assert plugin.dock.layer_combo.currentLayer() is a


def test_an_open_dock_takes_the_options_page_defaults_when_saved(plugin):
    """The dock read strategy, budget and answer length once, when built."""
    from geovqa.settings_page import GeoVQAOptionsFactory

    dock = plugin.dock
    page = GeoVQAOptionsFactory().createWidget(None)
    page.form.strategy.setCurrentIndex(page.form.strategy.findData("budget"))
    page.form.budget.setValue(777)
    page.form.max_new.setValue(8)
    page.apply()
    opts = dock.options()
    assert (opts["strategy"], opts["budget"], opts["max_new_tokens"]) == ("budget", 777, 8)
