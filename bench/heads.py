"""Trained heads on real labels with a geographic hold-out, beside a per-pixel logistic regression on the same
pixels, run in the same process.

    python bench/heads.py [--out bench/heads_results.json] [--only taizhou,floods,atlanta,abudhabi,...]
                          [--heads linear-features,linear,mlp,dpt]

Data: ``/work/shared/data`` (see its README and FILES.csv), or ``--data``. Every labelled set:

* **Taizhou** change (Landsat 7 ETM+ 2000 vs 2003, 400x400, 6 bands; reference 0 unlabelled / 1 unchanged /
  2 changed). Backbone bands ETM+ 3,2,1.
* **Sen1Floods11 Spain** water (S2 L1C, 13 bands int16, label -1 / 0 / 1). Backbone bands B4,B3,B2.
* **SpaceNet Atlanta** buildings (WorldView-2 pan 0.5 m, the shipped 0/1 building mask). Backbone: the pan
  band three times.
* **OSCD** change, four Sentinel-2 city pairs (abudhabi, beihai, hongkong, mumbai; 13 bands resampled onto
  the label grid in a temporary folder; dev/eval only, never copied into the repository). Backbone bands
  B04,B03,B02.
* ``taizhou-rgbn``, ``floods-rgbn``: the same labels with the shipped four-band backbone
  ``models/vit_tiny_patch8_geo_rgbn.safetensors`` (red, green, blue, near-infrared: ETM+ 3,2,1,4; S2
  B4,B3,B2,B8).

Each head is trained by the product's own stages (:func:`geo_dino.training.train_head.train_head_local`, the
code behind ``geo-dino train-head``) with the shipped backbone ``vit_tiny_patch8_geo`` and a **geographic
hold-out**: ``split.method: halves``, the eastern half of the labelled tiles is the test part, a one-tile
buffer around it is dropped, early-stopping tiles are blocks of the western half. Heads: ``linear-features``
(a linear head on the features alone, the old design), ``linear``, ``mlp`` and ``dpt`` (each on the features
and every band per pixel, ``head.spectral: true``, the default). The baseline, a per-pixel logistic regression
(scikit-learn, standardised, balanced class weights) on every band (change: ``[x1, x2, |x2 - x1|]``), is
trained on the labelled pixels of the same fit + early-stopping tiles (read back from the run's
``split.gpkg``) and scored on the same test pixels. Nothing is tuned on the test part: every head runs once
with ``geo-dino train-head``'s defaults (DPT with lr 1e-3, as its config note says).

Prints a table and writes JSON (machine, versions, timings, label counts, metrics per head).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402 - after the path set-up above

DATA = Path("/work/shared/data")
CKPT = ROOT / "models" / "vit_tiny_patch8_geo.safetensors"
RGBN = ROOT / "models" / "vit_tiny_patch8_geo_rgbn.safetensors"
SEED = 0
HEADS = ("linear-features", "linear", "mlp", "dpt")


def _read(path: Path) -> np.ndarray:
    import rasterio

    with rasterio.open(path) as src:
        return src.read()


def datasets(data: Path, tmp: Path) -> dict[str, dict[str, Any]]:
    """Per dataset: the head-training config's varying part, the positive class and the task."""
    tz = data / "change_detection" / "landsat_taizhou_2000_2003"
    fl = data / "segmentation" / "sen1floods11_spain_7370579"
    at = data / "segmentation" / "spacenet_atlanta_buildings_solaris"
    change_classes = [{"name": "unchanged", "value": 0}, {"name": "changed", "value": 1}]
    out: dict[str, dict[str, Any]] = {
        "taizhou": {"rasters": [tz / "taizhou_L7ETM_2000-03-17.tif", tz / "taizhou_L7ETM_2003-02-06.tif"],
                    "labels": {"raster": tz / "taizhou_reference_0unlabeled_1unchanged_2changed.tif",
                               "mapping": {0: "ignore", 1: 0, 2: 1}, "classes": change_classes},
                    "bands": [3, 2, 1], "tile_size": 40, "positive": "changed"},
        "floods": {"rasters": [fl / "Spain_7370579_S2Hand.tif"],
                   "labels": {"raster": fl / "Spain_7370579_LabelHand.tif",
                              "mapping": {-1: "ignore", 0: 0, 1: 1},
                              "classes": [{"name": "not_water", "value": 0}, {"name": "water", "value": 1}]},
                   "bands": [4, 3, 2], "tile_size": 64, "positive": "water"},
        "atlanta": {"rasters": [at / "sample_geotiff.tif"],
                    "labels": {"raster": at / "building_mask_rasterized.tif", "mapping": {0: 0, 1: 1},
                               "classes": [{"name": "background", "value": 0},
                                           {"name": "building", "value": 1}]},
                    "bands": [1, 1, 1], "tile_size": 64, "positive": "building"},
    }
    # the four-band backbone (red, green, blue, near-infrared) on the same labels: does the NIR band help?
    rgbn = {"arch": "vit_tiny_patch8_geo", "checkpoint": RGBN}
    out["taizhou-rgbn"] = out["taizhou"] | {"bands": [3, 2, 1, 4], "backbone": rgbn}
    out["floods-rgbn"] = out["floods"] | {"bands": [4, 3, 2, 8], "backbone": rgbn}
    for city in ("abudhabi", "beihai", "hongkong", "mumbai"):
        out[city] = {"city": city, "labels": {"mapping": {0: 0, 1: 1}, "classes": change_classes},
                     "bands": ["B04", "B03", "B02"], "tile_size": 64, "positive": "changed"}
    return out


