"""Checkpoint layouts: Hugging Face, official (Meta) and timm files load into the same features.

The reference is transformers' own ``DINOv3ViTModel`` with random weights: its file (HF layout) and the same
weights under the official DINOv3 names must both give its forward pass (fp32, max abs diff ≤ 1e-4).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from geo_dino.errors import CheckpointError
from geo_dino.models.backbone import build_backbone
from geo_dino.models.checkpoints import detect_layout, inspect_state

ARCH = "vit_tiny_patch16_dinov3_test"  # 48 wide, 2 blocks, 2 heads, 4 registers, RoPE, patch 16

transformers = pytest.importorskip("transformers")


def _hf_model():
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    cfg = DINOv3ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=192,
                          num_register_tokens=4, patch_size=16, image_size=64, layerscale_value=1.0)
    torch.manual_seed(0)
    m = DINOv3ViTModel(cfg).eval()
    with torch.no_grad():  # every tensor random and non-trivial (biases, layer scales, tokens)
        for name, p in m.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "attention.k_proj.bias" not in name:
                p.copy_(0.2 * torch.randn_like(p))
    return m


def _hf_forward(m, x):
    with torch.inference_mode():
        return m(pixel_values=x).last_hidden_state


def _official_from_hf(sd: dict) -> dict:
    """The same weights under the official DINOv3 repository's names (dinov3/models/vision_transformer.py)."""
    out = {"cls_token": sd["embeddings.cls_token"], "storage_tokens": sd["embeddings.register_tokens"],
           "mask_token": torch.zeros(1, sd["embeddings.cls_token"].shape[-1]),
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"],
           "rope_embed.periods": torch.ones(6), "norm.weight": sd["norm.weight"],
           "norm.bias": sd["norm.bias"]}
    for i in range(2):
        h = f"model.layer.{i}." if f"model.layer.{i}.norm1.weight" in sd else f"layer.{i}."
        b = f"blocks.{i}."
        q, k, v = (sd[h + f"attention.{n}_proj.weight"] for n in "qkv")
        out[b + "attn.qkv.weight"] = torch.cat([q, k, v])
        out[b + "attn.qkv.bias"] = torch.cat([sd[h + "attention.q_proj.bias"], torch.zeros(48),
                                              sd[h + "attention.v_proj.bias"]])
        out[b + "attn.qkv.bias_mask"] = torch.cat([torch.ones(48), torch.zeros(48), torch.ones(48)])
        for src, dst in (("norm1", "norm1"), ("norm2", "norm2"), ("attention.o_proj", "attn.proj"),
                         ("mlp.up_proj", "mlp.fc1"), ("mlp.down_proj", "mlp.fc2")):
            out[b + dst + ".weight"] = sd[h + src + ".weight"]
            out[b + dst + ".bias"] = sd[h + src + ".bias"]
        out[b + "ls1.gamma"] = sd[h + "layer_scale1.lambda1"]
        out[b + "ls2.gamma"] = sd[h + "layer_scale2.lambda1"]
    return {k: v.contiguous().clone() for k, v in out.items()}


@pytest.fixture(scope="module")
def hf():
    return _hf_model()


def test_hf_layout_matches_transformers_forward(hf, tmp_path):
    path = tmp_path / "hf.safetensors"
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path))
    model, spec = build_backbone(ARCH, checkpoint=path)
    assert spec.layout == "hf"
    x = torch.randn(2, 3, 64, 96)
    want = _hf_forward(hf, x)
    with torch.inference_mode():
        got = model.forward_features(x)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-4


def test_official_layout_matches_transformers_forward(hf, tmp_path):
    path = tmp_path / "dinov3_official.pth"
    torch.save(_official_from_hf(hf.state_dict()), path)
    model, spec = build_backbone(ARCH, checkpoint=path)
    assert spec.layout == "official"
    x = torch.randn(2, 3, 48, 80)
    with torch.inference_mode():
        got = model.forward_features(x)
    assert (got - _hf_forward(hf, x)).abs().max() <= 1e-4


