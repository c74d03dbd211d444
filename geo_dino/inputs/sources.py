"""Raster sources, opened safely.

A user string never reaches GDAL unchecked: the scheme, the location (under an allowed root), the file's
magic bytes, the driver (GTiff only, which reads COGs) and the pixel budget are checked before any pixel is
read. Reads are windowed, inside :func:`gdal_env`, and honour nodata and internal masks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from geo_dino.config import SourceConfig
from geo_dino.errors import SourceError
from geo_dino.inputs.grid import Grid, PixelBox

ALLOWED_DRIVERS = ("GTiff",)
_REMOTE_PREFIXES = ("/vsi", "http://", "https://", "ftp://", "s3://", "gs://", "az://", "file://")


class _KnownTiffNotice(logging.Filter):
    """Drop libtiff's notice about ExtraSamples on RGB+N TIFFs written without that tag (the bundled Pucallpa
    scenes, and many exports): GDAL reads the fourth band as it should, so the notice, repeated at every
    open, only buries the run's own messages."""

    NOTICE = "Sum of Photometric type-related color channels and ExtraSamples doesn't match SamplesPerPixel"

    def filter(self, record: logging.LogRecord) -> bool:
        return self.NOTICE not in record.getMessage()


logging.getLogger("rasterio._env").addFilter(_KnownTiffNotice())
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def gdal_env():  # noqa: ANN201 - rasterio imported lazily
    """The scoped GDAL environment of every read: no network, no sidecar probing, a bounded block cache."""
    import rasterio

    return rasterio.Env(
        GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR",
        CPL_VSIL_CURL_ALLOWED_EXTENSIONS=".tif,.tiff",
        GDAL_HTTP_MAX_RETRY="0",
        GDAL_CACHEMAX=256 * 2**20,  # bytes (rasterio hands an int to GDALSetCacheMax64; 256 would be 256 B)
        GDAL_NUM_THREADS="ALL_CPUS",
    )


def check_source(path: str | Path, cfg: SourceConfig, _depth: int = 0) -> Path:
    """Refuse anything but a local GeoTIFF under an allowed root (unless the config allows more).

    With ``sources.allow_vrt`` a VRT is accepted when every file it references passes these checks too.
    """
    s = str(path)
    if s.lower().startswith(_REMOTE_PREFIXES) or "://" in s:
        if not cfg.allow_remote:
            raise SourceError(f"{s}: remote and virtual paths (/vsi*, URLs) are refused; copy the file under "
                              "an allowed root or set sources.allow_remote: true")
        raise SourceError(f"{s}: remote sources are not supported yet; download the file first")
    p = Path(s)
    try:
        real = p.resolve(strict=True)
    except FileNotFoundError:
        raise SourceError(f"{s}: raster not found") from None
    except (OSError, RuntimeError) as exc:  # permission denied, symlink loops
        raise SourceError(f"{s}: cannot be resolved: {exc}") from None
    if not real.is_file():
        raise SourceError(f"{s}: not a regular file")
    roots = [Path(r).resolve() for r in cfg.allowed_roots]
    if not any(real.is_relative_to(r) for r in roots):
        raise SourceError(f"{s}: outside the allowed roots {[str(r) for r in roots]}; move the file or add "
                          "its folder to sources.allowed_roots")
    with real.open("rb") as fh:
        head = fh.read(64)
    if head[:4] not in _TIFF_MAGIC:
        if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<"):
            if not cfg.allow_vrt:
                raise SourceError(f"{s}: looks like a VRT/XML file, not a GeoTIFF; VRTs are refused "
                                  "(set sources.allow_vrt: true to allow them)")
            _check_vrt(real, cfg, _depth)
            return real
        raise SourceError(f"{s}: not a GeoTIFF (bad magic bytes {head[:4]!r}); only GeoTIFF/COG is read")
    return real


_VRT_MAX_BYTES = 10_000_000


