"""Scale-out: one process × N threads against N Dask worker processes × 1 thread, on the same run.

For each size (synthetic uint8 3-band COGs from ``bench/e2e.py``: 4096², and 16384² unless ``--quick``) the
same config runs twice up to its chunks (screen, plan, fit the heads, create the outputs' store), then its
chunks run

* **serial**: one after another in this process, torch with ``--threads`` threads (2 on a 2-core machine);
* **dask**: on a LocalCluster of ``--workers`` worker processes with one torch thread each
  (:mod:`geo_dino.run.engine`), timed after the workers are warm (imports, model loaded: once per worker,
  timed apart) and with the cluster's start and warm-up.

Figures: tiles/s of the chunk phase, the ratio dask / serial (goal ≥ 0.95: distribution costs nothing), every
output raster compared pixel for pixel between the two runs, each worker's peak RSS (the 16384² / 4096²
ratio, goal ≤ 1.5, per worker), the scheduling overhead per chunk (no-op tasks through the same cluster, and
wall × workers − Σ chunk compute), and a scaling model: tiles/s for 1–64 workers from the measured
per-worker rate, per-chunk overhead and the serial parts (fit, merge + COGs).

    python bench/scale.py                 # 4096² and 16384² (16384²: several minutes on 2 cores)
    python bench/scale.py --quick         # 4096² only
    python bench/scale.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.e2e import machine_info, make_raster, synthetic_config, table, write_aoi  # noqa: E402


def _started(cfg: dict[str, Any]) -> tuple[Path, dict[str, float]]:
    from geo_dino.config import parse_config
    from geo_dino.run import stages as pl

    t = {}
    t0 = time.perf_counter()
    run = pl.prepare_run(parse_config(cfg))
    pl.screen_aoi(run)
    pl.plan_run(run)
    t["plan"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pl.fit_heads(run)
    pl.init_outputs(run)
    t["fit"] = time.perf_counter() - t0
    return run, t


def _finish(run: Path, t: dict[str, float]) -> None:
    from geo_dino.run import stages as pl

    t0 = time.perf_counter()
    pl.finalize_outputs(run)
    t["finalize"] = time.perf_counter() - t0
    pl.complete_run(run)


def noop_overhead(client: Any, n: int = 200) -> float:
    """Milliseconds per task of ``n`` no-op tasks submitted and gathered through ``client``."""
    def noop(i: int) -> int:
        return i

    client.gather(client.map(noop, range(20), pure=False))  # warm
    t0 = time.perf_counter()
    client.gather(client.map(noop, range(n), pure=False))
    return (time.perf_counter() - t0) / n * 1000


def warm_worker(run_dir: str, threads: int) -> float:
    """Load what a chunk task needs in this worker (imports, the backbone, the head): seconds."""
    t0 = time.perf_counter()
    import importlib

    import torch

    for mod in ("geo_dino.run.chunks", "geo_dino.run.writing", "geo_dino.run.intermediates", "xarray", "zarr",
                "rioxarray", "shapely", "rasterio.features", "pyproj", "geo_dino.models.change",
                "geo_dino.outputs.cog", "xarray.backends.zarr", "dask.array"):
        importlib.import_module(mod)

    from geo_dino.run import resources
    from geo_dino.run.folder import load_config, load_plan

    torch.set_num_threads(threads)
    cfg, plan = load_config(Path(run_dir)), load_plan(Path(run_dir))
    resources.extractor(cfg, plan)
    resources.head_runner(plan)
    return time.perf_counter() - t0


def run_size(tmp: Path, size: int, arch: str, batch: int, threads: int, workers: int,
             chunk_tiles: int) -> dict[str, Any]:
    import numpy as np
    import rasterio
    import torch
    from distributed import Client

    from geo_dino.config import ExecutionConfig
    from geo_dino.run import stages as pl
    from geo_dino.run.engine import cluster_record, local_cluster, run_chunks, worker_specs
    from geo_dino.run.folder import load_plan

    raster = tmp / f"syn_{size}.tif"
    aoi = tmp / f"syn_{size}.geojson"
    if not raster.exists():
        print(f"making {raster.name} ...", flush=True)
        make_raster(raster, size)
        write_aoi(raster, aoi)
    out: dict[str, Any] = {"size": size, "threads": threads, "workers": workers, "arch": arch}
    # serial: the chunks in this process
    cfg = synthetic_config(raster, aoi, tmp / "runs", arch, batch)
    cfg["tiling"]["chunk_tiles"] = chunk_tiles
    cfg["name"] = f"serial-{size}"
    torch.set_num_threads(threads)
    run_s, ts = _started(cfg)
    plan = load_plan(run_s)
    n_tiles, n_chunks = plan.tiling.n_tiles, plan.tiling.n_chunks
    t0 = time.perf_counter()
    run_chunks(run_s, list(range(n_chunks)), ExecutionConfig(engine="serial"), "cpu")
    ts["chunks"] = time.perf_counter() - t0
    serial_chunks = pl.chunk_timings(run_s)
    _finish(run_s, ts)
    print(f"{size}²: serial chunks {ts['chunks']:.1f} s for {n_tiles} tiles", flush=True)
    # dask: the same config on a local cluster of worker processes, one thread each
    cfg["name"] = f"dask-{size}"
    cfg["execution"] = {"engine": "dask", "workers": workers, "threads_per_worker": 1}
    run_d, td = _started(cfg)
    t_start = time.perf_counter()
    with local_cluster(worker_specs(workers, 1, "cpu")) as cluster, Client(cluster) as client:
        client.wait_for_workers(workers)
        td["cluster_start"] = time.perf_counter() - t_start
        rec = cluster_record(client, ExecutionConfig(engine="dask", workers=workers))
        overhead_ms = noop_overhead(client)
        t0 = time.perf_counter()
        warm = client.run(warm_worker, str(run_d), 1)
        td["warm_up"] = time.perf_counter() - t0
        ex = ExecutionConfig(engine="dask", address=cluster.scheduler_address)
        t0 = time.perf_counter()
        run_chunks(run_d, list(range(n_chunks)), ex, "cpu")
        td["chunks"] = time.perf_counter() - t0
    dask_chunks = pl.chunk_timings(run_d)
    pl.record_execution(run_d, rec, list(range(n_chunks)), td["chunks"])
    _finish(run_d, td)
    print(f"{size}²: dask chunks {td['chunks']:.1f} s (+ cluster start {td['cluster_start']:.1f} s)",
          flush=True)
    # identical outputs?
    same, compared = True, 0
    for p in sorted(run_s.glob("*.tif")):
        with rasterio.open(p) as a, rasterio.open(run_d / p.name) as b:
            for _, win in a.block_windows(1):
                if not np.array_equal(a.read(window=win), b.read(window=win), equal_nan=True):
                    same = False
                    break
        compared += 1
    busy = sum(c["seconds"] for c in dask_chunks)
    per_chunk_overhead = (td["chunks"] * workers - busy) / n_chunks
    out.update({
        "tiles": n_tiles, "chunks": n_chunks, "tiles_per_chunk": n_tiles / n_chunks,
        "serial": {"chunk_phase_s": ts["chunks"], "tiles_per_s": n_tiles / ts["chunks"],
                   "fit_s": ts["fit"], "finalize_s": ts["finalize"], "plan_s": ts["plan"],
                   "peak_rss_mib": max(c["peak_rss_mib"] or 0 for c in serial_chunks)},
        "dask": {"chunk_phase_s": td["chunks"], "tiles_per_s": n_tiles / td["chunks"],
                 "with_cluster_start_tiles_per_s": n_tiles / (td["chunks"] + td["cluster_start"]
                                                              + td["warm_up"]),
                 "cluster_start_s": td["cluster_start"], "fit_s": td["fit"], "finalize_s": td["finalize"],
                 "worker_warm_up_s": td["warm_up"], "warm_up_per_worker_s": warm,
                 "chunk_compute_s": busy, "per_worker_tiles_per_s": n_tiles / busy,
                 "worker_peak_rss_mib": {c["worker"]: c["peak_rss_mib"] for c in dask_chunks},
                 "noop_task_ms": overhead_ms, "overhead_per_chunk_s": per_chunk_overhead},
        "outputs_identical": same, "outputs_compared": compared,
    })
    out["ratio"] = out["dask"]["tiles_per_s"] / out["serial"]["tiles_per_s"]
    out["ratio_with_start"] = out["dask"]["with_cluster_start_tiles_per_s"] / out["serial"]["tiles_per_s"]
    return out


def scaling_model(r: dict[str, Any], ns: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)) -> list[dict[str, Any]]:
    """Tiles/s for ``n`` workers from one measured size: each worker computes a chunk in ``c`` s (its
    measured per-worker rate) plus the measured per-chunk overhead ``o``; chunks go out in waves of ``n``;
    the serial parts (fit before, merge + COGs after) do not shrink."""
    import math

    d = r["dask"]
    c = r["tiles_per_chunk"] / d["per_worker_tiles_per_s"]
    o = max(d["overhead_per_chunk_s"], d["noop_task_ms"] / 1000)
    serial_parts = d["fit_s"] + d["finalize_s"]
    rows = []
    for n in ns:
        waves = math.ceil(r["chunks"] / n)
        chunk_phase = waves * (c + o)
        rows.append({"workers": n, "chunk_phase_tiles_per_s": r["tiles"] / chunk_phase,
                     "end_to_end_tiles_per_s": r["tiles"] / (chunk_phase + serial_parts)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4096² only")
    ap.add_argument("--sizes", type=int, nargs="*")
    ap.add_argument("--arch", default="vit_tiny_patch16_dinov3_test")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--chunk-tiles", type=int, default=64)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sizes = args.sizes or ([4096] if args.quick else [4096, 16384])
    info = machine_info()
    results = []
    with tempfile.TemporaryDirectory(prefix="geo_dino_scale_") as d:
        for size in sizes:
            results.append(run_size(Path(d), size, args.arch, args.batch, args.threads, args.workers,
                                    args.chunk_tiles))
    for r in results:
        s, k = r["serial"], r["dask"]
        compute = r["tiles_per_chunk"] / k["per_worker_tiles_per_s"]
        rss = max(v or 0 for v in k["worker_peak_rss_mib"].values())
        table(f"{r['size']}², {r['tiles']} tiles in {r['chunks']} chunks ({r['arch']})", [
            (f"serial, 1 process × {r['threads']} threads", f"{s['tiles_per_s']:.1f} tiles/s "
                                                              f"({s['chunk_phase_s']:.1f} s)"),
            (f"dask, {r['workers']} workers × 1 thread", f"{k['tiles_per_s']:.1f} tiles/s "
                                                        f"({k['chunk_phase_s']:.1f} s)"),
            ("dask / serial (goal ≥ 0.95)", f"{r['ratio']:.3f}"),
            ("  counting the cluster's start and warm-up",
             f"{r['ratio_with_start']:.3f} (start {k['cluster_start_s']:.1f} s, warm-up "
             f"{k['worker_warm_up_s']:.1f} s: imports and the model, once per worker)"),
            ("outputs identical", f"{r['outputs_identical']} ({r['outputs_compared']} rasters)"),
            ("no-op task round trip", f"{k['noop_task_ms']:.2f} ms"),
            ("overhead per chunk (wall × workers − compute)",
             f"{k['overhead_per_chunk_s'] * 1000:.0f} ms vs {compute:.2f} s compute"),
            ("peak RSS serial / per worker (MiB)", f"{s['peak_rss_mib']:.0f} / {rss:.0f}"),
        ])
        table(f"scaling model from {r['size']}²", [(f"{m['workers']} workers",
                                                     f"chunks {m['chunk_phase_tiles_per_s']:.0f} tiles/s, "
                                                     f"end to end {m['end_to_end_tiles_per_s']:.0f} tiles/s")
                                                    for m in scaling_model(r)])
    if len(results) > 1:
        a, b = results[0]["dask"], results[-1]["dask"]
        ra = max(v or 0 for v in a["worker_peak_rss_mib"].values())
        rb = max(v or 0 for v in b["worker_peak_rss_mib"].values())
        print(f"\nper-worker peak RSS {results[-1]['size']}² / {results[0]['size']}²: "
              f"{rb:.0f} / {ra:.0f} MiB = {rb / ra:.2f} (goal ≤ 1.5)")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results,
                                         "models": {r["size"]: scaling_model(r) for r in results}}, indent=2))


if __name__ == "__main__":
    main()