def test_timm_layout_round_trip(hf, tmp_path):
    """A file saved from the loaded (timm) model loads again and gives the same features."""
    src = tmp_path / "hf.safetensors"
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(src))
    model, _ = build_backbone(ARCH, checkpoint=src)
    dst = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dst))
    again, spec = build_backbone(ARCH, checkpoint=dst)
    assert spec.layout == "timm"
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(again.forward_features(x), model.forward_features(x))


def test_inspect_facts_per_layout(hf):
    sd = hf.state_dict()
    for state, layout in ((sd, "hf"), (_official_from_hf(sd), "official")):
        d = inspect_state(state)
        assert (d.layout, d.family, d.embed_dim, d.depth, d.patch_size, d.n_registers, d.mlp, d.qkv_bias) == \
            (layout, "dinov3", 48, 2, 16, 4, "mlp", True)


def test_unknown_layout_and_wrong_architecture(hf, tmp_path):
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        detect_layout({"encoder.weight": torch.zeros(3)})
    path = tmp_path / "hf.safetensors"
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="another architecture.*embed_dim 48"):
        build_backbone("vit_small_patch16_dinov3", checkpoint=path, accept_licence="DINOv3 License")


def test_file_name_plays_no_part(hf, tmp_path):
    """The official loader needs 'eadcf0ff' in a SAT ViT-L file name; here the name is irrelevant."""
    a = tmp_path / "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth"
    b = tmp_path / "weights.bin.pth"
    state = _official_from_hf(hf.state_dict())
    torch.save(state, a)
    torch.save(state, b)
    x = torch.randn(1, 3, 32, 32)
    ma, sa = build_backbone(ARCH, checkpoint=a)
    mb, sb = build_backbone(ARCH, checkpoint=b)
    with torch.inference_mode():
        assert torch.equal(ma.forward_features(x), mb.forward_features(x))
    assert sa.layout == sb.layout == "official"


def test_cli_inspect_and_convert(hf, tmp_path):
    import json

    from typer.testing import CliRunner

    from geo_dino.cli import app

    runner = CliRunner()
    src = tmp_path / "official.pth"
    torch.save(_official_from_hf(hf.state_dict()), src)
    res = runner.invoke(app, ["checkpoint", "inspect", str(src)])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["layout"] == "official" and info["embed_dim"] == 48 and info["registers"] == 4
    assert len(info["sha256"]) == 64 and info["architectures"] == []  # 48 wide: only the test architecture
    out = tmp_path / "converted.safetensors"
    res = runner.invoke(app, ["checkpoint", "convert", str(src), str(out), "--arch", ARCH])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "converted.safetensors.json").read_text())
    assert rec["source_layout"] == "official" and rec["arch"] == ARCH and rec["sha256"]
    model, spec = build_backbone(ARCH, checkpoint=out)
    assert spec.layout == "timm"
    x = torch.randn(1, 3, 32, 48)
    with torch.inference_mode():
        assert (model.forward_features(x) - _hf_forward(hf, x)).abs().max() <= 1e-4
    res = runner.invoke(app, ["checkpoint", "convert", str(src), str(tmp_path / "x.safetensors")])
    assert res.exit_code == 2 and "--arch" in res.output
    bad = tmp_path / "fake.safetensors"
    bad.write_bytes(b"\x80\x02}q\x00.")
    res = runner.invoke(app, ["checkpoint", "inspect", str(bad)])
    assert res.exit_code == 2 and "disguised" in res.output


def test_inspect_real_vit_l_shapes_fit_web_and_sat(tmp_path):
    """A ViT-L/16 DINOv3 file fits both the web and the SAT-493M entries: the tensors cannot tell them apart,
    so the user names the entry (and with it the preprocessing); the file name is never used."""
    import timm

    from geo_dino.models.checkpoints import fitting_archs

    with torch.device("meta"):
        m = timm.create_model("vit_large_patch16_dinov3", pretrained=False, num_classes=0)
    state = {k: torch.empty(v.shape) for k, v in m.state_dict().items()}
    assert set(fitting_archs(inspect_state(state))) == {"vit_large_patch16_dinov3",
                                                         "vit_large_patch16_dinov3_sat"}


