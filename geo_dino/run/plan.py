"""The typed run plan: what ``plan_run`` decided, saved as ``plan.json`` and read once per task.

A :class:`RunPlan` is frozen and validated (pydantic, ``extra="forbid"``): the sources with their grids and
bands, the region and output grid, the tile grid and its chunks, the preprocessing, the backbone's identity
(architecture, checkpoint and its sha256, embedding width, patch size), the supervised head and the
co-registration check. Every later stage takes its parameters from the plan and the resolved config — never
from another stage's private state or from the provenance record.

:func:`make_plan` builds it, one step per job: the licence gate, the sources' headers, the dates' alignment,
AOI ∩ raster, the tile grid, the preprocessing (with the raster's statistics where the scaling needs them),
the supervised head, the GSD and the co-registration of two dates. Each step's provenance section is
handed to the caller as soon as the step is done; the stage writes them and the plan.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from geo_dino.config import RunConfig
from geo_dino.errors import AOIError, ConfigError, CRSMismatchError, SourceError
from geo_dino.inputs.grid import Grid, PixelBox, Tile, TileGrid
from geo_dino.inputs.preprocess import Preprocessor
from geo_dino.inputs.sources import RasterInfo
from geo_dino.run.heads import HeadPlan


class Frozen(BaseModel):
    """Base of the plan's parts: immutable, no unknown keys, NaN kept as NaN in JSON (a float nodata)."""

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")


class GridPlan(Frozen):
    """A :class:`~geo_dino.inputs.grid.Grid` as JSON: shape, the affine's six coefficients, the CRS."""

    height: int
    width: int
    transform: tuple[float, float, float, float, float, float]
    crs: str

    @classmethod
    def of(cls, grid: Grid) -> GridPlan:
        """The plan form of ``grid``."""
        a = grid.transform
        return cls(height=grid.height, width=grid.width, transform=(a.a, a.b, a.c, a.d, a.e, a.f),
                   crs=grid.crs)

    def grid(self) -> Grid:
        """Back to a :class:`Grid`."""
        from affine import Affine

        return Grid(self.height, self.width, Affine(*self.transform), self.crs)

    def record(self) -> dict[str, Any]:
        """As the provenance record writes a grid."""
        return {"height": self.height, "width": self.width, "transform": list(self.transform),
                "crs": self.crs}


class RasterPlan(Frozen):
    """One date's source: its checked header (:class:`~geo_dino.inputs.sources.RasterInfo`)."""

    path: str
    grid: GridPlan
    count: int
    dtype: str
    nodata: float | None
    bands: tuple[int, ...]
    band_names: tuple[str, ...]
    warped_from: GridPlan | None = None
    resampling: str = "bilinear"
    spectral_bands: tuple[int, ...] = ()
    spectral_names: tuple[str, ...] = ()

    @classmethod
    def of(cls, info: RasterInfo) -> RasterPlan:
        """The plan form of a checked source."""
        return cls(path=info.path, grid=GridPlan.of(info.grid), count=info.count, dtype=info.dtype,
                   nodata=info.nodata, bands=tuple(info.bands), band_names=tuple(info.band_names),
                   warped_from=None if info.warped_from is None else GridPlan.of(info.warped_from),
                   resampling=info.resampling, spectral_bands=tuple(info.spectral_bands),
                   spectral_names=tuple(info.spectral_names))

    def info(self) -> RasterInfo:
        """Back to a :class:`RasterInfo` (what a :class:`~geo_dino.inputs.sources.WindowReader` opens)."""
        return RasterInfo(path=self.path, grid=self.grid.grid(), count=self.count, dtype=self.dtype,
                          nodata=self.nodata, bands=self.bands, band_names=self.band_names,
                          warped_from=None if self.warped_from is None else self.warped_from.grid(),
                          resampling=self.resampling, spectral_bands=self.spectral_bands,
                          spectral_names=self.spectral_names)


