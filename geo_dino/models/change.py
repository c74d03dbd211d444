"""Label-free change between two dates: the spectrum, the backbone's features, and their fusion.

Three scores, each per pixel and non-negative, larger meaning "more changed":

* **Spectral** (:class:`SpectralChange`), over every band of the rasters (or ``sources.spectral_bands``):
  each band of each date is standardised with that date's own mean and standard deviation (a relative
  radiometric normalisation: a uniform brightening between the dates is not change), then either

  - ``cva``: the change-vector magnitude ``sqrt(mean_b (z2_b - z1_b)^2)``, or
  - ``irmad``: iteratively reweighted multivariate alteration detection (Nielsen 2007). Canonical variates
    ``a_i·x1`` and ``b_i·x2`` are fitted on a sample of pixels, reweighted by each pixel's probability of no
    change, until the canonical correlations settle; the score is ``sqrt(chi2 / S)`` with
    ``chi2 = sum_i (MAD_i / sigma_i)^2`` and ``MAD_i = a_i·x1 - b_i·x2``: invariant to any affine change of
    either date's bands.

* **Features**: the cosine distance between the two dates' upsampled backbone features
  (:func:`geo_dino.models.label_free.upsampled_cosine_distance`).

* **Fused** (:class:`ChangeFusion`): each score is divided by its median over the fit sample (most pixels do
  not change, so the median is the typical no-change value and a score of 1 means "as different as an
  ordinary unchanged pixel"), then combined as the weighted geometric mean::

      fused = (spectral / m_s) ** w_s * (features / m_f) ** w_f,   w_s + w_f = 1

  A pixel is changed only where both the spectrum and the context moved; with ``w_f = 0`` the fused score is
  the (median-scaled) spectral score and with ``w_s = 0`` the feature score, exactly.

The threshold is Otsu's on a histogram of the score whose range follows the data: ``[0, hi]`` with ``hi`` a
high percentile of the fit sample (values above go into the last bin), gathered while the rows are written
(:func:`histogram_edges`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geo_dino.errors import GeoDinoError

METHODS = ("spectral", "features", "fused")
SPECTRAL_KINDS = ("cva", "irmad")
HIST_BINS = 2048
EPS = 1e-6


def _as_pixels(x: np.ndarray) -> np.ndarray:
    """Pixel samples ``(N, S)`` as float64 (refused when not two-dimensional)."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise GeoDinoError(f"pixel samples must be (N, bands), got shape {a.shape}")
    return a


