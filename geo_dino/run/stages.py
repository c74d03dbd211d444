"""The stages of one run, as plain functions that take a run folder and return small records.

Prefect tasks (``flows/``) call these; tests call them directly. Stages hand each other paths: the run
folder holds the resolved config, ``state.json`` (the plan), the screening decision, the provenance record,
the work files and the outputs. Nothing is written outside the run folder.

    prepare_run → screen_aoi → plan_run → fit_heads → infer_chunk × N → finalize_outputs → (provenance)
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from geo_dino.config import RunConfig
from geo_dino.errors import AOIError, OutputError, RunRefused
from geo_dino.inputs.grid import Grid, PixelBox, TileGrid

STATE = "state.json"
CONFIG = "config.resolved.json"
RECORD = "provenance.json"
CHANGE_MODEL = "change.npz"  # in work/: the label-free change scores fitted by fit_heads

_MODELS: dict[tuple, Any] = {}  # one model per process, reused by every chunk task


# --------------------------------------------------------------------------------------------- helpers
def atomic_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` to ``path`` as indented, key-sorted JSON, atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
    return path


def load_run_config(run_dir: Path) -> RunConfig:
    """Read the run folder's resolved config (``config.resolved.json``) back into a :class:`RunConfig`."""
    return RunConfig.model_validate_json((run_dir / CONFIG).read_text())


def _state(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / STATE).read_text())


def update_record(run_dir: Path, **sections: Any) -> Path:
    """Merge ``sections`` into the run's provenance record (``provenance.json``), atomically."""
    path = run_dir / RECORD
    rec = json.loads(path.read_text()) if path.exists() else {}
    for k, v in sections.items():
        if k == "timings":
            rec.setdefault("timings", {}).update(v)
        else:
            rec[k] = v
    return atomic_json(path, rec)


def _timed(run_dir: Path, stage: str, t0: float) -> None:
    update_record(run_dir, timings={stage: round(time.perf_counter() - t0, 3)})


def _grid_to_dict(g: Grid) -> dict[str, Any]:
    return {"height": g.height, "width": g.width, "transform": list(g.transform)[:6], "crs": g.crs}


def _grid_from_dict(d: dict[str, Any]) -> Grid:
    from affine import Affine

    return Grid(d["height"], d["width"], Affine(*d["transform"]), d["crs"])


def _box(d: list[int]) -> PixelBox:
    return PixelBox(*d)


