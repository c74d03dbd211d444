"""Supervised heads end to end on the bundled real labels: train (flow stages), score on held-out tiles, run
over the scene with the head, polygons, provenance; and the refusals."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch

from geo_dino.config import parse_config
from geo_dino.errors import CheckpointError, ConfigError
from geo_dino.run import stages as pl
from geo_dino.run.folder import load_plan
from geo_dino.training.head_config import load_head_config, parse_head_config
from geo_dino.training.train_head import HEAD_FILE, METRICS, hooked_layers, train_head_local
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # heads trained end to end on the bundled labels: about 70 s of the suite

FLOODS = ROOT / "data/labels/sen1floods11_spain"
TAIZHOU = ROOT / "data/labels/taizhou"
SHIPPED = {"arch": "vit_tiny_patch8_geo", "checkpoint": str(ROOT / "models/vit_tiny_patch8_geo.safetensors"),
           "batch_size": 16}


def _head_cfg(name: str, tmp: Path, **over) -> object:
    cfg = load_head_config(ROOT / f"configs/train_head_{name}.yaml",
                           {"output_dir": str(tmp / "heads"),
                            "sources": {"allowed_roots": [str(ROOT / "data")]}}
                           | over)
    return cfg


@pytest.fixture(scope="module")
def floods_head(tmp_path_factory) -> Path:
    return train_head_local(_head_cfg("floods", tmp_path_factory.mktemp("floods")))


@pytest.fixture(scope="module")
def taizhou_head(tmp_path_factory) -> Path:
    return train_head_local(_head_cfg("taizhou", tmp_path_factory.mktemp("taizhou")))


def _run_cfg(tmp: Path, aoi: str, rasters: list[Path], head: Path, bands=None, **heads) -> dict:
    return {"name": "h", "aoi": str(ROOT / aoi), "rasters": [str(r) for r in rasters],
            "output_dir": str(tmp / "runs"),
            "sources": {"allowed_roots": [str(ROOT / "data")], "bands": bands},
            "screening": {"registry": str(ROOT / "data/registry/sensitive_sites.gpkg"),
                          "policy": str(ROOT / "configs/screening_policy.yaml")},
            "backbone": SHIPPED, "tiling": {"size": 128, "overlap": 32, "chunk_tiles": 8},
            "heads": {"kmeans": {"k": 3, "fit_tiles": 8},
                      "supervised": {"path": str(head / HEAD_FILE)}} | heads}


def test_floods_head_is_scored_on_held_out_tiles_and_beats_chance(floods_head: Path) -> None:
    m = json.loads((floods_head / METRICS).read_text())
    split = gpd.read_file(floods_head / "split.gpkg")
    roles = split["role"].value_counts().to_dict()
    assert roles["test"] == m["split"]["test"] > 0 and roles["fit"] == m["split"]["fit"] > 0
    # no fit tile touches a test tile (buffer 1, Chebyshev)
    test = {(r, c) for r, c, role in zip(split.grid_row, split.grid_col, split.role, strict=True)
            if role == "test"}
    fit = {(r, c) for r, c, role in zip(split.grid_row, split.grid_col, split.role, strict=True)
           if role == "fit"}
    assert all(max(abs(a - c), abs(b - d)) > 1 for a, b in fit for c, d in test)
    cm = np.asarray(m["test"]["confusion_matrix"])
    assert cm.sum() == m["test"]["pixels"] > 10_000
    # water is about 27 % of the labelled pixels: a head that learned nothing scores water IoU near 0 or 0.27
    water = m["test"]["per_class"]["water"]
    assert water["iou"] > 0.45 and m["test"]["miou"] > 0.5, m["test"]
    rec = json.loads((floods_head / "provenance.json").read_text())
    digest = hashlib.sha256((FLOODS / "Spain_7370579_LabelHand.tif").read_bytes()).hexdigest()
    assert rec["status"] == "succeeded" and rec["labels"]["sha256"] == digest
    assert not (floods_head / "work" / "features.npy").exists()  # work files dropped


def test_head_file_carries_its_lineage_and_preprocessing(floods_head: Path) -> None:
    from geo_dino.models.seg_heads import load_head

    head, table, meta = load_head(floods_head / HEAD_FILE)
    assert table.names == ("not_water", "water") and meta["inputs"]["task"] == "segmentation"
    assert meta["backbone"]["sha256"] == "5b617f17286838dd0e118a71f7c8b0bcfaa36dc7027104e4f2f7ee647a4c1897"
    assert meta["preprocessing"]["scale"] == "percentile"  # int16 reflectance → per-band 2–98 %
    assert meta["lineage"]["labels"]["path"].endswith("Spain_7370579_LabelHand.tif")
    assert meta["metrics"]["test"]["miou"] == json.loads((floods_head / METRICS).read_text())["test"]["miou"]


def test_run_with_a_segmentation_head_writes_classes_probabilities_and_polygons(floods_head,
                                                                                tmp_path) -> None:
    cfg = parse_config(_run_cfg(tmp_path, "aoi/sen1floods11_spain.geojson",
                                [FLOODS / "Spain_7370579_S2_B4B3B2.tif"], floods_head,
                                supervised={"path": str(floods_head / HEAD_FILE),
                                            "vectors": {"min_area_m2": 2000, "simplify_m": 10}}))
    run = pl.run_local(cfg)
    with rasterio.open(run / "seg_classes.tif") as c, rasterio.open(run / "seg_probability.tif") as p, \
            rasterio.open(FLOODS / "Spain_7370579_LabelHand.tif") as lab:
        cls, prob, lab_crs = c.read(1), p.read(1), c.crs.to_wkt()
        # the class table's water colour
        assert c.nodata == 255 and c.colormap(1)[1][:3] == (0x1f, 0x6f, 0xd1)
        assert np.isnan(p.nodata) and c.crs == lab.crs and c.transform.almost_equals(
            lab.window_transform(rasterio.windows.from_bounds(*c.bounds, lab.transform).round_offsets()))
        win = rasterio.windows.from_bounds(*c.bounds, lab.transform).round_offsets().round_lengths()
        truth = lab.read(1, window=win)
    ok = cls != 255
    assert set(np.unique(cls[ok])) == {0, 1}
    assert np.all((prob[ok] >= 0.5 - 1e-6) & (prob[ok] <= 1)) and np.isnan(prob[~ok]).all()
    labelled = ok & (truth >= 0)
    agree = (cls[labelled] == truth[labelled]).mean()
    assert agree > 0.7, agree  # the whole chip, training tiles included: a sanity check, not the metric
    g = gpd.read_file(run / "vectors.gpkg", layer="seg_polygons")
    assert set(g.class_name) <= {"not_water", "water"} and (g.area_m2 >= 2000).all()
    from pyproj import CRS

    assert CRS(g.crs) == CRS(lab_crs)
    assert g.geometry.is_valid.all() and g.mean_confidence.between(0.5, 1).all()
    rec = json.loads((run / "provenance.json").read_text())
    sh = rec["supervised_head"]
    assert sh["lineage"]["labels"]["sha256"] and sh["metrics"]["test"]["miou"] > 0.5
    assert rec["preprocessing"]["mean"] == sh["preprocessing"]["mean"]
    assert rec["vectors"][0]["layer"] == "seg_polygons"
    from geo_dino.outputs.stac import validate_item

    assert validate_item(run / "stac_item.json")
    assert (run / "run.qgs").read_text().count("seg_polygons") >= 1


def test_change_head_on_taizhou_scores_labelled_pixels_only_and_runs_as_change(taizhou_head,
                                                                               tmp_path) -> None:
    m = json.loads((taizhou_head / METRICS).read_text())
    # the reference is sparse: 21,390 labelled pixels of 160,000; test pixels are a part of those
    assert 0 < m["test"]["pixels"] < 21_390
    assert m["test"]["per_class"]["changed"]["f1"] > 0.6, m["test"]
    run = pl.run_local(parse_config(_run_cfg(tmp_path, "aoi/taizhou.geojson",
                                             [TAIZHOU / "taizhou_L7ETM_2000-03-17.tif",
                                              TAIZHOU / "taizhou_L7ETM_2003-02-06.tif"], taizhou_head,
                                             bands=[3, 2, 1])))
    with rasterio.open(run / "change_probability.tif") as p, rasterio.open(run / "change_binary.tif") as b:
        prob, binary = p.read(1), b.read(1)
    ok = binary != 255
    assert np.array_equal(binary[ok] == 1, prob[ok] > 0.5)  # two classes: arg-max ⇔ p(changed) > ½
    assert 0.005 < (binary[ok] == 1).mean() < 0.5
    g = gpd.read_file(run / "vectors.gpkg", layer="change_polygons")
    assert len(g) > 0 and set(g.class_value) == {1}
    assert abs(g.pixel_count.sum() - (binary == 1).sum()) == 0  # every changed pixel is in one polygon
    # a change head cannot run on one date
    one = _run_cfg(tmp_path, "aoi/taizhou.geojson", [TAIZHOU / "taizhou_L7ETM_2000-03-17.tif"], taizhou_head,
                   bands=[3, 2, 1])
    with pytest.raises(ConfigError, match="two rasters"):
        pl.run_local(parse_config(one))


def test_a_head_refuses_another_backbone_and_a_wrong_hash(floods_head, tmp_path) -> None:
    cfg = _run_cfg(tmp_path, "aoi/sen1floods11_spain.geojson", [FLOODS / "Spain_7370579_S2_B4B3B2.tif"],
                   floods_head)
    other = cfg | {"backbone": SHIPPED | {"checkpoint": None}}
    with pytest.raises(ConfigError, match="trained on checkpoint sha256"):
        pl.run_local(parse_config(other))
    bad = cfg | {"heads": cfg["heads"] | {"supervised": {"path": str(floods_head / HEAD_FILE),
                                                         "sha256": "0" * 64}}}
    with pytest.raises(CheckpointError, match="does not match"):
        pl.run_local(parse_config(bad))


def test_dpt_head_trains_on_several_layers(tmp_path) -> None:
    cfg = _head_cfg("floods", tmp_path, head={"type": "dpt", "hidden": 8}, max_tiles=24,
                    train={"epochs": 3, "lr": 1e-3, "eval_every": 4, "patience": 2})
    run = train_head_local(cfg)
    from geo_dino.models.seg_heads import load_head

    head, _, meta = load_head(run / HEAD_FILE)
    # depth 6: 4 hooks, k·6//4 − 1
    assert meta["head"]["type"] == "dpt" and meta["inputs"]["layers"] == [0, 2, 3, 5]
    assert head.in_channels == 4 * 192
    m = json.loads((run / METRICS).read_text())
    assert m["test"]["pixels"] > 0 and m["history"] and all(h["step"] % 4 == 0 or h is m["history"][-1]
                                                            for h in m["history"])
    # and over the whole chip in a run: the run hooks the head's four layers and writes its outputs
    out = pl.run_local(parse_config(_run_cfg(tmp_path, "aoi/sen1floods11_spain.geojson",
                                             [FLOODS / "Spain_7370579_S2_B4B3B2.tif"], run)))
    assert load_plan(out).head.layers == (0, 2, 3, 5)
    with rasterio.open(out / "seg_classes.tif") as c, rasterio.open(out / "seg_probability.tif") as pr:
        cls, prob = c.read(1), pr.read(1)
        assert c.crs is not None and c.nodata == 255
    ok = cls != 255
    assert ok.mean() > 0.9 and set(np.unique(cls[ok])) <= {0, 1}
    assert np.all((prob[ok] >= 0.5 - 1e-6) & (prob[ok] <= 1))
    assert json.loads((out / "provenance.json").read_text())["supervised_head"]["config"]["type"] == "dpt"


def test_hooked_layers_and_config_errors(tmp_path) -> None:
    assert hooked_layers("dpt", None, 12) == (2, 5, 8, 11)
    assert hooked_layers("linear", None, 12) == ()
    assert hooked_layers("linear", [-1, 3], 12) == (3, 11)
    with pytest.raises(ConfigError, match="blocks 0..5"):
        hooked_layers("dpt", [7], 6)
    base = {"rasters": [str(FLOODS / "Spain_7370579_S2_B4B3B2.tif")],
            "labels": {"raster": str(FLOODS / "Spain_7370579_LabelHand.tif"),
                       "classes": [{"name": "a", "value": 0}, {"name": "b", "value": 1}]}}
    with pytest.raises(ConfigError, match="exactly one"):
        parse_head_config(base | {"labels": base["labels"] | {"polygons": "x.geojson", "attribute": "c"}})
    with pytest.raises(ConfigError, match="labels.classes"):
        parse_head_config(base | {"labels": {"raster": "x.tif", "classes": [{"name": "a", "value": 0}]}})
    with pytest.raises(ConfigError, match="head.tpye"):
        parse_head_config(base | {"head": {"tpye": "dpt"}})
    # raw value -1 is in the file but not in the mapping: a clear error naming it, and no head is written
    cfg = _head_cfg("floods", tmp_path)
    cfg = cfg.model_copy(update={"labels": cfg.labels.model_copy(update={"mapping": {0: 0, 1: 1}})})
    with pytest.raises(Exception, match="-1"):
        train_head_local(cfg)
    assert not list((tmp_path / "heads").glob(f"*/{HEAD_FILE}"))


def test_polygon_labels_train_a_head(tmp_path) -> None:
    """Labels as polygons with a class attribute: rasterised onto the raster's grid in its CRS."""
    with rasterio.open(FLOODS / "Spain_7370579_LabelHand.tif") as src:
        lab = src.read(1)
        from rasterio.features import shapes

        polys = [{"geometry": g, "properties": {"cls": "water" if v == 1 else "not_water"}}
                 for g, v in shapes(lab.astype(np.int16), transform=src.transform) if v in (0, 1)]
    path = tmp_path / "labels.geojson"
    gpd.GeoDataFrame.from_features(polys, crs="EPSG:4326").to_file(path, driver="GeoJSON")
    cfg = _head_cfg("floods", tmp_path, labels={"raster": None, "mapping": None, "polygons": str(path),
                                               "attribute": "cls"},
                    sources={"allowed_roots": [str(ROOT / "data"), str(tmp_path)]})
    run = train_head_local(cfg)
    rec = json.loads((run / "provenance.json").read_text())
    assert rec["labels"]["attribute"] == "cls" and rec["labels"]["labelled_pixels"] > 200_000
    assert json.loads((run / METRICS).read_text())["test"]["per_class"]["water"]["iou"] > 0.45
    assert torch.is_grad_enabled()  # training leaves autograd on (inference_mode is scoped)
    shutil.rmtree(run)


