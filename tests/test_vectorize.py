"""Class rasters to GeoPackage polygons: exact areas, blockwise merging, filters, confidence, styles, QGIS."""

from __future__ import annotations

import errno
import json
import math
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
import rasterio.features
import shapely
from affine import Affine
from pyproj import CRS, Geod

from geo_dino import files
from geo_dino.errors import ConfigError, CRSMismatchError, OutputError, SourceError
from geo_dino.inputs.labels import ClassTable
from geo_dino.outputs.styles import layer_style_qml, write_layer_style
from geo_dino.outputs.vectorize import vectorize_classes

UTM = ("EPSG:32617", Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4000000.0))
GEO = ("EPSG:4326", Affine(0.001, 0.0, -80.0, 0.0, -0.001, 45.0))
NAMES = {0: "background", 1: "forest", 2: "water", 3: "urban"}
QGIS_PY = "/usr/bin/python3"


def _write(path: Path, arr: np.ndarray, grid: tuple[str, Affine] = UTM, nodata: float | None = 255) -> Path:
    crs, transform = grid
    with rasterio.open(path, "w", driver="GTiff", width=arr.shape[1], height=arr.shape[0], count=1,
                       dtype=arr.dtype, crs=crs, transform=transform, nodata=nodata) as ds:
        ds.write(arr, 1)
    return path


def _run(tmp_path: Path, arr: np.ndarray, layer: str = "classes", grid: tuple[str, Affine] = UTM, **kw):
    src = _write(tmp_path / f"{layer}.tif", arr, grid)
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    kw.setdefault("classes", NAMES)
    rec = vectorize_classes(src, run_dir=run, gpkg_name="vectors.gpkg", layer=layer, **kw)
    return rec, gpd.read_file(run / "vectors.gpkg", layer=layer)


