"""The deployment record: six parts on every run (label-free, trained head, refused, denied), every field
filled, not applicable or unknown with who decided; the governance policy's required fields; the checkpoint's
retirement; the JSON schema; the markdown and the JSON agree; `geo-dino record` and `governance check`."""

from __future__ import annotations

import dataclasses
import json
from datetime import date
from pathlib import Path

import pytest
from typer.testing import CliRunner

from geo_dino.cli import app
from geo_dino.config import GovernanceConfig, parse_config
from geo_dino.errors import GovernanceError, RunRefused
from geo_dino.governance import deployment as dr
from geo_dino.run import stages as pl
from tests.conftest import ROOT, run_folders

runner = CliRunner()
DEMO_GOVERNANCE = {"file": str(ROOT / "configs/governance_demo.yaml")}
SHIPPED = {"arch": "vit_tiny_patch8_geo", "checkpoint": str(ROOT / "models/vit_tiny_patch8_geo.safetensors")}


def _record(run: Path) -> dict:
    rec = json.loads((run / dr.JSON_FILE).read_text())
    dr.validate(rec)
    assert set(dr.PARTS) <= set(rec)
    for part in dr.PARTS:
        for name, field in rec[part].items():
            assert field["status"] in ("filled", "not_applicable", "unknown"), (part, name)
            assert field["decided_by"], (part, name)
    return rec


def _md_agrees(run: Path, rec: dict) -> None:
    """Every field of the JSON is a row of the markdown with the same status and decider."""
    md = (run / dr.MD_FILE).read_text()
    for part in dr.PARTS:
        for name, field in rec[part].items():
            assert f"| {name} |" in md
            row = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
            assert row.endswith(f"| {field['status']} | {field['decided_by']} |"), row


@pytest.fixture(scope="module")
def nassau_run(tmp_path_factory) -> Path:
    """The Bahamas (Nassau) AOI with the shipped backbone and the demo's governance file: label-free."""
    tmp = tmp_path_factory.mktemp("nassau")
    cfg = {"name": "nassau", "aoi": str(ROOT / "aoi/bahamas_nassau.geojson"),
           "rasters": [str(ROOT / "data/rasters/landsat7_bahamas_RGB.byte.tif")],
           "output_dir": str(tmp / "runs"),
           "sources": {"allowed_roots": [str(ROOT / "data")]},
           "screening": {"registry": str(ROOT / "data/registry/sensitive_sites.gpkg"),
                         "policy": str(ROOT / "configs/screening_policy.yaml")},
           "backbone": SHIPPED | {"batch_size": 16}, "tiling": {"size": 64, "overlap": 16, "chunk_tiles": 64},
           "heads": {"kmeans": {"k": 4, "fit_tiles": 16}}, "governance": DEMO_GOVERNANCE}
    return pl.run_local(parse_config(cfg))


def test_a_label_free_run_has_every_part_and_says_it_is_unvalidated(nassau_run) -> None:
    rec = _record(nassau_run)
    _md_agrees(nassau_run, rec)
    assert rec["run_status"] == "succeeded"
    prov = json.loads((nassau_run / "provenance.json").read_text())["deployment_record"]
    assert {p: prov[p] for p in dr.PARTS} == {p: rec[p] for p in dr.PARTS}  # the six parts, in both
    bb = rec["backbone"]
    assert bb["family"]["value"] == "dinov3" and bb["architecture"]["value"] == "vit_tiny_patch8_geo"
    assert bb["checkpoint_sha256"]["value"] == json.loads((nassau_run / "provenance.json").read_text())[
        "backbone"]["sha256"]
    assert bb["parameters"]["value"] > 1_000_000 and bb["register_tokens"]["value"] == 4
    lin = rec["training_lineage"]
    used = lin["pretraining_rasters"]["value"]["rasters"]  # the user's own rasters, with their hashes
    assert len(used) == 3 and all(len(r["sha256"]) == 64 for r in used)
    assert lin["model_card"]["value"].endswith(".md")
    assert lin["weights_kind"]["value"].startswith("satellite-pretrained")
    ev = rec["evaluation_boundary"]
    assert ev["statement"]["value"].startswith("unvalidated") and ev["metrics"]["status"] == "not_applicable"
    pb = rec["pipeline_boundary"]
    assert pb["automated_actions"]["decided_by"] == "geo_dino maintainers (demo deployment)"
    route = rec["governance_route"]
    assert route["misuse_controls"]["value"]["policy_sha256"]
    assert route["retirement"]["value"]["review_interval_days"] == 365


