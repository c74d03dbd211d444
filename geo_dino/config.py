"""The run configuration: one pydantic schema, YAML files are instances of it.

Unknown keys and bad values raise :class:`~geo_dino.errors.ConfigError` naming the key. Relative paths are
resolved against the working directory the run starts from (as the bundled configs expect, run from the
repository's root), and the resolved config is written to the run folder.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from geo_dino.errors import ConfigError


class ConfigModel(BaseModel):
    """Base of every config section: unknown keys are refused, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TopLevelConfig(ConfigModel):
    """A whole configuration file (run, head training, pretraining): its paths resolve against a folder, and
    it is written to the run folder and hashed into the record."""

    def resolved(self, base: Path) -> Self:
        """A copy with every relative path made absolute against ``base``."""
        raise NotImplementedError

    def to_json_dict(self) -> dict[str, Any]:
        """The config as plain JSON types (paths as strings), as written to ``config.resolved.json``."""
        return json.loads(self.model_dump_json())

    def sha256(self) -> str:
        """Hex SHA-256 of the config's key-sorted JSON: identifies the exact settings of a run."""
        return hashlib.sha256(json.dumps(self.to_json_dict(), sort_keys=True).encode()).hexdigest()


class Approval(ConfigModel):
    """A named person's approval for a run over sites whose policy is ``require_approval``."""

    approver: Annotated[str, Field(min_length=2)]
    reason: Annotated[str, Field(min_length=5)]


class AOIOptions(ConfigModel):
    """Limits on the AOI file (bytes, vertices, JSON nesting depth); whether invalid polygons are repaired."""

    max_bytes: Annotated[int, Field(gt=0)] = 5_000_000
    max_vertices: Annotated[int, Field(gt=0)] = 100_000
    max_depth: Annotated[int, Field(gt=0)] = 20
    repair: bool = False  # repair self-intersections (make_valid) instead of refusing; area change recorded


class ScreeningConfig(ConfigModel):
    """The sensitive-site screen: the site registry, the policy applied to hits and an optional approval."""

    registry: Path = Path("data/registry/sensitive_sites.gpkg")
    registry_sha256: str | None = None  # when set, a registry with another hash refuses the run
    policy: Path = Path("configs/screening_policy.yaml")
    approval: Approval | None = None


class SourceConfig(ConfigModel):
    """Which rasters may be read and how: allowed folders, remote and VRT sources, pixel budget, bands, and
    how two dates on different grids are aligned."""

    allowed_roots: list[Path] = Field(default_factory=lambda: [Path(".")])
    allow_remote: bool = False  # /vsicurl/, http(s)://, s3:// ... from user input
    allow_vrt: bool = False
    # width × height × bands budget, checked before reading
    max_pixels: Annotated[int, Field(gt=0)] = 4_000_000_000
    bands: list[int | str] | None = None  # 1-based indexes or band descriptions; None = first three / all
    # the bands the spectral part sees (label-free spectral change; heads' per-pixel spectral input):
    # 1-based indexes or descriptions; None = every band of the raster
    spectral_bands: list[int | str] | None = None
    # when each raster was acquired (one per raster: "YYYY-MM-DD" or "YYYY"), where its tags and file name do
    # not say; the STAC Item's start/end_datetime come from these
    acquired: list[Annotated[str, Field(pattern=r"^\d{4}(-\d{2}-\d{2})?$")]] | None = None
    # two dates on different grids: refuse (default), or reproject the second onto the first's grid with this
    # resampling (recorded in the provenance record; the co-registration check then measures what is left)
    align_dates: Literal["refuse", "nearest", "bilinear", "cubic"] = "refuse"


class PreprocessConfig(ConfigModel):
    """How raster values become backbone inputs. ``None`` values come from the checkpoint spec."""

    scale: Literal["auto", "uint8", "range", "percentile", "none"] = "auto"
    value_range: tuple[float, float] | None = None  # for scale="range"
    percentiles: tuple[float, float] = (2.0, 98.0)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # resample each tile to the checkpoint's training GSD before the backbone (off by default: DINOv3 works at
    # native resolution); target_gsd_m overrides the checkpoint's GSD. Outputs stay on the input grid.
    resample_to_gsd: bool = False
    target_gsd_m: Annotated[float, Field(gt=0)] | None = None


