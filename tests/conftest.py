"""Shared fixtures: the repository's bundled real data and a tiny-backbone run configuration."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BAHAMAS = ROOT / "data" / "rasters" / "landsat7_bahamas_RGB.byte.tif"
PUCALLPA = [ROOT / "data" / "rasters" / "pucallpa" / f"landsat_pucallpa_{y}.tif" for y in (1985, 2020)]

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # tests talk to nothing but localhost

# The only reasons a test may skip. Any other skip (a bundled file gone, a dev package missing behind
# pytest.importorskip, a new skipif) fails instead, so that a run on another machine cannot pass by skipping.
ALLOWED_SKIPS = (
    "QGIS (python3-qgis) not installed",  # QGIS is a system package: outside CI a developer may lack it
)


def refuse_unlisted_skip(report: pytest.TestReport) -> None:
    """Turn a skipped ``report`` into a failure unless its reason is one of :data:`ALLOWED_SKIPS`."""
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if not any(allowed in reason for allowed in ALLOWED_SKIPS):
        report.outcome = "failed"
        report.longrepr = f"skipped for a reason that tests/conftest.py ALLOWED_SKIPS does not list: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Every test phase's report goes through :func:`refuse_unlisted_skip`."""
    outcome = yield
    refuse_unlisted_skip(outcome.get_result())


@pytest.fixture
def tiny_config(tmp_path: Path):
    """A run configuration dict with the tiny test backbone, writing under ``tmp_path``."""

    def make(aoi: str = "aoi/bahamas_andros.geojson", rasters: list[Path] | None = None, **over) -> dict:
        cfg = {
            "name": "t",
            "aoi": str(ROOT / aoi),
            "rasters": [str(r) for r in (rasters or [BAHAMAS])],
            "output_dir": str(tmp_path / "runs"),
            "sources": {"allowed_roots": [str(ROOT / "data"), str(tmp_path)]},
            "screening": {"registry": str(ROOT / "data/registry/sensitive_sites.gpkg"),
                          "policy": str(ROOT / "configs/screening_policy.yaml")},
            "backbone": {"arch": "vit_tiny_patch16_dinov3_test", "batch_size": 16},
            "tiling": {"size": 64, "overlap": 16, "chunk_tiles": 16},
            "heads": {"kmeans": {"k": 4, "fit_tiles": 16}},
        }
        for k, v in over.items():
            cfg[k] = cfg[k] | v if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
        return cfg

    return make


def run_folders(out: Path) -> list[Path]:
    """The run folders in an output folder (each has its provenance record; ``collections/`` is not one)."""
    return sorted(p for p in Path(out).iterdir() if (p / "provenance.json").is_file())


# ------------------------------------------------------------------------------- a real Prefect server
PREFECT = str(Path(__import__("sys").executable).with_name("prefect"))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_prefect_server(home: Path, **settings: str):
    """Start ``prefect server start`` on 127.0.0.1 with its own ``PREFECT_HOME``; ``(process, env)`` where
    ``env`` points clients at it. The scheduler service is off unless ``settings`` turn it on (a test
    creates the flow runs it means)."""
    import subprocess
    import time

    import httpx

    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_URL=f"http://127.0.0.1:{port}/api", GEO_DINO_REPO=str(ROOT),
               PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false") | settings
    home.mkdir(parents=True, exist_ok=True)
    log = (home / "server.log").open("w")
    proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    for _ in range(240):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1).json() is True:
                return proc, env
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError((home / "server.log").read_text()[-2000:])
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("the Prefect server did not start in 120 s")


def stop_prefect_server(proc) -> None:
    """Stop a server of :func:`start_prefect_server`."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def prefect_cli(env: dict, *args: str, timeout: int = 180) -> str:
    """Run the ``prefect`` command against the server of ``env`` from the repository root; its stdout."""
    import subprocess

    res = subprocess.run([PREFECT, "--no-prompt", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return res.stdout


def deploy_everything(env: dict) -> None:
    """What the README's server walk does before the first run: the pools, the limits, the deployments."""
    prefect_cli(env, "work-pool", "create", "geo-dino-cpu", "--type", "process")
    prefect_cli(env, "work-pool", "create", "geo-dino-gpu", "--type", "process")
    prefect_cli(env, "gcl", "create", "gpu", "--limit", "1")
    prefect_cli(env, "gcl", "create", "cpu", "--limit", "1")
    prefect_cli(env, "deploy", "--prefect-file", "flows/prefect.yaml", "--all", timeout=300)


@pytest.fixture
def prefect_server(tmp_path):
    """A real Prefect server for one test (its env)."""
    proc, env = start_prefect_server(tmp_path / "prefect_home")
    try:
        yield env
    finally:
        stop_prefect_server(proc)


def refused_config(tmp_path: Path) -> Path:
    """A run config whose AOI (Nassau) the screen refuses until approved: airports need approval."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\ndefault: {action: record, buffer_m: 0}\n"
                      "categories:\n  airport: {action: require_approval, buffer_m: 1500}\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"aoi: aoi/bahamas_nassau.geojson\nrasters: [data/rasters/landsat7_bahamas_RGB.byte.tif]\n"
                   f"output_dir: {tmp_path / 'runs'}\nscreening: {{policy: {policy}}}\n"
                   f"backbone: {{arch: vit_tiny_patch16_dinov3_test}}\n")
    return cfg