def test_the_nassau_run_names_the_airport_hit_and_the_people_there(nassau_run) -> None:
    pp = _record(nassau_run)["people_and_places"]
    hits = pp["sensitive_sites_hit"]["value"]["sites"]
    assert any(h["category"] == "airport" and "Nassau" in h["name"] for h in hits)
    assert any(p["name"] == "Nassau" for p in pp["populated_places"]["value"]["places"])
    urban = pp["urban_areas"]["value"]  # Nassau (pop. ~228,000) lies inside the AOI: urban
    assert urban["urban"] is True and urban["cities_inside"][0]["name"] == "Nassau"
    assert pp["resolution"]["value"]["could_resolve_people"] == "no"  # Landsat 30 m
    assert pp["faces"] == {"value": "no", "status": "filled", "decided_by": "geo_dino maintainers (demo "
                                                                            "deployment)"}


def test_the_stac_item_and_the_tags_agree_with_the_record(nassau_run) -> None:
    import rasterio

    rec = _record(nassau_run)
    item = json.loads((nassau_run / "stac_item.json").read_text())
    assert item["properties"]["geo_dino:deployment_record"] == dr.summary(rec)
    s = dr.summary(rec)
    hits = rec["people_and_places"]["sensitive_sites_hit"]["value"]
    assert s["complete"] and s["sites_hit"] == hits["count"] >= 1
    assert s["weights_kind"] == rec["training_lineage"]["weights_kind"]["value"]
    assert {"deployment_record", "deployment_record_md"} <= set(item["assets"])
    assert any(lk["rel"] == "describedby" and lk["href"] == dr.MD_FILE for lk in item["links"])
    with rasterio.open(nassau_run / "classes.tif") as src:
        tags = src.tags()
    assert tags["GEO_DINO_EVALUATION"].startswith("unvalidated") == \
        rec["evaluation_boundary"]["statement"]["value"].startswith("unvalidated")
    assert tags["GEO_DINO_DEPLOYMENT_RECORD"].startswith(dr.JSON_FILE)


def test_record_check_passes_a_complete_record_and_show_prints_it(nassau_run) -> None:
    res = runner.invoke(app, ["record", "check", str(nassau_run)])
    assert res.exit_code == 0, res.output
    assert "complete" in res.output
    res = runner.invoke(app, ["record", "show", str(nassau_run)])
    assert res.exit_code == 0 and "## 5. People and places" in res.output
    res = runner.invoke(app, ["record", "show", "--json", str(nassau_run)])
    assert json.loads(res.output)["run_id"] == nassau_run.name


def test_record_check_names_what_is_missing(tiny_config) -> None:
    """No governance section, a test architecture: the declared fields and the retirement are unknown."""
    run = pl.run_local(parse_config(tiny_config()))
    rec = _record(run)
    missing = dr.incomplete(rec)
    assert "governance_route.privacy_assessment" in missing and "people_and_places.faces" in missing
    assert rec["governance_route"]["privacy_assessment"]["decided_by"] == dr.NOT_DECLARED
    res = runner.invoke(app, ["record", "check", str(run)])
    assert res.exit_code == 1
    assert "unknown: governance_route.privacy_assessment" in res.output and "incomplete" in res.output


