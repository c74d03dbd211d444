"""GPU figures for the backbones (one run, one machine): correctness of bf16 features and images/s.

Run on a GPU machine from the repository root:  PYTHONPATH=. python3 bench/gpu_backbones.py [--out DIR]
Needs only torch and timm. Variants, each timed after warm-up with CUDA events, in one process:
  * timm DINOv3 ViT-L/16 eager (bf16 weights), and torch.compile'd
  * timm plain ViT-L/16 (no RoPE, no registers) eager and compiled: the ceiling RoPE costs us against
  * ours: geo_dino.models.fast_vit.FusedRopeViT (RoPE over the whole sequence with identity rows for the
    prefix tokens: no slice/cat, sin/cos tables cached per grid), bf16 weights, eager and torch.compile'd
  * the pipeline's earlier path: dense_features under bf16 autocast
  * ViT-S/16 DINOv3 dense features at 224² and 512² tiles (what the spine runs per tile)
  * pinned host→device copy bandwidth
Correctness: bf16 features vs the fp32 reference on the same inputs, relative error ‖a−b‖/‖a‖ (goal ≤ 1e-2).
Prints one JSON line per figure and writes them to OUT/gpu_backbones.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch


def emit(out: Path | None, **rec) -> None:
    line = json.dumps(rec)
    print(line, flush=True)
    if out is not None:
        with (out / "gpu_backbones.jsonl").open("a") as fh:
            fh.write(line + "\n")


def timed(fn, x, iters: int, warmup: int) -> float:
    """Images per second of ``fn(x)`` (CUDA events on a GPU, wall clock on the CPU smoke run)."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn(x)
        if x.device.type != "cuda":
            t0 = time.perf_counter()
            for _ in range(iters):
                fn(x)
            return x.shape[0] * iters / (time.perf_counter() - t0)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn(x)
        end.record()
        torch.cuda.synchronize()
    return x.shape[0] * iters / (start.elapsed_time(end) / 1000)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / a.norm())


def autotuned(out, fused, xb, batch: int, iters: int) -> None:
    """Ours compiled with max-autotune (minutes of compilation): compile time and images/s."""
    fm = torch.compile(fused.forward_features, mode="max-autotune-no-cudagraphs")
    t0 = time.time()
    with torch.inference_mode():
        fm(xb)
    emit(out, what="compile", model="ours fused-RoPE max-autotune", seconds=round(time.time() - t0, 1))
    emit(out, what="throughput", model="vit_large_patch16_dinov3",
         variant="ours fused-RoPE compiled max-autotune-no-cudagraphs (bf16)",
         res=224, batch=batch, img_s=round(timed(fm, xb, iters, 3), 1))


