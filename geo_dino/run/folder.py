"""The run folder: the names of its files, its record, and the config and plan every task reads.

A run folder holds everything one run makes; stages hand each other its path and nothing else. This module
re-exports the file names (defined in :mod:`geo_dino.files`, the shared bottom, so that screening and the
output writers below the run layer use the same names), reads the resolved config and the typed plan, and
reads and updates the provenance record through :class:`~geo_dino.governance.provenance.ProvenanceRecord`.
Every write is atomic (:mod:`geo_dino.files`).

    <run>/config.resolved.json   the config as resolved (sha256 in the record)
    <run>/plan.json              the typed plan (:class:`~geo_dino.run.plan.RunPlan`), written by plan_run
    <run>/screening.json         the screening decision (written for every run, refused ones too)
    <run>/provenance.json        the record, updated stage by stage
    <run>/tiles.gpkg             the tile index
    <run>/work/                  fitted heads, change model, outputs.zarr (intermediates), chunk results
    <run>/*.tif, *.qml, ...      the outputs
"""

from __future__ import annotations

import errno
import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from geo_dino.errors import OutputError, RunRefused
from geo_dino.files import (  # noqa: F401  (the names are re-exported here)
    CHANGE_MODEL,
    CONFIG,
    FEATURE_CACHE,
    HEADS,
    INTERMEDIATES,
    PLAN,
    QGIS_PROJECT,
    RECORD,
    SCREENING,
    SPACE_RESERVE,
    TILE_INDEX,
    WORK,
)

if TYPE_CHECKING:
    from geo_dino.config import RunConfig
    from geo_dino.run.plan import RunPlan



def chunk_path(run_dir: Path, chunk: int) -> Path:
    """The result of chunk ``chunk``: its raw sums over the bands it shares with its neighbours and the
    change histogram of the rows it wrote; its presence says the chunk is done."""
    return Path(run_dir) / WORK / f"chunk_{chunk:05d}.npz"


def chunk_results(run_dir: Path) -> list[Path]:
    """The results of the chunks done so far (:class:`~geo_dino.run.inference.ChunkResult`), in chunk
    order."""
    return sorted((Path(run_dir) / WORK).glob("chunk_*.npz"))


def intermediate(run_dir: Path, name: str) -> Path:
    """The GeoTIFF of output ``name`` copied from the store of intermediates, made a COG at the end."""
    return Path(run_dir) / WORK / f"{name}.tif"


def load_config(run_dir: Path) -> RunConfig:
    """The run's resolved config (``config.resolved.json``)."""
    from geo_dino.config import RunConfig

    return RunConfig.model_validate_json((Path(run_dir) / CONFIG).read_text())


def load_plan(run_dir: Path) -> RunPlan:
    """The run's typed plan (``plan.json``), as ``plan_run`` saved it."""
    from geo_dino.run.plan import RunPlan

    return RunPlan.load(Path(run_dir) / PLAN)


def save_plan(run_dir: Path, plan: RunPlan) -> Path:
    """Save the plan atomically; return its path."""
    return plan.save(Path(run_dir) / PLAN)


def read_record(run_dir: Path) -> dict[str, Any]:
    """The provenance record as written so far (an empty dict before the first write)."""
    from geo_dino.governance.provenance import ProvenanceRecord

    return ProvenanceRecord.open(Path(run_dir) / RECORD).to_dict()


def update_record(run_dir: Path, **sections: Any) -> Path:
    """Merge ``sections`` into the run's provenance record (``timings`` are added to), atomically, under the
    run folder's lock: a stop hook in the worker and the run's own process (a cancelled run unwinding) may
    update it at the same moment, and neither may lose the other's sections."""
    from contextlib import nullcontext

    from geo_dino.files import folder_lock
    from geo_dino.governance.provenance import ProvenanceRecord

    run_dir = Path(run_dir)
    with folder_lock(run_dir) if run_dir.is_dir() else nullcontext():  # no folder: nobody to share with
        rec = ProvenanceRecord.open(run_dir / RECORD)
        rec.update(**sections)
        return rec.write()


def timed(run_dir: Path, stage: str, t0: float) -> None:
    """Record the seconds since ``t0`` (``time.perf_counter``) as the stage's timing."""
    update_record(run_dir, timings={stage: round(time.perf_counter() - t0, 3)})


P = ParamSpec("P")
R = TypeVar("R")


def write_deployment_record(run_dir: Path) -> Path | None:
    """Write the run's deployment record (:mod:`geo_dino.run.deployment`) as it stands. For a run that is
    stopping (refused, failed) a record that cannot be made does not hide why the run stopped: the reason
    goes into the provenance record instead, and None is returned."""
    from geo_dino.errors import GeoDinoError
    from geo_dino.run.deployment import write_record

    try:
        return write_record(run_dir)
    except (GeoDinoError, OSError, ValueError) as exc:
        update_record(run_dir, deployment_record_error=f"{type(exc).__name__}: {exc}")
        return None


#: disk space held back (``SPACE_RESERVE``) from planning to completion: enough for the records of a run
#: that fills the disk (the provenance and deployment records are tens of kB)
RESERVE_BYTES = 4 << 20
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "File too large")


