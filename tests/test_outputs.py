"""COG finalisation, verification, QGIS styles, tile index and output-path safety (synthetic, seeded data)."""

from __future__ import annotations

import hashlib
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rio_cogeo.cogeo import cog_validate

from geo_dino.errors import OutputError
from geo_dino.files import safe_output_path
from geo_dino.inputs.grid import Grid, PixelBox
from geo_dino.inputs.labels import class_colormap
from geo_dino.outputs.cog import (
    RasterSpec,
    create_intermediate,
    finalize_cog,
    verify_raster,
    write_tile_index,
)
from geo_dino.outputs.styles import write_qml_palette, write_qml_singleband

UTM = Grid(200, 300, Affine(30.0, 0.0, 600000.0, 0.0, -30.0, 2700000.0), "EPSG:32618")
GEO = Grid(200, 300, Affine(0.001, 0.0, -77.5, 0.0, -0.001, 25.1), "EPSG:4326")


def _fill(path: Path, spec: RasterSpec, seed: int = 0, block: int = 128) -> np.ndarray:
    """Write ``path`` window by window (leaving the last column of blocks unwritten); return the expected
    array."""
    rng = np.random.default_rng(seed)
    g = spec.grid
    expected = np.full((spec.count, g.height, g.width), spec.nodata if spec.nodata is not None else 0,
                       dtype=spec.dtype)
    with rasterio.open(path, "r+") as ds:
        for r in range(0, g.height, block):
            for c in range(0, g.width - block, block):
                box = PixelBox(r, c, block, block).intersection(g.box)
                arr = rng.integers(0, 5, (spec.count, box.height, box.width)).astype(spec.dtype)
                ds.write(arr, window=box.to_rasterio())
                expected[(slice(None), *box.slices())] = arr
    return expected


def _make_cog(tmp_path: Path, spec: RasterSpec, name: str = "out.tif") -> tuple[dict, np.ndarray, Path]:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    inter = run / f".{name}.intermediate.tif"
    create_intermediate(inter, spec)
    expected = _fill(inter, spec)
    rec = finalize_cog(inter, run / name, spec, run_dir=run)
    return rec, expected, run


@pytest.mark.parametrize(("grid", "dtype", "nodata"), [(UTM, "float32", math.nan), (GEO, "int16", -9999)])
def test_finalize_cog_keeps_grid_nodata_data_and_metadata(tmp_path: Path, grid: Grid, dtype: str,
                                                           nodata: float) -> None:
    spec = RasterSpec(grid, 2, dtype, nodata, ("change", "confidence"), tags={"GEO_DINO_RUN_ID": "r1"})
    rec, expected, run = _make_cog(tmp_path, spec)
    dst = run / "out.tif"
    valid, errors, _ = cog_validate(dst, quiet=True)
    assert valid and not errors
    with rasterio.open(dst) as src:
        assert src.crs.to_epsg() == int(grid.crs.split(":")[1])
        assert src.transform == grid.transform
        assert (src.width, src.height, src.count) == (grid.width, grid.height, 2)
        assert src.dtypes == (dtype, dtype)
        if math.isnan(nodata):
            assert math.isnan(src.nodata)
        else:
            assert src.nodata == nodata
        assert src.descriptions == ("change", "confidence")
        assert src.tags()["GEO_DINO_RUN_ID"] == "r1"
        np.testing.assert_array_equal(src.read(), expected)
    assert rec["path"] == "out.tif"
    assert rec["sha256"] == hashlib.sha256(dst.read_bytes()).hexdigest()
    assert rec["size_bytes"] == dst.stat().st_size
    assert rec["transform"] == list(tuple(grid.transform)[:6])
    assert rec["cog_valid"] is True and rec["overviews"] == []
    assert rec["nodata"] == ("nan" if math.isnan(nodata) else nodata)
    # No temporary or intermediate file is left behind.
    assert sorted(p.name for p in run.iterdir()) == ["out.tif"]


