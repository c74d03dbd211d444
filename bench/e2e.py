#!/usr/bin/env python
"""End-to-end performance of geo_dino: figures and ratios against baselines run in the same process.

Sections (``--only demo|synthetic|reads``; all by default):

* demo       the bundled Landsat job (configs/demo.yaml) through the Prefect flow, then stage by stage without
             Prefect, then the backbone alone (``dense_features``) on the same tiles, read and preprocessed up
             front. Prints tiles/s, km²/s, peak RSS and pipeline/backbone ratios (goal: inference ≥ 0.90).
* synthetic  synthetic uint8 3-band COGs (4096², and 16384² unless ``--quick``) in EPSG:32618 with
             10 m pixels, each run stage by stage in its own subprocess (peak RSS per run), with the tiny test
             backbone by default. Goal: RSS(16384²) / RSS(4096²) ≤ 1.5.
* reads      224-px window reads of a synthetic raster: ``WindowReader.read`` vs plain rasterio vs torchgeo
             ``RasterDataset`` + ``GridGeoSampler`` + ``DataLoader``. Goal: ours / torchgeo ≥ 4.

Performance is measured here, never as timed tests. Everything is written under a temporary folder that is
deleted at the end; nothing is written in the repository.

    python bench/e2e.py                 # everything (16384² included: long on a 2-core CPU box)
    python bench/e2e.py --quick         # skip 16384²
    python bench/e2e.py --only demo
    python bench/e2e.py --only synthetic --sizes 16384
    python bench/e2e.py --only reads --reads-size 16384
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from geo_dino.run import resources
from geo_dino.run.folder import load_plan

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CHILD_TAG = "BENCH_JSON "
# A remote spot in the Atlantic east of the Bahamas (UTM 18N): no registry site within reach, screen "allow".
SYN_ORIGIN = (700_000.0, 2_800_000.0)
SYN_RES = 10.0


# ------------------------------------------------------------------------------------------------ helpers
def peak_rss_mib() -> float:
    """Peak RSS of this process in MiB: VmHWM of /proc/self/status (the high-water mark of this process's own
    address space). ``getrusage(RUSAGE_SELF).ru_maxrss`` is not used: on Linux it carries over across exec, so
    a child started with vfork/exec by a big parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def machine_info() -> dict[str, Any]:
    import rasterio
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    vers = {"python": platform.python_version(), "torch": torch.__version__, "rasterio": rasterio.__version__,
            "gdal": rasterio.__gdal_version__}
    for mod in ("timm", "torchgeo", "prefect", "rio_cogeo", "numpy"):
        try:
            vers[mod] = __import__(mod).__version__
        except Exception:
            vers[mod] = "n/a"
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu,
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "ram": ram,
            "load_avg": os.getloadavg(), "versions": vers}


def table(title: str, rows: list[tuple[str, str]]) -> None:
    print(f"\n== {title} " + "=" * max(0, 76 - len(title)))
    w = max(len(k) for k, _ in rows) if rows else 0
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")
    sys.stdout.flush()


def km2(out_grid: dict[str, Any]) -> float:
    t = out_grid["transform"]
    return out_grid["height"] * out_grid["width"] * abs(t[0] * t[4]) / 1e6


