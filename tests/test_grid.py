"""Property tests of geo_dino.inputs.grid: pixel boxes, grids and the tile grid laid over AOI ∩ raster."""

from __future__ import annotations

import math

import numpy as np
import pytest
from affine import Affine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyproj import CRS

from geo_dino.errors import AOIError, ConfigError, CRSMismatchError, GeoDinoError
from geo_dino.inputs.grid import Grid, PixelBox, Tile, TileGrid, blend_weights, crs_equal

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# The bundled Landsat scene (EPSG:32618, non-integer pixel size) and the Pucallpa scenes (EPSG:4326).
UTM = Affine(300.0379266750948, 0.0, 101985.0, 0.0, -300.041782729805, 2826915.0)
GEO = Affine(0.0008084837557075694, 0.0, -74.72249415376068, 0.0, -0.0008084837557075694, -8.282107593468341)
TRANSFORMS = {"utm": (UTM, "EPSG:32618"), "geo": (GEO, "EPSG:4326")}


# --------------------------------------------------------------------------------------------- strategies

@st.composite
def raster_and_region(draw, max_side: int = 3000) -> tuple[PixelBox, PixelBox]:
    """A raster box (1..max_side each side) and a non-empty region inside it."""
    h = draw(st.integers(1, max_side))
    w = draw(st.integers(1, max_side))
    r0 = draw(st.integers(0, h - 1))
    c0 = draw(st.integers(0, w - 1))
    rh = draw(st.integers(1, h - r0))
    cw = draw(st.integers(1, w - c0))
    return PixelBox(0, 0, h, w), PixelBox(r0, c0, rh, cw)


@st.composite
def tiling(draw, max_patches: int = 32) -> tuple[int, int, int]:
    """``(size, overlap, patch)`` with size a multiple of patch and overlap in [0, size)."""
    patch = draw(st.sampled_from([8, 14, 16]))
    size = patch * draw(st.integers(1, max_patches))
    overlap = draw(st.integers(0, size - 1))
    return size, overlap, patch


def small_tiling() -> st.SearchStrategy[tuple[int, int, int]]:
    return tiling(max_patches=4)


@st.composite
def boxes_in(draw, height: int, width: int) -> PixelBox:
    r0 = draw(st.integers(0, height - 1))
    c0 = draw(st.integers(0, width - 1))
    return PixelBox(r0, c0, draw(st.integers(1, height - r0)), draw(st.integers(1, width - c0)))


any_box = st.builds(PixelBox, st.integers(-500, 500), st.integers(-500, 500),
                    st.integers(1, 400), st.integers(1, 400))


def _intervals(starts: list[int], size: int) -> list[tuple[int, int]]:
    return [(s, s + size) for s in starts]


def _covers(intervals: list[tuple[int, int]], lo: int, hi: int) -> bool:
    """Whether the union of half-open ``intervals`` covers ``[lo, hi)``."""
    reach = lo
    for a, b in sorted(intervals):
        if a > reach:
            break
        reach = max(reach, b)
    return reach >= hi


# --------------------------------------------------------------------------------------------- TileGrid

@SETTINGS
@given(rr=raster_and_region(), t=tiling())
def test_cover_geometry_is_aligned_minimal_and_covering(rr, t):
    raster, region = rr
    size, overlap, patch = t
    tg = TileGrid.cover(region, raster, size=size, overlap=overlap, patch=patch)
    stride = size - overlap
    assert tg.stride == stride >= 1
    nr, nc = tg.shape
    tiles = list(tg)
    assert len(tiles) == len(tg) == nr * nc

    for tile in tiles:
        b = tile.box
        assert isinstance(tile, Tile)
        assert (b.height, b.width) == (size, size)
        assert all(type(v) is int for v in (b.row_off, b.col_off, b.height, b.width))
        assert b.row_off == region.row_off + tile.grid_row * stride
        assert b.col_off == region.col_off + tile.grid_col * stride
        assert tile.index == tile.grid_row * nc + tile.grid_col
        # tiles never start beyond the region's end
        assert region.row_off <= b.row_off < region.row_end
        assert region.col_off <= b.col_off < region.col_end

    # every row and column of the region is covered (the tiling is a product of row and column intervals)
    row_starts = sorted({t.box.row_off for t in tiles})
    col_starts = sorted({t.box.col_off for t in tiles})
    assert len(row_starts) == nr and len(col_starts) == nc
    assert _covers(_intervals(row_starts, size), region.row_off, region.row_end)
    assert _covers(_intervals(col_starts, size), region.col_off, region.col_end)
    # minimal: without the last row (col) of tiles, some pixels of the region are left uncovered
    if nr > 1:
        assert not _covers(_intervals(row_starts[:-1], size), region.row_off, region.row_end)
    if nc > 1:
        assert not _covers(_intervals(col_starts[:-1], size), region.col_off, region.col_end)
    # the same, analytically
    assert (nr - 1) * stride + size >= region.height
    assert nr == 1 or (nr - 2) * stride + size < region.height
    assert (nc - 1) * stride + size >= region.width
    assert nc == 1 or (nc - 2) * stride + size < region.width


