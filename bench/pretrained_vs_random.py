"""The demo's label-free outputs with the shipped pretrained backbone against the same architecture
random-initialised: both runs through the pipeline, then one picture (input, PCA RGB, k-means classes).

    python bench/pretrained_vs_random.py [--config configs/demo.yaml] [--out docs/pretrained_vs_random.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rgb(path: Path, bands: tuple[int, ...] = (1, 2, 3)):
    import numpy as np
    import rasterio

    with rasterio.open(path) as src:
        a = src.read(list(bands)).astype(np.float32)
        valid = src.dataset_mask() > 0
    lo, hi = np.percentile(a[:, valid], [2, 98], axis=1) if valid.any() else (0, 255)
    a = np.clip((a - np.asarray(lo)[:, None, None]) / (np.asarray(hi) - np.asarray(lo))[:, None, None], 0, 1)
    a[:, ~valid] = 1.0
    return a.transpose(1, 2, 0)


def _classes(path: Path):
    import numpy as np
    import rasterio

    with rasterio.open(path) as src:
        c = src.read(1)
        cmap = src.colormap(1)
    lut = np.ones((256, 3), np.float32)
    for k, v in cmap.items():
        lut[k] = np.asarray(v[:3]) / 255.0
    lut[255] = 1.0
    return lut[c]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs/demo.yaml"))
    ap.add_argument("--out", default=str(ROOT / "docs/pretrained_vs_random.png"))
    ap.add_argument("--output-dir", default=str(ROOT / "runs/compare"))
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from geo_dino.config import load_config
    from geo_dino.run.stages import run_local

    cfg = load_config(args.config, {"output_dir": args.output_dir, "name": "pretrained"})
    if cfg.backbone.checkpoint is None:
        raise SystemExit(f"{args.config} names no checkpoint: nothing to compare")
    random_cfg = cfg.model_copy(update={
        "name": "random-init",
        "backbone": cfg.backbone.model_copy(update={"checkpoint": None, "checkpoint_sha256": None}),
    })
    runs = {"pretrained": Path(run_local(cfg)), "random init": Path(run_local(random_cfg))}
    fig, axes = plt.subplots(2, 3, figsize=(12, 8.4))
    axes[0, 0].imshow(_rgb(cfg.rasters[0]))
    axes[0, 0].set_title("input (Landsat 7 RGB)")
    axes[1, 0].axis("off")
    axes[1, 0].text(0.0, 0.5, f"backbone {cfg.backbone.arch}\npretrained: {cfg.backbone.checkpoint.name}\n"
                    "random init: same architecture, seed 0\n\nrows: PCA of patch features (RGB),\n"
                    f"k-means classes (k={cfg.heads.kmeans.k})", fontsize=10, va="center")
    for j, (name, run) in enumerate(runs.items(), start=1):
        axes[0, j].imshow(_rgb(run / "pca_rgb.tif"))
        axes[0, j].set_title(f"PCA RGB, {name}")
        axes[1, j].imshow(_classes(run / "classes.tif"), interpolation="nearest")
        axes[1, j].set_title(f"k-means classes, {name}")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=72)
    print(f"wrote {out} from {runs['pretrained']} and {runs['random init']}")


if __name__ == "__main__":
    main()
