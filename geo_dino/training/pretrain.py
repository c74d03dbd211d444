"""DINO self-supervised pretraining on the user's own rasters: one process, or many through ``torchrun``
(DDP).

The run folder holds the resolved config, ``metrics.jsonl`` (one JSON line per logged step: losses, schedules,
collapse monitors, images/s), ``checkpoint.pt`` (everything needed to resume exactly, written atomically every
``checkpoint_every`` steps) and, at the end, the exported backbone (``<export_name>.safetensors`` in the timm
layout the pipeline loads, with metadata), ``model_card.md`` and ``model_card.json``.

Exact resume: the batch of step ``s`` on rank ``r`` is made of samples ``s*B*W + r*B + j``, each drawn from a
generator seeded by ``(seed, index)``; masks and drop-path draw from generators seeded by
``(seed, step, rank)``. A resumed run therefore continues the same loss curve.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geo_dino.errors import CheckpointError, ConfigError
from geo_dino.files import atomic_write
from geo_dino.training.pretrain_config import KnnEvalConfig, PretrainConfig

log = logging.getLogger("geo_dino.training.pretrain")

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


@dataclass(frozen=True)
class PretrainResult:
    """What a finished pretraining run made: its folder, the exported backbone and its sha256, the number of
    steps, the last logged metrics and the collapse warnings raised along the way."""

    run_dir: Path
    checkpoint: Path  # the exported backbone (.safetensors)
    sha256: str
    steps: int
    final: dict[str, Any]  # the last logged metrics
    warnings: list[str]


def _dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment (1 process without it)."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def run_dir_for(cfg: PretrainConfig) -> Path:
    """The run folder of a config: ``output_dir / name``."""
    return Path(cfg.output_dir) / cfg.name


def _modules(cfg: PretrainConfig, in_chans: int) -> tuple[Any, Any, dict[str, Any]]:
    import torch
    from torch import nn

    from geo_dino.models.backbone import build_backbone
    from geo_dino.training.dino import DINOHead, tokens

    b = cfg.backbone
    backbone, spec = build_backbone(b.arch, checkpoint=b.checkpoint, checkpoint_sha256=b.checkpoint_sha256,
                                    accept_licence=b.accept_licence, seed=cfg.seed,
                                    in_chans=b.in_chans or in_chans, drop_path_rate=b.drop_path_rate,
                                    layerscale_init=b.layerscale_init if b.checkpoint is None else None)
    dim = backbone.embed_dim
    h = cfg.head

    class Student(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.head = DINOHead(dim, h.out_dim, h.hidden_dim, h.bottleneck_dim, h.nlayers, h.norm_last_layer)
            ib = cfg.recipe.ibot
            self.ibot_head = (DINOHead(dim, h.out_dim, h.hidden_dim, h.bottleneck_dim, h.nlayers,
                                       h.norm_last_layer)
                              if ib is not None and ib.separate_head else None)
            self.mask_token = nn.Parameter(torch.zeros(dim)) if ib is not None else None

        def patch_head(self) -> nn.Module:
            return self.ibot_head if self.ibot_head is not None else self.head

        def forward(self, globals_: torch.Tensor, locals_: torch.Tensor | None,
                    masks: torch.Tensor | None) -> dict[str, torch.Tensor]:
            cls_g, patch_g = tokens(self.backbone, globals_, masks, self.mask_token)
            out = {"cls": cls_g, "patches": patch_g, "logits_g": self.head(cls_g)}
            if locals_ is not None:
                cls_l, _ = tokens(self.backbone, locals_)
                out["logits_l"] = self.head(cls_l)
            if masks is not None:
                out["patch_logits"] = self.patch_head()(patch_g[masks])
            return out

    student = Student()
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher, {"spec": spec}


def _param_groups(model: Any) -> list[dict[str, Any]]:
    """DINO ``get_params_groups``: no weight decay on biases and 1-d parameters (norms)."""
    decay: list[Any] = []
    no_decay: list[Any] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "no_wd": True}]


def _seeded(seed: int, *parts: int) -> int:
    import numpy as np

    return int(np.random.SeedSequence([seed, *parts]).generate_state(1, dtype=np.uint64)[0] % (2**63 - 1))


def _atomic_save(obj: Any, path: Path) -> None:
    import torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_training_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint, read with ``weights_only=True`` (never executes code from the file)."""
    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable training checkpoint: {exc}") from None


