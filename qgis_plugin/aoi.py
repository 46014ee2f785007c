"""Areas of interest: map tools to draw a rectangle or polygon, and the conversion of an AOI
drawn in the project CRS into the protocol's AOI in the layer's own CRS and pixels.

The AOI is cut to the layer's extent in its own CRS first (so a world-wide view survives), then
reprojected with its edges densified, so a rectangle drawn in one CRS becomes the right
curved-edged polygon in the other; when the result is still an axis-aligned rectangle in the
layer's CRS and the layer shows its file's own north-up grid, it is sent as a pixel window
(cheaper for the engine), else as a polygon. A polygon that crosses itself is repaired.
"""

from __future__ import annotations

import math

from qgis.core import (
    QgsAbstractGeometryTransformer,
    QgsCoordinateTransform,
    QgsGeometry,
    QgsPointXY,
    QgsProject,
    QgsRectangle,
)
from qgis.gui import QgsMapTool, QgsRubberBand
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor, QTransform

from .compat import POLYGON_GEOMETRY
from .georef import georeferencing, geotransform_problem, open_with_gdal

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


class _LongitudesNear(QgsAbstractGeometryTransformer):
    """Moves each vertex's longitude by a multiple of 360 degrees to the copy nearest the range
    ``lo``..``hi`` (itself when it lies within it; the original on a tie)."""

    def __init__(self, lo: float, hi: float):
        super().__init__()
        self.lo, self.hi = lo, hi

    def transformPoint(self, x, y, z, m):  # noqa: N802 - QGIS's name
        if not math.isfinite(x) or self.lo <= x <= self.hi:
            return True, x, y, z, m

        def away(k):  # from the range, then the smallest move
            moved = x + 360.0 * k
            return max(self.lo - moved, moved - self.hi, 0.0), abs(k)

        k = min(range(-3, 4), key=away)
        return True, x + 360.0 * k, y, z, m


def follow_longitudes(geometry: QgsGeometry, crs, lo: float, hi: float) -> QgsGeometry:
    """``geometry``, in ``crs``, with its longitudes moved by multiples of 360 degrees to the copy
    nearest ``lo``..``hi`` when ``crs`` is geographic (else as it is).

    PROJ answers longitudes in -180..180, so the reprojection of an area across the antimeridian
    (a Pacific raster in degrees running from 179.5 to 180.5, on a Pacific-centred map where it
    is one piece) came back torn in two, half of it on the other side of the world: with the
    layer's extent as the range, -179.9 is 180.1 again."""
    geom = QgsGeometry(geometry)
    if crs is None or not crs.isValid() or not crs.isGeographic() or geom.isEmpty():
        return geom
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return geom
    inner = geom.get()
    if inner is None or not inner.transform(_LongitudesNear(lo, hi)):
        return QgsGeometry(geometry)
    return geom


def polygonal_part(geometry: QgsGeometry) -> QgsGeometry:
    """The polygons of ``geometry`` (empty when it holds none): a cut can leave lines and points
    where an area only touches the layer's edge, in a GeometryCollection the engine refuses."""
    geom = QgsGeometry(geometry)
    if geom.isEmpty():
        return QgsGeometry()
    if geom.type() == POLYGON_GEOMETRY:  # a polygon or multipolygon (a collection's type is unknown)
        return geom
    parts = [g for g in geom.asGeometryCollection() if not g.isEmpty() and g.type() == POLYGON_GEOMETRY]
    return QgsGeometry.collectGeometry(parts) if parts else QgsGeometry()


def _layer_longitudes(layer) -> tuple[float, float]:
    ext = layer.extent()
    return ext.xMinimum(), ext.xMaximum()


def to_layer_crs(geometry: QgsGeometry, src_crs, layer, project: QgsProject | None = None) -> QgsGeometry:
    """Reproject ``geometry`` from ``src_crs`` into ``layer``'s CRS (edges densified first); in a
    geographic CRS, with its longitudes where the layer's are (:func:`follow_longitudes`)."""
    geom = QgsGeometry(geometry)
    dst_crs = layer.crs()
    if src_crs is None or not src_crs.isValid() or not dst_crs.isValid() or src_crs == dst_crs:
        return geom
    project = project or QgsProject.instance()
    geom = geom.densifyByCount(DENSIFY)
    xform = QgsCoordinateTransform(src_crs, dst_crs, project.transformContext())
    if geom.transform(xform) != 0:
        raise AoiError("The area of interest could not be reprojected into the layer's CRS.")
    if not layer.extent().isEmpty():
        geom = follow_longitudes(geom, dst_crs, *_layer_longitudes(layer))
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