# --------------------------------------------------------------------------------------------------- demo
def bench_demo(tmp: Path, reps: int) -> dict[str, Any]:
    import numpy as np
    import torch

    from geo_dino.config import load_config
    from geo_dino.inputs.sources import WindowReader
    from geo_dino.models.backbone import dense_features
    from geo_dino.run import stages as pl

    cfg_path = "configs/demo.yaml"
    res: dict[str, Any] = {}

    # 1) the whole job through the Prefect flow (ephemeral server started on the first flow call)
    from flows.run_aoi import run_aoi

    out_flow = tmp / "demo_flow"
    out_flow.mkdir()
    t0 = time.perf_counter()
    run_dir = Path(run_aoi(config_path=cfg_path, overrides={"output_dir": str(out_flow)}))
    res["flow_wall_s"] = time.perf_counter() - t0
    res["flow_peak_rss_mib"] = peak_rss_mib()
    state = load_plan(run_dir)
    rec = json.loads((run_dir / "provenance.json").read_text())
    res["flow_timings"] = rec.get("timings", {})
    n_tiles = state.tiling.n_tiles
    res["n_tiles"] = n_tiles
    res["fit_tiles"] = rec["heads"]["fit_tiles"]
    res["km2"] = km2(state.out_grid.record())
    res["out_grid"] = f"{state.out_grid.height}x{state.out_grid.width}"

    # 2) stage by stage, no Prefect; the model cache is cleared so fit_heads builds the model as in the flow
    resources.clear()
    cfg = load_config(cfg_path, {"output_dir": str(tmp / "demo_stages")})
    st: dict[str, float] = {}
    t_all = time.perf_counter()
    t = time.perf_counter(); rd = pl.prepare_run(cfg); st["prepare"] = time.perf_counter() - t  # noqa: E702
    t = time.perf_counter(); pl.screen_aoi(rd); st["screen"] = time.perf_counter() - t  # noqa: E702
    t = time.perf_counter(); plan = pl.plan_run(rd); st["plan"] = time.perf_counter() - t  # noqa: E702
    t = time.perf_counter(); pl.fit_heads(rd); st["fit_heads (incl. model build)"] = time.perf_counter() - t  # noqa: E702
    t = time.perf_counter(); pl.init_outputs(rd); st["init_outputs"] = time.perf_counter() - t  # noqa: E702
    t = time.perf_counter()
    for c in range(plan["n_chunks"]):
        pl.infer_chunk(rd, c)
    st["infer (all chunks)"] = time.perf_counter() - t
    t = time.perf_counter(); pl.finalize_outputs(rd); st["finalize"] = time.perf_counter() - t  # noqa: E702
    t = time.perf_counter(); pl.complete_run(rd); st["complete"] = time.perf_counter() - t  # noqa: E702
    res["stages"] = st
    res["stages_total_s"] = time.perf_counter() - t_all

    # extra repetitions of the inference stage alone (same run folder, fresh intermediates), to see the spread
    infer_reps = [st["infer (all chunks)"]]
    for _ in range(reps - 1):
        pl.init_outputs(rd)
        t = time.perf_counter()
        for c in range(plan["n_chunks"]):
            pl.infer_chunk(rd, c)
        infer_reps.append(time.perf_counter() - t)
    res["infer_reps_s"] = infer_reps

    # 3) backbone alone: the same tile windows, read and preprocessed up front (not timed), same batch size
    state2 = load_plan(rd)
    extractor, _spec = resources.extractor(cfg, state2)
    tiles = list(state2.tile_grid())
    bs = cfg.backbone.batch_size
    with WindowReader(state2.infos()[0]) as r:
        reads = [r.read(tl.box) for tl in tiles]
    batches = []
    for k in range(0, len(reads), bs):
        data = np.stack([d for d, _ in reads[k:k + bs]])
        valid = np.stack([v for _, v in reads[k:k + bs]])
        batches.append(torch.from_numpy(extractor.pre(data, valid)))
    model = extractor.model
    # warm-up (the pipeline's inference also runs after fit_heads warmed up)
    dense_features(model, batches[0])
    bb = []
    for _ in range(reps):
        t = time.perf_counter()
        for x in batches:
            dense_features(model, x)
        bb.append(time.perf_counter() - t)
    res["backbone_reps_s"] = bb
    res["batch_size"] = bs
    res["arch"] = cfg.backbone.arch
    return res


