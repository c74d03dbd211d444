"""The data side of DINO pretraining: streamed training tiles, multi-crop augmentation, an indexed dataset.

Three pieces, each usable alone:

* :class:`TileSource` — draws ``tile_size``-pixel windows from one or many rasters, inside the union of the
  AOIs, skipping windows with too little valid data. Nothing is materialised: windows are read on demand with
  :class:`~geo_dino.inputs.sources.WindowReader` (opened lazily, once per process) and scaled to [0, 1] per
  raster.
* :class:`MultiCrop` — DINO's ``DataAugmentationDINO`` in pure torch, for any band count and for overhead
  imagery (rot90 and vertical flips, per-band jitter, crops that avoid nodata).
* :class:`PretrainDataset` — a map-style dataset over an unbounded index stream; item ``i`` is a pure
  function of ``(seed, i)``, so a resumed run, a DDP rank and a DataLoader worker all see exactly the same
  samples. :func:`index_range` / :class:`StepBatchSampler` give "the batch of step ``s`` on rank ``r``".

Sampling a tile, in detail. At construction each raster gets a candidate map from one decimated read of its
validity mask (at most :data:`OVERVIEW_SIDE` cells a side): a cell is a candidate when its overview pixel is
valid and it touches the AOI union (reprojected to the raster's CRS), restricted to positions where a whole
window fits inside the raster. A raster's sampling weight is the number of full-resolution pixels in its
candidate cells (≈ its valid, AOI-clipped area in pixels), so every such pixel is about equally likely to be a
tile centre whatever raster it is in. A draw picks a raster by weight, a candidate pixel uniformly, and
accepts it as the tile's centre pixel only when that pixel's centre lies inside the AOI union. The window is
read, and its pixels that are nodata *or* whose centres fall outside the AOI are invalid (set to 0); a window
whose valid fraction is below ``min_valid_fraction`` is skipped and redrawn, up to ``max_tries`` times. So:
the centre pixel of every tile is inside the AOI, every valid pixel is inside the AOI, and a tile may reach
outside the AOI only by the invalid fraction the config allows (``min_valid_fraction: 1.0`` keeps whole
windows inside).

Randomness never comes from a global state: :func:`sample_rngs` derives a numpy generator (the tile) and a
torch generator (the crops) from ``SeedSequence([seed, index])``. Counters of skipped windows are kept per
process (:attr:`TileSource.counters`); every sample's :class:`TileMeta` also says how many windows it took, so
a training loop can log skips whatever the number of DataLoader workers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any, Self

import numpy as np
import shapely
import torch
import torch.nn.functional as F
from shapely.geometry.base import BaseGeometry

from geo_dino.config import PreprocessConfig
from geo_dino.errors import AOIError, ConfigError
from geo_dino.inputs.grid import PixelBox
from geo_dino.inputs.preprocess import Preprocessor, make_preprocessor
from geo_dino.inputs.sources import RasterInfo, WindowReader, open_raster
from geo_dino.training.pretrain_config import MultiCropConfig, PretrainDataConfig

__all__ = ["MultiCrop", "PretrainDataset", "StepBatchSampler", "TileMeta", "TileSource", "collate",
           "index_range", "sample_rngs"]

# cells a side of the candidate map read once per raster (bounded memory, any raster size)
OVERVIEW_SIDE = 512
CENTRE_DRAWS = 1000  # candidate pixels tried per window before the AOI is declared too thin to centre a tile
CROP_TRIES = 10  # crop boxes tried per crop before the one with the most valid pixels is taken
CROP_VALID = 0.5  # a resized crop pixel is valid when at least this share of its input weight was valid
ASPECT = (3 / 4, 4 / 3)  # random resized crop aspect ratios (torchvision RandomResizedCrop / DINO)


# ------------------------------------------------------------------------------------------------ seeds
def sample_rngs(seed: int, index: int) -> tuple[np.random.Generator, torch.Generator]:
    """The two random streams of sample ``index``: numpy for the tile, torch for its crops.

    Both come from ``SeedSequence([seed, index])`` (children 0 and 1), so they are independent of each other,
    of every other index and of any global random state.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed: {seed!r} must be a non-negative integer")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise IndexError(f"sample index {index!r} must be a non-negative integer (the stream has no end, so "
                         "negative indexes mean nothing)")
    tile_ss, crop_ss = np.random.SeedSequence([int(seed), int(index)]).spawn(2)
    gen = torch.Generator().manual_seed(int(crop_ss.generate_state(1, dtype=np.uint64)[0]))
    return np.random.default_rng(tile_ss), gen


