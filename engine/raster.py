"""Read any GDAL raster (GeoTIFF, COG, VRT, ...) with rasterio into an 8-bit RGB `RasterImage`.

What `read_raster` does, in order:

* **Open** the file; a missing, unreadable, corrupt or non-raster file raises `RasterOpenError`
  (a `RasterError`, itself a `ValueError`) with a sentence for a person, never a bare GDAL error.
  Every `RasterError` carries `.code`, the protocol error code (not_a_raster, raster_unreadable,
  bad_aoi, aoi_outside_raster, no_valid_pixels, bad_request).
* **Window** (AOI; the protocol's dicts ``{"window": [...]}``, ``{"polygon_wkt": str}`` and
  ``{"geojson": dict}`` are accepted as well as the bare forms below): none = the whole raster;
  a pixel window ``[col_off, row_off, width, height]``
  (clipped to the raster; wholly outside -> `AOIError`); or a polygon (WKT string, shapely
  geometry, or GeoJSON Polygon/MultiPolygon geometry, Feature or FeatureCollection dict, read by
  `geojson_area`, which the server's request checks share) in the raster's CRS, read over its
  bounding window with the pixels outside the polygon marked invalid. On a raster without
  georeferencing the polygon's coordinates are taken as source *pixel* coordinates (col, row).
* **Decimation**: when the window holds more than `max_pixels` pixels it is read at a reduced
  size (`read_size_for`) with GDAL's resampled read (average; nearest for palette rasters), which
  uses the file's overviews when present, so a 27,000 px raster is not loaded at full size.
  `image_to_source` records the exact offset + scale. Full resolution is still read where the
  file has no overviews (GDAL averages every source pixel, in strips: see Cancellation), and
  over the output pixels of a float band that hold NaN GDAL's average spread (see Validity):
  only those, so a NaN collar around a scene costs about the collar, while NaN scan-line gaps
  over the whole image cost a full-resolution read of the window.
* **Cancellation**: `cancel` (the question's threading.Event) is checked before the pixels are
  read and between row strips: a read that goes through more than `STRIP_SOURCE_PIXELS` source
  pixels at full resolution (a large window, or a decimated one without overviews) is done in
  strips of output rows, so a cancelled question stops within one strip (`Cancelled`). Smaller
  reads, and reads served by overviews, stay one GDAL call. (GDAL's average of a strip can differ
  from the whole read's by one grey level at a few pixels of the strip borders.)
* **Bands**: default RGB by colour interpretation when red, green and blue are all tagged, else
  the first three non-alpha bands; one band (or a grey + alpha pair) -> grey replicated to three
  channels; two non-alpha bands -> the first as grey; a single paletted band -> its colour table.
  An explicit ``bands=[...]`` (1-based, one or three entries) overrides that (one band is shown
  as grey, also a paletted one); one naming an alpha band is refused (`BandError`, naming it). `RasterImage.bands` records the source band of each RGB channel
  the model sees (``(4, 3, 2)``; ``(1, 1, 1)`` for grey) and `RasterImage.palette` whether the
  colour table of that one band was used instead; the engine's ``result`` event reports both.
* **Stretch**: decided per band by the band's own type: a Byte (uint8) band is kept as is; any
  other type (uint16, int, float) is stretched per band from its 2nd..98th percentile over valid
  pixels only to 0..255. Bands of different types (e.g. a VRT stacking Byte and UInt16 files, or
  such bands chosen with ``bands``) are read as their common type, and a Byte band among them
  still keeps its 0..255 values, as it does read alone (its `stretch` entry is (0, 255)).
  A constant band keeps its value clipped to 0..255 (no division by zero).
* **Validity**: nodata values, internal/external masks and an alpha band (all through GDAL's
  per-band masks), NaN/inf in float data, and the outside of a polygon AOI give ``valid=False``;
  those pixels are set to 0 in ``pixels``. In a reduced read, GDAL's average skips nodata but
  spreads NaN: one NaN source pixel made its whole output pixel NaN, so a float band with NaN
  gaps lost most of the image where its NaN are scattered or striped, whether it had no nodata
  tag, another nodata value (e.g. -9999) or a mask. The output pixels that hold such NaN (NaN
  where the mask has data) are read again, and only they, through a VRT with NaN as its nodata
  that also turns the pixels its nodata tag or mask hides into NaN (`_mend_spread_nan`: row
  blocks of about `MEND_SOURCE_ROWS` source rows, in runs of the columns holding them, each over
  its own source window, at full resolution, since the file's overviews spread the NaN already),
  so NaN counts as missing together with the tagged nodata or mask: an output pixel is valid when
  any of its source pixels is, with their mean. The other output pixels keep the first read's
  values (through the overviews, when the file has them). When no pixel at all is valid,
  `NoValidPixelsError` (code no_valid_pixels): a black image is nothing to ask about.
* **Georeferencing** (`georeferencing`): the geotransform and CRS; for a file placed only by
  ground control points, the affine transform fitted to them (with their CRS) when it misses no
  GCP by more than half a pixel and GDAL's GCP transformer (QGIS's warp of the file) keeps
  within half a pixel of it over the whole image, else `NeedsWarpError` (warp it first), as for
  RPCs alone.
* **No georeferencing**: ``crs_wkt=None`` and ``source_transform`` is the identity (map
  coordinates are source pixel coordinates).
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
from affine import Affine

PERCENTILES = (2.0, 98.0)
_STATS_SAMPLE = 4_000_000  # percentiles from at most about this many valid pixels per band
# a read through more source pixels than this (at full resolution) goes in row strips of about
# STRIP_PIXELS source pixels each, with a cancel check between them
STRIP_SOURCE_PIXELS = 1 << 24
STRIP_PIXELS = 1 << 22


class RasterError(ValueError):
    """A raster could not be used; the message says why and what to do.

    `code` is the protocol error code (engine/protocol.py ERROR_CODES) a server should answer with.
    """

    code = "raster_unreadable"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class RasterOpenError(RasterError):
    """The file is missing, unreadable, corrupt, truncated or not a raster."""

    code = "not_a_raster"


class BandError(RasterError):
    """The requested bands do not exist or cannot be shown as RGB."""

    code = "bad_request"


class AOIError(RasterError):
    """The area of interest is malformed (code bad_aoi) or misses the raster (AOIOutsideError)."""

    code = "bad_aoi"


class AOIOutsideError(AOIError):
    """The area of interest does not overlap the raster."""

    code = "aoi_outside_raster"


class NoValidPixelsError(RasterError):
    """Every pixel read is nodata, masked, non-finite or outside the AOI polygon."""

    code = "no_valid_pixels"


@dataclass
class RasterImage:
    pixels: np.ndarray  # (H, W, 3) uint8 RGB after band choice and stretch
    valid: np.ndarray  # (H, W) bool: False at nodata and outside an AOI polygon
    image_to_source: Affine  # image pixel (col, row) -> source pixel (col, row)
    source_transform: Affine  # source pixel -> map coordinates (identity when no georef)
    crs_wkt: str | None
    source_size: tuple[int, int]  # (width, height) of the whole source raster
    window: tuple[int, int, int, int]  # (col_off, row_off, width, height) read, source px
    bands: tuple[int, ...]  # 1-based source band per RGB channel, e.g. (1, 1, 1) for grey
    path: str
    georeferenced: bool = True  # False: source_transform is the identity (pixel coordinates)
    stretch: tuple[tuple[float, float], ...] | None = None  # per channel (low, high) or None
    palette: bool = False  # True: bands[0]'s colour table gave the RGB (bands is (b, b, b))

    @property
    def image_to_map(self) -> Affine:
        return self.source_transform @ self.image_to_source

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of `pixels`."""
        return int(self.pixels.shape[1]), int(self.pixels.shape[0])

    @property
    def decimation(self) -> tuple[float, float]:
        """Source pixels per image pixel on each axis (1.0 = full resolution)."""
        return float(self.image_to_source.a), float(self.image_to_source.e)

    @property
    def valid_fraction(self) -> float:
        return float(self.valid.mean()) if self.valid.size else 0.0