def report_demo(r: dict[str, Any]) -> None:
    import statistics as stt

    n = r["n_tiles"]
    inf_med = stt.median(r["infer_reps_s"])
    bb_med = stt.median(r["backbone_reps_s"])
    bb_best = min(r["backbone_reps_s"])
    flow_inf = r["flow_timings"].get("infer")
    e2e_stage = r["stages_total_s"]
    rows = [
        ("job", f'configs/demo.yaml, {r["arch"]}, batch {r["batch_size"]}, {n} tiles of 224² '
                f'(+{r["fit_tiles"]} tiles re-run by fit_heads), output grid {r["out_grid"]}, '
                f'{r["km2"]:.0f} km²'),
        ("Prefect flow: end-to-end", f'{r["flow_wall_s"]:.2f} s  -> {n / r["flow_wall_s"]:.2f} tiles/s, '
                                     f'{r["km2"] / r["flow_wall_s"]:.0f} km²/s '
                                     '(incl. ephemeral server start)'),
        ("Prefect flow: total_flow", f'{r["flow_timings"].get("total_flow", float("nan")):.2f} s '
                                     '(screen→finalize, from provenance)'),
        ("Prefect flow: inference",
         f'{flow_inf:.2f} s  -> {n / flow_inf:.2f} tiles/s' if flow_inf else "n/a"),
        ("Prefect flow: peak RSS", f'{r["flow_peak_rss_mib"]:.0f} MiB (this process; the Prefect server is a '
                                   'separate process)'),
    ]
    for k, v in r["stages"].items():
        rows.append((f"stage {k}", f"{v:.3f} s"))
    rows += [
        ("stages: end-to-end", f'{e2e_stage:.2f} s -> {n / e2e_stage:.2f} tiles/s, '
                               f'{r["km2"] / e2e_stage:.0f} km²/s'),
        ("stages: inference reps", ", ".join(f"{v:.2f}" for v in r["infer_reps_s"])
         + f" s (median {inf_med:.2f} -> {n / inf_med:.2f} tiles/s, {r['km2'] / inf_med:.0f} km²/s)"),
        ("backbone alone reps", ", ".join(f"{v:.2f}" for v in r["backbone_reps_s"])
         + f" s (median {bb_med:.2f} -> {n / bb_med:.2f} tiles/s; best {n / bb_best:.2f})"),
        ("RATIO inference / backbone", f"{bb_med / inf_med:.3f} (median/median; goal >= 0.90) "
                                       f"[{'MET' if bb_med / inf_med >= 0.9 else 'MISSED'}]; "
                                       f"vs best backbone {bb_best / inf_med:.3f}"),
    ]
    if flow_inf:
        rows.append(("RATIO flow inference / backbone",
                     f"{bb_med / flow_inf:.3f} (incl. Prefect task overhead)"))
    rows += [
        ("RATIO end-to-end(stages) / backbone", f"{bb_med / e2e_stage:.3f} (incl. screen, plan, fit_heads, "
                                                "finalize)"),
        ("RATIO end-to-end(flow) / backbone", f'{bb_med / r["flow_wall_s"]:.3f} (incl. Prefect)'),
        ("fit_heads backbone work", f'{r["fit_tiles"]} extra tile forwards = '
                                    f'{r["fit_tiles"] / n:.0%} of the job; '
                                    f'backbone-only bound for all forwards: '
                                    f'{bb_med * (n + r["fit_tiles"]) / n:.2f} s'),
    ]
    table(f"demo job (configs/demo.yaml: bundled Landsat 7, {r['arch']})", rows)


