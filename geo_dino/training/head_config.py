"""The configuration of a supervised head's training run (``geo-dino train-head CONFIG``).

One pydantic schema (``extra="forbid"``); YAML files such as ``configs/train_head_floods.yaml`` are instances.
Unknown keys and bad values raise :class:`~geo_dino.errors.ConfigError` naming the key; relative paths are
resolved against the working directory. The sections reuse the run configuration's ``sources``,
``preprocess`` and ``backbone`` schemas, so a head is trained on exactly the pixels a run will give it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from geo_dino.config import (
    BackboneConfig,
    ConfigModel,
    PreprocessConfig,
    SourceConfig,
    TopLevelConfig,
    read_yaml_mapping,
    resolve_path,
    validate_mapping,
)


class ClassConfig(ConfigModel):
    """One class of the label table: its name, its label value (0..254) and its display colour."""

    name: Annotated[str, Field(min_length=1)]
    value: Annotated[int, Field(ge=0, le=254)]
    colour: tuple[int, int, int] | str | None = None  # [r, g, b] or "#rrggbb"; default: a fixed palette


class LabelsConfig(ConfigModel):
    """Where the labels come from: a label raster, or polygons with a class attribute (exactly one)."""

    raster: Path | None = None
    # raw raster value -> class value, or "ignore" (Taizhou: {0: ignore, 1: 0, 2: 1});
    # None: values as they are
    mapping: dict[int, int | Literal["ignore"]] | None = None
    # warp a label raster on another grid (nearest neighbour; recorded) instead of refusing
    reproject: bool = False
    polygons: Path | None = None  # GeoJSON or GeoPackage
    attribute: str | None = None  # the polygons' class name or value field
    layer: str | None = None
    all_touched: bool = False
    classes: Annotated[list[ClassConfig], Field(min_length=2)]
    # change heads: the class meaning "changed" (its probability is the change probability); default: the
    # class named "changed", else the last class
    positive_class: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> LabelsConfig:
        if (self.raster is None) == (self.polygons is None):
            raise ValueError("give exactly one of labels.raster and labels.polygons")
        if self.polygons is not None and not self.attribute:
            raise ValueError("labels.attribute: required with labels.polygons (the class field)")
        if self.positive_class is not None and self.positive_class not in [c.name for c in self.classes]:
            raise ValueError(f"labels.positive_class {self.positive_class!r} is not one of the classes")
        return self


class HeadSpecConfig(ConfigModel):
    """The head to train: linear, MLP or DPT, the backbone blocks feeding it, how a change head combines
    dates, and whether it also sees every band of each pixel (the spectrum)."""

    type: Literal["linear", "mlp", "dpt"] = "mlp"  # the best of the three in bench/heads.py
    # backbone blocks (0-based; negative counts from the end) whose features feed the head. None: linear → the
    # last block; dpt → four blocks evenly spaced over the depth, as DPT hooks them
    layers: list[int] | None = None
    hidden: Annotated[int, Field(ge=4, le=512)] = 64  # mlp / dpt channels
    siamese: Literal["diff", "concat", "concat+diff"] = "concat+diff"  # change heads (two rasters)
    # per pixel, the standardised bands of the raster (sources.spectral_bands, default all; a change head:
    # both dates and their absolute difference) beside the upsampled features
    spectral: bool = True


class SplitConfig(ConfigModel):
    """Which tiles are held out for the test metrics, with a buffer of dropped tiles around them.

    ``blocks`` (:func:`geo_dino.inputs.labels.spatial_split`): random square blocks of tiles; ``halves``: one
    half of the labelled tiles, cut across ``axis`` (``east`` holds out the eastern half); ``box``: the tiles
    that intersect ``test_box`` (minx, miny, maxx, maxy in the first raster's CRS). The early-stopping tiles
    are then taken from the rest as blocks."""

    method: Literal["blocks", "halves", "box"] = "blocks"
    axis: Literal["east", "west", "north", "south"] = "east"  # halves: the half held out
    test_box: tuple[float, float, float, float] | None = None  # box: in the first raster's CRS
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.3  # reported metrics: never seen in training
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2  # of the rest: early stopping
    block: Annotated[int, Field(ge=1)] = 2
    buffer: Annotated[int, Field(ge=0)] = 1
    seed: int = 0

    @model_validator(mode="after")
    def _box_given(self) -> SplitConfig:
        if (self.method == "box") != (self.test_box is not None):
            raise ValueError("split.test_box: give it with split.method 'box' (and only then)")
        if self.test_box is not None and not (self.test_box[0] < self.test_box[2]
                                              and self.test_box[1] < self.test_box[3]):
            raise ValueError("split.test_box: (minx, miny, maxx, maxy) with minx < maxx and miny < maxy")
        return self


class TrainConfig(ConfigModel):
    """Optimisation of the head: epochs, learning rate, batches, early stopping and class weights."""

    epochs: Annotated[int, Field(ge=1)] = 200
    lr: Annotated[float, Field(gt=0)] = 1e-2  # linear heads; DPT heads train well with 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    batch_size: Annotated[int, Field(ge=1)] = 16
    eval_every: Annotated[int, Field(ge=1)] = 10  # optimiser steps between validation measurements
    patience: Annotated[int, Field(ge=1)] = 10  # measurements without improvement before stopping
    class_weights: Literal["auto", "none"] | list[float] = "auto"  # auto: inverse pixel frequency
    seed: int = 0


class HeadTrainConfig(TopLevelConfig):
    """A head training run: the rasters (two for a change head), labels, tiles and each stage's settings."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] = "head"
    rasters: Annotated[list[Path], Field(min_length=1, max_length=2)]  # two: a change head
    labels: LabelsConfig
    output_dir: Path = Path("runs")
    tile_size: Annotated[int, Field(ge=8, le=1024)] = 64  # training tiles (a multiple of the patch size)
    max_tiles: Annotated[int, Field(ge=4)] = 4000  # labelled tiles used at most (evenly spaced when more)
    sources: SourceConfig = Field(default_factory=SourceConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    head: HeadSpecConfig = Field(default_factory=HeadSpecConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    def resolved(self, base: Path) -> HeadTrainConfig:
        """A copy with every relative path made absolute against ``base``."""

        def fix(p: Path | None) -> Path | None:
            return resolve_path(p, base)

        return self.model_copy(update={
            "rasters": [fix(r) for r in self.rasters],
            "output_dir": fix(self.output_dir),
            "labels": self.labels.model_copy(update={"raster": fix(self.labels.raster),
                                                     "polygons": fix(self.labels.polygons)}),
            "sources": self.sources.model_copy(update={
                "allowed_roots": [fix(r) for r in self.sources.allowed_roots]}),
            "backbone": self.backbone.model_copy(update={"checkpoint": fix(self.backbone.checkpoint)}),
        })



def parse_head_config(data: dict[str, Any], base: Path | None = None) -> HeadTrainConfig:
    """Validate a mapping into a :class:`HeadTrainConfig` with paths resolved against ``base``."""
    return validate_mapping(HeadTrainConfig, data, base, "head training configuration",
                            "configs/train_head_floods.yaml")


def load_head_config(path: str | Path, overrides: dict[str, Any] | None = None) -> HeadTrainConfig:
    """Read a YAML head training config; relative paths in it are relative to the working directory."""
    return parse_head_config(read_yaml_mapping(path, "head training configuration", overrides), Path.cwd())
