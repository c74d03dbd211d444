"""Backbone construction, safe checkpoint loading and the dense-feature interface (tiny architecture)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from geo_dino.config import PreprocessConfig
from geo_dino.errors import CheckpointError, ConfigError
from geo_dino.inputs.preprocess import make_preprocessor
from geo_dino.models.backbone import ARCHS, build_backbone, dense_features

ARCH = "vit_tiny_patch16_dinov3_test"


def _x(h=64, w=96, seed=0):
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_dense_features_shape_at_tile_size():
    model, spec = build_backbone(ARCH)
    f = dense_features(model, _x(64, 96))
    assert f.shape == (2, spec.embed_dim, 4, 6)
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        dense_features(model, _x(60, 96))


def test_register_tokens_never_read_as_patches():
    """Tokens are CLS, 4 registers, then patches: the features are tokens[5:], not tokens[1:1+N]."""
    model, spec = build_backbone(ARCH)
    assert model.num_prefix_tokens == 1 + spec.n_registers == 5
    x = _x(64, 64)
    with torch.inference_mode():
        tokens = model.forward_features(x)  # (B, 5 + N, C), final norm applied
    n = 4 * 4
    patches = tokens[:, 5:].reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
    wrong = tokens[:, 1:1 + n].reshape(2, 4, 4, -1).permute(0, 3, 1, 2)  # torchgeo 0.8.1 ChangeViT's slice
    f = dense_features(model, x)
    torch.testing.assert_close(f, patches, atol=1e-5, rtol=1e-5)
    assert (f - wrong).abs().max() > 1e-2


def test_random_init_is_seeded_and_recorded():
    m1, s1 = build_backbone(ARCH, seed=3)
    m2, _ = build_backbone(ARCH, seed=3)
    m3, _ = build_backbone(ARCH, seed=4)
    x = _x()
    assert torch.equal(dense_features(m1, x), dense_features(m2, x))
    assert not torch.equal(dense_features(m1, x), dense_features(m3, x))
    assert s1.source == "random-init" and s1.sha256 is None and s1.seed == 3


def _reference(tmp_path, fmt: str):
    ref, _ = build_backbone(ARCH, seed=7)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(state, str(path), metadata={"licence": "test-licence", "mean": "0.43,0.411,0.296",
                                               "std": "0.213,0.156,0.143"})
    else:
        path = tmp_path / "w.pth"
        torch.save({"model": state}, path)
    return ref, path


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_checkpoint_loads_and_matches_reference(tmp_path, fmt):
    import hashlib

    ref, path = _reference(tmp_path, fmt)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    model, spec = build_backbone(ARCH, checkpoint=path, checkpoint_sha256=digest, seed=999)
    x = _x()
    assert (dense_features(model, x) - dense_features(ref, x)).abs().max() <= 1e-5
    assert spec.sha256 == digest and spec.source == str(path) and spec.seed is None
    if fmt == "safetensors":
        assert spec.mean == (0.43, 0.411, 0.296) and spec.licence == "test-licence"


def test_checkpoint_hash_mismatch(tmp_path):
    _, path = _reference(tmp_path, "safetensors")
    with pytest.raises(CheckpointError, match="does not match"):
        build_backbone(ARCH, checkpoint=path, checkpoint_sha256="0" * 64)


def test_checkpoint_missing_is_never_downloaded(tmp_path):
    with pytest.raises(CheckpointError, match="never downloaded"):
        build_backbone(ARCH, checkpoint=tmp_path / "nope.safetensors")


@pytest.mark.parametrize("change", ["missing", "unexpected", "misshaped"])
def test_checkpoint_strict_keys(tmp_path, change):
    ref, _ = build_backbone(ARCH)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    key = "blocks.0.mlp.fc1.weight"
    if change == "missing":
        state.pop(key)
    elif change == "unexpected":
        state["head.extra"] = torch.zeros(3)
    else:
        state[key] = torch.zeros(5, 5)
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=f"1 {change}"):
        build_backbone(ARCH, checkpoint=path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_pickle_disguised_as_safetensors(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(pickle.dumps({"x": _Evil()}, protocol=2))
    with pytest.raises(CheckpointError, match="disguised|not a valid safetensors"):
        build_backbone(ARCH, checkpoint=path)


def test_malicious_pth_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"model": _Evil()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        build_backbone(ARCH, checkpoint=path)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_unknown_arch():
    with pytest.raises(ConfigError, match="unknown architecture"):
        build_backbone("vit_nonexistent")
    assert "vit_small_patch16_dinov3" in ARCHS


def test_preprocess_uint8_and_percentiles():
    data = np.array([[[0, 255], [128, 51]]] * 3, dtype=np.uint8)
    valid = np.array([[True, True], [True, False]])
    pre = make_preprocessor("uint8", (1, 2, 3), PreprocessConfig(), (0.5,) * 3, (0.25,) * 3)
    out = pre(data, valid)
    assert out.dtype == np.float32 and out.shape == (3, 2, 2)
    assert out[0, 0, 0] == pytest.approx(-2.0) and out[0, 0, 1] == pytest.approx(2.0)
    assert out[0, 1, 1] == 0.0  # invalid pixels sit at the mean
    stats = np.array([[100.0, 1100.0]] * 3)
    pre16 = make_preprocessor("uint16", (1, 2, 3), PreprocessConfig(), (0.0,) * 3, (1.0,) * 3, stats)
    x = pre16(np.full((3, 1, 1), 600, np.uint16), np.ones((1, 1), bool))
    assert x[0, 0, 0] == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="mean/std"):
        make_preprocessor("uint8", (1, 2), PreprocessConfig(), (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(ConfigError, match="value_range"):
        make_preprocessor("uint16", (1,), PreprocessConfig(scale="range"), (0.5,), (0.25,))


def test_dinov3_weights_need_licence_acceptance(tmp_path):
    from geo_dino.errors import LicenceError

    ref, _ = build_backbone("vit_small_patch16_dinov3", seed=1)
    path = tmp_path / "dinov3_vits16.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    with pytest.raises(LicenceError, match="accept_licence"):
        build_backbone("vit_small_patch16_dinov3", checkpoint=path)
    with pytest.raises(LicenceError):
        build_backbone("vit_small_patch16_dinov3", checkpoint=path, accept_licence="yes")
    model, spec = build_backbone("vit_small_patch16_dinov3", checkpoint=path, accept_licence="DINOv3 License")
    assert spec.licence == "DINOv3 License"
    _, rand = build_backbone("vit_small_patch16_dinov3")  # random weights: nothing to accept
    assert rand.source == "random-init"


def test_metadata_never_lifts_the_dinov3_licence(tmp_path):
    """A DINOv3 file re-saved with ``licence: Apache-2.0`` in its metadata stays gated; so does one whose
    lineage starts from other weights or that is in the official layout. Only weights geo_dino pretrained
    from scratch keep their own licence; a gated licence in metadata gates any architecture."""
    from geo_dino.errors import LicenceError
    from geo_dino.models.backbone import effective_licence

    ref, _ = build_backbone("vit_small_patch16_dinov3", seed=1)
    path = tmp_path / "relabelled.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path),
              metadata={"licence": "Apache-2.0"})
    with pytest.raises(LicenceError, match="DINOv3 License"):
        build_backbone("vit_small_patch16_dinov3", checkpoint=path)
    own = {"licence": "Apache-2.0", "producer": "geo_dino 0.1.0",
           "training_lineage": "DINO pretraining by geo_dino 0.1.0 for 10 steps on 1 raster(s) (a.tif), "
                               "from random initialisation"}
    arch = "vit_small_patch16_dinov3"
    assert effective_licence(arch, own) == "Apache-2.0"  # our own weights, from scratch
    continued = own | {"training_lineage": own["training_lineage"].replace(
        "from random initialisation", "continued from /w/dinov3_vits16.pth (sha256 ab)")}
    assert effective_licence(arch, continued) == "DINOv3 License"  # started from DINOv3 weights
    assert effective_licence(arch, own, layout="official") == "DINOv3 License"  # Meta's own file
    assert effective_licence(arch, own | {"producer": "someone"}) == "DINOv3 License"
    assert effective_licence("dino_vits16", {"licence": "DINOv3 License"}) == "DINOv3 License"  # adds
    assert effective_licence("dino_vits16", {}) == "Apache-2.0"
    model, spec = build_backbone(arch, checkpoint=path, accept_licence="DINOv3 License")
    assert spec.licence == "DINOv3 License"


@pytest.mark.parametrize("arch", [ARCH, "dino_vits16"])
def test_feature_api_dense_global_layers(arch):
    from geo_dino.models.backbone import extract

    model, spec = build_backbone(arch)
    if hasattr(model.blocks[0], "gamma_1") and model.blocks[0].gamma_1 is not None:
        with torch.no_grad():
            for b in model.blocks:
                b.gamma_1.fill_(1.0)
                b.gamma_2.fill_(1.0)
    x = _x(32, 48)
    out = extract(model, x, layers=(0, -1))
    depth = len(model.blocks)
    assert out.dense.shape == (2, spec.embed_dim, 2, 3) and out.global_.shape == (2, spec.embed_dim)
    assert set(out.layers) == {0, depth - 1}
    torch.testing.assert_close(out.layers[depth - 1], out.dense)  # the last block's map is the dense map
    assert (out.layers[0] - out.dense).abs().max() > 1e-3  # an earlier block differs
    with torch.inference_mode():
        tokens = model.forward_features(x)
    torch.testing.assert_close(out.global_, tokens[:, 0], atol=1e-5, rtol=1e-5)  # CLS, after the norm
    torch.testing.assert_close(out.dense, dense_features(model, x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="do not exist"):
        extract(model, x, layers=(depth,))


def test_multispectral_patch_embedding_adaptation():
    model, spec = build_backbone(ARCH, in_chans=4)
    assert spec.in_chans == 4 and "3 to 4 bands" in spec.adaptation
    assert model.patch_embed.proj.weight.shape[1] == 4
    rgb, _ = build_backbone(ARCH)
    w3, w4 = rgb.patch_embed.proj.weight, model.patch_embed.proj.weight
    torch.testing.assert_close(w4[:, 3], w3[:, 0] * 3 / 4)  # the 4th band reuses the first filter, rescaled
    f = dense_features(model, torch.randn(1, 4, 32, 32))
    assert f.shape == (1, spec.embed_dim, 2, 2)


def test_old_torch_refuses_pth(tmp_path, monkeypatch):
    _, path = _reference(tmp_path, "pth")
    monkeypatch.setattr(torch, "__version__", "2.9.1")
    with pytest.raises(CheckpointError, match="older than 2.10"):
        build_backbone(ARCH, checkpoint=path)
