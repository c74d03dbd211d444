"""The command line and the Prefect deployment file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from geo_dino.cli import app
from tests.conftest import ROOT, refused_config, run_folders

runner = CliRunner()


def test_validate_aoi_ok():
    res = runner.invoke(app, ["validate-aoi", str(ROOT / "aoi/bahamas_nassau.geojson")])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.output)
    assert len(rec["sha256"]) == 64 and rec["area_m2"] > 1e8


def test_validate_aoi_bad(tmp_path):
    bad = tmp_path / "bad.geojson"
    bad.write_text('{"type": "Polygon", "coordinates": [[[500000, 2800000], [510000, 2800000], '
                   '[510000, 2810000], [500000, 2800000]]]}')
    res = runner.invoke(app, ["validate-aoi", str(bad)])
    assert res.exit_code == 2
    assert "projected" in res.output


def test_run_needs_inputs():
    res = runner.invoke(app, ["run"])
    assert res.exit_code == 2 and "--config" in res.output


def test_run_bad_config_names_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("aoi: a.geojson\nrasters: [x.tif]\nbackbone: {archh: x}\n")
    res = runner.invoke(app, ["run", "--config", str(cfg)])
    assert res.exit_code == 2
    assert "backbone.archh" in res.output and "unknown key" in res.output
    assert not (tmp_path / "runs").exists()


def test_approval_flags_go_together(tmp_path):
    res = runner.invoke(app, ["run", "--config", str(ROOT / "configs/demo.yaml"), "--approve-by", "X"])
    assert res.exit_code == 2 and "--approve-reason" in res.output


def test_demo_configs_validate():
    from geo_dino.config import load_config

    for name in ("demo.yaml", "demo_change.yaml"):
        cfg = load_config(ROOT / "configs" / name)
        assert all(Path(r).is_file() for r in cfg.rasters)
        assert Path(cfg.aoi).is_file()


def test_prefect_yaml_declares_scheduled_deployment():
    doc = yaml.safe_load((ROOT / "flows/prefect.yaml").read_text())
    dep = {d["name"]: d for d in doc["deployments"]}["demo-nightly"]
    assert dep["entrypoint"] == "flows/run_aoi.py:run_aoi"
    module, func = dep["entrypoint"].split(":")
    assert (ROOT / module).is_file() and f"def {func}(" in (ROOT / module).read_text()
    sched = dep["schedules"][0]
    assert sched["timezone"] and len(sched["cron"].split()) == 5
    from prefect.client.schemas.schedules import CronSchedule

    s = CronSchedule(cron=sched["cron"], timezone=sched["timezone"])  # Prefect itself validates both
    assert s.timezone == "Europe/Amsterdam"
    assert (ROOT / dep["parameters"]["config_path"]).is_file()


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, geo_dino; print(any(m in sys.modules for m in ('torch', 'prefect', 'rasterio')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_library_never_imports_prefect():
    files = sorted((ROOT / "geo_dino").rglob("*.py"))
    assert len(files) > 50  # every subpackage's modules, not only the top level
    for p in files:
        text = p.read_text()
        assert "import prefect" not in text and "from prefect" not in text, p.name


@pytest.mark.slow
def test_cli_run_end_to_end(tmp_path, monkeypatch):
    """`geo-dino run --aoi --raster` through the Prefect flow: outputs and where to find them."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "runs"
    res = runner.invoke(app, ["run", "--aoi", "aoi/bahamas_andros.geojson",
                              "--raster", "data/rasters/landsat7_bahamas_RGB.byte.tif",
                              "--arch", "vit_tiny_patch16_dinov3_test", "--random-init",
                              "--output-dir", str(out)])
    assert res.exit_code == 0, res.output
    (run_dir,) = run_folders(out)
    assert f"Outputs in {run_dir}" in res.output and "QGIS" in res.output
    assert (run_dir / "classes.tif").is_file() and (run_dir / "pca_rgb.tif").is_file()
    assert json.loads((run_dir / "provenance.json").read_text())["status"] == "succeeded"


