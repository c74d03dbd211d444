"""The stages of one run, as plain functions that take a run folder and return small records.

Prefect tasks (``flows/``) call these; tests call them directly. Stages hand each other the run folder's
path; its files are named and read by :mod:`geo_dino.run.folder` (resolved config, typed plan, screening
decision, provenance record, work files, outputs). Nothing is written outside the run folder.

    prepare_run → screen_aoi → plan_run → fit_heads → init_outputs → infer_chunk × N → finalize_outputs
    → complete_run

The chunk tasks are independent (any order, any process: :mod:`geo_dino.run.engine` runs them serially or
on a Dask cluster); ``finalize_outputs`` merges the bands neighbouring chunks share, then makes the COGs.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from geo_dino.config import ExecutionConfig, RunConfig
from geo_dino.errors import AOIError, ConfigError, OutputError, RunRefused
from geo_dino.files import write_json_atomic
from geo_dino.run import folder, progress, resources
from geo_dino.run.chunks import chunk_timings, infer_chunk, merge_bands, missing_chunks  # noqa: F401
from geo_dino.run.folder import load_config, load_plan, records_failure, timed, update_record

if TYPE_CHECKING:
    from geo_dino.run.plan import RunPlan


# ---------------------------------------------------------------------------------------------- stages
def run_folder_name(cfg: RunConfig, flow_run_id: str | None = None) -> str:
    """``<name>-<UTC stamp>-<8 hex>``: the hex are the Prefect flow run's id when there is one (so a flow
    run's folder is found from its id: :func:`find_run_folder`), else random."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    tail = str(flow_run_id).replace("-", "")[:8] if flow_run_id else uuid.uuid4().hex[:8]
    return f"{cfg.name}-{stamp}-{tail}"


def find_run_folder(output_dir: Path, flow_run_id: str) -> Path | None:
    """The run folder under ``output_dir`` made by the Prefect flow run ``flow_run_id`` (its record names
    it), or None."""
    import json

    tail = str(flow_run_id).replace("-", "")[:8]
    for cand in sorted(Path(output_dir).glob(f"*-{tail}"), reverse=True):
        try:
            rec = json.loads((cand / folder.RECORD).read_text())
        except (OSError, ValueError):
            continue
        if str((rec.get("prefect") or {}).get("flow_run_id")) == str(flow_run_id):
            return cand
    return None


def prepare_run(cfg: RunConfig, run_id: str | None = None, flow_run_id: str | None = None,
                deployment: str | None = None, aoi_text: str | None = None) -> Path:
    """Create the run folder and write the resolved config before any work starts. ``deployment``: the
    Prefect deployment that started the run (its runs share one STAC Collection), or None. ``aoi_text``: the
    AOI's GeoJSON itself (a submission by content): written into the run folder as ``aoi.geojson``, which
    becomes the run's AOI."""
    from geo_dino.governance.provenance import ProvenanceRecord, git_info, software_versions

    run_id = run_id or run_folder_name(cfg, flow_run_id)
    run_dir = (Path(cfg.output_dir) / run_id).resolve()
    run_dir.mkdir(parents=True, exist_ok=False)
    try:
        if aoi_text is not None:
            from geo_dino.files import SUBMITTED_AOI, write_text_atomic

            write_text_atomic(run_dir / SUBMITTED_AOI, aoi_text)
            cfg = cfg.model_copy(update={"aoi": run_dir / SUBMITTED_AOI})
        write_json_atomic(run_dir / folder.CONFIG, cfg.to_json_dict())
        record = ProvenanceRecord.create(run_dir, run_id)
        record.update(config={"sha256": cfg.sha256(), "path": folder.CONFIG}, software=software_versions(),
                      git=git_info(), prefect={"flow_run_id": flow_run_id, "deployment": deployment},
                      status="started")
        record.write()
    except OSError as exc:  # no record could be made: no half-made run folder either
        shutil.rmtree(run_dir, ignore_errors=True)
        if folder.disk_full(exc):
            raise OutputError(f"the disk of {cfg.output_dir} is full ({exc}); free space there, then start "
                              "the run again") from exc
        raise
    from geo_dino.errors import GeoDinoError
    from geo_dino.governance.deployment import check_governance

    try:  # the governance policy's required fields, before anything else (a deployment's are stricter)
        check_governance(cfg.governance, deployment=deployment is not None,
                         where=f"deployment {deployment}" if deployment else "")
    except GeoDinoError as exc:
        update_record(run_dir, status="refused", error=str(exc))
        folder.write_deployment_record(run_dir)
        raise
    return run_dir


