"""The area of interest of a read: the protocol's AOI forms (pixel window, WKT, shapely,
GeoJSON) read into a pixel window or a polygon, checked (`AOIError`, code bad_aoi), and clipped
to the raster (`AOIOutsideError` when it misses it). `geojson_area` is also the request checks'
reader of a ``geojson`` AOI; a GeoJSON AOI naming another CRS (its legacy ``"crs"`` member) is
moved into the raster's by engine/aoi_crs.py.
"""

from __future__ import annotations

import math

import numpy as np

from .raster_errors import AOIError, AOIOutsideError


def aoi_geometry(aoi, crs_wkt: str | None = None):
    """shapely geometry from WKT, shapely or GeoJSON dict; None when `aoi` is a pixel window.

    `crs_wkt` is the raster's CRS (None: it has none): a GeoJSON dict whose ``"crs"`` member
    names another CRS is reprojected into it (engine/aoi_crs.py `in_raster_crs`)."""
    import shapely

    from .aoi_crs import in_raster_crs

    if hasattr(aoi, "geom_type"):
        return aoi
    if isinstance(aoi, str):
        try:
            return shapely.from_wkt(aoi)
        except Exception as exc:
            raise AOIError(f"The area of interest is not valid WKT: {aoi[:80]!r}.") from exc
    if isinstance(aoi, dict):
        # protocol AOI dicts (engine/protocol.py AOI_FIELDS); a null entry counts as absent
        if aoi.get("polygon_wkt") is not None:
            return aoi_geometry(str(aoi["polygon_wkt"]))
        if aoi.get("geojson") is not None:
            return in_raster_crs(geojson_area(aoi["geojson"]), aoi["geojson"], crs_wkt)[0]
        if aoi.get("window") is not None:
            return None
        return in_raster_crs(geojson_area(aoi), aoi, crs_wkt)[0]
    return None


POLYGON_TYPES = ("Polygon", "MultiPolygon")


def check_polygon(geom, what: str = "The area of interest") -> None:
    """AOIError (bad_aoi) unless `geom` is a non-empty Polygon or MultiPolygon whose coordinates
    are all finite numbers; `what` names it in the message."""
    if geom.geom_type not in POLYGON_TYPES:
        raise AOIError(f"{what} must be a polygon (Polygon or MultiPolygon), not a "
                       f"{geom.geom_type}.")
    if geom.is_empty:
        raise AOIError(f"{what} is an empty polygon; draw an area.")
    check_finite(geom, what)


def check_finite(geom, what: str = "The area of interest") -> None:
    """AOIError (bad_aoi) unless every coordinate of `geom` is a finite number."""
    import shapely

    if not np.isfinite(shapely.get_coordinates(geom)).all():
        raise AOIError(f"{what} has coordinates that are not finite numbers (NaN or infinity).")


def polygonal_area(geom, what: str = "The area of interest"):
    """The area `geom` (a polygon, multipolygon or collection) covers, as a valid shapely
    geometry of polygons only: a self-intersecting ring (drawn by hand) is made valid first, and
    the lines and points that making it valid (or a collection) leaves are dropped, since they
    enclose no pixel. AOIError (bad_aoi) when a coordinate is not a finite number or no area is
    left (its points lie on one line); `what` names it in the message."""
    import shapely

    check_finite(geom, what)
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    parts, todo = [], [geom]
    while todo:  # collections may nest (make_valid gives one of a polygon and a line)
        g = todo.pop()
        if g.geom_type in POLYGON_TYPES:
            parts.append(g)
        elif g.geom_type == "GeometryCollection":
            todo.extend(shapely.get_parts(g))
    area = parts[0] if len(parts) == 1 else shapely.union_all(parts) if parts else None
    if area is None or area.is_empty or not area.area > 0:
        raise AOIError(f"{what} has no area: its points lie on one line, or it folds onto "
                       "itself. Draw an area that encloses part of the raster.")
    return area


