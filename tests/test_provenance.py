"""Provenance record, software versions, input descriptions and GeoTIFF tags."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from geo_dino.governance.provenance import (
    SCHEMA,
    ProvenanceRecord,
    geotiff_tags,
    git_info,
    raster_input_record,
    sha256_file,
    software_versions,
)

LANDSAT = Path(__file__).resolve().parents[1] / "data/rasters/landsat7_bahamas_RGB.byte.tif"  # bundled


def test_software_versions_have_gdal_proj_torch() -> None:
    v = software_versions()
    for key in ("python", "platform", "geo_dino", "torch", "numpy", "rasterio", "GDAL", "PROJ", "GEOS",
                "shapely", "pyproj", "rio_cogeo"):
        assert isinstance(v[key], str) and v[key], key
    assert v["GDAL"].startswith("3.")
    assert set(v) >= {"timm", "geopandas", "xarray", "dask", "prefect", "pydantic", "safetensors"}


def test_software_versions_does_not_import_prefect_or_torch() -> None:
    code = ("import sys, geo_dino.governance.provenance as p; p.software_versions(); "
            "print('prefect' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    data = np.random.default_rng(0).bytes(3 * 1024 + 17)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert sha256_file(path, chunk=1000) == hashlib.sha256(data).hexdigest() == sha256_file(path)


def test_record_writes_strict_json_with_timings(tmp_path: Path) -> None:
    rec = ProvenanceRecord.create(tmp_path / "run", "run-1")
    rec.set("inputs", [{"path": tmp_path / "a.tif", "nodata": math.nan}])
    with rec.timing("infer"):
        pass
    with pytest.raises(RuntimeError), rec.timing("heads"):
        raise RuntimeError("boom")
    path = rec.write()
    assert path == tmp_path / "run" / "provenance.json"
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert data["schema"] == SCHEMA and data["run_id"] == "run-1"
    assert datetime.fromisoformat(data["created_at"]).utcoffset().total_seconds() == 0
    assert set(data["timings"]) == {"infer", "heads"} and data["timings"]["infer"] >= 0
    assert data["inputs"][0] == {"path": str(tmp_path / "a.tif"), "nodata": "nan"}
    assert [p.name for p in path.parent.iterdir()] == ["provenance.json"]
    assert rec.to_dict()["run_id"] == "run-1"
    with pytest.raises(KeyError):
        rec.set("schema", "x")
    # read back and updated: timings merge, the rest is replaced, the file stays strict JSON
    again = ProvenanceRecord.open(path)
    again.update(timings={"write": 1.5}, status="succeeded")
    again.write()
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert set(data["timings"]) == {"infer", "heads", "write"} and data["status"] == "succeeded"
    assert data["created_at"] == rec.to_dict()["created_at"]
    with pytest.raises(KeyError):
        again.update(run_id="other")


def test_geotiff_tags_are_strings_with_random_init_and_unknown() -> None:
    record = {
        "run_id": "r1",
        "backbone": {"arch": "vit_small_patch16_dinov3", "checkpoint_sha256": None, "licence": "DINOv3"},
        "config": {"sha256": "c" * 64},
        "git": {"commit": "abc123", "dirty": True},
        "software": {"geo_dino": "0.1.0"},
    }
    tags = geotiff_tags(record)
    assert all(isinstance(k, str) and isinstance(v, str) and v for k, v in tags.items())
    assert tags["GEO_DINO_CHECKPOINT_SHA256"] == "random-init"
    assert tags["GEO_DINO_BACKBONE"] == "vit_small_patch16_dinov3"
    assert tags["GEO_DINO_CONFIG_SHA256"] == "c" * 64
    assert tags["GEO_DINO_AOI_SHA256"] == "unknown" and tags["GEO_DINO_SCREENING"] == "unknown"
    assert tags["GEO_DINO_GIT_COMMIT"] == "abc123-dirty"
    assert tags["GEO_DINO_VERSION"] == "0.1.0"
    empty = geotiff_tags({})
    assert set(empty) == set(tags) and empty["GEO_DINO_CHECKPOINT_SHA256"] == "unknown"
    assert (geotiff_tags({"backbone": {"checkpoint_sha256": "d" * 64}})["GEO_DINO_CHECKPOINT_SHA256"]
            == "d" * 64)


def test_raster_input_record_landsat() -> None:
    rec = raster_input_record(LANDSAT)
    assert rec["crs"] == "EPSG:32618" and rec["width"] == 791
    assert rec["driver"] == "GTiff" and rec["dtypes"] == ["uint8"] * rec["count"]
    assert rec["sha256"] == hashlib.sha256(LANDSAT.read_bytes()).hexdigest()
    assert rec["gsd"]["x_m"] == pytest.approx(rec["gsd"]["x"])
    json.dumps(rec)


def test_raster_input_record_geographic_gsd_in_metres(tmp_path: Path) -> None:
    path = tmp_path / "geo.tif"
    profile = {"driver": "GTiff", "width": 30, "height": 20, "count": 1, "dtype": "uint8", "crs": "EPSG:4326",
               "transform": Affine(0.001, 0.0, -77.5, 0.0, -0.001, 25.1)}
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(np.zeros((1, 20, 30), "uint8"))
    gsd = raster_input_record(path)["gsd"]
    assert gsd["x"] == pytest.approx(0.001)
    assert gsd["x_m"] == pytest.approx(111_320 * 0.001 * math.cos(math.radians(25.09)), rel=0.01)
    assert gsd["y_m"] == pytest.approx(110.7, rel=0.01)


def test_git_info(tmp_path: Path) -> None:
    assert git_info(tmp_path) is None
    info = git_info()
    assert info is None or (set(info) == {"commit", "dirty"} and isinstance(info["dirty"], bool))


def test_acquisition_dates_from_tags_or_file_names():
    from pathlib import Path

    from geo_dino.governance.provenance import acquisition_date

    assert acquisition_date(Path("taizhou_L7ETM_2000-03-17.tif"), {}) == {
        "start": "2000-03-17", "end": "2000-03-17", "source": "file name"}
    assert acquisition_date(Path("m_4709963_se_14_1_20090818.tif"), {})["start"] == "2009-08-18"
    assert acquisition_date(Path("landsat_pucallpa_1985.tif"), {}) == {
        "start": "1985-01-01", "end": "1985-12-31", "source": "file name (year)"}
    assert acquisition_date(Path("landsat7_bahamas_RGB.byte.tif"), {}) is None  # nothing says
    assert acquisition_date(Path("Spain_7370579_S2.tif"), {}) is None  # a 7-digit id is not a date
    tags = {"TIFFTAG_DATETIME": "2021:01:05 12:00:00", "DATE_ACQUIRED": "2019-05-02"}
    assert acquisition_date(Path("x_2018.tif"), tags) == {"start": "2019-05-02", "end": "2019-05-02",
                                                          "source": "tag DATE_ACQUIRED"}  # the tag first
    assert acquisition_date(Path("x.tif"), {"DATE_ACQUIRED": "2019-13-45"}) is None  # not a date


def _update_many(run_dir: str, who: int, n: int) -> None:
    from geo_dino.run.folder import update_record

    for k in range(n):
        update_record(Path(run_dir), **{f"w{who}_{k}": k}, timings={f"w{who}_{k}": 0.001})


def test_update_record_from_several_processes_loses_nothing(tmp_path) -> None:
    """A stop hook in the worker and the run's own process may update the record at once: every section
    each of four processes wrote is there (without the run folder's lock, read-modify-write loses some)."""
    import multiprocessing

    from geo_dino.run.folder import RECORD, read_record, update_record

    update_record(tmp_path, status="started")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_update_many, args=(str(tmp_path), w, 60)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    rec = read_record(tmp_path)
    missing = [f"w{w}_{k}" for w in range(4) for k in range(60) if f"w{w}_{k}" not in rec]
    assert not missing, f"{len(missing)} of 240 updates lost"
    assert len(rec["timings"]) == 240 and rec["status"] == "started"
    assert json.loads((tmp_path / RECORD).read_text()) == rec
