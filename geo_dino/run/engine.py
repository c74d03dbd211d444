"""Where a run's chunk tasks run: in the run's own process, or on a Dask cluster (the config's ``execution``).

``serial`` runs the chunks one after another in this process. ``dask`` runs them on a ``dask.distributed``
cluster: a LocalCluster started for the run (worker processes with ``threads_per_worker`` torch threads each
on CPU; one worker per visible GPU, each seeing its own through ``CUDA_VISIBLE_DEVICES``), or the cluster
whose scheduler is at ``execution.address`` (started by the site: ``dask scheduler`` and ``dask worker``,
dask-jobqueue, Kubernetes). Workers must see the run folder at the same path. A worker keeps the backbone
and the trained head between chunks (:mod:`geo_dino.run.resources`): they are loaded once per worker. A
worker that dies mid-chunk has its chunk run again on another (Dask reschedules the task; a chunk run twice
writes the same rows and the same result). Chunks are independent (:mod:`geo_dino.run.inference`), so the
outputs equal the serial run's, whatever the workers and the order the chunks finish in.

Without Prefect, :func:`run_chunks` drives the cluster with a ``distributed.Client``; in the ``run_aoi`` flow
(``flows/``), Prefect's ``DaskTaskRunner`` (prefect-dask) runs the chunk tasks on the same kind of cluster
(:func:`local_cluster`, :func:`worker_specs`). The library itself never imports Prefect.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geo_dino.errors import ConfigError

if TYPE_CHECKING:
    from distributed import Client, SpecCluster

    from geo_dino.config import ExecutionConfig


def visible_gpus() -> list[str]:
    """The GPUs this process may use (``CUDA_VISIBLE_DEVICES`` as set, else every device torch counts)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def worker_specs(workers: int, threads: int, device: str) -> list[dict[str, Any]]:
    """The worker processes of a local cluster: ``(nthreads, env)`` each. On a GPU run (``device`` ``cuda``,
    or ``auto`` with a GPU visible) one worker per visible GPU (``workers`` at most, when given), each with
    ``CUDA_VISIBLE_DEVICES`` set to its own; on CPU ``workers`` processes (0: one per core), each with
    ``threads`` torch/BLAS threads."""
    gpus = visible_gpus() if device != "cpu" else []
    if device == "cuda" and not gpus:
        raise ConfigError("backbone.device: cuda, but no GPU is visible to start workers on")
    limit = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
             "OPENBLAS_NUM_THREADS": str(threads)}
    if gpus:
        gpus = gpus[:workers] if workers else gpus
        return [{"nthreads": 1, "env": limit | {"CUDA_VISIBLE_DEVICES": g}} for g in gpus]
    n = workers or os.cpu_count() or 1
    return [{"nthreads": 1, "env": limit | {"CUDA_VISIBLE_DEVICES": ""}} for _ in range(n)]


def local_cluster(specs: Sequence[dict[str, Any]], **kwargs: Any) -> SpecCluster:
    """A LocalCluster-like cluster on 127.0.0.1 of one worker process (a Nanny) per spec in ``specs``
    (:func:`worker_specs`), no dashboard; ``kwargs`` go to ``SpecCluster``."""
    import logging

    import dask
    from distributed import Nanny, Scheduler, SpecCluster

    for name in ("distributed.scheduler", "distributed.nanny", "distributed.core", "distributed.http.proxy",
                 "distributed.worker"):  # their start/stop lines are not the run's news
        logging.getLogger(name).setLevel(logging.WARNING)
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard": False}}
    workers = {f"geo-dino-{i}": {"cls": Nanny, "options": {"nthreads": s["nthreads"], "env": dict(s["env"]),
                                                           "host": "127.0.0.1", "silence_logs": 40}}
               for i, s in enumerate(specs)}
    # distributed sets MALLOC_TRIM_THRESHOLD_ in its workers, which turns glibc's dynamic mmap threshold off:
    # every array over 128 KiB is then mapped, zeroed and unmapped again (measured: a chunk 2.5× slower than
    # in the run's own process); the workers keep glibc's defaults instead
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        return SpecCluster(workers=workers, scheduler=scheduler, name="geo_dino", **kwargs)