def _check_vrt(path: Path, cfg: SourceConfig, depth: int) -> None:
    """An allowed VRT may only reference files that pass :func:`check_source` themselves (no URLs, /vsi*,
    files outside the allowed roots, nested VRTs beyond two levels, or pixel functions running code)."""
    import xml.etree.ElementTree as ET

    if depth > 2:
        raise SourceError(f"{path}: VRTs nested more than two levels deep are refused")
    if path.stat().st_size > _VRT_MAX_BYTES:
        raise SourceError(f"{path}: VRT larger than {_VRT_MAX_BYTES:,} bytes")
    try:
        root = ET.fromstring(path.read_bytes())
    except ET.ParseError as exc:
        raise SourceError(f"{path}: not a valid VRT ({exc})") from None
    if root.tag != "VRTDataset":
        raise SourceError(f"{path}: XML but not a VRTDataset")
    for el in root.iter():
        if el.tag in ("PixelFunctionCode", "PixelFunctionLanguage"):
            raise SourceError(f"{path}: VRT pixel functions with code are refused")
    sources = list(root.iter("SourceFilename"))
    if not sources:
        raise SourceError(f"{path}: VRT references no source file")
    for el in sources:
        name = (el.text or "").strip()
        rel = el.get("relativeToVRT", "0") == "1"
        target = (path.parent / name) if rel else Path(name)
        if "://" in name or name.lower().startswith("/vsi") or (not rel and not target.is_absolute()):
            raise SourceError(f"{path}: VRT source {name!r} is not a local file path")
        check_source(target, cfg, _depth=depth + 1)


def _driver_for(real: Path) -> str:
    """The one GDAL driver a checked file may be opened with (GDAL tries no other)."""
    with real.open("rb") as fh:
        return "GTiff" if fh.read(4) in _TIFF_MAGIC else "VRT"


@dataclass(frozen=True)
class RasterInfo:
    """What the pipeline knows of a source before reading pixels."""

    path: str
    grid: Grid
    count: int
    dtype: str
    nodata: float | None
    bands: tuple[int, ...]  # the selected bands, 1-based
    band_names: tuple[str, ...]
    # read through a warp onto ``grid`` (a second date on another grid, reprojected explicitly): the source's
    # own grid and the resampling; None: read as it is
    warped_from: Grid | None = None
    resampling: str = "bilinear"
    # the bands of the spectral part (label-free spectral change, heads' per-pixel spectral input), 1-based:
    # every band unless ``sources.spectral_bands`` narrows them; () = the backbone's bands
    spectral_bands: tuple[int, ...] = ()
    spectral_names: tuple[str, ...] = ()

    def spectral(self) -> RasterInfo:
        """This source with its spectral bands selected (for a :class:`WindowReader` of those bands)."""
        import dataclasses

        if not self.spectral_bands:
            return self
        return dataclasses.replace(self, bands=self.spectral_bands, band_names=self.spectral_names)

    @property
    def is_geographic(self) -> bool:
        """Whether the grid's CRS is geographic (degrees, not metres)."""
        from pyproj import CRS

        return CRS.from_user_input(self.grid.crs).is_geographic


def _select_bands(requested: list[int | str] | None, count: int, descriptions: tuple[str | None, ...],
                  path: str, needed: int | None) -> tuple[int, ...]:
    if requested is None:
        if needed is not None and count != needed:
            raise SourceError(f"{path}: has {count} bands but the backbone takes {needed}; choose them "
                              f"explicitly with sources.bands (1-based indexes or descriptions), e.g. "
                              f"{list(range(1, needed + 1))} — missing bands are never zero-filled")
        return tuple(range(1, count + 1))
    out = []
    names = [(d or "").strip().lower() for d in descriptions]
    for b in requested:
        if isinstance(b, int):
            if not 1 <= b <= count:
                raise SourceError(f"{path}: band {b} does not exist (the raster has bands 1..{count})")
            out.append(b)
        else:
            key = b.strip().lower()
            if key not in names:
                raise SourceError(f"{path}: no band described as {b!r}; descriptions are "
                                  f"{[d for d in descriptions]}")
            out.append(names.index(key) + 1)
    if needed is not None and len(out) != needed:
        raise SourceError(f"{path}: {len(out)} bands selected but the backbone takes {needed}")
    return tuple(out)


