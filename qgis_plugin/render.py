"""Non-file raster layers (WMS, XYZ, WCS, virtual rasters, a GeoPackage table, a NetCDF
subdataset...): render the requested extent to a georeferenced RGB GeoTIFF the engine can read.

The render's longest side is at most ``render_max_px`` (the options' *Render size*); a layer with
pixels of its own (a GeoPackage table, a subdataset, a virtual raster: :func:`native_pixel_size`)
is never rendered finer than those pixels, so a small raster is not scaled up into made-up detail
and more tiles. Web services (:data:`WEB_PROVIDERS`) have no pixels of their own: they get
``render_max_px``. Nor does a render hold more pixels than the engine reads of any raster window
(its ``max_read_pixels`` in ``/health``, when the caller knows it): a larger one is made at about
that many pixels, aspect kept, as an upload is reduced (:func:`upload.reduced_size`), since the
engine would only read it decimated to that (a 16384 px render costs seconds and ~1 GB for nothing).

The chat dock and the batch dialog render asynchronously with ``QgsMapRendererParallelJob``
(started on the main thread, never blocks), then turn the image into RGBA pixels and write the
GeoTIFF in a ``QgsTask``'s worker thread (seconds for a large render); Processing algorithms (no
event loop of their own) make a :class:`PreparedRender` in prepareAlgorithm (main thread: the map
settings, with a clone of the layer) and run it in processAlgorithm (the task's thread), as
QGIS's own ``native:rasterize`` does, with ``QgsMapRendererCustomPainterJob``. Both build their
map settings with :func:`map_settings`, check what was drawn with :func:`rendered_rgba` and write
it with :func:`write_geotiff`, off the main thread.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
from qgis.core import (
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsMapRendererCustomPainterJob,
    QgsMapRendererParallelJob,
    QgsMapSettings,
    QgsProject,
    QgsProviderRegistry,
    QgsRectangle,
    QgsTask,
)
from qgis.PyQt.QtCore import QObject, QSize, Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor, QImage, QPainter

from .georef import needs_warp, open_with_gdal
from .paths import write_error
from .tasks import CAN_CANCEL, file_stem
from .upload import reduced_size

FORMAT_RGBA = QImage.Format.Format_RGBA8888
FORMAT_ARGB32 = QImage.Format.Format_ARGB32_Premultiplied
LOCAL_FILE_PROVIDERS = ("gdal",)
# web map services (XYZ and WMTS tiles go through "wms"): no pixel grid of their own, often the
# whole world; the chat dock asks about the map view of them when no area is chosen
WEB_PROVIDERS = ("wms", "xyz", "arcgismapserver", "wcs")
# a web layer whose extent spans this share of the world's longitudes is "the whole world"
WORLD_SHARE = 0.75
WEB_MERCATOR_MAX_LAT = 85.0511  # the latitude where the Web-Mercator square ends
RENDERS = "renders"  # the results folder's subfolder of renders
TEMP_RENDERS = "geovqa_renders"  # the temporary folder's, when the results folder cannot be written


def layer_file_path(layer) -> str | None:
    """The local file behind a GDAL raster layer, or None for anything the engine can't open.

    A table of a GeoPackage holding several rasters, or a NetCDF/HDF subdataset, is not its
    container file (the engine would read another raster or none): None, so it is rendered.
    So is a file placed by RPCs, or by GCPs that need a real warp (:func:`georef.needs_warp`:
    no affine fits them, or GDAL's warp of them strays from that fit): the engine refuses those
    ("warp it first"), while a render is QGIS's own warped view of them."""
    if layer is None or layer.providerType() not in LOCAL_FILE_PROVIDERS:
        return None
    try:
        parts = QgsProviderRegistry.instance().decodeUri(layer.providerType(), layer.source())
        path = parts.get("path") or layer.source()
        sub = parts.get("layerName")
    except Exception:  # noqa: BLE001 - any decoding failure just means "not a plain file"
        path, sub = layer.source(), None
    if isinstance(sub, str) and sub:
        return None
    if not path or not os.path.isfile(path):
        return None
    # absolute: a layer loaded from a relative path (`qgis_process run ... INPUT=r.tif`) is read
    # by the engine, in another folder, which refuses relative paths
    path = os.path.abspath(path)
    ds = open_with_gdal(path)
    return None if ds is not None and needs_warp(ds) else path


def is_web_layer(layer) -> bool:
    """A web map service layer (WMS, WMTS, XYZ tiles, ArcGIS MapServer, WCS)."""
    return layer is not None and layer.providerType() in WEB_PROVIDERS


def covers_the_world(layer) -> bool:
    """True for a web map service (XYZ or WMTS tiles, a world-wide WMS) whose extent spans most
    of the world (:data:`WORLD_SHARE` of -180..180 degrees of longitude and of the Web-Mercator
    square's -85..85 of latitude): rendered whole, it would be a picture of the planet at
    kilometres a pixel. A service of a region, a polar service (its box in degrees spans every
    longitude but few latitudes), and any layer that is no web service (a VRT, a GeoPackage
    table), is not."""
    if not is_web_layer(layer):
        return False
    ext, crs = layer.extent(), layer.crs()
    if ext.isEmpty() or not crs.isValid():
        return False
    try:
        if not crs.isGeographic():
            wgs84 = QgsCoordinateReferenceSystem("EPSG:4326")
            ext = QgsCoordinateTransform(crs, wgs84, QgsProject.instance().transformContext()).transformBoundingBox(ext)
    except Exception:  # noqa: BLE001 - QgsCsException: an extent past the CRS's own bounds
        return False
    return (min(ext.width(), 360.0) >= WORLD_SHARE * 360.0
            and min(ext.height(), 2 * WEB_MERCATOR_MAX_LAT) >= WORLD_SHARE * 2 * WEB_MERCATOR_MAX_LAT)


def native_pixel_size(layer) -> float | None:
    """The size of ``layer``'s own pixels in its CRS units, or None when it has none: a web
    service (:data:`WEB_PROVIDERS`), or a provider that reports no width and height. Renders
    have square pixels: for non-square ones this is the finer side, so none of the layer's
    detail is lost (the coarser side is resampled to it)."""
    if layer is None or is_web_layer(layer):
        return None
    try:
        cols, rows, ext = layer.width(), layer.height(), layer.extent()
    except Exception:  # noqa: BLE001 - not a raster layer
        return None
    if cols <= 0 or rows <= 0 or ext.width() <= 0 or ext.height() <= 0:
        return None
    return min(ext.width() / cols, ext.height() / rows)


def output_size(extent: QgsRectangle, max_px: int, pixel_size: float | None = None,
                max_pixels: int | None = None) -> QSize:
    """The render's size in pixels for ``extent``: longest side ``max_px``, but pixels no
    smaller than ``pixel_size`` (the layer's own, in the extent's units; None: no such limit),
    and no more than about ``max_pixels`` pixels in all (the engine's ``max_read_pixels``; None:
    no such limit), aspect kept, as :func:`upload.reduced_size` reduces an upload."""
    w, h = extent.width(), extent.height()
    if w <= 0 or h <= 0:
        raise ValueError("The extent to render is empty.")
    scale = max_px / max(w, h)
    if pixel_size is not None and pixel_size > 0:
        scale = min(scale, 1.0 / pixel_size)
    # a hair under: 640 m of 10 m pixels is 64 pixels, not 65 from a rounding error
    size = (max(1, int(math.ceil(w * scale - 1e-6))), max(1, int(math.ceil(h * scale - 1e-6))))
    return QSize(*(reduced_size(size, max_pixels) or size))


def limit_to_budget(settings: QgsMapSettings, extent: QgsRectangle, max_px: int, pixel_size: float | None,
                    max_pixels: int | None) -> bool:
    """Make the render ``settings`` (of :func:`map_settings` over ``extent``, *Render size*
    ``max_px``, the layer's ``pixel_size``) hold no more than about ``max_pixels`` pixels (the
    engine's ``max_read_pixels``; None: not known), aspect kept (:func:`output_size`); whether
    that made it smaller."""
    if not max_pixels:
        return False
    size = output_size(extent, max_px, pixel_size, max_pixels)
    if size == settings.outputSize():
        return False
    settings.setOutputSize(size)
    return True


def size_note(size: QSize, capped: bool, max_pixels: int | None) -> str:
    """A render's ``size`` for the user, and, when the engine's read budget ``max_pixels``
    ``capped`` it, why it is no larger."""
    text = f"{size.width()} x {size.height()} px"
    if capped and max_pixels:
        text += (f", no more than the {max_pixels:,} pixels the engine reads of a raster (its "
                 "max_read_pixels: it would read a larger render reduced to that)")
    return text


def map_settings(layer, extent: QgsRectangle, max_px: int) -> QgsMapSettings:
    """Render ``layer`` alone in its own CRS over ``extent`` (layer CRS), longest side ``max_px``
    and never finer than the layer's own pixels (:func:`native_pixel_size`); the engine's read
    budget is applied by :func:`limit_to_budget`."""
    ms = QgsMapSettings()
    ms.setLayers([layer])
    ms.setDestinationCrs(layer.crs())
    ms.setOutputSize(output_size(extent, max_px, native_pixel_size(layer)))
    ms.setExtent(extent)
    ms.setBackgroundColor(QColor(0, 0, 0, 0))
    return ms


def image_to_rgba(image: QImage) -> np.ndarray:
    img = image.convertToFormat(FORMAT_RGBA)
    w, h = img.width(), img.height()
    ptr = img.constBits()
    ptr.setsize(img.bytesPerLine() * h)
    arr = np.frombuffer(ptr, dtype=np.uint8).reshape(h, img.bytesPerLine())
    return arr[:, : w * 4].reshape(h, w, 4).copy()


def write_geotiff(rgba: np.ndarray, extent: QgsRectangle, crs_wkt: str, path: str) -> str:
    """Write RGB bands with a north-up geotransform; what QGIS drew transparent (alpha 0) is 0
    in the bands and masked out by an internal per-dataset mask (inside the TIFF), so that the
    engine, which honours GDAL masks, reads it as nodata and not as black image (keeping tokens
    there and drawing heatmap cells and anchors over an area where the layer shows nothing).
    No mask when every pixel was drawn. Worker-thread safe."""
    from osgeo import gdal

    h, w = rgba.shape[:2]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    alpha = rgba[:, :, 3]
    transparent = alpha == 0
    # the mask inside the TIFF (GDAL < 3.9 writes an .msk beside it by default, which an upload
    # to a remote engine would not send). Thread-local: other GDAL users in QGIS are not affected.
    previous = gdal.GetThreadLocalConfigOption("GDAL_TIFF_INTERNAL_MASK", None)
    gdal.SetThreadLocalConfigOption("GDAL_TIFF_INTERNAL_MASK", "YES")
    try:
        ds = gdal.GetDriverByName("GTiff").Create(str(path), w, h, 3, gdal.GDT_Byte, ["COMPRESS=DEFLATE"])
        if ds is None:
            raise OSError(f"GDAL could not create {path}.")
        ds.SetGeoTransform((extent.xMinimum(), extent.width() / w, 0.0, extent.yMaximum(), 0.0,
                            -extent.height() / h))
        ds.SetProjection(crs_wkt)
        for b in range(3):
            band = rgba[:, :, b].copy()
            band[transparent] = 0
            ds.GetRasterBand(b + 1).WriteArray(band)
        if transparent.any():
            if ds.CreateMaskBand(gdal.GMF_PER_DATASET) != 0:
                raise OSError(f"GDAL could not add a mask to {path}: {gdal.GetLastErrorMsg()}")
            mask = ds.GetRasterBand(1).GetMaskBand()
            mask.WriteArray(np.where(transparent, 0, 255).astype(np.uint8))
        ds.FlushCache()
        ds = None
    finally:
        gdal.SetThreadLocalConfigOption("GDAL_TIFF_INTERNAL_MASK", previous)
    return str(path)


def render_file(results_dir, name: str) -> Path:
    """Where a render for ``name`` (a question, a layer) is written: the results folder's
    ``renders``, or a temporary folder when that cannot be made or written (a render is only
    what the engine is sent: the answer is not lost for it; its layers then say the folder).
    Writable means a file could be made there just now (:func:`paths.write_error`; ``os.access``
    lets every folder pass on Windows)."""
    folder = Path(results_dir) / RENDERS
    try:
        folder.mkdir(parents=True, exist_ok=True)
        usable = write_error(folder) is None
    except OSError:
        usable = False
    if not usable:
        folder = Path(tempfile.gettempdir()) / TEMP_RENDERS
    return folder / f"{file_stem(name)}_render.tif"


class NothingRendered(ValueError):
    """A render without a single drawn pixel: a web service that did not answer (QGIS draws
    nothing then, without an error) or one that does not cover the extent."""

    def __init__(self, layer_name: str):
        super().__init__(f"The layer '{layer_name}' rendered nothing over this extent "
                         "(is the service reachable, and does it cover the area?).")


def rendered_rgba(image: QImage, layer_name: str) -> np.ndarray:
    """The RGBA pixels of a render of the layer ``layer_name``; raises :class:`NothingRendered`
    when no pixel was drawn."""
    rgba = image_to_rgba(image)
    if rgba[:, :, 3].max() == 0:
        raise NothingRendered(layer_name)
    return rgba


def render_image(settings: QgsMapSettings, feedback=None) -> QImage | None:
    """Draw ``settings`` into a new transparent image with ``QgsMapRendererCustomPainterJob``, in
    the calling thread, which waits for it: any thread, as long as nothing else uses the
    settings' layers meanwhile (:class:`PreparedRender` gives them a clone). ``feedback`` (a
    QgsFeedback): its Cancel stops the job; None is returned then."""
    image = QImage(settings.outputSize(), FORMAT_ARGB32)
    image.fill(0)
    painter = QPainter(image)
    job = QgsMapRendererCustomPainterJob(settings, painter)
    try:
        if feedback is None:
            job.renderSynchronously()
            return image
        # Cancel is pressed on the main thread while this one waits for the job: a direct
        # connection stops the job from there (cancelWithoutBlocking only raises its flags)
        feedback.canceled.connect(job.cancelWithoutBlocking, Qt.ConnectionType.DirectConnection)
        try:
            if feedback.isCanceled():
                return None
            job.start()
            if feedback.isCanceled():  # pressed between the check and the start
                job.cancelWithoutBlocking()
            job.waitForFinished()
        finally:
            try:
                feedback.canceled.disconnect(job.cancelWithoutBlocking)
            except TypeError:
                pass
        return None if feedback.isCanceled() else image
    finally:
        painter.end()


def render_sync(layer, extent: QgsRectangle, path: str, max_px: int = 2048) -> tuple:
    """Render and write in the calling thread, with ``layer`` itself: (path, visible extent).
    Raises :class:`NothingRendered` (nothing written) when no pixel was drawn."""
    return PreparedRender(layer, extent, path, max_px, clone=False).run()


class PreparedRender:
    """A render of ``layer`` over ``extent`` to the GeoTIFF ``path``, made ready in one thread and
    run in another, as QGIS's ``native:rasterize`` does: Processing makes it in prepareAlgorithm
    (main thread), where the map settings are built (:func:`map_settings`) with a clone of the
    layer, and runs it (:meth:`run`) in processAlgorithm, in the task's thread, where only this
    render uses the clone. Whoever makes it keeps it (and so the clone) alive until the run ended.

    ``clone=False``, or a layer that gives no valid clone: the settings hold the layer itself,
    which only the main thread may use (``movable`` is False: run it there). The engine's read
    budget, learnt later, is applied by :meth:`limit_pixels`."""

    def __init__(self, layer, extent: QgsRectangle, path: str, max_px: int = 2048, clone: bool = True):
        self.name = layer.name()
        self.path = str(path)
        self.crs_wkt = layer.crs().toWkt()
        # every raster provider is drawn off the main thread by QGIS's own map canvas (parallel
        # render jobs), so any valid clone can be; a clone is the layer read anew from its
        # source (a web service's clone may ask for its capabilities again, as native:rasterize's)
        self.clone = layer.clone() if clone else None
        if self.clone is not None and not self.clone.isValid():
            self.clone = None
        self.movable = self.clone is not None
        drawn = self.clone if self.movable else layer
        self.settings = map_settings(drawn, extent, max_px)
        self._size_args = (QgsRectangle(extent), int(max_px), native_pixel_size(drawn))

    def limit_pixels(self, max_pixels: int | None) -> bool:
        """Make the render no larger than about ``max_pixels`` pixels (the engine's
        ``max_read_pixels``, learnt after the render was made ready; None: no change), aspect
        kept (:func:`limit_to_budget`); whether that made it smaller. Before :meth:`run` only."""
        return limit_to_budget(self.settings, *self._size_args, max_pixels)

    def run(self, feedback=None) -> tuple | None:
        """Render and write: (path, visible extent), or None when ``feedback`` was cancelled
        (nothing written). Raises :class:`NothingRendered` (nothing written) when no pixel was
        drawn, OSError when the GeoTIFF could not be written."""
        image = render_image(self.settings, feedback)
        if image is None:
            return None
        rgba = rendered_rgba(image, self.name)
        visible = self.settings.visibleExtent()
        return write_geotiff(rgba, visible, self.crs_wkt, self.path), visible


class _WriteTask(QgsTask):
    """Turns a rendered image into RGBA pixels (:func:`rendered_rgba`: 0.3 to 1.6 s for a
    16384 px render) and writes them as a GeoTIFF (:func:`write_geotiff`), both in the task's
    worker thread, never on the main thread that rendered it. Cancelled between the two, nothing
    is written. ``error`` says why it failed: nothing drawn, or the file not written."""

    def __init__(self, image, layer_name, extent, crs_wkt, path):
        super().__init__("GeoVQA: write rendered raster", CAN_CANCEL)
        # a QImage is implicitly shared (its copy is the map job's pixels, not a new buffer) and
        # reentrant: this thread only reads it
        self.args = (image, layer_name, extent, crs_wkt, path)
        self.error = ""

    def run(self) -> bool:
        image, layer_name, extent, crs_wkt, path = self.args
        try:
            rgba = rendered_rgba(image, layer_name)
            if self.isCanceled():
                return False
            write_geotiff(rgba, extent, crs_wkt, path)
        except NothingRendered as exc:
            self.error = str(exc)
            return False
        except Exception as exc:  # noqa: BLE001 - reported to the user by the owner
            self.error = f"Could not write the rendered raster: {exc}"
            return False
        finally:
            # the image and its RGBA copy (4 x render_max_px^2 bytes each): not kept with the task
            self.args = None
        return True


class LayerRenderer(QObject):
    """Asynchronous render of one layer's extent to a GeoTIFF; emits ``done(path, error)`` once.

    A renderer lets go of itself: once ``done`` was emitted, or once it was cancelled (after its
    map job ended), it drops its write task and ``deleteLater()``s itself, with its map job (its
    child: the rendered image, 4 x render_max_px^2 bytes, goes with it). An owner that keeps
    asking (the dock, the batch dialog) so holds no render of an earlier question. Nothing is
    emitted after ``done`` or :meth:`cancel`; calling :meth:`cancel` again, or after ``done``, is
    harmless.

    ``max_pixels``: the engine's ``max_read_pixels`` when known (:func:`output_size`);
    :attr:`capped` is true when that budget made the render smaller, and :attr:`size_note` says
    the render's size for the user, and why when it was capped."""

    done = pyqtSignal(str, str)

    def __init__(self, layer, extent: QgsRectangle, path: str, max_px: int = 2048, parent=None,
                 max_pixels: int | None = None):
        super().__init__(parent)
        self.layer = layer
        self.path = str(path)
        self.settings = map_settings(layer, extent, max_px)
        self.capped = limit_to_budget(self.settings, extent, max_px, native_pixel_size(layer), max_pixels)
        self.size_note = size_note(self.settings.outputSize(), self.capped, max_pixels)
        self.crs_wkt = layer.crs().toWkt()
        self.job = None
        self.task = None
        self.released = False

    def start(self) -> None:
        self.job = QgsMapRendererParallelJob(self.settings)
        # the renderer's child: deleted with it, never by dropping a reference, and so never
        # inside its own finished() signal
        self.job.setParent(self)
        self.job.finished.connect(self._rendered)
        self.job.start()

    def cancel(self) -> None:
        """Stop; nothing is emitted afterwards (the owner may be unloading: the renderer, its
        child, is deleted with it before the write task ends). Safe to call at any time, also
        after the render ended and the task manager deleted its write task, and after the
        renderer let go of itself."""
        if self.released:
            return
        self._drop_task(cancel=True)
        job = self.job
        if job is not None:
            try:
                job.finished.disconnect(self._rendered)
            except TypeError:
                pass
            if job.isActive():
                # its worker threads still draw: the renderer (and the job, its child) goes once
                # the job has stopped (finished() comes then), not while it runs
                job.finished.connect(self._release)
                job.cancelWithoutBlocking()
                return
        self._release()

    def _drop_task(self, cancel: bool) -> None:
        task, self.task = self.task, None
        if task is None:
            return
        try:
            for signal, slot in ((task.taskCompleted, self._written), (task.taskTerminated, self._not_written)):
                try:
                    signal.disconnect(slot)
                except TypeError:
                    pass
            if cancel:
                task.cancel()
        except RuntimeError:  # "wrapped C/C++ object has been deleted": it ended, nothing to stop
            pass

    def _release(self) -> None:
        """Let go of everything: the write task, the job (deleted with the renderer) and the
        renderer itself (deleteLater: a slot connected to ``done`` may still run on it)."""
        if self.released:
            return
        self.released = True
        self._drop_task(cancel=False)
        self.job = None  # owned by the renderer (its child)
        self.deleteLater()

    def _finish(self, path: str, error: str) -> None:
        if self.released:
            return
        self.done.emit(path, error)
        self._release()

    def _rendered(self) -> None:
        # the image's RGBA copy, and the check that anything was drawn, are made in the write
        # task's thread: seconds for a large render, which froze QGIS here
        self.task = _WriteTask(self.job.renderedImage(), self.layer.name(), self.settings.visibleExtent(),
                               self.crs_wkt, self.path)
        # bound methods (not lambdas), so cancel() can disconnect them
        self.task.taskCompleted.connect(self._written)
        self.task.taskTerminated.connect(self._not_written)
        QgsApplication.taskManager().addTask(self.task)

    def _written(self) -> None:
        self._finish(self.path, "")

    def _not_written(self) -> None:
        self._finish("", (self.task.error if self.task is not None else "") or "Rendering was cancelled.")
