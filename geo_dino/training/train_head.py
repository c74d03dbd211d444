"""Training a supervised head on frozen backbone features, as stages over a run folder.

    prepare_training → extract_training_features → fit_and_write_head

* **Tiles and labels.** The first raster's grid is cut into non-overlapping ``tile_size`` tiles; labels (a
  label raster or polygons, :mod:`geo_dino.inputs.labels`) are put on that grid, and a pixel that is nodata on
  any date is :data:`~geo_dino.inputs.labels.IGNORE`. Only tiles with at least one labelled pixel are used
  (sparse labels such as Taizhou's), at most ``max_tiles`` of them, evenly spaced.
* **Features.** Pixels are scaled exactly as a run scales them
  (:func:`geo_dino.inputs.preprocess.make_preprocessor`) and go through the frozen backbone
  (:class:`~geo_dino.run.inference.FeatureExtractor`, the same code a run uses). A change head sees both dates
  combined layer by layer by :func:`~geo_dino.models.seg_heads.siamese_features`.
* **Split.** :func:`~geo_dino.inputs.labels.spatial_split` holds out whole blocks of tiles as the **test**
  part (the reported metrics; training tiles touching it are dropped), then splits the rest again into fit and
  early-stopping tiles. ``split.gpkg`` maps every tile's role.
* **Outputs** in the run folder: ``head.safetensors`` (weights, class table, backbone identity, preprocessing,
  inputs, metrics, lineage), ``metrics.json`` (test and early-stopping metrics with confusion matrices, label
  counts, training history), ``split.gpkg``, ``config.resolved.json`` and ``provenance.json``.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from geo_dino.errors import LabelError
from geo_dino.files import write_json_atomic
from geo_dino.run.folder import CONFIG, records_failure, update_record
from geo_dino.training.head_config import HeadTrainConfig

HEAD_FILE = "head.safetensors"
METRICS = "metrics.json"


def load_training_config(run_dir: Path) -> HeadTrainConfig:
    """Read the training run folder's resolved config (``config.resolved.json``) back."""
    return HeadTrainConfig.model_validate_json((run_dir / CONFIG).read_text())


TRAINING_INPUTS = "work/training_inputs.json"


class TrainingInputs(BaseModel):
    """What :func:`extract_training_features` hands to :func:`fit_and_write_head` beside the arrays: the
    backbone's identity and hooked layers, the bands, the preprocessing, the inputs, the labels and the split
    (the same sections go into the provenance record, which no stage reads back)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backbone: dict[str, Any]
    layers: tuple[int, ...]
    embed_dim: int
    bands: dict[str, Any]
    preprocessing: dict[str, Any]
    inputs: list[dict[str, Any]]
    labels: dict[str, Any]
    split: dict[str, Any]

    def save(self, run_dir: Path) -> Path:
        """Write it into the training run's work folder, atomically."""
        from geo_dino.files import write_text_atomic

        return write_text_atomic(run_dir / TRAINING_INPUTS, self.model_dump_json(indent=2))

    @classmethod
    def load(cls, run_dir: Path) -> TrainingInputs:
        """Read it back (validated)."""
        return cls.model_validate_json((run_dir / TRAINING_INPUTS).read_text())


def class_table(cfg: HeadTrainConfig):  # noqa: ANN201 - a ClassTable
    """The configured classes as a :class:`~geo_dino.inputs.labels.ClassTable`; a bad table raises here."""
    from geo_dino.inputs.labels import ClassTable

    return ClassTable.from_dict({"classes": [c.model_dump(exclude_none=True) for c in cfg.labels.classes]})


