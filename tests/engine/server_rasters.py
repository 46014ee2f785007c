"""Small test rasters for the server tests (GeoTIFF with a CRS, a text file, a broken TIFF)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin


def write_geotiff(path: Path, width: int = 64, height: int = 48, count: int = 3,
                  seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 255, size=(count, height, width), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=count,
                       dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(500000, 4500000, 1.0, 1.0)) as ds:
        ds.write(data)
    return path


def make_inputs(directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    text = directory / "notes.txt"
    text.write_text("not a raster\n")
    broken = directory / "broken.tif"
    broken.write_bytes(b"II*\x00" + b"\x00" * 64)
    return {
        "raster": write_geotiff(directory / "scene.tif"),
        "raster2": write_geotiff(directory / "scene2.tif", seed=1),
        "big": write_geotiff(directory / "big.tif", width=256, height=256, count=3, seed=2),
        "text": text,
        "broken": broken,
        "folder": directory,
    }
