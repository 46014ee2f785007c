"""The pixel reading of a raster window: GDAL's block cache bounded, bands of mixed types read
into one array, large reads in row strips with a cancel check between them, the NaN GDAL's
average spreads in a reduced read mended through a VRT with NaN as nodata, and the percentile
stretch of a band to 0..255. engine/raster.py's docstring says when each applies.
"""

from __future__ import annotations

import contextlib
import math
import os

import numpy as np

PERCENTILES = (2.0, 98.0)
_STATS_SAMPLE = 4_000_000  # percentiles from at most about this many valid pixels per band
# a read through more source pixels than this (at full resolution) goes in row strips of about
# STRIP_PIXELS source pixels each, with a cancel check between them
STRIP_SOURCE_PIXELS = 1 << 24
STRIP_PIXELS = 1 << 22


# GDAL's block cache while a raster is read: its default (5% of RAM) added a gigabyte and more to
# a reduced read of a 27,000 px raster, which reads every block once anyway. GDAL_CACHEMAX set by
# the user wins.
READ_CACHE_BYTES = 256 * 2**20


def read_cache():
    """A rasterio.Env bounding GDAL's block cache for one read (none when GDAL_CACHEMAX is set)."""
    import rasterio

    if os.environ.get("GDAL_CACHEMAX"):
        return contextlib.nullcontext()
    return rasterio.Env(GDAL_CACHEMAX=READ_CACHE_BYTES)


def stretch_band(band: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
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


def check_cancel(cancel) -> None:
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


def read_window(src, band_numbers, window, shape, resampling, cancel=None):
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
        check_cancel(cancel)
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


def mend_spread_nan(src, path, band_numbers, data, masks, window, shape, resampling,
                    cancel) -> None:
    """In place: the pixels of a reduced read's float bands that hold NaN GDAL spread
    (`_nan_spread`), read again with NaN skipped as missing (see engine/raster.py, Validity). Only
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
                check_cancel(cancel)
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
