"""Read any GDAL raster (GeoTIFF, COG, VRT, ...) with rasterio into an 8-bit RGB `RasterImage`.

What `read_raster` does, in order. This module holds `RasterImage`, `read_raster` (the steps
below, in turn) and `read_size_for`; each step's own module is named at its step:

* **Open** the file (engine/raster_open.py); a missing, unreadable, corrupt or non-raster file
  raises `RasterOpenError` (a `RasterError`, itself a `ValueError`) with a sentence for a person,
  never a bare GDAL error. Every `RasterError` (engine/raster_errors.py) carries `.code`, the
  protocol error code (not_a_raster, raster_unreadable, bad_aoi, aoi_outside_raster,
  no_valid_pixels, bad_request).
* **Window** (AOI, engine/area_of_interest.py; the protocol's dicts ``{"window": [...]}``,
  ``{"polygon_wkt": str}`` and ``{"geojson": dict}`` are accepted as well as the bare forms below):
  none = the whole raster; a pixel window ``[col_off, row_off, width, height]`` (clipped to the
  raster; wholly outside -> `AOIError`); or a polygon (WKT string, shapely geometry, or GeoJSON
  Polygon/MultiPolygon geometry, Feature or FeatureCollection dict, read by `geojson_area`, which
  the server's request checks share) in the raster's CRS (a GeoJSON whose legacy ``"crs"`` member
  names another CRS is reprojected into it, engine/aoi_crs.py), read over its bounding window with the
  pixels outside the polygon marked invalid (a self-intersecting ring made valid, only its
  polygons kept; one that encloses no area, its points on one line, -> `AOIError`). On a
  raster without georeferencing the polygon's coordinates are taken as source *pixel*
  coordinates (col, row).
* **Decimation**: when the window holds more than `max_pixels` pixels it is read at a reduced size
  (`read_size_for`) with GDAL's resampled read (engine/raster_read.py: average; nearest for palette
  rasters), which uses the file's overviews when present, so a 27,000 px raster is not loaded at
  full size. `image_to_source` records the exact offset + scale. Full resolution is still read
  where the file has no overviews (GDAL averages every source pixel, in strips: see Cancellation),
  and over the output pixels of a float band that hold NaN GDAL's average spread (see Validity):
  only those, so a NaN collar around a scene costs about the collar, while NaN scan-line gaps over
  the whole image cost a full-resolution read of the window.
* **Cancellation**: `cancel` (the question's threading.Event) is checked before the pixels are read
  and between row strips (engine/raster_read.py): a read that goes through more than
  `STRIP_SOURCE_PIXELS` source pixels at full resolution (a large window, or a decimated one
  without overviews) is done in strips of output rows, so a cancelled question stops within one
  strip (`Cancelled`). Smaller reads, and reads served by overviews, stay one GDAL call. (GDAL's
  average of a strip can differ from the whole read's by one grey level at a few pixels of the
  strip borders.)
* **Bands** (engine/band_choice.py): default RGB by colour interpretation when red, green and blue
  are all tagged, else the first three non-alpha bands; one band (or a grey + alpha pair) -> grey
  replicated to three channels; two non-alpha bands -> the first as grey; a single paletted band ->
  its colour table. An explicit ``bands=[...]`` (1-based, one or three entries) overrides that (one
  band is shown as grey, also a paletted one); one naming an alpha band is refused (`BandError`,
  naming it). `RasterImage.bands` records the source band of each RGB channel the model sees
  (``(4, 3, 2)``; ``(1, 1, 1)`` for grey) and `RasterImage.palette` whether the colour table of
  that one band was used instead; the engine's ``result`` event reports both.
* **Stretch** (engine/raster_read.py `stretch_band`): decided per band by the band's own type: a
  Byte (uint8) band is kept as is; any other type (uint16, int, float) is stretched per band from
  its 2nd..98th percentile over valid pixels only to 0..255. Bands of different types (e.g. a VRT
  stacking Byte and UInt16 files, or such bands chosen with ``bands``) are read as their common
  type, and a Byte band among them still keeps its 0..255 values, as it does read alone (its
  `stretch` entry is (0, 255)). A constant band keeps its value clipped to 0..255 (no division by
  zero).
* **Validity**: nodata values, internal/external masks and an alpha band (all through GDAL's
  per-band masks), NaN/inf in float data, and the outside of a polygon AOI give ``valid=False``;
  those pixels are set to 0 in ``pixels``. In a reduced read, GDAL's average skips nodata but
  spreads NaN: one NaN source pixel made its whole output pixel NaN, so a float band with NaN
  gaps lost most of the image where its NaN are scattered or striped, whether it had no nodata
  tag, another nodata value (e.g. -9999) or a mask. The output pixels that hold such NaN (NaN
  where the mask has data) are read again, and only they, through a VRT with NaN as its nodata
  that also turns the pixels its nodata tag or mask hides into NaN (engine/raster_read.py
  `mend_spread_nan`: row blocks of about `MEND_SOURCE_ROWS` source rows, in runs of the columns
  holding them, each over its own source window, at full resolution, since the file's overviews
  spread the NaN already), so NaN counts as missing together with the tagged nodata or mask: an
  output pixel is valid when any of its source pixels is, with their mean. The other output
  pixels keep the first read's values (through the overviews, when the file has them). When no
  pixel at all is valid, `NoValidPixelsError` (code no_valid_pixels): a black image is nothing
  to ask about.
* **Georeferencing** (engine/georeferencing.py `georeferencing`): the geotransform and CRS; for
  a file placed only by ground control points, the affine transform fitted to them (with their
  CRS) when it misses no GCP by more than half a pixel and GDAL's GCP transformer (QGIS's warp of
  the file) keeps within half a pixel of it over the whole image, else `NeedsWarpError` (warp it
  first), as for RPCs alone. A geotransform that places no pixel on the map (NaN in it, or a
  pixel of no area) raises `RasterOpenError` (code raster_unreadable).
* **No georeferencing**: ``crs_wkt=None`` and ``source_transform`` is the identity (map
  coordinates are source pixel coordinates).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
from affine import Affine

from .area_of_interest import aoi_geometry, clip_window, pixel_window, polygonal_area
from .band_choice import choose_bands
from .georeferencing import georeferencing
from .raster_open import gdal_detail, open_raster
# The RasterError family is public API (callers outside this repo catch it from engine.raster),
# so it is re-exported here; its home is engine/raster_errors.py.
from .raster_errors import (AOIError, AOIOutsideError, BandError, NeedsWarpError, NoValidPixelsError,
                            RasterError, RasterOpenError)
from .raster_read import check_cancel, mend_spread_nan, read_cache, read_window, stretch_band

__all__ = ["AOIError", "AOIOutsideError", "BandError", "NeedsWarpError", "NoValidPixelsError",
           "RasterError", "RasterImage", "RasterOpenError", "read_for_tiling", "read_raster",
           "read_size_for"]


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
    src = open_raster(p)
    try:
        transform, crs_wkt, georef = georeferencing(src)
        chosen, palette = choose_bands(src, bands)

        poly = None
        if aoi is None:
            win = (0, 0, src.width, src.height)
        else:
            poly = aoi_geometry(aoi, crs_wkt)  # a GeoJSON naming another CRS: reprojected
            if poly is not None:
                if poly.is_empty:
                    raise AOIError("The area of interest polygon is empty.")
                if poly.geom_type not in ("Polygon", "MultiPolygon", "GeometryCollection"):
                    raise AOIError(f"The area of interest must be a polygon, got a {poly.geom_type}.")
                # a self-intersecting ring drawn by hand made valid; what encloses no pixel
                # (a ring whose points lie on one line, a collection's lines) refused or dropped
                poly = polygonal_area(poly)
                from shapely import affinity

                inv = ~transform
                pix = affinity.affine_transform(poly, [inv.a, inv.b, inv.d, inv.e, inv.xoff, inv.yoff])
                c0, r0, c1, r1 = pix.bounds
                where = "polygon, in the raster's CRS" if georef else "polygon, in pixel coordinates"
                win = clip_window(c0, r0, c1, r1, src, where)
            else:
                c, r, w, h = pixel_window(aoi)
                win = clip_window(c, r, c + w, r + h, src, f"pixel window {[c, r, w, h]}")

        col_off, row_off, ww, wh = win
        budget = max_pixels(ww, wh) if callable(max_pixels) else max_pixels
        ow, oh = read_size_for((ww, wh), budget)
        resampling = Resampling.nearest if (palette or (ow, oh) == (ww, wh)) else Resampling.average
        window = Window(col_off, row_off, ww, wh)
        uniq = sorted(set(chosen))
        check_cancel(cancel)
        try:
            with warnings.catch_warnings(), read_cache():
                warnings.simplefilter("ignore")
                data, masks = read_window(src, uniq, window, (oh, ow), resampling, cancel)
                if resampling != Resampling.nearest:
                    mend_spread_nan(src, p, uniq, data, masks, window, (oh, ow), resampling,
                                    cancel)
        except (RasterioError, OSError) as exc:  # GDAL failed on the file's bytes
            raise RasterOpenError(
                f"Could not read pixels from '{p}': the file looks corrupt or truncated. "
                f"Re-export it and try again. (GDAL: {gdal_detail(exc)})",
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
                    per_band[b] = stretch_band(data[i], valid)
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
