"""Load on a real Prefect server: a burst of AOI submissions from several processes, and a full inbox.

Starts ``prefect server start`` on 127.0.0.1 (its own PREFECT_HOME, scheduler off), creates the pools and
limits and deploys ``flows/prefect.yaml`` (what the README's server walk does), then:

1. **burst**: ``--distinct`` small AOIs inside the bundled Bahamas scene, each submitted ``--repeat`` times,
   shuffled, from ``--procs`` processes at once (``flows.submit.submit_text``, one client per process);
2. **inbox**: ``--inbox-files`` GeoJSON files dropped into an inbox at once (``--inbox-distinct`` distinct
   AOIs, the rest copies), then one scan of the ``aoi_inbox`` flow;
3. **runs**: a process worker (``--limit`` flow runs at once) runs everything submitted, to the end.

Figures: submissions answered, created vs told "already submitted", errors (5xx and others), submission
latency (median, p95, max); flow runs per idempotency key on the server (every distinct AOI exactly once,
none lost); for each run, the time from its creation to its start and to its end; the server's peak RSS
(with its children) sampled through the whole bench; the runs' record statuses.

    python bench/submissions.py                   # 20 × 3 burst from 6 processes, 50 inbox files, all run
    python bench/submissions.py --no-run          # submissions only (no worker)
    python bench/submissions.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.e2e import machine_info  # noqa: E402

PREFECT = str(Path(sys.executable).with_name("prefect"))
DEPLOYMENT = "run_aoi/aoi-submissions"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefect(env: dict[str, str], *args: str, timeout: int = 300) -> str:
    res = subprocess.run([PREFECT, "--no-prompt", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout)
    if res.returncode:
        raise RuntimeError(f"prefect {' '.join(args)}: {res.stdout[-2000:]}{res.stderr[-2000:]}")
    return res.stdout


def _aoi_text(k: int) -> str:
    """A 0.02° square AOI inside the Bahamas scene (the k-th of a grid over Andros)."""
    x0, y0 = -78.35 + 0.025 * (k % 25), 24.35 + 0.025 * (k // 25)
    ring = [[x0, y0], [x0 + 0.02, y0], [x0 + 0.02, y0 + 0.02], [x0, y0 + 0.02], [x0, y0]]
    return json.dumps({"type": "Polygon", "coordinates": [ring]})


def _params(out: Path) -> dict[str, Any]:
    return {"overrides": {"output_dir": str(out), "name": "load",
                          "backbone": {"arch": "vit_tiny_patch16_dinov3_test", "checkpoint": None,
                                       "checkpoint_sha256": None},
                          "tiling": {"size": 64, "overlap": 16, "chunk_tiles": 16},
                          "heads": {"kmeans": {"k": 4, "fit_tiles": 8}}}}


def _submitter(args: tuple[dict[str, str], list[int], str]) -> list[dict[str, Any]]:
    """One process of the burst: submit its share (AOI indexes), one client, each call timed."""
    env, share, out = args
    os.environ.update(env)
    import hashlib

    import httpx
    from prefect.client.orchestration import get_client

    from flows.submit import submit_text

    rows = []
    with get_client(sync_client=True) as client:
        for k in share:
            text = _aoi_text(k)
            t0 = time.perf_counter()
            try:
                sub = submit_text(text, hashlib.sha256(text.encode()).hexdigest(), DEPLOYMENT,
                                  _params(Path(out)), client)
                rows.append({"aoi": k, "s": time.perf_counter() - t0, "created": sub.created,
                             "flow_run_id": sub.flow_run_id})
            except httpx.HTTPStatusError as exc:
                rows.append({"aoi": k, "s": time.perf_counter() - t0, "error": exc.response.status_code})
            except Exception as exc:  # a bench counts every failure
                rows.append({"aoi": k, "s": time.perf_counter() - t0,
                             "error": f"{type(exc).__name__}: {exc}"})
    return rows


class RssSampler(threading.Thread):
    """The peak RSS of a process and its children, sampled every ``every`` s."""

    def __init__(self, pid: int, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.peak_mib, self.stop = pid, every, 0.0, threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                p = psutil.Process(self.pid)
                rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                self.peak_mib = max(self.peak_mib, rss / 2**20)
            except psutil.Error:
                pass
            time.sleep(self.every)


def _pct(v: list[float], q: float) -> float:
    v = sorted(v)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))] if v else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--distinct", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--procs", type=int, default=6)
    ap.add_argument("--inbox-files", type=int, default=50)
    ap.add_argument("--inbox-distinct", type=int, default=40)
    ap.add_argument("--limit", type=int, default=4, help="flow runs at once on the worker")
    ap.add_argument("--no-run", action="store_true", help="submit only; no worker runs them")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="geo-dino-load-"))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")} | {
        "PREFECT_HOME": str(tmp / "home"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING", "GEO_DINO_REPO": str(ROOT)}
    out = tmp / "runs"
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=(tmp / "server.log").open("w"), stderr=subprocess.STDOUT)
    sampler = RssSampler(server.pid)
    sampler.start()
    result: dict[str, Any] = {"machine": machine_info(), "args": vars(a) | {"json": str(a.json)}}
    worker = None
    try:
        _prefect(env, "server", "status", "--wait", "--timeout", "120")
        for pool in ("geo-dino-cpu", "geo-dino-gpu"):
            _prefect(env, "work-pool", "create", pool, "--type", "process")
        _prefect(env, "gcl", "create", "gpu", "--limit", "1")
        _prefect(env, "gcl", "create", "cpu", "--limit", "2")
        _prefect(env, "deploy", "--prefect-file", "flows/prefect.yaml", "--all")

        # 1. the burst
        jobs = [k for k in range(a.distinct) for _ in range(a.repeat)]
        random.Random(0).shuffle(jobs)
        shares = [jobs[i::a.procs] for i in range(a.procs)]
        t0 = time.perf_counter()
        with mp.get_context("spawn").Pool(a.procs) as pool:
            rows = [r for part in pool.map(_submitter, [(env, s, str(out)) for s in shares]) for r in part]
        burst_s = time.perf_counter() - t0
        lat = [r["s"] for r in rows]
        errors = [r for r in rows if "error" in r]
        result["burst"] = {
            "submissions": len(rows), "seconds": round(burst_s, 2), "per_s": round(len(rows) / burst_s, 1),
            "created": sum(bool(r.get("created")) for r in rows),
            "told_already_submitted": sum(r.get("created") is False for r in rows),
            "errors": len(errors), "errors_5xx": sum(isinstance(r.get("error"), int) and r["error"] >= 500
                                                     for r in errors),
            "latency_s": {"median": round(statistics.median(lat), 3), "p95": round(_pct(lat, 0.95), 3),
                          "max": round(max(lat), 3)},
            "distinct_flow_runs": len({r.get("flow_run_id") for r in rows if r.get("flow_run_id")}),
        }
        by_aoi: dict[int, set[str]] = {}
        for r in rows:
            if r.get("flow_run_id"):
                by_aoi.setdefault(r["aoi"], set()).add(r["flow_run_id"])
        result["burst"]["every_aoi_one_flow_run"] = (sorted(by_aoi) == list(range(a.distinct))
                                                      and all(len(v) == 1 for v in by_aoi.values()))

        # 2. the inbox
        inbox = tmp / "inbox"
        inbox.mkdir()
        for i in range(a.inbox_files):
            k = 100 + (i % a.inbox_distinct)
            (inbox / f"aoi_{i:03d}.geojson").write_text(_aoi_text(k))
        past = time.time() - 60
        for p in inbox.iterdir():
            os.utime(p, (past, past))
        code = ("import json, sys; from flows.inbox import aoi_inbox; r = aoi_inbox(inbox=sys.argv[1], "
                "deployment=sys.argv[2], params=json.loads(sys.argv[3])); print(json.dumps(r))")
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", code, str(inbox), DEPLOYMENT, json.dumps(_params(out))],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
        if res.returncode:
            raise RuntimeError(res.stderr[-3000:])
        scan = json.loads(res.stdout.strip().splitlines()[-1])
        result["inbox"] = {"files": a.inbox_files, "distinct": a.inbox_distinct,
                           "scan_s": round(time.perf_counter() - t0, 2),
                           "submitted": len(scan["submitted"]), "duplicates": len(scan["duplicates"]),
                           "refused": len(scan["refused"]),
                           "left_in_inbox": len(list(inbox.glob("*.geojson")))}

        # 3. every submitted AOI runs, once
        import httpx

        api = env["PREFECT_API_URL"]
        runs = httpx.post(f"{api}/flow_runs/filter", json={"limit": 200}).json()
        keys = [r["idempotency_key"] for r in runs if r.get("idempotency_key")]
        result["server"] = {"flow_runs": len(runs), "distinct_keys": len(set(keys)),
                            "expected": a.distinct + a.inbox_distinct}
        if not a.no_run:
            worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "geo-dino-cpu", "--limit",
                                       str(a.limit)], env=env, cwd=ROOT,
                                      stdout=(tmp / "worker.log").open("w"), stderr=subprocess.STDOUT)
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 3600:
                runs = httpx.post(f"{api}/flow_runs/filter", json={"limit": 200}).json()
                if all(r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in runs):
                    break
                time.sleep(5)
            from datetime import datetime

            def ts(v: str) -> datetime:
                return datetime.fromisoformat(v.replace("Z", "+00:00"))

            waits = [(ts(r["start_time"]) - ts(r["created"])).total_seconds()
                     for r in runs if r["start_time"]]
            spans = [(ts(r["end_time"]) - ts(r["created"])).total_seconds() for r in runs if r["end_time"]]
            statuses: dict[str, int] = {}
            for rec in out.glob("*/provenance.json"):
                st = json.loads(rec.read_text()).get("status", "?")
                statuses[st] = statuses.get(st, 0) + 1
            result["runs"] = {
                "seconds": round(time.perf_counter() - t0, 1), "worker_limit": a.limit,
                "states": {s: sum(r["state_type"] == s for r in runs)
                           for s in {r["state_type"] for r in runs}},
                "run_folders": sum(statuses.values()), "record_statuses": statuses,
                "creation_to_start_s": {"median": round(statistics.median(waits), 1),
                                        "max": round(max(waits), 1)} if waits else None,
                "creation_to_end_s": {"median": round(statistics.median(spans), 1),
                                      "max": round(max(spans), 1)} if spans else None}
        health = httpx.get(f"{api}/health", timeout=5).json()
        result["server"]["healthy_at_end"] = health is True
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=60)
        sampler.stop.set()
        server.terminate()
        server.wait(timeout=60)
        result.setdefault("server", {})["peak_rss_mib"] = round(sampler.peak_mib, 1)
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