def pretrain(cfg: PretrainConfig, *, progress: Callable[[dict[str, Any]], None] | None = None,
             stop_after: int | None = None, resume: bool = True,
             config_file: str | None = None) -> PretrainResult | None:
    """Train (or continue training) and export. ``stop_after``: return after that many steps of this call
    (the checkpoint is written first; used by chunked flows and by the resume tests). Returns the result once
    the schedule is complete, else None. Under ``torchrun`` every rank calls this; rank 0 writes.
    ``config_file``: the YAML the config came from, for the model card's "remake" command."""
    import torch
    import torch.distributed as dist

    from geo_dino.training.dino import (
        DINOLoss,
        IBOTPatchLoss,
        collapse_monitors,
        collapse_warnings,
        cosine_schedule,
        gram_loss,
        koleo_loss,
        random_masks,
        teacher_temp_schedule,
        tokens,
    )
    from geo_dino.training.pretrain_data import MultiCrop, PretrainDataset, TileSource

    rank, world, local_rank = _dist_env()
    distributed = world > 1
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but torch sees no GPU")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not use_cuda:
        # subnormal floats (tiny LayerScale products, Adam moments) are slow on x86; flushing them to zero
        # does not change what training learns. A guard, not a measured speed-up: the slowdowns seen while
        # building this came from another process on a core the OpenMP threads needed (see bench/RESULTS.md)
        torch.set_flush_denormal(True)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and use_cuda)

    run_dir = run_dir_for(cfg)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "pretrain_config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    r = cfg.recipe
    B, W = r.batch_size, world

    source = TileSource(cfg.data, seed=cfg.seed)
    in_chans = source.n_bands
    student, teacher, extra = _modules(cfg, in_chans)
    spec = extra["spec"]
    mean = cfg.crops.mean or spec.mean
    std = cfg.crops.std or spec.std
    if len(mean) != in_chans or len(std) != in_chans:
        raise ConfigError(f"crops.mean/std: {len(mean)}/{len(std)} values for {in_chans} bands; "
                          "give one per band")
    multicrop = MultiCrop(cfg.crops, mean=tuple(mean), std=tuple(std))
    dataset = PretrainDataset(source, multicrop, seed=cfg.seed)
    student.to(device).train()
    teacher.to(device).eval()
    gram_teacher = None
    if r.gram is not None:
        gram_teacher = copy.deepcopy(teacher.backbone).eval()
    dino_loss = DINOLoss(cfg.head.out_dim, r.student_temp, r.center_momentum).to(device)
    ibot_loss = (IBOTPatchLoss(cfg.head.out_dim, r.student_temp, r.center_momentum).to(device) if r.ibot
                 else None)

    ddp_student = student
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        ddp_student = DistributedDataParallel(student, device_ids=[device.index] if use_cuda else None)

    lr_scale = B * W / 256.0  # DINO's linear scaling rule
    lr_sched = cosine_schedule(r.lr * lr_scale, r.min_lr, r.steps, r.warmup)
    wd_sched = cosine_schedule(r.weight_decay[0], r.weight_decay[1], r.steps)
    mom_sched = cosine_schedule(r.teacher_momentum[0], r.teacher_momentum[1], r.steps)
    temp_sched = teacher_temp_schedule(r.warmup_teacher_temp, r.teacher_temp, r.warmup_teacher_temp_steps,
                                       r.steps)
    opt = torch.optim.AdamW(_param_groups(student), lr=float(lr_sched[0]))

    start = 0
    ckpt_path = run_dir / CHECKPOINT
    if resume and ckpt_path.is_file():
        state = load_training_checkpoint(ckpt_path)
        if state.get("config_sha256") != _recipe_hash(cfg):
            raise ConfigError(f"{ckpt_path}: was written by a different model/recipe configuration; "
                              "use a new name (or output_dir) or delete the checkpoint to start over")
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        opt.load_state_dict(state["optimizer"])
        dino_loss.load_state_dict(state["dino_loss"])
        if ibot_loss is not None:
            ibot_loss.load_state_dict(state["ibot_loss"])
        if gram_teacher is not None:
            gram_teacher.load_state_dict(state["gram_teacher"])
        start = int(state["step"])
        if rank == 0:
            log.info("resuming %s at step %d of %d", run_dir, start, r.steps)
    elif rank == 0 and (run_dir / METRICS).exists():
        (run_dir / METRICS).unlink()  # a fresh start: the old curve would mislead

    end = r.steps if stop_after is None else min(r.steps, start + stop_after)
    loader = _loader(dataset, start, end, B, W, rank, cfg.num_workers)

    warnings: list[str] = []
    last: dict[str, Any] = {}
    t_window, imgs_window = time.perf_counter(), 0
    n_crops = 2 + cfg.crops.n_local
    for step, batch in zip(range(start, end), loader, strict=False):
        torch.manual_seed(_seeded(cfg.seed, step, rank))  # drop-path and any other draw: exact on resume
        gen = torch.Generator().manual_seed(_seeded(cfg.seed, step, rank, 1))
        for g in opt.param_groups:
            g["lr"] = float(lr_sched[step])
            if not g.get("no_wd"):
                g["weight_decay"] = float(wd_sched[step])
        # (2B, C, G, G): crop 0, crop 1
        globals_ = batch["global_crops"].flatten(0, 1).to(device, non_blocking=True)
        locals_ = (batch["local_crops"].flatten(0, 1).to(device, non_blocking=True) if cfg.crops.n_local
                   else None)
        p = student.backbone.patch_embed.patch_size[0]
        grid = (globals_.shape[-2] // p, globals_.shape[-1] // p)
        masks = None
        if r.ibot is not None:
            masks = random_masks(globals_.shape[0], grid, r.ibot.mask_ratio, r.ibot.mask_sample_probability,
                                 gen).to(device)
        temp = float(temp_sched[step])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                t_cls, t_patch = tokens(teacher.backbone, globals_)
                t_logits = teacher.head(t_cls)
                t_probs = dino_loss.teacher_probs(t_logits, temp)
                t_patch_logits = teacher.patch_head()(t_patch[masks]) if masks is not None else None
                g_patch = tokens(gram_teacher, globals_)[1] if gram_teacher is not None else None
            out = ddp_student(globals_, locals_, masks)
            s_chunks = list(out["logits_g"].chunk(2)) + (list(out["logits_l"].chunk(cfg.crops.n_local))
                                                        if locals_ is not None else [])
            losses = {"dino": dino_loss(s_chunks, list(t_probs.chunk(2)))}
            # masks, the iBOT loss and the teacher's patch logits exist together (only with recipe.ibot)
            if (masks is not None and ibot_loss is not None and r.ibot is not None
                    and t_patch_logits is not None):
                losses["ibot"] = r.ibot.loss_weight * ibot_loss(
                    out["patch_logits"], ibot_loss.teacher_probs(t_patch_logits, temp), masks)
            if r.koleo_weight:
                losses["koleo"] = r.koleo_weight * sum(koleo_loss(c) for c in out["cls"].chunk(2))
            if g_patch is not None and r.gram is not None and step >= r.gram.start_step:
                losses["gram"] = r.gram.loss_weight * gram_loss(out["patches"], g_patch)
            loss = sum(losses.values())
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"step {step}: the loss is {float(loss.detach())}; "
                                     "lower recipe.lr or check the data")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = (torch.nn.utils.clip_grad_norm_(student.parameters(), r.clip_grad) if r.clip_grad
                     else _grad_norm(student))
        if step < r.freeze_last_layer:  # DINO cancel_gradients_last_layer
            for name, prm in student.named_parameters():
                if "last_layer" in name:
                    prm.grad = None
        opt.step()
        with torch.no_grad():  # EMA teacher
            m = float(mom_sched[step])
            for ps, pt in zip(student.parameters(), teacher.parameters(), strict=True):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)
            dino_loss.update_center(t_logits)
            if ibot_loss is not None and t_patch_logits is not None:
                ibot_loss.update_center(t_patch_logits)
            if (gram_teacher is not None and r.gram is not None and step + 1 >= r.gram.start_step
                    and (step + 1) % r.gram.update_every == 0):
                gram_teacher.load_state_dict(teacher.backbone.state_dict())
        imgs_window += B * W
        done = step + 1
        if done % cfg.log_every == 0 or done == end:
            now = time.perf_counter()
            mon = collapse_monitors(out["logits_g"].chunk(2)[1].detach(), t_probs.chunk(2)[0], r.student_temp,
                                    t_cls.detach(), cfg.head.out_dim)
            losses = {k: float(v.detach()) if hasattr(v, "detach") else float(v) for k, v in losses.items()}
            if distributed:  # one all-reduce for every logged figure
                both = _mean_across_ranks(mon | {f"loss_{k}": v for k, v in losses.items()}, device)
                mon = {k: both[k] for k in mon}
                losses = {k: both[f"loss_{k}"] for k in losses}
            rec: dict[str, Any] = {"step": done, "loss": float(sum(losses.values())),
                                   **{f"loss_{k}": v for k, v in losses.items()},
                                   "lr": float(lr_sched[step]), "weight_decay": float(wd_sched[step]),
                                   "teacher_momentum": m, "teacher_temp": temp, "grad_norm": float(grad_norm),
                                   **mon,
                                   "images_per_s": imgs_window / max(now - t_window, 1e-9),
                                   "crops_per_image": n_crops, "world_size": W,
                                   "tiles_skipped_low_valid": int(source.counters["skipped_low_valid"]),
                                   "time": time.time()}
            t_window, imgs_window = now, 0
            # at init (LayerScale) features are constant
            warn = collapse_warnings(mon) if done > r.warmup else []
            for w in warn:
                msg = f"step {done}: {w}"
                if msg not in warnings:
                    warnings.append(msg)
                log.warning(msg)
            rec["collapse_warnings"] = warn
            if cfg.eval is not None and rank == 0 and (done % cfg.eval.every == 0 or done == r.steps):
                rec["knn"] = _knn(cfg.eval, teacher.backbone, spec, done)
            last = rec
            if rank == 0:
                with (run_dir / METRICS).open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                if progress is not None:
                    progress(rec)
        if done % cfg.checkpoint_every == 0 or done == end:
            _save_checkpoint(cfg, run_dir, done, student, teacher, opt, dino_loss, ibot_loss, gram_teacher,
                             rank)
    source.close()
    if end < r.steps:
        if distributed:
            dist.barrier()
        return None
    result = None
    if rank == 0:
        result = export(cfg, run_dir, teacher.backbone, spec, source, last, warnings,
                        device=str(device), bf16=bf16, world=W, config_file=config_file)
    if distributed:
        dist.barrier()
    return result


