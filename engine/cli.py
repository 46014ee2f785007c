"""Command line of the engine: `python -m engine ask|serve|finetune|eval|tiny|weights|info`.

Each subcommand's heavy imports happen only when it runs, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from engine import __version__
from engine.cli_args import (add_feature_cache_argument, add_model_arguments, add_strategy_arguments,
                             band_list, positive_int, writable_folder_problem)
from engine.weights import DEFAULT_REPO, DEFAULT_WEIGHTS


def _add_ask_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("raster", help="GeoTIFF / COG / VRT / any GDAL raster")
    p.add_argument("question")
    p.add_argument("--aoi", default=None,
                   help="area of interest: 'col,row,width,height' in source pixels, a WKT polygon "
                        "in the raster's CRS, or a .geojson/.json file in the raster's CRS (a "
                        "Polygon/MultiPolygon geometry, a Feature, or a FeatureCollection: the union "
                        "of its polygons; a \"crs\" member naming another CRS, e.g. EPSG:4326, "
                        "has it reprojected)")
    p.add_argument("--bands", type=band_list, default=None,
                   help="1-based bands the model sees: three as red, green, blue (e.g. 4,3,2) "
                        "or one as grey (default: the bands tagged red/green/blue, else the first "
                        "three; one band as grey; a paletted band through its colour table; with an "
                        "--adapter trained with --bands, those bands where the raster has them)")
    # not given: the --adapter's training settings, else the engine's defaults (Engine.resolve_visual)
    add_strategy_arguments(p, faithful_default=None, strategy_default=None)
    p.add_argument("--max-new-tokens", type=positive_int, default=256,
                   help="the longest answer, in tokens (default: 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", type=Path, default=None, help="where heatmaps are written")
    p.add_argument("--json", action="store_true", help="print every event as a JSON line")
    add_model_arguments(p)


def parse_aoi(text: str | None):
    """Turn the --aoi argument into the protocol's AOI dict; JobError("bad_aoi") for what is none
    of a window, a WKT polygon or a readable GeoJSON file."""
    from engine.jobs import JobError

    if not text:
        return None
    path = Path(text).expanduser()
    if path.suffix.lower() in (".geojson", ".json"):
        return {"geojson": _geojson_file(path)}
    parts = text.split(",")
    if len(parts) == 4:
        try:
            nums = [float(p) for p in parts]
        except ValueError:
            nums = None
        if nums is not None:  # whole numbers stay ints; a decimal window is read as given
            return {"window": [int(v) if v.is_integer() else v for v in nums]}
    if "(" not in text:  # no WKT geometry has no parenthesis: a mistyped path or window
        raise JobError("bad_aoi", f"--aoi {text!r} is none of 'col,row,width,height' (pixels), a WKT "
                       "polygon or a .geojson/.json file.")
    return {"polygon_wkt": text}


def _geojson_file(path: Path) -> dict:
    """The GeoJSON object of an area-of-interest file, as it is: a geometry, a Feature or a
    FeatureCollection is sent as the protocol's ``geojson`` and checked there, by the reader's
    own `engine.area_of_interest.geojson_area` (a FeatureCollection's polygons are joined into
    one area)."""
    from engine.jobs import JobError

    if not path.is_file():
        raise JobError("bad_aoi", f"The area-of-interest file {path} does not exist.")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise JobError("bad_aoi", f"The area-of-interest file {path} is not readable GeoJSON: {exc}") from None
    if not isinstance(data, dict):
        raise JobError("bad_aoi", f"The area-of-interest file {path} holds no GeoJSON object.")
    return data


def visual_tokens_text(tokens: dict) -> str:
    """"X kept of Y", or "X (unreduced path: Y)" when more were sent than `visual_candidates`
    (the unreduced path's count, every tile pooled 2 x 2: a strategy keeping single patches,
    e.g. 600 tokens a tile, sends more), so the line never reads as more kept than there were."""
    kept, candidates = tokens["visual_kept"], tokens["visual_candidates"]
    if kept > candidates:
        return f"{kept} (unreduced path: {candidates})"
    return f"{kept} kept of {candidates}"


def bands_text(bands, palette: bool = False) -> str:
    """Which bands of the raster the model saw, in words, from a ``result`` event's ``bands``
    and ``palette``: "bands 4, 3, 2 (red, green, blue)", "band 1 as grey", "band 1 through its
    colour table"; "" when the event does not say (an older engine)."""
    if not bands:
        return ""
    bands = [int(b) for b in bands]
    if palette:
        return f"band {bands[0]} through its colour table"
    if len(set(bands)) == 1:
        return f"band {bands[0]} as grey"
    return f"bands {', '.join(str(b) for b in bands)} (red, green, blue)"


