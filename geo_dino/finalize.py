"""The final pass: blended accumulator → masked, georeferenced output COGs with styles and tags.

Works block by block over the output grid (bounded memory). A pixel is written as nodata when the input is
nodata on any date, when it lies outside the AOI, inside a site the screening policy masks, or when no tile
covered it. Every output is verified (CRS, transform, nodata, dtype) after writing.
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from geo_dino.grid import Grid, PixelBox

BLOCK = 512
CLASS_NODATA = 255
HIST_BINS = 1000


def _blocks(grid: Grid, size: int = BLOCK):  # noqa: ANN202
    for r in range(0, grid.height, size):
        for c in range(0, grid.width, size):
            yield PixelBox(r, c, min(size, grid.height - r), min(size, grid.width - c))


def _geometry_mask(geoms: list, grid: Grid, box: PixelBox) -> np.ndarray:
    """True inside any of ``geoms`` (pixel centres), on ``box`` of ``grid``."""
    from rasterio.features import geometry_mask

    if not geoms:
        return np.zeros((box.height, box.width), bool)
    return geometry_mask(geoms, out_shape=(box.height, box.width), transform=grid.box_transform(box), invert=True)


def _screen_mask_geometries(run_dir: Path, crs: str) -> list:
    """The buffered sites the policy masks, in ``crs``."""
    from pyproj import Transformer
    from shapely.geometry import shape
    from shapely.ops import transform

    data = json.loads((run_dir / "screening.json").read_text())
    fc = data.get("mask_4326") or {}
    feats = fc.get("features", []) if isinstance(fc, dict) else []
    if not feats:
        return []
    tr = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    out = []
    for f in feats:
        g = shape(f.get("geometry", f))
        if not g.is_empty:
            out.append(transform(tr.transform, g))
    return out


def write_outputs(run_dir: Path) -> list[dict[str, Any]]:
    from shapely import wkt

    from geo_dino import pipeline as pl
    from geo_dino.heads import LabelFreeHeads, otsu_threshold
    from geo_dino.inference import Accumulator
    from geo_dino.outputs import (RasterSpec, class_colormap, create_intermediate, finalize_cog,
                                  write_qml_singleband)
    from geo_dino.provenance import geotiff_tags
    from geo_dino.sources import WindowReader

    cfg = pl.load_run_config(run_dir)
    state = pl._state(run_dir)
    heads = LabelFreeHeads.load(run_dir / "work" / "heads.npz")
    layout = pl._layout(state, heads)
    out_grid = pl._grid_from_dict(state["out_grid"])
    region = pl._box(state["region"])
    infos = pl._infos(state)
    n_dates = len(infos)
    aoi_geom = wkt.loads(state["aoi_crs_wkt"]) if state.get("aoi_crs_wkt") else None
    if aoi_geom is None:
        from geo_dino.aoi import load_aoi

        aoi_geom = load_aoi(cfg.aoi, cfg.aoi_options).to_crs(out_grid.crs)
    screen_geoms = _screen_mask_geometries(run_dir, out_grid.crs)
    record = json.loads((run_dir / pl.RECORD).read_text())
    tags = geotiff_tags(record)
    work = run_dir / "work"

    def sfx(d: int) -> str:
        return f"_t{d + 1}" if n_dates == 2 else ""

    specs: dict[str, RasterSpec] = {}
    for d in range(n_dates):
        if heads.n_pca:
            specs[f"pca_rgb{sfx(d)}"] = RasterSpec(out_grid, 3, "uint8", 0,
                                                   ("feature PCA 1", "feature PCA 2", "feature PCA 3"),
                                                   tags=tags | {"GEO_DINO_PRODUCT": "feature PCA (label-free)"})
        if heads.k:
            specs[f"classes{sfx(d)}"] = RasterSpec(out_grid, 1, "uint8", CLASS_NODATA, ("k-means class",),
                                                   categorical=True, colormap=class_colormap(heads.k),
                                                   tags=tags | {"GEO_DINO_PRODUCT": f"k-means k={heads.k} "
                                                                "on patch features (label-free)"})
    if layout.has_change:
        specs["change_magnitude"] = RasterSpec(out_grid, 1, "float32", float("nan"),
                                               ("cosine distance between dates' features",),
                                               tags=tags | {"GEO_DINO_PRODUCT": "feature change magnitude"})
        specs["change_mask"] = RasterSpec(out_grid, 1, "uint8", CLASS_NODATA, ("changed (1) / unchanged (0)",),
                                          categorical=True,
                                          colormap={0: (210, 210, 210, 255), 1: (220, 30, 30, 255)},
                                          tags=tags | {"GEO_DINO_PRODUCT": "thresholded feature change"})

    acc = Accumulator(work / "accumulator.tif", out_grid, layout.n_values)

    def block_values(readers: list, box: PixelBox) -> tuple[np.ndarray, np.ndarray]:
        vals, w = acc.read(box)
        ok = w > 0
        src_box = PixelBox(box.row_off + region.row_off, box.col_off + region.col_off, box.height, box.width)
        for r in readers:
            ok &= r.read_valid(src_box)
        ok &= _geometry_mask([aoi_geom], out_grid, box)
        if screen_geoms:
            ok &= ~_geometry_mask(screen_geoms, out_grid, box)
        return vals, ok

    threshold = None
    with ExitStack() as stack:
        readers = [stack.enter_context(WindowReader(i)) for i in infos]
        stack.enter_context(acc)
        if layout.has_change:
            thr = cfg.heads.change.threshold
            if thr == "otsu":
                edges = np.linspace(0.0, 2.0, HIST_BINS + 1)
                hist = np.zeros(HIST_BINS, np.int64)
                for box in _blocks(out_grid):
                    vals, ok = block_values(readers, box)
                    hist += np.histogram(vals[layout.change][ok], bins=edges)[0]
                threshold = otsu_threshold(hist, edges) if hist.sum() else 1.0
            else:
                threshold = float(thr)
        for name, spec in specs.items():
            create_intermediate(work / f"{name}.tif", spec)
        import rasterio

        dsts = {name: stack.enter_context(rasterio.open(work / f"{name}.tif", "r+")) for name in specs}
        lo = heads.pca_low
        span = None if heads.pca_high is None else np.maximum(heads.pca_high - heads.pca_low, 1e-6)
        for box in _blocks(out_grid):
            vals, ok = block_values(readers, box)
            win = box.to_rasterio()
            for d in range(n_dates):
                if heads.n_pca:
                    p = vals[layout.pca(d)]
                    rgb = np.clip((p - lo[:, None, None]) / span[:, None, None], 0, 1) * 254 + 1
                    rgb = np.where(ok[None], np.nan_to_num(rgb, nan=0), 0).round().astype(np.uint8)
                    dsts[f"pca_rgb{sfx(d)}"].write(rgb, window=win)
                if heads.k:
                    s = vals[layout.scores(d)]
                    cls = np.argmax(np.nan_to_num(s, nan=-np.inf), axis=0).astype(np.uint8)
                    dsts[f"classes{sfx(d)}"].write(np.where(ok, cls, CLASS_NODATA)[None], window=win)
            if layout.has_change:
                ch = vals[layout.change]
                dsts["change_magnitude"].write(np.where(ok, ch, np.nan).astype(np.float32)[None], window=win)
                mask = np.where(ok, (ch > threshold).astype(np.uint8), CLASS_NODATA)
                dsts["change_mask"].write(mask[None], window=win)
        for ds in dsts.values():
            ds.close()

    records = []
    for name, spec in specs.items():
        rec = finalize_cog(work / f"{name}.tif", run_dir / f"{name}.tif", spec, run_dir=run_dir)
        rec["name"] = name
        if name.startswith("classes"):
            from geo_dino.outputs import write_qml_palette

            write_qml_palette(run_dir / f"{name}.qml",
                              [(v, f"cluster {v}", c) for v, c in class_colormap(heads.k).items()], CLASS_NODATA)
        if name == "change_mask":
            from geo_dino.outputs import write_qml_palette

            write_qml_palette(run_dir / "change_mask.qml",
                              [(0, "unchanged", (210, 210, 210, 255)), (1, "changed", (220, 30, 30, 255))],
                              CLASS_NODATA)
            rec["threshold"] = threshold
            rec["threshold_method"] = cfg.heads.change.threshold
        if name == "change_magnitude":
            hi = threshold * 2 if threshold and math.isfinite(threshold) else 1.0
            write_qml_singleband(run_dir / "change_magnitude.qml", 1, 0.0, float(min(max(hi, 0.05), 2.0)))
        records.append(rec)
    return records
