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
from geo_dino.inputs.grid import PixelBox
from geo_dino.inputs.sources import WindowReader, check_source, open_raster

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


@pytest.fixture
def described(tmp_path, rng) -> Path:
    data = rng.integers(0, 1000, (4, 10, 12), dtype=np.uint16)
    return write_tif(tmp_path / "desc.tif", data, descriptions=["red", "green", "blue", "NIR"])


def test_band_selection_by_index(tmp_path, described):
    info = open_raster(described, cfg(tmp_path, bands=[4, 1, 2]), needed_bands=3)
    assert info.bands == (4, 1, 2)
    assert info.band_names == ("NIR", "red", "green")


def test_band_selection_by_description(tmp_path, described):
    info = open_raster(described, cfg(tmp_path, bands=["nir", " Red ", "GREEN"]), needed_bands=3)
    assert info.bands == (4, 1, 2)
    mixed = open_raster(described, cfg(tmp_path, bands=[3, "nir"]))
    assert mixed.bands == (3, 4)


def test_band_selection_unknown_description_lists_alternatives(tmp_path, described):
    with pytest.raises(SourceError, match=r"no band described as 'swir'.*'red', 'green', 'blue', 'NIR'"):
        open_raster(described, cfg(tmp_path, bands=["red", "swir", "blue"]))


@pytest.mark.parametrize("band", [0, 5, -1])
def test_band_selection_out_of_range_lists_alternatives(tmp_path, described, band):
    with pytest.raises(SourceError, match=rf"band {band} does not exist \(the raster has bands 1\.\.4\)"):
        open_raster(described, cfg(tmp_path, bands=[1, band]))


def test_wrong_band_count_is_never_zero_filled(tmp_path, described, rgb):
    with pytest.raises(SourceError, match="has 4 bands but the backbone takes 3.*never zero-filled"):
        open_raster(described, cfg(tmp_path), needed_bands=3)
    rgb_path, _ = rgb
    with pytest.raises(SourceError, match="has 3 bands but the backbone takes 4.*never zero-filled"):
        open_raster(rgb_path, cfg(tmp_path), needed_bands=4)
    with pytest.raises(SourceError, match="2 bands selected but the backbone takes 3"):
        open_raster(described, cfg(tmp_path, bands=[1, 2]), needed_bands=3)


# --------------------------------------------------------------------------------------------- WindowReader

def _read(path: Path, root: Path, box: PixelBox, **kw) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    info = open_raster(path, cfg(root, **kw))
    with WindowReader(info) as r:
        data, valid = r.read(box)
        valid2 = r.read_valid(box)
    return data, valid, valid2


@pytest.mark.parametrize("box", [PixelBox(-5, -7, 20, 20), PixelBox(30, 40, 25, 25), PixelBox(-3, 10, 50, 10),
                                 PixelBox(10, -60, 5, 200), PixelBox(5, 5, 10, 10), PixelBox(0, 0, 40, 50)])
def test_read_pads_outside_with_invalid_zeros(tmp_path, rgb, box):
    path, arr = rgb
    data, valid, valid2 = _read(path, tmp_path, box)
    assert data.shape == (3, box.height, box.width) and data.dtype == np.uint8
    assert valid.shape == (box.height, box.width) and valid.dtype == bool
    expected = np.zeros_like(data)
    expected_valid = np.zeros(valid.shape, dtype=bool)
    inner = box.intersection(PixelBox(0, 0, 40, 50))
    rs, cs = inner.relative_to(box).slices()
    expected[:, rs, cs] = arr[(slice(None), *inner.slices())]
    expected_valid[rs, cs] = True
    np.testing.assert_array_equal(data, expected)
    np.testing.assert_array_equal(valid, expected_valid)
    np.testing.assert_array_equal(valid2, valid)


def test_read_entirely_outside(tmp_path, rgb):
    path, _ = rgb
    data, valid, valid2 = _read(path, tmp_path, PixelBox(100, 100, 8, 8))
    assert not data.any() and not valid.any() and not valid2.any()


def test_read_outside_with_block_raises(tmp_path, rgb):
    path, _ = rgb
    r = WindowReader(open_raster(path, cfg(tmp_path)))
    with pytest.raises(SourceError, match="outside its `with` block"):
        r.read(PixelBox(0, 0, 2, 2))
    with pytest.raises(SourceError, match="outside its `with` block"):
        r.read_valid(PixelBox(0, 0, 2, 2))


