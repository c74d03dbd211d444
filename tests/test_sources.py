"""Tests of geo_dino.inputs.sources: rasters are checked before GDAL sees them, and read windows are
padded/masked."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning

from geo_dino.config import SourceConfig
from geo_dino.errors import GeoDinoError, SourceError
from geo_dino.inputs.sources import check_source, open_raster

ROOT = Path(__file__).resolve().parents[1]
LANDSAT = ROOT / "data" / "rasters" / "landsat7_bahamas_RGB.byte.tif"
TRANSFORM = Affine(30.0, 0.0, 500_000.0, 0.0, -30.0, 2_800_000.0)


def cfg(root: Path, **kw) -> SourceConfig:
    return SourceConfig(allowed_roots=[root], **kw)


def write_tif(path: Path, data: np.ndarray, *, crs: str | None = "EPSG:32618", nodata=None,
              descriptions: list[str] | None = None, mask: np.ndarray | None = None, **profile) -> Path:
    """Write a ``(bands, rows, cols)`` array as a GeoTIFF."""
    count, height, width = data.shape
    kw = dict(driver="GTiff", height=height, width=width, count=count, dtype=data.dtype.name,
              transform=TRANSFORM, nodata=nodata)
    if crs is not None:
        kw["crs"] = crs
    kw.update(profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **kw) as dst:
            dst.write(data)
            for i, d in enumerate(descriptions or [], start=1):
                dst.set_band_description(i, d)
            if mask is not None:
                dst.write_mask(mask)
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture
def rgb(tmp_path: Path, rng) -> tuple[Path, np.ndarray]:
    data = rng.integers(1, 255, size=(3, 40, 50), dtype=np.uint8)
    return write_tif(tmp_path / "rgb.tif", data), data


# --------------------------------------------------------------------------------------------- check_source

@pytest.mark.parametrize("path", [
    "/vsicurl/https://example.com/scene.tif",
    "/VSIS3/bucket/scene.tif",
    "/vsizip//tmp/a.zip/scene.tif",
    "https://example.com/scene.tif",
    "http://example.com/scene.tif",
    "s3://bucket/scene.tif",
    "gs://bucket/scene.tif",
    "file:///etc/passwd",
    "GTIFF_RAW:http://x/y.tif",
])
def test_check_source_refuses_remote_and_virtual(tmp_path, path):
    with pytest.raises(SourceError, match="remote and virtual paths"):
        check_source(path, cfg(tmp_path))
    with pytest.raises(SourceError, match="not supported yet"):
        check_source(path, cfg(tmp_path, allow_remote=True))


def test_check_source_accepts_a_geotiff_under_the_root(tmp_path, rgb):
    path, _ = rgb
    assert check_source(path, cfg(tmp_path)) == path.resolve()
    assert check_source(str(path), cfg(tmp_path)) == path.resolve()


def test_check_source_refuses_missing_file(tmp_path):
    with pytest.raises(SourceError, match="raster not found"):
        check_source(tmp_path / "nope.tif", cfg(tmp_path))


def test_check_source_refuses_dangling_symlink(tmp_path):
    link = tmp_path / "dangling.tif"
    link.symlink_to(tmp_path / "gone.tif")
    with pytest.raises(SourceError, match="raster not found"):
        check_source(link, cfg(tmp_path))


def test_check_source_refuses_directory(tmp_path):
    d = tmp_path / "folder.tif"
    d.mkdir()
    with pytest.raises(SourceError, match="not a regular file"):
        check_source(d, cfg(tmp_path))


def test_check_source_refuses_outside_allowed_roots(tmp_path, rng):
    outside = write_tif(tmp_path / "outside" / "x.tif", rng.integers(0, 9, (1, 4, 4), dtype=np.uint8))
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(SourceError, match="outside the allowed roots"):
        check_source(outside, cfg(root))
    # a ../ path that textually starts inside the root
    with pytest.raises(SourceError, match="outside the allowed roots"):
        check_source(root / ".." / "outside" / "x.tif", cfg(root))
    # a sibling folder whose name merely starts with the root's name
    sneaky = write_tif(tmp_path / "root2" / "x.tif", rng.integers(0, 9, (1, 4, 4), dtype=np.uint8))
    with pytest.raises(SourceError, match="outside the allowed roots"):
        check_source(sneaky, cfg(root))


def test_check_source_refuses_symlink_escaping_the_root(tmp_path, rng):
    outside = write_tif(tmp_path / "outside" / "secret.tif", rng.integers(0, 9, (1, 4, 4), dtype=np.uint8))
    root = tmp_path / "root"
    root.mkdir()
    link = root / "innocent.tif"
    link.symlink_to(outside)
    with pytest.raises(SourceError, match="outside the allowed roots"):
        check_source(link, cfg(root))
    # a symlinked folder inside the root pointing outside is refused too
    (root / "dir").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(SourceError, match="outside the allowed roots"):
        check_source(root / "dir" / "secret.tif", cfg(root))
    with pytest.raises(SourceError, match="outside the allowed roots"):
        open_raster(link, cfg(root))


def test_check_source_refuses_vrt_renamed_tif(tmp_path, rgb):
    src, _ = rgb
    vrt = tmp_path / "evil.tif"
    vrt.write_text(f'<VRTDataset rasterXSize="50" rasterYSize="40">\n'
                   f'  <VRTRasterBand dataType="Byte" band="1"><SimpleSource>'
                   f'<SourceFilename relativeToVRT="0">{src}</SourceFilename><SourceBand>1</SourceBand>'
                   f'</SimpleSource></VRTRasterBand>\n</VRTDataset>\n')
    with pytest.raises(SourceError, match="VRT"):
        check_source(vrt, cfg(tmp_path))
    with pytest.raises(SourceError, match="VRT"):
        open_raster(vrt, cfg(tmp_path))
    # leading whitespace does not hide it
    vrt.write_text(" \n<VRTDataset/>")
    with pytest.raises(SourceError, match="VRT"):
        check_source(vrt, cfg(tmp_path))


@pytest.mark.parametrize(("name", "content"), [
    ("png.tif", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64),
    ("jpeg.tif", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 64),
    ("text.tif", b"hello world, not a raster"),
    ("short.tif", b"II"),
])
def test_check_source_refuses_bad_magic(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(SourceError, match="not a GeoTIFF"):
        check_source(p, cfg(tmp_path))


def test_check_source_refuses_empty_file(tmp_path):
    p = tmp_path / "empty.tif"
    p.touch()
    with pytest.raises(SourceError, match=r"not a GeoTIFF \(bad magic bytes b''\)"):
        check_source(p, cfg(tmp_path))


def test_source_errors_are_oserrors(tmp_path):
    with pytest.raises(OSError):
        check_source(tmp_path / "nope.tif", cfg(tmp_path))
    with pytest.raises(GeoDinoError):
        check_source("s3://b/k.tif", cfg(tmp_path))


# --------------------------------------------------------------------------------------------- open_raster

def test_open_raster_header(tmp_path, rgb):
    path, _ = rgb
    info = open_raster(path, cfg(tmp_path))
    assert info.grid.crs == "EPSG:32618"
    assert (info.grid.height, info.grid.width) == (40, 50)
    assert info.grid.transform == TRANSFORM
    assert (info.count, info.dtype, info.nodata, info.bands) == (3, "uint8", None, (1, 2, 3))
    assert info.band_names == ("band 1", "band 2", "band 3")
    assert info.path == str(path.resolve())
    assert not info.is_geographic
    assert open_raster(path, cfg(tmp_path), needed_bands=3).bands == (1, 2, 3)


def test_open_raster_pixel_budget(tmp_path, rng):
    path = write_tif(tmp_path / "big.tif", rng.integers(0, 255, (3, 100, 100), dtype=np.uint8))
    with pytest.raises(SourceError, match="max_pixels"):
        open_raster(path, cfg(tmp_path, max_pixels=10_000))
    with pytest.raises(SourceError, match="30,000 samples"):
        open_raster(path, cfg(tmp_path, max_pixels=29_999))
    assert open_raster(path, cfg(tmp_path, max_pixels=30_000)).count == 3


def test_open_raster_refuses_huge_declared_size_without_reading(tmp_path, monkeypatch):
    path = tmp_path / "huge.tif"
    with rasterio.open(path, "w", driver="GTiff", width=200_000, height=200_000, count=1, dtype="uint8",
                       crs="EPSG:32618", transform=TRANSFORM, tiled=True, blockxsize=4096, blockysize=4096,
                       sparse_ok=True, compress="deflate"):
        pass  # write nothing: every tile stays sparse
    assert path.stat().st_size < 1_000_000

    def boom(*a, **k):
        raise AssertionError("pixels were read")

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", boom, raising=False)
    monkeypatch.setattr(rasterio.io.DatasetReader, "read_masks", boom, raising=False)
    t0 = time.perf_counter()
    with pytest.raises(SourceError, match="max_pixels") as exc:
        open_raster(path, cfg(tmp_path))  # the default budget: 4e9 samples
    assert time.perf_counter() - t0 < 5
    assert "200000x200000x1" in str(exc.value)
    # with a budget big enough, only the header is opened
    info = open_raster(path, cfg(tmp_path, max_pixels=10**11))
    assert (info.grid.height, info.grid.width) == (200_000, 200_000)


def test_open_raster_refuses_no_crs(tmp_path, rng):
    path = write_tif(tmp_path / "nocrs.tif", rng.integers(0, 9, (3, 8, 8), dtype=np.uint8), crs=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with pytest.raises(SourceError, match="no CRS"):
            open_raster(path, cfg(tmp_path))


def test_open_raster_refuses_south_up(tmp_path, rng):
    path = write_tif(tmp_path / "southup.tif", rng.integers(0, 9, (1, 8, 8), dtype=np.uint8),
                     transform=Affine(30.0, 0.0, 500_000.0, 0.0, 30.0, 2_800_000.0))
    with pytest.raises(SourceError, match="south-up.*gdalwarp"):
        open_raster(path, cfg(tmp_path))


def test_open_raster_gcp_only_says_so(tmp_path, rng):
    """A raster georeferenced by ground control points only: it has no geotransform, and the message says
    how to grid it (not "north-up only")."""
    import rasterio
    from rasterio.control import GroundControlPoint
    from rasterio.crs import CRS

    path = tmp_path / "gcps.tif"
    gcps = [GroundControlPoint(0, 0, 500_000, 2_800_000), GroundControlPoint(0, 8, 500_240, 2_800_000),
            GroundControlPoint(8, 0, 500_000, 2_799_760)]
    with rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8") as dst:
        dst.write(rng.integers(0, 9, (1, 8, 8), dtype=np.uint8))
        dst.gcps = (gcps, CRS.from_epsg(32617))
    with pytest.raises(SourceError, match="only 3 ground control points.*gdalwarp"):
        open_raster(path, cfg(tmp_path))


def test_a_raster_too_small_for_the_patches_says_so(tiny_config, tmp_path):
    """A 5×5-pixel raster that the AOI covers entirely: the message gives the raster's size in patches and
    does not tell the user to enlarge the AOI."""
    import json

    import rasterio
    from rasterio.warp import transform_bounds

    from geo_dino.config import parse_config
    from geo_dino.errors import GeoDinoError
    from geo_dino.run import stages as pl

    with rasterio.open(ROOT / "data/rasters/landsat7_bahamas_RGB.byte.tif") as src:
        win = rasterio.windows.Window(300, 300, 5, 5)
        data = src.read(window=win)
        profile = src.profile | {"width": 5, "height": 5, "transform": src.window_transform(win)}
    small = tmp_path / "small.tif"
    with rasterio.open(small, "w", **profile) as dst:
        dst.write(data)
        w, s_, e, n = transform_bounds(dst.crs, "EPSG:4326", *dst.bounds)
    pad = 0.01
    w, s_, e, n = w - pad, s_ - pad, e + pad, n + pad
    ring = [[w, s_], [e, s_], [e, n], [w, n], [w, s_]]
    aoi = tmp_path / "aoi.geojson"
    aoi.write_text(json.dumps({"type": "Polygon", "coordinates": [ring]}))
    cfg = tiny_config(str(aoi), [small], sources={"allowed_roots": [str(tmp_path)]})
    run_dir = pl.prepare_run(parse_config(cfg))
    pl.screen_aoi(run_dir)
    pl.plan_run(run_dir)
    with pytest.raises(GeoDinoError, match=r"is 5×5 pixels: 1 patches of 16 px") as err:
        pl.fit_heads(run_dir)
    assert "enlarge" not in str(err.value)
