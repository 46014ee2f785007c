"""How GDAL places a raster file on the map, and whether the engine reads it as QGIS shows it.

GDAL only (no QGIS): shared by :mod:`aoi` (which grid an AOI is cut from, whether a file has no
georeferencing at all, and whether its geotransform places its pixels on the map at all) and
:mod:`render` (which files are sent as they are).
"""

from __future__ import annotations

import math

# The engine uses an affine transform fitted to a file's GCPs when it misses none of them by more
# than this many pixels and GDAL's GCP transformer (what QGIS shows the file through) strays no
# more than this from it anywhere in the image, and refuses the file ("warp it first") otherwise
# (engine/georeferencing.py GCP_TOLERANCE_PX, whose `_gcp_warp_gap_px` is the twin of the one
# below; the same least-squares fit, GDAL's GCPsToGeoTransform).
GCP_TOLERANCE_PX = 0.5
GCP_CHECK_GRID = 9  # points per side of that check's grid (corners, edge midpoints, centre included)


def open_with_gdal(source: str | None):
    """``source`` opened read-only with GDAL, or None when GDAL cannot open it here."""
    if not source:
        return None
    try:
        from osgeo import gdal

        return gdal.Open(source)
    except Exception:  # noqa: BLE001 - anything GDAL cannot open here is not ours to judge
        return None


def georeferencing(ds) -> str:
    """How GDAL places the dataset ``ds``: "geotransform", "gcps", "rpcs" or "none"."""
    if ds.GetGeoTransform(can_return_null=True) is not None:
        return "geotransform"
    if ds.GetGCPCount() > 0:
        return "gcps"
    if ds.GetMetadata("RPC"):
        return "rpcs"
    return "none"


def geotransform_problem(ds, name: str) -> str | None:
    """Why the engine refuses ``ds`` (opened from the file ``name``) for its geotransform, in the
    engine's words (engine/georeferencing.py ``_check_geotransform``, code raster_unreadable), or
    None when it has none or a usable one. A geotransform places no pixel on the map when one of
    its coefficients is not a finite number (a damaged header), or when its pixels have no area
    (a pixel size of zero, or rows that run along the columns: a determinant of zero), which no
    inverse undoes; QGIS then shows an empty or infinite extent, which no area of interest can
    be cut from."""
    gt = ds.GetGeoTransform(can_return_null=True)
    if gt is None:
        return None
    # the order of the engine's Affine(a, b, c, d, e, f), whose coefficients it says
    coefficients = (gt[1], gt[2], gt[0], gt[4], gt[5], gt[3])
    if all(math.isfinite(v) for v in coefficients):
        det = gt[1] * gt[5] - gt[2] * gt[4]
        if math.isfinite(det) and det != 0:
            return None
        why = ("its pixels have no area: a pixel size of zero, or rows that run along the columns"
               if det == 0 else "its pixels are too large to compute with")
    else:
        why = "some of its coefficients are not numbers"
    return (f"'{name}' has a geotransform that places no pixel on the map ({why}: "
            f"{', '.join(f'{v:g}' for v in coefficients)}). Fix its georeferencing (e.g. "
            f"gdal_edit.py -a_ullr <ulx> <uly> <lrx> <lry> '{name}'), or remove it "
            f"(gdal_edit.py -unsetgt '{name}') to read it in pixel coordinates, and try again.")


def _worst_gcp_miss_px(gcps) -> float:
    """How far (pixels) the affine transform fitted to ``gcps`` misses the worst of them."""
    from osgeo import gdal

    gt = gdal.GCPsToGeoTransform(gcps) if len(gcps) >= 3 else None
    inv = gdal.InvGeoTransform(gt) if gt is not None else None
    if not inv:  # degenerate GCPs (on one line): no transform at all
        return math.inf
    misses = [math.hypot(inv[0] + inv[1] * g.GCPX + inv[2] * g.GCPY - g.GCPPixel,
                         inv[3] + inv[4] * g.GCPX + inv[5] * g.GCPY - g.GCPLine) for g in gcps]
    return max(misses) if all(math.isfinite(m) for m in misses) else math.inf


def _gcp_warp_gap_px(ds) -> float:
    """How far (pixels) GDAL's default transformer of ``ds`` (for GCPs, the polynomial of automatic
    order, 2 from 6 GCPs on: what QGIS warps the file with) strays from the affine transform
    fitted to its GCPs, at the worst of a GCP_CHECK_GRID x GCP_CHECK_GRID grid of points over the
    whole image; inf when GDAL builds no transformer."""
    from osgeo import gdal

    gt = gdal.GCPsToGeoTransform(ds.GetGCPs())
    inv = gdal.InvGeoTransform(gt) if gt is not None else None
    if not inv:
        return math.inf
    try:
        warp = gdal.Transformer(ds, None, [])
    except Exception:  # noqa: BLE001 - GDAL could not build it (exceptions on or off)
        warp = None
    if warp is None:
        return math.inf
    steps = GCP_CHECK_GRID - 1
    worst = 0.0
    for i in range(GCP_CHECK_GRID):
        for j in range(GCP_CHECK_GRID):
            col, row = ds.RasterXSize * i / steps, ds.RasterYSize * j / steps
            ok, (x, y, _) = warp.TransformPoint(0, col, row)
            if not ok:
                return math.inf
            gap = math.hypot(inv[0] + inv[1] * x + inv[2] * y - col, inv[3] + inv[4] * x + inv[5] * y - row)
            if not math.isfinite(gap):
                return math.inf
            worst = max(worst, gap)
    return worst


def needs_warp(ds) -> bool:
    """True when the engine refuses ``ds`` with "warp it first" (code raster_unreadable): placed
    by RPCs alone, or by GCPs that no affine transform fits within GCP_TOLERANCE_PX, or by GCPs
    whose GDAL warp (how QGIS shows the file: a polynomial of order 2 from 6 GCPs on) strays more
    than GCP_TOLERANCE_PX from that affine fit somewhere in the image. QGIS shows such a file
    through a real warp, which only a render of the layer reproduces."""
    kind = georeferencing(ds)
    if kind == "rpcs":
        return True
    return kind == "gcps" and not (_worst_gcp_miss_px(ds.GetGCPs()) <= GCP_TOLERANCE_PX
                                   and _gcp_warp_gap_px(ds) <= GCP_TOLERANCE_PX)
