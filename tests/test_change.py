"""Label-free change: the spectral scores (CVA, IR-MAD), the fusion rule, the thresholds, and a run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio

from geo_dino.errors import GeoDinoError
from geo_dino.models.change import (
    HIST_BINS,
    ChangeFusion,
    ChangeModel,
    fit_change_model,
    fit_fusion,
    fit_spectral,
    histogram,
    histogram_edges,
    minimum_error_threshold,
    threshold_from_histogram,
)
from geo_dino.models.label_free import otsu_threshold
from geo_dino.run.folder import load_plan
from tests.conftest import PUCALLPA


def _pair(n: int = 4000, s: int = 4, changed: float = 0.05, seed: int = 0):
    """Two dates of correlated bands; the second is an affine transform of the first plus noise, except on a
    ``changed`` fraction of pixels, which get unrelated spectra. Returns ``(x1, x2, is_changed)``."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(s, s))
    x1 = rng.normal(size=(n, s)) @ mix + 50
    x2 = 1.7 * x1 - 20 + rng.normal(scale=0.3, size=(n, s))
    ch = rng.random(n) < changed
    x2[ch] = rng.normal(size=(int(ch.sum()), s)) @ rng.normal(size=(s, s)) * 3 + 60
    return x1, x2, ch


def _score(model, x1, x2):
    return model.score(x1.T[None, :, :, None], x2.T[None, :, :, None])[0, 0, :, 0]


def _auc(score: np.ndarray, positive: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positive, score))


@pytest.mark.parametrize("kind", ["cva", "irmad"])
def test_spectral_scores_ignore_a_radiometric_change_and_find_real_change(kind):
    x1, x2, ch = _pair()
    model = fit_spectral(x1, x2, kind)
    score = _score(model, x1, x2)
    assert score.shape == (x1.shape[0],) and np.isfinite(score).all() and (score >= 0).all()
    assert _auc(score, ch) > 0.97
    # unchanged pixels score low: a gain and offset between the dates is not change
    assert np.median(score[~ch]) < 0.5 * np.median(score[ch])
    # a date scaled and shifted as a whole leaves the score of a refitted model as it was
    model2 = fit_spectral(x1, 3.0 * x2 + 100.0, kind)
    assert np.allclose(_score(model2, x1, 3.0 * x2 + 100.0), score, rtol=1e-3, atol=1e-3)


def test_irmad_is_invariant_to_mixing_the_bands_of_one_date():
    """IR-MAD's variates are canonical: any invertible linear map of one date's bands gives the same score
    (CVA's would change)."""
    x1, x2, ch = _pair(seed=1)
    mix = np.random.default_rng(5).normal(size=(4, 4)) + 3 * np.eye(4)
    a = _score(fit_spectral(x1, x2, "irmad"), x1, x2)
    b = _score(fit_spectral(x1, x2 @ mix, "irmad"), x1, x2 @ mix)
    assert np.allclose(a, b, rtol=1e-2, atol=1e-2)
    cva_a = _score(fit_spectral(x1, x2, "cva"), x1, x2)
    cva_b = _score(fit_spectral(x1, x2 @ mix, "cva"), x1, x2 @ mix)
    assert not np.allclose(cva_a, cva_b, rtol=1e-2, atol=1e-2)


def test_spectral_fit_refuses_bad_samples():
    x1, x2, _ = _pair(n=100)
    with pytest.raises(GeoDinoError, match="differ in shape"):
        fit_spectral(x1, x2[:, :3])
    with pytest.raises(GeoDinoError, match="too few valid pixels"):
        fit_spectral(x1[:20], x2[:20])
    with pytest.raises(GeoDinoError, match="choose one of"):
        fit_spectral(x1, x2, "pca")


