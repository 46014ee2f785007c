"""Exceptions shared by the engine's model-side modules (vision encoding, generation, loading),
and the two helpers every caller of the model needs after an out-of-memory error (`is_oom`,
`free_gpu_memory`).

Each message is a sentence for a person; the pipeline turns these into protocol error events.
"""

from __future__ import annotations

import gc
import logging
import sys


class EngineError(RuntimeError):
    """Base class of the engine's own runtime errors."""


class Cancelled(EngineError):
    """The request was cancelled (its threading.Event was set) while work was in progress."""

    def __init__(self, message: str = "the request was cancelled") -> None:
        super().__init__(message)


class OutOfMemory(EngineError):
    """The device ran out of memory; wraps torch's OOM error with what was being done."""

    def __init__(self, what: str, cause: BaseException | None = None) -> None:
        hint = (
            " Try a smaller token budget or area of interest, fewer tiles, or 4-bit (nf4) weights."
        )
        super().__init__(f"out of memory while {what}.{hint}")
        self.what = what
        self.__cause__ = cause


def is_oom(exc: BaseException) -> bool:
    """True for torch's CUDA/CPU out-of-memory errors."""
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except Exception:
        pass
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()


def free_gpu_memory() -> None:
    """Release cached CUDA blocks after an OOM (does nothing without torch or CUDA): first the
    tensors only reference cycles still hold (an error's traceback and its frames), then torch's
    cache. The engine's own caches are `Engine.release_device_memory`'s."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    gc.collect()
    try:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - best effort
        logging.getLogger(__name__).warning("could not empty the CUDA cache", exc_info=True)


class ContextTooLong(EngineError, ValueError):
    """The prompt (visual + text tokens) does not fit the model's context window."""

    def __init__(self, n_tokens: int, limit: int) -> None:
        super().__init__(
            f"the prompt has {n_tokens} tokens (image + question) but the model reads at most "
            f"{limit}; lower the token budget, pick a reducing strategy or a smaller area of interest"
        )
        self.n_tokens = n_tokens
        self.limit = limit
