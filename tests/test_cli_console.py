"""The command line around a Prefect flow: a user error inside the flow is one message with no traceback
(``--debug`` shows them), and a killed command leaves no temporary Prefect server behind."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from flows.console import ConsoleFilter
from geo_dino.errors import RunRefused, SourceError
from tests.conftest import ROOT, refused_config

CLI = str(Path(sys.executable).with_name("geo-dino"))


def _record(msg: str, exc: BaseException | None = None, name: str = "prefect.task_runs",
            level: int = logging.ERROR) -> logging.LogRecord:
    exc_info = (type(exc), exc, None) if exc is not None else None
    return logging.LogRecord(name, level, __file__, 1, msg, None, exc_info)


def test_console_filter_keeps_project_errors_off_and_everything_else_on() -> None:
    quiet = ConsoleFilter(errors=True, links=True)
    assert not quiet.filter(_record("Task run failed with exception", RunRefused("no", {})))
    assert not quiet.filter(_record(
        "Finished in state Failed('Task run encountered an exception SourceError: truncated')",
        name="prefect.flow_runs", level=logging.INFO))
    assert not quiet.filter(_record("View at http://127.0.0.1:8123/runs/flow-run/x", level=logging.INFO))
    # a bug is not a user error: its traceback stays
    assert quiet.filter(_record("Task run failed with exception", ValueError("bug")))
    assert quiet.filter(_record("Finished in state Failed('… ValueError: bug')", level=logging.INFO))
    assert quiet.filter(_record("Finished in state Completed()", level=logging.INFO))
    assert quiet.filter(_record("a SourceError: in a library's own log", name="rasterio"))
    debug = ConsoleFilter(errors=False, links=False)
    assert debug.filter(_record("Task run failed with exception", SourceError("x")))
    assert debug.filter(_record("View at http://127.0.0.1:8123/runs/flow-run/x", level=logging.INFO))


@pytest.mark.slow
def test_an_error_inside_the_flow_is_one_message_without_traceback(tmp_path) -> None:
    """The screening refusal happens inside the Prefect flow: said once without tracebacks; with them on
    --debug."""
    cfg = refused_config(tmp_path)
    res = subprocess.run([CLI, "run", "--config", str(cfg)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 3, out
    assert "Traceback" not in out and "RunRefused" not in out
    assert out.count("run needs approval") == 1 and "Nassau" in out
    assert "View at http" not in out  # the temporary server has no UI
    res = subprocess.run([CLI, "--debug", "run", "--config", str(cfg)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 3 and "Traceback" in out and "RunRefused" in out


def _server_of(proc: subprocess.Popen[bytes]) -> psutil.Process:
    for _ in range(1200):
        for c in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "prefect.server.api.server" in " ".join(c.cmdline()):
                    return c
            except psutil.NoSuchProcess:  # a short-lived child (e.g. a probe) ended while listed
                continue
        time.sleep(0.05)
    raise AssertionError("the command started no temporary Prefect server")


def _gone(p: psutil.Process, within_s: float = 15.0) -> bool:
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("when", ["starting", "running"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_command_leaves_no_prefect_server(tmp_path, when, sig) -> None:
    """Killed while the server starts, or while the flow runs (its run folder exists): the server ends too."""
    out = tmp_path / "runs"
    proc = subprocess.Popen([CLI, "run", "--config", "configs/demo.yaml", "--output-dir", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        server = _server_of(proc)
        if when == "running":
            end = time.monotonic() + 120
            while not (out.is_dir() and any(out.iterdir())) and time.monotonic() < end:
                time.sleep(0.1)
            assert out.is_dir() and any(out.iterdir()), "the flow never started"
            assert server.is_running()
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)
        assert _gone(server), f"the temporary Prefect server {server.pid} outlived the killed command"
    finally:
        if proc.poll() is None:
            proc.kill()


TAIZHOU = "data/labels/taizhou/taizhou_L7ETM_"
HEAD = "models/taizhou_change_mlp.safetensors"


@pytest.mark.parametrize(("extra", "message"), [
    (["--raster", f"{TAIZHOU}2000-03-17.tif", "--head", HEAD], "a change head needs two rasters"),
    (["--raster", f"{TAIZHOU}2000-03-17.tif", "--raster", f"{TAIZHOU}2003-02-06.tif", "--head", HEAD,
      "--arch", "vit_tiny_patch16_dinov3_test", "--random-init", "--bands", "3,2,1"],
     "the head was trained on backbone 'vit_tiny_patch8_geo'"),
    (["--raster", f"{TAIZHOU}2000-03-17.tif", "--raster", f"{TAIZHOU}2003-02-06.tif", "--head", HEAD,
      "--bands", "1,2,3"], "the head's backbone bands are [3 (B3 red)"),
])
def test_a_head_that_does_not_fit_fails_before_prefect(tmp_path, extra, message) -> None:
    """Head compatibility is part of the preflight: one error line, no Prefect server, no run folder."""
    res = subprocess.run([CLI, "run", "--aoi", "aoi/taizhou.geojson", "--output-dir", str(tmp_path / "runs"),
                          *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    errors = [ln for ln in out.splitlines() if ln.startswith("ConfigError")]
    assert len(errors) == 1 and message in errors[0], out
    assert "Traceback" not in out and "temporary server" not in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("api", "message"), [
    (None, "submissions go to a Prefect server"),
    ("http://127.0.0.1:{port}/api", "cannot reach the Prefect server"),
])
def test_submit_without_a_server_is_one_line(tmp_path, api, message) -> None:
    from tests.conftest import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "home")
    if api:
        env["PREFECT_API_URL"] = api.format(port=free_port())  # nothing listens there
    res = subprocess.run([CLI, "submit", "aoi/bahamas_andros.geojson", "--deployment", "run_aoi/x"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and message in lines[0], lines
