"""The main job as a Prefect flow: AOI → screen → plan → fit heads → chunks of tiles → outputs → record.

One task per stage; tiles run in chunks (``tiling.chunk_tiles`` per task, never one task per tile); tasks
pass the run folder's path and small records, never arrays or models. With no Prefect configuration the flow
runs in ephemeral mode (no server to start).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, TypedDict

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE, CachePolicy

from geo_dino.config import ExecutionConfig, RunConfig, load_config, parse_config
from geo_dino.run import engine
from geo_dino.run import stages as pl


class _TaskOptions(TypedDict):
    cache_policy: CachePolicy
    persist_result: bool


_TASK: _TaskOptions = {"cache_policy": NO_CACHE, "persist_result": False}


@task(name="prepare-run", **_TASK)
def prepare(cfg: RunConfig, flow_run_id: str | None, deployment: str | None = None) -> str:
    """Create the run folder with its resolved config; return its path."""
    return str(pl.prepare_run(cfg, flow_run_id=flow_run_id, deployment=deployment))


@task(name="validate-and-screen-aoi", **_TASK)
def screen(run_dir: str) -> dict[str, Any]:
    """Validate the AOI and screen it against the sensitive-site registry; the decision."""
    return pl.screen_aoi(Path(run_dir))


@task(name="plan-tiles", **_TASK)
def plan(run_dir: str) -> dict[str, Any]:
    """Lay the tile grid over the AOI and save the plan; tile and chunk counts and the region."""
    return pl.plan_run(Path(run_dir))


@task(name="fit-label-free-heads", **_TASK)
def fit(run_dir: str) -> dict[str, Any]:
    """Fit the label-free heads (PCA, k-means), then create the outputs' intermediates."""
    out = pl.fit_heads(Path(run_dir))
    pl.init_outputs(Path(run_dir))
    return out


@task(name="infer-chunk", **_TASK)
def infer(run_dir: str, chunk: int, threads: int | None = None) -> dict[str, Any]:
    """Run chunk number ``chunk`` of tile rows (independent of the others) and write its rows; on a Dask
    worker, with ``threads`` torch threads."""
    if threads is None:
        return pl.infer_chunk(Path(run_dir), chunk)
    return engine.chunk_task(run_dir, chunk, threads)


@flow(name="infer-chunks", log_prints=True)
def infer_on_cluster(run_dir: str, chunks: list[int], execution: dict[str, Any]) -> dict[str, Any]:
    """The chunk tasks on the Dask cluster of this flow's task runner (prefect-dask); the engine's record."""
    from prefect.context import FlowRunContext
    from prefect.futures import as_completed

    log = get_run_logger()
    ex = ExecutionConfig.model_validate(execution)
    futures = [infer.submit(run_dir, c, ex.threads_per_worker) for c in chunks]
    for n, fut in enumerate(as_completed(futures), 1):
        r = fut.result()
        log.info("chunk %d done on %s: %d tiles in %.1fs (%d/%d chunks)", r["chunk"], r["worker"],
                 r["tiles"], r["seconds"], n, len(chunks))
    ctx = FlowRunContext.get()
    if ctx is None:
        raise RuntimeError("infer_on_cluster runs as a Prefect flow")
    runner: Any = ctx.task_runner  # prefect-dask's DaskTaskRunner: its client reaches the cluster
    return engine.cluster_record(runner.client, ex)


@task(name="write-outputs", **_TASK)
def finalize(run_dir: str) -> list[dict[str, Any]]:
    """Write the outputs (verified COGs with styles, the feature cube and polygons when configured); their
    records."""
    return pl.finalize_outputs(Path(run_dir))