@settings(max_examples=120, deadline=None)
@given(rr=raster_and_region(max_side=90), t=small_tiling())
def test_cover_coverage_count_array(rr, t):
    """Brute force on small cases: a coverage count per pixel of the region, all ≥ 1."""
    raster, region = rr
    size, overlap, patch = t
    tg = TileGrid.cover(region, raster, size=size, overlap=overlap, patch=patch)
    nr, nc = tg.shape
    # the canvas spans the region and anything the tiles stick out of it
    canvas = PixelBox(region.row_off, region.col_off,
                      (nr - 1) * tg.stride + size, (nc - 1) * tg.stride + size)
    count = np.zeros((canvas.height, canvas.width), dtype=np.int32)
    for tile in tg:
        assert tile.box.intersection(canvas) == tile.box
        count[tile.box.relative_to(canvas).slices()] += 1
    rel = region.relative_to(canvas)
    assert count[rel.slices()].min() >= 1
    # minimality: dropping the last tile row / column uncovers part of the region
    last_row_start = (nr - 1) * tg.stride
    last_col_start = (nc - 1) * tg.stride
    if nr > 1:
        without = np.zeros_like(count)
        for tile in tg:
            if tile.grid_row < nr - 1:
                without[tile.box.relative_to(canvas).slices()] += 1
        assert without[rel.slices()].min() == 0
        assert last_row_start < region.height
    if nc > 1:
        without = np.zeros_like(count)
        for tile in tg:
            if tile.grid_col < nc - 1:
                without[tile.box.relative_to(canvas).slices()] += 1
        assert without[rel.slices()].min() == 0
        assert last_col_start < region.width


@SETTINGS
@given(rr=raster_and_region(max_side=600), t=tiling(), n=st.integers(1, 50))
def test_chunks_preserve_order_and_cover_every_tile_once(rr, t, n):
    raster, region = rr
    size, overlap, patch = t
    tg = TileGrid.cover(region, raster, size=size, overlap=overlap, patch=patch)
    tiles = list(tg)
    chunks = tg.chunks(n)
    assert [x for c in chunks for x in c] == tiles
    assert [x.index for c in chunks for x in c] == list(range(len(tg)))
    assert all(len(c) == n for c in chunks[:-1])
    assert 1 <= len(chunks[-1]) <= n
    assert len(chunks) == math.ceil(len(tiles) / n)


def test_cover_known_example():
    # 100 px with 32-px tiles and stride 24: starts 0, 24, 48, 72 (72 + 32 = 104 ≥ 100)
    tg = TileGrid.cover(PixelBox(10, 20, 100, 32), PixelBox(0, 0, 500, 500), size=32, overlap=8, patch=16)
    assert tg.shape == (4, 1)
    assert [t.box for t in tg] == [PixelBox(10 + k * 24, 20, 32, 32) for k in range(4)]
    # a region smaller than a tile still gets one tile
    tg = TileGrid.cover(PixelBox(3, 4, 1, 1), PixelBox(0, 0, 5, 5), size=224, overlap=32, patch=14)
    assert list(tg) == [Tile(0, 0, 0, PixelBox(3, 4, 224, 224))]


