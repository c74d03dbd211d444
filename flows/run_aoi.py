"""The main job as a Prefect flow: AOI → screen → plan → fit heads → chunks of tiles → outputs → record.

One task per stage; tiles run in chunks (``tiling.chunk_tiles`` per task, never one task per tile); tasks
pass the run folder's path and small records, never arrays or models. With no Prefect configuration the flow
runs in ephemeral mode (no server to start).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypedDict

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE, CachePolicy

from flows.progress import final_report, progress_artifact
from geo_dino.config import ExecutionConfig, RunConfig, load_config, parse_config
from geo_dino.run import engine, progress
from geo_dino.run import stages as pl
from geo_dino.run.chunks import announce_inference
from geo_dino.run.runlog import run_log


class _TaskOptions(TypedDict):
    cache_policy: CachePolicy
    persist_result: bool


_TASK: _TaskOptions = {"cache_policy": NO_CACHE, "persist_result": False}


def _retry_safe(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only what a retry can mend: not the project's own errors (a refusal, a bad input, a full disk
    is said once and left to the user)."""
    from geo_dino.errors import GeoDinoError

    try:
        state.result()
    except GeoDinoError:
        return False
    except Exception:
        return True
    return False


def _attempt(run_dir: str) -> None:
    """On a retry (the task's second run or later), record it (``retried``) and put the record back to
    ``started`` where the failed attempt had ended it: the stage runs again."""
    from prefect.runtime import task_run

    if (task_run.run_count or 1) > 1:
        rec = pl.folder.read_record(Path(run_dir))
        retried = {"task": task_run.name, "attempt": task_run.run_count, "error": rec.get("error")}
        if rec.get("status") == "failed":  # the stage recorded its failure: it runs again now
            pl.update_record(Path(run_dir), status="started", retried=retried)
        else:  # a timeout stops a stage before it can record anything
            pl.update_record(Path(run_dir), retried=retried)


def _options(task_fn: Any, ex: ExecutionConfig, kind: str, retry: bool = True) -> Any:
    """``task_fn`` with the run's timeout for ``kind`` and, where a retry is safe, its retries with
    exponential back-off."""
    from prefect.tasks import exponential_backoff

    opts: dict[str, Any] = {"timeout_seconds": ex.timeouts_s.get(kind)}  # type: ignore[call-overload]
    if retry and ex.retries:
        opts |= {"retries": ex.retries, "retry_delay_seconds": exponential_backoff(ex.retry_delay_s or 0.0),
                 "retry_condition_fn": _retry_safe}
    return task_fn.with_options(**opts)


@task(name="prepare-run", **_TASK)
def prepare(cfg: RunConfig, flow_run_id: str | None, deployment: str | None = None,
            aoi_text: str | None = None) -> str:
    """Create the run folder with its resolved config (and the submitted AOI); return its path."""
    return str(pl.prepare_run(cfg, flow_run_id=flow_run_id, deployment=deployment, aoi_text=aoi_text))


@task(name="validate-and-screen-aoi", **_TASK)
def screen(run_dir: str) -> dict[str, Any]:
    """Validate the AOI and screen it against the sensitive-site registry; the decision."""
    _attempt(run_dir)
    return pl.screen_aoi(Path(run_dir))


@task(name="plan-tiles", **_TASK)
def plan(run_dir: str) -> dict[str, Any]:
    """Lay the tile grid over the AOI and save the plan; tile and chunk counts and the region."""
    _attempt(run_dir)
    return pl.plan_run(Path(run_dir))


@task(name="fit-label-free-heads", **_TASK)
def fit(run_dir: str) -> dict[str, Any]:
    """Fit the label-free heads (PCA, k-means), then create the outputs' intermediates."""
    _attempt(run_dir)
    out = pl.fit_heads(Path(run_dir))
    pl.init_outputs(Path(run_dir))
    return out


@task(name="infer-chunk", **_TASK)
def infer(run_dir: str, chunk: int, threads: int | None = None) -> dict[str, Any]:
    """Run chunk number ``chunk`` of tile rows (independent of the others) and write its rows; on a Dask
    worker, with ``threads`` torch threads."""
    _attempt(run_dir)
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
    infer_task = _options(infer, ex, "chunk")
    futures = [infer_task.submit(run_dir, c, ex.threads_per_worker) for c in chunks]
    for n, fut in enumerate(as_completed(futures), 1):
        r = fut.result()
        progress.advance(run_dir, r["tiles"])  # the workers count in their own processes
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
    _attempt(run_dir)
    return pl.finalize_outputs(Path(run_dir))


