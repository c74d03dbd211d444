"""Production on a real Prefect server (127.0.0.1, started here), as a platform team runs it: the pools, the
global concurrency limits and every deployment of flows/prefect.yaml; AOIs submitted by content, the inbox,
run_many, the `gpu` slots across deployments, and a run whose process is killed. No mocks: real server, real
process workers, real flow runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import (
    PREFECT,
    ROOT,
    deploy_everything,
    prefect_cli,
    run_folders,
    start_prefect_server,
    stop_prefect_server,
)

CLI = str(Path(sys.executable).with_name("geo-dino"))
PY = sys.executable
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module, with the pools, the limits and the deployments of the README."""
    proc, env = start_prefect_server(tmp_path_factory.mktemp("prefect") / "home")
    try:
        deploy_everything(env)
        yield env
    finally:
        stop_prefect_server(proc)


def _small(out: Path, **extra) -> dict:
    """Overrides for quick runs of the submission deployment: the tiny test backbone, small tiles."""
    return {"output_dir": str(out), "backbone": {"arch": "vit_tiny_patch16_dinov3_test", "checkpoint": None,
                                                 "checkpoint_sha256": None, "batch_size": 16},
            "tiling": {"size": 64, "overlap": 16, "chunk_tiles": 16},
            "heads": {"kmeans": {"k": 4, "fit_tiles": 16}}} | extra


def _aoi(path: Path, x0: float, y0: float, d: float = 0.03) -> Path:
    """A small square AOI (lon/lat) inside the bundled Bahamas scene, away from its airport and port."""
    ring = [[x0, y0], [x0 + d, y0], [x0 + d, y0 + d], [x0, y0 + d], [x0, y0]]
    path.write_text(json.dumps({"type": "Polygon", "coordinates": [ring]}))
    return path


def _scene_corner() -> tuple[float, float]:
    """South-west of a corner inside the Bahamas scene (the Andros AOI's centre, moved 0.03° away)."""
    from geo_dino.inputs.aoi import load_aoi

    c = load_aoi(ROOT / "aoi/bahamas_andros.geojson").geometry.centroid
    return c.x - 0.03, c.y - 0.03


def _runs_of(env: dict, deployment_name: str) -> list[dict]:
    api = env["PREFECT_API_URL"]
    deps = {d["name"]: d for d in httpx.post(f"{api}/deployments/filter", json={}).json()}
    return httpx.post(f"{api}/flow_runs/filter", json={
        "flow_runs": {"deployment_id": {"any_": [deps[deployment_name]["id"]]}}}).json()


def _worker(env: dict, once: bool = True, timeout: int = 600, **kw) -> subprocess.Popen | str:
    args = [PREFECT, "worker", "start", "--pool", "geo-dino-cpu"] + (["--run-once"] if once else [])
    if once:
        return prefect_cli(env, *args[1:], timeout=timeout)
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=kw.get("log", subprocess.DEVNULL),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _submit(env: dict, aoi: Path, deployment: str, overrides: dict) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, "submit", str(aoi), "--deployment", deployment, "--param",
                           f"overrides={json.dumps(overrides)}"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_the_same_submission_twice_runs_once(server, tmp_path) -> None:
    env = server
    out = tmp_path / "runs"
    aoi = _aoi(tmp_path / "field.geojson", *_scene_corner())
    first = _submit(env, aoi, "run_aoi/aoi-submissions", _small(out))
    second = _submit(env, aoi, "run_aoi/aoi-submissions", _small(out))
    assert first.returncode == 0 and "submitted: flow run" in first.stdout, first.stdout + first.stderr
    assert second.returncode == 0 and "already submitted" in second.stdout, second.stdout + second.stderr
    assert len(_runs_of(env, "aoi-submissions")) == 1
    # an invalid AOI is refused here, with validate-aoi's message, and nothing reaches the server
    bad = tmp_path / "bad.geojson"
    bad.write_text('{"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0.5]]]}')
    res = _submit(env, bad, "run_aoi/aoi-submissions", _small(out))
    assert res.returncode == 2 and "AOIError" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = _submit(env, aoi, "run_aoi/no-such-deployment", _small(out))
    assert res.returncode == 2 and "no deployment 'run_aoi/no-such-deployment'" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert len(_runs_of(env, "aoi-submissions")) == 1
    _worker(env)
    (run_dir,) = run_folders(out)
    rec = json.loads((run_dir / "provenance.json").read_text())
    assert rec["status"] == "succeeded", rec.get("error")
    assert (run_dir / "aoi.geojson").read_bytes() == aoi.read_bytes()  # the worker got the content
    assert rec["aoi"]["sha256"] and (run_dir / "classes.tif").is_file()
    # what people see: run.log in the folder, the progress and the report as artifacts in the API
    log = (run_dir / "run.log").read_text()
    assert "stage screening" in log and "tiles " in log and "stage done" in log
    from flows.progress import artifact_key

    api = env["PREFECT_API_URL"]
    arts = {a["key"]: a for a in httpx.post(f"{api}/artifacts/filter", json={}).json() if a.get("key")}
    assert arts[artifact_key("geo-dino-progress", run_dir)]["data"] == 100
    report = arts[artifact_key("geo-dino-run", run_dir)]["data"]
    assert "succeeded" in report and "classes.tif" in report and "run.qgs" in report
    # after it ran, the same submission still runs once
    again = _submit(env, aoi, "run_aoi/aoi-submissions", _small(out))
    assert "already submitted" in again.stdout and "Completed" in again.stdout
    assert len(_runs_of(env, "aoi-submissions")) == 1


