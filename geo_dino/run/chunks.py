"""One chunk of a run: a band of whole tile rows that any process can compute, in any order.

:func:`infer_chunk` runs the chunk's tiles through the backbone and heads, writes the output rows only its
tiles cover into the store of intermediates, and saves its raw sums over the bands it shares with its
neighbours (:class:`~geo_dino.run.inference.ChunkResult`); :func:`merge_bands` blends those bands once every
chunk is done. :mod:`geo_dino.run.engine` decides where the chunks run.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from geo_dino.errors import OutputError
from geo_dino.run import folder, progress, resources
from geo_dino.run.folder import load_config, load_plan, records_failure

if TYPE_CHECKING:
    from geo_dino.config import RunConfig
    from geo_dino.models.change import SpectralChange
    from geo_dino.run.plan import RunPlan


def _spectral_change(run_dir: Path) -> SpectralChange | None:
    """The run's fitted spectral change score (None: one date, or ``method: features``)."""
    from geo_dino.models.change import ChangeModel

    path = run_dir / folder.CHANGE_MODEL
    return ChangeModel.load(path).spectral if path.exists() else None


@records_failure
def infer_chunk(run_dir: Path, chunk: int) -> dict[str, Any]:
    """Run one chunk (whole tile rows) and write the rows only its tiles cover; keep its raw sums over the
    bands it shares with its neighbours (:class:`~geo_dino.run.inference.ChunkResult`) for the merge.

    Chunks are independent: each starts from an empty strip, in any process, in any order. Running a chunk
    again writes the same rows and the same result (a retried or resumed chunk)."""
    import os
    import socket

    from geo_dino.inputs.sources import WindowReader
    from geo_dino.models.label_free import LabelFreeHeads
    from geo_dino.run.inference import ChannelLayout, ChunkResult, StripAccumulator, band_rows, infer_tiles
    from geo_dino.run.writing import OutputWriter

    t0 = time.perf_counter()
    started = datetime.now(UTC).isoformat()
    cfg = load_config(run_dir)
    plan = load_plan(run_dir)
    n_tiles = plan.tiling.n_tiles
    progress.stage(run_dir, "inference", f"{n_tiles} tiles in {plan.tiling.n_chunks} chunks")
    extractor, _ = resources.extractor(cfg, plan)
    heads = LabelFreeHeads.load(run_dir / folder.HEADS)
    layout = ChannelLayout.of(plan, heads)
    grid = plan.tile_grid()
    chunks = plan.chunks()
    if not 0 <= chunk < len(chunks):
        raise ValueError(f"chunk {chunk}: the run has chunks 0..{len(chunks) - 1}")
    n_rows = grid.shape[0]
    out_grid = plan.out_grid.grid()
    first, hold_end = band_rows(out_grid, chunks, grid.stride, grid.overlap, chunk)
    acc = StripAccumulator(out_grid, layout.n_values, grid.size, grid.stride, top=first)
    acc.record_until = hold_end  # the top band's terms are kept for the merge, its rows not written here
    region = plan.region_box()
    spectral = _spectral_change(run_dir)
    runner = resources.head_runner(plan)
    n = 0
    last_chunk = chunk == len(chunks) - 1
    counted = partial(progress.advance, run_dir, total=n_tiles)  # each batch's tiles as they are blended
    with ExitStack() as stack:
        readers = [stack.enter_context(WindowReader(i)) for i in plan.infos()]
        spectral_readers = (None if spectral is None and not (runner is not None and runner.spectral) else
                            [stack.enter_context(WindowReader(i.spectral())) for i in plan.infos()])
        writer = stack.enter_context(OutputWriter(run_dir, plan, cfg))
        cube = None
        if cfg.heads.cube:
            from geo_dino.run.cube_stage import CubeSink

            cube = stack.enter_context(CubeSink(run_dir, plan))
        for row in chunks[chunk]:
            n += infer_tiles(extractor, readers, heads, layout, row, region, acc, grid.size,
                             cfg.backbone.batch_size, cache_dir=run_dir / folder.FEATURE_CACHE,
                             runner=runner, cube=cube, spectral=spectral,
                             spectral_readers=spectral_readers,
                             on_batch=counted)
            acc.advance(last=row[0].grid_row == n_rows - 1, sink=writer.write_rows)
    bottom = None
    if not last_chunk:  # the rows the next chunk's first tile rows also cover, as this chunk left them
        bottom = acc.open_rows(min(grid.overlap, out_grid.height - acc.top))
    dt = time.perf_counter() - t0
    timing = {"chunk": chunk, "tiles": n, "rows_written": writer.rows_written, "seconds": round(dt, 3),
              "started": started, "host": socket.gethostname(), "pid": os.getpid(),
              "worker": resources.worker_name(), "device": extractor.device,
              "peak_rss_mib": resources.peak_rss_mib(),
              "models_built_in_process": dict(resources.BUILDS)}
    ChunkResult(acc.recorded, bottom, writer.hist).save(folder.chunk_path(run_dir, chunk),
                                               timing=np.frombuffer(json.dumps(timing).encode(), np.uint8))
    return timing


