"""DINOv3-architecture ViT backbones: built from a spec, random-initialised or loaded from a local file.

Checkpoints are data, not code: safetensors are preferred; ``.pth`` files go through
``torch.load(weights_only=True)``; every load checks the sha256 when one is pinned; keys match strictly.
The architecture is chosen by the config (and checked against the weights' shapes), never by a file name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geo_dino.errors import CheckpointError, ConfigError, LicenceError
from geo_dino.files import sha256_file
from geo_dino.models.archs import (  # ARCHS re-exported: the registry lives in archs.py
    ARCHS,
    DINOV3_LICENCE,
    ArchSpec,
)

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class CheckpointSpec:
    """The identity and preprocessing of the weights a run uses (goes into the provenance record)."""

    arch: str
    patch_size: int
    embed_dim: int
    in_chans: int
    n_registers: int
    adaptation: str | None  # how the patch embedding was adapted to other bands, if it was
    mean: tuple[float, ...]
    std: tuple[float, ...]
    bands: tuple[str, ...]
    source: str  # "random-init" or the checkpoint's path
    layout: str | None  # the checkpoint's layout (timm | official | hf), None for random init
    sha256: str | None
    licence: str
    seed: int | None
    training_lineage: str
    # the raw-value range mean/std assume for the [0, 1] scaling (preprocess.scale: range with this
    # value_range), as for torchgeo's Sentinel-2 weights (x / 10000); None: the run's own scaling
    value_range: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record as a plain dict (for JSON provenance)."""
        return asdict(self)


def checkpoint_metadata(path: Path | None) -> dict[str, str]:
    """The metadata of a ``.safetensors`` checkpoint, read from its header only ({} for other files or when
    unreadable: the full load reports those clearly)."""
    if path is None or Path(path).suffix != ".safetensors" or not Path(path).is_file():
        return {}
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:
        return {}


def adapt_patch_embed(model: Any, in_chans: int) -> str:
    """Give the patch embedding ``in_chans`` input bands: the trained RGB filters repeated over the bands and
    rescaled so the response keeps its magnitude (timm's ``adapt_input_conv``). Returns the record string."""
    import torch
    from timm.models import adapt_input_conv

    proj = model.patch_embed.proj
    old = proj.in_channels
    if old != 3:
        raise ConfigError(f"backbone.in_chans {in_chans}: the weights take {old} bands and only RGB "
                          f"weights are adapted; select the {old} bands they were trained on (sources.bands) "
                          "and leave backbone.in_chans unset")
    new = torch.nn.Conv2d(in_chans, proj.out_channels, proj.kernel_size, proj.stride, proj.padding,
                          bias=proj.bias is not None)
    with torch.no_grad():
        new.weight.copy_(adapt_input_conv(in_chans, proj.weight.detach().clone()))
        if proj.bias is not None and new.bias is not None:  # new has a bias exactly when proj has one
            new.bias.copy_(proj.bias)
    model.patch_embed.proj = new
    return (f"patch embedding adapted from {old} to {in_chans} bands "
            f"(timm adapt_input_conv: filters repeated cyclically and scaled by {old}/{in_chans})")


def arch_spec(arch: str) -> ArchSpec:
    """The registry entry, or a clear error listing the registered names."""
    if arch not in ARCHS:
        raise ConfigError(f"backbone.arch: unknown architecture {arch!r}; choose one of {sorted(ARCHS)}")
    return ARCHS[arch]


def own_from_scratch(meta: dict[str, str]) -> bool:
    """Whether a checkpoint's metadata says geo_dino pretrained it from random initialisation (its producer is
    geo_dino and its lineage names no starting weights)."""
    lineage = meta.get("training_lineage", "")
    return (meta.get("producer", "").startswith("geo_dino") and "by geo_dino" in lineage
            and lineage.rstrip().endswith("from random initialisation"))


def effective_licence(arch: str, meta: dict[str, str], layout: str | None = None) -> str:
    """The licence a checkpoint is run under: metadata may add a restriction, never lift one.

    The architecture's published weights' licence holds, unless the weights are geo_dino's own from scratch
    (:func:`own_from_scratch`), whose metadata states their licence. A gated licence (DINOv3) stays whatever
    the metadata says for a file in the official repositories' layout (``layout == "official"``) or whose
    lineage starts from other weights; a gated licence in the metadata gates any architecture."""
    arch_licence = arch_spec(arch).licence
    declared = meta.get("licence")
    if declared == DINOV3_LICENCE:
        return DINOV3_LICENCE
    if arch_licence == DINOV3_LICENCE and (layout == "official" or not own_from_scratch(meta)):
        return DINOV3_LICENCE
    return declared or arch_licence


