"""A small stand-in engine for the server's queue/auth/persistence tests.

It does real, checkable work with the real raster reader underneath (rasterio): it reads the
requested window, "encodes" it into per-band statistics that it caches by (path, mtime, window,
bands) like the real feature cache, streams a deterministic answer built from those statistics
word by word (checking the cancel event between words), and writes a heatmap GeoTIFF and an
anchors GeoJSON. End-to-end tests use the real `engine.pipeline.Engine` instead.

Timing knobs (env): GEOVQA_STUB_WORD_DELAY seconds per streamed word, GEOVQA_STUB_VISION_DELAY
seconds for an uncached "vision" pass.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window


class RasterError(ValueError):
    """Mirrors engine.raster_errors.RasterError for the stub."""


class AoiOutsideRaster(RasterError):
    pass


class OutOfMemoryError(RuntimeError):
    """Same class name as torch.cuda.OutOfMemoryError; raised for the question '__oom__'."""


class StubEngine:
    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.word_delay = float(os.environ.get("GEOVQA_STUB_WORD_DELAY", "0.05"))
        self.vision_delay = float(os.environ.get("GEOVQA_STUB_VISION_DELAY", "0.2"))
        self._features: dict[tuple, np.ndarray] = {}
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self.running = 0

    def health(self) -> dict:
        return {"status": "ok", "model": "stub", "demo_model": True, "weights_present": False,
                "weights_dir": None, "device": "cpu", "gpu_name": None, "gpu_free_bytes": None,
                "quantization": "fp32", "four_bit": False, "compute": "fp32", "attention": "eager",
                "strategies": ["geollava", "none", "uniform"], "message": None, "version": "stub"}

    def ask(self, req, cancel: threading.Event | None = None):
        with self._lock:
            self.running += 1
            concurrent = self.running
        try:
            yield from self._ask(req, cancel, concurrent)
        finally:
            with self._lock:
                self.running -= 1

    def _ask(self, req, cancel, concurrent):
        seq = next(self._seq)
        t0 = time.perf_counter()
        if req.question == "__oom__":
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        yield {"type": "status", "stage": "read", "progress": 0.0, "message": "reading"}
        path = str(req.raster_path)
        with rasterio.open(path) as ds:
            bands = tuple(req.bands or range(1, min(3, ds.count) + 1))
            if req.aoi and req.aoi.get("window"):
                c, r, w, h = (int(v) for v in req.aoi["window"])
                if c >= ds.width or r >= ds.height or c + w <= 0 or r + h <= 0:
                    raise AoiOutsideRaster("window outside the raster")
                win = Window(c, r, w, h).intersection(Window(0, 0, ds.width, ds.height))
            else:
                win = Window(0, 0, ds.width, ds.height)
            key = (path, os.stat(path).st_mtime_ns, tuple(int(v) for v in win.flatten()), bands)
            hit = key in self._features
            if not hit:
                data = ds.read(list(bands), window=win).astype("float64")
                time.sleep(self.vision_delay)
                self._features[key] = data.mean(axis=(1, 2))
                heat = data.mean(axis=0)
            else:
                heat = ds.read(list(bands), window=win).astype("float64").mean(axis=0)
            transform = ds.window_transform(win)
            crs = ds.crs
        stats = self._features[key]
        t_vision = time.perf_counter() - t0
        words = (f"The mean of bands {list(bands)} is "
                 + ", ".join(f"{m:.1f}" for m in stats) + " .").split(" ")
        words = words[: max(1, req.max_new_tokens)]
        answer = []
        for word in words:
            if cancel is not None and cancel.is_set():
                return
            time.sleep(self.word_delay)
            piece = word if not answer else " " + word
            answer.append(piece)
            yield {"type": "token", "text": piece}
        name = f"stub-{seq}"
        heat_path = self.output_dir / f"{name}-heatmap.tif"
        with rasterio.open(heat_path, "w", driver="GTiff", width=heat.shape[1],
                           height=heat.shape[0], count=1, dtype="float32", crs=crs,
                           transform=transform, nodata=-1) as out:
            out.write(heat.astype("float32"), 1)
        anchors = {"type": "FeatureCollection", "features": [{
            "type": "Feature", "properties": {"rank": 0, "score": 1.0, "role": "anchor",
                                              "tile": 0, "n_patches": 1},
            "geometry": {"type": "Point", "coordinates": [transform.c, transform.f]}}]}
        anchors_path = self.output_dir / f"{name}-anchors.geojson"
        anchors_path.write_text(json.dumps(anchors))
        yield {"type": "result", "answer": "".join(answer),
               "tokens": {"visual_candidates": 576, "visual_kept": 24, "prompt": 30,
                          "generated": len(answer)},
               "timings": {"vision": t_vision, "total": time.perf_counter() - t0},
               "peak_memory_bytes": None, "cache": {"features": hit, "kv_prefix": False},
               "heatmap_path": str(heat_path), "anchors_path": str(anchors_path),
               "anchors": anchors, "crs_wkt": crs.to_wkt() if crs else None,
               "strategy": req.strategy, "budget": req.budget,
               "stub_seq": seq, "stub_concurrent": concurrent}


def make_engine(args, settings) -> StubEngine:
    return StubEngine(settings.output_dir)


def make_engine_noting_the_load(args, settings) -> StubEngine:
    """`make_engine` that first leaves a file named by GEOVQA_STUB_LOADED: proof the (minutes
    long, with real weights) model load was reached."""
    marker = os.environ.get("GEOVQA_STUB_LOADED")
    if marker:
        Path(marker).write_text("loaded\n")
    return make_engine(args, settings)