@dataclass(frozen=True)
class SpectralChange:
    """A fitted spectral change score: per-date band statistics and, for IR-MAD, the canonical variates.

    Arrays are float64; ``score`` takes raw band values ``(B, S, H, W)`` of both dates (torch tensors or numpy
    arrays) and returns ``(B, 1, H, W)`` float32 (torch when given torch)."""

    kind: str
    mean1: np.ndarray  # (S,)
    std1: np.ndarray
    mean2: np.ndarray
    std2: np.ndarray
    # irmad only: x1 -> a.T @ z1, x2 -> b.T @ z2 (on the standardised bands), sigma of each MAD variate
    a: np.ndarray | None = None  # (S, S)
    b: np.ndarray | None = None  # (S, S)
    sigma: np.ndarray | None = None  # (S,)
    rho: np.ndarray | None = None  # (S,) canonical correlations, ascending
    iterations: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_bands(self) -> int:
        """Bands the score is computed over."""
        return int(self.mean1.shape[0])

    def _linear(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(W1, c1, W2, c2)``: the score's per-date affine maps ``v_d = W_d @ x_d + c_d`` (rows: variates),
        so that the score is ``sqrt(mean((v2 - v1)^2))``."""
        s1, s2 = 1.0 / np.maximum(self.std1, EPS), 1.0 / np.maximum(self.std2, EPS)
        if self.kind == "cva":
            w1, w2 = np.diag(s1), np.diag(s2)
        else:
            if self.a is None or self.b is None or self.sigma is None:
                raise GeoDinoError("an IR-MAD score without its canonical variates; fit it again")
            inv = 1.0 / np.maximum(self.sigma, EPS)
            w1 = (self.a.T * inv[:, None]) * s1[None, :]
            w2 = (self.b.T * inv[:, None]) * s2[None, :]
        return w1, -(w1 @ self.mean1), w2, -(w2 @ self.mean2)

    def score(self, x1: Any, x2: Any) -> Any:
        """Per-pixel score ``(B, 1, H, W)`` of raw band values ``(B, S, H, W)`` of the two dates."""
        import torch

        as_numpy = not torch.is_tensor(x1)
        t1 = torch.as_tensor(np.asarray(x1, np.float32)) if as_numpy else x1.float()
        t2 = torch.as_tensor(np.asarray(x2, np.float32)) if as_numpy else x2.float()
        if t1.shape != t2.shape or t1.ndim != 4 or t1.shape[1] != self.n_bands:
            raise GeoDinoError(f"spectral change takes two (B, {self.n_bands}, H, W) arrays, got "
                               f"{tuple(t1.shape)} and {tuple(t2.shape)}")
        w1, c1, w2, c2 = (torch.as_tensor(v, dtype=torch.float32) for v in self._linear())
        # v2 - v1 = W2 x2 - W1 x1 + (c2 - c1), one matmul per date over the band axis
        d = (torch.einsum("vs,bshw->bvhw", w2, t2) - torch.einsum("vs,bshw->bvhw", w1, t1)
             + (c2 - c1)[None, :, None, None])
        out = d.square().mean(1, keepdim=True).sqrt()
        return out.numpy() if as_numpy else out

    def to_record(self) -> dict[str, Any]:
        """What the provenance record holds: the kind, band statistics, IR-MAD's correlations."""
        rec: dict[str, Any] = {"kind": self.kind, "bands": self.n_bands,
                               "standardisation": "per band per date: (x - mean_d) / std_d",
                               "mean": [self.mean1.round(6).tolist(), self.mean2.round(6).tolist()],
                               "std": [self.std1.round(6).tolist(), self.std2.round(6).tolist()]}
        if self.kind == "irmad":
            rec |= {"canonical_correlations": None if self.rho is None else self.rho.round(6).tolist(),
                    "iterations": self.iterations, "score": "sqrt(chi2 / bands)"}
        else:
            rec["score"] = "sqrt(mean over bands of (z2 - z1)^2)"
        return rec | self.extra

    def arrays(self) -> dict[str, np.ndarray]:
        """The fitted arrays by name (to save with the run's fitted heads)."""
        out = {"mean1": self.mean1, "std1": self.std1, "mean2": self.mean2, "std2": self.std2}
        for k in ("a", "b", "sigma", "rho"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        return out

    @classmethod
    def from_arrays(cls, kind: str, arrays: dict[str, np.ndarray], iterations: int = 0) -> SpectralChange:
        """The inverse of :meth:`arrays`."""
        def get(k: str) -> np.ndarray | None:
            return np.asarray(arrays[k], np.float64) if k in arrays else None

        m1, s1, m2, s2 = (np.asarray(arrays[k], np.float64) for k in ("mean1", "std1", "mean2", "std2"))
        return cls(kind, m1, s1, m2, s2, a=get("a"), b=get("b"), sigma=get("sigma"), rho=get("rho"),
                   iterations=iterations)


def _weighted_stats(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sw = w.sum()
    mean = (w[:, None] * x).sum(0) / sw
    xc = x - mean
    cov = (w[:, None] * xc).T @ xc / sw
    return mean, cov


def fit_spectral(x1: np.ndarray, x2: np.ndarray, kind: str = "cva", *, max_iter: int = 50,
                 tol: float = 1e-5) -> SpectralChange:
    """Fit the spectral score on valid pixel samples ``(N, S)`` of both dates (the same pixels)."""
    if kind not in SPECTRAL_KINDS:
        raise GeoDinoError(f"spectral change kind {kind!r}: choose one of {list(SPECTRAL_KINDS)}")
    a1, a2 = _as_pixels(x1), _as_pixels(x2)
    if a1.shape != a2.shape:
        raise GeoDinoError(f"the two dates' samples differ in shape: {a1.shape} vs {a2.shape}")
    n, s = a1.shape
    if n < 10 * s:
        raise GeoDinoError(f"too few valid pixels ({n}) to fit the spectral change over {s} bands")
    m1, sd1 = a1.mean(0), a1.std(0)
    m2, sd2 = a2.mean(0), a2.std(0)
    if kind == "cva":
        return SpectralChange("cva", m1, sd1, m2, sd2)
    z1 = (a1 - m1) / np.maximum(sd1, EPS)
    z2 = (a2 - m2) / np.maximum(sd2, EPS)
    return _irmad(z1, z2, m1, sd1, m2, sd2, max_iter=max_iter, tol=tol)


def _irmad(z1: np.ndarray, z2: np.ndarray, m1: np.ndarray, sd1: np.ndarray, m2: np.ndarray, sd2: np.ndarray,
           *, max_iter: int, tol: float) -> SpectralChange:
    """IR-MAD on standardised samples: weighted CCA, MAD variates, chi-square no-change weights, repeat."""
    from scipy.linalg import eigh
    from scipy.stats import chi2 as chi2_dist

    n, s = z1.shape
    w = np.ones(n)
    rho_prev = np.full(s, -1.0)
    a = b = sigma = rho = None
    it = 0
    # a tiny ridge keeps the covariances invertible where a band is constant (or two bands are copies)
    ridge = 1e-6 * np.eye(s)
    for it in range(1, max_iter + 1):  # noqa: B007 - the count is recorded
        mean, cov = _weighted_stats(np.hstack([z1, z2]), w)
        c11, c12, c22 = cov[:s, :s] + ridge, cov[:s, s:], cov[s:, s:] + ridge
        # C12 C22^-1 C21 a = rho^2 C11 a (generalised symmetric eigenproblem), ascending rho^2
        lam, a = eigh(c12 @ np.linalg.solve(c22, c12.T), c11)
        lam = np.clip(lam, 0.0, 1.0)
        rho = np.sqrt(lam)
        b = np.linalg.solve(c22, c12.T @ a)
        # unit variance of the variates; b's sign makes each pair positively correlated
        a = a / np.sqrt(np.maximum(np.einsum("si,st,ti->i", a, c11, a), EPS))
        b = b / np.sqrt(np.maximum(np.einsum("si,st,ti->i", b, c22, b), EPS))
        sign = np.sign(np.einsum("si,st,ti->i", a, c12, b))
        b = b * np.where(sign == 0, 1.0, sign)
        mad = (z1 - mean[:s]) @ a - (z2 - mean[s:]) @ b
        # each MAD variate's spread on the (weighted) no-change pixels, measured rather than taken from
        # 2 (1 - rho): with near-duplicate bands rho -> 1 and that formula collapses to 0
        sigma = np.sqrt(np.maximum((w[:, None] * mad ** 2).sum(0) / w.sum(), EPS))
        chi2 = ((mad / sigma) ** 2).sum(1)
        w_next = 1.0 - chi2_dist.cdf(chi2, s)
        # the reweighting must not narrow the fit down to a handful of pixels (on real scenes whose no-change
        # spread is far from Gaussian it would, and the correlations run to 1): stop while a tenth of the
        # sample still carries the weight
        if w_next.sum() < 0.1 * n:
            break
        w = w_next
        if np.max(np.abs(rho - rho_prev)) < tol:
            break
        rho_prev = rho
    if a is None or b is None or sigma is None:
        raise GeoDinoError("IR-MAD did not run")
    # fold the variates' means into the per-date means: v = a.T (z - mean_z), z = (x - m) / sd
    mean_z1, mean_z2 = mean[:s], mean[s:]
    m1_eff = m1 + sd1 * mean_z1
    m2_eff = m2 + sd2 * mean_z2
    return SpectralChange("irmad", m1_eff, sd1, m2_eff, sd2, a=a, b=b, sigma=sigma, rho=rho, iterations=it)


@dataclass(frozen=True)
class ChangeFusion:
    """How the spectral and feature scores make the thresholded change score (see the module's note).

    ``scale_*``: the medians of each score on the fit sample; ``hist_high``: the upper end of the
    threshold's histogram (the fit sample's 99.9th percentile of the final score, times 1.5)."""

    method: str
    w_spectral: float
    w_features: float
    scale_spectral: float
    scale_features: float
    hist_high: float

    def combine(self, spectral: Any, features: Any) -> Any:
        """The thresholded score from the two raw scores (numpy arrays or torch tensors, same shape; either
        may be None when its weight is 0)."""
        if self.method == "spectral" or self.w_features == 0:
            if spectral is None:
                raise GeoDinoError("the spectral change score is needed (spectral weight > 0)")
            return spectral / self.scale_spectral
        if self.method == "features" or self.w_spectral == 0:
            if features is None:
                raise GeoDinoError("the feature change score is needed (feature weight > 0)")
            return features / self.scale_features
        s = (spectral / self.scale_spectral).clip(min=0)
        f = (features / self.scale_features).clip(min=0)
        return s ** self.w_spectral * f ** self.w_features

    def edges(self) -> np.ndarray:
        """Bin edges of the threshold's histogram: ``HIST_BINS`` bins over ``[0, hist_high]``."""
        return histogram_edges(self.hist_high)

    def to_record(self) -> dict[str, Any]:
        """The method, weights, scales and histogram range (the threshold itself is added at the end)."""
        return {"method": self.method, "weights": {"spectral": self.w_spectral, "features": self.w_features},
                "scales": {"spectral_median": self.scale_spectral, "features_median": self.scale_features},
                "rule": {"spectral": "spectral / median", "features": "features / median",
                         "fused": "(spectral / median_s) ** w_s * (features / median_f) ** w_f"}[self.method],
                "histogram": {"bins": HIST_BINS, "range": [0.0, self.hist_high]}}


def histogram_edges(high: float) -> np.ndarray:
    """``HIST_BINS + 1`` edges over ``[0, high]``."""
    return np.linspace(0.0, float(high), HIST_BINS + 1)


def histogram(values: np.ndarray, high: float) -> np.ndarray:
    """Counts of finite ``values`` in the bins of :func:`histogram_edges` (values above ``high`` in the last
    bin, below 0 in the first)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    idx = np.clip((v / high * HIST_BINS).astype(np.int64), 0, HIST_BINS - 1)
    return np.bincount(idx, minlength=HIST_BINS)


def fit_fusion(method: str, w_features: float, spectral_sample: np.ndarray | None,
               features_sample: np.ndarray | None) -> ChangeFusion:
    """Scales and histogram range from the fit sample's scores (1-D arrays of the same pixels)."""
    if method not in METHODS:
        raise GeoDinoError(f"change method {method!r}: choose one of {list(METHODS)}")
    if not 0.0 <= w_features <= 1.0:
        raise GeoDinoError(f"heads.change.feature_weight {w_features} must lie in [0, 1]")
    w_f = {"spectral": 0.0, "features": 1.0}.get(method, w_features)

    def median(v: np.ndarray | None) -> float:
        if v is None:
            return 1.0
        v = v[np.isfinite(v)]
        if v.size == 0:
            raise GeoDinoError("no valid pixel to fit the change scores on")
        m = float(np.median(v))
        return m if m > 0 else max(float(v.mean()), EPS)

    provisional = ChangeFusion(method, 1.0 - w_f, w_f, median(spectral_sample), median(features_sample), 1.0)
    score = np.asarray(provisional.combine(spectral_sample, features_sample), dtype=np.float64)
    score = score[np.isfinite(score)]
    high = float(np.percentile(score, 99.9)) * 1.5 if score.size else 1.0
    return ChangeFusion(method, 1.0 - w_f, w_f, provisional.scale_spectral, provisional.scale_features,
                        high if high > 0 else 1.0)


THRESHOLDS = ("minimum-error", "otsu")


def minimum_error_threshold(hist: np.ndarray, edges: np.ndarray) -> float:
    """Kittler and Illingworth's minimum-error threshold (1986) from a histogram (counts per bin, edges).

    Models the histogram as two Gaussians (below and above the threshold), each with its own weight and
    variance, and picks the threshold minimising ``1 + 2 (P0 ln s0 + P1 ln s1) - 2 (P0 ln P0 + P1 ln P1)``.
    Unlike Otsu's (which favours classes of similar size and spread), it suits change maps, where a few
    per cent of pixels with widely spread scores lie above a narrow no-change peak."""
    h = np.asarray(hist, dtype=np.float64)
    total = h.sum()
    if total <= 0:
        raise GeoDinoError("no valid change value to threshold")
    c = (edges[:-1] + edges[1:]) / 2
    p = h / total
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * c)
    s0 = np.cumsum(p * c * c)
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        mu0, mu1 = m0 / w0, (m0[-1] - m0) / w1
        v0 = s0 / w0 - mu0 ** 2
        v1 = (s0[-1] - s0) / w1 - mu1 ** 2
        j = 1 + (w0 * np.log(v0) + w1 * np.log(v1)) - 2 * (w0 * np.log(w0) + w1 * np.log(w1))
    # a class must hold some mass and some spread (a bin's width squared / 12 at least)
    floor = ((edges[1] - edges[0]) ** 2) / 12
    ok = (w0 > 1e-6) & (w1 > 1e-6) & (v0 > floor) & (v1 > floor) & np.isfinite(j)
    if not ok.any():
        from geo_dino.models.label_free import otsu_threshold

        return otsu_threshold(hist, edges)
    i = int(np.argmin(np.where(ok, j, np.inf)))
    return float(edges[i + 1])


def threshold_from_histogram(hist: np.ndarray, edges: np.ndarray, method: str) -> float:
    """The change threshold of ``method`` (``minimum-error`` or ``otsu``) from a histogram."""
    from geo_dino.models.label_free import otsu_threshold

    if method == "otsu":
        return otsu_threshold(hist, edges)
    if method == "minimum-error":
        return minimum_error_threshold(hist, edges)
    raise GeoDinoError(f"threshold method {method!r}: choose one of {list(THRESHOLDS)} or a number")


@dataclass(frozen=True)
class ChangeModel:
    """What a run fits once for its label-free change: the spectral score (None with ``method: features``)
    and the fusion's scales and histogram range. Saved in the run's ``work/change.npz``."""

    spectral: SpectralChange | None
    fusion: ChangeFusion
    layers: list[int] = field(default_factory=list)  # blocks of the feature change; [] = the last one

    def save(self, path: str | Path) -> Path:
        """Write the fitted arrays and parameters atomically (temporary file, then rename)."""
        import json

        from geo_dino.files import save_npz

        arrays: dict[str, Any] = dict(self.spectral.arrays()) if self.spectral is not None else {}
        params = {"spectral_kind": None if self.spectral is None else self.spectral.kind,
                  "iterations": 0 if self.spectral is None else self.spectral.iterations,
                  "fusion": self.fusion.__dict__, "layers": list(self.layers)}
        arrays["params"] = np.frombuffer(json.dumps(params).encode(), dtype=np.uint8)
        return save_npz(path, arrays)

    @classmethod
    def load(cls, path: str | Path) -> ChangeModel:
        """Read a model written by :meth:`save`."""
        import json

        with np.load(path, allow_pickle=False) as z:
            params = json.loads(z["params"].tobytes().decode())
            arrays = {k: z[k] for k in z.files if k != "params"}
        spectral = (None if params["spectral_kind"] is None
                    else SpectralChange.from_arrays(params["spectral_kind"], arrays, params["iterations"]))
        return cls(spectral, ChangeFusion(**params["fusion"]), list(params.get("layers") or []))

    def to_record(self) -> dict[str, Any]:
        """The provenance record's ``change`` section (the threshold is added when it is known)."""
        return self.fusion.to_record() | {
            "spectral": None if self.spectral is None else self.spectral.to_record(),
            "features": None if self.fusion.w_features == 0 else
            {"score": "cosine distance of the two dates' bilinearly upsampled backbone features"
                      + (f", averaged over blocks {self.layers}" if self.layers else " (last block, normed)"),
             "layers": list(self.layers) or None}}


def fit_change_model(method: str, spectral_kind: str, w_features: float, x1: np.ndarray | None,
                     x2: np.ndarray | None, feature_distance: np.ndarray | None,
                     layers: list[int] | None = None) -> ChangeModel:
    """Fit the spectral score on pixel samples ``(N, S)`` of both dates (None with ``method: features``),
    then the fusion on the scores of the same pixels."""
    spectral = None
    spec_sample = None
    if method != "features":
        if x1 is None or x2 is None:
            raise GeoDinoError("spectral change needs pixel samples of both dates")
        spectral = fit_spectral(x1, x2, spectral_kind)
        spec_sample = spectral.score(x1.T[None, :, :, None], x2.T[None, :, :, None])[0, 0, :, 0]
    feats = feature_distance if method != "spectral" else None
    return ChangeModel(spectral, fit_fusion(method, w_features, spec_sample, feats), list(layers or []))


def patch_period_power(values: np.ndarray, patch: int) -> float:
    """How strongly a map repeats with the backbone's patch period along its rows (a checkerboard measure):
    the mean row power spectrum's peak within one bin of frequency ``1 / patch``, over the mean of the bins
    3 to 6 away on either side. About 1: no patch grid in the map; a patch-grid checkerboard gives several.
    Rows with a NaN in more than 1 % of their pixels are left out (NaN counts as the row mean)."""
    m = np.asarray(values, dtype=np.float64)
    rows = [r for r in m if np.isfinite(r).mean() >= 0.99]
    if not rows or m.shape[1] < 4 * patch:
        raise GeoDinoError(f"too few complete rows, or rows shorter than {4 * patch} pixels, to measure")
    power = np.mean([np.abs(np.fft.rfft(np.nan_to_num(r - np.nanmean(r)))) ** 2 for r in rows], axis=0)
    freq = np.fft.rfftfreq(m.shape[1])
    k = int(np.argmin(np.abs(freq - 1.0 / patch)))
    side = np.r_[power[max(k - 6, 1):max(k - 2, 1)], power[k + 3:k + 7]]
    return float(power[k - 1:k + 2].max() / max(side.mean(), 1e-30))
