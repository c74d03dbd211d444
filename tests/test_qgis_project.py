"""run.qgs: one QGIS project per run, checked as XML without QGIS, then opened and rendered in real QGIS."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import rasterio

from geo_dino.config import parse_config
from geo_dino.errors import OutputError
from geo_dino.outputs import qgis_project as qp
from geo_dino.outputs.styles import layer_style_qml, write_layer_style
from geo_dino.run import stages as pl
from geo_dino.run.folder import load_plan
from tests.conftest import PUCALLPA, ROOT

QGIS_PY = "/usr/bin/python3"
SCENE = "aoi/bahamas_scene.geojson"  # the demo's AOI: the screen masks two sites near Nassau


def _have_qgis() -> bool:
    try:
        return subprocess.run([QGIS_PY, "-c", "import qgis.core"], capture_output=True, timeout=60,
                              check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _bahamas(tiny_config) -> Path:
    return pl.run_local(parse_config(tiny_config(SCENE)))


def _pucallpa(tiny_config) -> Path:
    cfg = tiny_config("aoi/pucallpa.geojson", PUCALLPA, sources={"bands": [1, 2, 3]})
    return pl.run_local(parse_config(cfg))


def _layers(project: Path) -> dict[str, ET.Element]:
    return {m.findtext("layername"): m for m in ET.parse(project).getroot().iter("maplayer")}


def _groups(project: Path) -> dict[str, list[str]]:
    tree = ET.parse(project).getroot().find("layer-tree-group")
    return {g.get("name"): [n.get("name") for n in g.iter("layer-tree-layer")]
            for g in tree.findall("layer-tree-group")}


def _write(path: Path, like: Path, data: np.ndarray, dtype: str, nodata: float,
           colormap: dict | None = None) -> None:
    with rasterio.open(like) as src:
        profile = src.profile | {"driver": "GTiff", "count": data.shape[0], "dtype": dtype, "nodata": nodata}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data.astype(dtype))
        if colormap:
            dst.write_colormap(1, colormap)


def _add_future_outputs(run_dir: Path, seg_classes: bool = True) -> None:
    """Outputs other stages will write (made here from the run's own): the project must find them by name."""
    import geopandas as gpd
    from rasterio.features import shapes
    from shapely.geometry import shape

    like = run_dir / "change_magnitude.tif"
    with rasterio.open(like) as src:
        mag, transform, crs = src.read(1), src.transform, src.crs
    ok = np.isfinite(mag)
    prob = np.where(ok, np.clip(mag / max(np.nanmax(mag), 1e-6), 0, 1), np.nan)[None]
    binary = np.where(ok, prob[0] > 0.5, 255)[None]
    _write(run_dir / "change_probability.tif", like, prob, "float32", float("nan"))
    _write(run_dir / "similarity.tif", like, 1 - prob, "float32", float("nan"))
    two_classes = np.concatenate([prob, 1 - prob])
    _write(run_dir / "seg_probability_t2.tif", like, two_classes, "float32", float("nan"))
    _write(run_dir / "change_binary.tif", run_dir / "change_mask.tif", binary, "uint8", 255,
           {0: (200, 200, 200, 255), 1: (250, 0, 250, 255)})
    if seg_classes:
        with rasterio.open(run_dir / "classes_t2.tif") as src:
            _write(run_dir / "seg_classes_t2.tif", run_dir / "classes_t2.tif", src.read(), "uint8", 255,
                   src.colormap(1))
    polys = [shape(g) for g, v in shapes(binary[0].astype("uint8"), mask=binary[0] == 1, transform=transform)]
    gpd.GeoDataFrame({"class_value": [1] * len(polys)}, geometry=polys, crs=crs).to_file(
        run_dir / "vectors.gpkg", layer="change_polygons", driver="GPKG", engine="pyogrio")
    qml = layer_style_qml([(1, "changed", (250, 0, 250))])
    write_layer_style(run_dir / "vectors.gpkg", "change_polygons", qml)
    (run_dir / "features.zarr").mkdir()  # a feature cube, not a map layer
    (run_dir / "stac_item.json").write_text("{}")


# ------------------------------------------------------------------------------------- without QGIS
def test_project_xml_relative_grouped_and_styled(tiny_config):
    one_date = {"Screening", "Vectors", "Classes", "Features", "Inputs"}
    hit_runs: list[Path] = []
    runs = ((_bahamas(tiny_config), one_date), (_pucallpa(tiny_config), one_date | {"Change"}))
    for run_dir, groups in runs:
        project = qp.write_project(run_dir)
        assert project == run_dir / "run.qgs"
        root = ET.parse(project).getroot()  # well-formed
        assert root.tag == "qgis" and root.get("version").startswith("3.22")
        assert root.findtext("properties/Paths/Absolute") == "false"
        assert list(_groups(project)) == [g for g in qp.GROUPS if g in groups]
        layers = _layers(project)
        record = json.loads((run_dir / "provenance.json").read_text())
        inputs = _groups(project)["Inputs"]
        for name, m in layers.items():
            src = m.findtext("datasource")
            if name in inputs:  # the inputs stay where they are: absolute paths to what the run read
                continue
            assert src.startswith("./"), src
            path = (run_dir / src[2:].split("|")[0]).resolve()
            assert path.is_file() and path.is_relative_to(run_dir.resolve()), src
        # every input raster, by its recorded absolute path, hidden at first, the run's bands as RGB
        assert [layers[n].findtext("datasource") for n in inputs] == [i["path"] for i in record["inputs"]]
        tree = {n.get("name"): n.get("checked") for n in root.iter("layer-tree-layer")}
        shown = {n for n, c in tree.items() if c == "Qt::Checked"}
        # only the most useful output on: the classes (one date); the label-free change over the newest
        # input (two dates); with the screening context
        assert shown - set(_groups(project)["Screening"]) == (
            {"classes"} if run_dir == runs[0][0] else {"change_mask", inputs[-1]})
        for n, inp in zip(inputs, record["inputs"], strict=True):
            renderer = layers[n].find("pipe/rasterrenderer")
            assert renderer.get("type") == "multibandcolor"
            assert [int(renderer.get(f"{c}Band")) for c in ("red", "green", "blue")] == inp["bands"][:3]
            lo, hi = (float(renderer.findtext(f"redContrastEnhancement/{k}"))
                      for k in ("minValue", "maxValue"))
            assert 0 <= lo < hi <= 255  # a 2-98 % stretch of uint8 data
        sources = {m.findtext("datasource") for m in layers.values()}
        assert {f"./{o['path']}" for o in record["outputs"]} <= sources
        assert {"tiles", "aoi", "masked_sites"} <= set(layers)
        with rasterio.open(run_dir / record["outputs"][0]["path"]) as ds:
            crs, bounds = ds.crs, ds.bounds
        assert root.findtext("projectCrs/spatialrefsys/authid") == crs.to_string()
        canvas = [float(root.findtext(f"mapcanvas/extent/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
        assert canvas == list(bounds)
        for name, m in layers.items():
            assert m.findtext("srs/spatialrefsys/authid") == crs.to_string(), name
            renderer = m.find("pipe/rasterrenderer")
            if name.startswith("classes"):  # the .qml's palette, embedded
                with rasterio.open(run_dir / f"{name}.tif") as ds:
                    cmap = ds.colormap(1)
                entries = {int(e.get("value")): e.get("color") for e in renderer.iter("paletteEntry")}
                assert entries == {v: "#{:02x}{:02x}{:02x}".format(*cmap[v][:3]) for v in entries}
                assert len(entries) == 4
            if name.startswith("pca_rgb"):
                assert renderer.get("type") == "multibandcolor"
            if name == "change_magnitude":
                assert renderer.get("type") == "singlebandpseudocolor"
            if name == "change_mask":  # in the project, unchanged (0) is transparent: it overlays classes
                entries = {(p.get("min"), p.get("percentTransparent"))
                           for p in renderer.iter("pixelListEntry")}
                assert entries == {("255", "100"), ("0", "100")}
        # the screening context: in the outputs' CRS, styles stored in layer_styles as well
        import pyogrio

        screening = json.loads((run_dir / "screening.json").read_text())
        assert pyogrio.read_info(run_dir / "context.gpkg", layer="masked_sites")["features"] \
            == len(screening["mask_4326"]["features"])
        context_crs = pyogrio.read_info(run_dir / "context.gpkg", layer="aoi")["crs"]
        assert rasterio.crs.CRS.from_user_input(context_crs) == crs
        with sqlite3.connect(run_dir / "context.gpkg") as db:
            styles = dict(db.execute("SELECT f_table_name, styleQML FROM layer_styles WHERE useAsDefault"))
        # every site hit (whatever its action) as itself: points here (airport, port), markers in the project
        points = [f for f in screening["sites_4326"]["features"] if f["geometry"]["type"] == "Point"]
        hit_layers = {"sites_hit"} if points else set()
        assert set(styles) == {"aoi", "masked_sites"} | hit_layers and "b_diagonal" in styles["masked_sites"]
        if points:
            hit_runs.append(run_dir)
            info = pyogrio.read_info(run_dir / "context.gpkg", layer="sites_hit")
            assert info["features"] == len(points) == len(screening["hits"])
            assert rasterio.crs.CRS.from_user_input(info["crs"]) == crs
            assert layers["sites_hit"].find("renderer-v2/symbols/symbol").get("type") == "marker"
            assert "sites_hit" in _groups(project)["Screening"]
        else:
            assert "sites_hit" not in layers
        masked = ET.tostring(layers["masked_sites"].find("renderer-v2"), encoding="unicode")
        assert masked.count('class="SimpleFill"') == 2 and "b_diagonal" in masked
    assert len(screening["mask_4326"]["features"]) == 0
    assert qp.write_project(run_dir).read_bytes() == project.read_bytes()  # deterministic
    assert hit_runs == [runs[0][0]]  # the Bahamas scene hits Nassau's airport and port


def test_project_finds_outputs_by_name(tiny_config):
    run_dir = _pucallpa(tiny_config)
    _add_future_outputs(run_dir)
    project = qp.write_project(run_dir)
    groups = _groups(project)
    assert list(groups) == ["Screening", "Search", "Head", "Vectors", "Change", "Classes", "Features",
                            "Inputs"]  # a trained head's answer above the label-free outputs
    assert groups["Search"] == ["similarity"]
    assert groups["Head"] == ["change_binary", "change_probability", "seg_classes_t2", "seg_probability_t2"]
    assert groups["Features"] == ["pca_rgb_t1", "pca_rgb_t2"]
    assert groups["Classes"] == ["classes_t1", "classes_t2"]
    assert groups["Change"] == ["change_features", "change_magnitude", "change_mask", "change_spectral"]
    assert groups["Vectors"] == ["tiles", "change_polygons"]
    layers = _layers(project)
    kinds = {n: m.find("pipe/rasterrenderer").get("type") for n, m in layers.items()
             if m.get("type") == "raster"}
    assert kinds["seg_classes_t2"] == kinds["change_binary"] == "paletted"  # from the colour tables
    assert kinds["similarity"] == kinds["change_probability"] == "singlebandpseudocolor"
    # the categorized style other stages store in the GeoPackage's layer_styles table
    assert layers["change_polygons"].find("renderer-v2").get("type") == "categorizedSymbol"
    checked = {n.get("name") for n in ET.parse(project).getroot().iter("layer-tree-layer")
               if n.get("checked") == "Qt::Checked"}
    assert checked == {"aoi", "masked_sites", "similarity"}  # the search the user asked for, alone
    (run_dir / "similarity.tif").unlink()
    tree = ET.parse(qp.write_project(run_dir)).getroot().iter("layer-tree-layer")
    # then the head's change over the newest input image
    assert {n.get("name") for n in tree if n.get("checked") == "Qt::Checked"} == {
        "aoi", "masked_sites", "change_binary", groups["Inputs"][-1]}


def _layer(name: str, group: str, provider: str = "gdal") -> qp.MapLayer:
    return qp.MapLayer(name, f"./{name}", provider, group, None, (0, 0, 1, 1), [])


@pytest.mark.parametrize(("names", "shown"), [
    (["pca_rgb", "classes", "similarity", "change_binary", "change_mask"], {"similarity", "matches"}),
    (["pca_rgb_t1", "pca_rgb_t2", "classes_t1", "classes_t2", "seg_classes_t1", "seg_classes_t2"],
     {"seg_classes_t2"}),
    (["classes_t1", "classes_t2", "change_mask", "change_binary", "input_t1_a", "input_t2_b"],
     {"change_binary", "input_t2_b"}),
    (["classes_t1", "classes_t2", "change_mask"], {"change_mask", "classes_t2"}),  # no input here
    (["classes", "pca_rgb", "input_a"], {"classes"}),
    (["pca_rgb_t1", "pca_rgb_t2"], {"pca_rgb_t2"}),
])
def test_only_the_most_useful_output_is_on(names, shown) -> None:
    groups = {"similarity": "Search", "change_binary": "Head", "change_mask": "Change", "pca_rgb": "Features"}
    layers = [_layer(n, "Inputs" if n.startswith("input") else "Head" if n.startswith("seg_") else
                     next((g for k, g in groups.items() if n.startswith(k)), "Classes")) for n in names]
    layers += [_layer("aoi", "Screening", "ogr"), _layer("tiles", "Vectors", "ogr"),
               _layer("change_polygons", "Vectors", "ogr")]
    if "similarity" in names:
        layers.append(_layer("matches", "Search", "ogr"))
    on = {lay.name for lay in qp.default_visibility(layers) if lay.visible}
    assert on == shown | {"aoi"}


def test_change_colours_stand_apart_from_every_class_colour() -> None:
    """The head's "changed" and the label-free "changed" are far from each other and from every k-means
    colour (up to 64 classes), so a change over the classes is never lost in them."""
    from geo_dino.inputs.labels import (
        CHANGED_HEAD,
        CHANGED_LABEL_FREE,
        MIN_COLOUR_DISTANCE,
        class_colormap,
        colour_distance,
    )

    assert colour_distance(CHANGED_HEAD, CHANGED_LABEL_FREE) >= MIN_COLOUR_DISTANCE
    for k in (1, 6, 8, 12, 13, 20, 64):
        for c in class_colormap(k).values():
            assert colour_distance(c, CHANGED_HEAD) >= MIN_COLOUR_DISTANCE, (k, c)
            assert colour_distance(c, CHANGED_LABEL_FREE) >= MIN_COLOUR_DISTANCE, (k, c)
        assert len(set(class_colormap(k).values())) == k


def test_project_stays_inside_the_run_folder(tiny_config, tmp_path):
    run_dir = _pucallpa(tiny_config)
    with pytest.raises(OutputError):
        qp.write_project(run_dir, name="../escape.qgs")
    with pytest.raises(OutputError):
        qp.write_project(run_dir, name=str(tmp_path / "abs.qgs"))
    outside = tmp_path / "outside.qgs"
    outside.write_text("keep")
    (run_dir / "run.qgs").unlink()  # the run wrote its project; put a link in its place
    (run_dir / "context.gpkg").unlink()
    (run_dir / "run.qgs").symlink_to(outside)
    with pytest.raises(OutputError):
        qp.write_project(run_dir)
    (run_dir / "run.qgs").unlink()
    (run_dir / "context.gpkg").symlink_to(outside)
    with pytest.raises(OutputError):
        qp.write_project(run_dir)
    assert outside.read_text() == "keep" and not (run_dir / "run.qgs").exists()
    (run_dir / "context.gpkg").unlink()
    (run_dir / "stray.tif").symlink_to(run_dir / "classes_t1.tif")  # a layer through a link is refused too
    with pytest.raises(OutputError, match="symlink"):
        qp.write_project(run_dir)


# ---------------------------------------------------------------------------------------- real QGIS
def _render(run_dir: Path, png: Path, xdg: Path) -> dict:
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", XDG_RUNTIME_DIR=str(xdg))
    env.pop("PYTHONPATH", None)
    res = subprocess.run([QGIS_PY, str(ROOT / "tests/qgis_render.py"), str(run_dir), str(png)],
                         capture_output=True, text=True, env=env, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _have_qgis() and not os.environ.get("CI"),
                    reason="QGIS (python3-qgis) not installed; .ci/run and `make test` install it")
@pytest.mark.slow
def test_project_opens_and_renders_in_qgis(tiny_config, tmp_path):
    from PIL import Image

    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    bahamas = _bahamas(tiny_config)
    qp.write_project(bahamas)
    moved = tmp_path / "moved" / "pucallpa-run"  # written in one place, opened from another
    moved.parent.mkdir()
    pucallpa = _pucallpa(tiny_config)
    _add_future_outputs(pucallpa, seg_classes=False)
    (pucallpa / "similarity.tif").unlink()  # the head's change is then the layer shown
    qp.write_project(pucallpa)
    shutil.move(pucallpa, moved)
    for run_dir, class_raster in ((bahamas, "classes"), (moved, "change_binary")):
        out = _render(run_dir, tmp_path / f"{run_dir.name}.png", xdg)
        layers = out["layers"]
        with rasterio.open(run_dir / f"{class_raster}.tif") as ds:
            authid = ds.crs.to_string()
        assert out["read"] and out["saved"] and not out["errors"] and out["project_crs"] == authid
        tifs = sorted(p.stem for p in run_dir.glob("*.tif"))
        groups = _groups(run_dir / "run.qgs")
        record = json.loads((run_dir / "provenance.json").read_text())
        assert len(groups["Inputs"]) == len(record["inputs"]) >= 1
        screening = json.loads((run_dir / "screening.json").read_text())
        hits = {"sites_hit"} if screening["sites_4326"]["features"] else set()
        assert set(layers) == set(tifs) | {"tiles", "aoi", "masked_sites"} | set(groups["Inputs"]) | hits | (
            {"change_polygons"} if run_dir == moved else set())
        for name, info in layers.items():
            assert info["valid"] and info["crs"] == authid, name  # the inputs too, after the folder moved
            assert name in groups[info["group"]]
            if info["group"] == "Inputs":
                assert info["renderer"] == "multibandcolor", name
                continue
            assert info["source"].startswith("./"), info["source"]
            if name in tifs:
                with rasterio.open(run_dir / f"{name}.tif") as ds:
                    bounds = ds.bounds
                assert all(abs(a - b) < 1e-9 for a, b in zip(info["extent"], bounds, strict=True)), name
                if name.startswith(("classes", "seg_classes", "change_mask", "change_binary")):
                    want: tuple[str, ...] = ("paletted",)
                elif name.startswith("pca_rgb"):
                    want = ("multibandcolor",)
                else:
                    want = ("singlebandpseudocolor", "singlebandgray")
                assert info["renderer"] in want, (name, info["renderer"])
        assert layers["tiles"]["features"] == load_plan(run_dir).tiling.n_tiles
        if hits:  # the sites hit, drawn as markers in the project and from the file's stored style alike
            assert layers["sites_hit"]["features"] == len(screening["sites_4326"]["features"])
            assert layers["sites_hit"]["stored_style"]["renderer"] == layers["sites_hit"]["renderer"]
        assert layers["aoi"]["features"] == 1 and layers["aoi"]["renderer"] == "singleSymbol"
        assert layers["masked_sites"]["features"] == len(screening["mask_4326"]["features"])
        # fill + hatch, in the project and in context.gpkg's layer_styles (what QGIS loads for the file alone)
        masked = layers["masked_sites"]
        assert masked["symbol_layers"] == masked["stored_style"]["symbol_layers"] == [2]
        if run_dir == moved:
            assert layers["change_polygons"]["renderer"] == "categorizedSymbol"
            assert layers["change_polygons"]["stored_style"]["renderer"] == "categorizedSymbol"
        # the image: not blank, and the colours of the one output shown are there (the head's change over
        # the newest input image, its unchanged pixels transparent)
        shown = [n for n in out["visible"] if n not in groups["Screening"]]
        assert shown == ([class_raster] if run_dir == bahamas else [class_raster, groups["Inputs"][-1]])
        img = np.asarray(Image.open(tmp_path / f"{run_dir.name}.png").convert("RGB"))
        assert img.shape[1] == 800
        flat = img.reshape(-1, 3)
        colours, counts = np.unique(flat, axis=0, return_counts=True)
        assert len(colours) >= 5
        assert (flat != 255).any(axis=1).mean() > 0.5
        with rasterio.open(run_dir / f"{class_raster}.tif") as ds:
            values, n = np.unique(ds.read(1), return_counts=True)
            cmap = ds.colormap(1)
        found = {tuple(c): k for c, k in zip(colours.tolist(), counts.tolist(), strict=True)}
        valid = n[values != 255].sum()
        drawn = [1] if run_dir == moved else values  # an overlay draws only its changed pixels
        share = {int(v): found.get(tuple(cmap[int(v)][:3]), 0) / len(flat)
                 for v, k in zip(values, n, strict=True) if v != 255 and v in drawn and k / valid > 0.01}
        assert share and all(s > 0.002 for s in share.values()), share
        if run_dir == moved:  # the input shows through the unchanged pixels: an image, not grey
            assert found.get(tuple(cmap[0][:3]), 0) / len(flat) < 0.01 and len(colours) > 1000
        else:
            assert sum(share.values()) > 0.3, share
