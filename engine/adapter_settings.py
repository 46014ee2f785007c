"""What an adapter was trained on: the visual-token settings `finetune` writes next to the peft
files (``geovqa_training.json`` in ``OUT/adapter`` and in each checkpoint's ``adapter``), and the
engine reads back when it loads that adapter (``ask`` / ``serve --adapter``), so a question asked
without its own settings is answered from the tokens the adapter learned on.

Standard library only: the loader reads it before the base model loads (a broken file is refused
then, not after minutes of loading)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from engine.json_files import read_json_object
from engine.protocol import STRATEGIES

TRAINING_FILE = "geovqa_training.json"
FORMAT = 1
# the request fields the adapter's record gives defaults for, in the order notes name them
VISUAL_KEYS = ("strategy", "budget", "tokens_per_tile", "faithful_empty_slots", "bands")


class AdapterSettingsError(ValueError):
    """The adapter's geovqa_training.json cannot be used (message for a person)."""


def training_settings(args: Any, *, records_with_own_bands: int = 0) -> dict[str, Any]:
    """The record `finetune` writes from its arguments (``tokens_per_tile`` already resolved to
    the number the run used)."""
    bands = getattr(args, "bands", None)
    return {
        "format": FORMAT,
        "strategy": args.strategy,
        "budget": args.budget,
        "tokens_per_tile": args.tokens_per_tile,
        "faithful_empty_slots": bool(args.faithful_empty_slots),
        "bands": list(bands) if bands else None,
        "records_with_own_bands": int(records_with_own_bands),
    }


def write_training_settings(adapter_dir: str | os.PathLike, settings: dict[str, Any]) -> Path:
    path = Path(adapter_dir) / TRAINING_FILE
    path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return path


def read_training_settings(adapter_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The visual-token settings of the adapter in `adapter_dir` ({key: value} for VISUAL_KEYS,
    plus ``records_with_own_bands``), or None for an adapter without the file (written before
    the file existed, or by another program). AdapterSettingsError when the file is there but
    cannot be used."""
    path = Path(adapter_dir) / TRAINING_FILE
    data = read_json_object(path, AdapterSettingsError, unreadable_advice="; restore it from the run's "
                            "checkpoint or delete it to use the engine's defaults")
    if data is None:
        return None

    def bad(key: str) -> AdapterSettingsError:
        return AdapterSettingsError(f"{path}: {key} {data.get(key)!r} is not a usable value")

    strategy = data.get("strategy")
    if strategy is not None and strategy not in STRATEGIES:
        raise bad("strategy")
    for key in ("budget", "tokens_per_tile"):
        v = data.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise bad(key)
    faithful = data.get("faithful_empty_slots")
    if faithful is not None and not isinstance(faithful, bool):
        raise bad("faithful_empty_slots")
    bands = data.get("bands")
    if bands is not None and (not isinstance(bands, list) or len(bands) not in (1, 3) or not all(
            isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in bands)):
        raise bad("bands")
    out = {k: data.get(k) for k in VISUAL_KEYS}
    out["records_with_own_bands"] = int(data.get("records_with_own_bands") or 0)
    return out


def with_adapter_defaults(given: dict[str, Any], trained: dict[str, Any] | None) -> dict[str, Any]:
    """`given` (setting: value, None = left out) with each setting left out taking the adapter's
    training value from `trained` (`read_training_settings`; None: no adapter, or one without the
    file, changes nothing); a given value is kept. The rule the engine applies to a request
    (`Engine.resolve_visual`) and `eval` to its options before the engine loads."""
    trained = trained or {}
    return {key: trained.get(key) if value is None else value for key, value in given.items()}


def settings_text(settings: dict[str, Any]) -> str:
    """'strategy anchored, 4 tokens a tile, no budget, bands 4, 3, 2' for notes and summaries."""
    parts = [f"strategy {settings.get('strategy')}"]
    if settings.get("tokens_per_tile") is not None:
        parts.append(f"{settings['tokens_per_tile']} tokens a tile")
    parts.append(f"budget {settings['budget']}" if settings.get("budget") is not None else "no budget")
    if settings.get("faithful_empty_slots"):
        parts.append("faithful empty slots")
    bands = settings.get("bands")
    parts.append("bands " + ", ".join(str(b) for b in bands) if bands else "the engine's default bands")
    return ", ".join(parts)

