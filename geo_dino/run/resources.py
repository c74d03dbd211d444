"""What a worker process loads once and keeps between chunk tasks: the backbone and the trained head.

A model is built once per process (the first task that needs it: in the run's own process, or in each Dask
worker) and reused by every later task of the same weights; a task of other weights replaces it (one model
per process at a time). :func:`clear` drops everything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from geo_dino.errors import ConfigError

if TYPE_CHECKING:
    from geo_dino.config import RunConfig
    from geo_dino.models.backbone import CheckpointSpec
    from geo_dino.run.heads import HeadPlan, HeadRunner
    from geo_dino.run.inference import FeatureExtractor
    from geo_dino.run.plan import RunPlan

_MODELS: dict[tuple[Any, ...], tuple[Any, CheckpointSpec]] = {}
_RUNNERS: dict[HeadPlan, HeadRunner] = {}
BUILDS = {"backbone": 0, "head": 0}  # how many times this process built each (the record shows it per chunk)


def clear() -> None:
    """Drop the models and heads this process holds."""
    _MODELS.clear()
    _RUNNERS.clear()


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
    if device == "cpu":
        same_bits_anywhere()
    key = (bb.arch, str(bb.checkpoint), plan.backbone.sha256, bb.seed, bb.in_chans, device)
    if key not in _MODELS:
        _MODELS.clear()
        BUILDS["backbone"] += 1
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


def same_bits_anywhere() -> None:
    """Make this process's CPU convolutions give the same bits at any thread count and batch size.

    A chunk's numbers must not depend on where it runs: oneDNN's convolutions (the patch embedding, a head's
    1×1 layers) give other bits with another number of threads (24 of 42 shapes measured, 1 vs 2 threads),
    NNPACK's (batches of 16 and more) other bits than smaller batches. With both off, convolutions take the
    im2col + GEMM path: the same bits at any thread count and batch size (tests/test_scale_out.py), as fast
    for these models (ViT-tiny, 16 tiles of 128²: 233 vs 272 ms, within noise)."""
    import torch

    setattr(torch.backends.mkldnn, "enabled", False)  # noqa: B010  (a property of the module: typed oddly)
    torch.backends.nnpack.set_flags(False)


def head_runner(plan: RunPlan) -> HeadRunner | None:
    """The run's trained head, loaded once per process (None: the run has none)."""
    from geo_dino.run.heads import HeadRunner

    if plan.head is None:
        return None
    if plan.head not in _RUNNERS:
        _RUNNERS.clear()
        BUILDS["head"] += 1
        _RUNNERS[plan.head] = HeadRunner(plan.head)
    return _RUNNERS[plan.head]


def worker_name() -> str:
    """This process as the record names it: its Dask worker's address, or ``local`` outside a cluster."""
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return "local"


def peak_rss_mib() -> float | None:
    """This process's peak resident memory so far, in MiB (None where the OS does not say: Windows). Linux:
    ``VmHWM`` (``ru_maxrss`` would carry a big parent's peak over into a worker it started)."""
    from pathlib import Path

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        return None
    import sys

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kib / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)  # macOS counts bytes