def _hf_dinov2(registers: bool):
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    kw = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4, patch_size=14,
              image_size=56, layerscale_value=1.0)
    torch.manual_seed(1)
    m = (Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **kw)) if registers
         else Dinov2Model(Dinov2Config(**kw))).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("registers", [False, True])
def test_dinov2_hf_and_official_layouts_match_transformers(tmp_path, registers):
    from geo_dino.models.checkpoints import _hf_dinov2_to_official

    hf = _hf_dinov2(registers)
    arch = "vit_tiny_patch14_reg4_dinov2_test" if registers else "vit_tiny_patch14_dinov2_test"
    x = torch.randn(2, 3, 56, 56)  # the checkpoint's native grid: no position interpolation on either side
    want = _hf_forward(hf, x)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    hf_path = tmp_path / "dinov2_hf.safetensors"
    save_file(sd, str(hf_path))
    off_path = tmp_path / "dinov2_official.pth"
    torch.save(_hf_dinov2_to_official(dict(sd)), off_path)
    for path, layout in ((hf_path, "hf"), (off_path, "official")):
        model, spec = build_backbone(arch, checkpoint=path)
        assert spec.layout == layout
        d = inspect_state(dict(torch.load(off_path, weights_only=True)) if layout == "official" else sd)
        assert (d.family, d.n_registers, d.pos_grid) == ("dinov2", 4 if registers else 0, 4)
        with torch.inference_mode():
            got = model.forward_features(x)
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-4, layout


def test_dino_v1_layout(tmp_path):
    """DINO's official names are timm's own: a DINO ViT-S/16 file loads with its family and grid detected."""
    ref, _ = build_backbone("dino_vits16", seed=3)
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    d = inspect_state(torch.load(path, weights_only=True))
    assert (d.family, d.embed_dim, d.depth, d.patch_size, d.n_registers, d.pos_grid) == (
        "dino", 384, 12, 16, 0, 14)
    model, spec = build_backbone("dino_vits16", checkpoint=path)
    x = torch.randn(1, 3, 64, 48)
    with torch.inference_mode():
        assert torch.equal(model.forward_features(x), ref.forward_features(x))
    with pytest.raises(CheckpointError, match="another architecture"):
        build_backbone("dinov2_vits14", checkpoint=path)


def test_dinov2_block_chunked_official_keys_load_like_flat_ones(tmp_path):
    """DINOv2 ViT-g official checkpoints from chunked training name blocks ``blocks.<chunk>.<i>.``; they load
    into the same model as the flat names (checked on the tiny DINOv2 architecture, 2 blocks in 2 chunks)."""
    import re

    from geo_dino.models.checkpoints import _hf_dinov2_to_official

    sd = {k: v.contiguous() for k, v in _hf_dinov2(False).state_dict().items()}
    flat = _hf_dinov2_to_official(dict(sd))
    chunked = {re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{m.group(1)}.{m.group(1)}.", k): v
               for k, v in flat.items()}
    assert (any(k.startswith("blocks.1.1.") for k in chunked)
            and not any(k.startswith("blocks.1.norm1") for k in chunked))
    torch.save(flat, tmp_path / "flat.pth")
    torch.save(chunked, tmp_path / "chunked.pth")
    a, _ = build_backbone("vit_tiny_patch14_dinov2_test", checkpoint=tmp_path / "flat.pth")
    b, spec = build_backbone("vit_tiny_patch14_dinov2_test", checkpoint=tmp_path / "chunked.pth")
    assert spec.layout == "official"
    x = torch.randn(1, 3, 56, 56)
    with torch.inference_mode():
        assert torch.equal(a.forward_features(x), b.forward_features(x))
