"""A multi-layer segmentation head in the style of DPT (Ranftl et al. 2021, "Vision Transformers for Dense
Prediction"), sized for frozen DINO features.

Input: the patch features of ``L`` backbone blocks (1 ≤ L ≤ 4, shallow to deep), concatenated along channels:
``(B, L·C, h, w)`` — the same tensor shape convention as :class:`~geo_dino.models.seg_heads.LinearHead`, so
one training loop and one file format serve both. DPT's stages, scaled down:

1. **Reassemble**: each layer goes through a 1×1 convolution to ``hidden`` channels and is resampled to its
   own scale of the patch grid — the deepest layer to ×½ (a stride-2 3×3 convolution), the next to ×1, then
   ×2 and ×4 (transposed convolutions), as DPT does for its four hooks. With fewer layers the deepest scales
   are used.
2. **Fuse**, deepest first: a residual convolution unit, then bilinear resize to the next (finer) scale and a
   sum with that scale's reassembled layer, and another residual unit.
3. **Predict**: a 3×3 convolution and ReLU, a 1×1 convolution to ``n_classes`` logits at the finest scale,
   bilinearly upsampled to the requested output size. With ``spectral`` bands per pixel
   (:class:`~geo_dino.models.spectral_input.SpectralInput`), the 3×3 convolution's output is upsampled to the
   output size first, the standardised bands are added through a 1×1 convolution, and the ReLU and the last
   1×1 convolution run per pixel: the context from the features meets the spectrum at full resolution.

No batch normalisation (heads are trained on small label sets, often one chip): the result of a forward pass
does not depend on what else is in the batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from geo_dino.errors import ConfigError
from geo_dino.models.spectral_input import SpectralInput

__all__ = ["DPTHead"]

_SCALES = (4.0, 2.0, 1.0, 0.5)  # DPT's reassemble scales for hooks 1..4 (relative to the patch grid)


class _ResidualUnit(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(torch.relu(self.conv1(torch.relu(x))))


def _resampler(scale: float, ch: int) -> nn.Module:
    if scale == 4.0:
        return nn.ConvTranspose2d(ch, ch, kernel_size=4, stride=4)
    if scale == 2.0:
        return nn.ConvTranspose2d(ch, ch, kernel_size=2, stride=2)
    if scale == 0.5:
        return nn.Conv2d(ch, ch, kernel_size=3, stride=2, padding=1)
    return nn.Identity()


class DPTHead(SpectralInput):
    """Logits ``(B, K, H, W)`` from ``n_layers`` concatenated layers of ``embed_dim`` features each.

    ``embed_dim``: channels of one backbone layer (C); ``n_layers``: how many layers are concatenated (L);
    ``hidden``: channels inside the head. ``in_channels`` is ``L·C`` (what :meth:`forward` checks).
    """

    kind = "dpt"

    def __init__(self, embed_dim: int, n_classes: int, n_layers: int = 4, hidden: int = 64,
                 spectral: int = 0) -> None:
        super().__init__()
        if embed_dim < 1 or n_classes < 1 or hidden < 1:
            raise ConfigError(f"embed_dim {embed_dim}, n_classes {n_classes} and hidden {hidden} "
                              "must be positive")
        if not 1 <= n_layers <= len(_SCALES):
            raise ConfigError(f"a DPT head takes 1 to {len(_SCALES)} layers, not {n_layers}")
        self.embed_dim, self.n_classes = int(embed_dim), int(n_classes)
        self.n_layers, self.hidden = n_layers, hidden
        self.in_channels = self.embed_dim * n_layers
        scales = _SCALES[len(_SCALES) - n_layers:]  # the deepest scales when fewer layers are hooked
        self.scales = scales
        self.project = nn.ModuleList(nn.Conv2d(self.embed_dim, hidden, 1) for _ in scales)
        self.resample = nn.ModuleList(_resampler(s, hidden) for s in scales)
        self.units_in = nn.ModuleList(_ResidualUnit(hidden) for _ in scales)
        self.units_out = nn.ModuleList(_ResidualUnit(hidden) for _ in scales)
        self.out = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(hidden, n_classes, 1))
        self._init_spectral(spectral)
        if self.spectral:
            self.proj_spectral = nn.Conv2d(self.spectral, hidden, 1, bias=False)
            # a linear path from the bands to the logits (started as the per-pixel logistic regression); the
            # DPT part's last layer starts at zero and learns what the context adds
            self.skip = nn.Conv2d(self.spectral, n_classes, 1)
            for p in (*self.skip.parameters(), *self.out[2].parameters()):
                nn.init.zeros_(p)

    def config(self) -> dict[str, Any]:
        """What :func:`~geo_dino.models.seg_heads.build_head` needs to make this head again (stored in head
        files)."""
        cfg = {"type": self.kind, "embed_dim": self.embed_dim, "n_classes": self.n_classes,
               "n_layers": self.n_layers, "hidden": self.hidden}
        return cfg | ({"spectral": self.spectral} if self.spectral else {})

    def linear_spectral(self) -> tuple[Tensor, Tensor | None]:
        """The (weight, bias) of the linear path from the standardised bands to the logits."""
        return self.skip.weight, self.skip.bias

    def forward(self, features: Tensor, out_size: tuple[int, int] | None = None,
                spectral: Tensor | None = None) -> Tensor:
        """Logits of ``features (B, L·C, h, w)``: at 4× (or the finest hooked scale of) the patch grid, or
        bilinearly resized to ``out_size`` ``(rows, cols)`` when given."""
        if features.ndim != 4 or features.shape[1] != self.in_channels:
            raise ConfigError(f"features {tuple(features.shape)} are not (B, {self.in_channels}, h, w): "
                              f"{self.n_layers} layers of {self.embed_dim} channels")
        h, w = features.shape[-2:]
        layers = features.split(self.embed_dim, dim=1)
        maps = [rs(pr(x)) for x, pr, rs in zip(layers, self.project, self.resample, strict=True)]
        fused = self.units_out[-1](self.units_in[-1](maps[-1]))  # the deepest layer starts the fusion
        for i in range(len(maps) - 2, -1, -1):
            up = nn.functional.interpolate(fused, size=maps[i].shape[-2:], mode="bilinear",
                                           align_corners=False)
            fused = self.units_out[i](up + self.units_in[i](maps[i]))
        size = tuple(out_size) if out_size is not None else (int(h * self.scales[0]), int(w * self.scales[0]))
        if self.spectral:
            if out_size is not None:
                size = tuple(out_size)
            elif spectral is not None:
                size = tuple(spectral.shape[-2:])
            else:
                raise ConfigError(f"this head takes {self.spectral} spectral channels per pixel; none given")
            hid = nn.functional.interpolate(self.out[0](fused), size=size, mode="bilinear",
                                            align_corners=False)
            s = self._spectral(spectral, (int(size[0]), int(size[1])))
            return self.out[2](self.out[1](hid + self.proj_spectral(s))) + self.skip(s)
        logits = self.out(fused)
        if tuple(logits.shape[-2:]) != size:
            logits = nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits
