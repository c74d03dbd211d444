"""DINO pretraining throughput on one GPU: images/s of full training steps (student forward and backward on
2 global + N local crops, EMA teacher forward, DINO loss with centring, AdamW, EMA update) for ViT-S/16.

    python bench/gpu_pretrain.py                       # 2x224² + 10x96², batch 256, 65,536 prototypes, bf16
    python bench/gpu_pretrain.py --device cpu --smoke  # a few tiny steps on CPU: checks the script runs

Variants, timed in the same process on the same synthetic crops (data loading is not part of the figure):
``eager`` (timm modules, geo_dino.training.dino losses, as ``geo_dino.training.pretrain`` runs them),
``compiled`` (``torch.compile`` of the student and teacher steps), ``compiled+fused`` (plus fused AdamW and a
foreach EMA).
Each variant first checks its loss against the eager step on the same batch (bf16 tolerance).
Goal: DINOv3 ViT-S/16 >= 2,000 images/s on one H200.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(arch: str, out_dim: int, device: str, smoke: bool):
    import copy

    import timm
    import torch

    from geo_dino.training.dino import DINOHead

    kw = {"embed_dim": 48, "depth": 2, "num_heads": 2} if smoke else {}
    backbone = timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True,
                                 drop_path_rate=0.1, **kw)
    head = DINOHead(backbone.embed_dim, out_dim, 2048 if not smoke else 64, 256 if not smoke else 16)
    student = torch.nn.ModuleDict({"backbone": backbone, "head": head}).to(device)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


def make_step(student, teacher, loss_fn, opt, n_local: int, bf16: bool, foreach_ema: bool):
    import torch

    from geo_dino.training.dino import tokens

    def teacher_fwd(g: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cuda" if g.is_cuda else "cpu", dtype=torch.bfloat16,
                                             enabled=bf16):
            cls, _ = tokens(teacher["backbone"], g)
            return teacher["head"](cls)

    def student_loss(g: torch.Tensor, loc: torch.Tensor, t_probs: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda" if g.is_cuda else "cpu", dtype=torch.bfloat16, enabled=bf16):
            cg, _ = tokens(student["backbone"], g)
            cl, _ = tokens(student["backbone"], loc)
            s = list(student["head"](cg).chunk(2)) + list(student["head"](cl).chunk(n_local))
            return loss_fn(s, list(t_probs.chunk(2)))

    s_params = [p for p in student.parameters()]
    t_params = [p for p in teacher.parameters()]

    def step(g: torch.Tensor, loc: torch.Tensor, tf, sl) -> float:
        t_logits = tf(g)
        t_probs = loss_fn.teacher_probs(t_logits, 0.04)
        loss = sl(g, loc, t_probs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s_params, 3.0, foreach=True)
        opt.step()
        with torch.no_grad():
            if foreach_ema:
                torch._foreach_mul_(t_params, 0.996)
                torch._foreach_add_(t_params, s_params, alpha=0.004)
            else:
                for ps, pt in zip(s_params, t_params, strict=True):
                    pt.mul_(0.996).add_(ps.detach(), alpha=0.004)
            loss_fn.update_center(t_logits)
        return loss.detach()

    return step, teacher_fwd, student_loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="vit_small_patch16_dinov3")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--n-local", type=int, default=10)
    ap.add_argument("--out-dim", type=int, default=65536)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model and crops (checks the script, any device)")
    ap.add_argument("--only", nargs="*", default=None, help="variants to run")
    ap.add_argument("--out", default=None, help="folder for results.json")
    args = ap.parse_args()

    import torch

    from geo_dino.training.dino import DINOLoss

    torch.backends.cuda.matmul.allow_tf32 = True
    dev = args.device
    bf16 = dev.startswith("cuda")
    g_size, l_size = (32, 16) if args.smoke else (224, 96)
    batch = 4 if args.smoke else args.batch
    out_dim = 256 if args.smoke else args.out_dim
    gen = torch.Generator(device="cpu").manual_seed(0)
    g = torch.randn(2 * batch, 3, g_size, g_size, generator=gen).to(dev)
    loc = torch.randn(args.n_local * batch, 3, l_size, l_size, generator=gen).to(dev)
    print(f"device {torch.cuda.get_device_name(0) if bf16 else dev}, torch {torch.__version__}, {args.arch}, "
          f"batch {batch}, crops 2x{g_size}² + {args.n_local}x{l_size}², {out_dim} prototypes, "
          f"{'bf16 autocast' if bf16 else 'fp32'}", flush=True)

    results = {}
    ref_loss = None
    variants = args.only or ["eager", "compiled", "compiled+fused"]
    for name in variants:
        torch.manual_seed(0)
        student, teacher = build(args.arch, out_dim, dev, args.smoke)
        loss_fn = DINOLoss(out_dim).to(dev)
        fused = name == "compiled+fused" and bf16
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.04, fused=fused or None)
        step, tf, sl = make_step(student, teacher, loss_fn, opt, args.n_local, bf16, name == "compiled+fused")
        if name.startswith("compiled"):
            tf, sl = torch.compile(tf), torch.compile(sl)
        first = float(step(g, loc, tf, sl))
        if ref_loss is None:
            ref_loss = first
        rel = abs(first - ref_loss) / abs(ref_loss)
        for _ in range(args.warmup):
            step(g, loc, tf, sl)
        if bf16:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step(g, loc, tf, sl)
        if bf16:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        ips = batch * args.steps / dt
        results[name] = {"images_per_s": ips, "first_loss": first, "rel_diff_vs_eager": rel,
                         "final_loss": float(loss)}
        print(f"{name:16s} {ips:9.1f} images/s  first-step loss {first:.5f} (rel diff vs eager {rel:.2e})",
              flush=True)
        del student, teacher, opt
        if bf16:
            torch.cuda.empty_cache()
    if "eager" in results:
        for name, r in results.items():
            print(f"{name} / eager = {r['images_per_s'] / results['eager']['images_per_s']:.2f}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_pretrain.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
