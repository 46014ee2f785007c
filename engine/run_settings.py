"""Resumed runs keep their settings: `finetune --resume` and `eval` into an existing --out compare
the settings saved with the earlier run against the current ones, and name what changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable


def absolute_path(value: Any) -> str | None:
    """A path setting as an absolute path (resolved against the current folder), None kept: a
    run's settings record where its files are, whatever folder it was started from."""
    if value is None or value == "":
        return None
    return str(Path(str(value)).expanduser().resolve())


def changed_settings(saved: dict, current: dict, keys: Iterable[str], *,
                     defaults: dict[str, Any] | None = None,
                     label: Callable[[str], str] = str,
                     paths: Iterable[str] = ()) -> str:
    """'' when `current` equals `saved` on every key, else 'key: old -> new, ...' (keys shown
    through `label`). A key missing from `saved` (written by an older version) counts as its
    value in `defaults`, else None. Keys in `paths` are compared as absolute paths (a relative
    value saved by an older version is taken relative to the current folder)."""
    defaults = defaults or {}
    paths = set(paths)
    diff = []
    for k in keys:
        old, new = saved.get(k, defaults.get(k)), current.get(k)
        if k in paths:
            old, new = absolute_path(old), absolute_path(new)
        if old != new:
            diff.append(f"{label(k)}: {old!r} -> {new!r}")
    return ", ".join(diff)


def model_choice(weights: Any, *, demo_ok: bool) -> dict[str, Any]:
    """The checkpoint a run loads, as the engine resolves it (--weights, GEOVQA_WEIGHTS, the default
    folder, the demo model) and before anything loads: {"weights": absolute folder, "demo_model":
    bool}. Recorded instead of --weights as typed, which is None for every run that leaves it out
    whatever model GEOVQA_WEIGHTS or the default folder gave it."""
    from engine.pipeline import resolve_weights  # noqa: PLC0415 - the pipeline's imports are heavy

    folder, demo = resolve_weights(weights, demo_ok=demo_ok)
    return {"weights": absolute_path(folder), "demo_model": bool(demo)}


def resolve_tokens_per_tile(args: Any, choice: dict[str, Any]) -> None:
    """--tokens-per-tile left out means the checkpoint's own (MAX_TOKENS of its config.json's
    mm_patch_merge_type, 24 for GeoLLaVA-8K): set it on `args` from the resolved checkpoint
    `choice` (`model_choice`), so the run records and compares the number it uses."""
    from engine.loader import read_config_json  # noqa: PLC0415
    from engine.protocol import tokens_per_tile_of  # noqa: PLC0415

    if getattr(args, "tokens_per_tile", None) is not None:
        return
    # model_choice has checked this folder's config.json already (resolve_weights)
    config = read_config_json(choice["weights"])
    args.tokens_per_tile = tokens_per_tile_of(config.get("mm_patch_merge_type"))


def with_model_choice(saved: dict, current: dict) -> dict:
    """`saved` as if it recorded the resolved model like `current` does (`model_choice`).

    Settings of older versions hold --weights as typed and no demo_model: a folder typed there is
    still compared; a --weights left out (None) cannot be resolved after the fact and counts as
    unchanged, like every setting an older version did not record."""
    if "demo_model" in saved:
        return saved
    upgraded = {**saved, "demo_model": current.get("demo_model")}
    if saved.get("weights") is None:
        upgraded["weights"] = current.get("weights")
    return upgraded


def resolved_quantization(device: Any, quantization: Any) -> str:
    """The base weight format a run uses, as the engine resolves --quantization on --device
    (`devices.plan_device`): "auto" is nf4 on a CUDA GPU with bitsandbytes, bf16 on one without
    (fp16 on a GPU without native bfloat16), fp32 on the CPU. Recorded and compared instead of "auto" as typed, which names other formats on
    other machines. A device or format that cannot be used here raises DeviceChoiceError, the
    reason the model load would give, before anything loads."""
    from engine.devices import plan_device  # noqa: PLC0415

    return plan_device(device or "auto", quantization or "auto").quantization


def with_resolved_quantization(saved: dict, current: dict) -> dict:
    """`saved` as if it recorded the resolved weight format like `current` does
    (`resolved_quantization`). Settings of older versions hold --quantization as typed: "auto"
    (or nothing) cannot be resolved after the fact on the machine that ran it and counts as the
    format it gives now, like every setting an older version did not record; an explicit format
    is compared as it is."""
    if saved.get("quantization") not in (None, "auto"):
        return saved
    return {**saved, "quantization": current.get("quantization")}