class BackboneConfig(ConfigModel):
    """The frozen backbone: architecture, local checkpoint, licence acceptance, device and batching."""

    arch: str = "vit_small_patch16_dinov3"
    checkpoint: Path | None = None  # local .safetensors or .pth (weights_only); never downloaded
    checkpoint_sha256: str | None = None
    # gated weights (DINOv3 License) run only when this names their licence exactly, e.g. "DINOv3 License"
    accept_licence: str | None = None
    seed: int = 0  # random initialisation when no checkpoint is given
    # multispectral input: adapt the patch embedding to this many bands (RGB filters repeated and rescaled,
    # timm's adapt_input_conv); preprocess.mean/std must then give one value per band. Recorded.
    in_chans: Annotated[int, Field(ge=1, le=64)] | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: Annotated[int, Field(gt=0)] = 8
    threads: Annotated[int, Field(ge=0)] = 0  # torch intra-op threads; 0 = torch's default
    # finer dense features: the mean of the features at offsets 0 and half a patch, on a grid twice as fine
    # as the patch grid (no patch-grid checkerboard in the change and class maps; twice the backbone's work)
    shift_average: bool = False


class TilingConfig(ConfigModel):
    """How the region is cut into tiles: tile size and overlap in pixels, tiles per Prefect task."""

    size: Annotated[int, Field(gt=0)] = 224
    overlap: Annotated[int, Field(ge=0)] = 32
    chunk_tiles: Annotated[int, Field(gt=0)] = 64  # tiles per Prefect task


class KMeansConfig(ConfigModel):
    """Label-free clustering of patch features into ``k`` classes, fitted on a sample of tiles."""

    k: Annotated[int, Field(ge=2, le=64)] = 6
    fit_tiles: Annotated[int, Field(gt=0)] = 64  # tiles sampled to fit PCA and k-means
    seed: int = 0


class ChangeConfig(ConfigModel):
    """Label-free change between two dates (:mod:`geo_dino.models.change`): which score, and its threshold.

    ``fused`` (default) combines the spectral score over every band with the backbone's feature distance as
    a weighted geometric mean of the two median-scaled scores; ``spectral`` and ``features`` use one alone.
    """

    method: Literal["spectral", "features", "fused"] = "fused"
    spectral: Literal["cva", "irmad"] = "cva"  # change-vector magnitude of standardised bands, or IR-MAD
    # the fused score's weight on the feature distance (the spectral score gets 1 - feature_weight). In
    # bench/change.py: mean F1 over its five labelled pairs 0.449 / 0.453 / 0.440 / 0.396 at 0.15 / 0.25 /
    # 0.35 / 0.5 (the spectral score alone 0.425, the features alone 0.228)
    feature_weight: Annotated[float, Field(ge=0, le=1)] = 0.25
    # a fixed value of the thresholded score, or a method on the score's histogram: minimum-error (Kittler and
    # Illingworth; suits a few per cent of changed pixels) or otsu
    threshold: float | Literal["minimum-error", "otsu"] = "minimum-error"
    # backbone blocks (0-based, negative from the end) whose features' cosine distances are averaged for the
    # feature change; None: the last block's normed output
    layers: list[int] | None = None
    # pixels sampled from the fit tiles to fit the scores
    fit_pixels: Annotated[int, Field(ge=1000)] = 100_000


class VectorsConfig(ConfigModel):
    """Polygons of the supervised classes / changes (``vectors.gpkg``)."""

    min_area_m2: Annotated[float, Field(ge=0)] = 0.0  # smaller polygons are dropped
    # simplification tolerance in metres (0: pixel edges kept)
    simplify_m: Annotated[float, Field(ge=0)] = 0.0
    # class names not vectorised (e.g. a background class)
    skip_classes: list[str] = Field(default_factory=list)