def read_size_for(window_wh, max_pixels: int | None) -> tuple[int, int]:
    """Output (width, height) for reading a window of `window_wh` within `max_pixels` pixels.

    The full size when it fits (or when `max_pixels` is None); else the largest aspect-preserving
    integer size whose area does not exceed `max_pixels` (at least 1 x 1).
    """
    w, h = int(window_wh[0]), int(window_wh[1])
    if max_pixels is None or w * h <= max_pixels:
        return w, h
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be at least 1, got {max_pixels}.")
    f = math.sqrt(max_pixels / float(w * h))
    ow, oh = max(1, int(w * f)), max(1, int(h * f))
    while ow * oh > max_pixels and (ow > 1 or oh > 1):  # float rounding guard
        if ow >= oh and ow > 1:
            ow -= 1
        else:
            oh -= 1
    return ow, oh


# ----------------------------------------------------------------------------------------- open


def _open(path: str):
    import rasterio
    from rasterio.errors import RasterioError

    p = os.fspath(path)
    is_local = "://" not in p and not p.startswith("/vsi")
    if is_local:
        if not os.path.exists(p):
            raise RasterOpenError(f"Raster file not found: '{p}'. Check the path and try again.")
        if os.path.isdir(p):
            raise RasterOpenError(f"'{p}' is a folder, not a raster file. Choose the raster file itself.")
        if not os.access(p, os.R_OK):
            raise RasterOpenError(
                f"Raster file '{p}' cannot be read (permission denied). Check its permissions.",
                code="raster_unreadable",
            )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return rasterio.open(p)
    except (RasterioError, OSError, ValueError) as exc:
        raise RasterOpenError(
            f"Could not open '{p}' as a raster: it is not a format GDAL can read, or the file is "
            f"corrupt or incomplete. Re-export it (e.g. as GeoTIFF) and try again. (GDAL: {_gdal_detail(exc)})"
        ) from exc