@pytest.mark.slow
def test_cli_refused_run_exit_code(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = refused_config(tmp_path)
    res = runner.invoke(app, ["run", "--config", str(cfg)])
    assert res.exit_code == 3 and "refused" in res.output and "approver" in res.output
    (run_dir,) = run_folders(tmp_path / "runs")
    assert not list(run_dir.glob("*.tif"))
    res = runner.invoke(app, ["run", "--config", str(cfg), "--approve-by", "B. Reviewer",
                              "--approve-reason", "port authority request #42"])
    assert res.exit_code == 0, res.output
    approved = [d for d in run_folders(tmp_path / "runs") if (d / "classes.tif").exists()]
    assert len(approved) == 1
    dec = json.loads((approved[0] / "screening.json").read_text())
    assert dec["approval"]["approver"] == "B. Reviewer"


@pytest.mark.slow
def test_cli_run_on_two_workers_gives_the_serial_outputs(tmp_path, monkeypatch):
    """`geo-dino run --workers 2`: the Prefect flow runs the chunks on a local Dask cluster of two worker
    processes (prefect-dask); the rasters equal a serial run's of the same config."""
    import numpy as np
    import rasterio

    from geo_dino.config import parse_config
    from geo_dino.run import stages as pl

    monkeypatch.chdir(ROOT)
    args = {"aoi": "aoi/bahamas_andros.geojson", "raster": "data/rasters/landsat7_bahamas_RGB.byte.tif",
            "arch": "vit_tiny_patch16_dinov3_test"}
    res = runner.invoke(app, ["run", "--aoi", args["aoi"], "--raster", args["raster"], "--arch",
                              args["arch"], "--random-init", "--output-dir", str(tmp_path / "dask"),
                              "--workers", "2"])
    assert res.exit_code == 0, res.output
    (run_dir,) = run_folders(tmp_path / "dask")
    ex = json.loads((run_dir / "provenance.json").read_text())["execution"]
    assert ex["engine"] == "dask" and ex["n_workers"] == 2
    assert os.getpid() not in {w["pid"] for w in ex["workers"]}
    serial = pl.run_local(parse_config({"aoi": args["aoi"], "rasters": [args["raster"]],
                                        "backbone": {"arch": args["arch"]},
                                        "output_dir": str(tmp_path / "s")}))
    for name in ("pca_rgb.tif", "classes.tif"):
        with rasterio.open(serial / name) as a, rasterio.open(run_dir / name) as b:
            assert np.array_equal(a.read(), b.read()) and a.transform == b.transform, name


def test_cli_engine_flags_are_checked(tmp_path, tiny_config):
    res = runner.invoke(app, ["run", "--config", str(ROOT / "configs/demo.yaml"), "--workers", "2",
                              "--dask-address", "tcp://127.0.0.1:8786"])
    assert res.exit_code == 2 and "give one of them" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["run", "--config", str(ROOT / "configs/demo.yaml"), "--dask-address",
                              "http://127.0.0.1:8786"])
    assert res.exit_code == 2 and "execution.address" in res.output
    (tmp_path / "provenance.json").write_text("{}")
    res = runner.invoke(app, ["resume", str(tmp_path), "--dask-address", "http://127.0.0.1:8786"])
    assert res.exit_code == 2 and "String should match pattern" in res.output


def test_cli_resume(tmp_path, tiny_config):
    from geo_dino.config import parse_config
    from geo_dino.run import stages as pl

    res = runner.invoke(app, ["resume", str(tmp_path)])
    assert res.exit_code == 2 and "not a run folder" in res.output
    run_dir = pl.run_local(parse_config(tiny_config()))
    res = runner.invoke(app, ["resume", str(run_dir)])  # already finished: nothing to do, outputs untouched
    assert res.exit_code == 0, res.output
    assert f"Outputs in {run_dir}" in res.output


def test_every_deployment_points_at_a_flow_and_a_loadable_config():
    from geo_dino.config import load_config
    from geo_dino.training.pretrain_config import load_pretrain_config

    doc = yaml.safe_load((ROOT / "flows/prefect.yaml").read_text())
    for dep in doc["deployments"]:
        module, func = dep["entrypoint"].split(":")
        src = (ROOT / module).read_text()
        assert f"def {func}(" in src and "@flow" in src, dep["name"]
        params = dep["parameters"]
        if func in ("aoi_inbox", "run_many"):  # they submit to a run_aoi deployment declared here
            names = {f"run_aoi/{d['name']}" for d in doc["deployments"]
                     if d["entrypoint"].endswith(":run_aoi")}
            assert params["deployment"] in names, dep["name"]
            continue
        cfg_path = ROOT / params["config_path"]
        if func == "pretrain_flow":
            cfg = load_pretrain_config(cfg_path)
            assert all(Path(r).is_file() for r in cfg.data.rasters)
        elif func == "train_head_flow":
            from geo_dino.training.head_config import load_head_config

            cfg = load_head_config(cfg_path)
            assert all(Path(r).is_file() for r in cfg.rasters) and Path(cfg.labels.raster).is_file()
        else:
            cfg = load_config(cfg_path, params.get("overrides"))
            assert all(Path(r).is_file() for r in cfg.rasters)


