"""The GeoVQA Processing provider: registers the ask and batch algorithms."""

from __future__ import annotations

from pathlib import Path

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .ask_algorithm import AskRasterAlgorithm
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

    def loadAlgorithms(self):  # noqa: N802
        self.addAlgorithm(AskRasterAlgorithm())
        self.addAlgorithm(BatchQuestionsAlgorithm())