def test_fused_score_is_the_spectral_one_at_feature_weight_0_and_the_feature_one_at_1():
    rng = np.random.default_rng(0)
    spec, feat = rng.gamma(2.0, 0.5, 5000), rng.gamma(2.0, 0.02, 5000)
    only_spec = fit_fusion("fused", 0.0, spec, feat)
    only_feat = fit_fusion("fused", 1.0, spec, feat)
    assert np.array_equal(only_spec.combine(spec, feat), spec / np.median(spec))
    assert np.array_equal(only_feat.combine(spec, feat), feat / np.median(feat))
    # the same as the methods that use one score alone
    assert np.array_equal(fit_fusion("spectral", 0.25, spec, None).combine(spec, None),
                          only_spec.combine(spec, feat))
    assert np.array_equal(fit_fusion("features", 0.25, None, feat).combine(None, feat),
                          only_feat.combine(spec, feat))
    # in between: the weighted geometric mean of the median-scaled scores
    half = fit_fusion("fused", 0.25, spec, feat)
    want = (spec / np.median(spec)) ** 0.75 * (feat / np.median(feat)) ** 0.25
    assert np.allclose(half.combine(spec, feat), want, rtol=1e-12)
    # the histogram's range follows the data (the fused score's 99.9th percentile, times 1.5)
    assert half.hist_high == pytest.approx(1.5 * np.percentile(want, 99.9))
    with pytest.raises(GeoDinoError, match="feature_weight"):
        fit_fusion("fused", 1.5, spec, feat)


def test_histogram_range_follows_the_data_and_clips_outliers():
    v = np.array([0.01, 0.02, 0.05, 10.0, np.nan, -1.0])
    h = histogram(v, 0.1)
    assert h.sum() == 5 and h[-1] == 1 and h[0] == 1  # 10.0 in the last bin, -1 in the first, NaN dropped
    assert h[int(0.05 / 0.1 * HIST_BINS)] == 1
    assert len(histogram_edges(0.1)) == HIST_BINS + 1


def test_minimum_error_threshold_separates_a_small_spread_out_class():
    """95 % unchanged around 1 (narrow), 5 % changed around 4 (wide): the minimum-error threshold lies
    between them, where Otsu's (which favours equal classes) is pulled elsewhere."""
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(1.0, 0.15, 95_000), rng.normal(4.0, 1.0, 5_000)])
    hist = histogram(v, 8.0)
    edges = histogram_edges(8.0)
    t = minimum_error_threshold(hist, edges)
    assert 1.5 < t < 2.6
    err = lambda thr: ((v[:95_000] > thr).sum() + (v[95_000:] <= thr).sum())  # noqa: E731
    assert err(t) < err(otsu_threshold(hist, edges)) or abs(t - otsu_threshold(hist, edges)) < 0.1
    assert threshold_from_histogram(hist, edges, "minimum-error") == t
    assert threshold_from_histogram(hist, edges, "otsu") == otsu_threshold(hist, edges)
    with pytest.raises(GeoDinoError, match="no valid change"):
        minimum_error_threshold(np.zeros(8), np.linspace(0, 1, 9))


def test_change_model_round_trip(tmp_path):
    x1, x2, _ = _pair()
    fd = np.abs(np.random.default_rng(0).normal(0.05, 0.01, x1.shape[0]))
    model = fit_change_model("fused", "irmad", 0.25, x1, x2, fd)
    back = ChangeModel.load(model.save(tmp_path / "change.npz"))
    assert back.fusion == model.fusion and back.spectral is not None and model.spectral is not None
    assert np.array_equal(_score(back.spectral, x1, x2), _score(model.spectral, x1, x2))
    rec = back.to_record()
    assert rec["method"] == "fused" and rec["weights"] == {"spectral": 0.75, "features": 0.25}
    assert rec["spectral"]["kind"] == "irmad" and len(rec["spectral"]["canonical_correlations"]) == 4
    feats_only = fit_change_model("features", "cva", 0.25, None, None, fd)
    assert feats_only.spectral is None
    assert ChangeModel.load(feats_only.save(tmp_path / "f.npz")).fusion == feats_only.fusion
    assert isinstance(back.fusion, ChangeFusion)