def records_failure(stage: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: a stage that raises marks the record ``failed`` with the error before re-raising."""
    import functools

    @functools.wraps(stage)
    def wrapper(run_dir: Path, *args: Any, **kwargs: Any) -> Any:
        try:
            return stage(run_dir, *args, **kwargs)
        except RunRefused:
            raise
        except Exception as exc:
            rec = (json.loads((Path(run_dir) / RECORD).read_text()) if (Path(run_dir) / RECORD).exists()
                   else {})
            if rec.get("status") not in ("refused", "failed"):
                update_record(Path(run_dir), status="failed",
                              error=f"{stage.__name__}: {type(exc).__name__}: {exc}")
            raise

    return wrapper


# ---------------------------------------------------------------------------------------------- stages
def prepare_run(cfg: RunConfig, run_id: str | None = None, flow_run_id: str | None = None,
                deployment: str | None = None) -> Path:
    """Create the run folder and write the resolved config before any work starts. ``deployment``: the
    Prefect deployment that started the run (its runs share one STAC Collection), or None."""
    from geo_dino.governance.provenance import git_info, software_versions

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_id = run_id or f"{cfg.name}-{stamp}-{uuid.uuid4().hex[:6]}"
    run_dir = (Path(cfg.output_dir) / run_id).resolve()
    run_dir.mkdir(parents=True, exist_ok=False)
    atomic_json(run_dir / CONFIG, cfg.to_json_dict())
    update_record(run_dir, schema="geo_dino.provenance/1", run_id=run_id,
                  created_at=datetime.now(UTC).isoformat(),
                  config={"sha256": cfg.sha256(), "path": CONFIG},
                  software=software_versions(), git=git_info(),
                  prefect={"flow_run_id": flow_run_id, "deployment": deployment}, status="started")
    return run_dir


def screen_aoi(run_dir: Path) -> dict[str, Any]:
    """Validate the AOI and screen it against the sensitive-site registry; no pixel is read here.

    The decision is always written; a refused run raises :class:`RunRefused` after writing it.
    """
    from geo_dino.governance.screening import enforce, load_policy, load_registry, screen, write_decision
    from geo_dino.inputs.aoi import load_aoi

    t0 = time.perf_counter()
    cfg = load_run_config(run_dir)
    try:
        aoi = load_aoi(cfg.aoi, cfg.aoi_options)
    except AOIError as exc:
        refusal = {"action": "refused", "allowed": False, "hits": [], "reason": f"invalid AOI: {exc}"}
        atomic_json(run_dir / "screening.json", refusal)
        update_record(run_dir, status="failed", error=str(exc), screening=refusal)
        raise
    update_record(run_dir, aoi=aoi.to_record())
    try:
        registry = load_registry(cfg.screening.registry, cfg.screening.registry_sha256)
        policy = load_policy(cfg.screening.policy)
    except Exception as exc:
        refusal = {"action": "refused", "allowed": False, "hits": [],
                   "reason": f"the screen cannot run (fails closed): {exc}"}
        atomic_json(run_dir / "screening.json", refusal)
        update_record(run_dir, status="refused", screening=refusal)
        raise
    decision = screen(aoi.geometry, registry, policy, approval=cfg.screening.approval, aoi_sha256=aoi.sha256)
    write_decision(decision, run_dir)
    update_record(run_dir, screening=decision.to_dict())
    _timed(run_dir, "screen", t0)
    try:
        enforce(decision)
    except RunRefused:
        update_record(run_dir, status="refused")
        raise
    return {"action": decision.action, "allowed": decision.allowed, "hits": len(decision.hits)}


@records_failure
def plan_run(run_dir: Path) -> dict[str, Any]:
    """Open the sources' headers, lay the tile grid over AOI ∩ raster, build the preprocessor.

    Saves the plan to the run folder (``state.json``).
    """
    from geo_dino.governance.provenance import raster_input_record
    from geo_dino.inputs.aoi import load_aoi
    from geo_dino.inputs.preprocess import make_preprocessor
    from geo_dino.inputs.sources import WindowReader, open_raster
    from geo_dino.outputs.cog import write_tile_index

    t0 = time.perf_counter()
    cfg = load_run_config(run_dir)
    from geo_dino.models.backbone import arch_spec, check_licence, checkpoint_metadata

    arch = arch_spec(cfg.backbone.arch)

    meta = checkpoint_metadata(cfg.backbone.checkpoint)
    acceptance = check_licence(cfg.backbone.arch, cfg.backbone.checkpoint, cfg.backbone.accept_licence,
                               meta.get("licence"))
    update_record(run_dir, licence={"architecture_licence": arch.licence, "gated": arch.gated,
                                    "declared_by_checkpoint": meta.get("licence"),
                                    "weights": "checkpoint" if cfg.backbone.checkpoint else "random-init",
                                    "acceptance": acceptance})
    ckpt_chans = int(meta["in_chans"]) if meta.get("in_chans", "").isdigit() else arch.in_chans
    infos = [open_raster(p, cfg.sources, needed_bands=cfg.backbone.in_chans or ckpt_chans)
             for p in cfg.rasters]
    alignment = None
    if len(infos) == 2:
        infos, alignment = _align_dates(infos, cfg.sources.align_dates)
        if infos[0].dtype != infos[1].dtype:
            raise AOIError(f"the two dates have different data types ({infos[0].dtype}, {infos[1].dtype})")
        if len(infos[0].spectral_bands) != len(infos[1].spectral_bands):
            from geo_dino.errors import SourceError

            raise SourceError(f"the two dates have {len(infos[0].spectral_bands)} and "
                              f"{len(infos[1].spectral_bands)} bands for the spectral change; choose the "
                              "same bands of both with sources.spectral_bands")
    grid = infos[0].grid
    (run_dir / "work").mkdir(exist_ok=True)
    aoi = load_aoi(cfg.aoi, cfg.aoi_options)
    geom = aoi.to_crs(grid.crs)
    from shapely.geometry import box as shp_box

    footprint = shp_box(*grid.bounds())
    if not geom.intersects(footprint) or geom.intersection(footprint).area <= 0:
        raise AOIError(f"the AOI does not overlap the raster {Path(infos[0].path).name} "
                       f"(raster bounds {tuple(round(v, 3) for v in grid.bounds())} in {grid.crs}); "
                       "check the AOI and the raster")
    region = grid.box_covering(geom.intersection(footprint).bounds)
    if region is None:
        raise AOIError("the AOI covers no pixel of the raster")
    tiles = TileGrid.cover(region, grid.box, size=cfg.tiling.size, overlap=cfg.tiling.overlap,
                           patch=arch.patch_size)
    if cfg.heads.cube and cfg.tiling.overlap % arch.patch_size:
        from geo_dino.errors import ConfigError

        raise ConfigError(f"heads.cube: tiling.overlap ({cfg.tiling.overlap}) must be a multiple of the "
                          f"patch size ({arch.patch_size}) so that tiles share whole patches")
    out_grid = grid.subgrid(region)
    write_tile_index(run_dir / "tiles.gpkg", "tiles", grid, [(t.index, t.box) for t in tiles],
                     extra={"grid_row": [t.grid_row for t in tiles], "grid_col": [t.grid_col for t in tiles]})
    # the weights' own scaling (torchgeo's DN / 10000) unless the config chose one
    from geo_dino.inputs.preprocess import weights_scaling
    from geo_dino.models.backbone import weights_value_range

    pre_cfg = weights_scaling(cfg.preprocess, weights_value_range(meta, arch))
    stats = None
    if pre_cfg.scale in ("auto", "percentile") and infos[0].dtype != "uint8":
        with WindowReader(infos[0]) as r:
            stats = r.sample_stats(cfg.preprocess.percentiles)
    from geo_dino.models.backbone import weights_normalisation

    mean, std = weights_normalisation(meta, arch)
    pre = make_preprocessor(infos[0].dtype, infos[0].bands, pre_cfg, mean, std, stats)
    head_state = None
    # a trained head: checked against this backbone, scales pixels its way
    if cfg.heads.supervised is not None:
        from geo_dino.run.heads import head_preprocessor, plan_head

        head_state, head_record = plan_head(cfg, len(infos), infos[0])
        if head_record["preprocessing"].get("scale") == "percentile" and stats is None:
            with WindowReader(infos[0]) as r:
                stats = r.sample_stats(cfg.preprocess.percentiles)
        pre = head_preprocessor(head_record["preprocessing"], infos[0].dtype, infos[0].bands, stats)
        update_record(run_dir, supervised_head=head_record)
    chunks = tiles.row_chunks(cfg.tiling.chunk_tiles)
    inputs = [raster_input_record(Path(i.path)) | {"bands": list(i.bands)} for i in infos]
    model_size, resampling = None, None
    if cfg.preprocess.resample_to_gsd:
        model_size, resampling = gsd_resampling(inputs[0]["gsd"], cfg.preprocess.target_gsd_m or arch.gsd_m,
                                                tiles.size, arch.patch_size)
    state = {
        "rasters": [{"path": i.path, "grid": _grid_to_dict(i.grid), "count": i.count, "dtype": i.dtype,
                     "nodata": i.nodata, "bands": list(i.bands), "band_names": list(i.band_names),
                     "warped_from": None if i.warped_from is None else _grid_to_dict(i.warped_from),
                     "resampling": i.resampling, "spectral_bands": list(i.spectral_bands),
                     "spectral_names": list(i.spectral_names)} for i in infos],
        "region": [region.row_off, region.col_off, region.height, region.width],
        "out_grid": _grid_to_dict(out_grid),
        "tiling": {"size": tiles.size, "overlap": tiles.overlap, "shape": list(tiles.shape),
                   "n_tiles": len(tiles), "n_chunks": len(chunks), "chunk_tiles": cfg.tiling.chunk_tiles,
                   "model_size": model_size},
        "preprocess": pre.to_dict(),
        "aoi_crs_wkt": geom.wkt if len(geom.wkt) < 2_000_000 else None,
        "head": head_state,
        "patch_size": arch.patch_size,
    }
    coreg = None
    if len(infos) == 2:  # after screening: this reads pixels
        from geo_dino.inputs.coregistration import check_pair

        with WindowReader(infos[0]) as r1, WindowReader(infos[1]) as r2:
            coreg = check_pair([r1, r2], region, pixel_size_m=(inputs[0].get("gsd") or {}).get("x_m"))
        if coreg["warning"]:
            import warnings

            warnings.warn(coreg["warning"], stacklevel=2)
        state["coregistration"] = coreg
    atomic_json(run_dir / STATE, state)
    gsd = gsd_check(inputs[0]["gsd"], arch.gsd_m)
    gsd["resampling"] = resampling
    # the bands the weights were trained on: as the checkpoint declares them, else the architecture's
    model_bands = tuple(meta["bands"].split(",")) if meta.get("bands") else arch.bands
    update_record(run_dir, inputs=inputs, gsd=gsd,
                  preprocessing=pre.to_dict() | {"band_mapping": [
                      {"source_band": b, "source_description": n, "backbone_channel": i,
                       "backbone_band": (model_bands[i] if i < len(model_bands)
                                          else "extra (adapted patch embedding)")}
                      for i, (b, n) in enumerate(zip(infos[0].bands, infos[0].band_names, strict=True))]},
                  coregistration=coreg, alignment=alignment,
                  pipeline={"tile_size": tiles.size, "overlap": tiles.overlap, "n_tiles": len(tiles),
                            "n_chunks": len(chunks), "region": state["region"],
                            "output_grid": state["out_grid"], "blend": "hann (cos^2), floor 1e-3",
                            "upsampling": "bilinear features to pixels"})
    _timed(run_dir, "plan", t0)
    return {"n_tiles": len(tiles), "n_chunks": len(chunks), "region": state["region"]}


GSD_TOLERANCE = 2.0  # a factor: input GSD more than 2× finer or coarser than the checkpoint's is warned about


def gsd_check(input_gsd: dict[str, Any], checkpoint_gsd_m: float | None) -> dict[str, Any]:
    """Compare the input's ground sample distance with the checkpoint's training GSD; warn when far apart.

    Nothing is resampled (DINOv3 works at native resolution; a GSD far from training is the user's call):
    the figures and the warning go into the provenance record.
    """
    import warnings

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


MAX_GSD_FACTOR = 8.0  # resampling beyond 8× either way invents or throws away too much to be useful


def gsd_resampling(input_gsd: dict[str, Any], target_m: float | None, tile: int,
                   patch: int) -> tuple[int, dict[str, Any]]:
    """The backbone input size that puts a ``tile``-pixel window at ``target_m`` metres per pixel."""
    from geo_dino.errors import ConfigError

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


def _infos(state: dict[str, Any]) -> list[Any]:
    from geo_dino.inputs.sources import RasterInfo

    return [RasterInfo(path=r["path"], grid=_grid_from_dict(r["grid"]), count=r["count"], dtype=r["dtype"],
                       nodata=r["nodata"], bands=tuple(r["bands"]), band_names=tuple(r["band_names"]),
                       warped_from=_grid_from_dict(r["warped_from"]) if r.get("warped_from") else None,
                       resampling=r.get("resampling", "bilinear"),
                       spectral_bands=tuple(r.get("spectral_bands") or ()),
                       spectral_names=tuple(r.get("spectral_names") or ()))
            for r in state["rasters"]]


def _align_dates(infos: list[Any], how: str) -> tuple[list[Any], dict[str, Any] | None]:
    """Both dates on the first's grid: as they are, or (``how`` = a resampling) the second warped onto it."""
    import dataclasses

    from geo_dino.errors import CRSMismatchError

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
                                "source_grid": _grid_to_dict(infos[1].grid),
                                "target_grid": _grid_to_dict(infos[0].grid)}


def _tiles(state: dict[str, Any]) -> TileGrid:
    g = _grid_from_dict(state["rasters"][0]["grid"])
    t = state["tiling"]
    return TileGrid(_box(state["region"]), t["size"], t["overlap"], g.box)


def _extractor(cfg: RunConfig, state: dict[str, Any]) -> tuple[Any, Any]:
    import torch

    from geo_dino.inputs.preprocess import Preprocessor
    from geo_dino.models.backbone import build_backbone
    from geo_dino.run.inference import FeatureExtractor, pick_device

    if cfg.backbone.threads:
        torch.set_num_threads(cfg.backbone.threads)
    device = pick_device(cfg.backbone.device)
    key = (cfg.backbone.arch, str(cfg.backbone.checkpoint), cfg.backbone.checkpoint_sha256, cfg.backbone.seed,
           cfg.backbone.in_chans, device)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = build_backbone(cfg.backbone.arch, checkpoint=cfg.backbone.checkpoint,
                                      checkpoint_sha256=cfg.backbone.checkpoint_sha256,
                                      seed=cfg.backbone.seed, accept_licence=cfg.backbone.accept_licence,
                                      in_chans=cfg.backbone.in_chans)
    model, spec = _MODELS[key]
    pre_args: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                                for k, v in state["preprocess"].items()}
    pre = Preprocessor(**pre_args)
    layers = tuple((state.get("head") or {}).get("layers") or ())
    change_layers = tuple(cfg.heads.change.layers or ()) if len(state["rasters"]) == 2 else ()
    depth = len(model.blocks)
    bad = [i for i in change_layers if not -depth <= i < depth]
    if bad:
        from geo_dino.errors import ConfigError

        raise ConfigError(f"heads.change.layers {bad}: the backbone has blocks 0..{depth - 1}")
    return FeatureExtractor(model, pre, device, model_size=state["tiling"].get("model_size"),
                            layers=layers, shift_average=cfg.backbone.shift_average,
                            change_layers=change_layers), spec


