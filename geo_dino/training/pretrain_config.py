"""The pretraining configuration: what to sample, how to crop it, and the DINO recipe.

Defaults follow the papers; each says where it comes from. DINO: Caron et al. 2021, "Emerging Properties in
Self-Supervised Vision Transformers" and its ``main_dino.py``. DINOv2: Oquab et al. 2024 (iBOT loss, KoLeo,
``ssl_default_config.yaml``). DINOv3: Siméoni et al. 2025 (Gram anchoring). Values that differ from the
papers for overhead imagery or for a CPU budget say so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from geo_dino.config import AOIOptions, ConfigModel, PreprocessConfig, SourceConfig, TopLevelConfig


class PretrainDataConfig(ConfigModel):
    """Where training tiles come from: one or many rasters, optionally restricted to AOIs."""

    rasters: Annotated[list[Path], Field(min_length=1)]
    aois: list[Path] = Field(default_factory=list)  # GeoJSON; tiles are drawn only inside their union
    aoi_options: AOIOptions = Field(default_factory=AOIOptions)
    # allowed roots, bands (same count for every raster)
    sources: SourceConfig = Field(default_factory=SourceConfig)
    # bit-depth scaling to [0, 1] per raster (mean/std are applied after the augmentations)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    tile_size: Annotated[int, Field(ge=16)] = 256  # side of the window read from a raster, pixels
    min_valid_fraction: Annotated[float, Field(gt=0, le=1)] = 0.9  # tiles with less valid data are skipped
    max_tries: Annotated[int, Field(ge=1)] = 50  # draws per sample before a raster is declared unusable
    # what the selected bands are (e.g. [red, green, blue, nir]) for the exported weights' metadata and model
    # card; None: the first raster's band descriptions
    band_names: list[str] | None = None

    @model_validator(mode="after")
    def _names_match(self) -> PretrainDataConfig:
        if self.band_names is not None and self.sources.bands is not None \
                and len(self.band_names) != len(self.sources.bands):
            raise ValueError(f"data.band_names: {len(self.band_names)} names for {len(self.sources.bands)} "
                             "bands (data.sources.bands)")
        return self


class MultiCropConfig(ConfigModel):
    """Multi-crop augmentation (DINO section 3.1 and ``DataAugmentationDINO``), adapted to overhead imagery:
    90° rotations and vertical flips are valid symmetries of a nadir image; colour jitter is per band so any
    band count works; grayscale conversion is dropped (it mixes bands that need not be visible light)."""

    global_size: Annotated[int, Field(ge=8)] = 224  # DINO: 224
    local_size: Annotated[int, Field(ge=8)] = 96  # DINO: 96
    n_local: Annotated[int, Field(ge=0)] = 8  # DINO main_dino.py default local_crops_number=8
    global_scale: tuple[float, float] = (0.32, 1.0)  # DINOv2 global_crops_scale (DINO: 0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)  # DINOv2 local_crops_scale (DINO: 0.05, 0.4)
    min_valid_fraction: Annotated[float, Field(gt=0, le=1)] = 0.9  # crops avoid nodata: redrawn below this
    flip_p: Annotated[float, Field(ge=0, le=1)] = 0.5  # horizontal and vertical, each
    rot90: bool = True  # a random multiple of 90° (overhead imagery has no "up")
    jitter_p: Annotated[float, Field(ge=0, le=1)] = 0.8  # DINO: colour jitter with p=0.8
    brightness: Annotated[float, Field(ge=0)] = 0.4  # DINO ColorJitter(0.4, 0.4, ...), applied per band
    contrast: Annotated[float, Field(ge=0)] = 0.4
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)  # DINO: global 1, global 2, locals
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # DINO GaussianBlur radius range, in pixels of the crop
    solarize_p: Annotated[float, Field(ge=0, le=1)] = 0.2  # DINO: second global crop only; 0 disables
    mean: tuple[float, ...] | None = None  # normalisation after augmentation; None: the backbone's
    std: tuple[float, ...] | None = None

    @model_validator(mode="after")
    def _scales(self) -> MultiCropConfig:
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{name}: need 0 < low <= high <= 1, got ({lo}, {hi})")
        if self.local_size > self.global_size:
            raise ValueError("local_size must not exceed global_size")
        return self


class PretrainBackboneConfig(ConfigModel):
    """The student's backbone: a registered architecture, from scratch or continued from a local
    checkpoint."""

    arch: str = "vit_small_patch16_dinov3"
    checkpoint: Path | None = None  # continue from these weights (any layout the loader reads)
    checkpoint_sha256: str | None = None
    accept_licence: str | None = None  # gated starting weights (DINOv3 License) need it, as for runs
    in_chans: Annotated[int, Field(ge=1, le=64)] | None = None  # None: the data's band count
    drop_path_rate: Annotated[float, Field(ge=0, lt=1)] = 0.1  # DINO ViT-S/16: 0.1
    # LayerScale initial value for a model built from scratch (None: the architecture's, 1e-5 for DINOv2/v3).
    # 1e-5 keeps every block near the identity for the first hundreds of steps: the CLS token is then the same
    # for every image and centring makes the teacher uniform; short schedules learn faster from 0.1
    layerscale_init: Annotated[float, Field(gt=0, le=1)] | None = None


class HeadConfig(ConfigModel):
    """DINO projection head (DINO ``main_dino.py`` defaults)."""

    out_dim: Annotated[int, Field(ge=2)] = 65536
    hidden_dim: Annotated[int, Field(ge=1)] = 2048
    bottleneck_dim: Annotated[int, Field(ge=1)] = 256
    nlayers: Annotated[int, Field(ge=1)] = 3
    norm_last_layer: bool = True


class IBOTConfig(ConfigModel):
    """iBOT masked-patch loss (DINOv2 ``ssl_default_config.yaml``: ibot.*)."""

    loss_weight: Annotated[float, Field(ge=0)] = 1.0
    mask_sample_probability: Annotated[float, Field(ge=0, le=1)] = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    separate_head: bool = False  # DINOv2 default: the DINO head also projects patches


class GramConfig(ConfigModel):
    """Gram anchoring (DINOv3 ``gram.*``): the Gram teacher is a frozen copy of the EMA teacher, refreshed
    every ``update_every`` steps from ``start_step`` (DINOv3 starts it late, after the main pretraining)."""

    loss_weight: Annotated[float, Field(ge=0)] = 1.0  # DINOv3 gram.loss_weight 1.0 (scheduled up to 2.0)
    start_step: Annotated[int, Field(ge=0)] = 0
    update_every: Annotated[int, Field(ge=1)] = 10_000  # DINOv3 refreshes every 10k iterations


class RecipeConfig(ConfigModel):
    """Optimisation and distillation schedule. ``*_steps`` defaults are fractions of ``steps`` matching DINO's
    100-epoch schedule: 10 warm-up epochs, last layer frozen for 1 epoch."""

    steps: Annotated[int, Field(ge=1)] = 1000
    batch_size: Annotated[int, Field(ge=2)] = 64  # per process; DINO ViT-S: 64 per GPU × 16 GPUs
    lr: Annotated[float, Field(gt=0)] = 0.0005  # per 256 images, scaled linearly with the global batch (DINO)
    min_lr: Annotated[float, Field(ge=0)] = 1e-6
    warmup_steps: Annotated[int, Field(ge=0)] | None = None  # None: 10 % of steps (DINO: 10 of 100 epochs)
    weight_decay: tuple[float, float] = (0.04, 0.4)  # cosine from start to end (DINO)
    teacher_momentum: tuple[float, float] = (0.996, 1.0)  # cosine (DINO)
    teacher_temp: Annotated[float, Field(gt=0)] = 0.04  # DINO ViT-S default; DINOv2: 0.07
    warmup_teacher_temp: Annotated[float, Field(gt=0)] = 0.04
    warmup_teacher_temp_steps: Annotated[int, Field(ge=0)] = 0  # DINO default 0; DINOv2: 30 % of training
    student_temp: Annotated[float, Field(gt=0)] = 0.1
    center_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    clip_grad: Annotated[float, Field(ge=0)] = 3.0  # 0 disables
    freeze_last_layer_steps: Annotated[int, Field(ge=0)] | None = None  # None: 1 % of steps (DINO: 1 epoch)
    koleo_weight: Annotated[float, Field(ge=0)] = 0.0  # DINOv2: 0.1
    ibot: IBOTConfig | None = None  # DINOv2 adds it; off in plain DINO
    gram: GramConfig | None = None  # DINOv3 adds it

    @property
    def warmup(self) -> int:
        """Learning-rate warm-up steps: ``warmup_steps``, or 10 % of ``steps`` when unset."""
        return self.warmup_steps if self.warmup_steps is not None else self.steps // 10

    @property
    def freeze_last_layer(self) -> int:
        """Steps during which the head's last layer stays frozen: ``freeze_last_layer_steps``, or 1 % of
        ``steps`` when unset."""
        return self.freeze_last_layer_steps if self.freeze_last_layer_steps is not None else self.steps // 100


class KnnEvalConfig(ConfigModel):
    """Optional k-NN evaluation of the teacher during training (labelled images: CSV or folder)."""

    data: Path
    every: Annotated[int, Field(ge=1)] = 500
    size: Annotated[int, Field(ge=8)] | None = None
    k: Annotated[int, Field(ge=1)] = 20


class PretrainConfig(TopLevelConfig):
    """A whole pretraining run: data, crops, backbone, head and recipe, with the run's name, output folder,
    seed, device and precision, logging and checkpoint intervals, optional k-NN evaluation and the export."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] = "pretrain"
    output_dir: Path = Path("runs")
    data: PretrainDataConfig
    crops: MultiCropConfig = Field(default_factory=MultiCropConfig)
    backbone: PretrainBackboneConfig = Field(default_factory=PretrainBackboneConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    recipe: RecipeConfig = Field(default_factory=RecipeConfig)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    threads: Annotated[int, Field(ge=0)] = 0
    num_workers: Annotated[int, Field(ge=0)] = 0  # DataLoader workers per process
    log_every: Annotated[int, Field(ge=1)] = 10
    checkpoint_every: Annotated[int, Field(ge=1)] = 500
    eval: KnnEvalConfig | None = None
    export_name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] = "backbone"
    description: str = ""  # goes into the model card

    def resolved(self, base: Path) -> PretrainConfig:
        """A copy with every relative path made absolute against ``base``."""

        def fix(p: Path | None) -> Path | None:
            if p is None:
                return None
            return p if p.is_absolute() else (base / p).resolve()

        data = self.data.model_copy(update={
            "rasters": [fix(p) for p in self.data.rasters],
            "aois": [fix(p) for p in self.data.aois],
            "sources": self.data.sources.model_copy(
                update={"allowed_roots": [fix(p) for p in self.data.sources.allowed_roots]}),
        })
        return self.model_copy(update={
            "output_dir": fix(self.output_dir),
            "data": data,
            "backbone": self.backbone.model_copy(update={"checkpoint": fix(self.backbone.checkpoint)}),
            "eval": self.eval.model_copy(update={"data": fix(self.eval.data)}) if self.eval else None,
        })


def parse_pretrain_config(data: dict[str, Any], base: Path | None = None) -> PretrainConfig:
    """Validate a mapping into a :class:`PretrainConfig` with paths resolved against ``base`` (default:
    cwd)."""
    from geo_dino.config import validate_mapping

    return validate_mapping(PretrainConfig, data, base, "pretraining configuration",
                            "configs/pretrain_default.yaml")


def load_pretrain_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PretrainConfig:
    """Read a YAML pretraining config; relative paths are relative to the working directory (as for runs)."""
    from geo_dino.config import read_yaml_mapping

    return parse_pretrain_config(read_yaml_mapping(path, "pretraining configuration", overrides), Path.cwd())