# ---------------------------------------------------------------------------------------------- synthetic
def make_raster(path: Path, size: int, *, block: int = 1024, seed: int = 0, compress: str = "DEFLATE",
                cog: bool = True) -> float:
    """A structured uint8 3-band raster written window by window (bounded memory): a tiled GeoTIFF, made a
    validated COG (512-px tiles, overviews) by GDAL's COG driver unless ``cog`` is False. Returns seconds."""
    import numpy as np
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    cell = 64
    lat = rng.uniform(0, 1, (3, size // cell + 2, size // cell + 2)).astype(np.float32)  # value-noise lattice
    cell2 = 512
    lat2 = rng.uniform(0, 1, (3, size // cell2 + 2, size // cell2 + 2)).astype(np.float32)
    angles = rng.uniform(0, np.pi, 3)
    periods = rng.uniform(40, 160, 3)
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:32618",
                   transform=Affine(SYN_RES, 0, SYN_ORIGIN[0], 0, -SYN_RES, SYN_ORIGIN[1]), tiled=True,
                   blockxsize=512, blockysize=512, interleave="pixel", compress=compress, predictor=2,
                   BIGTIFF="IF_SAFER")

    def noise(lattice: np.ndarray, c: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        fy, fx = rows / c, cols / c
        iy, ix = fy.astype(int), fx.astype(int)
        ty, tx = (fy - iy)[:, None], (fx - ix)[None, :]
        ty, tx = ty * ty * (3 - 2 * ty), tx * tx * (3 - 2 * tx)  # smoothstep
        a = lattice[:, iy][:, :, ix]
        b = lattice[:, iy][:, :, ix + 1]
        cc = lattice[:, iy + 1][:, :, ix]
        d = lattice[:, iy + 1][:, :, ix + 1]
        return (a * (1 - tx) + b * tx) * (1 - ty) + (cc * (1 - tx) + d * tx) * ty

    with rasterio.Env(GDAL_NUM_THREADS="ALL_CPUS", GDAL_CACHEMAX=128):
        with rasterio.open(path, "w", **profile) as dst:
            for r0 in range(0, size, block):
                for c0 in range(0, size, block):
                    h, w = min(block, size - r0), min(block, size - c0)
                    rows = np.arange(r0, r0 + h, dtype=np.float32)
                    cols = np.arange(c0, c0 + w, dtype=np.float32)
                    v = 0.55 * noise(lat2, cell2, rows, cols) + 0.3 * noise(lat, cell, rows, cols)
                    for b in range(3):
                        ph = ((cols[None, :] * np.cos(angles[b]) + rows[:, None] * np.sin(angles[b]))
                              / periods[b])
                        v[b] += 0.12 * np.sin(2 * np.pi * ph)
                    wrng = np.random.default_rng((seed, r0, c0))
                    v += wrng.normal(0, 0.03, v.shape).astype(np.float32)
                    arr = np.clip(v * 230 + 10, 1, 255).astype(np.uint8)
                    dst.write(arr, window=Window(c0, r0, w, h))
    if cog:
        from rasterio.shutil import copy as gdal_copy
        from rio_cogeo.cogeo import cog_validate

        tiled = path.with_name(path.stem + ".tiled.tif")
        path.replace(tiled)
        with rasterio.Env(GDAL_NUM_THREADS="ALL_CPUS", GDAL_CACHEMAX=128):
            gdal_copy(tiled, path, driver="COG", COMPRESS=compress, PREDICTOR="2", BLOCKSIZE="512",
                      NUM_THREADS="ALL_CPUS", BIGTIFF="IF_SAFER", OVERVIEW_RESAMPLING="AVERAGE")
        tiled.unlink()
        valid, errors, _ = cog_validate(str(path), quiet=True)
        if not valid:
            raise RuntimeError(f"{path}: not a valid COG: {errors}")
    return time.perf_counter() - t0


def write_aoi(raster: Path, dst: Path, inset: float = 0.002) -> None:
    """A GeoJSON polygon in EPSG:4326 covering the raster, inset by ``inset`` of its extent on each side."""
    import rasterio
    from rasterio.warp import transform_bounds

    with rasterio.open(raster) as src:
        left, bottom, right, top = transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=21)
    dx, dy = (right - left) * inset, (top - bottom) * inset
    # transform_bounds returns the envelope; the raster's edges are curved in 4326, so inset a bit more
    left, right, bottom, top = left + 3 * dx, right - 3 * dx, bottom + 3 * dy, top - 3 * dy
    ring = [[left, bottom], [right, bottom], [right, top], [left, top], [left, bottom]]
    dst.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"name": "synthetic benchmark AOI"},
         "geometry": {"type": "Polygon", "coordinates": [ring]}}]}))


def synthetic_config(raster: Path, aoi: Path, out: Path, arch: str, batch: int) -> dict[str, Any]:
    return {
        "name": f"bench-{raster.stem}",
        "aoi": str(aoi),
        "rasters": [str(raster)],
        "output_dir": str(out),
        "sources": {"allowed_roots": [str(raster.parent)], "bands": [1, 2, 3]},
        "screening": {"registry": str(ROOT / "data/registry/sensitive_sites.gpkg"),
                      "policy": str(ROOT / "configs/screening_policy.yaml")},
        "backbone": {"arch": arch, "seed": 0, "batch_size": batch},
        "tiling": {"size": 224, "overlap": 32, "chunk_tiles": 32},
        "heads": {"pca": True, "kmeans": {"k": 6, "fit_tiles": 32}},
    }


def baseline_batches(cfg: Any, state: Any, n: int) -> tuple[Any, list[Any], int]:
    """``(extractor, batches, n_tiles)``: ``n`` of the run's tiles spread over it, read and preprocessed up
    front into the run's batch size, for the backbone-alone baseline."""
    import numpy as np
    import torch

    from geo_dino.inputs.sources import WindowReader

    extractor, _ = resources.extractor(cfg, state)
    tiles = list(state.tile_grid())
    idx = np.linspace(0, len(tiles) - 1, min(n, len(tiles))).round().astype(int)
    with WindowReader(state.infos()[0]) as r:
        reads = [r.read(tiles[i].box) for i in idx]
    bs = cfg.backbone.batch_size
    xs = [torch.from_numpy(extractor.pre(np.stack([d for d, _ in reads[k:k + bs]]),
                                         np.stack([v for _, v in reads[k:k + bs]])))
          for k in range(0, len(reads), bs)]
    return extractor, xs, len(reads)


