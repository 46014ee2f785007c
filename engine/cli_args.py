"""Command-line options that several subcommands share: which model to load (`ask`, `info`,
`serve`, `finetune`, `eval`), which visual-token path to run (`ask`, `finetune`, `eval`) and the
size of the engine's vision-feature cache (`serve`, `info`).

Declared once so the subcommands take the same names, choices and checks: a mistyped strategy or
a budget of 0 is refused by argparse before any model is loaded, not after minutes of loading
(or, in `finetune --on-bad-sample skip`, by skipping every sample)."""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

from engine.cache import DEFAULT_FEATURE_CACHE_BYTES, FEATURE_CACHE_ENV
from engine.devices import QUANTIZATIONS
from engine.protocol import DEFAULT_STRATEGY, DEFAULT_TOKENS_PER_TILE, STRATEGIES


def _whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, not {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    return _whole_number(text, 1)


def count_or_never(text: str) -> int:
    """argparse type: a whole number of at least 0 (0 = never, for "every N steps" options)."""
    return _whole_number(text, 0)


def _real_number(text: str, *, least: float, most: float = math.inf, above: bool = False,
                 below: bool = False) -> float:
    """`text` as a finite number from `least` to `most` (`above` / `below`: the bound itself
    excluded); argparse.ArgumentTypeError saying the range otherwise. NaN and infinity are
    refused: float() reads 'nan' and 'inf', and either made a training run that ends 'done'
    with an adapter of NaN weights, or failed minutes later inside the optimizer."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    low_ok = value > least if above else value >= least
    high_ok = value < most if below else value <= most
    if not (math.isfinite(value) and low_ok and high_ok):
        low = f"above {least:g}" if above else f"at least {least:g}"
        high = "" if math.isinf(most) else (f" and below {most:g}" if below else f" and at most {most:g}")
        raise argparse.ArgumentTypeError(f"must be a finite number {low}{high}, not {text!r}")
    return value


def positive_number(text: str) -> float:
    """argparse type: a finite number above 0 (a learning rate, a number of epochs)."""
    return _real_number(text, least=0, above=True)


def non_negative_number(text: str) -> float:
    """argparse type: a finite number of at least 0 (a weight decay, a clipping norm, 0 = none)."""
    return _real_number(text, least=0)


def share(text: str) -> float:
    """argparse type: a finite number from 0 to 1 (a warm-up share of the steps)."""
    return _real_number(text, least=0, most=1)


def probability_below_one(text: str) -> float:
    """argparse type: a finite number from 0 up to, not including, 1 (a dropout probability, a
    held-out share: all of it would leave nothing)."""
    return _real_number(text, least=0, most=1, below=True)


def band_list(text: str) -> list[int]:
    """argparse type of ``ask --bands``: comma-separated 1-based band numbers (whether the raster
    has them is checked with the raster)."""
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bands must be 1-based band numbers separated by commas, e.g. 4,3,2; got {text!r}"
        ) from None


def band_choice(text: str) -> list[int]:
    """argparse type of ``finetune --bands``: `band_list`, and one band (grey) or three (red,
    green, blue), each at least 1, as `ask` and the protocol take them; whether each image has
    them is checked with the data."""
    from engine.data import bands_problem  # noqa: PLC0415

    bands = band_list(text)
    problem = bands_problem(bands)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r} {problem}")
    return bands


def writable_folder_problem(folder: Path, option: str) -> str | None:
    """Why ``folder`` (made when missing) cannot take the files of ``option``, or None: checked
    before a model loads, not when its first file is written.

    Writing is tried for real (:func:`file_creation_problem`), not asked of ``os.access``: on
    Windows that only reads a folder's read-only attribute, which folders ignore (it said yes to
    every folder, a protected one or a full share included), and for root on Linux it says yes
    wherever the permission bits do."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"{option} {folder} cannot be made: {exc.strerror or exc}."
    problem = file_creation_problem(folder)
    if problem:
        return f"{option} {folder} cannot be written to: {problem}."
    return None


