"""GeoVQA engine: GeoLLaVA-8K inference, token reduction, local server, fine-tuning and evaluation.

Data flows one way: raster -> tiles -> vision features -> token selection -> language model ->
answer + kept-token map. This package never imports qgis.
"""

__version__ = "0.1.0"
