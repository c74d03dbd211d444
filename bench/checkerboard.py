"""The patch-grid checkerboard in change maps, before and after shift-averaged features.

    python bench/checkerboard.py [--config configs/demo_change.yaml] [--out docs/shift_average.png]

Runs the demo change job (the bundled Pucallpa 1985/2020 pair, the shipped ``vit_tiny_patch8_geo``) four
times in a temporary folder: ``heads.change.method`` ``features`` and ``fused``, each with
``backbone.shift_average`` off and on. For each change score it prints the map's power at the patch period
over its neighbouring frequencies (:func:`geo_dino.models.change.patch_period_power`; about 1 means no grid)
and the inference time, and draws the four maps over one crop side by side (``--out``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402 - after the path set-up above


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo_change.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "shift_average.png")
    ap.add_argument("--crop", default="60,300,200", help="row,col,size of the crop drawn")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import rasterio

    from geo_dino.config import load_config
    from geo_dino.models.change import patch_period_power
    from geo_dino.run.stages import run_local

    tmp = Path(tempfile.mkdtemp(prefix="geo_dino_checkerboard_"))
    maps, rows = {}, []
    try:
        for method in ("features", "fused"):
            for shift in (False, True):
                cfg = load_config(args.config, {"output_dir": str(tmp), "name": f"cb-{method}-{int(shift)}",
                                                "backbone": {"shift_average": shift},
                                                "heads": {"change": {"method": method}, "cube": False}})
                t0 = time.perf_counter()
                run = run_local(cfg)
                wall = time.perf_counter() - t0
                rec = json.loads((run / "provenance.json").read_text())
                with rasterio.open(run / "change_magnitude.tif") as ds:
                    m = ds.read(1)
                p = int(rec["backbone"]["patch_size"])
                ratio = patch_period_power(m, p)
                maps[(method, shift)] = m
                rows.append((method, shift, ratio, rec["timings"].get("infer"), wall))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'score':9} {'shift-avg':>9} {'patch-period power':>19} {'infer s':>8} {'run s':>6}")
    for method, shift, ratio, infer, wall in rows:
        print(f"{method:9} {shift!s:>9} {ratio:19.2f} {infer!s:>8} {wall:6.1f}")
    r0, c0, n = (int(v) for v in args.crop.split(","))
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.8))
    for ax, (key, m) in zip(axes, maps.items(), strict=True):
        crop = m[r0:r0 + n, c0:c0 + n]
        lo, hi = np.nanpercentile(crop, [2, 98])
        ax.imshow(crop, cmap="magma", vmin=lo, vmax=hi, interpolation="nearest")
        ratio = next(r[2] for r in rows if (r[0], r[1]) == key)
        ax.set_title(f"{key[0]} change, {'shift-averaged' if key[1] else 'patch grid'}\n"
                     f"patch-period power {ratio:.1f}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Pucallpa 1985/2020, shipped vit_tiny_patch8_geo: change magnitude without and with "
                 "backbone.shift_average", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