_RUNNERS: dict[str, Any] = {}  # one trained head per process


def _runner(state: dict[str, Any]):  # noqa: ANN202 - a HeadRunner or None
    from geo_dino.run.heads import HeadRunner

    info = state.get("head")
    if not info:
        return None
    key = json.dumps(info, sort_keys=True)
    if key not in _RUNNERS:
        _RUNNERS.clear()
        _RUNNERS[key] = HeadRunner(info)
    return _RUNNERS[key]


@records_failure
def fit_heads(run_dir: Path) -> dict[str, Any]:
    """Fit PCA and k-means on patch features of tiles spread evenly over the region."""
    from geo_dino.inputs.sources import WindowReader
    from geo_dino.models.label_free import fit_label_free
    from geo_dino.run.inference import sample_patch_features

    t0 = time.perf_counter()
    cfg = load_run_config(run_dir)
    state = _state(run_dir)
    extractor, spec = _extractor(cfg, state)
    tiles = list(_tiles(state))
    kcfg = cfg.heads.kmeans
    n_fit = kcfg.fit_tiles if kcfg else 64
    idx = np.unique(np.linspace(0, len(tiles) - 1, min(n_fit, len(tiles))).round().astype(int))
    with ExitStack() as stack:
        readers = [stack.enter_context(WindowReader(i)) for i in _infos(state)]
        cache = run_dir / "work" / "features"
        cache.mkdir(exist_ok=True)
        samples = sample_patch_features(extractor, readers, [tiles[i] for i in idx], cfg.backbone.batch_size,
                                        seed=kcfg.seed if kcfg else 0, cache_dir=cache)
        change = None
        if len(readers) == 2:  # the label-free change scores, fitted on pixels of the same tiles
            from geo_dino.models.change import fit_change_model
            from geo_dino.run.inference import sample_change_pixels

            ch = cfg.heads.change
            spectral_readers = (None if ch.method == "features" else
                                [stack.enter_context(WindowReader(i.spectral())) for i in _infos(state)])
            x1, x2, fd = sample_change_pixels(extractor, readers, spectral_readers, [tiles[i] for i in idx],
                                              cfg.backbone.batch_size, ch.fit_pixels,
                                              seed=kcfg.seed if kcfg else 0, cache_dir=cache)
            change = fit_change_model(ch.method, ch.spectral, ch.feature_weight, x1, x2, fd,
                                      layers=list(extractor.change_layers))
            change.save(run_dir / "work" / CHANGE_MODEL)
    heads = fit_label_free(samples, pca=cfg.heads.pca, k=kcfg.k if kcfg else None,
                           seed=kcfg.seed if kcfg else 0)
    heads.save(run_dir / "work" / "heads.npz")
    update_record(run_dir, backbone=spec.to_dict() | {"device": extractor.device},
                  heads={"pca": cfg.heads.pca, "kmeans_k": heads.k, "fit_tiles": len(idx),
                         "fit_patches": int(samples.shape[0]), "change": len(state["rasters"]) == 2},
                  **({"change": change.to_record() | {"fit_pixels": int(fd.size)}} if change is not None
                     else {}))
    _timed(run_dir, "fit_heads", t0)
    return {"fit_patches": int(samples.shape[0]), "k": heads.k}


