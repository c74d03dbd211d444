"""One run over many worker processes on a real Dask cluster (127.0.0.1): outputs pixel-identical to the
serial run whatever the workers, the order chunks finish in, a worker killed mid-chunk, or a resume; the
outputs' intermediates are a georeferenced Zarr store; a run joins an external `dask scheduler`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio

from geo_dino.config import ExecutionConfig, parse_config
from geo_dino.run import folder
from geo_dino.run import stages as pl
from tests.conftest import BAHAMAS, ROOT

TAIZHOU = ROOT / "data" / "labels" / "taizhou"
pytestmark = pytest.mark.slow


def _tifs(run: Path) -> dict[str, tuple[np.ndarray, dict]]:
    out = {}
    for p in sorted(run.glob("*.tif")):
        with rasterio.open(p) as src:
            meta = {"crs": src.crs, "transform": src.transform, "nodata": repr(src.nodata),
                    "dtypes": src.dtypes}
            out[p.name] = (src.read(), meta)
    return out


def assert_same_outputs(a: Path, b: Path) -> int:
    """Every output raster of run ``b`` equals run ``a``'s, pixel for pixel (NaN where NaN), with the same
    georeferencing; returns how many were compared."""
    ta, tb = _tifs(a), _tifs(b)
    assert sorted(ta) == sorted(tb) and ta
    for name, (arr, meta) in ta.items():
        arr2, meta2 = tb[name]
        assert arr.shape == arr2.shape and arr.dtype == arr2.dtype, name
        assert np.array_equal(arr, arr2, equal_nan=True), f"{name}: {np.sum(arr != arr2)} pixels differ"
        assert {k: meta[k] for k in ("crs", "transform", "nodata", "dtypes")} == \
               {k: meta2[k] for k in ("crs", "transform", "nodata", "dtypes")}, name
    return len(ta)


def _one_date(tmp: Path, name: str, **execution) -> dict:
    return {"name": name, "aoi": str(ROOT / "aoi/bahamas_andros.geojson"), "rasters": [str(BAHAMAS)],
            "output_dir": str(tmp / "runs"), "sources": {"allowed_roots": [str(ROOT / "data")]},
            "screening": {"registry": str(ROOT / "data/registry/sensitive_sites.gpkg"),
                          "policy": str(ROOT / "configs/screening_policy.yaml")},
            "backbone": {"arch": "vit_tiny_patch16_dinov3_test", "batch_size": 16},
            "tiling": {"size": 64, "overlap": 16, "chunk_tiles": 16},
            "heads": {"kmeans": {"k": 4, "fit_tiles": 16}},
            "execution": execution or {"engine": "serial"}}


def _two_dates_with_head(tmp: Path, name: str, **execution) -> dict:
    """Taizhou's two dates with the shipped backbone and its trained change head (supervised outputs, label-
    free change, k-means and PCA per date)."""
    return {"name": name, "aoi": str(ROOT / "aoi/taizhou.geojson"),
            "rasters": [str(TAIZHOU / "taizhou_L7ETM_2000-03-17.tif"),
                        str(TAIZHOU / "taizhou_L7ETM_2003-02-06.tif")],
            "output_dir": str(tmp / "runs"), "sources": {"allowed_roots": [str(ROOT / "data")],
                                                         "bands": [3, 2, 1]},
            "screening": {"registry": str(ROOT / "data/registry/sensitive_sites.gpkg"),
                          "policy": str(ROOT / "configs/screening_policy.yaml")},
            "backbone": {"arch": "vit_tiny_patch8_geo", "checkpoint": str(ROOT / "models/vit_tiny_patch8_geo"
                                                                               ".safetensors"),
                         "batch_size": 8},
            "tiling": {"size": 128, "overlap": 32, "chunk_tiles": 4},
            "heads": {"kmeans": {"k": 4, "fit_tiles": 8}, "change": {"method": "fused"},
                      "supervised": {"path": str(ROOT / "models/taizhou_change_mlp.safetensors")}},
            "execution": execution or {"engine": "serial"}}


@pytest.fixture(scope="module")
def serial_runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("serial")
    return {"one": pl.run_local(parse_config(_one_date(tmp, "serial1"))),
            "two": pl.run_local(parse_config(_two_dates_with_head(tmp, "serial2")))}


def _started(cfg: dict) -> Path:
    """A run taken up to its chunks (screened, planned, heads fitted, outputs' store created)."""
    run = pl.prepare_run(parse_config(cfg))
    pl.screen_aoi(run)
    pl.plan_run(run)
    pl.fit_heads(run)
    pl.init_outputs(run)
    return run


def _finish(run: Path) -> Path:
    pl.finalize_outputs(run)
    pl.complete_run(run)
    return run


def test_two_worker_processes_give_the_serial_outputs_one_date(serial_runs, tmp_path) -> None:
    run = pl.run_local(parse_config(_one_date(tmp_path, "dask1", engine="dask", workers=2)))
    assert assert_same_outputs(serial_runs["one"], run) == 2
    ex = json.loads((run / folder.RECORD).read_text())["execution"]
    assert ex["engine"] == "dask" and ex["n_workers"] == 2 and ex["cluster"] == "local"
    pids = {w["pid"] for w in ex["workers"]}
    assert len(pids) == 2 and os.getpid() not in pids  # worker processes, not this one
    assert sorted(c["chunk"] for c in ex["chunks"]) == list(range(len(ex["chunks"])))
    assert {c["pid"] for c in ex["chunks"]} <= pids and all(c["seconds"] > 0 for c in ex["chunks"])
    for pid in {c["pid"] for c in ex["chunks"]}:  # the backbone is built once per worker, not per chunk
        mine = [c for c in ex["chunks"] if c["pid"] == pid]
        assert max(c["models_built_in_process"]["backbone"] for c in mine) == 1
    serial = json.loads((serial_runs["one"] / folder.RECORD).read_text())["execution"]
    assert serial["engine"] == "serial" and {c["pid"] for c in serial["chunks"]} == {os.getpid()}
    assert not (run / folder.INTERMEDIATES).exists()  # dropped once the COGs are made


def test_two_worker_processes_give_the_serial_outputs_two_dates_with_a_change_head(serial_runs,
                                                                                   tmp_path) -> None:
    run = pl.run_local(parse_config(_two_dates_with_head(tmp_path, "dask2", engine="dask", workers=2)))
    n = assert_same_outputs(serial_runs["two"], run)
    chunks = json.loads((run / folder.RECORD).read_text())["execution"]["chunks"]
    assert len(chunks) > 2 and all(c["models_built_in_process"] == {"backbone": 1, "head": 1} for c in chunks)
    names = {p.name for p in run.glob("*.tif")}
    assert {"change_probability.tif", "change_binary.tif", "change_mask.tif", "pca_rgb_t2.tif"} <= names
    assert n == len(names)
    rec = json.loads((run / folder.RECORD).read_text())
    assert rec["change"]["threshold"] == json.loads((serial_runs["two"] / folder.RECORD).read_text())[
        "change"]["threshold"]


def test_chunks_in_reverse_order_give_the_serial_outputs(serial_runs, tmp_path) -> None:
    run = _started(_two_dates_with_head(tmp_path, "reverse"))
    n = pl.load_plan(run).tiling.n_chunks
    assert n >= 3
    for c in reversed(range(n)):
        pl.infer_chunk(run, c)
    assert_same_outputs(serial_runs["two"], _finish(run))


def test_intermediates_are_a_georeferenced_zarr_store(tmp_path) -> None:
    import xarray as xr

    run = _started(_one_date(tmp_path, "zarr"))
    for c in range(pl.load_plan(run).tiling.n_chunks):
        pl.infer_chunk(run, c)
    ds = xr.open_zarr(run / folder.INTERMEDIATES)  # no extra argument
    plan = pl.load_plan(run)
    grid = plan.out_grid.grid()
    assert ds.rio.crs.to_string() == rasterio.crs.CRS.from_user_input(grid.crs).to_string()
    assert ds.rio.transform() == grid.transform
    assert ds["classes"].rio.encoded_nodata == 255 and ds["pca_rgb"].rio.encoded_nodata == 0
    assert list(ds["pca_rgb"].attrs["long_name"]) == ["feature PCA 1", "feature PCA 2", "feature PCA 3"]
    assert ds.sizes["y"] == grid.height and ds.sizes["x"] == grid.width
    # Zarr chunk rows never straddle a chunk task's rows and a band's: every hand-over row is a chunk edge
    rows = ds["classes"].encoding["chunks"][0]
    t = plan.tiling
    for c in range(1, t.n_chunks):
        first = plan.chunks()[c][0][0].grid_row * t.stride
        assert first % rows == 0 and (first + t.overlap) % rows == 0
    # the merged store gives exactly the COG's pixels
    _finish_keep = pl.finalize_outputs(run)
    with rasterio.open(run / "classes.tif") as src:
        cog = src.read(1)
    raw = xr.open_zarr(run / folder.INTERMEDIATES, mask_and_scale=False)["classes"].values
    assert np.array_equal(cog, raw) and _finish_keep


def test_a_worker_killed_mid_chunk_and_the_run_still_gives_the_serial_outputs(serial_runs, tmp_path) -> None:
    """SIGKILL to the worker process running a chunk: Dask runs the chunk again on another worker."""
    from distributed import Client

    from geo_dino.run.engine import local_cluster, worker_specs

    with local_cluster(worker_specs(2, 1, "cpu")) as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        pids = client.run(os.getpid)
        cfg = _two_dates_with_head(tmp_path, "killed", engine="dask", address=cluster.scheduler_address)
        killed: dict[str, object] = {}

        def kill_first_busy_worker() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not killed:
                busy = {w: ts for w, ts in client.processing().items() if ts}
                if busy:
                    addr, keys = next(iter(busy.items()))
                    time.sleep(0.3)  # inside the chunk
                    os.kill(pids[addr], signal.SIGKILL)
                    killed.update(address=addr, keys=list(keys))
                time.sleep(0.05)

        killer = threading.Thread(target=kill_first_busy_worker)
        run_box: dict[str, Path] = {}
        runner = threading.Thread(target=lambda: run_box.setdefault("run", pl.run_local(parse_config(cfg))))
        runner.start()
        killer.start()
        runner.join(600)
        killer.join(5)
    assert killed, "no chunk was seen running"
    run = run_box["run"]
    assert_same_outputs(serial_runs["two"], run)
    chunks = json.loads((run / folder.RECORD).read_text())["execution"]["chunks"]
    victim = [k for k in killed["keys"] if "chunk" in str(k)]
    assert victim and all(c["worker"] != killed["address"] for c in chunks)  # every chunk finished elsewhere


def test_resume_with_two_workers_computes_only_the_missing_chunks(serial_runs, tmp_path) -> None:
    run = _started(_two_dates_with_head(tmp_path, "resumed"))
    n = pl.load_plan(run).tiling.n_chunks
    for c in (0, n - 1):  # the run was killed after two chunks
        pl.infer_chunk(run, c)
    done_before = {p.name: p.stat().st_mtime_ns for p in folder.chunk_results(run)}
    assert pl.missing_chunks(run) == list(range(1, n - 1))
    pl.resume_run(run, ExecutionConfig(engine="dask", workers=2))
    rec = json.loads((run / folder.RECORD).read_text())
    assert rec["execution"]["chunks_run"] == list(range(1, n - 1))
    assert rec["resumed"]["chunks_missing"] == list(range(1, n - 1))
    assert len(done_before) == 2 and rec["status"] == "succeeded"
    assert_same_outputs(serial_runs["two"], run)


def test_a_run_joins_an_external_scheduler_through_prefect(serial_runs, tmp_path) -> None:
    """`dask scheduler` and two `dask worker` processes, started as a site would; the run_aoi flow sends its
    chunk tasks there through prefect-dask's DaskTaskRunner."""
    from flows.run_aoi import run_aoi

    dask = Path(sys.executable).parent / "dask"
    sched_file = tmp_path / "scheduler.json"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([str(dask), "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--no-dashboard", "--scheduler-file", str(sched_file)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for _ in range(300):
            if sched_file.exists() and sched_file.stat().st_size:
                break
            time.sleep(0.1)
        address = json.loads(sched_file.read_text())["address"]
        procs.append(subprocess.Popen([str(dask), "worker", address, "--nworkers", "2", "--nthreads", "1",
                                       "--host", "127.0.0.1", "--no-dashboard"], env=env, cwd=ROOT,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        run = Path(run_aoi(config=_one_date(tmp_path, "external", engine="dask", address=address)))
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(30)
    assert_same_outputs(serial_runs["one"], run)
    ex = json.loads((run / folder.RECORD).read_text())["execution"]
    assert ex["cluster"] == "external" and ex["scheduler"] == address and ex["n_workers"] == 2
    worker_pids = {w["pid"] for w in ex["workers"]}
    assert {c["pid"] for c in ex["chunks"]} <= worker_pids and os.getpid() not in worker_pids


def test_worker_specs_one_worker_per_visible_gpu(monkeypatch) -> None:
    from geo_dino.errors import ConfigError
    from geo_dino.run.engine import worker_specs

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    gpu = worker_specs(0, 1, "auto")
    assert [s["env"]["CUDA_VISIBLE_DEVICES"] for s in gpu] == ["2", "5"]
    assert [s["env"]["CUDA_VISIBLE_DEVICES"] for s in worker_specs(1, 1, "cuda")] == ["2"]
    cpu = worker_specs(3, 2, "cpu")  # device cpu: no GPU worker even where GPUs are visible
    assert len(cpu) == 3 and all(s["env"]["OMP_NUM_THREADS"] == "2" for s in cpu)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match="no GPU is visible"):
        worker_specs(0, 1, "cuda")
    assert len(worker_specs(0, 1, "auto")) == (os.cpu_count() or 1)


def test_execution_config_is_checked() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="set execution.engine: dask"):
        ExecutionConfig(address="tcp://127.0.0.1:8786")
    with pytest.raises(ValidationError, match="leave workers at 0"):
        ExecutionConfig(engine="dask", address="tcp://127.0.0.1:8786", workers=2)
    with pytest.raises(ValidationError):
        ExecutionConfig(engine="dask", address="http://127.0.0.1:8786")


def test_an_unreachable_scheduler_is_one_clear_error(tmp_path) -> None:
    from geo_dino.errors import ConfigError
    from geo_dino.run.engine import dask_client

    with pytest.raises(ConfigError, match="no Dask scheduler answers"):
        with dask_client(ExecutionConfig(engine="dask", address="tcp://127.0.0.1:9"), "cpu"):
            pass


def test_backbone_and_head_bits_do_not_depend_on_threads_or_batch() -> None:
    """What makes a chunk's numbers independent of the worker: after same_bits_anywhere, the backbone's
    features are equal bit for bit at 1 and 2 threads and any batch split (the fit pass's cached features
    come in other batches than inference's), a 1×1-conv head's at 1 and 2 threads (its batches are the same
    on every engine); torch's defaults are not: these head shapes differ with the thread count."""
    import torch

    from geo_dino.models.backbone import build_backbone, dense_features
    from geo_dino.run.resources import same_bits_anywhere

    same_bits_anywhere()
    model, _ = build_backbone("vit_tiny_patch8_geo", checkpoint=ROOT / "models" / "vit_tiny_patch8_geo"
                                                                               ".safetensors")
    head = torch.nn.Sequential(torch.nn.Conv2d(192, 64, 1), torch.nn.ReLU(), torch.nn.Conv2d(64, 3, 1)).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(17, 3, 64, 64, generator=g)
    feats = {n: torch.randn(n, 192, s, s, generator=g) for n, s in ((16, 16), (8, 16), (5, 17))}
    before = torch.get_num_threads()
    outs = []
    try:
        with torch.inference_mode():
            for threads, split in ((2, 17), (1, 17), (2, 3), (1, 5)):
                torch.set_num_threads(threads)
                f = torch.cat([dense_features(model, x[i:i + split]) for i in range(0, 17, split)])
                outs.append((f, [head(v) for v in feats.values()]))
    finally:
        torch.set_num_threads(before)
    for f, hs in outs[1:]:
        assert torch.equal(f, outs[0][0])
        assert all(torch.equal(h, h0) for h, h0 in zip(hs, outs[0][1], strict=True))
