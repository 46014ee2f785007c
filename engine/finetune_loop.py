"""`finetune`'s training loop (`train`): steps over the samples, validation, log, checkpoints and
what happens when a sample or the run fails.

Loop
    batch 1 x ``--grad-accum``, AdamW, cosine schedule with ``--warmup-ratio``, gradient
    clipping, gradient checkpointing (non-reentrant), tqdm bar with loss and tokens/s. On CUDA
    the forward runs under autocast to the GPU's 16-bit format (`autocast_dtype`: bf16, fp16 on a
    GPU without native bfloat16). fp16's narrow range needs loss scaling (`loss_scaler`): a
    GradScaler scales the loss before backward and unscales the float32 adapter gradients before
    clipping and the step, skipping a step whose gradients overflowed (the lr schedule waits); its
    state is saved in each checkpoint and restored on ``--resume``. The sample order of each
    epoch comes from ``--seed``.
Outputs in ``--out``
    ``checkpoint-<step>/`` every ``--save-every`` steps (`engine.finetune_checkpoints`), the
    newest ``--keep-checkpoints`` kept; ``--resume`` continues from the latest.
    ``train_log.csv`` (step, epoch, loss, lr, tokens_per_s, val_loss, elapsed_s), ``loss.png``
    (`plot_log`), ``adapter/`` (final), ``finetune_summary.json``, and the samples skipped while
    training added to ``bad_samples.jsonl`` (`TRAINING_TIME_REASONS`).
Failures
    A run that stops early (Ctrl-C, a bad sample with ``--on-bad-sample stop``, a crash) first
    saves its last finished step. A sample that runs out of memory is skipped and reported
    (``out_of_memory``) or stops the run, as ``--on-bad-sample`` says.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from engine.data import DataError, Sample
from engine.errors import free_gpu_memory, is_oom
from engine.finetune_checkpoints import (ctrl_c_deferred, latest_checkpoint, load_checkpoint, prune_checkpoints,
                                         rng_state, save_adapter, save_checkpoint, use_current_lr)
from engine.finetune_inputs import answer_loss, build_training_inputs, encode_conversation

TRAINING_TIME_REASONS = ("too_long", "visual_failed", "out_of_memory")  # skips found while training
LOG_FIELDS = ("step", "epoch", "loss", "lr", "tokens_per_s", "val_loss", "elapsed_s")


@dataclass
class TrainConfig:
    out: Path
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    grad_accum: int = 4
    epochs: float = 1.0
    max_steps: int | None = None
    max_grad_norm: float = 1.0
    save_every: int = 100
    eval_every: int = 100
    seed: int = 0
    resume: bool = False
    gradient_checkpointing: bool = True
    max_length: int | None = None
    progress: bool = True
    keep_checkpoints: int | None = 3  # the newest N checkpoints kept (ft3.sh's save_total_limit); 0 / None: all
    on_bad: str = "stop"  # what a sample whose image fails in the visual path does: stop | skip
    run_args: dict | None = None  # written to finetune_args.json once a resume's checkpoint is restored
    # the visual-token settings written into every adapter folder (geovqa_training.json): what
    # `ask` / `serve --adapter` use when a question gives none of its own
    adapter_settings: dict | None = None


class _SampleOutOfMemory(Exception):
    """A training sample ran out of (GPU) memory: in its visual path, forward or backward pass."""

    def __init__(self, n_tokens: int | None, phase: str) -> None:
        self.n_tokens = n_tokens
        self.phase = phase
        super().__init__(self.describe())

    def describe(self) -> str:
        if self.phase == "visual":
            return "ran out of memory while building its visual tokens"
        return f"ran out of memory in the {self.phase} pass at {self.n_tokens} tokens (text + visual)"


def _epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def plot_log(csv_path: Path, png_path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    steps, loss, vsteps, vloss = [], [], [], []
    with csv_path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get("loss"):
                steps.append(int(row["step"]))
                loss.append(float(row["loss"]))
            if row.get("val_loss"):
                vsteps.append(int(row["step"]))
                vloss.append(float(row["val_loss"]))
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, loss, label="train loss", lw=1.2)
    if vloss:
        ax.plot(vsteps, vloss, "o-", label="validation loss", lw=1.2)
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


def autocast_dtype(device: str):
    """The dtype the training forward autocasts to on `device`: the GPU's 16-bit format on CUDA
    (`devices.half_dtype`: bfloat16, float16 on a GPU without native bfloat16), None (no
    autocast: the CPU trains in the loaded dtype) elsewhere."""
    from engine.devices import half_dtype  # noqa: PLC0415

    return half_dtype(device) if device.startswith("cuda") else None


def loss_scaler(device: str, dtype):
    """A torch.amp.GradScaler for training under autocast to `dtype` on `device`, enabled for
    float16 only: its 5 exponent bits flush small gradients of the fp16 activations to zero unless
    the loss is scaled up first. bfloat16 has float32's range and needs none; a disabled scaler
    passes the loss and the step through unchanged."""
    import torch  # noqa: PLC0415

    return torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)


def train(
    model,
    tokenizer,
    train_samples: list[Sample],
    val_samples: list[Sample],
    visual_fn: Callable[[Sample], Any],
    cfg: TrainConfig,
    *,
    device: str = "cpu",
    bad_report: Path | None = None,
    reported_before: set[int] | None = None,
) -> dict[str, Any]:
    """The training loop. `model` is already a peft model with trainable adapters.
    `reported_before`: sample indices an earlier (resumed) run already skipped and reported.
    The forward autocasts to `autocast_dtype(device)` (none on the CPU); float16 trains with loss
    scaling (`loss_scaler`)."""
    import torch  # noqa: PLC0415
    from transformers import get_cosine_schedule_with_warmup  # noqa: PLC0415

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if not train_samples:
        raise DataError("no valid training samples are left; see the bad-sample report")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(train_samples) / cfg.grad_accum))
    total = cfg.max_steps if cfg.max_steps else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(round(cfg.warmup_ratio * total)), total)
    amp_dtype = autocast_dtype(device)
    scaler = loss_scaler(device, amp_dtype)

    step, micro = 0, 0
    elapsed_before = 0.0  # training time of the run this one resumes, up to its checkpoint
    log_path = out / "train_log.csv"
    if cfg.resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            print(f"--resume: no checkpoint in {out}; starting from step 0", file=sys.stderr)
        else:
            step, micro = load_checkpoint(model, optimizer, scheduler, ckpt, scaler)
            use_current_lr(optimizer, scheduler, cfg.lr, cfg.weight_decay)
            print(f"resumed from {ckpt} at step {step}", file=sys.stderr)
    if cfg.run_args is not None:  # not before: a resume refused above keeps the run's record
        (out / "finetune_args.json").write_text(json.dumps(cfg.run_args, indent=2) + "\n")
    if step == 0 or not log_path.is_file():
        with log_path.open("w", newline="") as f:
            csv.writer(f).writerow(LOG_FIELDS)
    else:  # drop log rows past the checkpoint (written after it, before an interruption)
        with log_path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        with log_path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            w.writeheader()
            w.writerows(rows)
        with contextlib.suppress(KeyError, IndexError, TypeError, ValueError):
            elapsed_before = float(rows[-1]["elapsed_s"])

    reported: set[int] = set(reported_before or ())  # samples skipped during training, reported once

    def skip(sample: Sample, reason: str, msg: str) -> None:
        if sample.index in reported:
            return
        reported.add(sample.index)
        print(f"sample {sample.index} (id {sample.id}) skipped: {msg} (listed in bad_samples.jsonl)",
              file=sys.stderr)
        if bad_report is not None:
            _append_bad(bad_report, [(sample, reason, msg)])

    def forward_loss(sample: Sample):
        enc = encode_conversation(tokenizer, sample)
        try:
            vis = visual_fn(sample)
        except Exception as exc:  # noqa: BLE001 - out of memory is re-raised tagged, others below
            if is_oom(exc):
                raise _SampleOutOfMemory(None, "visual") from exc
            if not isinstance(exc, (ValueError, OSError)):
                raise
            # unreadable raster, strategy error: per sample
            if cfg.on_bad == "stop":
                raise DataError(f"sample {sample.index} (id {sample.id}): building its visual tokens "
                                f"failed: {exc}. Fix it, or pass --on-bad-sample skip.") from exc
            skip(sample, "visual_failed", f"building its visual tokens failed: {exc}")
            return None, -1
        n_tok = len(enc.before) + len(enc.after) + (int(vis.shape[0]) if vis is not None else 0)
        if cfg.max_length and n_tok > cfg.max_length:
            msg = f"{n_tok} tokens (text + visual), more than --max-length {cfg.max_length}"
            if cfg.on_bad == "stop":
                raise DataError(f"sample {sample.index} (id {sample.id}) has {msg}. Shorten it, raise "
                                "--max-length or lower --budget, or pass --on-bad-sample skip.")
            skip(sample, "too_long", msg)
            return None, n_tok
        try:
            embeds, labels, mask = build_training_inputs(model, enc, vis)
            with torch.autocast(device.split(":")[0], dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = answer_loss(model, embeds, labels, mask)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled here
            if is_oom(exc):
                raise _SampleOutOfMemory(n_tok, "forward") from exc
            raise
        return loss, n_tok

    def out_of_memory(sample: Sample, oom: _SampleOutOfMemory) -> None:
        """Skip the sample (--on-bad-sample skip), or save the progress and stop."""
        free_memory()
        msg = f"{oom.describe()}; a lower --budget or --max-length avoids it"
        if cfg.on_bad == "skip":
            skip(sample, "out_of_memory", msg)
            return
        saved = save_progress()
        where = f"; progress is saved in {saved.name}, continue with --resume" if saved else ""
        raise DataError(f"sample {sample.index} (id {sample.id}) {msg}, or pass --on-bad-sample skip{where}.")

    def free_memory() -> None:
        import gc  # noqa: PLC0415

        gc.collect()  # the failed pass's tensors sit in reference cycles of its traceback
        free_gpu_memory()

    def validate() -> float | None:
        if not val_samples:
            return None
        model.eval()
        losses = []
        with torch.no_grad():
            for s in val_samples:
                try:
                    loss, _ = forward_loss(s)
                except _SampleOutOfMemory as oom:  # a validation sample too large: leave it out
                    free_memory()
                    skip(s, "out_of_memory", f"{oom.describe()} in validation; left out of the "
                                             "validation loss")
                    continue
                if loss is not None:
                    losses.append(float(loss))
        model.train()
        return sum(losses) / len(losses) if losses else None

    bar = None
    if cfg.progress:
        from tqdm import tqdm  # noqa: PLC0415

        bar = tqdm(total=total, initial=step, desc="finetune", unit="step", file=sys.stderr, dynamic_ncols=True)
    model.train()
    t_start = time.perf_counter() - elapsed_before
    n = len(train_samples)
    skipped_long: set[int] = set(reported) & {s.index for s in train_samples}
    order: list[int] = []
    order_epoch = -1
    last_val = None
    # the state at the end of the last finished optimizer step: what an interruption saves
    done = {"step": step, "micro": micro, "rng": rng_state(), "saved": step if cfg.resume else -1}

    # the log row of the last finished step until it is written: validation runs between the two,
    # and an interruption there still writes it (val_loss empty), so log and checkpoint agree
    pending: dict[str, Any] = {"row": None}

    def write_row(val: float | None) -> None:
        row, pending["row"] = pending["row"], None
        if row is not None:
            row[LOG_FIELDS.index("val_loss")] = "" if val is None else f"{val:.6f}"
            with log_path.open("a", newline="") as f:
                csv.writer(f).writerow(row)

    def save_progress() -> Path | None:
        """checkpoint-<last finished step> unless it is already on disk (or nothing was done)."""
        if done["step"] == done["saved"] or done["step"] == 0:
            return None
        d = save_checkpoint(model, optimizer, scheduler, done["step"], done["micro"], out, rng=done["rng"],
                            adapter_settings=cfg.adapter_settings, scaler=scaler)
        done["saved"] = done["step"]
        return d

    try:
        while step < total:
            optimizer.zero_grad(set_to_none=True)
            acc_loss, acc_n, acc_tokens = 0.0, 0, 0
            t0 = time.perf_counter()
            while acc_n < cfg.grad_accum:
                epoch, pos = divmod(micro, n)
                if order_epoch != epoch:
                    order, order_epoch = _epoch_order(n, epoch, cfg.seed), epoch
                sample = train_samples[order[pos]]
                micro += 1
                if sample.index in skipped_long:
                    if len(skipped_long) >= n:
                        raise DataError("no training sample is usable (all too long for --max-length, "
                                        "out of memory or failing in the visual path); see bad_samples.jsonl")
                    continue
                try:
                    loss, n_tok = forward_loss(sample)
                    if loss is None:
                        skipped_long.add(sample.index)
                        continue
                    try:
                        scaler.scale(loss / cfg.grad_accum).backward()
                    except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled here
                        if not is_oom(exc):
                            raise
                        # gradients may hold part of this sample: restart the step's accumulation
                        del loss
                        optimizer.zero_grad(set_to_none=True)
                        acc_loss, acc_n, acc_tokens = 0.0, 0, 0
                        raise _SampleOutOfMemory(n_tok, "backward") from exc
                except _SampleOutOfMemory as oom:
                    out_of_memory(sample, oom)
                    skipped_long.add(sample.index)
                    continue
                acc_loss += float(loss.detach())
                acc_n += 1
                acc_tokens += n_tok
            with ctrl_c_deferred():  # an update and its bookkeeping happen together or not at all
                scaler.unscale_(optimizer)  # clip the true gradients (a no-op without fp16)
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                scale = scaler.get_scale()
                scaler.step(optimizer)  # skipped when an fp16 gradient overflowed ...
                scaler.update()
                if scaler.get_scale() >= scale:  # ... which lowers the scale: the schedule waits
                    scheduler.step()
                step += 1
                done.update(step=step, micro=micro, rng=rng_state())
                dt = time.perf_counter() - t0
                loss_mean = acc_loss / acc_n
                tps = acc_tokens / dt if dt > 0 else 0.0
                pending["row"] = [step, f"{micro / n:.4f}", f"{loss_mean:.6f}",
                                  f"{scheduler.get_last_lr()[0]:.3e}", f"{tps:.1f}", "",
                                  f"{time.perf_counter() - t_start:.2f}"]
            val = None
            if val_samples and cfg.eval_every and (step % cfg.eval_every == 0 or step == total):
                val = last_val = validate()
            write_row(val)
            if bar is not None:
                post = {"loss": f"{loss_mean:.4f}", "tok/s": f"{tps:.0f}"}
                if last_val is not None:
                    post["val"] = f"{last_val:.4f}"
                bar.set_postfix(post)
                bar.update(1)
            if cfg.save_every and (step % cfg.save_every == 0 or step == total):
                save_checkpoint(model, optimizer, scheduler, step, micro, out,
                                adapter_settings=cfg.adapter_settings, scaler=scaler)
                done["saved"] = step
                prune_checkpoints(out, cfg.keep_checkpoints)
    except BaseException as exc:  # Ctrl-C, a bad sample with --on-bad-sample stop, a crash: keep the work
        if bar is not None:
            bar.close()
        try:
            write_row(None)  # the finished step's row, if validation or the write was cut
        except Exception as log_exc:  # noqa: BLE001 - report, then raise the original error
            print(f"could not write the log row of step {done['step']}: {log_exc}", file=sys.stderr)
        try:
            saved = save_progress()
        except Exception as save_exc:  # noqa: BLE001 - report, then raise the original error
            saved = None
            print(f"could not save the progress of step {done['step']}: {save_exc}", file=sys.stderr)
        if saved is not None:
            what = "interrupted" if isinstance(exc, KeyboardInterrupt) else "stopped"
            print(f"{what} after step {done['step']}: saved {saved}; continue with --resume", file=sys.stderr)
        raise
    if bar is not None:
        bar.close()
    adapter_dir = out / "adapter"
    save_adapter(model, adapter_dir, cfg.adapter_settings)
    plot_log(log_path, out / "loss.png")
    summary = {"steps": step, "trainable_parameters": n_trainable, "train_samples": len(train_samples),
               "val_samples": len(val_samples), "adapter": str(adapter_dir), "log": str(log_path),
               "plot": str(out / "loss.png"), "skipped_during_training": len(reported),
               "final_val_loss": last_val}
    (out / "finetune_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _append_bad(path: Path, entries: list[tuple[Sample, str, str]]) -> None:
    """Add samples skipped during training to the bad-sample report (same line format)."""
    with Path(path).open("a", encoding="utf-8") as f:
        for s, reason, msg in entries:
            f.write(json.dumps({"index": s.index, "id": s.id, "reason": reason, "message": msg}) + "\n")
