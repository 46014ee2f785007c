"""Benchmark evaluation: XLRS-Bench(-lite), LRS-VQA, MME-RealWorld(-RS) and a generic layout.

The run and the CLI of `python -m engine eval`: ask the model each item, score, write the results.
The parts it runs: `eval_items` (annotation formats, loading), `eval_prompts` (the official
prompts), `eval_scoring` (answer extraction, official and lenient judges) and `eval_report`
(figures, results.md).

Predictions are appended to a JSONL file as they are made; a rerun skips item ids already there
(resumable; their stored replies are scored anew, so lines of older versions, without the lenient
fields, get both) and asks failed items again, whose new lines replace their error lines when the
run ends (one line an item); `--limit N` stops after N items (the results then say that their
macro averages cover only the categories those items have).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from engine.cli_args import add_model_arguments, add_strategy_arguments, positive_int
from engine.eval_items import FORMATS, GENERIC_NAMES, EvalError, EvalItem, load_items, parse_field_map
from engine.eval_prompts import (MAX_NEW_TOKENS, build_prompt, max_new_tokens, max_new_tokens_setting,
                                 selection_text, skip_reason)
from engine.eval_report import limited_macro_note, markdown_table, summarize
from engine.eval_scoring import WORDNET, scores, synonym_test
from engine.json_files import json_lines
from engine.run_settings import (absolute_path, changed_settings, model_choice, resolve_tokens_per_tile,
                                 resolved_quantization, with_model_choice, with_resolved_quantization)

ON_ERROR = ("stop", "skip")


def _read_done(pred_path: Path) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if not pred_path.is_file():
        return done
    for line in json_lines(pred_path.read_text(encoding="utf-8", errors="replace")):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by an interruption (in a UTF-8 sequence too): the item is redone
        if isinstance(rec, dict) and "id" in rec:
            done[str(rec["id"])] = rec
    return done


def evaluate(
    items: list[EvalItem],
    predict: Callable[[EvalItem, str], str],
    out_dir: str | Path,
    *,
    limit: int | None = None,
    title: str = "",
    progress: bool = False,
    instruction: str | None = None,
    on_error: str = "stop",
    synonyms: Any = WORDNET,
) -> dict[str, Any]:
    """Run `predict(item, prompt) -> reply` on each item not yet in predictions.jsonl, score,
    write results.json and results.md into out_dir, return the results dict.

    An item whose prediction fails (out of memory, an unreadable image, a prompt too long for
    the model) stops the run (`on_error` "stop"), or is recorded with its error and counted
    wrong ("skip"); a later run into the same folder tries failed items again. `synonyms`: LRS-VQA's
    synonym test (WordNet's when nltk and its data are installed, a function, or None)."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, not {on_error!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred_path = out / "predictions.jsonl"
    done = _read_done(pred_path)
    todo = items if limit is None else items[:limit]
    bar = None
    if progress:
        from tqdm import tqdm  # noqa: PLC0415

        # items answered by an earlier run count as done from the start, not as progress of this
        # one: updated for them, the bar's rate (and so its ETA) counted them as asked in no time
        n_done = sum(1 for it in todo if it.id in done and "error" not in done[it.id]
                     and ("skipped" in done[it.id] or skip_reason(it) is None))
        bar = tqdm(total=len(todo), initial=n_done, desc="eval", unit="item", file=sys.stderr)
    records: list[dict] = []
    rescored: dict[str, dict] = {}
    synonyms = synonym_test(synonyms)
    try:
        _predict_all(todo, done, predict, pred_path, records, bar, instruction, on_error, rescored, synonyms)
    finally:
        if bar is not None:
            bar.close()
        _one_line_per_item(pred_path, rescored)
    summary = summarize(records, {it.extra.get("format") or "generic" for it in todo}, synonyms is not None)
    older = sum(1 for r in records if r.get("older_prompt"))
    if older:
        summary["older_prompt_answers"] = older
        print(f"{older} stored answers were made by an older version with its own prompt, not the official "
              "one; they are rescored, not asked again (use another --out to ask every item anew)", file=sys.stderr)
    if limit is not None and limit < len(items):
        summary["macro_note"] = limited_macro_note(limit, len(items), len(summary["per_category"]))
    results = {"title": title, "items_in_file": len(items), "limit": limit, **summary}
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "results.md").write_text(markdown_table(summary, title), encoding="utf-8")
    return results