# ----------------------------------------------------------------------------------------------- tiles
@dataclass(frozen=True)
class TileMeta:
    """Where a training tile came from. ``box`` is on the raster's grid; ``bounds`` is
    ``(left, bottom, right, top)`` in ``crs``; ``tries`` counts the windows read (``tries - 1`` were
    skipped)."""

    raster: int
    path: str
    crs: str
    box: PixelBox
    bounds: tuple[float, float, float, float]
    valid_fraction: float
    tries: int


@dataclass(frozen=True)
class _Candidates:
    """Candidate cells of one raster: full-resolution pixel ranges ``[r0, r0 + nh) × [c0, c0 + nw)``."""

    r0: np.ndarray
    nh: np.ndarray
    c0: np.ndarray
    nw: np.ndarray
    cum: np.ndarray  # cumulative pixel counts, for a uniform pixel draw

    @property
    def total(self) -> int:
        return int(self.cum[-1]) if self.cum.size else 0


class TileSource:
    """Training tiles ``(C, S, S)`` in [0, 1] drawn from the rasters of a :class:`PretrainDataConfig`.

    ``sample(index)`` is deterministic in ``(seed, index)``. The object is picklable and fork-safe: dataset
    handles are opened on first use in each process and never pickled. Use it as a context manager, or call
    :meth:`close`, to release the handles (a later sample reopens them).
    """

    def __init__(self, cfg: PretrainDataConfig, *, seed: int = 0) -> None:
        from geo_dino.inputs.aoi import load_aoi

        sample_rngs(seed, 0)  # validates the seed
        self.cfg = cfg
        self.seed = int(seed)
        _check_preprocess(cfg.preprocess)
        self.infos: list[RasterInfo] = [open_raster(p, cfg.sources) for p in cfg.rasters]
        counts = {i.path: len(i.bands) for i in self.infos}
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{Path(p).name}: {n}" for p, n in counts.items())
            raise ConfigError(f"data.rasters: every raster must give the same number of bands, got {listed}; "
                              "select the same bands in each with sources.bands "
                              "or train on one sensor at a time")
        self.n_bands = len(self.infos[0].bands)
        size = cfg.tile_size
        for info in self.infos:
            if info.grid.height < size or info.grid.width < size:
                raise ConfigError(f"{info.path}: {info.grid.height}x{info.grid.width} pixels is smaller than "
                                  f"data.tile_size = {size}; lower tile_size or remove the raster")
        aois = [load_aoi(p, cfg.aoi_options) for p in cfg.aois]
        self.aois = [{"path": a.source, "sha256": a.sha256} for a in aois]
        self._regions = [_region(info, aois) if aois else None for info in self.infos]
        self._pre = [_preprocessor(info, cfg.preprocess) for info in self.infos]
        self._cands = [_candidates(info, region, size) for info, region in zip(self.infos, self._regions,
                                                                                strict=True)]
        for info, cand in zip(self.infos, self._cands, strict=True):
            if cand.total == 0:
                where = " inside the AOIs" if aois else ""
                raise ConfigError(f"{info.path}: no valid pixel{where} where a {size}x{size} tile fits; the "
                                  "raster has too little valid data — remove it, lower data.tile_size or "
                                  "enlarge the AOI")
        #: sampling weight of each raster: candidate pixels (≈ valid, AOI-clipped area in pixels)
        self.weights = np.array([c.total for c in self._cands], dtype=np.int64)
        self._cum_w = np.cumsum(self.weights)
        #: per-process counts: tiles returned, windows skipped for low valid fraction, centres outside the AOI
        self.counters = {"tiles": 0, "skipped_low_valid": 0, "centre_outside_aoi": 0}
        self._stack: ExitStack | None = None
        self._readers: dict[int, WindowReader] = {}
        self._pid: int | None = None

    # --- sampling
    @property
    def probabilities(self) -> np.ndarray:
        """The probability of drawing each raster."""
        return self.weights / self.weights.sum()

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray, TileMeta]:
        """Tile ``index`` of the stream: ``(tile float32 (C, S, S) in [0, 1], valid bool (S, S), meta)``.

        Invalid pixels (nodata, or outside the AOIs) are 0 in ``tile``.
        """
        return self.draw(sample_rngs(self.seed, index)[0])

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, TileMeta]:
        """One tile from ``rng`` (what :meth:`sample` does with the index's generator)."""
        k = int(np.searchsorted(self._cum_w, rng.integers(self._cum_w[-1]), side="right"))
        info, cfg = self.infos[k], self.cfg
        size, half = cfg.tile_size, cfg.tile_size // 2
        best = 0.0
        for tries in range(1, cfg.max_tries + 1):
            r, c = self._centre(k, rng)
            box = PixelBox(r - half, c - half, size, size)
            data, valid = self._reader(k).read(box)
            inside = self._aoi_mask(k, box)
            if inside is not None:
                valid &= inside
            frac = float(valid.mean())
            if frac >= cfg.min_valid_fraction:
                self.counters["tiles"] += 1
                meta = TileMeta(k, info.path, info.grid.crs, box, info.grid.bounds(box), frac, tries)
                return self._pre[k](data, valid), valid, meta
            self.counters["skipped_low_valid"] += 1
            best = max(best, frac)
        where = " inside the AOIs" if self._regions[k] is not None else ""
        raise ConfigError(f"{info.path}: none of {cfg.max_tries} windows of {size}x{size} pixels{where} had "
                          f"data.min_valid_fraction = {cfg.min_valid_fraction:g} valid pixels "
                          f"(best {best:.3f}); "
                          "the raster has too little valid data — lower min_valid_fraction or tile_size, "
                          "raise max_tries, or remove the raster")

    def _centre(self, k: int, rng: np.random.Generator) -> tuple[int, int]:
        """A uniform candidate pixel of raster ``k`` whose centre is inside the AOI union."""
        cand, region = self._cands[k], self._regions[k]
        t = self.infos[k].grid.transform
        for _ in range(CENTRE_DRAWS):
            j = int(np.searchsorted(cand.cum, rng.integers(cand.total), side="right"))
            r = int(cand.r0[j] + rng.integers(cand.nh[j]))
            c = int(cand.c0[j] + rng.integers(cand.nw[j]))
            if region is None:
                return r, c
            x, y = t @ (c + 0.5, r + 0.5)
            if shapely.contains_xy(region, x, y):
                return r, c
            self.counters["centre_outside_aoi"] += 1
        raise AOIError(f"{self.infos[k].path}: {CENTRE_DRAWS} candidate pixels in a row fell outside "
                       "the AOIs; the AOIs are too thin for this raster's grid — enlarge them")

    def _aoi_mask(self, k: int, box: PixelBox) -> np.ndarray | None:
        """Pixels of ``box`` whose centres are inside the AOI union (``None``: no AOI, all inside)."""
        region = self._regions[k]
        if region is None:
            return None
        from rasterio.features import geometry_mask

        grid = self.infos[k].grid
        window = shapely.box(*grid.bounds(box))
        if region.contains(window):
            return np.ones((box.height, box.width), dtype=bool)
        parts = [p for p in shapely.get_parts(region.intersection(window))
                 if p.geom_type in ("Polygon", "MultiPolygon") and not p.is_empty]
        if not parts:
            return np.zeros((box.height, box.width), dtype=bool)
        return geometry_mask(parts, out_shape=(box.height, box.width), transform=grid.box_transform(box),
                             invert=True)

    # --- handles: one set per process, opened on first use
    def _reader(self, k: int) -> WindowReader:
        pid = os.getpid()
        if self._pid != pid:  # first use, or a forked DataLoader worker: never share the parent's handles
            self._readers, self._stack, self._pid = {}, ExitStack(), pid
            for region in self._regions:
                if region is not None:
                    shapely.prepare(region)
        if k not in self._readers:
            self._readers[k] = self._stack.enter_context(  # type: ignore[union-attr]
                WindowReader(self.infos[k], threads=1))
        return self._readers[k]

    def close(self) -> None:
        """Close this process's dataset handles (a later sample reopens them)."""
        if self._stack is not None and self._pid == os.getpid():
            self._stack.close()
        self._readers, self._stack, self._pid = {}, None, None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_readers={}, _stack=None, _pid=None)
        return state

    # --- record
    def describe(self) -> dict[str, Any]:
        """A small JSON-able record for the model card: rasters (path, sha256, CRS, GSD, bands, dtype,
        scaling, sampling probability), AOIs (path, sha256) and the sampling settings."""
        from geo_dino.governance.provenance import raster_input_record

        rasters = []
        for info, pre, p in zip(self.infos, self._pre, self.probabilities, strict=True):
            rec = raster_input_record(info.path)  # its sha256 is geo_dino.models.backbone.sha256_file's
            rasters.append({
                "path": info.path, "sha256": rec["sha256"], "crs": info.grid.crs, "gsd": rec["gsd"],
                "shape": [info.grid.height, info.grid.width], "bands": list(info.bands),
                "band_names": list(info.band_names), "dtype": info.dtype, "nodata": info.nodata,
                "scaling": {"scale": pre.scale, "low": list(pre.low), "high": list(pre.high)},
                "probability": float(p),
            })
        return {"rasters": rasters, "aois": list(self.aois), "tile_size": self.cfg.tile_size,
                "min_valid_fraction": self.cfg.min_valid_fraction, "max_tries": self.cfg.max_tries,
                "seed": self.seed, "n_bands": self.n_bands}


