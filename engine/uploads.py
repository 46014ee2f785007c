"""Raster inputs reaching the server: local paths checked read-only, uploads streamed to disk.

A local path must be an existing regular file (a GDAL raster or a .vrt) that rasterio can open
read-only, and whose georeferencing the engine can honour (a raster placed by ground control
points that need a warp, or by RPCs alone, is refused: see engine.georeferencing). An
uploaded GeoTIFF (multipart part ``raster``) is streamed to a temporary file while
its size is counted, refused with ``upload_too_large`` as soon as it passes the limit, and then
verified to be a GeoTIFF rasterio can read. The caller deletes the temporary directory when the
job is over.

What the engine says about an upload names it "the uploaded raster" (`name_upload`,
`Upload.public`), never the temporary file: that path means nothing to the client and tells it
how the engine's disk is laid out. This holds for the checks here, the request checks and the
errors of the question itself (the server gives the job `Upload.public`). Coordinates in those
messages (a pixel window, the raster's size) are the uploaded file's: for a client that uploads a
cut of its raster (the QGIS plugin), they are relative to the cut.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import stat
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

from engine.jobs import JobError
from engine.json_body import parse_json

MAX_JSON_PART_BYTES = 1024 * 1024
UPLOAD_NAME = "the uploaded raster"  # what messages about an upload call it
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


@dataclass
class RasterInfo:
    """What the server needs to know about a raster before queueing it."""

    path: str
    width: int
    height: int
    count: int
    bounds: tuple[float, float, float, float]  # min x, min y, max x, max y in the raster's CRS
    crs_wkt: str | None
    alpha: frozenset = frozenset()  # 1-based numbers of the bands tagged alpha (band_choice.alpha_bands)


def check_raster_file(path: str | os.PathLike, *, geotiff_only: bool = False) -> RasterInfo:
    """Open `path` read-only and describe it, or raise JobError with a readable reason."""
    import rasterio  # the engine's dependency; imported late to keep module import cheap
    from rasterio.errors import RasterioIOError

    from engine.band_choice import alpha_bands
    from engine.georeferencing import footprint_bounds
    from engine.raster_open import gdal_detail

    shown = str(path)
    if "\x00" in shown:  # JSON allows it; no file name holds it (stat raises ValueError)
        raise JobError("bad_request", f"The raster path {shown!r} holds a NUL character; no file has such a name.")
    p = Path(path).expanduser()
    if not p.is_absolute():
        raise JobError("bad_request", f"The raster path {shown!r} must be an absolute path.")
    try:
        # (stat raises, rather than says False, for a folder the engine may not enter or a name
        # longer than the file system takes)
        st = p.stat()
    except FileNotFoundError:
        raise JobError("raster_unreadable", f"There is no file at {shown}.",
                       "Check the path; the engine reads files on its own host.") from None
    except OSError as exc:
        raise JobError("raster_unreadable", f"The engine cannot reach {shown}: "
                       f"{exc.strerror or _short(exc)}.",
                       "Check the path and that the engine's user may read its folders.") from None
    if stat.S_ISDIR(st.st_mode):
        raise JobError("not_a_raster", f"{shown} is a folder, not a raster file.")
    if not stat.S_ISREG(st.st_mode):
        raise JobError("not_a_raster", f"{shown} is not a regular file.")
    if not os.access(p, os.R_OK):
        raise JobError("raster_unreadable", f"The engine may not read {shown} (permission denied).")
    try:
        with open(p, "rb") as fh:
            looks_tiff = fh.read(4) in TIFF_MAGIC
    except OSError as exc:
        raise JobError("raster_unreadable", f"{shown} cannot be read: {exc.strerror or _short(exc)}.") from None
    if geotiff_only and not looks_tiff:
        raise JobError("not_a_raster", "The uploaded file is not a GeoTIFF.",
                       "Upload the layer as a GeoTIFF (.tif).")
    try:
        kwargs = {"driver": "GTiff"} if geotiff_only else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NotGeoreferencedWarning: a plain image is welcome
            ds = rasterio.open(p, "r", **kwargs)
        with ds:
            if ds.count < 1 or ds.width < 1 or ds.height < 1:
                raise JobError("not_a_raster", f"{shown} has no raster bands.")
            transform, crs_wkt = _placement(ds)
            info = RasterInfo(str(p), ds.width, ds.height, ds.count,
                              footprint_bounds(transform, ds.width, ds.height), crs_wkt,
                              frozenset(alpha_bands(ds)))
            # read one pixel: a header that opens but data that does not is unreadable
            ds.read(1, window=((0, 1), (0, 1)))
            return info
    except JobError:
        raise
    except RasterioIOError as exc:
        if looks_tiff or p.suffix.lower() == ".vrt":
            raise JobError("raster_unreadable", f"{shown} looks like a raster but cannot be read: "
                           f"{_short(gdal_detail(exc))}") from exc
        raise JobError("not_a_raster", f"{shown} is not a raster that GDAL can open.",
                       "Check that the layer's file is a raster image (it may have been replaced or "
                       "damaged since it was loaded), or export it as GeoTIFF and ask again.") from exc
    except Exception as exc:  # noqa: BLE001 - GDAL raises many kinds
        raise JobError("raster_unreadable", f"{shown} cannot be read: {_short(gdal_detail(exc))}") from exc


def _placement(ds) -> tuple:
    """(transform, CRS WKT) the engine will read `ds` with (GCPs fitted, see
    engine.georeferencing.georeferencing), or JobError when the raster needs a warp first:
    refused here, before a question is queued or a model loaded."""
    from engine.georeferencing import georeferencing
    from engine.raster_errors import RasterError

    try:
        transform, crs_wkt, _ = georeferencing(ds)
    except RasterError as exc:
        raise JobError(exc.code, str(exc)) from None  # the message says what to do
    return transform, crs_wkt


def name_upload(text: str | None, raster_path: str | os.PathLike,
                temp_dir: str | os.PathLike | None = None) -> str | None:
    """`text` (a message or hint about the upload stored at `raster_path`) with that path, quoted
    or not, replaced by "the uploaded raster", capitalised where it begins a sentence; a gdalwarp
    command naming it gets the placeholder ``<raster.tif>``; anything else in `temp_dir` is "the
    upload's folder". GDAL's own texts quoted in a message are covered too."""
    if not text:
        return text
    path = os.fspath(raster_path)
    out = re.sub(re.escape(f"'{path}'") + r"(?= warped\.tif)", "<raster.tif>", text)
    for form in (f"'{path}'", f'"{path}"', path):
        out = out.replace(form, UPLOAD_NAME)
    if temp_dir is not None:
        out = out.replace(os.fspath(temp_dir), "the upload's folder")
    return re.sub(r"(^|[.!?]\s+)" + UPLOAD_NAME,
                  lambda m: m.group(1) + UPLOAD_NAME[0].upper() + UPLOAD_NAME[1:], out)


def _named_upload(err: JobError, raster_path, temp_dir=None) -> JobError:
    """`err` with its message and hint naming the upload (`name_upload`); code and extra fields
    kept."""
    return JobError(err.code, name_upload(err.message, raster_path, temp_dir),
                    name_upload(err.hint, raster_path, temp_dir), **err.extra)


def _short(exc: BaseException | str) -> str:
    """The first line of an error (or of a message), at most 300 characters."""
    if isinstance(exc, str):
        return exc.strip().splitlines()[0][:300] if exc.strip() else "unknown error"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]


# ---------------------------------------------------------------------------------------------
# Streamed multipart upload


@dataclass
class Upload:
    request: dict
    raster_path: Path
    temp_dir: Path
    sha256: str = ""  # of the raster's bytes: the same raster uploaded again is the same raster

    def cleanup(self) -> None:
        remove_upload_folder(self.temp_dir)

    async def cleanup_off_loop(self) -> None:
        """`cleanup` from the event loop (`remove_upload_folder_off_loop`)."""
        await remove_upload_folder_off_loop(self.temp_dir)

    def public(self, err: JobError) -> JobError:
        """`err` as the client is told it: naming "the uploaded raster", not the temporary file
        (`name_upload`)."""
        return _named_upload(err, self.raster_path, self.temp_dir)


def remove_upload_folder(temp_dir: Path) -> None:
    """Remove an upload's temporary folder and the raster in it (gone already: nothing to do)."""
    shutil.rmtree(temp_dir, ignore_errors=True)