def child_synthetic(cfg_json: str) -> dict[str, Any]:
    """Run in a fresh process: the pipeline stage by stage (no Prefect) on one synthetic raster."""
    from geo_dino.config import parse_config
    from geo_dino.run import stages as pl

    base = peak_rss_mib()
    cfg = parse_config(json.loads(cfg_json))
    st: dict[str, float] = {}
    rss: dict[str, float] = {"after imports": base}
    t_all = time.perf_counter()

    def stage(name: str, fn, *a):
        t = time.perf_counter()
        out = fn(*a)
        st[name] = time.perf_counter() - t
        rss[name] = peak_rss_mib()
        return out

    rd = stage("prepare", pl.prepare_run, cfg)
    screen = stage("screen", pl.screen_aoi, rd)
    plan = stage("plan", pl.plan_run, rd)
    stage("fit_heads", pl.fit_heads, rd)
    stage("init_outputs", pl.init_outputs, rd)

    # the backbone alone, interleaved with the run: 16 of the run's tiles, read and preprocessed once here,
    # go through dense_features after every few chunks, timed apart from the run (and left out of its
    # stage times), so that the baseline and the pipeline share the machine's state over the same minutes
    from geo_dino.models.backbone import dense_features

    extractor0, xs0, n0 = baseline_batches(cfg, load_plan(rd), 16)
    every = max(1, plan["n_chunks"] // 12)
    interleaved = {"tiles": 0, "seconds": 0.0, "passes": 0}

    def infer_all() -> None:
        t = time.perf_counter()
        done = 0
        for c in range(plan["n_chunks"]):
            done += pl.infer_chunk(rd, c)["tiles"]
            if (c + 1) % every == 0 or c == plan["n_chunks"] - 1:
                tb = time.perf_counter()
                for x in xs0:
                    dense_features(extractor0.model, x)
                interleaved["seconds"] += time.perf_counter() - tb
                interleaved["tiles"] += n0
                interleaved["passes"] += 1
            if (c + 1) % 10 == 0:  # progress on stderr (passed through by the parent), in case of a timeout
                print(f"  [child] {done}/{plan['n_tiles']} tiles, "
                      f"{done / (time.perf_counter() - t):.1f} tiles/s, "
                      f"peak RSS {peak_rss_mib():.0f} MiB", file=sys.stderr, flush=True)

    stage("infer", infer_all)
    st["infer"] -= interleaved["seconds"]  # the run's own time only
    work_files = [p for p in (rd / "work").rglob("*") if p.is_file()]  # intermediates, carry, features
    acc_sizes = (sum(p.stat().st_size for p in work_files), sum(p.stat().st_blocks * 512 for p in work_files))
    stage("finalize", pl.finalize_outputs, rd)
    stage("complete", pl.complete_run, rd)
    total = time.perf_counter() - t_all - interleaved["seconds"]
    state = load_plan(rd)
    peak = peak_rss_mib()
    out = {"screen": screen, "n_tiles": state.tiling.n_tiles, "km2": km2(state.out_grid.record()),
           "out_grid": f"{state.out_grid.height}x{state.out_grid.width}", "stages": st,
           "rss_after_stage": rss, "total_s": total, "peak_rss_mib": peak,
           "accumulator_bytes_apparent": acc_sizes[0], "accumulator_bytes_on_disk": acc_sizes[1]}

    out["interleaved_backbone_tiles_per_s"] = interleaved["tiles"] / interleaved["seconds"]
    out["interleaved_passes"] = interleaved["passes"]
    # backbone alone on 64 of the run's tiles after the run (after the peak was recorded), same batch size
    extractor, xs, n_bl = baseline_batches(cfg, state, 64)
    dense_features(extractor.model, xs[0])
    rates = []
    for _ in range(2):  # twice; the faster pass is the baseline (the conservative choice for the ratios)
        t = time.perf_counter()
        for x in xs:
            dense_features(extractor.model, x)
        rates.append(n_bl / (time.perf_counter() - t))
    out["backbone_tiles_per_s"] = max(rates)
    out["backbone_passes_tiles_per_s"] = rates
    return out


def bench_synthetic(tmp: Path, sizes: list[int], arch: str, batch: int, raster_dir: Path) -> dict[int, Any]:
    results: dict[int, Any] = {}
    for size in sizes:
        raster = raster_dir / f"synthetic_{size}.tif"
        gen = None
        if not raster.exists():
            gen = make_raster(raster, size)
            print(f"(generated {raster.name} in {gen:.1f} s; running the pipeline in a child process)",
                  flush=True)
        aoi = tmp / f"aoi_{size}.geojson"
        write_aoi(raster, aoi)
        out = tmp / f"runs_{size}"
        out.mkdir(exist_ok=True)
        cfg = synthetic_config(raster, aoi, out, arch, batch)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child-synthetic",
                               json.dumps(cfg)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t0
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(CHILD_TAG)), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-3000:], file=sys.stderr)
            raise RuntimeError(f"synthetic {size}² child failed (rc {proc.returncode})")
        r = json.loads(line[len(CHILD_TAG):])
        r.update(size=size, arch=arch, batch=batch, child_wall_s=wall, gen_s=gen,
                 raster_bytes=raster.stat().st_size)
        results[size] = r
        report_synthetic_one(r)
        # the run folder (accumulator, outputs) of a 16384² run is GBs: drop it before the next size
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    if len(results) >= 2:
        lo, hi = min(results), max(results)
        ratio = results[hi]["peak_rss_mib"] / results[lo]["peak_rss_mib"]
        table("synthetic: bounded memory", [
            (f"RATIO peak RSS {hi}² / {lo}²",
             f'{results[hi]["peak_rss_mib"]:.0f} / {results[lo]["peak_rss_mib"]:.0f}'
             f" MiB = {ratio:.2f} (goal <= 1.5) [{'MET' if ratio <= 1.5 else 'MISSED'}]"),
            ("pixels ratio", f"{(hi / lo) ** 2:.0f}x"),
        ])
    return results


