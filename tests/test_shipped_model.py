"""The backbone shipped in models/: pinned by the demo configs, described by its model card, loaded without a
licence acceptance, and better than its own architecture random-initialised (and than raw pixels) on the
bundled EuroSAT images — the property that makes the demo's label-free outputs meaningful."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from geo_dino.backbone import build_backbone, sha256_of
from geo_dino.evaluation import backbone_features, knn_eval, load_labelled, pixel_features, prepare_images

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models/vit_tiny_patch8_geo.safetensors"


def test_demo_configs_pin_the_shipped_file_and_its_card_agrees() -> None:
    digest = sha256_of(MODEL)
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