def _one_line_per_item(pred_path: Path, rescored: dict[str, dict] | None = None) -> None:
    """Rewrite predictions.jsonl with one line an item (the last one written for it) when it holds
    more: a failed item asked again appends its new line after the error line, and a line cut by
    an interruption stays behind; or when stored answers were scored anew (`rescored`, by id: a
    line of an older version gets both verdicts). Records are appended as they are made, so an
    interrupted run loses nothing; this rewrite goes through a temporary file replaced in one step."""
    if not pred_path.is_file():
        return
    lines = [x for x in json_lines(pred_path.read_text(encoding="utf-8", errors="replace")) if x.strip()]
    done = _read_done(pred_path)
    rescored = {k: v for k, v in (rescored or {}).items() if k in done and "error" not in done[k]
                and "skipped" not in done[k]}
    if len(lines) == len(done) and not rescored:
        return
    done.update(rescored)
    tmp = pred_path.with_name(pred_path.name + ".tmp")
    with contextlib.suppress(OSError):  # the appended file reads the same, only longer
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done.values()), encoding="utf-8")
        os.replace(tmp, pred_path)


def _predict_all(todo: list[EvalItem], done: dict[str, dict], predict: Callable[[EvalItem, str], str],
                 pred_path: Path, records: list[dict], bar, instruction: str | None, on_error: str,
                 rescored: dict[str, dict], synonyms: Callable[[str, str], bool] | None = None) -> None:
    """`evaluate`'s loop: ask each item of `todo` not answered in `done`, append its record to
    predictions.jsonl as it is made, and collect every item's record in `records` (answered
    ones scored anew, and put in `rescored` when that changed them)."""
    with pred_path.open("a", encoding="utf-8") as f:
        if f.tell():  # a last line cut by an interruption: the next record starts on a line of its own
            with pred_path.open("rb") as tail:
                tail.seek(-1, 2)
                if tail.read(1) != b"\n":
                    f.write("\n")
        for item in todo:
            why = skip_reason(item)
            if why is not None:  # never asked (also when an older version answered it)
                rec = {"id": item.id, "category": item.category, "image": item.extra["images"],
                       "answer": item.answer, "skipped": why}
                if done.get(item.id) != rec:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    f.flush()
                    if bar is not None:
                        bar.update(1)
            elif item.id in done and "error" not in done[item.id]:
                rec = done[item.id]
                before = dict(rec)
                if "lenient_correct" not in rec and item.extra.get("format") in ("xlrs", "mme"):
                    # an older version's answer, asked with its own prompt wording, not the
                    # official prompt: kept and rescored, but marked (and said in the results)
                    rec["older_prompt"] = True
                # rescore from the stored reply (extraction rules may have changed; lines of older
                # versions lack the lenient fields: they are added)
                rec.update(**scores(item, rec.get("reply", ""), synonyms), category=item.category,
                           answer=item.answer, multiple_choice=item.multiple_choice)
                if rec != before:
                    rescored[item.id] = rec
            else:
                prompt = build_prompt(item, instruction)
                t0 = time.perf_counter()
                try:
                    reply, error = predict(item, prompt), None
                except Exception as exc:  # noqa: BLE001 - recorded per item, or re-raised
                    error = str(exc).strip() or type(exc).__name__
                    if on_error == "stop":
                        named = error if error.startswith(f"item {item.id}:") else f"item {item.id}: {error}"
                        raise EvalError(f"{named} (--on-error skip records such items as failed and "
                                        "goes on)") from exc
                    reply = ""
                scored = scores(item, reply, synonyms) if error is None else {
                    "prediction": None, "correct": False, "lenient_prediction": None, "lenient_correct": False}
                rec = {"id": item.id, "category": item.category, "image": item.image, "reply": reply,
                       **scored, "answer": item.answer, "multiple_choice": item.multiple_choice,
                       "seconds": round(time.perf_counter() - t0, 3)}
                if error is not None:
                    rec["error"] = error
                    print(f"item {item.id} failed (counted wrong): {error}", file=sys.stderr)
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                if bar is not None:
                    bar.update(1)
            records.append(rec)
            scored = [r for r in records if "skipped" not in r]
            if bar is not None and scored:
                bar.set_postfix(acc=f"{sum(bool(r['correct']) for r in scored) / len(scored):.3f}")


# -------------------------------------------------------------------------------------- CLI