#: the flow run's label naming its run folder (read by the hooks when the run stops outside its stages)
RUN_DIR_LABEL = "geo_dino.run_dir"


def _label_run_dir(flow_run_id: str | None, run_dir: str) -> None:
    """Put the run folder on the flow run (a label), so a hook that runs in another process (the worker's,
    after this process was killed) finds it."""
    if not flow_run_id:
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.update_flow_run_labels(flow_run_id, {RUN_DIR_LABEL: run_dir})  # type: ignore[arg-type]


def run_folder_of(flow_run: Any) -> Path | None:
    """The run folder of a flow run of ``run_aoi``: from its label (read again from the API: the hook's
    copy of the flow run may predate it), else from its parameters' output folder."""
    labels = dict(getattr(flow_run, "labels", None) or {})
    if RUN_DIR_LABEL not in labels:
        try:
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as client:
                labels = dict(client.read_flow_run(flow_run.id).labels or {})
        except Exception:  # the API may be gone; the parameters may still say where
            labels = {}
    if labels.get(RUN_DIR_LABEL):
        return Path(str(labels[RUN_DIR_LABEL]))
    params = getattr(flow_run, "parameters", None) or {}
    try:
        if params.get("config_path"):
            cfg = load_config(params["config_path"], params.get("overrides"))
        elif params.get("config") is not None:
            cfg = parse_config(params["config"])
        else:
            return None
    except Exception:  # a config that no longer loads: no folder to mark
        return None
    return pl.find_run_folder(cfg.output_dir, str(flow_run.id))


def give_back_slot(run_dir: Path) -> bool:
    """The slot a stopped run still holds (its record names the lease and no release: the process died
    inside its inference) is given back now, and the record says so; returns whether one was."""
    from datetime import UTC, datetime

    from flows.slots import give_back

    slot = pl.folder.read_record(run_dir).get("execution_slot") or {}
    if not slot.get("lease_id") or slot.get("released_at"):
        return False
    try:
        give_back(slot["lease_id"])
    except Exception as exc:  # the server unreachable: the lease runs out by itself (slot_lease_s)
        pl.update_record(run_dir, execution_slot=slot | {"release_failed": f"{type(exc).__name__}: {exc}"})
        return False
    pl.update_record(run_dir, execution_slot=slot | {"released_at": datetime.now(UTC).isoformat(),
                                                     "released_by": "the run's stop hook"})
    return True


def _stopped(status: str) -> Any:
    """A flow-run state hook that records ``status`` (``failed``, ``crashed``, ``cancelled``) with the
    state's message in the run's record, unless the record already ended (its stages say why)."""

    def hook(flow: Any, flow_run: Any, state: Any) -> None:
        run_dir = run_folder_of(flow_run)
        if run_dir is not None and run_dir.is_dir():
            reason = f"{state.name}: {state.message}" if state.message else state.name
            give_back_slot(run_dir)
            pl.folder.mark_stopped(run_dir, status, reason)

    hook.__name__ = f"record_{status}"
    return hook


@flow(name="run_aoi", log_prints=True, on_failure=[_stopped("failed")], on_crashed=[_stopped("crashed")],
      on_cancellation=[_stopped("cancelled")])
