"""`python -m engine finetune`: QLoRA / LoRA fine-tuning of GeoLLaVA-8K on LLaVA conversation data.

This module is the command: its options (`add_finetune_arguments`), the checks made before
anything loads (a mistyped ``--target-modules``, a missing ``--image-root``, a new run into a
folder holding another run's checkpoints or results, a ``--resume`` with other settings than
``OUT/finetune_args.json`` records), the data check and train/validation split, the model with
its adapters and visual path, then `train`, and the end-of-run message (`finished_text`).

The rest of fine-tuning, one job a module:
    `engine.finetune_lora`         which layers get LoRA adapters, and the (Q)LoRA base's precision
    `engine.finetune_inputs`       a conversation sample as token ids, labels, visual tokens, loss
    `engine.finetune_checkpoints`  checkpoint folders: save, resume, prune; the adapter folder
    `engine.finetune_loop`         the training loop: steps, validation, log, skipped samples

Outputs in ``--out``
    ``checkpoint-<step>/`` (``--save-every``, the newest ``--keep-checkpoints`` kept),
    ``train_log.csv``, ``loss.png``, ``bad_samples.jsonl`` (every skipped sample with its index
    and reason), ``finetune_args.json`` (this run's settings, for ``--resume``),
    ``finetune_summary.json`` and ``adapter/`` (final; load it with ``load_model(...,
    adapter=DIR)`` or ``ask/serve --adapter DIR``). ``--resume`` continues from the latest
    checkpoint; a run without ``--resume`` into a folder that holds checkpoints, or a finished
    run's ``adapter/``, log or summary, is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
from pathlib import Path
from typing import Sequence

from engine.cli_args import (AUTO_CHOICE_HELP, HALF_FORMATS_HELP, add_model_arguments, add_strategy_arguments,
                             band_choice, count_or_never, non_negative_number, positive_int, positive_number,
                             probability_below_one, share)
from engine.adapter_settings import training_settings
from engine.data import DataError, Sample, load_dataset, split_is_by_raster, split_train_val
from engine.finetune_checkpoints import checkpoint_dirs
from engine.finetune_inputs import default_visual_fn
from engine.finetune_lora import LM_TARGETS, add_lora, lm_target_regex
from engine.finetune_loop import TRAINING_TIME_REASONS, TrainConfig, train
from engine.json_files import json_lines
from engine.run_settings import (absolute_path, changed_settings, model_choice, resolve_tokens_per_tile,
                                 resolved_quantization, with_model_choice, with_resolved_quantization)

DEFAULT = " (default: %(default)s)"  # --help shows each default, as ask's and eval's options do


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="training data: LLaVA conversation JSON list or JSONL")
    parser.add_argument("--out", type=Path, required=True, help="output folder (checkpoints, log, adapter)")
    add_model_arguments(parser, adapter=False,
                        quantization_help=f"nf4 = QLoRA; bf16 / fp16 = LoRA on a 16-bit base ({HALF_FORMATS_HELP}); "
                                          f"{AUTO_CHOICE_HELP}")
    parser.add_argument("--image-root", default=None, help="folder relative image paths are taken from")
    parser.add_argument("--max-pixels", type=positive_int, default=None,
                        help="reject images whose width x height exceeds this (reported per sample)")
    parser.add_argument("--on-bad-sample", choices=["skip", "stop"], default="stop",
                        help="skip bad samples (each listed in OUT/bad_samples.jsonl) or stop at the first (default: stop)")
    add_strategy_arguments(parser, budget_help="visual token budget per sample")
    parser.add_argument("--bands", type=band_choice, default=None,
                        help="1-based bands the model sees, as `ask --bands` and the QGIS plugin send them: "
                             "three as red, green, blue (e.g. 4,3,2) or one as grey (default: the engine's "
                             "choice for each raster: the bands tagged red/green/blue, else the first three); "
                             "a record's own \"bands\" field replaces it")
    parser.add_argument("--lora-r", type=positive_int, default=16, help="LoRA rank" + DEFAULT)
    parser.add_argument("--lora-alpha", type=positive_int, default=32, help="LoRA scale (alpha / r)" + DEFAULT)
    parser.add_argument("--lora-dropout", type=probability_below_one, default=0.05, help="dropout on the LoRA input" + DEFAULT)
    parser.add_argument("--target-modules", default=",".join(LM_TARGETS),
                        help="LM linear layers that get adapters (comma-separated; add lm_head to adapt the output head)"
                             + DEFAULT)
    parser.add_argument("--lr", type=positive_number, default=2e-4, help="AdamW learning rate of the adapters" + DEFAULT)
    parser.add_argument("--weight-decay", type=non_negative_number, default=0.0, help="AdamW weight decay" + DEFAULT)
    parser.add_argument("--warmup-ratio", type=share, default=0.03,
                        help="share of the steps the cosine schedule warms up over" + DEFAULT)
    parser.add_argument("--grad-accum", type=positive_int, default=4,
                        help="samples a step (batch 1 x this); the effective batch" + DEFAULT)
    parser.add_argument("--epochs", type=positive_number, default=1.0, help="passes over the training samples" + DEFAULT)
    parser.add_argument("--max-steps", type=positive_int, default=None, help="optimizer steps (overrides --epochs)")
    parser.add_argument("--max-grad-norm", type=non_negative_number, default=1.0, help="gradient clipping (0 = none)" + DEFAULT)
    parser.add_argument("--max-length", type=positive_int, default=32768,
                        help="longest sequence (text + visual tokens)" + DEFAULT)
    parser.add_argument("--save-every", type=count_or_never, default=100,
                        help="checkpoint every N optimizer steps (0 = none; the final adapter is always written)"
                             + DEFAULT)
    parser.add_argument("--keep-checkpoints", type=count_or_never, default=3,
                        help="keep only the newest N checkpoints, as GeoLLaVA-8K's ft3.sh (save_total_limit 3); "
                             "0 = keep all" + DEFAULT)
    parser.add_argument("--eval-every", type=count_or_never, default=100,
                        help="validation loss every N steps (0 = never)" + DEFAULT)
    parser.add_argument("--val-fraction", type=probability_below_one, default=0.05,
                        help="share of the distinct rasters held out whole for validation" + DEFAULT)
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the split, the data order and the adapters' initial weights" + DEFAULT)
    parser.add_argument("--resume", action="store_true", help="continue from the newest OUT/checkpoint-*")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--no-progress", action="store_true")


# what decides the base model, the visual tokens, the samples (--image-root, --max-pixels), the
# train/validation split and the data order (--seed, --val-fraction, and --grad-accum, which maps
# optimizer steps to samples) and the adapter's shape and scale (--lora-r, --target-modules,
# --lora-alpha): a resumed run must keep them. "weights" is the checkpoint folder the engine resolved
# (GEOVQA_WEIGHTS, the default folder or the demo when --weights is left out), "demo_model" whether
# it is the tiny random one. The learning rate, its schedule, --weight-decay, --lora-dropout,
# --max-length and the length of the run (--epochs, --max-steps) may change on --resume.
RESUME_KEYS = ("data", "image_root", "max_pixels", "weights", "demo_model", "quantization", "strategy", "budget",
               "tokens_per_tile", "faithful_empty_slots", "bands", "seed", "val_fraction", "grad_accum",
               "lora_r", "target_modules", "lora_alpha")
RESUME_DEFAULTS = {"faithful_empty_slots": False, "bands": None}  # runs from before the options existed


RESUME_PATH_KEYS = ("data", "weights", "image_root")  # recorded and compared as absolute paths


def _target_list(text) -> list[str]:
    """--target-modules as a list of layer names."""
    return [t.strip() for t in str(text).split(",") if t.strip()]


def _run_args(args: argparse.Namespace, model: dict | None = None) -> dict:
    """The run's settings as finetune_args.json records them. `model` is the resolved checkpoint
    (run_settings.model_choice), resolved from the arguments when not given."""
    run = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if not callable(v)}
    run.update(model or model_choice(args.weights, demo_ok=not args.no_demo))
    run.update({k: absolute_path(run[k]) for k in RESUME_PATH_KEYS if k in run})
    # the format the base is trained in, not "auto" as typed: nf4 on a GPU, fp32 on the CPU
    run["quantization"] = resolved_quantization(args.device, args.quantization)
    if isinstance(run.get("target_modules"), str):  # "q_proj, v_proj" and "q_proj,v_proj" are one choice
        run["target_modules"] = ",".join(_target_list(run["target_modules"]))
    return run


def _check_resume_settings(args: argparse.Namespace, out: Path, model: dict | None = None) -> None:
    """--resume with another base model or token path would train on other inputs than the
    checkpoint saw: refuse, naming the differences. `model` as in `_run_args`."""
    saved = out / "finetune_args.json"
    if not (args.resume and saved.is_file()):
        return
    current = _run_args(args, model)
    # a record of an older version holds --weights as typed and no demo_model
    recorded = with_model_choice(json.loads(saved.read_text(encoding="utf-8")), current)
    recorded = with_resolved_quantization(recorded, current)  # older records hold "auto" as typed
    if isinstance(recorded.get("target_modules"), str):  # older records hold it as typed
        recorded["target_modules"] = ",".join(_target_list(recorded["target_modules"]))
    desc = changed_settings(recorded, current, RESUME_KEYS, defaults=RESUME_DEFAULTS, paths=RESUME_PATH_KEYS,
                            label=_flag_name)
    if desc:
        raise DataError(f"{out} holds a run made with other settings ({desc}); resume with the same "
                        "settings, or train into another --out")


def _flag_name(key: str) -> str:
    """How a recorded setting is named to the user: its flag."""
    return "demo model" if key == "demo_model" else "--" + key.replace("_", "-")


def _check_new_run(args: argparse.Namespace, out: Path) -> None:
    """A run without --resume into a folder that holds another run's checkpoints would mix with
    them: pruning keeps the higher-numbered old ones and deletes the new run's own, and a later
    --resume would continue the other run; into one that holds a finished run's adapter, log or
    summary it would overwrite them. Refuse, before the data and the model are loaded."""
    if args.resume:
        return
    found = checkpoint_dirs(out)
    if found:
        names = ", ".join(d.name for d in found[:3]) + (", ..." if len(found) > 3 else "")
        raise DataError(f"{out} already holds checkpoints of an earlier run ({names}); continue that run "
                        "with --resume, or start a new one with another --out (or delete them)")
    # a finished run (also one saved without checkpoints, --save-every 0): the new run would
    # overwrite its adapter, log and summary without asking
    finished = [name for name in ("adapter", "finetune_summary.json") if (out / name).exists()]
    if _logged_steps(out / "train_log.csv"):
        finished.append("train_log.csv")
    if finished:
        raise DataError(f"{out} already holds the results of an earlier run ({', '.join(finished)}), which a new "
                        "run would overwrite; train into another --out, or remove them to start over")


def _recorded_split(args: argparse.Namespace, out: Path) -> str:
    """How the run splits off its validation samples: by raster (whole images held out); a
    --resume of a run made before that (its finetune_args.json has no "val_split") keeps the
    record split it trained with, so its samples and their order stay the same."""
    saved = out / "finetune_args.json"
    if args.resume and saved.is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            return str(json.loads(saved.read_text(encoding="utf-8")).get("val_split", "record"))
    return "raster"


def _split_note(samples: Sequence[Sample], val: Sequence[Sample], fraction: float, split_by: str) -> str:
    """A line saying what the validation loss measures, or '' without validation samples."""
    if not val:
        return ""
    images = {str(s.image) for s in samples}
    held = {str(s.image) for s in val}
    if split_by == "raster" and split_is_by_raster(samples, fraction):
        return (f"validation: {len(val)} samples about {len(held)} of {len(images)} rasters, held out whole "
                "(none of their questions is trained on)")
    why = ("the run being resumed split its data so" if split_by == "record" else
           "the data has a single raster")
    return (f"validation: {len(val)} of {len(samples)} samples, held out by record ({why}): the validation "
            "questions are about rasters the adapter also trains on")


def _logged_steps(log: Path) -> int:
    """How many step rows a train_log.csv holds (0 when there is none: a run stopped before its
    first step leaves the header only)."""
    try:
        with log.open(newline="") as f:
            return sum(1 for _ in csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return 0


def run_finetune(args: argparse.Namespace, *, visual_fn_factory=None) -> int:
    """`python -m engine finetune`. `visual_fn_factory` (tests) replaces `default_visual_fn` and is
    called with the same arguments."""
    from engine.loader import load_model  # noqa: PLC0415

    lm_target_regex(_target_list(args.target_modules))  # a mistyped name, before anything loads
    if args.image_root is not None and not Path(args.image_root).expanduser().is_dir():
        root = Path(args.image_root).expanduser()
        state = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"--image-root {root} {state}; give the folder the data file's relative image "
                        "paths are under")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_new_run(args, out)
    # the checkpoint, resolved once before anything loads: compared with a resumed run's record,
    # recorded for the next resume and loaded (GEOVQA_WEIGHTS may point elsewhere by then)
    checkpoint = model_choice(args.weights, demo_ok=not args.no_demo)
    resolve_tokens_per_tile(args, checkpoint)
    _check_resume_settings(args, out, checkpoint)
    bad_report = out / "bad_samples.jsonl"
    # training-time skips of an earlier run (too long, visual path failed) stay in the report
    earlier: list[dict] = []
    if args.resume and bad_report.is_file():
        for line in json_lines(bad_report.read_text(encoding="utf-8")):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("reason") in TRAINING_TIME_REASONS:
                earlier.append(rec)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm  # noqa: PLC0415

        bar = tqdm(desc="checking data", unit="sample", file=sys.stderr, leave=False)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    try:
        samples, report = load_dataset(args.data, image_root=args.image_root, max_pixels=args.max_pixels,
                                       on_bad=args.on_bad_sample, report_path=bad_report, progress=progress,
                                       bands=args.bands)
    finally:
        if bar is not None:
            bar.close()
    if earlier:
        with bad_report.open("a", encoding="utf-8") as f:
            for rec in earlier:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    print(report.summary(), file=sys.stderr)
    for b in report.bad[:20]:
        print("  skipped " + b.describe(), file=sys.stderr)
    if len(report.bad) > 20:
        print(f"  ... and {len(report.bad) - 20} more in {bad_report}", file=sys.stderr)
    split_by = _recorded_split(args, out)
    train_s, val_s = split_train_val(samples, args.val_fraction, args.seed, by=split_by)
    note = _split_note(samples, val_s, args.val_fraction, split_by)
    if note:
        print(note, file=sys.stderr)

    loaded = load_model(checkpoint["weights"], device=args.device, quantization=args.quantization)
    info = loaded.info
    device = str(info.get("device", "cpu"))
    if info.get("demo"):
        from engine.weights import demo_model_note

        print(demo_model_note(args.weights, "training"), file=sys.stderr)
    targets = _target_list(args.target_modules)
    import torch  # noqa: PLC0415

    torch.manual_seed(args.seed)  # the adapters' initial weights come from --seed, not from the process
    model = add_lora(loaded.model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                     targets=targets, four_bit=bool(info.get("four_bit")),
                     gradient_checkpointing=not args.no_gradient_checkpointing)
    factory = visual_fn_factory or default_visual_fn
    visual_fn = factory(model, strategy=args.strategy, budget=args.budget, tokens_per_tile=args.tokens_per_tile,
                        seed=args.seed, tokenizer=loaded.tokenizer, faithful_empty_slots=args.faithful_empty_slots,
                        bands=args.bands)
    cfg = TrainConfig(out=out, lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
                      grad_accum=args.grad_accum, epochs=args.epochs, max_steps=args.max_steps,
                      max_grad_norm=args.max_grad_norm, save_every=args.save_every, eval_every=args.eval_every,
                      seed=args.seed, resume=args.resume,
                      gradient_checkpointing=not args.no_gradient_checkpointing, max_length=args.max_length,
                      progress=not args.no_progress, keep_checkpoints=args.keep_checkpoints,
                      on_bad=args.on_bad_sample, run_args={**_run_args(args, checkpoint), "val_split": split_by},
                      adapter_settings=training_settings(
                          args, records_with_own_bands=sum(1 for s in samples if s.bands_from_record)))
    summary = train(model, loaded.tokenizer, train_s, val_s, visual_fn, cfg, device=device, bad_report=bad_report,
                    reported_before={int(r["index"]) for r in earlier if isinstance(r.get("index"), int)})
    print(finished_text(summary, checkpoint, cfg.adapter_settings, weights_given=args.weights is not None),
          file=sys.stderr)
    return 0


def finished_text(summary: dict, checkpoint: dict, adapter_settings: dict | None, *,
                  weights_given: bool = True) -> str:
    """The end-of-run message: what was written, the final validation loss, and ready-to-copy
    ways to use the adapter (ask, serve, the QGIS plugin). The commands name the base model the
    adapter was trained on (--weights), unless that was the demo model found without --weights."""
    import shlex  # noqa: PLC0415

    from engine.adapter_settings import settings_text  # noqa: PLC0415

    adapter = shlex.quote(str(Path(summary["adapter"]).resolve()))
    weights = "" if checkpoint.get("demo_model") and not weights_given else f" --weights {shlex.quote(str(checkpoint['weights']))}"
    lines = [f"Adapter written to {summary['adapter']} ({summary['steps']} steps, "
             f"{summary['trainable_parameters']:,} trainable parameters). Log: {summary['log']}, "
             f"plot: {summary['plot']}."]
    if summary.get("val_samples"):
        val = summary.get("final_val_loss")
        lines.append(f"Final validation loss: {val:.4f} ({summary['val_samples']} held-out samples)." if val is not None
                     else f"Final validation loss: none ({summary['val_samples']} held-out samples, none usable).")
    if adapter_settings:
        lines.append(f"It was trained with {settings_text(adapter_settings)}; the engine uses these "
                     "whenever a question does not set them.")
    lines += ["Use it:",
              f"  python -m engine ask RASTER \"question\"{weights} --adapter {adapter}",
              f"  python -m engine serve{weights} --adapter {adapter}",
              f"  QGIS plugin: Settings > Options > GeoVQA > Extra engine arguments: --adapter {adapter}"
              " (then restart the local engine)"]
    return "\n".join(lines)