def _gdal_detail(exc: BaseException) -> str:
    """What GDAL said about a failure: rasterio often raises "Read failed. See previous exception
    for details." with GDAL's own message as the cause, which the user never sees otherwise."""
    cause = exc.__cause__
    if "previous exception" in str(exc) and cause is not None and str(cause):
        return str(cause)
    return str(exc)


# ------------------------------------------------------------------------------- georeferencing

# an affine fit to the GCPs is used when it misses none by more than this, and GDAL's GCP warp
# (what QGIS shows) strays no more than this from it anywhere in the image
GCP_TOLERANCE_PX = 0.5


class NeedsWarpError(RasterError):
    """The raster is placed on the map by ground control points or RPCs that no affine transform
    honours: only a warp puts its pixels where GIS software shows them."""

    code = "raster_unreadable"


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


# ---------------------------------------------------------------------------------------- bands


def _choose_bands(src, bands) -> tuple[tuple[int, int, int], bool]:
    """Return (bands per channel, use_palette)."""
    from rasterio.enums import ColorInterp

    n = src.count
    if bands is not None:
        if isinstance(bands, (int, np.integer)):
            bands = [bands]
        try:
            req = [int(b) for b in bands]
        except (TypeError, ValueError) as exc:
            raise BandError(f"Bands must be 1-based band numbers, got {bands!r}.") from exc
        bad = [b for b in req if b < 1 or b > n]
        if bad:
            raise BandError(
                f"Band {bad[0]} does not exist in '{src.name}': it has {n} band(s), numbered 1 to {n}."
            )
        problem = alpha_choice_problem(req, alpha_bands(src))
        if problem:
            raise BandError(f"In '{src.name}', {problem}.")
        if len(req) == 1:
            return (req[0],) * 3, False
        if len(req) == 3:
            return (req[0], req[1], req[2]), False
        raise BandError(
            f"Give one band (shown as grey) or three bands (red, green, blue); got {len(req)}: {req}."
        )
    if n < 1:
        raise BandError(f"'{src.name}' has no bands to read.")
    ci = list(src.colorinterp)
    alpha = alpha_bands(src)
    colour = [b for b in range(1, n + 1) if b not in alpha]
    if not colour:
        colour = [1]
    rgb = [ci.index(c) + 1 if c in ci else None for c in (ColorInterp.red, ColorInterp.green, ColorInterp.blue)]
    if all(rgb):
        return (rgb[0], rgb[1], rgb[2]), False
    if len(colour) >= 3:
        return (colour[0], colour[1], colour[2]), False
    first = colour[0]
    palette = ci[first - 1] == ColorInterp.palette and src.dtypes[first - 1] == "uint8"
    if palette:
        try:
            src.colormap(first)
        except Exception:  # no colour table after all
            palette = False
    return (first, first, first), palette


def alpha_bands(src) -> set[int]:
    """The 1-based numbers of the open dataset's bands tagged alpha (transparency, no colour)."""
    from rasterio.enums import ColorInterp

    return {i for i, c in enumerate(src.colorinterp, 1) if c == ColorInterp.alpha}


def alpha_choice_problem(bands, alpha) -> str | None:
    """Why a chosen band list cannot be shown: it names an alpha band (`alpha`, as `alpha_bands`
    gives them), a transparency mask and no imagery; None when it names none. One sentence
    without its end, naming the band(s), for `bands` of a request, ``--bands`` and a training
    record's ``bands``."""
    named = sorted({int(b) for b in bands} & {int(a) for a in alpha})
    if not named:
        return None
    which = (f"band {named[0]} is the raster's alpha band" if len(named) == 1 else
             f"bands {', '.join(map(str, named))} are the raster's alpha bands")
    return (f"{which} (transparency, a mask and not imagery), so it cannot be shown to the model; choose "
            "colour bands, or leave the bands out for the engine's choice (a band tagged alpha by mistake "
            "can be retagged with gdal_edit.py -colorinterp_N undefined)")


