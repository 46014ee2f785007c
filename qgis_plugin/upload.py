"""What is uploaded to an engine on another computer: one self-contained GeoTIFF.

The engine accepts only GeoTIFF uploads (engine/uploads.py), and an upload is a single file:
a GeoTIFF placed by a world file (.tfw), or whose nodata lives in an .aux.xml or whose mask is
an .msk, would lose those on the way. So any file that is not a GeoTIFF, or that GDAL reads
together with other files, is first written to a temporary GeoTIFF with ``gdal.Translate``
(the whole file, same pixel grid, so a pixel window in the request stays valid), and that copy
is uploaded and deleted afterwards.

Runs in worker threads (AskStream.events, inside a QgsTask or a Processing algorithm): a
translation of a large file must never block the user interface.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager

from .georef import open_with_gdal

# Tiled + deflate: a translated VRT or PNG is not bigger than needed on the wire; BIGTIFF only
# where the output would need it.
CREATION_OPTIONS = ["TILED=YES", "COMPRESS=DEFLATE", "BIGTIFF=IF_SAFER"]


def _same_file(a: str, b: str) -> bool:
    return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def needs_translation(path: str) -> bool:
    """True when ``path`` is not a GeoTIFF that holds everything GDAL reads for it.

    A file GDAL cannot open is sent as it is: the engine then answers with its own clear error
    (not_a_raster / raster_unreadable) rather than the plugin guessing."""
    ds = open_with_gdal(path)
    if ds is None:
        return False
    files = ds.GetFileList() or [path]
    others = [f for f in files if not _same_file(f, path)]
    return ds.GetDriver().ShortName != "GTiff" or bool(others)


def translate_to_geotiff(path: str, dest: str) -> str:
    """Write ``path`` as one GeoTIFF at ``dest`` with its placement, nodata and mask inside."""
    from osgeo import gdal

    # A mask must go inside the TIFF (GDAL < 3.9 writes an .msk beside it by default, which
    # would not be uploaded). Thread-local: other GDAL users in QGIS are not affected.
    previous = gdal.GetThreadLocalConfigOption("GDAL_TIFF_INTERNAL_MASK", None)
    gdal.SetThreadLocalConfigOption("GDAL_TIFF_INTERNAL_MASK", "YES")
    try:
        out = gdal.Translate(dest, path, format="GTiff", creationOptions=CREATION_OPTIONS)
        if out is None:
            raise OSError(f"GDAL could not write {path} as a GeoTIFF for the upload: {gdal.GetLastErrorMsg()}")
        out = None  # flush and close
    finally:
        gdal.SetThreadLocalConfigOption("GDAL_TIFF_INTERNAL_MASK", previous)
    return dest


@contextmanager
def upload_file(path: str):
    """The file to upload for ``path``: itself, or a temporary GeoTIFF deleted on exit."""
    if not needs_translation(path):
        yield path
        return
    temp_dir = tempfile.mkdtemp(prefix="geovqa-upload-")
    try:
        stem = os.path.splitext(os.path.basename(path))[0] or "raster"
        try:
            copy = translate_to_geotiff(path, os.path.join(temp_dir, stem + ".tif"))
        except (OSError, RuntimeError) as exc:  # RuntimeError: GDAL with exceptions on
            from .client import EngineError

            raise EngineError("raster_unreadable", f"{os.path.basename(path)} could not be converted to a "
                              f"GeoTIFF for the upload to the engine: {exc}",
                              "Export the layer as a GeoTIFF (Export > Save As...) and ask about that.") from exc
        yield copy
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
