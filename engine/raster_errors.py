"""The errors of reading a raster: `RasterError` and its subclasses, one per cause.

Each carries `.code`, the protocol error code (engine/protocol.py ERROR_CODES) a server answers
with, and a message for a person saying why and what to do.
"""

from __future__ import annotations


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


class NeedsWarpError(RasterError):
    """The raster is placed on the map by ground control points or RPCs that no affine transform
    honours: only a warp puts its pixels where GIS software shows them."""

    code = "raster_unreadable"
