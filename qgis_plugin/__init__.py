"""GeoVQA QGIS plugin: ask questions about raster layers through a local GeoVQA engine.

QGIS calls :func:`classFactory` with its interface object; everything else is created lazily by
:class:`GeoVQAPlugin` in ``initGui`` and removed again in ``unload``.
"""

from __future__ import annotations


def classFactory(iface):  # noqa: N802 (name required by QGIS)
    """Create the plugin instance for QGIS."""
    from .plugin import GeoVQAPlugin

    return GeoVQAPlugin(iface)