def geojson_area(obj):
    """The area a GeoJSON object covers, as a shapely geometry: the one reader of the protocol's
    ``geojson`` AOI, used by the request checks (engine/request_checks.py) and by `read_raster`.

    A Polygon or MultiPolygon geometry; a Feature holding one; or a FeatureCollection, the union
    of its features' polygons (a feature without a geometry, which GeoJSON allows, is skipped).
    Anything else raises AOIError (bad_aoi) saying what is wrong: not an object, a point, a line
    or a geometry collection, a collection with no polygon, a coordinate that is not a finite
    number.
    """
    import shapely

    if not isinstance(obj, dict):
        raise AOIError("The area of interest's GeoJSON must be an object: a Polygon or "
                       "MultiPolygon geometry, a Feature or a FeatureCollection.")
    kind = obj.get("type")
    if kind == "Feature":
        if obj.get("geometry") is None:
            raise AOIError("The area of interest's GeoJSON Feature has no geometry.")
        return _geojson_polygon(obj["geometry"], "The area of interest's Feature")
    if kind != "FeatureCollection":
        return _geojson_polygon(obj, "The area of interest")
    features = obj.get("features")
    if not isinstance(features, list):
        raise AOIError("The area of interest's FeatureCollection has no 'features' list.")
    parts = []
    for i, feature in enumerate(features, start=1):
        what = f"Feature {i} of the area of interest's FeatureCollection"
        if not isinstance(feature, dict):
            raise AOIError(f"{what} is not a GeoJSON object.")
        if feature.get("geometry") is not None:
            parts.append(_geojson_polygon(feature["geometry"], what))
    if not parts:
        raise AOIError("The area of interest's FeatureCollection has no feature with a polygon; "
                       "it needs at least one.")
    if len(parts) == 1:
        return parts[0]
    try:  # a self-intersecting ring is made valid first, as read_raster does with one polygon
        return shapely.union_all([p if p.is_valid else shapely.make_valid(p) for p in parts])
    except Exception as exc:  # noqa: BLE001 - GEOS raises several kinds
        raise AOIError(f"The polygons of the area of interest's FeatureCollection could not be "
                       f"joined into one area ({exc}).") from exc


def _geojson_polygon(obj, what: str):
    """A GeoJSON Polygon/MultiPolygon geometry as shapely, checked by `check_polygon`."""
    from shapely.geometry import shape

    if not isinstance(obj, dict):
        raise AOIError(f"{what} is not a GeoJSON geometry object.")
    odd = _not_numbers(obj.get("coordinates"))
    if odd:  # shapely reads true as 1 and "5" as 5: a wrong area, not an error
        raise AOIError(f"{what} has a coordinate that is not a number: {_json_text(odd[0])}.")
    try:
        geom = shape(obj)
    except Exception as exc:  # noqa: BLE001 - shapely raises several kinds
        raise AOIError(f"{what} is not a valid GeoJSON geometry ({exc}).") from exc
    check_polygon(geom, what)
    return geom


def _not_numbers(coordinates) -> list:
    """[the first leaf of a GeoJSON ``coordinates`` array that is not a JSON number (true, a
    string, null, an object)], or [] when every leaf is one (or there is no array: shapely says
    what is wrong then)."""
    stack = [coordinates] if isinstance(coordinates, (list, tuple)) else []
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
        elif isinstance(item, bool) or not isinstance(item, (int, float)):
            return [item]
    return []


def _json_text(value, limit: int = 40) -> str:
    """`value` as JSON text (true, "5", null) for a message, at most `limit` characters."""
    import json

    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def pixel_window(aoi) -> tuple[float, float, float, float]:
    if isinstance(aoi, dict):
        aoi = aoi.get("window")
    try:
        if isinstance(aoi, (str, bytes)):  # characters are no numbers: "1234" is not [1, 2, 3, 4]
            raise TypeError(aoi)
        vals = [float(v) for v in aoi]
    except (TypeError, ValueError, OverflowError) as exc:
        raise AOIError(
            "The area of interest must be a pixel window [col_off, row_off, width, height], a WKT "
            f"string, a shapely geometry or a GeoJSON dict; got {aoi!r}."
        ) from exc
    if len(vals) != 4:
        raise AOIError(f"A pixel window needs 4 numbers [col_off, row_off, width, height]; got {len(vals)}.")
    if not all(math.isfinite(v) for v in vals):
        raise AOIError(f"A pixel window needs 4 finite numbers [col_off, row_off, width, height]; "
                       f"got {vals}.")
    if vals[2] <= 0 or vals[3] <= 0:
        raise AOIError(f"A pixel window needs a positive width and height; got {vals[2]} x {vals[3]}.")
    return vals[0], vals[1], vals[2], vals[3]


def clip_window(c0, r0, c1, r1, src, what: str) -> tuple[int, int, int, int]:
    W, H = src.width, src.height
    ic0, ir0 = max(0, int(math.floor(c0))), max(0, int(math.floor(r0)))
    ic1, ir1 = min(W, int(math.ceil(c1))), min(H, int(math.ceil(r1)))
    if ic1 <= ic0 or ir1 <= ir0:
        raise AOIOutsideError(
            f"The area of interest ({what}) lies wholly outside '{src.name}' "
            f"({W} x {H} pixels). Draw or enter an area that overlaps the raster."
        )
    return ic0, ir0, ic1 - ic0, ir1 - ir0
