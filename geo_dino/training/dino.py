"""The DINO recipe's modules and losses: projection head, self-distillation loss with centering, iBOT masked
patch loss, KoLeo regulariser, Gram anchoring, schedules, and the student/teacher token forward.

Everything here is plain torch and works on any timm ViT the registry builds (DINO/DINOv2 learned positions,
DINOv3 RoPE with registers). Distributed runs all-reduce the centres; nothing here assumes a GPU.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if _world() > 1:
        dist.all_reduce(t)
        t /= _world()
    return t


class DINOHead(nn.Module):
    """DINO projection head (``dino_head.py``): an MLP to a bottleneck, L2 normalisation, then a
    weight-normalised linear layer to ``out_dim`` prototypes. ``norm_last_layer`` fixes the weight norm's gain
    at 1 (DINO's default for ViT-S stability)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, norm_last_layer: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        if norm_last_layer:
            gain.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Prototype logits ``(..., out_dim)`` of features ``(..., in_dim)``."""
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)


def tokens(model: Any, x: torch.Tensor, mask: torch.Tensor | None = None,
           mask_token: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLS token ``(B, C)`` and patch tokens ``(B, N, C)`` of a timm ViT after its final norm, with the
    patches where ``mask`` ``(B, N)`` is true replaced by ``mask_token`` before the blocks (iBOT). Register
    tokens are dropped by their count, never read as patches."""
    b = x.shape[0]
    h = model.patch_embed(x)
    if mask is not None:
        if mask_token is None:
            raise ValueError("tokens(): a mask needs a mask_token to put in the masked patches")
        if h.ndim == 4:  # dynamic_img_size: (B, H, W, C)
            gh, gw = h.shape[1], h.shape[2]
            h = torch.where(mask.view(b, gh, gw, 1), mask_token.to(h.dtype).view(1, 1, 1, -1), h)
        else:
            h = torch.where(mask.unsqueeze(-1), mask_token.to(h.dtype).view(1, 1, -1), h)
    out = model._pos_embed(h)
    rope = None
    if isinstance(out, tuple):  # timm Eva (DINOv3): tokens and the rotary embedding
        out, rope = out
    out = model.norm_pre(out)
    for blk in model.blocks:
        out = blk(out, rope=rope) if rope is not None else blk(out)
    out = model.norm(out)
    npt = model.num_prefix_tokens
    return out[:, 0], out[:, npt:]


class _CentredLoss(nn.Module):
    """A teacher distribution made by centring (an EMA ``center`` of the teacher's outputs) and sharpening."""

    center: torch.Tensor  # a registered buffer

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_probs(self, teacher_out: torch.Tensor, temp: float) -> torch.Tensor:
        return F.softmax((teacher_out.float() - self.center) / temp, dim=-1)


class DINOLoss(_CentredLoss):
    """Cross-entropy between the centred, sharpened teacher distribution of each global crop and the student's
    distribution of every other crop (DINO eq. 1 and ``DINOLoss``); centre updated with momentum 0.9."""

    def forward(self, student_out: list[torch.Tensor], teacher_probs: list[torch.Tensor]) -> torch.Tensor:
        """``student_out``: logits of each crop ``(B, K)`` (globals first); ``teacher_probs``: of each
        global."""
        total: torch.Tensor | float = 0.0
        n = 0
        for iq, q in enumerate(teacher_probs):
            for v, s in enumerate(student_out):
                if v == iq:
                    continue  # same view: skipped
                loss = torch.sum(-q * F.log_softmax(s.float() / self.student_temp, dim=-1), dim=-1)
                total = total + loss.mean()
                n += 1
        if not isinstance(total, torch.Tensor):
            raise ValueError(f"the DINO loss needs a teacher view and a different student view "
                             f"({len(teacher_probs)} teacher, {len(student_out)} student outputs)")
        return total / n

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """EMA update of ``center`` with the mean of the teacher's logits ``(N, K)`` (one row per global
        crop), over all ranks."""
        batch_center = teacher_out.float().sum(dim=0, keepdim=True)
        batch_center = _all_reduce_mean(batch_center) / teacher_out.shape[0]
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


class IBOTPatchLoss(_CentredLoss):
    """iBOT masked-image-modelling loss (Zhou et al. 2022; DINOv2 ``ibot_patch_loss.py``, ``forward_masked``,
    with softmax centering): at the masked patches of the student's global crops, the student predicts the
    teacher's centred distribution of the same, unmasked patch. Each image's loss is averaged over its masked
    patches, then summed over images and divided by the number of images."""

    def forward(self, student_masked: torch.Tensor, teacher_probs: torch.Tensor,
                masks: torch.Tensor) -> torch.Tensor:
        """``student_masked``/``teacher_probs``: ``(M, K)`` for the ``M`` masked patches, in ``masks[masks]``
        order; ``masks``: ``(B, N)``."""
        loss = torch.sum(-teacher_probs * F.log_softmax(student_masked.float() / self.student_temp, dim=-1),
                         -1)
        weights = (1.0 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks]
        return (loss * weights).sum() / masks.shape[0]

    @torch.no_grad()
    def update_center(self, teacher_masked: torch.Tensor) -> None:
        """EMA update of ``center`` with the mean of the teacher's masked-patch logits ``(M, K)``, over the
        masked patches of all ranks."""
        batch_center = teacher_masked.float().sum(dim=0, keepdim=True)
        count = torch.tensor([float(teacher_masked.shape[0])], device=teacher_masked.device)
        if _world() > 1:
            dist.all_reduce(batch_center)
            dist.all_reduce(count)
        batch_center = batch_center / count.clamp(min=1.0)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko–Leonenko entropy regulariser (DINOv2 ``koleo_loss.py``): ``-mean(log(d_nn))`` of the
    L2-normalised features, ``d_nn`` the distance to each sample's nearest neighbour in the batch."""
    x = F.normalize(x.float(), eps=eps, p=2, dim=-1)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-2.0)
        nn_idx = dots.argmax(dim=1)
    dist_nn = F.pairwise_distance(x, x[nn_idx], p=2, eps=eps)
    return -torch.log(dist_nn + eps).mean()


