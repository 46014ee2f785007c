"""The released GeoLLaVA-8K checkpoint's anyres tiling, reproduced in our own code.

How the checkpoint cuts an image (see docs and the reference note):

1. Pinpoints are every canvas (336 a, 336 b) with a * b <= 576 tiles, max(a, b) / min(a, b) <= 49,
   except 1 x 1, ordered by a then b (the order of the training script's list; it decides exact ties).
2. `select_best_resolution` keeps the pinpoint with the most *effective* pixels after an
   aspect-preserving scale (int-truncated sizes, capped at the image's own pixel count); ties go
   to the least wasted canvas area, and remaining ties to the earlier pinpoint.
3. The image is resized into the canvas keeping its aspect ratio: the side whose scale is the
   smaller one fills the canvas exactly, the other side is `ceil(side * that scale)` (capped at
   the canvas). When both scales are equal, the height fills and the width is the ceiled side.
   The image is pasted centred on a black canvas (offset = (canvas - scaled) // 2 on each axis).
4. The canvas is cut into 336 px tiles row by row; a plain (non aspect-preserving) 336 x 336
   resize of the whole image is put first (the overview, dropped by the unires selection path).
   Both resizes are Pillow's default for RGB images: bicubic.

Coordinates: image pixel (x, y) refers to the pixel's top-left corner (pixel-is-area, as in
rasterio); canvas x = ox + x * sx with sx = scaled_w / image_w (sy likewise), which is exactly the
mapping Pillow's resize uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from affine import Affine

TILE = 336
PATCH = 14
GRID = 24  # patches per tile side
PATCHES_PER_TILE = GRID * GRID  # 576
MAX_TILES = 576
MAX_RATIO = 49


@lru_cache(maxsize=8)
def _pinpoints(max_tiles: int, max_ratio: int) -> tuple[tuple[int, int], ...]:
    out = []
    for a in range(1, max_tiles + 1):
        for b in range(1, max_tiles // a + 1):
            if a == 1 and b == 1:
                continue
            if max(a, b) > max_ratio * min(a, b):
                continue
            out.append((TILE * a, TILE * b))
    return tuple(out)


def anyres_pinpoints(max_tiles: int = MAX_TILES, max_ratio: int = MAX_RATIO) -> list[tuple[int, int]]:
    """All canvas sizes (width, height) the released checkpoint can choose, in its own order."""
    return list(_pinpoints(int(max_tiles), int(max_ratio)))


def select_best_resolution(size_wh, pinpoints) -> tuple[int, int]:
    """The pinpoint (w, h) keeping most of the image's pixels, ties to the least wasted area.

    Same arithmetic as the original (Python floats, int truncation of the downscaled size), so
    ties resolve identically.
    """
    width, height = int(size_wh[0]), int(size_wh[1])
    if width <= 0 or height <= 0:
        raise ValueError(f"Image size must be positive, got {width} x {height}.")
    original = width * height
    best = None
    best_eff = 0
    best_waste = float("inf")
    for pw, ph in pinpoints:
        scale = min(pw / width, ph / height)
        eff = min(int(width * scale) * int(height * scale), original)
        waste = pw * ph - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(pw), int(ph)), eff, waste
    if best is None:
        raise ValueError("No pinpoint fits this image (empty pinpoint list?).")
    return best


def scaled_size(size_wh, canvas_wh) -> tuple[int, int]:
    """Size of the image inside the canvas, as the original `resize_and_pad_image` computes it."""
    width, height = int(size_wh[0]), int(size_wh[1])
    cw, ch = int(canvas_wh[0]), int(canvas_wh[1])
    scale_w = cw / width
    scale_h = ch / height
    if scale_w < scale_h:
        return cw, min(math.ceil(height * scale_w), ch)
    return min(math.ceil(width * scale_h), cw), ch


@dataclass(frozen=True)
class TileLayout:
    """Where the image sits on the chosen canvas and how the canvas is cut into tiles/patches."""

    image_size: tuple[int, int]  # (w, h) of the image given to tiling
    canvas_size: tuple[int, int]  # (W, H): the chosen pinpoint
    scaled_size: tuple[int, int]  # (w', h'): the image after resize, inside the canvas
    offset: tuple[int, int]  # (ox, oy): black padding before the image
    rows: int
    cols: int

    @property
    def n_tiles(self) -> int:
        return self.rows * self.cols

    @property
    def n_patches(self) -> int:
        return self.n_tiles * PATCHES_PER_TILE

    @property
    def scale(self) -> tuple[float, float]:
        """(sx, sy): canvas pixels per image pixel on each axis."""
        return (self.scaled_size[0] / self.image_size[0], self.scaled_size[1] / self.image_size[1])

    @property
    def image_to_canvas(self) -> Affine:
        sx, sy = self.scale
        return Affine.translation(*self.offset) @ Affine.scale(sx, sy)

    @property
    def canvas_to_image(self) -> Affine:
        sx, sy = self.scale
        return Affine.scale(1.0 / sx, 1.0 / sy) @ Affine.translation(-self.offset[0], -self.offset[1])

    @property
    def grid_size(self) -> tuple[int, int]:
        """(width, height) of the whole canvas in patches."""
        return self.cols * GRID, self.rows * GRID

    def patch_grid_rc(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """Flat patch ids (tile * 576 + patch) -> (row, col) in the canvas' patch grid."""
        ids = np.asarray(ids, dtype=np.int64)
        tile, p = np.divmod(ids, PATCHES_PER_TILE)
        trow, tcol = np.divmod(tile, self.cols)
        prow, pcol = np.divmod(p, GRID)
        return trow * GRID + prow, tcol * GRID + pcol

    def patch_boxes_canvas(self) -> np.ndarray:
        """(T, 576, 4) float64 x0, y0, x1, y1 of every patch in canvas pixels."""
        t = np.arange(self.n_tiles)
        trow, tcol = np.divmod(t, self.cols)
        p = np.arange(PATCHES_PER_TILE)
        prow, pcol = np.divmod(p, GRID)
        x0 = tcol[:, None] * TILE + pcol[None, :] * PATCH
        y0 = trow[:, None] * TILE + prow[None, :] * PATCH
        return np.stack([x0, y0, x0 + PATCH, y0 + PATCH], axis=-1).astype(np.float64)

    def patch_boxes(self, clip: bool = False) -> np.ndarray:
        """(T, 576, 4) x0, y0, x1, y1 of every patch in image pixels (float).

        The exact inverse of scale + offset; patches reaching into the padding extend past the
        image (negative or > size) unless `clip=True`, which clips them to the image extent.
        """
        c = self.patch_boxes_canvas()
        sx, sy = self.scale
        ox, oy = self.offset
        out = np.empty_like(c)
        out[..., 0] = (c[..., 0] - ox) / sx
        out[..., 2] = (c[..., 2] - ox) / sx
        out[..., 1] = (c[..., 1] - oy) / sy
        out[..., 3] = (c[..., 3] - oy) / sy
        if clip:
            w, h = self.image_size
            out[..., 0::2] = np.clip(out[..., 0::2], 0.0, w)
            out[..., 1::2] = np.clip(out[..., 1::2], 0.0, h)
        return out

    def patch_image_fraction(self) -> np.ndarray:
        """(T, 576) fraction of each patch's canvas area covered by the resized image."""
        c = self.patch_boxes_canvas()
        ox, oy = self.offset
        w, h = self.scaled_size
        ix = np.clip(np.minimum(c[..., 2], ox + w) - np.maximum(c[..., 0], ox), 0, None)
        iy = np.clip(np.minimum(c[..., 3], oy + h) - np.maximum(c[..., 1], oy), 0, None)
        return ix * iy / float(PATCH * PATCH)

    def patch_valid(self) -> np.ndarray:
        """(T, 576) bool: False for patches that are pure padding (no image pixel at all)."""
        return self.patch_image_fraction() > 0