def adapter_text(health: dict) -> str:
    """'adapter: DIR (trained with strategy anchored, 4 tokens a tile, ...)' from /health fields."""
    from engine.adapter_settings import settings_text

    settings = health.get("adapter_settings")
    how = (f"trained with {settings_text(settings)}; used where no option says otherwise" if settings else
           "no record of its training settings (geovqa_training.json): the engine's defaults")
    return f"adapter: {health.get('adapter')} ({how})"


def checked_ask_fields(args: argparse.Namespace) -> dict:
    """The ask request as the server would check it, before any model is loaded.

    A missing raster, a band it lacks, an area outside it or an empty question is refused here in
    a second, not after minutes of loading weights. Raises JobError."""
    from engine.jobs import JobError
    from engine.protocol import STRATEGIES
    from engine.request_checks import validate_ask

    aoi = parse_aoi(args.aoi)
    body = {"question": args.question, "aoi": aoi, "bands": args.bands,
            "strategy": args.strategy, "budget": args.budget,
            "tokens_per_tile": args.tokens_per_tile, "max_new_tokens": args.max_new_tokens,
            "seed": args.seed, "faithful_empty_slots": args.faithful_empty_slots}
    try:
        return validate_ask(body, STRATEGIES,
                            raster_path=os.path.abspath(os.path.expanduser(args.raster)))
    except JobError as exc:
        if aoi is None or "geojson" not in aoi or exc.code not in ("bad_aoi", "aoi_outside_raster"):
            raise
        path = Path(args.aoi).expanduser()  # name the file the area came from
        raise JobError(exc.code, f"The area-of-interest file {path}: {exc.message}", exc.hint) from None


def _check_output_dir(folder: Path | None) -> None:
    """--output-dir exists (or is made) and can be written, before the model loads, not after the
    answer. Raises JobError."""
    from engine.jobs import JobError

    if folder is None:
        return
    problem = writable_folder_problem(folder, "--output-dir")
    if problem:
        raise JobError("bad_request", problem)


def _check_adapter(folder: Path | None) -> None:
    """--adapter is a LoRA adapter folder, before the base model loads. Raises JobError."""
    from engine.jobs import JobError
    from engine.loader import CheckpointError, check_adapter

    if folder is None:
        return
    try:
        check_adapter(folder)
    except CheckpointError as exc:
        raise JobError("bad_request", f"--adapter: {exc}.") from None