def chunk_timings(run_dir: Path) -> list[dict[str, Any]]:
    """Where and how long each chunk ran, from the chunk results present (chunk order)."""
    out = []
    for p in folder.chunk_results(run_dir):
        with np.load(p, allow_pickle=False) as z:
            out.append(json.loads(z["timing"].tobytes().decode()))
    return out


def announce_inference(run_dir: Path) -> tuple[int, int]:
    """Tell the progress listeners (:mod:`geo_dino.run.progress`) that inference starts, with the tiles
    already done (the chunk results present: a resumed run) of the run's total; return ``(done, total)``.
    Does nothing (and returns ``(0, 0)``) while nobody listens."""
    if not progress.active():
        return 0, 0
    tiling = load_plan(run_dir).tiling
    done = sum(int(t.get("tiles", 0)) for t in chunk_timings(run_dir))
    progress.stage(run_dir, "inference", f"{tiling.n_tiles} tiles in {tiling.n_chunks} chunks"
                   + (f", {done} done before" if done else ""))
    progress.tiles(run_dir, done, tiling.n_tiles)
    return done, tiling.n_tiles


def missing_chunks(run_dir: Path) -> list[int]:
    """The chunks of a run that have no result yet (all of them before inference starts)."""
    n = load_plan(run_dir).tiling.n_chunks
    done = {int(p.stem.split("_")[1]) for p in folder.chunk_results(run_dir)}
    return [c for c in range(n) if c not in done]


def merge_bands(run_dir: Path, plan: RunPlan, cfg: RunConfig) -> np.ndarray:
    """Blend and write the bands neighbouring chunks share (each from the two chunks' raw sums); return the
    run's change histogram (the chunks' and the bands')."""
    from geo_dino.run.inference import ChunkResult, band_rows, merge_band
    from geo_dino.run.writing import OutputWriter

    missing = missing_chunks(run_dir)
    if missing:
        raise OutputError(f"{run_dir}: chunks {missing} have no result; resume the run to compute them")
    progress.stage(run_dir, "writing outputs", "blending the chunks' edges, then the COGs")
    chunks = plan.chunks()
    grid = plan.tile_grid()
    out_grid = plan.out_grid.grid()
    with OutputWriter(run_dir, plan, cfg) as writer:
        above = ChunkResult.load(folder.chunk_path(run_dir, 0))
        for c in range(1, len(chunks)):
            below = ChunkResult.load(folder.chunk_path(run_dir, c))
            first, end = band_rows(out_grid, chunks, grid.stride, grid.overlap, c)
            if end > first:  # tiling.overlap 0: chunks share no row
                vals, w = merge_band(above, below, out_grid, grid.size, grid.stride, first, end)
                writer.write_rows(first, vals, w)
            writer.hist += above.hist
            above = below
        writer.hist += above.hist
        return writer.hist