@pytest.mark.slow
def test_a_trained_head_run_carries_its_test_and_is_task_headed(tmp_path) -> None:
    taizhou = ROOT / "data" / "labels" / "taizhou"
    cfg = {"name": "head", "aoi": str(ROOT / "aoi/taizhou.geojson"),
           "rasters": [str(taizhou / "taizhou_L7ETM_2000-03-17.tif"),
                       str(taizhou / "taizhou_L7ETM_2003-02-06.tif")],
           "output_dir": str(tmp_path / "runs"), "sources": {"allowed_roots": [str(ROOT / "data")],
                                                              "bands": [3, 2, 1]},
           "screening": {"registry": str(ROOT / "data/registry/sensitive_sites.gpkg"),
                         "policy": str(ROOT / "configs/screening_policy.yaml")},
           "backbone": SHIPPED | {"batch_size": 8}, "tiling": {"size": 128, "overlap": 32, "chunk_tiles": 16},
           "heads": {"kmeans": {"k": 4, "fit_tiles": 8},
                     "supervised": {"path": str(ROOT / "models/taizhou_change_mlp.safetensors")}}}
    run = pl.run_local(parse_config(cfg))
    rec = _record(run)
    _md_agrees(run, rec)
    ev = rec["evaluation_boundary"]
    head = json.loads((run / "provenance.json").read_text())["supervised_head"]
    assert ev["metrics"]["value"]["miou"] == head["metrics"]["test"]["miou"]
    assert ev["class_distribution"]["value"] == {"changed": head["metrics"]["test"]["per_class"]["changed"][
        "support"], "unchanged": head["metrics"]["test"]["per_class"]["unchanged"]["support"]}
    assert "not an independent replication" in ev["replication"]["value"]
    assert "task-headed" in rec["training_lineage"]["weights_kind"]["value"]
    pb = rec["pipeline_boundary"]
    assert pb["labels"]["value"]["sha256"] == head["lineage"]["labels"]["sha256"]
    assert pb["thresholds"]["value"]["change"]["method"] == "minimum-error"
    assert pb["calibration"]["value"].startswith("none")
    import rasterio

    with rasterio.open(run / "change_probability.tif") as src:
        assert f"mIoU {head['metrics']['test']['miou']:.3f}" in src.tags()["GEO_DINO_EVALUATION"]


def test_refused_and_denied_runs_have_a_record(tmp_path, tiny_config) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\ndefault: {action: record, buffer_m: 0}\n"
                      "categories:\n  airport: {action: require_approval, buffer_m: 1500}\n"
                      "  port: {action: deny, buffer_m: 0}\n")
    for name in ("refused", "denied"):
        cats = ("  airport: {action: require_approval, buffer_m: 1500}\n" if name == "refused" else
                "  airport: {action: deny, buffer_m: 1500}\n")
        policy.write_text("version: 1\ndefault: {action: record, buffer_m: 0}\ncategories:\n" + cats)
        cfg = tiny_config("aoi/bahamas_nassau.geojson", name=name, output_dir=str(tmp_path / name),
                          screening={"policy": str(policy)})
        with pytest.raises(RunRefused):
            pl.run_local(parse_config(cfg))
        (run,) = run_folders(tmp_path / name)
        rec = _record(run)
        _md_agrees(run, rec)
        assert rec["run_status"] == "refused"
        assert rec["governance_route"]["route"]["value"]["action"] == ("require_approval" if name == "refused"
                                                                      else "deny")
        assert rec["backbone"]["parameters"]["status"] == "not_applicable"  # never built
        assert rec["people_and_places"]["sensitive_sites_hit"]["value"]["count"] >= 1
        assert not list(run.glob("*.tif"))


def test_a_deployment_without_the_required_fields_is_refused_naming_them(tmp_path, tiny_config) -> None:
    cfg = parse_config(tiny_config(governance={"decided_by": "A. Person", "privacy_assessment": "PIA-7"}))
    with pytest.raises(GovernanceError) as err:
        pl.prepare_run(cfg, deployment="nightly")
    msg = str(err.value)
    for f in ("governance.data_protection_basis", "governance.appeal_path", "governance.monitoring_plan",
              "governance.outputs_reviewed_before_use"):
        assert f in msg
    assert "governance.privacy_assessment" not in msg and "deployment nightly" in msg
    (run,) = run_folders(tmp_path / "runs")
    rec = _record(run)
    assert rec["run_status"] == "refused"
    assert pl.prepare_run(cfg)  # the same config run by hand: nothing required of an ad-hoc run