def test_read_selected_bands_in_order(tmp_path, described):
    with rasterio.open(described) as src:
        arr = src.read()
    data, valid, _ = _read(described, tmp_path, PixelBox(0, 0, 10, 12), bands=["nir", "red"])
    np.testing.assert_array_equal(data, arr[[3, 0]])
    assert valid.all()


def test_nodata_follows_the_dataset_mask_rule(tmp_path, rng):
    data = rng.integers(1, 255, (3, 20, 30), dtype=np.uint8)
    data[:, 0:4, 0:5] = 0          # nodata in all bands: invalid
    data[0, 10, 10] = 0            # dark in one band only: stays valid
    data[:2, 12, 12] = 0           # two of three bands: stays valid
    path = write_tif(tmp_path / "nd.tif", data, nodata=0)
    box = PixelBox(-2, -2, 24, 34)
    out, valid, valid2 = _read(path, tmp_path, box)
    expected = np.ones((20, 30), dtype=bool)
    expected[0:4, 0:5] = False
    np.testing.assert_array_equal(valid[2:22, 2:32], expected)
    assert not valid[:2].any() and not valid[:, :2].any() and not valid[22:].any() and not valid[:, 32:].any()
    assert valid[12, 12] and valid[14, 14]
    np.testing.assert_array_equal(out[:, 2:22, 2:32], data)
    np.testing.assert_array_equal(valid2, valid)


def test_nodata_on_selected_bands_only(tmp_path, rng):
    data = rng.integers(1, 255, (3, 10, 10), dtype=np.uint8)
    data[0:2, 3, 3] = 0  # nodata in bands 1 and 2, not band 3
    path = write_tif(tmp_path / "nd.tif", data, nodata=0)
    _, valid, valid2 = _read(path, tmp_path, PixelBox(0, 0, 10, 10), bands=[1, 2])
    assert not valid[3, 3] and valid.sum() == 99
    np.testing.assert_array_equal(valid2, valid)
    _, valid, _ = _read(path, tmp_path, PixelBox(0, 0, 10, 10))
    assert valid.all()


def test_internal_mask_marks_pixels_invalid(tmp_path, rng):
    data = rng.integers(1, 255, (3, 16, 16), dtype=np.uint8)
    mask = np.full((16, 16), 255, dtype=np.uint8)
    mask[5:9, 2:12] = 0
    path = write_tif(tmp_path / "masked.tif", data, mask=mask)
    assert not (tmp_path / "masked.tif.msk").exists()  # the mask is inside the TIFF
    out, valid, valid2 = _read(path, tmp_path, PixelBox(0, 0, 16, 16))
    np.testing.assert_array_equal(valid, mask > 0)
    np.testing.assert_array_equal(valid2, valid)
    np.testing.assert_array_equal(out, data)


def test_float_nan_is_invalid(tmp_path, rng):
    data = rng.normal(size=(2, 12, 14)).astype(np.float32)
    data[0, 1, 1] = np.nan       # NaN in one band: invalid
    data[:, 2, 3] = np.nan       # NaN in all bands: invalid
    data[1, 4, 5] = np.inf       # inf: invalid
    path = write_tif(tmp_path / "f.tif", data)
    box = PixelBox(-1, 0, 14, 14)
    out, valid, valid2 = _read(path, tmp_path, box)
    expected = np.ones((12, 14), dtype=bool)
    expected[1, 1] = expected[2, 3] = expected[4, 5] = False
    np.testing.assert_array_equal(valid[1:13], expected)
    assert not valid[0].any() and not valid[13].any()
    np.testing.assert_array_equal(out[:, 1:13], data)  # NaNs compare equal in assert_array_equal
    np.testing.assert_array_equal(valid2, valid)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32"])
def test_dtypes_preserved(tmp_path, rng, dtype):
    info_ = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    if info_ is not None:
        data = rng.integers(info_.min, info_.max, size=(3, 9, 11), dtype=dtype, endpoint=True)
        data[0, 0, :3] = [info_.min, info_.max, 0]
    else:
        data = (rng.normal(size=(3, 9, 11)) * 1e4).astype(dtype)
        data[0, 0, :3] = [np.finfo(np.float32).max, -1e-30, 0.0]
    path = write_tif(tmp_path / f"{dtype}.tif", data)
    info = open_raster(path, cfg(tmp_path))
    assert info.dtype == dtype
    with WindowReader(info) as r:
        out, valid = r.read(PixelBox(0, 0, 9, 11))
        part, _ = r.read(PixelBox(-1, 2, 4, 4))
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, data)
    assert valid.all()
    np.testing.assert_array_equal(part[:, 1:], data[:, 0:3, 2:6])
    assert not part[:, 0].any()