def valid_geometry(geometry: QgsGeometry) -> QgsGeometry:
    """``geometry`` repaired when it is not valid (a hand-drawn polygon crossing itself)."""
    geom = QgsGeometry(geometry)
    if not geom.isEmpty() and not geom.isGeosValid():
        geom = geom.makeValid()
    return geom


def _extent_in(layer, crs, project: QgsProject | None, near: float | None = None):
    """The layer's extent as a densified polygon in ``crs``, or None when it cannot be had.

    In a geographic ``crs`` its longitudes are kept in one piece (:func:`follow_longitudes`):
    near the layer's own when the layer is in degrees too, else within 180 degrees of its
    centre's; then that piece is moved by whole turns (360 degrees) to the copy whose centre is
    nearest the longitude ``near`` (the area of interest's centre: a map in degrees shows a layer
    across the antimeridian at both ends, and where PROJ puts its centre, 179.9 or -179.9, says
    nothing about where the area was drawn)."""
    ext = QgsGeometry.fromRect(layer.extent()).densifyByCount(DENSIFY)
    try:
        xform = QgsCoordinateTransform(layer.crs(), crs, (project or QgsProject.instance()).transformContext())
        if ext.transform(xform) != 0:
            return None
        if crs.isGeographic():
            if layer.crs().isGeographic():
                lo, hi = _layer_longitudes(layer)
            else:
                lo = hi = xform.transform(layer.extent().center()).x()
            ext = follow_longitudes(ext, crs, lo, hi)
            if near is not None and math.isfinite(near) and not ext.isEmpty():
                turns = round((near - ext.boundingBox().center().x()) / 360.0)
                if turns:
                    ext.translate(360.0 * turns, 0.0)
    except Exception:  # noqa: BLE001 - QgsCsException: the extent does not exist in that CRS
        return None
    return ext if ext.isGeosValid() and not ext.isEmpty() else None


def clip_to_layer(geometry: QgsGeometry, src_crs, layer, project: QgsProject | None = None) -> QgsGeometry:
    """``geometry`` (in ``src_crs``) cut to ``layer``'s extent, in the layer's CRS.

    It is cut in ``src_crs`` first: a view of a whole continent or of the world (longitudes past
    180 included) does not survive reprojection into a local CRS, but the part of it over the
    layer does. Raises AoiError when nothing of the layer is left.
    """
    geom = valid_geometry(geometry)
    dst_crs = layer.crs()
    reprojects = (src_crs is not None and src_crs.isValid() and dst_crs.isValid() and src_crs != dst_crs)
    if reprojects and not layer.extent().isEmpty():
        ext_src = _extent_in(layer, src_crs, project, near=geom.boundingBox().center().x())
        if ext_src is not None:
            geom = polygonal_part(geom.intersection(ext_src))
            if geom.isEmpty() or geom.area() <= 0:
                raise AoiError(f"The area of interest does not overlap the layer '{layer.name()}'.")
    geom = valid_geometry(to_layer_crs(geom, src_crs, layer, project))
    if layer.extent().isEmpty():
        return geom
    clipped = polygonal_part(geom.intersection(QgsGeometry.fromRect(layer.extent())))
    if clipped.isEmpty() or clipped.area() <= 0:
        raise AoiError(f"The area of interest does not overlap the layer '{layer.name()}'.")
    return clipped