def _run(tiny_config, **change):
    from geo_dino.config import parse_config
    from geo_dino.run.stages import run_local

    cfg = tiny_config("aoi/pucallpa.geojson", PUCALLPA, sources={"bands": [1, 2, 3]},
                      heads={"kmeans": {"k": 4, "fit_tiles": 16}, "change": change})
    return run_local(parse_config(cfg))


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1)


def test_run_fuses_spectrum_and_features_per_pixel(tiny_config):
    """A seeded run on the bundled Pucallpa pair: the fused score is the rule applied to the two written
    parts, the mask is the fused score above the recorded threshold, and the record says how."""
    run_dir = _run(tiny_config)
    rec = json.loads((run_dir / "provenance.json").read_text())
    ch = rec["change"]
    assert ch["method"] == "fused" and ch["weights"] == {"spectral": 0.75, "features": 0.25}
    assert ch["spectral"]["kind"] == "cva" and ch["spectral"]["bands"] == 4  # every band, not only 1-3
    assert ch["threshold"]["method"] == "minimum-error" and ch["threshold"]["value"] > 0
    mag, spec, feat = (_read(run_dir / f"change_{n}.tif") for n in ("magnitude", "spectral", "features"))
    mask = _read(run_dir / "change_mask.tif")
    ok = mask != 255
    assert ok.any() and np.array_equal(np.isnan(mag), ~ok) and np.array_equal(np.isnan(spec), ~ok)
    s = ch["scales"]
    want = (spec[ok] / s["spectral_median"]) ** 0.75 * (feat[ok] / s["features_median"]) ** 0.25
    assert np.allclose(mag[ok], want, rtol=1e-5)
    assert np.array_equal(mask[ok] == 1, mag[ok] > ch["threshold"]["value"])
    assert 0 < (mask == 1).sum() < ok.sum()
    with rasterio.open(run_dir / "change_magnitude.tif") as ds:
        assert ds.descriptions == ("fused spectral and feature change score",)
    # the spectral part equals the fitted score computed directly from the rasters' pixels
    from geo_dino.models.change import ChangeModel as CM

    model = CM.load(run_dir / "work" / "change.npz")
    assert model.spectral is not None
    with rasterio.open(PUCALLPA[0]) as a, rasterio.open(PUCALLPA[1]) as b, \
            rasterio.open(run_dir / "change_spectral.tif") as out:
        win = rasterio.windows.from_bounds(*out.bounds, transform=a.transform).round_offsets().round_lengths()
        x1, x2 = a.read(window=win).astype(np.float32), b.read(window=win).astype(np.float32)
    direct = model.spectral.score(x1[None], x2[None])[0, 0]
    assert np.allclose(spec[ok], direct[ok], rtol=1e-4, atol=1e-5)


def test_run_spectral_only_ignores_the_features(tiny_config):
    run_dir = _run(tiny_config, method="spectral", spectral="irmad", threshold="otsu")
    rec = json.loads((run_dir / "provenance.json").read_text())["change"]
    assert rec["method"] == "spectral" and rec["weights"]["features"] == 0.0
    assert rec["spectral"]["kind"] == "irmad" and rec["threshold"]["method"] == "otsu"
    assert not (run_dir / "change_spectral.tif").exists()  # the parts are written for a fused run only
    mag = _read(run_dir / "change_magnitude.tif")
    assert np.nanmedian(mag) == pytest.approx(1.0, abs=0.3)  # the spectral score over its fit median