def _layout(state: dict[str, Any], heads: Any) -> Any:
    from geo_dino.run.inference import ChannelLayout

    info = state.get("head") or {}
    k = len(info.get("values") or ())
    change = info.get("task") == "change"
    return ChannelLayout(len(state["rasters"]), heads.n_pca, heads.k, n_seg=0 if change else k,
                         n_change_logits=k if change else 0)


def init_outputs(run_dir: Path) -> list[str]:
    """Create the outputs' intermediates (filled as tile rows complete) and an empty change histogram."""
    from geo_dino.run.writing import create_outputs

    names = create_outputs(run_dir)
    cfg = load_run_config(run_dir)
    if cfg.heads.cube:
        from geo_dino.run.cube_stage import CUBE_NAME, create_cube

        bb = json.loads((run_dir / RECORD).read_text())["backbone"]
        create_cube(run_dir, _state(run_dir), int(bb["embed_dim"]),
                    attrs={"backbone_arch": bb["arch"], "backbone_sha256": bb.get("sha256") or "random-init",
                           "patch_size": int(bb["patch_size"]), "date": 1})
        names.append(CUBE_NAME)
    return names


def _carry_path(run_dir: Path, chunk: int) -> Path:
    return run_dir / "work" / f"carry_{chunk:05d}.npz"


