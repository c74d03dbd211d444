"""The backbone shipped in models/: pinned by the demo configs, described by its model card, loaded without a
licence acceptance, and better than its own architecture random-initialised (and than raw pixels) on the
bundled EuroSAT images — the property that makes the demo's label-free outputs meaningful."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from geo_dino.evaluation.probes import (
    backbone_features,
    knn_eval,
    load_labelled,
    pixel_features,
    prepare_images,
)
from geo_dino.files import sha256_file
from geo_dino.models.backbone import build_backbone

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models/vit_tiny_patch8_geo.safetensors"


def test_demo_configs_pin_the_shipped_file_and_its_card_agrees() -> None:
    digest = sha256_file(MODEL)
    card = json.loads((ROOT / "models/vit_tiny_patch8_geo.json").read_text())
    assert card["model"]["sha256"] == digest
    assert card["model"]["licence"] == "Apache-2.0"
    assert MODEL.stat().st_size < 25 * 2**20
    for name in ("demo.yaml", "demo_change.yaml"):
        cfg = yaml.safe_load((ROOT / "configs" / name).read_text())
        assert cfg["backbone"]["checkpoint"] == "models/vit_tiny_patch8_geo.safetensors"
        assert cfg["backbone"]["checkpoint_sha256"] == digest
        assert cfg["backbone"]["arch"] == card["model"]["arch"] == "vit_tiny_patch8_geo"
    model, spec = build_backbone("vit_tiny_patch8_geo", checkpoint=MODEL, checkpoint_sha256=digest)
    assert spec.licence == "Apache-2.0" and spec.layout == "timm" and spec.in_chans == 3
    assert "DINO pretraining by geo_dino" in spec.training_lineage


def test_shipped_backbone_beats_random_init_and_raw_pixels_on_eurosat_mini() -> None:
    prep = prepare_images(load_labelled(ROOT / "data/eurosat_mini/labels.csv"), patch_size=8)
    ours = knn_eval(backbone_features(prep, arch="vit_tiny_patch8_geo", checkpoint=MODEL)).top1
    rand = knn_eval(backbone_features(prep, arch="vit_tiny_patch8_geo", seed=0)).top1
    raw = knn_eval(pixel_features(prep)).top1
    assert ours > rand + 0.2, (ours, rand)
    assert ours > raw + 0.1, (ours, raw)


RGBN = ROOT / "models/vit_tiny_patch8_geo_rgbn.safetensors"


def test_the_multispectral_backbone_takes_four_bands_and_runs_on_naip(tmp_path) -> None:
    """The shipped four-band backbone (red, green, blue, near-infrared): its card agrees with the file, it
    loads with four input bands and its own normalisation, and a run reads all four bands of a NAIP date."""
    from geo_dino.config import parse_config
    from geo_dino.run.stages import run_local

    digest = sha256_file(RGBN)
    card = json.loads((ROOT / "models/vit_tiny_patch8_geo_rgbn.json").read_text())
    assert card["model"]["sha256"] == digest and card["model"]["in_chans"] == 4
    assert (ROOT / "models/vit_tiny_patch8_geo_rgbn.md").read_text().count(digest) == 1
    model, spec = build_backbone("vit_tiny_patch8_geo", checkpoint=RGBN, checkpoint_sha256=digest)
    assert spec.in_chans == 4 and spec.bands == ("red", "green", "blue", "nir")
    assert len(spec.mean) == len(spec.std) == 4 and spec.licence == "Apache-2.0"
    assert model.patch_embed.proj.weight.shape[1] == 4
    naip = ROOT / "data/rasters/naip/m_4709963_se_14_1_20200831.tif"
    cfg = {"name": "rgbn", "aoi": str(ROOT / "aoi/naip_potholes.geojson"), "rasters": [str(naip)],
           "output_dir": str(tmp_path),
           "sources": {"allowed_roots": [str(ROOT / "data")], "bands": [1, 2, 3, 4]},
           "screening": {"registry": str(ROOT / "data/registry/sensitive_sites.gpkg"),
                         "policy": str(ROOT / "configs/screening_policy.yaml")},
           "backbone": {"arch": "vit_tiny_patch8_geo", "checkpoint": str(RGBN), "checkpoint_sha256": digest},
           "tiling": {"size": 128, "overlap": 32}, "heads": {"kmeans": {"k": 4, "fit_tiles": 8}}}
    run = run_local(parse_config(cfg))
    rec = json.loads((run / "provenance.json").read_text())
    assert rec["status"] == "succeeded" and rec["backbone"]["in_chans"] == 4
    mapping = rec["preprocessing"]["band_mapping"]
    assert [(b["source_band"], b["backbone_band"]) for b in mapping] == [(1, "red"), (2, "green"),
                                                                         (3, "blue"), (4, "nir")]
    assert (run / "classes.tif").is_file()


HEAD = ROOT / "models/taizhou_change_mlp.safetensors"


@pytest.mark.slow
def test_the_shipped_change_head_runs_in_the_demo_config(tmp_path, monkeypatch) -> None:
    """The shipped Taizhou change head: its card pins its bytes, it records its bands and the shipped
    backbone, and the demo config that uses it runs: the head's change beside the fused label-free change."""
    from geo_dino.config import load_config
    from geo_dino.models.seg_heads import load_head
    from geo_dino.run.heads import settings_from_head
    from geo_dino.run.stages import run_local

    digest = sha256_file(HEAD)
    assert digest in (ROOT / "models/taizhou_change_mlp.md").read_text()
    head, table, meta = load_head(HEAD)
    assert meta["head"]["type"] == "mlp" and head.spectral == 18 and table.names == ("unchanged", "changed")
    assert meta["backbone"]["sha256"] == sha256_file(MODEL)
    assert meta["metrics"]["test"]["per_class"]["changed"]["f1"] > 0.8
    monkeypatch.chdir(ROOT)
    s = settings_from_head(HEAD)
    # found where it was trained, or else in ./models (a fresh clone elsewhere): the same bytes either way
    found = sha256_file(Path(s["backbone"]["checkpoint"]))
    assert found == s["backbone"]["checkpoint_sha256"] == sha256_file(MODEL)
    assert s["sources"]["bands"] == [3, 2, 1]
    cfg = load_config(ROOT / "configs/demo_taizhou_change.yaml", {"output_dir": str(tmp_path)})
    assert cfg.heads.change.method == "fused" and cfg.heads.supervised is not None
    run = run_local(cfg)
    rec = json.loads((run / "provenance.json").read_text())
    assert rec["status"] == "succeeded" and rec["supervised_head"]["sha256"] == digest
    assert rec["change"]["method"] == "fused" and rec["change"]["spectral"]["bands"] == 6
    for name in ("change_probability", "change_binary", "change_magnitude", "change_mask", "change_spectral"):
        assert (run / f"{name}.tif").is_file(), name


