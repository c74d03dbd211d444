"""Pixel grids and the tile grid laid over AOI ∩ raster.

The nouns are immutable value objects, like rasterio's ``Window`` and odc-geo's ``GeoBox``:

* :class:`PixelBox` — a rectangle of whole pixels ``(row_off, col_off, height, width)`` on some grid.
* :class:`Grid` — a raster's pixel grid: ``(height, width)``, affine transform (corner-based) and CRS.
* :class:`Tile` — one read window of ``size × size`` pixels; parts outside the raster are padded with nodata.

Axis order is explicit everywhere: rows before columns, arrays are ``(band, row, col)``.
Nothing here imports GDAL or torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from affine import Affine

from geo_dino.errors import AOIError, ConfigError, CRSMismatchError


@dataclass(frozen=True)
class PixelBox:
    """A rectangle of whole pixels; ``row_off``/``col_off`` may be negative (outside the raster)."""

    row_off: int
    col_off: int
    height: int
    width: int

    @property
    def row_end(self) -> int:
        """The first row below the box (exclusive end)."""
        return self.row_off + self.height

    @property
    def col_end(self) -> int:
        """The first column right of the box (exclusive end)."""
        return self.col_off + self.width

    def intersection(self, other: PixelBox) -> PixelBox | None:
        """The pixels both boxes cover, or None when they do not overlap."""
        r0, c0 = max(self.row_off, other.row_off), max(self.col_off, other.col_off)
        r1, c1 = min(self.row_end, other.row_end), min(self.col_end, other.col_end)
        if r1 <= r0 or c1 <= c0:
            return None
        return PixelBox(r0, c0, r1 - r0, c1 - c0)

    def relative_to(self, outer: PixelBox) -> PixelBox:
        """This box in the coordinates of ``outer`` (whose top-left becomes (0, 0))."""
        return PixelBox(self.row_off - outer.row_off, self.col_off - outer.col_off, self.height, self.width)

    def slices(self) -> tuple[slice, slice]:
        """``(rows, cols)`` slices for indexing a ``(..., row, col)`` array (non-negative boxes only)."""
        return slice(self.row_off, self.row_end), slice(self.col_off, self.col_end)

    def to_rasterio(self):  # noqa: ANN201 - rasterio imported lazily
        """This box as a rasterio ``Window`` (col_off, row_off, width, height)."""
        from rasterio.windows import Window

        return Window(self.col_off, self.row_off, self.width, self.height)


@dataclass(frozen=True)
class Grid:
    """A raster's pixel grid. ``transform`` maps (col, row) of pixel corners to (x, y) in ``crs``."""

    height: int
    width: int
    transform: Affine
    crs: str

    @property
    def box(self) -> PixelBox:
        """The whole grid as a pixel box at (0, 0)."""
        return PixelBox(0, 0, self.height, self.width)

    @property
    def res(self) -> tuple[float, float]:
        """Pixel size ``(x, y)`` in CRS units (both positive)."""
        return abs(self.transform.a), abs(self.transform.e)

    def bounds(self, box: PixelBox | None = None) -> tuple[float, float, float, float]:
        """``(left, bottom, right, top)`` of a pixel box (default: the whole grid)."""
        b = box or self.box
        xs, ys = zip(*(self.transform @ (c, r) for r, c in
                       ((b.row_off, b.col_off), (b.row_end, b.col_end))), strict=True)
        return min(xs), min(ys), max(xs), max(ys)

    def box_transform(self, box: PixelBox) -> Affine:
        """The affine transform of a sub-grid starting at ``box``'s top-left pixel."""
        return self.transform @ Affine.translation(box.col_off, box.row_off)

    def subgrid(self, box: PixelBox) -> Grid:
        """The grid of the pixels in ``box``: its shape, transform shifted to its top-left, same CRS."""
        return Grid(box.height, box.width, self.box_transform(box), self.crs)

    def box_covering(self, bounds: tuple[float, float, float, float]) -> PixelBox | None:
        """The smallest pixel box of this grid covering ``bounds`` (in this CRS), clipped to the grid."""
        left, bottom, right, top = bounds
        inv = ~self.transform
        cols, rows = zip(*(inv @ (x, y) for x, y in
                           ((left, bottom), (left, top), (right, bottom), (right, top))), strict=True)
        eps = 1e-9
        r0, r1 = math.floor(min(rows) + eps), math.ceil(max(rows) - eps)
        c0, c1 = math.floor(min(cols) + eps), math.ceil(max(cols) - eps)
        return PixelBox(r0, c0, max(r1 - r0, 1), max(c1 - c0, 1)).intersection(self.box)

    def pixel_centres(self, box: PixelBox) -> tuple[np.ndarray, np.ndarray]:
        """x of column centres and y of row centres of ``box`` (axis-aligned grids)."""
        if self.transform.b or self.transform.d:
            raise CRSMismatchError("rotated/sheared transforms are not supported")
        cols = np.arange(box.col_off, box.col_end) + 0.5
        rows = np.arange(box.row_off, box.row_end) + 0.5
        return self.transform.c + cols * self.transform.a, self.transform.f + rows * self.transform.e

    def same_as(self, other: Grid, *, what: str = "grids") -> None:
        """Raise :class:`CRSMismatchError` unless both grids are identical (CRS, transform, shape)."""
        if (self.height, self.width) != (other.height, other.width):
            raise CRSMismatchError(f"{what} differ in shape: {self.height}x{self.width} vs "
                                   f"{other.height}x{other.width}")
        if not self.transform.almost_equals(other.transform, precision=1e-9 * max(self.res)):
            raise CRSMismatchError(f"{what} differ in transform: {tuple(self.transform)[:6]} vs "
                                   f"{tuple(other.transform)[:6]}")
        if not crs_equal(self.crs, other.crs):
            raise CRSMismatchError(f"{what} differ in CRS: {self.crs!r} vs {other.crs!r}")


