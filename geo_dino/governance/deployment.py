"""The deployment record: six parts every run carries, each field filled or explicitly not applicable or
unknown, with who decided.

1. **backbone** — identity of the weights (family, checkpoint, sha256, parameters, patch, resolution,
   registers);
2. **training_lineage** — paper, pretraining data, model card, licence and access, bias notes, what the
   weights are;
3. **pipeline_boundary** — preprocessing, how embeddings are taken, the head and its labels, thresholds,
   calibration, human review, logging, automated actions;
4. **evaluation_boundary** — a trained head's test metrics and their conditions, or the statement that the
   outputs are unvalidated;
5. **people_and_places** — what the AOI touches (computed) and what no computation answers (declared);
6. **governance_route** — privacy assessment, data-protection basis, licence and security review, misuse
   controls, appeal path, monitoring, retirement of the checkpoint.

Every field is ``{"value": …, "status": "filled" | "not_applicable" | "unknown", "decided_by": …}``. Computed
fields say what computed them; human-decided ones come from the config's ``governance`` section (or the
``governance.yaml`` it points to) and name who decided; a field nobody filled is ``unknown``, "not declared".
The record is validated on write against the bundled JSON schema (``schemas/deployment_record-1.json``) and
written as ``deployment_record.json`` and a human-readable ``deployment_record.md``. This module assembles and
checks; :mod:`geo_dino.run.deployment` gathers the facts of a run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from geo_dino.errors import GovernanceError
from geo_dino.files import write_text_atomic

if TYPE_CHECKING:
    from geo_dino.config import GovernanceConfig

SCHEMA_ID = "geo_dino.deployment_record/1"
SCHEMA_FILE = Path(__file__).resolve().parents[1] / "schemas" / "deployment_record-1.json"
JSON_FILE = "deployment_record.json"
MD_FILE = "deployment_record.md"
PARTS = ("backbone", "training_lineage", "pipeline_boundary", "evaluation_boundary", "people_and_places",
         "governance_route")
#: the human-decided fields of the config's governance section, by the part they belong to
HUMAN_FIELDS = {
    "pipeline_boundary": ("outputs_reviewed_before_use", "logging", "automated_actions", "calibration"),
    "people_and_places": ("faces", "homes", "workplaces", "medical_data"),
    "governance_route": ("privacy_assessment", "data_protection_basis", "security_review", "appeal_path",
                         "monitoring_plan"),
}
NOT_DECLARED = "not declared"


def filled(value: Any, decided_by: str) -> dict[str, Any]:
    """A field with a value."""
    return {"value": value, "status": "filled", "decided_by": decided_by}


def not_applicable(why: str, decided_by: str) -> dict[str, Any]:
    """A field that does not apply to this run (``why`` says why)."""
    return {"value": why, "status": "not_applicable", "decided_by": decided_by}


def unknown(decided_by: str = NOT_DECLARED, why: str | None = None) -> dict[str, Any]:
    """A field nobody could fill."""
    return {"value": why, "status": "unknown", "decided_by": decided_by}


class GovernancePolicy(BaseModel):
    """Which human-decided fields must be filled, and what a checkpoint past its retirement does."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    required_for_deployments: list[str] = Field(default_factory=list)
    required_for_all_runs: list[str] = Field(default_factory=list)
    stale_checkpoint: Literal["warn", "refuse"] = "warn"


#: the policy of a config that names none (the same as configs/governance_policy.yaml)
DEFAULT_REQUIRED_FOR_DEPLOYMENTS = ("decided_by", "privacy_assessment", "data_protection_basis",
                                    "appeal_path", "monitoring_plan", "outputs_reviewed_before_use")


def default_policy() -> GovernancePolicy:
    """The built-in policy: nothing required of ad-hoc runs; a scheduled deployment must name who decided,
    the privacy assessment, the data-protection basis, the appeal path, the monitoring plan and whether
    outputs are reviewed; a stale checkpoint warns."""
    return GovernancePolicy(required_for_deployments=list(DEFAULT_REQUIRED_FOR_DEPLOYMENTS))


def _known_fields() -> set[str]:
    return {f for fields in HUMAN_FIELDS.values() for f in fields} | {"decided_by"}


