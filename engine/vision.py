"""CLIP preprocessing and the vision-tower run: uint8 tiles -> ``VisionFeatures``.

Tiles come from ``tiling.make_tiles``: (1 + T, 336, 336, 3) uint8 RGB, the downsized overview
first. Each tile is already 336 x 336, so the CLIP image processor's resize and centre crop are
identities; what remains is scaling to [0, 1] and normalising with OpenAI CLIP's mean / std.
The tower runs in batches (cancel is checked between batches) and returns the hidden state of
``mm_vision_select_layer`` (-2) with the CLS token, before the projector.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from engine.errors import Cancelled, OutOfMemory, is_oom
from engine.loader import base_model

# OpenAI CLIP normalisation (CLIPImageProcessor of openai/clip-vit-large-patch14-336).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionFeatures:
    cls: torch.Tensor  # (T, D) CLS token of layer -2, grid tiles only (overview dropped)
    patches: torch.Tensor  # (T, 576, D) patch tokens of layer -2
    overview_cls: torch.Tensor  # (D,) the dropped overview tile
    overview_patches: torch.Tensor  # (576, D)

    @property
    def n_tiles(self) -> int:
        return int(self.patches.shape[0])

    @property
    def dim(self) -> int:
        return int(self.patches.shape[-1])

    def to(self, device=None, dtype=None) -> "VisionFeatures":
        f = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return VisionFeatures(f(self.cls), f(self.patches), f(self.overview_cls), f(self.overview_patches))


def preprocess(tiles_uint8, device=None, dtype=torch.float32) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) CLIP-normalised float tensor."""
    t = torch.as_tensor(np.ascontiguousarray(tiles_uint8)) if isinstance(tiles_uint8, np.ndarray) else tiles_uint8
    if t.dtype != torch.uint8 or t.dim() != 4 or t.shape[-1] != 3:
        raise ValueError(f"tiles must be uint8 of shape (N, S, S, 3), got {tuple(t.shape)} {t.dtype}")
    x = t.to(device=device).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)


def encode_tiles(
    model,
    tiles_uint8,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> VisionFeatures:
    """Run the vision tower over the overview + grid tiles.

    ``progress(done, total)`` is called after each batch; ``cancel`` (a threading.Event) is
    checked before each batch and raises ``Cancelled``. Features stay on the tower's device in
    its dtype.
    """
    n = int(tiles_uint8.shape[0])
    if n < 2:
        raise ValueError("expected the overview tile plus at least one grid tile")
    base = base_model(model)  # under an optional peft wrapper
    tower = base.vision
    param = tower.vision_tower.vision_model.embeddings.patch_embedding.weight
    device, dtype = param.device, param.dtype
    cls_parts, patch_parts = [], []
    bs = max(int(batch_size), 1)
    for start in range(0, n, bs):
        if cancel is not None and cancel.is_set():
            raise Cancelled("the question was cancelled while the image was being encoded")
        try:
            px = preprocess(tiles_uint8[start : start + bs], device=device, dtype=dtype)
            cls, patches = model.encode_images(px)
        except Exception as exc:
            if is_oom(exc):
                raise OutOfMemory(f"encoding image tiles (batch of {bs})", exc) from exc
            raise
        cls_parts.append(cls)
        patch_parts.append(patches)
        if progress is not None:
            progress(min(start + bs, n), n)
    cls_all = torch.cat(cls_parts, 0)
    patches_all = torch.cat(patch_parts, 0)
    return VisionFeatures(
        cls=cls_all[1:],
        patches=patches_all[1:],
        overview_cls=cls_all[0],
        overview_patches=patches_all[0],
    )
