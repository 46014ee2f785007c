"""The CRS a GeoJSON area of interest names in the legacy (2008) ``"crs"`` member, and the area
moved into the raster's CRS.

The protocol's ``geojson`` AOI (and ``ask --aoi FILE.geojson``) is in the raster's CRS. A file
written with the 2008 GeoJSON spec's ``"crs"`` member (QGIS and GDAL still write it) may name
another one, e.g. ``urn:ogc:def:crs:EPSG::4326`` for longitudes and latitudes; read as if it were
in the raster's CRS it gave a wrong area or a misleading "does not overlap". So a member that
names a CRS rasterio parses, other than the raster's, has the area reprojected into the raster's
CRS (`in_raster_crs`, with a note saying so, `crs_note`); one that cannot be parsed, or one on an
area for a raster without a CRS, is refused (`AOIError`, code bad_aoi) with a sentence.

GeoJSON coordinates are always x = easting/longitude, y = northing/latitude, whatever axis order
the named CRS declares (EPSG:4326 declares latitude first): the traditional GIS order, which
rasterio's transforms use, so ``EPSG:4326`` and ``OGC:CRS84`` name the same thing here.
"""

from __future__ import annotations

import numpy as np

from .raster_errors import AOIError

# an area reprojected is densified first to this many pieces of its extent a side, so that a
# straight edge in one CRS follows its curve in the other (a lat/lon box in UTM)
DENSIFY_PIECES = 64


def named_crs(obj):
    """(the name as written, rasterio CRS) that GeoJSON object `obj`'s ``"crs"`` member names,
    or None when it has none (or a null one). AOIError (bad_aoi) when the member is not a named
    CRS (``{"type": "name", "properties": {"name": ...}}``, or the older ``{"type": "EPSG",
    "properties": {"code": ...}}``) that rasterio can parse."""
    if not isinstance(obj, dict) or obj.get("crs") is None:
        return None
    member = obj["crs"]
    props = member.get("properties") if isinstance(member, dict) else None
    kind = member.get("type") if isinstance(member, dict) else None
    if kind == "name" and isinstance(props, dict) and isinstance(props.get("name"), str):
        name = props["name"]
    elif (kind == "EPSG" and isinstance(props, dict) and isinstance(props.get("code"), int)
          and not isinstance(props.get("code"), bool)):
        name = f"EPSG:{props['code']}"
    else:
        raise AOIError(
            "The area of interest's GeoJSON has a \"crs\" member that names no CRS (expected "
            "{\"type\": \"name\", \"properties\": {\"name\": \"EPSG:4326\"}}); remove it to give "
            "the coordinates in the raster's CRS, or name the CRS they are in.")
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    try:
        return name, CRS.from_user_input(name)
    except (CRSError, ValueError) as exc:
        raise AOIError(
            f"The area of interest's GeoJSON names the CRS {name[:80]!r} in its \"crs\" member, "
            "which the engine does not know; name it as e.g. \"EPSG:4326\" or "
            "\"urn:ogc:def:crs:EPSG::4326\", or remove the member to give the coordinates in the "
            "raster's CRS.") from exc


def in_raster_crs(geom, obj, crs_wkt: str | None):
    """(`geom`, the area GeoJSON object `obj` covers, in the raster's CRS `crs_wkt`; a note, or
    None when nothing was moved). Unchanged when `obj` names no CRS or the raster's own (the
    same CRS in another axis order included); reprojected (rasterio.warp.transform_geom)
    when it names another. AOIError (bad_aoi) when the member cannot be read (`named_crs`),
    the raster has no CRS to move it into (`crs_wkt` None: its AOI is in source pixels), or
    the area has no place in the raster's CRS (outside where the projection is defined)."""
    named = named_crs(obj)
    if named is None:
        return geom, None
    name, src = named
    if crs_wkt is None:
        raise AOIError(
            f"The area of interest's GeoJSON names the CRS {name[:80]!r} in its \"crs\" member, but "
            "the raster has no CRS to reproject it into (its area of interest is in source pixels, "
            "col and row); remove the member and give the area in pixels, or georeference the "
            "raster.")
    import shapely
    from rasterio.crs import CRS
    from shapely.geometry import mapping, shape

    dst = CRS.from_wkt(crs_wkt)
    if src == dst:
        return geom, None
    before = shapely.get_coordinates(geom)
    moved = _transformed(shapely.get_coordinates(geom), src, dst, name)
    if np.allclose(moved, before, rtol=1e-12, atol=1e-9):  # the same CRS, another axis order
        return geom, None
    x0, y0, x1, y1 = geom.bounds
    step = max(x1 - x0, y1 - y0) / DENSIFY_PIECES
    dense = shapely.segmentize(geom, step) if step > 0 else geom
    from rasterio.warp import transform_geom

    try:
        out = shape(transform_geom(src, dst, mapping(dense)))
    except Exception as exc:  # noqa: BLE001 - GDAL/PROJ raise several kinds
        raise _unplaced(name, exc) from exc
    if not np.isfinite(shapely.get_coordinates(out)).all():
        raise _unplaced(name, None)
    return out, crs_note(name, dst)


def crs_note(name: str, dst) -> str:
    """The note that the area was reprojected from the CRS `name` into the raster's `dst`."""
    return (f"note: the area of interest's GeoJSON is in {name} (its \"crs\" member); it was "
            f"reprojected into the raster's CRS ({_crs_text(dst)})")


def aoi_crs_note(aoi, crs_wkt: str | None) -> str | None:
    """The note for the person asking when the protocol AOI `aoi` is a ``geojson`` one that was
    reprojected into the raster's CRS `crs_wkt`; None otherwise, and when it cannot be read (the
    read that follows reports why)."""
    if not isinstance(aoi, dict) or not isinstance(aoi.get("geojson"), dict):
        return None
    from .area_of_interest import geojson_area

    try:
        return in_raster_crs(geojson_area(aoi["geojson"]), aoi["geojson"], crs_wkt)[1]
    except AOIError:
        return None


def _transformed(xy: np.ndarray, src, dst, name: str) -> np.ndarray:
    """The (n, 2) coordinates `xy` from `src` into `dst` (always x, y)."""
    from rasterio.warp import transform

    try:
        xs, ys = transform(src, dst, xy[:, 0].tolist(), xy[:, 1].tolist())
    except Exception as exc:  # noqa: BLE001 - GDAL/PROJ raise several kinds
        raise _unplaced(name, exc) from exc
    return np.column_stack([np.asarray(xs, float), np.asarray(ys, float)])


def _unplaced(name: str, exc) -> AOIError:
    detail = f" ({str(exc)[:160]})" if exc is not None else ""
    return AOIError(
        f"The area of interest's GeoJSON, in {name[:80]} (its \"crs\" member), could not be "
        f"reprojected into the raster's CRS{detail}: its coordinates lie outside where that "
        "projection is defined. Check that the coordinates are in the CRS the member names.")


def _crs_text(crs) -> str:
    """'EPSG:32633' for a CRS with an authority code, else its name from the WKT."""
    try:
        auth = crs.to_authority()
    except Exception:  # noqa: BLE001
        auth = None
    if auth:
        return f"{auth[0]}:{auth[1]}"
    wkt = crs.to_wkt()
    start = wkt.find('"')
    return wkt[start + 1:wkt.find('"', start + 1)] if start >= 0 else "its own"
