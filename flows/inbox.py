"""The AOI inbox: a folder people drop GeoJSON files into; a scheduled flow runs each one once.

Each scan of :func:`aoi_inbox` (deployment ``aoi-inbox`` in ``flows/prefect.yaml``, every minute):

1. settles the files in ``processing/``: the flow run a file was submitted as (``NAME.submission.json``
   beside it) ended ``Completed`` → ``done/``; ``Failed``, ``Crashed`` or ``Cancelled`` → ``failed/`` with the
   reason in ``NAME.reason.txt``; still running → left there;
2. takes every ``*.geojson``/``*.json`` in the inbox, oldest first: an invalid AOI goes to ``failed/`` with
   the message ``geo-dino validate-aoi`` gives (it never blocks the others); a valid one is moved to
   ``processing/`` (a rename: a file being scanned by two scans at once is taken by one) and submitted by
   content (:mod:`flows.submit`), so the same AOI dropped twice is one flow run.

A name already in ``done/``/``failed/`` gets the time appended; nothing is deleted.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from geo_dino.errors import GeoDinoError

FOLDERS = ("processing", "done", "failed")
SUFFIXES = (".geojson", ".json")
#: a file modified less than this many seconds ago may still be being written: left for the next scan
SETTLE_S = 2.0
_SIDECARS = (".submission.json", ".reason.txt")


def _free_name(folder: Path, name: str) -> Path:
    dst = folder / name
    if not dst.exists():
        return dst
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return folder / f"{Path(name).stem}.{stamp}{Path(name).suffix}"


def _move(src: Path, folder: Path) -> Path:
    """Move ``src`` (and its sidecars) into ``folder`` under a free name; the new path."""
    dst = _free_name(folder, src.name)
    os.replace(src, dst)
    for suffix in _SIDECARS:
        side = src.with_name(src.name + suffix)
        if side.exists():
            os.replace(side, dst.with_name(dst.name + suffix))
    return dst


def _fail(src: Path, folder: Path, reason: str) -> Path:
    dst = _move(src, folder)
    dst.with_name(dst.name + ".reason.txt").write_text(reason.rstrip() + "\n", encoding="utf-8")
    return dst


def settle(inbox: Path, client: Any) -> dict[str, list[str]]:
    """Move the submitted files whose flow run has ended to ``done/`` or ``failed/``."""
    moved: dict[str, list[str]] = {"done": [], "failed": []}
    for path in sorted((inbox / "processing").iterdir()):
        if path.suffix not in SUFFIXES or path.name.endswith(_SIDECARS):
            continue
        side = path.with_name(path.name + ".submission.json")
        if not side.is_file():  # moved here by a scan that stopped before submitting: submit it again
            os.replace(path, _free_name(inbox, path.name))
            continue
        run = client.read_flow_run(json.loads(side.read_text())["flow_run_id"])
        state = run.state
        if state is None or not state.is_final():
            continue
        if state.is_completed():
            moved["done"].append(_move(path, inbox / "done").name)
        else:
            moved["failed"].append(_fail(path, inbox / "failed",
                                         f"flow run {run.name} ({run.id}) ended {state.name}: "
                                         f"{state.message or ''}").name)
    return moved


@flow(name="aoi_inbox", log_prints=True)
def aoi_inbox(inbox: str = "aoi/inbox", deployment: str = "run_aoi/aoi-submissions",
              params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Scan the inbox once: settle finished submissions, refuse invalid files, submit the valid ones (each
    AOI and config once). Returns what moved where."""
    from prefect.client.orchestration import get_client

    from flows.submit import read_aoi_text, submit_text

    log = get_run_logger()
    root = Path(inbox)
    for name in FOLDERS:
        (root / name).mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"submitted": [], "duplicates": [], "refused": [], "done": [], "failed": []}
    with get_client(sync_client=True) as client:
        settled = settle(root, client)
        report["done"], report["failed"] = settled["done"], settled["failed"]
        now = time.time()
        fresh = sorted((p for p in root.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES
                        and not p.name.startswith(".")), key=lambda p: (p.stat().st_mtime, p.name))
        for path in fresh:
            if now - path.stat().st_mtime < SETTLE_S:
                continue  # still being written, perhaps
            taken = _free_name(root / "processing", path.name)
            try:
                os.replace(path, taken)  # only one scan wins the rename
            except FileNotFoundError:
                continue
            try:
                text, sha = read_aoi_text(taken)
            except GeoDinoError as exc:
                report["refused"].append(_fail(taken, root / "failed", f"invalid AOI: {exc}").name)
                log.warning("refused %s: %s", path.name, exc)
                continue
            try:
                sub = submit_text(text, sha, deployment, params, client)
            except Exception:
                os.replace(taken, _free_name(root, path.name))  # back to the inbox: the next scan retries
                raise
            taken.with_name(taken.name + ".submission.json").write_text(
                json.dumps(sub.to_dict() | {"file": path.name}, indent=2), encoding="utf-8")
            report["submitted" if sub.created else "duplicates"].append(path.name)
            log.info("%s %s as flow run %s", "submitted" if sub.created else "already submitted (runs once):",
                     path.name, sub.flow_run_name)
        # the duplicates' files: their flow run is the first one's; settle them with it
        settled = settle(root, client)
        report["done"] += settled["done"]
        report["failed"] += settled["failed"]
    return report