def test_spectral_bands_narrow_the_spectral_part(tiny_config):
    run_dir = _run(tiny_config, method="spectral")
    assert json.loads((run_dir / "provenance.json").read_text())["change"]["spectral"]["bands"] == 4
    from geo_dino.config import parse_config
    from geo_dino.run.stages import run_local

    cfg = tiny_config("aoi/pucallpa.geojson", PUCALLPA,
                      sources={"bands": [1, 2, 3], "spectral_bands": [1, 2]},
                      heads={"kmeans": {"k": 4, "fit_tiles": 16}, "change": {"method": "spectral"}})
    narrow = run_local(parse_config(cfg))
    assert load_plan(narrow).rasters[0].spectral_bands == (1, 2)
    assert json.loads((narrow / "provenance.json").read_text())["change"]["spectral"]["bands"] == 2


def test_shift_averaged_features_of_a_constant_image_are_constant():
    """The backbone's own patch embedding (position-free) of a constant image is constant; averaging it over
    offsets 0 and half a patch keeps it constant, edges included (reflect padding adds nothing)."""
    import torch

    from geo_dino.models.backbone import build_backbone
    from geo_dino.run.inference import shift_averaged

    model, _ = build_backbone("vit_tiny_patch16_dinov3_test", seed=0)
    embed = model.patch_embed.proj  # a 16x16 stride-16 convolution
    x = torch.full((2, 3, 64, 96), 0.3)
    with torch.inference_mode():
        f = shift_averaged(embed, x, 16)
        f0 = embed(x)
    assert f.shape == (2, 48, 8, 12)  # twice the patch grid
    assert torch.allclose(f, f0[:, :, :1, :1].expand_as(f), atol=1e-6)


def test_shift_averaged_features_sit_at_half_patch_cell_centres():
    """With a patch mean as the 'backbone', the shift-averaged value of a linear ramp is the ramp at each
    half-patch cell's centre: the two offsets' patches straddle the cell symmetrically."""
    import torch

    from geo_dino.run.inference import shift_averaged

    p = 8
    ramp = torch.arange(64, dtype=torch.float64).expand(1, 1, 48, 64).clone()  # value = column index
    f = shift_averaged(lambda t: torch.nn.functional.avg_pool2d(t, p), ramp, p)[0, 0]
    centres = (torch.arange(f.shape[1], dtype=torch.float64) + 0.5) * (p / 2) - 0.5
    interior = slice(1, f.shape[1] - 1)  # the outermost cells see the reflected border
    assert torch.allclose(f[3, interior], centres[interior])
    # the plain patch grid is a staircase: each patch's 2 half-cells get the same value
    plain = torch.nn.functional.avg_pool2d(ramp, p)[0, 0]
    assert plain[0, 1] - plain[0, 0] == p and f[3, 2] - f[3, 1] == p / 2


