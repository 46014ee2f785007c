"""Synthetic UHR scenes with known object boxes, for tests and benchmarks.

`make_scene` writes an RGB uint8 GeoTIFF (UTM zone 33N, 0.5 m pixels, tiled, compressed, with
overviews) of large textured regions - water, forest, fields - laid out by smooth low-frequency
noise, plus a few small bright objects (white "boats", red "roofs") at seeded random places.
Everything is vectorised numpy generated block by block (512 rows at a time), so a 16K x 16K
scene needs ~25 MB of working memory per block and a deterministic result per seed.

Object size follows the patch size the checkpoint will see: the tiling fits at most 576 tiles
(about 8064 px on a square side) so a 14 px patch covers ``14 * max(1, size / 8064)`` source
pixels; objects are 1.5 to 3 patches wide, i.e. a few patch tokens each.

`object_recall(selection, geometry, objects)`: an **object patch** is a valid patch whose
source-pixel box overlaps an object box by at least a quarter of the patch's area, or contains
the object's centre (so an object smaller than a patch still has one). Recall = share of object
patches that are members of at least one kept token; with ``max_token_patches`` only tokens
standing for at most that many patches count (a large merged cluster that swallowed an object
does not really keep it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from affine import Affine

CRS_EPSG = 32633
PIXEL_SIZE = 0.5
ORIGIN = (500000.0, 5_000_000.0)
BLOCK = 512
MAX_CANVAS_SIDE = 24 * 336  # the largest square canvas (576 tiles)

WATER = np.array([30, 70, 110], np.float32)
FOREST = np.array([40, 90, 45], np.float32)
FIELD_COLOURS = np.array([[170, 150, 90], [120, 150, 70], [190, 170, 120], [100, 120, 60]], np.float32)
OBJECT_COLOURS = {"boat": (250, 250, 245), "roof": (220, 40, 30)}


@dataclass
class SceneObject:
    kind: str
    box_px: tuple[int, int, int, int]  # x0, y0, x1, y1 source pixels (end exclusive)
    box_map: tuple[float, float, float, float]  # minx, miny, maxx, maxy


@dataclass
class Scene:
    path: Path
    size: tuple[int, int]
    crs_epsg: int
    transform: object
    objects: list[SceneObject] = field(default_factory=list)


def _interp_matrix(n_out: int, n_coarse: int) -> np.ndarray:
    """(n_coarse, n_out) linear interpolation weights from a coarse grid to n_out samples."""
    pos = (np.arange(n_out) + 0.5) / n_out * (n_coarse - 1)
    i0 = np.clip(np.floor(pos).astype(int), 0, n_coarse - 2)
    f = (pos - i0).astype(np.float32)
    m = np.zeros((n_coarse, n_out), np.float32)
    m[i0, np.arange(n_out)] = 1 - f
    m[i0 + 1, np.arange(n_out)] = f
    return m


def place_objects(width: int, height: int, n: int, seed: int) -> list[tuple[str, tuple[int, int, int, int]]]:
    rng = np.random.default_rng([seed, 7])
    patch_px = 14 * max(1.0, max(width, height) / MAX_CANVAS_SIDE)
    out = []
    for i in range(n):
        side = int(round(rng.uniform(1.5, 3.0) * patch_px))
        w, h = side, max(4, int(side * rng.uniform(0.5, 1.0)))
        x0 = int(rng.integers(0, max(1, width - w)))
        y0 = int(rng.integers(0, max(1, height - h)))
        out.append(("boat" if i % 2 == 0 else "roof", (x0, y0, x0 + w, y0 + h)))
    return out


def _block(y0: int, bh: int, width: int, height: int, class_lo: np.ndarray, seed: int) -> np.ndarray:
    """RGB uint8 rows y0..y0+bh of the scene."""
    gh, gw = class_lo.shape
    wy = _interp_matrix(height, gh)[:, y0 : y0 + bh]  # (gh, bh)
    wx = _interp_matrix(width, gw)  # (gw, width)
    v = wy.T @ class_lo @ wx  # (bh, width) smooth field in [0, 1]
    rng = np.random.default_rng([seed, y0])
    noise = rng.standard_normal((bh, width), dtype=np.float32)
    ys = np.arange(y0, y0 + bh)[:, None]
    xs = np.arange(width)[None, :]
    img = np.empty((bh, width, 3), np.float32)
    water = v < 0.38
    forest = (v >= 0.38) & (v < 0.62)
    fields = v >= 0.62
    ripple = np.sin((xs * 0.05 + ys * 0.11)).astype(np.float32)
    for c in range(3):
        img[..., c] = np.where(water, WATER[c] + 3 * ripple + 2 * noise, 0)
    crown = noise * 14
    for c in range(3):
        img[..., c] += np.where(forest, FOREST[c] + crown, 0)
    parcel = ((xs // 300) * 7 + (ys // 220) * 13 + seed) % len(FIELD_COLOURS)
    stripe = (((xs + ys) // 6) % 2 == 0).astype(np.float32) * 10
    for c in range(3):
        img[..., c] += np.where(fields, FIELD_COLOURS[parcel, c] - stripe + 3 * noise, 0)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_scene(path, size, objects: int | list | None = 6, seed: int = 0) -> Scene:
    """Write a synthetic scene to `path` and return its objects. `size` is an int (square) or
    (width, height); `objects` a count or a list of (kind, (x0, y0, x1, y1)) source boxes."""
    import rasterio
    from rasterio.crs import CRS
    from rasterio.enums import Resampling
    from rasterio.windows import Window

    width, height = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if width < 16 or height < 16:
        raise ValueError("A synthetic scene needs at least 16 x 16 pixels.")
    boxes = place_objects(width, height, objects, seed) if isinstance(objects, int) else list(objects or [])
    transform = Affine(PIXEL_SIZE, 0.0, ORIGIN[0], 0.0, -PIXEL_SIZE, ORIGIN[1])
    rng = np.random.default_rng([seed, 1])
    class_lo = rng.random((6, 6)).astype(np.float32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(driver="GTiff", width=width, height=height, count=3, dtype="uint8",
                   crs=CRS.from_epsg(CRS_EPSG), transform=transform, tiled=True,
                   blockxsize=512, blockysize=512, compress="deflate", zlevel=1,
                   photometric="RGB", interleave="pixel")
    with rasterio.open(path, "w", **profile) as dst:
        for y0 in range(0, height, BLOCK):
            bh = min(BLOCK, height - y0)
            block = _block(y0, bh, width, height, class_lo, seed)
            for kind, (x0, by0, x1, by1) in boxes:
                a, b = max(by0, y0), min(by1, y0 + bh)
                if a < b:
                    block[a - y0 : b - y0, max(x0, 0) : min(x1, width)] = OBJECT_COLOURS.get(kind, (255, 255, 255))
            dst.write(block.transpose(2, 0, 1), window=Window(0, y0, width, bh))
        factors = [f for f in (2, 4, 8, 16, 32) if max(width, height) // f >= 256]
        if factors:
            dst.build_overviews(factors, Resampling.average)
    objs = []
    for kind, (x0, y0, x1, y1) in boxes:
        mx0, my1 = transform @ (x0, y0)
        mx1, my0 = transform @ (x1, y1)
        objs.append(SceneObject(kind, (x0, y0, x1, y1), (mx0, my0, mx1, my1)))
    return Scene(path=path, size=(width, height), crs_epsg=CRS_EPSG, transform=transform, objects=objs)


def object_patches(geometry, objects) -> np.ndarray:
    """Flat ids of the object patches (see module docstring)."""
    ids = np.arange(int(geometry.n_tiles) * 576)
    valid = np.asarray(geometry.patch_valid, dtype=bool).reshape(-1)
    b = geometry.boxes_source(ids)
    area = np.maximum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 1e-9)
    hit = np.zeros(ids.size, bool)
    for o in objects:
        x0, y0, x1, y1 = o.box_px if hasattr(o, "box_px") else o
        ix = np.clip(np.minimum(b[:, 2], x1) - np.maximum(b[:, 0], x0), 0, None)
        iy = np.clip(np.minimum(b[:, 3], y1) - np.maximum(b[:, 1], y0), 0, None)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        centre = (b[:, 0] <= cx) & (cx < b[:, 2]) & (b[:, 1] <= cy) & (cy < b[:, 3])
        hit |= (ix * iy >= 0.25 * area) | centre
    return ids[hit & valid]


def object_recall(selection, geometry, objects, max_token_patches: int | None = None) -> float:
    """Share of object patches that kept tokens stand for (NaN when there are none)."""
    obj = object_patches(geometry, objects)
    if obj.size == 0:
        return float("nan")
    kept = [np.asarray(m, np.int64) for m in selection.members
            if len(m) and (max_token_patches is None or len(m) <= max_token_patches)]
    covered = np.unique(np.concatenate(kept)) if kept else np.zeros(0, np.int64)
    return float(np.isin(obj, covered).mean())