def check_licence(arch: str, checkpoint: Path | None, accept_licence: str | None,
                  meta: dict[str, str] | None = None, layout: str | None = None) -> dict[str, Any] | None:
    """Refuse gated weights without an explicit acceptance; return the acceptance record (None if not gated).

    ``meta``: the checkpoint's metadata, ``layout`` its tensors' layout when known
    (:func:`effective_licence`)."""
    licence = effective_licence(arch, meta or {}, layout)
    if checkpoint is None or licence != DINOV3_LICENCE:
        return None
    if accept_licence != licence:
        raise LicenceError(f"{arch} weights are distributed under the {licence}; running them needs an "
                           f"explicit acceptance: set backbone.accept_licence: {licence!r} in the config or "
                           f"pass --accept-licence {licence!r} on the command line")
    return {"licence": licence, "accepted": True, "statement": accept_licence}


def build_backbone(arch: str, *, checkpoint: Path | None = None, checkpoint_sha256: str | None = None,
                   seed: int = 0, mean: tuple[float, ...] | None = None,
                   std: tuple[float, ...] | None = None,
                   accept_licence: str | None = None,
                   in_chans: int | None = None,
                   drop_path_rate: float = 0.0,
                   layerscale_init: float | None = None) -> tuple[Any, CheckpointSpec]:
    """A ViT in eval mode and its :class:`CheckpointSpec`. Random init is seeded and recorded as such.

    Weights under a gated licence (DINOv3) load only with ``accept_licence`` naming that licence. The licence
    is :func:`effective_licence`: the architecture's, which only weights geo_dino pretrained from scratch
    replace by their own; metadata may add a restriction, never lift one. ``drop_path_rate`` and
    ``layerscale_init`` (LayerScale's initial value, for models trained from scratch) matter only for
    training.
    """
    import timm
    import torch

    a = arch_spec(arch)
    from geo_dino.models.checkpoints import detect_layout as detect_layout_of
    from geo_dino.models.checkpoints import inspect_state, read_state_dict, to_timm

    meta: dict[str, str] = {}
    layout = None
    timm_name = a.timm_name
    if checkpoint is not None:
        state, meta = read_state_dict(Path(checkpoint), checkpoint_sha256)
    check_licence(arch, checkpoint, accept_licence, meta,
                  detect_layout_of(state) if checkpoint is not None else None)
    ckpt_chans = a.in_chans
    if checkpoint is not None:
        if "in_chans" in meta:
            try:
                ckpt_chans = int(meta["in_chans"])
            except ValueError:
                raise CheckpointError(
                    f"{checkpoint}: metadata in_chans {meta['in_chans']!r} is not a number") from None
        detected = inspect_state(state)
        diffs = detected.matches(a, ckpt_chans)
        if diffs:
            raise CheckpointError(f"{checkpoint}: its tensors describe another architecture than "
                                  f"backbone.arch {arch}: {'; '.join(diffs)}; "
                                  f"`geo-dino checkpoint inspect {checkpoint}` lists "
                                  "the registered architectures it fits")
        layout = detected.layout
        if detected.qkv_bias and a.rope and not timm_name.endswith("_qkvb"):
            timm_name += "_qkvb"  # DINOv3 with query/value biases
    kwargs = a.timm_kwargs()
    if ckpt_chans != a.in_chans:
        kwargs["in_chans"] = ckpt_chans
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if layerscale_init is not None:
        kwargs["init_values"] = layerscale_init
    if checkpoint is not None and detected.pos_grid:  # learned positions: build at the checkpoint's own grid
        kwargs["img_size"] = detected.pos_grid * a.patch_size
    torch.manual_seed(seed)
    model = timm.create_model(timm_name, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs)
    if checkpoint is not None:
        state = to_timm(state, detected, model)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        misshaped = sorted(k for k in set(expected) & set(state)
                           if tuple(expected[k].shape) != tuple(state[k].shape))
        if missing or unexpected or misshaped:
            raise CheckpointError(
                f"{checkpoint}: does not match architecture {arch}: "
                f"{len(missing)} missing keys {missing[:5]}, "
                f"{len(unexpected)} unexpected keys {unexpected[:5]}, "
                f"{len(misshaped)} misshaped keys {misshaped[:5]}")
        model.load_state_dict(state, strict=True)
    adaptation = None
    if in_chans is not None and in_chans != ckpt_chans:
        adaptation = adapt_patch_embed(model, in_chans)
    model.eval()
    digest = sha256_file(Path(checkpoint)) if checkpoint else None
    value_range = _meta_floats(meta, "value_range") or a.value_range
    spec = CheckpointSpec(
        arch=arch, patch_size=a.patch_size, embed_dim=a.embed_dim, in_chans=in_chans or ckpt_chans,
        n_registers=a.n_registers, adaptation=adaptation,
        mean=tuple(mean or _meta_floats(meta, "mean") or a.mean),
        std=tuple(std or _meta_floats(meta, "std") or a.std),
        bands=tuple(meta["bands"].split(",")) if "bands" in meta else a.bands,
        source=str(checkpoint) if checkpoint else "random-init",
        layout=layout,
        sha256=digest,
        licence=(effective_licence(arch, meta, layout) if checkpoint else "n/a (random weights)"),
        seed=None if checkpoint else seed,
        training_lineage=meta.get("training_lineage") or _lineage(a, digest),
        value_range=(value_range[0], value_range[1]) if value_range and len(value_range) == 2 else None,
    )
    return model, spec


