"""Tests of geo_dino.training.pretrain_data: streamed nodata/AOI-aware tiles, multi-crop, the indexed dataset.

Rasters are written with rasterio into ``tmp_path`` (seeded) or are the bundled Landsat scenes; AOIs are
checked against geometry projected here with pyproj, independently of the code under test.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
import torch
from affine import Affine
from pyproj import Transformer
from shapely.geometry import shape

from geo_dino.errors import AOIError, ConfigError
from geo_dino.inputs.grid import PixelBox
from geo_dino.training.pretrain_config import MultiCropConfig, PretrainDataConfig
from geo_dino.training.pretrain_data import (
    MultiCrop,
    PretrainDataset,
    StepBatchSampler,
    TileSource,
    collate,
    index_range,
    sample_rngs,
)

ROOT = Path(__file__).resolve().parents[1]
BAHAMAS = ROOT / "data" / "rasters" / "landsat7_bahamas_RGB.byte.tif"
PUCALLPA = ROOT / "data" / "rasters" / "pucallpa" / "landsat_pucallpa_1985.tif"
UTM = Affine(30.0, 0.0, 500_000.0, 0.0, -30.0, 2_800_000.0)


@pytest.fixture(autouse=True)
def one_thread():
    """Per-sample augmentation is tiny work: intra-op threads only add overhead on a shared 2-core machine
    (DataLoader workers run single-threaded too)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_tif(path: Path, data: np.ndarray, *, crs: str = "EPSG:32618", transform: Affine = UTM,
              nodata: float | None = None) -> Path:
    """Write a ``(bands, rows, cols)`` array as a GeoTIFF."""
    count, height, width = data.shape
    with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=count,
                       dtype=data.dtype.name, transform=transform, crs=crs, nodata=nodata) as dst:
        dst.write(data)
    return path


def data_cfg(rasters: list[Path], roots: list[Path], **kw) -> PretrainDataConfig:
    return PretrainDataConfig(rasters=rasters, sources={"allowed_roots": roots}, **kw)


def random_u8(rng: np.random.Generator, bands: int, h: int, w: int) -> np.ndarray:
    return rng.integers(1, 256, size=(bands, h, w), dtype=np.uint8)  # 0 is kept for nodata


@pytest.fixture
def rgb(tmp_path: Path) -> Path:
    return write_tif(tmp_path / "rgb.tif", random_u8(np.random.default_rng(1), 3, 96, 96), nodata=0)


@pytest.fixture
def half_nodata(tmp_path: Path) -> Path:
    """64 × 128, uint8, the left half nodata (0)."""
    data = random_u8(np.random.default_rng(2), 3, 64, 128)
    data[:, :, :64] = 0
    return write_tif(tmp_path / "half.tif", data, nodata=0)


def read_window(path: Path, box: PixelBox) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(window=box.to_rasterio())


def same(a: tuple, b: tuple) -> bool:
    return np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def aoi_in_crs(path: Path, crs: str) -> shapely.Geometry:
    """The GeoJSON file's polygon union, densified and projected with pyproj here (not via geo_dino)."""
    obj = json.loads(path.read_text())
    geoms = ([shape(f["geometry"]) for f in obj["features"]] if obj["type"] == "FeatureCollection"
             else [shape(obj)])
    t = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    return shapely.transform(shapely.segmentize(shapely.union_all(geoms), 0.01),
                             lambda xy: np.column_stack(t.transform(xy[:, 0], xy[:, 1])))


