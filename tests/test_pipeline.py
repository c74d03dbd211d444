"""End-to-end runs on the bundled real data with the tiny backbone: through Prefect, and stage by stage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
from pyproj import CRS, Transformer

from geo_dino.config import parse_config
from geo_dino.errors import AOIError, ConfigError, RunRefused, ScreeningError, SourceError
from geo_dino.run import stages as pl
from geo_dino.run.folder import chunk_path, chunk_results, load_config, load_plan
from tests.conftest import BAHAMAS, PUCALLPA, ROOT, run_folders


def _run_stages(cfg_dict: dict) -> Path:
    return pl.run_local(parse_config(cfg_dict))


def _only_run(tmp_path: Path) -> Path:
    runs = run_folders(tmp_path / "runs")
    assert len(runs) == 1
    return runs[0]


def _assert_on_input_grid(out: Path, src: Path) -> None:
    """Same CRS and pixel size; the origin lies on the input's pixel grid (an integer pixel offset)."""
    with rasterio.open(out) as o, rasterio.open(src) as s:
        assert CRS.from_user_input(o.crs) == CRS.from_user_input(s.crs)
        assert o.transform.a == pytest.approx(s.transform.a, rel=1e-12)
        assert o.transform.e == pytest.approx(s.transform.e, rel=1e-12)
        col = (o.transform.c - s.transform.c) / s.transform.a
        row = (o.transform.f - s.transform.f) / s.transform.e
        assert abs(col - round(col)) < 1e-6 and abs(row - round(row)) < 1e-6
        assert 0 <= round(col) and round(col) + o.width <= s.width
        assert 0 <= round(row) and round(row) + o.height <= s.height


@pytest.mark.slow
def test_flow_two_dates_end_to_end(tiny_config, tmp_path):
    """The Prefect flow in ephemeral mode on the Pucallpa 1985/2020 pair: every output, exact grids,
    record."""
    from rio_cogeo.cogeo import cog_validate

    from flows.run_aoi import run_aoi

    cfg = tiny_config("aoi/pucallpa.geojson", PUCALLPA, sources={"bands": [1, 2, 3]})
    run_dir = Path(run_aoi(config=cfg))
    names = {"pca_rgb_t1", "pca_rgb_t2", "classes_t1", "classes_t2", "change_magnitude", "change_mask",
             "change_spectral", "change_features"}  # fused change (the default) and its two parts
    assert {p.stem for p in run_dir.glob("*.tif")} == names
    for name in names:
        path = run_dir / f"{name}.tif"
        assert cog_validate(str(path))[0], name
        _assert_on_input_grid(path, PUCALLPA[0])
        with rasterio.open(path) as ds:
            tags = ds.tags()
            assert tags["GEO_DINO_CHECKPOINT_SHA256"] == "random-init"
            assert tags["GEO_DINO_BACKBONE"] == "vit_tiny_patch16_dinov3_test"
            assert len(tags["GEO_DINO_CONFIG_SHA256"]) == 64
            assert all(ds.descriptions)
    for name in ("classes_t1", "classes_t2", "change_mask"):
        assert (run_dir / f"{name}.qml").is_file()
    with (rasterio.open(run_dir / "change_mask.tif") as m,
          rasterio.open(run_dir / "change_magnitude.tif") as g):
        mask, mag = m.read(1), g.read(1)
    assert set(np.unique(mask)) <= {0, 1, 255}
    assert 0 < (mask == 1).sum() < (mask != 255).sum()  # some, not all, pixels changed
    assert np.array_equal(np.isnan(mag), mask == 255)  # one nodata footprint across outputs
    rec = json.loads((run_dir / "provenance.json").read_text())
    assert rec["status"] == "succeeded"
    assert rec["prefect"]["flow_run_id"]
    sums = dict(reversed(line.split()) for line in (ROOT / "data/SHA256SUMS").read_text().splitlines())
    assert [i["sha256"] for i in rec["inputs"]] == [sums[f"rasters/pucallpa/{p.name}"] for p in PUCALLPA]
    assert rec["backbone"]["source"] == "random-init" and rec["backbone"]["seed"] == 0
    assert rec["screening"]["action"] in ("allow", "record")
    assert rec["software"]["torch"] and rec["software"]["GDAL"] and rec["software"]["PROJ"]
    assert rec["config"]["sha256"] == parse_config(cfg).sha256()
    assert rec["aoi"]["sha256"] and rec["preprocessing"]["scale"] == "uint8"
    assert rec["pipeline"]["tile_size"] == 64 and rec["pipeline"]["overlap"] == 16
    assert {o["name"] for o in rec["outputs"]} == names
    thr = next(o for o in rec["outputs"] if o["name"] == "change_mask")["threshold"]
    assert thr > 0 and thr == rec["change"]["threshold"]["value"]
    valid = mask != 255
    assert np.array_equal(mask[valid] == 1, mag[valid] > thr)  # the mask is the thresholded fused score
    assert {"screen", "plan", "fit_heads", "finalize", "infer"} <= set(rec["timings"])
    import geopandas as gpd

    tiles = gpd.read_file(run_dir / "tiles.gpkg", layer="tiles")
    assert len(tiles) == rec["pipeline"]["n_tiles"] and tiles.crs == CRS.from_epsg(4326)