def test_categorical_cog_has_overviews_colour_table_and_qml(tmp_path: Path) -> None:
    grid = Grid(1024, 1024, Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4000000.0), "EPSG:32618")
    cmap = class_colormap(5)
    spec = RasterSpec(grid, 1, "uint8", 255, ("class",), categorical=True, colormap=cmap)
    rec, expected, run = _make_cog(tmp_path, spec, "classes.tif")
    dst = run / "classes.tif"
    valid, errors, _ = cog_validate(dst, quiet=True)
    assert valid and not errors
    with rasterio.open(dst) as src:
        assert src.overviews(1) == [2] and rec["overviews"] == [2]
        assert src.tags()["OVERVIEW_RESAMPLING"] == "MODE"
        for k, colour in cmap.items():
            assert src.colormap(1)[k] == colour
        np.testing.assert_array_equal(src.read(), expected)
        assert set(np.unique(src.read(1, out_shape=(512, 512)))) <= set(cmap) | {255}  # no invented classes
    root = ET.parse(run / "classes.qml").getroot()
    assert root.tag == "qgis"
    entries = root.findall("./pipe/rasterrenderer[@type='paletted']/colorPalette/paletteEntry")
    assert len(entries) == 5
    assert entries[3].get("color") == "#{:02x}{:02x}{:02x}".format(*cmap[3][:3])
    assert root.find(".//pixelListEntry").get("min") == "255"
    assert rec["qml"] == "classes.qml"
    assert sorted(p.name for p in run.iterdir()) == ["classes.qml", "classes.tif"]


def test_create_intermediate_is_tiled_and_reads_nodata(tmp_path: Path) -> None:
    spec = RasterSpec(UTM, 3, "float32", -1.0, ("a", "b", "c"), tags={"k": "v"})
    path = tmp_path / "i.tif"
    create_intermediate(path, spec)
    with rasterio.open(path) as src:
        assert src.profile["tiled"] and src.block_shapes[0] == (256, 256)
        assert src.descriptions == ("a", "b", "c") and src.tags()["k"] == "v"
        assert (src.read() == -1.0).all()
    verify_raster(path, spec)


@pytest.mark.parametrize("change", [
    {"nodata": 0.0},
    {"nodata": None},
    {"grid": Grid(200, 300, Affine(30.0, 0.0, 600000.5, 0.0, -30.0, 2700000.0), "EPSG:32618")},
    {"grid": Grid(200, 300, UTM.transform, "EPSG:32617")},
    {"grid": Grid(201, 300, UTM.transform, "EPSG:32618")},
    {"dtype": "float64"},
    {"band_descriptions": ("a", "x")},
    {"tags": {"GEO_DINO_RUN_ID": "other"}},
])
def test_verify_raster_detects_differences(tmp_path: Path, change: dict) -> None:
    spec = RasterSpec(UTM, 2, "float32", math.nan, ("a", "b"), tags={"GEO_DINO_RUN_ID": "r1"})
    path = tmp_path / "x.tif"
    create_intermediate(path, spec)
    verify_raster(path, spec)
    fields = {"grid": spec.grid, "count": spec.count, "dtype": spec.dtype, "nodata": spec.nodata,
              "band_descriptions": spec.band_descriptions, "tags": spec.tags, **change}
    with pytest.raises(OutputError):
        verify_raster(path, RasterSpec(**fields))


