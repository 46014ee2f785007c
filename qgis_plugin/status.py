"""Turn an engine health dict (protocol HEALTH_FIELDS) or a connection error into short,
clear status lines for the dock, and build the diagnostics report users can copy."""

from __future__ import annotations

import json
import platform
import sys


def summary(health: dict | None, error: str = "", url: str = "") -> tuple:
    """(level, text): level is 'ok' | 'loading' | 'demo' | 'down' | 'error'."""
    if health is None:
        return "down", (error or f"The GeoVQA engine is not reachable at {url}.")
    status = health.get("status")
    model = health.get("model") or "?"
    device = health.get("device") or "?"
    gpu = health.get("gpu_name")
    quant = health.get("quantization") or "?"
    bits = "4-bit nf4" if health.get("four_bit") else quant
    if health.get("four_bit") and health.get("compute") == "fp16":  # a GPU without native bfloat16
        bits += " (fp16 compute)"
    weights = "weights present" if health.get("weights_present") else "no real weights"
    where = f"{device}" + (f" ({gpu})" if gpu else "")
    line = f"{model} on {where}, {bits}, {weights}" + adapter_text(health)
    if status == "loading":
        return "loading", f"Engine is still loading: {health.get('message') or line}. Questions wait until it is ready."
    if status == "error":
        return "error", f"Engine error: {health.get('message') or 'unknown'}"
    if health.get("demo_model"):
        return "demo", f"DEMO model (random weights, answers are meaningless): {line}"
    return "ok", f"Ready: {line}"


def adapter_text(health: dict) -> str:
    """", with adapter <folder> (trained with <strategy>, <n> tokens a tile, budget <b>, empty
    cluster slots sent, bands <b>)" (what it was trained with, of those) when the
    engine runs a fine-tuned adapter, so the dock's options can be set to what it learned on;
    "" without one."""
    adapter = health.get("adapter")
    if not isinstance(adapter, str) or not adapter:
        return ""
    # its folder and the one above it: finetune writes OUT/adapter (OUT/checkpoint-N/adapter)
    name = "/".join(adapter.replace("\\", "/").rstrip("/").split("/")[-2:]) or adapter
    trained = health.get("adapter_settings")
    if not isinstance(trained, dict):
        return f", with adapter {name}"
    parts = [str(trained["strategy"])] if trained.get("strategy") else []
    if trained.get("tokens_per_tile"):
        parts.append(f"{trained['tokens_per_tile']} tokens a tile")
    if trained.get("budget"):
        parts.append(f"budget {trained['budget']}")
    if trained.get("faithful_empty_slots"):
        parts.append("empty cluster slots sent")
    if trained.get("bands") and isinstance(trained["bands"], list):  # an odd engine's number: not said
        parts.append("bands " + ", ".join(str(b) for b in trained["bands"]))
    return f", with adapter {name}" + (f" (trained with {', '.join(parts)})" if parts else "")


TPT_AUTO = "the checkpoint's own"  # tokens a tile when none is set (0)

COLORS = {"ok": "#1b7f3b", "loading": "#b26a00", "demo": "#b26a00", "down": "#b00020", "error": "#b00020"}


def diagnostics(plugin_version: str, settings, health: dict | None, health_error: str,
                engine_log: str = "", last_error: str = "", command=None) -> str:
    from qgis.core import Qgis
    from qgis.PyQt.QtCore import QT_VERSION_STR

    from .engine_errors import EngineError
    from .settings import ENGINE_DEFAULT_STRATEGY

    engine_strategy = settings.strategy == ENGINE_DEFAULT_STRATEGY  # neither sent: the adapter's
    try:
        token = settings.resolved_token()
        token_line = f"set ({len(token)} chars)" if token else "MISSING"
    except EngineError as exc:  # a token file that is not text
        token_line = f"unreadable: {exc}"
    lines = [
        "GeoVQA diagnostics",
        f"plugin: {plugin_version}",
        f"QGIS: {Qgis.QGIS_VERSION}  Qt: {QT_VERSION_STR}  Python: {sys.version.split()[0]}",
        f"OS: {platform.platform()}",
        f"engine URL: {settings.engine_url}",
        f"token: {token_line}",
        f"CA certificate: {settings.ca_cert or 'system trust store'}",
        f"engine python: {settings.python or '-'}  engine folder: {settings.engine_dir or '-'}",
        f"weights: {settings.weights_dir or '-'}",
        f"strategy: {engine_strategy and 'engine default (not sent)' or settings.strategy}  "
        f"budget: {settings.budget or 'engine default'}  "
        f"tokens/tile: {settings.tokens_per_tile or TPT_AUTO}  max new tokens: {settings.max_new_tokens}  "
        f"empty cluster slots: {engine_strategy and 'engine default' or ('sent' if settings.faithful_empty_slots else 'dropped')}",
        f"results folder: {settings.results_dir()}",
        f"local engine command: {' '.join(command) if command else '-'}",
        "health: " + (json.dumps(health, indent=1, sort_keys=True) if health else f"unavailable ({health_error})"),
        f"last error: {last_error or '-'}",
    ]
    if engine_log:
        lines += ["engine log (last lines):", engine_log]
    return "\n".join(lines)