def report_synthetic_one(r: dict[str, Any]) -> None:
    n, s = r["n_tiles"], r["stages"]
    inf = s["infer"]
    rows = [
        ("raster", f'{r["size"]}² uint8 x3, COG (512-px tiles, DEFLATE, overviews; validated), '
                   f'{r["raster_bytes"] / 2**20:.0f} MiB'
                   + (f', generated in {r["gen_s"]:.1f} s' if r["gen_s"] else "")),
        ("job", f'{r["arch"]}, batch {r["batch"]}, {n} tiles, output grid {r["out_grid"]}, '
                f'{r["km2"]:.0f} km², '
                f'screen: {r["screen"]["action"]} ({r["screen"]["hits"]} hits)'),
    ]
    for k, v in s.items():
        rows.append((f"stage {k}", f'{v:.2f} s  (peak RSS so far {r["rss_after_stage"][k]:.0f} MiB)'))
    rows += [
        ("inference", f"{n / inf:.1f} tiles/s, {r['km2'] / inf:.1f} km²/s"),
        ("end-to-end (stages, no Prefect)", f'{r["total_s"]:.1f} s -> {n / r["total_s"]:.1f} tiles/s, '
                                            f'{r["km2"] / r["total_s"]:.1f} km²/s'),
        ("backbone alone after the run (64 tiles, faster of 2 passes)",
         f'{r["backbone_tiles_per_s"]:.1f} tiles/s (passes: '
         f'{", ".join(f"{v:.1f}" for v in r.get("backbone_passes_tiles_per_s", []))}) -> inference/backbone '
         f'{n / inf / r["backbone_tiles_per_s"]:.3f}, end-to-end/backbone '
         f'{n / r["total_s"] / r["backbone_tiles_per_s"]:.3f}'),
        (f'backbone alone interleaved ({r["interleaved_passes"]} passes of 16 tiles during the run)',
         f'{r["interleaved_backbone_tiles_per_s"]:.1f} tiles/s -> inference/backbone '
         f'{n / inf / r["interleaved_backbone_tiles_per_s"]:.3f}'),
        ("RATIO end-to-end / backbone alone (interleaved)",
         f'{n / r["total_s"] / r["interleaved_backbone_tiles_per_s"]:.3f} (goal >= 0.90) '
         f'[{"MET" if n / r["total_s"] / r["interleaved_backbone_tiles_per_s"] >= 0.9 else "MISSED"}]'),
        ("peak RSS (child)", f'{r["peak_rss_mib"]:.0f} MiB '
                             f'(after imports {r["rss_after_stage"]["after imports"]:.0f})'),
        ("work files before the COG pass",
         f'{(r["accumulator_bytes_apparent"] or 0) / 2**30:.2f} GiB apparent, '
         f'{(r["accumulator_bytes_on_disk"] or 0) / 2**30:.2f} GiB on disk'),
    ]
    table(f'synthetic {r["size"]}²', rows)