@flow(name="run_aoi", log_prints=True)
def run_aoi(config_path: str | None = None, config: dict[str, Any] | None = None,
            overrides: dict[str, Any] | None = None) -> str:
    """Run the pipeline for one AOI. Give a YAML ``config_path`` or a ``config`` mapping. Returns the run
    folder."""
    from prefect.runtime import deployment, flow_run

    log = get_run_logger()
    if config_path is not None:
        cfg = load_config(config_path, overrides)
    elif config is not None:
        cfg = parse_config(config)
    else:
        raise ValueError("give config_path or config")
    run_dir = prepare(cfg, flow_run.get_id(), deployment.name)  # name None unless a deployment started it
    log.info("run folder: %s", run_dir)
    t0 = time.perf_counter()
    decision = screen(run_dir)
    log.info("screening: %s (%d sites hit)", decision["action"], decision["hits"])
    p = plan(run_dir)
    log.info("%d tiles in %d chunks over region %s", p["n_tiles"], p["n_chunks"], p["region"])
    fit(run_dir)
    t_inf = time.perf_counter()
    run_chunks(run_dir, cfg.execution, cfg.backbone.device)
    t_out = time.perf_counter()
    outputs = finalize(run_dir)
    pl.complete_run(Path(run_dir), {"infer": round(t_out - t_inf, 3),
                                    "total_flow": round(time.perf_counter() - t0, 3)})
    log.info("wrote %d outputs", len(outputs))
    return run_dir


def task_runner(execution: ExecutionConfig, device: str) -> Any:
    """prefect-dask's ``DaskTaskRunner`` for the run's chunk tasks: on the cluster at ``execution.address``,
    or on a local cluster started for them (:func:`geo_dino.run.engine.local_cluster`)."""
    from prefect_dask import DaskTaskRunner

    if execution.address:
        return DaskTaskRunner(address=execution.address)
    specs = engine.worker_specs(execution.workers, execution.threads_per_worker, device)
    # prefect-dask calls cluster_class(**cluster_kwargs); its annotation says a no-argument callable
    return DaskTaskRunner(cluster_class=engine.local_cluster, cluster_kwargs={"specs": specs})  # type: ignore[arg-type]


def run_chunks(run_dir: str, execution: ExecutionConfig, device: str) -> None:
    """The chunks that have no result yet: one task after another (serial), or on a Dask cluster through
    the prefect-dask task runner; then the engine and the chunks' timings in the record."""
    log = get_run_logger()
    todo = pl.missing_chunks(Path(run_dir))
    t0 = time.perf_counter()
    if execution.engine == "serial":
        n = 0
        for k, c in enumerate(todo, 1):
            r = infer(run_dir, c)
            n += r["tiles"]
            log.info("chunk %d/%d: %d tiles in %.1fs (%d tiles done)", k, len(todo), r["tiles"],
                     r["seconds"], n)
        rec = engine.serial_record()
    else:
        runner = task_runner(execution, device)
        log.info("%d chunks on a Dask cluster (%s)", len(todo), execution.address or "local, started now")
        rec = infer_on_cluster.with_options(task_runner=runner)(run_dir, todo, execution.model_dump())
    pl.record_execution(Path(run_dir), rec, todo, time.perf_counter() - t0)


@flow(name="resume_run", log_prints=True)
def resume_run(run_dir: str, execution: dict[str, Any] | None = None) -> str:
    """Finish a run that was killed after its outputs were planned: the chunks that have no result (on the
    run's engine, or on ``execution``), then the outputs."""
    log = get_run_logger()
    path = Path(run_dir)
    if pl.folder.read_record(path).get("status") == "succeeded":
        return run_dir
    if not (path / pl.folder.PLAN).exists() or not (path / pl.folder.INTERMEDIATES).exists():
        raise RuntimeError(f"{run_dir}: the run stopped before inference started; start it again instead")
    cfg = pl.load_config(path)
    ex = ExecutionConfig.model_validate(execution) if execution is not None else cfg.execution
    pl.folder.reserve_space(path)
    todo = pl.missing_chunks(path)
    log.info("resuming %s: %d chunks to compute", run_dir, len(todo))
    t0 = time.perf_counter()
    run_chunks(run_dir, ex, cfg.backbone.device)
    finalize(run_dir)
    pl.update_record(path, resumed={"chunks_missing": todo, "engine": ex.engine})
    pl.complete_run(path, {"infer_after_resume": round(time.perf_counter() - t0, 3)})
    return run_dir
