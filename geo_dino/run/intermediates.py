"""The outputs' intermediates: one Zarr store per run (``work/outputs.zarr``), written region by region with
xarray by the chunk tasks, read back with xarray/dask by the final pass that makes the COGs.

Every output is one variable: ``(band, y, x)`` for a multi-band output, ``(y, x)`` otherwise, in the output's
own dtype. The store is georeferenced the CF way, through rioxarray: a ``spatial_ref`` variable with the CRS
and the GeoTransform, cell-centre ``x``/``y`` coordinates, each variable's nodata as its ``_FillValue`` and
its band names as ``long_name``; so ``xr.open_zarr(store).rio.crs`` and ``.rio.transform()`` work with no
extra argument.

Zarr chunks never straddle two writers. The rows a chunk task writes and the rows the boundary merge writes
are separated at multiples of the tile stride and of the overlap (:func:`row_chunk`), so a Zarr chunk that
high belongs to exactly one writer: workers write at the same time with no lock and never read-modify-write
another's chunk.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import xarray as xr

    from geo_dino.inputs.grid import Grid
    from geo_dino.outputs.cog import RasterSpec

STORE = "work/outputs.zarr"


def row_chunk(stride: int, overlap: int) -> int:
    """Height of the store's Zarr chunks: the largest height that divides every row where one writer hands
    over to another (multiples of the stride, and those plus the overlap)."""
    return math.gcd(stride, overlap) if overlap else stride


def col_chunk(width: int, rows: int, target: int = 1 << 20) -> int:
    """Width of the store's Zarr chunks: about ``target`` pixels per chunk, a multiple of 256, at most the
    output's width."""
    cols = max(256, (target // max(rows, 1)) // 256 * 256)
    return min(width, cols)


def _dims(spec: RasterSpec) -> tuple[str, ...]:
    return ("band", "y", "x") if spec.count > 1 else ("y", "x")


def _coords(grid: Grid) -> dict[str, np.ndarray]:
    t = grid.transform
    return {"x": t.c + (np.arange(grid.width) + 0.5) * t.a, "y": t.f + (np.arange(grid.height) + 0.5) * t.e}


def create_store(path: Path, specs: dict[str, RasterSpec], rows: int) -> Path:
    """Create the (empty) store of the outputs ``specs`` with Zarr chunks ``rows`` high (replacing an old
    one); only metadata and coordinates are written."""
    import dask.array as da
    import rioxarray  # noqa: F401  (registers the .rio accessor)
    import xarray as xr

    grids = {s.grid for s in specs.values()}
    if len(grids) != 1:
        raise ValueError("the outputs of one run share one grid")
    grid = grids.pop()
    counts = {s.count for s in specs.values() if s.count > 1}
    if len(counts) > 1:
        raise ValueError(f"the multi-band outputs of one run share their band count, not {sorted(counts)}")
    cols = col_chunk(grid.width, rows)
    data_vars, encoding = {}, {}
    for name, spec in specs.items():
        shape = (spec.count, grid.height, grid.width) if spec.count > 1 else (grid.height, grid.width)
        chunks = ((spec.count,) if spec.count > 1 else ()) + (rows, cols)
        fill = np.nan if spec.nodata is None else spec.nodata
        arr = da.full(shape, fill, dtype=spec.dtype, chunks=chunks)
        var = xr.DataArray(arr, dims=_dims(spec),
                           attrs={"long_name": spec.band_descriptions if spec.count > 1
                                  else spec.band_descriptions[0]})
        data_vars[name] = var
        encoding[name] = {"chunks": chunks, "_FillValue": fill}
    bands = {"band": np.arange(1, counts.pop() + 1)} if counts else {}
    ds = xr.Dataset(data_vars, coords=_coords(grid) | bands)
    ds = ds.rio.write_crs(grid.crs).rio.write_transform(grid.transform)
    for name in specs:  # CF: each variable names its grid mapping (the spatial_ref variable: CRS, transform)
        ds[name].encoding = encoding[name] | {"grid_mapping": "spatial_ref", "coordinates": "spatial_ref"}
    ds.to_zarr(path, mode="w", compute=False, consolidated=True, zarr_format=2)
    return path


def write_rows(path: Path, row_off: int, arrays: dict[str, np.ndarray]) -> None:
    """Write whole output rows ``[row_off, row_off + h)`` of the variables in ``arrays`` (``(band, h, W)`` or
    ``(h, W)`` each, the outputs' dtypes and encoded nodata) into the store."""
    import xarray as xr

    h = next(iter(arrays.values())).shape[-2]
    region: dict[str, slice] = {"y": slice(row_off, row_off + h), "x": slice(None)}
    data_vars = {}
    for name, a in arrays.items():
        dims = ("band", "y", "x") if a.ndim == 3 else ("y", "x")
        if a.ndim == 3:
            region["band"] = slice(0, a.shape[0])
        data_vars[name] = xr.Variable(dims, a)
    xr.Dataset(data_vars).to_zarr(path, region=region, mode="r+", consolidated=False, zarr_format=2)


def open_store(path: Path, decoded: bool = True) -> xr.Dataset:
    """The store as a lazy (dask) dataset; ``decoded=False`` keeps every variable's dtype and its nodata
    values as written (the final pass), ``True`` is CF-decoded (nodata as NaN)."""
    import rioxarray  # noqa: F401
    import xarray as xr

    return xr.open_zarr(path, consolidated=True, mask_and_scale=decoded, decode_coords="all")


def band_block(ds: xr.Dataset, name: str, row_off: int, rows: int) -> np.ndarray:
    """Rows ``[row_off, row_off + rows)`` of variable ``name`` as ``(band, rows, W)``."""
    v = ds[name].isel(y=slice(row_off, row_off + rows))
    a: np.ndarray = np.asarray(v.values)
    return a if a.ndim == 3 else a[None]


def copy_to_geotiff(ds: xr.Dataset, name: str, dst: Any) -> None:
    """Copy variable ``name`` of the store into the open rasterio dataset ``dst`` one row of Zarr chunks at a
    time (memory: one such row)."""
    from rasterio.windows import Window

    var = ds[name]
    rows = int(var.encoding.get("preferred_chunks", {}).get("y") or var.chunks[-2][0])  # type: ignore[index]
    step = max(rows, (512 // rows) * rows)
    height = var.sizes["y"]
    for r in range(0, height, step):
        h = min(step, height - r)
        dst.write(band_block(ds, name, r, h), window=Window(0, r, var.sizes["x"], h))