def pixel_centres(transform: Affine, box: PixelBox, rows: np.ndarray,
                  cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = transform.c + (box.col_off + cols + 0.5) * transform.a
    y = transform.f + (box.row_off + rows + 0.5) * transform.e
    return x, y


# ------------------------------------------------------------------------------------------------ tiles
def test_sample_is_deterministic_in_seed_and_index(rgb: Path, tmp_path: Path) -> None:
    cfg = data_cfg([rgb], [tmp_path], tile_size=32)
    a, b = TileSource(cfg, seed=7), TileSource(cfg, seed=7)
    first = [a.sample(i) for i in range(8)]
    assert all(same(a.sample(i), first[i]) for i in (3, 0, 7))  # repeatable, in any order
    assert all(same(b.sample(i), first[i]) for i in range(8))  # another object: same stream
    boxes = {t[2].box for t in first}
    assert len(boxes) == 8  # different indexes: different windows
    assert not np.array_equal(TileSource(cfg, seed=8).sample(0)[0], first[0][0])
    tile, valid, meta = first[0]
    assert tile.dtype == np.float32 and tile.shape == (3, 32, 32) and valid.dtype == bool
    raw = read_window(rgb, meta.box)
    np.testing.assert_allclose(tile, raw / 255.0, atol=1e-6)  # uint8 scaling, no mean/std here
    assert meta.crs == "EPSG:32618" and meta.path == str(rgb.resolve())


def test_resumed_stream_equals_uninterrupted(rgb: Path, tmp_path: Path) -> None:
    cfg = data_cfg([rgb], [tmp_path], tile_size=24)
    once = [TileSource(cfg, seed=3).sample(i) for i in range(20)]
    first = TileSource(cfg, seed=3)
    part = [first.sample(i) for i in range(10)]
    restarted = TileSource(cfg, seed=3)  # a new process after a restart: no state carried over
    part += [restarted.sample(i) for i in range(10, 20)]
    assert all(same(x, y) for x, y in zip(once, part, strict=True))


def test_no_tile_below_the_valid_threshold(half_nodata: Path, tmp_path: Path) -> None:
    cfg = data_cfg([half_nodata], [tmp_path], tile_size=32, min_valid_fraction=0.75)
    src = TileSource(cfg, seed=0)
    tiles = [src.sample(i) for i in range(40)]
    for tile, valid, meta in tiles:
        raw = read_window(half_nodata, meta.box)
        truth = np.any(raw != 0, axis=0)
        np.testing.assert_array_equal(valid, truth)
        assert truth.mean() >= 0.75 and meta.valid_fraction == pytest.approx(truth.mean())
        np.testing.assert_allclose(tile, np.where(truth, raw / 255.0, 0.0), atol=1e-6)
    skipped = sum(m.tries - 1 for _, _, m in tiles)
    assert skipped > 0  # windows straddling the nodata edge were drawn and refused
    assert src.counters["skipped_low_valid"] == skipped and src.counters["tiles"] == 40
    assert min(v.mean() for _, v, _ in tiles) < 1  # tiles reaching into nodata are allowed down to 0.75


def test_bit_depths_and_band_counts(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    u16 = rng.integers(100, 4000, size=(1, 48, 48)).astype(np.uint16)
    path = write_tif(tmp_path / "u16.tif", u16)
    src = TileSource(data_cfg([path], [tmp_path], tile_size=16))
    pre = src._pre[0]
    lo, hi = np.percentile(u16[0], (2, 98))  # auto scaling of uint16: the 2/98 percentiles
    assert pre.scale == "percentile" and pre.low[0] == pytest.approx(lo) and pre.high[0] == pytest.approx(hi)
    tile, _, meta = src.sample(0)
    np.testing.assert_allclose(tile, np.clip((read_window(path, meta.box) - lo) / (hi - lo), 0, 1), atol=1e-5)
    assert tile.min() == 0.0 and tile.max() == 1.0  # 4 % of the values lie outside the percentiles

    f32 = rng.uniform(0, 1000, size=(5, 48, 48)).astype(np.float32)
    f32[:, 20:, :] = np.nan  # nodata: NaN below row 20
    path = write_tif(tmp_path / "f32.tif", f32, nodata=float("nan"))
    cfg = data_cfg([path], [tmp_path], tile_size=16, min_valid_fraction=0.5,
                   preprocess={"scale": "range", "value_range": (0, 1000)})
    src = TileSource(cfg)
    for i in range(10):
        tile, valid, meta = src.sample(i)
        raw = read_window(path, meta.box)
        assert tile.shape == (5, 16, 16) and np.isfinite(tile).all()
        np.testing.assert_array_equal(valid, np.isfinite(raw).all(axis=0))
        np.testing.assert_allclose(tile, np.where(valid, np.nan_to_num(raw) / 1000, 0), atol=1e-6)
        assert meta.box.row_off + meta.box.height // 2 < 20  # every centre pixel is valid data


def test_rasters_drawn_in_proportion_to_valid_area(rgb: Path, half_nodata: Path, tmp_path: Path) -> None:
    square = write_tif(tmp_path / "square.tif", random_u8(np.random.default_rng(5), 3, 64, 64), nodata=0)
    src = TileSource(data_cfg([square, half_nodata], [tmp_path], tile_size=16, min_valid_fraction=0.5))
    # centre pixels r with 8 <= r <= 56 (a whole window fits); half_nodata: valid columns 64..120 of those
    assert src.weights.tolist() == [49 * 49, 49 * 57]
    picks = np.array([src.sample(i)[2].raster for i in range(300)])
    assert abs((picks == 1).mean() - 57 / 106) < 0.07


def test_aoi_restricts_tiles_on_a_projected_raster(tmp_path: Path) -> None:
    """The bundled Landsat scene (EPSG:32618, nodata outside the scene) and an AOI over Andros Island."""
    aoi = ROOT / "aoi" / "bahamas_andros.geojson"
    geom = aoi_in_crs(aoi, "EPSG:32618")
    cfg = data_cfg([BAHAMAS], [ROOT], aois=[aoi], tile_size=32, min_valid_fraction=0.6)
    src = TileSource(cfg, seed=1)
    with rasterio.open(BAHAMAS) as ds:
        t = ds.transform
    centres = []
    for i in range(25):
        _, valid, meta = src.sample(i)
        half = meta.box.height // 2
        cx, cy = pixel_centres(t, meta.box, np.array([half]), np.array([half]))
        assert shapely.contains_xy(geom, cx, cy).all()  # the centre pixel is inside the AOI
        rows, cols = np.nonzero(valid)
        assert shapely.contains_xy(geom, *pixel_centres(t, meta.box, rows, cols)).all()
        rr, cc = np.indices(valid.shape)
        inside = shapely.contains_xy(geom, *pixel_centres(t, meta.box, rr, cc))
        truth = inside & np.any(read_window(BAHAMAS, meta.box) != 0, axis=0)
        np.testing.assert_array_equal(valid, truth)  # valid = data and inside, nothing more conservative
        centres.append((float(cx[0]), float(cy[0])))
    assert len(set(centres)) == 25

    strict = TileSource(cfg.model_copy(update={"min_valid_fraction": 1.0}), seed=1)
    for i in range(10):
        meta = strict.sample(i)[2]
        core = shapely.box(*meta.bounds).buffer(-t.a / 2, join_style="mitre")  # pixel centres' extent
        assert geom.contains(core)


def test_aoi_restricts_tiles_on_a_geographic_raster(tmp_path: Path) -> None:
    """The bundled Pucallpa scene is in EPSG:4326; its AOI is in the same CRS but must still be honoured."""
    aoi = tmp_path / "west.geojson"  # the western third of the scene only
    aoi.write_text(json.dumps({"type": "Polygon", "coordinates": [
        [[-74.70, -8.55], [-74.52, -8.55], [-74.52, -8.31], [-74.70, -8.31], [-74.70, -8.55]]]}))
    geom = aoi_in_crs(aoi, "EPSG:4326")
    src = TileSource(data_cfg([PUCALLPA], [ROOT, tmp_path], aois=[aoi], tile_size=32), seed=2)
    with rasterio.open(PUCALLPA) as ds:
        t = ds.transform
    for i in range(15):
        tile, valid, meta = src.sample(i)
        assert tile.shape == (4, 32, 32) and meta.crs == "EPSG:4326"
        rows, cols = np.nonzero(valid)
        assert shapely.contains_xy(geom, *pixel_centres(t, meta.box, rows, cols)).all()
        assert not np.any(tile[:, ~valid])


def test_tile_centres_stay_inside_a_small_aoi(tmp_path: Path) -> None:
    """A synthetic EPSG:4326 raster and a small triangular AOI: with a low valid threshold, only the centre
    rule keeps tiles from being centred just outside the AOI's edge."""
    t = Affine(0.001, 0.0, -60.0, 0.0, -0.001, -10.0)
    path = write_tif(tmp_path / "geo.tif", random_u8(np.random.default_rng(10), 1, 64, 64), crs="EPSG:4326",
                     transform=t)
    aoi = tmp_path / "triangle.geojson"
    aoi.write_text(json.dumps({"type": "Feature", "properties": {},
                               "geometry": {"type": "Polygon", "coordinates": [
        [[-59.9803, -10.0197], [-59.9551, -10.0197], [-59.9803, -10.0452], [-59.9803, -10.0197]]]}}))
    geom = aoi_in_crs(aoi, "EPSG:4326")
    src = TileSource(data_cfg([path], [tmp_path], aois=[aoi], tile_size=16, min_valid_fraction=0.05), seed=5)
    for i in range(30):
        _, valid, meta = src.sample(i)
        assert shapely.contains_xy(geom, *pixel_centres(t, meta.box, np.array([8]), np.array([8]))).all()
        rows, cols = np.nonzero(valid)
        assert shapely.contains_xy(geom, *pixel_centres(t, meta.box, rows, cols)).all()
        assert 0.05 <= valid.mean() < 1  # a 16-pixel window never fits inside this triangle
    assert src.counters["centre_outside_aoi"] > 0  # proposals just outside the edge were refused


def test_aoi_that_misses_every_raster_is_an_error(tmp_path: Path) -> None:
    cfg = data_cfg([BAHAMAS], [ROOT], aois=[ROOT / "aoi" / "pucallpa.geojson"])
    with pytest.raises(AOIError, match="no AOI .* overlaps this raster.*landsat7|landsat7.*no AOI"):
        TileSource(cfg)


def test_band_count_mismatch_names_the_rasters(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        TileSource(data_cfg([BAHAMAS, PUCALLPA], [ROOT]))
    msg = str(exc.value)
    assert "landsat7_bahamas_RGB.byte.tif: 3" in msg and "landsat_pucallpa_1985.tif: 4" in msg


def test_too_little_valid_data(tmp_path: Path) -> None:
    data = np.zeros((3, 64, 64), dtype=np.uint8)
    data[:, 28:34, 28:34] = 200  # a 6 × 6 island: no 32 × 32 window is half valid
    island = write_tif(tmp_path / "island.tif", data, nodata=0)
    src = TileSource(data_cfg([island], [tmp_path], tile_size=32, min_valid_fraction=0.5, max_tries=5))
    with pytest.raises(ConfigError, match=r"island\.tif.*5 windows.*too little valid data"):
        src.sample(0)
    assert src.counters["skipped_low_valid"] == 5

    empty = write_tif(tmp_path / "empty.tif", np.zeros((3, 64, 64), dtype=np.uint8), nodata=0)
    with pytest.raises(ConfigError, match=r"empty\.tif: no valid pixel"):
        TileSource(data_cfg([empty], [tmp_path], tile_size=32))
    with pytest.raises(ConfigError, match=r"smaller than data.tile_size"):
        TileSource(data_cfg([island], [tmp_path], tile_size=128))


def test_mean_std_in_data_preprocess_is_refused(rgb: Path, tmp_path: Path) -> None:
    cfg = data_cfg([rgb], [tmp_path], preprocess={"mean": (0.5,) * 3, "std": (0.2,) * 3})
    with pytest.raises(ConfigError, match="crops.mean"):
        TileSource(cfg)


def test_pickled_source_reopens_and_matches(rgb: Path, tmp_path: Path) -> None:
    with TileSource(data_cfg([rgb], [tmp_path], tile_size=32), seed=4) as src:
        before = [src.sample(i) for i in range(3)]  # handles are open now
        copy = pickle.loads(pickle.dumps(src))
    assert src._readers == {}  # closed by the context manager
    assert all(same(copy.sample(i), before[i]) for i in range(3))
    assert same(src.sample(1), before[1])  # reopens after close
    src.close()
    copy.close()


def test_describe_records_hashes(tmp_path: Path) -> None:
    aoi = ROOT / "aoi" / "bahamas_andros.geojson"
    src = TileSource(data_cfg([BAHAMAS], [ROOT], aois=[aoi], tile_size=32))
    d = json.loads(json.dumps(src.describe()))
    (r,) = d["rasters"]
    assert r["sha256"] == hashlib.sha256(BAHAMAS.read_bytes()).hexdigest()
    assert r["crs"] == "EPSG:32618" and r["bands"] == [1, 2, 3] and r["dtype"] == "uint8"
    assert r["gsd"]["x_m"] == pytest.approx(300.04, abs=0.01) and r["scaling"]["scale"] == "uint8"
    assert d["aois"] == [{"path": str(aoi), "sha256": hashlib.sha256(aoi.read_bytes()).hexdigest()}]
    assert r["probability"] == 1.0 and d["tile_size"] == 32


# ------------------------------------------------------------------------------------------ multi-crop
def crops_cfg(**kw) -> MultiCropConfig:
    base = {"global_size": 32, "local_size": 16, "n_local": 3}
    return MultiCropConfig(**(base | kw))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_multicrop_shapes_and_determinism() -> None:
    rng = np.random.default_rng(6)
    tile, valid = rng.random((5, 48, 48), dtype=np.float32), np.ones((48, 48), bool)
    mc = MultiCrop(crops_cfg(), mean=(0.5,) * 5, std=(0.25,) * 5)
    out = mc(tile, valid, gen(0))
    assert [c.shape for c in out["global_crops"]] == [(5, 32, 32)] * 2
    assert [c.shape for c in out["local_crops"]] == [(5, 16, 16)] * 3
    assert all(c.dtype == torch.float32 for c in out["global_crops"] + out["local_crops"])
    assert ([v.shape for v in out["local_valid"]] == [(16, 16)] * 3
            and out["local_valid"][0].dtype == torch.bool)
    again, other = mc(tile, valid, gen(0)), mc(tile, valid, gen(1))
    assert all(torch.equal(a, b) for a, b in zip(out["local_crops"], again["local_crops"], strict=True))
    assert not torch.equal(out["global_crops"][0], other["global_crops"][0])


def test_constant_image_maps_to_its_normalised_value() -> None:
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.25, 0.5)
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    tile, valid = np.full((3, 40, 40), 0.6, np.float32), np.ones((40, 40), bool)
    mc = MultiCrop(crops_cfg(jitter_p=0.0, solarize_p=0.0, blur_p=(1.0, 1.0, 1.0)), mean=mean, std=std)
    for seed in range(3):
        for crop in (out := mc(tile, valid, gen(seed)))["global_crops"] + out["local_crops"]:
            torch.testing.assert_close(crop, ((0.6 - m) / s).expand_as(crop), atol=1e-5, rtol=0)
    solar = MultiCrop(crops_cfg(jitter_p=0.0, solarize_p=1.0), mean=mean, std=std)(tile, valid, gen(0))
    g1, g2 = solar["global_crops"]
    torch.testing.assert_close(g1, ((0.6 - m) / s).expand_as(g1), atol=1e-5, rtol=0)
    torch.testing.assert_close(g2, ((0.4 - m) / s).expand_as(g2), atol=1e-5, rtol=0)  # 0.6 ≥ 0.5 → 1 - 0.6


def test_jitter_is_per_band_and_bounded() -> None:
    tile, valid = np.full((4, 40, 40), 0.5, np.float32), np.ones((40, 40), bool)
    mc = MultiCrop(crops_cfg(jitter_p=1.0, brightness=0.4, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0),
                   mean=(0.0,) * 4, std=(1.0,) * 4)
    levels = []
    for seed in range(4):
        out = mc(tile, valid, gen(seed))
        for crop in out["global_crops"] + out["local_crops"]:
            band = crop.flatten(1)
            assert torch.all(band.max(1).values - band.min(1).values < 1e-6)  # still constant per band
            assert band.min() >= 0.3 - 1e-6 and band.max() <= 0.7 + 1e-6  # brightness factor in [0.6, 1.4]
            levels.append(band[:, 0])
    assert all(len(torch.unique(lv)) == 4 for lv in levels)  # every band gets its own factor
    assert len({tuple(lv.tolist()) for lv in levels}) == len(levels)


def test_invalid_pixels_are_zero_and_crops_avoid_nodata() -> None:
    rng = np.random.default_rng(7)
    tile = rng.uniform(0.2, 0.9, (3, 64, 64)).astype(np.float32)
    valid = np.ones((64, 64), bool)
    valid[:, :24] = False  # a nodata strip
    tile[:, ~valid] = 0.0
    kw = {"global_scale": (0.3, 1.0), "local_scale": (0.05, 0.3), "n_local": 6}
    loose = MultiCrop(crops_cfg(min_valid_fraction=0.01, **kw), mean=(0.5,) * 3, std=(0.1,) * 3)
    strict = MultiCrop(crops_cfg(min_valid_fraction=1.0, **kw), mean=(0.5,) * 3, std=(0.1,) * 3)
    full = {"loose": 0, "strict": 0}
    saw_invalid = False
    for seed in range(10):
        for name, mc in (("loose", loose), ("strict", strict)):
            out = mc(tile, valid, gen(seed))
            for crop, ok in zip(out["global_crops"] + out["local_crops"],
                                out["global_valid"] + out["local_valid"], strict=True):
                assert torch.all(crop[:, ~ok] == 0)
                saw_invalid |= bool((~ok).any())
                full[name] += bool(ok.all())
    assert saw_invalid
    assert full["strict"] > full["loose"] + 20  # crop boxes are redrawn away from nodata


def dihedral(x: torch.Tensor) -> list[torch.Tensor]:
    return [torch.rot90(f, k, (-2, -1)) for f in (x, x.flip(-1)) for k in range(4)]


def test_flips_and_rot90_are_exact_symmetries() -> None:
    rng = np.random.default_rng(8)
    tile, valid = rng.random((2, 32, 32), dtype=np.float32), np.ones((32, 32), bool)
    kw = {"global_size": 32, "global_scale": (1.0, 1.0), "n_local": 0, "jitter_p": 0.0,
          "blur_p": (0.0, 0.0, 0.0), "solarize_p": 0.0}
    mc = MultiCrop(crops_cfg(**kw), mean=(0.0, 0.0), std=(1.0, 1.0))
    variants = dihedral(torch.from_numpy(tile))
    seen = set()
    for seed in range(24):
        for crop in mc(tile, valid, gen(seed))["global_crops"]:
            matches = [i for i, v in enumerate(variants) if torch.equal(crop, v)]
            assert len(matches) == 1  # the whole tile, moved by exactly one of the 8 symmetries
            seen.add(matches[0])
    assert len(seen) >= 7
    fixed = MultiCrop(crops_cfg(**kw, flip_p=0.0, rot90=False), mean=(0.0, 0.0), std=(1.0, 1.0))
    assert all(torch.equal(c, variants[0]) for c in fixed(tile, valid, gen(3))["global_crops"])
    # no rotation: 4 variants
    flips = MultiCrop(crops_cfg(**kw, rot90=False), mean=(0.0, 0.0), std=(1.0, 1.0))
    x = torch.from_numpy(tile)
    allowed = [x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)]
    seen = set()
    for seed in range(16):
        for crop in flips(tile, valid, gen(seed))["global_crops"]:
            seen.add(next(i for i, v in enumerate(allowed) if torch.equal(crop, v)))
    assert seen == {0, 1, 2, 3}  # horizontal and vertical flips both happen, alone and together


def test_mean_std_must_fit_the_bands(rgb: Path, tmp_path: Path) -> None:
    mc = MultiCrop(crops_cfg(), mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2))
    with pytest.raises(ConfigError, match="3 values but the tiles have 5 bands"):
        mc(np.zeros((5, 32, 32), np.float32), np.ones((32, 32), bool), gen(0))
    with pytest.raises(ConfigError, match="crops.mean/std"):
        MultiCrop(crops_cfg())
    five = write_tif(tmp_path / "five.tif", random_u8(np.random.default_rng(9), 5, 40, 40))
    with pytest.raises(ConfigError, match="5 bands"):
        PretrainDataset(TileSource(data_cfg([five], [tmp_path], tile_size=32)), mc)
    override = MultiCrop(crops_cfg(mean=(0.3,) * 5, std=(0.1,) * 5), mean=(0.4,) * 3, std=(0.2,) * 3)
    assert override.mean == (0.3,) * 5  # crops.mean/std win over the backbone's