def _grad_norm(model: Any) -> float:
    import torch

    norms = [p.grad.detach().norm(2) for p in model.parameters() if p.grad is not None]
    return float(torch.norm(torch.stack(norms), 2)) if norms else 0.0


def _mean_across_ranks(values: dict[str, float], device: Any) -> dict[str, float]:
    import torch
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def _loader(dataset: Any, start: int, end: int, batch: int, world: int, rank: int, workers: int) -> Any:
    """Batches for steps ``start..end-1`` of this rank: step ``s`` takes samples ``s*B*W + r*B + j``."""
    from torch.utils.data import DataLoader

    from geo_dino.training.pretrain_data import StepBatchSampler, collate

    sampler = StepBatchSampler(batch, world_size=world, rank=rank, start_step=start, end_step=end)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                      persistent_workers=False, pin_memory=False)


def _recipe_hash(cfg: PretrainConfig) -> str:
    """What a checkpoint must agree on to be resumed: model, head, recipe, crops, data and seed."""
    import hashlib

    keep = cfg.model_dump(mode="json", include={"data", "crops", "backbone", "head", "recipe", "seed"})
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def _save_checkpoint(cfg: PretrainConfig, run_dir: Path, step: int, student: Any, teacher: Any, opt: Any,
                     dino_loss: Any, ibot_loss: Any, gram_teacher: Any, rank: int) -> None:
    if rank != 0:
        return
    state = {"step": step, "config_sha256": _recipe_hash(cfg), "student": student.state_dict(),
             "teacher": teacher.state_dict(), "optimizer": opt.state_dict(),
             "dino_loss": dino_loss.state_dict()}
    if ibot_loss is not None:
        state["ibot_loss"] = ibot_loss.state_dict()
    if gram_teacher is not None:
        state["gram_teacher"] = gram_teacher.state_dict()
    _atomic_save(state, run_dir / CHECKPOINT)


