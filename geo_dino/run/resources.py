"""What a worker process loads once and keeps between chunk tasks: the backbone, the trained head, and the
open strip the previous chunk of the same run left in this process.

A model is built once per process (the first task that needs it) and reused by every later task of the same
weights; a task of other weights replaces it (one model per process at a time). The strip a chunk leaves is
kept only for the next chunk of the same run in the same process; its chunk checkpoint holds the same rows,
so a task in another process (or after a restart) loads that instead. :func:`clear` drops everything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from geo_dino.errors import ConfigError

if TYPE_CHECKING:
    from geo_dino.config import RunConfig
    from geo_dino.models.backbone import CheckpointSpec
    from geo_dino.run.heads import HeadPlan, HeadRunner
    from geo_dino.run.inference import FeatureExtractor, StripAccumulator
    from geo_dino.run.plan import RunPlan

_MODELS: dict[tuple[Any, ...], tuple[Any, CheckpointSpec]] = {}
_RUNNERS: dict[HeadPlan, HeadRunner] = {}
_STRIPS: dict[tuple[str, int], tuple[StripAccumulator, np.ndarray]] = {}


def clear() -> None:
    """Drop the models, heads and strips this process holds."""
    _MODELS.clear()
    _RUNNERS.clear()
    _STRIPS.clear()


def extractor(cfg: RunConfig, plan: RunPlan) -> tuple[FeatureExtractor, CheckpointSpec]:
    """The run's feature extractor (backbone, preprocessing, hooked layers) and the weights' identity; the
    backbone is loaded with the plan's sha256, so every task runs the weights that were planned."""
    import torch

    from geo_dino.models.backbone import build_backbone
    from geo_dino.run.inference import FeatureExtractor, pick_device

    bb = cfg.backbone
    if bb.threads:
        torch.set_num_threads(bb.threads)
    device = pick_device(bb.device)
    key = (bb.arch, str(bb.checkpoint), plan.backbone.sha256, bb.seed, bb.in_chans, device)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = build_backbone(bb.arch, checkpoint=bb.checkpoint,
                                      checkpoint_sha256=plan.backbone.sha256, seed=bb.seed,
                                      accept_licence=bb.accept_licence, in_chans=bb.in_chans)
    model, spec = _MODELS[key]
    layers = plan.head.layers if plan.head else ()
    change_layers = tuple(cfg.heads.change.layers or ()) if plan.n_dates == 2 else ()
    depth = len(model.blocks)
    bad = [i for i in change_layers if not -depth <= i < depth]
    if bad:
        raise ConfigError(f"heads.change.layers {bad}: the backbone has blocks 0..{depth - 1}")
    return FeatureExtractor(model, plan.preprocess, device, model_size=plan.tiling.model_size,
                            layers=layers, shift_average=bb.shift_average, change_layers=change_layers), spec


def head_runner(plan: RunPlan) -> HeadRunner | None:
    """The run's trained head, loaded once per process (None: the run has none)."""
    from geo_dino.run.heads import HeadRunner

    if plan.head is None:
        return None
    if plan.head not in _RUNNERS:
        _RUNNERS.clear()
        _RUNNERS[plan.head] = HeadRunner(plan.head)
    return _RUNNERS[plan.head]


def take_strip(run_key: str, chunk: int) -> tuple[StripAccumulator, np.ndarray] | None:
    """The strip and change histogram chunk ``chunk`` of run ``run_key`` left in this process, if any (taken:
    a failure of the task that takes it drops it); every other strip is dropped."""
    mine = _STRIPS.pop((run_key, chunk), None)
    _STRIPS.clear()
    return mine


def keep_strip(run_key: str, chunk: int, strip: StripAccumulator, hist: np.ndarray) -> None:
    """Keep chunk ``chunk``'s open strip for the next chunk in this process."""
    _STRIPS[(run_key, chunk)] = (strip, np.array(hist, copy=True))