# -------------------------------------------------------------------------------------------------- reads
def bench_reads(raster: Path, cap: int, reps: int, batch: int) -> dict[str, Any]:
    import itertools

    import numpy as np
    import rasterio
    from rasterio.windows import Window

    from geo_dino.config import SourceConfig
    from geo_dino.inputs.grid import PixelBox
    from geo_dino.inputs.sources import WindowReader, open_raster

    size = 224
    info = open_raster(raster, SourceConfig(allowed_roots=[raster.parent], bands=[1, 2, 3]), needed_bands=3)
    H, W = info.grid.height, info.grid.width
    boxes = [PixelBox(r, c, size, size)
             for r in range(0, H - size + 1, size) for c in range(0, W - size + 1, size)]
    boxes = boxes[:cap]
    n = len(boxes)
    res: dict[str, Any] = {"n_windows": n, "raster": f"{H}x{W}"}

    def ours() -> float:
        t = time.perf_counter()
        with WindowReader(info) as r:
            s = 0
            for b in boxes:
                d, v = r.read(b)
                s += int(d[0, 0, 0])
        return time.perf_counter() - t

    def ours_many() -> float:
        """How the pipeline reads: a batch of row-major windows per call (one strip per tile row)."""
        t = time.perf_counter()
        with WindowReader(info) as r:
            s = 0
            for k in range(0, n, batch):
                for d, _v in r.read_many(boxes[k:k + batch]):
                    s += int(d[0, 0, 0])
        return time.perf_counter() - t

    def plain() -> float:
        t = time.perf_counter()
        with rasterio.open(raster) as src:
            s = 0
            for b in boxes:
                d = src.read([1, 2, 3], window=Window(b.col_off, b.row_off, b.width, b.height))
                s += int(d[0, 0, 0])
        return time.perf_counter() - t

    from torch.utils.data import DataLoader
    from torchgeo.datasets import RasterDataset, stack_samples
    from torchgeo.samplers import GridGeoSampler, Units

    class Synthetic(RasterDataset):
        filename_glob = raster.name
        is_image = True
        separate_files = False
        all_bands = ("R", "G", "B")

    def tg() -> float:
        t = time.perf_counter()
        ds = Synthetic(paths=str(raster.parent))
        sampler = GridGeoSampler(ds, size=size, stride=size, units=Units.PIXELS)
        queries = list(itertools.islice(iter(sampler), n))
        loader = DataLoader(ds, sampler=queries, batch_size=batch, collate_fn=stack_samples, num_workers=0)
        got = 0
        for b in loader:
            got += b["image"].shape[0]
        assert got == n, (got, n)
        res["torchgeo_sample_shape"] = list(b["image"].shape[1:])
        return time.perf_counter() - t

    # also ours with the preprocessing the pipeline applies (uint8 -> normalised float32), for parity with
    # torchgeo, which returns float32 tensors
    from geo_dino.config import PreprocessConfig
    from geo_dino.inputs.preprocess import make_preprocessor
    from geo_dino.models.backbone import ARCHS

    a = ARCHS["vit_small_patch16_dinov3"]
    pre = make_preprocessor("uint8", info.bands, PreprocessConfig(), a.mean, a.std)

    def ours_batched() -> float:
        import torch

        t = time.perf_counter()
        with WindowReader(info) as r:
            for k in range(0, n, batch):
                reads = r.read_many(boxes[k:k + batch])
                x = torch.from_numpy(pre(np.stack([d for d, _ in reads]), np.stack([v for _, v in reads])))
                assert x.shape[0] == len(reads)
        return time.perf_counter() - t

    methods = {"ours: WindowReader.read_many (pipeline)": ours_many,
               "ours: WindowReader.read, one window": ours,
               "ours + batch + preprocess": ours_batched,
               "plain rasterio read": plain, "torchgeo RasterDataset+GridGeoSampler+DataLoader": tg}
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(reps):  # interleaved, so a busy neighbour core hits every method alike
        for k, fn in methods.items():
            times[k].append(fn())
    res["times"] = times
    return res