def _config(ds: dict[str, Any], head: str, out_dir: Path, roots: list[Path]) -> Any:
    from geo_dino.training.head_config import parse_head_config

    kind = "linear" if head == "linear-features" else head
    labels = {k: (str(v) if isinstance(v, Path) else v) for k, v in ds["labels"].items()}
    labels["positive_class"] = ds["positive"] if len(ds["rasters"]) == 2 else None
    return parse_head_config({
        "name": f"bench-{head}", "rasters": [str(r) for r in ds["rasters"]], "labels": labels,
        "output_dir": str(out_dir), "tile_size": ds["tile_size"],
        "sources": {"allowed_roots": [str(r) for r in roots], "bands": ds["bands"]},
        "backbone": {"arch": "vit_tiny_patch8_geo", "checkpoint": str(CKPT), "batch_size": 16}
        | {k: str(v) for k, v in ds.get("backbone", {}).items()},
        "head": {"type": kind, "spectral": head != "linear-features"},
        "split": {"method": "halves", "axis": "east", "buffer": 1, "val_fraction": 0.2, "block": 2,
                  "seed": SEED},
        "train": {"lr": 1e-3 if kind == "dpt" else 1e-2, "seed": SEED},
    }, ROOT)


def _roles(run_dir: Path, shape: tuple[int, int], tile: int) -> dict[str, np.ndarray]:
    """Pixel masks of the fit, early-stopping and test tiles of a training run (from its split.gpkg)."""
    import pyogrio

    df = pyogrio.read_dataframe(run_dir / "split.gpkg", layer="tiles")
    masks = {r: np.zeros(shape, bool) for r in ("fit", "early_stopping", "test")}
    for role, r, c in zip(df["role"], df["grid_row"], df["grid_col"], strict=True):
        if role in masks:
            masks[role][r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = True
    return masks


def _labels(cfg: Any) -> np.ndarray:
    from geo_dino.inputs.labels import read_label_raster
    from geo_dino.inputs.sources import open_raster
    from geo_dino.training.train_head import class_table

    grid = open_raster(cfg.rasters[0], cfg.sources.model_copy(update={"bands": None})).grid
    mapping = {k: 255 if v == "ignore" else v for k, v in cfg.labels.mapping.items()}
    labels, _ = read_label_raster(cfg.labels.raster, grid, mapping=mapping, table=class_table(cfg))
    return labels


def _metrics(pred: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    m = mask & (labels != 255)
    p, y = pred[m] == 1, labels[m] == 1
    tp, fp, fn = int((p & y).sum()), int((p & ~y).sum()), int((~p & y).sum())
    return {"f1": 2 * tp / max(2 * tp + fp + fn, 1), "iou": tp / max(tp + fp + fn, 1),
            "precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1), "pixels": int(m.sum()),
            "positives": int(y.sum())}


def logistic(x: np.ndarray, labels: np.ndarray, train: np.ndarray, max_train: int = 60_000) -> np.ndarray:
    """Per-pixel logistic regression (standardised, balanced) on ``x (F, H, W)``, trained on labelled pixels
    of ``train``; predicts every pixel."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rows, cols = np.nonzero(train & (labels != 255))
    rng = np.random.default_rng(SEED)
    if rows.size > max_train:
        keep = rng.choice(rows.size, max_train, replace=False)
        rows, cols = rows[keep], cols[keep]
    clf = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000))
    clf.fit(x[:, rows, cols].T.astype(np.float64), labels[rows, cols])
    return clf.predict(x.reshape(x.shape[0], -1).T.astype(np.float64)).reshape(labels.shape)


def run_dataset(name: str, ds: dict[str, Any], heads: list[str], tmp: Path, data: Path) -> dict[str, Any]:
    """Train every head on one dataset, then the logistic regression on the same tiles; metrics on test."""
    from geo_dino.training.train_head import train_head_local

    if "city" in ds:  # the change bench's stacking: 13 bands on the label grid, in the temporary folder
        from bench.change import stack_oscd

        stacked = stack_oscd(data / "change_detection" / "oscd_dev" / ds["city"], ds["city"], tmp)
        ds = ds | {"rasters": stacked["rasters"], "labels": ds["labels"] | {"raster": stacked["labels"]}}
    roots = [data, tmp, ROOT]
    out: dict[str, Any] = {"task": "change" if len(ds["rasters"]) == 2 else "segmentation",
                           "positive": ds["positive"], "tile_px": ds["tile_size"], "methods": {},
                           "seconds": {}}
    labels = None
    masks = None
    for head in heads:
        t0 = time.perf_counter()
        cfg = _config(ds, head, tmp / "runs" / name, roots)
        try:
            run_dir = train_head_local(cfg)
        except Exception as exc:  # a head that cannot train on a set is reported, the others go on
            out["methods"][head] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        out["seconds"][head] = round(time.perf_counter() - t0, 2)
        if labels is None:
            labels = _labels(cfg)
            masks = _roles(run_dir, labels.shape, ds["tile_size"])
        metrics = json.loads((run_dir / "metrics.json").read_text())["test"]
        pc = metrics["per_class"][ds["positive"]]
        out["methods"][head] = {"f1": pc["f1"], "iou": pc["iou"], "precision": pc.get("precision"),
                                "recall": pc.get("recall"), "miou": metrics["miou"],
                                "pixels": metrics["pixels"]}
    if labels is None or masks is None:
        return out
    t0 = time.perf_counter()
    arrays = [_read(Path(r)).astype(np.float32) for r in ds["rasters"]]
    x = (arrays[0] if len(arrays) == 1
         else np.concatenate([arrays[0], arrays[1], np.abs(arrays[1] - arrays[0])]))
    pred = logistic(x, labels, masks["fit"] | masks["early_stopping"])
    out["methods"]["logreg (all bands)"] = _metrics(pred, labels, masks["test"])
    out["seconds"]["logreg"] = round(time.perf_counter() - t0, 2)
    out["label_counts"] = {r: {"labelled": int((m & (labels != 255)).sum()),
                               "positive": int((m & (labels == 1)).sum())} for r, m in masks.items()}
    return out


def _table(results: dict[str, Any]) -> str:
    lines = [f"{'dataset':9} {'method':20} {'F1+':>6} {'IoU+':>6} {'P':>6} {'R':>6} {'test px':>8}"]
    for ds, r in results.items():
        for name, m in r.get("methods", {}).items():
            if "error" in m:
                lines.append(f"{ds:9} {name:20} ERROR: {m['error']}")
                continue

            def f(v: Any) -> str:
                return f"{v:6.3f}" if isinstance(v, (int, float)) else f"{'-':>6}"

            lines.append(f"{ds:9} {name:20} {f(m['f1'])} {f(m['iou'])} {f(m.get('precision'))} "
                         f"{f(m.get('recall'))} {m['pixels']:8d}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "heads_results.json")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--only", default="taizhou,floods,atlanta,abudhabi,beihai,hongkong,mumbai,"
                                      "taizhou-rgbn,floods-rgbn")
    ap.add_argument("--heads", default="linear-features,linear,mlp")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from geo_dino.governance.provenance import git_info, software_versions

    torch.set_num_threads(args.threads)
    heads = [h for h in args.heads.split(",") if h]
    bad = sorted(set(heads) - set(HEADS))
    if bad:
        raise SystemExit(f"--heads: unknown {bad}; choose from {list(HEADS)}")
    tmp = Path(tempfile.mkdtemp(prefix="geo_dino_heads_bench_"))
    t_all = time.perf_counter()
    results: dict[str, Any] = {}
    try:
        sets = datasets(args.data, tmp)
        for name in args.only.split(","):
            t0 = time.perf_counter()
            results[name] = run_dataset(name, sets[name], heads, tmp, args.data)
            results[name]["wall_s"] = round(time.perf_counter() - t0, 2)
            print(f"[{name}] done in {results[name]['wall_s']} s", flush=True)
            print(_table({name: results[name]}), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    record = {
        "script": "bench/heads.py",
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": software_versions(), "git": git_info(ROOT),
        "protocol": {"split": "train-head split.method halves, axis east (test), buffer 1 tile; early "
                              "stopping on blocks of the western half (val_fraction 0.2, block 2, seed 0)",
                     "scored": "labelled pixels of the test tiles only",
                     "heads": "geo-dino train-head defaults (epochs 200, lr 1e-2 (dpt 1e-3), batch 16, "
                              "validation every 10 steps, patience 10, inverse-frequency class weights)",
                     "logreg": "StandardScaler + LogisticRegression(class_weight='balanced'), <= 60k "
                               "labelled pixels of the fit + early-stopping tiles, every band "
                               "(change: [x1, x2, |x2-x1|])"},
        "results": results,
        "total_s": round(time.perf_counter() - t_all, 2),
    }
    from bench.results import finish

    finish(record, _table(results), args.out)


if __name__ == "__main__":
    main()