@pytest.mark.slow
def test_flows_turn_prefect_telemetry_off_by_default():
    """The ephemeral server a run starts sends no usage telemetry unless the user asks for it."""
    import subprocess
    import sys

    code = ("import flows.run_aoi; from prefect.settings import get_current_settings; "
            "print(get_current_settings().server.analytics_enabled)")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_ANALYTICS_ENABLED"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True)
    assert res.stdout.strip().splitlines()[-1] == "False"
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "true"  # the user's own choice wins
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True)
    assert res.stdout.strip().splitlines()[-1] == "True"


def test_version() -> None:
    from geo_dino import __version__

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"geo-dino {__version__}"


@pytest.mark.parametrize("where", ["/etc/geo", "/usr/local/runs", "/proc/self", "/dev/shm/x", "a file"])
def test_output_dir_must_be_a_folder_of_ours(tmp_path, where) -> None:
    from geo_dino.config import parse_config
    from geo_dino.errors import ConfigError

    if where == "a file":
        (tmp_path / "notes.txt").write_text("x")
        where, match = str(tmp_path / "notes.txt"), "is a file, not a folder"
    else:
        match = "inside the system folder"
    with pytest.raises(ConfigError, match=match):
        parse_config({"aoi": "aoi/pucallpa.geojson", "rasters": ["data/x.tif"], "output_dir": where})
    assert parse_config({"aoi": "aoi/pucallpa.geojson", "rasters": ["data/x.tif"],
                         "output_dir": str(tmp_path / "runs")}).output_dir


def test_cli_never_runs_random_weights_silently(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    base = ["run", "--aoi", "aoi/bahamas_andros.geojson", "--raster",
            "data/rasters/landsat7_bahamas_RGB.byte.tif", "--output-dir", str(tmp_path)]
    res = runner.invoke(app, base + ["--arch", "vit_small_patch16_dinov3"])
    assert res.exit_code == 2 and "would run random weights" in res.output and "--random-init" in res.output
    res = runner.invoke(app, base + ["--random-init", "--checkpoint",
                                     "models/vit_tiny_patch8_geo.safetensors"])
    assert res.exit_code == 2 and "give one of them" in res.output
    res = runner.invoke(app, base + ["--bands", ","])
    assert res.exit_code == 2 and "--bands" in res.output
    assert not list(tmp_path.iterdir())  # refused before any run folder


@pytest.mark.slow
def test_the_readme_change_example_runs_with_bands_on_the_shipped_backbone(tmp_path, monkeypatch) -> None:
    """`geo-dino run --aoi … --raster 1985 --raster 2020 --bands 1,2,3`: four-band Landsat, the shipped
    backbone (no --checkpoint), the registry and policy named on the command line."""
    from geo_dino.files import sha256_file

    monkeypatch.chdir(ROOT)
    res = runner.invoke(app, ["run", "--aoi", "aoi/pucallpa.geojson",
                              "--raster", "data/rasters/pucallpa/landsat_pucallpa_1985.tif",
                              "--raster", "data/rasters/pucallpa/landsat_pucallpa_2020.tif",
                              "--bands", "1,2,3",
                              "--registry", "data/registry/sensitive_sites.gpkg",
                              "--policy", "configs/screening_policy.yaml", "--output-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "RANDOM" not in res.output
    (run_dir,) = run_folders(tmp_path)
    rec = json.loads((run_dir / "provenance.json").read_text())
    assert rec["backbone"]["arch"] == "vit_tiny_patch8_geo"
    assert rec["backbone"]["sha256"] == sha256_file(ROOT / "models/vit_tiny_patch8_geo.safetensors")
    assert rec["preprocessing"]["bands"] == [1, 2, 3]
    assert rec["screening"]["policy"]["path"].endswith("configs/screening_policy.yaml")
    assert (run_dir / "change_mask.tif").is_file()


@pytest.mark.parametrize(("extra", "message"), [
    (["--bands", "1,2,9"], "band"),
    (["--registry", "data/registry/missing.gpkg"], "registry not found"),
    (["--policy", "configs/nope.yaml"], "policy not found"),
])
def test_bad_inputs_fail_before_prefect_in_one_line_and_leave_no_run_folder(tmp_path, extra,
                                                                            message) -> None:
    import subprocess
    import sys

    # a fresh process, as a user runs it: what it prints is all there is
    cli = str(Path(sys.executable).with_name("geo-dino"))
    res = subprocess.run([cli, "run", "--aoi", "aoi/pucallpa.geojson", "--raster",
                          "data/rasters/pucallpa/landsat_pucallpa_1985.tif", "--output-dir",
                          str(tmp_path / "runs"), *extra],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [ln for ln in (res.stdout + res.stderr).strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "runs").exists()
