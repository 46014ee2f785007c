"""The GeoVQA Processing provider: registers the ask and batch algorithms and says which files
their layer outputs can be written to. "Ask a raster" copies the engine's heatmap GeoTIFF and
anchors GeoJSON (or converts the anchors to a GeoPackage), so its raster output is a .tif (or .tiff) and
its vector output a .geojson or .gpkg file: QGIS refuses any other extension from these lists
(``isSupportedOutputValue``), and a non-file destination (memory layer, database table) as
``supportsNonFileBasedOutput`` is False.
The batch algorithm's CSV/JSON tables are file destinations, which these lists do not concern."""

from __future__ import annotations

from pathlib import Path

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .ask_algorithm import RASTER_EXTENSIONS, VECTOR_EXTENSIONS, AskRasterAlgorithm
from .batch_algorithm import BatchQuestionsAlgorithm

ICON = str(Path(__file__).resolve().parent.parent / "icons" / "geovqa.svg")


class GeoVQAProvider(QgsProcessingProvider):
    def id(self) -> str:
        return "geovqa"

    def name(self) -> str:
        return "GeoVQA"

    def longName(self) -> str:  # noqa: N802
        return "GeoVQA raster question answering"

    def icon(self):
        return QIcon(ICON)

    def supportedOutputRasterLayerExtensions(self):  # noqa: N802
        return list(RASTER_EXTENSIONS)

    def defaultRasterFileExtension(self):  # noqa: N802
        return RASTER_EXTENSIONS[0]

    def supportedOutputVectorLayerExtensions(self):  # noqa: N802
        return list(VECTOR_EXTENSIONS)

    def defaultVectorFileExtension(self, hasGeometry=True):  # noqa: N802, N803
        return VECTOR_EXTENSIONS[0]

    def supportsNonFileBasedOutput(self):  # noqa: N802
        return False

    def loadAlgorithms(self):  # noqa: N802
        self.addAlgorithm(AskRasterAlgorithm())
        self.addAlgorithm(BatchQuestionsAlgorithm())
