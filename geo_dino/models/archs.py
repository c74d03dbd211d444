"""The backbone registry: every DINO-family architecture the pipeline knows, with the metadata heads and
preprocessing rely on (patch size, widths, register tokens, RoPE, MLP type, licence, mean/std, GSD, bands).

Weights are never downloaded: an entry describes the architecture and what its published checkpoints were
trained on; the user brings the file. timm builds the modules (``timm_name`` plus ``timm_kwargs``). Where one
published file belongs to an entry (torchgeo's Sentinel-2 ViT-S/16), the entry pins it by its sha256
(:class:`PublishedWeights`), so a local file can be recognised by its bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAT493M_MEAN = (0.430, 0.411, 0.296)  # DINOv3 SAT-493M (Maxar RGB): dinov3 README / timm pretrained cfg
SAT493M_STD = (0.213, 0.156, 0.143)

APACHE = "Apache-2.0"
DINOV3_LICENCE = "DINOv3 License"  # licence-gated weights: runs need explicit acceptance
SSL4EO_S12_LICENCE = "CC-BY-4.0"  # torchgeo's SSL4EO-S12 weights (their Hugging Face model cards)

# The 13 Sentinel-2 L1C bands in torchgeo's order and spelling (torchgeo.models.resnet._sentinel2_toa_bands,
# the ``bands`` of ViTSmall16_Weights.SENTINEL2_ALL_*)
SENTINEL2_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8a", "B9", "B10", "B11", "B12")
# torchgeo's transform for these weights divides the digital numbers by 10000 (Normalize(mean=0, std=10000),
# no clipping). In geo_dino's convention (x scaled to [0, 1] over ``value_range``, then (x - mean) / std) that
# is exactly value_range 0..65535 (the whole uint16 range: nothing is ever clipped), mean 0 and
# std 10000 / 65535: (x / 65535) / (10000 / 65535) = x / 10000.
SENTINEL2_DN_RANGE = (0.0, 65535.0)
SENTINEL2_DN_DIVISOR = 10000.0
SENTINEL2_MEAN = (0.0,) * 13
SENTINEL2_STD = (SENTINEL2_DN_DIVISOR / SENTINEL2_DN_RANGE[1],) * 13


@dataclass(frozen=True)
class PublishedWeights:
    """One published weights file: its publisher, URL, sha256 and size, and the publisher's preprocessing.

    ``transforms`` is the publisher's preprocessing as written there; the entry's ``value_range`` with its
    mean/std reproduces the per-pixel part in geo_dino's convention.
    """

    publisher: str
    name: str  # the publisher's name for it, e.g. torchgeo.models.ViTSmall16_Weights.SENTINEL2_ALL_DINO
    url: str
    sha256: str
    size_bytes: int
    transforms: str

    @property
    def file_name(self) -> str:
        """The file's name in the URL (torchgeo's carries the first 8 hex digits of its sha256)."""
        return self.url.rsplit("/", 1)[-1]

    @property
    def hash_prefix(self) -> str | None:
        """The sha256 prefix in the file name (``name-36bcc127.pth``), None if it has none."""
        m = re.search(r"-([0-9a-f]{8,64})\.[A-Za-z]+$", self.file_name)
        return m.group(1) if m else None


@dataclass(frozen=True)
class ArchSpec:
    """A registered architecture and the training facts of its published weights."""

    name: str
    family: Literal["dino", "dinov2", "dinov3", "moco", "test"]  # moco: MoCo v3 (a plain ViT, as DINO)
    timm_name: str
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    n_registers: int
    rope: bool
    mlp: Literal["mlp", "swiglu"]
    licence: str
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    in_chans: int = 3
    bands: tuple[str, ...] = ("red", "green", "blue")
    gsd_m: float | None = None  # training ground sample distance (None: web images, no GSD)
    training_data: str = ""
    timm_overrides: dict[str, Any] = field(default_factory=dict)
    # the raw-value range the [0, 1] scaling must use for mean/std to reproduce the published preprocessing
    # (preprocess.scale: range, preprocess.value_range); None: mean/std apply to the run's own [0, 1] scaling
    value_range: tuple[float, float] | None = None
    published: PublishedWeights | None = None  # the one published file of this entry, pinned by sha256
    # retirement of the weights (deployment record, governance route): after this date (ISO), or when the last
    # review (reviewed_on) is older than review_interval_days, a run warns or refuses (governance policy)
    retire_after: str | None = None
    review_interval_days: int | None = None
    reviewed_on: str | None = None

    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``timm.create_model(timm_name, ...)``: a copy of ``timm_overrides``, with
        ``in_chans`` when the weights take other than 3 bands."""
        kwargs = dict(self.timm_overrides)
        if self.in_chans != 3:
            kwargs.setdefault("in_chans", self.in_chans)
        return kwargs

    @property
    def gated(self) -> bool:
        """Weights under a licence that needs explicit acceptance before a run."""
        return self.licence == DINOV3_LICENCE


