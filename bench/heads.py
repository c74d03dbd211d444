"""Heads on real labels, scored on a held-out spatial part, beside simple baselines run in the same process.

    python bench/heads.py [--out bench/heads_results.json] [--only taizhou,floods,atlanta]

Data: ``/work/shared/data`` (see its README and FILES.csv), or ``--data``. Three labelled chips:

* **Taizhou** (Landsat 7 ETM+ 2000 vs 2003, 400x400, bands 1,2,3,4,5,7; reference 0 unlabelled /
  1 unchanged / 2 changed): (a) spectral difference magnitude + Otsu, (b) label-free cosine distance of the
  shipped backbone's upsampled features (true colour = ETM+ bands 3,2,1) + Otsu, (c) supervised linear heads
  on ``|f1 - f2|`` and on ``[f1, f2, |f1 - f2|]``, plus a supervised per-pixel logistic regression on the
  spectra of both dates as the like-for-like baseline of (c).
* **Sen1Floods11 Spain** (S2 13 bands, label -1 / 0 / 1 water): per-pixel logistic regression on the raw
  bands vs a linear head on backbone features of B4,B3,B2 / 3000 clipped to [0, 1].
* **SpaceNet Atlanta** (pan 0.5 m, polygons rasterised with ``rasterize_polygons``; 900 px cropped to 896):
  per-pixel logistic regression on pan + local mean/std (3, 9, 25 px) vs a linear head on backbone features
  of the pan band (2-98 % stretch) repeated to 3 channels.

Split (every dataset): the chip is cut into square tiles (Taizhou 40 px, floods 64 px, Atlanta 64 px);
:func:`geo_dino.labels.spatial_split` (``val_fraction=0.3, block=2, buffer=1, seed=0``) gives the **test**
tiles; training tiles touching a test tile are dropped. The remaining training tiles are split again the
same way (``val_fraction=0.2, block=1, buffer=0, seed=1``) into fit / early-stopping tiles for the linear
head; the baselines train on fit + early-stopping tiles (they need no early stopping). Every number is on
labelled pixels of the test tiles only. Nothing is tuned: each method runs once with the settings written
here. Label-free parts (Otsu thresholds, percentile stretches, backbone features of the whole chip) use the
whole image without labels — transductive but label-free.

Prints a table and writes JSON (machine, versions, timings, label counts per part, metrics).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402 - after the path set-up above

from geo_dino.labels import IGNORE, ClassTable, label_stats, read_label_raster, spatial_split  # noqa: E402
from geo_dino.metrics import confusion_matrix, segmentation_metrics, values_to_indices  # noqa: E402

DATA = Path("/work/shared/data")
ARCH, CKPT = "vit_tiny_patch8_geo", ROOT / "models" / "vit_tiny_patch8_geo.safetensors"
SEED = 0


# --------------------------------------------------------------------------------------------- helpers


def _grid_of(path: Path) -> Any:
    import rasterio

    from geo_dino.grid import Grid

    with rasterio.open(path) as src:
        return Grid(src.height, src.width, src.transform, src.crs.to_string())


def _read(path: Path) -> np.ndarray:
    import rasterio

    with rasterio.open(path) as src:
        return src.read()


def split_masks(shape: tuple[int, int], tile: int) -> dict[str, Any]:
    """Boolean pixel masks ``fit``, ``stop`` (early stopping), ``test`` and the tile lists of each part."""
    nr, nc = shape[0] // tile, shape[1] // tile
    idx = [(r, c) for r in range(nr) for c in range(nc)]
    train, test, dropped = spatial_split(idx, 0.3, block=2, buffer=1, seed=SEED)
    fit, stop, dropped2 = spatial_split(train, 0.2, block=1, buffer=0, seed=SEED + 1)

    def mask(tiles: list[tuple[int, int]]) -> np.ndarray:
        m = np.zeros(shape, dtype=bool)
        for r, c in tiles:
            m[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = True
        return m

    return {"tile": tile, "fit_tiles": fit, "stop_tiles": stop, "test_tiles": test,
            "fit": mask(fit), "stop": mask(stop), "test": mask(test),
            "n_tiles": {"fit": len(fit), "stop": len(stop), "test": len(test),
                        "dropped_buffer": len(dropped) + len(dropped2)}}


def only(labels: np.ndarray, m: np.ndarray) -> np.ndarray:
    out = labels.copy()
    out[~m] = IGNORE
    return out


def score(pred_values: np.ndarray, labels: np.ndarray, test: np.ndarray, table: ClassTable) -> dict[str, Any]:
    """Metrics of predicted class values on the labelled pixels of the test mask."""
    target = values_to_indices(only(labels, test), table.values)
    pred = values_to_indices(pred_values.astype(np.uint8), table.values)
    return segmentation_metrics(confusion_matrix(pred, target, len(table.values)), table.names)


def otsu_on(values: np.ndarray) -> float:
    from geo_dino.heads import otsu_threshold

    v = values[np.isfinite(values)].ravel()
    hist, edges = np.histogram(v, bins=256)
    return otsu_threshold(hist, edges)


def stretch(a: np.ndarray, valid: np.ndarray | None = None,
            lo_hi: tuple[float, float] = (2, 98)) -> np.ndarray:
    """Per-band percentile stretch to [0, 1] (label-free, whole image)."""
    a = a.astype(np.float32)
    out = np.empty_like(a)
    for b in range(a.shape[0]):
        vals = a[b][valid] if valid is not None else a[b]
        lo, hi = np.percentile(vals, lo_hi)
        out[b] = np.clip((a[b] - lo) / max(hi - lo, 1e-6), 0, 1)
    return out


def backbone() -> tuple[Any, Any]:
    from geo_dino.backbone import build_backbone

    return build_backbone(ARCH, checkpoint=CKPT)


def image_features(model: Any, spec: Any, rgb01: np.ndarray, window: int) -> Any:
    """Dense features ``(1, C, H/p, W/p)`` of a ``(3, H, W)`` image in [0, 1], run in non-overlapping
    ``window``-px windows (H and W multiples of ``window``) and stitched."""
    import torch

    from geo_dino.seg_heads import tile_features

    _, H, W = rgb01.shape
    p = spec.patch_size
    if H % window or W % window or window % p:
        raise ValueError(f"image {H}x{W} is not tiled by {window}-px windows of patch {p}")
    tiles = [rgb01[:, r:r + window, c:c + window] for r in range(0, H, window) for c in range(0, W, window)]
    f = tile_features(model, spec, np.stack(tiles), batch_size=1)
    nc, h = W // window, window // p
    out = torch.zeros((1, f.shape[1], H // p, W // p))
    for k in range(f.shape[0]):
        r, c = divmod(k, nc)
        out[0, :, r * h:(r + 1) * h, c * h:(c + 1) * h] = f[k]
    return out


def feature_tiles(feats: Any, labels: np.ndarray, tiles: list[tuple[int, int]], tile: int,
                  p: int) -> tuple[Any, Any]:
    """Crops ``(N, C, tile/p, tile/p)`` of whole-image features and ``(N, tile, tile)`` labels of
    ``tiles``."""
    import torch

    h = tile // p
    f = torch.stack([feats[0, :, r * h:(r + 1) * h, c * h:(c + 1) * h] for r, c in tiles])
    y = np.stack([labels[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] for r, c in tiles])
    return f, y


def linear_head(feats: Any, labels: np.ndarray, split: dict[str, Any], table: ClassTable,
                p: int) -> dict[str, Any]:
    """Train :func:`train_linear_head` on the fit tiles (early stopping on the stop tiles), predict the whole
    image (logits upsampled bilinearly over the whole chip), score on test."""
    import torch

    from geo_dino.head_config import TrainConfig
    from geo_dino.seg_heads import train_linear_head

    t0 = time.perf_counter()
    tile = split["tile"]
    xf, yf = feature_tiles(feats, labels, split["fit_tiles"], tile, p)
    xs, ys = feature_tiles(feats, labels, split["stop_tiles"], tile, p)
    weights = label_stats(yf, table)["weight_vector"]
    tc = TrainConfig()  # the defaults of `geo-dino train-head` (early stopping counted in optimiser steps)
    res = train_linear_head(xf, yf, xs, ys, table, class_weights=weights, epochs=tc.epochs, lr=tc.lr,
                            weight_decay=tc.weight_decay, batch_size=tc.batch_size, patience=tc.patience,
                            eval_every=tc.eval_every, seed=SEED)
    with torch.inference_mode():
        logits = res.head(feats, tuple(labels.shape))
    pred = np.asarray(table.values, dtype=np.uint8)[logits.argmax(1)[0].numpy()]
    m = score(pred, labels, split["test"], table)
    m["train"] = {"best_epoch": res.best_epoch, "epochs_run": len(res.history),
                  "stop_miou": res.metrics["miou"], "class_weights": weights,
                  "seconds": round(time.perf_counter() - t0, 2)}
    return m


def logistic(X: np.ndarray, labels: np.ndarray, split: dict[str, Any], table: ClassTable,
             max_train: int = 60_000) -> dict[str, Any]:
    """Per-pixel logistic regression (standardised features, balanced class weights) trained on labelled
    pixels of fit + stop tiles (subsampled to ``max_train``), scored on test. ``X``: ``(F, H, W)``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    train = (split["fit"] | split["stop"]) & (labels != IGNORE)
    rows, cols = np.nonzero(train)
    rng = np.random.default_rng(SEED)
    if rows.size > max_train:
        keep = rng.choice(rows.size, max_train, replace=False)
        rows, cols = rows[keep], cols[keep]
    Xt = X[:, rows, cols].T.astype(np.float64)
    yt = labels[rows, cols]
    clf = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=1000))
    clf.fit(Xt, yt)
    pred = clf.predict(X.reshape(X.shape[0], -1).T.astype(np.float64)).reshape(labels.shape)
    m = score(pred.astype(np.uint8), labels, split["test"], table)
    m["train"] = {"pixels": int(yt.size), "seconds": round(time.perf_counter() - t0, 2)}
    return m


