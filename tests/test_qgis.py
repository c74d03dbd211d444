"""Every output of a run opens in real QGIS (Debian's python3-qgis, headless) with the right CRS and
extent."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import rasterio

from geo_dino.config import parse_config
from geo_dino.run import stages as pl
from geo_dino.run.folder import load_plan
from tests.conftest import PUCALLPA, ROOT

QGIS_PY = "/usr/bin/python3"


def _have_qgis() -> bool:
    try:
        return subprocess.run([QGIS_PY, "-c", "import qgis.core"], capture_output=True,
                              timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _have_qgis() and not os.environ.get("CI"),
                    reason="QGIS (python3-qgis) not installed; .ci/run and `make test` install it")
@pytest.mark.slow
def test_outputs_open_in_qgis(tiny_config, tmp_path):
    cfg = parse_config(tiny_config("aoi/pucallpa.geojson", PUCALLPA, sources={"bands": [1, 2, 3]}))
    run_dir = pl.run_local(cfg)
    n_tiles = load_plan(run_dir).tiling.n_tiles
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", XDG_RUNTIME_DIR=str(xdg))
    env.pop("PYTHONPATH", None)
    res = subprocess.run([QGIS_PY, str(ROOT / "tests/qgis_open.py"), str(run_dir)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    layers = json.loads(res.stdout.strip().splitlines()[-1])
    tifs = sorted(p.name for p in run_dir.glob("*.tif"))
    assert len(tifs) == 8 and set(tifs) <= set(layers)  # with the fused change's two parts
    for name in tifs:
        info = layers[name]
        with rasterio.open(run_dir / name) as ds:
            assert info["valid"], name
            assert info["crs"] == "EPSG:4326"
            assert (info["width"], info["height"], info["bands"]) == (ds.width, ds.height, ds.count)
            for got, want in zip(info["extent"], ds.bounds, strict=True):
                assert abs(got - want) < 1e-9
        if name.startswith(("classes", "change_mask")):
            assert info["renderer"] == "paletted", name  # the .qml style was applied
        if name in ("change_magnitude.tif", "change_spectral.tif", "change_features.tif"):
            assert info["renderer"] == "singlebandpseudocolor", name
    assert layers["tiles.gpkg"]["valid"] and layers["tiles.gpkg"]["features"] == n_tiles