def test_sample_stats_match_numpy_on_valid_pixels(tmp_path, rng):
    data = rng.integers(1, 4000, (3, 60, 80), dtype=np.uint16)
    data[:, :10, :] = 0  # a nodata strip (all bands)
    path = write_tif(tmp_path / "s.tif", data, nodata=0)
    info = open_raster(path, cfg(tmp_path))
    with WindowReader(info) as r:
        stats = r.sample_stats((2.0, 98.0))
        valid = r.read_valid(info.grid.box)
    assert stats.shape == (3, 2)
    for b in range(3):
        expected = np.percentile(data[b][valid], (2.0, 98.0))
        np.testing.assert_allclose(stats[b], expected, rtol=1e-9)
        assert stats[b, 0] > 0  # nodata excluded


def test_sample_stats_use_the_same_valid_pixels_as_read(tmp_path, rng):
    """A pixel 0 in one band only (dark water in red) is valid for read(), so its 0 counts in the stats;
    a NaN in one band invalidates the whole pixel for every band's stats, as in read()."""
    data = rng.integers(1, 255, (3, 30, 40), dtype=np.uint8)
    data[0, :15, :] = 0  # red is 0 in the top half, the other bands are not: valid pixels
    data[:, 25:, :] = 0  # all bands 0: nodata
    path = write_tif(tmp_path / "water.tif", data, nodata=0)
    info = open_raster(path, cfg(tmp_path))
    with WindowReader(info) as r:
        stats = r.sample_stats((10.0, 90.0))
        _, valid = r.read(info.grid.box)
    assert valid.sum() == 25 * 40
    for b in range(3):
        np.testing.assert_allclose(stats[b], np.percentile(data[b][valid], (10.0, 90.0)))
    assert stats[0, 0] == 0  # the dark-water zeros are data, not nodata

    f = rng.normal(50.0, 5.0, size=(2, 20, 20)).astype(np.float32)
    f[0, :10, :] = np.nan  # band 1 NaN in the top half: those pixels are invalid for read()
    f[1, :10, :] = -1000.0  # band 2 holds outliers there that must not reach the stats
    path = write_tif(tmp_path / "nan.tif", f)
    info = open_raster(path, cfg(tmp_path))
    with WindowReader(info) as r:
        stats = r.sample_stats((0.0, 100.0))
        _, valid = r.read(info.grid.box)
    for b in range(2):
        np.testing.assert_allclose(stats[b], np.percentile(f[b][valid], (0.0, 100.0)), rtol=1e-6)
    assert stats[1, 0] > 0


def test_sample_stats_decimated_are_close(tmp_path, rng):
    data = rng.normal(100.0, 20.0, size=(2, 300, 400)).astype(np.float32)
    data[1, 0:50, 0:50] = np.nan
    path = write_tif(tmp_path / "s.tif", data)
    info = open_raster(path, cfg(tmp_path))
    with WindowReader(info) as r:
        stats = r.sample_stats((5.0, 95.0), max_side=100)
    for b in range(2):
        vals = data[b][np.isfinite(data[b])]
        expected = np.percentile(vals, (5.0, 95.0))
        np.testing.assert_allclose(stats[b], expected, rtol=0.05)
    assert np.all(np.isfinite(stats))


def test_sample_stats_refuses_a_band_without_valid_pixel(tmp_path):
    data = np.zeros((1, 8, 8), dtype=np.uint8)
    path = write_tif(tmp_path / "empty.tif", data, nodata=0)
    info = open_raster(path, cfg(tmp_path))
    with WindowReader(info) as r, pytest.raises(SourceError, match="no valid pixel"):
        r.sample_stats((2.0, 98.0))


# --------------------------------------------------------------------------------------------- real data

def test_bundled_landsat_scene():
    info = open_raster(LANDSAT, cfg(ROOT))
    assert info.grid.crs == "EPSG:32618"
    assert (info.grid.width, info.grid.height) == (791, 718)
    assert info.bands == (1, 2, 3)
    assert info.dtype == "uint8" and info.nodata == 0
    assert info.grid.res == pytest.approx((300.0379266750948, 300.041782729805))
    with WindowReader(info) as r:
        data, valid = r.read(PixelBox(0, 0, 64, 64))
        assert not valid.all() and not valid[0, 0]  # the scene's nodata corner
        assert np.all(data[:, ~valid] == 0)
        mid, mid_valid = r.read(PixelBox(327, 363, 64, 64))
        assert mid_valid.any()
        assert mid[:, mid_valid].max() > 0
        np.testing.assert_array_equal(r.read_valid(PixelBox(0, 0, 64, 64)), valid)
    with rasterio.open(LANDSAT) as src:
        np.testing.assert_array_equal(data, src.read(window=PixelBox(0, 0, 64, 64).to_rasterio()))


