"""Label-free heads: the patch-resolution shortcuts equal the per-pixel definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geo_dino.models.label_free import (
    cosine_distance,
    fit_label_free,
    otsu_threshold,
    upsampled_cosine_distance,
)


def _up(f, size):
    return torch.nn.functional.interpolate(f, size=size, mode="bilinear", align_corners=False)


@pytest.mark.parametrize(("hw", "size"), [((4, 4), (64, 64)), ((14, 14), (224, 224)), ((3, 5), (48, 80)),
                                         ((1, 1), (16, 16))])
def test_upsampled_cosine_distance_is_exact(hw, size):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 24, *hw, generator=g, dtype=torch.float64)
    b = a + 0.7 * torch.randn(2, 24, *hw, generator=g, dtype=torch.float64)
    want = cosine_distance(_up(a, size), _up(b, size))
    got = upsampled_cosine_distance(a, b, size)
    assert got.shape == want.shape == (2, 1, *size)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


def test_projection_commutes_with_upsampling():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 16)).astype(np.float32)
    heads = fit_label_free(x, pca=True, k=4, seed=0)
    f = torch.from_numpy(rng.normal(size=(2, 16, 4, 5)).astype(np.float32))
    size = (64, 80)
    fast = _up(heads.project(f), size)
    slow = heads.project(_up(f, size))
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
    # the class (arg-max of dot products) is the arg-max of cosine similarity of the upsampled feature
    up = _up(f, size)
    cos = torch.einsum("bchw,kc->bkhw", torch.nn.functional.normalize(up, dim=1),
                       torch.from_numpy(heads.centroids))
    assert torch.equal(fast[:, 3:].argmax(1), cos.argmax(1))


def test_projection_is_pca_transform_and_centroid_dot_products():
    """``project`` (one 1×1 convolution) equals sklearn's PCA transform and the dot products, per patch."""
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(3)
    x = (rng.normal(size=(400, 12)) + 5.0).astype(np.float32)  # off-centre: the PCA mean matters
    heads = fit_label_free(x, pca=True, k=3, seed=0)
    f = torch.from_numpy(rng.normal(size=(2, 12, 3, 4)).astype(np.float32) + 5.0)
    got = heads.project(f)
    flat = f.permute(0, 2, 3, 1).reshape(-1, 12).numpy()
    pca = PCA(n_components=3, random_state=0).fit(x)
    want_pca = pca.transform(flat)
    signs = np.sign((pca.components_ * heads.pca_components).sum(1))  # sklearn may flip a component's sign
    want = np.concatenate([want_pca * signs, flat @ heads.centroids.T], axis=1)
    got_flat = got.permute(0, 2, 3, 1).reshape(-1, 6).numpy()
    np.testing.assert_allclose(got_flat, want, atol=2e-4, rtol=1e-4)
    assert fit_label_free(x, pca=False, k=None, seed=0).project(f).shape == (2, 0, 3, 4)


def test_kmeans_centroids_unit_and_sorted_by_size():
    rng = np.random.default_rng(1)
    big = rng.normal(size=(300, 8)) + np.eye(8)[0] * 10
    small = rng.normal(size=(50, 8)) + np.eye(8)[1] * 10
    heads = fit_label_free(np.concatenate([small, big]), pca=False, k=2, seed=0)
    assert np.allclose(np.linalg.norm(heads.centroids, axis=1), 1, atol=1e-5)
    assert np.argmax(np.abs(heads.centroids[0])) == 0  # the most common cluster is class 0


def test_otsu_separates_two_modes():
    rng = np.random.default_rng(2)
    low, high = rng.normal(0.2, 0.03, 5000), rng.normal(0.8, 0.05, 1000)
    edges = np.linspace(0, 2, 1001)
    t = otsu_threshold(np.histogram(np.concatenate([low, high]), edges)[0], edges)
    assert 0.25 < t < 0.65  # anywhere in the gap maximises the between-class variance
    assert (low < t).mean() > 0.99 and (high > t).mean() > 0.99
