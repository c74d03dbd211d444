"""Search by example: planted classes are found, cosine equals numpy, chunked out-of-core work, refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from affine import Affine
from dask.callbacks import Callback
from pyproj import CRS, Transformer
from rio_cogeo.cogeo import cog_validate
from shapely.geometry import Polygon, box

from geo_dino.errors import AOIError, CRSMismatchError, OutputError
from geo_dino.inputs.grid import Grid
from geo_dino.outputs.cog import RasterSpec, verify_raster
from geo_dino.outputs.cube import CubeError, cube_grid, open_cube, write_cube
from geo_dino.outputs.similar import load_example, similarity

GRID = Grid(48, 64, Affine(160.0, 0.0, 600013.37, 0.0, -160.0, 2700011.91), "EPSG:32618")
PATCH = 4
#: top-left cells of the planted class-A squares (PATCH x PATCH cells each); the first is the example
A_SQUARES = [(4, 4), (4, 40), (20, 20), (36, 8), (36, 52), (24, 56)]
NODATA = (40, 28)  # top-left of an all-NaN square


def _class_map() -> np.ndarray:
    classes = np.zeros((GRID.height, GRID.width), dtype=np.int64)
    classes[:, 30:33] = 2  # a stripe of class B
    for r, c in A_SQUARES:
        classes[r:r + PATCH, c:c + PATCH] = 1
    return classes


def _features(grid: Grid = GRID, classes: np.ndarray | None = None, f: int = 8, seed: int = 0) -> np.ndarray:
    """One-hot of the class map on the first 3 features, plus Gaussian noise (σ 0.05) on all ``f``."""
    classes = _class_map() if classes is None else classes
    rng = np.random.default_rng(seed)
    data = rng.normal(0.0, 0.05, (f, grid.height, grid.width))
    for k in range(3):
        data[k] += classes == k
    data = data.astype(np.float32)
    r, c = NODATA
    data[:, r:r + PATCH, c:c + PATCH] = np.nan
    return data


def _square(r: int, c: int, n: int = PATCH, inset: float = 20.0) -> Polygon:
    """The cells ``[r, r+n) x [c, c+n)`` as a polygon in the grid's CRS, shrunk by ``inset`` metres."""
    x0, y0 = GRID.transform @ (c, r)
    x1, y1 = GRID.transform @ (c + n, r + n)
    return box(x0 + inset, y1 + inset, x1 - inset, y0 - inset)


def _reference(data: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    """Numpy cosine similarity of every cell to the mean feature of ``data[:, rows, cols]``."""
    x = data.astype(np.float64)
    ref = x[:, rows, cols].reshape(x.shape[0], -1).mean(axis=1)
    dot = np.einsum("f,fij->ij", ref, x)
    return (dot / (np.linalg.norm(ref) * np.sqrt((x * x).sum(axis=0)))).astype(np.float32)


@pytest.fixture(scope="module")
def cube_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cube(tmp_path_factory.mktemp("cube"), "features.zarr", _features(), GRID, chunk=16)


def test_example_over_class_a_finds_the_other_class_a_places(cube_path: Path, tmp_path: Path) -> None:
    r0, c0 = A_SQUARES[0]
    rec = similarity(cube_path, _square(r0, c0), example_crs=GRID.crs, run_dir=tmp_path, top_k=5,
                     min_separation_cells=PATCH)
    assert rec["example_cells"] == PATCH * PATCH and rec["example_valid_cells"] == PATCH * PATCH
    assert rec["matches"] == {"path": "similarity_matches.gpkg", "layer": "matches", "count": 5}
    matches = gpd.read_file(tmp_path / "similarity_matches.gpkg", layer="matches")
    assert matches.crs == CRS.from_user_input(GRID.crs)
    assert matches["rank"].tolist() == [1, 2, 3, 4, 5]
    assert (np.diff(matches["similarity"]) <= 0).all() and (matches["similarity"] > 0.9).all()
    assert matches["similarity"].tolist() == pytest.approx(rec["top_scores"])
    classes = _class_map()
    found = set()
    for row in matches.itertuples():
        col_f, row_f = ~GRID.transform @ (row.x, row.y)
        assert (math.floor(row_f), math.floor(col_f)) == (row.row, row.col)
        assert (row.geometry.x, row.geometry.y) == (row.x, row.y)
        assert classes[row.row, row.col] == 1  # every match is class A ...
        square = next(k for k, (r, c) in enumerate(A_SQUARES)
                      if r <= row.row < r + PATCH and c <= row.col < c + PATCH)
        found.add(square)
    assert found == {1, 2, 3, 4, 5}  # ... one per other square, none in the example itself
    cells = matches[["row", "col"]].to_numpy()
    assert all(np.abs(a - b).max() >= PATCH for i, a in enumerate(cells) for b in cells[i + 1:])


def test_cosine_equals_numpy_and_the_cog_is_verified(cube_path: Path, tmp_path: Path) -> None:
    r0, c0 = A_SQUARES[0]
    rec = similarity(cube_path, _square(r0, c0), example_crs=GRID.crs, run_dir=tmp_path, name="sim")
    tif = tmp_path / "sim.tif"
    expected = _reference(_features(), slice(r0, r0 + PATCH), slice(c0, c0 + PATCH))
    with rasterio.open(tif) as src:
        got = src.read(1)
        assert src.crs == rasterio.crs.CRS.from_user_input(GRID.crs) and src.transform == GRID.transform
        assert src.dtypes == ("float32",) and math.isnan(src.nodata)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-7)
    assert np.array_equal(np.isnan(got), np.isnan(expected)) and np.isnan(got[40:44, 28:32]).all()
    spec = RasterSpec(grid=GRID, count=1, dtype="float32", nodata=math.nan,
                      band_descriptions=("cosine similarity",))
    verify_raster(tif, spec)
    valid, errors, _ = cog_validate(str(tif), quiet=True)
    assert valid and not errors
    assert rec["similarity"]["path"] == "sim.tif" and rec["similarity"]["cog_valid"] is True
    assert not list(tmp_path.glob(".*"))  # no intermediate or temporary file is left behind