_PREPARED: dict[tuple[str, int | None, int], Any] = {}


def _knn(ev: KnnEvalConfig, backbone: Any, spec: Any, step: int) -> dict[str, Any]:
    """Weighted k-NN top-1 of the teacher on the labelled images (decoded once per process)."""
    from geo_dino.evaluation.probes import evaluate_model, load_labelled, prepare_images

    key = (str(ev.data), ev.size, spec.patch_size)
    if key not in _PREPARED:
        _PREPARED[key] = prepare_images(load_labelled(ev.data), size=ev.size, patch_size=spec.patch_size)
    res = evaluate_model(backbone, spec, _PREPARED[key], method="knn", k=ev.k, extra={"step": step})
    return {"top1": res.top1, "top5": res.top5, "k": ev.k, "data": str(ev.data),
            "n_train": res.n_train, "n_test": res.n_test}


def export(cfg: PretrainConfig, run_dir: Path, backbone: Any, spec: Any, source: Any, last: dict[str, Any],
           warnings: list[str], *, device: str, bf16: bool, world: int,
           config_file: str | None = None) -> PretrainResult:
    """Write the teacher backbone as ``.safetensors`` (timm layout, metadata the loader reads) and its model
    card."""
    import torch
    from safetensors.torch import save_file

    from geo_dino import __version__
    from geo_dino.files import sha256_file
    from geo_dino.governance.provenance import git_commit, software_versions
    from geo_dino.models.archs import ARCHS

    a = ARCHS[cfg.backbone.arch]
    start_licence = spec.licence if cfg.backbone.checkpoint else None
    licence = start_licence if start_licence and start_licence != "n/a (random weights)" else "Apache-2.0"
    data = source.describe()
    lineage = (f"DINO pretraining by geo_dino {__version__} for {cfg.recipe.steps} steps on "
               f"{len(data['rasters'])} raster(s) "
               f"({', '.join(Path(x['path']).name for x in data['rasters'])}), "
               + (f"continued from {spec.source} (sha256 {spec.sha256})" if cfg.backbone.checkpoint
                  else "from random initialisation"))
    out = run_dir / f"{cfg.export_name}.safetensors"
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in backbone.state_dict().items()}
    band_names = (cfg.data.band_names or data["rasters"][0].get("band_names")
                  or [f"band {i + 1}" for i in range(spec.in_chans)])
    meta = {"arch": cfg.backbone.arch, "licence": licence,
            "mean": ",".join(str(x) for x in (cfg.crops.mean or spec.mean)),
            "std": ",".join(str(x) for x in (cfg.crops.std or spec.std)),
            "bands": ",".join(band_names), "in_chans": str(spec.in_chans),
            "training_lineage": lineage, "format": "timm", "producer": f"geo_dino {__version__}"}
    atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    digest = sha256_file(out)
    hardware = {"device": device, "processes": world, "precision": "bf16 autocast" if bf16 else "fp32",
                "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        hardware["gpu"] = torch.cuda.get_device_name(0)
    card = {
        "model": {"file": out.name, "sha256": digest, "arch": cfg.backbone.arch, "family": a.family,
                  "patch_size": a.patch_size, "embed_dim": a.embed_dim, "depth": a.depth,
                  "in_chans": spec.in_chans, "parameters": int(sum(t.numel() for t in tensors.values())),
                  "licence": licence, "starting_weights": {"source": spec.source, "sha256": spec.sha256,
                                                           "licence": spec.licence}},
        "data": data,
        "recipe": cfg.model_dump(mode="json", include={"recipe", "head", "crops", "seed"}),
        "steps": cfg.recipe.steps,
        "hardware": hardware,
        "final_monitors": last,
        "collapse_warnings": warnings,
        "software": software_versions(),
        "git_commit": git_commit(),
        "remake": (f"geo-dino pretrain {config_file}" if config_file else "geo-dino pretrain CONFIG")
        + (f" --nproc {world}" if world > 1 else "")
        + " (the resolved config is pretrain_config.json in the run folder)",
    }
    (run_dir / "model_card.json").write_text(json.dumps(card, indent=2, default=str))
    (run_dir / "model_card.md").write_text(model_card_markdown(card, cfg))
    return PretrainResult(run_dir=run_dir, checkpoint=out, sha256=digest, steps=cfg.recipe.steps, final=last,
                          warnings=warnings)


def model_card_markdown(card: dict[str, Any], cfg: PretrainConfig) -> str:
    """``model_card.md``: the model card record (``model_card.json``) as Markdown for people to read."""
    m, d, f = card["model"], card["data"], card["final_monitors"]
    lines = [
        f"# {m['file']}", "",
        f"{cfg.description}".strip() or "A DINO-pretrained backbone made by geo_dino.", "",
        "## Model", "",
        f"- architecture: `{m['arch']}` ({m['family']}), patch {m['patch_size']}, width {m['embed_dim']}, "
        f"depth {m['depth']}, {m['in_chans']} input bands, {m['parameters']:,} parameters",
        f"- sha256: `{m['sha256']}`",
        f"- licence: {m['licence']}",
        f"- starting weights: {m['starting_weights']['source']} (licence {m['starting_weights']['licence']})",
        "", "## Training data", "",
    ]
    for r in d["rasters"]:
        g = r.get("gsd")
        gsd = f"{g['x_m']:.3g} m" if isinstance(g, dict) and g.get("x_m") else str(g)
        lines.append(f"- `{Path(r['path']).name}`: sha256 `{r.get('sha256', '?')}`, {r.get('crs', '?')}, "
                     f"GSD {gsd}, bands {r.get('bands', '?')}, {r.get('dtype', '?')}")
    for a in d.get("aois", []):
        lines.append(f"- AOI `{Path(a['path']).name}`: sha256 `{a.get('sha256', '?')}`")
    rc = cfg.recipe
    lines += ["", "## Recipe", "",
              f"- {rc.steps} steps × {rc.batch_size} images × {card['hardware']['processes']} process(es); "
              f"crops 2×{cfg.crops.global_size}² + {cfg.crops.n_local}×{cfg.crops.local_size}²",
              f"- lr {rc.lr} per 256 images (cosine, {rc.warmup} warm-up steps), "
              f"weight decay {rc.weight_decay}, "
              f"teacher momentum {rc.teacher_momentum}, teacher temperature {rc.warmup_teacher_temp}→"
              f"{rc.teacher_temp}",
              f"- head: {cfg.head.out_dim} prototypes; iBOT: {'on' if rc.ibot else 'off'}; KoLeo weight "
              f"{rc.koleo_weight}; Gram anchoring: {'on' if rc.gram else 'off'}",
              "", "## Hardware", "", f"- {card['hardware']}", "", "## Final monitors", ""]
    for k in ("loss", "teacher_entropy", "teacher_batch_entropy", "kl_student_teacher", "feature_std",
              "images_per_s"):
        if k in f:
            lines.append(f"- {k}: {f[k]:.4g}")
    if "knn" in f:
        lines.append(f"- k-NN top-1 on {f['knn'].get('data', 'the eval set')}: {f['knn'].get('top1')}")
    lines += ["", "## Collapse warnings", ""] + ([f"- {w}" for w in card["collapse_warnings"]] or ["- none"])
    lines += ["", "## Remake", "", f"`{card['remake']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - exercised through torchrun in tests
    """``python -m geo_dino.training.pretrain CONFIG``: the entry point torchrun starts on every rank."""
    import argparse

    from geo_dino.training.pretrain_config import load_pretrain_config

    ap = argparse.ArgumentParser(prog="python -m geo_dino.training.pretrain")
    ap.add_argument("config")
    ap.add_argument("--stop-after", type=int, default=None)
    ap.add_argument("--no-resume", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = load_pretrain_config(args.config)
    res = pretrain(cfg, stop_after=args.stop_after, resume=not args.no_resume, config_file=args.config)
    if res is not None:
        print(json.dumps({"checkpoint": str(res.checkpoint), "sha256": res.sha256}))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    main()