def reserve_space(run_dir: Path) -> None:
    """Hold back :data:`RESERVE_BYTES` of real disk blocks in the run folder, released by
    :func:`release_space` when the run completes or fails; a disk too full for it is an error now, before the
    run writes anything large."""
    path = Path(run_dir) / SPACE_RESERVE
    path.parent.mkdir(exist_ok=True)
    try:
        with open(path, "wb") as f:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(f.fileno(), 0, RESERVE_BYTES)
            else:  # pragma: no cover - macOS and Windows: zeros, written
                f.write(bytes(RESERVE_BYTES))
    except OSError as exc:
        path.unlink(missing_ok=True)
        if disk_full(exc):
            raise OutputError(f"disk full ({errno.errorcode.get(exc.errno or 0, 'ENOSPC')}): the disk of "
                              f"{run_dir} has no room for the run; free at least {RESERVE_BYTES >> 20} MiB "
                              "plus the outputs' size, then start the run again") from exc
        raise


def release_space(run_dir: Path) -> None:
    """Give back the space :func:`reserve_space` held (no error when there is none)."""
    (Path(run_dir) / SPACE_RESERVE).unlink(missing_ok=True)


#: GDAL and libtiff report a failed write without the system's errno ("TIFFAppendToStrip:Write error at
#: scanline 0", "Write failed"): such an error on a disk with less than this free is a full disk
_NEARLY_FULL = 64 << 20
_WRITE_TEXT = ("write error", "write failed", "failed to write", "cannot write")


def disk_full(exc: BaseException, run_dir: Path | None = None) -> bool:
    """Whether ``exc`` says the disk (or the user's quota, or the file size limit) is full: an ``OSError``
    with ENOSPC/EDQUOT/EFBIG, an error whose message says so, or — ``run_dir`` given — a GDAL write error
    while the run folder's disk is nearly full (GDAL does not pass the errno on)."""
    import shutil

    chain = [e for e in (exc, exc.__cause__, exc.__context__) if e is not None]
    for e in chain:
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        if any(t in str(e) for t in _FULL_TEXT):
            return True
    if run_dir is not None and any(t in str(e).lower() for e in chain for t in _WRITE_TEXT):
        try:
            return shutil.disk_usage(run_dir).free < _NEARLY_FULL
        except OSError:
            return False
    return False


def remove_temp_files(run_dir: Path) -> list[str]:
    """Delete the hidden temporary files of unfinished writes in the run folder (``.NAME.tmp…``, see
    :func:`geo_dino.files.tmp_sibling`); their paths relative to the run folder."""
    run_dir = Path(run_dir)
    gone = []
    for p in sorted(run_dir.rglob(".*.tmp*")):
        if p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            gone.append(str(p.relative_to(run_dir)))
    return gone


#: a record's statuses that end a run; ``started`` is the only one that is not
FINAL_STATUSES = ("succeeded", "refused", "failed", "crashed", "cancelled")


def mark_stopped(run_dir: Path, status: str, reason: str) -> bool:
    """A run that stopped outside its stages (its process killed, its flow run cancelled or failed by the
    orchestrator): set the record's ``status`` (``failed``, ``crashed``, ``cancelled``) with the reason, give
    back the space reserve, delete temporary files and write the deployment record. A run whose record is
    already final (succeeded, refused, failed…) keeps it; returns whether the record changed."""
    if status not in FINAL_STATUSES[2:]:
        raise ValueError(f"mark_stopped: {status!r} is not one of {FINAL_STATUSES[2:]}")
    run_dir = Path(run_dir)
    if not (run_dir / RECORD).is_file() or read_record(run_dir).get("status") in FINAL_STATUSES:
        return False
    release_space(run_dir)
    removed = remove_temp_files(run_dir)
    from datetime import UTC, datetime

    update_record(run_dir, status=status, error=reason, finished_at=datetime.now(UTC).isoformat(),
                  stopped={"status": status, "reason": reason, "temp_files_removed": removed})
    write_deployment_record(run_dir)
    return True


def records_failure(stage: Callable[P, R]) -> Callable[P, R]:
    """Decorator for a stage whose first argument is the run folder: if it raises, the record's status
    becomes ``failed`` with the error (unless it is already ``refused`` or ``failed``), then it re-raises.

    A full disk is told apart: the space reserve is released (so the record can be written), the temporary
    files of unfinished writes are deleted, the record names the error (ENOSPC…) and what was removed, and an
    :class:`OutputError` saying how to go on replaces the raw ``OSError``."""

    @functools.wraps(stage)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return stage(*args, **kwargs)
        except RunRefused:
            raise
        except Exception as exc:
            run_dir = Path(args[0])  # type: ignore[arg-type]
            full_disk = disk_full(exc, run_dir)  # before the reserve goes back
            release_space(run_dir)
            if full_disk:
                removed = remove_temp_files(run_dir)
                code = next((errno.errorcode.get(e.errno, "") for e in (exc, exc.__cause__, exc.__context__)
                             if isinstance(e, OSError) and e.errno), "") or "ENOSPC"
                resumable = (run_dir / PLAN).exists() and (run_dir / INTERMEDIATES).exists()
                full = exc if isinstance(exc, OutputError) else OutputError(
                    f"disk full ({code}) in {stage.__name__}: {exc}; free space on the disk of {run_dir}, "
                    + (f"then finish the run with `geo-dino resume {run_dir}`" if resumable else
                       "then start the run again"))
                update_record(run_dir, status="failed", error=str(full),
                              disk_full={"errno": code, "stage": stage.__name__,
                                         "temp_files_removed": removed, "resumable": resumable})
                write_deployment_record(run_dir)
                if full is exc:
                    raise
                raise full from exc
            if read_record(run_dir).get("status") not in ("refused", "failed"):
                update_record(run_dir, status="failed",
                              error=f"{stage.__name__}: {type(exc).__name__}: {exc}")
                write_deployment_record(run_dir)
            raise

    return wrapper