def _blobs(seed: int = 0, shape: tuple[int, int] = (90, 110)) -> np.ndarray:
    """Seeded blobby classes 0..3 with a nodata corner and nodata specks: many shapes, holes, islands in holes
    and diagonal contacts."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    arr = ndimage.median_filter((rng.random(shape) * 4).astype(np.uint8), 3).astype(np.uint8)
    arr[:4, :5] = 255
    arr[rng.random(shape) < 0.02] = 255
    return arr


def test_square_has_exact_area_attributes_and_crs(tmp_path):
    arr = np.zeros((20, 20), np.uint8)
    arr[3:8, 4:9] = 1  # 5 × 5 pixels of 10 m
    rec, gdf = _run(tmp_path, arr, skip_values={0})
    assert len(gdf) == rec["features"] == 1
    f = gdf.iloc[0]
    assert (f.class_value, f.class_name, f.pixel_count, f.area_m2) == (1, "forest", 25, 2500.0)
    assert f.geometry.equals(shapely.box(500040, 4000000 - 80, 500090, 4000000 - 30))
    assert math.isnan(f.mean_confidence)
    assert CRS.from_user_input(gdf.crs) == CRS.from_user_input("EPSG:32617")
    assert rec["classes"] == {"forest": {"value": 1, "features": 1, "area_m2": 2500.0, "pixel_count": 25}}
    assert rec["path"] == "vectors.gpkg" and rec["parameters"]["area_method"] == "planar"
    assert not list((tmp_path / "run").glob(".*tmp*"))


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_blockwise_equals_whole_raster(tmp_path, connectivity, seed):
    arr = _blobs(seed)
    whole = {}
    for block in (4096, 16, 8, 7, 5):
        rec, gdf = _run(tmp_path, arr, layer=f"b{block}", block=block, connectivity=connectivity)
        assert gdf.is_valid.all() and rec["features"] == len(gdf)
        whole.setdefault("ref", gdf)
        ref = whole["ref"]
        assert len(gdf) == len(ref)
        assert sorted(gdf.area_m2) == sorted(ref.area_m2)
        assert gdf.union_all().symmetric_difference(ref.union_all()).area < 1e-6
        assert sorted(gdf.geometry.normalize().to_wkt()) == sorted(ref.geometry.normalize().to_wkt())
    # and the whole-raster result is GDAL's own polygonising of the raster
    oracle = [(shapely.geometry.shape(g), int(v)) for g, v in rasterio.features.shapes(
        arr, mask=arr != 255, connectivity=connectivity, transform=UTM[1])]
    assert len(oracle) == len(whole["ref"])
    assert sorted(round(g.area, 6) for g, _ in oracle) == sorted(round(a, 6) for a in whole["ref"].area_m2)


def test_shape_across_many_blocks_is_one_polygon_with_its_hole(tmp_path):
    arr = np.zeros((40, 40), np.uint8)
    arr[2:38, 2:38] = 1   # a frame 36 px wide...
    arr[10:30, 10:30] = 0  # ...around a 20 × 20 hole
    arr[15:25, 15:25] = 1  # with an island inside the hole
    _, gdf = _run(tmp_path, arr, block=7, skip_values={0})
    assert len(gdf) == 2
    frame = gdf.loc[gdf.pixel_count.idxmax()]
    assert frame.geometry.geom_type == "Polygon" and len(frame.geometry.interiors) == 1
    assert frame.pixel_count == 36 * 36 - 20 * 20 and frame.area_m2 == frame.pixel_count * 100.0
    assert len(frame.geometry.exterior.coords) == 5  # window-edge vertices were dissolved


def test_min_area_drops_small_polygons_after_merging(tmp_path):
    arr = np.zeros((30, 30), np.uint8)
    arr[1, 1] = 1            # 100 m²
    arr[5:7, 5:7] = 2        # 400 m²
    arr[12:17, 12:17] = 3    # 2500 m², split over four 14-pixel blocks
    rec, gdf = _run(tmp_path, arr, skip_values={0}, min_area_m2=400, block=14)
    assert sorted(gdf.area_m2) == [400.0, 2500.0]
    assert rec["dropped_min_area"] == 1 and rec["parameters"]["min_area_m2"] == 400.0


@pytest.mark.parametrize("grid", [UTM, GEO])
def test_simplify_reduces_a_staircase_and_stays_valid(tmp_path, grid):
    n = 40
    arr = np.tril(np.ones((n, n), np.uint8))  # a staircase triangle
    _, raw = _run(tmp_path, arr, layer="raw", grid=grid, skip_values={0})
    metres = 15.0 if grid is UTM else 150.0
    rec, simple = _run(tmp_path, arr, layer="simple", grid=grid, skip_values={0}, simplify_m=metres, block=16)
    assert len(raw) == len(simple) == 1
    before, after = raw.geometry.iloc[0], simple.geometry.iloc[0]
    assert len(after.exterior.coords) < len(before.exterior.coords) // 5
    assert after.is_valid and not after.is_empty and after.geom_type == "Polygon"
    assert simple.area_m2.iloc[0] == raw.area_m2.iloc[0]  # area is the pixels' area, before simplifying
    # the ground tolerance is never exceeded (geographic: degrees at >= 111 km per degree)
    assert shapely.hausdorff_distance(before, after) <= (metres if grid is UTM else metres / 111_000)
    assert rec["parameters"]["simplify_m"] == metres and rec["simplify_kept_original"] == 0


def test_mean_confidence_equals_numpy_mean_over_the_pixels(tmp_path):
    rng = np.random.default_rng(3)
    arr = np.zeros((30, 30), np.uint8)
    arr[2:20, 3:25] = 1   # crosses 8-pixel blocks
    arr[22:28, 22:28] = 2
    conf = rng.random((30, 30)).astype(np.float32)
    conf[5, 5] = conf[24, 24] = np.nan  # NaN pixels are left out of the mean
    conf_path = _write(tmp_path / "conf.tif", conf, nodata=float("nan"))
    _, gdf = _run(tmp_path, arr, skip_values={0}, confidence_cog=conf_path, block=8)
    for value in (1, 2):
        f = gdf[gdf.class_value == value].iloc[0]
        assert f.mean_confidence == pytest.approx(np.nanmean(conf[arr == value].astype(np.float64)),
                                                  rel=1e-12)


def test_nodata_and_skip_values_are_never_polygons(tmp_path):
    arr = _blobs(seed=5)
    rec, gdf = _run(tmp_path, arr, skip_values={0, 3}, block=9, classes={1: "forest"})
    assert set(gdf.class_value) == {1, 2}
    assert gdf.pixel_count.sum() == np.isin(arr, [1, 2]).sum()
    assert rec["parameters"]["skip_values"] == [0, 3]
    assert set(gdf[gdf.class_value == 2].class_name) == {"class_2"} and rec["unnamed_values"] == [2]


def test_geographic_grid_gets_geodesic_areas(tmp_path):
    arr = np.zeros((12, 12), np.uint8)
    arr[2:7, 3:8] = 2
    rec, gdf = _run(tmp_path, arr, grid=GEO, skip_values={0}, block=4)
    x0, y0 = -80.0 + 3 * 0.001, 45.0 - 2 * 0.001
    lons, lats = [x0, x0 + 0.005, x0 + 0.005, x0], [y0, y0, y0 - 0.005, y0 - 0.005]
    expected = abs(Geod(ellps="WGS84").polygon_area_perimeter(lons, lats)[0])
    assert gdf.area_m2.iloc[0] == pytest.approx(expected, rel=1e-9)
    assert 5 * 0.001 * 78_000 * 5 * 0.001 * 111_000 < expected < 5 * 0.001 * 80_000 * 5 * 0.001 * 112_000
    assert (CRS.from_user_input(gdf.crs) == CRS.from_epsg(4326)
            and rec["parameters"]["area_method"].startswith("geo"))


def test_foot_crs_areas_are_converted_to_square_metres(tmp_path):
    arr = np.zeros((10, 10), np.uint8)
    arr[1:6, 1:6] = 1
    feet = ("EPSG:2263", Affine(10.0, 0.0, 1_000_000.0, 0.0, -10.0, 200_000.0))  # NY Long Island, US feet
    _, gdf = _run(tmp_path, arr, grid=feet, skip_values={0})
    assert gdf.area_m2.iloc[0] == pytest.approx(2500 * (1200 / 3937) ** 2, rel=1e-12)


def test_layers_are_added_or_replaced_and_styles_kept(tmp_path):
    arr = _blobs(seed=1)
    rec1, _ = _run(tmp_path, arr, layer="first", skip_values={0})
    _run(tmp_path, arr, layer="second", classes=ClassTable.from_mapping({v: k for k, v in NAMES.items()}))
    rec3, again = _run(tmp_path, arr, layer="first", skip_values={0, 1})  # replace only its own layer
    gpkg = tmp_path / "run" / "vectors.gpkg"
    layers = dict(pyogrio.list_layers(gpkg).tolist())
    assert layers["first"] == layers["second"] == "Polygon" and "layer_styles" in layers
    assert len(again) == rec3["features"] < rec1["features"]
    assert set(again.class_value) == {2, 3}
    with sqlite3.connect(gpkg) as con:
        rows = con.execute("SELECT f_table_name, styleName, useAsDefault FROM layer_styles "
                           "ORDER BY id").fetchall()
    assert rows == [("first", "first", 1), ("second", "second", 1)]


@pytest.mark.parametrize("name", ["../escape.gpkg", "/tmp/abs.gpkg", "sub/../../x.gpkg"])
def test_paths_outside_the_run_folder_are_refused(tmp_path, name):
    src = _write(tmp_path / "c.tif", np.ones((5, 5), np.uint8))
    (tmp_path / "run").mkdir()
    with pytest.raises(OutputError):
        vectorize_classes(src, run_dir=tmp_path / "run", gpkg_name=name, layer="c", classes=NAMES)


def test_a_symlink_at_the_temporary_name_is_refused(tmp_path):
    src = _write(tmp_path / "c.tif", np.ones((5, 5), np.uint8))
    run = tmp_path / "run"
    run.mkdir()
    outside = tmp_path / "outside.gpkg"
    outside.write_bytes(b"keep")
    (run / ".v.gpkg.tmp.gpkg").symlink_to(outside)
    with pytest.raises(OutputError, match="symlink"):
        vectorize_classes(src, run_dir=run, gpkg_name="v.gpkg", layer="c", classes=NAMES)
    assert outside.read_bytes() == b"keep" and not (run / "v.gpkg").exists()


def test_bad_inputs_fail_clearly(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    src = _write(tmp_path / "c.tif", np.ones((10, 10), np.uint8))
    ok = {"run_dir": run, "gpkg_name": "v.gpkg", "layer": "c", "classes": NAMES}
    with pytest.raises(SourceError, match="does not exist"):
        vectorize_classes(tmp_path / "missing.tif", **ok)
    other = _write(tmp_path / "conf.tif", np.ones((10, 11), np.float32), nodata=float("nan"))
    with pytest.raises(CRSMismatchError, match="confidence raster"):
        vectorize_classes(src, confidence_cog=other, **ok)
    moved = _write(tmp_path / "conf2.tif", np.ones((10, 10), np.float32), grid=GEO, nodata=float("nan"))
    with pytest.raises(CRSMismatchError):
        vectorize_classes(src, confidence_cog=moved, **ok)
    with pytest.raises(SourceError, match="integers"):
        vectorize_classes(_write(tmp_path / "f.tif", np.ones((4, 4), np.float32)), **ok)
    with pytest.raises(ConfigError, match="connectivity"):
        vectorize_classes(src, connectivity=6, **ok)
    with pytest.raises(ConfigError, match="simplify_m"):
        vectorize_classes(src, simplify_m=-1, **ok)
    (run / "junk.gpkg").write_text("not a geopackage")
    with pytest.raises(OutputError, match="not a readable GeoPackage"):
        vectorize_classes(src, **{**ok, "gpkg_name": "junk.gpkg"})
    assert sorted(p.name for p in run.iterdir()) == ["junk.gpkg"]  # nothing half-written left behind


def test_layer_styles_table_is_qgis_schema_and_registered(tmp_path):
    _run(tmp_path, _blobs(), style=False)
    gpkg = tmp_path / "run" / "vectors.gpkg"
    qml = layer_style_qml(ClassTable.from_mapping({"forest": 1, "water": 2}).qml_classes())
    write_layer_style(gpkg, "classes", qml)
    write_layer_style(gpkg, "classes", qml)  # same name: replaced, not duplicated
    write_layer_style(gpkg, "classes", qml.replace("forest", "wood"), name="alt")  # new default
    with sqlite3.connect(gpkg) as con:
        cols = [r[1] for r in con.execute("PRAGMA table_info(layer_styles)")]
        rows = con.execute("SELECT f_table_catalog, f_table_schema, f_table_name, f_geometry_column, "
                           "styleName, useAsDefault, styleQML LIKE '%categorizedSymbol%', "
                           "update_time IS NOT NULL "
                           "FROM layer_styles ORDER BY id").fetchall()
        contents = con.execute("SELECT data_type, identifier FROM gpkg_contents "
                               "WHERE table_name = 'layer_styles'").fetchall()
    assert cols == ["id", "f_table_catalog", "f_table_schema", "f_table_name", "f_geometry_column",
                    "styleName", "styleQML", "styleSLD", "useAsDefault", "description", "owner", "ui",
                    "update_time"]
    assert rows == [("", "", "classes", "geom", "classes", 0, 1, 1),
                    ("", "", "classes", "geom", "alt", 1, 1, 1)]
    assert contents == [("attributes", "layer_styles")]
    assert "layer_styles" in dict(pyogrio.list_layers(gpkg).tolist())
    assert len(gpd.read_file(gpkg, layer="classes")) > 0
    assert len(pyogrio.read_dataframe(gpkg, layer="layer_styles")) == 2
    with pytest.raises(OutputError, match="no feature layer"):
        write_layer_style(gpkg, "nope", qml)


def _have_qgis() -> bool:
    try:
        return subprocess.run([QGIS_PY, "-c", "import qgis.core"], check=False, capture_output=True,
                              timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


_QGIS_SCRIPT = """
import json, os, sys
from qgis.core import QgsApplication, QgsRenderContext, QgsVectorLayer
app = QgsApplication([], False)
app.initQgis()
layer = QgsVectorLayer(sys.argv[1] + "|layername=" + sys.argv[2], "x", "ogr")
r = layer.renderer()
ctx = QgsRenderContext()
r.startRender(ctx, layer.fields())
colours = {str(f["class_value"]): r.symbolForFeature(f, ctx).color().name() for f in layer.getFeatures()}
r.stopRender(ctx)
print(json.dumps({"valid": layer.isValid(), "features": layer.featureCount(), "renderer": r.type(),
                  "crs": layer.crs().authid(), "colours": colours,
                  "labels": [c.label() for c in r.categories()]}), flush=True)