# ------------------------------------------------------------------------------------------ AOI


def _aoi_geometry(aoi):
    """shapely geometry from WKT, shapely or GeoJSON dict; None when `aoi` is a pixel window."""
    import shapely

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
            return _aoi_geometry(str(aoi["polygon_wkt"]))
        if aoi.get("geojson") is not None:
            return geojson_area(aoi["geojson"])
        if aoi.get("window") is not None:
            return None
        return geojson_area(aoi)
    return None


POLYGON_TYPES = ("Polygon", "MultiPolygon")


def check_polygon(geom, what: str = "The area of interest") -> None:
    """AOIError (bad_aoi) unless `geom` is a non-empty Polygon or MultiPolygon whose coordinates
    are all finite numbers; `what` names it in the message."""
    import shapely

    if geom.geom_type not in POLYGON_TYPES:
        raise AOIError(f"{what} must be a polygon (Polygon or MultiPolygon), not a "
                       f"{geom.geom_type}.")
    if geom.is_empty:
        raise AOIError(f"{what} is an empty polygon; draw an area.")
    if not np.isfinite(shapely.get_coordinates(geom)).all():
        raise AOIError(f"{what} has coordinates that are not finite numbers (NaN or infinity).")


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
    try:
        geom = shape(obj)
    except Exception as exc:  # noqa: BLE001 - shapely raises several kinds
        raise AOIError(f"{what} is not a valid GeoJSON geometry ({exc}).") from exc
    check_polygon(geom, what)
    return geom


def _pixel_window(aoi) -> tuple[float, float, float, float]:
    if isinstance(aoi, dict):
        aoi = aoi.get("window")
    try:
        vals = [float(v) for v in aoi]
    except (TypeError, ValueError) as exc:
        raise AOIError(
            "The area of interest must be a pixel window [col_off, row_off, width, height], a WKT "
            f"string, a shapely geometry or a GeoJSON dict; got {aoi!r}."
        ) from exc
    if len(vals) != 4:
        raise AOIError(f"A pixel window needs 4 numbers [col_off, row_off, width, height]; got {len(vals)}.")
    if vals[2] <= 0 or vals[3] <= 0:
        raise AOIError(f"A pixel window needs a positive width and height; got {vals[2]} x {vals[3]}.")
    return vals[0], vals[1], vals[2], vals[3]


def _clip_window(c0, r0, c1, r1, src, what: str) -> tuple[int, int, int, int]:
    W, H = src.width, src.height
    ic0, ir0 = max(0, int(math.floor(c0))), max(0, int(math.floor(r0)))
    ic1, ir1 = min(W, int(math.ceil(c1))), min(H, int(math.ceil(r1)))
    if ic1 <= ic0 or ir1 <= ir0:
        raise AOIOutsideError(
            f"The area of interest ({what}) lies wholly outside '{src.name}' "
            f"({W} x {H} pixels). Draw or enter an area that overlaps the raster."
        )
    return ic0, ir0, ic1 - ic0, ir1 - ir0


# ----------------------------------------------------------------------------------------- read


# GDAL's block cache while a raster is read: its default (5% of RAM) added a gigabyte and more to
# a reduced read of a 27,000 px raster, which reads every block once anyway. GDAL_CACHEMAX set by
# the user wins.
READ_CACHE_BYTES = 256 * 2**20


def _read_cache():
    """A rasterio.Env bounding GDAL's block cache for one read (none when GDAL_CACHEMAX is set)."""
    import rasterio

    if os.environ.get("GDAL_CACHEMAX"):
        return contextlib.nullcontext()
    return rasterio.Env(GDAL_CACHEMAX=READ_CACHE_BYTES)


