"""No run stays ``started``: a task past its timeout fails, is retried with back-off while a retry may mend
it, and the run ends ``failed`` with the reason; the project's own errors are never retried. Through the real
``run_aoi`` flow (Prefect's ephemeral mode), on bundled data."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_folders

pytestmark = pytest.mark.slow


def test_a_chunk_past_its_timeout_is_retried_then_the_run_fails(tiny_config) -> None:
    from flows.run_aoi import run_aoi

    # the whole scene in one chunk of 255 tiles: well past 0.05 s even with the model already loaded
    cfg = tiny_config(aoi="aoi/bahamas_scene.geojson",
                      tiling={"size": 64, "overlap": 16, "chunk_tiles": 1000},
                      screening={"approval": {"approver": "T. Ester", "reason": "timeout test"}},
                      execution={"timeouts_s": {"chunk": 0.05}, "retries": 1, "retry_delay_s": 0.1})
    with pytest.raises(BaseException):  # noqa: B017 - Prefect raises the task's TimeoutError
        run_aoi(config=cfg)
    (run_dir,) = run_folders(cfg["output_dir"])
    rec = json.loads((run_dir / "provenance.json").read_text())
    assert rec["status"] == "failed" and "timed out" in rec["error"].lower(), rec.get("error")
    assert rec["retried"]["attempt"] == 2 and rec["retried"]["task"].startswith("infer-chunk")
    assert not (run_dir / "work" / ".space_reserve").exists()


def test_the_projects_own_errors_are_not_retried(tiny_config, tmp_path) -> None:
    """A raster cut short: a SourceError, said once, not retried (a retry would read the same bytes)."""
    import shutil

    from flows.run_aoi import run_aoi
    from geo_dino.errors import SourceError
    from tests.conftest import BAHAMAS

    raster = tmp_path / "scene.tif"
    shutil.copyfile(BAHAMAS, raster)
    with open(raster, "r+b") as f:
        f.truncate(raster.stat().st_size // 3)
    cfg = tiny_config(rasters=[raster], execution={"retries": 3, "retry_delay_s": 0.1})
    with pytest.raises(SourceError):
        run_aoi(config=cfg)
    (run_dir,) = run_folders(cfg["output_dir"])
    rec = json.loads((run_dir / "provenance.json").read_text())
    assert rec["status"] == "failed" and "retried" not in rec, rec