# the open strip a chunk left behind (one entry: run folder and chunk -> strip, change histogram); its carry
# file holds the same, and is what a resumed or distributed run reads
_STRIPS: dict[tuple[str, int], tuple[Any, np.ndarray]] = {}


def _spectral_change(run_dir: Path) -> Any:
    """The run's fitted spectral change score (None: one date, or ``method: features``)."""
    from geo_dino.models.change import ChangeModel

    path = run_dir / "work" / CHANGE_MODEL
    return ChangeModel.load(path).spectral if path.exists() else None


@records_failure
def infer_chunk(run_dir: Path, chunk: int) -> dict[str, Any]:
    """Run one chunk (whole tile rows) and write the rows that became final. Chunks run in order: each loads
    the open strip rows the previous chunk carried over, and saves its own for the next."""
    from geo_dino.inputs.sources import WindowReader
    from geo_dino.models.label_free import LabelFreeHeads
    from geo_dino.run.inference import StripAccumulator, infer_tiles
    from geo_dino.run.writing import OutputWriter

    t0 = time.perf_counter()
    cfg = load_run_config(run_dir)
    state = _state(run_dir)
    extractor, _ = _extractor(cfg, state)
    heads = LabelFreeHeads.load(run_dir / "work" / "heads.npz")
    layout = _layout(state, heads)
    grid = _tiles(state)
    chunks = grid.row_chunks(state["tiling"]["chunk_tiles"])
    n_rows = grid.shape[0]
    out_grid = _grid_from_dict(state["out_grid"])
    key = str(run_dir.resolve())
    # the strip the previous chunk left in this process, if it is that chunk's (taken: a failure drops it)
    mine = _STRIPS.pop((key, chunk - 1), None)
    _STRIPS.clear()
    acc, hist = None, None
    if chunk > 0:
        prev = _carry_path(run_dir, chunk - 1)
        if not prev.exists():
            raise RuntimeError(f"chunk {chunk} needs chunk {chunk - 1} to have run first (no {prev.name})")
        if mine is not None and mine[0].buf.shape == (layout.n_values + 1, grid.size, out_grid.width):
            acc, hist = mine  # equal to what the carry file holds: it was saved from this very strip
        else:
            acc = StripAccumulator(out_grid, layout.n_values, grid.size, grid.stride)
            hist = acc.load(prev)["hist"]
    if acc is None:
        acc = StripAccumulator(out_grid, layout.n_values, grid.size, grid.stride)
    region = _box(state["region"])
    spectral = _spectral_change(run_dir)
    runner = _runner(state)
    n = 0
    with ExitStack() as stack:
        readers = [stack.enter_context(WindowReader(i)) for i in _infos(state)]
        spectral_readers = (None if spectral is None and not (runner is not None and runner.spectral) else
                            [stack.enter_context(WindowReader(i.spectral())) for i in _infos(state)])
        writer = stack.enter_context(OutputWriter(run_dir, hist))
        cube = None
        if cfg.heads.cube:
            from geo_dino.run.cube_stage import CubeSink

            cube = stack.enter_context(CubeSink(run_dir, state))
        for row in chunks[chunk]:
            n += infer_tiles(extractor, readers, heads, layout, row, region, acc, grid.size,
                             cfg.backbone.batch_size, cache_dir=run_dir / "work" / "features",
                             runner=runner, cube=cube, spectral=spectral,
                             spectral_readers=spectral_readers)
            acc.advance(last=row[0].grid_row == n_rows - 1, sink=writer.write_rows)
    # one file is the chunk's checkpoint (open rows + change histogram): a killed run resumes after it
    acc.save(_carry_path(run_dir, chunk), hist=writer.hist)
    _carry_path(run_dir, chunk - 1).unlink(missing_ok=True)
    if chunk + 1 < len(chunks):  # kept for the next chunk in this process: no reallocation, no reload
        _STRIPS[(key, chunk)] = (acc, np.array(writer.hist, copy=True))
    dt = time.perf_counter() - t0
    return {"chunk": chunk, "tiles": n, "seconds": round(dt, 3)}


