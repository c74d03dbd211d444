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

from geo_dino.config import RunConfig, load_config, parse_config
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
def infer(run_dir: str, chunk: int) -> dict[str, Any]:
    """Run chunk number ``chunk`` of tile rows and write the rows that became final."""
    return pl.infer_chunk(Path(run_dir), chunk)


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
    n = 0
    for c in range(p["n_chunks"]):
        r = infer(run_dir, c)
        n += r["tiles"]
        log.info("chunk %d/%d: %d tiles in %.1fs (%d/%d done)", c + 1, p["n_chunks"], r["tiles"],
                 r["seconds"], n, p["n_tiles"])
    t_out = time.perf_counter()
    outputs = finalize(run_dir)
    pl.complete_run(Path(run_dir), {"infer": round(t_out - t_inf, 3),
                                    "total_flow": round(time.perf_counter() - t0, 3)})
    log.info("wrote %d outputs", len(outputs))
    return run_dir


@task(name="resume-chunks-and-outputs", **_TASK)
def resume(run_dir: str) -> str:
    """Run the chunks a killed run still has to do, then its outputs; return the run folder's path."""
    return str(pl.resume_run(Path(run_dir)))


@flow(name="resume_run", log_prints=True)
def resume_run(run_dir: str) -> str:
    """Finish a run killed during inference: the chunks after its last checkpoint, then the outputs."""
    log = get_run_logger()
    start = pl.next_chunk(Path(run_dir))
    log.info("resuming %s from chunk %d", run_dir, start)
    return resume(run_dir)
