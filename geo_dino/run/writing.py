"""Writing a run's outputs: blended rows → masked, georeferenced intermediates as inference goes, then COGs.

:class:`OutputWriter` receives the rows that became final after each tile row (from the strip accumulator,
or from the merge of a band two chunks share) and writes them, masked, into the run's Zarr store of
intermediates (:mod:`geo_dino.run.intermediates`), one variable per output. A pixel is nodata when no tile
gave it weight (tiles weight a pixel only where it is valid on every date), when it lies outside the AOI, or
inside a site the screening policy masks. :func:`finish_outputs` thresholds the change (minimum-error or Otsu
on the histogram gathered while writing, :mod:`geo_dino.models.change`), copies every variable of the store
into a tiled GeoTIFF, turns it into a COG and verifies it (CRS, transform, nodata, dtype).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from geo_dino.errors import OutputError
from geo_dino.inputs.grid import Grid, PixelBox
from geo_dino.run import folder

if TYPE_CHECKING:
    from geo_dino.config import RunConfig
    from geo_dino.run.heads import HeadPlan
    from geo_dino.run.plan import RunPlan

BLOCK = 512
CLASS_NODATA = 255


def _blocks(grid: Grid, size: int = BLOCK):  # noqa: ANN202
    for r in range(0, grid.height, size):
        for c in range(0, grid.width, size):
            yield PixelBox(r, c, min(size, grid.height - r), min(size, grid.width - c))


def _geometry_mask(geoms: list, grid: Grid, box: PixelBox) -> np.ndarray:
    """True inside any of ``geoms`` (pixel centres), on ``box`` of ``grid``."""
    from rasterio.features import geometry_mask

    if not geoms:
        return np.zeros((box.height, box.width), bool)
    return geometry_mask(geoms, out_shape=(box.height, box.width), transform=grid.box_transform(box),
                         invert=True)


def _screen_mask_geometries(run_dir: Path, crs: str) -> list:
    """The buffered sites the policy masks, in ``crs``."""
    from pyproj import Transformer
    from shapely.geometry import shape
    from shapely.ops import transform

    data = json.loads((run_dir / folder.SCREENING).read_text())
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


def _specs(run_dir: Path, plan: RunPlan, cfg: RunConfig) -> tuple[dict[str, Any], Any, Any]:
    """Output name → RasterSpec, the heads and the channel layout of a run."""
    from geo_dino.governance.provenance import geotiff_tags
    from geo_dino.inputs.labels import CHANGED_HEAD, CHANGED_LABEL_FREE, UNCHANGED, class_colormap
    from geo_dino.models.label_free import LabelFreeHeads
    from geo_dino.outputs.cog import RasterSpec
    from geo_dino.run.inference import ChannelLayout

    heads = LabelFreeHeads.load(run_dir / folder.HEADS)
    layout = ChannelLayout.of(plan, heads)
    out_grid = plan.out_grid.grid()
    tags = geotiff_tags(folder.read_record(run_dir))  # the tags carry the record's key fields
    n_dates = plan.n_dates

    def sfx(d: int) -> str:
        return f"_t{d + 1}" if n_dates == 2 else ""

    specs: dict[str, Any] = {}
    for d in range(n_dates):
        if heads.n_pca:
            specs[f"pca_rgb{sfx(d)}"] = RasterSpec(
                out_grid, 3, "uint8", 0, ("feature PCA 1", "feature PCA 2", "feature PCA 3"),
                tags=tags | {"GEO_DINO_PRODUCT": "feature PCA (label-free)"})
        if heads.k:
            specs[f"classes{sfx(d)}"] = RasterSpec(out_grid, 1, "uint8", CLASS_NODATA, ("k-means class",),
                                                   categorical=True, colormap=class_colormap(heads.k),
                                                   tags=tags | {"GEO_DINO_PRODUCT": f"k-means k={heads.k} "
                                                                "on patch features (label-free)"})
    info = plan.head
    if info:
        palette = {v: (*c, 255) for v, c in zip(info.values, info.colours, strict=True)}
        product = f"supervised head ({Path(info.path).name})"
        if info.task == "segmentation":
            for d in range(n_dates):
                specs[f"seg_classes{sfx(d)}"] = RasterSpec(
                    out_grid, 1, "uint8", CLASS_NODATA, ("class value",), categorical=True, colormap=palette,
                    tags=tags | {"GEO_DINO_PRODUCT": f"classes, {product}"})
                specs[f"seg_probability{sfx(d)}"] = RasterSpec(
                    out_grid, 1, "float32", float("nan"), ("probability of the predicted class",),
                    tags=tags | {"GEO_DINO_PRODUCT": f"class probability, {product}"})
        else:
            specs["change_probability"] = RasterSpec(
                out_grid, 1, "float32", float("nan"), ("probability of change",),
                tags=tags | {"GEO_DINO_PRODUCT": f"change probability, {product}"})
            specs["change_binary"] = RasterSpec(out_grid, 1, "uint8", CLASS_NODATA,
                                                ("changed (1) / unchanged (0)",), categorical=True,
                                                colormap={0: UNCHANGED, 1: CHANGED_HEAD},
                                                tags=tags | {"GEO_DINO_PRODUCT": f"binary change, {product}"})
    if layout.has_change:
        method = cfg.heads.change.method
        what = {"fused": "fused spectral and feature change score", "spectral": "spectral change score",
                "features": "cosine distance between dates' features"}[method]
        specs["change_magnitude"] = RasterSpec(out_grid, 1, "float32", float("nan"), (what,),
                                               tags=tags | {"GEO_DINO_PRODUCT": f"label-free {what}"})
        if method == "fused":  # the two parts, so a user sees why a pixel changed
            specs["change_spectral"] = RasterSpec(
                out_grid, 1, "float32", float("nan"), ("spectral change score",),
                tags=tags | {"GEO_DINO_PRODUCT": "spectral change score (part of the fused change)"})
            specs["change_features"] = RasterSpec(
                out_grid, 1, "float32", float("nan"), ("cosine distance between dates' features",),
                tags=tags | {"GEO_DINO_PRODUCT": "feature change (part of the fused change)"})
        specs["change_mask"] = RasterSpec(out_grid, 1, "uint8", CLASS_NODATA,
                                          ("changed (1) / unchanged (0)",), categorical=True,
                                          colormap={0: UNCHANGED, 1: CHANGED_LABEL_FREE},
                                          tags=tags | {"GEO_DINO_PRODUCT": f"thresholded {what}"})
    return specs, heads, layout


def create_outputs(run_dir: Path, plan: RunPlan, cfg: RunConfig) -> list[str]:
    """Create the (empty) Zarr store of the outputs' intermediates, chunked so that no two writers share a
    Zarr chunk."""
    from geo_dino.run.intermediates import create_store, row_chunk

    specs, _, _ = _specs(run_dir, plan, cfg)
    create_store(run_dir / folder.INTERMEDIATES, specs, row_chunk(plan.tiling.stride, plan.tiling.overlap))
    return list(specs)


class OutputWriter:
    """Writes final rows into the intermediates (one open handle per output and per source)."""

    def __init__(self, run_dir: Path, plan: RunPlan, cfg: RunConfig, hist: np.ndarray | None = None) -> None:
        from shapely import wkt

        self.run_dir = run_dir
        self.specs, self.heads, self.layout = _specs(run_dir, plan, cfg)
        self.grid = plan.out_grid.grid()
        self.n_dates = plan.n_dates
        self.info = plan.head
        if plan.aoi_crs_wkt:
            self.aoi = wkt.loads(plan.aoi_crs_wkt)
        else:
            from geo_dino.inputs.aoi import load_aoi

            self.aoi = load_aoi(cfg.aoi, cfg.aoi_options).to_crs(self.grid.crs)
        self.screen = _screen_mask_geometries(run_dir, self.grid.crs)
        import shapely

        shapely.prepare(self.aoi)  # fast contains/intersects per block
        # the change histogram travels with the chunk checkpoint (the carried strip), not in a file of its own
        from geo_dino.models.change import HIST_BINS, ChangeModel

        self.change = ChangeModel.load(run_dir / folder.CHANGE_MODEL) if self.layout.has_change else None
        self.hist = np.zeros(HIST_BINS, np.int64) if hist is None else hist.astype(np.int64)
        self.store = run_dir / folder.INTERMEDIATES
        self.rows_written = 0

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def _sfx(self, d: int) -> str:
        return f"_t{d + 1}" if self.n_dates == 2 else ""


    def write_rows(self, row_off: int, vals: np.ndarray, weight: np.ndarray, block: int = 2048) -> None:
        """Write final rows ``[row_off, row_off + h)`` (blended values and weights over the full width)."""
        from shapely.geometry import box as shp_box

        from geo_dino.run.intermediates import write_rows

        h = vals.shape[1]
        heads, layout = self.heads, self.layout
        self.dsts = {n: _Rows(s, h, self.grid.width) for n, s in self.specs.items()}
        lo = heads.pca_low
        span = None if heads.pca_high is None else np.maximum(heads.pca_high - heads.pca_low, 1e-6)
        for c0 in range(0, self.grid.width, block):
            box = PixelBox(row_off, c0, h, min(block, self.grid.width - c0))
            v = vals[:, :, c0:box.col_end]
            ok = weight[:, c0:box.col_end] > 0  # zero where any date is nodata (see inference.infer_tiles)
            footprint = shp_box(*self.grid.bounds(box))
            if not self.aoi.contains(footprint):  # rasterise the AOI only where its edge crosses the block
                ok &= _geometry_mask([self.aoi], self.grid, box)
            near = [g for g in self.screen if g.intersects(footprint)]
            if near:
                ok &= ~_geometry_mask(near, self.grid, box)
            win = box.to_rasterio()
            for d in range(self.n_dates):
                if heads.n_pca and lo is not None and span is not None:  # fitted with the components
                    p = v[layout.pca(d)]
                    rgb = np.clip((p - lo[:, None, None]) / span[:, None, None], 0, 1) * 254 + 1
                    rgb = np.where(ok[None], rgb, 0).round().astype(np.uint8)  # NaN only where not ok
                    self.dsts[f"pca_rgb{self._sfx(d)}"].write(rgb, window=win)
                if heads.k:
                    cls = np.argmax(v[layout.scores(d)], axis=0).astype(np.uint8)  # NaN rows are masked below
                    self.dsts[f"classes{self._sfx(d)}"].write(np.where(ok, cls, CLASS_NODATA)[None],
                                                              window=win)
            if self.info:
                _head_rows(self, self.info, v, ok, win)
            if layout.has_change and self.change is not None:
                from geo_dino.models.change import histogram

                fusion = self.change.fusion
                feat = np.where(ok, v[layout.change], np.nan).astype(np.float32)
                spec = np.where(ok, v[layout.change_spectral], np.nan).astype(np.float32)
                # fused per pixel from the blended parts: change_magnitude = combine(spectral, features)
                ch = np.asarray(fusion.combine(spec, feat), dtype=np.float32)
                self.dsts["change_magnitude"].write(ch[None], window=win)
                if "change_spectral" in self.dsts:
                    self.dsts["change_spectral"].write(spec[None], window=win)
                    self.dsts["change_features"].write(feat[None], window=win)
                self.hist += histogram(ch[ok], fusion.hist_high)
        write_rows(self.store, row_off, {n: r.data for n, r in self.dsts.items()})
        self.rows_written += h


class _Rows:
    """Full-width rows of one output, filled block by block through rasterio-style ``write(arr, window=)``
    calls, then written to the store at once."""

    def __init__(self, spec: Any, h: int, width: int) -> None:
        shape = (spec.count, h, width) if spec.count > 1 else (h, width)
        self.data = np.empty(shape, dtype=spec.dtype)
        self.multi = spec.count > 1

    def write(self, arr: np.ndarray, window: Any) -> None:
        cols = slice(window.col_off, window.col_off + window.width)
        if self.multi:
            self.data[:, :, cols] = arr
        else:
            self.data[:, cols] = arr[0]


def _head_rows(writer: OutputWriter, info: HeadPlan, v: np.ndarray, ok: np.ndarray, win: Any) -> None:
    from geo_dino.run.heads import probabilities

    layout = writer.layout
    if info.task == "segmentation":
        lut = np.asarray(info.values, np.uint8)
        for d in range(writer.n_dates):
            prob = probabilities(v[layout.seg(d)])
            idx = np.argmax(np.nan_to_num(prob, nan=0.0), axis=0)
            cls = np.where(ok, lut[idx], CLASS_NODATA).astype(np.uint8)
            conf = np.where(ok, np.take_along_axis(prob, idx[None], 0)[0], np.nan).astype(np.float32)
            writer.dsts[f"seg_classes{writer._sfx(d)}"].write(cls[None], window=win)
            writer.dsts[f"seg_probability{writer._sfx(d)}"].write(conf[None], window=win)
    else:
        prob = probabilities(v[layout.change_logits])
        pos = info.positive_index
        p = np.where(ok, prob[pos], np.nan).astype(np.float32)
        changed = np.argmax(np.nan_to_num(prob, nan=0.0), axis=0) == pos
        writer.dsts["change_probability"].write(p[None], window=win)
        writer.dsts["change_binary"].write(np.where(ok, changed, CLASS_NODATA).astype(np.uint8)[None],
                                           window=win)


def _existing_record(path: Path, spec: Any, run_dir: Path) -> dict[str, Any]:
    """The output record of a COG finished earlier, after checking it again."""
    import rasterio
    from rio_cogeo.cogeo import cog_validate

    from geo_dino.files import sha256_file
    from geo_dino.outputs.cog import verify_raster

    verify_raster(path, spec)
    with rasterio.open(path) as src:
        return {"path": path.name, "sha256": sha256_file(path), "size_bytes": path.stat().st_size,
                "crs": src.crs.to_string(), "transform": [float(v) for v in tuple(src.transform)[:6]],
                "width": src.width, "height": src.height, "count": src.count, "dtype": src.dtypes[0],
                "nodata": "nan" if src.nodata is not None and src.nodata != src.nodata else src.nodata,
                "overviews": list(src.overviews(1)),
                "cog_valid": bool(cog_validate(str(path), quiet=True)[0])}


def finish_outputs(run_dir: Path, plan: RunPlan, cfg: RunConfig, hist: np.ndarray) -> list[dict[str, Any]]:
    """Threshold the change on the run's histogram ``hist``, then make, validate and verify the COGs from the
    store of intermediates; styles beside them."""
    import rasterio

    from geo_dino.inputs.labels import CHANGED_HEAD, CHANGED_LABEL_FREE, UNCHANGED, class_colormap
    from geo_dino.outputs.cog import GDAL_WRITE_ENV, create_intermediate, finalize_cog
    from geo_dino.outputs.styles import write_qml_palette, write_qml_singleband
    from geo_dino.run.intermediates import band_block, copy_to_geotiff, open_store

    specs, heads, layout = _specs(run_dir, plan, cfg)
    info = plan.head
    threshold = None
    change_record = None
    store = open_store(run_dir / folder.INTERMEDIATES, decoded=False)
    if layout.has_change:
        from geo_dino.models.change import ChangeModel, threshold_from_histogram

        model = ChangeModel.load(run_dir / folder.CHANGE_MODEL)
        thr = cfg.heads.change.threshold
        if isinstance(thr, str):
            threshold = (threshold_from_histogram(hist, model.fusion.edges(), thr) if hist.sum()
                         else float("inf"))  # no valid pixel: nothing is changed
            how = {"minimum-error": "Kittler-Illingworth minimum-error threshold",
                   "otsu": "Otsu's threshold"}[thr] + " on the histogram of the run's own scores"
        else:
            threshold = float(thr)
            how = "fixed (heads.change.threshold)"
        change_record = model.to_record() | {"threshold": {"value": threshold if math.isfinite(threshold)
                                                           else None, "method": thr,
                                                           "how_chosen": how}}
        folder.update_record(run_dir, change=change_record)

    def fill(name: str, dst: Any) -> None:
        if name != "change_mask":
            copy_to_geotiff(store, name, dst)
            return
        grid = specs[name].grid
        for box in _blocks(grid):
            ch = band_block(store, "change_magnitude", box.row_off, box.height)[0, :, box.col_off:box.col_end]
            mask = np.where(np.isnan(ch), CLASS_NODATA, (ch > threshold).astype(np.uint8)).astype(np.uint8)
            dst.write(mask[None], window=box.to_rasterio())

    records = []
    for name, spec in specs.items():
        if (run_dir / f"{name}.tif").exists():
            rec = _existing_record(run_dir / f"{name}.tif", spec, run_dir)  # made before a kill: checked
        else:
            tif = folder.intermediate(run_dir, name)
            create_intermediate(tif, spec, compress=None)
            with rasterio.Env(**GDAL_WRITE_ENV), rasterio.open(tif, "r+") as dst:
                fill(name, dst)
            rec = finalize_cog(tif, run_dir / f"{name}.tif", spec, run_dir=run_dir)
        rec["name"] = name
        if name.startswith("classes"):
            write_qml_palette(run_dir / f"{name}.qml",
                              [(v, f"cluster {v}", c) for v, c in class_colormap(heads.k).items()],
                              CLASS_NODATA)
        if name == "change_mask":
            write_qml_palette(run_dir / "change_mask.qml",
                              [(0, "unchanged", UNCHANGED), (1, "changed", CHANGED_LABEL_FREE)],
                              CLASS_NODATA)
            rec["threshold"] = threshold
            rec["threshold_method"] = cfg.heads.change.threshold
        if name.startswith("seg_classes") or name == "change_binary":
            if info is None:  # these outputs exist only for a run with a supervised head
                raise OutputError(f"{name} is a supervised head's output, but the run has no head")
            entries = ([(v, n, (*c, 255))
                        for v, n, c in zip(info.values, info.names, info.colours, strict=True)]
                       if name.startswith("seg_classes") else
                       [(0, "unchanged", UNCHANGED), (1, "changed", CHANGED_HEAD)])
            write_qml_palette(run_dir / f"{name}.qml", entries, CLASS_NODATA)
        if name.startswith("seg_probability") or name == "change_probability":
            write_qml_singleband(run_dir / f"{name}.qml", 1, 0.0, 1.0)
        if name == "change_magnitude":
            hi = threshold * 2 if threshold and math.isfinite(threshold) else 1.0
            write_qml_singleband(run_dir / "change_magnitude.qml", 1, 0.0, float(max(hi, 1e-3)))
        if name in ("change_spectral", "change_features") and change_record is not None:
            scale = change_record["scales"][f"{name.split('_')[1]}_median"]
            write_qml_singleband(run_dir / f"{name}.qml", 1, 0.0, float(max(4 * scale, 1e-3)))
        records.append(rec)
    return records