@records_failure
def finalize_outputs(run_dir: Path) -> list[dict[str, Any]]:
    """Blend → masks (nodata, AOI, screening) → output COGs, verified; styles beside them."""
    from geo_dino.run.writing import finish_outputs

    t0 = time.perf_counter()
    records = finish_outputs(run_dir)
    if load_run_config(run_dir).heads.cube:
        from geo_dino.outputs.cube import open_cube
        from geo_dino.run.cube_stage import CUBE_NAME, close_cube

        close_cube(run_dir)
        cube = open_cube(run_dir / CUBE_NAME)
        if cube.chunks is None:  # open_cube opens it lazily, with dask: never here
            raise OutputError(f"{CUBE_NAME} did not open as a chunked (dask) array")
        records.append({"name": "features", "path": CUBE_NAME, "kind": "zarr feature cube",
                        "shape": [int(v) for v in cube.shape], "dims": list(cube.dims),
                        "chunks": [int(c[0]) for c in cube.chunks], "dtype": str(cube.dtype)})
    vectors = _vectorise_head_outputs(run_dir)
    update_record(run_dir, outputs=records, **({"vectors": vectors} if vectors else {}))
    from geo_dino.outputs.qgis_project import write_project  # reads the outputs from the record: after it

    project = write_project(run_dir)
    update_record(run_dir, qgis_project={"path": project.name, "context": "context.gpkg"})
    _timed(run_dir, "finalize", t0)
    return records