def _dino(name: str, timm_name: str, p: int, d: int, depth: int, h: int) -> ArchSpec:
    return ArchSpec(name, "dino", timm_name, p, d, depth, h, 0, False, "mlp", APACHE,
                    training_data="ImageNet-1k (DINO, Caron et al. 2021)")


def _dinov2(name: str, timm_name: str, d: int, depth: int, h: int, regs: int, mlp: str = "mlp") -> ArchSpec:
    return ArchSpec(name, "dinov2", timm_name, 14, d, depth, h, regs, False,
                    mlp, APACHE,  # type: ignore[arg-type]
                    training_data="LVD-142M (DINOv2, Oquab et al. 2024)")


def _dinov3(name: str, timm_name: str, d: int, depth: int, h: int, mlp: str = "mlp",
            sat: bool = False) -> ArchSpec:
    if sat:
        return ArchSpec(name, "dinov3", timm_name, 16, d, depth, h, 4, True,
                        mlp, DINOV3_LICENCE,  # type: ignore[arg-type]
                        mean=SAT493M_MEAN, std=SAT493M_STD, gsd_m=0.6,
                        training_data="SAT-493M: 493M 512x512 Maxar RGB tiles at 0.6 m "
                                      "(DINOv3, Siméoni et al. 2025)")
    return ArchSpec(name, "dinov3", timm_name, 16, d, depth, h, 4, True,
                    mlp, DINOV3_LICENCE,  # type: ignore[arg-type]
                    training_data="LVD-1689M web images (DINOv3, Siméoni et al. 2025)")


# torchgeo's transforms for both files, and what of them a tiled run applies
_ZHU_XLAB_TRANSFORMS = ("torchgeo _zhu_xlab_transforms: Resize((256, 256)), CenterCrop(224), "
                        "Normalize(mean=[0], std=[10000]); the resize and crop frame one whole image for "
                        "classification and are not applied to tiles; the normalisation is value_range, mean "
                        "and std")


def _torchgeo_s2(name: str, family: Literal["dino", "moco"], method: str, weights: str, url: str, sha256: str,
                 size: int) -> ArchSpec:
    """torchgeo's SSL4EO-S12 Sentinel-2 ViT-S/16 (13 bands): timm's ``vit_small_patch16_224`` with
    ``in_chans=13`` (torchgeo.models.vit_small_patch16_224)."""
    return ArchSpec(name, family, "vit_small_patch16_224", 16, 384, 12, 6, 0, False, "mlp",
                    SSL4EO_S12_LICENCE, mean=SENTINEL2_MEAN, std=SENTINEL2_STD, in_chans=13,
                    bands=SENTINEL2_BANDS, gsd_m=10.0,
                    training_data=f"SSL4EO-S12: Sentinel-2 L1C top-of-atmosphere, 13 bands at 10 m, four "
                                  f"seasons per location ({method}; Wang et al. 2022, arXiv:2211.07044); "
                                  f"weights {weights}",
                    value_range=SENTINEL2_DN_RANGE,
                    published=PublishedWeights("torchgeo", weights, url, sha256, size, _ZHU_XLAB_TRANSFORMS))


