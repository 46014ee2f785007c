"""Areas of interest: map tools to draw a rectangle or polygon, and the conversion of an AOI
drawn in the project CRS into the protocol's AOI in the layer's own CRS and pixels.

Reprojection densifies the AOI's edges before transforming, so a rectangle drawn in one CRS
becomes the right curved-edged polygon in the other; when the result is still an axis-aligned
rectangle in the layer's CRS, it is sent as a pixel window (cheaper for the engine).
"""

from __future__ import annotations

import math

from qgis.core import (
    QgsCoordinateTransform,
    QgsGeometry,
    QgsPointXY,
    QgsProject,
    QgsRectangle,
)
from qgis.gui import QgsMapTool, QgsRubberBand
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor

from .compat import POLYGON_GEOMETRY

AOI_MODES = ("layer", "extent", "rectangle", "polygon")
AOI_LABELS = {
    "layer": "Whole layer",
    "extent": "Current map extent",
    "rectangle": "Drawn rectangle",
    "polygon": "Drawn polygon",
}
DENSIFY = 32


class AoiError(ValueError):
    """The area of interest cannot be used with this layer (message for a person)."""


def to_layer_crs(geometry: QgsGeometry, src_crs, layer, project: QgsProject | None = None) -> QgsGeometry:
    """Reproject ``geometry`` from ``src_crs`` into ``layer``'s CRS (edges densified first)."""
    geom = QgsGeometry(geometry)
    dst_crs = layer.crs()
    if src_crs is None or not src_crs.isValid() or not dst_crs.isValid() or src_crs == dst_crs:
        return geom
    project = project or QgsProject.instance()
    geom = geom.densifyByCount(DENSIFY)
    xform = QgsCoordinateTransform(src_crs, dst_crs, project.transformContext())
    if geom.transform(xform) != 0:
        raise AoiError("The area of interest could not be reprojected into the layer's CRS.")
    return geom


def _is_rectangle(geom: QgsGeometry) -> bool:
    box = geom.boundingBox()
    area = box.width() * box.height()
    return area > 0 and abs(geom.area() - area) <= 1e-9 * max(1.0, area)


def pixel_window(box: QgsRectangle, layer) -> list:
    """Map rectangle (layer CRS) -> ``[col_off, row_off, width, height]`` clipped to the raster."""
    ext = layer.extent()
    cols, rows = layer.width(), layer.height()
    if cols <= 0 or rows <= 0 or ext.isEmpty():
        raise AoiError("The layer has no pixel grid to cut a window from.")
    resx = ext.width() / cols
    resy = ext.height() / rows
    c0 = max(0, int(math.floor((box.xMinimum() - ext.xMinimum()) / resx + 1e-9)))
    c1 = min(cols, int(math.ceil((box.xMaximum() - ext.xMinimum()) / resx - 1e-9)))
    r0 = max(0, int(math.floor((ext.yMaximum() - box.yMaximum()) / resy + 1e-9)))
    r1 = min(rows, int(math.ceil((ext.yMaximum() - box.yMinimum()) / resy - 1e-9)))
    if c1 <= c0 or r1 <= r0:
        raise AoiError("The area of interest does not overlap the layer.")
    return [c0, r0, c1 - c0, r1 - r0]


def request_aoi(geometry: QgsGeometry | None, src_crs, layer, project: QgsProject | None = None) -> dict | None:
    """The protocol AOI for ``geometry`` (in ``src_crs``) on ``layer``, or None for the whole layer.

    Rectangles that stay rectangles in the layer's CRS become ``window``; anything else becomes
    ``polygon_wkt`` in the layer's CRS, clipped to the layer extent.
    """
    if geometry is None or geometry.isEmpty():
        return None
    geom = to_layer_crs(geometry, src_crs, layer, project)
    ext_geom = QgsGeometry.fromRect(layer.extent())
    if not geom.intersects(ext_geom):
        raise AoiError(f"The area of interest does not overlap the layer '{layer.name()}'.")
    if _is_rectangle(geom):
        win = pixel_window(geom.boundingBox(), layer)
        if win == [0, 0, layer.width(), layer.height()]:
            return None
        return {"window": win}
    clipped = geom.intersection(ext_geom)
    if clipped.isEmpty() or clipped.area() <= 0:
        raise AoiError(f"The area of interest does not overlap the layer '{layer.name()}'.")
    return {"polygon_wkt": clipped.asWkt(6)}


class _DrawTool(QgsMapTool):
    """Common rubber-band handling; emits ``drawn(QgsGeometry)`` in the canvas CRS."""

    drawn = pyqtSignal(object)

    def __init__(self, canvas):
        super().__init__(canvas)
        self.canvas = canvas
        self.band = QgsRubberBand(canvas, POLYGON_GEOMETRY)
        self.band.setColor(QColor(255, 140, 0, 60))
        self.band.setStrokeColor(QColor(255, 140, 0))
        self.band.setWidth(2)

    def clear(self) -> None:
        self.band.reset(POLYGON_GEOMETRY)

    def show_geometry(self, geometry: QgsGeometry) -> None:
        self.band.setToGeometry(geometry, None)

    def remove(self) -> None:
        self.clear()
        scene = self.canvas.scene()
        if scene is not None and self.band.scene() is scene:
            scene.removeItem(self.band)


class RectangleTool(_DrawTool):
    """Press, drag, release: a rectangle."""

    def __init__(self, canvas):
        super().__init__(canvas)
        self._start = None

    def canvasPressEvent(self, e):  # noqa: N802
        self._start = e.mapPoint()
        self.clear()

    def canvasMoveEvent(self, e):  # noqa: N802
        if self._start is None:
            return
        end = e.mapPoint()
        self.show_geometry(QgsGeometry.fromRect(QgsRectangle(self._start, end)))

    def canvasReleaseEvent(self, e):  # noqa: N802
        if self._start is None:
            return
        end = e.mapPoint()
        rect = QgsRectangle(self._start, end)
        self._start = None
        if rect.width() > 0 and rect.height() > 0:
            geom = QgsGeometry.fromRect(rect)
            self.show_geometry(geom)
            self.drawn.emit(geom)


class PolygonTool(_DrawTool):
    """Left click adds a vertex, right click (or double click) closes the polygon."""

    def __init__(self, canvas):
        super().__init__(canvas)
        self.points = []

    def _update(self, extra=None):
        pts = list(self.points) + ([extra] if extra is not None else [])
        if len(pts) >= 3:
            self.show_geometry(QgsGeometry.fromPolygonXY([pts]))
        elif pts:
            self.clear()
            for p in pts:
                self.band.addPoint(p)

    def canvasPressEvent(self, e):  # noqa: N802
        point = e.mapPoint()
        if e.button() == Qt.MouseButton.RightButton:
            self.finish()
        else:
            self.points.append(QgsPointXY(point))
            self._update()

    def canvasMoveEvent(self, e):  # noqa: N802
        if self.points:
            self._update(QgsPointXY(e.mapPoint()))

    def canvasDoubleClickEvent(self, e):  # noqa: N802
        self.finish()

    def finish(self):
        if len(self.points) >= 3:
            geom = QgsGeometry.fromPolygonXY([list(self.points)])
            self.points = []
            if geom.isGeosValid() or not geom.isEmpty():
                self.show_geometry(geom)
                self.drawn.emit(geom)
        else:
            self.points = []
            self.clear()
