"""How GDAL places a raster file on the map, and whether the engine reads it as QGIS shows it.

GDAL only (no QGIS): shared by :mod:`aoi` (which grid an AOI is cut from, and whether a file
has no georeferencing at all) and :mod:`render` (which files are sent as they are).
"""

from __future__ import annotations

import math

# The engine uses an affine transform fitted to a file's GCPs when it misses none of them by more
# than this many pixels, and refuses the file ("warp it first") otherwise (engine/raster.py
# GCP_TOLERANCE_PX; the same least-squares fit, GDAL's GCPsToGeoTransform).
GCP_TOLERANCE_PX = 0.5


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


def needs_warp(ds) -> bool:
    """True when the engine refuses ``ds`` with "warp it first" (code raster_unreadable): placed
    by RPCs alone, or by GCPs that no affine transform fits within GCP_TOLERANCE_PX. QGIS shows
    such a file through a real warp, which only a render of the layer reproduces."""
    kind = georeferencing(ds)
    if kind == "rpcs":
        return True
    return kind == "gcps" and not _worst_gcp_miss_px(ds.GetGCPs()) <= GCP_TOLERANCE_PX
