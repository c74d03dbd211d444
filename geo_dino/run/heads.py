"""A trained head in a run: checked against the run's backbone at plan time, applied per tile, finished
per pixel.

* **Plan** (:func:`plan_head`): the head file is read (safetensors, optionally pinned by sha256), and refused
  unless it was trained on this run's backbone (same architecture and the same checkpoint bytes, or the same
  random-init seed) and suits the dates (a change head needs two). The run's pixels are scaled as the head's
  were: the head's mean/std and scaling (percentile bounds are taken from the run's own raster, as in
  training). Everything is recorded.
* **Tiles** (:class:`HeadRunner`): per date (segmentation) or per pair of dates (change, the head's siamese
  mode layer by layer), the head's logits at the tile's pixel size go into the run's blended accumulator. A
  linear head's logits are computed at patch resolution and upsampled, which equals classifying upsampled
  features (it is linear); a DPT head returns pixel-resolution logits itself.
* **Pixels** (:func:`probabilities`): the blended logits → softmax → class (the arg-max's class *value*) and
  its probability; for a change head the positive class's probability and the binary change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from geo_dino.errors import CheckpointError, ConfigError


class HeadPlan(BaseModel):
    """The run's supervised head as checked at plan time (:func:`plan_head`); part of the run's plan."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    task: Literal["segmentation", "change"]
    layers: tuple[int, ...]
    siamese: str | None
    values: tuple[int, ...]
    names: tuple[str, ...]
    colours: tuple[tuple[int, int, int], ...]  # RGB per class
    positive_index: int | None
    spectral: int


def check_bands(recorded: dict[str, Any] | None, info: Any) -> None:
    """Refuse a head whose bands differ from the run's by identity (index or description), not only by
    count: ``recorded`` is the head's ``inputs["bands"]``, ``info`` the run's first
    :class:`~geo_dino.inputs.sources.RasterInfo`."""
    from geo_dino.models.seg_heads import band_identity

    if not recorded:
        return  # a head written before band identities were recorded: its band count is checked instead
    spectral = info.spectral()
    run = {"backbone": band_identity(info.bands, info.band_names),
           "spectral": band_identity(spectral.bands, spectral.band_names) if recorded.get("spectral") else []}
    for part, key in (("backbone", "sources.bands"), ("spectral", "sources.spectral_bands")):
        want, have = recorded.get(part) or [], run[part]

        def fmt(bands: list[dict[str, Any]]) -> str:
            return ", ".join(f"{b['index']} ({b['description']})" for b in bands)

        if [(b["index"], b["description"].lower()) for b in want] != \
                [(b["index"], b["description"].lower()) for b in have]:
            raise ConfigError(f"heads.supervised: the head's {part} bands are [{fmt(want)}], this run's are "
                              f"[{fmt(have)}]; select the same bands with {key} (or train a head on these)")


def plan_head(cfg: Any, n_dates: int, info: Any = None, *,
              backbone_sha256: str | None = None) -> tuple[HeadPlan, dict[str, Any]]:
    """``(plan, provenance record entry)`` of the run's supervised head; raises when it does not fit
    (backbone, checkpoint, dates, or — given the run's first raster ``info`` — bands). ``backbone_sha256``:
    the run's checkpoint digest when the caller already has it (else it is the pin, or the file is hashed)."""
    from geo_dino.files import sha256_file
    from geo_dino.models.seg_heads import load_head

    hc = cfg.heads.supervised
    digest = sha256_file(hc.path) if Path(hc.path).is_file() else None
    if hc.sha256 and digest and digest != hc.sha256.lower():
        raise CheckpointError(f"{hc.path}: sha256 {digest} does not match heads.supervised.sha256 "
                              f"{hc.sha256}")
    head, table, meta = load_head(hc.path)
    bb, inputs = meta["backbone"], meta["inputs"]
    if bb.get("arch") != cfg.backbone.arch:
        raise ConfigError(f"heads.supervised: the head was trained on backbone {bb.get('arch')!r}, this run "
                          f"uses {cfg.backbone.arch!r}; train a head on this backbone (geo-dino train-head)")
    if bb.get("sha256"):
        # a pinned checkpoint hash is verified when the backbone loads: no second pass over a large file here
        known = backbone_sha256 or (cfg.backbone.checkpoint_sha256 or "").lower() or None
        run_digest = None if not cfg.backbone.checkpoint else known or sha256_file(cfg.backbone.checkpoint)
        if run_digest != bb["sha256"]:
            raise ConfigError(f"heads.supervised: the head was trained on checkpoint sha256 {bb['sha256']}, "
                              f"this run's backbone is {run_digest or 'random-init'}: features would not "
                              f"match")
    elif cfg.backbone.checkpoint is not None or bb.get("seed") not in (None, cfg.backbone.seed):
        raise ConfigError("heads.supervised: the head was trained on a random-init backbone "
                          f"(seed {bb.get('seed')}); this run's backbone differs")
    if inputs["task"] == "change" and n_dates != 2:
        raise ConfigError("heads.supervised: a change head needs two rasters (two dates)")
    if info is not None:
        check_bands(inputs.get("bands"), info)
    if bool(inputs.get("shift_average", False)) != cfg.backbone.shift_average:
        raise ConfigError(f"heads.supervised: the head was trained with backbone.shift_average "
                          f"{bool(inputs.get('shift_average', False))}; set the same in this run")
    values = list(table.values)
    positive = inputs.get("positive_class")
    plan = HeadPlan(path=str(hc.path), task=inputs["task"], layers=tuple(inputs.get("layers") or ()),
                    siamese=inputs.get("siamese"), values=tuple(values), names=tuple(table.names),
                    colours=tuple((c.colour[0], c.colour[1], c.colour[2]) for c in table.classes),
                    positive_index=values.index(positive) if positive is not None else None,
                    spectral=int(getattr(head, "spectral", 0)))
    record = {"path": str(hc.path), "sha256": digest, "format": meta["format"], "config": meta["head"],
              "inputs": inputs, "class_table": table.to_dict(), "metrics": meta.get("metrics"),
              "lineage": meta.get("lineage"), "preprocessing": meta.get("preprocessing")}
    return plan, record


