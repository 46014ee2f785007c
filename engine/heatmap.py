"""Write what a strategy kept as GIS layers: a token-score GeoTIFF and a GeoJSON of footprints.

* GeoTIFF: float32, one band, on the canvas' patch grid (`TokenGeometry.token_grid()`: one cell
  per 14 px patch, the grid's affine transform, the source CRS; no CRS tag when the raster has
  none, and then the transform is in source pixel coordinates). Every kept token's score is
  painted over its member patches that are valid image patches (`geometry.patch_valid`) and at
  least half image (`TileLayout.patch_image_fraction` >= `MIN_IMAGE_FRACTION`); all other cells -
  pruned patches, padding, mostly-nodata patches, and edge patches that are mostly padding (the
  tile grid overhangs the raster's edge by up to a cell) - are nodata (NaN, declared as the
  band's nodata value). A cell is drawn whole, so an edge patch with a sliver of image would show
  its token's full score over the area beyond the raster, as if it were image: the heat so stops
  within half a cell of the raster's edge, as a mostly-nodata patch's does at a nodata edge.
  Such a token's anchor (below) still shows its image part. If two tokens share a patch, the
  larger score wins. The band's
  description names the strategy and says that clear (nodata) cells are pruned tokens or nodata.
* GeoJSON: a FeatureCollection with one Feature per kept token that has at least one valid
  member patch (tokens made only of padding or empty slots are not drawn): the geometry is the
  union of those patches (`geometry.footprint`, map coordinates), properties per
  `engine.protocol.ANCHOR_PROPERTIES` (rank = LM order, score, role, tile of the first member,
  n_patches = all members). CRS: a top-level ``crs`` member in the 2008 GeoJSON "name" style,
  ``urn:ogc:def:crs:EPSG::<code>`` when the WKT has an EPSG code, otherwise the WKT itself as
  the name; plus ``crs_wkt`` with the full WKT. Both are absent when the raster has no CRS.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NODATA = float("nan")
# a heatmap cell holds its token's score only when at least this share of it is image, not the
# canvas padding around it (the same half as geometry.MIN_VALID_FRACTION asks of valid pixels)
MIN_IMAGE_FRACTION = 0.5
BAND_NOTE = "clear: pruned token or nodata"  # the band description's note on nodata cells


@dataclass
class HeatmapFiles:
    tif_path: Path
    geojson_path: Path
    geojson: dict


def score_grid(selection, geometry) -> np.ndarray:
    """(height, width) float32 array of the token grid: score on kept valid patches that are at
    least half image (:data:`MIN_IMAGE_FRACTION`), NaN else."""
    grid = geometry.token_grid()
    valid = np.asarray(geometry.patch_valid, dtype=bool).reshape(-1)
    valid = valid & (np.asarray(geometry.layout.patch_image_fraction()).reshape(-1) >= MIN_IMAGE_FRACTION)
    per_patch = np.full(valid.size, -np.inf, dtype=np.float64)
    for members, score in zip(selection.members, np.asarray(selection.scores, dtype=np.float64)):
        m = np.asarray(members, dtype=np.int64)
        if m.size:
            per_patch[m] = np.maximum(per_patch[m], score if math.isfinite(score) else -np.inf)
    per_patch[~valid] = -np.inf
    per_patch[~np.isfinite(per_patch)] = np.nan
    return grid.to_grid(per_patch.astype(np.float32), fill=np.float32(np.nan)).astype(np.float32)


def crs_member(crs_wkt: str | None) -> dict | None:
    """The GeoJSON ``crs`` member for a WKT (EPSG URN when known), or None."""
    if not crs_wkt:
        return None
    name = crs_wkt
    try:
        from rasterio.crs import CRS

        code = CRS.from_wkt(crs_wkt).to_epsg()
        if code:
            name = f"urn:ogc:def:crs:EPSG::{code}"
    except Exception:  # an exotic WKT: keep the WKT as the name
        pass
    return {"type": "name", "properties": {"name": name}}


def anchors_geojson(selection, geometry) -> dict:
    """FeatureCollection of the kept tokens' footprints (see module docstring)."""
    from shapely.geometry import mapping

    valid = np.asarray(geometry.patch_valid, dtype=bool).reshape(-1)
    n_patch_tile = valid.size // max(int(geometry.n_tiles), 1)
    drawn = []  # (rank, members, valid members, score, role) of tokens with something to draw
    for rank, (members, score, role) in enumerate(
        zip(selection.members, np.asarray(selection.scores, dtype=np.float64), selection.roles)
    ):
        m = np.asarray(members, dtype=np.int64)
        mv = m[valid[m]] if m.size else m
        if mv.size:
            drawn.append((rank, m, mv, score, role))
    shapes = geometry.footprints([d[2] for d in drawn], "map")  # one pass for every token
    feats = []
    for (rank, m, _mv, score, role), geom in zip(drawn, shapes):
        feats.append({
            "type": "Feature",
            "geometry": mapping(geom),
            "properties": {
                "rank": rank,
                "score": float(score) if math.isfinite(score) else None,
                "role": str(role),
                "tile": int(m.min() // n_patch_tile),
                "n_patches": int(m.size),
            },
        })
    fc = {"type": "FeatureCollection", "features": feats}
    crs = crs_member(geometry.crs_wkt)
    if crs:
        fc["crs"] = crs
        fc["crs_wkt"] = geometry.crs_wkt
    return json.loads(json.dumps(fc))  # plain lists, no tuples


def write_heatmap(selection, geometry, out_dir, stem: str) -> HeatmapFiles:
    """Write ``<stem>_heatmap.tif`` and ``<stem>_anchors.geojson`` into `out_dir`."""
    import rasterio
    from rasterio.crs import CRS

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = geometry.token_grid()
    data = score_grid(selection, geometry)
    tif = out_dir / f"{stem}_heatmap.tif"
    profile = dict(driver="GTiff", width=grid.width, height=grid.height, count=1,
                   dtype="float32", nodata=NODATA, transform=grid.transform, compress="deflate")
    if grid.crs_wkt:
        profile["crs"] = CRS.from_wkt(grid.crs_wkt)
    with rasterio.open(tif, "w", **profile) as dst:
        dst.write(data, 1)
        # QGIS shows the band description in the layer's legend: say what a clear cell is
        dst.set_band_description(1, f"token score ({selection.strategy or 'strategy'}); {BAND_NOTE}")
    gj = anchors_geojson(selection, geometry)
    gpath = out_dir / f"{stem}_anchors.geojson"
    gpath.write_text(json.dumps(gj))
    return HeatmapFiles(tif_path=tif, geojson_path=gpath, geojson=gj)