@contextmanager
def dask_client(execution: ExecutionConfig, device: str) -> Iterator[Client]:
    """A client of the run's cluster: the one at ``execution.address``, or a local cluster started here and
    closed on exit."""
    from distributed import Client

    if execution.address:
        try:
            client = Client(execution.address, timeout="10s")
        except OSError as exc:
            raise ConfigError(f"execution.address {execution.address}: no Dask scheduler answers there "
                              f"({exc}); start one (`dask scheduler`) or leave address unset") from None
        with client:
            if not client.scheduler_info()["workers"]:
                client.wait_for_workers(1, timeout=60)
            yield client
        return
    specs = worker_specs(execution.workers, execution.threads_per_worker, device)
    with local_cluster(specs) as cluster, Client(cluster) as client:
        client.wait_for_workers(len(specs), timeout=120)
        yield client


def cluster_record(client: Client, execution: ExecutionConfig) -> dict[str, Any]:
    """The engine as the record holds it: scheduler, every worker (address, threads, host, devices)."""
    info = client.scheduler_info()
    envs = client.run(lambda: {"pid": os.getpid(),
                               "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")})
    workers = []
    for addr, w in sorted(info["workers"].items()):
        e = envs.get(addr, {})
        workers.append({"address": addr, "name": str(w.get("name")), "nthreads": w.get("nthreads"),
                        "host": w.get("host"), "pid": e.get("pid"),
                        "cuda_visible_devices": e.get("cuda_visible_devices")})
    return {"engine": "dask", "scheduler": info.get("address"),
            "cluster": "external" if execution.address else "local", "n_workers": len(workers),
            "threads_per_worker": execution.threads_per_worker, "workers": workers}


def chunk_task(run_dir: str, chunk: int, threads: int) -> dict[str, Any]:
    """One chunk in a worker process: torch limited to ``threads`` threads (CPU), then
    :func:`~geo_dino.run.chunks.infer_chunk`."""
    import torch

    from geo_dino.run.chunks import infer_chunk

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return infer_chunk(Path(run_dir), chunk)


def serial_record() -> dict[str, Any]:
    """The engine as the record holds it when the chunks ran in this process."""
    return {"engine": "serial", "n_workers": 1, "workers": [{"address": "local", "pid": os.getpid()}]}


def run_chunks(run_dir: Path, chunks: Sequence[int], execution: ExecutionConfig, device: str,
               progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run ``chunks`` of the run on its engine; ``progress`` is called with each chunk's timing as it
    completes. Returns the engine's record (engine, workers, devices)."""
    from geo_dino.run import progress as bus
    from geo_dino.run.chunks import announce_inference, infer_chunk

    announce_inference(run_dir)
    if execution.engine == "serial":
        for c in chunks:
            r = infer_chunk(run_dir, c)
            if progress:
                progress(r)
        return serial_record()
    from distributed import as_completed

    with dask_client(execution, device) as client:
        record = cluster_record(client, execution)
        n = record["n_workers"]
        if 0 < len(chunks) < 4 * n:
            import warnings

            # measured (bench/scale.py, ViT-S/16): 11 chunks on 2 workers ran at 0.88 of one process, 22: 0.99
            warnings.warn(f"{len(chunks)} chunks for {n} workers: some workers will wait at the end; lower "
                          "tiling.chunk_tiles for four chunks or more per worker", stacklevel=2)
        futures = [client.submit(chunk_task, str(run_dir), c, execution.threads_per_worker,
                                 key=f"geo-dino-chunk-{Path(run_dir).name}-{c}", pure=False, retries=1)
                   for c in chunks]
        for fut in as_completed(futures):
            r = fut.result()  # a chunk that failed twice raises here: the run fails, its results stay
            bus.advance(run_dir, r["tiles"])  # the worker counted its tiles in its own process, unheard
            if progress:
                progress(r)
    return record