def plan_tiles(image_size, pinpoints=None, *, choose_from=None) -> TileLayout:
    """Choose the canvas for an image of `image_size` (w, h) and place it as the checkpoint does.

    `choose_from`: the (w, h) the canvas is chosen for, when the image is a reduced read of a
    larger source window (the pipeline passes the window): the checkpoint would choose for the
    whole image, and the reduced size's rounding can tip the choice to a smaller canvas."""
    w, h = int(image_size[0]), int(image_size[1])
    if w <= 0 or h <= 0:
        raise ValueError(f"Image size must be positive, got {w} x {h}.")
    pins = anyres_pinpoints() if pinpoints is None else [tuple(int(v) for v in p) for p in pinpoints]
    for pw, ph in pins:
        if pw % TILE or ph % TILE:
            raise ValueError(f"Pinpoint {pw} x {ph} is not a multiple of the {TILE} px tile.")
    cw, ch = select_best_resolution(choose_from if choose_from is not None else (w, h), pins)
    nw, nh = scaled_size((w, h), (cw, ch))
    return TileLayout(
        image_size=(w, h),
        canvas_size=(cw, ch),
        scaled_size=(nw, nh),
        offset=((cw - nw) // 2, (ch - nh) // 2),
        rows=ch // TILE,
        cols=cw // TILE,
    )


def tiling_read_budget(window_wh, pinpoints=None) -> int:
    """Pixel budget for reading a source window: the area of the pinpoint tiling would choose.

    The pipeline passes this as `read_raster(..., max_pixels=...)`, so a 27,000 px raster is read
    decimated to about 8064 x 8064 (the largest canvas, 576 tiles), through its overviews when it
    has them (engine/raster.py says when parts are still read at full resolution), while a raster
    smaller than its canvas is read at full resolution.
    """
    pins = anyres_pinpoints() if pinpoints is None else pinpoints
    cw, ch = select_best_resolution(window_wh, pins)
    return int(cw) * int(ch)


def _resize(pixels: np.ndarray, size_wh) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(pixels))
    return np.asarray(img.resize((int(size_wh[0]), int(size_wh[1])), resample=Image.Resampling.BICUBIC))