def screen_aoi(run_dir: Path) -> dict[str, Any]:
    """Validate the AOI and screen it against the sensitive-site registry; no pixel is read here.

    The decision is always written; a refused run raises :class:`RunRefused` after writing it.
    """
    from geo_dino.governance.screening import enforce, load_policy, load_registry, screen, write_decision
    from geo_dino.inputs.aoi import load_aoi

    t0 = time.perf_counter()
    progress.stage(run_dir, "screening", "the AOI against the sensitive-site registry")
    cfg = load_config(run_dir)
    try:
        aoi = load_aoi(cfg.aoi, cfg.aoi_options)
    except AOIError as exc:
        refusal = {"action": "refused", "allowed": False, "hits": [], "reason": f"invalid AOI: {exc}"}
        write_json_atomic(run_dir / folder.SCREENING, refusal)
        update_record(run_dir, status="failed", error=str(exc), screening=refusal)
        folder.write_deployment_record(run_dir)
        raise
    update_record(run_dir, aoi=aoi.to_record())
    try:
        registry = load_registry(cfg.screening.registry, cfg.screening.registry_sha256)
        policy = load_policy(cfg.screening.policy)
    except Exception as exc:
        refusal = {"action": "refused", "allowed": False, "hits": [],
                   "reason": f"the screen cannot run (fails closed): {exc}"}
        write_json_atomic(run_dir / folder.SCREENING, refusal)
        update_record(run_dir, status="refused", screening=refusal)
        folder.write_deployment_record(run_dir)
        raise
    decision = screen(aoi.geometry, registry, policy, approval=cfg.screening.approval, aoi_sha256=aoi.sha256)
    write_decision(decision, run_dir)
    update_record(run_dir, screening=decision.to_dict())
    timed(run_dir, "screen", t0)
    try:
        enforce(decision)
    except RunRefused:
        update_record(run_dir, status="refused")
        folder.write_deployment_record(run_dir)
        raise
    return {"action": decision.action, "allowed": decision.allowed, "hits": len(decision.hits)}


@records_failure
def plan_run(run_dir: Path) -> dict[str, Any]:
    """Open the sources' headers, lay the tile grid over AOI ∩ raster, build the preprocessor; save the typed
    plan (:class:`~geo_dino.run.plan.RunPlan`, ``plan.json``) and the tile index."""
    from geo_dino.run.plan import make_plan

    t0 = time.perf_counter()
    progress.stage(run_dir, "planning", "the tile grid over AOI ∩ raster")
    cfg = load_config(run_dir)
    plan = make_plan(cfg, run_dir / folder.TILE_INDEX, partial(update_record, run_dir))
    check_retirement(run_dir, plan.backbone.arch, cfg)
    (run_dir / folder.WORK).mkdir(exist_ok=True)
    folder.reserve_space(run_dir)  # released when the run completes or fails: room for its record
    folder.save_plan(run_dir, plan)
    timed(run_dir, "plan", t0)
    return {"n_tiles": plan.tiling.n_tiles, "n_chunks": plan.tiling.n_chunks, "region": list(plan.region)}


def check_retirement(run_dir: Path, arch: str, cfg: RunConfig) -> dict[str, Any]:
    """The checkpoint's retirement condition (backbone registry): past it, warn or refuse per the governance
    policy; recorded either way."""
    import warnings

    from geo_dino.errors import GovernanceError
    from geo_dino.governance.deployment import load_policy
    from geo_dino.run.deployment import retirement_of

    policy = load_policy(cfg.governance.policy)
    field = retirement_of({"backbone": {"arch": arch}}, policy)
    value = field.get("value") if field["status"] == "filled" else None
    update_record(run_dir, retirement={"arch": arch} | field)
    if isinstance(value, dict) and value.get("stale"):
        msg = (f"backbone {arch} is past its retirement condition (due {value.get('due')}; backbone "
               "registry): review the weights and record the review (reviewed_on), or choose other weights")
        if policy.stale_checkpoint == "refuse":
            update_record(run_dir, status="refused", error=msg)
            folder.write_deployment_record(run_dir)
            raise GovernanceError(msg + f" (the governance policy {cfg.governance.policy} refuses)")
        warnings.warn(msg, stacklevel=2)
    return field


