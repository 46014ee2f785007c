"""`finetune`'s checkpoints and adapters on disk.

``OUT/checkpoint-<step>/`` holds ``adapter/`` (peft, with the visual-token settings it was trained
on: `save_adapter`) and ``trainer_state.pt`` (optimizer, scheduler, RNG, step, fp16 loss scaler; tensors and plain
containers only, read back with ``torch.load(weights_only=True)``). `save_checkpoint` writes one
atomically (a temporary folder renamed), `load_checkpoint` restores it for ``--resume``
(`use_current_lr` then puts in the resumed run's ``--lr`` / ``--weight-decay``),
`prune_checkpoints` keeps the newest ``--keep-checkpoints``, and `ctrl_c_deferred` holds Ctrl-C
back while an optimizer update and the record of its step are made.
"""

from __future__ import annotations

import contextlib
import random
import re
import signal
import threading
from pathlib import Path
from typing import Any

from engine.data import DataError


def checkpoint_dirs(out: Path) -> list[Path]:
    """The ``checkpoint-<step>`` folders in `out`, in step order."""
    found = [(int(m.group(1)), d) for d in out.glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", d.name))]
    return [d for _, d in sorted(found)]


def latest_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint with both its adapter and its trainer state (what ``--resume``
    continues from), or None."""
    complete = [d for d in checkpoint_dirs(out)
                if (d / "trainer_state.pt").is_file() and (d / "adapter").is_dir()]
    return complete[-1] if complete else None


def rng_state() -> dict[str, Any]:
    """The torch, Python and (where there is one) CUDA RNG states, as a checkpoint stores them."""
    import torch  # noqa: PLC0415

    st: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    import torch  # noqa: PLC0415

    torch.set_rng_state(st["torch"])
    random.setstate((3, tuple(st["python"]), None))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


@contextlib.contextmanager
def ctrl_c_deferred():
    """Hold Ctrl-C (SIGINT) back until the block ends, then raise KeyboardInterrupt: the optimizer
    update and the record of the finished step must not be split by an interruption. A no-op
    outside the main thread or where Python does not own the SIGINT handler."""
    if threading.current_thread() is not threading.main_thread() or \
            not callable(signal.getsignal(signal.SIGINT)):
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def save_adapter(model, folder: Path, adapter_settings: dict | None = None) -> Path:
    """The peft adapter in `folder`, with the visual-token settings it was trained on
    (`engine.adapter_settings`, read back by `ask` / `serve --adapter`)."""
    from engine.adapter_settings import write_training_settings  # noqa: PLC0415

    model.save_pretrained(str(folder), save_embedding_layers=False)
    if adapter_settings is not None:
        write_training_settings(folder, adapter_settings)
    _share_as_umask_allows(folder)
    return folder


def _share_as_umask_allows(folder: Path) -> None:
    """Give the adapter's files the mode every other file of the run gets (0o666 & ~umask):
    safetensors writes adapter_model.safetensors with 0600 whatever the umask, so an adapter copied
    to a shared drive or served by another account (`serve --adapter`) could not be read."""
    import os  # noqa: PLC0415

    mask = os.umask(0)
    os.umask(mask)
    for p in Path(folder).iterdir():
        if p.is_file() and not p.is_symlink():
            with contextlib.suppress(OSError):  # a file system without modes (FAT, some shares)
                os.chmod(p, 0o666 & ~mask)


def save_checkpoint(model, optimizer, scheduler, step: int, micro: int, out: Path,
                    rng: dict[str, Any] | None = None, adapter_settings: dict | None = None,
                    scaler=None) -> Path:
    """Write checkpoint-<step> atomically (a temporary folder renamed). `rng` is the RNG state to
    store (default: now), so that a checkpoint taken after an interruption can hold the state of
    the end of its step. `scaler`: the fp16 loss scaler (`finetune_loop.loss_scaler`), whose state
    (empty when it is disabled) is stored beside the optimizer's."""
    import torch  # noqa: PLC0415

    d = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    if tmp.exists():
        import shutil  # noqa: PLC0415

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_adapter(model, tmp / "adapter", adapter_settings)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng if rng is not None else rng_state(), "step": step, "micro": micro,
                "scaler": scaler.state_dict() if scaler is not None else {}, "format": 1},
               tmp / "trainer_state.pt")
    if d.exists():
        import shutil  # noqa: PLC0415

        shutil.rmtree(d)
    tmp.rename(d)
    return d


def load_checkpoint(model, optimizer, scheduler, ckpt: Path, scaler=None) -> tuple[int, int]:
    """Restore adapter weights, optimizer, scheduler, RNG and the fp16 loss scaler (when `scaler`
    is enabled and the checkpoint holds a state: one saved without fp16, by an older version or
    on a GPU with bfloat16, leaves it at its start); return (step, micro)."""
    import torch  # noqa: PLC0415
    from peft import set_peft_model_state_dict  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    ad = ckpt / "adapter"
    f = ad / "adapter_model.safetensors"
    if not f.is_file():
        raise DataError(f"the checkpoint {ckpt} has no adapter_model.safetensors")
    try:
        res = set_peft_model_state_dict(model, load_file(str(f)))
    except RuntimeError as exc:  # shape mismatch: other --lora-r / targets than the checkpoint
        raise DataError(f"the checkpoint {ckpt} was made with other LoRA settings (rank or target "
                        f"modules) than this run; resume with the same settings. ({exc})") from exc
    if getattr(res, "unexpected_keys", None):
        raise DataError(f"the checkpoint {ckpt} does not match this model/LoRA settings "
                        f"(unexpected keys such as {res.unexpected_keys[:2]})")
    state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    return int(state["step"]), int(state["micro"])


def use_current_lr(optimizer, scheduler, lr: float, weight_decay: float) -> None:
    """After a checkpoint's optimizer and scheduler states are loaded, they hold its run's --lr
    (each parameter group's lr and initial_lr, the scheduler's base_lrs) and --weight-decay, and a
    resume with other values went on with the old ones. Put this run's in, at the position the
    schedule has reached (its shape, from --warmup-ratio and the run's length, is this run's); with
    unchanged settings every value is the one restored, so a resume still reproduces the run."""
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["weight_decay"] = weight_decay
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def prune_checkpoints(out: Path, keep: int | None) -> None:
    """Delete all but the newest `keep` checkpoints in `out` (after each save); 0 or None keeps all."""
    if not keep:
        return
    import shutil  # noqa: PLC0415

    for d in checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(d, ignore_errors=True)
