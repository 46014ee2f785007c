"""Result files of a raster with no georeferencing at all, moved to where QGIS shows it.

The protocol's coordinates for such a raster are its source pixels (col, row), rows running
down, so the engine's heatmap GeoTIFF and anchors GeoJSON are in those. QGIS shows the raster
at x = col, y = -row (y up), so the files would land mirrored below the layer. These functions
rewrite the plugin's own copies (never the engine's files) in QGIS's coordinates: y -> -y.
When only a cut of the raster was uploaded (:mod:`upload`), the files are in the cut's pixels
and are first moved by the cut's offset (:func:`shift_heatmap`, :func:`shift_anchors`).
Worker-thread safe (GDAL and JSON only); see :func:`aoi.is_unreferenced_file` for which layers.
"""

from __future__ import annotations

import json
from pathlib import Path


def flipped_geotransform(gt) -> tuple:
    """The geotransform giving y = -(row coordinate) of ``gt`` at every pixel."""
    a, b, c, d, e, f = gt
    return (a, b, c, -d, -e, -f)


def shifted_geotransform(gt, dx: float, dy: float, sx: float = 1.0, sy: float = 1.0) -> tuple:
    """The geotransform giving (dx + sx * x, dy + sy * y) of ``gt`` at every pixel."""
    a, b, c, d, e, f = gt
    return (dx + sx * a, sx * b, sx * c, dy + sy * d, sy * e, sy * f)


def _rewrite_geotransform(path: str, change) -> str:
    """Rewrite the GeoTIFF ``path``'s geotransform in place with ``change(gt)`` (the pixels stay
    as they are)."""
    from osgeo import gdal

    ds = gdal.Open(str(path), gdal.GA_Update)
    if ds is None:
        raise OSError(f"GDAL cannot open the heatmap {path}.")
    gt = ds.GetGeoTransform(can_return_null=True)
    if gt is not None:
        ds.SetGeoTransform(change(gt))
    ds = None  # closing writes the new transform
    return str(path)


def flip_heatmap(path: str) -> str:
    """Rewrite the GeoTIFF ``path``'s geotransform in place, y -> -y."""
    return _rewrite_geotransform(path, flipped_geotransform)


def shift_heatmap(path: str, dx: float, dy: float, sx: float = 1.0, sy: float = 1.0) -> str:
    """Rewrite the GeoTIFF ``path``'s geotransform in place, scaled by (sx, sy) and moved by (dx, dy)."""
    return _rewrite_geotransform(path, lambda gt: shifted_geotransform(gt, dx, dy, sx, sy))


def _map_positions(coords, change):
    """Nested GeoJSON coordinate lists with ``change(x, y)`` applied to every position."""
    if coords and isinstance(coords[0], (int, float)):
        return [*change(coords[0], coords[1]), *coords[2:]]
    return [_map_positions(c, change) for c in coords]


def _flip_positions(coords):
    """Nested GeoJSON coordinate lists with the second value of every position negated."""
    return _map_positions(coords, lambda x, y: (x, -y))


def _flip_rings(rings: list) -> list:
    # Mirroring reverses a ring's winding; reversing the ring keeps outer rings counterclockwise
    # and holes clockwise, as RFC 7946 asks.
    return [list(reversed(_flip_positions(ring))) for ring in rings]


def flip_geometry(geom: dict | None) -> dict | None:
    """A GeoJSON geometry mirrored y -> -y (every type, collections included)."""
    if not geom:
        return geom
    kind = geom.get("type")
    if kind == "GeometryCollection":
        return dict(geom, geometries=[flip_geometry(g) for g in geom.get("geometries", [])])
    coords = geom.get("coordinates")
    if coords is None:
        return geom
    if kind == "Polygon":
        return dict(geom, coordinates=_flip_rings(coords))
    if kind == "MultiPolygon":
        return dict(geom, coordinates=[_flip_rings(p) for p in coords])
    return dict(geom, coordinates=_flip_positions(coords))


def _flip_bbox(bbox):
    if not bbox or len(bbox) != 4:
        return bbox  # a 3D bbox is not something the engine writes; left as it is
    xmin, ymin, xmax, ymax = bbox
    return [xmin, -ymax, xmax, -ymin]


def shift_geometry(geom: dict | None, dx: float, dy: float, sx: float = 1.0, sy: float = 1.0) -> dict | None:
    """A GeoJSON geometry scaled by (sx, sy) and moved by (dx, dy) (every type, collections included)."""
    if not geom:
        return geom
    if geom.get("type") == "GeometryCollection":
        return dict(geom, geometries=[shift_geometry(g, dx, dy, sx, sy) for g in geom.get("geometries", [])])
    if geom.get("coordinates") is None:
        return geom
    return dict(geom, coordinates=_map_positions(geom["coordinates"], lambda x, y: (dx + sx * x, dy + sy * y)))


def _shift_bbox(bbox, dx: float, dy: float, sx: float = 1.0, sy: float = 1.0):
    if not bbox or len(bbox) != 4:
        return bbox
    xmin, ymin, xmax, ymax = bbox
    return [dx + sx * xmin, dy + sy * ymin, dx + sx * xmax, dy + sy * ymax]


def _rewrite_anchors(path: str, geometry, bbox) -> str:
    """Rewrite the GeoJSON FeatureCollection ``path`` in place: every geometry through
    ``geometry(geom)``, every bbox through ``bbox(bbox)``."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    for feat in data.get("features", []):
        feat["geometry"] = geometry(feat.get("geometry"))
        if "bbox" in feat:
            feat["bbox"] = bbox(feat["bbox"])
    if "bbox" in data:
        data["bbox"] = bbox(data["bbox"])
    Path(path).write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def flip_anchors(path: str) -> str:
    """Rewrite the GeoJSON FeatureCollection ``path`` in place, every coordinate y -> -y."""
    return _rewrite_anchors(path, flip_geometry, _flip_bbox)


def shift_anchors(path: str, dx: float, dy: float, sx: float = 1.0, sy: float = 1.0) -> str:
    """Rewrite the GeoJSON FeatureCollection ``path`` in place, every coordinate scaled by
    (sx, sy) and moved by (dx, dy) (a cut reduced to the engine's read budget, :mod:`upload`)."""
    return _rewrite_anchors(path, lambda g: shift_geometry(g, dx, dy, sx, sy),
                            lambda b: _shift_bbox(b, dx, dy, sx, sy))