@pytest.mark.slow
def test_run_with_shift_averaged_features(tiny_config):
    run_dir = _run(tiny_config, method="features")
    from geo_dino.config import parse_config
    from geo_dino.run.stages import run_local

    cfg = tiny_config("aoi/pucallpa.geojson", PUCALLPA, sources={"bands": [1, 2, 3]},
                      backbone={"arch": "vit_tiny_patch16_dinov3_test", "batch_size": 16,
                                "shift_average": True},
                      heads={"kmeans": {"k": 4, "fit_tiles": 16}, "change": {"method": "features"},
                             "cube": True})
    fine = run_local(parse_config(cfg))
    a, b = _read(run_dir / "change_magnitude.tif"), _read(fine / "change_magnitude.tif")
    ok = np.isfinite(a) & np.isfinite(b)
    assert ok.mean() > 0.9 and not np.allclose(a[ok], b[ok])

    from geo_dino.models.change import patch_period_power

    # the map's power at the patch period, over its neighbours' (1: no grid): the checkerboard is gone
    plain, fine_ratio = patch_period_power(a, 16), patch_period_power(b, 16)
    assert plain > 4 and fine_ratio < 2, (plain, fine_ratio)
    from geo_dino.outputs.cube import open_cube

    cube = open_cube(fine / "features.zarr")  # the cube keeps one cell per patch
    with rasterio.open(fine / "change_magnitude.tif") as ds:
        assert cube.sizes["y"] == -(-ds.height // 16) or cube.sizes["y"] > 0


def test_feature_change_over_several_layers(tiny_config):
    """heads.change.layers: the feature change is the mean of the listed blocks' cosine distances (here both
    blocks of the test backbone), recorded; equal to the mean computed from the blocks' own features."""
    import torch

    from geo_dino.inputs.preprocess import Preprocessor
    from geo_dino.models.backbone import build_backbone
    from geo_dino.run.inference import FeatureExtractor

    model, _ = build_backbone("vit_tiny_patch16_dinov3_test", seed=0)
    pre = Preprocessor("uint8", (0.0,) * 3, (255.0,) * 3, (0.5,) * 3, (0.5,) * 3, (1, 2, 3))
    ex = FeatureExtractor(model, pre, "cpu", change_layers=(0, -1))
    plain = FeatureExtractor(model, pre, "cpu")
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(2, 3, 64, 64, generator=g), torch.randn(2, 3, 64, 64, generator=g)
    f1, f2 = ex.forward(x1), ex.forward(x2)
    assert f1.shape[1] == 3 * 48  # the normed last block, then blocks 0 and 1
    assert torch.allclose(ex.deepest(f1), plain.forward(x1), atol=1e-5)
    from geo_dino.models.backbone import extract
    from geo_dino.models.label_free import upsampled_cosine_distance

    e1, e2 = extract(model, x1, (0, 1)).layers, extract(model, x2, (0, 1)).layers
    want = (upsampled_cosine_distance(e1[0], e2[0], (64, 64))
            + upsampled_cosine_distance(e1[1], e2[1], (64, 64))) / 2
    assert torch.allclose(ex.change_distance(f1, f2, (64, 64)), want, atol=1e-5)
    run_dir = _run(tiny_config, method="features", layers=[0, -1])
    rec = json.loads((run_dir / "provenance.json").read_text())["change"]
    assert rec["features"]["layers"] == [0, 1] and "averaged over blocks" in rec["features"]["score"]
    from geo_dino.config import parse_config
    from geo_dino.errors import ConfigError
    from geo_dino.run.stages import run_local

    bad = tiny_config("aoi/pucallpa.geojson", PUCALLPA, sources={"bands": [1, 2, 3]},
                      heads={"kmeans": {"k": 4, "fit_tiles": 16}, "change": {"layers": [5]}})
    with pytest.raises(ConfigError, match="heads.change.layers"):
        run_local(parse_config(bad))


def test_two_dates_with_different_band_counts_are_refused_for_the_spectral_part(tiny_config, tmp_path):
    """Pucallpa 2020 cut to three bands against the four-band 1985: the backbone's bands agree (1-3), the
    spectral part (every band) does not: refused before any tile, with the key that fixes it."""
    from geo_dino.config import parse_config
    from geo_dino.errors import SourceError
    from geo_dino.run.stages import run_local

    with rasterio.open(PUCALLPA[1]) as src:
        profile = src.profile | {"count": 3}
        three = tmp_path / "pucallpa_2020_3bands.tif"
        with rasterio.open(three, "w", **profile) as dst:
            dst.write(src.read([1, 2, 3]))
    cfg = tiny_config("aoi/pucallpa.geojson", [PUCALLPA[0], three], sources={"bands": [1, 2, 3]})
    with pytest.raises(SourceError, match="sources.spectral_bands"):
        run_local(parse_config(cfg))
    ok = tiny_config("aoi/pucallpa.geojson", [PUCALLPA[0], three],
                     sources={"bands": [1, 2, 3], "spectral_bands": [1, 2, 3]},
                     heads={"kmeans": {"k": 4, "fit_tiles": 16}, "change": {"method": "spectral"}})
    run = run_local(parse_config(ok))
    assert json.loads((run / "provenance.json").read_text())["change"]["spectral"]["bands"] == 3