def _check_preprocess(pre: PreprocessConfig) -> None:
    if pre.mean is not None or pre.std is not None:
        raise ConfigError("data.preprocess.mean/std: not used in pretraining "
                          "(tiles are only scaled to [0, 1] here); "
                          "set the normalisation with crops.mean and crops.std")
    if pre.resample_to_gsd or pre.target_gsd_m is not None:
        raise ConfigError("data.preprocess.resample_to_gsd/target_gsd_m: not supported in pretraining; "
                          "resample the rasters beforehand")


def _preprocessor(info: RasterInfo, pre: PreprocessConfig) -> Preprocessor:
    """Bit-depth scaling to [0, 1] (mean 0, std 1): percentile statistics are read when the scale needs
    them."""
    n = len(info.bands)
    stats = None
    if pre.scale == "percentile" or (pre.scale == "auto" and info.dtype != "uint8"):
        with WindowReader(info) as reader:
            stats = reader.sample_stats(pre.percentiles)
    return make_preprocessor(info.dtype, info.bands, pre, mean=(0.0,) * n, std=(1.0,) * n, stats=stats)


def _region(info: RasterInfo, aois: list[Any]) -> BaseGeometry:
    """The AOI union in the raster's CRS, clipped to its footprint; :class:`AOIError` when none overlaps."""
    footprint = shapely.box(*info.grid.bounds())
    parts, reasons = [], []
    for aoi in aois:
        try:
            geom = aoi.to_crs(info.grid.crs)
        except AOIError as exc:  # e.g. outside the raster CRS's area of use: cannot overlap the raster
            reasons.append(str(exc))
            continue
        part = geom.intersection(footprint)
        if not part.is_empty and part.area > 0:
            parts.append(part)
    if not parts:
        why = f" ({'; '.join(reasons)})" if reasons else ""
        raise AOIError(f"{info.path}: no AOI in data.aois overlaps this raster (bounds "
                       f"{tuple(round(v, 3) for v in info.grid.bounds())} in {info.grid.crs}){why}; "
                       "remove the raster or add an AOI that covers it")
    region = shapely.union_all(parts)
    shapely.prepare(region)
    return region