@pytest.mark.parametrize(("size", "patch"), [(20, 16), (15, 14), (24, 16), (0, 8), (-16, 16), (223, 14)])
def test_cover_refuses_size_not_a_multiple_of_patch(size, patch):
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        TileGrid.cover(PixelBox(0, 0, 10, 10), PixelBox(0, 0, 10, 10), size=size, overlap=0, patch=patch)


@pytest.mark.parametrize("overlap", [-1, -100, 32, 33, 1000])
def test_cover_refuses_bad_overlap(overlap):
    with pytest.raises(ConfigError, match="overlap"):
        TileGrid.cover(PixelBox(0, 0, 10, 10), PixelBox(0, 0, 10, 10), size=32, overlap=overlap, patch=16)


@pytest.mark.parametrize("region", [PixelBox(0, 0, 0, 10), PixelBox(0, 0, 10, 0), PixelBox(5, 5, 0, 0),
                                    PixelBox(0, 0, -3, 10)])
def test_cover_refuses_empty_region(region):
    with pytest.raises(AOIError, match="no pixel"):
        TileGrid.cover(region, PixelBox(0, 0, 10, 10), size=32, overlap=8, patch=16)


def test_errors_are_in_the_tree():
    with pytest.raises(ValueError):
        TileGrid.cover(PixelBox(0, 0, 10, 10), PixelBox(0, 0, 10, 10), size=30, overlap=0, patch=16)
    with pytest.raises(GeoDinoError):
        TileGrid.cover(PixelBox(0, 0, 0, 10), PixelBox(0, 0, 10, 10), size=32, overlap=0, patch=16)


# --------------------------------------------------------------------------------------------- blending

