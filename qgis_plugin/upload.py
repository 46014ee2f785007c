"""What is uploaded to an engine on another computer: one self-contained GeoTIFF, cut to the area
of interest.

The engine accepts only GeoTIFF uploads (engine/uploads.py), and an upload is a single file:
a GeoTIFF placed by a world file (.tfw), or whose nodata lives in an .aux.xml or whose mask is
an .msk, would lose those on the way. So any file that is not a GeoTIFF, or that GDAL reads
together with other files, is first written to a temporary GeoTIFF with ``gdal.Translate``, and
that copy is uploaded and deleted afterwards.

When the question is about a part of the raster (a pixel window or a polygon), only the AOI's
bounding window is written and sent (a 1000 x 1000 px window of a 300 MB 27K raster is a few MB):
every band, the nodata value, the mask and the georeferencing go with it, at full resolution,
unless the window holds more pixels than the engine reads of any window (its ``max_read_pixels``
in ``/health``: about 65 M pixels, 8064 x 8064): then it is written reduced to that
(:func:`reduced_size`), the whole raster too, so a 27K GeoTIFF goes as ~195 MB, not 2.19 GB
(an engine that does not say its budget gets full resolution). The request's AOI is rewritten for the cut: a pixel
window becomes relative to the cut; a polygon in the raster's CRS stays as it is (the cut is
placed where its pixels were); on a raster with no georeferencing, whose polygons are in source
pixels, the polygon is moved by the cut's offset, and so are the engine's results, which are then
in the cut's pixels (:attr:`Upload.pixel_offset`; :func:`tasks.place_result_files` moves them
back). The whole raster asked about is never cut. A self-contained GeoTIFF is sent as it is,
without writing anything, when its cut is not worth it: the window holds more than
:data:`CUT_MAX_SHARE` of its pixels, or the file is compressed with loss (JPEG, WebP) and the
window's pixels, uncompressed, are no fewer bytes than the file (the lossless cut could be larger);
a cut that still comes out no smaller than the file is not sent either. The cut is written only
when the temporary folder has room for it (:func:`check_free_space`); otherwise such a GeoTIFF
goes as it is, and a file that must be converted is refused with a sentence naming the folder
and both sizes. The engine's upload limit bounds the writing: a file that cannot come under it
is refused before it is written (:data:`DEFLATE_MAX_RATIO`), and one that grows past it is stopped
and deleted (:func:`translate_to_geotiff`); but the cut of a GeoTIFF that itself fits the limit
is never refused: the file goes as it is. The same AOI gives the same bytes (no time stamps, no threads), so the engine's feature cache, keyed on
the upload's content hash, hits again for a second question.

Runs in worker threads (AskStream.events, BatchTask, a Processing algorithm): writing a large
file must never block the user interface.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass

from .georef import georeferencing, needs_warp, open_with_gdal

# Tiled + deflate: a translated VRT or PNG is not bigger than needed on the wire; BIGTIFF only
# where the output would need it.
CREATION_OPTIONS = ["TILED=YES", "COMPRESS=DEFLATE", "BIGTIFF=IF_SAFER"]
AOI_KEYS = ("window", "polygon_wkt", "geojson")  # engine/protocol.py AOI_FIELDS
# A GeoTIFF that needs no conversion is cut only when the window holds at most this share of its
# pixels: a bigger cut saves little of the upload and costs a full-resolution write.
CUT_MAX_SHARE = 0.6
# GeoTIFF compressions that keep every pixel: a DEFLATE cut of such a file takes about its share
# of the file. Any other (JPEG, WEBP, JXL, LERC) may make the lossless cut larger than the file.
LOSSLESS_COMPRESSIONS = ("NONE", "DEFLATE", "LZW", "PACKBITS", "ZSTD", "LZMA")
# room left in the temporary folder beyond the file written (other programs need some too)
FREE_SPACE_RESERVE = 32 * 1024 * 1024
# what one strip of pixels written for an upload may take, uncompressed (translate_to_geotiff)
STRIP_BYTES = 16 * 1024 * 1024
# DEFLATE cannot make data smaller than about 1/1032 of it (a 258-byte match, its longest, takes
# at least 2 bits: 258 * 8 / 2 = 1032), and a TIFF only adds to it: a conversion whose pixels,
# uncompressed, take more than this many times the engine's upload limit cannot come under it,
# and is refused before anything is written. Any other is written, and stopped as soon as the
# file exceeds the limit (translate_to_geotiff).
DEFLATE_MAX_RATIO = 1032


@dataclass
class Upload:
    """The file sent for one raster and area of interest, and how it relates to the raster."""

    path: str  # the file to send: the raster itself, or a temporary GeoTIFF
    aoi: dict | None  # the request's area of interest, for that file
    window: tuple | None = None  # (col_off, row_off, width, height) of the raster it holds; None: all
    pixel_offset: tuple = (0, 0)  # added to the engine's result coordinates (a cut without georeferencing)
    temp_dir: str | None = None
    # reduced to the engine's read budget: (width, height) sent, of (width, height) of the window
    size: tuple | None = None
    source_size: tuple | None = None
    # source pixels per pixel sent, by which the engine's result coordinates are multiplied before
    # pixel_offset is added (a reduced raster without georeferencing; (1, 1) otherwise)
    pixel_scale: tuple = (1.0, 1.0)

    def cleanup(self) -> None:
        """Delete the temporary GeoTIFF (nothing when the raster itself is sent)."""
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None


def _same_file(a: str, b: str) -> bool:
    return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def _needs_translation(ds, path: str) -> bool:
    files = ds.GetFileList() or [path]
    others = [f for f in files if not _same_file(f, path)]
    return ds.GetDriver().ShortName != "GTiff" or bool(others)


def needs_translation(path: str) -> bool:
    """True when ``path`` is not a GeoTIFF that holds everything GDAL reads for it.

    A file GDAL cannot open is sent as it is: the engine then answers with its own clear error
    (not_a_raster / raster_unreadable) rather than the plugin guessing."""
    ds = open_with_gdal(path)
    return ds is not None and _needs_translation(ds, path)


# --- the area of interest in the raster's pixels ------------------------------------------------


def _geojson_positions(coords):
    """Every position of nested GeoJSON coordinate lists."""
    if coords and isinstance(coords[0], (int, float)):
        yield coords
        return
    for c in coords:
        yield from _geojson_positions(c)


def _moved_positions(coords, dx: float, dy: float, sx: float = 1.0, sy: float = 1.0):
    if coords and isinstance(coords[0], (int, float)):
        if (sx, sy) == (1.0, 1.0):
            return [coords[0] + dx, coords[1] + dy, *coords[2:]]
        return [(coords[0] + dx) / sx, (coords[1] + dy) / sy, *coords[2:]]
    return [_moved_positions(c, dx, dy, sx, sy) for c in coords]


def _ogr_leaves(geom):
    """The parts of an OGR geometry that hold points (rings, for polygons)."""
    n = geom.GetGeometryCount()
    if n == 0:
        yield geom
        return
    for i in range(n):
        yield from _ogr_leaves(geom.GetGeometryRef(i))


def _polygon(aoi: dict):
    """The AOI's polygon as an OGR geometry, or None when it is not one the engine takes (the
    engine then says what is wrong with it, about the whole raster)."""
    from osgeo import ogr

    polygon_types = (ogr.wkbPolygon, ogr.wkbMultiPolygon)
    try:
        if isinstance(aoi.get("polygon_wkt"), str):
            geom = ogr.CreateGeometryFromWkt(aoi["polygon_wkt"])
        elif isinstance(aoi.get("geojson"), dict):
            parts = _geojson_geometries(aoi["geojson"])
            if not parts:
                return None
            geom = ogr.Geometry(ogr.wkbMultiPolygon)
            for part in parts:
                one = ogr.CreateGeometryFromJson(json.dumps(part, allow_nan=False))
                if one is None or one.IsEmpty() or ogr.GT_Flatten(one.GetGeometryType()) not in polygon_types:
                    return None
                for poly in ([one] if ogr.GT_Flatten(one.GetGeometryType()) == ogr.wkbPolygon
                             else [one.GetGeometryRef(i) for i in range(one.GetGeometryCount())]):
                    geom.AddGeometry(poly)
        else:
            return None
    except (RuntimeError, ValueError, TypeError):  # RuntimeError: GDAL with exceptions on
        return None
    if geom is None or geom.IsEmpty():
        return None
    if ogr.GT_Flatten(geom.GetGeometryType()) not in polygon_types:
        return None
    return geom


def _geojson_geometries(obj: dict) -> list:
    """The geometries of a ``geojson`` AOI, as the engine reads it (engine/area_of_interest.py
    geojson_area): a geometry; a Feature's geometry; a FeatureCollection's features' geometries
    (features without one skipped). Empty when it is none of these (the engine says why)."""
    kind = obj.get("type")
    if kind == "Feature":
        geometries = [obj.get("geometry")]
    elif kind == "FeatureCollection":
        features = obj.get("features")
        geometries = ([f.get("geometry") for f in features]
                      if isinstance(features, list) and all(isinstance(f, dict) for f in features) else [])
    else:
        geometries = [obj]
    return [g for g in geometries if isinstance(g, dict)]


def _to_pixels(ds):
    """The geotransform from the coordinates of an AOI polygon to ``ds``'s pixels (col, row), as
    the engine places the raster (engine/georeferencing.py georeferencing), or None when the
    engine reads it through a warp it refuses (then nothing is cut)."""
    from osgeo import gdal

    kind = georeferencing(ds)
    if kind == "none":  # polygons are in source pixels
        return (0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    if needs_warp(ds):
        return None
    gt = ds.GetGeoTransform() if kind == "geotransform" else gdal.GCPsToGeoTransform(ds.GetGCPs())
    inv = gdal.InvGeoTransform(gt) if gt else None
    return tuple(inv) if inv else None


def aoi_window(ds, aoi: dict | None) -> tuple | None:
    """``(col_off, row_off, width, height)``: the pixels of ``ds`` the engine reads for ``aoi``
    (the bounding window, clipped to the raster, as engine/raster.py reads it); None when the
    whole raster is asked about, or when the AOI is not one to cut for (malformed, outside the
    raster: the engine answers about it)."""
    if not isinstance(aoi, dict) or len([k for k in AOI_KEYS if aoi.get(k) is not None]) != 1:
        return None  # no AOI (the whole raster), or one the engine refuses
    width, height = ds.RasterXSize, ds.RasterYSize
    if aoi.get("window") is not None:
        try:
            c, r, w, h = (float(v) for v in aoi["window"])
        except (TypeError, ValueError):
            return None
        c0, r0, c1, r1 = c, r, c + w, r + h
        if not (w > 0 and h > 0):
            return None
    else:
        geom = _polygon(aoi)
        inv = _to_pixels(ds) if geom is not None else None
        if inv is None:
            return None
        points = [p for leaf in _ogr_leaves(geom) for p in (leaf.GetPoints() or [])]
        cols = [inv[0] + inv[1] * p[0] + inv[2] * p[1] for p in points]
        rows = [inv[3] + inv[4] * p[0] + inv[5] * p[1] for p in points]
        if not cols or not all(math.isfinite(v) for v in cols + rows):
            return None
        c0, r0, c1, r1 = min(cols), min(rows), max(cols), max(rows)
    if not all(math.isfinite(v) for v in (c0, r0, c1, r1)):
        return None
    ic0, ir0 = max(0, math.floor(c0)), max(0, math.floor(r0))
    ic1, ir1 = min(width, math.ceil(c1)), min(height, math.ceil(r1))
    if ic1 <= ic0 or ir1 <= ir0:
        return None  # outside the raster: the engine says so
    if (ic0, ir0, ic1, ir1) == (0, 0, width, height):
        return None
    return ic0, ir0, ic1 - ic0, ir1 - ir0


def aoi_for_cut(aoi: dict, window: tuple, pixel_space: bool, scale: tuple = (1.0, 1.0)) -> dict:
    """``aoi`` for the cut of ``window``: a pixel window relative to the cut; a polygon as it is
    (the cut is georeferenced where the raster is), or, when ``pixel_space`` (no georeferencing:
    polygons are in source pixels), moved by the cut's offset. ``scale``: source pixels per pixel
    of the cut (one reduced to the engine's read budget): pixel coordinates are divided by it."""
    col_off, row_off = window[0], window[1]
    sx, sy = scale
    if aoi.get("window") is not None:
        c, r, w, h = aoi["window"]
        if (sx, sy) == (1.0, 1.0):
            return dict(aoi, window=[c - col_off, r - row_off, w, h])
        # whole pixels of the reduced cut, covering the window (the engine's windows are whole pixels)
        c0, r0 = math.floor((c - col_off) / sx + 1e-9), math.floor((r - row_off) / sy + 1e-9)
        c1, r1 = math.ceil((c - col_off + w) / sx - 1e-9), math.ceil((r - row_off + h) / sy - 1e-9)
        return dict(aoi, window=[c0, r0, max(1, c1 - c0), max(1, r1 - r0)])
    if not pixel_space:
        return dict(aoi)
    if aoi.get("polygon_wkt") is not None:
        geom = _polygon(aoi)
        for leaf in _ogr_leaves(geom):
            for i, p in enumerate(leaf.GetPoints() or []):
                x, y = (p[0] - col_off) / sx, (p[1] - row_off) / sy
                if len(p) > 2:
                    leaf.SetPoint(i, x, y, p[2])
                else:
                    leaf.SetPoint_2D(i, x, y)
        return dict(aoi, polygon_wkt=geom.ExportToIsoWkt())
    return dict(aoi, geojson=_moved_geojson(aoi["geojson"], -col_off, -row_off, sx, sy))


def _moved_geojson(obj: dict, dx: float, dy: float, sx: float = 1.0, sy: float = 1.0) -> dict:
    """A copy of a ``geojson`` AOI (geometry, Feature or FeatureCollection) moved by (dx, dy),
    then divided by (sx, sy)."""
    kind = obj.get("type")
    if kind == "FeatureCollection":  # its features read as Features, "type" or not (as the engine reads them)
        return dict(obj, features=[_moved_feature(f, dx, dy, sx, sy) for f in obj["features"]])
    if kind == "Feature":
        return _moved_feature(obj, dx, dy, sx, sy)
    return dict(obj, coordinates=_moved_positions(obj["coordinates"], dx, dy, sx, sy))


def _moved_feature(feature: dict, dx: float, dy: float, sx: float = 1.0, sy: float = 1.0) -> dict:
    geometry = feature.get("geometry")
    return dict(feature, geometry=_moved_geojson(geometry, dx, dy, sx, sy) if isinstance(geometry, dict) else geometry)


# --- whether to write the file ------------------------------------------------------------------


def raw_bytes(ds, window: tuple | None = None) -> int:
    """The bytes of ``window`` of ``ds`` (all of it when None), every band, uncompressed: about
    the most its DEFLATE copy can take."""
    from osgeo import gdal

    width, height = (window[2], window[3]) if window is not None else (ds.RasterXSize, ds.RasterYSize)
    per_pixel = sum(max(1, gdal.GetDataTypeSize(ds.GetRasterBand(b).DataType) // 8)
                    for b in range(1, ds.RasterCount + 1))
    return width * height * per_pixel


def reduced_size(size_wh: tuple, max_pixels: int | None) -> tuple | None:
    """``(width, height)`` to send a window of ``size_wh`` at when it holds more than
    ``max_pixels`` (the engine's ``max_read_pixels``), aspect kept: the smallest size of at least
    ``max_pixels`` pixels, so the engine, which reads no window at more than that, chooses the
    same canvas and reads the same number of pixels of it. None: sent at full resolution."""
    w, h = int(size_wh[0]), int(size_wh[1])
    if not max_pixels or max_pixels <= 0 or w * h <= max_pixels:
        return None
    f = math.sqrt(max_pixels / float(w * h))
    size = (max(1, min(w, math.ceil(w * f))), max(1, min(h, math.ceil(h * f))))
    return None if size == (w, h) else size


def cut_worth_it(ds, path: str, window: tuple) -> bool:
    """Whether to write the cut of ``window`` from ``ds``, the self-contained GeoTIFF ``path``,
    rather than send the file as it is (decided before anything is written)."""
    share = window[2] * window[3] / float(ds.RasterXSize * ds.RasterYSize)
    if share > CUT_MAX_SHARE:
        return False
    compression = (ds.GetMetadataItem("COMPRESSION", "IMAGE_STRUCTURE") or "NONE").upper()
    if compression in LOSSLESS_COMPRESSIONS:
        return True  # the cut takes about its share of the file
    return raw_bytes(ds, window) < os.path.getsize(path)


def free_bytes(folder: str) -> int | None:
    """The bytes free in ``folder``'s file system (None when it cannot be told)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def check_free_space(folder: str, needed: int) -> tuple:
    """``(fits, free)``: whether ``needed`` bytes, and :data:`FREE_SPACE_RESERVE` beyond them,
    fit in ``folder`` (True when its free space cannot be told)."""
    free = free_bytes(folder)
    return free is None or free >= needed + FREE_SPACE_RESERVE, free


# --- writing the file ----------------------------------------------------------------------------


def written_before_check() -> int:
    """The most bytes the file written for an upload can grow past its limit before
    :func:`translate_to_geotiff` sees it: one strip of pixels, uncompressed (each is flushed to
    the file before its size is checked)."""
    return STRIP_BYTES


class TooLargeToSend(Exception):
    """The file written for the upload grew past the engine's upload limit (it was stopped)."""


# metadata domains of the source that are not copied: how the VRT itself is laid out
SKIPPED_DOMAINS = ("IMAGE_STRUCTURE", "DERIVED_SUBDATASETS", "SUBDATASETS")


def _source_vrt(path: str, window: tuple | None, size: tuple | None):
    """``path`` as an in-memory VRT: only ``window`` of it, resampled to ``size`` (width,
    height) when given (average; nearest for a band with a colour table, whose values are
    indices, as the engine reads it). gdal.Translate makes it, so the georeferencing (GCPs
    included, moved and scaled with the window), nodata, mask, colour tables and metadata are
    exactly what gdal.Translate to a GeoTIFF would write."""
    from osgeo import gdal

    options = {"format": "VRT"}
    if window is not None:
        options["srcWin"] = list(window)
    if size is not None:
        ds = open_with_gdal(path)
        palette = ds is not None and any(ds.GetRasterBand(b).GetColorTable() is not None
                                         for b in range(1, ds.RasterCount + 1))
        ds = None
        options.update(width=int(size[0]), height=int(size[1]), resampleAlg="nearest" if palette else "average")
    return gdal.Translate("", path, **options)


def _create_like(src, dest: str):
    """An empty GeoTIFF at ``dest`` shaped and described as ``src`` (a VRT), as the GTiff
    driver's CreateCopy describes it: georeferencing, GCPs, metadata, and per band the type,
    nodata, colour table and interpretation, description, scale, offset and unit; a per-dataset
    mask when ``src`` has one. No pixel is written yet."""
    from osgeo import gdal

    bands = [src.GetRasterBand(b) for b in range(1, src.RasterCount + 1)]
    interps = [b.GetColorInterpretation() for b in bands]
    options = list(CREATION_OPTIONS)
    # the photometric interpretation CreateCopy chooses: RGB for bands tagged red, green, blue
    # (first), a palette for one band with a colour table, else grey (MINISBLACK) with extra
    # samples; an alpha band is told as such (ALPHA) whatever comes before it
    if len(bands) >= 3 and interps[:3] == [gdal.GCI_RedBand, gdal.GCI_GreenBand, gdal.GCI_BlueBand]:
        options.append("PHOTOMETRIC=RGB")
    elif len(bands) == 1 and bands[0].GetColorTable() is not None:
        options.append("PHOTOMETRIC=PALETTE")
    else:
        options.append("PHOTOMETRIC=MINISBLACK")
    if len(bands) > 1 and interps[-1] == gdal.GCI_AlphaBand:
        options.append("ALPHA=" + (bands[-1].GetMetadataItem("ALPHA", "IMAGE_STRUCTURE") or "YES"))
    types = {b.DataType for b in bands}
    if len(types) != 1:
        raise OSError("the bands are of different types, which one GeoTIFF cannot hold")
    out = gdal.GetDriverByName("GTiff").Create(dest, src.RasterXSize, src.RasterYSize, len(bands), types.pop(),
                                               options)
    if out is None:
        raise OSError(f"GDAL could not create {dest}: {gdal.GetLastErrorMsg()}")
    gt = src.GetGeoTransform(can_return_null=True)
    if gt is not None:
        out.SetGeoTransform(gt)
    srs = src.GetSpatialRef()
    if srs is not None:
        out.SetSpatialRef(srs)
    if src.GetGCPCount():
        out.SetGCPs(src.GetGCPs(), src.GetGCPSpatialRef())
    for domain in src.GetMetadataDomainList() or []:
        if domain not in SKIPPED_DOMAINS:
            md = src.GetMetadata(domain)
            if md:
                out.SetMetadata(md, domain)
    for i, band in enumerate(bands):
        ob = out.GetRasterBand(i + 1)
        nodata = band.GetNoDataValue()
        if nodata is not None:
            ob.SetNoDataValue(nodata)
        table = band.GetColorTable()
        if table is not None:
            ob.SetColorTable(table)
        if ob.GetColorInterpretation() != interps[i]:
            ob.SetColorInterpretation(interps[i])
        if band.GetDescription():
            ob.SetDescription(band.GetDescription())
        md = band.GetMetadata()
        if md:
            ob.SetMetadata(md)
        if band.GetScale() not in (None, 1.0):
            ob.SetScale(band.GetScale())
        if band.GetOffset() not in (None, 0.0):
            ob.SetOffset(band.GetOffset())
        if band.GetUnitType():
            ob.SetUnitType(band.GetUnitType())
        names = band.GetCategoryNames()
        if names:
            ob.SetCategoryNames(names)
    # a mask of its own (not one made of the nodata value or an alpha band), as CreateCopy copies it
    if bands and bands[0].GetMaskFlags() == gdal.GMF_PER_DATASET:
        if out.CreateMaskBand(gdal.GMF_PER_DATASET) != 0:
            raise OSError(f"GDAL could not add a mask to {dest}: {gdal.GetLastErrorMsg()}")
    return out


def _strips(width: int, height: int, block: tuple, pixel_bytes: int):
    """``(col, row, w, h)`` pieces of a ``width`` x ``height`` image, in rows of whole blocks
    (``block``: width, height), each of at most :data:`STRIP_BYTES` (at least one block): every
    block is whole when its piece is written, so it is compressed and written to the file once."""
    bw, bh = block
    row_bytes = max(1, width * pixel_bytes)
    rows = max(bh, (STRIP_BYTES // (row_bytes * bh)) * bh)
    cols = width
    if rows == bh and row_bytes * bh > STRIP_BYTES:  # one row of blocks is already too much: fewer columns
        cols = max(bw, (STRIP_BYTES // (bh * pixel_bytes * bw)) * bw)
    for r in range(0, height, rows):
        for c in range(0, width, cols):
            yield c, r, min(cols, width - c), min(rows, height - r)


def translate_to_geotiff(path: str, dest: str, window: tuple | None = None, cancelled=None, progress=None,
                         max_bytes: int | None = None, size: tuple | None = None) -> str:
    """Write ``path`` (only ``window``, ``(col_off, row_off, width, height)``, when given) as one
    GeoTIFF at ``dest`` with its placement, nodata and mask inside, at full resolution, or at
    ``size`` (width, height; see :func:`_source_vrt`).

    Written in strips (:func:`_strips`), each flushed to the file before the next is read, so
    neither the memory used nor the file's lag behind what was written grows beyond one strip
    with GDAL's block cache (5 % of the memory by default). ``cancelled()`` is asked between
    strips; when it is true the writing stops and OSError is raised. ``progress(fraction)`` is
    told how far it is (0..1). ``max_bytes``: the writing stops as soon as the file is larger,
    and TooLargeToSend is raised (the partial file is left to the caller to delete)."""
    from osgeo import gdal

    # A mask must go inside the TIFF (GDAL < 3.9 writes an .msk beside it by default, which
    # would not be uploaded). Thread-local: other GDAL users in QGIS are not affected.
    previous = gdal.GetThreadLocalConfigOption("GDAL_TIFF_INTERNAL_MASK", None)
    gdal.SetThreadLocalConfigOption("GDAL_TIFF_INTERNAL_MASK", "YES")
    src = out = None
    try:
        try:
            src = _source_vrt(path, window, size)
            if src is None:
                raise OSError(gdal.GetLastErrorMsg() or "GDAL could not read it")
            out = _create_like(src, dest)
        except RuntimeError as exc:  # GDAL with exceptions on
            raise OSError(str(exc)) from None
        width, height, count = src.RasterXSize, src.RasterYSize, src.RasterCount
        pixel_bytes = raw_bytes(src) // max(1, width * height) if count else 1
        band = out.GetRasterBand(1) if count else None
        block = tuple(band.GetBlockSize()) if band is not None else (256, 256)
        masked = band is not None and band.GetMaskFlags() == gdal.GMF_PER_DATASET
        src_mask = src.GetRasterBand(1).GetMaskBand() if masked else None
        out_mask = band.GetMaskBand() if masked else None
        done = 0
        for c, r, w, h in _strips(width, height, block, pixel_bytes + (1 if masked else 0)):
            if cancelled is not None and cancelled():
                raise OSError("cancelled")
            data = src.ReadRaster(c, r, w, h)
            if data is None or out.WriteRaster(c, r, w, h, data) != 0:
                raise OSError(gdal.GetLastErrorMsg() or "GDAL could not copy the pixels")
            if masked:
                data = src_mask.ReadRaster(c, r, w, h)
                if data is None or out_mask.WriteRaster(c, r, w, h, data) != 0:
                    raise OSError(gdal.GetLastErrorMsg() or "GDAL could not copy the mask")
            data = None
            out.FlushCache()
            done += w * h
            if max_bytes is not None:
                written = os.path.getsize(dest)
                if written > max_bytes:
                    raise TooLargeToSend(written)
            if progress is not None:
                progress(min(1.0, done / float(max(1, width * height))))
        out.FlushCache()
        out = None  # close: the directory is written
        if max_bytes is not None and os.path.getsize(dest) > max_bytes:
            raise TooLargeToSend(os.path.getsize(dest))
    except RuntimeError as exc:  # GDAL with exceptions on
        raise OSError(str(exc)) from None
    finally:
        out = src = None
        gdal.SetThreadLocalConfigOption("GDAL_TIFF_INTERNAL_MASK", previous)
    return dest


def too_large_error(path: str, window: tuple | None, limit: int, written: int | None = None, raw: int | None = None):
    """EngineError('upload_too_large') for a raster (or its area, ``window``) whose GeoTIFF for
    the upload is, or would be, larger than the engine's upload limit ``limit``: what happened
    (``written``: bytes written when it was stopped; ``raw``: the pixels' bytes, refused before
    writing) and what to do."""
    from .engine_errors import EngineError, size_text

    name = os.path.basename(path)
    what = f"The area of interest of {name}" if window is not None else name
    if written is not None:
        how = (f"its GeoTIFF for the upload grew past that before it was finished (stopped at "
               f"{size_text(written)}, and deleted)")
    else:
        how = (f"its pixels take {size_text(raw)} uncompressed, more than any compression could bring under "
               "that, so nothing was written")
    return EngineError(
        "upload_too_large",
        f"{what} is too large to send to the engine, which accepts uploads up to {size_text(limit)}: {how}.",
        "Choose a smaller area of interest (a drawn rectangle or polygon), or let the engine read the file itself: "
        "put it in a folder the engine's computer shares and set Send rasters to never upload (Settings > "
        "Options > GeoVQA), or start that engine with a larger --max-upload-bytes.")


def _cancelled_error():
    from .engine_errors import EngineError

    return EngineError("cancelled", "The question was cancelled while its raster was prepared for the upload.")


def prepare_upload(path: str, aoi: dict | None = None, cancelled=None, progress=None, max_bytes=None,
                   max_pixels=None) -> Upload:
    """The :class:`Upload` for a question about ``aoi`` of the raster ``path``: the raster itself
    or a temporary GeoTIFF (converted, cut to the AOI); call its ``cleanup()`` when done.

    ``progress(fraction)`` is told how far the conversion is (only called when a file is
    written). ``max_bytes``: the engine's upload limit (an int, or a callable giving it or None,
    asked only when a file is to be written): a conversion that cannot come under it is refused
    before anything is written (:data:`DEFLATE_MAX_RATIO`), and one that grows past it is
    stopped and deleted. The cut of a GeoTIFF that itself fits the limit is never refused: when
    it could not come under the limit, or grows past the file's own size while written (stopped
    there), the file is sent as it is. ``max_pixels``: the engine's read budget (``/health``'s
    ``max_read_pixels``; an int, or a callable giving it or None): a window (the whole raster
    included) of more pixels is written reduced to it (:func:`reduced_size`, GDAL's average;
    nearest for a colour table), even from a GeoTIFF that needs no conversion.

    Raises EngineError('raster_unreadable') when a file that must be converted cannot be,
    EngineError('no_space') when the temporary folder has no room for the conversion,
    EngineError('upload_too_large') when the file to send would be larger than ``max_bytes``, and
    EngineError('cancelled') when ``cancelled()`` became true meanwhile. Sizes in its messages are
    in MiB / GiB (:func:`engine_errors.size_text`), as the client's and the engine's own."""
    from .engine_errors import EngineError, size_text

    ds = open_with_gdal(path)
    if ds is None:
        return Upload(path, aoi)  # the engine says what is wrong with it
    translate = _needs_translation(ds, path)
    window = aoi_window(ds, aoi)
    pixel_space = georeferencing(ds) == "none"
    source_size = (window[2], window[3]) if window is not None else (ds.RasterXSize, ds.RasterYSize)
    # the engine reads no window at more pixels than its read budget: a larger one is sent reduced
    budget = max_pixels() if callable(max_pixels) else max_pixels
    size = reduced_size(source_size, budget)
    if window is None and not translate and size is None:
        return Upload(path, aoi)
    if not translate and size is None and not cut_worth_it(ds, path, window):
        return Upload(path, aoi)
    needed = raw_bytes(ds, window if size is None else (0, 0) + size)
    ds = None
    limit = max_bytes() if callable(max_bytes) else max_bytes
    # a GeoTIFF that is only cut goes as it is when its cut cannot be sent, if the file itself can:
    # its cut (DEFLATE, no predictor) may outgrow a ZSTD/LZMA/predictor file that fits the limit
    file_size = None if translate else os.path.getsize(path)
    file_fits = not translate and (limit is None or file_size <= limit)
    if limit is not None and needed > limit * DEFLATE_MAX_RATIO:
        if file_fits:
            return Upload(path, aoi)
        raise too_large_error(path, window, limit, raw=needed)
    # writing stops once the file passes the limit, or, for a cut of a file that fits, the file's size
    stop_at = file_size if file_fits else limit
    if not translate:
        needed = min(needed, file_size)  # a cut as large as the file is not sent
    if stop_at is not None:  # the writing stops there, at most what is buffered before the check later
        needed = min(needed, stop_at + written_before_check())
    folder = tempfile.gettempdir()
    fits, free = check_free_space(folder, needed)
    if not fits:
        if not translate:
            return Upload(path, aoi)  # the file itself needs no room
        raise EngineError("no_space", f"{os.path.basename(path)} must be converted to a GeoTIFF for the upload to the "
                          f"engine, which takes up to {size_text(needed)} in the temporary folder {folder}; it has "
                          f"only {size_text(free)} free (GeoVQA leaves at least "
                          f"{size_text(FREE_SPACE_RESERVE)} free there).",
                          "Free some space there, ask about a smaller area, or export the layer as a GeoTIFF "
                          "(Export > Save As...) where there is room and ask about that.")
    temp_dir = tempfile.mkdtemp(prefix="geovqa-upload-")
    try:
        stem = os.path.splitext(os.path.basename(path))[0] or "raster"
        dest = os.path.join(temp_dir, stem + ".tif")
        try:
            translate_to_geotiff(path, dest, window, cancelled, progress, stop_at, size)
        except TooLargeToSend as exc:  # the cut grew past what it is for
            if file_fits:  # no smaller than the file, which fits: the file goes
                shutil.rmtree(temp_dir, ignore_errors=True)
                return Upload(path, aoi)
            raise too_large_error(path, window, limit, written=exc.args[0]) from None
        except (OSError, RuntimeError) as exc:  # RuntimeError: GDAL with exceptions on
            if cancelled is not None and cancelled():
                raise _cancelled_error() from None
            if not translate:  # the cut failed (a full temporary folder): the file itself still goes
                shutil.rmtree(temp_dir, ignore_errors=True)
                return Upload(path, aoi)
            raise EngineError("raster_unreadable", f"{os.path.basename(path)} could not be converted to a "
                              f"GeoTIFF for the upload to the engine: {exc}",
                              "Export the layer as a GeoTIFF (Export > Save As...) and ask about that.") from exc
        if not translate and os.path.getsize(dest) >= os.path.getsize(path):
            shutil.rmtree(temp_dir, ignore_errors=True)  # a compressed file whose cut is no smaller
            return Upload(path, aoi)
        reduced = {}
        scale = (1.0, 1.0)
        if size is not None:
            scale = (source_size[0] / size[0], source_size[1] / size[1])
            reduced = {"size": size, "source_size": source_size, "pixel_scale": scale if pixel_space else (1.0, 1.0)}
        if window is None:
            sent_aoi = aoi
            if size is not None and isinstance(aoi, dict):  # a pixel window or pixel polygon of it: scaled
                try:
                    sent_aoi = aoi_for_cut(aoi, (0, 0) + source_size, pixel_space, scale)
                except (TypeError, ValueError, AttributeError, KeyError):
                    sent_aoi = aoi  # one the engine refuses: it says why
            return Upload(dest, sent_aoi, temp_dir=temp_dir, **reduced)
        return Upload(dest, aoi_for_cut(aoi, window, pixel_space, scale), window=window,
                      pixel_offset=(window[0], window[1]) if pixel_space else (0, 0), temp_dir=temp_dir, **reduced)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise


@contextmanager
def upload_file(path: str, aoi: dict | None = None, cancelled=None, progress=None, max_bytes=None, max_pixels=None):
    """:func:`prepare_upload` as a context: the :class:`Upload`, its temporary file deleted on exit."""
    upload = prepare_upload(path, aoi, cancelled, progress, max_bytes, max_pixels)
    try:
        yield upload
    finally:
        upload.cleanup()