def hooked_layers(kind: str, layers: list[int] | None, depth: int) -> tuple[int, ...]:
    """The 0-based blocks feeding a head: the configured ones, or DPT's four evenly spaced hooks, or () for
    the last block's normed output."""
    from geo_dino.errors import ConfigError

    if layers:
        bad = [i for i in layers if not -depth <= i < depth]
        if bad:
            raise ConfigError(f"head.layers {bad}: the backbone has blocks 0..{depth - 1}")
        return tuple(sorted({i % depth for i in layers}))  # shallow to deep: the deepest is the last chunk
    if kind == "dpt":
        return tuple(sorted({max(0, depth * k // 4 - 1) for k in (1, 2, 3, 4)}))
    return ()


def positive_value(cfg: HeadTrainConfig, table: Any) -> int:
    """The label value of a change head's positive class: ``labels.positive_class``, else ``changed``, else
    the last class."""
    if cfg.labels.positive_class:
        return table.values[table.names.index(cfg.labels.positive_class)]
    return table.values[table.names.index("changed")] if "changed" in table.names else table.values[-1]


# ---------------------------------------------------------------------------------------------- stages
def prepare_training(cfg: HeadTrainConfig, run_id: str | None = None, flow_run_id: str | None = None) -> Path:
    """Create the run folder and write the resolved config before any work starts."""
    from geo_dino.governance.provenance import ProvenanceRecord, git_info, software_versions

    class_table(cfg)  # a bad class table fails before a folder is made
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_id = run_id or f"{cfg.name}-{stamp}-{uuid.uuid4().hex[:6]}"
    run_dir = (Path(cfg.output_dir) / run_id).resolve()
    run_dir.mkdir(parents=True, exist_ok=False)
    (run_dir / "work").mkdir()
    write_json_atomic(run_dir / CONFIG, cfg.to_json_dict())
    record = ProvenanceRecord.create(run_dir, run_id, schema="geo_dino.head_training/1")
    record.update(kind="train-head", config={"sha256": cfg.sha256(), "path": CONFIG},
                  software=software_versions(), git=git_info(), prefect={"flow_run_id": flow_run_id},
                  status="started")
    record.write()
    return run_dir


def _labels(cfg: HeadTrainConfig, grid: Any, table: Any) -> tuple[np.ndarray, dict[str, Any]]:
    from geo_dino.files import sha256_file
    from geo_dino.inputs.labels import IGNORE, rasterize_polygons, read_label_raster

    lab = cfg.labels
    if lab.raster is not None:
        mapping = (None if lab.mapping is None
                   else {k: IGNORE if v == "ignore" else v for k, v in lab.mapping.items()})
        return read_label_raster(lab.raster, grid, mapping=mapping, reproject=lab.reproject, table=table,
                                 sources=cfg.sources.model_copy(update={"bands": None}))  # one band of labels
    if lab.polygons is None or lab.attribute is None:  # the config's validator refuses this already
        raise LabelError("labels need a raster, or polygons with the attribute that holds their class")
    arr = rasterize_polygons(lab.polygons, lab.attribute, table, grid, layer=lab.layer,
                             all_touched=lab.all_touched)
    return arr, {"path": str(lab.polygons), "sha256": sha256_file(lab.polygons), "attribute": lab.attribute,
                 "layer": lab.layer, "all_touched": lab.all_touched,
                 "labelled_pixels": int((arr != IGNORE).sum())}


@records_failure
def extract_training_features(run_dir: Path) -> dict[str, Any]:
    """Labels on the grid, labelled tiles, their frozen features (``work/``) and the spatial split."""
    from contextlib import ExitStack

    import torch

    from geo_dino.errors import ConfigError
    from geo_dino.governance.provenance import raster_input_record
    from geo_dino.inputs.grid import TileGrid
    from geo_dino.inputs.labels import IGNORE, half_cells, held_out_split, label_stats, spatial_split
    from geo_dino.inputs.preprocess import make_preprocessor
    from geo_dino.inputs.sources import WindowReader, open_raster
    from geo_dino.models.backbone import arch_spec, build_backbone, check_licence, checkpoint_metadata
    from geo_dino.models.seg_heads import band_identity, combine_dates, spectral_input
    from geo_dino.outputs.cog import write_tile_index
    from geo_dino.run.inference import FeatureExtractor, pick_device

    t0 = time.perf_counter()
    cfg = load_training_config(run_dir)
    table = class_table(cfg)
    arch = arch_spec(cfg.backbone.arch)
    meta = checkpoint_metadata(cfg.backbone.checkpoint)
    acceptance = check_licence(cfg.backbone.arch, cfg.backbone.checkpoint, cfg.backbone.accept_licence,
                               meta)
    ckpt_chans = int(meta["in_chans"]) if meta.get("in_chans", "").isdigit() else arch.in_chans
    infos = [open_raster(p, cfg.sources, needed_bands=cfg.backbone.in_chans or ckpt_chans)
             for p in cfg.rasters]
    if len(infos) == 2:
        infos[0].grid.same_as(infos[1].grid, what="the two dates' grids")
    grid = infos[0].grid
    labels, label_record = _labels(cfg, grid, table)

    tiles = list(TileGrid.cover(grid.box, grid.box, size=cfg.tile_size, overlap=0, patch=arch.patch_size))
    padded = np.full((grid.height + cfg.tile_size, grid.width + cfg.tile_size), IGNORE, np.uint8)
    padded[:grid.height, :grid.width] = labels
    tile_labels = {t.index: padded[t.box.row_off:t.box.row_end, t.box.col_off:t.box.col_end] for t in tiles}
    used = [t for t in tiles if (tile_labels[t.index] != IGNORE).any()]
    if len(used) < 4:
        raise ConfigError(f"only {len(used)} tiles of {cfg.tile_size} px hold labelled pixels; at least 4 "
                          "are needed for a spatial split (lower tile_size or add labels)")
    if len(used) > cfg.max_tiles:
        used = [used[i] for i in np.unique(np.linspace(0, len(used) - 1, cfg.max_tiles).round().astype(int))]

    from geo_dino.inputs.preprocess import weights_scaling
    from geo_dino.models.backbone import weights_value_range

    pre_cfg = weights_scaling(cfg.preprocess, weights_value_range(meta, arch))
    stats = None
    if pre_cfg.scale in ("auto", "percentile") and infos[0].dtype != "uint8":
        with WindowReader(infos[0]) as r:
            stats = r.sample_stats(pre_cfg.percentiles)
    from geo_dino.models.backbone import weights_normalisation

    mean, std = weights_normalisation(meta, arch)
    pre = make_preprocessor(infos[0].dtype, infos[0].bands, pre_cfg, mean, std, stats)
    if cfg.backbone.threads:
        torch.set_num_threads(cfg.backbone.threads)
    device = pick_device(cfg.backbone.device)
    model, spec = build_backbone(cfg.backbone.arch, checkpoint=cfg.backbone.checkpoint,
                                 checkpoint_sha256=cfg.backbone.checkpoint_sha256, seed=cfg.backbone.seed,
                                 accept_licence=cfg.backbone.accept_licence, in_chans=cfg.backbone.in_chans)
    layers = hooked_layers(cfg.head.type, cfg.head.layers, len(model.blocks))
    extractor = FeatureExtractor(model, pre, device, layers=layers, shift_average=cfg.backbone.shift_average)
    feats, labs, spectra = [], [], []
    with ExitStack() as stack:
        readers = [stack.enter_context(WindowReader(i)) for i in infos]
        spectral_readers = ([stack.enter_context(WindowReader(i.spectral())) for i in infos]
                            if cfg.head.spectral else [])
        for k in range(0, len(used), cfg.backbone.batch_size):
            batch = used[k:k + cfg.backbone.batch_size]
            per_date, valids = [], []
            for reader in readers:
                f, v = extractor.features(reader, [t.box for t in batch])
                per_date.append(f)
                valids.append(v)
            if spectral_readers:
                bands = []
                for reader in spectral_readers:
                    reads = reader.read_many([t.box for t in batch])
                    bands.append(np.stack([a for a, _ in reads]))
                    valids.append(np.stack([v for _, v in reads]))
                spectra.append(spectral_input(*bands).numpy())
            valid = np.logical_and.reduce(valids)  # valid on every date
            x = (per_date[0] if len(per_date) == 1
                 else combine_dates(per_date[0], per_date[1], cfg.head.siamese, max(len(layers), 1)))
            y = np.stack([tile_labels[t.index] for t in batch])
            feats.append(x.numpy().astype(np.float32))
            labs.append(np.where(valid, y, IGNORE).astype(np.uint8))
    x_all, y_all = np.concatenate(feats), np.concatenate(labs)
    np.save(run_dir / "work" / "features.npy", x_all)
    np.save(run_dir / "work" / "labels.npy", y_all)
    if spectra:
        np.save(run_dir / "work" / "spectral.npy", np.concatenate(spectra).astype(np.float32))

    s = cfg.split
    cells = [(t.grid_row, t.grid_col) for t in used]
    if s.method == "blocks":
        trainval, test, dropped = spatial_split(cells, s.test_fraction, block=s.block, buffer=s.buffer,
                                                seed=s.seed)
    else:
        if s.method == "halves":
            held = half_cells(cells, s.axis)
        else:
            from shapely.geometry import box as shp_box

            if s.test_box is None:  # the config's validator requires it with method box
                raise ConfigError("split.test_box: required with split.method 'box'")
            target = shp_box(*s.test_box)
            held = [(t.grid_row, t.grid_col) for t in used
                    if shp_box(*grid.bounds(t.box.intersection(grid.box) or t.box)).intersects(target)]
        trainval, test, dropped = held_out_split(cells, held, buffer=s.buffer)
    fit, stop, _ = spatial_split(trainval, s.val_fraction, block=1, buffer=0, seed=s.seed + 1)
    role_of = {c: "test" for c in test} | {c: "dropped" for c in dropped} | {c: "fit" for c in fit} \
        | {c: "early_stopping" for c in stop}
    roles = [role_of[c] for c in cells]
    write_tile_index(run_dir / "split.gpkg", "tiles", grid, [(t.index, t.box) for t in used],
                     extra={"role": roles, "grid_row": [t.grid_row for t in used],
                            "grid_col": [t.grid_col for t in used],
                            "labelled_pixels": [int((y != IGNORE).sum()) for y in y_all]})
    split = {r: [i for i, role in enumerate(roles) if role == r]
             for r in ("fit", "early_stopping", "test", "dropped")}
    test_region = _region_of(grid, [used[i] for i in split["test"]])
    write_json_atomic(run_dir / "work" / "split.json",
                      split | {"cells": [[t.index, t.grid_row, t.grid_col] for t in used]})
    inputs = [raster_input_record(Path(i.path)) | {"bands": list(i.bands)} for i in infos]
    handed = TrainingInputs(
        backbone=spec.to_dict() | {"device": extractor.device, "layers": list(layers)}, layers=tuple(layers),
        embed_dim=spec.embed_dim,
        bands={"backbone": band_identity(infos[0].bands, infos[0].band_names),
               "spectral": (band_identity(infos[0].spectral().bands, infos[0].spectral().band_names)
                            if cfg.head.spectral else [])},
        preprocessing=pre.to_dict(), inputs=inputs, labels=label_record,
        split={"tile_size": cfg.tile_size, "tiles_with_labels": len(used),
               **{r: len(v) for r, v in split.items()}, "settings": s.model_dump(),
               "test_region": test_region})
    handed.save(run_dir)
    update_record(run_dir, inputs=inputs, labels=label_record | {"stats": label_stats(labels, table)},
                  backbone=handed.backbone,
                  licence={"architecture_licence": arch.licence,
                           "declared_by_checkpoint": meta.get("licence"), "acceptance": acceptance},
                  preprocessing=handed.preprocessing, bands=handed.bands, split=handed.split)
    update_record(run_dir, timings={"features": round(time.perf_counter() - t0, 3)})
    return {"tiles": len(used), "channels": int(x_all.shape[1]), **{r: len(v) for r, v in split.items()}}


def _region_of(grid: Any, tiles: list[Any]) -> dict[str, Any] | None:
    """Where the test tiles lie: their bounds in the grid's CRS and in EPSG:4326 (lon/lat)."""
    from rasterio.warp import transform_bounds

    if not tiles:
        return None
    boxes = [grid.bounds(t.box.intersection(grid.box) or t.box) for t in tiles]
    b = (min(x[0] for x in boxes), min(x[1] for x in boxes), max(x[2] for x in boxes),
         max(x[3] for x in boxes))
    lonlat = transform_bounds(grid.crs, "EPSG:4326", *b, densify_pts=21)
    return {"crs": str(grid.crs), "bounds": [float(v) for v in b],
            "bounds_4326": [round(v, 6) for v in lonlat], "tiles": len(tiles)}


FAILURES = "failures"  # the worst test tiles as PNGs, beside the head


def write_failure_examples(run_dir: Path, pred: np.ndarray, truth: np.ndarray, test: np.ndarray,
                           cells: list[list[int]], table: Any, k: int = 4) -> list[dict[str, Any]]:
    """The ``k`` test tiles with the highest error rate on labelled pixels, each a small PNG (labels |
    prediction | errors in red) in ``failures/`` beside the head; their records (tile, error rate, file)."""
    from PIL import Image

    from geo_dino.files import atomic_write
    from geo_dino.inputs.labels import IGNORE

    lut = np.full((256, 3), 128, np.uint8)  # unlabelled / unknown values grey
    for c in table.classes:
        lut[int(c.value)] = c.colour
    rates = []
    for j in range(len(test)):
        ok = truth[j] != IGNORE
        n = int(ok.sum())
        if n:
            rates.append((float((pred[j][ok] != truth[j][ok]).mean()), n, j))
    rates.sort(key=lambda r: (-r[0], -r[1], r[2]))
    out = []
    (run_dir / FAILURES).mkdir(exist_ok=True)
    for rate, n, j in rates[:k]:
        index, row, col = cells[int(test[j])]
        t, p = truth[j].astype(np.int64), pred[j].astype(np.int64)
        err = np.zeros(t.shape + (3,), np.uint8)
        err[(t != IGNORE) & (p != t)] = (220, 30, 30)
        err[(t != IGNORE) & (p == t)] = (235, 235, 235)
        gap = np.full((t.shape[0], 2, 3), 255, np.uint8)
        img = np.concatenate([lut[np.clip(t, 0, 255)], gap, lut[np.clip(p, 0, 255)], gap, err], axis=1)
        name = f"{FAILURES}/test_tile_{index:05d}.png"

        def save(tmp: Path, arr: np.ndarray = img) -> None:
            Image.fromarray(arr).save(tmp, format="PNG")

        atomic_write(run_dir / name, save, suffix=".png")
        out.append({"tile": int(index), "grid_row": int(row), "grid_col": int(col),
                    "error_rate": round(rate, 4), "labelled_pixels": n, "png": name})
    return out


@records_failure
def fit_and_write_head(run_dir: Path) -> dict[str, Any]:
    """Train the head on the fit tiles (early stopping on their neighbours' blocks), score it on the test
    tiles, write ``head.safetensors`` and ``metrics.json``."""
    import torch

    from geo_dino.evaluation.metrics import confusion_matrix, values_to_indices
    from geo_dino.files import sha256_file
    from geo_dino.inputs.labels import label_stats
    from geo_dino.models.seg_heads import SIAMESE_FACTOR, build_head, head_inputs, predict_values, save_head
    from geo_dino.training.fit_head import evaluate_head, init_from_logistic, spectral_stats, train_head

    t0 = time.perf_counter()
    cfg = load_training_config(run_dir)
    table = class_table(cfg)
    handed = TrainingInputs.load(run_dir)
    x = torch.from_numpy(np.load(run_dir / "work" / "features.npy"))
    y = np.load(run_dir / "work" / "labels.npy")
    split = json.loads((run_dir / "work" / "split.json").read_text())
    fit, stop, test = (np.asarray(split[r], dtype=np.int64) for r in ("fit", "early_stopping", "test"))
    layers = list(handed.layers)
    change = len(cfg.rasters) == 2
    factor = SIAMESE_FACTOR[cfg.head.siamese] if change else 1
    embed = handed.embed_dim
    spec_path = run_dir / "work" / "spectral.npy"
    sp = torch.from_numpy(np.load(spec_path)) if spec_path.exists() else None
    config: dict[str, Any] = {"type": cfg.head.type, "n_classes": len(table.values),
                              "spectral": 0 if sp is None else int(sp.shape[1])}
    if cfg.head.type == "dpt":
        config |= {"embed_dim": embed * factor, "n_layers": len(layers), "hidden": cfg.head.hidden}
    elif cfg.head.type == "mlp":
        config |= {"embed_dim": int(x.shape[1]), "hidden": cfg.head.hidden}
    else:
        config |= {"embed_dim": int(x.shape[1])}
    torch.manual_seed(cfg.train.seed)
    head = build_head(config)
    start = None
    if sp is not None:  # standardised by the fit tiles' labelled pixels (never the test tiles')
        head.set_spectral_stats(*spectral_stats(sp[fit], y[fit]))
        start = init_from_logistic(head, sp[fit], y[fit], table, seed=cfg.train.seed)
    t = cfg.train
    weights = None
    if t.class_weights == "auto":
        weights = label_stats(y[fit], table)["weight_vector"]
    elif isinstance(t.class_weights, list):
        weights = t.class_weights
    res = train_head(head, x[fit], y[fit], x[stop], y[stop], table, class_weights=weights, epochs=t.epochs,
                     lr=t.lr, weight_decay=t.weight_decay, batch_size=t.batch_size, patience=t.patience,
                     seed=t.seed, eval_every=t.eval_every, train_spectral=None if sp is None else sp[fit],
                     val_spectral=None if sp is None else sp[stop])
    sp_test = None if sp is None else sp[test]
    test_metrics = evaluate_head(res.head, x[test], y[test], table, spectral=sp_test)
    pred_values = predict_values(res.head, x[test], y.shape[-2:], table.values, spectral=sp_test)
    pred = values_to_indices(pred_values, table.values)
    cm = confusion_matrix(pred, values_to_indices(y[test], table.values), len(table.values))
    failures = write_failure_examples(run_dir, np.asarray(pred_values), y[test], test, split["cells"], table)
    inputs = head_inputs("change" if change else "segmentation", layers, cfg.head.siamese if change else None,
                         positive_value(cfg, table) if change else None, bands=handed.bands)
    inputs["shift_average"] = cfg.backbone.shift_average  # a run must make its features the same way
    metrics = {"test": test_metrics | {"confusion_matrix": cm.tolist(), "classes": list(table.names)},
               "early_stopping": res.metrics, "best_measurement": res.best_epoch,
               "spectral_start": start,
               "history": res.history,
               "class_weights": None if weights is None else [float(w) for w in weights],
               "split": {r: len(v) for r, v in split.items() if r != "cells"},
               "failure_examples": failures}
    lineage = {"training_run": run_dir.name, "labels": {k: handed.labels.get(k) for k in ("path", "sha256")},
               "rasters": [{"path": i["path"], "sha256": i.get("sha256")} for i in handed.inputs],
               "split": handed.split, "train": t.model_dump(), "config_sha256": cfg.sha256(),
               "failure_examples": failures}
    save_head(run_dir / HEAD_FILE, res.head, table, backbone_spec=handed.backbone,
              preprocessing=handed.preprocessing, metrics={"test": test_metrics}, inputs=inputs,
              lineage=lineage)
    write_json_atomic(run_dir / METRICS, metrics)
    for name in ("features.npy", "labels.npy", "spectral.npy"):
        (run_dir / "work" / name).unlink(missing_ok=True)
    update_record(run_dir, head={"path": HEAD_FILE, "sha256": sha256_file(run_dir / HEAD_FILE),
                                 "config": res.head.config(), "inputs": inputs,
                                 "parameters": int(sum(p.numel() for p in res.head.parameters()))},
                  metrics={"test": {k: test_metrics[k]
                                    for k in ("miou", "macro_f1", "overall_accuracy", "pixels")},
                           "path": METRICS},
                  status="succeeded", finished_at=datetime.now(UTC).isoformat())
    update_record(run_dir, timings={"train": round(time.perf_counter() - t0, 3)})
    return {"test_miou": test_metrics["miou"], "test_macro_f1": test_metrics["macro_f1"],
            "measurements": len(res.history), "head": str(run_dir / HEAD_FILE)}


def train_head_local(cfg: HeadTrainConfig) -> Path:
    """Every stage in this process, without Prefect (tests, notebooks)."""
    run_dir = prepare_training(cfg)
    extract_training_features(run_dir)
    fit_and_write_head(run_dir)
    return run_dir
