"""Co-registration check: phase correlation recovers known sub-pixel shifts, reports aligned pairs as aligned,
and a two-date run records the estimate (and warns) in its provenance record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from scipy import ndimage

from geo_dino.inputs.coregistration import check_pair, phase_shift
from geo_dino.inputs.grid import PixelBox
from geo_dino.inputs.sources import WindowReader, open_raster

ROOT = Path(__file__).resolve().parents[1]
BAHAMAS = ROOT / "data/rasters/landsat7_bahamas_RGB.byte.tif"


def _scene() -> np.ndarray:
    with rasterio.open(BAHAMAS) as src:
        return src.read(1, window=((200, 456), (250, 506))).astype(np.float64)


@pytest.mark.parametrize("shift", [(0.0, 0.0), (1.0, -2.0), (0.4, 0.7), (-3.3, 1.25)])
def test_phase_shift_recovers_known_shifts_on_real_imagery(shift: tuple[float, float]) -> None:
    a = _scene()
    b = ndimage.shift(a, shift, order=3, mode="reflect")
    dy, dx, peak = phase_shift(a, b)
    assert dy == pytest.approx(shift[0], abs=0.15) and dx == pytest.approx(shift[1], abs=0.15)
    assert peak > 0.2


def test_unrelated_images_give_a_weak_peak() -> None:
    a = _scene()
    b = np.random.default_rng(0).normal(size=a.shape)
    assert phase_shift(a, b)[2] < 0.1 < phase_shift(a, ndimage.shift(a, (1, 1), order=3))[2]


def _write(path: Path, data: np.ndarray, src) -> None:
    profile = src.profile | {"driver": "GTiff", "count": data.shape[0]}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)


def test_check_pair_on_a_shifted_copy_and_on_the_same_file(tmp_path: Path) -> None:
    from geo_dino.config import SourceConfig

    with rasterio.open(BAHAMAS) as src:
        data = src.read()
        shifted = np.stack([ndimage.shift(b.astype(np.float64), (0.0, 1.5), order=1, mode="nearest")
                            for b in data]).round().clip(0, 255).astype(np.uint8)
        shifted[data == 0] = 0
        _write(tmp_path / "t2.tif", shifted, src)
        _write(tmp_path / "t1.tif", data, src)
    cfg = SourceConfig(allowed_roots=[tmp_path])
    i1, i2 = open_raster(tmp_path / "t1.tif", cfg), open_raster(tmp_path / "t2.tif", cfg)
    region = PixelBox(100, 100, 500, 500)
    with WindowReader(i1) as r1, WindowReader(i2) as r2:
        moved = check_pair([r1, r2], region, side=256, pixel_size_m=300.0)
    with WindowReader(i1) as r1, WindowReader(open_raster(tmp_path / "t1.tif", cfg)) as r2:
        same = check_pair([r1, r2], region, side=256)
    assert moved["dx_px"] == pytest.approx(1.5, abs=0.2) and abs(moved["dy_px"]) < 0.2
    assert moved["shift_m"] == pytest.approx(moved["shift_px"] * 300.0, rel=1e-3)
    assert moved["warning"] and "misaligned" in moved["warning"]
    assert same["shift_px"] < 0.05 and same["warning"] is None


def test_two_date_run_records_the_coregistration_estimate(tmp_path: Path) -> None:
    from geo_dino.config import parse_config
    from geo_dino.run.stages import run_local

    cfg = parse_config({
        "name": "coreg", "aoi": str(ROOT / "aoi/pucallpa.geojson"),
        "rasters": [str(ROOT / "data/rasters/pucallpa/landsat_pucallpa_1985.tif"),
                    str(ROOT / "data/rasters/pucallpa/landsat_pucallpa_2020.tif")],
        "output_dir": str(tmp_path), "sources": {"bands": [1, 2, 3]},
        "backbone": {"arch": "vit_tiny_patch16_dinov3_test"},
        "tiling": {"size": 64, "overlap": 16}, "heads": {"kmeans": {"k": 3, "fit_tiles": 8}},
    }, ROOT)
    run_dir = Path(run_local(cfg))
    rec = json.loads((run_dir / "provenance.json").read_text())["coregistration"]
    assert rec["method"].startswith("phase correlation") and rec["shift_px"] is not None
    assert rec["window"]["size"] > 32 and 0 < rec["valid_fraction"] <= 1


def test_a_weak_correlation_is_reported_as_unreliable_not_as_a_shift(tmp_path: Path) -> None:
    from geo_dino.config import SourceConfig

    with rasterio.open(BAHAMAS) as src:
        data = src.read()
        noise = np.random.default_rng(1).integers(1, 255, size=data.shape, dtype=np.uint8)
        _write(tmp_path / "t1.tif", data, src)
        _write(tmp_path / "t2.tif", noise, src)
    cfg = SourceConfig(allowed_roots=[tmp_path])
    with WindowReader(open_raster(tmp_path / "t1.tif", cfg)) as r1, \
            WindowReader(open_raster(tmp_path / "t2.tif", cfg)) as r2:
        rec = check_pair([r1, r2], PixelBox(100, 100, 500, 500), side=256)
    assert rec["peak"] < 0.05 and "could not be estimated reliably" in rec["warning"]