def test_a_head_sees_every_band_and_refuses_other_bands_by_identity(taizhou_head, tmp_path) -> None:
    """The Taizhou change head: backbone bands 3,2,1, spectral part every band of both dates and their
    difference (18 channels). A run with the same *number* of bands in another order is refused."""
    from geo_dino.models.seg_heads import load_head

    head, _, meta = load_head(taizhou_head / HEAD_FILE)
    assert head.spectral == 18 and meta["head"]["spectral"] == 18
    bands = meta["inputs"]["bands"]
    assert [b["index"] for b in bands["backbone"]] == [3, 2, 1]
    assert [b["index"] for b in bands["spectral"]] == [1, 2, 3, 4, 5, 6]
    m = json.loads((taizhou_head / METRICS).read_text())
    assert m["spectral_start"]["pixels"] > 1000  # started as the logistic regression on the fit pixels
    assert m["history"][0]["step"] == 0  # ... and that start was measured like every later state
    pair = [TAIZHOU / "taizhou_L7ETM_2000-03-17.tif", TAIZHOU / "taizhou_L7ETM_2003-02-06.tif"]
    swapped = _run_cfg(tmp_path, "aoi/taizhou.geojson", pair, taizhou_head, bands=[1, 2, 3])
    want = r"backbone bands are \[3 \(B3 red\), 2 \(B2 green\), 1 \(B1 blue\)\]"
    with pytest.raises(ConfigError, match=want):
        pl.run_local(parse_config(swapped))
    narrow = _run_cfg(tmp_path, "aoi/taizhou.geojson", pair, taizhou_head, bands=[3, 2, 1])
    narrow["sources"]["spectral_bands"] = [1, 2, 3, 4, 5]
    with pytest.raises(ConfigError, match="spectral bands"):
        pl.run_local(parse_config(narrow))


