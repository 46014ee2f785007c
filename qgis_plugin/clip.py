"""Crop result files to the source raster's extent (worker-thread safe, GDAL/OGR only).

The engine's heatmap grid covers the model's padded tile canvas (padding cells are nodata), so
its extent can be larger than the raster's. Cropping keeps every heatmap cell that overlaps the
raster, whole, and none lying wholly outside it, so the layer's extent is the raster's rounded out
to whole cells (zoom to layer, legends, statistics); anchor footprints are cut to the raster's own
bounds. A heatmap on a rotated or south-up grid is left as it is.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def heatmap_window(gt, width: int, height: int, bounds: tuple) -> tuple | None:
    """``(col_off, row_off, cols, rows)``: the cells of a north-up heatmap grid (geotransform
    ``gt``, ``width`` x ``height`` cells) that overlap ``bounds`` = (xmin, ymin, xmax, ymax):
    the first cell is the one the bounds start in (floor), the last the one they end in (ceil),
    clipped to the grid, so every cell over the raster is kept, on every side, and no cell lying
    wholly outside it. A bound on a cell edge (within a millionth of a cell) keeps no cell
    beyond it. None when no cell overlaps the bounds."""
    xmin, ymin, xmax, ymax = bounds
    eps = 1e-6
    c0 = math.floor((xmin - gt[0]) / gt[1] + eps)
    c1 = math.ceil((xmax - gt[0]) / gt[1] - eps)
    r0 = math.floor((ymax - gt[3]) / gt[5] + eps)  # gt[5] < 0: rows run down from the top (ymax)
    r1 = math.ceil((ymin - gt[3]) / gt[5] - eps)
    c0, r0 = max(0, c0), max(0, r0)
    c1, r1 = min(width, c1), min(height, r1)
    if c1 <= c0 or r1 <= r0:
        return None
    return c0, r0, c1 - c0, r1 - r0


def clip_heatmap(path: str, bounds: tuple, dest: str) -> str:
    """Crop the GeoTIFF ``path`` to ``bounds`` = (xmin, ymin, xmax, ymax) in its CRS into ``dest``.

    Keeps every heatmap cell that overlaps the bounds, whole (:func:`heatmap_window`; the window
    is computed here, in cells: ``gdal.Translate``'s ``projWin`` rounds its corners to the
    nearest cell, which dropped the raster's last row of cells while keeping a row mostly
    outside it at the top). Returns ``dest``, or ``path`` unchanged when no cell lies wholly
    outside the bounds (or none overlaps them).
    """
    from osgeo import gdal

    ds = gdal.Open(str(path))
    if ds is None:
        raise OSError(f"GDAL cannot open the heatmap {path}.")
    gt = ds.GetGeoTransform()
    w, h = ds.RasterXSize, ds.RasterYSize
    if gt[2] != 0 or gt[4] != 0 or gt[5] >= 0 or gt[1] <= 0:
        # Rotated and south-up grids (the engine's heatmap follows its raster's grid) are left as
        # they are: a window of cells is no box in their CRS.
        return str(path)
    window = heatmap_window(gt, w, h, bounds)
    if window is None or window == (0, 0, w, h):
        return str(path)
    out = gdal.Translate(str(dest), ds, srcWin=list(window), creationOptions=["COMPRESS=DEFLATE"])
    if out is None:
        raise OSError(f"GDAL could not crop the heatmap {path}.")
    out = None
    return str(dest)


def clip_anchors(path: str, bounds: tuple, dest: str) -> str:
    """Intersect every anchor footprint with ``bounds``; drop the ones left empty."""
    from osgeo import ogr

    data = json.loads(Path(path).read_text(encoding="utf-8"))
    xmin, ymin, xmax, ymax = bounds
    ring = ogr.Geometry(ogr.wkbLinearRing)
    for x, y in ((xmin, ymin), (xmax, ymin), (xmax, ymax), (xmin, ymax), (xmin, ymin)):
        ring.AddPoint_2D(x, y)
    box = ogr.Geometry(ogr.wkbPolygon)
    box.AddGeometry(ring)
    kept = []
    for feat in data.get("features", []):
        geom_json = feat.get("geometry")
        if not geom_json:
            continue
        geom = ogr.CreateGeometryFromJson(json.dumps(geom_json))
        if geom is None:
            continue
        inter = geom.Intersection(box)
        if inter is None or inter.IsEmpty() or inter.GetArea() <= 0:
            continue
        feat = dict(feat, geometry=json.loads(inter.ExportToJson()))
        kept.append(feat)
    data["features"] = kept
    Path(dest).write_text(json.dumps(data), encoding="utf-8")
    return str(dest)