def head_preprocessor(meta_pre: dict[str, Any], dtype: str, bands: tuple[int, ...],
                      stats: np.ndarray | None) -> Any:
    """The run's :class:`~geo_dino.inputs.preprocess.Preprocessor` from the head's recorded one: same scaling
    kind and mean/std; fixed bounds kept, percentile bounds measured on the run's raster (by
    ``make_preprocessor``)."""
    from geo_dino.config import PreprocessConfig
    from geo_dino.inputs.preprocess import Preprocessor, make_preprocessor

    mean, std = tuple(meta_pre["mean"]), tuple(meta_pre["std"])
    if len(mean) != len(bands):
        raise ConfigError(f"heads.supervised: the head was trained on {len(mean)} bands, the run reads "
                          f"{len(bands)}")
    if meta_pre["scale"] == "percentile":
        return make_preprocessor(dtype, bands, PreprocessConfig(scale="percentile"), mean, std, stats)
    return Preprocessor(meta_pre["scale"], tuple(meta_pre["low"]), tuple(meta_pre["high"]), mean, std,
                        tuple(bands))


def settings_from_head(path: Path) -> dict[str, Any]:
    """What a run needs to use the head at ``path``, from its metadata: the backbone (arch, checkpoint file
    and its sha256, or the random-init seed), ``backbone.shift_average``, and the backbone and spectral bands
    it was trained on (``sources.bands`` / ``sources.spectral_bands``), as config overrides."""
    from geo_dino.models.seg_heads import load_head

    _, _, meta = load_head(path)
    bb, inputs = meta["backbone"], meta["inputs"]
    backbone: dict[str, Any] = {"arch": bb["arch"], "shift_average": bool(inputs.get("shift_average", False))}
    source = bb.get("source")
    if bb.get("sha256"):
        # where it was trained, else a file of that name beside the head or in ./models (a shipped head and
        # backbone moved together); the sha256 pins the bytes, whichever path is found
        name = Path(source).name if source and source != "random-init" else None
        found = next((p for p in ([Path(source)] if name else []) + ([Path(path).parent / name,
                                                                     Path("models") / name] if name else [])
                      if p.is_file()), None)
        if found is None:
            raise ConfigError(f"{path}: the head was trained on checkpoint {source!r} (sha256 "
                              f"{bb['sha256']}), which is not on this machine; give --checkpoint")
        backbone |= {"checkpoint": str(found.resolve()), "checkpoint_sha256": bb["sha256"]}
    elif bb.get("seed") is not None:
        backbone["seed"] = int(bb["seed"])
    sources: dict[str, Any] = {}
    bands = inputs.get("bands") or {}
    if bands.get("backbone"):
        sources["bands"] = [int(b["index"]) for b in bands["backbone"]]
    if bands.get("spectral"):
        sources["spectral_bands"] = [int(b["index"]) for b in bands["spectral"]]
    return {"backbone": backbone, "sources": sources}


class HeadRunner:
    """The head of a run's plan, loaded once per process; logits of a batch of tiles."""

    def __init__(self, plan: HeadPlan) -> None:
        from geo_dino.models.seg_heads import load_head

        self.info = plan
        self.head, self.table, _ = load_head(plan.path)
        self.n_classes = len(self.table.values)

    @property
    def change(self) -> bool:
        """Whether this is a change head (two dates in, one map out) rather than a segmentation head."""
        return self.info.task == "change"

    @property
    def spectral(self) -> bool:
        """Whether the head also takes the pixels' bands (read with the run's spectral readers)."""
        return bool(getattr(self.head, "spectral", 0))

    def logits(self, feats: list[Any], size: tuple[int, int], bands: list[Any] | None = None) -> list[Any]:
        """Per date (segmentation) or one (change) logits ``(B, K, H, W)`` of features ``(B, L·C, h, w)``
        and, for a spectral head, each date's raw bands ``(B, S, H, W)``."""
        import torch

        from geo_dino.models.seg_heads import combine_dates, spectral_input

        if self.spectral and (bands is None or len(bands) != len(feats)):
            raise ConfigError("the head takes the pixels' bands; none were read")
        with torch.inference_mode():
            if self.change:
                if self.info.siamese is None:
                    raise ConfigError(f"{self.info.path}: a change head without a siamese mode")
                x = combine_dates(feats[0], feats[1], self.info.siamese, max(len(self.info.layers), 1))
                if self.spectral and bands is not None:
                    return [self.head(x, size, spectral=spectral_input(bands[0], bands[1]))]
                return [self.head(x, size)]
            if self.spectral and bands is not None:
                return [self.head(f, size, spectral=spectral_input(b))
                        for f, b in zip(feats, bands, strict=True)]
            return [self.head(f, size) for f in feats]


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax over axis 0 of blended logits ``(K, h, w)`` (NaN where no tile gave weight stays NaN)."""
    e = np.exp(logits - logits.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)
