"""Feature cubes: dense backbone patch features over a grid, stored as Zarr (v3) through xarray and dask.

On-disk layout (one Zarr group, ``<run>/<name>.zarr``):

* data variable ``features``, dims ``("feature", "y", "x")`` — axis order ``(band, row, col)`` as everywhere
  in geo_dino — ``float32`` (or ``float16``), fill value NaN. **NaN is nodata**: a cell never written (a chunk
  never stored) or written as NaN reads back as NaN in every feature.
* chunks ``(n_features, chunk, chunk)``: all features of a cell lie in one chunk, so a cell's vector, a window
  or a blockwise computation over cells reads whole chunks and never gathers features across chunks. ``chunk``
  defaults to the largest of 256, 128, 64, 32 whose chunk stays ≤ 64 MiB (256 up to 256 float32 features,
  128 for ViT-B/L widths of 768/1024).
* coordinates ``x``, ``y`` (float64): cell centres, ``x[j] = transform * (j + 0.5, 0.5)`` and
  ``y[i] = transform * (0.5, i + 0.5)``; ``feature``: ``0..F-1``.
* coordinate ``spatial_ref`` (CF grid mapping written by rioxarray's ``write_crs``/``write_transform``): attrs
  ``crs_wkt``, ``spatial_ref`` (both WKT) and ``GeoTransform`` (GDAL order ``c a b f d e``, Python ``repr``
  floats, so exact); the variable's ``grid_mapping`` names it. Open with ``decode_coords="all"`` (as
  :func:`open_cube` does) for ``da.rio.crs`` and ``da.rio.transform()`` to work. rioxarray recomputes an
  axis-aligned transform from the coordinates (corner ``x[0] - res / 2``), which is the grid's affine bit for
  bit except on a few grids in 10⁵ (measured), where float64 rounding of that subtraction ties and the corner
  comes back one ulp off (no float64 centre can avoid it). :func:`cube_grid` is exact always: it starts from
  ``GeoTransform``.
* group attributes: ``geo_dino_kind = "feature_cube"``, ``geo_dino_cube_version = 1``, ``axis_order``,
  ``nodata = "nan"``, ``complete`` (set ``true`` only by :meth:`CubeWriter.close` after every write) and the
  caller's ``attrs``. Metadata is consolidated on close.

A cube cell is one backbone patch: :func:`patch_grid` makes the cube's :class:`~geo_dino.inputs.grid.Grid`
from a pixel grid and the patch size. Rotated or sheared transforms are refused (x/y would not be 1-D
coordinates).
"""

from __future__ import annotations

import math
import shutil
import warnings
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np
from affine import Affine

from geo_dino.errors import ConfigError, CRSMismatchError, CubeError
from geo_dino.files import safe_output_path
from geo_dino.inputs.grid import Grid, PixelBox

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["CUBE_VAR", "CubeError", "CubeWriter", "as_cube", "cube_coords", "cube_grid", "cube_template",
           "feature_at", "open_cube", "patch_grid", "write_cube"]

CUBE_VAR = "features"
CUBE_DIMS = ("feature", "y", "x")
CUBE_KIND = "feature_cube"
CUBE_VERSION = 1
_DTYPES = ("float32", "float16")
_RESERVED = ("geo_dino_kind", "geo_dino_cube_version", "axis_order", "nodata", "complete")
_MAX_CHUNK_BYTES = 64 * 2**20


# ------------------------------------------------------------------------------------------------ grids


