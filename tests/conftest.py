"""Shared fixtures: the repository's bundled real data and a tiny-backbone run configuration."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BAHAMAS = ROOT / "data" / "rasters" / "landsat7_bahamas_RGB.byte.tif"
PUCALLPA = [ROOT / "data" / "rasters" / "pucallpa" / f"landsat_pucallpa_{y}.tif" for y in (1985, 2020)]

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # tests talk to nothing but localhost

# The only reasons a test may skip. Any other skip (a bundled file gone, a dev package missing behind
# pytest.importorskip, a new skipif) fails instead, so that a run on another machine cannot pass by skipping.
ALLOWED_SKIPS = (
    "QGIS (python3-qgis) not installed",  # QGIS is a system package: outside CI a developer may lack it
)


def refuse_unlisted_skip(report: pytest.TestReport) -> None:
    """Turn a skipped ``report`` into a failure unless its reason is one of :data:`ALLOWED_SKIPS`."""
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if not any(allowed in reason for allowed in ALLOWED_SKIPS):
        report.outcome = "failed"
        report.longrepr = f"skipped for a reason that tests/conftest.py ALLOWED_SKIPS does not list: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Every test phase's report goes through :func:`refuse_unlisted_skip`."""
    outcome = yield
    refuse_unlisted_skip(outcome.get_result())


@pytest.fixture
def tiny_config(tmp_path: Path):
    """A run configuration dict with the tiny test backbone, writing under ``tmp_path``."""

    def make(aoi: str = "aoi/bahamas_andros.geojson", rasters: list[Path] | None = None, **over) -> dict:
        cfg = {
            "name": "t",
            "aoi": str(ROOT / aoi),
            "rasters": [str(r) for r in (rasters or [BAHAMAS])],
            "output_dir": str(tmp_path / "runs"),
            "sources": {"allowed_roots": [str(ROOT / "data"), str(tmp_path)]},
            "screening": {"registry": str(ROOT / "data/registry/sensitive_sites.gpkg"),
                          "policy": str(ROOT / "configs/screening_policy.yaml")},
            "backbone": {"arch": "vit_tiny_patch16_dinov3_test", "batch_size": 16},
            "tiling": {"size": 64, "overlap": 16, "chunk_tiles": 16},
            "heads": {"kmeans": {"k": 4, "fit_tiles": 16}},
        }
        for k, v in over.items():
            cfg[k] = cfg[k] | v if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
        return cfg

    return make


def run_folders(out: Path) -> list[Path]:
    """The run folders in an output folder (each has its provenance record; ``collections/`` is not one)."""
    return sorted(p for p in Path(out).iterdir() if (p / "provenance.json").is_file())
