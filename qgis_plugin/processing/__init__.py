"""Processing provider and algorithms of the GeoVQA plugin (Graphical Modeler, qgis_process)."""

from __future__ import annotations