class SupervisedHeadConfig(ConfigModel):
    """A head trained with ``geo-dino train-head`` (its ``head.safetensors``)."""

    path: Path
    sha256: str | None = None  # when set, a head file with other bytes refuses the run
    vectors: VectorsConfig | None = Field(default_factory=VectorsConfig)  # None: no polygons


class HeadsConfig(ConfigModel):
    """What is made from the features: PCA, k-means classes, change, a trained head, a feature cube."""

    pca: bool = True
    kmeans: KMeansConfig | None = Field(default_factory=KMeansConfig)
    change: ChangeConfig = Field(default_factory=ChangeConfig)
    supervised: SupervisedHeadConfig | None = None
    # also write the dense patch features as a Zarr cube (features.zarr) for search by example
    cube: bool = False
    # the cube's Zarr format: 3 (default), or 2 for readers without Zarr v3 (QGIS 3.22 with GDAL 3.6)
    cube_zarr_format: Literal[2, 3] = 3


Answer = Literal["yes", "no", "unknown"]


class GovernanceConfig(ConfigModel):
    """The human-decided fields of a run's deployment record (:mod:`geo_dino.governance.deployment`).

    Fields left unset here are taken from ``file`` (a ``governance.yaml`` a deployment points to, with the
    same keys); what is still unset is recorded as ``unknown``, "not declared" — never left blank. The
    ``policy`` names the fields a scheduled deployment must fill (it is refused without them) and what a stale
    checkpoint does. ``decided_by`` is who answered (a person or a board); ``decided_by_fields`` names another
    for single fields.
    """

    file: Path | None = None
    policy: Path | None = None  # None: the built-in policy (geo_dino.governance.deployment.DEFAULT_POLICY)
    decided_by: str | None = None
    decided_by_fields: dict[str, str] = Field(default_factory=dict)
    # pipeline boundary
    outputs_reviewed_before_use: Answer | None = None
    reviewer: str | None = None
    logging: str | None = None
    automated_actions: str | None = None  # what is done with the outputs without a person; "none" if nothing
    calibration: str | None = None
    # people and places: what no computation answers
    faces: Answer | None = None
    homes: Answer | None = None
    workplaces: Answer | None = None
    medical_data: Answer | None = None
    # governance route
    privacy_assessment: str | None = None
    data_protection_basis: str | None = None
    security_review: str | None = None
    appeal_path: str | None = None
    monitoring_plan: str | None = None


#: the default most seconds per task kind (``execution.timeouts_s`` overrides some or all)
TaskKind = Literal["screen", "plan", "fit", "chunk", "write"]
TASK_TIMEOUTS_S: dict[TaskKind, float] = {"screen": 600.0, "plan": 1800.0, "fit": 4 * 3600.0,
                                          "chunk": 2 * 3600.0, "write": 4 * 3600.0}


