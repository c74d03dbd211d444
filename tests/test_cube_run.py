"""The pipeline's feature cube, search by example on it, and the CLI commands of heads, change and
similarity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from typer.testing import CliRunner

from geo_dino.cli import app
from geo_dino.config import parse_config
from geo_dino.run import resources
from geo_dino.run import stages as pl
from geo_dino.run.folder import load_config, load_plan
from tests.conftest import PUCALLPA, ROOT, run_folders

runner = CliRunner()


@pytest.fixture(scope="module")
def cube_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cube")
    cfg = {"name": "c", "aoi": str(ROOT / "aoi/pucallpa.geojson"), "rasters": [str(PUCALLPA[1])],
           "output_dir": str(tmp / "runs"),
           "sources": {"allowed_roots": [str(ROOT / "data")], "bands": [1, 2, 3]},
           "screening": {"registry": str(ROOT / "data/registry/sensitive_sites.gpkg"),
                         "policy": str(ROOT / "configs/screening_policy.yaml")},
           "backbone": {"arch": "vit_tiny_patch16_dinov3_test", "batch_size": 16},
           "tiling": {"size": 64, "overlap": 32, "chunk_tiles": 8},
           "heads": {"kmeans": {"k": 3, "fit_tiles": 8}, "cube": True}}
    return pl.run_local(parse_config(cfg))


def test_cube_holds_each_tiles_patch_features_at_their_map_coordinates(cube_run: Path) -> None:
    from geo_dino.inputs.sources import WindowReader
    from geo_dino.outputs.cube import cube_grid, feature_at, open_cube
    from geo_dino.run.inference import FeatureExtractor

    cube = open_cube(cube_run / "features.zarr")
    plan = load_plan(cube_run)
    out = plan.out_grid.grid()
    g = cube_grid(cube)
    assert (g.height, g.width) == (-(-out.height // 16), -(-out.width // 16))
    assert g.transform.almost_equals(out.transform * rasterio.Affine.scale(16), precision=1e-12)
    extractor, _ = resources.extractor(load_config(cube_run), plan)
    assert isinstance(extractor, FeatureExtractor)
    tiles = list(plan.tile_grid())
    nr, nc = plan.tiling.shape
    # tile (1, 1) (an inner tile): its core is its patches 1..2 (overlap 2 patches, half each side)
    t = tiles[1 * nc + 1]
    with WindowReader(plan.infos()[0]) as r:
        f, valid = extractor.features(r, [t.box])
    stride = plan.tiling.size // 16 - plan.tiling.overlap // 16
    checked = 0
    for i in (1, 2):
        for j in (1, 2):
            cell = (stride + i, stride + j)
            x, y = g.transform * (cell[1] + 0.5, cell[0] + 0.5)
            got = feature_at(cube, x, y)
            frac = valid[0, i * 16:(i + 1) * 16, j * 16:(j + 1) * 16].mean()
            if frac >= 0.5:
                np.testing.assert_allclose(got, f[0, :, i, j].numpy(), rtol=0, atol=1e-6)
                checked += 1
            else:
                assert np.isnan(got).all()
    assert checked >= 1
    # patches outside the AOI's raster part / nodata are NaN, and most of the region is filled
    arr = cube.isel(feature=0).values
    assert 0.3 < np.isfinite(arr).mean() <= 1.0
    rec = json.loads((cube_run / "provenance.json").read_text())
    assert any(o["name"] == "features" and o["path"] == "features.zarr" for o in rec["outputs"])


def test_cube_needs_whole_patch_overlap(tiny_config) -> None:
    from geo_dino.errors import ConfigError

    cfg = parse_config(tiny_config(tiling={"size": 64, "overlap": 8, "chunk_tiles": 16},
                                   heads={"cube": True}))
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        pl.run_local(cfg)


def test_similar_cli_on_a_run(cube_run: Path, tmp_path: Path) -> None:
    from geo_dino.outputs.cog import RasterSpec, verify_raster
    from geo_dino.outputs.cube import cube_grid, open_cube

    g = cube_grid(open_cube(cube_run / "features.zarr"))
    from pyproj import Transformer

    tr = Transformer.from_crs(g.crs, "EPSG:4326", always_xy=True)
    x0, y0 = g.transform * (4, 8)
    x1, y1 = g.transform * (7, 5)
    (lx0, ly0), (lx1, ly1) = tr.transform(x0, y0), tr.transform(x1, y1)
    ex = tmp_path / "example.geojson"
    ex.write_text(json.dumps({"type": "Polygon",
                              "coordinates": [[[lx0, ly0], [lx1, ly0], [lx1, ly1], [lx0, ly1], [lx0, ly0]]]}))
    res = runner.invoke(app, ["similar", "--cube", str(cube_run), "--example", str(ex), "--top-k", "3"])
    assert res.exit_code == 0, res.output
    verify_raster(cube_run / "similarity.tif",
                  RasterSpec(g, 1, "float32", float("nan"), ("cosine similarity",)))
    with rasterio.open(cube_run / "similarity.tif") as s:
        sim = s.read(1)
    assert np.nanmax(sim) <= 1 + 1e-5 and np.nanmax(sim[5:8, 4:7]) > 0.9  # the example's own cells
    # styled and in the run's QGIS project, shown first with its matches
    import sqlite3
    import xml.etree.ElementTree as ET

    qml = ET.parse(cube_run / "similarity.qml").getroot()
    shader = qml.find(".//colorrampshader")
    assert qml.find(".//rasterrenderer").get("type") == "singlebandpseudocolor"
    assert float(shader.get("minimumValue")) == pytest.approx(float(np.nanmedian(sim)), abs=0.05)
    assert float(shader.get("maximumValue")) == pytest.approx(float(np.nanmax(sim)), abs=1e-4)
    with sqlite3.connect(cube_run / "similarity_matches.gpkg") as db:
        assert db.execute("SELECT count(*) FROM layer_styles WHERE f_table_name = 'matches' "
                          "AND useAsDefault").fetchone() == (1,)
    tree = {n.get("name"): n.get("checked") for n in ET.parse(cube_run / "run.qgs").getroot()
            .iter("layer-tree-layer")}
    assert tree["similarity"] == tree["matches"] == "Qt::Checked"
    assert [n for n, c in tree.items() if c == "Qt::Checked" and n not in ("aoi", "masked_sites",
                                                                           "sites_hit")] == [
        "similarity", "matches"]
    assert "run.qgs" in res.output
    far = tmp_path / "far.geojson"
    far.write_text(json.dumps({"type": "Polygon",
                               "coordinates": [[[10, 10], [10.1, 10], [10.1, 10.1], [10, 10]]]}))
    res = runner.invoke(app, ["similar", "--cube", str(cube_run), "--example", str(far)])
    assert res.exit_code == 2


@pytest.mark.slow
def test_change_cli_needs_two_dates_and_train_head_cli(tmp_path: Path) -> None:
    res = runner.invoke(app, ["change", "--aoi", str(ROOT / "aoi/pucallpa.geojson"), "--raster",
                              str(PUCALLPA[0])])
    assert res.exit_code == 2 and "two" in res.output
    res = runner.invoke(app, ["train-head", str(ROOT / "configs/train_head_taizhou.yaml"), "--output-dir",
                              str(tmp_path / "heads")])
    assert res.exit_code == 0, res.output
    head = next((tmp_path / "heads").glob("taizhou-change-*/head.safetensors"))
    assert "test mIoU" in res.output
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"aoi: {ROOT / 'aoi/taizhou.geojson'}\n"
                   f"rasters: [{ROOT / 'data/labels/taizhou/taizhou_L7ETM_2000-03-17.tif'}, "
                   f"{ROOT / 'data/labels/taizhou/taizhou_L7ETM_2003-02-06.tif'}]\n"
                   f"output_dir: {tmp_path / 'runs'}\n"
                   f"sources: {{allowed_roots: [{ROOT / 'data'}], bands: [3, 2, 1]}}\n"
                   f"screening: {{registry: {ROOT / 'data/registry/sensitive_sites.gpkg'}, "
                   f"policy: {ROOT / 'configs/screening_policy.yaml'}}}\n"
                   f"backbone: {{arch: vit_tiny_patch8_geo, "
                   f"checkpoint: {ROOT / 'models/vit_tiny_patch8_geo.safetensors'}}}\n"
                   f"tiling: {{size: 128, overlap: 32}}\n")
    res = runner.invoke(app, ["change", "--config", str(cfg), "--head", str(head)])
    assert res.exit_code == 0, res.output
    (run,) = run_folders(tmp_path / "runs")
    assert (run / "change_probability.tif").exists() and (run / "change_mask.tif").exists()
    assert torch.is_grad_enabled()