def cmd_ask(args: argparse.Namespace) -> int:
    from engine.jobs import JobError
    from engine.pipeline import Engine
    from engine.request_checks import request_factory

    try:
        fields = checked_ask_fields(args)
        _check_output_dir(args.output_dir)
        _check_adapter(args.adapter)
    except JobError as exc:
        print(f"error: {exc.message}" + (f" {exc.hint}" if exc.hint else ""), file=sys.stderr)
        return 2
    # one question: nothing could hit a feature cache, so none is kept (nor counted in RAM)
    engine = Engine(args.weights, device=args.device, quantization=args.quantization,
                    adapter=args.adapter, demo_ok=not args.no_demo, output_dir=args.output_dir,
                    feature_cache_bytes=0)
    health = engine.health()
    if health.get("demo_model"):
        from engine.weights import demo_model_note

        print(demo_model_note(args.weights), file=sys.stderr)
    req = request_factory(engine)(fields)
    result = None
    mid_line = False  # the answer streamed so far ends without a newline
    for event in engine.ask(req):
        if args.json:
            print(json.dumps(event), flush=True)
        elif event["type"] == "token":
            print(event["text"], end="", flush=True)
            if event["text"]:
                mid_line = not event["text"].endswith("\n")
        elif event["type"] == "status":
            if mid_line:  # stdout and stderr share a terminal: the stage goes on a line of its own
                print(flush=True)
                mid_line = False
            print(f"[{event['stage']}] {event.get('message', '')}", file=sys.stderr, flush=True)
        if event["type"] == "result":
            result = event
    if result is not None and not args.json:
        if mid_line:
            print()
        if args.adapter is not None:
            print(adapter_text(health), file=sys.stderr)
        tok, tim = result["tokens"], result["timings"]
        peak = result.get("peak_memory_bytes")
        print(f"visual tokens: {visual_tokens_text(tok)} ({result['strategy']}); prompt {tok['prompt']}, "
              f"generated {tok['generated']}", file=sys.stderr)
        seen = bands_text(result.get("bands"), bool(result.get("palette")))
        if seen:
            print(f"the model saw {seen} (choose others with --bands)", file=sys.stderr)
        print("timings (s): " + ", ".join(f"{k} {v:.3f}" for k, v in tim.items()), file=sys.stderr)
        if peak:
            print(f"peak memory: {peak / 2**20:.1f} MiB", file=sys.stderr)
        print(f"heatmap: {result['heatmap_path']}\nanchors: {result['anchors_path']}", file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from engine.pipeline import Engine

    if args.memory:
        return _print_memory(args)

    engine = Engine(args.weights, device=args.device, quantization=args.quantization,
                    adapter=args.adapter, demo_ok=not args.no_demo,
                    feature_cache_bytes=args.feature_cache_bytes)
    print(json.dumps(engine.health(), indent=2))
    return 0


def _print_memory(args: argparse.Namespace) -> int:
    """`info --memory`: each weight format's memory need against the free memory, no load; on the
    CPU the need includes what the feature cache can hold (its cap, or less for a small model's
    features), as `serve` counts it."""
    from engine.cache import feature_cache_cap
    from engine.devices import plan_device, resolve_device, usable_quantizations
    from engine.loader import feature_cache_need, read_config_json, weight_files
    from engine.memory_check import fit_report
    from engine.pipeline import resolve_weights

    path, demo = resolve_weights(args.weights, demo_ok=not args.no_demo)
    device = resolve_device(args.device)
    auto = plan_device(device, "auto")
    report = {"weights_dir": str(path), "demo_model": demo,
              "auto_choice": auto.quantization, "auto_compute": auto.compute,
              **fit_report(weight_files(path), device, usable_quantizations(device),
                           ram_cache_bytes=feature_cache_need(read_config_json(path),
                                                              feature_cache_cap(args.feature_cache_bytes)))}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    def size(n: int) -> str:
        return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"

    free = report["free_bytes"]
    print(f"{'demo model' if demo else 'checkpoint'} {path}: {report['parameters']:,} parameters")
    print(f"free on {device}: " + (size(free) if free is not None else "unknown"))
    if report["feature_cache_bytes"]:
        print(f"  each format's need includes the feature cache, {size(report['feature_cache_bytes'])} "
              "(--feature-cache-bytes; 0 turns it off)")
    for q, r in report["formats"].items():
        verdict = {True: "fits", False: "does not fit", None: "unknown"}[r["fits"]]
        print(f"  {q:5} weights {size(r['weights_bytes']):>8}, with working memory "
              f"{size(r['needed_bytes']):>8}: {verdict}")
    print(f"--quantization auto (the default) loads {auto.description} here")
    if auto.compute == "fp16":
        print(f"  {auto.gpu_name or device} has no native bfloat16 (compute capability below 8.0): "
              "the model computes in fp16, and --quantization bf16 is refused here")
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    from engine.tiny import build_tiny_checkpoint

    path = build_tiny_checkpoint(args.dest, seed=args.seed)
    print(path)
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    from engine.weights import download_weights

    from engine.weights import recorded_revision

    path = download_weights(args.dest, repo=args.repo, revision=args.revision)
    commit = recorded_revision(path, args.repo)
    print(f"GeoLLaVA-8K weights ready in {path}" + (f" ({args.repo} at commit {commit})" if commit else ""))
    return 0


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__)
    parser.add_argument("--version", action="version", version=f"geovqa-engine {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ask", help="ask one question about a raster and stream the answer")
    _add_ask_arguments(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("info", help="load the model and print what the engine runs on")
    add_model_arguments(p)
    p.add_argument("--memory", action="store_true",
                   help="do not load: print the memory each weight format needs here and what is free")
    p.add_argument("--json", action="store_true", help="with --memory: print JSON")
    add_feature_cache_argument(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("tiny", help="write a tiny random checkpoint in the released layout")
    p.add_argument("--dest", type=Path, required=True,
                   help="a new or empty folder (an earlier tiny checkpoint there is replaced; other files are refused)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny)

    p = sub.add_parser("weights", help="download the GeoLLaVA-8K checkpoint (needs internet)")
    p.add_argument("--dest", type=Path, default=DEFAULT_WEIGHTS,
                   help=f"checkpoint folder (default: {DEFAULT_WEIGHTS}, where the engine looks)")
    p.add_argument("--repo", default=DEFAULT_REPO)
    p.add_argument("--revision", default=None,
                   help="branch, tag or commit (default: the commit an earlier download into --dest recorded in "
                        "REVISION.txt, else the newest, main)")
    p.set_defaults(func=cmd_weights)

    _add_optional(sub, "serve", "engine.server", "add_serve_arguments", "serve",
                  "run the local HTTP engine the QGIS plugin talks to", selected)
    _add_optional(sub, "finetune", "engine.finetune", "add_finetune_arguments", "run_finetune",
                  "QLoRA / LoRA fine-tuning on LLaVA-format conversation data", selected)
    _add_optional(sub, "eval", "engine.evaluate", "add_eval_arguments", "run_eval",
                  "score the model on XLRS-Bench / LRS-VQA / MME-RealWorld-RS style files",
                  selected)
    return parser


def _add_optional(sub, name: str, module: str, add_args: str, run: str, help_text: str,
                  selected: str | None = None) -> None:
    """Register a subcommand whose module provides `add_args(parser)` and `run(args)`.

    The module (and its heavy imports) is loaded only when that subcommand is the one chosen."""
    import importlib

    p = sub.add_parser(name, help=help_text, add_help=selected == name)
    if selected != name:
        p.set_defaults(func=lambda _a: 2)
        return
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - reported at run time
        p.set_defaults(func=lambda _a, exc=exc: _missing(name, exc))
        return
    getattr(mod, add_args)(p)
    p.set_defaults(func=getattr(mod, run))


def _missing(name: str, exc: Exception) -> int:
    print(f"`{name}` is not available: {exc}", file=sys.stderr)
    return 2


def tolerate_unencodable_output(streams=None) -> None:
    """Let ``streams`` (default: stdout and stderr) write characters their encoding lacks as
    ``\\uXXXX`` escapes instead of raising UnicodeEncodeError. Redirected to a file or a pipe on
    Windows, Python writes in the ANSI code page (cp1252 in the west): an answer, a path or a
    question holding a character outside it made `ask` and `info` fail after their work was done.
    A UTF-8 stream can write everything and is left alone."""
    for stream in (sys.stdout, sys.stderr) if streams is None else streams:
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("_", "-")
        if encoding in ("utf-8", "utf8", "utf-8-sig") or not hasattr(stream, "reconfigure"):
            continue
        try:
            stream.reconfigure(errors="backslashreplace")
        except (ValueError, OSError):  # a stream that cannot change now (closed, detached)
            pass


def main(argv: list[str] | None = None) -> int:
    tolerate_unencodable_output()
    argv = sys.argv[1:] if argv is None else list(argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(selected)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as exc:
        # Library and file-system errors carry messages written for a person; no traceback for them.
        print(f"error: {exc}", file=sys.stderr)
        return 2
