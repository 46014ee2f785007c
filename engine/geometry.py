"""Token geometry: where every vision patch token lies in image pixels, source pixels and map space.

A patch token is identified by its flat id ``tile * 576 + patch`` (tiles row-major over the
canvas, the overview tile excluded; patches row-major in the 24 x 24 grid of a tile). Its box is
the patch's 14 x 14 canvas square mapped back through the tiling's centred padding and scale
(clipped to the image), then through the raster read's window offset and decimation, then
through the raster's geotransform.

Validity rule (`patch_valid`): a patch is valid when it is not pure padding AND at least half of
the image pixels it covers are valid in `RasterImage.valid` (nodata / outside the AOI polygon).
"Pixels it covers" are the image pixels whose centres fall inside the patch's image-space box; a
patch covering no pixel centre (it is thinner than one image pixel after an upscale) uses the
pixel under its centre.

`token_grid()` describes the whole canvas at patch resolution as a georeferenced raster grid
(one cell per patch, padding included): the heatmap GeoTIFF is written on that grid with the
source CRS; cells of padding patches should be written as nodata.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from affine import Affine

from .raster import RasterImage
from .tiling import PATCH, TileLayout

MIN_VALID_FRACTION = 0.5


@dataclass(frozen=True)
class TokenGrid:
    """The canvas' patch grid as a georeferenced raster grid."""

    width: int  # patches across the canvas (cols * 24)
    height: int  # patches down the canvas (rows * 24)
    transform: Affine  # patch-grid pixel (col, row) -> map coordinates
    crs_wkt: str | None
    layout: TileLayout

    def rc(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """Flat patch ids -> (row, col) arrays in this grid."""
        return self.layout.patch_grid_rc(ids)

    def ids_grid(self) -> np.ndarray:
        """(height, width) int64: the flat patch id of every grid cell."""
        ids = np.arange(self.layout.n_patches, dtype=np.int64)
        r, c = self.rc(ids)
        out = np.empty((self.height, self.width), np.int64)
        out[r, c] = ids
        return out

    def to_grid(self, values, fill=np.nan) -> np.ndarray:
        """Scatter per-patch values ((T, 576) or flat (T*576,)) into a (height, width) array."""
        v = np.asarray(values).reshape(-1)
        if v.size != self.layout.n_patches:
            raise ValueError(f"Expected {self.layout.n_patches} values, got {v.size}.")
        out = np.full((self.height, self.width), fill, dtype=np.result_type(v.dtype, np.asarray(fill).dtype))
        r, c = self.rc(np.arange(v.size))
        out[r, c] = v
        return out


@dataclass
class TokenGeometry:
    layout: TileLayout
    image_to_source: Affine
    source_transform: Affine
    crs_wkt: str | None
    patch_boxes_image: np.ndarray  # (T, 576, 4) x0, y0, x1, y1, image pixels, clipped to the image
    patch_valid: np.ndarray  # (T, 576) bool: not padding and >= half of its pixels valid
    patch_padding: np.ndarray  # (T, 576) bool: pure padding (no image at all)
    patch_valid_fraction: np.ndarray  # (T, 576) float: fraction of covered pixels that are valid
    # the source band of each RGB channel the model saw (RasterImage.bands; () when not known)
    # and whether that one band's colour table gave the colours (RasterImage.palette)
    bands: tuple[int, ...] = ()
    palette: bool = False

    @classmethod
    def build(cls, image: RasterImage, layout: TileLayout) -> "TokenGeometry":
        if tuple(layout.image_size) != tuple(image.size):
            raise ValueError(
                f"The tile layout was planned for {layout.image_size} but the image is {image.size}."
            )
        boxes = layout.patch_boxes(clip=True)
        padding = ~layout.patch_valid()
        frac = _valid_fraction(image.valid, boxes)
        frac[padding] = 0.0
        valid = (~padding) & (frac >= MIN_VALID_FRACTION)
        return cls(
            layout=layout,
            image_to_source=image.image_to_source,
            source_transform=image.source_transform,
            crs_wkt=image.crs_wkt,
            patch_boxes_image=boxes,
            patch_valid=valid,
            patch_padding=padding,
            patch_valid_fraction=frac,
            bands=tuple(int(b) for b in getattr(image, "bands", ()) or ()),
            palette=bool(getattr(image, "palette", False)),
        )

    # ---------------------------------------------------------------------------- transforms
    @property
    def image_to_map(self) -> Affine:
        return self.source_transform @ self.image_to_source

    @property
    def n_tiles(self) -> int:
        return self.layout.n_tiles

    def _flat_boxes(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = self.layout.n_patches
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            raise IndexError(f"Patch ids must be in [0, {n}); got {ids.min()}..{ids.max()}.")
        return self.patch_boxes_image.reshape(-1, 4)[ids]

    def boxes_image(self, ids) -> np.ndarray:
        """(n, 4) image-pixel boxes of flat patch ids."""
        return self._flat_boxes(ids).copy()

    def boxes_source(self, ids) -> np.ndarray:
        """(n, 4) source-pixel boxes x0, y0, x1, y1 of flat patch ids."""
        return _apply_affine_boxes(self.image_to_source, self._flat_boxes(ids))

    def boxes_map(self, ids) -> np.ndarray:
        """(n, 4) map boxes minx, miny, maxx, maxy of flat patch ids (bounds if rotated)."""
        return _apply_affine_boxes(self.image_to_map, self._flat_boxes(ids))

    def _space_transform(self, space: str) -> Affine:
        if space == "image":
            return Affine.identity()
        if space == "source":
            return self.image_to_source
        if space == "map":
            return self.image_to_map
        raise ValueError(f"space must be 'image', 'source' or 'map', got {space!r}.")

    def patch_polygons(self, ids, space: str = "map") -> list:
        """One shapely polygon per flat patch id (exact corners, also for rotated rasters)."""
        from shapely.geometry import Polygon

        t = self._space_transform(space)
        out = []
        for x0, y0, x1, y1 in self._flat_boxes(ids):
            corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
            out.append(Polygon([t @ c for c in corners]))
        return out

    def footprint(self, ids, space: str = "map"):
        """Union of the patch boxes of `ids` as a shapely geometry (a cluster's true shape).

        Computed in image space (where boxes are axis-aligned and share exact edges) and then
        mapped with the affine transform of `space`, so adjacent patches merge cleanly.
        """
        import shapely

        boxes = self._flat_boxes(ids)
        boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
        if boxes.size == 0:
            from shapely.geometry import Polygon

            return Polygon()
        geom = shapely.union_all(shapely.box(boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]))
        return self._to_space(geom, space)

    def footprints(self, groups, space: str = "map") -> list:
        """`footprint` of many patch-id groups at once (one per kept token).

        Groups that share no patch are traced together from a label grid of the canvas' patch
        cells (rasterio.features.shapes), then clipped to the image: one pass whatever the number
        of tokens. A group overlapping another falls back to `footprint`."""
        import shapely
        from rasterio import features

        groups = [np.asarray(g, dtype=np.int64).reshape(-1) for g in groups]
        n_patches = self.layout.n_patches
        counts = np.zeros(n_patches, np.int32)
        for g in groups:
            counts[np.unique(g)] += 1
        out: list = [None] * len(groups)
        labels = np.zeros(n_patches, np.int32)
        traced = []
        for i, g in enumerate(groups):
            if g.size and counts[g].max() == 1 and len(groups) < 2**31 - 1:
                labels[g] = i + 1
                traced.append(i)
            else:
                out[i] = self.footprint(g, space)
        if traced:
            grid = self.token_grid()
            label_grid = grid.to_grid(labels, fill=0).astype(np.int32)
            cell_to_image = self.layout.canvas_to_image @ Affine.scale(PATCH, PATCH)
            pieces: dict[int, list] = {}
            for geom, value in features.shapes(label_grid, mask=label_grid > 0,
                                               transform=cell_to_image, connectivity=4):
                pieces.setdefault(int(value) - 1, []).append(shapely.geometry.shape(geom))
            w, h = self.layout.image_size
            frame = shapely.box(0.0, 0.0, float(w), float(h))
            merged = np.array([p[0] if len(p := pieces.get(i, [])) == 1 else shapely.union_all(p)
                               for i in traced], dtype=object)
            clipped = self._to_space(shapely.intersection(merged, frame), space)
            for i, geom in zip(traced, clipped):
                out[i] = geom
        return out

    def _to_space(self, geom, space: str):
        """Map a geometry (or an array of them) from image space into `space`."""
        import shapely

        t = self._space_transform(space)
        if t == Affine.identity():
            return geom
        m = np.array([[t.a, t.d], [t.b, t.e]])
        off = np.array([t.xoff, t.yoff])
        return shapely.transform(geom, lambda xy: xy @ m + off)

    def patch_centers(self, space: str = "image") -> np.ndarray:
        """(T, 576, 2) centre (x, y) of every patch's (clipped) box in `space`."""
        b = self.patch_boxes_image
        cx = (b[..., 0] + b[..., 2]) / 2.0
        cy = (b[..., 1] + b[..., 3]) / 2.0
        t = self._space_transform(space)
        x = t.a * cx + t.b * cy + t.c
        y = t.d * cx + t.e * cy + t.f
        return np.stack([x, y], axis=-1)

    # ------------------------------------------------------------------------------ token grid
    def token_grid(self) -> TokenGrid:
        """The canvas' patch grid: (width, height) in patches and patch-cell -> map transform."""
        gw, gh = self.layout.grid_size
        transform = self.image_to_map @ self.layout.canvas_to_image @ Affine.scale(PATCH, PATCH)
        return TokenGrid(width=gw, height=gh, transform=transform, crs_wkt=self.crs_wkt, layout=self.layout)


def _apply_affine_boxes(t: Affine, boxes: np.ndarray) -> np.ndarray:
    """Map axis-aligned boxes through `t`; returns the bounds (minx, miny, maxx, maxy)."""
    x0, y0, x1, y1 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    xs = np.stack([t.a * x + t.b * y + t.c for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))])
    ys = np.stack([t.d * x + t.e * y + t.f for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))])
    return np.stack([xs.min(0), ys.min(0), xs.max(0), ys.max(0)], axis=-1)