@records_failure
def fit_heads(run_dir: Path) -> dict[str, Any]:
    """Fit PCA and k-means on patch features of tiles spread evenly over the region."""
    from geo_dino.inputs.sources import WindowReader
    from geo_dino.models.label_free import fit_label_free
    from geo_dino.run.inference import sample_patch_features

    t0 = time.perf_counter()
    cfg = load_config(run_dir)
    plan = load_plan(run_dir)
    extractor, spec = resources.extractor(cfg, plan)
    tiles = list(plan.tile_grid())
    kcfg = cfg.heads.kmeans
    n_fit = kcfg.fit_tiles if kcfg else 64
    idx = np.unique(np.linspace(0, len(tiles) - 1, min(n_fit, len(tiles))).round().astype(int))
    progress.stage(run_dir, "fitting label-free heads", f"PCA and k-means on {len(idx)} tiles")
    with ExitStack() as stack:
        readers = [stack.enter_context(WindowReader(i)) for i in plan.infos()]
        cache = run_dir / folder.FEATURE_CACHE
        cache.mkdir(exist_ok=True)
        samples = sample_patch_features(extractor, readers, [tiles[i] for i in idx], cfg.backbone.batch_size,
                                        seed=kcfg.seed if kcfg else 0, cache_dir=cache)
        change = None
        if len(readers) == 2:  # the label-free change scores, fitted on pixels of the same tiles
            from geo_dino.models.change import fit_change_model
            from geo_dino.run.inference import sample_change_pixels

            ch = cfg.heads.change
            spectral_readers = (None if ch.method == "features" else
                                [stack.enter_context(WindowReader(i.spectral())) for i in plan.infos()])
            x1, x2, fd = sample_change_pixels(extractor, readers, spectral_readers, [tiles[i] for i in idx],
                                              cfg.backbone.batch_size, ch.fit_pixels,
                                              seed=kcfg.seed if kcfg else 0, cache_dir=cache)
            change = fit_change_model(ch.method, ch.spectral, ch.feature_weight, x1, x2, fd,
                                      layers=list(extractor.change_layers))
            change.save(run_dir / folder.CHANGE_MODEL)
    needed = max(3, kcfg.k if kcfg else 0)
    if samples.shape[0] < needed:  # say why: a raster too small for the patches, or too little valid
        p = plan.patch_size
        h, w = plan.region[2], plan.region[3]
        n = -(-h // p) * -(-w // p)
        from geo_dino.errors import GeoDinoError

        if n < needed:
            raise GeoDinoError(f"the raster area to map (AOI ∩ raster) is {h}×{w} pixels: {n} patches of "
                               f"{p} px, fewer than the {needed} the label-free heads need; use a larger "
                               "raster or AOI, a backbone with smaller patches, or lower heads.kmeans.k")
        raise GeoDinoError(f"only {samples.shape[0]} of the sampled patches are at least 75 % valid (the "
                           f"rest is nodata, masked or outside the raster), fewer than the {needed} the "
                           "label-free heads need; check the raster's nodata, or raise "
                           "heads.kmeans.fit_tiles")
    heads = fit_label_free(samples, pca=cfg.heads.pca, k=kcfg.k if kcfg else None,
                           seed=kcfg.seed if kcfg else 0)
    heads.save(run_dir / folder.HEADS)
    n_params = sum(int(p.numel()) for p in extractor.model.parameters())
    update_record(run_dir, backbone=spec.to_dict() | {"device": extractor.device, "parameters": n_params},
                  heads={"pca": cfg.heads.pca, "kmeans_k": heads.k, "fit_tiles": len(idx),
                         "fit_patches": int(samples.shape[0]), "change": plan.n_dates == 2},
                  **({"change": change.to_record() | {"fit_pixels": int(fd.size)}} if change is not None
                     else {}))
    timed(run_dir, "fit_heads", t0)
    return {"fit_patches": int(samples.shape[0]), "k": heads.k}


def init_outputs(run_dir: Path) -> list[str]:
    """Create the outputs' intermediates (filled as tile rows complete) and, when asked, the feature cube."""
    from geo_dino.run.writing import create_outputs

    cfg = load_config(run_dir)
    plan = load_plan(run_dir)
    names = create_outputs(run_dir, plan, cfg)
    if cfg.heads.cube:
        from geo_dino.run.cube_stage import CUBE_NAME, create_cube

        bb = plan.backbone
        create_cube(run_dir, plan, bb.embed_dim,
                    attrs={"backbone_arch": bb.arch, "backbone_sha256": bb.sha256 or "random-init",
                           "patch_size": bb.patch_size, "date": 1}, zarr_format=cfg.heads.cube_zarr_format)
        names.append(CUBE_NAME)
    return names


@records_failure
def finalize_outputs(run_dir: Path) -> list[dict[str, Any]]:
    """Blend → masks (nodata, AOI, screening) → output COGs, verified; styles beside them."""
    from geo_dino.run.writing import finish_outputs

    t0 = time.perf_counter()
    cfg = load_config(run_dir)
    plan = load_plan(run_dir)
    hist = merge_bands(run_dir, plan, cfg)
    records = finish_outputs(run_dir, plan, cfg, hist)
    if cfg.heads.cube:
        from geo_dino.outputs.cube import open_cube
        from geo_dino.run.cube_stage import CUBE_NAME, close_cube

        close_cube(run_dir)
        cube = open_cube(run_dir / CUBE_NAME)
        if cube.chunks is None:  # open_cube opens it lazily, with dask: never here
            raise OutputError(f"{CUBE_NAME} did not open as a chunked (dask) array")
        records.append({"name": "features", "path": CUBE_NAME, "kind": "zarr feature cube",
                        "shape": [int(v) for v in cube.shape], "dims": list(cube.dims),
                        "chunks": [int(c[0]) for c in cube.chunks], "dtype": str(cube.dtype)})
    vectors = _vectorise_head_outputs(run_dir, plan, cfg)
    update_record(run_dir, outputs=records, **({"vectors": vectors} if vectors else {}))
    from geo_dino.outputs.qgis_project import write_project  # reads the outputs from the record: after it

    project = write_project(run_dir)
    update_record(run_dir, qgis_project={"path": project.name, "context": "context.gpkg"})
    timed(run_dir, "finalize", t0)
    return records


def _vectorise_head_outputs(run_dir: Path, plan: RunPlan, cfg: RunConfig) -> list[dict[str, Any]]:
    """Polygons of a trained head's classes (per date) or changes in ``vectors.gpkg``, styled."""
    from geo_dino.outputs.vectorize import vectorize_classes

    info = plan.head
    sup = cfg.heads.supervised
    if not info or sup is None or sup.vectors is None:
        return []
    v = sup.vectors
    unknown = sorted(set(v.skip_classes) - set(info.names))
    if unknown:
        raise ConfigError(f"heads.supervised.vectors.skip_classes: {unknown} are not classes of the head "
                          f"({list(info.names)})")
    skip = {val for val, n in zip(info.values, info.names, strict=True) if n in v.skip_classes}
    jobs: list[tuple[str, str, str, ClassTable | dict[int, str], set[int]]] = []
    if info.task == "segmentation":
        from geo_dino.inputs.labels import ClassTable

        table = ClassTable.from_dict({"classes": [
            {"name": n, "value": val, "colour": c}
            for val, n, c in zip(info.values, info.names, info.colours, strict=True)]})
        sfxs = [""] if plan.n_dates == 1 else ["_t1", "_t2"]
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


def infer_chunks(run_dir: Path, execution: ExecutionConfig | None = None,
                 progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run every chunk that has no result yet on the run's engine (``execution``: another one, e.g. more
    workers for a resumed run) and put the engine, its workers and the chunks' timings in the record."""
    from geo_dino.run.engine import run_chunks

    cfg = load_config(run_dir)
    execution = execution or cfg.execution
    todo = missing_chunks(run_dir)
    t0 = time.perf_counter()
    engine = run_chunks(run_dir, todo, execution, cfg.backbone.device, progress)
    return record_execution(run_dir, engine, todo, time.perf_counter() - t0)


def record_execution(run_dir: Path, engine: dict[str, Any], ran: list[int], seconds: float) -> dict[str, Any]:
    """Write the record's ``execution`` section: the engine and its workers, the chunks this pass ran, its
    wall time, and where and how long every chunk ran (from the chunk results)."""
    timings = chunk_timings(run_dir)
    busy = sum(t["seconds"] for t in timings if t["chunk"] in set(ran))
    section = engine | {"chunks_run": ran, "wall_seconds": round(seconds, 3),
                        "chunk_seconds_total": round(busy, 3), "chunks": timings}
    update_record(run_dir, execution=section)
    return section


@records_failure
def complete_run(run_dir: Path, timings: dict[str, float] | None = None) -> Path:
    """Mark the record succeeded and drop the work files (feature cache, chunk results, the store of
    intermediates); the fitted heads stay in work/."""
    shutil.rmtree(run_dir / folder.FEATURE_CACHE, ignore_errors=True)
    if (run_dir / folder.HEADS).is_file():  # the fitted heads beside the outputs (the STAC Item's model)
        from geo_dino.files import LABEL_FREE_MODEL, atomic_write

        atomic_write(run_dir / LABEL_FREE_MODEL, lambda tmp: shutil.copyfile(run_dir / folder.HEADS, tmp),
                     suffix=".npz")
    for p in folder.chunk_results(run_dir):
        p.unlink()
    shutil.rmtree(run_dir / folder.INTERMEDIATES, ignore_errors=True)
    folder.release_space(run_dir)
    from geo_dino.outputs import stac
    from geo_dino.run.deployment import write_record

    key = stac.collection_key(run_dir)
    update_record(run_dir, status="succeeded", finished_at=datetime.now(UTC).isoformat(),
                  timings=timings or {}, stac_item=stac.ITEM_FILE,
                  stac_collection=stac.collection_href(key, from_run=True))
    write_record(run_dir)  # a succeeded run's record must be complete and valid: no catch-all here
    # after the last write to the record (the Item holds its checksum); then the Collection of the run's
    # deployment (or config name) in the output folder, rewritten over all of its finished runs
    stac.validate_item(stac.write_item(run_dir, collection=key))
    stac.validate_collection(stac.update_collection(run_dir.parent, key))
    progress.stage(run_dir, "done", f"outputs in {run_dir}")
    return run_dir / folder.RECORD


def resume_run(run_dir: Path, execution: ExecutionConfig | None = None) -> Path:
    """Finish a run that was killed after planning its outputs: the chunks that have no result (on the run's
    engine, or on ``execution``), then the outputs. A chunk that was interrupted simply runs again (same
    inputs, same rows, same result)."""
    if folder.read_record(run_dir).get("status") == "succeeded":
        return run_dir
    if not (run_dir / folder.PLAN).exists() or not (run_dir / folder.INTERMEDIATES).exists():
        raise RuntimeError(f"{run_dir}: the run stopped before inference started; start it again instead")
    from geo_dino.run.runlog import run_log

    with run_log(run_dir):
        folder.reserve_space(run_dir)
        todo = missing_chunks(run_dir)
        t0 = time.perf_counter()
        infer_chunks(run_dir, execution)
        finalize_outputs(run_dir)
        update_record(run_dir, resumed={"chunks_missing": todo, "at": datetime.now(UTC).isoformat()})
        complete_run(run_dir, {"infer_after_resume": round(time.perf_counter() - t0, 3)})
    return run_dir


def run_local(cfg: RunConfig) -> Path:
    """Every stage in order without Prefect (tests, notebooks, debugging); the chunks run on the config's
    engine (``execution``)."""
    from geo_dino.run.runlog import run_log

    t0 = time.perf_counter()
    run_dir = prepare_run(cfg)
    with run_log(run_dir):
        screen_aoi(run_dir)
        plan_run(run_dir)
        fit_heads(run_dir)
        init_outputs(run_dir)
        t_inf = time.perf_counter()
        infer_chunks(run_dir)
        t_out = time.perf_counter()
        finalize_outputs(run_dir)
        complete_run(run_dir, {"infer": round(t_out - t_inf, 3), "total": round(time.perf_counter() - t0, 3)})
    return run_dir