def test_the_inbox_moves_files_where_they_belong(server, tmp_path) -> None:
    env = server
    out, inbox = tmp_path / "runs", tmp_path / "inbox"
    inbox.mkdir()
    x, y = _scene_corner()
    good = _aoi(inbox / "good.geojson", x + 0.01, y + 0.01)
    (inbox / "good-again.geojson").write_bytes(good.read_bytes())  # the same AOI dropped twice
    (inbox / "bad.geojson").write_text('{"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1]]]}')
    (inbox / "notes.txt").write_text("not an AOI: left alone")
    old = time.time() - 60
    for p in inbox.iterdir():
        os.utime(p, (old, old))
    code = ("import json, sys; from flows.inbox import aoi_inbox; print(json.dumps(aoi_inbox("
            "inbox=sys.argv[1], deployment='run_aoi/aoi-submissions', params=json.loads(sys.argv[2]))))")
    scan = [PY, "-c", code, str(inbox), json.dumps({"overrides": _small(out)})]
    res = subprocess.run(scan, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    first = json.loads(res.stdout.strip().splitlines()[-1])
    assert first["submitted"] == ["good-again.geojson"] or first["submitted"] == ["good.geojson"]
    assert len(first["duplicates"]) == 1 and first["refused"] == ["bad.geojson"]
    reason = (inbox / "failed" / "bad.geojson.reason.txt").read_text()
    assert reason.startswith("invalid AOI:") and "ring" in reason.lower()
    assert (inbox / "notes.txt").is_file()
    assert sorted(p.name for p in (inbox / "processing").glob("*.geojson")) == ["good-again.geojson",
                                                                               "good.geojson"]
    assert len(_runs_of(env, "aoi-submissions")) >= 1
    _worker(env)  # the one run of the good AOI
    res = subprocess.run(scan, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    second = json.loads(res.stdout.strip().splitlines()[-1])
    assert sorted(second["done"]) == ["good-again.geojson", "good.geojson"] and not second["submitted"]
    done = sorted(p.name for p in (inbox / "done").glob("*.geojson"))
    assert done == ["good-again.geojson", "good.geojson"]
    (run_dir,) = run_folders(out)  # dropped twice, ran once
    assert json.loads((run_dir / "provenance.json").read_text())["status"] == "succeeded"


def _submit_scene(env: dict, out: Path, reason: str, **tiling) -> subprocess.CompletedProcess:
    """The whole bundled scene (approved for its airport and port) on the tiny backbone, in chunks of 4."""
    res = _submit(env, ROOT / "aoi/bahamas_scene.geojson", "run_aoi/aoi-submissions",
                  _small(out, tiling={"overlap": 16, "chunk_tiles": 4} | tiling,
                         screening={"approval": {"approver": "T. Ester", "reason": reason}}))
    assert res.returncode == 0, res.stderr
    return res


@contextmanager
def _worker_running(env: dict, log_path: Path) -> Iterator[subprocess.Popen]:
    """A worker of the CPU pool that takes runs until the block ends (its output in ``log_path``)."""
    with log_path.open("w") as log:
        worker = _worker(env, once=False, log=log)
        assert isinstance(worker, subprocess.Popen)
        try:
            yield worker
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=60)


def _intervals(out: Path) -> list[tuple[datetime, datetime]]:
    spans = []
    for run_dir in run_folders(out):
        rec = json.loads((run_dir / "provenance.json").read_text())
        assert rec["status"] == "succeeded", rec.get("error")
        slot = rec["execution_slot"]
        assert slot["limit"] == "gpu"
        spans.append((datetime.fromisoformat(slot["acquired_at"]),
                      datetime.fromisoformat(slot["released_at"])))
    return sorted(spans)


@pytest.mark.parametrize("slots", [1, 2])
def test_gpu_slots_across_deployments(server, tmp_path, slots) -> None:
    """Two runs of two deployments, one worker running both at once: with one `gpu` slot their inferences
    never overlap; with two they do."""
    env = server
    prefect_cli(env, "gcl", "update", "gpu", "--limit", str(slots))
    out = tmp_path / "runs"
    # the whole scene on the shipped backbone in 32-pixel tiles at a 16-pixel stride (2,200 tiles in 45 chunk
    # tasks: ~10 s of inference alone, more when both run, against a few seconds between their starts),
    # approved for its airport and port
    over = {"output_dir": str(out), "execution": {"slots": "gpu"},
            "tiling": {"size": 32, "overlap": 16, "chunk_tiles": 8},
            "heads": {"kmeans": {"k": 4, "fit_tiles": 16}},
            "screening": {"approval": {"approver": "T. Ester", "reason": "slots test"}}}
    for k, dep in enumerate(("run_aoi/aoi-submissions", "run_aoi/demo-nightly")):
        res = _submit(env, ROOT / "aoi/bahamas_scene.geojson", dep, over | {"name": f"slots{slots}-{k}"})
        assert res.returncode == 0 and "submitted" in res.stdout, res.stdout + res.stderr
    _worker(env)
    (a0, a1), (b0, b1) = _intervals(out)
    waits = sorted(json.loads((d / "provenance.json").read_text())["execution_slot"]["waited_s"]
                   for d in run_folders(out))
    if slots == 1:
        assert b0 >= a1, ((a0, a1), (b0, b1))
    else:  # they inferred at the same time, and the later did not wait out the earlier's slot (taking a
        # free slot through the API takes up to a few seconds while both runs load the two cores)
        assert b0 < a1 and waits[-1] < 0.5 * (a1 - a0).total_seconds(), ((a0, a1), (b0, b1), waits)


def _inferring(out: Path, worker_log: Path, within_s: float = 300) -> Path:
    """The run folder under ``out`` once its run is inferring (its first chunk result is there)."""
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        dirs = run_folders(out) if out.is_dir() else []
        if dirs and list((dirs[0] / "work").glob("chunk_*.npz")):
            return dirs[0]
        time.sleep(0.2)
    raise AssertionError(worker_log.read_text()[-3000:])


def _ended(run_dir: Path, within_s: float = 120) -> dict:
    """The record once it is no longer ``started`` and the deployment record is written (a hook writes the
    record, then the deployment record)."""
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        rec = json.loads((run_dir / "provenance.json").read_text())
        if rec["status"] != "started" and (run_dir / "deployment_record.json").is_file():
            break
        time.sleep(0.5)
    return rec


def test_a_killed_run_ends_crashed_in_its_record(server, tmp_path) -> None:
    env = server
    out, log = tmp_path / "runs", tmp_path / "worker.log"
    # the whole scene in 32-pixel tiles at a 16-pixel stride, 4 to a chunk (550 chunk tasks): still inferring,
    # holding its `cpu` slot, when it is killed
    _submit_scene(env, out, "crash test", size=32)
    with _worker_running(env, log) as worker:
        run_dir = _inferring(out, log)
        flow_procs = [c for c in psutil.Process(worker.pid).children(recursive=True)
                      if "python" in c.name().lower() and c.pid != worker.pid]
        assert flow_procs
        for p in flow_procs:  # the flow run's process, killed without warning
            p.send_signal(signal.SIGKILL)
        rec = _ended(run_dir)
        assert rec["status"] == "crashed", (rec["status"], log.read_text()[-3000:])
        assert "Crashed" in rec["error"] and rec["stopped"]["status"] == "crashed"
        # killed inside its inference: the hook gave its slot back at once, not when the lease ran out
        slot = rec["execution_slot"]
        assert slot["lease_id"] and slot["released_by"] == "the run's stop hook", slot
        limit = httpx.get(f"{env['PREFECT_API_URL']}/v2/concurrency_limits/cpu").json()
        assert limit["active_slots"] == 0, limit
        assert not (run_dir / "work" / ".space_reserve").exists()
        assert json.loads((run_dir / "deployment_record.json").read_text())["run_status"] == "crashed"


def test_a_cancelled_run_ends_cancelled_in_its_record(server, tmp_path) -> None:
    env = server
    out, log = tmp_path / "runs", tmp_path / "worker.log"
    # the whole scene in chunks of 4 tiles: long enough to be cancelled while inferring
    res = _submit_scene(env, out, "cancel test", size=64)
    flow_run_id = res.stdout.split("(")[1].split(")")[0]
    with _worker_running(env, log):
        run_dir = _inferring(out, log)
        api = env["PREFECT_API_URL"]  # as `prefect flow-run cancel` does, without its start-up time
        httpx.post(f"{api}/flow_runs/{flow_run_id}/set_state",
                   json={"state": {"type": "CANCELLING", "name": "Cancelling"}}).raise_for_status()
        rec = _ended(run_dir)
        assert rec["status"] == "cancelled", (rec["status"], log.read_text()[-3000:])
        assert rec["stopped"]["status"] == "cancelled"
        end = time.monotonic() + 60
        while time.monotonic() < end:  # the worker sets CANCELLED once the process is gone
            state = httpx.get(f"{api}/flow_runs/{flow_run_id}").json()["state_type"]
            if state == "CANCELLED":
                break
            time.sleep(0.5)
        assert state == "CANCELLED"


def test_run_many_runs_three_aois_and_sums_up(server, tmp_path) -> None:
    env = server
    out, folder = tmp_path / "runs", tmp_path / "aois"
    folder.mkdir()
    x, y = _scene_corner()
    for k in range(3):
        _aoi(folder / f"field{k}.geojson", x + 0.035 * k, y + 0.05)
    with _worker_running(env, tmp_path / "worker.log"):
        code = ("import json, sys; from flows.run_many import run_many; r = run_many(aoi_folder=sys.argv[1], "
                "deployment='run_aoi/aoi-submissions', params=json.loads(sys.argv[2]), "
                "summary_dir=sys.argv[3], poll_s=1, timeout_s=600); "
                "print(json.dumps({k: r[k] for k in ('folder', 'collection')}))")
        res = subprocess.run([PY, "-c", code, str(folder), json.dumps({"overrides": _small(out)}),
                              str(tmp_path / "summaries")], env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=900)
        assert res.returncode == 0, res.stderr[-3000:] + (tmp_path / "worker.log").read_text()[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    summary = json.loads((Path(got["folder"]) / "summary.json").read_text())
    rows = summary["runs"]
    assert [Path(r["aoi"]).name for r in rows] == ["field0.geojson", "field1.geojson", "field2.geojson"]
    assert all(r["state"] == "Completed" and r["status"] == "succeeded" for r in rows), rows
    assert all(r["decision"] and r["outputs"] for r in rows)
    assert len(run_folders(out)) == 3 and len({r["run_dir"] for r in rows}) == 3
    from geo_dino.outputs import stac

    coll = Path(got["collection"])
    assert stac.validate_collection(coll)
    items = [lk for lk in json.loads(coll.read_text())["links"] if lk["rel"] == "item"]
    assert len(items) == 3 and all((coll.parent / lk["href"]).is_file() for lk in items)
    assert (Path(got["folder"]) / "summary.csv").read_text().count("\n") == 4
    api = env["PREFECT_API_URL"]
    arts = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"type": {"any_": ["markdown"]}}}).json()
    assert any("run_many over 3 AOIs" in (a.get("data") or "") for a in arts)
