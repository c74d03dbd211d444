"""Search by example over a feature cube: "find more places like this polygon".

:func:`similarity` takes a cube (:mod:`geo_dino.outputs.cube`) and an example polygon set with its CRS, and
writes into the run folder:

* ``<name>.tif`` — a float32 COG on the cube's grid (one pixel per cube cell) of the cosine similarity, in
  ``[-1, 1]``, of every cell's feature vector to the example's mean feature; NaN (the nodata value) where the
  cell is nodata (any feature NaN) or its features are all zero;
* ``<name>_matches.gpkg`` — layer ``matches``: the ``top_k`` best places as points at cell centres, with
  ``rank`` (1 = best), ``similarity``, ``x``, ``y`` (cube CRS) and ``row``, ``col`` (cube cells), in the
  cube's CRS. Places are local maxima of the similarity over a ``(2s+1) × (2s+1)``-cell window, ``s =
  min_separation_cells``, at least ``s`` cells apart (Chebyshev distance) and outside the example's own cells,
  picked greedily by score.

The example's cells are those whose centres lie inside or on the boundary of the (reprojected) polygons; its
feature is the mean over those cells that are not nodata. Everything scene-sized is computed out of core
with dask, chunk by chunk on the cube's chunks: the similarity blocks go straight into an intermediate tiled
GeoTIFF through rasterio windows (:func:`dask.array.store`), and only a few candidate maxima per chunk are
kept; the COG is then built and verified by :func:`geo_dino.outputs.cog.finalize_cog`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from geo_dino.errors import AOIError, ConfigError, CRSMismatchError
from geo_dino.files import atomic_write, safe_output_path

if TYPE_CHECKING:
    import xarray as xr
    from numpy.typing import ArrayLike
    from shapely.geometry.base import BaseGeometry

    from geo_dino.inputs.aoi import AOI
    from geo_dino.inputs.grid import Grid, PixelBox

__all__ = ["cosine_block", "example_cells", "load_example", "reproject_geometry", "similarity"]

_MATCH_LAYER = "matches"


def load_example(path: str | Path | dict) -> AOI:
    """Read an example from GeoJSON (RFC 7946: Polygon, MultiPolygon, Feature or FeatureCollection of those,
    lon/lat EPSG:4326), validated like an AOI (:func:`geo_dino.inputs.aoi.load_aoi`); raises
    :class:`AOIError`."""
    from geo_dino.inputs.aoi import load_aoi

    return load_aoi(path)


def reproject_geometry(geom: BaseGeometry, src_crs: str, dst_crs: str) -> BaseGeometry:
    """``geom`` from ``src_crs`` to ``dst_crs`` (pyproj, ``always_xy=True``: x/lon first).

    Edges are densified first (0.01° for geographic sources, 1/64 of the extent otherwise) so they follow the
    projection. Raises :class:`CRSMismatchError` for an unknown CRS or coordinates that do not transform.
    """
    import shapely
    from pyproj import CRS, Transformer
    from pyproj.exceptions import CRSError, ProjError
    from shapely.errors import GEOSException

    try:
        src, dst = CRS.from_user_input(src_crs), CRS.from_user_input(dst_crs)
    except CRSError as exc:
        raise CRSMismatchError(f"unknown CRS ({exc}); give the example's CRS as e.g. 'EPSG:4326'") from None
    if src == dst:
        return geom
    minx, miny, maxx, maxy = geom.bounds
    step = 0.01 if src.is_geographic else max(maxx - minx, maxy - miny, 1e-9) / 64
    transformer = Transformer.from_crs(src, dst, always_xy=True)

    def fwd(xy: np.ndarray) -> np.ndarray:
        x, y = transformer.transform(xy[:, 0], xy[:, 1], errcheck=False)
        return np.column_stack([np.asarray(x, dtype=float), np.asarray(y, dtype=float)])

    try:
        out = shapely.transform(shapely.segmentize(geom, step), fwd)
    except (ProjError, GEOSException) as exc:
        raise CRSMismatchError(f"could not transform the example from {src_crs} to the cube's CRS {dst_crs}: "
                               f"{exc}; check the example's CRS") from None
    coords = shapely.get_coordinates(out)
    if out.is_empty or not np.isfinite(coords).all():
        raise CRSMismatchError(f"the example (bounds {geom.bounds} in {src_crs}) does not transform to "
                               f"finite coordinates in the cube's CRS {dst_crs}; it is probably outside that "
                               "CRS's area of use — check the example's CRS and location")
    if not out.is_valid:
        out = shapely.make_valid(out)
    return out


def example_cells(geom: BaseGeometry, grid: Grid) -> tuple[PixelBox, np.ndarray]:
    """The cube cells of ``geom`` (in ``grid``'s CRS): their bounding :class:`PixelBox` and a boolean
    ``(rows, cols)`` mask over that box of the cells whose centres lie inside or on ``geom``.

    Raises :class:`AOIError` when the example lies outside the grid or covers no cell centre.
    """
    import shapely

    box = grid.box_covering(geom.bounds)
    lo, bo, ro, to = grid.bounds()
    if box is None or geom.is_empty:
        raise AOIError(f"the example (bounds {tuple(round(v, 6) for v in geom.bounds)}) lies outside the "
                       f"cube (bounds {(lo, bo, ro, to)} in {grid.crs}); "
                       "draw it over the cube's area and check its CRS")
    xs, ys = grid.pixel_centres(box)
    xx, yy = np.meshgrid(xs, ys)
    mask = shapely.intersects_xy(geom, xx, yy)
    if not mask.any():
        rx, ry = grid.res
        raise AOIError(f"the example covers no cube cell centre; cells are {rx:g} x {ry:g} units of "
                       f"{grid.crs} (one backbone patch): draw a polygon that covers at least one whole cell")
    return box, mask


def cosine_block(block: np.ndarray, ref_unit: np.ndarray) -> np.ndarray:
    """Cosine similarity ``(rows, cols)`` float32 of a ``(F, rows, cols)`` feature block to the unit vector
    ``ref_unit`` ``(F,)``, computed in float64; NaN where a cell has a NaN feature or a zero vector."""
    x = np.asarray(block, dtype=np.float64)
    dot = np.tensordot(ref_unit, x, axes=(0, 0))
    norm = np.sqrt(np.einsum("fij,fij->ij", x, x))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.clip(dot / norm, -1.0, 1.0)
    out[~np.isfinite(out) | (norm == 0)] = np.nan
    return out.astype(np.float32)


def _peak_block(block: np.ndarray, size: int) -> np.ndarray:
    """``block`` where a cell is the maximum of its ``size × size`` window, NaN elsewhere (NaN never a
    peak)."""
    from scipy.ndimage import maximum_filter

    filled = np.where(np.isnan(block), -np.inf, block)
    peak = (filled == maximum_filter(filled, size=size, mode="constant", cval=-np.inf)) & np.isfinite(filled)
    return np.where(peak, block, np.nan).astype(np.float32)


def _block_candidates(scores: np.ndarray, row_off: int, col_off: int, keep: int, ex_box: PixelBox,
                      ex_mask: np.ndarray) -> np.ndarray:
    """At most ``keep`` finite cells of ``scores`` outside the example, best first: ``(n, 3)`` of
    ``(score, row, col)`` in cube cells."""
    rows, cols = np.nonzero(np.isfinite(scores))
    rows, cols = rows + row_off, cols + col_off
    er, ec = rows - ex_box.row_off, cols - ex_box.col_off
    inside = (er >= 0) & (er < ex_box.height) & (ec >= 0) & (ec < ex_box.width)
    inside[inside] = ex_mask[er[inside], ec[inside]]
    rows, cols = rows[~inside], cols[~inside]
    vals = scores[rows - row_off, cols - col_off].astype(np.float64)
    order = np.lexsort((cols, rows, -vals))[:keep]
    return np.column_stack([vals[order], rows[order], cols[order]])


def _pick(cands: np.ndarray, top_k: int, sep: int) -> list[tuple[float, int, int]]:
    """Greedy: best first, each at least ``sep`` cells (Chebyshev) from every one already picked."""
    cands = cands[np.lexsort((cands[:, 2], cands[:, 1], -cands[:, 0]))]
    picked: list[tuple[float, int, int]] = []
    for v, r, c in cands:
        if all(max(abs(r - pr), abs(c - pc)) >= sep for _, pr, pc in picked):
            picked.append((float(v), int(r), int(c)))
            if len(picked) == top_k:
                break
    return picked


class _WindowTarget:
    """A :func:`dask.array.store` target writing ``(rows, cols)`` blocks into band 1 of an open dataset."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds

    def __setitem__(self, key: tuple[slice, slice], value: np.ndarray) -> None:
        from rasterio.windows import Window

        rows, cols = key
        self.ds.write(value, 1, window=Window(cols.start, rows.start, cols.stop - cols.start,
                                              rows.stop - rows.start))


def _example_feature(data: Any, box: PixelBox, mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Mean ``(F,)`` float64 feature over the example's non-nodata cells (dask, chunked) and their count."""
    import dask
    import dask.array as da

    win = data[:, box.row_off:box.row_end, box.col_off:box.col_end]
    valid = da.from_array(mask, chunks=win.chunks[1:]) & ~da.isnan(win).any(axis=0)
    total = da.where(valid[None], win.astype(np.float64), 0.0).sum(axis=(1, 2))
    total, n_valid = dask.compute(total, valid.sum())
    return np.asarray(total) / max(int(n_valid), 1), int(n_valid)


def similarity(cube: xr.DataArray | Path | str, example: BaseGeometry | AOI, *, run_dir: Path,
               example_crs: str = "EPSG:4326", name: str = "similarity", top_k: int = 10,
               min_separation_cells: int = 4, scheduler: str = "threads",
               num_workers: int | None = None) -> dict[str, Any]:
    """Cosine similarity of every cube cell to the example's mean feature, and the ``top_k`` best places.

    ``example`` is a shapely (multi)polygon in ``example_crs`` (ignored for an
    :class:`~geo_dino.inputs.aoi.AOI`,
    which is EPSG:4326). Writes ``<name>.tif`` and ``<name>_matches.gpkg`` inside ``run_dir`` (see the module
    doc). Returns ``{"similarity": <COG record>, "matches": {"path", "layer", "count"}, "example_cells",
    "example_valid_cells", "top_scores", "min_separation_cells", "crs"}``.

    Raises :class:`AOIError` (outside the cube, no cell, only nodata), :class:`CRSMismatchError` (CRS not
    transformable), :class:`~geo_dino.outputs.cube.CubeError` (not a cube), :class:`ConfigError` (bad
    arguments).
    """
    import dask
    import dask.array as da
    import rasterio

    from geo_dino.inputs.aoi import AOI
    from geo_dino.outputs.cog import GDAL_WRITE_ENV, RasterSpec, create_intermediate, finalize_cog
    from geo_dino.outputs.cube import as_cube, cube_grid

    if top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    if min_separation_cells < 0:
        raise ConfigError(f"min_separation_cells must be >= 0, got {min_separation_cells}")
    run_dir = Path(run_dir)
    cog_path = safe_output_path(run_dir, f"{name}.tif")
    gpkg_path = safe_output_path(run_dir, f"{name}_matches.gpkg")
    inter = safe_output_path(run_dir, f".{name}.intermediate.tif")

    cube = as_cube(cube)
    grid = cube_grid(cube)
    if isinstance(example, AOI):
        example, example_crs = example.geometry, example.crs
    geom = reproject_geometry(example, example_crs, grid.crs)
    ex_box, ex_mask = example_cells(geom, grid)

    data = cube.data if isinstance(cube.data, da.Array) else da.from_array(cube.data, chunks=(-1, 256, 256))
    # all features of a cell in one block (a no-op for cubes from geo_dino.outputs.cube)
    data = data.rechunk({0: -1})
    ref, n_valid = _example_feature(data, ex_box, ex_mask)
    ref_norm = float(np.linalg.norm(ref))
    if n_valid == 0 or not math.isfinite(ref_norm) or ref_norm == 0:
        raise AOIError(f"the example's {int(ex_mask.sum())} cell(s) are all nodata or zero vectors; draw the "
                       "example over an area the cube has features for")

    sim = da.map_blocks(cosine_block, data, ref / ref_norm, drop_axis=0, dtype=np.float32)
    sep = int(min_separation_cells)
    scored = (sim.map_overlap(_peak_block, depth=sep, boundary=np.nan, size=2 * sep + 1, dtype=np.float32)
              if sep else sim)
    cand_jobs = _candidate_jobs(scored, 4 * top_k, ex_box, ex_mask)  # > top_k per chunk: only for ties

    spec = RasterSpec(grid=grid, count=1, dtype="float32", nodata=math.nan,
                      band_descriptions=("cosine similarity",),
                      tags={"geo_dino_product": "similarity", "example_cells": str(int(ex_mask.sum())),
                            "units": "cosine similarity [-1, 1]"})
    create_intermediate(inter, spec)
    try:
        with rasterio.Env(**GDAL_WRITE_ENV), rasterio.open(inter, "r+") as ds:
            # dask types store targets as ArrayLike, but documents (and needs) only ``target[region] = block``
            store = da.store(sim, cast("ArrayLike", _WindowTarget(ds)), lock=True, compute=False)
            _, *cands = dask.compute(store, *cand_jobs, scheduler=scheduler, num_workers=num_workers)
    except BaseException:
        inter.unlink(missing_ok=True)
        raise
    record = finalize_cog(inter, cog_path, spec, run_dir=run_dir)

    picked = _pick(np.concatenate([c for c in cands if len(c)] or [np.empty((0, 3))]), top_k, max(sep, 1))
    _write_matches(gpkg_path, picked, cube["x"].values, cube["y"].values, grid.crs)
    project = _style(run_dir, cog_path, gpkg_path)
    return {
        "similarity": record,
        "matches": {"path": gpkg_path.relative_to(run_dir.resolve()).as_posix(), "layer": _MATCH_LAYER,
                    "count": len(picked)},
        "example_cells": int(ex_mask.sum()),
        "example_valid_cells": n_valid,
        "top_scores": [v for v, _, _ in picked],
        "min_separation_cells": sep,
        "crs": grid.crs,
        "style": cog_path.with_suffix(".qml").name,
        "project": project,
    }


def _style(run_dir: Path, cog_path: Path, gpkg_path: Path) -> str | None:
    """Style the search's outputs: ``<name>.qml`` beside the similarity (a magma ramp from the median to the
    highest similarity, so the places like the example stand out) and the matches' style in their
    GeoPackage; then rewrite the run's QGIS project when the folder has one, the search shown first. The
    project's name, or None."""
    import rasterio

    from geo_dino.files import QGIS_PROJECT
    from geo_dino.outputs import styles

    with rasterio.open(cog_path) as ds:
        f = max(1, max(ds.width, ds.height) // 1024)
        v = ds.read(1, out_shape=(max(1, ds.height // f), max(1, ds.width // f)))
    v = v[np.isfinite(v)]
    lo, hi = (float(np.percentile(v, 50)), float(v.max())) if v.size else (0.0, 1.0)
    styles.write_qml_singleband(cog_path.with_suffix(".qml"), 1, lo, hi if hi > lo else lo + 1e-3,
                                ramp="magma")
    styles.write_layer_style(gpkg_path, _MATCH_LAYER, styles.vector_style(_MATCH_LAYER),
                             name=f"{_MATCH_LAYER} (geo_dino)")
    if not (run_dir / QGIS_PROJECT).is_file():
        return None
    from geo_dino.outputs.qgis_project import write_project

    return write_project(run_dir).name


def _candidate_jobs(scored: Any, keep: int, ex_box: PixelBox, ex_mask: np.ndarray) -> list[Any]:
    """One delayed :func:`_block_candidates` per chunk of the 2-D dask array ``scored``."""
    import dask

    row_offs = np.cumsum((0, *scored.chunks[0]))
    col_offs = np.cumsum((0, *scored.chunks[1]))
    blocks = scored.to_delayed()
    return [dask.delayed(_block_candidates)(blocks[i, j], int(row_offs[i]), int(col_offs[j]), keep, ex_box,
                                            ex_mask)
            for i in range(blocks.shape[0]) for j in range(blocks.shape[1])]


def _write_matches(path: Path, picked: list[tuple[float, int, int]], xs: np.ndarray, ys: np.ndarray,
                   crs: str) -> None:
    """The picked places as points at cell centres, layer ``matches`` of a new GeoPackage (atomic rename)."""
    import geopandas as gpd
    from pyproj import CRS
    from shapely.geometry import Point

    rows = [{"rank": k + 1, "similarity": v, "x": float(xs[c]), "y": float(ys[r]), "row": r, "col": c,
             "geometry": Point(float(xs[c]), float(ys[r]))} for k, (v, r, c) in enumerate(picked)]
    columns = ["rank", "similarity", "x", "y", "row", "col", "geometry"]
    gdf = gpd.GeoDataFrame(rows, columns=columns, geometry="geometry", crs=CRS.from_user_input(crs))
    gdf = gdf.astype({"rank": "int32", "similarity": "float64", "x": "float64", "y": "float64",
                      "row": "int64", "col": "int64"})
    atomic_write(path, lambda tmp: gdf.to_file(tmp, layer=_MATCH_LAYER, driver="GPKG"), suffix=".gpkg")