def _valid_fraction(valid: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Fraction of valid pixels (by pixel centre) inside each image-space box, via a summed-area table."""
    h, w = valid.shape
    if valid.all():
        return np.ones(boxes.shape[:-1], dtype=np.float64)
    sat = np.zeros((h + 1, w + 1), dtype=np.int32)  # int32: up to 2**31 pixels, ample for 8K canvases
    np.cumsum(valid, axis=0, dtype=np.int32, out=sat[1:, 1:])
    np.cumsum(sat[1:, 1:], axis=1, out=sat[1:, 1:])
    # pixel i has centre i + 0.5; inside [x0, x1) <=> ceil(x0 - 0.5) <= i < ceil(x1 - 0.5)
    c0 = np.clip(np.ceil(boxes[..., 0] - 0.5), 0, w).astype(np.int64)
    c1 = np.clip(np.ceil(boxes[..., 2] - 0.5), 0, w).astype(np.int64)
    r0 = np.clip(np.ceil(boxes[..., 1] - 0.5), 0, h).astype(np.int64)
    r1 = np.clip(np.ceil(boxes[..., 3] - 0.5), 0, h).astype(np.int64)
    # a box covering no pixel centre: use the pixel under its centre
    cx = np.clip(np.floor((boxes[..., 0] + boxes[..., 2]) / 2), 0, w - 1).astype(np.int64)
    cy = np.clip(np.floor((boxes[..., 1] + boxes[..., 3]) / 2), 0, h - 1).astype(np.int64)
    empty_c = c1 <= c0
    empty_r = r1 <= r0
    c0 = np.where(empty_c, cx, c0)
    c1 = np.where(empty_c, cx + 1, c1)
    r0 = np.where(empty_r, cy, r0)
    r1 = np.where(empty_r, cy + 1, r1)
    total = (c1 - c0) * (r1 - r0)
    count = sat[r1, c1].astype(np.int64) - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]
    return count / np.maximum(total, 1)