def run_aoi(config_path: str | None = None, config: dict[str, Any] | None = None,
            overrides: dict[str, Any] | None = None, aoi_geojson: str | None = None,
            slots: str | None = None) -> str:
    """Run the pipeline for one AOI. Give a YAML ``config_path`` or a ``config`` mapping; ``aoi_geojson``:
    the AOI's GeoJSON text itself (a submission: it replaces the config's AOI); ``slots``: the global
    concurrency limit the inference holds a slot of (``execution.slots``; a deployment sets it, so a
    submission's ``overrides`` leave it). Returns the run folder."""
    from prefect.runtime import deployment, flow_run

    log = get_run_logger()
    if config_path is not None:
        cfg = load_config(config_path, overrides)
    elif config is not None:
        cfg = parse_config(config)
    else:
        raise ValueError("give config_path or config")
    if slots is not None and cfg.execution.slots is None:
        cfg = cfg.model_copy(update={"execution": cfg.execution.model_copy(update={"slots": slots})})
    ex = cfg.execution
    run_dir = prepare(cfg, flow_run.get_id(), deployment.name, aoi_geojson)  # deployment None unless one
    _label_run_dir(flow_run.get_id(), run_dir)
    with run_log(Path(run_dir)):
        try:
            log.info("run folder: %s", run_dir)
            t0 = time.perf_counter()
            decision = _options(screen, ex, "screen")(run_dir)
            log.info("screening: %s (%d sites hit)", decision["action"], decision["hits"])
            p = _options(plan, ex, "plan")(run_dir)
            log.info("%d tiles in %d chunks over region %s", p["n_tiles"], p["n_chunks"], p["region"])
            _options(fit, ex, "fit")(run_dir)
            t_inf = time.perf_counter()
            with inference_slot(run_dir, ex), progress_artifact(run_dir, p["n_tiles"]):
                run_chunks(run_dir, ex, cfg.backbone.device)
            t_out = time.perf_counter()
            outputs = _options(finalize, ex, "write")(run_dir)
            pl.complete_run(Path(run_dir), {"infer": round(t_out - t_inf, 3),
                                            "total_flow": round(time.perf_counter() - t0, 3)})
            log.info("wrote %d outputs", len(outputs))
        finally:  # refused and failed runs get their report too
            final_report(run_dir)
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


@contextmanager
def inference_slot(run_dir: str, ex: ExecutionConfig) -> Iterator[None]:
    """Hold a slot of the Prefect global concurrency limit ``execution.slots`` (e.g. ``gpu``) for the
    inference, so N slots serve N runs at once across every deployment; the wait, the time it was taken and
    given back go into the record (``execution_slot``). No ``slots``: nothing is held."""
    if not ex.slots:
        yield
        return
    from datetime import UTC, datetime

    from prefect.runtime import flow_run

    from flows.slots import lease_slot

    asked = time.perf_counter()
    log = get_run_logger()
    log.info("waiting for a slot of the concurrency limit %r", ex.slots)
    try:
        with lease_slot(ex.slots, ex.slot_timeout_s, ex.slot_lease_s, flow_run.get_id()) as lease_id:
            taken, held = datetime.now(UTC), time.perf_counter()
            slot = {"limit": ex.slots, "waited_s": round(held - asked, 3), "acquired_at": taken.isoformat(),
                    "lease_id": lease_id, "lease_s": ex.slot_lease_s}
            log.info("slot of %r taken after %.1fs", ex.slots, held - asked)
            pl.update_record(Path(run_dir), execution_slot=slot)
            try:
                yield
            finally:
                pl.update_record(Path(run_dir), execution_slot=slot | {
                    "released_at": datetime.now(UTC).isoformat(),
                    "held_s": round(time.perf_counter() - held, 3)})
    except Exception as exc:
        from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError

        if isinstance(exc, ConcurrencySlotAcquisitionError | TimeoutError):
            from geo_dino.errors import ConfigError

            raise ConfigError(f"execution.slots: no slot of the concurrency limit {ex.slots!r} ({exc}); "
                              f"create it with `prefect gcl create {ex.slots} --limit N` (N: the GPUs), or "
                              "wait for the runs that hold its slots") from exc
        raise


def run_chunks(run_dir: str, execution: ExecutionConfig, device: str) -> None:
    """The chunks that have no result yet: one task after another (serial), or on a Dask cluster through
    the prefect-dask task runner; then the engine and the chunks' timings in the record."""
    log = get_run_logger()
    todo = pl.missing_chunks(Path(run_dir))
    announce_inference(Path(run_dir))
    t0 = time.perf_counter()
    if execution.engine == "serial":
        n = 0
        infer_task = _options(infer, execution, "chunk")
        for k, c in enumerate(todo, 1):
            r = infer_task(run_dir, c)
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
    with run_log(path):
        try:
            pl.folder.reserve_space(path)
            todo = pl.missing_chunks(path)
            log.info("resuming %s: %d chunks to compute", run_dir, len(todo))
            t0 = time.perf_counter()
            with progress_artifact(run_dir, pl.load_plan(path).tiling.n_tiles):
                run_chunks(run_dir, ex, cfg.backbone.device)
            finalize(run_dir)
            pl.update_record(path, resumed={"chunks_missing": todo, "engine": ex.engine})
            pl.complete_run(path, {"infer_after_resume": round(time.perf_counter() - t0, 3)})
        finally:
            final_report(run_dir)
    return run_dir