def patch_grid(grid: Grid, patch: int, region: PixelBox | None = None) -> Grid:
    """The cube grid of ``region`` (default: all of ``grid``): one cell per ``patch × patch`` pixels.

    The cube has ``ceil(height / patch) × ceil(width / patch)`` cells; its transform is the region's transform
    scaled by ``patch``, so cell ``(i, j)`` covers pixels ``[i*patch, (i+1)*patch)`` of the region (the last
    row/column of cells may extend past the region, like the backbone's padded edge tiles).
    """
    if patch <= 0:
        raise ConfigError(f"patch size must be a positive number of pixels, got {patch}")
    region = region or grid.box
    if region.height <= 0 or region.width <= 0:
        raise ConfigError(f"the region {region} has no pixel; give a region of at least one pixel")
    return Grid(math.ceil(region.height / patch), math.ceil(region.width / patch),
                grid.box_transform(region) @ Affine.scale(patch), grid.crs)


def _check_axis_aligned(grid: Grid) -> None:
    t = grid.transform
    if t.b or t.d or t.a == 0 or t.e == 0:
        raise CRSMismatchError(f"the cube grid's transform {tuple(t)[:6]} is rotated, sheared or degenerate; "
                               "warp the raster to a north-up grid first (e.g. gdalwarp)")


