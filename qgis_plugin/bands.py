"""Which bands of a raster the model sees: the ones the user sees in QGIS.

The engine shows the model three bands as red, green and blue, or one band as grey (the request's
``bands``, engine/protocol.py ASK_FIELDS). Left out, it chooses by itself (the bands tagged red,
green, blue, else the first three), which on an 8-band scene styled 4,3,2 in QGIS is not what
the user looks at. So for a layer sent as its file, the request names the bands of the layer's
renderer (:func:`layer_bands`); a layer that is rendered first (a web or virtual layer) is
already the user's view in RGB and gets none. The ``result`` event says which bands the model
saw (``bands``, ``palette``); :func:`bands_text` and :func:`bands_cell` put it in words for the
dock's line under an answer, the batch tables and the Processing log.

Bands keep their numbers in an upload to a remote engine: the cut or conversion
(:mod:`upload`) keeps every band, in order.
"""

from __future__ import annotations

# QgsRasterRenderer.type() of the renderers whose bands are sent (the strings QGIS saves in a
# .qml; the same from QGIS 3.22 to 4.x)
MULTIBAND = "multibandcolor"
SINGLE_BAND = ("singlebandgray", "singlebandpseudocolor")


# the bands sent for a render of a layer (qgis_plugin/render.py): its red, green and blue as QGIS
# drew them, named, so an engine running an adapter trained on other bands (a BGR or NIR order)
# does not reorder a picture that is RGB already
RENDER_BANDS = [1, 2, 3]


def layer_bands(layer) -> list | None:
    """The 1-based bands ``layer`` (a raster layer read from its file) shows, for the request's
    ``bands``: ``[red, green, blue]`` of a *Multiband color* renderer when all three are set;
    ``[band]`` of *Singleband gray* or *Singleband pseudocolor* (the engine shows one band as
    grey). None, so the engine chooses, for anything else: a *Paletted/Unique values* renderer
    (the engine uses the file's colour table), a channel set to *not set*, other renderers
    (hillshade, contours, ...), no renderer, a band the layer does not have, and a *Multiband
    color* style at odds with the file's colour tags (:func:`_default_style_against_the_tags`)."""
    renderer = layer.renderer() if layer is not None else None
    if renderer is None:
        return None
    kind = renderer.type()
    try:
        if kind == MULTIBAND:
            bands = [renderer.redBand(), renderer.greenBand(), renderer.blueBand()]
        elif kind in SINGLE_BAND:
            bands = list(renderer.usesBands())  # [band]; grayBand()/band() were renamed after 3.22
            if len(bands) != 1:
                return None
        else:
            return None
        bands = [int(b) for b in bands]
    except (AttributeError, TypeError, ValueError):
        return None
    count = layer.bandCount()
    if not all(1 <= b <= count for b in bands):  # -1: a channel "not set"
        return None
    if kind == MULTIBAND and _default_style_against_the_tags(layer, renderer, bands):
        return None
    return bands


def _default_style_against_the_tags(layer, renderer, bands) -> bool:
    """True when a *Multiband color* style shows what the file's colour tags say is no colour
    image: one of its bands is the alpha band (its own alpha band, or a band tagged alpha), or
    it is QGIS's default choice 1, 2, 3 while the file tags other bands red, green and blue (QGIS
    3.22's default style ignores the tags: a BGR file would be seen with red and blue swapped, an
    alpha-first file with its alpha as red). The engine's own choice follows the tags."""
    try:
        alpha = renderer.alphaBand()
        names = [layer.dataProvider().colorInterpretationName(b) for b in range(1, layer.bandCount() + 1)]
    except (AttributeError, TypeError, ValueError):
        return False
    if any(b == alpha or names[b - 1] == "Alpha" for b in bands):
        return True
    tagged = [names.index(c) + 1 if c in names else None for c in ("Red", "Green", "Blue")]
    return bands == [1, 2, 3] and all(tagged) and tagged != [1, 2, 3]


def _seen(bands, palette) -> tuple | None:
    """``(bands as ints, how)`` of what a ``result`` event says the model saw, ``how`` one of
    "palette", "grey", "rgb"; None when it does not say (a failed answer, an older engine)."""
    if not isinstance(bands, (list, tuple)) or not bands:
        return None
    try:
        bands = [int(b) for b in bands]
    except (TypeError, ValueError):
        return None
    return bands, ("palette" if palette else "grey" if len(set(bands)) == 1 else "rgb")


def bands_text(bands, palette=False, rendered: bool = False) -> str:
    """The bands a ``result`` event says the model saw, in words for the line under an answer
    and the Processing log: "bands 4, 3, 2", "band 1 as grey", "band 1 through its colour table";
    ``rendered``: the file sent was QGIS's rendering of the layer ("rendered view"). "" when the
    event does not say (an engine older than the field)."""
    if rendered:
        return "rendered view"
    seen = _seen(bands, palette)
    if seen is None:
        return ""
    bands, how = seen
    if how == "palette":
        return f"band {bands[0]} through its colour table"
    if how == "grey":
        return f"band {bands[0]} as grey"
    return "bands " + ", ".join(str(b) for b in bands)


def bands_cell(bands, palette=False, rendered: bool = False) -> str:
    """The same for a table cell or a CSV column: "4,3,2", "1 (grey)", "1 (colour table)",
    "rendered view" (``rendered``: its bands are the render's, not the layer's); "" when not
    known (a failed answer, an older engine)."""
    if rendered:
        return "rendered view"
    seen = _seen(bands, palette)
    if seen is None:
        return ""
    bands, how = seen
    if how == "palette":
        return f"{bands[0]} (colour table)"
    if how == "grey":
        return f"{bands[0]} (grey)"
    return ",".join(str(b) for b in bands)