def test_example_from_a_geojson_file_in_lon_lat(cube_path: Path, tmp_path: Path) -> None:
    r0, c0 = A_SQUARES[2]
    to_ll = Transformer.from_crs(GRID.crs, "EPSG:4326", always_xy=True)
    ring = [list(to_ll.transform(x, y)) for x, y in _square(r0, c0, inset=30.0).exterior.coords]
    fc = {"type": "FeatureCollection",
          "features": [{"type": "Feature", "properties": {},
                        "geometry": {"type": "Polygon", "coordinates": [ring]}}]}
    path = tmp_path / "example.geojson"
    path.write_text(json.dumps(fc))
    example = load_example(path)
    run = tmp_path / "run"
    run.mkdir()
    rec = similarity(open_cube(cube_path), example, run_dir=run, top_k=3)
    assert rec["example_cells"] == PATCH * PATCH and len(rec["top_scores"]) == 3
    matches = gpd.read_file(run / "similarity_matches.gpkg", layer="matches")
    assert (_class_map()[matches["row"], matches["col"]] == 1).all()
    # the same example given as a shapely polygon with its CRS
    rec2 = similarity(cube_path, example.geometry, example_crs="EPSG:4326", run_dir=run, name="again",
                      top_k=3)
    assert rec2["top_scores"] == rec["top_scores"]


class _TaskSizes(Callback):
    """Records the largest numpy array any dask task returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.tasks = 0

    def _posttask(self, key: object, result: object, dsk: object, state: object, worker_id: object) -> None:
        self.tasks += 1
        items = result if isinstance(result, (tuple, list)) else (result,)
        self.largest = max(self.largest, sum(r.nbytes for r in items if isinstance(r, np.ndarray)))


def test_out_of_core_chunk_by_chunk(tmp_path: Path) -> None:
    """A cube 9x larger than the memory budget is processed in chunks no task exceeds, equal to numpy."""
    grid = Grid(96, 96, Affine(160.0, 0.0, 600013.37, 0.0, -160.0, 2700011.91), "EPSG:32618")
    classes = np.zeros((96, 96), dtype=np.int64)
    classes[10:14, 10:14] = classes[60:64, 70:74] = 1
    data = _features(grid, classes, f=16, seed=5)
    path = write_cube(tmp_path, "big.zarr", data, grid, chunk=16)
    budget = 64 * 1024  # bytes; the cube is 16 x 96 x 96 float32 = 576 KiB
    assert data.nbytes > 8 * budget
    cube = open_cube(path)
    assert cube.data.numblocks == (1, 6, 6) and cube.data.chunksize == (16, 16, 16)
    sizes = _TaskSizes()
    with sizes:
        rec = similarity(cube, _square(10, 10), example_crs=grid.crs, run_dir=tmp_path, top_k=1,
                         num_workers=2)
    assert sizes.tasks > 36 and 0 < sizes.largest <= budget  # every chunk went through its own tasks
    with rasterio.open(tmp_path / "similarity.tif") as src:
        got = src.read(1)
    np.testing.assert_allclose(got, _reference(data, slice(10, 14), slice(10, 14)), rtol=0, atol=2e-7)
    matches = gpd.read_file(tmp_path / "similarity_matches.gpkg", layer="matches")
    assert 60 <= matches["row"][0] < 64 and 70 <= matches["col"][0] < 74 and rec["top_scores"][0] > 0.9


def test_refusals(cube_path: Path, tmp_path: Path) -> None:
    far = box(100000.0, 100000.0, 101000.0, 101000.0)
    with pytest.raises(AOIError, match="outside the cube"):
        similarity(cube_path, far, example_crs=GRID.crs, run_dir=tmp_path)
    x, y = GRID.transform @ (10.1, 10.1)  # inside cell (10, 10) but far from its centre
    with pytest.raises(AOIError, match="covers no cube cell centre"):
        similarity(cube_path, box(x, y - 20.0, x + 20.0, y), example_crs=GRID.crs, run_dir=tmp_path)
    with pytest.raises(AOIError, match="nodata"):
        similarity(cube_path, _square(*NODATA), example_crs=GRID.crs, run_dir=tmp_path)
    with pytest.raises(CRSMismatchError, match="unknown CRS"):
        similarity(cube_path, _square(4, 4), example_crs="EPSG:999999", run_dir=tmp_path)
    with pytest.raises(CRSMismatchError, match="finite"):  # UTM metres declared as lon/lat
        similarity(cube_path, _square(4, 4), example_crs="EPSG:4326", run_dir=tmp_path)
    with pytest.raises(CubeError, match="no feature cube"):
        similarity(tmp_path / "nothing.zarr", _square(4, 4), example_crs=GRID.crs, run_dir=tmp_path)
    (tmp_path / "not_a_cube").mkdir()
    with pytest.raises(CubeError):
        similarity(tmp_path / "not_a_cube", _square(4, 4), example_crs=GRID.crs, run_dir=tmp_path)
    with pytest.raises(OutputError):
        similarity(cube_path, _square(4, 4), example_crs=GRID.crs, run_dir=tmp_path, name="../escape")
    assert not list(tmp_path.glob("*.tif")) and cube_grid(open_cube(cube_path)) == GRID
