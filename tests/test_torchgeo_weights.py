"""torchgeo's Sentinel-2 ViT-S/16 weights (SSL4EO-S12, DINO and MoCo v3) from a local file.

The published files cannot be fetched here, so each test writes random weights in their layout: the
``state_dict`` of timm's ``vit_small_patch16_224`` with 13 input bands (how torchgeo builds the model,
``torchgeo.models.vit_small_patch16_224``), saved with ``torch.save``, with or without timm's classifier head.
The loaded model must give the features of that timm model itself; the registry must agree with the installed
torchgeo's weight metadata and transforms.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil

import numpy as np
import pytest
import timm
import torch

from geo_dino.config import PreprocessConfig
from geo_dino.errors import CheckpointError, ConfigError
from geo_dino.inputs.preprocess import make_preprocessor
from geo_dino.models.archs import (
    ARCHS,
    SENTINEL2_BANDS,
    SENTINEL2_DN_RANGE,
    SSL4EO_S12_LICENCE,
)
from geo_dino.models.backbone import build_backbone, extract
from geo_dino.models.checkpoints import identify_published, inspect_file

DINO, MOCO = "torchgeo_vits16_s2_dino", "torchgeo_vits16_s2_moco"
TORCHGEO_NAMES = {DINO: "SENTINEL2_ALL_DINO", MOCO: "SENTINEL2_ALL_MOCO"}

torch.set_num_threads(1)


def _timm_vit(seed: int, head: bool):
    """timm's ViT-S/16 with 13 bands as torchgeo builds it, every tensor random (biases, norms included)."""
    torch.manual_seed(seed)
    m = timm.create_model("vit_small_patch16_224", pretrained=False, in_chans=13,
                          **({} if head else {"num_classes": 0})).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def reference():
    return _timm_vit(seed=0, head=False)


def _save(state: dict, path):
    torch.save({k: v.detach().clone() for k, v in state.items()}, path)
    return path


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("arch", [DINO, MOCO])
def test_registry_entries_carry_torchgeo_preprocessing(arch):
    a = ARCHS[arch]
    assert a.family == ("dino" if arch == DINO else "moco")
    assert (a.in_chans, a.patch_size, a.embed_dim, a.depth, a.n_registers) == (13, 16, 384, 12, 0)
    assert a.bands == SENTINEL2_BANDS and len(a.bands) == 13 and a.bands[8] == "B8a"
    assert a.licence == SSL4EO_S12_LICENCE == "CC-BY-4.0" and not a.gated
    assert a.gsd_m == 10.0
    assert "SSL4EO-S12" in a.training_data and "Wang et al. 2022" in a.training_data
    assert a.value_range == SENTINEL2_DN_RANGE == (0.0, 65535.0)
    # in geo_dino's convention ([0, 1] over value_range, then (x - mean) / std) the scaling is x / 10000
    for dn in (0.0, 1234.0, 10000.0, 65535.0):
        x01 = (dn - a.value_range[0]) / (a.value_range[1] - a.value_range[0])
        assert all((x01 - m) / s == pytest.approx(dn / 10000, rel=1e-12) for m, s in zip(a.mean, a.std,
                                                                                          strict=True))
    w = a.published
    assert w is not None and w.publisher == "torchgeo" and w.name.endswith(TORCHGEO_NAMES[arch])
    assert len(w.sha256) == 64 and w.hash_prefix == w.sha256[:8]  # torch.hub's hash-prefix convention
    with torch.device("meta"):
        m = timm.create_model(a.timm_name, pretrained=False, num_classes=0, **a.timm_kwargs())
    assert m.patch_embed.proj.in_channels == 13 and m.num_prefix_tokens == 1


@pytest.mark.parametrize("arch", [DINO, MOCO])
def test_registry_agrees_with_installed_torchgeo(arch):
    models = pytest.importorskip("torchgeo.models")
    from torchvision.transforms import v2

    weights = getattr(models.ViTSmall16_Weights, TORCHGEO_NAMES[arch])
    a = ARCHS[arch]
    assert weights.meta["in_chans"] == a.in_chans
    assert tuple(weights.meta["bands"]) == a.bands
    assert weights.meta["model"] == a.timm_name
    assert weights.meta["ssl_method"] == a.family
    assert weights.meta["dataset"] == "SSL4EO-S12" and "2211.07044" in weights.meta["publication"]
    assert a.published is not None and weights.url == a.published.url
    steps = list(weights.transforms)
    norms = [t for t in steps if isinstance(t, v2.Normalize)]
    assert len(norms) == 1 and list(norms[0].mean) == [0] and list(norms[0].std) == [10000]
    assert all(isinstance(t, v2.Resize | v2.CenterCrop | v2.Normalize) for t in steps)  # no other pixel step