def crs_equal(a: str, b: str) -> bool:
    """Whether two CRS strings (WKT, EPSG code, PROJ ...) describe the same CRS, as pyproj compares them."""
    if a == b:
        return True
    from pyproj import CRS

    return CRS.from_user_input(a) == CRS.from_user_input(b)


@dataclass(frozen=True)
class Tile:
    """One inference window. ``box`` is the read window on the raster grid (may stick out of it)."""

    index: int
    grid_row: int
    grid_col: int
    box: PixelBox


@dataclass(frozen=True)
class TileGrid:
    """A regular grid of ``size``-pixel tiles with ``overlap`` pixels shared by neighbours over ``region``."""

    region: PixelBox
    size: int
    overlap: int
    raster: PixelBox

    @classmethod
    def cover(cls, region: PixelBox, raster: PixelBox, *, size: int, overlap: int, patch: int) -> TileGrid:
        """Tiles over ``region`` of ``raster``; ``size`` (pixels) must be a multiple of the backbone's
        ``patch`` size and ``overlap`` smaller than ``size``."""
        if size <= 0 or size % patch:
            raise ConfigError(f"tiling.size: {size} must be a positive multiple of the patch size {patch}")
        if not 0 <= overlap < size:
            raise ConfigError(f"tiling.overlap: {overlap} must be in [0, size={size})")
        if region.height <= 0 or region.width <= 0:
            raise AOIError("the AOI covers no pixel of the raster")
        return cls(region, size, overlap, raster)

    @property
    def stride(self) -> int:
        """Pixels between the top-left corners of neighbouring tiles: ``size - overlap``."""
        return self.size - self.overlap

    def _count(self, extent: int) -> int:
        return 1 + max(0, math.ceil((extent - self.size) / self.stride))

    @property
    def shape(self) -> tuple[int, int]:
        """Number of tiles ``(rows, cols)``."""
        return self._count(self.region.height), self._count(self.region.width)

    def __len__(self) -> int:
        r, c = self.shape
        return r * c

    def __iter__(self) -> Iterator[Tile]:
        nr, nc = self.shape
        for i in range(nr):
            for j in range(nc):
                box = PixelBox(self.region.row_off + i * self.stride, self.region.col_off + j * self.stride,
                               self.size, self.size)
                yield Tile(i * nc + j, i, j, box)

    def row_chunks(self, n: int) -> list[list[list[Tile]]]:
        """Whole tile rows grouped about ``n`` tiles at a time: the unit of one inference task.

        A chunk has at least ``ceil(overlap / stride)`` rows, so the rows two neighbouring chunks share (the
        overlap under one chunk's last tile row) are blended from those two chunks only, and each chunk can
        run alone, in any order (:mod:`geo_dino.run.inference`)."""
        nr, nc = self.shape
        rows_per = max(1, n // nc, -(-self.overlap // self.stride))
        tiles = list(self)
        rows = [tiles[i * nc:(i + 1) * nc] for i in range(nr)]
        return [rows[k:k + rows_per] for k in range(0, nr, rows_per)]

    def chunks(self, n: int) -> list[list[Tile]]:
        """Tiles in row-major order, grouped ``n`` at a time (one Prefect task per chunk, not per tile)."""
        tiles = list(self)
        return [tiles[k:k + n] for k in range(0, len(tiles), n)]


def blend_weights(size: int, floor: float = 1e-3) -> np.ndarray:
    """2-D Hann (cosine²) weights of a tile, floored so a pixel seen by one tile only still counts."""
    w = np.sin(np.pi * (np.arange(size) + 0.5) / size) ** 2
    w = np.maximum(w, floor).astype(np.float32)
    return np.outer(w, w)
