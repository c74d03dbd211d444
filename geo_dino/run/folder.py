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

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from geo_dino.errors import RunRefused
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
    """Merge ``sections`` into the run's provenance record (``timings`` are added to), atomically."""
    from geo_dino.governance.provenance import ProvenanceRecord

    rec = ProvenanceRecord.open(Path(run_dir) / RECORD)
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


def records_failure(stage: Callable[P, R]) -> Callable[P, R]:
    """Decorator for a stage whose first argument is the run folder: if it raises, the record's status
    becomes ``failed`` with the error (unless it is already ``refused`` or ``failed``), then it re-raises."""

    @functools.wraps(stage)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return stage(*args, **kwargs)
        except RunRefused:
            raise
        except Exception as exc:
            run_dir = Path(args[0])  # type: ignore[arg-type]
            if read_record(run_dir).get("status") not in ("refused", "failed"):
                update_record(run_dir, status="failed",
                              error=f"{stage.__name__}: {type(exc).__name__}: {exc}")
                write_deployment_record(run_dir)
            raise

    return wrapper