def _candidates(info: RasterInfo, region: BaseGeometry | None, size: int) -> _Candidates:
    """Candidate cells from one decimated read of the validity mask, clipped to where a window fits."""
    from affine import Affine
    from rasterio.features import geometry_mask

    g = info.grid
    f = max(1, math.ceil(max(g.height, g.width) / OVERVIEW_SIDE))
    ch, cw = math.ceil(g.height / f), math.ceil(g.width / f)
    with WindowReader(info, threads=1) as reader:
        _, ok = reader.decimated(ch, cw, values=False)
    if region is not None:
        touched = geometry_mask([region], out_shape=(ch, cw), all_touched=True, invert=True,
                                transform=g.transform @ Affine.scale(g.width / cw, g.height / ch))
        grown = touched.copy()  # one cell of slack: the overview's cells and pixel edges need not align
        grown[1:] |= touched[:-1]
        grown[:-1] |= touched[1:]
        grown[:, 1:] |= grown[:, :-1].copy()
        grown[:, :-1] |= grown[:, 1:].copy()
        ok &= grown
    row_edges = (np.arange(ch + 1) * g.height) // ch
    col_edges = (np.arange(cw + 1) * g.width) // cw
    half = size // 2  # centre pixels r with 0 <= r - half and r - half + size <= height
    r_lo = np.maximum(row_edges[:-1], half)
    r_hi = np.minimum(row_edges[1:], g.height - size + half + 1)
    c_lo = np.maximum(col_edges[:-1], half)
    c_hi = np.minimum(col_edges[1:], g.width - size + half + 1)
    ii, jj = np.nonzero(ok)
    nh, nw = (r_hi - r_lo)[ii], (c_hi - c_lo)[jj]
    keep = (nh > 0) & (nw > 0)
    ii, jj, nh, nw = ii[keep], jj[keep], nh[keep], nw[keep]
    return _Candidates(r0=r_lo[ii], nh=nh, c0=c_lo[jj], nw=nw, cum=np.cumsum(nh.astype(np.int64) * nw))


