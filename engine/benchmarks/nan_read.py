"""Benchmark: what NaN in a float raster costs a reduced (decimated) read.

    python -m engine.benchmarks.nan_read [--size 6000] [--max-pixels 4000000] [--repeat 3]

GDAL's average spreads NaN over whole output pixels, so `read_raster` reads the parts of a
reduced read that hold spread NaN again, with NaN skipped as missing (engine/raster_read.py,
`mend_spread_nan`). This times `read_raster` on float32 GeoTIFFs (tiled 512, deflate) of
`size` x `size` px read to about `max_pixels` px:

* ``no NaN``: the cost of a reduced read with nothing to mend;
* ``collar``: a scene turned by 20 degrees, NaN around it (no nodata tag), as a reprojected
  scene is; the commonest case;
* ``collar, tagged -9999``: the same collar as -9999 with nodata=-9999, plus a few NaN pixels
  inside the scene;
* ``stripes``: NaN every other row on the left half (scan-line gaps): every output pixel there
  holds spread NaN, the worst case;

each without and with overviews (2, 4, 8). The best of `repeat` reads is kept (the files are
read once before, so the page cache is warm). Written to ``nan_read.json`` and ``nan_read.md``
in the output folder; not a test, it measures and does not assert.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def _scene(size: int, seed: int = 0) -> np.ndarray:
    """A smooth float32 scene with some texture (compresses as a real one does, not as noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = 100 + 50 * np.sin(7 * x) * np.cos(5 * y)
    return (base + rng.normal(0, 2, (size, size))).astype(np.float32)


def _collar(size: int) -> np.ndarray:
    """(size, size) bool: True outside a square turned by 20 degrees about the centre."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) - (size - 1) / 2
    t = np.deg2rad(20.0)
    u, v = x * np.cos(t) + y * np.sin(t), -x * np.sin(t) + y * np.cos(t)
    half = size / 2 / (np.cos(t) + np.sin(t))  # the turned square just fits inside
    return (np.abs(u) > half) | (np.abs(v) > half)


def _write(path: Path, arr: np.ndarray, nodata=None, overviews=None) -> str:
    import rasterio
    from rasterio.enums import Resampling
    from affine import Affine

    h, w = arr.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=1, dtype="float32",
                       crs="EPSG:32633", transform=Affine(1, 0, 500000, 0, -1, 4500000),
                       nodata=nodata, tiled=True, blockxsize=512, blockysize=512,
                       compress="deflate") as ds:
        ds.write(arr, 1)
        if overviews:
            ds.build_overviews(overviews, Resampling.average)
    return str(path)


def _cases(size: int) -> dict[str, tuple[np.ndarray, float | None]]:
    scene = _scene(size)
    collar = _collar(size)
    with_collar = np.where(collar, np.float32(np.nan), scene)
    tagged = np.where(collar, np.float32(-9999), scene)
    tagged[size // 2:size // 2 + 40:4, size // 3:size // 3 + 400] = np.nan  # a few NaN inside
    stripes = scene.copy()
    stripes[::2, :size // 2] = np.nan
    return {"no NaN": (scene, None), "collar": (with_collar, None),
            "collar, tagged -9999": (tagged, -9999.0), "stripes": (stripes, None)}


def _time(path: str, max_pixels: int, repeat: int) -> tuple[float, float]:
    """(best seconds of `repeat` reads, valid fraction)."""
    from engine.raster import read_raster

    read_raster(path, max_pixels=max_pixels)  # warm the page cache
    best, valid = float("inf"), 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        im = read_raster(path, max_pixels=max_pixels)
        best = min(best, time.perf_counter() - t0)
        valid = im.valid_fraction
    return best, valid


def run(out_dir: str | os.PathLike = "docs/benchmarks", *, size: int = 6000,
        max_pixels: int = 2000 * 2000, repeat: int = 3) -> list[dict]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="geovqa-nan-bench-") as tmp:
        for name, (arr, nodata) in _cases(size).items():
            for overviews in (None, [2, 4, 8]):
                path = _write(Path(tmp) / f"case{len(rows)}.tif", arr, nodata, overviews)
                seconds, valid = _time(path, max_pixels, repeat)
                rows.append({"case": name, "overviews": bool(overviews), "seconds": round(seconds, 3),
                             "valid_fraction": round(valid, 4)})
                print(f"{name:22s} overviews={'yes' if overviews else 'no ':3s} "
                      f"{seconds:7.3f} s  valid {valid:.3f}", flush=True)
                os.remove(path)
    meta = {"size": size, "max_pixels": max_pixels, "repeat": repeat,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s)"}
    (out / "nan_read.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# Reduced read of a {size} x {size} float32 raster to about {max_pixels:,} px",
             "", f"Best of {repeat} reads, {meta['machine']}.", "",
             "| case | overviews | seconds | valid fraction |", "|---|---|---|---|"]
    lines += [f"| {r['case']} | {'yes' if r['overviews'] else 'no'} | {r['seconds']} | "
              f"{r['valid_fraction']} |" for r in rows]
    (out / "nan_read.md").write_text("\n".join(lines) + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.benchmarks.nan_read", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=6000)
    parser.add_argument("--max-pixels", type=int, default=2000 * 2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default="docs/benchmarks")
    args = parser.parse_args(argv)
    run(args.out, size=args.size, max_pixels=args.max_pixels, repeat=args.repeat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