os._exit(0)  # QGIS 3.22 can crash while tearing down headless
"""


@pytest.mark.skipif(not _have_qgis() and not os.environ.get("CI"),
                    reason="QGIS (python3-qgis) not installed; .ci/run and `make test` install it")
@pytest.mark.slow
def test_qgis_loads_the_layer_with_its_default_style(tmp_path):
    table = ClassTable.from_dict({"classes": [{"name": "forest", "value": 1, "colour": "#228833"},
                                              {"name": "water", "value": 2, "colour": "#4477aa"}]})
    arr = np.zeros((30, 30), np.uint8)
    arr[2:12, 2:12], arr[15:25, 5:28] = 1, 2
    rec, _ = _run(tmp_path, arr, classes=table, skip_values={0}, block=8)
    script = tmp_path / "qgis_vector.py"
    script.write_text(_QGIS_SCRIPT)
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", XDG_RUNTIME_DIR=str(xdg))
    env.pop("PYTHONPATH", None)
    res = subprocess.run([QGIS_PY, str(script), str(tmp_path / "run" / "vectors.gpkg"), "classes"],
                         check=False, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["valid"] and info["features"] == rec["features"] == 2
    assert info["renderer"] == "categorizedSymbol" and info["labels"] == ["forest", "water"]
    assert info["colours"] == {"1": "#228833", "2": "#4477aa"} and info["crs"] == "EPSG:32617"


def test_nothing_to_vectorise_writes_an_empty_styled_layer(tmp_path):
    rec, gdf = _run(tmp_path, np.zeros((9, 9), np.uint8), skip_values={0})
    assert rec["features"] == len(gdf) == 0 and rec["classes"] == {}
    gpkg = tmp_path / "run" / "vectors.gpkg"
    assert dict(pyogrio.list_layers(gpkg).tolist())["classes"] == "Polygon"
    assert CRS.from_user_input(pyogrio.read_info(gpkg, layer="classes")["crs"]) == CRS.from_epsg(32617)


def test_writers_of_one_folder_take_turns(tmp_path):
    """The folder lock (``flock`` on POSIX) makes a second writer wait until the first is done."""
    events: list[str] = []
    held = threading.Event()

    def first() -> None:
        with files.folder_lock(tmp_path):
            events.append("first in")
            held.set()
            time.sleep(0.3)
            events.append("first out")

    t = threading.Thread(target=first)
    t.start()
    held.wait(5)
    with files.folder_lock(tmp_path):
        events.append("second in")
    t.join()
    assert events == ["first in", "first out", "second in"]
    assert not list(tmp_path.iterdir())  # no lock file in the folder


def test_folder_lock_without_fcntl_uses_msvcrt(tmp_path, monkeypatch):
    """Where there is no ``fcntl`` (Windows), ``msvcrt.locking`` locks a file in the temporary directory and
    waits on past its own ten-second retries; the folder gets no lock file."""
    calls: list[int] = []

    def locking(fd: int, mode: int, nbytes: int) -> None:
        calls.append(mode)
        if calls == [1]:  # the first try finds the lock held (msvcrt gives up after ten seconds)
            raise OSError(errno.EDEADLK, "Resource deadlock avoided")

    monkeypatch.setitem(sys.modules, "msvcrt", types.SimpleNamespace(LK_LOCK=1, LK_UNLCK=0, locking=locking))
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))
    (tmp_path / "temp").mkdir()
    (tmp_path / "run").mkdir()
    with files.folder_lock(tmp_path / "run"):
        assert calls == [1, 1]
    assert calls == [1, 1, 0]
    assert not list((tmp_path / "run").iterdir())
    assert len(list((tmp_path / "temp").glob("geo_dino-*.lock"))) == 1