def test_mask_policy_blanks_airport(tiny_config, tmp_path):
    """Nassau: the airport and port are masked (nodata) in every output; pixels away from them are valid."""
    run_dir = _run_stages(tiny_config("aoi/bahamas_nassau.geojson"))
    decision = json.loads((run_dir / "screening.json").read_text())
    assert decision["action"] == "mask"
    assert {h["category"] for h in decision["hits"]} >= {"airport", "port"}
    airport = next(h for h in decision["hits"] if h["category"] == "airport")
    assert airport["buffer_m"] == 1500
    to_utm = Transformer.from_crs("EPSG:4326", "EPSG:32618", always_xy=True)
    x, y = to_utm.transform(-77.4648, 25.0487)  # Natural Earth's Nassau airport point
    with rasterio.open(run_dir / "classes.tif") as ds:
        r, c = ds.index(x, y)
        cls = ds.read(1)
        assert cls[r, c] == ds.nodata
        r2, c2 = ds.index(x + 6000, y - 6000)  # 8.5 km away, on the island
        valid = cls != ds.nodata
        assert valid.sum() > 0.3 * cls.size
    with rasterio.open(run_dir / "pca_rgb.tif") as ds:
        assert (ds.read()[:, r, c] == 0).all()


def test_deny_writes_only_the_decision_and_record(tiny_config, tmp_path):
    """deny: no raster is opened (the raster path does not even exist) and nothing but the record is
    written."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\ndefault: {action: record, buffer_m: 0}\n"
                      "categories:\n  port: {action: deny, buffer_m: 1000}\n")
    missing = tmp_path / "never_opened.tif"
    cfg = tiny_config("aoi/bahamas_nassau.geojson", [missing],
                      screening={"policy": str(policy)})
    run_dir = pl.prepare_run(parse_config(cfg))
    with pytest.raises(RunRefused, match="Nassau"):
        pl.screen_aoi(run_dir)
    assert {p.name for p in run_dir.iterdir()} == {"config.resolved.json", "screening.json",
                                                   "provenance.json", "deployment_record.json",
                                                   "deployment_record.md"}
    rec = json.loads((run_dir / "provenance.json").read_text())
    assert rec["status"] == "refused" and rec["screening"]["action"] == "deny"
    assert rec["screening"]["hits"][0]["category"] == "port"


def test_require_approval(tiny_config, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\ndefault: {action: record, buffer_m: 0}\n"
                      "categories:\n  airport: {action: require_approval, buffer_m: 1500}\n")
    cfg = tiny_config("aoi/bahamas_nassau.geojson", screening={"policy": str(policy)})
    run_dir = pl.prepare_run(parse_config(cfg))
    with pytest.raises(RunRefused, match="approver"):
        pl.screen_aoi(run_dir)
    assert json.loads((run_dir / "screening.json").read_text())["allowed"] is False
    approval = {"approver": "A. Analyst", "reason": "storm damage assessment for the port authority"}
    cfg = tiny_config("aoi/bahamas_nassau.geojson", screening={"policy": str(policy), "approval": approval})
    run_dir = pl.prepare_run(parse_config(cfg))
    out = pl.screen_aoi(run_dir)
    assert out["allowed"] and out["action"] == "require_approval"
    rec = json.loads((run_dir / "provenance.json").read_text())
    assert rec["screening"]["approval"]["approver"] == "A. Analyst"
    assert "storm" in rec["screening"]["approval"]["reason"]


@pytest.mark.parametrize("problem", ["missing", "tampered", "sidecar deleted"])
def test_screen_fails_closed(tiny_config, tmp_path, problem):
    reg = tmp_path / "sites.gpkg"
    if problem != "missing":
        reg.write_bytes((ROOT / "data/registry/sensitive_sites.gpkg").read_bytes())
    if problem == "tampered":
        (tmp_path / "sites.gpkg.sha256").write_text("0" * 64 + "  sites.gpkg\n")
    cfg = tiny_config(screening={"registry": str(reg)})
    run_dir = pl.prepare_run(parse_config(cfg))
    with pytest.raises(ScreeningError):
        pl.screen_aoi(run_dir)
    d = json.loads((run_dir / "screening.json").read_text())
    assert d["action"] == "refused" and not d["allowed"]
    assert not (run_dir / "work").exists()


def test_aoi_outside_raster_is_a_clear_error(tiny_config):
    cfg = tiny_config("aoi/pucallpa.geojson", [BAHAMAS])
    run_dir = pl.prepare_run(parse_config(cfg))
    pl.screen_aoi(run_dir)
    with pytest.raises(AOIError, match="does not overlap"):
        pl.plan_run(run_dir)
    assert not list(run_dir.glob("*.tif"))


def test_invalid_aoi_refused_with_decision(tiny_config, tmp_path):
    bad = tmp_path / "bad.geojson"
    bad.write_text('{"type": "Polygon", "coordinates": [[[0, 0], [NaN, 0], [1, 1], [0, 0]]]}')
    run_dir = pl.prepare_run(parse_config(tiny_config(str(bad))))
    with pytest.raises(AOIError):
        pl.screen_aoi(run_dir)
    assert {p.name for p in run_dir.iterdir()} == {"config.resolved.json", "screening.json",
                                                   "provenance.json", "deployment_record.json",
                                                   "deployment_record.md"}
    assert json.loads((run_dir / "screening.json").read_text())["action"] == "refused"
    assert json.loads((run_dir / "provenance.json").read_text())["status"] == "failed"


def test_raster_outside_allowed_roots(tiny_config, tmp_path):
    cfg = tiny_config(sources={"allowed_roots": [str(tmp_path / "elsewhere")]})
    run_dir = pl.prepare_run(parse_config(cfg))
    pl.screen_aoi(run_dir)
    with pytest.raises(SourceError, match="allowed roots"):
        pl.plan_run(run_dir)
    assert {p.name for p in run_dir.iterdir()} == {"config.resolved.json", "screening.json",
                                                   "provenance.json", "deployment_record.json",
                                                   "deployment_record.md"}
    rec = json.loads((run_dir / "provenance.json").read_text())
    assert rec["status"] == "failed" and "allowed roots" in rec["error"]


def test_config_errors_name_the_key(tiny_config):
    with pytest.raises(ConfigError, match="tilling"):
        parse_config(tiny_config(tilling={"size": 64}))
    with pytest.raises(ConfigError, match=r"tiling\.size"):
        parse_config(tiny_config(tiling={"size": -1}))
    with pytest.raises(ConfigError, match="multiple of the patch"):
        cfg = tiny_config(tiling={"size": 70, "overlap": 0})
        run_dir = pl.prepare_run(parse_config(cfg))
        pl.screen_aoi(run_dir)
        pl.plan_run(run_dir)


def test_resolved_config_written_first(tiny_config):
    cfg = parse_config(tiny_config())
    run_dir = pl.prepare_run(cfg)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.resolved.json", "provenance.json"]
    assert load_config(run_dir) == cfg


def test_no_seam_at_tile_edges(tiny_config):
    """Blended features show no step at tile edges: the jump across a tile edge column is no larger than
    across other patch-boundary columns inside tiles."""
    cfg = tiny_config(tiling={"size": 64, "overlap": 32, "chunk_tiles": 64})
    run_dir = _run_stages(cfg)
    plan = load_plan(run_dir)
    with rasterio.open(run_dir / "pca_rgb.tif") as ds:
        img = ds.read().astype(np.float32)
        valid = (ds.read_masks(1) > 0)
    jump = np.abs(np.diff(img, axis=2)).mean(axis=0)  # jump between column j and j+1
    ok = valid[:, 1:] & valid[:, :-1]
    stride = plan.tiling.size - plan.tiling.overlap
    # tile edges (starts and ends) fall at multiples of the stride from the region's origin: columns j where
    # j + 1 is a multiple of the stride; compare with patch boundaries (multiples of 16) that are not edges
    cols = np.arange(jump.shape[1])
    edge = ((cols + 1) % stride == 0)
    patch = ((cols + 1) % 16 == 0) & ~edge
    e = jump[:, edge][ok[:, edge]].mean()
    p = jump[:, patch][ok[:, patch]].mean()
    assert math.isfinite(e) and math.isfinite(p)
    assert e < 1.5 * p, (e, p)


def test_fit_features_reused_not_recomputed(tiny_config, monkeypatch):
    """Tiles seen while fitting the heads are not run through the backbone again during inference, and the
    outputs equal a run without that cache."""
    from geo_dino.models import backbone
    from geo_dino.run import inference
    calls = {"n": 0}
    real = backbone.dense_features

    def counting(model, x):
        calls["n"] += x.shape[0]
        return real(model, x)

    monkeypatch.setattr(backbone, "dense_features", counting)
    cfg = tiny_config(heads={"kmeans": {"k": 4, "fit_tiles": 1000}})
    run_dir = _run_stages(cfg)
    n_tiles = load_plan(run_dir).tiling.n_tiles
    assert calls["n"] == n_tiles  # each tile once: fitting saw all tiles, inference reused them
    assert not (run_dir / "work" / "features").exists()  # the cache is dropped when the run completes
    monkeypatch.setattr(inference, "feature_cache_paths", lambda *a: None)
    calls["n"] = 0
    run_dir2 = _run_stages(cfg)
    assert calls["n"] == 2 * n_tiles
    for name in ("pca_rgb.tif", "classes.tif"):
        with rasterio.open(run_dir / name) as a, rasterio.open(run_dir2 / name) as b:
            assert np.array_equal(a.read(), b.read())


def test_licence_gate_before_any_pixel(tiny_config, tmp_path):
    from geo_dino.errors import LicenceError

    ckpt = tmp_path / "sat.safetensors"
    ckpt.write_bytes(b"not even read")
    cfg = tiny_config(backbone={"arch": "vit_large_patch16_dinov3_sat", "checkpoint": str(ckpt)})
    run_dir = pl.prepare_run(parse_config(cfg))
    pl.screen_aoi(run_dir)
    with pytest.raises(LicenceError, match="DINOv3 License"):
        pl.plan_run(run_dir)
    rec = json.loads((run_dir / "provenance.json").read_text())
    assert rec["status"] == "failed" and "LicenceError" in rec["error"]
    assert not (run_dir / "work").exists()


def test_multispectral_run_needs_per_band_stats(tiny_config):
    """Four Pucallpa bands into an adapted patch embedding: refused without per-band mean/std, then runs."""
    cfg = tiny_config("aoi/pucallpa.geojson", PUCALLPA[:1], sources={"bands": [1, 2, 3, 4]},
                      backbone={"in_chans": 4})
    run_dir = pl.prepare_run(parse_config(cfg))
    pl.screen_aoi(run_dir)
    with pytest.raises(ConfigError, match="one value per band"):
        pl.plan_run(run_dir)
    cfg["preprocess"] = {"mean": [0.3, 0.4, 0.3, 0.3], "std": [0.2, 0.2, 0.2, 0.2]}
    run_dir = _run_stages(cfg)
    rec = json.loads((run_dir / "provenance.json").read_text())
    assert rec["backbone"]["in_chans"] == 4 and "4 bands" in rec["backbone"]["adaptation"]
    assert [m["source_band"] for m in rec["preprocessing"]["band_mapping"]] == [1, 2, 3, 4]


def test_gsd_recorded_and_warned():
    from geo_dino.run.plan import gsd_check

    with pytest.warns(UserWarning, match="training GSD"):
        far = gsd_check({"x_m": 300.0, "y_m": 300.0}, 0.6)
    assert far["ratio"] == 500.0 and far["warning"]
    near = gsd_check({"x_m": 0.5, "y_m": 0.5}, 0.6)
    assert near["warning"] is None and near["ratio"] == pytest.approx(0.833, abs=1e-3)
    assert gsd_check({"x_m": 30.0, "y_m": 30.0}, None)["warning"] is None  # web weights: no training GSD


def test_input_nodata_is_output_nodata(tiny_config):
    """The Bahamas scene's nodata collar (outside the rotated Landsat footprint) is nodata in every output,
    and pixels with data inside the AOI are not."""
    from rasterio.windows import from_bounds

    run_dir = _run_stages(tiny_config("aoi/bahamas_scene.geojson"))
    with rasterio.open(run_dir / "classes.tif") as out, rasterio.open(BAHAMAS) as src:
        cls = out.read(1)
        win = from_bounds(*out.bounds, transform=src.transform).round_offsets().round_lengths()
        src_valid = src.dataset_mask(window=win) > 0
        nod = out.nodata
    assert cls.shape == src_valid.shape
    assert (~src_valid).sum() > 1000  # the collar is really there
    assert (cls[~src_valid] == nod).all()
    assert (cls[src_valid] != nod).mean() > 0.95  # the rest: AOI corners and masked sites only


def test_resampling_to_a_target_gsd(tiny_config):
    """Off by default; when asked, tiles are resized to the target GSD before the backbone, the outputs stay
    on the input grid, and what was done is recorded. Refused without a target or beyond 8×."""
    base = _run_stages(tiny_config())
    cfg = tiny_config(preprocess={"resample_to_gsd": True, "target_gsd_m": 600.0})  # Landsat here is ~300 m
    run_dir = _run_stages(cfg)
    rec = json.loads((run_dir / "provenance.json").read_text())
    rs = rec["gsd"]["resampling"]
    assert rs["model_input"] == 32 and 0.45 < rs["factor"] < 0.55  # 64-px tiles at ~300 m → 32 px at 600 m
    assert json.loads((base / "provenance.json").read_text())["gsd"]["resampling"] is None
    with rasterio.open(run_dir / "classes.tif") as a, rasterio.open(base / "classes.tif") as b:
        assert a.transform == b.transform and a.shape == b.shape
        assert not np.array_equal(a.read(), b.read())  # the features did change
    with pytest.raises(ConfigError, match="target_gsd_m"):
        pl.plan_run(_screened(tiny_config(preprocess={"resample_to_gsd": True})))
    with pytest.raises(ConfigError, match="more than 8"):
        pl.plan_run(_screened(tiny_config(preprocess={"resample_to_gsd": True, "target_gsd_m": 1.0})))


def _screened(cfg: dict) -> Path:
    run_dir = pl.prepare_run(parse_config(cfg))
    pl.screen_aoi(run_dir)
    return run_dir


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_outputs(tiny_config):
    """Kill after two chunks (and in the middle of a third): resuming computes only the missing chunks and
    gives byte-identical outputs."""
    from tests.conftest import PUCALLPA as DATES

    cfg = tiny_config("aoi/pucallpa.geojson", DATES, sources={"bands": [1, 2, 3]},
                      tiling={"size": 64, "overlap": 16, "chunk_tiles": 1})
    whole = _run_stages(cfg)
    run_dir = pl.prepare_run(parse_config(cfg))
    pl.screen_aoi(run_dir)
    plan = pl.plan_run(run_dir)
    assert plan["n_chunks"] >= 4
    pl.fit_heads(run_dir)
    pl.init_outputs(run_dir)
    pl.infer_chunk(run_dir, 0)
    pl.infer_chunk(run_dir, 1)
    done = {p.name: p.stat().st_mtime_ns for p in chunk_results(run_dir)}
    pl.infer_chunk(run_dir, 2)  # it writes its rows, then "dies" before its result is on disk:
    chunk_path(run_dir, 2).unlink()
    n = plan["n_chunks"]
    assert pl.missing_chunks(run_dir) == list(range(2, n))
    pl.resume_run(run_dir)
    rec = json.loads((run_dir / "provenance.json").read_text())
    assert rec["status"] == "succeeded" and rec["resumed"]["chunks_missing"] == list(range(2, n))
    assert rec["execution"]["chunks_run"] == list(range(2, n)) and len(done) == 2
    for name in ("pca_rgb_t1.tif", "classes_t2.tif", "change_magnitude.tif", "change_mask.tif"):
        with rasterio.open(whole / name) as a, rasterio.open(run_dir / name) as b:
            assert np.array_equal(a.read(), b.read(), equal_nan=True), name


def test_a_checkpoint_replaced_after_planning_is_refused(tiny_config, tmp_path):
    """The plan pins the weights' sha256: a task that finds other bytes at that path refuses them."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from geo_dino.errors import CheckpointError
    from geo_dino.files import sha256_file
    from geo_dino.run.folder import read_record

    ckpt = tmp_path / "weights.safetensors"
    shutil.copy(ROOT / "models" / "vit_tiny_patch8_geo.safetensors", ckpt)
    cfg = parse_config(tiny_config(backbone={"arch": "vit_tiny_patch8_geo", "checkpoint": str(ckpt)}))
    run_dir = pl.prepare_run(cfg)
    pl.screen_aoi(run_dir)
    pl.plan_run(run_dir)
    assert load_plan(run_dir).backbone.sha256 == sha256_file(ckpt)
    with safe_open(str(ckpt), framework="pt") as f:
        meta = dict(f.metadata())
    save_file(load_file(str(ckpt)), str(ckpt), metadata=meta | {"note": "retrained since"})  # same shapes
    with pytest.raises(CheckpointError, match="does not match"):
        pl.fit_heads(run_dir)
    assert read_record(run_dir)["status"] == "failed"


