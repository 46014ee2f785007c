"""Open a raster file with rasterio, with a sentence for a person when it cannot be opened.

A missing, unreadable, corrupt or non-raster file raises `RasterOpenError`, never a bare GDAL
error; `gdal_detail` finds what GDAL itself said about a failure for such messages.
"""

from __future__ import annotations

import os
import stat
import warnings

from .raster_errors import RasterOpenError


def open_raster(path: str):
    import rasterio
    from rasterio.errors import RasterioError

    p = os.fspath(path)
    is_local = "://" not in p and not p.startswith("/vsi")
    if is_local:
        if not os.path.exists(p):
            raise RasterOpenError(f"Raster file not found: '{p}'. Check the path and try again.")
        if os.path.isdir(p):
            raise RasterOpenError(f"'{p}' is a folder, not a raster file. Choose the raster file itself.")
        if not stat.S_ISREG(os.stat(p).st_mode):  # GDAL would wait forever on a named pipe
            raise RasterOpenError(
                f"'{p}' is not a regular file (a named pipe, device or socket), so it cannot be "
                "read as a raster. Choose the raster file itself."
            )
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
            f"corrupt or incomplete. Re-export it (e.g. as GeoTIFF) and try again. (GDAL: {gdal_detail(exc)})"
        ) from exc


def gdal_detail(exc: BaseException) -> str:
    """What GDAL said about a failure: rasterio often raises "Read failed. See previous exception
    for details." with GDAL's own message as the cause, which the user never sees otherwise."""
    cause = exc.__cause__
    if "previous exception" in str(exc) and cause is not None and str(cause):
        return str(cause)
    return str(exc)
