"""Resumed runs keep their settings: `finetune --resume` and `eval` into an existing --out compare
the settings saved with the earlier run against the current ones, and name what changed."""

from __future__ import annotations

from typing import Any, Callable, Iterable


def changed_settings(saved: dict, current: dict, keys: Iterable[str], *,
                     defaults: dict[str, Any] | None = None,
                     label: Callable[[str], str] = str) -> str:
    """'' when `current` equals `saved` on every key, else 'key: old -> new, ...' (keys shown
    through `label`). A key missing from `saved` (written by an older version) counts as its
    value in `defaults`, else None."""
    defaults = defaults or {}
    diff = []
    for k in keys:
        old = saved.get(k, defaults.get(k))
        if old != current.get(k):
            diff.append(f"{label(k)}: {old!r} -> {current.get(k)!r}")
    return ", ".join(diff)