def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("annotations", help="annotation file (JSON list or JSON Lines)")
    parser.add_argument("--format", default="auto", choices=FORMATS, help="annotation layout (default: auto)")
    parser.add_argument("--field", action="append", metavar="KEY=SOURCE",
                        help="read a field from another name, e.g. --field question=Text --field answer=gt "
                        f"(keys: {', '.join(GENERIC_NAMES)}); on top of an explicit --format, else "
                        "the generic layout")
    parser.add_argument("--image-root", default=None, help="folder relative image paths are taken from "
                        "(default: the annotation file's folder)")
    parser.add_argument("--out", default="eval_out",
                        help="output folder: predictions.jsonl, results.json, results.md (default: eval_out)")
    parser.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N items")
    add_model_arguments(parser)
    # None when not given, so that runs saved before the option existed stay comparable
    add_strategy_arguments(parser, faithful_default=None, budget_help="visual token budget per item",
                           strategy_default=None)
    parser.add_argument("--max-new-tokens", type=positive_int, default=None,
                        help="the most new tokens a reply may have, for every item (default: each benchmark's "
                        f"official number: {MAX_NEW_TOKENS['lrsvqa']} for lrsvqa, {MAX_NEW_TOKENS['xlrs']} for "
                        "xlrs, mme and generic files)")
    parser.add_argument("--on-error", choices=ON_ERROR, default="stop",
                        help="an item whose prediction fails (out of memory, unreadable image): stop, or "
                        "record it as failed (counted wrong) and go on")
    parser.add_argument("--title", default="", help="heading of the Markdown table")
    parser.add_argument("--instruction", default=None,
                        help="last line(s) of multiple-choice prompts, replacing the format's instruction and its "
                        "answer cue (default: the official one of xlrs / mme; ours for generic files)")
    parser.add_argument("--keep-heatmaps", action="store_true",
                        help="keep each answer's token heatmap and anchors in OUT/heatmaps")


def _resolve_image(item: EvalItem, root: Path) -> str:
    p = Path(item.image)
    return str(p if p.is_absolute() else root / p)


def image_root(args: argparse.Namespace) -> Path:
    """The folder relative image paths are taken from: --image-root, else the annotation file's."""
    return Path(args.image_root) if args.image_root else Path(args.annotations).resolve().parent


def engine_predictor(args: argparse.Namespace, weights: str | Path | None = None) -> Callable[[EvalItem, str], str]:
    """A predict function that runs the engine (greedy decoding inside Engine.ask) on `weights`, the
    checkpoint folder resolved for the run's settings (else --weights as given)."""
    from engine.pipeline import AskRequest, Engine  # noqa: PLC0415 - heavy

    keep = bool(getattr(args, "keep_heatmaps", False))
    engine = Engine(weights or args.weights, device=args.device, quantization=args.quantization,
                    adapter=args.adapter, demo_ok=not getattr(args, "no_demo", False),
                    output_dir=Path(args.out) / "heatmaps",
                    prune_old_outputs=False)  # heatmaps kept with --keep-heatmaps are the run's results
    if engine.health().get("demo_model"):
        from engine.weights import demo_model_note

        print(demo_model_note(args.weights, "evaluating"), file=sys.stderr)
    root = image_root(args)

    def predict(item: EvalItem, prompt: str) -> str:
        req = AskRequest(raster_path=_resolve_image(item, root), question=prompt,
                         selection_text=selection_text(item), strategy=args.strategy,
                         budget=args.budget, tokens_per_tile=args.tokens_per_tile,
                         max_new_tokens=max_new_tokens(item, args.max_new_tokens), seed=0,
                         faithful_empty_slots=bool(getattr(args, "faithful_empty_slots", False)))
        answer = None
        for ev in engine.ask(req):
            if ev.get("type") == "result":
                answer = ev.get("answer", "")
                if not keep:  # the engine writes a heatmap per answer; eval has no use for them
                    for key in ("heatmap_path", "anchors_path"):
                        if ev.get(key):
                            Path(ev[key]).unlink(missing_ok=True)
            elif ev.get("type") == "error":
                raise EvalError(f"item {item.id}: {ev.get('message')}")
        return answer or ""

    return predict


# "weights" is the checkpoint folder the engine resolved (GEOVQA_WEIGHTS, the default folder or the
# demo model when --weights is left out) and "demo_model" whether it is the tiny random one; "bands"
# the --adapter's bands, which the engine applies to every image that has them (eval has no --bands)
RUN_KEYS = ("annotations", "format", "field", "image_root", "weights", "demo_model", "adapter", "quantization",
            "strategy", "budget", "tokens_per_tile", "max_new_tokens", "instruction", "faithful_empty_slots",
            "bands")
RUN_PATH_KEYS = ("annotations", "image_root", "weights", "adapter")  # compared as absolute paths


