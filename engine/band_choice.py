"""Which source bands become the R, G and B the model sees: the caller's choice, else the
bands tagged red, green and blue, else the first three non-alpha ones; grey for one band, a
paletted band's colour table; alpha bands (transparency masks) are never shown.
"""

from __future__ import annotations

import numpy as np

from .raster_errors import BandError


def choose_bands(src, bands) -> tuple[tuple[int, int, int], bool]:
    """Return (bands per channel, use_palette)."""
    from rasterio.enums import ColorInterp

    n = src.count
    if bands is not None:
        if isinstance(bands, (int, np.integer)):
            bands = [bands]
        try:
            req = [int(b) for b in bands]
            # (int() takes 1.5 for band 1: a number that is not whole names no band)
            whole = all(r == b for r, b in zip(req, bands) if isinstance(b, (float, np.floating)))
        except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: infinity
            raise BandError(f"Bands must be 1-based band numbers, got {bands!r}.") from exc
        if not whole:
            raise BandError(f"Bands must be 1-based band numbers, got {bands!r}.")
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