# ---------------------------------------------------------------------------------------------- dataset
@pytest.fixture
def dataset(half_nodata: Path, tmp_path: Path) -> PretrainDataset:
    src = TileSource(data_cfg([half_nodata], [tmp_path], tile_size=32, min_valid_fraction=0.75), seed=11)
    return PretrainDataset(src, MultiCrop(crops_cfg(n_local=2), mean=(0.5,) * 3, std=(0.2,) * 3))


def test_dataset_items_are_functions_of_seed_and_index(dataset: PretrainDataset) -> None:
    a, b = dataset[5], dataset[5]
    assert a["meta"] == dataset.source.sample(5)[2] and a["index"] == 5
    assert all(torch.equal(x, y) for x, y in zip(a["local_crops"], b["local_crops"], strict=True))
    assert not torch.equal(a["global_crops"][0], dataset[6]["global_crops"][0])
    other = PretrainDataset(dataset.source, dataset.multicrop, seed=12)[5]
    assert not torch.equal(a["global_crops"][0], other["global_crops"][0])
    t1, g1 = sample_rngs(11, 5)
    t2, g2 = sample_rngs(11, 5)
    assert (t1.random() == t2.random()
            and torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2)))
    with pytest.raises(IndexError):
        dataset[-1]


def test_index_range_tiles_the_stream() -> None:
    assert list(index_range(3, 2, 1, 4)) == [3 * 8 + 4 + j for j in range(4)]
    seen = [i for s in range(5) for r in range(3) for i in index_range(s, 3, r, 4)]
    assert sorted(seen) == list(range(60))  # no gap, no overlap across steps and ranks
    resumed = list(StepBatchSampler(4, world_size=3, rank=2, start_step=3, end_step=5))
    assert (resumed == [list(index_range(s, 3, 2, 4)) for s in (3, 4)]
            and len(StepBatchSampler(4, end_step=2)) == 2)
    with pytest.raises(ValueError, match="rank"):
        index_range(0, 2, 2, 4)


