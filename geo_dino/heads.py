"""Label-free heads for the embedded default: PCA colours, k-means classes and feature change.

They are fitted on patch features sampled from the run's own tiles, then applied to features upsampled to
pixels (so classes are taken at pixel resolution, never at patch resolution).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geo_dino.errors import GeoDinoError


@dataclass(frozen=True)
class LabelFreeHeads:
    """Fitted parameters. ``centroids`` are unit vectors (cosine k-means); arrays are float32."""

    pca_mean: np.ndarray | None  # (C,)
    pca_components: np.ndarray | None  # (3, C)
    pca_low: np.ndarray | None  # (3,) 1st percentile of each component on the fit sample
    pca_high: np.ndarray | None  # (3,) 99th percentile
    centroids: np.ndarray | None  # (K, C)

    @property
    def n_pca(self) -> int:
        return 0 if self.pca_components is None else 3

    @property
    def k(self) -> int:
        return 0 if self.centroids is None else int(self.centroids.shape[0])

    def save(self, path: Path) -> Path:
        arrays = {k: v for k, v in self.__dict__.items() if v is not None}
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> LabelFreeHeads:
        with np.load(path, allow_pickle=False) as z:
            return cls(**{k: (z[k] if k in z else None) for k in cls.__dataclass_fields__})

    def project(self, feats):  # noqa: ANN001, ANN201 - torch tensors (B, C, H, W) -> (B, n_pca + k, H, W)
        """Per-pixel PCA components and cosine similarities to the centroids."""
        import torch

        out = []
        if self.pca_components is not None:
            comp = torch.from_numpy(self.pca_components).to(feats)
            mean = torch.from_numpy(self.pca_mean).to(feats)
            out.append(torch.einsum("bchw,kc->bkhw", feats - mean[None, :, None, None], comp))
        if self.centroids is not None:
            cent = torch.from_numpy(self.centroids).to(feats)
            unit = torch.nn.functional.normalize(feats, dim=1)
            out.append(torch.einsum("bchw,kc->bkhw", unit, cent))
        return torch.cat(out, dim=1) if out else feats[:, :0]


def fit_label_free(samples: np.ndarray, *, pca: bool, k: int | None, seed: int) -> LabelFreeHeads:
    """Fit PCA (3 components) and cosine k-means on patch features ``(N, C)``."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    if samples.ndim != 2 or samples.shape[0] < max(3, k or 0):
        raise GeoDinoError(f"too few valid patches ({samples.shape[0]}) to fit the label-free heads; "
                           "enlarge the AOI or lower heads.kmeans.k")
    x = samples.astype(np.float32)
    p_mean = p_comp = p_lo = p_hi = None
    if pca:
        model = PCA(n_components=3, random_state=seed).fit(x)
        p_mean = model.mean_.astype(np.float32)
        p_comp = model.components_.astype(np.float32)
        proj = (x - p_mean) @ p_comp.T
        p_lo = np.percentile(proj, 1, axis=0).astype(np.float32)
        p_hi = np.percentile(proj, 99, axis=0).astype(np.float32)
    cent = None
    if k:
        unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(unit)
        c = km.cluster_centers_
        cent = (c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)).astype(np.float32)
        # order classes by size so class 0 is the most common one: stable, readable legends
        counts = np.bincount(km.labels_, minlength=k)
        cent = cent[np.argsort(-counts, kind="stable")]
    return LabelFreeHeads(p_mean, p_comp, p_lo, p_hi, cent)


def otsu_threshold(hist: np.ndarray, edges: np.ndarray) -> float:
    """Otsu's threshold from a histogram (counts per bin and bin edges): maximises between-class variance."""
    hist = hist.astype(np.float64)
    total = hist.sum()
    if total <= 0:
        raise GeoDinoError("no valid change value to threshold")
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * centres)
    mt = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 / total - m0) ** 2 / (w0 * w1 / total)
    between[~np.isfinite(between)] = -1
    i = int(np.argmax(between))
    return float(edges[i + 1])


def cosine_distance(a, b):  # noqa: ANN001, ANN201 - torch tensors (B, C, H, W) -> (B, 1, H, W)
    import torch

    return 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-8)[:, None]
