"""Where a raster lies on the map: its geotransform and CRS, or the affine fit to its ground
control points when that is what QGIS shows (else `NeedsWarpError`), and its footprint.

The plugin's qgis_plugin/georef.py mirrors the GCP checks with GDAL (`_gcp_warp_gap_px` has a
deliberate twin there).
"""

from __future__ import annotations

import math

import numpy as np
from affine import Affine

from .raster_errors import NeedsWarpError

# an affine fit to the GCPs is used when it misses none by more than this, and GDAL's GCP warp
# (what QGIS shows) strays no more than this from it anywhere in the image
GCP_TOLERANCE_PX = 0.5


def georeferencing(src) -> tuple[Affine, str | None, bool]:
    """(source pixel -> map transform, CRS as WKT, georeferenced) of an open rasterio dataset.

    A geotransform or a CRS is used as it is. A file placed on the map only by ground control
    points (no geotransform) gets the affine transform fitted to them, with their CRS, when the
    fit misses no GCP by more than `GCP_TOLERANCE_PX` and GDAL's own GCP transformer (the
    polynomial, of order 2 from 6 GCPs on, through which QGIS warps such a file to show it)
    keeps within `GCP_TOLERANCE_PX` of that fit over the whole image, so the engine's heatmap
    and anchors land on what the user sees. GCPs that need a real warp (no affine fits them, or
    they bend the image away from them), or RPCs alone, raise `NeedsWarpError`: reading the
    file as a plain grid would put every answer in the wrong place. Nothing at all: the
    identity (map coordinates are source pixel coordinates).
    """
    if not src.transform.almost_equals(Affine.identity()):
        _check_geotransform(src.transform, src.name)
        return src.transform, (src.crs.to_wkt() if src.crs is not None else None), True
    gcps, gcp_crs = src.gcps
    if gcps:
        crs = gcp_crs if gcp_crs is not None else src.crs
        transform = _affine_from_gcps(gcps, src.name)
        _check_gcp_warp_is_affine(gcps, transform, src.width, src.height, src.name)
        return transform, (crs.to_wkt() if crs is not None else None), True
    if src.rpcs is not None:
        raise NeedsWarpError(
            f"'{src.name}' is placed on the map by RPCs (a sensor model), not by a geotransform, so "
            "its pixels are not a map grid. Warp it first, e.g. gdalwarp -rpc -r bilinear "
            f"'{src.name}' warped.tif (add -to RPC_DEM=<dem.tif> in hilly terrain), and ask about "
            "the warped file."
        )
    if src.crs is not None:  # a CRS without a transform: coordinates are pixels, as before
        return Affine.identity(), src.crs.to_wkt(), True
    return Affine.identity(), None, False


def _check_geotransform(transform: Affine, name: str) -> None:
    """RasterOpenError (raster_unreadable) when the file's geotransform places no pixel on the
    map: a coefficient that is not a number (a damaged header), or a pixel of no area (a pixel
    size of zero, or a rotation that folds the rows onto the columns), which no inverse undoes
    (an area of interest in map coordinates) and which would put every answer on one line."""
    from .raster_errors import RasterOpenError

    coefficients = tuple(transform)[:6]
    if all(math.isfinite(v) for v in coefficients):
        det = transform.determinant
        if math.isfinite(det) and det != 0:
            return
        why = ("its pixels have no area: a pixel size of zero, or rows that run along the columns"
               if det == 0 else "its pixels are too large to compute with")
    else:
        why = "some of its coefficients are not numbers"
    raise RasterOpenError(
        f"'{name}' has a geotransform that places no pixel on the map ({why}: "
        f"{', '.join(f'{v:g}' for v in coefficients)}). Fix its georeferencing (e.g. "
        f"gdal_edit.py -a_ullr <ulx> <uly> <lrx> <lry> '{name}'), or remove it "
        f"(gdal_edit.py -unsetgt '{name}') to read it in pixel coordinates, and try again.",
        code="raster_unreadable",
    )


