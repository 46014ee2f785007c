"""GeoVQA engine: GeoLLaVA-8K inference, token reduction, local server, fine-tuning and evaluation.

Data flows one way: raster -> tiles -> vision features -> token selection -> language model ->
answer + kept-token map. This package never imports qgis.
"""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes' CPU backend warns at import, on every command, that it cannot fetch an optional
# faster kernel from the Hugging Face hub (the `kernels` package); nf4 on the CPU works without it
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