def test_finalize_refuses_outside_run_dir_and_symlinks(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    spec = RasterSpec(UTM, 1, "uint8", 0, ("v",))
    inter = run / "i.tif"
    create_intermediate(inter, spec)
    outside = tmp_path / "outside.tif"
    (run / "link.tif").symlink_to(outside)
    for dst in (outside, run / ".." / "escape.tif", run / "link.tif"):
        with pytest.raises(OutputError):
            finalize_cog(inter, dst, spec, run_dir=run)
    assert inter.exists() and not outside.exists() and not (tmp_path / "escape.tif").exists()


def test_failed_verification_leaves_no_temporary(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    spec = RasterSpec(UTM, 1, "uint8", 0, ("v",))
    inter = run / "i.tif"
    create_intermediate(inter, spec)
    wrong = RasterSpec(UTM, 1, "uint8", 7, ("v",))
    with pytest.raises(OutputError, match="nodata"):
        finalize_cog(inter, run / "o.tif", wrong, run_dir=run)
    assert sorted(p.name for p in run.iterdir()) == ["i.tif"]


def test_invalid_cog_is_removed_and_intermediate_kept(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import rio_cogeo.cogeo

    monkeypatch.setattr(rio_cogeo.cogeo, "cog_validate", lambda *a, **k: (False, ["broken layout"], []))
    run = tmp_path / "run"
    run.mkdir()
    spec = RasterSpec(UTM, 1, "uint8", 0, ("v",))
    inter = run / "i.tif"
    create_intermediate(inter, spec)
    with pytest.raises(OutputError, match="not valid"):
        finalize_cog(inter, run / "o.tif", spec, run_dir=run)
    assert sorted(p.name for p in run.iterdir()) == ["i.tif"]


def test_safe_output_path(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    assert safe_output_path(run, "sub/a.tif") == (run / "sub" / "a.tif").resolve()
    (run / "esc").symlink_to(tmp_path)
    for bad in ("../a.tif", "/etc/passwd", "sub/../../a.tif", "esc/a.tif", "", "."):
        with pytest.raises(OutputError):
            safe_output_path(run, bad)


def test_raster_spec_validation() -> None:
    with pytest.raises(OutputError):
        RasterSpec(UTM, 2, "float32", None, ("one",))
    with pytest.raises(OutputError):
        RasterSpec(UTM, 1, "float32", None, ("x",), colormap={0: (0, 0, 0, 255)})
    with pytest.raises(OutputError):
        RasterSpec(UTM, 1, "uint8", math.nan, ("x",))


def test_class_colormap_is_deterministic_and_distinct() -> None:
    for k in (1, 5, 12, 40):
        cmap = class_colormap(k)
        assert list(cmap) == list(range(k))
        assert len(set(cmap.values())) == k
        assert all(len(c) == 4 and all(0 <= v <= 255 for v in c) for c in cmap.values())
    assert class_colormap(40) == class_colormap(40)
    assert class_colormap(3) == {k: class_colormap(12)[k] for k in range(3)}  # prefix-stable
    with pytest.raises(OutputError):
        class_colormap(0)


def test_qml_palette_escapes_labels(tmp_path: Path) -> None:
    classes = [(0, 'water & "wet" <land>', (0, 0, 255, 255)), (1, "forest", (0, 128, 0, 200)),
               (255, "nodata", (0, 0, 0, 0))]
    path = write_qml_palette(tmp_path / "p.qml", classes, nodata=255)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>")
    root = ET.fromstring(text.split("\n", 1)[1])
    assert root.get("version", "").startswith("3.22")
    entries = root.findall(".//paletteEntry")
    assert [e.get("label") for e in entries] == ['water & "wet" <land>', "forest"]
    assert entries[1].get("alpha") == "200" and entries[1].get("color") == "#008000"
    assert not list(tmp_path.glob(".*"))


def test_qml_singleband(tmp_path: Path) -> None:
    path = write_qml_singleband(tmp_path / "s.qml", 1, 0.0, 2.5)
    root = ET.parse(path).getroot()
    renderer = root.find("./pipe/rasterrenderer")
    assert renderer.get("type") == "singlebandpseudocolor"
    items = renderer.findall(".//colorrampshader/item")
    assert len(items) == 5
    assert float(items[0].get("value")) == 0.0 and float(items[-1].get("value")) == 2.5
    with pytest.raises(OutputError):
        write_qml_singleband(tmp_path / "bad.qml", 1, 1.0, 1.0)


def test_write_tile_index(tmp_path: Path) -> None:
    import geopandas as gpd

    boxes = [(0, PixelBox(-16, -16, 224, 224)), (1, PixelBox(-16, 176, 224, 224)),
             (2, PixelBox(176, 0, 24, 50))]
    path = write_tile_index(tmp_path / "tiles.gpkg", "tiles", UTM, boxes,
                            extra={"status": ["ok", "ok", "skip"]})
    gdf = gpd.read_file(path, layer="tiles")
    assert gdf.crs.to_epsg() == 32618
    assert list(gdf["tile"]) == [0, 1, 2] and list(gdf["status"]) == ["ok", "ok", "skip"]
    assert list(gdf["row_off"]) == [-16, -16, 176] and list(gdf["size"]) == [224, 224, 24]
    for (_, box), geom in zip(boxes, gdf.geometry, strict=True):
        np.testing.assert_allclose(geom.bounds, UTM.bounds(box))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiles.gpkg"]
    with pytest.raises(OutputError):
        write_tile_index(tmp_path / "t2.gpkg", "tiles", UTM, boxes, extra={"status": ["ok"]})