def _affine_from_gcps(gcps, name: str) -> Affine:
    """The affine transform fitted to `gcps`, or NeedsWarpError when it misses one of them by
    more than `GCP_TOLERANCE_PX` (or fewer than three GCPs cannot fix one)."""
    from affine import TransformNotInvertibleError
    from rasterio.transform import from_gcps

    if len(gcps) < 3:
        raise NeedsWarpError(
            f"'{name}' is georeferenced by {len(gcps)} ground control point(s); at least three "
            "are needed to place it on the map. Add GCPs (e.g. in QGIS's Georeferencer) and "
            "save it georeferenced."
        )
    transform = from_gcps(gcps)  # GDAL's least-squares fit; garbage when the GCPs are degenerate
    try:
        inverse = ~transform
        misses = [math.hypot(*(np.subtract(inverse @ (g.x, g.y), (g.col, g.row)))) for g in gcps]
    except TransformNotInvertibleError:
        misses = [math.inf]
    worst = max(misses) if all(math.isfinite(m) for m in misses) else math.inf
    if not worst <= GCP_TOLERANCE_PX:
        detail = (f"the best one misses a GCP by {worst:.1f} pixels" if math.isfinite(worst)
                  else "they lie on one line")
        raise NeedsWarpError(
            f"'{name}' is georeferenced by ground control points that need a warp: no affine "
            f"transform fits them ({detail}). Warp it first, e.g. "
            f"gdalwarp -r bilinear '{name}' warped.tif, and ask about the warped file."
        )
    return transform


GCP_CHECK_GRID = 9  # points per side of the grid (corners, edge midpoints, centre included)


def _gcp_warp_gap_px(gcps, transform: Affine, width: int, height: int) -> float:
    """How far (pixels) GDAL's default GCP transformer (automatic polynomial order: 2 from 6
    GCPs on, what QGIS warps the file with) strays from the affine `transform` at the worst of
    a GCP_CHECK_GRID x GCP_CHECK_GRID grid of points over the whole image; inf when GDAL builds
    no transformer from these GCPs."""
    from rasterio.transform import GCPTransformer

    cols = np.repeat(np.linspace(0.0, width, GCP_CHECK_GRID), GCP_CHECK_GRID)
    rows = np.tile(np.linspace(0.0, height, GCP_CHECK_GRID), GCP_CHECK_GRID)
    try:
        with GCPTransformer(gcps) as warp:
            xs, ys = warp.xy(rows, cols, offset="ul")
        inverse = ~transform
    except Exception:  # noqa: BLE001 - GDAL's transformer failed: nothing affine to trust
        return math.inf
    back_cols, back_rows = inverse @ (np.asarray(xs, dtype=float), np.asarray(ys, dtype=float))
    gaps = np.hypot(back_cols - cols, back_rows - rows)
    return float(gaps.max()) if np.isfinite(gaps).all() else math.inf


def _check_gcp_warp_is_affine(gcps, transform: Affine, width: int, height: int, name: str) -> None:
    """NeedsWarpError when GDAL's GCP transformer (which QGIS shows the file through) puts part of
    the image more than GCP_TOLERANCE_PX away from the affine `transform`: GCPs clustered in one
    part of the image, each close to the affine fit, can still bend the rest of it by pixels."""
    gap = _gcp_warp_gap_px(gcps, transform, width, height)
    if not gap <= GCP_TOLERANCE_PX:
        detail = (f"which strays up to {gap:.1f} pixels from the best affine transform" if math.isfinite(gap)
                  else "which GDAL could not compute")
        raise NeedsWarpError(
            f"'{name}' is georeferenced by ground control points that bend the image: QGIS shows it "
            f"through a polynomial warp fitted to its {len(gcps)} GCPs, {detail}. Warp it first, e.g. "
            f"gdalwarp -r bilinear '{name}' warped.tif, and ask about the warped file."
        )


def footprint_bounds(transform: Affine, width: int, height: int) -> tuple[float, float, float, float]:
    """(min x, min y, max x, max y) of the raster's four corners in map coordinates; right for
    rotated and south-up rasters too."""
    xs, ys = zip(*(transform @ (c, r) for c in (0, width) for r in (0, height)))
    return min(xs), min(ys), max(xs), max(ys)