def load_policy(path: Path | None) -> GovernancePolicy:
    """Read the governance policy (YAML; None: :func:`default_policy`); a missing or bad file is a
    :class:`GovernanceError` naming it."""
    import yaml

    if path is None:
        return default_policy()
    p = Path(path)
    if not p.is_file():
        raise GovernanceError(f"governance policy not found: {p}; set governance.policy to an existing file "
                              "(the project ships configs/governance_policy.yaml)")
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
        policy = GovernancePolicy.model_validate(doc)
    except (yaml.YAMLError, UnicodeDecodeError, ValidationError) as exc:
        raise GovernanceError(f"governance policy {p} is not valid: {str(exc).splitlines()[0]}") from None
    bad = sorted(set(policy.required_for_deployments + policy.required_for_all_runs) - _known_fields())
    if bad:
        raise GovernanceError(f"governance policy {p}: {bad} are not governance fields "
                              f"(known: {sorted(_known_fields())})")
    return policy


def governance_fields(cfg: GovernanceConfig) -> dict[str, dict[str, Any]]:
    """The human-decided fields: the config's, then its ``file``'s for what the config leaves unset; each as a
    record field (``unknown``, "not declared" where nobody answered)."""
    from geo_dino.config import GovernanceConfig

    values = cfg.model_dump(exclude={"file", "policy"})
    if cfg.file is not None:
        import yaml

        p = Path(cfg.file)
        if not p.is_file():
            raise GovernanceError(f"governance file not found: {p}; fix governance.file")
        try:
            doc = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
            base = GovernanceConfig.model_validate(doc)
        except (yaml.YAMLError, UnicodeDecodeError, ValidationError) as exc:
            raise GovernanceError(f"governance file {p} is not valid: "
                                  f"{'; '.join(str(exc).splitlines()[:3])}") from None
        if base.file is not None:
            raise GovernanceError(f"governance file {p} points to another file: give the fields themselves")
        for k, v in base.model_dump(exclude={"file", "policy"}).items():
            if values.get(k) in (None, {}):
                values[k] = v
    who = values.get("decided_by")
    by_field = values.get("decided_by_fields") or {}
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(_known_fields() - {"decided_by"}):
        v = values.get(name)
        decider = by_field.get(name) or who or NOT_DECLARED
        out[name] = filled(v, decider) if v is not None else unknown()
    out["decided_by"] = filled(who, who) if who else unknown()
    return out


def missing_required(fields: Mapping[str, Mapping[str, Any]], policy: GovernancePolicy,
                     deployment: bool) -> list[str]:
    """The fields ``policy`` requires (of every run, and of scheduled deployments when ``deployment``) that
    are not filled."""
    required = list(policy.required_for_all_runs) + (list(policy.required_for_deployments) if deployment
                                                       else [])
    return sorted({f for f in required if fields.get(f, {}).get("status") != "filled"})


def check_governance(cfg: GovernanceConfig, deployment: bool, where: str = "") -> dict[str, dict[str, Any]]:
    """The human-decided fields, after checking the policy's required ones: a :class:`GovernanceError` names
    every missing field (``where``: the config or deployment, for the message)."""
    fields = governance_fields(cfg)
    missing = missing_required(fields, load_policy(cfg.policy), deployment)
    if missing:
        kind = "a scheduled deployment" if deployment else "every run"
        names = ", ".join("governance." + m for m in missing)
        raise GovernanceError(f"{where + ': ' if where else ''}the governance policy "
                              f"({cfg.policy or 'built-in'}) requires "
                              f"for {kind}: {names}; fill them in the config's governance section or the "
                              "governance file it names")
    return fields


def retirement(retire_after: str | None, review_interval_days: int | None, reviewed_on: str | None,
               today: date, policy: GovernancePolicy) -> dict[str, Any]:
    """The retirement condition of a checkpoint and whether it has passed: ``{"value": {...}, "status",
    "decided_by"}`` with ``stale`` true past ``retire_after`` or past ``reviewed_on`` + the interval."""
    from datetime import timedelta

    if retire_after is None and review_interval_days is None:
        return unknown("checkpoint registry", "no retire_after date or review interval for this checkpoint")
    stale, due = False, None
    if retire_after is not None:
        due = date.fromisoformat(retire_after)
        stale = today > due
    if review_interval_days is not None:
        if reviewed_on is None:
            stale = True  # a review interval with no review on record: due now
        else:
            review_due = date.fromisoformat(reviewed_on) + timedelta(days=review_interval_days)
            due = min(due, review_due) if due else review_due
            stale = stale or today > review_due
    return filled({"retire_after": retire_after, "review_interval_days": review_interval_days,
                   "reviewed_on": reviewed_on, "due": due.isoformat() if due else None, "stale": stale,
                   "on_stale": policy.stale_checkpoint}, "checkpoint registry")


