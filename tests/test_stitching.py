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
from geo_dino.run.inference import StripAccumulator


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 90), w=st.integers(1, 90), size_p=st.integers(1, 4), ov=st.integers(0, 15),
       seed=st.integers(0, 2**16), carry_every=st.integers(1, 3))
def test_strip_equals_full_accumulation(tmp_path_factory, h, w, size_p, ov, seed, carry_every):
    size = 8 * size_p
    ov = min(ov, size - 1)
    grid = Grid(h, w, Affine(10, 0, 0, 0, -10, 0), "EPSG:32618")
    tiles = TileGrid.cover(grid.box, grid.box, size=size, overlap=ov, patch=8)
    rng = np.random.default_rng(seed)
    hann = blend_weights(size)
    full = np.zeros((3, h, w))
    strip = StripAccumulator(grid, 2, size, tiles.stride)
    out = np.full((2, h, w), np.nan, np.float32)
    rows = tiles.row_chunks(1)
    path = tmp_path_factory.mktemp("carry") / "c.npz"
    for k, chunk in enumerate(rows):
        if k and k % carry_every == 0:  # a new task: only the carried rows survive
            strip.save(path)
            strip = StripAccumulator(grid, 2, size, tiles.stride)
            strip.load(path)
        for row in chunk:
            for t in row:
                vals = rng.normal(size=(2, size, size)).astype(np.float32)
                wts = hann * (rng.random() > 0.1)
                inner = t.box.intersection(grid.box)
                rs, cs = inner.relative_to(t.box).slices()
                full[:2, inner.slices()[0], inner.slices()[1]] += vals[:, rs, cs] * wts[rs, cs]
                full[2, inner.slices()[0], inner.slices()[1]] += wts[rs, cs]
                strip.add(t.box, vals, wts)
            def sink(top, v, _w):
                assert np.isnan(out[:, top:top + v.shape[1]]).all()  # every row written once
                out[:, top:top + v.shape[1]] = v

            strip.advance(last=row[0].grid_row == tiles.shape[0] - 1, sink=sink)
    with np.errstate(invalid="ignore", divide="ignore"):
        want = np.where(full[2] > 0, full[:2] / np.where(full[2] > 0, full[2], 1), np.nan)
    covered = full[2] > 0
    assert np.array_equal(np.isnan(out[0]), ~covered)
    np.testing.assert_allclose(out[:, covered], want[:, covered], rtol=1e-4, atol=1e-5)


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
    assert not list((outs[0] / "work").glob("carry_*"))