async def remove_upload_folder_off_loop(temp_dir: Path) -> None:
    """`remove_upload_folder` in a worker thread: deleting a raster of gigabytes can take a
    while on some file systems, and the event loop serves every other stream meanwhile. Shielded:
    a request cancelled while it runs still has its folder removed."""
    await asyncio.shield(asyncio.to_thread(remove_upload_folder, temp_dir))


async def receive_upload(content_type: str, body: AsyncIterator[bytes], *, max_bytes: int,
                         temp_root: Path | None = None) -> Upload:
    """Parse a multipart body with a JSON ``request`` part and a ``raster`` file part.

    The raster is written to a fresh temporary directory; more than `max_bytes` raises
    JobError('upload_too_large') at once and removes what was written.
    """
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise JobError("bad_request", "Send a JSON body or multipart/form-data with a 'request' "
                       "part and a 'raster' file part.")
    digest = hashlib.sha256()
    state: dict = {"name": None, "header_field": b"", "header_value": b"", "headers": {},
                   "raster_bytes": 0, "json": bytearray(), "seen_raster": False, "error": None,
                   "parts": set()}

    def on_part_begin() -> None:
        state["headers"] = {}
        state["name"] = None

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["header_field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["header_value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["header_field"].lower()] = state["header_value"]
        state["header_field"] = b""
        state["header_value"] = b""

    def on_headers_finished() -> None:
        _, disp = parse_options_header(state["headers"].get(b"content-disposition", b""))
        state["name"] = disp.get(b"name", b"").decode("utf-8", "replace")
        if state["name"] in ("raster", "request"):
            # a second part of the same name would be appended to the first (two rasters
            # joined into one file, two JSON objects into one text)
            if state["name"] in state["parts"] and state["error"] is None:
                state["error"] = JobError("bad_request", f"The upload has more than one "
                                          f"'{state['name']}' part; send one raster a request.")
            state["parts"].add(state["name"])
        if state["name"] == "raster":
            state["seen_raster"] = True

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["error"] is not None:
            return
        chunk = data[start:end]
        if state["name"] == "raster":
            state["raster_bytes"] += len(chunk)
            if state["raster_bytes"] > max_bytes:
                state["error"] = JobError(
                    "upload_too_large",
                    f"The uploaded raster is larger than the limit of {_mib(max_bytes)}.",
                    "Clip the layer to the area of interest before uploading, or run the engine "
                    "on the same computer so it can read the file directly.")
                return
            try:
                raster_fh.write(chunk)  # opened below, before the parser sees any data
            except OSError as exc:  # the engine's disk, not the client's data
                state["error"] = JobError(
                    "internal", f"The engine could not store the upload: {exc.strerror or exc}.",
                    "Free space on the engine's disk (its --state-dir), or start it with a "
                    "--state-dir on a larger disk.")
                return
            digest.update(chunk)
        elif state["name"] == "request":
            state["json"] += chunk
            if len(state["json"]) > MAX_JSON_PART_BYTES:
                state["error"] = JobError("bad_request", "The 'request' part is too large.")

    try:  # before anything is written: a bad boundary leaves nothing behind
        parser = MultipartParser(boundary, {
            "on_part_begin": on_part_begin, "on_part_data": on_part_data,
            "on_header_field": on_header_field, "on_header_value": on_header_value,
            "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
        })
    except Exception as exc:  # python_multipart.FormParserError (a ValueError), e.g. too long
        raise JobError("bad_request", f"The multipart boundary is not usable: {_short(exc)}") \
            from None
    if temp_root is not None:
        temp_root.mkdir(parents=True, exist_ok=True)
    temp_dir = Path(tempfile.mkdtemp(prefix="upload-", dir=temp_root))
    raster_path = temp_dir / "raster.tif"
    try:
        raster_fh = open(raster_path, "wb")
        try:
            async for chunk in body:
                parser.write(chunk)
                if state["error"] is not None:
                    raise state["error"]
            parser.finalize()
        except JobError:
            raise
        except Exception as exc:  # malformed multipart
            raise JobError("bad_request", f"The upload is not valid multipart data: {_short(exc)}")
        finally:
            raster_fh.close()
        if not state["seen_raster"] or state["raster_bytes"] == 0:
            raise JobError("bad_request", "The upload has no 'raster' file part (or it is empty).")
        # the parse (up to MAX_JSON_PART_BYTES of JSON) and GDAL's open and one-pixel read run in
        # a worker thread: on the event loop they would stall every other stream and /health
        request = (await asyncio.to_thread(parse_json, bytes(state["json"]), "The 'request' part")
                   if state["json"] else None)
        if not isinstance(request, dict):
            raise JobError("bad_request", "The upload needs a 'request' part with a JSON object.")
        try:
            await asyncio.to_thread(check_raster_file, raster_path, geotiff_only=True)
        except JobError as exc:
            raise _named_upload(exc, raster_path, temp_dir) from None
        return Upload(request, raster_path, temp_dir, digest.hexdigest())
    except BaseException:
        await remove_upload_folder_off_loop(temp_dir)
        raise


def _mib(n: int) -> str:
    if n >= 1024**3:
        return f"{n / 1024**3:.1f} GiB"
    if n >= 1024**2:
        return f"{n / 1024**2:.1f} MiB"
    return f"{n / 1024:.0f} KiB"