def file_creation_problem(folder: Path) -> str | None:
    """Why no file can be made in the existing ``folder``, or None: a temporary file is made
    there and removed again."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".geovqa-write-check-"):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


AUTO_CHOICE_HELP = ("auto = nf4 on CUDA (bf16 without bitsandbytes; fp16 on GPUs without native bfloat16, "
                    "compute capability below 8.0), fp32 on the CPU")
HALF_FORMATS_HELP = "fp16 for GPUs without native bfloat16, where bf16 is refused"
AUTO_QUANTIZATION_HELP = f"nf4 = 4-bit; bf16 / fp16 = 16-bit ({HALF_FORMATS_HELP}); {AUTO_CHOICE_HELP}"


def add_model_arguments(p: argparse.ArgumentParser, *, adapter: bool = True,
                        quantization_help: str = AUTO_QUANTIZATION_HELP) -> None:
    """--weights, --device, --quantization, --adapter (when `adapter`), --no-demo."""
    p.add_argument("--weights", type=Path, default=None,
                   help="checkpoint folder (default: $GEOVQA_WEIGHTS, then weights/GeoLLaVA-8K, "
                        "else, when that folder is missing or empty, the tiny demo model)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--quantization", default="auto", choices=QUANTIZATIONS, help=quantization_help)
    if adapter:
        p.add_argument("--adapter", type=Path, default=None,
                       help="LoRA adapter folder written by `finetune`")
    p.add_argument("--no-demo", action="store_true",
                   help="fail instead of falling back to the tiny random demo model when no "
                        "weights are found")


def add_strategy_arguments(p: argparse.ArgumentParser, *, faithful_default: bool | None = False,
                           budget_help: str = "hard cap on visual tokens",
                           strategy_default: str | None = DEFAULT_STRATEGY) -> None:
    """--strategy, --budget, --tokens-per-tile, --faithful-empty-slots.

    `faithful_default` None lets a caller tell "not given" from "off" (eval's saved run
    settings); `strategy_default` None does the same for --strategy (`ask`: a loaded adapter's
    training settings fill in what is not given, then the engine's defaults)."""
    adapter_first = "the --adapter's training setting, else " if strategy_default is None else ""
    p.add_argument("--strategy", default=strategy_default, choices=STRATEGIES,
                   help=f"visual token strategy (default: {adapter_first}{DEFAULT_STRATEGY})")
    p.add_argument("--budget", type=positive_int, default=None,
                   help=budget_help + (f" (default: {adapter_first}none)" if adapter_first else ""))
    p.add_argument("--tokens-per-tile", type=positive_int, default=None,
                   help=f"geollava / anchored: tokens kept a tile (default: {adapter_first}the checkpoint's own, "
                        f"MAX_TOKENS of its mm_patch_merge_type: {DEFAULT_TOKENS_PER_TILE} for GeoLLaVA-8K)")
    p.add_argument("--faithful-empty-slots", action="store_true", default=faithful_default,
                   help="geollava: tokens-per-tile tokens for every tile as the released checkpoint "
                        "sends them (zero tokens for missing clusters, placed after each tile's real tokens)"
                        + (f" (default: {adapter_first}off)" if adapter_first else ""))


def add_feature_cache_argument(p: argparse.ArgumentParser) -> None:
    """--feature-cache-bytes: the cap of the engine's vision-feature cache (None when not given:
    GEOVQA_FEATURE_CACHE_BYTES, else the default, as `engine.cache.feature_cache_cap` reads it)."""
    p.add_argument("--feature-cache-bytes", type=count_or_never, default=None, metavar="BYTES",
                   help="RAM kept for the vision features of recent rasters, so a second question "
                        "on one skips the vision tower; counted by the memory check when the model "
                        f"runs on the CPU (default: ${FEATURE_CACHE_ENV}, else "
                        f"{DEFAULT_FEATURE_CACHE_BYTES} = {DEFAULT_FEATURE_CACHE_BYTES // 2**30} GiB; "
                        "0 turns the cache off)")