def main() -> None:
    import timm

    from geo_dino.models.backbone import build_backbone, dense_features

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path,
                    default=Path(os.environ.get("OUT", "")) if os.environ.get("OUT") else None)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--autotune", action="store_true", help="also max-autotune (minutes of compilation)")
    ap.add_argument("--only-fused", action="store_true", help="only ours on ViT-L (compiled, and --autotune)")
    ap.add_argument("--cudagraphs", action="store_true", help="also ours compiled with CUDA graphs "
                    "(mode='reduce-overhead'), the next candidate for the last percent of the ViT-L goal")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script's logic (tiny batch)")
    args = ap.parse_args()
    dev = args.device
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    emit(args.out, what="machine", gpu=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
         torch=torch.__version__, timm=timm.__version__, python=platform.python_version())
    B, it = args.batch, args.iters
    x = torch.randn(B, 3, 224, 224, device=dev)
    xb = x.bfloat16()

    # --- correctness of the pipeline path: bf16 autocast vs fp32 reference (ViT-L/16 DINOv3, random weights)
    model, _ = build_backbone("vit_large_patch16_dinov3", seed=0)
    model = model.to(dev).eval()
    ref = dense_features(model, x[:16])
    with torch.autocast(dev, dtype=torch.bfloat16):
        low = dense_features(model, x[:16])
    emit(args.out, what="correctness", model="vit_large_patch16_dinov3", variant="ours bf16 autocast vs fp32",
         rel_err=rel_err(ref, low), shape=list(low.shape))

    def ours(inp):
        with torch.autocast(dev, dtype=torch.bfloat16):
            return dense_features(model, inp)

    emit(args.out, what="throughput", model="vit_large_patch16_dinov3", variant="ours eager (autocast bf16)",
         res=224, batch=B, img_s=round(timed(ours, x, it, 3), 1))
    mb = model.to(torch.bfloat16)
    with torch.inference_mode():
        rb = dense_features(mb, x[:16].bfloat16())
    emit(args.out, what="correctness", model="vit_large_patch16_dinov3", variant="bf16 weights vs fp32",
         rel_err=rel_err(ref, rb))

    def timm_fwd(m):
        return lambda inp: m.forward_features(inp)

    from geo_dino.models.fast_vit import FusedRopeViT

    fused = FusedRopeViT(mb)
    with torch.inference_mode():
        fb = fused.dense_features(x[:16].bfloat16())
    emit(args.out, what="correctness", model="vit_large_patch16_dinov3",
         variant="ours fused-RoPE bf16 vs fp32",
         rel_err=rel_err(ref, fb), vs_timm_bf16=rel_err(rb, fb))
    emit(args.out, what="throughput", model="vit_large_patch16_dinov3",
         variant="ours fused-RoPE eager (bf16)",
         res=224, batch=B, img_s=round(timed(fused.forward_features, xb, it, 3), 1))
    if not args.no_compile:
        t0 = time.time()
        fc = torch.compile(fused.forward_features)
        with torch.inference_mode():
            fc(xb)
        emit(args.out, what="compile", model="ours fused-RoPE", seconds=round(time.time() - t0, 1))
        with torch.inference_mode():
            cb = fc(x[:16].bfloat16())[:, 5:]
        emit(args.out, what="correctness", model="vit_large_patch16_dinov3",
             variant="ours fused-RoPE compiled bf16 vs fp32",
             rel_err=rel_err(ref.flatten(2).transpose(1, 2), cb))
        emit(args.out, what="throughput", model="vit_large_patch16_dinov3",
             variant="ours fused-RoPE compiled (bf16)",
             res=224, batch=B, img_s=round(timed(fc, xb, it, 3), 1))

    if args.cudagraphs and not args.no_compile:
        fg = torch.compile(fused.forward_features, mode="reduce-overhead")
        t0 = time.time()
        with torch.inference_mode():
            for _ in range(3):  # graph capture happens on the first calls
                fg(xb)
        emit(args.out, what="compile", model="ours fused-RoPE reduce-overhead",
             seconds=round(time.time() - t0, 1))
        emit(args.out, what="throughput", model="vit_large_patch16_dinov3",
             variant="ours fused-RoPE compiled + CUDA graphs (bf16)",
             res=224, batch=B, img_s=round(timed(fg, xb, it, 3), 1))
    if args.only_fused:
        if args.autotune:
            autotuned(args.out, fused, xb, B, it)
        return
    emit(args.out, what="throughput", model="vit_large_patch16_dinov3", variant="timm eager (bf16 weights)",
         res=224, batch=B, img_s=round(timed(timm_fwd(mb), xb, it, 3), 1))
    if not args.no_compile:
        t0 = time.time()
        cm = torch.compile(mb)
        with torch.inference_mode():
            cm.forward_features(xb)
        emit(args.out, what="compile", model="vit_large_patch16_dinov3", seconds=round(time.time() - t0, 1))
        cf = torch.compile(mb.forward_features)
        emit(args.out, what="throughput", model="vit_large_patch16_dinov3",
             variant="timm compiled (bf16 weights)",
             res=224, batch=B, img_s=round(timed(cf, xb, it, 3), 1))
    model = mb = None  # free the GPU memory before the next models
    torch.cuda.empty_cache()

    plain = timm.create_model("vit_large_patch16_224", pretrained=False,
                              num_classes=0).to(dev).eval().bfloat16()
    emit(args.out, what="throughput", model="vit_large_patch16_224 (no RoPE)",
         variant="timm eager (bf16 weights)",
         res=224, batch=B, img_s=round(timed(timm_fwd(plain), xb, it, 3), 1))
    if not args.no_compile:
        pf = torch.compile(plain.forward_features)
        emit(args.out, what="throughput", model="vit_large_patch16_224 (no RoPE)", variant="timm compiled",
             res=224, batch=B, img_s=round(timed(pf, xb, it, 3), 1))
    del plain
    torch.cuda.empty_cache()

    # --- what the spine runs per tile: ViT-S/16 DINOv3 dense features at 224² and 512²
    small, _ = build_backbone("vit_small_patch16_dinov3", seed=0)
    small = small.to(dev).eval().bfloat16()
    fsmall = FusedRopeViT(small)
    for res, b in ((224, 256), (512, 64)):
        xs = torch.randn(min(b, B), 3, res, res, device=dev, dtype=torch.bfloat16)
        emit(args.out, what="throughput", model="vit_small_patch16_dinov3",
             variant="timm eager (bf16 weights)",
             res=res, batch=xs.shape[0], img_s=round(timed(timm_fwd(small), xs, it, 3), 1))
        emit(args.out, what="throughput", model="vit_small_patch16_dinov3",
             variant="ours fused-RoPE eager (bf16)",
             res=res, batch=xs.shape[0], img_s=round(timed(fsmall.forward_features, xs, it, 3), 1))

    # --- pinned host→device copy (uint8 tiles as the reader produces them, and float32)
    for dtype in (torch.uint8, torch.float32):
        if dev != "cuda":
            break
        h = torch.empty(64, 3, 512, 512, dtype=dtype).pin_memory()
        d = torch.empty_like(h, device=dev)
        for _ in range(3):
            d.copy_(h, non_blocking=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            d.copy_(h, non_blocking=True)
        torch.cuda.synchronize()
        gbs = h.numel() * h.element_size() * 20 / (time.perf_counter() - t0) / 1e9
        emit(args.out, what="h2d", dtype=str(dtype), GB_s=round(gbs, 1))

    # --- last (slow to compile): max-autotune of ours
    if not args.no_compile and args.autotune:
        autotuned(args.out, fused, xb, B, it)

if __name__ == "__main__":
    main()