def _vrt_text(target: Path, relative: bool = False) -> str:
    name = target.name if relative else str(target)
    return f"""<VRTDataset rasterXSize="20" rasterYSize="10">
  <SRS>EPSG:32618</SRS>
  <GeoTransform>500000, 10, 0, 2800000, 0, -10</GeoTransform>
  <VRTRasterBand dataType="Byte" band="1">
    <SimpleSource>
      <SourceFilename relativeToVRT="{int(relative)}">{name}</SourceFilename>
      <SourceBand>1</SourceBand>
    </SimpleSource>
  </VRTRasterBand>
</VRTDataset>"""


def test_vrt_allowed_only_when_its_sources_are(tmp_path):
    import rasterio as rio
    from affine import Affine

    from geo_dino.inputs.sources import check_source, open_raster

    inside = tmp_path / "in"
    inside.mkdir()
    tif = inside / "src.tif"
    with rio.open(tif, "w", driver="GTiff", width=20, height=10, count=1, dtype="uint8", crs="EPSG:32618",
                  transform=Affine(10, 0, 500000, 0, -10, 2800000)) as dst:
        dst.write(np.arange(200, dtype=np.uint8).reshape(1, 10, 20))
    vrt = inside / "ok.tif"
    vrt.write_text(_vrt_text(tif, relative=True))
    cfg = SourceConfig(allowed_roots=[inside], allow_vrt=True)
    info = open_raster(vrt, cfg)
    assert (info.grid.width, info.grid.height) == (20, 10)
    with pytest.raises(SourceError, match="VRT"):
        check_source(vrt, SourceConfig(allowed_roots=[inside]))  # not allowed by default
    outside = tmp_path / "secret.tif"
    outside.write_bytes(tif.read_bytes())
    sneaky = inside / "sneaky.tif"
    sneaky.write_text(_vrt_text(outside))
    with pytest.raises(SourceError, match="allowed roots"):
        check_source(sneaky, cfg)
    remote = inside / "remote.tif"
    remote.write_text(_vrt_text(tif).replace(str(tif), "/vsicurl/https://example.com/x.tif"))
    with pytest.raises(SourceError, match="not a local file"):
        check_source(remote, cfg)
    code = inside / "code.tif"
    code.write_text(_vrt_text(tif, relative=True).replace("<SimpleSource>",
                    "<PixelFunctionLanguage>Python</PixelFunctionLanguage><SimpleSource>"))
    with pytest.raises(SourceError, match="pixel functions"):
        check_source(code, cfg)


def test_a_band_selected_twice_reads_the_same_pixels_every_time(tmp_path):
    """A panchromatic band repeated for an RGB backbone (``sources.bands: [1, 1, 1]``): every copy equals the
    band read alone, on every read, windowed, in strips and decimated. (Asked of GDAL in one request with
    repeated indexes, under the reader's multi-threaded environment, a striped uint16 GeoTIFF like SpaceNet's
    came back with copies that differed from each other and from one read to the next.)"""
    import rasterio
    from rasterio.transform import from_origin

    from geo_dino.config import SourceConfig
    from geo_dino.inputs.grid import PixelBox
    from geo_dino.inputs.sources import WindowReader, open_raster

    data = np.random.default_rng(0).integers(1, 2000, (1, 900, 900)).astype(np.uint16)
    path = tmp_path / "pan.tif"
    with rasterio.open(path, "w", driver="GTiff", dtype="uint16", nodata=0, width=900, height=900, count=1,
                       crs="EPSG:32616", transform=from_origin(733601, 3725139, 0.5, 0.5), tiled=False,
                       blockxsize=900, blockysize=4, interleave="band") as dst:
        dst.write(data)
    info = open_raster(path, SourceConfig(allowed_roots=[tmp_path], bands=[1, 1, 1]))
    assert info.bands == (1, 1, 1)
    boxes = [PixelBox(64 * k, 0, 64, 900) for k in range(14)]
    with WindowReader(info) as r:
        for _ in range(4):
            for (got, valid), box in zip(r.read_many(boxes), boxes, strict=True):
                want = np.zeros((box.height, box.width), np.uint16)
                rows = min(box.row_end, 900) - box.row_off
                want[:rows] = data[0, box.row_off:box.row_off + rows]
                assert all(np.array_equal(got[k], want) for k in range(3))
                assert valid[:rows].all() and not valid[rows:].any()
        small, ok = r.decimated(90, 90)
        assert small is not None and small.shape == (3, 90, 90) and ok.all()
        assert np.array_equal(small[0], small[2])


