"""The backbone registry: every entry builds in timm with the metadata it claims (on the meta device)."""

from __future__ import annotations

import pytest
import timm
import torch

from geo_dino.models.archs import ARCHS, DINOV3_LICENCE, SAT493M_MEAN, SAT493M_STD
from geo_dino.models.backbone import build_backbone, dense_features

REQUIRED = {"dino_vits16", "dino_vits8", "dino_vitb16", "dino_vitb8",
            "dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14",
            "dinov2_vits14_reg", "dinov2_vitb14_reg", "dinov2_vitl14_reg", "dinov2_vitg14_reg",
            "vit_small_patch16_dinov3", "vit_small_plus_patch16_dinov3", "vit_base_patch16_dinov3",
            "vit_large_patch16_dinov3", "vit_huge_plus_patch16_dinov3", "vit_7b_patch16_dinov3",
            "vit_large_patch16_dinov3_sat", "vit_7b_patch16_dinov3_sat", "vit_tiny_patch16_dinov3_test"}


def test_registry_covers_the_families():
    assert REQUIRED <= set(ARCHS)


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_entry_matches_the_built_model(name):
    a = ARCHS[name]
    with torch.device("meta"):
        m = timm.create_model(a.timm_name, pretrained=False, num_classes=0, **a.timm_kwargs())
    assert m.embed_dim == a.embed_dim
    assert len(m.blocks) == a.depth
    assert m.blocks[0].attn.num_heads == a.num_heads
    assert m.patch_embed.patch_size == (a.patch_size, a.patch_size)
    assert m.num_prefix_tokens == 1 + a.n_registers
    mlp = type(m.blocks[0].mlp).__name__
    assert (mlp in ("SwiGLU", "GluMlp")) == (a.mlp == "swiglu"), mlp
    assert (getattr(m, "rope", None) is not None) == a.rope
    if a.family in ("dino", "dinov2"):
        assert a.licence == "Apache-2.0" and not a.gated
    if a.family == "dinov3":
        assert a.gated and a.licence == DINOV3_LICENCE


def test_sat_entries_carry_satellite_preprocessing():
    for name in ("vit_large_patch16_dinov3_sat", "vit_7b_patch16_dinov3_sat"):
        a = ARCHS[name]
        assert a.mean == SAT493M_MEAN == (0.430, 0.411, 0.296)
        assert a.std == SAT493M_STD == (0.213, 0.156, 0.143)
        assert a.gsd_m == 0.6
    assert ARCHS["vit_large_patch16_dinov3"].mean == (0.485, 0.456, 0.406)


@pytest.mark.parametrize(("name", "size"), [("dino_vits16", 64), ("dinov2_vits14_reg", 56)])
def test_other_families_give_dense_features(name, size):
    model, spec = build_backbone(name)
    f = dense_features(model, torch.randn(1, 3, size, 2 * size))
    p = spec.patch_size
    assert f.shape == (1, spec.embed_dim, size // p, 2 * size // p)
    with torch.inference_mode():
        tokens = model.forward_features(torch.randn(1, 3, size, size))
    assert tokens.shape[1] == 1 + spec.n_registers + (size // p) ** 2