def test_an_aoi_written_lat_lon_says_so(tiny_config, tmp_path):
    """Positions written [lat, lon]: the AOI misses the raster, and the message says that swapped it would
    not."""
    from tests.conftest import PUCALLPA

    obj = json.loads((ROOT / "aoi/pucallpa.geojson").read_text())

    def swap(c):
        return [swap(x) for x in c] if isinstance(c[0], list) else [c[1], c[0], *c[2:]]

    for f in obj.get("features", [obj]):
        g = f.get("geometry", f)
        g["coordinates"] = swap(g["coordinates"])
    path = tmp_path / "latlon.geojson"
    path.write_text(json.dumps(obj))
    cfg = tiny_config(str(path), PUCALLPA,
                      sources={"bands": [1, 2, 3], "allowed_roots": [str(ROOT / "data")]})
    run_dir = pl.prepare_run(parse_config(cfg))
    pl.screen_aoi(run_dir)
    with pytest.raises(AOIError, match="longitude and latitude swapped it would cover it"):
        pl.plan_run(run_dir)


def test_a_truncated_raster_fails_with_the_reason_recorded(tiny_config, tmp_path):
    """The header reads, the pixels do not: one clear SourceError, the run recorded ``failed`` with why."""
    src = tmp_path / "cut.tif"
    with rasterio.open(BAHAMAS) as s:
        profile = s.profile | {"tiled": True, "blockxsize": 64, "blockysize": 64, "compress": "deflate"}
        with rasterio.open(src, "w", **profile) as d:
            d.write(s.read())
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])  # the second half of the blocks is gone
    cfg = tiny_config(rasters=[src], sources={"allowed_roots": [str(tmp_path)]})
    run_dir = pl.prepare_run(parse_config(cfg))
    pl.screen_aoi(run_dir)
    pl.plan_run(run_dir)
    with pytest.raises(SourceError, match="truncated or corrupt"):
        pl.fit_heads(run_dir)
        pl.init_outputs(run_dir)
        for c in range(load_plan(run_dir).tiling.n_chunks):
            pl.infer_chunk(run_dir, c)
    rec = json.loads((run_dir / "provenance.json").read_text())
    assert rec["status"] == "failed" and "truncated or corrupt" in rec["error"]
    assert json.loads((run_dir / "deployment_record.json").read_text())["run_status"] == "failed"