ARCHS: dict[str, ArchSpec] = {a.name: a for a in (
    # DINO (ViT, learned position embeddings, no registers)
    _dino("dino_vits16", "vit_small_patch16_224", 16, 384, 12, 6),
    _dino("dino_vits8", "vit_small_patch8_224", 8, 384, 12, 6),
    _dino("dino_vitb16", "vit_base_patch16_224", 16, 768, 12, 12),
    _dino("dino_vitb8", "vit_base_patch8_224", 8, 768, 12, 12),
    # DINOv2, without and with 4 registers (ViT-g uses SwiGLU)
    _dinov2("dinov2_vits14", "vit_small_patch14_dinov2", 384, 12, 6, 0),
    _dinov2("dinov2_vitb14", "vit_base_patch14_dinov2", 768, 12, 12, 0),
    _dinov2("dinov2_vitl14", "vit_large_patch14_dinov2", 1024, 24, 16, 0),
    _dinov2("dinov2_vitg14", "vit_giant_patch14_dinov2", 1536, 40, 24, 0, "swiglu"),
    _dinov2("dinov2_vits14_reg", "vit_small_patch14_reg4_dinov2", 384, 12, 6, 4),
    _dinov2("dinov2_vitb14_reg", "vit_base_patch14_reg4_dinov2", 768, 12, 12, 4),
    _dinov2("dinov2_vitl14_reg", "vit_large_patch14_reg4_dinov2", 1024, 24, 16, 4),
    _dinov2("dinov2_vitg14_reg", "vit_giant_patch14_reg4_dinov2", 1536, 40, 24, 4, "swiglu"),
    # DINOv3 web (LVD-1689M): RoPE, 4 registers
    _dinov3("vit_small_patch16_dinov3", "vit_small_patch16_dinov3", 384, 12, 6),
    _dinov3("vit_small_plus_patch16_dinov3", "vit_small_plus_patch16_dinov3", 384, 12, 6, "swiglu"),
    _dinov3("vit_base_patch16_dinov3", "vit_base_patch16_dinov3", 768, 12, 12),
    _dinov3("vit_large_patch16_dinov3", "vit_large_patch16_dinov3", 1024, 24, 16),
    _dinov3("vit_huge_plus_patch16_dinov3", "vit_huge_plus_patch16_dinov3", 1280, 32, 20, "swiglu"),
    _dinov3("vit_7b_patch16_dinov3", "vit_7b_patch16_dinov3", 4096, 40, 32, "swiglu"),
    # DINOv3 SAT-493M (satellite): same architectures, satellite mean/std and GSD
    _dinov3("vit_large_patch16_dinov3_sat", "vit_large_patch16_dinov3", 1024, 24, 16, sat=True),
    _dinov3("vit_7b_patch16_dinov3_sat", "vit_7b_patch16_dinov3", 4096, 40, 32, "swiglu", sat=True),
    # torchgeo's Sentinel-2 ViT-S/16 (SSL4EO-S12, 13 L1C bands, 10 m), DINO and MoCo v3 pretraining: sha256
    # and size of the files behind torchgeo 0.8.1's URLs (their Hugging Face LFS pointers), CC-BY-4.0
    _torchgeo_s2("torchgeo_vits16_s2_dino", "dino", "DINO",
                 "torchgeo.models.ViTSmall16_Weights.SENTINEL2_ALL_DINO",
                 "https://hf.co/torchgeo/vit_small_patch16_224_sentinel2_all_dino/resolve/"
                 "5b41dd418a79de47ac9f5be3e035405a83818a62/vit_small_patch16_224_sentinel2_all_dino-36bcc127.pth",
                 "36bcc1273227252faf98e1d9f32c35166d3612d30dc0c15812c29bed6da9a7d5", 90644269),
    _torchgeo_s2("torchgeo_vits16_s2_moco", "moco", "MoCo v3",
                 "torchgeo.models.ViTSmall16_Weights.SENTINEL2_ALL_MOCO",
                 "https://hf.co/torchgeo/vit_small_patch16_224_sentinel2_all_moco/resolve/"
                 "1cb683f6c14739634cdfaaceb076529adf898c74/vit_small_patch16_224_sentinel2_all_moco-67c9032d.pth",
                 "67c9032df0449ae37f93c51696bcae0c6dc3485103deb44b4669e9897b90409c", 90668909),
    # geo_dino's own small backbone: DINOv3 architecture (RoPE, 4 registers) at ViT-Tiny width, patch 8, for
    # the weights pretrained by `geo-dino pretrain configs/pretrain_default.yaml` on the bundled public-domain
    # imagery and shipped in models/ (Apache-2.0: our own weights, no gated licence)
    ArchSpec("vit_tiny_patch8_geo", "dinov3", "vit_small_patch16_dinov3", 8, 192, 6, 3, 4, True, "mlp",
             APACHE, training_data="geo_dino DINO pretraining on bundled NAIP (5 m) and Landsat imagery",
             timm_overrides={"embed_dim": 192, "depth": 6, "num_heads": 3, "patch_size": 8},
             review_interval_days=365, reviewed_on="2026-11-26"),
    # a tiny DINOv3-architecture ViT (RoPE, 4 registers) so tests run the whole pipeline in seconds on CPU
    ArchSpec("vit_tiny_patch16_dinov3_test", "test", "vit_small_patch16_dinov3", 16, 48, 2, 2, 4, True, "mlp",
             "n/a (test architecture, random weights)",
             timm_overrides={"embed_dim": 48, "depth": 2, "num_heads": 2}),
    # tiny DINOv2-architecture ViTs (learned positions), without and with registers, for the layout tests
    ArchSpec("vit_tiny_patch14_dinov2_test", "test", "vit_small_patch14_dinov2", 14, 48, 2, 2, 0, False,
             "mlp", "n/a (test architecture, random weights)",
             timm_overrides={"embed_dim": 48, "depth": 2, "num_heads": 2}),
    ArchSpec("vit_tiny_patch14_reg4_dinov2_test", "test", "vit_small_patch14_reg4_dinov2", 14, 48, 2, 2, 4,
             False, "mlp", "n/a (test architecture, random weights)",
             timm_overrides={"embed_dim": 48, "depth": 2, "num_heads": 2}),
)}
