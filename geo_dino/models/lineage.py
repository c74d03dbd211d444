"""Training lineage of the registry's backbones: the paper, the pretraining data, the model card, the licence
and access route, the bias notes of the model card, and how the weights were made (web- or satellite-
pretrained, distilled). The deployment record (:mod:`geo_dino.run.deployment`) fills its parts 1 and 2 from
here, and from the metadata of checkpoints made by ``geo-dino pretrain``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from geo_dino.models.archs import ARCHS, DINOV3_LICENCE, ArchSpec


@dataclass(frozen=True)
class Lineage:
    """What the published weights of a family are and where they come from."""

    paper: str
    dataset: str
    model_card: str
    source: str  # the repository or package the weights are published by
    access: str  # how a user gets them
    bias_notes: str
    kind: str  # web-pretrained | satellite-pretrained | distilled from … | test

    def to_dict(self) -> dict[str, str]:
        """The facts as a JSON-ready mapping."""
        return asdict(self)


_DINO = Lineage(
    paper="Caron et al., Emerging Properties in Self-Supervised Vision Transformers, ICCV 2021, "
          "arXiv:2104.14294",
    dataset="ImageNet-1k training images (1.28 M web photographs), labels unused",
    model_card="https://github.com/facebookresearch/dino (README: pretrained models)",
    source="facebookresearch/dino (torch.hub), timm",
    access="public download; here a local file only",
    bias_notes="ImageNet photographs: ground-level web imagery with the geographic and demographic skews of "
               "ImageNet; no overhead imagery in pretraining",
    kind="web-pretrained")
_DINOV2 = Lineage(
    paper="Oquab et al., DINOv2: Learning Robust Visual Features without Supervision, TMLR 2024, "
          "arXiv:2304.07193",
    dataset="LVD-142M: 142 M web images retrieved and deduplicated around curated datasets",
    model_card="https://github.com/facebookresearch/dinov2/blob/main/MODEL_CARD.md",
    source="facebookresearch/dinov2 (torch.hub), timm",
    access="public download; here a local file only",
    bias_notes="the model card reports fairness evaluations across income levels and regions (Dollar Street) "
               "with lower performance on images from lower-income households and some regions; web imagery, "
               "not overhead",
    kind="web-pretrained (ViT-g); ViT-S/B/L distilled from ViT-g")
_DINOV3_WEB = Lineage(
    paper="Siméoni et al., DINOv3, 2025, arXiv:2508.10104",
    dataset="LVD-1689M: 1.689 B web images curated (clustering, retrieval) from public Instagram posts",
    model_card="https://github.com/facebookresearch/dinov3/blob/main/MODEL_CARD.md",
    source="facebookresearch/dinov3, timm",
    access="gated download after accepting the DINOv3 License; here a local file only",
    bias_notes="curated web imagery: the model card notes possible geographic and demographic skews of the "
               "source posts; not trained on overhead imagery",
    kind="web-pretrained (ViT-7B); smaller ViTs distilled from ViT-7B")
_DINOV3_SAT = Lineage(
    paper="Siméoni et al., DINOv3, 2025, arXiv:2508.10104",
    dataset="SAT-493M: 493 M 512×512 RGB tiles of Maxar orthorectified imagery at 0.6 m",
    model_card="https://github.com/facebookresearch/dinov3/blob/main/MODEL_CARD.md",
    source="facebookresearch/dinov3, timm",
    access="gated download after accepting the DINOv3 License; here a local file only",
    bias_notes="commercial very-high-resolution RGB at 0.6 m: coverage follows Maxar's archive (denser over "
               "populated and tasked areas); other sensors, bands and GSDs are out of distribution",
    kind="satellite-pretrained (ViT-7B); ViT-L distilled from the SAT ViT-7B")
_SSL4EO = Lineage(
    paper="Wang et al., SSL4EO-S12: A Large-Scale Multi-Modal, Multi-Temporal Dataset for Self-Supervised "
          "Learning in Earth Observation, 2022, arXiv:2211.07044",
    dataset="SSL4EO-S12: Sentinel-2 L1C, 13 bands at 10 m, 4 seasons at ~250 k locations around cities",
    model_card="https://torchgeo.readthedocs.io/en/stable/api/models.html (ViTSmall16_Weights)",
    source="torchgeo 0.8.1 (Hugging Face torchgeo/*)",
    access="public download (CC-BY-4.0); here a local file only",
    bias_notes="locations sampled around cities worldwide: rural and remote areas are under-represented",
    kind="satellite-pretrained")
_OWN = Lineage(
    paper="DINO recipe (Caron et al. 2021) as implemented by geo_dino (geo_dino.training.dino)",
    dataset="the rasters named in the checkpoint's metadata (their sha256 in its model card)",
    model_card="the .md model card beside the checkpoint",
    source="geo_dino pretrain",
    access="made locally; shipped in models/ or the user's pretraining run",
    bias_notes="a few scenes only: the model card's evaluation lists what it was and was not tested on",
    kind="satellite-pretrained (the user's own rasters)")
_TEST = Lineage(paper="not_applicable (test architecture)", dataset="none (random weights)",
                model_card="not_applicable", source="geo_dino tests", access="not_applicable",
                bias_notes="not_applicable (random weights)", kind="test (random initialisation)")


def lineage_of(spec: ArchSpec, *, own_pretraining: bool = False) -> Lineage:
    """The lineage of the registry entry ``spec``; ``own_pretraining``: the weights were made by
    ``geo-dino pretrain`` (their metadata says so), whatever the architecture."""
    if own_pretraining:
        return _OWN
    if spec.family == "test":
        return _TEST
    if spec.family == "dino":
        return _DINO
    if spec.family == "dinov2":
        return _DINOV2
    if spec.family == "dinov3":
        return _DINOV3_SAT if spec.gsd_m is not None and spec.licence == DINOV3_LICENCE else _DINOV3_WEB
    return _SSL4EO  # the torchgeo Sentinel-2 entries (dino, moco families)


def lineage_record(arch: str, *, own_pretraining: bool = False) -> dict[str, Any]:
    """:func:`lineage_of` for a registry name, with the entry's family, licence and pretraining data."""
    spec = ARCHS[arch]
    return lineage_of(spec, own_pretraining=own_pretraining).to_dict() | {
        "family": spec.family, "licence": spec.licence, "training_data": spec.training_data,
        "gsd_m": spec.gsd_m}
