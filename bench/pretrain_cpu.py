"""Pretrain a small ViT on the bundled rasters for a fixed CPU budget, then compare k-NN and linear-probe
accuracy on EuroSAT against the same architecture random-initialised and against raw pixels — all in one run.

    python bench/pretrain_cpu.py                      # configs/pretrain_default.yaml, about 20 min here
    python bench/pretrain_cpu.py --skip-train RUN_DIR # evaluate an existing run folder only

The labelled set defaults to the full EuroSAT subset in ../shared/data when present (3,000 images), else the
bundled 180-image mini subset. Prints a table and writes ``pretrain_cpu.json`` beside the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FULL = ROOT.parent / "shared/data/classification/eurosat_rgb_subset/labels.csv"
MINI = ROOT / "data/eurosat_mini/labels.csv"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs/pretrain_default.yaml"))
    ap.add_argument("--eval-data", default=str(FULL if FULL.exists() else MINI))
    ap.add_argument("--nproc", type=int, default=1, help="processes (torchrun) for the pretraining")
    ap.add_argument("--output-dir", default=str(ROOT / "runs/bench"))
    ap.add_argument("--skip-train", default=None,
                    help="evaluate this run folder's backbone instead of training")
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()

    import torch

    from geo_dino.evaluation.probes import (
        backbone_features,
        evaluate_features,
        load_labelled,
        pixel_features,
        prepare_images,
    )
    from geo_dino.training.pretrain_config import load_pretrain_config

    overrides = {"output_dir": args.output_dir, "eval": None}
    if args.steps:
        overrides["recipe"] = {"steps": args.steps}
    cfg = load_pretrain_config(args.config, overrides)
    run_dir = Path(args.skip_train) if args.skip_train else Path(args.output_dir) / cfg.name
    train_s = None
    if not args.skip_train:
        resolved = Path(args.output_dir) / f"{cfg.name}.yaml"
        resolved.parent.mkdir(parents=True, exist_ok=True)
        import yaml

        resolved.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={args.nproc}"]
               if args.nproc > 1 else [sys.executable]) + ["-m", "geo_dino.training.pretrain", str(resolved),
                                                           "--no-resume"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})
        train_s = time.perf_counter() - t0
    ckpt = run_dir / f"{cfg.export_name}.safetensors"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    ds = load_labelled(args.eval_data)
    arch = cfg.backbone.arch
    from geo_dino.models.archs import ARCHS

    prep = prepare_images(ds, patch_size=ARCHS[arch].patch_size)
    results = {}
    feats = {}
    for pool in ("cls", "cls+mean"):  # DINO's k-NN reads the CLS token; cls+mean also pools the patches
        feats[f"pretrained (ours), {pool}"] = backbone_features(prep, arch=arch, checkpoint=ckpt, pool=pool)
        feats[f"random init, same arch, {pool}"] = backbone_features(prep, arch=arch, seed=cfg.seed,
                                                                     pool=pool)
    feats["raw pixels"] = pixel_features(prep)
    for name, fs in feats.items():
        results[name] = {m: evaluate_features(fs, m).top1 for m in ("knn", "linear")}
    print(f"\nEuroSAT ({args.eval_data}): {len(ds.train)} train / {len(ds.test)} test images, "
          f"{prep.record['size'][0]}x{prep.record['size'][1]} px")
    print(f"{'features':38s} {'k-NN top-1':>11s} {'linear top-1':>13s}")
    for name, r in results.items():
        print(f"{name:38s} {r['knn']:11.4f} {r['linear']:13.4f}")
    for pool in ("cls", "cls+mean"):
        ours = results[f"pretrained (ours), {pool}"]
        for base in (f"random init, same arch, {pool}", "raw pixels"):
            b = results[base]
            print(f"ours ({pool}) - {base}: k-NN {ours['knn'] - b['knn']:+.4f}, "
                  f"linear {ours['linear'] - b['linear']:+.4f}")
    last = rows[-1]
    summary = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs", "torch": torch.__version__,
        "config": args.config, "arch": arch, "steps": last["step"], "train_seconds": train_s,
        "images_per_s_last": last["images_per_s"], "final_loss": last["loss"],
        "teacher_entropy": last["teacher_entropy"], "feature_std": last["feature_std"],
        "eval_data": args.eval_data, "n_train": len(ds.train), "n_test": len(ds.test), "results": results,
    }
    if train_s:
        print(f"pretraining: {last['step']} steps in {train_s / 60:.1f} min, last {last['images_per_s']:.1f} "
              f"images/s, final loss {last['loss']:.3f}")
    (run_dir / "pretrain_cpu.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
