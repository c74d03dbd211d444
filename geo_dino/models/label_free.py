"""Label-free heads for the embedded default: PCA colours, k-means classes and feature change.

They are fitted on patch features sampled from the run's own tiles, then applied to features upsampled to
pixels (so classes are taken at pixel resolution, never at patch resolution).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
        """Number of PCA components (3 when PCA was fitted, else 0)."""
        return 0 if self.pca_components is None else 3

    @property
    def k(self) -> int:
        """Number of k-means clusters (0 when none were fitted)."""
        return 0 if self.centroids is None else int(self.centroids.shape[0])

    def save(self, path: Path) -> Path:
        """Write the fitted arrays to an ``.npz`` file atomically (via a temporary file); return ``path``."""
        from geo_dino.files import save_npz

        return save_npz(path, {k: v for k, v in self.__dict__.items() if v is not None})

    @classmethod
    def load(cls, path: Path) -> LabelFreeHeads:
        """Read heads written by :meth:`save` (arrays absent from the file are None)."""
        with np.load(path, allow_pickle=False) as z:
            return cls(**{k: (z[k] if k in z else None) for k in cls.__dataclass_fields__})

    def project(self, feats):  # noqa: ANN001, ANN201 - torch tensors (B, C, h, w) -> (B, n_pca + k, h, w)
        """PCA components and dot products with the (unit) centroids: both *linear* in the features.

        Being linear (PCA is affine with weights summing to one), they commute with bilinear upsampling and
        with blending, so they are computed at patch resolution and upsampled afterwards: the result equals
        projecting the upsampled, blended feature of each pixel. The class of a pixel is the arg-max of its
        dot products, which is the arg-max of the cosine similarity of its upsampled, blended feature
        (the feature's norm is the same for every centroid).
        """
        import torch

        weight, bias = self._linear()
        if weight is None:
            return feats[:, :0]
        # one (n_pca + k, C) matrix over the channels, one batched matmul (measured 6× faster than two
        # einsums and a cat on 8 × 384 × 14 × 14 features)
        w, b = torch.from_numpy(weight).to(feats), torch.from_numpy(bias).to(feats)
        return torch.matmul(w, feats.flatten(2)).add_(b[:, None]).unflatten(2, feats.shape[-2:])

    def _linear(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``project`` as one affine map: rows PCA components then centroids; bias −components·mean, 0."""
        rows, bias = [], []
        if self.pca_components is not None:
            if self.pca_mean is None:  # fit_label_free sets the mean and components together
                raise GeoDinoError("label-free heads with PCA components but no PCA mean; fit them again")
            rows.append(self.pca_components)
            bias.append(-(self.pca_components.astype(np.float64) @ self.pca_mean.astype(np.float64)))
        if self.centroids is not None:
            rows.append(self.centroids)
            bias.append(np.zeros(len(self.centroids)))
        if not rows:
            return None, None
        return (np.ascontiguousarray(np.concatenate(rows), dtype=np.float32),
                np.concatenate(bias).astype(np.float32))


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
    """``1 - cos(a, b)`` over the feature axis, per pixel: 0 for equal directions, up to 2 for opposite."""
    import torch

    return 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-8)[:, None]


def _bilinear_taps(n_in: int, n_out: int):  # noqa: ANN202
    """Source indices and weights of PyTorch's bilinear resize (``align_corners=False``) along one axis."""
    import torch

    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    l1 = (src - i0).clamp(0, 1)
    return (i0, i1), (1 - l1, l1)


def upsampled_cosine_distance(a, b, size: tuple[int, int]):  # noqa: ANN001, ANN201
    """``cosine_distance(up(a), up(b))`` for bilinear ``up`` to ``size``, exactly, without upsampling.

    ``<up(a), up(b)>`` at a pixel is ``Σ w_i w_j <a_i, b_j>`` over its 4×4 pairs of neighbouring patches, so
    the inner products of patch pairs at offsets {-1, 0, 1}² are computed once at patch resolution and
    gathered per pixel: ``O(C·h·w)`` instead of ``O(C·H·W)``.
    ``a``, ``b``: ``(B, C, h, w)`` → ``(B, 1, H, W)``.
    """
    import torch

    B, C, h, w = a.shape
    H, W = size
    (i0, i1), (wy0, wy1) = _bilinear_taps(h, H)
    (j0, j1), (wx0, wx1) = _bilinear_taps(w, W)
    rows = ((i0, wy0.to(a.dtype)), (i1, wy1.to(a.dtype)))
    cols = ((j0, wx0.to(a.dtype)), (j1, wx1.to(a.dtype)))

    # (B, 3, 3, h, w): <f(i, j), g(i + dy, j + dx)>, edges clamped (never used there)
    def gram(f: Any, g: Any) -> Any:
        gp = torch.nn.functional.pad(g, (1, 1, 1, 1), mode="replicate")
        return torch.stack([torch.stack([(f * gp[:, :, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]).sum(1)
                                         for dx in (-1, 0, 1)], 1) for dy in (-1, 0, 1)], 1)

    def inner(k: Any) -> Any:  # (B, 3, 3, h, w) -> (B, H, W)
        out = torch.zeros((B, H, W), dtype=a.dtype, device=a.device)
        for ia, wa in rows:
            for jb, wb in cols:
                for ic, wc in rows:
                    for jd, wd in cols:
                        dy = (ic - ia + 1)[:, None]
                        dx = (jd - jb + 1)[None, :]
                        vals = k[:, dy, dx, ia[:, None], jb[None, :]]
                        out += vals * (wa * wc)[None, :, None] * (wb * wd)[None, None, :]
        return out

    ab, aa, bb = inner(gram(a, b)), inner(gram(a, a)), inner(gram(b, b))
    cos = ab / (aa.clamp(min=0).sqrt() * bb.clamp(min=0).sqrt()).clamp(min=1e-8)
    return (1.0 - cos)[:, None]
