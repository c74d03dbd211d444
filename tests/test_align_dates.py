"""Two dates on different grids: refused by default, or the second reprojected onto the first's grid
explicitly (recorded). The bundled NAIP 2009/2020 pair is a real case: the 2020 tile is one row shorter and
shifted 1 m."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio

from geo_dino.config import parse_config
from geo_dino.errors import CRSMismatchError
from geo_dino.run import stages as pl
from tests.conftest import ROOT

NAIP = [ROOT / "data/rasters/naip" / f"m_4709963_se_14_1_{d}.tif" for d in ("20090818", "20200831")]


@pytest.mark.slow
def test_naip_pair_is_refused_then_reprojected_when_asked(tiny_config) -> None:
    cfg = tiny_config("aoi/naip_potholes.geojson", NAIP, sources={"bands": [1, 2, 3]},
                      tiling={"size": 64, "overlap": 16, "chunk_tiles": 64},
                      heads={"kmeans": {"k": 3, "fit_tiles": 8}})
    with pytest.raises(CRSMismatchError, match="align_dates"):
        pl.run_local(parse_config(cfg))
    cfg["sources"] = cfg["sources"] | {"align_dates": "bilinear"}
    run = pl.run_local(parse_config(cfg))
    rec = json.loads((run / "provenance.json").read_text())
    al = rec["alignment"]
    assert al["reprojected"] == NAIP[1].name and al["resampling"] == "bilinear"
    assert al["source_grid"]["height"] == 723 and al["target_grid"]["height"] == 724
    assert rec["coregistration"] is not None  # measured after the reprojection
    with rasterio.open(NAIP[0]) as first, rasterio.open(run / "change_magnitude.tif") as ch:
        assert ch.crs == first.crs
        # the output grid is a sub-grid of the first date's: same pixel size, origin on its pixel corners
        col, row = ~first.transform * (ch.transform.c, ch.transform.f)
        assert abs(col - round(col)) < 1e-9 and abs(row - round(row)) < 1e-9 and ch.res == first.res
        mag = ch.read(1)
    assert np.isfinite(mag).mean() > 0.9  # the warped date is valid over the AOI (not read as nodata)