def _check_run_settings(args: argparse.Namespace, model: dict | None = None,
                        items: list[EvalItem] | None = None) -> None:
    """A resumed run must use the settings its stored predictions were made with. `model` is the
    resolved checkpoint (run_settings.model_choice); without it (an injected predictor) --weights
    is recorded as typed. `items`: the run's items, whose formats give the new-token cap recorded
    when --max-new-tokens is left out (`max_new_tokens_setting`)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cur = {k: (str(getattr(args, k)) if getattr(args, k, None) is not None else None) for k in RUN_KEYS}
    cur.update(model or {})
    # the cap the items are asked with (each format's official one unless --max-new-tokens)
    cur["max_new_tokens"] = max_new_tokens_setting(items or [], getattr(args, "max_new_tokens", None))
    # the weight format the model runs in, not "auto" as typed: nf4 on a GPU, fp32 on the CPU
    cur["quantization"] = resolved_quantization(getattr(args, "device", None), getattr(args, "quantization", None))
    # --field as its mapping (the order of the flags does not matter); the folder images are
    # read from, given or not (the annotation file's own folder by default)
    fields = parse_field_map(getattr(args, "field", None))
    cur["field"] = ",".join(f"{k}={v}" for k, v in sorted(fields.items())) or None
    cur["image_root"] = str(image_root(args))
    bands = getattr(args, "bands", None)
    cur["bands"] = ",".join(str(b) for b in bands) if bands else None
    cur.update({k: absolute_path(cur[k]) for k in RUN_PATH_KEYS})  # not as typed: from any folder
    cfg = out / "run_settings.json"
    # only answers made with the recorded settings are kept by a rerun: an empty predictions.jsonl
    # (the first item failed) or one of failed items only (tried again) binds the folder to nothing
    made = any("error" not in rec for rec in _read_done(out / "predictions.jsonl").values())
    if cfg.is_file() and made:
        # settings files of older versions lack field, image_root, bands and the resolved model: assumed
        # unchanged (a --weights they recorded as typed is still compared)
        saved = with_resolved_quantization(with_model_choice(json.loads(cfg.read_text()), cur), cur)
        desc = changed_settings(saved, cur, RUN_KEYS, paths=RUN_PATH_KEYS,
                                defaults={k: cur[k] for k in ("field", "image_root", "bands")})
        if desc:
            raise EvalError(f"{out} holds predictions made with other settings ({desc}); use another --out "
                            "or delete that folder to start over")
    cfg.write_text(json.dumps(cur, indent=2) + "\n")


def _check_images(args: argparse.Namespace, items: list[EvalItem]) -> None:
    """Every item to be asked has its image file, before the model loads."""
    root = image_root(args)
    todo = items if args.limit is None else items[: args.limit]
    missing = [it for it in todo if skip_reason(it) is None and not Path(_resolve_image(it, root)).is_file()]
    if missing:
        shown = "; ".join(f"{it.id}: {_resolve_image(it, root)}" for it in missing[:5])
        raise EvalError(f"{len(missing)} of {len(todo)} items have no image file ({shown}"
                        f"{'; ...' if len(missing) > 5 else ''}). Check --image-root.")


def _adapter_defaults(args: argparse.Namespace) -> None:
    """The visual-token settings left out take the --adapter's training settings (what `finetune`
    recorded), then the engine's defaults; set on `args`, so the run records and compares them.
    `args.bands` is the adapter's bands (None without them): eval has no --bands, and the engine
    applies the adapter's to every image that has them."""
    from engine.adapter_settings import (VISUAL_KEYS, AdapterSettingsError, read_training_settings,
                                         with_adapter_defaults)
    from engine.protocol import DEFAULT_STRATEGY

    trained = None
    if getattr(args, "adapter", None) is not None:
        try:
            trained = read_training_settings(args.adapter)
        except AdapterSettingsError as exc:
            raise EvalError(str(exc)) from None
    given = {key: getattr(args, key, None) for key in VISUAL_KEYS}  # eval has no --bands: None
    for key, value in with_adapter_defaults(given, trained).items():
        setattr(args, key, value)
    if args.strategy is None:
        args.strategy = DEFAULT_STRATEGY


def run_eval(args: argparse.Namespace, predict: Callable[[EvalItem, str], str] | None = None) -> int:
    items = load_items(args.annotations, args.format, parse_field_map(getattr(args, "field", None)))
    _adapter_defaults(args)
    if predict is None:
        _check_images(args, items)
        # resolved before the settings check, so that a rerun on another model (GEOVQA_WEIGHTS, the
        # default folder, the demo) is refused before anything loads; then loaded exactly that
        model = model_choice(args.weights, demo_ok=not getattr(args, "no_demo", False))
        resolve_tokens_per_tile(args, model)
        _check_run_settings(args, model, items)
        predict = engine_predictor(args, model["weights"])
    else:
        _check_run_settings(args, items=items)
    try:
        res = evaluate(items, predict, args.out, limit=args.limit, title=args.title or Path(args.annotations).name,
                       progress=True, instruction=getattr(args, "instruction", None),
                       on_error=getattr(args, "on_error", "stop"))
    finally:
        with contextlib.suppress(OSError):  # the engine's folder for heatmaps, when none were kept
            (Path(args.out) / "heatmaps").rmdir()
    print(markdown_table(res, res["title"]))
    print(f"Results in {Path(args.out) / 'results.json'} and results.md; predictions in predictions.jsonl.")
    return 0
