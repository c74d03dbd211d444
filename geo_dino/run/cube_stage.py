"""The run's feature cube (``features.zarr``): patch features of the first date, one cell per backbone patch.

Tiles overlap, so each patch cell is taken from exactly one tile: the tile whose *core* holds it — the tile
minus half the overlap on each side that has a neighbour (the first and last tiles keep their outer edge).
Cores partition the region, so every cell is written once. This needs the overlap to be a whole number of
patches (checked at plan time). Cells of patches that are less than half valid (nodata, outside the AOI's
raster) are NaN. Rows are gathered per chunk task and written once at its end (one region write per task,
under a lock on the cube: chunk tasks on several workers may share a Zarr chunk).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from geo_dino.inputs.grid import Grid
    from geo_dino.run.plan import RunPlan

CUBE_NAME = "features.zarr"


def cube_grid_of(plan: RunPlan) -> Grid:
    """The cube's grid for a run: one cell per backbone patch of the run's output grid."""
    from geo_dino.outputs.cube import patch_grid

    return patch_grid(plan.out_grid.grid(), plan.patch_size)


def create_cube(run_dir: Path, plan: RunPlan, n_features: int, attrs: dict[str, Any],
                zarr_format: int = 3) -> Path:
    """Create the run's empty cube (``n_features`` features, chunks of 64 cells; replaces an old one) and
    return its path."""
    from geo_dino.outputs.cube import CubeWriter

    writer = CubeWriter(run_dir, CUBE_NAME, cube_grid_of(plan), n_features, chunk=64, attrs=attrs,
                        zarr_format=zarr_format,
                        overwrite=True)
    return writer.path


def close_cube(run_dir: Path) -> None:
    """Mark the run's cube complete once every chunk task has written its rows."""
    from geo_dino.outputs.cube import CubeWriter

    CubeWriter.reopen(run_dir, CUBE_NAME).close()


class CubeSink:
    """Called per batch of tiles with their patch features ``(B, C, h, w)`` and pixel validity
    ``(B, H, W)``."""

    def __init__(self, run_dir: Path, plan: RunPlan) -> None:
        self.run_dir = run_dir
        self.p = plan.patch_size
        t = plan.tiling
        self.size, self.overlap = t.size // self.p, t.overlap // self.p
        self.stride = self.size - self.overlap
        self.n_rows, self.n_cols = t.shape
        self.region = plan.region  # row_off, col_off, height, width (pixels)
        self.grid = cube_grid_of(plan)
        self.rows: dict[int, np.ndarray] = {}  # cube row -> (C, width) buffer

    def _core(self, i: int, n: int) -> tuple[int, int]:
        lo = 0 if i == 0 else self.overlap // 2
        hi = self.size if i == n - 1 else self.size - (self.overlap - self.overlap // 2)
        return lo, hi

    def __call__(self, tiles: list[Any], feats: Any, valid: np.ndarray) -> None:
        """Copy each tile's core cells into the row buffers (NaN where under half the patch is valid)."""
        import torch

        frac = torch.nn.functional.avg_pool2d(torch.from_numpy(valid).float()[:, None], self.p)[:, 0].numpy()
        f = feats.numpy()
        for b, t in enumerate(tiles):
            r0, r1 = self._core(t.grid_row, self.n_rows)
            c0, c1 = self._core(t.grid_col, self.n_cols)
            base_r, base_c = t.grid_row * self.stride, t.grid_col * self.stride
            block = np.where(frac[b][None] >= 0.5, f[b], np.nan).astype(np.float32)
            for r in range(r0, min(r1, self.grid.height - base_r)):
                row = self.rows.setdefault(base_r + r,
                                           np.full((f.shape[1], self.grid.width), np.nan, np.float32))
                cc1 = min(c1, self.grid.width - base_c)
                if cc1 > c0:
                    row[:, base_c + c0:base_c + cc1] = block[:, r, c0:cc1]

    def __enter__(self) -> CubeSink:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        from geo_dino.outputs.cube import CubeWriter

        if exc_type is not None or not self.rows:
            return
        keys = sorted(self.rows)
        if keys != list(range(keys[0], keys[-1] + 1)):
            raise RuntimeError(f"feature cube rows {keys[0]}..{keys[-1]} are not contiguous in this chunk")
        block = np.stack([self.rows[k] for k in keys], axis=1)
        from geo_dino.files import folder_lock

        # the cube's Zarr chunks (64 cells) do not follow the chunk tasks' rows: two tasks may write parts of
        # one Zarr chunk at once on a cluster, so their writes take turns
        with folder_lock(self.run_dir / CUBE_NAME):
            CubeWriter.reopen(self.run_dir, CUBE_NAME).write(keys[0], 0, block)
