"""A run's deployment record (:mod:`geo_dino.governance.deployment`): the facts of the run gathered from its
folder — the provenance record, the resolved config, the plan when there is one, the screening decision —
with the registry's lineage facts, the people-and-places computation and the config's governance section.

Written for every run that has a record: succeeded, refused, denied or failed (the parts a run never reached
say so). Reads only files; it never reads pixels.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from geo_dino.files import CONFIG, PLAN, RECORD, SCREENING
from geo_dino.governance import deployment as dr
from geo_dino.governance.deployment import filled, not_applicable, unknown

COMPUTED = "computed by geo_dino"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        out: dict[str, Any] = json.loads(path.read_text())
        return out
    except (OSError, ValueError):
        return None


def _backbone(rec: dict[str, Any], plan: dict[str, Any] | None) -> dict[str, Any]:
    bb = rec.get("backbone") or {}
    pb = (plan or {}).get("backbone") or {}
    arch = bb.get("arch") or pb.get("arch")
    if not arch:
        why = "the run stopped before its backbone was chosen (" + str(rec.get("status")) + ")"
        return {k: not_applicable(why, COMPUTED) for k in ("family", "architecture", "checkpoint_file",
                                                           "checkpoint_sha256", "source", "parameters",
                                                           "patch_size", "input_resolution",
                                                           "register_tokens")}
    from geo_dino.models.archs import ARCHS

    spec = ARCHS.get(arch)
    tiling = (plan or {}).get("tiling") or {}
    size = tiling.get("model_size") or tiling.get("size") or (rec.get("pipeline") or {}).get("tile_size")
    sha = bb.get("sha256") or pb.get("sha256")
    src = bb.get("source")
    return {
        "family": (filled(spec.family, "backbone registry") if spec
                   else unknown(COMPUTED, "not in the registry")),
        "architecture": filled(arch, "config: backbone.arch"),
        "checkpoint_file": filled(src, "config: backbone.checkpoint") if src and sha else
        not_applicable("random initialisation (no checkpoint)", "config: backbone.checkpoint"),
        "checkpoint_sha256": filled(sha, COMPUTED) if sha else
        not_applicable("random initialisation", COMPUTED),
        "source": filled(bb.get("training_lineage") or (spec.training_data if spec else None)
                         or bb.get("layout"), "checkpoint metadata") if sha else
        not_applicable("random initialisation", COMPUTED),
        "parameters": filled(bb["parameters"], COMPUTED) if bb.get("parameters") else
        unknown(COMPUTED, "not counted (the run stopped before the model was built)"),
        "patch_size": filled(bb.get("patch_size") or pb.get("patch_size"), "backbone registry"),
        "input_resolution": filled(f"{size}×{size} px tiles", "config: tiling") if size else
        unknown(COMPUTED, "no tiling planned"),
        "register_tokens": filled(bb.get("n_registers", spec.n_registers if spec else 0),
                                  "backbone registry"),
    }


def _lineage(rec: dict[str, Any], head: dict[str, Any] | None) -> dict[str, Any]:
    from geo_dino.models.archs import ARCHS
    from geo_dino.models.lineage import lineage_record

    bb = rec.get("backbone") or {}
    arch = bb.get("arch")
    keys = ("paper", "dataset", "pretraining_rasters", "model_card", "licence", "access_route", "bias_notes",
            "weights_kind")
    if not arch or arch not in ARCHS:
        return {k: not_applicable("no backbone was loaded", COMPUTED) for k in keys}
    own = bool(bb.get("training_lineage"))
    lin = lineage_record(arch, own_pretraining=own)
    if not bb.get("sha256"):  # random weights: no pretraining at all
        why = "random initialisation (seed recorded in provenance.json): no pretraining"
        out = {k: not_applicable(why, COMPUTED) for k in keys}
        out["weights_kind"] = filled("random initialisation" + (", task-headed" if head else ""), COMPUTED)
        lic = rec.get("licence") or {}
        out["licence"] = filled(lic.get("architecture_licence") or lin["licence"], "backbone registry")
        return out
    lic = rec.get("licence") or {}
    rasters: dict[str, Any]
    if own:
        card = Path(str(bb.get("source", ""))).with_suffix(".md")
        meta = _read(card.with_suffix(".json")) or {}
        used = [{"path": r.get("path"), "sha256": r.get("sha256")}
                for r in (meta.get("data") or {}).get("rasters") or []]
        rasters = (filled({"rasters": used, "summary": bb.get("training_lineage")},
                          f"checkpoint metadata ({card.with_suffix('.json').name})") if used
                   else filled(bb.get("training_lineage"), "checkpoint metadata"))
        model_card = filled(str(card), "checkpoint metadata") if card.is_file() else \
            unknown("checkpoint metadata", f"no model card beside the checkpoint ({card.name})")
    else:
        rasters = not_applicable("published weights: pretrained on the dataset above, not on the user's "
                                 "rasters", "backbone registry")
        model_card = filled(lin["model_card"], "backbone registry")
    kind = lin["kind"] + ("; task-headed (a trained head is applied)" if head else "")
    return {
        "paper": filled(lin["paper"], "backbone registry"),
        "dataset": filled(lin["training_data"] if own and lin["training_data"] else lin["dataset"],
                          "backbone registry"),
        "pretraining_rasters": rasters,
        "model_card": model_card,
        "licence": filled(lic.get("effective") or lic.get("declared_by_checkpoint")
                          or lic.get("architecture_licence") or lin["licence"], "licence gate"),
        "access_route": filled(lin["access"] + ("; licence accepted in the config" if lic.get("acceptance")
                                                else ""), "backbone registry"),
        "bias_notes": filled(lin["bias_notes"], "model card (summarised in the backbone registry)"),
        "weights_kind": filled(kind, COMPUTED),
    }


def _pipeline(rec: dict[str, Any], cfg: dict[str, Any], fields: dict[str, Any],
              head: dict[str, Any] | None) -> dict[str, Any]:
    pre = rec.get("preprocessing")
    pipe = rec.get("pipeline") or {}
    change = rec.get("change") or {}
    screening = rec.get("screening") or {}
    ran = bool(pre)
    why = "the run stopped before " + ("planning" if not ran else "this stage")
    layers = ((head or {}).get("config") or {}).get("layers") or "last block"
    out: dict[str, Any] = {
        "preprocessing": filled(pre, COMPUTED) if pre else not_applicable(why, COMPUTED),
        "embedding_extraction": filled({"layers": layers,
                                        "pooling": "none: dense patch features",
                                        "upsampling": pipe.get("upsampling"), "blend": pipe.get("blend"),
                                        "tile_size": pipe.get("tile_size"), "overlap": pipe.get("overlap")},
                                       COMPUTED) if pipe else not_applicable(why, COMPUTED),
    }
    if head:
        lin = head.get("lineage") or {}
        labels = lin.get("labels") or {}
        out["head"] = filled({"path": head.get("path"), "sha256": head.get("sha256"),
                              "config": head.get("config")}, "config: heads.supervised")
        out["labels"] = filled({"source": labels.get("path"), "sha256": labels.get("sha256"),
                                "licence": labels.get("licence") or "see data/ATTRIBUTION.md",
                                "class_table": head.get("class_table")}, "head metadata")
    else:
        out["head"] = not_applicable("no trained head: label-free outputs (PCA, k-means"
                                     + (", change" if change else "") + ")", "config: heads")
        out["labels"] = not_applicable("no trained head, no labels", "config: heads")
    heads_cfg = cfg.get("heads") or {}
    out["retrieval_index"] = (filled("features.zarr (feature cube for search by example)",
                                     "config: heads.cube") if heads_cfg.get("cube")
                              else not_applicable("no feature cube", "config: heads"))
    thr = change.get("threshold") if change else None
    out["thresholds"] = (filled({"change": thr}, COMPUTED) if thr else
                         not_applicable("no thresholded output (one date, or the run stopped before)",
                                        COMPUTED))
    out["calibration"] = fields["calibration"] if fields["calibration"]["status"] == "filled" else \
        filled("none: probabilities are the head's softmax, not calibrated", COMPUTED) if head else \
        not_applicable("no probabilities: label-free outputs", COMPUTED)
    approval = screening.get("approval")
    if approval:
        out["human_review"] = filled({"approval": approval}, "screening (approval in the config)")
    elif screening.get("allowed"):
        out["human_review"] = filled("no approval needed by the screening decision", COMPUTED)
    elif screening:
        out["human_review"] = filled(f"screening decision {screening.get('action')}: no approval given",
                                     COMPUTED)
    else:
        out["human_review"] = not_applicable("the run stopped before screening", COMPUTED)
    out["outputs_reviewed_before_use"] = fields["outputs_reviewed_before_use"]
    out["logging"] = (fields["logging"] if fields["logging"]["status"] == "filled" else
                      filled("provenance.json and this record in the run folder; Prefect flow-run logs",
                             COMPUTED))
    declared = fields["automated_actions"]
    out["automated_actions"] = (declared if declared["status"] == "filled"
                                else filled("none", "default (no action is declared)"))
    return out


def _evaluation(head: dict[str, Any] | None, rec: dict[str, Any]) -> dict[str, Any]:
    keys = ("metrics", "split_method", "test_region", "sensor_gsd", "class_distribution", "backbone_training",
            "replication", "failure_examples")
    if not head:
        stmt = filled("unvalidated: label-free outputs (PCA colours, k-means classes, change scores) have no "
                      "labelled test here; read them as unvalidated", COMPUTED)
        return {"statement": stmt} | {k: not_applicable("label-free outputs: no test", COMPUTED)
                                      for k in keys}
    m = head.get("metrics") or {}
    test = m.get("test") or {}
    split = (head.get("lineage") or {}).get("split") or {}
    gsd = (rec.get("gsd") or {}).get("input_m")
    per_class = test.get("per_class") or {}
    region = split.get("test_region") or split.get("test_bounds")
    fails = (head.get("lineage") or {}).get("failure_examples")
    if fails and head.get("path"):  # the PNGs lie beside the head file
        fails = [f | {"png": str(Path(str(head["path"])).parent / f["png"])} for f in fails]
    return {
        "statement": filled("the head's own held-out test, made when it was trained", "head metadata"),
        "metrics": (filled({k: test.get(k) for k in ("miou", "macro_f1", "overall_accuracy", "pixels")},
                           "head metadata") if test
                    else unknown("head metadata", "the head carries no metrics")),
        "split_method": filled(split.get("settings") or split, "head metadata") if split else
        unknown("head metadata", "the head records no split"),
        "test_region": filled(region, "head metadata") if region else
        unknown("head metadata", "the head records its test tiles' count, not their bounds"),
        "sensor_gsd": filled({"gsd_m": gsd, "inputs": [i.get("path") for i in rec.get("inputs") or []]},
                             COMPUTED) if gsd else unknown(COMPUTED),
        "class_distribution": filled({c: v.get("support") for c, v in per_class.items()}, "head metadata")
        if per_class else unknown("head metadata"),
        "backbone_training": filled("frozen backbone, trained head", "head metadata"),
        "replication": filled("the provider's own test (geo_dino train-head), not an independent replication",
                              COMPUTED),
        "failure_examples": filled(fails, "head metadata") if fails else
        unknown("head metadata", "this head carries no failure examples"),
    }


def _people(rec: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    computed = ("sensitive_sites_hit", "urban_areas", "populated_places", "schools_health_religious",
                "international_borders", "protected_areas", "resolution")
    declared = {k: fields[k] for k in ("faces", "homes", "workplaces", "medical_data")}
    aoi = (rec.get("aoi") or {}).get("geometry")
    if not aoi:
        why = "no valid AOI (the run was refused before its AOI was read)"
        return {k: not_applicable(why, COMPUTED) for k in computed} | declared
    from shapely.geometry import shape

    from geo_dino.governance.people_places import people_and_places

    gsd = (rec.get("gsd") or {}).get("input_m")
    decl = {k: {"answer": v["value"], "decided_by": v["decided_by"]} for k, v in declared.items()
            if v["status"] == "filled"}
    facts = people_and_places(shape(aoi), gsd_m=gsd, screening=rec.get("screening"), declared=decl)
    out: dict[str, Any] = {}
    for k in computed:
        v = facts.get(k)
        out[k] = filled(v, (v or {}).get("decided_by", COMPUTED) if isinstance(v, dict) else COMPUTED) \
            if v is not None else unknown(COMPUTED)
    for k, v in (facts.get("declared") or {}).items():
        if k in declared:
            out[k] = (filled(v["answer"], v["decided_by"]) if v.get("answer") in ("yes", "no") else
                      unknown(v.get("decided_by") or dr.NOT_DECLARED))
    return out | {k: declared[k] for k in declared if k not in out}


def _route(rec: dict[str, Any], fields: dict[str, Any], policy: dr.GovernancePolicy,
           retire: dict[str, Any]) -> dict[str, Any]:
    screening = rec.get("screening") or {}
    lic = rec.get("licence") or {}
    pol = screening.get("policy") or {}
    route = (filled({"action": screening.get("action"), "reason": screening.get("reason"),
                     "decided_at": screening.get("decided_at")}, "screening policy")
             if screening else unknown(COMPUTED, "no screening decision"))
    return {
        "route": route,
        "privacy_assessment": fields["privacy_assessment"],
        "data_protection_basis": fields["data_protection_basis"],
        "licence_review": (filled({"licence": lic.get("effective") or lic.get("declared_by_checkpoint")
                                   or lic.get("architecture_licence"), "gated": lic.get("gated"),
                                   "acceptance": lic.get("acceptance")}, "licence gate") if lic
                           else not_applicable("no backbone loaded", COMPUTED)),
        "security_review": fields["security_review"],
        "misuse_controls": filled({"screening_policy": pol.get("path"), "policy_sha256": pol.get("sha256"),
                                   "registry_sha256": (screening.get("registry") or {}).get("sha256")},
                                  "screening policy") if pol else unknown(COMPUTED, "no screening decision"),
        "appeal_path": fields["appeal_path"],
        "monitoring_plan": fields["monitoring_plan"],
        "retirement": retire,
    }


def retirement_of(rec: dict[str, Any], policy: dr.GovernancePolicy,
                  today: date | None = None) -> dict[str, Any]:
    """The checkpoint's retirement condition (registry ``retire_after`` / review interval) and whether it
    has passed."""
    from geo_dino.models.archs import ARCHS

    arch = (rec.get("backbone") or {}).get("arch")
    spec = ARCHS.get(arch) if arch else None
    if spec is None:
        return not_applicable("no backbone loaded", COMPUTED)
    return dr.retirement(spec.retire_after, spec.review_interval_days, spec.reviewed_on,
                         today or datetime.now(UTC).date(), policy)


def make_record(run_dir: Path) -> dict[str, Any]:
    """The deployment record of the run in ``run_dir`` (not written: :func:`write_record`)."""
    from geo_dino.config import GovernanceConfig

    run_dir = Path(run_dir)
    rec = {k: v for k, v in (_read(run_dir / RECORD) or {}).items() if k != "deployment_record"}
    cfg = _read(run_dir / CONFIG) or {}
    plan = _read(run_dir / PLAN)
    if not rec.get("screening"):
        screening = _read(run_dir / SCREENING)
        if screening:
            rec = rec | {"screening": screening}
    gcfg = GovernanceConfig.model_validate(cfg.get("governance") or {})
    fields = dr.governance_fields(gcfg)
    policy = dr.load_policy(gcfg.policy)
    head = rec.get("supervised_head")
    out = {"schema": dr.SCHEMA_ID, "run_id": rec.get("run_id") or run_dir.name,
           "run_status": str(rec.get("status") or "unknown"), "written_at": datetime.now(UTC).isoformat(),
           "backbone": _backbone(rec, plan), "training_lineage": _lineage(rec, head),
           "pipeline_boundary": _pipeline(rec, cfg, fields, head),
           "evaluation_boundary": _evaluation(head, rec),
           "people_and_places": _people(rec, fields),
           "governance_route": _route(rec, fields, policy, retirement_of(
               {"backbone": {"arch": (rec.get("backbone") or {}).get("arch")
                             or ((plan or {}).get("backbone") or {}).get("arch")
                             or (rec.get("retirement") or {}).get("arch")}}, policy))}
    return out


def write_record(run_dir: Path) -> Path:
    """Assemble, validate and write the run's deployment record (``deployment_record.json`` and ``.md``),
    and put its six parts in the provenance record too (section ``deployment_record``); the JSON's path."""
    from geo_dino.governance.provenance import ProvenanceRecord

    record = make_record(run_dir)
    js, _ = dr.write(run_dir, record)
    prov = ProvenanceRecord.open(Path(run_dir) / RECORD)
    prov.update(deployment_record={k: v for k, v in record.items() if k != "schema"} | {
        "schema": record["schema"], "path": dr.JSON_FILE})
    prov.write()
    return js