def _lineage(a: ArchSpec, digest: str | None) -> str:
    """What the weights were trained on when the checkpoint does not say: known only for a registered
    published file whose sha256 the bytes match."""
    if digest is None:
        return "none: random initialisation"
    if a.published is not None and digest == a.published.sha256:
        return f"{a.training_data} (the published {a.published.file_name}: sha256 verified)"
    if a.published is not None:
        return (f"unknown: the file is not the published {a.published.name} (whose sha256 begins "
                f"{a.published.sha256[:8]}), and the checkpoint does not say")
    return "unknown (not stated in the checkpoint)"


def _meta_floats(meta: dict[str, str], key: str) -> tuple[float, ...] | None:
    if key not in meta:
        return None
    try:
        return tuple(float(x) for x in meta[key].split(","))
    except ValueError:
        raise CheckpointError(
            f"checkpoint metadata {key!r} is not a comma-separated list of numbers") from None


def fused(model: Any) -> Any:
    """The :class:`~geo_dino.models.fast_vit.FusedRopeViT` view of a RoPE model (made once, kept on the
    model)."""
    from geo_dino.models.fast_vit import FusedRopeViT

    view = model.__dict__.get("_geo_dino_fused")
    if view is None:
        view = FusedRopeViT(model)
        object.__setattr__(model, "_geo_dino_fused", view)  # a plain attribute: not a submodule, not saved
    return view


def dense_features(model: Any, x: Tensor) -> Tensor:
    """Patch features ``(B, C, H/p, W/p)`` at the input's own size (a multiple of the patch size), after the
    final norm, with the CLS and register tokens dropped by their count (registers are never read as patches).

    RoPE models (DINOv3) run through :class:`~geo_dino.models.fast_vit.FusedRopeViT` (bit-identical to
    timm, faster); others through timm's ``forward_intermediates``.
    """
    import torch

    p = model.patch_embed.patch_size[0]
    if x.shape[-1] % p or x.shape[-2] % p:
        raise ConfigError(f"input {tuple(x.shape[-2:])} is not a multiple of the patch size {p}")
    with torch.inference_mode():
        if getattr(model, "rope", None) is not None:
            return fused(model).dense_features(x)
        feats = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True,
                                            output_fmt="NCHW")
    return feats[-1]


@dataclass(frozen=True)
class Features:
    """The one feature interface every head uses.

    ``dense``: patch features ``(B, C, H/p, W/p)`` of the last block; ``global_``: the CLS token ``(B, C)``;
    ``layers``: patch features of selected blocks (0-based), each ``(B, C, H/p, W/p)``. All after the final
    norm; register tokens are never part of any of them.
    """

    dense: Tensor
    global_: Tensor
    layers: dict[int, Tensor]