def file_grid_is_layer_grid(layer) -> bool:
    """True when the layer's width, height and extent are the pixels of its file.

    QGIS shows a rotated or south-up raster, or one placed by ground control points, through a
    warped, north-up view of it: a window cut from that view's grid is not a window of the file
    the engine reads (a polygon is)."""
    ds = open_with_gdal(layer.source())
    if ds is None:
        return True
    kind = georeferencing(ds)
    if kind != "geotransform":
        # Placed by ground control points (or RPCs), the file is shown through a warped view
        # with a grid of its own (the engine fits the GCPs; a polygon in the layer's CRS reaches
        # the right pixels). No georeferencing at all: QGIS and the engine both use the file's
        # pixels (QGIS only shows row r at y = -r, which the window's row offsets account for).
        return kind == "none"
    gt = ds.GetGeoTransform()
    return (gt[2] == 0 and gt[4] == 0 and gt[5] < 0
            and (ds.RasterXSize, ds.RasterYSize) == (layer.width(), layer.height()))


def is_unreferenced_file(layer) -> bool:
    """True when the engine reads ``layer``'s own file and that file has no georeferencing at
    all (no geotransform, no GCPs, no RPCs).

    The protocol's coordinates for such a raster are source pixels (col, row), rows running
    down, while QGIS shows it at x = col, y = -row: AOI polygons and result files must be
    mirrored between the two (:func:`layer_to_pixel_coords`, :mod:`unreferenced`). A layer the
    plugin renders first is never one: the render is a GeoTIFF in the layer's own coordinates."""
    from .render import layer_file_path  # here: render imports tasks, which needs no AOI

    ds = open_with_gdal(layer_file_path(layer))
    return ds is not None and georeferencing(ds) == "none"


def check_placed_on_map(layer) -> None:
    """Raise AoiError, in the engine's words (:func:`georef.geotransform_problem`), when the file
    the engine reads for ``layer`` (:func:`render.layer_file_path`) has a geotransform that places
    no pixel on the map (NaN or infinite terms, a pixel size of zero, rows along the columns): the
    engine refuses it (raster_unreadable), and QGIS shows it with an empty or infinite extent, from
    which an area of interest came out empty (an empty polygon was sent), as the whole layer, or
    crashed GEOS. Said before anything is cut, uploaded or asked. A layer that is rendered first
    is none of these."""
    from .render import layer_file_path  # here: render imports tasks, which needs no AOI

    path = layer_file_path(layer)
    ds = open_with_gdal(path)
    problem = geotransform_problem(ds, path) if ds is not None else None
    if problem:
        raise AoiError(problem)


def layer_to_pixel_coords(geometry: QgsGeometry) -> QgsGeometry:
    """``geometry`` from an unreferenced layer's coordinates (x = col, y = -row) to the
    engine's source pixel coordinates (col, row): y -> -y."""
    geom = QgsGeometry(geometry)
    geom.transform(QTransform.fromScale(1.0, -1.0))
    return geom


PIXEL_CHECK_MAX_CENTRES = 4096  # an area over more pixel centres than this is not checked one by one


def holds_a_pixel(geometry: QgsGeometry, layer) -> bool:
    """Whether ``geometry`` (in ``layer``'s coordinates, e.g. from :func:`clip_to_layer`) holds
    the centre of at least one of the layer's pixels, which is what the engine reads of an area
    (engine/raster.py: a polygon with none is "smaller than one pixel"). A rectangle holding none
    was sent as a 1 x 1 px window: one pixel stretched to a tile. True when the layer has no
    pixel grid to tell, or when the area's box spans more than :data:`PIXEL_CHECK_MAX_CENTRES`
    centres (a large area; the engine still says so of a sliver)."""
    ext = layer.extent()
    cols, rows = layer.width(), layer.height()
    if cols <= 0 or rows <= 0 or ext.isEmpty() or geometry is None or geometry.isEmpty():
        return True
    resx, resy = ext.width() / cols, ext.height() / rows
    box = geometry.boundingBox()
    eps = 1e-9
    # the columns and rows whose centres (col + 0.5, row + 0.5) lie within the box
    c0 = max(0, math.ceil((box.xMinimum() - ext.xMinimum()) / resx - 0.5 - eps))
    c1 = min(cols - 1, math.floor((box.xMaximum() - ext.xMinimum()) / resx - 0.5 + eps))
    r0 = max(0, math.ceil((ext.yMaximum() - box.yMaximum()) / resy - 0.5 - eps))
    r1 = min(rows - 1, math.floor((ext.yMaximum() - box.yMinimum()) / resy - 0.5 + eps))
    if c1 < c0 or r1 < r0:
        return False
    if (c1 - c0 + 1) * (r1 - r0 + 1) > PIXEL_CHECK_MAX_CENTRES:
        return True
    centres = [QgsPointXY(ext.xMinimum() + (c + 0.5) * resx, ext.yMaximum() - (r + 0.5) * resy)
               for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]
    return QgsGeometry.fromMultiPointXY(centres).intersects(geometry)