def test_a_head_finds_its_backbone_beside_it_or_in_models(tmp_path, monkeypatch) -> None:
    """The path a head recorded for its backbone is gone (another machine): the file of that name beside the
    head, else in ./models, is used (its sha256 is pinned); with neither, a clear refusal."""
    from geo_dino.errors import ConfigError
    from geo_dino.models.seg_heads import load_head, save_head
    from geo_dino.run.heads import settings_from_head

    head, table, meta = load_head(HEAD)
    moved = dict(meta["backbone"], source="/nowhere/vit_tiny_patch8_geo.safetensors")
    path = save_head(tmp_path / "h.safetensors", head, table, backbone_spec=moved,
                     preprocessing=meta["preprocessing"], metrics=meta["metrics"], inputs=meta["inputs"],
                     lineage=meta["lineage"])
    monkeypatch.chdir(tmp_path)  # no ./models here, nothing beside the head: refused with the fix
    with pytest.raises(ConfigError, match="give --checkpoint"):
        settings_from_head(path)
    monkeypatch.chdir(ROOT)  # ./models holds a file of that name
    s = settings_from_head(path)
    assert Path(s["backbone"]["checkpoint"]).resolve() == MODEL.resolve()
    (tmp_path / "beside").mkdir()
    import shutil

    shutil.copy(path, tmp_path / "beside" / "h.safetensors")
    shutil.copy(MODEL, tmp_path / "beside" / MODEL.name)
    s2 = settings_from_head(tmp_path / "beside" / "h.safetensors")  # beside the head comes first
    assert Path(s2["backbone"]["checkpoint"]).resolve() == (tmp_path / "beside" / MODEL.name).resolve()
