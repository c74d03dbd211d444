"""The base of every supervised head (:mod:`geo_dino.models.seg_heads`, :mod:`geo_dino.models.dpt_head`): what
a head declares (kind, sizes, config) and its per-pixel spectral part, band values standardised by buffers
saved with the head's weights."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from geo_dino.errors import ConfigError


class SpectralInput(torch.nn.Module):
    """The per-pixel spectral part of a head: ``spectral`` band values standardised by buffers
    (``spec_mean``, ``spec_std``, set from the training pixels by :meth:`set_spectral_stats`)."""

    kind: str  # "linear", "mlp" or "dpt" (the ``type`` of its config)
    embed_dim: int
    n_classes: int
    spectral: int = 0
    spec_mean: Tensor  # buffers (spectral heads only)
    spec_std: Tensor

    def config(self) -> dict[str, Any]:
        """What :func:`~geo_dino.models.seg_heads.build_head` needs to make this head again."""
        raise NotImplementedError

    def linear_spectral(self) -> tuple[Tensor, Tensor | None]:
        """The (weight, bias) of the linear path from the standardised bands to the logits."""
        raise NotImplementedError

    def _init_spectral(self, spectral: int) -> None:
        if spectral < 0:
            raise ConfigError(f"spectral channels {spectral} must be >= 0")
        self.spectral = int(spectral)
        if self.spectral:
            self.register_buffer("spec_mean", torch.zeros(self.spectral))
            self.register_buffer("spec_std", torch.ones(self.spectral))

    def set_spectral_stats(self, mean: Any, std: Any) -> None:
        """Standardise the spectral input with these per-channel statistics (of the training pixels)."""
        m = torch.as_tensor(np.asarray(mean, dtype=np.float32))
        s = torch.as_tensor(np.asarray(std, dtype=np.float32)).clamp(min=1e-6)
        if m.shape != (self.spectral,) or s.shape != (self.spectral,):
            raise ConfigError(f"spectral statistics of shape {tuple(m.shape)} for {self.spectral} channels")
        self.spec_mean.copy_(m)
        self.spec_std.copy_(s)

    def _spectral(self, spectral: Tensor | None, size: tuple[int, int]) -> Tensor:
        """Standardised spectral input ``(B, S, H, W)`` (checked against the head's ``S`` and ``size``)."""
        if spectral is None:
            raise ConfigError(f"this head takes {self.spectral} spectral channels per pixel; none were given")
        if spectral.ndim != 4 or spectral.shape[1] != self.spectral or tuple(spectral.shape[-2:]) != size:
            raise ConfigError(f"spectral input {tuple(spectral.shape)} is not "
                              f"(B, {self.spectral}, {size[0]}, {size[1]})")
        return (spectral.float() - self.spec_mean.view(1, -1, 1, 1)) / self.spec_std.view(1, -1, 1, 1)