def test_geographic_hold_out_by_halves_and_by_box(tmp_path) -> None:
    """split.method halves: every test tile lies in the eastern half, no fit tile touches one; box: the
    tiles meeting the box are the test part."""
    run = train_head_local(_head_cfg("floods", tmp_path, head={"type": "mlp"},
                                     split={"method": "halves", "axis": "east", "buffer": 1},
                                     train={"epochs": 3, "eval_every": 4, "patience": 2}))
    split = gpd.read_file(run / "split.gpkg")
    test = split[split.role == "test"]
    fit = split[split.role == "fit"]
    mid = (split.grid_col.min() + split.grid_col.max() + 1) / 2
    assert len(test) and (test.grid_col >= mid).all() and (fit.grid_col < mid - 1).all()
    assert test.geometry.centroid.x.min() > fit.geometry.centroid.x.max()  # east of every fit tile
    m = json.loads((run / METRICS).read_text())
    assert m["test"]["pixels"] > 0
    rec = json.loads((run / "provenance.json").read_text())
    assert rec["split"]["settings"]["method"] == "halves"
    with rasterio.open(FLOODS / "Spain_7370579_S2_B4B3B2.tif") as src:
        left, bottom, right, top = src.bounds
    box = (left, bottom, left + (right - left) / 4, bottom + (top - bottom) / 4)  # the south-west corner
    run2 = train_head_local(_head_cfg("floods", tmp_path, split={"method": "box", "test_box": list(box)},
                                      train={"epochs": 2, "eval_every": 4, "patience": 2}))
    split2 = gpd.read_file(run2 / "split.gpkg")
    from shapely.geometry import box as shp_box

    test2 = split2[split2.role == "test"]
    assert len(test2) and test2.geometry.intersects(shp_box(*box)).all()
    assert not split2[split2.role == "fit"].geometry.intersects(shp_box(*box)).any()
    with pytest.raises(ConfigError, match="test_box"):
        _head_cfg("floods", tmp_path, split={"method": "box"})