class ExecutionConfig(ConfigModel):
    """Where a run's chunk tasks run (:mod:`geo_dino.run.engine`); the outputs are the same on every engine.

    ``serial``: one after another in the run's own process. ``dask``: on a Dask cluster, ``workers`` worker
    processes of a LocalCluster started for the run (``0``: one per CPU core, or one per visible GPU), or the
    existing cluster whose scheduler is at ``address`` (``tcp://host:port``; it must see the run folder at the
    same path). ``threads_per_worker``: torch threads per worker process on CPU.
    """

    engine: Literal["serial", "dask"] = "serial"
    workers: Annotated[int, Field(ge=0, le=1024)] = 0
    address: Annotated[str | None, Field(pattern=r"^(tcp|tls|inproc|ucx)://[^\s]+$")] = None
    threads_per_worker: Annotated[int, Field(ge=1, le=256)] = 1
    #: the Prefect global concurrency limit whose slot the run holds for its inference (``gpu``: N slots for
    #: N GPUs serve N runs at once, across every deployment); None: no slot. A limit that does not exist
    #: fails the run (create it: ``prefect gcl create gpu --limit N``)
    slots: Annotated[str | None, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] = None
    #: seconds to wait for the slot before the run fails
    slot_timeout_s: Annotated[float, Field(gt=0)] = 6 * 3600
    #: seconds the slot's lease lasts unrenewed (the run renews it while it lives): a run whose process is
    #: killed has its slot given back by its crash hook at once, or, if its whole machine is gone, by the
    #: server once this lease runs out
    slot_lease_s: Annotated[float, Field(ge=10, le=3600)] = 60.0
    #: retries of the tasks a retry cannot harm (reads, chunks: idempotent), with exponential back-off from
    #: ``retry_delay_s``; the project's own errors (a refusal, a bad input) are never retried
    retries: Annotated[int, Field(ge=0, le=10)] = 2
    retry_delay_s: Annotated[float, Field(ge=0, le=3600)] = 10.0
    #: the most seconds one task may take, per kind; past it the task fails (and is retried when it may be)
    timeouts_s: dict[TaskKind, Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: dict(TASK_TIMEOUTS_S))

    @field_validator("timeouts_s", mode="before")
    @classmethod
    def _timeouts_over_defaults(cls, value: Any) -> Any:
        return dict(TASK_TIMEOUTS_S) | value if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _address_needs_dask(self) -> ExecutionConfig:
        if self.address is not None and self.engine != "dask":
            raise ValueError("execution.address joins a Dask cluster: set execution.engine: dask")
        if self.address is not None and self.workers:
            raise ValueError("execution.workers starts a local cluster; with execution.address the "
                             "cluster's own workers run the chunks (leave workers at 0)")
        return self


#: folders a run never writes into (output_dir)
SYSTEM_FOLDERS = ("/etc", "/usr", "/bin", "/sbin", "/boot", "/proc", "/sys", "/dev", "/lib", "/lib64")
#: a URL scheme (``https://``, ``s3://``, ``file://`` …): two or more letters, so ``C:/`` stays a Windows path
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


def refuse_urls(values: Any, where: str) -> None:
    """Refuse URLs among path values, on the raw strings: ``Path`` would turn ``https://host/x`` into the
    local path ``https:/host/x`` and every later check would look at the wrong thing."""
    items = values if isinstance(values, (list, tuple)) else [values]
    for i, v in enumerate(items):
        if isinstance(v, str) and URL_SCHEME.match(v.strip()):
            name = f"{where}[{i}]" if isinstance(values, (list, tuple)) else where
            raise ValueError(f"{name}: {v.strip()!r} is a URL; geo_dino reads local files only: download it "
                             "(and check its licence), then give the local path")