def _stretch(band: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """Stretch one band to uint8 from its 2..98 percentiles over valid pixels.

    Statistics come from a regular subsample (every k-th row and column) when the band has more
    than about 4 million pixels; the mapping is applied in row blocks to bound memory.
    """
    sample_b, sample_v = band, valid
    if band.size > _STATS_SAMPLE:
        k = int(math.ceil(math.sqrt(band.size / _STATS_SAMPLE)))
        sample_b, sample_v = band[::k, ::k], valid[::k, ::k]
    vals = sample_b[sample_v]
    if vals.size == 0:
        return np.zeros(band.shape, np.uint8), (0.0, 0.0)
    lo, hi = (float(v) for v in np.percentile(vals.astype(np.float64), PERCENTILES))
    out = np.empty(band.shape, np.uint8)
    step = max(1, (1 << 22) // max(1, band.shape[1]))
    for r in range(0, band.shape[0], step):
        blk = band[r:r + step].astype(np.float64)
        if hi > lo:
            blk = (blk - lo) * (255.0 / (hi - lo))
        # a constant band (hi == lo) keeps its value, clipped to 0..255: no division by zero
        blk = np.nan_to_num(blk, nan=0.0, posinf=255.0, neginf=0.0)
        out[r:r + step] = np.rint(np.clip(blk, 0, 255))
    return out, (lo, hi)


def _numpy_dtype(name: str) -> np.dtype:
    """numpy dtype of a rasterio band type name; GDAL's CInt16 ('complex_int16') has no numpy
    twin and is read as complex64, as rasterio itself does."""
    return np.dtype(np.complex64) if name == "complex_int16" else np.dtype(name)


def _read_bands(src, band_numbers, window, shape, resampling) -> np.ndarray:
    """Bands `band_numbers` (1-based) of `window`, read at `shape` (rows, cols), as one array.

    rasterio reads several bands in one call only when they share a type; bands of different
    types ("more than one 'dtype' found", e.g. a VRT stacking Byte, UInt16 and Float32 files)
    are read one by one into their common type, which loses nothing; the stretch then treats
    each band by its own type (a Byte band is kept as it is).
    """
    types = {src.dtypes[b - 1] for b in band_numbers}
    if len(types) == 1:
        return src.read(band_numbers, window=window, out_shape=(len(band_numbers), *shape),
                        resampling=resampling)
    common = np.result_type(*(_numpy_dtype(t) for t in types))
    data = np.empty((len(band_numbers), *shape), dtype=common)
    for i, b in enumerate(band_numbers):
        data[i] = src.read(b, window=window, out_shape=shape, resampling=resampling)
    return data


def _check_cancel(cancel) -> None:
    if cancel is not None and cancel.is_set():
        from engine.errors import Cancelled

        raise Cancelled("the question was cancelled while the raster was being read")


def _row_strips(src, band_numbers, window_wh, shape) -> list[tuple[int, int]]:
    """Output row ranges [a, b) to read `window_wh` (source px) at `shape` (rows, cols) in.

    One range (a single GDAL call) unless the read goes through more than STRIP_SOURCE_PIXELS
    source pixels: a full-resolution read, or a decimated one of bands without overviews (with
    overviews GDAL reads the smaller overview, and strips would shift its resampling)."""
    ww, wh = window_wh
    oh, ow = shape
    decimated = (ow, oh) != (ww, wh)
    if ww * wh <= STRIP_SOURCE_PIXELS or oh < 2:
        return [(0, oh)]
    if decimated and any(src.overviews(b) for b in band_numbers):
        return [(0, oh)]
    block_rows = src.block_shapes[band_numbers[0] - 1][0] if src.block_shapes else 1
    source_rows = max(int(block_rows), STRIP_PIXELS // max(ww, 1), 1)
    step = max(1, source_rows * oh // wh)
    return [(a, min(a + step, oh)) for a in range(0, oh, step)]


def _source_window(window, shape, a: int, b: int, c: int, d: int):
    """The source window read into output rows [a, b) x columns [c, d) of a read of `window` at
    `shape` (rows, cols); a rectangle at the last row or column ends exactly where `window` does,
    and one spanning all rows or columns takes `window`'s own offset and size there."""
    from rasterio.windows import Window

    def span(off, size, n, lo, hi):  # source offset and size of output cells [lo, hi) of n
        step = size / n
        start = off + lo * step
        if hi < n:
            return start, (hi - lo) * step
        return start, (size if lo == 0 else off + size - start)

    oh, ow = shape
    top, height = span(window.row_off, window.height, oh, a, b)
    left, width = span(window.col_off, window.width, ow, c, d)
    return Window(left, top, width, height)


def _read_window(src, band_numbers, window, shape, resampling, cancel=None):
    """(data, masks) of `band_numbers` over `window` read at `shape` (rows, cols); in row strips
    with a cancel check between them when the read is large (`_row_strips`)."""
    oh, ow = shape
    n = len(band_numbers)
    strips = _row_strips(src, band_numbers, (int(window.width), int(window.height)), shape)
    if len(strips) == 1:
        data = _read_bands(src, band_numbers, window, shape, resampling)
        # the mask is reduced as the data is: GDAL's average skips nodata pixels, so an output
        # pixel with any valid source pixel has a value (nearest on the mask would drop it
        # whenever the sampled pixel is nodata: striped nodata lost whole areas)
        masks = src.read_masks(band_numbers, window=window, out_shape=(n, oh, ow),
                               resampling=resampling)
        return data, masks
    data = masks = None
    for a, b in strips:
        _check_cancel(cancel)
        strip = _source_window(window, shape, a, b, 0, ow)
        d = _read_bands(src, band_numbers, strip, (b - a, ow), resampling)
        if data is None:
            data = np.empty((n, oh, ow), dtype=d.dtype)
        data[:, a:b] = d
        m = src.read_masks(band_numbers, window=strip, out_shape=(n, b - a, ow),
                           resampling=resampling)
        if masks is None:
            masks = np.empty((n, oh, ow), dtype=m.dtype)
        masks[:, a:b] = m
    return data, masks


_GDAL_FLOAT_TYPES = {"float32": "Float32", "float64": "Float64"}
# spread NaN are read again in blocks of output rows going through about this many source rows,
# each block as runs of output columns that hold them (runs closer than MEND_GAP columns are one)
MEND_SOURCE_ROWS = 256
MEND_GAP = 16


def _nan_spread(src, band: int, data: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
    """Where a reduced read of float band `band` holds NaN while its mask says there is data
    (GDAL spread NaN there), as an (H, W) bool array; None when nowhere. (A band tagged
    nodata=NaN is NaN only where the mask is 0 too.)"""
    if src.dtypes[band - 1] not in _GDAL_FLOAT_TYPES:
        return None
    spread = np.isnan(data)
    if mask is not None:
        spread &= mask > 0
    return spread if spread.any() else None


def _spread_runs(spread: np.ndarray, block_rows: int, gap: int = MEND_GAP):
    """Output rectangles (a, b, c, d) = rows [a, b) x columns [c, d) that together cover every
    True of `spread`: per block of `block_rows` rows, the runs of columns holding one (trimmed to
    the rows that do); runs less than `gap` columns apart are joined. A NaN collar gives two short
    runs a block (its left and right edges), so little more than the collar is read again."""
    oh = spread.shape[0]
    runs = []
    for top in range(0, oh, max(1, block_rows)):
        block = spread[top:top + max(1, block_rows)]
        cols = np.flatnonzero(block.any(axis=0))
        if not cols.size:
            continue
        cut = np.flatnonzero(np.diff(cols) > gap)
        for c, d in zip(np.r_[cols[0], cols[cut + 1]], np.r_[cols[cut], cols[-1]] + 1):
            rows = np.flatnonzero(block[:, c:d].any(axis=1))
            runs.append((top + int(rows[0]), top + int(rows[-1]) + 1, int(c), int(d)))
    return runs


@contextlib.contextmanager
def _nan_nodata_vrt(src, path: str, band_numbers):
    """An in-memory VRT (the open dataset) of bands `band_numbers` (1-based; numbered 1, 2, ...
    in it) that gives them NaN as nodata, so GDAL's average skips NaN instead of spreading it.
    A band with a nodata tag or mask is read through its mask (UseMaskBand): what the mask hides
    becomes NaN too, so both stay missing. The file's overviews are bypassed: built without NaN
    as nodata, their averages spread the NaN already (an overview pixel is NaN when one of its
    source pixels is)."""
    from xml.sax.saxutils import escape

    from rasterio.enums import MaskFlags
    from rasterio.io import MemoryFile

    name = os.path.abspath(path) if "://" not in path and not path.startswith("/vsi") else path
    sources = []
    for i, b in enumerate(band_numbers, start=1):
        masked = list(src.mask_flag_enums[b - 1]) != [MaskFlags.all_valid]
        kind = "ComplexSource" if masked else "SimpleSource"
        sources.append(
            f'<VRTRasterBand dataType="{_GDAL_FLOAT_TYPES[src.dtypes[b - 1]]}" band="{i}">'
            f"<NoDataValue>nan</NoDataValue><{kind}>"
            f'<SourceFilename relativeToVRT="0">{escape(name)}</SourceFilename>'
            '<OpenOptions><OOI key="OVERVIEW_LEVEL">NONE</OOI></OpenOptions>'
            f"<SourceBand>{b}</SourceBand>"
            + ("<UseMaskBand>true</UseMaskBand>" if masked else "")
            + f"</{kind}></VRTRasterBand>")
    xml = (f'<VRTDataset rasterXSize="{src.width}" rasterYSize="{src.height}">'
           f'{"".join(sources)}</VRTDataset>')
    with MemoryFile(xml.encode("utf-8"), ext=".vrt") as mem, mem.open() as vrt:
        yield vrt


def _mend_spread_nan(src, path, band_numbers, data, masks, window, shape, resampling,
                     cancel) -> None:
    """In place: the pixels of a reduced read's float bands that hold NaN GDAL spread
    (`_nan_spread`), read again with NaN skipped as missing (see the module docstring). Only
    those pixels are read again, at full resolution: the output rectangles of `_spread_runs`,
    each read through the VRT over its own source window (with a cancel check between them),
    so a NaN collar costs about the collar, not the whole window; everywhere else the first
    read stands. A read without such NaN costs nothing more; a re-read GDAL refuses leaves the
    pixels not mended yet as they were (logged)."""
    from rasterio.errors import RasterioError

    spread = {i: _nan_spread(src, b, data[i], None if masks is None else masks[i])
              for i, b in enumerate(band_numbers)}
    rows = [i for i in spread if spread[i] is not None]
    if not rows:
        return
    sy = window.height / shape[0]  # source rows per output row
    runs = _spread_runs(np.logical_or.reduce([spread[i] for i in rows]),
                        max(1, int(round(MEND_SOURCE_ROWS / sy))))
    try:
        with _nan_nodata_vrt(src, path, [band_numbers[i] for i in rows]) as vrt:
            for a, b, c, d in runs:
                _check_cancel(cancel)
                again = _read_bands(vrt, list(range(1, len(rows) + 1)),
                                    _source_window(window, shape, a, b, c, d), (b - a, d - c),
                                    resampling)
                for k, i in enumerate(rows):
                    here = spread[i][a:b, c:d]
                    data[i, a:b, c:d][here] = again[k][here]
    except (RasterioError, OSError, ValueError) as exc:
        import logging

        logging.getLogger(__name__).warning(
            "could not read %s again with NaN as nodata (%s); NaN gaps stay wider in this "
            "reduced read", path, exc)


def read_raster(path, *, aoi=None, bands=None, max_pixels=None, cancel=None) -> RasterImage:
    """Read `path` (any GDAL raster) into a `RasterImage`; see the module docstring for the rules.

    `max_pixels`: None (full resolution), an int, or a callable ``(window_w, window_h) -> int``
    evaluated once the AOI window is known (see `read_for_tiling`). `cancel`: a threading.Event;
    once set, the read stops with `engine.errors.Cancelled` (checked between row strips).
    """
    from rasterio.enums import Resampling
    from rasterio.errors import RasterioError
    from rasterio.features import geometry_mask
    from rasterio.windows import Window

    p = os.fspath(path)
    src = _open(p)
    try:
        transform, crs_wkt, georef = georeferencing(src)
        chosen, palette = _choose_bands(src, bands)

        poly = None
        if aoi is None:
            win = (0, 0, src.width, src.height)
        else:
            poly = _aoi_geometry(aoi)
            if poly is not None:
                if poly.is_empty:
                    raise AOIError("The area of interest polygon is empty.")
                if poly.geom_type not in ("Polygon", "MultiPolygon", "GeometryCollection"):
                    raise AOIError(f"The area of interest must be a polygon, got a {poly.geom_type}.")
                if not poly.is_valid:  # e.g. a self-intersecting ring drawn by hand
                    import shapely

                    poly = shapely.make_valid(poly)
                from shapely import affinity

                inv = ~transform
                pix = affinity.affine_transform(poly, [inv.a, inv.b, inv.d, inv.e, inv.xoff, inv.yoff])
                c0, r0, c1, r1 = pix.bounds
                where = "polygon, in the raster's CRS" if georef else "polygon, in pixel coordinates"
                win = _clip_window(c0, r0, c1, r1, src, where)
            else:
                c, r, w, h = _pixel_window(aoi)
                win = _clip_window(c, r, c + w, r + h, src, f"pixel window {[c, r, w, h]}")

        col_off, row_off, ww, wh = win
        budget = max_pixels(ww, wh) if callable(max_pixels) else max_pixels
        ow, oh = read_size_for((ww, wh), budget)
        resampling = Resampling.nearest if (palette or (ow, oh) == (ww, wh)) else Resampling.average
        window = Window(col_off, row_off, ww, wh)
        uniq = sorted(set(chosen))
        _check_cancel(cancel)
        try:
            with warnings.catch_warnings(), _read_cache():
                warnings.simplefilter("ignore")
                data, masks = _read_window(src, uniq, window, (oh, ow), resampling, cancel)
                if resampling != Resampling.nearest:
                    _mend_spread_nan(src, p, uniq, data, masks, window, (oh, ow), resampling,
                                     cancel)
        except (RasterioError, OSError) as exc:  # GDAL failed on the file's bytes
            raise RasterOpenError(
                f"Could not read pixels from '{p}': the file looks corrupt or truncated. "
                f"Re-export it and try again. (GDAL: {_gdal_detail(exc)})",
                code="raster_unreadable",
            ) from exc
        except ValueError as exc:  # rasterio refused the read itself: nothing says the file is bad
            raise RasterOpenError(
                f"Could not read pixels from '{p}' as {len(uniq)} band(s) of types "
                f"{', '.join(src.dtypes[b - 1] for b in uniq)}: {exc}. Choose other bands, or "
                "convert the raster (e.g. gdal_translate -ot Float32) and try again.",
                code="raster_unreadable",
            ) from exc

        if np.iscomplexobj(data):  # complex (e.g. SAR SLC): show the amplitude
            data = np.abs(data)
        valid = np.all(masks > 0, axis=0)
        if np.issubdtype(data.dtype, np.floating):
            valid &= np.all(np.isfinite(data), axis=0)

        image_to_source = Affine.translation(col_off, row_off) @ Affine.scale(ww / ow, wh / oh)
        if poly is not None:
            to_coords = transform @ image_to_source
            inside = geometry_mask([poly], out_shape=(oh, ow), transform=to_coords, invert=True,
                                   all_touched=False)
            if not inside.any():
                raise AOIError(
                    "The area of interest polygon is smaller than one pixel of the image read; "
                    "draw a larger area."
                )
            valid &= inside
        if not valid.any():
            where = f"the area of interest in '{p}'" if aoi is not None else f"'{p}'"
            band_valid = masks > 0
            if np.issubdtype(data.dtype, np.floating):
                band_valid &= np.isfinite(data)
            if poly is not None:
                band_valid &= inside
            empty = [b for i, b in enumerate(uniq) if not band_valid[i].any()]
            if empty and len(empty) < len(uniq):  # some chosen band has data, the combination none
                named = ", ".join(str(b) for b in empty)
                raise NoValidPixelsError(
                    f"Band{'s' if len(empty) > 1 else ''} {named} of {where} hold{'' if len(empty) > 1 else 's'} "
                    "no data (nodata, masked or not a number everywhere), so no pixel has all the bands "
                    "chosen. Choose other bands (the layer's bands in QGIS, or --bands)."
                )
            raise NoValidPixelsError(
                f"Every pixel of {where} is nodata (or masked): there is no image to ask about. "
                "Choose an area with data, or check the layer's nodata value."
            )

        pixels = np.zeros((oh, ow, 3), dtype=np.uint8)
        stretch = None
        if palette:
            cmap = src.colormap(chosen[0])
            lut = np.zeros((256, 3), np.uint8)
            for k, rgba in cmap.items():
                if 0 <= k < 256:
                    lut[k] = rgba[:3]
            pixels[:] = lut[data[0]]
        elif data.dtype == np.uint8:
            for ch, b in enumerate(chosen):
                pixels[..., ch] = data[uniq.index(b)]
        else:
            per_band = {}
            for i, b in enumerate(uniq):
                if src.dtypes[b - 1] == "uint8":  # a Byte band among wider ones: as it is
                    per_band[b] = (np.clip(data[i], 0, 255).astype(np.uint8), (0.0, 255.0))
                else:
                    per_band[b] = _stretch(data[i], valid)
            for ch, b in enumerate(chosen):
                pixels[..., ch] = per_band[b][0]
            stretch = tuple(per_band[b][1] for b in chosen)
        pixels[~valid] = 0

        return RasterImage(
            pixels=pixels,
            valid=valid,
            image_to_source=image_to_source,
            source_transform=transform,
            crs_wkt=crs_wkt,
            source_size=(int(src.width), int(src.height)),
            window=(int(col_off), int(row_off), int(ww), int(wh)),
            bands=tuple(int(b) for b in chosen),
            path=p,
            georeferenced=georef,
            stretch=stretch,
            palette=bool(palette),
        )
    finally:
        src.close()


def read_for_tiling(path, *, aoi=None, bands=None, pinpoints=None, cancel=None) -> RasterImage:
    """`read_raster` with the pixel budget of the canvas tiling will choose for the AOI window.

    A window smaller than its canvas is read at full resolution; a 27,000 px raster is read
    decimated (through its overviews) to about the 8064 x 8064 canvas.
    """
    from .tiling import tiling_read_budget

    return read_raster(path, aoi=aoi, bands=bands, cancel=cancel,
                       max_pixels=lambda w, h: tiling_read_budget((w, h), pinpoints))
