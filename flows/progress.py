"""A run's progress and its summary as Prefect artifacts, beside the flow run in the UI.

* :func:`progress_artifact`: a progress artifact (``geo-dino-progress-<run id>``) that follows the tiles the
  run finishes (events of :mod:`geo_dino.run.progress`), updated at most every :data:`UPDATE_EVERY_S`
  seconds, and 100 when the block ends without an error.
* :func:`final_report`: a markdown artifact (``geo-dino-run-<run id>``) made from the run folder's
  provenance record and screening decision: the status, the outputs (names, files, sizes), the decision with
  the sites hit, the timings, and where the QGIS project is.

Both do nothing outside a flow run (a test, a notebook, ``run_local``), and neither fails a run: an
artifact the API does not take is a warning in the flow's log.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from geo_dino.files import QGIS_PROJECT, SCREENING
from geo_dino.run import progress
from geo_dino.run.folder import read_record

#: the least seconds between two updates of a progress artifact
UPDATE_EVERY_S = 2.0

log = logging.getLogger(__name__)


def artifact_key(prefix: str, run_dir: Path) -> str:
    """``<prefix>-<run id>`` as a Prefect artifact key: lowercase letters, digits and single dashes."""
    key = re.sub(r"[^a-z0-9]+", "-", f"{prefix}-{Path(run_dir).name}".lower()).strip("-")
    return key or prefix


def _in_flow_run() -> bool:
    from prefect.context import FlowRunContext

    return FlowRunContext.get() is not None


def _warn(what: str, exc: BaseException) -> None:
    """A warning in the flow run's log (else this module's) that an artifact could not be made."""
    try:
        from prefect import get_run_logger

        logger: Any = get_run_logger()
    except Exception:
        logger = log
    logger.warning("%s: %s: %s", what, type(exc).__name__, exc)


class _Follower:
    """Updates the progress artifact from the run's tile events, at most every ``every_s`` seconds."""

    def __init__(self, run_dir: Path, artifact: UUID, total: int, every_s: float) -> None:
        self.run_dir = Path(run_dir).absolute()
        self.artifact, self.total, self.every_s = artifact, total, every_s
        self.last = time.monotonic()
        self.sent = 0.0
        self.failed = False
        self.lock = threading.Lock()

    def __call__(self, event: progress.Event) -> None:
        if event.kind != "tiles" or event.run_dir != self.run_dir or self.failed:
            return
        with self.lock:
            if event.at - self.last < self.every_s:
                return
            self.last = event.at
            self.send(100.0 * min(1.0, event.done / self.total))

    def send(self, pct: float) -> None:
        from prefect.artifacts import update_progress_artifact

        if pct == self.sent:
            return
        try:
            update_progress_artifact(self.artifact, round(pct, 2))
            self.sent = pct
        except Exception as exc:  # the API went away: no more updates, the run goes on
            self.failed = True
            _warn("the progress artifact could not be updated", exc)


@contextmanager
def progress_artifact(run_dir: Path | str, total: int,
                      every_s: float = UPDATE_EVERY_S) -> Iterator[UUID | None]:
    """A progress artifact of the run in ``run_dir`` (``total`` tiles) that follows its tiles until the
    block ends, and reads 100 when the block ends without an error. Yields the artifact's id, or None
    outside a flow run (nothing is made then) or when the API refused it."""
    run_dir = Path(run_dir)
    if not _in_flow_run() or total <= 0:
        yield None
        return
    from prefect.artifacts import create_progress_artifact

    try:
        artifact = cast(UUID, create_progress_artifact(
            0.0, key=artifact_key("geo-dino-progress", run_dir),
            description=f"Tiles of geo-dino run {run_dir.name} done ({total} tiles)"))
    except Exception as exc:
        _warn("the progress artifact could not be made", exc)
        yield None
        return
    follower = _Follower(run_dir, artifact, total, every_s)
    with progress.listening(follower):
        yield artifact
    with follower.lock:
        if not follower.failed:
            follower.send(100.0)


def _size(n: Any) -> str:
    """``57.1 KiB``; ``–`` when unknown."""
    if not isinstance(n, int | float):
        return "–"
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


def _path_size(path: Path) -> int | None:
    """A file's size, or a folder's (a Zarr store) summed; None when it is not there."""
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size
    except OSError:
        return None


