"""Labels: class tables, polygon rasterisation, label rasters, spatial splits, class weights.

Fixtures are generated here (seeded, tiny) on a known UTM grid; expected labels are computed independently
(pixel centres / pixel squares tested with shapely, vertices projected with pyproj).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from pyproj import Transformer
from shapely.geometry import LineString, Polygon, box

from geo_dino.config import SourceConfig
from geo_dino.errors import ConfigError, CRSMismatchError, SourceError
from geo_dino.files import sha256_file
from geo_dino.inputs.grid import Grid, PixelBox, TileGrid
from geo_dino.inputs.labels import (
    IGNORE,
    ClassTable,
    LabelClass,
    LabelError,
    label_stats,
    rasterize_polygons,
    read_label_raster,
    spatial_split,
)

UTM = "EPSG:32633"
GRID = Grid(20, 24, Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0), UTM)
TABLE = ClassTable.from_dict({"classes": [{"name": "water", "value": 0, "colour": "#0000ff"},
                                          {"name": "forest", "value": 1, "colour": [0, 128, 0]},
                                          {"name": "urban", "value": 2}]})
TAIZHOU = (Path(__file__).resolve().parents[1] / "data/labels/taizhou"
           / "taizhou_reference_0unlabeled_1unchanged_2changed.tif")  # bundled (data/SHA256SUMS)

# off-grid vertices (no edge passes through a pixel centre or along a pixel edge)
POLY_A = Polygon([(500013.3, 4999987.1), (500151.7, 4999971.9), (500122.2, 4999861.4), (500031.9, 4999879.3)])
POLY_B = Polygon([(500101.1, 4999921.7), (500211.3, 4999913.2), (500197.4, 4999817.6), (500093.6, 4999839.8)])


def centres_inside(geom, grid: Grid = GRID) -> np.ndarray:
    xs, ys = grid.pixel_centres(grid.box)
    X, Y = np.meshgrid(xs, ys)
    return shapely.contains_xy(geom, X, Y)


def pixels_touched(geom, grid: Grid = GRID) -> np.ndarray:
    out = np.zeros((grid.height, grid.width), dtype=bool)
    for r in range(grid.height):
        for c in range(grid.width):
            left, bottom, right, top = grid.bounds(PixelBox(r, c, 1, 1))
            out[r, c] = box(left, bottom, right, top).intersects(geom)
    return out


def write_vector(path: Path, geoms, attrs, crs=UTM, name: str = "cls", layer: str | None = None) -> Path:
    gdf = gpd.GeoDataFrame({name: attrs}, geometry=list(geoms), crs=crs)
    driver = "GPKG" if path.suffix == ".gpkg" else "GeoJSON"
    gdf.to_file(path, driver=driver, layer=layer, engine="pyogrio")
    return path


def write_raster(path: Path, arr: np.ndarray, grid: Grid = GRID, nodata=None) -> Path:
    with rasterio.open(path, "w", driver="GTiff", height=arr.shape[0], width=arr.shape[1], count=1,
                       dtype=arr.dtype, crs=grid.crs, transform=grid.transform, nodata=nodata) as dst:
        dst.write(arr, 1)
    return path


# --------------------------------------------------------------------------------------------- class table


def test_class_table_round_trip_and_lookup():
    d = TABLE.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert ClassTable.from_dict(d) == TABLE
    assert d["ignore_index"] == IGNORE == ClassTable.IGNORE == 255
    assert TABLE.classes[0].colour == (0, 0, 255)
    assert TABLE.value_for("urban") == 2 and TABLE.value_for(1) == 1 and TABLE.value_for(np.int64(0)) == 0
    assert TABLE.value_for(2.0) == 2
    assert TABLE.name_of(1) == "forest"
    assert TABLE.qml_classes()[1] == (1, "forest", (0, 128, 0, 255))
    # default colours are deterministic and distinct
    again = ClassTable.from_dict({"classes": [{"name": "water", "value": 0}, {"name": "forest", "value": 1},
                                              {"name": "urban", "value": 2}]})
    assert again.classes[2].colour == TABLE.classes[2].colour
    assert len({c.colour for c in again.classes}) == 3


def test_class_table_infer():
    t = ClassTable.infer(["urban", "water", "urban", None])
    assert t.names == ("urban", "water") and t.values == (0, 1)
    t = ClassTable.infer(np.array([3, 1, 3]))
    assert t.names == ("class_1", "class_3") and t.values == (1, 3)
    assert ClassTable.infer([3, 1]) == ClassTable.infer([1, 3])
    with pytest.raises(LabelError, match="strings or all integers"):
        ClassTable.infer(["a", 1])
    with pytest.raises(LabelError, match="no class value"):
        ClassTable.infer([None])


@pytest.mark.parametrize(("classes", "match"), [
    ([], "at least one"),
    ([{"name": "a", "value": 0}, {"name": "a", "value": 1}], "duplicate class name 'a'"),
    ([{"name": "a", "value": 0}, {"name": "b", "value": 0}], "duplicate class value 0"),
    ([{"name": "a", "value": 255}], "reserved"),
    ([{"name": "a", "value": 300}], "outside 0..254"),
    ([{"name": "a", "value": True}], "integer"),
    ([{"name": "", "value": 1}], "non-empty"),
    ([{"name": "a", "value": 1, "colour": [0, 0, 256]}], "colour"),
    ([{"name": "a", "value": 1, "colour": "#12345"}], "colour"),
    ([{"name": "a", "value": 1, "color": [0, 0, 0]}], "unknown keys"),
])
def test_class_table_errors(classes, match):
    with pytest.raises(ConfigError, match=match):
        ClassTable.from_dict({"classes": classes})


def test_class_table_other_errors():
    with pytest.raises(ConfigError, match="ignore_index"):
        ClassTable.from_dict({"classes": [{"name": "a", "value": 0}], "ignore_index": 0})
    with pytest.raises(ConfigError, match="reserved"):
        ClassTable((LabelClass("a", 255, (0, 0, 0)),))
    with pytest.raises(LabelError, match="unknown class 'grass'"):
        TABLE.value_for("grass")
    with pytest.raises(LabelError, match="unknown class value 7"):
        TABLE.value_for(7)
    with pytest.raises(LabelError, match="not an integer"):
        TABLE.value_for(1.5)


# --------------------------------------------------------------------------------------------- polygons


@pytest.mark.parametrize("suffix", [".geojson", ".gpkg"])
def test_rasterize_centres_pixel_exact(tmp_path, suffix):
    path = write_vector(tmp_path / f"l{suffix}", [POLY_A], ["forest"])
    out = rasterize_polygons(path, "cls", TABLE, GRID)
    expected = np.where(centres_inside(POLY_A), 1, IGNORE)
    assert out.dtype == np.uint8 and out.shape == (GRID.height, GRID.width)
    assert np.count_nonzero(out == 1) > 20
    np.testing.assert_array_equal(out, expected)


def test_rasterize_all_touched_pixel_exact(tmp_path):
    path = write_vector(tmp_path / "l.gpkg", [POLY_A], [2])  # integer class values
    out = rasterize_polygons(path, "cls", TABLE, GRID, all_touched=True)
    expected = np.where(pixels_touched(POLY_A), 2, IGNORE)
    np.testing.assert_array_equal(out, expected)
    assert np.count_nonzero(out == 2) > np.count_nonzero(centres_inside(POLY_A))


def test_overlap_smallest_area_wins_whatever_the_order(tmp_path):
    big = box(500005.5, 4999805.5, 500225.5, 4999995.5)
    small = POLY_B
    assert big.area > small.area and big.contains(small)
    for k, (geoms, names) in enumerate((([small, big], ["urban", "water"]),
                                        ([big, small], ["water", "urban"]))):
        out = rasterize_polygons(write_vector(tmp_path / f"o{k}.geojson", geoms, names), "cls", TABLE, GRID)
        expected = np.full((GRID.height, GRID.width), IGNORE, dtype=np.uint8)
        expected[centres_inside(big)] = 0
        expected[centres_inside(small)] = 2
        np.testing.assert_array_equal(out, expected)


def test_overlap_equal_area_later_feature_wins(tmp_path):
    sq = box(500020.5, 4999900.5, 500080.5, 4999960.5)
    out = rasterize_polygons(write_vector(tmp_path / "e.geojson", [sq, sq], ["water", "forest"]), "cls",
                             TABLE, GRID)
    assert set(np.unique(out[centres_inside(sq)]).tolist()) == {1}


def test_rasterize_reprojects_lonlat_polygons(tmp_path):
    to_ll = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
    ll = shapely.transform(POLY_A, lambda xy: np.column_stack(to_ll.transform(xy[:, 0], xy[:, 1])))
    assert 14 < ll.centroid.x < 16 and 44 < ll.centroid.y < 46  # lon/lat, not swapped
    path = write_vector(tmp_path / "ll.geojson", [ll], ["water"], crs="EPSG:4326")
    out = rasterize_polygons(path, "cls", TABLE, GRID)
    back = Transformer.from_crs("EPSG:4326", UTM, always_xy=True)
    expected_geom = shapely.transform(ll, lambda xy: np.column_stack(back.transform(xy[:, 0], xy[:, 1])))
    np.testing.assert_array_equal(out, np.where(centres_inside(expected_geom), 0, IGNORE))
    np.testing.assert_array_equal(out == 0, centres_inside(POLY_A))


def test_rasterize_layer_choice(tmp_path):
    path = write_vector(tmp_path / "m.gpkg", [POLY_A], ["water"], layer="one")
    write_vector(path, [POLY_B], ["urban"], layer="two")
    with pytest.raises(LabelError, match="2 layers"):
        rasterize_polygons(path, "cls", TABLE, GRID)
    out = rasterize_polygons(path, "cls", TABLE, GRID, layer="two")
    np.testing.assert_array_equal(out, np.where(centres_inside(POLY_B), 2, IGNORE))
    with pytest.raises(LabelError, match="no layer 'three'"):
        rasterize_polygons(path, "cls", TABLE, GRID, layer="three")


@pytest.mark.filterwarnings("ignore:'crs' was not provided")
def test_rasterize_errors(tmp_path):
    good = write_vector(tmp_path / "g.geojson", [POLY_A], ["water"])
    with pytest.raises(SourceError, match="not found"):
        rasterize_polygons(tmp_path / "missing.geojson", "cls", TABLE, GRID)
    with pytest.raises(SourceError, match="GeoJSON or GeoPackage"):
        rasterize_polygons(tmp_path / "x.shp", "cls", TABLE, GRID)
    with pytest.raises(SourceError, match="exceeds the label file limit"):
        rasterize_polygons(good, "cls", TABLE, GRID, max_bytes=10)
    fake = tmp_path / "fake.gpkg"
    fake.write_bytes(good.read_bytes())
    with pytest.raises(SourceError, match="does not match the suffix"):
        rasterize_polygons(fake, "cls", TABLE, GRID)
    broken = tmp_path / "broken.geojson"
    broken.write_text('{"type": "FeatureCollection", "features": [')
    with pytest.raises(SourceError, match="broken.geojson: cannot be read"):
        rasterize_polygons(broken, "cls", TABLE, GRID)
    with pytest.raises(LabelError, match=r"g\.geojson: no attribute 'klass'; attributes are \['cls'\]"):
        rasterize_polygons(good, "klass", TABLE, GRID)
    bad = write_vector(tmp_path / "u.geojson", [POLY_A, POLY_B], ["water", "grass"])
    with pytest.raises(LabelError, match=r"u\.geojson: feature 1, attribute 'cls': unknown class 'grass'"):
        rasterize_polygons(bad, "cls", TABLE, GRID)
    bad = write_vector(tmp_path / "v.gpkg", [POLY_A], [9])
    with pytest.raises(LabelError, match="unknown class value 9"):
        rasterize_polygons(bad, "cls", TABLE, GRID)
    line = write_vector(tmp_path / "line.geojson",
                        [POLY_A, LineString([(500001, 4999999), (500100, 4999900)])], ["water", "water"])
    with pytest.raises(LabelError, match="feature 1.*LineString"):
        rasterize_polygons(line, "cls", TABLE, GRID)
    bowtie = Polygon([(500010.5, 4999990.5), (500100.5, 4999900.5), (500100.5, 4999990.5),
                      (500010.5, 4999900.5)])
    inv = write_vector(tmp_path / "inv.geojson", [bowtie], ["water"])
    with pytest.raises(LabelError, match="invalid polygon.*Self-intersection"):
        rasterize_polygons(inv, "cls", TABLE, GRID)
    nocrs = write_vector(tmp_path / "nocrs.gpkg", [POLY_A], ["water"], crs=None)
    with pytest.raises(LabelError, match="nocrs.gpkg: has no CRS"):
        rasterize_polygons(nocrs, "cls", TABLE, GRID)
    far = write_vector(tmp_path / "far.geojson", [shapely.affinity.translate(POLY_A, 10_000, 0)], ["water"])
    with pytest.raises(LabelError, match="far.geojson: no polygon overlaps the grid"):
        rasterize_polygons(far, "cls", TABLE, GRID)
    tiny = write_vector(tmp_path / "tiny.geojson", [box(500001, 4999991, 500002, 4999992)], ["water"])
    with pytest.raises(LabelError, match="no pixel centre"):
        rasterize_polygons(tiny, "cls", TABLE, GRID)
    out = rasterize_polygons(tiny, "cls", TABLE, GRID, all_touched=True)
    assert out[0, 0] == 0 and np.count_nonzero(out != IGNORE) == 1
    nulls = write_vector(tmp_path / "null.geojson", [POLY_A, POLY_B], ["water", None])
    with pytest.raises(LabelError, match="feature 1.*no value for attribute 'cls'"):
        rasterize_polygons(nulls, "cls", TABLE, GRID)


# --------------------------------------------------------------------------------------------- label rasters


def test_label_raster_same_grid_with_nodata(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 3, size=(GRID.height, GRID.width)).astype(np.uint8)
    raw[:3] = 9  # nodata rows
    path = write_raster(tmp_path / "lab.tif", raw, nodata=9)
    labels, rec = read_label_raster(path, GRID, table=TABLE)
    np.testing.assert_array_equal(labels, np.where(raw == 9, IGNORE, raw))
    assert rec["ignored"] == 3 * GRID.width
    assert rec["counts"] == {n: int(np.count_nonzero(raw == v))
                             for n, v in zip(TABLE.names, TABLE.values, strict=True)}
    assert rec["sha256"] == sha256_file(path) and rec["reprojected"] is None
    assert json.loads(json.dumps(rec)) == rec
    with pytest.raises(LabelError, match=r"raw values \[9\] are not in the mapping"):
        read_label_raster(path, GRID, mapping={0: 0, 1: 1, 2: 2}, nodata_as_ignore=False)


def test_label_raster_sparse_taizhou_style_mapping(tmp_path):
    raw = np.zeros((GRID.height, GRID.width), dtype=np.uint8)
    raw[2:5, 3:9] = 1
    raw[10:12, 1:4] = 2
    path = write_raster(tmp_path / "tz.tif", raw)
    labels, rec = read_label_raster(path, GRID, mapping={0: IGNORE, 1: 0, 2: 1})
    assert rec["counts"] == {"0": 18, "1": 6} and rec["ignored"] == raw.size - 24
    np.testing.assert_array_equal(labels, np.select([raw == 1, raw == 2], [0, 1], IGNORE))
    with pytest.raises(LabelError, match=r"raw values \[2\] are not in the mapping"):
        read_label_raster(path, GRID, mapping={0: IGNORE, 1: 0})
    with pytest.raises(ConfigError, match="targets"):
        read_label_raster(path, GRID, mapping={0: 256, 1: 0, 2: 1})
    with pytest.raises(LabelError, match=r"values \[3\] are not classes"):
        read_label_raster(path, GRID, mapping={0: IGNORE, 1: 0, 2: 3}, table=TABLE)


def test_label_raster_signed_sen1floods11_style(tmp_path):
    raw = np.array([[-1, 0, 1], [1, 1, -1]], dtype=np.int16)
    g = Grid(2, 3, GRID.transform, UTM)
    path = write_raster(tmp_path / "s1.tif", raw, grid=g)
    labels, _ = read_label_raster(path, g, mapping={-1: IGNORE, 0: 0, 1: 1})
    np.testing.assert_array_equal(labels, [[IGNORE, 0, 1], [1, 1, IGNORE]])
    with pytest.raises(LabelError, match=r"raw values \[-1\] are outside 0..255"):
        read_label_raster(path, g)


def test_label_raster_grid_mismatch_and_reprojection(tmp_path):
    # the same labels at 20 m on a grid shifted by one 20 m pixel: a coarser, offset raster
    coarse = Grid(12, 14, Affine(20.0, 0.0, 499980.0, 0.0, -20.0, 5000020.0), UTM)
    raw = (np.arange(12 * 14).reshape(12, 14) % 3).astype(np.uint8)
    path = write_raster(tmp_path / "c.tif", raw, grid=coarse)
    with pytest.raises(CRSMismatchError, match="reproject=True"):
        read_label_raster(path, GRID)
    labels, rec = read_label_raster(path, GRID, reproject=True)
    # independent nearest neighbour: the coarse pixel holding each fine pixel centre
    xs, ys = GRID.pixel_centres(GRID.box)
    cols = np.floor((xs - 499980.0) / 20.0).astype(int)
    rows = np.floor((5000020.0 - ys) / 20.0).astype(int)
    np.testing.assert_array_equal(labels, raw[np.ix_(rows, cols)])
    assert rec["reprojected"]["resampling"] == "nearest"
    assert rec["reprojected"]["from_shape"] == [12, 14]
    # a raster covering only part of the grid: the rest is IGNORE
    part = Grid(5, 5, GRID.transform, UTM)
    path = write_raster(tmp_path / "p.tif", np.ones((5, 5), np.uint8), grid=part)
    labels, rec = read_label_raster(path, GRID, reproject=True)
    assert np.all(labels[:5, :5] == 1) and np.count_nonzero(labels == 1) == 25
    assert rec["ignored"] == GRID.height * GRID.width - 25


def test_label_raster_source_checks(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        read_label_raster(tmp_path / "none.tif", GRID)
    p = write_raster(tmp_path / "a.tif", np.zeros((GRID.height, GRID.width), np.uint8))
    with pytest.raises(SourceError, match="outside the allowed roots"):
        read_label_raster(p, GRID, sources=SourceConfig(allowed_roots=[tmp_path / "elsewhere"]))
    f = write_raster(tmp_path / "f.tif", np.zeros((GRID.height, GRID.width), np.float32))
    with pytest.raises(LabelError, match="integer classes"):
        read_label_raster(f, GRID)


def test_real_taizhou_reference():
    with rasterio.open(TAIZHOU) as src:
        raw = src.read(1)
        grid = Grid(src.height, src.width, src.transform, f"EPSG:{src.crs.to_epsg()}")
    labels, rec = read_label_raster(TAIZHOU, grid, mapping={0: IGNORE, 1: 0, 2: 1})
    assert rec["counts"] == {"0": int(np.count_nonzero(raw == 1)), "1": int(np.count_nonzero(raw == 2))}
    assert rec["ignored"] == int(np.count_nonzero(raw == 0))
    cd = ClassTable.from_mapping({"unchanged": 0, "changed": 1})
    st = label_stats(labels, cd)
    assert st["counts"]["changed"] == np.count_nonzero(raw == 2) > 0


# --------------------------------------------------------------------------------------------- stats


def test_label_stats_inverse_frequency():
    labels = np.full((10, 10), IGNORE, dtype=np.uint8)
    labels.flat[:60] = 0
    labels.flat[60:90] = 1  # class 2 (urban) absent
    st = label_stats(labels, TABLE)
    assert st["counts"] == {"water": 60, "forest": 30, "urban": 0}
    assert st["ignored"] == 10 and st["labelled"] == 90 and st["absent"] == ["urban"]
    w = st["weights"]
    assert w["forest"] / w["water"] == pytest.approx(2.0)
    assert 60 * w["water"] + 30 * w["forest"] == pytest.approx(90)
    assert w["urban"] == 0.0 and st["weight_vector"] == [w["water"], w["forest"], 0.0]
    labels[0, 0] = 7
    with pytest.raises(LabelError, match=r"values \[7\]"):
        label_stats(labels, TABLE)


# --------------------------------------------------------------------------------------------- split


def _chebyshev_min(a, b) -> int:
    return min(max(abs(r1 - r2), abs(c1 - c2)) for (r1, c1), (r2, c2) in itertools.product(a, b))


@pytest.mark.parametrize(("block", "buffer", "seed"), [(2, 1, 0), (3, 1, 5), (4, 2, 1), (1, 1, 3)])
def test_spatial_split_no_touch_brute_force(block, buffer, seed):
    tiles = [(r, c) for r in range(16) for c in range(13)]
    train, val, dropped = spatial_split(tiles, 0.2, block=block, buffer=buffer, seed=seed)
    assert sorted(train + val + dropped) == sorted(tiles)
    assert not (set(train) & set(val)) and not (set(train) & set(dropped)) and not (set(val) & set(dropped))
    assert _chebyshev_min(train, val) > buffer  # no training tile within `buffer` of a validation tile
    assert len(val) >= 0.2 * len(tiles)
    # val is made of whole blocks
    blocks = {(r // block, c // block) for r, c in val}
    assert set(val) == {t for t in tiles if (t[0] // block, t[1] // block) in blocks}
    # nothing dropped needlessly: each dropped tile is within `buffer` of a validation tile
    assert all(_chebyshev_min([d], val) <= buffer for d in dropped)


def test_spatial_split_deterministic_and_seeded():
    tiles = [(r, c) for r in range(12) for c in range(12)]
    a = spatial_split(tiles, 0.25, block=3, seed=7)
    assert a == spatial_split(list(reversed(tiles)), 0.25, block=3, seed=7)
    assert any(spatial_split(tiles, 0.25, block=3, seed=s)[1] != a[1] for s in range(1, 6))


def test_spatial_split_tilegrid_and_overlap():
    tg = TileGrid.cover(PixelBox(0, 0, 640, 512), PixelBox(0, 0, 640, 512), size=64, overlap=16, patch=16)
    train, val, dropped = spatial_split(tg, 0.2, block=2)
    assert len(train) + len(val) + len(dropped) == len(tg)
    by_rc = {(t.grid_row, t.grid_col): t.box for t in tg}
    # pixel-disjoint: no training tile shares a pixel with a validation tile
    assert all(by_rc[t].intersection(by_rc[v]) is None for t in train for v in val)
    assert spatial_split(list(tg), 0.2, block=2) == (train, val, dropped)
    heavy = TileGrid.cover(PixelBox(0, 0, 640, 512), PixelBox(0, 0, 640, 512), size=64, overlap=48, patch=16)
    with pytest.raises(ConfigError, match="buffer >= 3"):
        spatial_split(heavy, 0.2, block=2, buffer=1)
    train, val, _ = spatial_split(heavy, 0.2, block=2, buffer=3)
    by_rc = {(t.grid_row, t.grid_col): t.box for t in heavy}
    assert all(by_rc[t].intersection(by_rc[v]) is None for t in train for v in val)


def test_spatial_split_errors():
    tiles = [(r, c) for r in range(4) for c in range(4)]
    with pytest.raises(ConfigError, match="no training tile"):
        spatial_split(tiles, 0.5, block=4)
    with pytest.raises(ConfigError, match="no training tile"):
        spatial_split([(0, 0), (0, 1)], 0.4, block=1)
    for frac in (0, 1, -0.1, 1.5):
        with pytest.raises(ConfigError, match="val_fraction"):
            spatial_split(tiles, frac)
    with pytest.raises(ConfigError, match="block"):
        spatial_split(tiles, 0.2, block=0)
    with pytest.raises(ConfigError, match="buffer"):
        spatial_split(tiles, 0.2, buffer=-1)
    with pytest.raises(ConfigError, match="duplicates"):
        spatial_split([(0, 0), (0, 0), (5, 5)], 0.2)
    with pytest.raises(ConfigError, match="no tiles"):
        spatial_split([], 0.2)
    with pytest.raises(ConfigError, match="not a \\(row, col\\)"):
        spatial_split([(0, 0, 1)], 0.2)