class TilingPlan(Frozen):
    """The tile grid over the region and its chunks (whole tile rows per inference task)."""

    size: int
    overlap: int
    shape: tuple[int, int]  # tile rows, tile columns
    n_tiles: int
    n_chunks: int
    chunk_tiles: int
    model_size: int | None = None  # the backbone's input size when tiles are resampled to a GSD

    @property
    def stride(self) -> int:
        """Pixels between neighbouring tiles' corners: ``size - overlap``."""
        return self.size - self.overlap


class BackbonePlan(Frozen):
    """The weights the run uses: chunk tasks load exactly these bytes (the sha256 is checked on load)."""

    arch: str
    checkpoint: str | None
    sha256: str | None  # None: random-init weights
    patch_size: int
    embed_dim: int


class RunPlan(Frozen):
    """Everything the tasks after ``plan_run`` need to know about the run's inputs and layout."""

    rasters: tuple[RasterPlan, ...]
    region: tuple[int, int, int, int]  # row_off, col_off, height, width in the first raster's pixels
    out_grid: GridPlan
    tiling: TilingPlan
    preprocess: Preprocessor  # the exact scaling of the pixels (a frozen dataclass, validated as one)
    backbone: BackbonePlan
    aoi_crs_wkt: str | None  # the AOI in the rasters' CRS (None when too large to keep here)
    head: HeadPlan | None = None
    coregistration: dict[str, Any] | None = None

    @property
    def n_dates(self) -> int:
        """One or two dates."""
        return len(self.rasters)

    @property
    def patch_size(self) -> int:
        """The backbone's patch size in pixels."""
        return self.backbone.patch_size

    def region_box(self) -> PixelBox:
        """The region as a :class:`PixelBox` of the first raster."""
        return PixelBox(*self.region)

    def infos(self) -> list[RasterInfo]:
        """The sources, as :class:`RasterInfo`."""
        return [r.info() for r in self.rasters]

    def chunks(self) -> list[list[list[Tile]]]:
        """The chunks of tile rows, one inference task each (:meth:`TileGrid.row_chunks`)."""
        return self.tile_grid().row_chunks(self.tiling.chunk_tiles)

    def tile_grid(self) -> TileGrid:
        """The run's :class:`TileGrid`."""
        bounds = self.rasters[0].grid.grid().box
        return TileGrid(self.region_box(), self.tiling.size, self.tiling.overlap, bounds)

    def save(self, path: Path) -> Path:
        """Write the plan as JSON, atomically; return ``path``."""
        from geo_dino.files import write_text_atomic

        return write_text_atomic(path, self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> RunPlan:
        """Read a plan saved by :meth:`save` (validated)."""
        return cls.model_validate_json(Path(path).read_text())


# ------------------------------------------------------------------------------------------ planning
GSD_TOLERANCE = 2.0  # a factor: input GSD more than 2× finer or coarser than the checkpoint's is warned about
MAX_GSD_FACTOR = 8.0  # resampling beyond 8× either way invents or throws away too much to be useful


def licence_section(cfg: RunConfig, meta: dict[str, str]) -> dict[str, Any]:
    """Check the weights' licence (gated weights need acceptance) and return the record's ``licence``."""
    from geo_dino.models.backbone import arch_spec, check_licence, effective_licence

    arch = arch_spec(cfg.backbone.arch)
    acceptance = check_licence(cfg.backbone.arch, cfg.backbone.checkpoint, cfg.backbone.accept_licence,
                               meta)
    licence = effective_licence(cfg.backbone.arch, meta) if cfg.backbone.checkpoint else arch.licence
    return {"architecture_licence": arch.licence, "gated": arch.gated, "effective": licence,
            "declared_by_checkpoint": meta.get("licence"),
            "weights": "checkpoint" if cfg.backbone.checkpoint else "random-init", "acceptance": acceptance}


def open_sources(cfg: RunConfig, meta: dict[str, str]) -> tuple[list[RasterInfo], dict[str, Any] | None]:
    """The sources' checked headers (bands the backbone takes), both dates on one grid; and the alignment
    record when the second date is reprojected."""
    from geo_dino.inputs.sources import open_raster
    from geo_dino.models.backbone import arch_spec

    arch = arch_spec(cfg.backbone.arch)
    ckpt_chans = int(meta["in_chans"]) if meta.get("in_chans", "").isdigit() else arch.in_chans
    infos = [open_raster(p, cfg.sources, needed_bands=cfg.backbone.in_chans or ckpt_chans)
             for p in cfg.rasters]
    alignment = None
    if len(infos) == 2:
        infos, alignment = align_dates(infos, cfg.sources.align_dates)
        if infos[0].dtype != infos[1].dtype:
            raise AOIError(f"the two dates have different data types ({infos[0].dtype}, {infos[1].dtype})")
        if len(infos[0].spectral_bands) != len(infos[1].spectral_bands):
            raise SourceError(f"the two dates have {len(infos[0].spectral_bands)} and "
                              f"{len(infos[1].spectral_bands)} bands for the spectral change; choose the "
                              "same bands of both with sources.spectral_bands")
    return infos, alignment


def align_dates(infos: list[RasterInfo], how: str) -> tuple[list[RasterInfo], dict[str, Any] | None]:
    """Both dates on the first's grid: as they are, or (``how`` = a resampling) the second warped onto it."""
    try:
        infos[0].grid.same_as(infos[1].grid, what="the two dates' grids")
        return infos, None
    except CRSMismatchError as exc:
        if how == "refuse":
            raise CRSMismatchError(f"{exc}; set sources.align_dates to a resampling (bilinear, nearest, "
                                   "cubic) to reproject the second date onto the first's grid") from None
        reason = str(exc)
    second = dataclasses.replace(infos[1], grid=infos[0].grid, warped_from=infos[1].grid, resampling=how)
    return [infos[0], second], {"reprojected": Path(infos[1].path).name, "onto": Path(infos[0].path).name,
                                "resampling": how, "reason": reason,
                                "source_grid": GridPlan.of(infos[1].grid).record(),
                                "target_grid": GridPlan.of(infos[0].grid).record()}


def _swapped_hits(geom_4326: Any, crs: str, footprint: Any) -> bool:
    """Whether the AOI with x and y swapped (lat/lon written as lon/lat) overlaps ``footprint``."""
    from pyproj import Transformer
    from shapely.ops import transform

    swapped = transform(lambda x, y, z=None: (y, x), geom_4326)
    if not (-180 <= swapped.bounds[0] <= swapped.bounds[2] <= 180
            and -90 <= swapped.bounds[1] <= swapped.bounds[3] <= 90):
        return False
    try:
        tr = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
        moved = transform(tr.transform, swapped)
    except Exception:  # outside the CRS's area: no hint, the plain message stands
        return False
    return bool(moved.is_valid and moved.intersects(footprint) and moved.intersection(footprint).area > 0)


def region_of(cfg: RunConfig, info: RasterInfo) -> tuple[PixelBox, Any]:
    """The pixels of AOI ∩ raster (a box of the raster's grid) and the AOI in the raster's CRS."""
    from shapely.geometry import box as shp_box

    from geo_dino.inputs.aoi import load_aoi

    grid = info.grid
    aoi = load_aoi(cfg.aoi, cfg.aoi_options)
    geom = aoi.to_crs(grid.crs)
    footprint = shp_box(*grid.bounds())
    if not geom.intersects(footprint) or geom.intersection(footprint).area <= 0:
        hint = ""
        if _swapped_hits(aoi.geometry, grid.crs, footprint):
            hint = (" — but with longitude and latitude swapped it would cover it: the file's positions are "
                    "probably [lat, lon]; GeoJSON positions are [longitude, latitude] (RFC 7946 §3.1.1)")
        raise AOIError(f"the AOI does not overlap the raster {Path(info.path).name} "
                       f"(raster bounds {tuple(round(v, 3) for v in grid.bounds())} in {grid.crs})"
                       + (hint or "; check the AOI and the raster"))
    region = grid.box_covering(geom.intersection(footprint).bounds)
    if region is None:
        raise AOIError("the AOI covers no pixel of the raster")
    return region, geom


def lay_tiles(cfg: RunConfig, grid: Grid, region: PixelBox, patch: int) -> TileGrid:
    """The tile grid over ``region`` (tile size and overlap from the config, whole patches)."""
    tiles = TileGrid.cover(region, grid.box, size=cfg.tiling.size, overlap=cfg.tiling.overlap, patch=patch)
    if cfg.heads.cube and cfg.tiling.overlap % patch:
        raise ConfigError(f"heads.cube: tiling.overlap ({cfg.tiling.overlap}) must be a multiple of the "
                          f"patch size ({patch}) so that tiles share whole patches")
    return tiles


def preprocessing(cfg: RunConfig, info: RasterInfo, meta: dict[str, str], n_dates: int,
                  backbone: BackbonePlan) -> tuple[Preprocessor, HeadPlan | None, dict[str, Any] | None]:
    """The pixels' scaling: the weights' own unless the config chooses one, or the supervised head's; with
    the head's plan and record (None without a head)."""
    from geo_dino.inputs.preprocess import make_preprocessor, weights_scaling
    from geo_dino.inputs.sources import WindowReader
    from geo_dino.models.backbone import arch_spec, weights_normalisation, weights_value_range

    arch = arch_spec(cfg.backbone.arch)
    pre_cfg = weights_scaling(cfg.preprocess, weights_value_range(meta, arch))
    stats = None
    if pre_cfg.scale in ("auto", "percentile") and info.dtype != "uint8":
        with WindowReader(info) as r:
            stats = r.sample_stats(cfg.preprocess.percentiles)
    mean, std = weights_normalisation(meta, arch)
    pre = make_preprocessor(info.dtype, info.bands, pre_cfg, mean, std, stats)
    if cfg.heads.supervised is None:
        return pre, None, None
    from geo_dino.run.heads import head_preprocessor, plan_head

    head, record = plan_head(cfg, n_dates, info, backbone_sha256=backbone.sha256)
    if record["preprocessing"].get("scale") == "percentile" and stats is None:
        with WindowReader(info) as r:
            stats = r.sample_stats(cfg.preprocess.percentiles)
    return head_preprocessor(record["preprocessing"], info.dtype, info.bands, stats), head, record


def gsd_check(input_gsd: dict[str, Any], checkpoint_gsd_m: float | None) -> dict[str, Any]:
    """Compare the input's ground sample distance with the checkpoint's training GSD; warn when far apart.

    Nothing is resampled (DINOv3 works at native resolution; a GSD far from training is the user's call):
    the figures and the warning go into the provenance record.
    """
    x_m, y_m = input_gsd.get("x_m"), input_gsd.get("y_m")
    m = (x_m + y_m) / 2 if x_m and y_m else None
    out: dict[str, Any] = {"input_m": m, "checkpoint_m": checkpoint_gsd_m, "ratio": None, "warning": None}
    if m and checkpoint_gsd_m:
        ratio = m / checkpoint_gsd_m
        out["ratio"] = round(ratio, 3)
        if not 1 / GSD_TOLERANCE <= ratio <= GSD_TOLERANCE:
            out["warning"] = (f"input GSD {m:.2f} m is {ratio:.1f}× the checkpoint's training GSD "
                              f"{checkpoint_gsd_m} m: features may be less reliable at this scale")
            warnings.warn(out["warning"], stacklevel=2)
    return out


def gsd_resampling(input_gsd: dict[str, Any], target_m: float | None, tile: int,
                   patch: int) -> tuple[int, dict[str, Any]]:
    """The backbone input size that puts a ``tile``-pixel window at ``target_m`` metres per pixel."""
    if target_m is None:
        raise ConfigError("preprocess.resample_to_gsd: the checkpoint records no training GSD; set "
                          "preprocess.target_gsd_m")
    x_m, y_m = input_gsd.get("x_m"), input_gsd.get("y_m")
    if not (x_m and y_m):
        raise ConfigError("preprocess.resample_to_gsd: the input's GSD in metres is unknown")
    factor = ((x_m + y_m) / 2) / target_m  # > 1: input pixels are coarser than the target, so upsample
    if not 1 / MAX_GSD_FACTOR <= factor <= MAX_GSD_FACTOR:
        raise ConfigError(f"preprocess.resample_to_gsd: the input GSD is {factor:.1f}× the target "
                          f"{target_m} m; resampling by more than {MAX_GSD_FACTOR:g}× is refused")
    size = max(patch, int(round(tile * factor / patch)) * patch)
    return size, {"target_m": target_m, "factor": round(factor, 4), "tile_pixels": tile, "model_input": size,
                  "method": "bilinear with antialiasing, per tile; outputs upsampled back to the input grid"}


def coregistration(infos: list[RasterInfo], region: PixelBox, pixel_size_m: float | None) -> dict[str, Any]:
    """The two dates' measured misregistration (reads pixels: after screening); warns when it is large."""
    from geo_dino.inputs.coregistration import check_pair
    from geo_dino.inputs.sources import WindowReader

    with WindowReader(infos[0]) as r1, WindowReader(infos[1]) as r2:
        coreg = check_pair([r1, r2], region, pixel_size_m=pixel_size_m)
    if coreg["warning"]:
        warnings.warn(coreg["warning"], stacklevel=2)
    return coreg


def backbone_identity(cfg: RunConfig) -> BackbonePlan:
    """The weights' identity: a pinned sha256 is taken as given (checked when the weights load), else the
    file is hashed once here."""
    from geo_dino.files import sha256_file
    from geo_dino.models.backbone import arch_spec

    arch = arch_spec(cfg.backbone.arch)
    ckpt = cfg.backbone.checkpoint
    digest = (cfg.backbone.checkpoint_sha256 or "").lower() or (sha256_file(ckpt) if ckpt else None)
    return BackbonePlan(arch=arch.name, checkpoint=None if ckpt is None else str(ckpt), sha256=digest,
                        patch_size=arch.patch_size, embed_dim=arch.embed_dim)


def make_plan(cfg: RunConfig, tile_index: Path, note: Callable[..., object]) -> RunPlan:
    """The run's plan; writes the tile index. ``note(**sections)`` is given each provenance section as soon as
    its step is done (the licence first, so a refused run's record says why)."""
    from geo_dino.governance.provenance import raster_input_record
    from geo_dino.models.backbone import arch_spec, checkpoint_metadata
    from geo_dino.outputs.cog import write_tile_index

    arch = arch_spec(cfg.backbone.arch)
    meta = checkpoint_metadata(cfg.backbone.checkpoint)
    note(licence=licence_section(cfg, meta))
    infos, alignment = open_sources(cfg, meta)
    grid = infos[0].grid
    region, geom = region_of(cfg, infos[0])
    tiles = lay_tiles(cfg, grid, region, arch.patch_size)
    out_grid = grid.subgrid(region)
    write_tile_index(tile_index, "tiles", grid, [(t.index, t.box) for t in tiles],
                     extra={"grid_row": [t.grid_row for t in tiles], "grid_col": [t.grid_col for t in tiles]})
    backbone = backbone_identity(cfg)  # hashes an unpinned checkpoint once, for the whole run
    pre, head, head_record = preprocessing(cfg, infos[0], meta, len(infos), backbone)
    if head_record is not None:
        note(supervised_head=head_record)
    chunks = tiles.row_chunks(cfg.tiling.chunk_tiles)
    inputs = [raster_input_record(Path(i.path)) | {"bands": list(i.bands)} for i in infos]
    if cfg.sources.acquired is not None:
        if len(cfg.sources.acquired) != len(inputs):
            raise ConfigError(f"sources.acquired has {len(cfg.sources.acquired)} dates for {len(inputs)} "
                              "rasters; give one per raster, in order")
        for rec, when in zip(inputs, cfg.sources.acquired, strict=True):
            start, end = (when, when) if len(when) == 10 else (f"{when}-01-01", f"{when}-12-31")
            rec["acquired"] = {"start": start, "end": end, "source": "config: sources.acquired"}
    model_size, resampling = None, None
    if cfg.preprocess.resample_to_gsd:
        model_size, resampling = gsd_resampling(inputs[0]["gsd"], cfg.preprocess.target_gsd_m or arch.gsd_m,
                                                tiles.size, arch.patch_size)
    coreg = (coregistration(infos, region, (inputs[0].get("gsd") or {}).get("x_m")) if len(infos) == 2
             else None)
    plan = RunPlan(
        rasters=tuple(RasterPlan.of(i) for i in infos),
        region=(region.row_off, region.col_off, region.height, region.width),
        out_grid=GridPlan.of(out_grid),
        tiling=TilingPlan(size=tiles.size, overlap=tiles.overlap, shape=tiles.shape, n_tiles=len(tiles),
                          n_chunks=len(chunks), chunk_tiles=cfg.tiling.chunk_tiles, model_size=model_size),
        preprocess=pre,
        backbone=backbone,
        aoi_crs_wkt=geom.wkt if len(geom.wkt) < 2_000_000 else None,
        head=head, coregistration=coreg)
    gsd = gsd_check(inputs[0]["gsd"], arch.gsd_m)
    gsd["resampling"] = resampling
    # the bands the weights were trained on: as the checkpoint declares them, else the architecture's
    model_bands = tuple(meta["bands"].split(",")) if meta.get("bands") else arch.bands
    note(**{
        "inputs": inputs, "gsd": gsd, "coregistration": coreg, "alignment": alignment,
        "preprocessing": pre.to_dict() | {"band_mapping": [
            {"source_band": b, "source_description": n, "backbone_channel": i,
             "backbone_band": model_bands[i] if i < len(model_bands) else "extra (adapted patch embedding)"}
            for i, (b, n) in enumerate(zip(infos[0].bands, infos[0].band_names, strict=True))]},
        "pipeline": {"tile_size": tiles.size, "overlap": tiles.overlap, "n_tiles": len(tiles),
                     "n_chunks": len(chunks), "region": list(plan.region),
                     "output_grid": plan.out_grid.record(),
                     "blend": "hann (cos^2), floor 1e-3", "upsampling": "bilinear features to pixels"}})
    return plan


def preflight(cfg: RunConfig) -> dict[str, Any]:
    """Every check a run can make before it has a run folder and before any pixel is read: the AOI, the
    screening registry and policy, the governance policy and file, the weights' licence, the sources' headers
    and bands, the supervised head against the backbone, dates and bands, the AOI over the raster, the tile
    grid and the length of ``preprocess.mean``/``std``. Raises
    the first problem as a :class:`~geo_dino.errors.GeoDinoError`; returns a short summary."""
    from geo_dino.governance.deployment import governance_fields
    from geo_dino.governance.deployment import load_policy as load_governance_policy
    from geo_dino.governance.screening import load_policy, load_registry
    from geo_dino.inputs.aoi import load_aoi
    from geo_dino.models.backbone import arch_spec, checkpoint_metadata

    aoi = load_aoi(cfg.aoi, cfg.aoi_options)
    registry = load_registry(cfg.screening.registry, cfg.screening.registry_sha256)
    load_policy(cfg.screening.policy)
    load_governance_policy(cfg.governance.policy)
    governance_fields(cfg.governance)
    arch = arch_spec(cfg.backbone.arch)
    meta = checkpoint_metadata(cfg.backbone.checkpoint)
    licence_section(cfg, meta)
    infos, _ = open_sources(cfg, meta)
    for name in ("mean", "std"):
        values = getattr(cfg.preprocess, name)
        if values is not None and len(values) != len(infos[0].bands):
            raise ConfigError(f"preprocess.{name} has {len(values)} values for {len(infos[0].bands)} bands "
                              f"({list(infos[0].bands)}); give one per band")
    if cfg.heads.supervised is not None:  # the head fits the backbone, checkpoint, dates and bands
        from geo_dino.run.heads import plan_head

        _, head = plan_head(cfg, len(infos), infos[0])
        n_head = len((head.get("preprocessing") or {}).get("mean") or infos[0].bands)
        if n_head != len(infos[0].bands):
            raise ConfigError(f"heads.supervised: the head was trained on {n_head} bands, the run reads "
                              f"{len(infos[0].bands)} ({list(infos[0].bands)}); select its bands with "
                              "sources.bands")
    region, _ = region_of(cfg, infos[0])
    tiles = lay_tiles(cfg, infos[0].grid, region, arch.patch_size)
    return {"aoi_sha256": aoi.sha256, "registry_sha256": registry.sha256, "rasters": len(infos),
            "bands": list(infos[0].bands), "tiles": len(tiles)}
