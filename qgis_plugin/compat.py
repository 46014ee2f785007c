"""Enum lookups that differ between QGIS 3.22 (Qt5) and QGIS 3.40+/4.x (Qt6).

Newer QGIS moved many enums into the ``Qgis`` namespace; 3.22 only has the old class-scoped
ones. Each helper tries the new spelling first, then the old, so the rest of the plugin can use
one name everywhere.
"""

from __future__ import annotations

from qgis.core import (
    Qgis,
    QgsColorRampShader,
    QgsRasterBandStats,
    QgsMapLayerProxyModel,
    QgsProcessing,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterNumber,
    QgsWkbTypes,
)


def _first(*getters):
    for getter in getters:
        try:
            return getter()
        except AttributeError:
            continue
    raise AttributeError("none of the enum spellings exist in this QGIS version")


RASTER_LAYER_FILTER = _first(
    lambda: Qgis.LayerFilter.RasterLayer,
    lambda: QgsMapLayerProxyModel.Filter.RasterLayer,
)
POLYGON_GEOMETRY = _first(
    lambda: Qgis.GeometryType.Polygon,
    lambda: QgsWkbTypes.GeometryType.PolygonGeometry,
)
PROCESSING_RASTER = _first(
    lambda: Qgis.ProcessingSourceType.Raster,
    lambda: QgsProcessing.SourceType.TypeRaster,
)
PROCESSING_VECTOR_POLYGON = _first(
    lambda: Qgis.ProcessingSourceType.VectorPolygon,
    lambda: QgsProcessing.SourceType.TypeVectorPolygon,
)
NUMBER_INTEGER = _first(
    lambda: Qgis.ProcessingNumberParameterType.Integer,
    lambda: QgsProcessingParameterNumber.Type.Integer,
)
PARAM_ADVANCED = _first(
    lambda: Qgis.ProcessingParameterFlag.Advanced,
    lambda: QgsProcessingParameterDefinition.Flag.FlagAdvanced,
)
RAMP_INTERPOLATED = _first(
    lambda: Qgis.ShaderInterpolationMethod.Linear,
    lambda: QgsColorRampShader.Type.Interpolated,
)
RAMP_DISCRETE = _first(
    lambda: Qgis.ShaderInterpolationMethod.Discrete,
    lambda: QgsColorRampShader.Type.Discrete,
)
STATS_MIN_MAX = _first(
    lambda: Qgis.RasterBandStatistic.Min | Qgis.RasterBandStatistic.Max,
    lambda: QgsRasterBandStats.Stats.Min | QgsRasterBandStats.Stats.Max,
)
MSG_INFO = Qgis.MessageLevel.Info
MSG_WARNING = Qgis.MessageLevel.Warning
MSG_CRITICAL = Qgis.MessageLevel.Critical


def qaction_class():
    """QAction lives in QtGui under Qt6 and in QtWidgets under Qt5."""
    try:
        from qgis.PyQt.QtGui import QAction
    except ImportError:
        from qgis.PyQt.QtWidgets import QAction
    return QAction


def is_raster_layer(layer) -> bool:
    """True for a QgsRasterLayer (without depending on the layer-type enum's location)."""
    from qgis.core import QgsRasterLayer

    return isinstance(layer, QgsRasterLayer)