def counts(labels: np.ndarray, split: dict[str, Any], table: ClassTable) -> dict[str, Any]:
    return {part: label_stats(only(labels, split[part]), table)["counts"] for part in ("fit", "stop", "test")}


# --------------------------------------------------------------------------------------------- datasets


def taizhou(model: Any, spec: Any) -> dict[str, Any]:
    import torch

    from geo_dino.heads import upsampled_cosine_distance

    d = DATA / "change_detection" / "landsat_taizhou_2000_2003"
    p1, p2 = d / "taizhou_L7ETM_2000-03-17.tif", d / "taizhou_L7ETM_2003-02-06.tif"
    ref = d / "taizhou_reference_0unlabeled_1unchanged_2changed.tif"
    grid = _grid_of(p1)
    _grid_of(p2).same_as(grid, what="the two Taizhou dates")
    table = ClassTable.from_mapping({"unchanged": 0, "changed": 1})
    labels, rec = read_label_raster(ref, grid, mapping={0: IGNORE, 1: 0, 2: 1}, table=table)
    a1, a2 = _read(p1).astype(np.float32), _read(p2).astype(np.float32)
    split = split_masks(labels.shape, 40)
    out: dict[str, Any] = {"label_record": {k: rec[k] for k in ("counts", "ignored", "sha256")},
                           "split": {"tile_px": 40, **split["n_tiles"]},
                           "label_counts": counts(labels, split, table),
                           "methods": {}, "seconds": {}}
    pos = 1

    t0 = time.perf_counter()
    mag = np.sqrt(((a2 - a1) ** 2).sum(0))
    thr = otsu_on(mag)
    m = score((mag > thr).astype(np.uint8) * pos, labels, split["test"], table)
    m["threshold"] = thr
    out["methods"]["spectral |x2-x1| + Otsu (label-free)"] = m
    out["seconds"]["spectral_otsu"] = round(time.perf_counter() - t0, 3)

    t0 = time.perf_counter()
    rgb_bands = [2, 1, 0]  # ETM+ bands 3 (red), 2 (green), 1 (blue): file order B1,B2,B3,B4,B5,B7
    r1, r2 = stretch(a1[rgb_bands]), stretch(a2[rgb_bands])
    f1 = image_features(model, spec, r1, 400)
    f2 = image_features(model, spec, r2, 400)
    out["seconds"]["backbone_features_2_dates"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    with torch.inference_mode():
        dist = upsampled_cosine_distance(f1, f2, labels.shape)[0, 0].numpy()
    thr = otsu_on(dist)
    m = score((dist > thr).astype(np.uint8) * pos, labels, split["test"], table)
    m["threshold"] = thr
    out["methods"]["backbone cosine dist + Otsu (label-free)"] = m
    out["seconds"]["cosine_otsu"] = round(time.perf_counter() - t0, 3)

    X = np.concatenate([a1, a2, np.abs(a2 - a1)])
    out["methods"]["per-pixel logreg [x1,x2,|x2-x1|] (supervised)"] = logistic(X, labels, split, table)
    out["methods"]["linear head |f1-f2| (supervised)"] = linear_head((f1 - f2).abs(), labels, split, table,
                                                                     spec.patch_size)
    out["methods"]["linear head [f1,f2,|f1-f2|] (supervised)"] = linear_head(
        torch.cat([f1, f2, (f1 - f2).abs()], 1), labels, split, table, spec.patch_size)
    out["positive_class"] = "changed"
    return out


def floods(model: Any, spec: Any) -> dict[str, Any]:
    d = DATA / "segmentation" / "sen1floods11_spain_7370579"
    s2p, lab = d / "Spain_7370579_S2Hand.tif", d / "Spain_7370579_LabelHand.tif"
    grid = _grid_of(s2p)
    table = ClassTable.from_mapping({"not_water": 0, "water": 1})
    labels, rec = read_label_raster(lab, grid, mapping={-1: IGNORE, 0: 0, 1: 1}, table=table)
    s2 = _read(s2p).astype(np.float32)
    nodata = (s2 == 0).all(0)
    labels[nodata] = IGNORE
    split = split_masks(labels.shape, 64)
    out: dict[str, Any] = {"label_record": {k: rec[k] for k in ("counts", "ignored", "sha256")},
                           "split": {"tile_px": 64, **split["n_tiles"]},
                           "label_counts": counts(labels, split, table),
                           "methods": {}, "seconds": {}}
    out["methods"]["per-pixel logreg 13 S2 bands (supervised)"] = logistic(s2, labels, split, table)
    t0 = time.perf_counter()
    rgb = np.clip(s2[[3, 2, 1]] / 3000.0, 0, 1)  # B4, B3, B2
    feats = image_features(model, spec, rgb, 512)
    out["seconds"]["backbone_features"] = round(time.perf_counter() - t0, 3)
    out["methods"]["linear head RGB features (supervised)"] = linear_head(feats, labels, split, table,
                                                                          spec.patch_size)
    out["positive_class"] = "water"
    return out


def atlanta(model: Any, spec: Any) -> dict[str, Any]:
    from scipy.ndimage import uniform_filter

    from geo_dino.labels import rasterize_polygons

    d = DATA / "segmentation" / "spacenet_atlanta_buildings_solaris"
    img, vec = d / "sample_geotiff.tif", d / "geotiff_labels.geojson"
    full = _grid_of(img)
    from geo_dino.grid import PixelBox

    box = PixelBox(0, 0, 896, 896)  # a multiple of the 64-px tile, the 448-px window and the 8-px patch
    grid = full.subgrid(box)
    table = ClassTable.from_mapping({"background": 0, "building": 1})
    burn = rasterize_polygons(vec, "building", ClassTable.from_mapping({"yes": 1}), grid)
    labels = np.where(burn == IGNORE, 0, 1).astype(np.uint8)  # every pixel is labelled: outside = background
    pan = _read(img)[0, :896, :896].astype(np.float32)
    valid = pan > 0
    labels[~valid] = IGNORE
    shipped = _read(d / "building_mask_rasterized.tif")[0, :896, :896]
    split = split_masks(labels.shape, 64)
    out: dict[str, Any] = {"rasterised_vs_shipped_mask_agreement":
                               float((shipped == (labels == 1))[valid].mean()),
                           "split": {"tile_px": 64, **split["n_tiles"]},
                           "label_counts": counts(labels, split, table),
                           "methods": {}, "seconds": {}}
    t0 = time.perf_counter()
    s = stretch(pan[None], valid)[0]
    feats_px = [s]
    for k in (3, 9, 25):
        mu = uniform_filter(s, k)
        feats_px += [mu, np.sqrt(np.maximum(uniform_filter(s * s, k) - mu * mu, 0))]
    out["methods"]["per-pixel logreg pan only (supervised)"] = logistic(s[None], labels, split, table)
    out["methods"]["per-pixel logreg pan + local mean/std 3,9,25 (supervised)"] = logistic(
        np.stack(feats_px), labels, split, table)
    out["seconds"]["baselines"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    feats = image_features(model, spec, np.repeat(s[None], 3, 0), 448)
    out["seconds"]["backbone_features"] = round(time.perf_counter() - t0, 3)
    out["methods"]["linear head pan x3 features (supervised)"] = linear_head(feats, labels, split, table,
                                                                             spec.patch_size)
    out["positive_class"] = "building"
    return out


# --------------------------------------------------------------------------------------------- main


def _table(results: dict[str, Any]) -> str:
    lines = [f"{'dataset':9} {'method':58} {'F1+':>6} {'IoU+':>6} {'OA':>6} {'mIoU':>6} "
             f"{'test px':>8} {'s':>6}"]
    for ds, r in results.items():
        if "error" in r:
            lines.append(f"{ds:9} ERROR: {r['error']}")
            continue
        pos = r["positive_class"]
        for name, m in r["methods"].items():
            pc = m["per_class"][pos]
            secs = m.get("train", {}).get("seconds", "")
            iou = pc["iou"] if pc["iou"] is not None else float("nan")
            lines.append(f"{ds:9} {name:58} {pc['f1']:6.3f} {iou:6.3f} {m['overall_accuracy']:6.3f} "
                         f"{m['miou']:6.3f} {m['pixels']:8d} {secs!s:>6}")
    return "\n".join(lines)


def main() -> None:
    global DATA
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "heads_results.json")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--only", default="taizhou,floods,atlanta")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    DATA = args.data

    import torch

    from geo_dino.provenance import git_info, software_versions

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    t_all = time.perf_counter()
    t0 = time.perf_counter()
    model, spec = backbone()
    t_backbone = time.perf_counter() - t0
    runners = {"taizhou": taizhou, "floods": floods, "atlanta": atlanta}
    results: dict[str, Any] = {}
    for name in args.only.split(","):
        t0 = time.perf_counter()
        try:
            results[name] = runners[name](model, spec)
        except Exception as exc:
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        results[name]["wall_s"] = round(time.perf_counter() - t0, 2)
        print(f"[{name}] done in {results[name]['wall_s']} s", flush=True)
    record = {
        "script": "bench/heads.py",
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": software_versions(), "git": git_info(ROOT),
        "backbone": {"arch": spec.arch, "sha256": spec.sha256, "patch_size": spec.patch_size,
                     "mean": spec.mean, "std": spec.std, "build_s": round(t_backbone, 2)},
        "protocol": {"split": "tiles; spatial_split(val_fraction=0.3, block=2, buffer=1, seed=0) -> test; "
                              "rest spatial_split(0.2, block=1, buffer=0, seed=1) -> fit / early-stop",
                     "scored": "labelled pixels of test tiles only",
                     "head": "train_linear_head with geo-dino train-head's defaults (epochs 200, lr 1e-2, "
                             "batch 16, validation every 10 steps, patience 10 measurements, seed 0), "
                             "inverse-frequency class weights of the fit tiles",
                     "logreg": "sklearn StandardScaler + LogisticRegression(class_weight='balanced'), <=60k "
                               "pixels of fit+stop tiles"},
        "results": results,
        "total_s": round(time.perf_counter() - t_all, 2),
    }
    table = _table(results)
    print(table)
    print(f"total {record['total_s']} s")
    record["table"] = table
    args.out.write_text(json.dumps(record, indent=1,
                                   default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
