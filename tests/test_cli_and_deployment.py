"""The command line and the Prefect deployment file."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from geo_dino.cli import app
from tests.conftest import ROOT

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
    for p in (ROOT / "geo_dino").glob("*.py"):
        text = p.read_text()
        assert "import prefect" not in text and "from prefect" not in text, p.name