def report_reads(r: dict[str, Any]) -> None:
    import statistics as stt

    n = r["n_windows"]
    rate = {k: n / stt.median(v) for k, v in r["times"].items()}
    rows = [("windows", f'{n} windows of 224² (stride 224) over {r["raster"]}, uint8 x3; '
                        f'torchgeo samples {r.get("torchgeo_sample_shape")}')]
    for k, v in rate.items():
        rows.append((k, f"{v:,.0f} windows/s  (runs: "
                     + ", ".join(f"{n / t:,.0f}" for t in r["times"][k]) + ")"))
    ours, tgk = (rate["ours: WindowReader.read_many (pipeline)"],
                 rate["torchgeo RasterDataset+GridGeoSampler+DataLoader"])
    rows += [
        ("RATIO ours / torchgeo",
         f"{ours / tgk:.2f}x (goal >= 4) [{'MET' if ours / tgk >= 4 else 'MISSED'}]"),
        ("RATIO ours+preprocess / torchgeo", f'{rate["ours + batch + preprocess"] / tgk:.2f}x'),
        ("RATIO ours / plain rasterio", f'{ours / rate["plain rasterio read"]:.2f}'),
        ("RATIO ours one window / torchgeo", f'{rate["ours: WindowReader.read, one window"] / tgk:.2f}x'),
    ]
    table("window reads", rows)


# --------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="skip the 16384² raster")
    ap.add_argument("--only", choices=("demo", "synthetic", "reads"), help="run one section")
    ap.add_argument("--sizes", type=int, nargs="+",
                    help="synthetic sizes (default 4096 16384; 4096 with --quick)")
    ap.add_argument("--arch", default="vit_tiny_patch16_dinov3_test", help="backbone for the synthetic runs")
    ap.add_argument("--batch", type=int, default=8,
                    help="batch size of the synthetic runs and torchgeo loader")
    ap.add_argument("--reads-size", type=int, default=None, help="raster for the read benchmark "
                    "(default 16384, or 4096 with --quick)")
    ap.add_argument("--reads-cap", type=int, default=2000, help="windows per read method")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each timed measurement")
    ap.add_argument("--child-synthetic", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.chdir(ROOT)

    if args.child_synthetic:
        out = child_synthetic(args.child_synthetic)
        print(CHILD_TAG + json.dumps(out, default=str))
        return

    info = machine_info()
    table("machine", [("platform", info["platform"]), ("cpu", f'{info["cpu"]} ({info["machine"]})'),
                      ("cores", str(info["cores"])), ("torch threads", str(info["torch_threads"])),
                      ("RAM", info["ram"]),
                      ("load average at start", " ".join(f"{v:.2f}" for v in info["load_avg"])),
                      ("versions", ", ".join(f"{k} {v}" for k, v in info["versions"].items()))])
    sections = [args.only] if args.only else ["demo", "synthetic", "reads"]
    sizes = args.sizes or ([4096] if args.quick else [4096, 16384])
    reads_size = args.reads_size or (4096 if args.quick else 16384)
    with tempfile.TemporaryDirectory(prefix="geo_dino_bench_") as td:
        tmp = Path(td)
        raster_dir = tmp / "rasters"
        raster_dir.mkdir()
        if "demo" in sections:
            report_demo(bench_demo(tmp, args.reps))
        if "synthetic" in sections:
            bench_synthetic(tmp, sizes, args.arch, args.batch, raster_dir)
        if "reads" in sections:
            raster = raster_dir / f"synthetic_{reads_size}.tif"
            if not raster.exists():
                gen = make_raster(raster, reads_size)
                print(f"\n(generated {raster.name} in {gen:.1f} s)")
            report_reads(bench_reads(raster, args.reads_cap, args.reps, args.batch))
    print(f"\nload average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
