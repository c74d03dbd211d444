"""A faster forward for DINOv3-architecture ViTs (timm ``Eva`` with RoPE): same weights, same features.

timm's attention slices the patch tokens out of q and k, rotates them, and concatenates the prefix tokens
(CLS and registers) back — two slices and a ``cat`` per tensor per block — and recomputes the RoPE sin/cos
from the periods on every forward. Here the sin/cos tables are computed once per grid size and extended to
the prefix tokens with the identity rotation (cos = 1, sin = 0), so the rotation is one elementwise
expression over the whole sequence: no slicing, no concatenation, and under ``torch.compile`` it fuses into
the kernel that splits q, k, v. Attention is PyTorch's SDPA (flash attention on a GPU).

:class:`FusedRopeViT` wraps a timm DINOv3 model in place (it holds the same modules, no copies) and exposes
``forward_features`` (tokens after the final norm) and ``dense_features`` (NCHW patch features).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _rotate(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, half: bool) -> torch.Tensor:
    """``x · cos + rot(x) · sin`` in the rotation layout timm uses (``half``: [-x2, x1], else interleaved)."""
    if half:
        x1, x2 = x.chunk(2, dim=-1)
        rx = torch.cat([-x2, x1], dim=-1)
    else:
        rx = torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)
    return (x * cos + rx * sin).to(x.dtype)


class FusedRopeViT(nn.Module):
    """A timm DINOv3 ``Eva`` model with the RoPE of every block applied over the full token sequence."""

    # the rotation layout (timm's ``rotate_half``); not ``half``, which is nn.Module's fp16 cast
    rotate_half: bool

    def __init__(self, model: Any) -> None:
        super().__init__()
        if getattr(model, "rope", None) is None:
            raise TypeError("FusedRopeViT needs a RoPE ViT (timm Eva with use_rot_pos_emb)")
        self.model = model
        self.npt = model.num_prefix_tokens
        self.rotate_half = bool(getattr(model.blocks[0].attn, "rotate_half", False))
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _rope_tables(self, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(sin, cos) of shape ``(prefix + h·w, head_dim)`` in float32; identity rows for prefix tokens."""
        key = (h, w, device)
        if key not in self._tables:
            with torch.no_grad():
                emb = self.model.rope.get_embed(shape=(h, w)).to(device=device, dtype=torch.float32)
                sin, cos = emb.chunk(2, -1)
                d = sin.shape[-1]
                sin = torch.cat([sin.new_zeros(self.npt, d), sin])
                cos = torch.cat([cos.new_ones(self.npt, d), cos])
            self._tables[key] = (sin.contiguous(), cos.contiguous())
        return self._tables[key]

    def _attention(self, attn: Any, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        if attn.q_bias is not None:
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            qkv = F.linear(x, attn.qkv.weight, bias)
        else:
            qkv = attn.qkv(x)
        q, k, v = qkv.view(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        q = _rotate(q, sin, cos, self.rotate_half).type_as(v)
        k = _rotate(k, sin, cos, self.rotate_half).type_as(v)
        o = F.scaled_dot_product_attention(q, k, v)
        o = attn.norm(o.transpose(1, 2).reshape(B, N, -1))
        return attn.proj(o)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens ``(B, prefix + h·w, C)`` (CLS, registers, then patches) after the final norm."""
        m = self.model
        grid = m.patch_embed(x)  # (B, h, w, C) with dynamic_img_size
        B, h, w, C = grid.shape
        tokens = grid.reshape(B, h * w, C)
        prefix = [m.cls_token.expand(B, -1, -1)]
        if m.reg_token is not None:
            prefix.append(m.reg_token.expand(B, -1, -1))
        tokens = m.norm_pre(torch.cat(prefix + [tokens], dim=1))
        sin, cos = self._rope_tables(h, w, tokens.device)
        for blk in m.blocks:
            a = self._attention(blk.attn, blk.norm1(tokens), sin, cos)
            tokens = tokens + (blk.gamma_1 * a if blk.gamma_1 is not None else a)
            f = blk.mlp(blk.norm2(tokens))
            tokens = tokens + (blk.gamma_2 * f if blk.gamma_2 is not None else f)
        return m.norm(tokens)

    def dense_features(self, x: torch.Tensor) -> torch.Tensor:
        """Patch features ``(B, C, H/p, W/p)`` after the final norm; prefix tokens dropped by count."""
        p = self.model.patch_embed.patch_size[0]
        h, w = x.shape[-2] // p, x.shape[-1] // p
        t = self.forward_features(x)[:, self.npt:]
        return t.transpose(1, 2).reshape(x.shape[0], -1, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`dense_features`."""
        return self.dense_features(x)


def fused_forward_with_layers(view: FusedRopeViT, x: torch.Tensor,
                              layers: tuple[int, ...]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Tokens after the final norm, and the tokens after each block in ``layers`` (final norm applied too)."""
    m = view.model
    grid = m.patch_embed(x)
    B, h, w, C = grid.shape
    prefix = [m.cls_token.expand(B, -1, -1)]
    if m.reg_token is not None:
        prefix.append(m.reg_token.expand(B, -1, -1))
    tokens = m.norm_pre(torch.cat(prefix + [grid.reshape(B, h * w, C)], dim=1))
    sin, cos = view._rope_tables(h, w, tokens.device)
    kept: dict[int, torch.Tensor] = {}
    for i, blk in enumerate(m.blocks):
        a = view._attention(blk.attn, blk.norm1(tokens), sin, cos)
        tokens = tokens + (blk.gamma_1 * a if blk.gamma_1 is not None else a)
        f = blk.mlp(blk.norm2(tokens))
        tokens = tokens + (blk.gamma_2 * f if blk.gamma_2 is not None else f)
        if i in layers:
            kept[i] = m.norm(tokens)
    return m.norm(tokens), kept