def make_canvas(pixels_uint8: np.ndarray, layout: TileLayout) -> np.ndarray:
    """(H, W, 3) uint8 canvas: the image resized (bicubic) into the pinpoint, centred on black."""
    px = _check_pixels(pixels_uint8, layout)
    cw, ch = layout.canvas_size
    canvas = np.zeros((ch, cw, 3), dtype=np.uint8)
    nw, nh = layout.scaled_size
    ox, oy = layout.offset
    if (nw, nh) == layout.image_size:
        scaled = px
    else:
        scaled = _resize(px, (nw, nh))
    canvas[oy:oy + nh, ox:ox + nw] = scaled
    return canvas


def _check_pixels(pixels: np.ndarray, layout: TileLayout) -> np.ndarray:
    px = np.asarray(pixels)
    if px.dtype != np.uint8 or px.ndim != 3 or px.shape[2] != 3:
        raise ValueError(f"Expected (H, W, 3) uint8 pixels, got {px.shape} {px.dtype}.")
    if (px.shape[1], px.shape[0]) != tuple(layout.image_size):
        raise ValueError(
            f"Pixels are {px.shape[1]} x {px.shape[0]} but the layout was planned for "
            f"{layout.image_size[0]} x {layout.image_size[1]}."
        )
    return px


def make_tiles(pixels_uint8: np.ndarray, layout: TileLayout) -> np.ndarray:
    """(1 + T, 336, 336, 3) uint8: the 336 x 336 overview first, then tiles row-major."""
    px = _check_pixels(pixels_uint8, layout)
    out = np.empty((1 + layout.n_tiles, TILE, TILE, 3), dtype=np.uint8)
    out[0] = px if px.shape[:2] == (TILE, TILE) else _resize(px, (TILE, TILE))
    canvas = make_canvas(px, layout)
    view = canvas.reshape(layout.rows, TILE, layout.cols, TILE, 3).transpose(0, 2, 1, 3, 4)
    out[1:] = view.reshape(layout.n_tiles, TILE, TILE, 3)
    return out