def open_raster(path: str | Path, cfg: SourceConfig, *, needed_bands: int | None = None) -> RasterInfo:
    """Check and open a raster's header (no pixel read); enforce driver and pixel budget."""
    import rasterio

    real = check_source(path, cfg)
    with gdal_env():
        try:
            with rasterio.open(real, driver=_driver_for(real)) as src:
                if src.driver not in ALLOWED_DRIVERS + ("VRT",):
                    raise SourceError(f"{path}: driver {src.driver} is not allowed")
                budget = src.width * src.height * src.count
                if budget > cfg.max_pixels:
                    raise SourceError(f"{path}: {src.width}x{src.height}x{src.count} = {budget:,} samples "
                                      f"exceeds the budget sources.max_pixels = {cfg.max_pixels:,}")
                gcps, _ = src.gcps
                if gcps and src.transform.is_identity:
                    raise SourceError(f"{path}: has no geotransform, only {len(gcps)} ground control points; "
                                      "warp it onto a grid first, e.g. gdalwarp -t_srs EPSG:<code> "
                                      f"{Path(path).name} gridded.tif")
                if src.crs is None:
                    raise SourceError(f"{path}: has no CRS; georeference it first")
                t = src.transform
                if t.b or t.d:
                    raise SourceError(f"{path}: rotated/sheared geotransforms are not supported; "
                                      "warp it first (gdalwarp -t_srs <its CRS> in.tif north_up.tif)")
                if t.e >= 0:
                    raise SourceError(f"{path}: the raster is south-up (its y pixel size is positive); warp "
                                      "it north-up first: gdalwarp -t_srs <its CRS> in.tif north_up.tif")
                if len(set(src.dtypes)) != 1:
                    raise SourceError(f"{path}: bands of mixed data types {src.dtypes}")
                if src.dtypes[0] not in ("uint8", "uint16", "int16", "uint32", "int32", "float32", "float64"):
                    raise SourceError(f"{path}: data type {src.dtypes[0]} is not supported (real-valued "
                                      "uint8/16/32, int16/32 or float32/64 only); convert it, e.g. "
                                      "gdal_translate -ot Int16 (int8) or -ot Float32 (complex: take the "
                                      "amplitude first)")
                bands = _select_bands(cfg.bands, src.count, src.descriptions, str(path), needed_bands)
                spectral = _select_bands(cfg.spectral_bands, src.count, src.descriptions, str(path), None)
                epsg = src.crs.to_epsg()
                crs = f"EPSG:{epsg}" if epsg else src.crs.to_wkt()
                return RasterInfo(
                    path=str(real),
                    grid=Grid(src.height, src.width, src.transform, crs),
                    count=src.count,
                    dtype=src.dtypes[0],
                    nodata=src.nodata,
                    bands=bands,
                    band_names=tuple(src.descriptions[b - 1] or f"band {b}" for b in bands),
                    spectral_bands=spectral,
                    spectral_names=tuple(src.descriptions[b - 1] or f"band {b}" for b in spectral),
                )
        except rasterio.errors.RasterioIOError as exc:
            raise SourceError(f"{path}: cannot be opened as a GeoTIFF: {exc}") from None


def _valid_from_masks(masks: np.ndarray) -> np.ndarray:
    """GDAL's dataset-mask rule: a pixel is nodata when every selected band is masked (nodata value,
    internal mask or alpha); one band happening to hold the nodata value (dark water in red) stays valid."""
    return np.any(masks > 0, axis=0)


