"""From raster values to backbone inputs: bit-depth scaling, then the checkpoint's mean/std.

One :class:`Preprocessor` is built per run and applied to every date, so two dates are always
preprocessed identically. Everything applied is recorded (``to_dict``) in the provenance record.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from geo_dino.config import PreprocessConfig
from geo_dino.errors import ConfigError


@dataclass(frozen=True)
class Preprocessor:
    """``(x - low) / (high - low)`` clipped to [0, 1] per band, then ``(x - mean) / std``."""

    scale: str
    low: tuple[float, ...]
    high: tuple[float, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    bands: tuple[int, ...]

    def __call__(self, data: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """``data`` ``(..., bands, h, w)`` and ``valid`` ``(..., h, w)`` → float32, invalid pixels at 0 (the
        mean)."""
        x = data.astype(np.float32)
        shape = (-1, 1, 1)
        low = np.asarray(self.low, np.float32).reshape(shape)
        span = (np.asarray(self.high, np.float32) - np.asarray(self.low, np.float32)).reshape(shape)
        x = np.clip((x - low) / span, 0.0, 1.0)
        x = ((x - np.asarray(self.mean, np.float32).reshape(shape))
             / np.asarray(self.std, np.float32).reshape(shape))
        return np.where(valid[..., None, :, :], x, np.float32(0.0))

    def to_dict(self) -> dict[str, Any]:
        """Scaling kind, bounds, mean/std and bands as a plain dict, as the provenance record holds them."""
        return asdict(self)


def make_preprocessor(dtype: str, bands: tuple[int, ...], cfg: PreprocessConfig,
                      mean: tuple[float, ...], std: tuple[float, ...],
                      stats: np.ndarray | None = None) -> Preprocessor:
    """Choose the scaling for ``dtype``. ``stats`` are per-band percentiles ``(bands, 2)`` when needed."""
    n = len(bands)
    mean = tuple(cfg.mean or mean)
    std = tuple(cfg.std or std)
    if len(mean) != n or len(std) != n:
        raise ConfigError(f"preprocess: mean/std have {len(mean)}/{len(std)} values for {n} bands; give "
                          "preprocess.mean and preprocess.std with one value per band")
    if any(s <= 0 for s in std):
        raise ConfigError("preprocess.std: every value must be positive")
    kind = cfg.scale
    if kind == "auto":
        kind = "uint8" if dtype == "uint8" else "percentile"
    if kind == "uint8":
        low, high = (0.0,) * n, (255.0,) * n
    elif kind == "range":
        if cfg.value_range is None:
            raise ConfigError("preprocess.value_range: required when preprocess.scale is 'range'")
        lo, hi = cfg.value_range
        if hi <= lo:
            raise ConfigError("preprocess.value_range: the upper bound must exceed the lower bound")
        low, high = (float(lo),) * n, (float(hi),) * n
    elif kind == "none":
        low, high = (0.0,) * n, (1.0,) * n
    else:
        if stats is None:
            raise ConfigError("percentile scaling needs band statistics")
        low = tuple(float(v) for v in stats[:, 0])
        high = tuple(float(max(h, lo + 1e-6)) for lo, h in zip(stats[:, 0], stats[:, 1], strict=True))
    return Preprocessor(kind, tuple(low), tuple(high), mean, std, tuple(bands))


def weights_scaling(cfg: PreprocessConfig, value_range: tuple[float, float] | None) -> PreprocessConfig:
    """The preprocessing config with the weights' own scaling filled in: ``scale: auto`` becomes ``range``
    over ``value_range`` when the checkpoint or its architecture declares one (torchgeo's Sentinel-2
    weights: DN / 10000); an explicit scale is kept as the user set it."""
    if cfg.scale != "auto" or value_range is None:
        return cfg
    return cfg.model_copy(update={"scale": "range", "value_range": (float(value_range[0]),
                                                                     float(value_range[1]))})
