"""The strip accumulator blends exactly like a scene-sized one, and chunking never changes a run's outputs."""

from __future__ import annotations

import numpy as np
import rasterio
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st

from geo_dino.config import parse_config
from geo_dino.inputs.grid import Grid, TileGrid, blend_weights
from geo_dino.run import stages as pl
from geo_dino.run.folder import load_plan
from geo_dino.run.inference import ChunkResult, StripAccumulator, band_rows, merge_band


def _terms(tiles: TileGrid, size: int, seed: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    hann = blend_weights(size)
    return {t.index: (rng.normal(size=(2, size, size)).astype(np.float32),
                      (hann * (rng.random() > 0.1)).astype(np.float32)) for t in tiles}


def _run_strip(grid: Grid, tiles: TileGrid, chunks, c: int, terms, out: np.ndarray) -> ChunkResult:
    """Chunk ``c`` alone, as infer_chunk runs it: its own strip, its top band's terms recorded."""
    first, end = band_rows(grid, chunks, tiles.stride, tiles.overlap, c)
    strip = StripAccumulator(grid, 2, tiles.size, tiles.stride, top=first)
    strip.record_until = end

    def sink(top, v, _w):
        assert np.isnan(out[:, top:top + v.shape[1]]).all()  # every row written once
        out[:, top:top + v.shape[1]] = v

    for row in chunks[c]:
        for t in row:
            strip.add(t.box, *terms[t.index])
        strip.advance(last=row[0].grid_row == tiles.shape[0] - 1, sink=sink)
    last = c == len(chunks) - 1
    bottom = None if last else strip.open_rows(min(tiles.overlap, grid.height - strip.top))
    return ChunkResult(strip.recorded, bottom, np.zeros(1, np.int64))


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 90), w=st.integers(1, 90), size_p=st.integers(1, 4), ov=st.integers(0, 15),
       seed=st.integers(0, 2**16), chunk_tiles=st.integers(1, 40), reverse=st.booleans())
def test_independent_chunks_equal_one_strip_bit_for_bit(h, w, size_p, ov, seed, chunk_tiles, reverse):
    """Chunks computed alone, in any order, then their bands merged: the very bits of one strip over the
    whole region, which itself blends like a scene-sized float64 accumulation (to float32 rounding)."""
    size = 8 * size_p
    ov = min(ov, size - 1)
    grid = Grid(h, w, Affine(10, 0, 0, 0, -10, 0), "EPSG:32618")
    tiles = TileGrid.cover(grid.box, grid.box, size=size, overlap=ov, patch=8)
    terms = _terms(tiles, size, seed)
    # one strip over everything (one chunk)
    one = np.full((2, h, w), np.nan, np.float32)
    _run_strip(grid, tiles, [tiles.row_chunks(10**9)[0]], 0, terms, one)
    # the chunks alone, in either order, then the bands
    chunks = tiles.row_chunks(chunk_tiles)
    out = np.full((2, h, w), np.nan, np.float32)
    order = range(len(chunks))
    results = {c: _run_strip(grid, tiles, chunks, c, terms, out)
               for c in (reversed(order) if reverse else order)}
    for c in range(1, len(chunks)):
        first, end = band_rows(grid, chunks, tiles.stride, tiles.overlap, c)
        vals, _ = merge_band(results[c - 1], results[c], grid, tiles.size, tiles.stride, first, end)
        assert np.isnan(out[:, first:end]).all()
        out[:, first:end] = vals
    assert np.array_equal(out, one, equal_nan=True)
    # and one strip blends like the whole scene at once
    full = np.zeros((3, h, w))
    for t in tiles:
        vals, wts = terms[t.index]
        inner = t.box.intersection(grid.box)
        rs, cs = inner.relative_to(t.box).slices()
        full[:2, inner.slices()[0], inner.slices()[1]] += vals[:, rs, cs] * wts[rs, cs]
        full[2, inner.slices()[0], inner.slices()[1]] += wts[rs, cs]
    with np.errstate(invalid="ignore", divide="ignore"):
        want = np.where(full[2] > 0, full[:2] / np.where(full[2] > 0, full[2], 1), np.nan)
    covered = full[2] > 0
    assert np.array_equal(np.isnan(one[0]), ~covered)
    np.testing.assert_allclose(one[:, covered], want[:, covered], rtol=1e-4, atol=1e-5)


def test_chunking_does_not_change_outputs(tiny_config):
    """One tile row per task or all rows in one task: byte-identical rasters."""
    outs = []
    for chunk_tiles in (1, 10_000):
        cfg = tiny_config("aoi/pucallpa.geojson", None,
                          tiling={"size": 64, "overlap": 16, "chunk_tiles": chunk_tiles})
        from tests.conftest import PUCALLPA

        cfg["rasters"] = [str(p) for p in PUCALLPA]
        cfg["sources"]["bands"] = [1, 2, 3]
        run_dir = pl.run_local(parse_config(cfg))
        outs.append(run_dir)

    n = [load_plan(r).tiling.n_chunks for r in outs]
    assert n[0] > 1 and n[1] == 1
    for name in ("pca_rgb_t1.tif", "classes_t2.tif", "change_magnitude.tif", "change_mask.tif"):
        with rasterio.open(outs[0] / name) as a, rasterio.open(outs[1] / name) as b:
            assert np.array_equal(a.read(), b.read(), equal_nan=True), name
    assert not list((outs[0] / "work").glob("chunk_*")) and not (outs[0] / "work" / "outputs.zarr").exists()