class RunConfig(TopLevelConfig):
    """One run: the AOI, one raster or two dates, the output folder and the settings of every stage."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] = "run"
    aoi: Path
    rasters: Annotated[list[Path], Field(min_length=1, max_length=2)]
    output_dir: Path = Path("runs")
    aoi_options: AOIOptions = Field(default_factory=AOIOptions)
    screening: ScreeningConfig = Field(default_factory=ScreeningConfig)
    sources: SourceConfig = Field(default_factory=SourceConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    heads: HeadsConfig = Field(default_factory=HeadsConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    governance: GovernanceConfig = Field(default_factory=GovernanceConfig)

    @model_validator(mode="before")
    @classmethod
    def _no_urls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("rasters", "aoi", "output_dir"):
                if key in data:
                    refuse_urls(data[key], key)
            backbone = data.get("backbone")
            if isinstance(backbone, dict) and "checkpoint" in backbone:
                refuse_urls(backbone["checkpoint"], "backbone.checkpoint")
        return data

    @field_validator("output_dir")
    @classmethod
    def _a_folder_of_ours(cls, v: Path) -> Path:
        resolved = v.expanduser().resolve()
        if resolved.exists() and not resolved.is_dir():
            raise ValueError(f"output_dir {v} is a file, not a folder: give a folder (it is created if "
                             "missing)")
        for system in SYSTEM_FOLDERS:
            if resolved == Path(system) or Path(system) in resolved.parents:
                raise ValueError(f"output_dir {v} is inside the system folder {system}: give a folder of "
                                 "your own (e.g. ./runs)")
        return v

    @field_validator("rasters")
    @classmethod
    def _distinct(cls, v: list[Path]) -> list[Path]:
        if len(v) == 2 and v[0] == v[1]:
            raise ValueError("the two dates must be different rasters")
        return v

    @model_validator(mode="after")
    def _tiling_fits(self) -> RunConfig:
        if self.tiling.overlap >= self.tiling.size:
            raise ValueError(f"tiling.overlap ({self.tiling.overlap}) must be smaller than tiling.size "
                             f"({self.tiling.size})")
        return self

    def resolved(self, base: Path) -> RunConfig:
        """A copy with every relative path made absolute against ``base``."""

        def fix(p: Path | None) -> Path | None:
            return resolve_path(p, base)

        return self.model_copy(update={
            "aoi": fix(self.aoi),
            "rasters": [fix(r) for r in self.rasters],
            "output_dir": fix(self.output_dir),
            "screening": self.screening.model_copy(update={
                "registry": fix(self.screening.registry), "policy": fix(self.screening.policy)}),
            "sources": self.sources.model_copy(update={
                "allowed_roots": [fix(r) for r in self.sources.allowed_roots]}),
            "backbone": self.backbone.model_copy(update={"checkpoint": fix(self.backbone.checkpoint)}),
            "heads": self.heads if self.heads.supervised is None else self.heads.model_copy(update={
                "supervised": self.heads.supervised.model_copy(
                    update={"path": fix(self.heads.supervised.path)})}),
            "governance": self.governance.model_copy(update={
                "file": fix(self.governance.file), "policy": fix(self.governance.policy)}),
        })


def resolve_path(p: Path | None, base: Path) -> Path | None:
    """``p`` made absolute against ``base``; remote and GDAL-virtual paths are kept verbatim (the source
    checks refuse them unless allowed)."""
    if p is None:
        return None
    s = str(p)
    if "://" in s or s.startswith("/vsi"):
        return p
    return p if p.is_absolute() else (base / p).resolve()


def _format_error(exc: ValidationError, what: str, example: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = f"unknown key (check the spelling; see {example} for every key)"
        lines.append(f"  {key}: {msg}")
    return f"invalid {what}:\n" + "\n".join(lines)


_C = TypeVar("_C", bound=TopLevelConfig)


def validate_mapping(model: type[_C], data: Any, base: Path | None, what: str, example: str) -> _C:
    """``data`` validated into ``model`` (a config with ``resolved(base)``), its paths resolved against
    ``base`` (default: the working directory); :class:`ConfigError` naming each bad key, with ``what`` (the
    kind of configuration) and ``example`` (a file that shows every key) in the message."""
    if not isinstance(data, dict):
        raise ConfigError(f"a {what} must be a mapping of keys to values")
    try:
        cfg = model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, what, example)) from None
    return cfg.resolved(base or Path.cwd())


def parse_config(data: dict[str, Any], base: Path | None = None) -> RunConfig:
    """Validate a mapping into a :class:`RunConfig` with paths resolved against ``base``."""
    return validate_mapping(RunConfig, data, base, "run configuration", "configs/demo.yaml")


def read_yaml_mapping(path: str | Path, what: str = "run configuration",
                      overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A YAML file's top-level mapping with ``overrides`` merged in; clear errors for a missing file, bad YAML
    or a top level that is not a mapping (``what`` names the kind of file in them)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a {what} must be a mapping of keys to values")
    return _merge(data, overrides or {})


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML config file; relative paths in it are relative to the current working directory."""
    return parse_config(read_yaml_mapping(path, "run configuration", overrides), Path.cwd())


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