def test_collate_shapes(dataset: PretrainDataset) -> None:
    batch = collate([dataset[i] for i in index_range(0, 1, 0, 3)])
    assert (batch["global_crops"].shape == (2, 3, 3, 32, 32)
            and batch["local_crops"].shape == (2, 3, 3, 16, 16))
    assert batch["global_valid"].shape == (2, 3, 32, 32) and batch["global_valid"].dtype == torch.bool
    assert batch["index"].tolist() == [0, 1, 2] and len(batch["meta"]) == 3
    assert torch.equal(batch["global_crops"][1, 2], dataset[2]["global_crops"][1])  # crop-major
    no_local = PretrainDataset(dataset.source,
                               MultiCrop(crops_cfg(n_local=0), mean=(0.5,) * 3, std=(0.2,) * 3))
    assert collate([no_local[0], no_local[1]])["local_crops"].shape == (0, 2, 3, 0, 0)


def test_dataloader_workers_give_identical_batches(dataset: PretrainDataset) -> None:
    dataset[0]  # open handles in this process first: workers must not use them
    with rasterio.Env(GDAL_NUM_THREADS="ALL_CPUS"), rasterio.open(BAHAMAS) as ds:
        # the parent has used GDAL's decoding thread pool (as inference does)
        ds.read(window=((0, 400), (0, 400)))
    sampler = StepBatchSampler(3, world_size=2, rank=1, start_step=2, end_step=4)

    def batches(workers: int) -> list[dict]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fork() with threads
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                                 collate_fn=collate, timeout=30 if workers else 0)
            return list(loader)

    zero, two = batches(0), batches(2)
    assert [b["index"].tolist() for b in zero] == [list(index_range(s, 2, 1, 3)) for s in (2, 3)]
    for a, b in zip(zero, two, strict=True):
        for key in ("global_crops", "local_crops", "global_valid", "local_valid", "index"):
            assert torch.equal(a[key], b[key]), key
        assert a["meta"] == b["meta"]
