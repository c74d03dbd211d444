"""CPU figures for the backbone: DINOv3 ViT-S/16 fp32 tiles/s, ours vs timm eager, in one process.

Run from the repository root: ``.venv/bin/python bench/backbones_cpu.py [--reps 5] [--batch 8] [--size 224]``.
Variants, interleaved so a busy neighbour hits each alike, each checked against timm's features first:
  * timm eager: ``model.forward_features`` (the reference)
  * timm ``forward_intermediates`` (what ``dense_features`` used before; NCHW patch features)
  * ours: ``FusedRopeViT.dense_features`` (what the pipeline runs now)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch


def main() -> None:
    from geo_dino.models.backbone import build_backbone
    from geo_dino.models.fast_vit import FusedRopeViT

    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--arch", default="vit_small_patch16_dinov3")
    args = ap.parse_args()
    model, _ = build_backbone(args.arch, seed=0)
    with torch.no_grad():  # layer scale 1 so every block matters in the equality check
        for b in model.blocks:
            b.gamma_1.fill_(1.0)
            b.gamma_2.fill_(1.0)
    fused = FusedRopeViT(model)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    npt = model.num_prefix_tokens
    with torch.inference_mode():
        ref = model.forward_features(x)
        inter = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True,
                                            output_fmt="NCHW")[-1]
        ours = fused.dense_features(x)
    diff_ours = (ours.flatten(2).transpose(1, 2) - ref[:, npt:]).abs().max().item()
    diff_inter = (inter.flatten(2).transpose(1, 2) - ref[:, npt:]).abs().max().item()
    variants = {
        "timm eager forward_features": lambda: model.forward_features(x),
        "timm forward_intermediates (NCHW)": lambda: model.forward_intermediates(
            x, indices=1, norm=True, intermediates_only=True, output_fmt="NCHW"),
        "ours FusedRopeViT.dense_features": lambda: fused.dense_features(x),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for fn in variants.values():
            fn()  # warm-up
        for _ in range(args.reps):
            for k, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), load average {os.getloadavg()}")
    print(f"{args.arch}, fp32, batch {args.batch} of {args.size}², {args.reps} interleaved reps (median)")
    print(f"max |ours - timm| = {diff_ours:.2e}; max |forward_intermediates - timm| = {diff_inter:.2e}")
    rate = {k: args.batch / statistics.median(v) for k, v in times.items()}
    for k, r in rate.items():
        print(f"  {k:36s} {r:7.2f} tiles/s  (runs: {', '.join(f'{args.batch / t:.2f}' for t in times[k])})")
    base = rate["timm eager forward_features"]
    print(f"RATIO ours / timm eager = {rate['ours FusedRopeViT.dense_features'] / base:.3f} "
          "(goal >= 1: not slower)")


if __name__ == "__main__":
    main()