def gram_loss(student_patches: torch.Tensor, gram_patches: torch.Tensor) -> torch.Tensor:
    """Gram anchoring (DINOv3 section 4.2, ``gram_loss.py`` with ``normalized`` and ``img_level``): mean
    squared difference between the student's and the Gram teacher's patch-similarity matrices, per image."""
    s = F.normalize(student_patches.float(), dim=-1)
    t = F.normalize(gram_patches.float(), dim=-1)
    return (s @ s.transpose(1, 2) - t @ t.transpose(1, 2)).pow(2).mean()


def random_masks(batch: int, grid: tuple[int, int], ratio_min_max: tuple[float, float],
                 sample_probability: float, generator: torch.Generator) -> torch.Tensor:
    """iBOT/DINOv2 masks ``(B, N)``: a fraction ``sample_probability`` of the images get masked, with ratios
    spread over ``ratio_min_max`` (DINOv2 ``collate_data_and_cast``); the others keep every patch. Random
    patches rather than DINOv2's blocks: overhead scenes have no canonical object layout to hide."""
    n = grid[0] * grid[1]
    n_masked = int(batch * sample_probability)
    masks = torch.zeros(batch, n, dtype=torch.bool)
    lo, hi = ratio_min_max
    probs = torch.linspace(lo, hi, n_masked + 1)
    for i in range(n_masked):
        r = float(probs[i] + (probs[i + 1] - probs[i]) * torch.rand((), generator=generator))
        k = max(1, int(round(n * r)))
        idx = torch.randperm(n, generator=generator)[:k]
        masks[i, idx] = True
    return masks[torch.randperm(batch, generator=generator)]


def cosine_schedule(base: float, final: float, total: int, warmup: int = 0, start: float = 0.0) -> np.ndarray:
    """Per-step values: linear warm-up from ``start`` to ``base`` over ``warmup`` steps, then a cosine from
    ``base`` to ``final`` (DINO ``utils.cosine_scheduler``, in steps rather than epochs)."""
    warmup = min(warmup, total)
    ramp = np.linspace(start, base, warmup, endpoint=False) if warmup else np.array([])
    steps = np.arange(total - warmup)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(1, len(steps))))
    return np.concatenate([ramp, cos]).astype(np.float64)


def teacher_temp_schedule(warmup_temp: float, temp: float, warmup: int, total: int) -> np.ndarray:
    """Linear warm-up of the teacher temperature, then constant (DINO ``DINOLoss.teacher_temp_schedule``)."""
    warmup = min(warmup, total)
    return np.concatenate([np.linspace(warmup_temp, temp, warmup), np.full(total - warmup, temp)])


def entropy(p: torch.Tensor) -> float:
    """Mean entropy (nats) of rows of probabilities."""
    return float(-(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean())


def collapse_monitors(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float,
                      features: torch.Tensor, out_dim: int) -> dict[str, float]:
    """Teacher entropy, student–teacher KL and feature standard deviation for one global view.

    Collapse to one prototype drives the teacher entropy to 0; collapse to the uniform distribution drives it
    to ``log(out_dim)`` and the KL to 0; a constant representation drives the feature std (of L2-normalised
    backbone features, per dimension) to 0 — healthy features sit near ``1/sqrt(C)``.
    """
    with torch.no_grad():
        log_s = F.log_softmax(student_logits.float() / student_temp, dim=-1)
        q = teacher_probs.float()
        kl = float((q * (torch.log(q.clamp_min(1e-12)) - log_s)).sum(-1).mean())
        f = F.normalize(features.float(), dim=-1)
        std = float(f.std(dim=0).mean())
        mean_probs = q.mean(0)
        return {
            "teacher_entropy": entropy(q),
            "teacher_batch_entropy": entropy(mean_probs.unsqueeze(0)),  # of the batch-mean distribution
            "max_entropy": math.log(out_dim),
            "kl_student_teacher": kl,
            "feature_std": std,
            "feature_std_healthy": 1.0 / math.sqrt(f.shape[-1]),
        }


def collapse_warnings(m: dict[str, float]) -> list[str]:
    """Loud, specific messages when the monitors show collapse (empty list when healthy)."""
    out = []
    if m["teacher_batch_entropy"] < 0.1 * m["max_entropy"] and m["teacher_batch_entropy"] < 1.0:
        out.append(f"COLLAPSE: the teacher puts the whole batch on a few prototypes (batch entropy "
                   f"{m['teacher_batch_entropy']:.3f} of {m['max_entropy']:.2f} nats); "
                   "raise center momentum or teacher temperature warm-up, lower the learning rate")
    if m["teacher_entropy"] > 0.98 * m["max_entropy"] and m["kl_student_teacher"] < 1e-3:
        out.append(f"COLLAPSE: the teacher's outputs are uniform (entropy {m['teacher_entropy']:.3f} ≈ "
                   f"log K = {m['max_entropy']:.3f}) and the student matches them (KL "
                   f"{m['kl_student_teacher']:.2e}); lower the teacher temperature")
    if m["feature_std"] < 0.2 * m["feature_std_healthy"]:
        out.append(f"COLLAPSE: backbone features are nearly constant across the batch (std "
                   f"{m['feature_std']:.4f}, healthy ≈ {m['feature_std_healthy']:.4f})")
    return out