def _vectorise_head_outputs(run_dir: Path) -> list[dict[str, Any]]:
    """Polygons of a trained head's classes (per date) or changes in ``vectors.gpkg``, styled."""
    from geo_dino.outputs.vectorize import vectorize_classes

    cfg = load_run_config(run_dir)
    state = _state(run_dir)
    info = state.get("head")
    sup = cfg.heads.supervised
    if not info or sup is None or sup.vectors is None:
        return []
    v = sup.vectors
    unknown = sorted(set(v.skip_classes) - set(info["names"]))
    if unknown:
        from geo_dino.errors import ConfigError

        raise ConfigError(f"heads.supervised.vectors.skip_classes: {unknown} are not classes of the head "
                          f"({info['names']})")
    skip = {val for val, n in zip(info["values"], info["names"], strict=True) if n in v.skip_classes}
    jobs: list[tuple[str, str, str, ClassTable | dict[int, str], set[int]]] = []
    if info["task"] == "segmentation":
        from geo_dino.inputs.labels import ClassTable

        table = ClassTable.from_dict({"classes": [
            {"name": n, "value": val, "colour": c}
            for val, n, c in zip(info["values"], info["names"], info["colours"], strict=True)]})
        sfxs = [""] if len(state["rasters"]) == 1 else ["_t1", "_t2"]
        jobs += [(f"seg_classes{x}", f"seg_probability{x}", f"seg_polygons{x}", table, skip) for x in sfxs]
    else:
        jobs.append(("change_binary", "change_probability", "change_polygons", {1: "changed"}, {0}))
    out = []
    for cls, conf, layer, classes, skip_values in jobs:
        out.append(vectorize_classes(run_dir / f"{cls}.tif", run_dir=run_dir, gpkg_name="vectors.gpkg",
                                     layer=layer, classes=classes, confidence_cog=run_dir / f"{conf}.tif",
                                     skip_values=skip_values, min_area_m2=v.min_area_m2,
                                     simplify_m=v.simplify_m))
    return out


def complete_run(run_dir: Path, timings: dict[str, float] | None = None) -> Path:
    """Mark the record succeeded and drop the work files; the fitted heads stay in work/."""
    import shutil

    shutil.rmtree(run_dir / "work" / "features", ignore_errors=True)
    for p in (run_dir / "work").glob("carry_*.npz"):
        p.unlink()
    from geo_dino.outputs import stac
    key = stac.collection_key(run_dir)
    update_record(run_dir, status="succeeded", finished_at=datetime.now(UTC).isoformat(),
                  timings=timings or {}, stac_item=stac.ITEM_FILE,
                  stac_collection=stac.collection_href(key, from_run=True))
    # after the last write to the record (the Item holds its checksum); then the Collection of the run's
    # deployment (or config name) in the output folder, rewritten over all of its finished runs
    stac.validate_item(stac.write_item(run_dir, collection=key))
    stac.validate_collection(stac.update_collection(run_dir.parent, key))
    return run_dir / RECORD


def next_chunk(run_dir: Path) -> int:
    """The first chunk a (killed) run still has to do: one after its newest chunk checkpoint."""
    done = sorted(int(p.stem.split("_")[1]) for p in (run_dir / "work").glob("carry_*.npz"))
    return done[-1] + 1 if done else 0


def resume_run(run_dir: Path) -> Path:
    """Finish a run that was killed during inference: the chunks after its last checkpoint, then the outputs.

    Rows of the chunk that was interrupted are simply written again (same inputs, same values)."""
    rec = json.loads((run_dir / RECORD).read_text())
    if rec.get("status") == "succeeded":
        return run_dir
    if not (run_dir / STATE).exists() or not (run_dir / "work" / "heads.npz").exists():
        raise RuntimeError(f"{run_dir}: the run stopped before inference started; start it again instead")
    state = _state(run_dir)
    start = next_chunk(run_dir)
    t0 = time.perf_counter()
    for c in range(start, state["tiling"]["n_chunks"]):
        infer_chunk(run_dir, c)
    finalize_outputs(run_dir)
    update_record(run_dir, resumed={"from_chunk": start, "at": datetime.now(UTC).isoformat()})
    complete_run(run_dir, {"infer_after_resume": round(time.perf_counter() - t0, 3)})
    return run_dir


def run_local(cfg: RunConfig) -> Path:
    """Every stage in order in this process, without Prefect (tests, notebooks, debugging)."""
    t0 = time.perf_counter()
    run_dir = prepare_run(cfg)
    screen_aoi(run_dir)
    plan = plan_run(run_dir)
    fit_heads(run_dir)
    init_outputs(run_dir)
    t_inf = time.perf_counter()
    for c in range(plan["n_chunks"]):
        infer_chunk(run_dir, c)
    t_out = time.perf_counter()
    finalize_outputs(run_dir)
    complete_run(run_dir, {"infer": round(t_out - t_inf, 3), "total": round(time.perf_counter() - t0, 3)})
    return run_dir