def test_run_preprocessing_equals_torchgeo_normalize():
    """The run's Preprocessor (scale 'range' over the entry's value_range, then its mean/std) gives torchgeo's
    Normalize(mean=0, std=10000) on every uint16 value, the bright ones above 10000 unclipped."""
    models = pytest.importorskip("torchgeo.models")
    from torchvision.transforms import v2

    a = ARCHS[DINO]
    normalize = next(t for t in models.ViTSmall16_Weights.SENTINEL2_ALL_DINO.transforms
                     if isinstance(t, v2.Normalize))
    rng = np.random.default_rng(0)
    data = rng.integers(0, 65536, size=(13, 8, 8), dtype=np.uint16)
    data[:, 0, :4] = [0, 10000, 30000, 65535]
    pre = make_preprocessor("uint16", tuple(range(1, 14)), PreprocessConfig(scale="range",
                            value_range=a.value_range), a.mean, a.std)
    got = pre(data, np.ones((8, 8), bool))
    want = normalize(torch.from_numpy(data.astype(np.float32))).numpy()
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=0)
    assert got.max() > 6.0 and got[:, 0, 3] == pytest.approx(6.5535, rel=1e-6)


@pytest.mark.parametrize(("arch", "head"), [(DINO, False), (MOCO, True)])
def test_random_weights_in_torchgeo_layout_load_and_match_timm(tmp_path, arch, head):
    ref = _timm_vit(seed=1, head=head)
    assert ("head.weight" in ref.state_dict()) == head
    path = _save(ref.state_dict(), tmp_path / f"vit_small_patch16_224_sentinel2_all_{arch[-4:]}.pth")
    digest = _sha(path)
    model, spec = build_backbone(arch, checkpoint=path, checkpoint_sha256=digest)
    assert spec.layout == "torchgeo" and spec.in_chans == 13 and spec.sha256 == digest
    assert spec.bands == SENTINEL2_BANDS and spec.value_range == (0.0, 65535.0)
    assert spec.mean == (0.0,) * 13 and spec.std == pytest.approx((10000 / 65535,) * 13, rel=1e-12)
    assert spec.licence == "CC-BY-4.0" and spec.source == str(path)
    assert "not the published" in spec.training_lineage  # random bytes: no training data is claimed
    record = spec.to_dict()
    assert list(record["bands"]) == list(SENTINEL2_BANDS) and record["value_range"] == (0.0, 65535.0)
    x = torch.randn(1, 13, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = ref.forward_features(x)  # (1, 1 + 196, 384), after the final norm
        got = model.forward_features(x)
    assert got.shape == want.shape == (1, 197, 384)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert want[:, 1:].std(dim=1).min() > 0.05  # the patch tokens differ: nothing trivially equal
    feats = extract(model, x)  # the feature interface heads use: CLS and patch grid of the same forward
    assert torch.allclose(feats.global_, want[:, 0], rtol=1e-5, atol=1e-5)
    patches = want[:, 1:].transpose(1, 2).reshape(1, 384, 14, 14)
    assert torch.allclose(feats.dense, patches, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("change", "message"), [
    ("missing norm", "2 missing keys"),  # torchgeo's own loader would leave the final norm at its init
    ("missing block", "1 missing keys"),
    ("extra", "1 unexpected keys"),
    ("misshaped", "1 misshaped keys"),
])
def test_missing_extra_or_misshaped_key_refused(tmp_path, reference, change, message):
    state = {k: v for k, v in reference.state_dict().items()}
    if change == "missing norm":
        del state["norm.weight"], state["norm.bias"]
    elif change == "missing block":
        del state["blocks.11.mlp.fc2.bias"]
    elif change == "extra":
        state["fc_norm.weight"] = torch.ones(384)
    else:
        state["blocks.0.attn.proj.bias"] = torch.zeros(385)
    path = _save(state, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=f"does not match architecture {DINO}: .*{message}"):
        build_backbone(DINO, checkpoint=path)


def test_bands_must_match_the_entry(tmp_path):
    """A 3-band DINO ViT-S/16 is not these weights, and these weights are not the RGB DINO entry."""
    rgb, _ = build_backbone("dino_vits16", seed=4)
    rgb_path = _save(rgb.state_dict(), tmp_path / "rgb.pth")
    with pytest.raises(CheckpointError, match="another architecture.*in_chans 3 .checkpoint. vs 13"):
        build_backbone(DINO, checkpoint=rgb_path)
    ms_path = _save(_timm_vit(seed=5, head=False).state_dict(), tmp_path / "s2.pth")
    with pytest.raises(CheckpointError, match="another architecture.*in_chans 13 .checkpoint. vs 3"):
        build_backbone("dino_vits16", checkpoint=ms_path)
    with pytest.raises(ConfigError, match="only RGB"):
        build_backbone(DINO, in_chans=4)


def test_pickle_that_is_not_weights_only_refused(tmp_path, reference, monkeypatch):
    class Payload:  # unpickling it would copy a file: the side effect shows whether anything ran
        def __reduce__(self):
            return (shutil.copyfile, (str(tmp_path / "w.pth"), str(tmp_path / "RAN_ON_LOAD")))

    monkeypatch.chdir(tmp_path)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    _save(state, tmp_path / "w.pth")
    state["payload"] = Payload()
    torch.save(state, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"weights_only=True"):
        build_backbone(DINO, checkpoint=tmp_path / "evil.pth")
    assert not (tmp_path / "RAN_ON_LOAD").exists()


def test_inspect_lists_only_the_sentinel2_entries(tmp_path, reference):
    path = _save(reference.state_dict(), tmp_path / "w.pth")
    info = inspect_file(path)
    assert info["layout"] == "torchgeo" and info["in_chans"] == 13 and info["family"] == "dino"
    assert sorted(a["name"] for a in info["architectures"]) == [DINO, MOCO]  # not the RGB dino_vits16
    assert info["published"] is None


def test_identify_published_by_bytes_then_name(tmp_path, reference, monkeypatch):
    dino = ARCHS[DINO].published
    assert dino is not None
    moco = ARCHS[MOCO].published
    assert moco is not None
    by_prefix = identify_published(sha256="36BCC127")  # the prefix in the published file name
    assert by_prefix is not None and (by_prefix.arch, by_prefix.by, by_prefix.verified) == (
        DINO, "sha256 prefix", False)
    by_full = identify_published(sha256=moco.sha256)
    assert by_full is not None and (by_full.arch, by_full.by) == (MOCO, "sha256")
    assert identify_published(sha256="0" * 64) is None
    with pytest.raises(CheckpointError, match="at least its first 8"):
        identify_published(sha256="36bc")
    # random bytes under the published name: recognised by name only, and said to be unverified
    named = _save(reference.state_dict(), tmp_path / dino.file_name)
    by_name = identify_published(named)
    assert by_name is not None and (by_name.arch, by_name.by, by_name.verified) == (DINO, "file name", False)
    bare = _save(reference.state_dict(), tmp_path / "vit_small_patch16_224_sentinel2_all_moco.pth")
    found = identify_published(bare)
    assert found is not None and found.arch == MOCO and found.by == "file name"
    assert identify_published(tmp_path / "elsewhere.pth") is None
    with pytest.raises(CheckpointError, match="does not start with"):
        identify_published(named, sha256="36bcc127")
    # an entry pinned to these very bytes: matched by sha256, verified, and the run records its lineage
    pinned = dataclasses.replace(ARCHS[DINO], published=dataclasses.replace(dino, sha256=_sha(named)))
    monkeypatch.setitem(ARCHS, DINO, pinned)
    renamed = tmp_path / "any_name.pth"  # the bytes decide, whatever the name
    shutil.copyfile(named, renamed)
    match = identify_published(renamed)
    assert match is not None and (match.arch, match.by, match.verified) == (DINO, "sha256", True)
    _, spec = build_backbone(DINO, checkpoint=renamed)
    assert spec.training_lineage.startswith("SSL4EO-S12") and "sha256 verified" in spec.training_lineage


def test_convert_to_safetensors_keeps_preprocessing_and_claims_no_lineage(tmp_path, reference):
    from geo_dino.models.backbone import convert_file

    src = _save(reference.state_dict(), tmp_path / "w.pth")
    rec = convert_file(src, tmp_path / "w.safetensors", arch=MOCO)
    assert rec["source_layout"] == "torchgeo" and rec["value_range"] == "0.0,65535.0"
    assert rec["bands"].split(",") == list(SENTINEL2_BANDS)
    assert rec["training_lineage"].startswith("unknown")  # random bytes: not the published file
    model, spec = build_backbone(MOCO, checkpoint=tmp_path / "w.safetensors")
    assert spec.value_range == (0.0, 65535.0) and spec.training_lineage == rec["training_lineage"]
    direct, _ = build_backbone(MOCO, checkpoint=src)
    x = torch.randn(1, 13, 64, 96, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():  # 4x6 patches: position embeddings interpolated from the 14x14 grid alike
        assert torch.equal(model.forward_features(x), direct.forward_features(x))


def test_auto_scaling_takes_the_weights_value_range() -> None:
    """``preprocess.scale: auto`` (the default) becomes the entry's DN range, so a run scales Sentinel-2 L1C
    digital numbers as torchgeo does without being told; an explicit choice is kept."""
    from geo_dino.config import PreprocessConfig
    from geo_dino.inputs.preprocess import make_preprocessor, weights_scaling
    from geo_dino.models.archs import ARCHS
    from geo_dino.models.backbone import weights_value_range

    a = ARCHS["torchgeo_vits16_s2_dino"]
    vr = weights_value_range({}, a)
    auto = weights_scaling(PreprocessConfig(), vr)
    assert auto.scale == "range" and auto.value_range == (0.0, 65535.0)
    assert weights_scaling(PreprocessConfig(scale="percentile"), vr).scale == "percentile"
    assert weights_value_range({}, ARCHS["vit_tiny_patch8_geo"]) is None
    assert weights_value_range({"value_range": "0,255"}, a) == (0.0, 255.0)  # the file's metadata wins
    pre = make_preprocessor("uint16", tuple(range(1, 14)), auto, a.mean, a.std)
    dn = np.full((13, 2, 2), 2500, np.uint16)
    assert np.allclose(pre(dn, np.ones((2, 2), bool)), 0.25, atol=1e-6)  # 2500 / 10000