@pytest.mark.parametrize("bands", [[1, 1, 1], [1, 1, 2], [2, 1, 2]])
def test_repeated_bands_read_with_threads_equal_a_single_threaded_read(tmp_path, bands):
    """Issue "first hour" item 9: with GDAL's multi-threaded decoding (the reader's default), a request that
    names a band twice corrupted the read. Each selection, read with threads, equals the same selection read
    one band at a time on one thread, values and validity (nodata pixels stay invalid)."""
    import rasterio
    from rasterio.transform import from_origin

    from geo_dino.config import SourceConfig
    from geo_dino.inputs.grid import PixelBox
    from geo_dino.inputs.sources import WindowReader, open_raster

    rng = np.random.default_rng(1)
    data = rng.integers(1, 3000, (2, 600, 700)).astype(np.uint16)
    data[:, 100:180, 200:330] = 0  # a nodata hole
    path = tmp_path / "two.tif"
    with rasterio.open(path, "w", driver="GTiff", dtype="uint16", nodata=0, width=700, height=600, count=2,
                       crs="EPSG:32616", transform=from_origin(0, 600, 1, 1), tiled=False, blockxsize=700,
                       blockysize=4, interleave="band") as dst:
        dst.write(data)
    info = open_raster(path, SourceConfig(allowed_roots=[tmp_path], bands=bands))
    boxes = [PixelBox(64 * k, 0, 64, 700) for k in range(10)]
    with WindowReader(info) as threaded, WindowReader(info, threads=1) as single:
        for _ in range(3):
            for (a, va), (b, vb) in zip(threaded.read_many(boxes), single.read_many(boxes), strict=True):
                assert np.array_equal(a, b) and np.array_equal(va, vb)
    with rasterio.open(path) as src:  # and both equal the bands read one at a time
        want = np.stack([src.read(b, window=((0, 64), (0, 700))) for b in bands])
    with WindowReader(info) as r:
        got, valid = r.read(PixelBox(0, 0, 64, 700))
    assert np.array_equal(got, want)
    with WindowReader(info) as r:
        _, hole = r.read(PixelBox(100, 200, 80, 130))
    assert not hole.any()  # the nodata hole is invalid in every read


@pytest.mark.parametrize("url", ["https://127.0.0.1/scene.tif", "http://example.org/a.tif",
                                 "file:///tmp/scene.tif", "s3://bucket/key.tif", "gs://bucket/key.tif",
                                 "  HTTPS://127.0.0.1/x.tif"])
def test_a_url_as_a_raster_aoi_or_checkpoint_is_refused_before_path_mangles_it(url):
    """``Path("https://h/x")`` is the local path ``https:/h/x``: the URL is caught on the raw string."""
    from geo_dino.config import parse_config
    from geo_dino.errors import ConfigError

    base = {"aoi": "aoi/pucallpa.geojson", "rasters": ["data/rasters/landsat7_bahamas_RGB.byte.tif"]}
    for key, cfg in (("rasters[0]", base | {"rasters": [url]}), ("aoi", base | {"aoi": url}),
                     ("backbone.checkpoint", base | {"backbone": {"checkpoint": url}})):
        with pytest.raises(ConfigError, match="is a URL; geo_dino reads local files only") as err:
            parse_config(cfg)
        assert key in str(err.value)
    assert parse_config(base).rasters  # a local path still passes


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


def test_the_known_extrasamples_notice_is_not_logged(caplog):
    """The bundled Pucallpa scenes make libtiff log an ExtraSamples notice at every open: it is filtered
    out, other GDAL warnings are not."""
    import logging

    from geo_dino.config import SourceConfig

    path = ROOT / "data/rasters/pucallpa/landsat_pucallpa_1985.tif"
    with caplog.at_level(logging.WARNING, logger="rasterio._env"):
        info = open_raster(path, SourceConfig(allowed_roots=[ROOT / "data"], bands=[1, 2, 3]))
        with WindowReader(info) as r:
            r.read(PixelBox(0, 0, 32, 32))
        logging.getLogger("rasterio._env").warning("CPLE_AppDefined in x.tif: another warning")
    messages = [r.getMessage() for r in caplog.records]
    assert not any("ExtraSamples" in m for m in messages)
    assert any("another warning" in m for m in messages)
