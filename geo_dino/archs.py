"""The backbone registry: every DINO-family architecture the pipeline knows, with the metadata heads and
preprocessing rely on (patch size, widths, register tokens, RoPE, MLP type, licence, mean/std, GSD, bands).

Weights are never downloaded: an entry describes the architecture and what its published checkpoints were
trained on; the user brings the file. timm builds the modules (``timm_name`` plus ``timm_kwargs``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAT493M_MEAN = (0.430, 0.411, 0.296)  # DINOv3 SAT-493M (Maxar RGB): dinov3 README / timm pretrained cfg
SAT493M_STD = (0.213, 0.156, 0.143)

APACHE = "Apache-2.0"
DINOV3_LICENCE = "DINOv3 License"  # licence-gated weights: runs need explicit acceptance


@dataclass(frozen=True)
class ArchSpec:
    """A registered architecture and the training facts of its published weights."""

    name: str
    family: Literal["dino", "dinov2", "dinov3", "test"]
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

    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``timm.create_model(timm_name, ...)``: a copy of ``timm_overrides``."""
        return dict(self.timm_overrides)

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
    # geo_dino's own small backbone: DINOv3 architecture (RoPE, 4 registers) at ViT-Tiny width, patch 8, for
    # the weights pretrained by `geo-dino pretrain configs/pretrain_default.yaml` on the bundled public-domain
    # imagery and shipped in models/ (Apache-2.0: our own weights, no gated licence)
    ArchSpec("vit_tiny_patch8_geo", "dinov3", "vit_small_patch16_dinov3", 8, 192, 6, 3, 4, True, "mlp",
             APACHE, training_data="geo_dino DINO pretraining on bundled NAIP (5 m) and Landsat imagery",
             timm_overrides={"embed_dim": 192, "depth": 6, "num_heads": 3, "patch_size": 8}),
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
