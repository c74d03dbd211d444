"""Against a real Prefect server: deploy flows/prefect.yaml, run the demo deployment through a process
worker."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import deploy_everything, prefect_cli, run_folders


def _prefect(env: dict, *args: str, timeout: int = 180) -> str:
    return prefect_cli(env, *args, timeout=timeout)


@pytest.mark.slow
def test_deploy_and_run_on_a_real_server(prefect_server, tmp_path):
    env = prefect_server
    api = env["PREFECT_API_URL"]
    deploy_everything(env)
    deps = httpx.post(f"{api}/deployments/filter", json={}).json()
    by_name = {d["name"]: d for d in deps}
    assert {"demo-nightly", "change-weekly"} <= set(by_name)
    sched = by_name["demo-nightly"]["schedules"][0]["schedule"]
    assert sched["cron"] == "30 2 * * *" and sched["timezone"] == "Europe/Amsterdam"
    assert by_name["demo-nightly"]["work_pool_name"] == "geo-dino-cpu"
    out = tmp_path / "runs"
    overrides = {"output_dir": str(out),  # the demo with its shipped backbone, on small tiles
                 "tiling": {"size": 64, "overlap": 16, "chunk_tiles": 64}}
    _prefect(env, "deployment", "run", "run_aoi/demo-nightly", "--param",
             f"overrides={json.dumps(overrides)}")
    _prefect(env, "worker", "start", "--pool", "geo-dino-cpu", "--run-once", timeout=300)
    (run_dir,) = run_folders(out)
    rec = json.loads((run_dir / "provenance.json").read_text())
    assert rec["status"] == "succeeded" and (run_dir / "classes.tif").is_file()
    # the deployment's runs share one STAC Collection, named after it
    assert rec["prefect"]["deployment"] == "demo-nightly"
    coll = out / "collections" / "demo-nightly" / "collection.json"
    from geo_dino.outputs import stac
    assert stac.validate_collection(coll)
    links = json.loads(coll.read_text())["links"]
    assert [(coll.parent / lk["href"]).resolve() for lk in links if lk["rel"] == "item"] == [
        (run_dir / "stac_item.json").resolve()]
    flow_run = httpx.get(f"{api}/flow_runs/{rec['prefect']['flow_run_id']}").json()
    assert flow_run["state_type"] == "COMPLETED"
    assert flow_run["deployment_id"] == by_name["demo-nightly"]["id"]
    tasks = httpx.post(f"{api}/task_runs/filter",
                       json={"flow_runs": {"id": {"any_": [flow_run["id"]]}}}).json()
    names = {t["task_key"].rsplit("-", 1)[0] if "-" in t["task_key"] else t["task_key"] for t in tasks}
    assert len(tasks) == 5 + rec["pipeline"]["n_chunks"]  # one task per stage, one per chunk of tiles
    assert len(names) >= 5
