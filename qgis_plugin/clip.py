"""Crop result files to the source raster's extent (worker-thread safe, GDAL/OGR only).

The engine's heatmap grid covers the model's padded tile canvas (padding cells are nodata), so
its extent can be larger than the raster's. Cropping makes the heatmap layer's extent match the
raster (zoom to layer, legends, statistics); anchor footprints are cut to the same box.
"""

from __future__ import annotations

import json
from pathlib import Path


def clip_heatmap(path: str, bounds: tuple, dest: str) -> str:
    """Crop the GeoTIFF ``path`` to ``bounds`` = (xmin, ymin, xmax, ymax) in its CRS into ``dest``.

    Returns ``dest``, or ``path`` unchanged when the heatmap already lies inside the bounds.
    """
    from osgeo import gdal

    ds = gdal.Open(str(path))
    if ds is None:
        raise OSError(f"GDAL cannot open the heatmap {path}.")
    gt = ds.GetGeoTransform()
    w, h = ds.RasterXSize, ds.RasterYSize
    if gt[2] != 0 or gt[4] != 0 or gt[5] > 0:
        # Rotated and south-up grids (the engine's heatmap follows its raster's grid) are left as
        # they are: gdal.Translate's projWin cannot cut them (a south-up one failed the answer).
        return str(path)
    xs = sorted((gt[0], gt[0] + gt[1] * w))
    ys = sorted((gt[3], gt[3] + gt[5] * h))
    xmin, ymin, xmax, ymax = bounds
    eps = 1e-6 * max(abs(gt[1]), abs(gt[5]))
    if xs[0] >= xmin - eps and xs[1] <= xmax + eps and ys[0] >= ymin - eps and ys[1] <= ymax + eps:
        return str(path)
    out = gdal.Translate(str(dest), ds, projWin=[xmin, ymax, xmax, ymin], creationOptions=["COMPRESS=DEFLATE"])
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
