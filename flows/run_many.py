"""Many AOIs with one config: a parent flow that runs one ``run_aoi`` deployment run per AOI and sums up.

:func:`run_many` takes AOI files (or a folder of them) and the name of a ``run_aoi`` deployment; each AOI is
validated here (an invalid one is a row of the summary, not a stop), then submitted by content with its
idempotency key (:mod:`flows.submit`) through :func:`prefect.deployments.run_deployment`, so the child runs
show under the parent in the UI and run on the deployment's work pool, as many at once as its workers and
concurrency limits allow. The parent waits for all of them, then writes into ``summary_dir/<name>/``:

* ``summary.json`` and ``summary.csv`` — one row per AOI: the flow run and its final state, the run folder,
  the record's status, the screening decision and sites hit, the outputs;
* ``summary.md`` — the same as a table (also published as a Prefect markdown artifact);
* ``collection.json`` — a STAC Collection over the Items of the runs that succeeded.
"""

from __future__ import annotations

import csv
import io
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger

from geo_dino.errors import ConfigError, GeoDinoError

SUMMARY_COLUMNS = ("aoi", "aoi_sha256", "flow_run", "flow_run_id", "state", "run_dir", "status",
                   "decision", "sites_hit", "outputs", "error")


def aoi_files(aois: list[str] | None, aoi_folder: str | None) -> list[Path]:
    """The AOI files: ``aois`` as given, then the ``*.geojson`` of ``aoi_folder`` in name order."""
    paths = [Path(a) for a in aois or []]
    if aoi_folder:
        folder = Path(aoi_folder)
        if not folder.is_dir():
            raise ConfigError(f"aoi_folder {folder}: no such folder")
        paths += sorted(folder.glob("*.geojson"))
    if not paths:
        raise ConfigError("run_many needs AOIs: give aois (files) or aoi_folder (a folder of .geojson)")
    return paths


def _row_of(run_dir: Path | None) -> dict[str, Any]:
    """What a run's folder says: its status, screening decision, sites hit and outputs."""
    from geo_dino.run import folder

    if run_dir is None or not (run_dir / folder.RECORD).is_file():
        return {"run_dir": None, "status": None, "decision": None, "sites_hit": None, "outputs": []}
    rec = folder.read_record(run_dir)
    screening = rec.get("screening") or {}
    return {"run_dir": str(run_dir), "status": rec.get("status"),
            "decision": screening.get("action"), "sites_hit": len(screening.get("hits") or []),
            "outputs": [o.get("path") for o in rec.get("outputs") or [] if o.get("path")],
            "error": rec.get("error")}


def write_summary(rows: list[dict[str, Any]], out_dir: Path, title: str) -> dict[str, Any]:
    """``summary.json``, ``summary.csv``, ``summary.md`` and (when a run succeeded) ``collection.json`` in
    ``out_dir``; their paths and the markdown."""
    from geo_dino.files import write_json_atomic, write_text_atomic
    from geo_dino.outputs import stac

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "summary.json", {"title": title, "runs": rows,
                                                 "written_at": datetime.now(UTC).isoformat()})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row | {"outputs": ";".join(row.get("outputs") or [])})
    write_text_atomic(out_dir / "summary.csv", buf.getvalue())
    lines = [f"# {title}", "", "| AOI | flow run | state | record | decision | sites hit | outputs |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {Path(r['aoi']).name} | {r.get('flow_run') or ''} | {r.get('state') or ''} | "
                     f"{r.get('status') or ''} | {r.get('decision') or ''} | {r.get('sites_hit') or 0} | "
                     f"{len(r.get('outputs') or [])} |")
    done = [Path(r["run_dir"]) for r in rows if r.get("status") == "succeeded" and r.get("run_dir")]
    collection = None
    if done:
        collection = stac.write_collection(done, out_dir, id=out_dir.name,
                                           description=f"{title}: the runs that succeeded (one Item each)",
                                           title=title)
    markdown = "\n".join(lines) + "\n"
    write_text_atomic(out_dir / "summary.md", markdown)
    return {"folder": str(out_dir), "collection": str(collection) if collection else None,
            "markdown": markdown}


@flow(name="run_many", log_prints=True)
def run_many(aois: list[str] | None = None, aoi_folder: str | None = None,
             deployment: str = "run_aoi/aoi-submissions", params: dict[str, Any] | None = None,
             summary_dir: str = "runs/summaries", poll_s: float = 5.0,
             timeout_s: float | None = None) -> dict[str, Any]:
    """One ``deployment`` run per AOI (by content, each AOI and config once), wait for all, then the
    summary (see the module doc). Returns the summary's folder, Collection and rows."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.runtime import flow_run

    from flows.run_aoi import run_folder_of
    from flows.submit import read_aoi_text, submission_key

    log = get_run_logger()
    paths = aoi_files(aois, aoi_folder)
    rows: list[dict[str, Any]] = []
    pending: dict[UUID, dict[str, Any]] = {}
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        for path in paths:
            row: dict[str, Any] = {"aoi": str(path)}
            try:
                text, sha = read_aoi_text(path)
            except GeoDinoError as exc:
                rows.append(row | {"state": "not submitted", "error": f"invalid AOI: {exc}"})
                log.warning("%s: invalid AOI, not submitted: %s", path.name, exc)
                continue
            parameters = dict(params or {})
            key = submission_key(sha, str(dep.id), dict(dep.parameters or {}) | parameters)
            run: Any = run_deployment(deployment, parameters=parameters | {"aoi_geojson": text},
                                      idempotency_key=key, timeout=0, tags=["geo-dino", "run-many"])
            row |= {"aoi_sha256": sha, "flow_run": run.name, "flow_run_id": str(run.id)}
            rows.append(row)
            pending[run.id] = row
            log.info("%s → flow run %s", path.name, run.name)
        end = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            for run_id, row in list(pending.items()):
                child = client.read_flow_run(run_id)
                if child.state is not None and child.state.is_final():
                    row |= {"state": child.state.name} | _row_of(run_folder_of(child))
                    del pending[run_id]
                    log.info("%s: %s (%s)", Path(row["aoi"]).name, row["state"], row.get("status"))
            if pending and end is not None and time.monotonic() > end:
                for row in pending.values():
                    row |= {"state": "still running at the timeout"}
                break
            if pending:
                time.sleep(poll_s)
    name = f"run_many-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{(flow_run.get_id() or 'local')[:8]}"
    out = write_summary(rows, Path(summary_dir) / name, f"run_many over {len(paths)} AOIs ({deployment})")
    create_markdown_artifact(out["markdown"], key=f"geo-dino-run-many-{name[-8:]}".lower(),
                             description=f"run_many summary: {out['folder']}")
    return {"folder": out["folder"], "collection": out["collection"], "runs": rows}


def rows_as_json(rows: list[dict[str, Any]]) -> str:
    """The rows as JSON text (for people reading a flow run's result)."""
    return json.dumps(rows, indent=2, default=str)