def test_governance_check_at_deploy_time(tmp_path) -> None:
    res = runner.invoke(app, ["governance", "check", str(ROOT / "flows/prefect.yaml")])
    assert res.exit_code == 0, res.output
    assert "deployment demo-nightly: governance fields complete" in res.output
    bare = tmp_path / "bare.yaml"
    bare.write_text((ROOT / "configs/demo.yaml").read_text().split("\n# the human-decided fields")[0])
    deploy = tmp_path / "prefect.yaml"
    deploy.write_text("deployments:\n  - name: bare-nightly\n    entrypoint: flows/run_aoi.py:run_aoi\n"
                      f"    parameters: {{config_path: {bare}}}\n")
    res = runner.invoke(app, ["governance", "check", str(deploy)])
    assert res.exit_code == 1
    assert "deployment bare-nightly" in res.output and "governance.privacy_assessment" in res.output
    assert (ROOT / "flows/prefect.yaml").read_text().count("governance check flows/prefect.yaml") == 1


def test_the_governance_file_fills_what_the_config_leaves_and_answers_are_checked(tmp_path) -> None:
    fields = dr.governance_fields(GovernanceConfig(file=ROOT / "configs/governance_demo.yaml",
                                                   appeal_path="write to appeals@example.org",
                                                   decided_by_fields={"appeal_path": "Legal"}))
    assert fields["appeal_path"] == {"value": "write to appeals@example.org", "status": "filled",
                                     "decided_by": "Legal"}
    assert fields["privacy_assessment"]["status"] == "filled"
    bad = tmp_path / "g.yaml"
    bad.write_text("faces: maybe\n")
    with pytest.raises(GovernanceError, match="faces"):
        dr.governance_fields(GovernanceConfig(file=bad))
    with pytest.raises(GovernanceError, match="not found"):
        dr.governance_fields(GovernanceConfig(file=tmp_path / "missing.yaml"))
    pol = tmp_path / "p.yaml"
    pol.write_text("version: 1\nrequired_for_all_runs: [favourite_colour]\n")
    with pytest.raises(GovernanceError, match="favourite_colour"):
        dr.load_policy(pol)


def test_a_checkpoint_past_its_retirement_warns_or_refuses(tmp_path, tiny_config, monkeypatch) -> None:
    from geo_dino.models import archs

    today = date(2027, 6, 1)
    policy = dr.GovernancePolicy(stale_checkpoint="refuse")
    stale = dr.retirement("2027-01-01", None, None, today, policy)
    assert stale["value"]["stale"] and stale["value"]["on_stale"] == "refuse"
    assert not dr.retirement("2028-01-01", None, None, today, policy)["value"]["stale"]
    assert dr.retirement(None, 30, "2027-05-15", today, policy)["value"]["stale"] is False
    assert dr.retirement(None, 30, "2027-04-01", today, policy)["value"]["stale"] is True
    assert dr.retirement(None, None, None, today, policy)["status"] == "unknown"
    spec = archs.ARCHS["vit_tiny_patch16_dinov3_test"]
    monkeypatch.setitem(archs.ARCHS, spec.name, dataclasses.replace(spec, retire_after="2020-01-01"))
    refuse = tmp_path / "refuse.yaml"
    refuse.write_text("version: 1\nstale_checkpoint: refuse\n")
    for pol, expect in ((None, "warn"), (refuse, "refuse")):
        cfg = parse_config(tiny_config(governance={"policy": str(pol)} if pol else {}))
        run = pl.prepare_run(cfg)
        pl.screen_aoi(run)
        if expect == "warn":
            with pytest.warns(UserWarning, match="past its retirement"):
                pl.plan_run(run)
        else:
            with pytest.raises(GovernanceError, match="past its retirement"):
                pl.plan_run(run)
            rec = _record(run)
            assert rec["run_status"] == "refused"
            assert rec["governance_route"]["retirement"]["value"]["stale"] is True


def test_the_schema_refuses_a_record_with_a_part_missing_or_a_blank_field(nassau_run) -> None:
    rec = json.loads((nassau_run / dr.JSON_FILE).read_text())
    broken = {k: v for k, v in rec.items() if k != "people_and_places"}
    with pytest.raises(GovernanceError, match="people_and_places"):
        dr.validate(broken)
    blank = json.loads(json.dumps(rec))
    blank["governance_route"]["appeal_path"] = {"value": None, "status": "filled", "decided_by": "x"}
    with pytest.raises(GovernanceError, match="appeal_path"):
        dr.validate(blank)
    nobody = json.loads(json.dumps(rec))
    nobody["backbone"]["family"]["decided_by"] = ""
    with pytest.raises(GovernanceError, match="family"):
        dr.validate(nobody)