# ------------------------------------------------------------------------------------------ multi-crop
class MultiCrop:
    """DINO's multi-crop augmentation for ``(C, H, W)`` tiles in [0, 1] with a validity mask.

    Each crop: a random resized crop (scale from the config, aspect 3/4–4/3) redrawn up to :data:`CROP_TRIES`
    times until its valid fraction reaches ``min_valid_fraction`` (else the most valid box is kept); invalid
    pixels are filled with the crop's band means and the box is resized (bilinear, antialiased); flips and a
    rot90 multiple; per-band brightness/contrast jitter; gaussian blur; solarisation (second global crop
    only); then ``(x - mean) / std`` with invalid pixels set to 0. A resized pixel is valid when at least
    :data:`CROP_VALID` of its input weight was valid. ``mean``/``std`` default to the backbone's
    (``crops.mean``/``std`` override them) and need one value per band.
    """

    def __init__(self, cfg: MultiCropConfig, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        mean = cfg.mean if cfg.mean is not None else mean
        std = cfg.std if cfg.std is not None else std
        if mean is None or std is None:
            raise ConfigError("crops.mean/std: none given and no backbone mean/std passed; set them with one "
                              "value per band")
        if len(mean) != len(std):
            raise ConfigError(f"crops.mean/std: {len(mean)} means but {len(std)} stds; "
                              "give one of each per band")
        if any(s <= 0 for s in std):
            raise ConfigError("crops.std: every value must be positive")
        self.cfg = cfg
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def check_bands(self, n_bands: int) -> None:
        """Raise :class:`ConfigError` unless mean/std give one value per band."""
        if len(self.mean) != n_bands:
            raise ConfigError(f"crops.mean/std: {len(self.mean)} values but the tiles have {n_bands} bands; "
                              "set crops.mean and crops.std with one value per band (a backbone's RGB "
                              "statistics do not fit other band sets)")

    def __call__(self, tile: np.ndarray | torch.Tensor, valid: np.ndarray | torch.Tensor,
                 generator: torch.Generator) -> dict[str, list[torch.Tensor]]:
        """Crops of one tile: ``global_crops`` (2 × ``(C, G, G)``), ``local_crops`` (``n_local`` ×
        ``(C, L, L)``), float32 normalised, and their masks ``global_valid`` / ``local_valid`` (bool)."""
        x = torch.as_tensor(tile, dtype=torch.float32)
        v = torch.as_tensor(valid, dtype=torch.bool)
        if x.ndim != 3 or v.shape != x.shape[1:]:
            raise ValueError(f"tile must be (C, H, W) with a (H, W) mask, got {tuple(x.shape)} and "
                             f"{tuple(v.shape)}")
        self.check_bands(x.shape[0])
        cfg = self.cfg
        integral = F.pad(v.to(torch.int64).cumsum(0).cumsum(1), (1, 0, 1, 0))
        out: dict[str, list[torch.Tensor]] = {"global_crops": [], "local_crops": [], "global_valid": [],
                                              "local_valid": []}
        specs = [("global", cfg.global_size, cfg.global_scale, cfg.blur_p[0], 0.0),
                 ("global", cfg.global_size, cfg.global_scale, cfg.blur_p[1], cfg.solarize_p)]
        specs += [("local", cfg.local_size, cfg.local_scale, cfg.blur_p[2], 0.0)] * cfg.n_local
        for kind, size, scale, blur_p, solarize_p in specs:
            crop, ok = self._crop(x, v, integral, size, scale, blur_p, solarize_p, generator)
            out[f"{kind}_crops"].append(crop)
            out[f"{kind}_valid"].append(ok)
        return out

    def _crop(self, x: torch.Tensor, v: torch.Tensor, integral: torch.Tensor, size: int,
              scale: tuple[float, float], blur_p: float, solarize_p: float,
              g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        i, j, h, w = self._box(integral, x.shape[1], x.shape[2], scale, g)
        x, v = x[:, i:i + h, j:j + w], v[i:i + h, j:j + w]
        x = _fill_invalid(x, v)
        if (h, w) != (size, size):
            x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False,
                              antialias=True)[0]
            vf = F.interpolate(v[None, None].float(), size=(size, size), mode="bilinear", align_corners=False,
                               antialias=True)[0, 0]
            v = vf >= CROP_VALID
        hflip, vflip = _rand(g) < cfg.flip_p, _rand(g) < cfg.flip_p
        k = int(torch.randint(0, 4, (1,), generator=g).item()) if cfg.rot90 else 0
        if hflip:
            x, v = x.flip(-1), v.flip(-1)
        if vflip:
            x, v = x.flip(-2), v.flip(-2)
        if k:
            x, v = torch.rot90(x, k, (-2, -1)), torch.rot90(v, k, (-2, -1))
        if _rand(g) < cfg.jitter_p:
            x = self._jitter(x, v, g)
        if _rand(g) < blur_p:
            x = _blur(x, cfg.blur_sigma[0] + (cfg.blur_sigma[1] - cfg.blur_sigma[0]) * _rand(g))
        if _rand(g) < solarize_p:
            x = torch.where(x >= 0.5, 1.0 - x, x)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        x = torch.where(v, (x - mean) / std, torch.zeros((), dtype=torch.float32))
        return x.contiguous(), v.contiguous()

    def _box(self, integral: torch.Tensor, height: int, width: int, scale: tuple[float, float],
             g: torch.Generator) -> tuple[int, int, int, int]:
        """A random resized crop box ``(row, col, h, w)`` with enough valid pixels, else the most valid
        one."""
        best, best_frac = (0, 0, height, width), -1.0
        for _ in range(CROP_TRIES):
            i, j, h, w = _rrc_box(height, width, scale, g)
            n = integral[i + h, j + w] - integral[i, j + w] - integral[i + h, j] + integral[i, j]
            frac = float(n) / (h * w)
            if frac >= self.cfg.min_valid_fraction:
                return i, j, h, w
            if frac > best_frac:
                best, best_frac = (i, j, h, w), frac
        return best

    def _jitter(self, x: torch.Tensor, v: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Per-band brightness (``x * b``) and contrast (about the band's valid mean), in random order."""
        n = x.shape[0]
        b, c = self.cfg.brightness, self.cfg.contrast
        fb = (1 - b + 2 * b * torch.rand(n, generator=g)).clamp_min(0).view(-1, 1, 1)
        fc = (1 - c + 2 * c * torch.rand(n, generator=g)).clamp_min(0).view(-1, 1, 1)
        brightness_first = _rand(g) < 0.5
        for step in ("b", "c") if brightness_first else ("c", "b"):
            if step == "b":
                x = (x * fb).clamp(0, 1)
            else:
                m = _band_means(x, v).view(-1, 1, 1)
                x = ((x - m) * fc + m).clamp(0, 1)
        return x


def _rand(g: torch.Generator) -> float:
    return float(torch.rand(1, generator=g).item())


def _rrc_box(height: int, width: int, scale: tuple[float, float],
             g: torch.Generator) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` on a torch generator: 10 draws, then a centre crop."""
    area = height * width
    log_lo, log_hi = math.log(ASPECT[0]), math.log(ASPECT[1])
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * _rand(g))
        ratio = math.exp(log_lo + (log_hi - log_lo) * _rand(g))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, (1,), generator=g).item())
            j = int(torch.randint(0, width - w + 1, (1,), generator=g).item())
            return i, j, h, w
    ratio = width / height
    if ratio < ASPECT[0]:
        w, h = width, round(width / ASPECT[0])
    elif ratio > ASPECT[1]:
        h, w = height, round(height * ASPECT[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _band_means(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-band means over valid pixels (over all pixels when none is valid)."""
    n = int(v.sum())
    if n == 0:
        return x.mean(dim=(1, 2))
    return (x * v).sum(dim=(1, 2)) / n


def _fill_invalid(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Invalid pixels set to the band means of the valid ones, so resizing does not darken nodata edges."""
    if bool(v.all()):
        return x
    return torch.where(v, x, _band_means(x, v).view(-1, 1, 1))


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable gaussian blur of ``(C, H, W)`` with reflect padding (radius 3σ, at most the crop side - 1).

    A weighted sum of shifted views: for these kernel sizes it is much faster than a grouped convolution on a
    CPU whose cores are shared.
    """
    radius = min(math.ceil(3 * sigma), min(x.shape[1:]) - 1)
    if radius < 1 or sigma <= 0:
        return x
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    k: list[float] = (g / g.sum()).tolist()
    for dim in (-1, -2):
        n = x.shape[dim]
        idx = torch.tensor(list(range(radius, 0, -1)) + list(range(n))
                           + list(range(n - 2, n - 2 - radius, -1)))
        y = x.index_select(dim, idx)  # reflect padding (F.pad's reflect mode is slow on small threaded CPUs)
        x = sum(k[i] * y.narrow(dim, i, n) for i in range(len(k)))  # type: ignore[assignment]
    return x


# ---------------------------------------------------------------------------------------------- dataset
class PretrainDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """Item ``index`` → the multi-crop dict of tile ``index``, a pure function of ``(seed, index)``.

    The stream is unbounded (no ``__len__``): drive it with :class:`StepBatchSampler` or :func:`index_range`.
    Items also carry ``index`` and ``meta`` (:class:`TileMeta`). With ``seed`` equal to ``source.seed`` (the
    default), the tile of item ``i`` is ``source.sample(i)``.
    """

    def __init__(self, source: TileSource, multicrop: MultiCrop, seed: int | None = None) -> None:
        self.source = source
        self.multicrop = multicrop
        self.seed = source.seed if seed is None else int(seed)
        sample_rngs(self.seed, 0)
        multicrop.check_bands(source.n_bands)

    def __getitem__(self, index: int) -> dict[str, Any]:
        tile_rng, crop_gen = sample_rngs(self.seed, index)
        tile, valid, meta = self.source.draw(tile_rng)
        out: dict[str, Any] = dict(self.multicrop(tile, valid, crop_gen))
        out.update(index=int(index), meta=meta)
        return out


def index_range(step: int, world_size: int, rank: int, batch_size: int) -> range:
    """The sample indexes of training step ``step`` on rank ``rank``: ``step·B·W + rank·B + j``, ``j < B``.

    Steps and ranks tile the index stream without gaps or overlaps, so a run resumed at step ``s`` continues
    exactly where it stopped and no two ranks ever see the same sample.
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or step < 0:
        raise ValueError(f"index_range: need step >= 0, batch_size >= 1, 0 <= rank < world_size; "
                         f"got step={step}, batch_size={batch_size}, rank={rank}, world_size={world_size}")
    start = step * batch_size * world_size + rank * batch_size
    return range(start, start + batch_size)


class StepBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of :func:`index_range` for steps ``start_step, start_step + 1, ...`` (up to ``end_step``,
    exclusive; unbounded when ``None``). Give it to ``DataLoader(batch_sampler=...)``."""

    def __init__(self, batch_size: int, *, world_size: int = 1, rank: int = 0, start_step: int = 0,
                 end_step: int | None = None) -> None:
        index_range(start_step, world_size, rank, batch_size)  # validates
        if end_step is not None and end_step < start_step:
            raise ValueError(f"end_step ({end_step}) is before start_step ({start_step})")
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.start_step, self.end_step = start_step, end_step

    def __iter__(self) -> Iterator[list[int]]:
        steps = count(self.start_step) if self.end_step is None else range(self.start_step, self.end_step)
        for s in steps:
            yield list(index_range(s, self.world_size, self.rank, self.batch_size))

    def __len__(self) -> int:
        if self.end_step is None:
            raise TypeError("an unbounded StepBatchSampler has no length; give end_step")
        return self.end_step - self.start_step


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack items crop-major: ``global_crops`` ``(2, B, C, G, G)``, ``local_crops`` ``(n_local, B, C, L, L)``
    (``(0, B, C, 0, 0)`` without local crops), ``global_valid`` ``(2, B, G, G)`` and ``local_valid``
    ``(n_local, B, L, L)`` bool, ``index`` ``(B,)`` int64, ``meta`` a list of B :class:`TileMeta`.

    ``global_crops.flatten(0, 1)`` is DINO's ``torch.cat(crops[:2])`` (all of crop 0, then all of crop 1).
    """
    if not samples:
        raise ValueError("collate: no samples")
    b = len(samples)
    n_bands = samples[0]["global_crops"][0].shape[0]

    def stack(key: str, empty: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = len(samples[0][key])
        if n == 0:
            return torch.empty((0, b, *empty), dtype=dtype)
        return torch.stack([torch.stack([s[key][c] for s in samples]) for c in range(n)])

    return {
        "global_crops": stack("global_crops", (n_bands, 0, 0), torch.float32),
        "local_crops": stack("local_crops", (n_bands, 0, 0), torch.float32),
        "global_valid": stack("global_valid", (0, 0), torch.bool),
        "local_valid": stack("local_valid", (0, 0), torch.bool),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
        "meta": [s["meta"] for s in samples],
    }