def extract(model: Any, x: Tensor, layers: tuple[int, ...] = ()) -> Features:
    """Dense, global and intermediate-layer features of ``x`` (a multiple of the patch size)."""
    import torch

    p = model.patch_embed.patch_size[0]
    if x.shape[-1] % p or x.shape[-2] % p:
        raise ConfigError(f"input {tuple(x.shape[-2:])} is not a multiple of the patch size {p}")
    depth = len(model.blocks)
    bad = [i for i in layers if not -depth <= i < depth]
    if bad:
        raise ConfigError(f"layers {bad} do not exist: the backbone has blocks 0..{depth - 1}")
    wanted = tuple(sorted({i % depth for i in layers}))
    h, w = x.shape[-2] // p, x.shape[-1] // p
    npt = model.num_prefix_tokens

    def grid(tokens: Tensor) -> Tensor:
        return tokens[:, npt:].transpose(1, 2).reshape(x.shape[0], -1, h, w)

    with torch.inference_mode():
        if getattr(model, "rope", None) is not None:
            from geo_dino.models.fast_vit import fused_forward_with_layers

            final, kept = fused_forward_with_layers(fused(model), x, wanted)
            inter = {i: grid(t) for i, t in kept.items()}
        else:
            final, maps = model.forward_intermediates(x, indices=list(wanted) or [depth - 1], norm=True,
                                                     output_fmt="NCHW")
            inter = dict(zip(wanted, maps, strict=False)) if wanted else {}  # final: already normed
    return Features(dense=grid(final), global_=final[:, 0], layers={i: inter[i] for i in wanted})


def weights_value_range(meta: dict[str, str], arch: ArchSpec) -> tuple[float, float] | None:
    """The raw value range the weights expect to be scaled from (their metadata's ``value_range``, else their
    architecture's, e.g. torchgeo's Sentinel-2 DN / 10000), or None: the run's own scaling."""
    vr = _meta_floats(meta, "value_range") or arch.value_range
    return (float(vr[0]), float(vr[1])) if vr else None


def weights_normalisation(meta: dict[str, str],
                          arch: ArchSpec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and standard deviation the weights were trained with: their metadata's (one per band of a
    multispectral checkpoint), else their architecture's."""
    return (_meta_floats(meta, "mean") or arch.mean, _meta_floats(meta, "std") or arch.std)


def convert_file(src: str | Path, dst: str | Path, arch: str | None = None) -> dict[str, Any]:
    """Convert any readable layout to a timm-layout ``.safetensors`` with its metadata (and ``dst.json``)."""
    import json

    from safetensors.torch import save_file

    from geo_dino import __version__
    from geo_dino.files import sha256_file
    from geo_dino.models.archs import ARCHS
    from geo_dino.models.checkpoints import declared_chans, fitting_archs, inspect_state, read_state_dict

    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise CheckpointError(f"{dst}: the converted file must be a .safetensors file")
    if dst.resolve() == src.resolve():
        raise CheckpointError("the output would overwrite the input")
    state, src_meta = read_state_dict(src, None)
    d = inspect_state(state)
    fits = fitting_archs(d, declared_chans(src_meta))
    if arch is None:
        if len(fits) != 1:
            raise CheckpointError(f"{src}: its tensors fit {fits or 'no registered architecture'}; "
                                  "name one with --arch (e.g. the _sat entry for SAT-493M weights)")
        arch = fits[0]
    a = ARCHS.get(arch)
    if a is None:
        raise CheckpointError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHS)}")
    model, spec = build_backbone(arch, checkpoint=src, accept_licence=a.licence)  # converting is not running
    meta = {"arch": arch, "source_layout": d.layout, "source_sha256": sha256_file(src),
            "source_name": src.name,
            "licence": a.licence, "mean": ",".join(map(str, spec.mean)), "std": ",".join(map(str, spec.std)),
            "bands": ",".join(a.bands),
            # an entry pinned to a published file knows the lineage only when the bytes are that file's
            "training_lineage": spec.training_lineage if a.published else a.training_data or "unknown",
            "converted_by": f"geo_dino {__version__}"}
    if spec.value_range is not None:
        meta["value_range"] = ",".join(map(str, spec.value_range))
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    from geo_dino.files import atomic_write

    atomic_write(dst, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    record = meta | {"sha256": sha256_file(dst), "tensors": len(tensors)}
    dst.with_name(dst.name + ".json").write_text(json.dumps(record, indent=2))
    return record