def test_head_alone_fills_in_backbone_checkpoint_and_bands(taizhou_head, tmp_path, monkeypatch) -> None:
    """`geo-dino change --head H` with no --arch/--checkpoint: the run takes the head's backbone, checkpoint
    (path and sha256) and bands, and succeeds; without them it would use another backbone and all bands."""
    from typer.testing import CliRunner

    from geo_dino.cli import app
    from geo_dino.run.heads import settings_from_head

    s = settings_from_head(taizhou_head / HEAD_FILE)
    assert s["backbone"]["arch"] == "vit_tiny_patch8_geo"
    assert s["backbone"]["checkpoint_sha256"] == json.loads(
        (taizhou_head / "provenance.json").read_text())["backbone"]["sha256"]
    assert s["sources"] == {"bands": [3, 2, 1], "spectral_bands": [1, 2, 3, 4, 5, 6]}
    monkeypatch.chdir(ROOT)  # the default allowed root is the working directory
    res = CliRunner().invoke(app, ["change", "--aoi", "aoi/taizhou.geojson",
                                   "--raster", str(TAIZHOU / "taizhou_L7ETM_2000-03-17.tif"),
                                   "--raster", str(TAIZHOU / "taizhou_L7ETM_2003-02-06.tif"),
                                   "--head", str(taizhou_head / HEAD_FILE), "--output-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "from the head: backbone vit_tiny_patch8_geo" in res.output
    run = next(p for p in tmp_path.iterdir() if (p / "provenance.json").is_file())
    rec = json.loads((run / "provenance.json").read_text())
    assert rec["status"] == "succeeded"
    assert rec["supervised_head"]["inputs"]["bands"]["backbone"][0]["index"] == 3
    assert (run / "change_probability.tif").is_file() and (run / "change_mask.tif").is_file()


def test_a_head_keeps_its_worst_test_tiles_and_test_region_for_the_deployment_record(taizhou_head,
                                                                                     tmp_path) -> None:
    """Failure examples: the worst test tiles as PNGs beside the head, named in its metadata and in a run's
    deployment record with the test region's bounds."""
    from PIL import Image

    from geo_dino.governance import deployment as dr

    m = json.loads((taizhou_head / METRICS).read_text())
    fails = m["failure_examples"]
    assert 1 <= len(fails) <= 4
    assert [f["error_rate"] for f in fails] == sorted((f["error_rate"] for f in fails), reverse=True)
    for f in fails:
        with Image.open(taizhou_head / f["png"]) as im:
            assert im.format == "PNG" and im.size[0] > im.size[1] > 0  # labels | prediction | errors
    run = pl.run_local(parse_config(_run_cfg(tmp_path, "aoi/taizhou.geojson",
                                             [TAIZHOU / "taizhou_L7ETM_2000-03-17.tif",
                                              TAIZHOU / "taizhou_L7ETM_2003-02-06.tif"], taizhou_head,
                                             bands=[3, 2, 1])))
    ev = json.loads((run / dr.JSON_FILE).read_text())["evaluation_boundary"]
    assert ev["failure_examples"]["status"] == "filled"
    assert all(Path(f["png"]).is_file() for f in ev["failure_examples"]["value"])
    region = ev["test_region"]["value"]
    w, s, e, n = region["bounds_4326"]
    assert 119.7 < w < e < 120.1 and 32.3 < s < n < 32.7 and region["tiles"] > 0  # Taizhou, China