@settings(max_examples=100, deadline=None)
@given(size=st.integers(1, 256), floor=st.sampled_from([1e-3, 1e-2, 1e-6, 0.1]))
def test_blend_weights_shape_positive_symmetric_max_at_centre(size, floor):
    w = blend_weights(size, floor)
    assert w.shape == (size, size) and w.dtype == np.float32
    assert np.all(w > 0)
    assert np.allclose(w, w.T, rtol=0, atol=1e-7)
    assert np.allclose(w, w[::-1, :], rtol=0, atol=1e-6)
    assert np.allclose(w, w[:, ::-1], rtol=0, atol=1e-6)
    # the floor: the 1-D profile is ≥ floor, so the 2-D weight is ≥ floor²
    assert w.min() >= np.float32(floor) ** 2 * (1 - 1e-6)
    profile = w[size // 2] / np.sqrt(w[size // 2, size // 2])
    assert profile.min() >= floor * (1 - 1e-5)
    # the maximum sits at the centre (both central pixels for even sizes) and is ≤ 1
    centres = {(size - 1) // 2, size // 2}
    for c in centres:
        assert w[c, c] == pytest.approx(w.max(), rel=1e-6)
    assert w.max() <= 1.0 + 1e-6
    # weights do not increase moving away from the centre along a row (Hann shape)
    row = w[size // 2, size // 2:]
    assert np.all(np.diff(row) <= 1e-7)


def test_blend_weights_floor_reached_at_edges_of_large_tiles():
    w = blend_weights(224, floor=1e-3)
    assert w[0, 0] == pytest.approx(1e-6, rel=1e-5)
    assert w[0, 112] == pytest.approx(1e-3, rel=1e-3)


def _f(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """A per-pixel 'model': depends only on the global pixel, never on the tile."""
    return np.sin(rows * 0.37) * 3.0 + np.cos(cols * 0.11) * 2.0 + 0.01 * rows - 0.02 * cols + 5.0


def _blend(region: PixelBox, size: int, overlap: int, patch: int) -> tuple[np.ndarray, np.ndarray]:
    tg = TileGrid.cover(region, PixelBox(0, 0, 10_000, 10_000), size=size, overlap=overlap, patch=patch)
    nr, nc = tg.shape
    canvas = PixelBox(region.row_off, region.col_off, (nr - 1) * tg.stride + size,
                      (nc - 1) * tg.stride + size)
    num = np.zeros((canvas.height, canvas.width), dtype=np.float64)
    den = np.zeros_like(num)
    hann = blend_weights(size)
    for tile in tg:
        b = tile.box
        rr, cc = np.meshgrid(np.arange(b.row_off, b.row_end), np.arange(b.col_off, b.col_end), indexing="ij")
        value = _f(rr, cc).astype(np.float32)  # what one tile predicts, at global coordinates
        s = b.relative_to(canvas).slices()
        num[s] += hann * value
        den[s] += hann
    s = region.relative_to(canvas).slices()
    return num[s] / den[s], den[s]


@pytest.mark.parametrize(("size", "overlap", "patch"),
                         [(16, 0, 16), (16, 8, 8), (32, 8, 16), (28, 13, 14), (48, 47, 16), (64, 16, 16),
                          (224, 32, 14), (8, 7, 8)])
def test_blending_has_no_seams_and_does_not_depend_on_tile_size(size, overlap, patch):
    region = PixelBox(7, 11, 97, 130)
    blended, den = _blend(region, size, overlap, patch)
    assert np.all(den > 0)
    rr, cc = np.meshgrid(np.arange(region.row_off, region.row_end), np.arange(region.col_off, region.col_end),
                         indexing="ij")
    expected = _f(rr, cc).astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(blended, expected, rtol=0, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(rr=raster_and_region(max_side=120), t=small_tiling())
def test_blending_property(rr, t):
    _, region = rr
    size, overlap, patch = t
    blended, den = _blend(region, size, overlap, patch)
    assert np.all(den > 0)
    rr_, cc = np.meshgrid(np.arange(region.row_off, region.row_end),
                          np.arange(region.col_off, region.col_end), indexing="ij")
    np.testing.assert_allclose(blended, _f(rr_, cc).astype(np.float32), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------- Grid

@SETTINGS
@given(data=st.data(), which=st.sampled_from(sorted(TRANSFORMS)), h=st.integers(1, 3000),
       w=st.integers(1, 3000))
def test_box_covering_round_trips_bounds(data, which, h, w):
    transform, crs = TRANSFORMS[which]
    g = Grid(h, w, transform, crs)
    box = data.draw(boxes_in(h, w))
    assert g.box_covering(g.bounds(box)) == box


@SETTINGS
@given(data=st.data(), which=st.sampled_from(sorted(TRANSFORMS)), h=st.integers(1, 3000),
       w=st.integers(1, 3000))
def test_box_covering_of_a_subpixel_shrink_is_the_same_box(data, which, h, w):
    """Bounds strictly inside a box's outer pixels still need all of them."""
    transform, crs = TRANSFORMS[which]
    g = Grid(h, w, transform, crs)
    box = data.draw(boxes_in(h, w))
    left, bottom, right, top = g.bounds(box)
    dx, dy = 0.25 * g.res[0], 0.25 * g.res[1]
    assert g.box_covering((left + dx, bottom + dy, right - dx, top - dy)) == box


def test_box_covering_clips_and_returns_none_outside():
    g = Grid(100, 200, UTM, "EPSG:32618")
    left, bottom, right, top = g.bounds()
    assert g.box_covering((left - 1e4, bottom - 1e4, right + 1e4, top + 1e4)) == g.box
    assert g.box_covering((right + 10, bottom, right + 1e4, top)) is None


@SETTINGS
@given(data=st.data(), which=st.sampled_from(sorted(TRANSFORMS)), h=st.integers(1, 3000),
       w=st.integers(1, 3000))
def test_subgrid_origin_matches_parent_pixel(data, which, h, w):
    transform, crs = TRANSFORMS[which]
    g = Grid(h, w, transform, crs)
    box = data.draw(boxes_in(h, w))
    sub = g.subgrid(box)
    assert (sub.height, sub.width, sub.crs) == (box.height, box.width, crs)
    assert sub.transform == g.box_transform(box)
    for r, c in ((0, 0), (box.height, box.width), (box.height - 1, 0)):
        x, y = sub.transform @ (c, r)
        px, py = g.transform @ (box.col_off + c, box.row_off + r)
        assert x == pytest.approx(px, abs=1e-9 * max(g.res) * 1e3)
        assert y == pytest.approx(py, abs=1e-9 * max(g.res) * 1e3)
    assert sub.res == pytest.approx(g.res)
    assert sub.bounds() == pytest.approx(g.bounds(box))


@SETTINGS
@given(data=st.data(), which=st.sampled_from(sorted(TRANSFORMS)), h=st.integers(1, 500),
       w=st.integers(1, 500))
def test_pixel_centres_are_half_a_pixel_from_corners(data, which, h, w):
    transform, crs = TRANSFORMS[which]
    g = Grid(h, w, transform, crs)
    box = data.draw(boxes_in(h, w))
    xs, ys = g.pixel_centres(box)
    assert xs.shape == (box.width,) and ys.shape == (box.height,)
    corner_x = np.array([(g.transform @ (c, 0))[0] for c in range(box.col_off, box.col_end)])
    corner_y = np.array([(g.transform @ (0, r))[1] for r in range(box.row_off, box.row_end)])
    np.testing.assert_allclose(xs - corner_x, 0.5 * transform.a, rtol=1e-6)
    np.testing.assert_allclose(ys - corner_y, 0.5 * transform.e, rtol=1e-6)
    # centres lie strictly inside the box's bounds
    left, bottom, right, top = g.bounds(box)
    assert np.all((xs > left) & (xs < right)) and np.all((ys > bottom) & (ys < top))


def test_pixel_centres_refuse_rotated_transforms():
    g = Grid(10, 10, Affine(1.0, 0.1, 0.0, 0.0, -1.0, 0.0), "EPSG:32618")
    with pytest.raises(CRSMismatchError, match="rotated"):
        g.pixel_centres(g.box)


def test_bounds_known_values():
    g = Grid(718, 791, UTM, "EPSG:32618")
    left, bottom, right, top = g.bounds()
    assert (left, top) == (101985.0, 2826915.0)
    assert right == pytest.approx(101985.0 + 791 * UTM.a)
    assert bottom == pytest.approx(2826915.0 + 718 * UTM.e)
    assert (right, bottom) == pytest.approx((339315.0, 2611485.0))
    assert g.bounds(g.box) == g.bounds()
    assert g.bounds(PixelBox(1, 2, 3, 4)) == pytest.approx(
        (101985.0 + 2 * UTM.a, 2826915.0 + 4 * UTM.e, 101985.0 + 6 * UTM.a, 2826915.0 + 1 * UTM.e))
    assert g.res == pytest.approx((300.0379266750948, 300.041782729805))


@SETTINGS
@given(box=any_box, which=st.sampled_from(sorted(TRANSFORMS)))
def test_bounds_are_ordered(box, which):
    transform, crs = TRANSFORMS[which]
    g = Grid(10, 10, transform, crs)
    left, bottom, right, top = g.bounds(box)
    assert left < right and bottom < top
    assert right - left == pytest.approx(box.width * g.res[0])
    assert top - bottom == pytest.approx(box.height * g.res[1])


def test_same_as():
    g = Grid(718, 791, UTM, "EPSG:32618")
    g.same_as(Grid(718, 791, UTM, "EPSG:32618"))
    g.same_as(g.subgrid(g.box))
    # a float-noise difference in the transform is tolerated
    g.same_as(Grid(718, 791, Affine(*(v + 1e-12 for v in tuple(UTM)[:6])), "EPSG:32618"))
    with pytest.raises(CRSMismatchError, match="shape"):
        g.same_as(Grid(718, 790, UTM, "EPSG:32618"))
    with pytest.raises(CRSMismatchError, match="shape"):
        g.same_as(Grid(719, 791, UTM, "EPSG:32618"))
    with pytest.raises(CRSMismatchError, match="transform"):
        g.same_as(Grid(718, 791, UTM @ Affine.translation(1, 0), "EPSG:32618"))
    with pytest.raises(CRSMismatchError, match="transform"):
        g.same_as(Grid(718, 791, Affine(300.0, 0.0, 101985.0, 0.0, -300.041782729805, 2826915.0),
                       "EPSG:32618"))
    with pytest.raises(CRSMismatchError, match="CRS"):
        g.same_as(Grid(718, 791, UTM, "EPSG:32619"))
    with pytest.raises(CRSMismatchError, match="before and after"):
        g.same_as(Grid(718, 791, UTM, "EPSG:4326"), what="before and after")


def test_same_as_crs_equivalent_spellings():
    wkt = CRS.from_epsg(4326).to_wkt()
    a = Grid(377, 697, GEO, "EPSG:4326")
    a.same_as(Grid(377, 697, GEO, wkt))
    Grid(377, 697, GEO, wkt).same_as(a)
    assert crs_equal("EPSG:4326", wkt)
    assert crs_equal("EPSG:32618", CRS.from_epsg(32618).to_wkt())
    assert not crs_equal("EPSG:4326", "EPSG:32618")


# --------------------------------------------------------------------------------------------- PixelBox

@SETTINGS
@given(a=any_box, b=any_box)
def test_intersection_properties(a, b):
    i = a.intersection(b)
    assert i == b.intersection(a)
    assert a.intersection(a) == a
    rows_overlap = max(a.row_off, b.row_off) < min(a.row_end, b.row_end)
    cols_overlap = max(a.col_off, b.col_off) < min(a.col_end, b.col_end)
    if not (rows_overlap and cols_overlap):
        assert i is None
        return
    assert i is not None and i.height > 0 and i.width > 0
    # contained in both, and the largest box that is
    for outer in (a, b):
        assert outer.intersection(i) == i
        assert outer.row_off <= i.row_off and i.row_end <= outer.row_end
        assert outer.col_off <= i.col_off and i.col_end <= outer.col_end
    assert i.row_off in (a.row_off, b.row_off) and i.row_end in (a.row_end, b.row_end)
    assert i.col_off in (a.col_off, b.col_off) and i.col_end in (a.col_end, b.col_end)
    # idempotent/associative with a third box
    assert i.intersection(a) == i


@settings(max_examples=60, deadline=None)
@given(a=st.builds(PixelBox, st.integers(-20, 20), st.integers(-20, 20), st.integers(1, 15),
                   st.integers(1, 15)),
       b=st.builds(PixelBox, st.integers(-20, 20), st.integers(-20, 20), st.integers(1, 15),
                   st.integers(1, 15)))
def test_intersection_matches_pixel_sets(a, b):
    def pixels(x: PixelBox | None) -> set[tuple[int, int]]:
        if x is None:
            return set()
        return {(r, c) for r in range(x.row_off, x.row_end) for c in range(x.col_off, x.col_end)}

    assert pixels(a.intersection(b)) == pixels(a) & pixels(b)


@SETTINGS
@given(a=any_box, outer=any_box)
def test_relative_to_properties(a, outer):
    rel = a.relative_to(outer)
    assert (rel.height, rel.width) == (a.height, a.width)
    assert (rel.row_off + outer.row_off, rel.col_off + outer.col_off) == (a.row_off, a.col_off)
    assert outer.relative_to(outer) == PixelBox(0, 0, outer.height, outer.width)
    # relative_to commutes with intersection
    i = a.intersection(outer)
    if i is not None:
        assert i.relative_to(outer) == rel.intersection(PixelBox(0, 0, outer.height, outer.width))
        # the slices address the same pixels in an array covering `outer`
        arr = np.arange(outer.height * outer.width).reshape(outer.height, outer.width)
        full = np.arange(1500 * 1500).reshape(1500, 1500)
        shifted = full[outer.row_off + 500:outer.row_end + 500, outer.col_off + 500:outer.col_end + 500]
        assert shifted.shape == arr.shape
        r = i.relative_to(outer)
        np.testing.assert_array_equal(shifted[r.slices()],
                                      full[i.row_off + 500:i.row_end + 500, i.col_off + 500:i.col_end + 500])


def test_pixelbox_helpers():
    b = PixelBox(2, 3, 4, 5)
    assert (b.row_end, b.col_end) == (6, 8)
    assert b.slices() == (slice(2, 6), slice(3, 8))
    w = b.to_rasterio()
    assert (w.col_off, w.row_off, w.width, w.height) == (3, 2, 5, 4)