def cube_coords(grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` float64 cell-centre coordinates of ``grid`` in its CRS: ``x`` per column, ``y`` per row."""
    _check_axis_aligned(grid)
    t = grid.transform
    x = t.a * (np.arange(grid.width) + 0.5) + t.c
    y = t.e * (np.arange(grid.height) + 0.5) + t.f
    return x, y


def default_chunk(n_features: int, dtype: str = "float32") -> int:
    """The y/x chunk edge (cells): the largest of 256, 128, 64, 32 keeping a chunk ≤ 64 MiB."""
    item = np.dtype(dtype).itemsize
    for c in (256, 128, 64):
        if n_features * c * c * item <= _MAX_CHUNK_BYTES:
            return c
    return 32


def cube_template(grid: Grid, n_features: int, *, chunk: int | None = None, dtype: str = "float32",
                  attrs: dict[str, Any] | None = None) -> xr.Dataset:
    """A lazy, all-NaN cube Dataset on ``grid`` (dask-backed; costs no memory), georeferenced by rioxarray."""
    import dask.array as da
    import rioxarray  # noqa: F401 - registers the .rio accessor
    import xarray as xr

    if dtype not in _DTYPES:
        raise ConfigError(f"cube dtype {dtype!r} is not supported; use one of {_DTYPES}")
    if n_features < 1:
        raise ConfigError(f"a cube needs at least one feature, got n_features={n_features}")
    if grid.height < 1 or grid.width < 1:
        raise ConfigError(f"the cube grid {grid.height}x{grid.width} has no cell")
    chunk = chunk or default_chunk(n_features, dtype)
    if chunk < 1:
        raise ConfigError(f"chunk must be a positive number of cells, got {chunk}")
    user = dict(attrs or {})
    clash = sorted(set(user) & set(_RESERVED))
    if clash:
        raise ConfigError(f"cube attrs {clash} are reserved by geo_dino; rename them")
    x, y = cube_coords(grid)
    data = da.full((n_features, grid.height, grid.width), np.nan, dtype=dtype,
                   chunks=(n_features, chunk, chunk))
    arr = xr.DataArray(data, dims=CUBE_DIMS, name=CUBE_VAR,
                       coords={"feature": np.arange(n_features), "y": y, "x": x},
                       attrs={"long_name": "backbone patch features", "units": "1"})
    arr = arr.rio.write_crs(grid.crs).rio.write_transform(grid.transform)
    ds = arr.to_dataset()
    ds.attrs.update({"geo_dino_kind": CUBE_KIND, "geo_dino_cube_version": CUBE_VERSION,
                     "axis_order": "(feature, y, x) = (band, row, col)", "nodata": "nan", "complete": False,
                     **user})
    # "coordinates" names spatial_ref, so a plain xr.open_zarr(path) has it as a coordinate and .rio.crs works
    ds[CUBE_VAR].encoding.update({"chunks": (n_features, chunk, chunk), "_FillValue": np.nan,
                                  "coordinates": "spatial_ref"})
    return ds


# ------------------------------------------------------------------------------------------------ write


def _aligned_chunks(off: int, n: int, chunk: int) -> tuple[int, ...]:
    """Dask chunk sizes covering ``[off, off + n)`` whose boundaries fall on multiples of ``chunk``."""
    edges = [off, *range((off // chunk + 1) * chunk, off + n, chunk), off + n]
    return tuple(b - a for a, b in pairwise(edges))


class CubeWriter:
    """Create a cube store in ``run_dir`` and fill it block by block (e.g. row band by row band).

    ``write`` takes ``(F, h, w)`` arrays (numpy: written now; dask: written in parallel, rechunked onto the
    store's chunks) at cell offsets ``(row_off, col_off)``. Numpy writes that cover part of a chunk read and
    rewrite that chunk, so numpy writes from several threads must not share a chunk. ``close`` (or leaving the
    ``with`` block without an exception) marks the cube complete and consolidates its metadata.
    """

    def __init__(self, run_dir: Path, name: str, grid: Grid, n_features: int, *, chunk: int | None = None,
                 dtype: str = "float32", attrs: dict[str, Any] | None = None,
                 overwrite: bool = False, zarr_format: int = 3) -> None:
        self.path = safe_output_path(Path(run_dir), name)
        self.grid = grid
        self.n_features = n_features
        self.dtype = dtype
        template = cube_template(grid, n_features, chunk=chunk, dtype=dtype, attrs=attrs)
        self.chunk = template[CUBE_VAR].encoding["chunks"][1]
        if self.path.exists():
            if not overwrite:
                raise CubeError(f"{self.path} already exists; pass overwrite=True or choose another name")
            shutil.rmtree(self.path) if self.path.is_dir() else self.path.unlink()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)
            # Zarr v3 by default; v2 for readers that have no v3 (GDAL < 3.8, so QGIS 3.22 / GDAL 3.6)
            template.to_zarr(self.path, mode="w-", compute=False, zarr_format=zarr_format, consolidated=False)
        self.closed = False

    @classmethod
    def reopen(cls, run_dir: Path, name: str) -> CubeWriter:
        """A writer for a cube created earlier and not yet closed (the pipeline fills one per chunk task)."""
        import zarr

        path = safe_output_path(Path(run_dir), name)
        try:
            arr = zarr.open_group(str(path), mode="r")[CUBE_VAR]
        except (FileNotFoundError, KeyError) as exc:
            raise CubeError(f"{path}: no cube to reopen ({exc})") from None
        self = cls.__new__(cls)
        da = open_cube(path, allow_incomplete=True)
        if not isinstance(arr, zarr.Array):  # __init__ writes an array: a group here is a damaged store
            raise CubeError(f"{path}: {CUBE_VAR!r} is not an array; the cube is damaged, write it again")
        self.path, self.grid, self.n_features = path, cube_grid(da), int(arr.shape[0])
        self.dtype, self.chunk, self.closed = str(arr.dtype), int(arr.chunks[1]), False
        return self

    def write(self, row_off: int, col_off: int, array: Any, *, scheduler: str = "threads",
              num_workers: int | None = None) -> None:
        """Write ``array`` ``(F, h, w)`` (numpy or dask) at cell ``(row_off, col_off)``; NaN means nodata."""
        import dask.array as da
        import xarray as xr

        if self.closed:
            raise CubeError(f"the cube {self.path} is closed; open a new CubeWriter to write more")
        if array.ndim != 3 or array.shape[0] != self.n_features:
            raise CubeError(f"a block must be (feature, row, col) with {self.n_features} features, got shape "
                            f"{tuple(array.shape)}")
        if np.dtype(array.dtype).kind not in "fiu":
            raise CubeError(f"a block must hold real numbers, got dtype {array.dtype}")
        _, h, w = array.shape
        box = PixelBox(int(row_off), int(col_off), h, w)
        if box.intersection(self.grid.box) != box:
            raise CubeError(f"block {box} does not fit the cube's {self.grid.height}x{self.grid.width} "
                            "cells; write it at an offset inside the cube")
        region = {"y": slice(box.row_off, box.row_end), "x": slice(box.col_off, box.col_end)}
        if isinstance(array, da.Array):
            array = array.astype(self.dtype).rechunk(
                (self.n_features, _aligned_chunks(box.row_off, h, self.chunk),
                 _aligned_chunks(box.col_off, w, self.chunk)))
        else:
            array = np.asarray(array, dtype=self.dtype)
        ds = xr.Dataset({CUBE_VAR: (CUBE_DIMS, array)})
        job = ds.to_zarr(self.path, region=region, consolidated=False, compute=False)
        job.compute(scheduler=scheduler, num_workers=num_workers)

    def close(self) -> None:
        """Mark the cube complete (group attribute ``complete = true``) and consolidate its metadata."""
        import zarr

        if self.closed:
            return
        group = zarr.open_group(str(self.path), mode="r+")
        group.attrs.update({"complete": True})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)  # consolidation is a zarr-python extension
            zarr.consolidate_metadata(str(self.path))
        self.closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.closed = True  # left incomplete: open_cube refuses it


def write_cube(run_dir: Path, name: str, data: Any, grid: Grid, *, chunk: int | None = None,
               dtype: str = "float32", attrs: dict[str, Any] | None = None, overwrite: bool = False,
               scheduler: str = "threads", num_workers: int | None = None) -> Path:
    """Write a whole ``(F, H, W)`` array (numpy or dask, NaN = nodata) on ``grid`` as a complete cube.

    The array is split into the store's chunks and written by dask (``scheduler``: ``"threads"`` by default,
    ``"synchronous"`` for serial); every chunk is written by exactly one task, so the result is the same bit
    for bit whatever the scheduler. Returns the store's resolved path inside ``run_dir``.
    """
    import dask.array as da

    if tuple(data.shape[1:]) != (grid.height, grid.width):
        raise CubeError(f"data of shape {tuple(data.shape)} does not match the grid's "
                        f"{grid.height}x{grid.width} cells; data must be (feature, row, col)")
    with CubeWriter(run_dir, name, grid, int(data.shape[0]), chunk=chunk, dtype=dtype, attrs=attrs,
                    overwrite=overwrite) as writer:
        arr = data if isinstance(data, da.Array) else da.from_array(np.asarray(data), chunks=-1)
        writer.write(0, 0, arr, scheduler=scheduler, num_workers=num_workers)
    return writer.path


# ------------------------------------------------------------------------------------------------- read


def open_cube(path: Path, *, allow_incomplete: bool = False) -> xr.DataArray:
    """Open a cube lazily: a dask-backed ``(feature, y, x)`` DataArray on the store's chunks, with the
    group's attributes merged into ``attrs``. Nothing but metadata and coordinates is read here.

    Raises :class:`CubeError` when ``path`` is missing, not a Zarr store, not a geo_dino cube, or incomplete
    (unless ``allow_incomplete``).
    """
    import rioxarray  # noqa: F401 - registers the .rio accessor
    import xarray as xr

    path = Path(path)
    if not path.exists():
        raise CubeError(f"no feature cube at {path}; "
                        "check the path or write one with write_cube()/CubeWriter")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=RuntimeWarning)  # "failed to open consolidated"
            ds = xr.open_zarr(path, decode_coords="all", chunks={}, consolidated=None)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # zarr's errors are ValueError/OSError
        raise CubeError(f"{path} is not a readable Zarr store ({type(exc).__name__}: {exc}); give the path "
                        f"of a cube written by geo_dino.outputs.cube") from None
    if ds.attrs.get("geo_dino_kind") != CUBE_KIND or CUBE_VAR not in ds:
        raise CubeError(f"{path} is a Zarr store but not a geo_dino feature cube "
                        f"(no {CUBE_VAR!r} variable or geo_dino_kind attribute); "
                        "give the path of a cube written by geo_dino.outputs.cube")
    if not allow_incomplete and ds.attrs.get("complete") is not True:
        raise CubeError(f"the cube {path} is incomplete (its writer never closed, e.g. the run failed); "
                        "rerun the step that writes it, or pass allow_incomplete=True to read it anyway")
    da_ = ds[CUBE_VAR]
    da_.attrs = {**da_.attrs, **ds.attrs}
    return as_cube(da_, what=str(path))


def as_cube(cube: xr.DataArray | Path | str, *, what: str = "the cube") -> xr.DataArray:
    """``cube`` checked to be a georeferenced ``(feature, y, x)`` DataArray; a path is opened with
    :func:`open_cube`."""
    import rioxarray  # noqa: F401 - registers the .rio accessor
    import xarray as xr

    if isinstance(cube, (str, Path)):
        return open_cube(Path(cube))
    if not isinstance(cube, xr.DataArray):
        raise CubeError(f"{what} must be a cube path or an xarray.DataArray, not {type(cube).__name__}")
    if cube.dims != CUBE_DIMS:
        raise CubeError(f"{what} has dims {cube.dims}; a cube is {CUBE_DIMS} (band, row, col)")
    if cube.rio.crs is None or "spatial_ref" not in cube.coords:
        raise CubeError(f"{what} has no CRS; write it with geo_dino.outputs.cube (or .rio.write_crs) first")
    return cube


def cube_grid(cube: xr.DataArray) -> Grid:
    """The :class:`Grid` of a cube DataArray or of a window of it (``isel`` with unit steps), exactly.

    The transform is the stored ``GeoTransform`` shifted by the window's whole-cell offset (the same maths as
    :meth:`Grid.subgrid`); for other arrays it is rioxarray's ``transform()``.
    """
    crs = cube.rio.crs
    if crs is None:
        raise CubeError("the cube has no CRS; "
                        "open it with open_cube() (decode_coords='all') or write its CRS")
    height, width = int(cube.sizes["y"]), int(cube.sizes["x"])
    transform = cube.rio.transform()
    gt = cube.coords["spatial_ref"].attrs.get("GeoTransform") if "spatial_ref" in cube.coords else None
    if gt and height and width:
        full = Affine.from_gdal(*(float(v) for v in gt.split()))
        x, y = cube["x"].values, cube["y"].values
        col, row = (x[0] - full.c) / full.a - 0.5, (y[0] - full.f) / full.e - 0.5
        j, i = round(col), round(row)
        steps_ok = all(abs(np.diff(v[:2]) - r).max(initial=0) <= 1e-6 * abs(r)
                       for v, r in ((x, full.a), (y, full.e)))
        if abs(col - j) <= 1e-6 and abs(row - i) <= 1e-6 and steps_ok and not (full.b or full.d):
            transform = full @ Affine.translation(j, i) if (i, j) != (0, 0) else full
    return Grid(height, width, transform, crs.to_string())


def feature_at(cube: xr.DataArray, x: float, y: float) -> np.ndarray:
    """The ``(F,)`` feature vector of the cell containing map point ``(x, y)`` (in the cube's CRS).

    Reads one chunk. Raises :class:`CubeError` when the point lies outside the cube.
    """
    cube = as_cube(cube)
    grid = cube_grid(cube)
    col, row = ~grid.transform @ (float(x), float(y))
    i, j = math.floor(row), math.floor(col)
    if not (0 <= i < grid.height and 0 <= j < grid.width):
        raise CubeError(f"point ({x}, {y}) is outside the cube (bounds {grid.bounds()} in {grid.crs}); give "
                        "coordinates in the cube's CRS inside its bounds")
    return np.asarray(cube.isel(y=i, x=j).values)