class WindowReader:
    """One dataset handle (not thread-safe: one reader per worker) reading padded windows."""

    def __init__(self, info: RasterInfo, *, threads: int | None = None) -> None:
        """``threads``: GTiff block-decoding threads for this handle (open option ``NUM_THREADS``); None uses
        ``GDAL_NUM_THREADS`` (all CPUs). ``threads=1`` decodes on the calling thread and never touches GDAL's
        process-wide thread pool: a process forked after the parent used that pool (a DataLoader worker) waits
        forever for threads that do not exist in the child."""
        self.info = info
        self.threads = threads
        self._env: Any = None  # rasterio.Env while inside the `with` block (rasterio ships no type stubs)
        self._src: Any = None  # the open rasterio dataset (or WarpedVRT) while inside the `with` block

    def __enter__(self) -> WindowReader:
        import rasterio

        self._env = gdal_env()
        self._env.__enter__()
        opts = {"NUM_THREADS": str(self.threads)} if self.threads else {}
        self._src = rasterio.open(self.info.path, driver=_driver_for(Path(self.info.path)), **opts)
        self._base: Any = None  # the source dataset under a WarpedVRT, when the raster is warped on read
        if self.info.warped_from is not None:  # windows of the target grid, warped from the source on read
            from rasterio.enums import Resampling
            from rasterio.vrt import WarpedVRT

            g = self.info.grid
            self._base, self._src = self._src, WarpedVRT(
                self._src, crs=g.crs, transform=g.transform, width=g.width, height=g.height,
                resampling=Resampling[self.info.resampling])
        self._mask_mode = self._choose_mask_mode()
        return self

    def _choose_mask_mode(self) -> str:
        """How validity is found: ``all_valid`` (no mask), ``nodata`` (compared in the values already read,
        no second read) or ``masks`` (internal masks / alpha: GDAL's mask bands are read)."""
        from rasterio.enums import MaskFlags

        flags = [set(self._src.mask_flag_enums[b - 1]) for b in self.info.bands]
        if all(f == {MaskFlags.all_valid} for f in flags):
            return "all_valid"
        if all(f == {MaskFlags.nodata} for f in flags):
            return "nodata"
        return "masks"

    def _read(self, masks: bool = False, **kwargs: Any) -> np.ndarray:
        """The selected bands (or their masks) in order, each distinct band read once.

        A band may be selected more than once (a panchromatic band repeated for an RGB backbone); GDAL is
        asked for each band once and the copies are made here: with repeated band indexes in one request,
        rasterio returned bands that differed from each other and from one read to the next (measured on a
        uint16 GeoTIFF: ``read([1, 1, 1])``)."""
        bands = list(self.info.bands)
        unique = sorted(set(bands))
        how = self._src.read_masks if masks else self._src.read
        if len(unique) == len(bands):
            return how(bands, **kwargs)
        if "out_shape" in kwargs:
            kwargs["out_shape"] = (len(unique), *kwargs["out_shape"][1:])
        arr = how(unique, **kwargs)
        return arr[[unique.index(b) for b in bands]]

    def _valid(self, arr: np.ndarray, window) -> np.ndarray:  # noqa: ANN001
        if self._mask_mode == "all_valid":
            ok = np.ones(arr.shape[1:], dtype=bool)
        elif self._mask_mode == "nodata":
            ok = np.zeros(arr.shape[1:], dtype=bool)
            for k, b in enumerate(self.info.bands):
                nd = self._src.nodatavals[b - 1]
                ok |= ~np.isnan(arr[k]) if nd is not None and np.isnan(nd) else arr[k] != nd
        else:
            ok = _valid_from_masks(self._read(masks=True, window=window))
        if np.issubdtype(arr.dtype, np.floating):
            ok &= np.all(np.isfinite(arr), axis=0)
        return ok

    def __exit__(self, *exc: object) -> None:
        if self._src is not None:
            self._src.close()
        if getattr(self, "_base", None) is not None:
            self._base.close()
        if self._env is not None:
            self._env.__exit__(*exc)

    def read(self, box: PixelBox) -> tuple[np.ndarray, np.ndarray]:
        """``(data, valid)``: data ``(bands, h, w)`` in the source dtype, valid ``(h, w)`` bool.

        Parts of ``box`` outside the raster are padded with zeros and marked invalid. A pixel is valid when
        at least one selected band is unmasked (GDAL's dataset-mask rule) and no band is NaN/inf.
        """
        if self._src is None:
            raise SourceError("WindowReader used outside its `with` block")
        info = self.info
        data = np.zeros((len(info.bands), box.height, box.width), dtype=info.dtype)
        valid = np.zeros((box.height, box.width), dtype=bool)
        inner = box.intersection(info.grid.box)
        if inner is None:
            return data, valid
        rel = inner.relative_to(box)
        w = inner.to_rasterio()
        import rasterio.errors

        try:
            arr = self._read(window=w)
            ok = self._valid(arr, w)
        except rasterio.errors.RasterioError as exc:  # a truncated or corrupt file: its blocks cannot be read
            raise SourceError(f"{info.path}: pixels {inner.row_off}..{inner.row_end} × {inner.col_off}.."
                              f"{inner.col_end} cannot be read ({str(exc).splitlines()[0]}); the file is "
                              "truncated or corrupt — copy it again (check its size and sha256)") from None
        rs, cs = rel.slices()
        data[:, rs, cs] = arr
        valid[rs, cs] = ok
        return data, valid

    def read_many(self, boxes: list[PixelBox]) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`read` for many boxes: boxes on the same rows (a row of tiles) are read as one strip, so
        blocks shared by overlapping tiles are decoded once and GDAL is called once per strip."""
        out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(boxes)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, b in enumerate(boxes):
            groups.setdefault((b.row_off, b.height), []).append(i)
        for (row, height), idx in groups.items():
            c0 = min(boxes[i].col_off for i in idx)
            c1 = max(boxes[i].col_end for i in idx)
            if c1 - c0 > 2 * sum(boxes[i].width for i in idx):  # sparse: a strip would read mostly waste
                for i in idx:
                    out[i] = self.read(boxes[i])
                continue
            data, valid = self.read(PixelBox(row, c0, height, c1 - c0))
            for i in idx:
                a = boxes[i].col_off - c0
                out[i] = (data[:, :, a:a + boxes[i].width], valid[:, a:a + boxes[i].width])
        return out  # type: ignore[return-value]

    def read_valid(self, box: PixelBox) -> np.ndarray:
        """The validity mask alone (nodata and internal masks), for the final pass."""
        if self._src is None:
            raise SourceError("WindowReader used outside its `with` block")
        valid = np.zeros((box.height, box.width), dtype=bool)
        inner = box.intersection(self.info.grid.box)
        if inner is None:
            return valid
        w = inner.to_rasterio()
        rs, cs = inner.relative_to(box).slices()
        if self._mask_mode == "masks" and not np.issubdtype(np.dtype(self.info.dtype), np.floating):
            valid[rs, cs] = _valid_from_masks(self._read(masks=True, window=w))
        else:
            valid[rs, cs] = self._valid(self._read(window=w), w)
        return valid

    def decimated(self, height: int, width: int, *,
                  values: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
        """The whole raster read at ``height`` × ``width`` (bounded memory): ``(data or None, valid)``, with
        the same validity as :meth:`read` (GDAL's dataset-mask rule, no band NaN/inf). ``values=False`` reads
        the data only when it is needed for validity (floating-point rasters)."""
        if self._src is None:
            raise SourceError("WindowReader used outside its `with` block")
        shape = (len(self.info.bands), height, width)
        ok = _valid_from_masks(self._read(masks=True, out_shape=shape))
        arr = None
        if values or np.dtype(self.info.dtype).kind == "f":
            arr = self._read(out_shape=shape)
            if arr.dtype.kind == "f":
                ok &= np.all(np.isfinite(arr), axis=0)
        return arr, ok

    def sample_stats(self, percentiles: tuple[float, float], max_side: int = 1024) -> np.ndarray:
        """Per-band percentiles ``(bands, 2)`` of valid pixels from a decimated read (bounded memory)."""
        g = self.info.grid
        f = max(1, math.ceil(max(g.height, g.width) / max_side))
        arr, ok = self.decimated(max(1, g.height // f), max(1, g.width // f))
        if arr is None:  # never with values=True (the default): the data is always read
            raise SourceError(f"{self.info.path}: no pixel values read for the percentiles")
        shape = arr.shape
        out = np.zeros((shape[0], 2), dtype=np.float64)
        for b in range(shape[0]):
            vals = arr[b][ok]
            if vals.size == 0:
                raise SourceError(f"{self.info.path}: band {self.info.bands[b]} has no valid pixel")
            out[b] = np.percentile(vals, percentiles)
        return out
