"""Small GeoTIFF writers for tests (real files through rasterio; import from any test module).

    from rasters import write_geotiff          # or: from tests.engine.rasters import ...
    write_geotiff(tmp_path / "a.tif", arr)     # (H, W) or (bands, H, W); UTM 33N, 10 m pixels

`crs=None` with the default transform writes a raster with no georeferencing at all.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from affine import Affine

DEFAULT_TRANSFORM = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0)
_DEFAULT = object()


def write_geotiff(
    path,
    array,
    crs="EPSG:32633",
    transform=_DEFAULT,
    nodata=None,
    dtype=None,
    *,
    overviews=None,
    compress="deflate",
    tiled=None,
    colorinterp=None,
    photometric=None,
    alpha=None,
    colormap=None,
    mask=None,
):
    """Write `array` ((H, W) or (bands, H, W)) as a GeoTIFF and return the path as a string.

    transform: an Affine; by default DEFAULT_TRANSFORM when `crs` is given, none when crs is None.
    overviews: e.g. [2, 4, 8] to build internal overviews (average resampling).
    colorinterp: e.g. ['red', 'green', 'blue', 'alpha']; photometric: e.g. 'RGB' (creation option).
    alpha: a band count > 3 with `alpha=True` marks the last band as alpha (ExtraSamples).
    colormap: {value: (r, g, b, a)} for band 1 (uint8 only).
    mask: (H, W) bool array, True = valid, written as an internal per-dataset mask.
    """
    import rasterio
    import rasterio.errors
    from rasterio.enums import ColorInterp, Resampling

    arr = np.asarray(array)
    if arr.ndim == 2:
        arr = arr[None]
    if dtype is not None:
        arr = arr.astype(dtype)
    count, height, width = arr.shape
    if transform is _DEFAULT:
        transform = DEFAULT_TRANSFORM if crs is not None else None
    profile = dict(driver="GTiff", width=width, height=height, count=count, dtype=arr.dtype.name)
    if crs is not None:
        profile["crs"] = crs
    if transform is not None:
        profile["transform"] = transform
    if nodata is not None:
        profile["nodata"] = nodata
    if compress:
        profile["compress"] = compress
    if tiled is None:
        tiled = width >= 512 and height >= 512
    if tiled:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    if photometric:
        profile["photometric"] = photometric
    if alpha:
        profile["alpha"] = "YES"
    path = os.fspath(path)
    with warnings.catch_warnings(), rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(arr)
            if colorinterp is not None:
                dst.colorinterp = [getattr(ColorInterp, c) if isinstance(c, str) else c for c in colorinterp]
            if colormap is not None:
                dst.write_colormap(1, colormap)
            if mask is not None:
                dst.write_mask(np.where(np.asarray(mask), 255, 0).astype(np.uint8))
            if overviews:
                dst.build_overviews(list(overviews), Resampling.average)
    return path


def write_bytes(path, data: bytes):
    """Write raw bytes (e.g. a fake or corrupt .tif) and return the path."""
    path = os.fspath(path)
    with open(path, "wb") as f:
        f.write(data)
    return path


def write_truncated(path, source_path, keep_fraction=0.5):
    """Copy the first part of a real raster file to `path` (a truncated, corrupt raster)."""
    with open(os.fspath(source_path), "rb") as f:
        data = f.read()
    return write_bytes(path, data[: max(16, int(len(data) * keep_fraction))])


def write_vrt(path, source_path, width, height, count=1, dtype="Byte"):
    """A minimal VRT that mirrors `source_path` band by band (same size, no georeferencing)."""
    bands = "".join(
        f'<VRTRasterBand dataType="{dtype}" band="{b}"><SimpleSource>'
        f'<SourceFilename relativeToVRT="0">{os.fspath(source_path)}</SourceFilename>'
        f"<SourceBand>{b}</SourceBand></SimpleSource></VRTRasterBand>"
        for b in range(1, count + 1)
    )
    xml = f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">{bands}</VRTDataset>'
    return write_bytes(path, xml.encode())


def write_huge_vrt(path, source_path, size=27000):
    """A `size` x `size` RGB VRT stretching the 3-band uint8 `source_path` over it (no overviews):
    a huge raster on disk in a few bytes, read at any size without holding it whole."""
    import rasterio

    with rasterio.open(os.fspath(source_path)) as src:
        w, h = src.width, src.height
    bands = "".join(
        f'<VRTRasterBand dataType="Byte" band="{b}"><ColorInterp>{c}</ColorInterp><SimpleSource>'
        f'<SourceFilename relativeToVRT="0">{os.fspath(source_path)}</SourceFilename>'
        f'<SourceBand>{b}</SourceBand><SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'
        f'<DstRect xOff="0" yOff="0" xSize="{size}" ySize="{size}"/></SimpleSource></VRTRasterBand>'
        for b, c in ((1, "Red"), (2, "Green"), (3, "Blue")))
    xml = (f'<VRTDataset rasterXSize="{size}" rasterYSize="{size}"><SRS>EPSG:32633</SRS>'
           f"<GeoTransform>500000, 0.1, 0, 5000000, 0, -0.1</GeoTransform>{bands}</VRTDataset>")
    return write_bytes(path, xml.encode())


_GDAL_TYPES = {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32",
               "int32": "Int32", "float32": "Float32", "float64": "Float64"}


def write_stacked_vrt(path, sources):
    """A VRT stacking single-band rasters as its bands 1, 2, ... (like gdalbuildvrt -separate);
    each band keeps its source's type, so the bands may differ in type. Sources share one size."""
    import rasterio

    bands = []
    for b, source in enumerate(sources, start=1):
        with rasterio.open(os.fspath(source)) as src:
            width, height, dtype = src.width, src.height, src.dtypes[0]
        bands.append(
            f'<VRTRasterBand dataType="{_GDAL_TYPES[dtype]}" band="{b}"><SimpleSource>'
            f'<SourceFilename relativeToVRT="0">{os.fspath(source)}</SourceFilename>'
            f"<SourceBand>1</SourceBand></SimpleSource></VRTRasterBand>")
    xml = f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">{"".join(bands)}</VRTDataset>'
    return write_bytes(path, xml.encode())


def write_gcp_geotiff(path, array, gcps, crs="EPSG:32633", rpcs=None):
    """A GeoTIFF with no geotransform, placed on the map by ground control points `gcps`
    ((col, row, x, y) tuples, in `crs`) or, with `gcps=()`, by RPCs alone (a rasterio RPC)."""
    import rasterio
    import rasterio.errors
    from rasterio.control import GroundControlPoint
    from rasterio.crs import CRS

    arr = np.asarray(array)
    if arr.ndim == 2:
        arr = arr[None]
    count, height, width = arr.shape
    path = os.fspath(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=count,
                           dtype=arr.dtype.name) as dst:
            if gcps:
                points = [GroundControlPoint(row=r, col=c, x=x, y=y) for c, r, x, y in gcps]
                dst.gcps = (points, CRS.from_user_input(crs))
            if rpcs is not None:
                dst.rpcs = rpcs
            dst.write(arr)
    return path