def check_holds_a_pixel(geometry: QgsGeometry, layer) -> None:
    """Raise AoiError when ``geometry`` (in the layer's coordinates) is smaller than one pixel of
    the file ``layer`` (:func:`holds_a_pixel`), before anything is asked. ``layer`` is sent as its
    file (:func:`request_aoi`'s callers ask :func:`render.layer_file_path` first; a rendered layer
    is rendered at a size of its own); only where the layer's pixels are its file's
    (:func:`file_grid_is_layer_grid`: a warped view's grid is not the file's)."""
    if not file_grid_is_layer_grid(layer):
        return
    if not holds_a_pixel(geometry, layer):
        raise AoiError(f"The area of interest is smaller than one pixel of the layer '{layer.name()}' (it holds "
                       "no pixel's centre): choose a larger area.")


def request_aoi(geometry: QgsGeometry | None, src_crs, layer, project: QgsProject | None = None) -> dict | None:
    """The protocol AOI for ``geometry`` (in ``src_crs``) on ``layer``, a layer sent as its file
    (:func:`render.layer_file_path`), or None for the whole layer.

    Rectangles that stay rectangles in the layer's CRS become ``window`` (on a north-up file);
    anything else becomes ``polygon_wkt`` in the layer's CRS, clipped to the layer extent (on a
    file with no georeferencing, in its source pixels: see :func:`is_unreferenced_file`). Raises
    AoiError for an area off the layer, or one smaller than one of its pixels
    (:func:`check_holds_a_pixel`), and for a file whose geotransform places no pixel on the map
    (:func:`check_placed_on_map`), with or without an area.
    """
    check_placed_on_map(layer)
    if geometry is None or geometry.isEmpty():
        return None
    geom = clip_to_layer(geometry, src_crs, layer, project)
    ext = layer.extent()
    if geom.area() >= (1 - 1e-6) * ext.width() * ext.height():  # all of it, give or take rounding
        return None
    check_holds_a_pixel(geom, layer)  # a rectangle as a polygon: not one pixel stretched to a tile
    if _is_rectangle(geom) and file_grid_is_layer_grid(layer):
        win = pixel_window(geom.boundingBox(), layer)
        if win == [0, 0, layer.width(), layer.height()]:
            return None
        return {"window": win}
    if is_unreferenced_file(layer):
        geom = layer_to_pixel_coords(geom)
    return {"polygon_wkt": geom.asWkt(6)}


class _DrawTool(QgsMapTool):
    """Common rubber-band handling; emits ``drawn(QgsGeometry)`` in the canvas CRS, and
    ``started()`` when a new shape is begun: the outline shown before is gone from the map, so
    the area it showed is no longer the one drawn (its owner drops it)."""

    drawn = pyqtSignal(object)
    started = pyqtSignal()

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
        self.started.emit()

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
        else:  # a click without a drag: no rectangle (the one before went at the press)
            self.clear()


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
            first = not self.points
            self.points.append(QgsPointXY(point))
            self._update()  # the first vertex replaces the polygon shown before
            if first:
                self.started.emit()

    def canvasMoveEvent(self, e):  # noqa: N802
        if self.points:
            self._update(QgsPointXY(e.mapPoint()))

    def canvasDoubleClickEvent(self, e):  # noqa: N802
        self.finish()

    def finish(self):
        """Close the polygon being drawn; with fewer than 3 vertices it is dropped (the polygon
        before it went at its first vertex); with none, the polygon shown stays."""
        if not self.points:
            return
        if len(self.points) >= 3:
            geom = QgsGeometry.fromPolygonXY([list(self.points)])
            self.points = []
            if not geom.isEmpty():  # a polygon crossing itself is repaired by request_aoi
                self.show_geometry(geom)
                self.drawn.emit(geom)
        else:
            self.points = []
            self.clear()
