"""FusedRopeViT gives timm's DINOv3 features exactly, for every layout timm uses."""

from __future__ import annotations

import pytest
import timm
import torch

from geo_dino.models.backbone import dense_features
from geo_dino.models.fast_vit import FusedRopeViT


def _model(name: str, **kw):
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, **kw).eval()
    with torch.no_grad():  # layer scale 1 and non-zero biases, so every path matters
        for b in m.blocks:
            b.gamma_1.fill_(1.0)
            b.gamma_2.fill_(1.0)
            if b.attn.q_bias is not None:
                b.attn.q_bias.normal_()
                b.attn.v_bias.normal_()
    return m


SMALL = {"embed_dim": 64, "depth": 2, "num_heads": 2}


@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3", "vit_small_patch16_dinov3_qkvb",
                                  "vit_small_plus_patch16_dinov3"])
@pytest.mark.parametrize("size", [(64, 96), (48, 48)])
def test_fused_equals_timm(name, size):
    m = _model(name, **SMALL)
    f = FusedRopeViT(m)
    x = torch.randn(2, 3, *size)
    with torch.inference_mode():
        want = m.forward_features(x)
        got = f.forward_features(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert want.abs().mean() > 0.1


def test_interleaved_rotation_layout_too():
    """timm also builds DINOv3-like models with the interleaved rotation; the wrapper follows the flag."""
    m = _model("vit_small_patch16_dinov3", rope_rotate_half=False, **SMALL)
    assert FusedRopeViT(m).rotate_half is False
    cast = FusedRopeViT(_model("vit_small_patch16_dinov3", rope_rotate_half=False, **SMALL)).half()
    assert next(cast.parameters()).dtype == torch.float16  # nn.Module's fp16 cast is not shadowed
    x = torch.randn(1, 3, 32, 48)
    with torch.inference_mode():
        torch.testing.assert_close(FusedRopeViT(m).forward_features(x), m.forward_features(x),
                                   atol=1e-5, rtol=1e-5)


def test_pipeline_dense_features_use_it():
    m = _model("vit_small_patch16_dinov3", **SMALL)
    x = torch.randn(2, 3, 32, 64)
    f = dense_features(m, x)
    assert "_geo_dino_fused" in m.__dict__
    assert "_geo_dino_fused" not in dict(m.named_modules()) and not any("fused" in k for k in m.state_dict())
    with torch.inference_mode():
        tokens = m.forward_features(x)[:, m.num_prefix_tokens:]
    torch.testing.assert_close(f, tokens.transpose(1, 2).reshape(2, 64, 2, 4), atol=1e-5, rtol=1e-5)


def test_refuses_models_without_rope():
    plain = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **SMALL)
    with pytest.raises(TypeError, match="RoPE"):
        FusedRopeViT(plain)