def _cell(value: Any) -> str:
    """A markdown table cell: no pipes or line breaks inside."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _screening(run_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    """The screening decision: ``screening.json``, else the record's copy, else nothing."""
    import json

    try:
        return dict(json.loads((run_dir / SCREENING).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return dict(record.get("screening") or {})


def report_markdown(run_dir: Path | str) -> str:
    """The run's summary as markdown, from its provenance record and screening decision (what
    :func:`final_report` publishes)."""
    run_dir = Path(run_dir)
    rec = read_record(run_dir)
    lines = [f"# geo-dino run `{rec.get('run_id') or run_dir.name}`", ""]
    status = rec.get("status", "unknown")
    lines.append(f"**Status:** {status}" + (f" (finished {rec['finished_at']})" if rec.get("finished_at")
                                            else ""))
    if rec.get("error"):
        lines.append(f"\n**Error:** {_cell(rec['error'])}")
    lines += ["", f"Run folder: `{run_dir}`", ""]

    lines += ["## Outputs", ""]
    outputs = list(rec.get("outputs") or [])
    for v in rec.get("vectors") or []:  # polygon layers of a GeoPackage: the file's size, per layer
        if isinstance(v, dict):
            outputs.append({"name": f"{v.get('layer')} (polygons)", "path": v.get("path")})
    if outputs:
        lines += ["| output | file | size |", "|---|---|---|"]
        for o in outputs:
            path = o.get("path") or ""
            size = o.get("size_bytes") if o.get("size_bytes") is not None else _path_size(run_dir / path)
            lines.append(f"| {_cell(o.get('name', ''))} | `{_cell(path)}` | {_size(size)} |")
    else:
        lines.append("No outputs" + (" (the run did not finish)." if status != "succeeded" else "."))
    lines.append("")

    dec = _screening(run_dir, rec)
    lines += ["## Screening", ""]
    if dec:
        lines.append(f"**Decision:** {dec.get('action', '?')} "
                     f"({'allowed' if dec.get('allowed') else 'not allowed'})")
        if dec.get("reason"):
            lines += ["", _cell(dec["reason"])]
        appr = dec.get("approval")
        if isinstance(appr, dict) and appr.get("approver"):
            lines += ["", f"Approved by {_cell(appr['approver'])}: {_cell(appr.get('reason', ''))}"]
        hits = [h for h in dec.get("hits") or [] if isinstance(h, dict)]
        lines += ["", f"**Sites hit:** {len(hits)}"]
        if hits:
            lines += ["", "| site | category | action | distance (m) | buffer (m) |", "|---|---|---|---|---|"]
            for h in hits:
                site = _cell(h.get("name") or h.get("site_id", ""))
                lines.append(f"| {site} | {_cell(h.get('category', ''))} | {_cell(h.get('action', ''))} | "
                             f"{_num(h.get('distance_m'))} | {_num(h.get('buffer_m'))} |")
    else:
        lines.append("No screening decision was made.")
    lines.append("")

    timings = rec.get("timings") or {}
    if timings:
        lines += ["## Timings", "", "| step | seconds |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_num(v, 1)} |" for k, v in timings.items()]
        lines.append("")

    lines += ["## Open in QGIS", ""]
    project = run_dir / str((rec.get("qgis_project") or {}).get("path") or QGIS_PROJECT)
    if project.is_file():
        lines.append(f"Project > Open… `{project}`: every output, grouped and styled. Or add the .tif files "
                     "as layers: the .qml style beside each raster is applied automatically.")
    else:
        lines.append("The run wrote no QGIS project.")
    return "\n".join(lines) + "\n"


def _num(value: Any, digits: int = 0) -> str:
    return f"{value:,.{digits}f}" if isinstance(value, int | float) else "–"


def final_report(run_dir: Path | str) -> UUID | None:
    """Publish the run's summary (:func:`report_markdown`) as a markdown artifact keyed
    ``geo-dino-run-<run id>``; its id, or None outside a flow run (nothing is made then) or when the API
    refused it."""
    if not _in_flow_run():
        return None
    from prefect.artifacts import create_markdown_artifact

    run_dir = Path(run_dir)
    try:
        text = report_markdown(run_dir)
        return cast(UUID, create_markdown_artifact(
            text, key=artifact_key("geo-dino-run", run_dir),
            description=f"geo-dino run {run_dir.name}: outputs, screening, timings"))
    except Exception as exc:
        _warn("the run's report artifact could not be made", exc)
        return None
