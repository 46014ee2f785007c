"""Map tools (rectangle, polygon), the options page, following the active layer."""

from __future__ import annotations

from conftest import wait_for_tasks


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


def _drag(tool, canvas, layer, start, end):
    (x0, y0), (x1, y1) = _px(canvas, layer, *start), _px(canvas, layer, *end)
    tool.canvasPressEvent(_event(canvas, "press", x0, y0, "left"))
    tool.canvasMoveEvent(_event(canvas, "move", x1, y1, "left"))
    tool.canvasReleaseEvent(_event(canvas, "release", x1, y1, "left"))


def _asks_to_draw_first(dock, stub_engine):
    asked = len(stub_engine.requests)
    assert dock.ask("what is here?") is None
    assert "Draw the area of interest on the map first" in dock.progress_label.text()
    assert dock.turns() == [] and len(stub_engine.requests) == asked
    return True


def test_another_drawn_area_mode_forgets_the_area_drawn_before(plugin, raster_layer, stub_engine, qgis_iface):
    """Switching *Drawn rectangle* to *Drawn polygon* took the rectangle off the map but still asked
    about it, labelled *Drawn polygon*."""
    layer = raster_layer(width=200, height=150)
    canvas = _canvas_on(qgis_iface, layer)
    dock = plugin.dock
    dock.set_layer(layer)
    dock.set_aoi_mode("rectangle")
    dock.activate_draw_tool()
    _drag(dock.tool, canvas, layer, (0.2, 0.2), (0.5, 0.6))
    assert dock.aoi_geometry is not None and dock.progress_label.text() == "Area of interest set."
    dock.set_aoi_mode("polygon")
    assert dock.tool is None and dock.aoi_geometry is None and dock.progress_label.text() == ""
    assert _asks_to_draw_first(dock, stub_engine)
    dock.set_aoi_mode("rectangle")  # and back: the rectangle is not on the map any more either
    assert _asks_to_draw_first(dock, stub_engine)


def test_a_new_rectangle_replaces_the_one_shown_when_it_is_begun(plugin, raster_layer, stub_engine, qgis_iface):
    """Draw again, or a new press on the map, took the old rectangle off the map but it was
    still asked about: what is asked about is what the map shows."""
    from geovqa.aoi import request_aoi

    layer = raster_layer(width=200, height=150)
    canvas = _canvas_on(qgis_iface, layer)
    dock = plugin.dock
    dock.set_layer(layer)
    dock.set_aoi_mode("rectangle")
    dock.activate_draw_tool()
    _drag(dock.tool, canvas, layer, (0.1, 0.1), (0.4, 0.4))
    assert dock.aoi_geometry is not None
    dock.activate_draw_tool()  # Draw again: the old rectangle goes off the map
    assert dock.tool.band.numberOfVertices() == 0 and dock.aoi_geometry is None
    assert _asks_to_draw_first(dock, stub_engine)

    tool = dock.tool
    _drag(tool, canvas, layer, (0.1, 0.1), (0.4, 0.4))
    first = request_aoi(dock.aoi_geometry, dock.aoi_crs, layer)
    x, y = _px(canvas, layer, 0.5, 0.5)
    tool.canvasPressEvent(_event(canvas, "press", x, y, "left"))  # a new rectangle begun
    assert tool.band.numberOfVertices() == 0 and dock.aoi_geometry is None
    assert _asks_to_draw_first(dock, stub_engine)
    tool.canvasReleaseEvent(_event(canvas, "release", x, y, "left"))  # a click, no drag: no rectangle
    assert tool.band.numberOfVertices() == 0 and dock.aoi_geometry is None
    _drag(tool, canvas, layer, (0.5, 0.5), (0.9, 0.9))
    second = request_aoi(dock.aoi_geometry, dock.aoi_crs, layer)
    assert second != first
    dock.ask("what is here?")
    wait_for_tasks()
    assert stub_engine.requests[-1]["aoi"] == second
    dock.set_aoi_mode("layer")


def test_a_new_polygon_replaces_the_one_shown_at_its_first_vertex(plugin, raster_layer, stub_engine, qgis_iface):
    layer = raster_layer(width=200, height=150)
    canvas = _canvas_on(qgis_iface, layer)
    dock = plugin.dock
    dock.set_layer(layer)
    dock.set_aoi_mode("polygon")
    dock.activate_draw_tool()
    tool = dock.tool

    def click(fx, fy, button="left"):
        x, y = _px(canvas, layer, fx, fy)
        tool.canvasPressEvent(_event(canvas, "press", x, y, button))

    for fx, fy in ((0.1, 0.1), (0.9, 0.2), (0.5, 0.9)):
        click(fx, fy)
    click(0.5, 0.5, "right")
    drawn = dock.aoi_geometry
    assert drawn is not None and tool.band.numberOfVertices() > 0
    click(0.5, 0.5, "right")  # a right click with no new vertex: the polygon shown stays
    assert dock.aoi_geometry is drawn and tool.band.numberOfVertices() > 0
    click(0.2, 0.2)  # the first vertex of a new polygon: the old one is off the map
    assert dock.aoi_geometry is None
    assert _asks_to_draw_first(dock, stub_engine)
    click(0.6, 0.2)
    click(0.5, 0.5, "right")  # closed with two vertices: no polygon at all
    assert dock.aoi_geometry is None and tool.band.numberOfVertices() == 0
    assert _asks_to_draw_first(dock, stub_engine)
    dock.set_aoi_mode("layer")
