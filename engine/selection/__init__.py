"""Visual-token reduction strategies (GeoLLaVA-8K, LRS-VQA pyramid, UHR-BAT budget, baselines).

Use `get_strategy(name, **params).select(features, geometry, question, budget, model=model)`.
"""

from engine.selection.base import Selection, SelectionError, Strategy, available, get_strategy

__all__ = ["Selection", "SelectionError", "Strategy", "available", "get_strategy"]
