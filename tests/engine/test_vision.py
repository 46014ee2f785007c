"""Vision encoding: CLIP preprocessing, batching, cancel, equality with CLIPVisionModel."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from engine.errors import Cancelled
from engine.vision import CLIP_MEAN, CLIP_STD, encode_tiles, preprocess


def _tiles(n=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 336, 336, 3), dtype=np.uint8)


def test_preprocess_matches_clip_formula():
    tiles = _tiles(2)
    x = preprocess(tiles)
    assert x.shape == (2, 3, 336, 336) and x.dtype == torch.float32
    for c in range(3):
        ref = (tiles[..., c].astype(np.float64) / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c]
        np.testing.assert_allclose(x[:, c].numpy(), ref, atol=1e-5)
    with pytest.raises(ValueError):
        preprocess(tiles.astype(np.float32))


def test_encode_tiles_equals_clip_minus_2(tiny_model):
    tiles = _tiles(5)
    calls = []
    feats = encode_tiles(tiny_model, tiles, batch_size=2, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(2, 5), (4, 5), (5, 5)]
    assert feats.n_tiles == 4 and feats.dim == 32
    assert feats.cls.shape == (4, 32) and feats.patches.shape == (4, 576, 32)
    assert feats.overview_cls.shape == (32,) and feats.overview_patches.shape == (576, 32)
    clip = tiny_model.model.vision_tower.vision_tower
    with torch.no_grad():
        hs = clip(pixel_values=preprocess(tiles), output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(feats.overview_cls, hs[0, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(feats.overview_patches, hs[0, 1:], rtol=0, atol=1e-5)
    torch.testing.assert_close(feats.cls, hs[1:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(feats.patches, hs[1:, 1:], rtol=0, atol=1e-5)
    # batching does not change the result
    one = encode_tiles(tiny_model, torch.from_numpy(tiles), batch_size=16)
    torch.testing.assert_close(one.patches, feats.patches, rtol=0, atol=1e-5)


def test_encode_tiles_cancel(tiny_model):
    cancel = threading.Event()

    def progress(done, total):
        cancel.set()

    with pytest.raises(Cancelled):
        encode_tiles(tiny_model, _tiles(4), batch_size=1, progress=progress, cancel=cancel)


def test_needs_grid_tiles(tiny_model):
    with pytest.raises(ValueError, match="grid tile"):
        encode_tiles(tiny_model, _tiles(1))


def test_encode_tiles_from_tiling(tiny_model):
    from engine.tiling import make_tiles, plan_tiles

    pixels = np.random.default_rng(1).integers(0, 256, size=(600, 800, 3), dtype=np.uint8)
    layout = plan_tiles((800, 600))
    tiles = make_tiles(pixels, layout)
    feats = encode_tiles(tiny_model, tiles, batch_size=4)
    assert feats.n_tiles == layout.n_tiles == 6  # 800 x 600 -> 3 x 2 tiles
    assert torch.isfinite(feats.patches).all()


def test_a_batch_size_below_one_encodes_one_tile_at_a_time(tiny_model):
    calls = []
    feats = encode_tiles(tiny_model, _tiles(3), batch_size=0, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)] and feats.n_tiles == 2


def test_out_of_memory_in_the_tower_says_what_was_being_done(tiny_model, monkeypatch):
    from engine.errors import OutOfMemory

    def out_of_memory(*_a, **_k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(tiny_model, "encode_images", out_of_memory)
    with pytest.raises(OutOfMemory, match=r"encoding image tiles \(batch of 2\)") as exc:
        encode_tiles(tiny_model, _tiles(3), batch_size=2)
    assert isinstance(exc.value.__cause__, torch.OutOfMemoryError)