def validate(record: Mapping[str, Any]) -> None:
    """Check ``record`` against the bundled JSON schema; a :class:`GovernanceError` says where it breaks."""
    import jsonschema

    schema = json.loads(SCHEMA_FILE.read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(record), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.path) or "(root)"
        raise GovernanceError(f"deployment record invalid at {where}: {e.message}"
                              + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))


def incomplete(record: Mapping[str, Any]) -> list[str]:
    """``part.field`` of every field that is ``unknown`` (what `geo-dino record check` reports)."""
    out = []
    for part in PARTS:
        for name, field in (record.get(part) or {}).items():
            if field.get("status") == "unknown":
                out.append(f"{part}.{name}")
    return out


def summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record in a few keys (the STAC Item's ``geo_dino:deployment_record``): per part how many fields
    are filled, not applicable and unknown, the unknown ones, and the headline of each part."""
    def value(part: str, name: str) -> Any:
        return (record.get(part) or {}).get(name, {}).get("value")

    counts = {part: {st: sum(1 for f in record[part].values() if f["status"] == st)
                     for st in ("filled", "not_applicable", "unknown")} for part in PARTS}
    sites = value("people_and_places", "sensitive_sites_hit")
    urban = value("people_and_places", "urban_areas")
    resolution = value("people_and_places", "resolution")
    route = value("governance_route", "route")
    return {"schema": record["schema"], "href": JSON_FILE, "run_status": record["run_status"],
            "complete": not incomplete(record), "unknown": incomplete(record), "parts": counts,
            "backbone_family": value("backbone", "family"),
            "checkpoint_sha256": value("backbone", "checkpoint_sha256"),
            "weights_kind": value("training_lineage", "weights_kind"),
            "evaluation": value("evaluation_boundary", "statement"),
            "sites_hit": sites.get("count") if isinstance(sites, dict) else None,
            "urban": urban.get("urban", urban.get("overlaps")) if isinstance(urban, dict) else None,
            "could_resolve_people": (resolution.get("could_resolve_people") if isinstance(resolution, dict)
                                     else None),
            "route": route.get("action") if isinstance(route, dict) else None}


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        text = json.dumps(v, sort_keys=True, ensure_ascii=False)
        return text if len(text) <= 300 else text[:297] + "…"
    return str(v)


def to_markdown(record: Mapping[str, Any]) -> str:
    """The record for people: one table per part (field, value, status, decided by)."""
    lines = [f"# Deployment record — {record['run_id']}", "",
             f"Run status: **{record['run_status']}**. Written {record['written_at']}. "
             f"Schema `{record['schema']}`; the same record as JSON: `{JSON_FILE}`.", ""]
    missing = incomplete(record)
    lines += [f"Unknown fields: {len(missing)}" + (f" ({', '.join(missing)})" if missing else ""), ""]
    titles = {"backbone": "1. Backbone identity", "training_lineage": "2. Training lineage",
              "pipeline_boundary": "3. Pipeline boundary", "evaluation_boundary": "4. Evaluation boundary",
              "people_and_places": "5. People and places", "governance_route": "6. Governance route"}
    for part in PARTS:
        lines += [f"## {titles[part]}", "", "| field | value | status | decided by |", "|---|---|---|---|"]
        for name, field in record[part].items():
            value = _fmt(field.get("value")).replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {name} | {value} | {field['status']} | {field['decided_by']} |")
        lines.append("")
    return "\n".join(lines)


def write(run_dir: Path, record: Mapping[str, Any]) -> tuple[Path, Path]:
    """Validate ``record`` and write ``deployment_record.json`` and ``.md`` in ``run_dir`` (atomically)."""
    validate(record)
    js = Path(run_dir) / JSON_FILE
    md = Path(run_dir) / MD_FILE
    write_text_atomic(js, json.dumps(record, indent=2, sort_keys=False, ensure_ascii=False, allow_nan=False)
                      + "\n")
    write_text_atomic(md, to_markdown(record) + "\n")
    return js, md
