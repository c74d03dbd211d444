"""Supervised segmentation heads on frozen backbone features: a linear head, its training loop, its file.

The data flow: tiles of pixels ``(N, bands, H, W)`` in [0, 1] → :func:`tile_features` (the checkpoint's
mean/std, a frozen backbone, :class:`~geo_dino.models.backbone.Features` ``.dense``) → patch features
``(N, C, h, w)`` → :class:`LinearHead` → logits ``(N, K, h, w)``, upsampled bilinearly to ``(N, K, H, W)``.
The head is linear, so upsampling its logits equals classifying bilinearly upsampled features (and is
``C / K`` times cheaper).

Labels are ``uint8 (N, H, W)`` class *values* of a :class:`~geo_dino.inputs.labels.ClassTable`, with
:data:`~geo_dino.inputs.labels.IGNORE` (255) skipped by the loss and the metrics. Logit channel ``k`` is the
table's ``k``-th class (``table.values[k]``), which need not be ``k``.

Heads: :class:`LinearHead` (one 1×1 convolution), :class:`MLPHead` (a small per-pixel MLP of 1×1
convolutions) and :class:`~geo_dino.models.dpt_head.DPTHead` (several backbone layers, DPT-style fusion). All
take ``(B, C_in, h, w)`` features and return logits: what ``C_in`` is made of (which layers, one date or two
combined by :func:`siamese_features`) is the head's ``inputs`` record (:func:`head_inputs`). One training
loop (:func:`train_head`) serves all three.

**Spectrum and context together.** A head built with ``spectral=S`` also takes, per pixel, ``S`` raw band
values at pixel resolution (:func:`spectral_input`: every band of one date, or both dates and their absolute
difference for a change head), standardised inside the head by the per-band mean and standard deviation of
its training pixels (buffers saved with the weights). The features give the context (texture, shape), the
bands the spectrum at full resolution: a linear head on both contains the per-pixel logistic regression on
the bands, and the MLP and DPT heads can combine them non-linearly. The feature part is computed at patch
resolution and upsampled (linear maps commute with bilinear upsampling), the spectral part at pixel
resolution.

A head file is a ``.safetensors`` file (never a pickle): the head's ``state_dict`` tensors, and string
metadata holding JSON: the head config, its inputs, the class table, the backbone it was trained on (arch,
source, sha256, patch size, embed dim, mean, std), the preprocessing, the validation metrics and the training
lineage.
Importing this module imports torch (``import geo_dino`` does not import it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from geo_dino.errors import CheckpointError, ConfigError
from geo_dino.models.spectral_input import SpectralInput

if TYPE_CHECKING:
    from geo_dino.inputs.labels import ClassTable
    from geo_dino.models.backbone import CheckpointSpec

__all__ = ["HEAD_FORMAT", "LinearHead", "MLPHead", "build_head", "head_inputs", "input_channels", "load_head",
           "predict_values", "save_head", "siamese_features", "spectral_input", "tile_features"]

HEAD_FORMAT = "geo_dino.head/1"
_META_KEYS = ("format", "head", "inputs", "class_table", "backbone", "preprocessing", "metrics", "lineage",
              "n_classes")


def _out_size(features: Tensor, out_size: tuple[int, int] | None, spectral: Tensor | None) -> tuple[int, int]:
    if out_size is not None:
        return (int(out_size[0]), int(out_size[1]))
    if spectral is not None:
        return (int(spectral.shape[-2]), int(spectral.shape[-1]))
    return (int(features.shape[-2]), int(features.shape[-1]))


def _up(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return torch.nn.functional.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class LinearHead(SpectralInput):
    """A 1×1 convolution (no normalisation) from ``embed_dim`` patch features (and, with ``spectral``, the
    standardised bands of each pixel) to ``n_classes`` logits.

    Initialised to zero (the softmax problem is convex: no random init is needed, so the seed only orders
    the mini-batches)."""

    def __init__(self, embed_dim: int, n_classes: int, spectral: int = 0) -> None:
        super().__init__()
        if embed_dim < 1 or n_classes < 1:
            raise ConfigError(f"embed_dim {embed_dim} and n_classes {n_classes} must be positive")
        self.embed_dim = int(embed_dim)
        self.n_classes = int(n_classes)
        self.conv = torch.nn.Conv2d(self.embed_dim, self.n_classes, kernel_size=1, bias=True)
        torch.nn.init.zeros_(self.conv.weight)
        if self.conv.bias is not None:  # always: bias=True
            torch.nn.init.zeros_(self.conv.bias)
        self._init_spectral(spectral)
        if self.spectral:
            self.conv_spectral = torch.nn.Conv2d(self.spectral, self.n_classes, kernel_size=1, bias=False)
            torch.nn.init.zeros_(self.conv_spectral.weight)

    kind = "linear"

    @property
    def in_channels(self) -> int:
        """Channels ``C`` of the features the head takes (its ``embed_dim``)."""
        return self.embed_dim

    def config(self) -> dict[str, Any]:
        """What :func:`build_head` needs to make this head again (stored in head files)."""
        cfg: dict[str, Any] = {"type": self.kind, "embed_dim": self.embed_dim, "n_classes": self.n_classes}
        return cfg | ({"spectral": self.spectral} if self.spectral else {})

    def forward(self, features: Tensor, out_size: tuple[int, int] | None = None,
                spectral: Tensor | None = None) -> Tensor:
        """Logits ``(B, K, h, w)`` of features ``(B, C, h, w)``; bilinearly upsampled to ``out_size``
        ``(rows, cols)`` when given, plus the spectral part ``(B, S, H, W)`` for a spectral head."""
        if features.ndim != 4 or features.shape[1] != self.embed_dim:
            raise ConfigError(f"features {tuple(features.shape)} are not (B, {self.embed_dim}, h, w)")
        logits = self.conv(features)
        size = _out_size(logits, out_size, spectral if self.spectral else None)
        logits = _up(logits, size)
        if self.spectral:
            logits = logits + self.conv_spectral(self._spectral(spectral, size))
        return logits

    def linear_spectral(self) -> tuple[Tensor, Tensor | None]:
        """The (weight, bias) of the linear path from the standardised bands to the logits."""
        return self.conv_spectral.weight, self.conv.bias


class MLPHead(SpectralInput):
    """A small per-pixel MLP of 1×1 convolutions: ``hidden`` units (ReLU), twice, then ``n_classes`` logits.

    The first layer is linear in the features and the bands, so its feature part runs at patch resolution
    and is upsampled before the spectral part is added at pixel resolution; the rest runs per pixel."""

    kind = "mlp"

    def __init__(self, embed_dim: int, n_classes: int, spectral: int = 0, hidden: int = 64) -> None:
        super().__init__()
        if embed_dim < 1 or n_classes < 1 or hidden < 1:
            raise ConfigError(f"embed_dim {embed_dim}, n_classes {n_classes} and hidden {hidden} "
                              "must be positive")
        self.embed_dim, self.n_classes, self.hidden = int(embed_dim), int(n_classes), int(hidden)
        self.proj = torch.nn.Conv2d(self.embed_dim, self.hidden, 1)
        self._init_spectral(spectral)
        if self.spectral:
            self.proj_spectral = torch.nn.Conv2d(self.spectral, self.hidden, 1, bias=False)
        self.mlp = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Conv2d(self.hidden, self.hidden, 1),
                                       torch.nn.ReLU(), torch.nn.Conv2d(self.hidden, self.n_classes, 1))
        if self.spectral:
            # a linear path from the bands straight to the logits (started as the per-pixel logistic
            # regression, see init_from_logistic); the MLP starts at zero and learns what the context adds
            self.skip = torch.nn.Conv2d(self.spectral, self.n_classes, 1)
            for p in (*self.skip.parameters(), *self.mlp[3].parameters()):
                torch.nn.init.zeros_(p)

    @property
    def in_channels(self) -> int:
        """Channels ``C`` of the features the head takes."""
        return self.embed_dim

    def config(self) -> dict[str, Any]:
        """What :func:`build_head` needs to make this head again (stored in head files)."""
        return {"type": self.kind, "embed_dim": self.embed_dim, "n_classes": self.n_classes,
                "spectral": self.spectral, "hidden": self.hidden}

    def forward(self, features: Tensor, out_size: tuple[int, int] | None = None,
                spectral: Tensor | None = None) -> Tensor:
        """Logits ``(B, K, H, W)``; ``H, W``: ``out_size``, else the spectral input's, else the patch grid."""
        if features.ndim != 4 or features.shape[1] != self.embed_dim:
            raise ConfigError(f"features {tuple(features.shape)} are not (B, {self.embed_dim}, h, w)")
        size = _out_size(features, out_size, spectral if self.spectral else None)
        h = _up(self.proj(features), size)
        if not self.spectral:
            return self.mlp(h)
        s = self._spectral(spectral, size)
        return self.mlp(h + self.proj_spectral(s)) + self.skip(s)

    def linear_spectral(self) -> tuple[Tensor, Tensor | None]:
        """The (weight, bias) of the linear path from the standardised bands to the logits."""
        return self.skip.weight, self.skip.bias


HEAD_TYPES = ("linear", "mlp", "dpt")


def build_head(config: Mapping[str, Any]) -> SpectralInput:
    """A fresh head from its :meth:`config` (``type`` ``linear`` or ``dpt`` and its sizes)."""
    from geo_dino.models.dpt_head import DPTHead

    cfg = dict(config)
    kind = cfg.pop("type", None)
    try:
        spectral = int(cfg.get("spectral", 0))
        if kind == "linear":
            return LinearHead(int(cfg["embed_dim"]), int(cfg["n_classes"]), spectral)
        if kind == "mlp":
            return MLPHead(int(cfg["embed_dim"]), int(cfg["n_classes"]), spectral, int(cfg.get("hidden", 64)))
        if kind == "dpt":
            return DPTHead(int(cfg["embed_dim"]), int(cfg["n_classes"]), int(cfg.get("n_layers", 4)),
                           int(cfg.get("hidden", 64)), spectral)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"head config {config}: {exc}") from None
    raise ConfigError(f"head type {kind!r}: choose one of {list(HEAD_TYPES)}")


def predict_values(head: SpectralInput, features: Tensor, out_size: tuple[int, int], values: Sequence[int],
                   batch_size: int = 64, spectral: Tensor | None = None) -> np.ndarray:
    """Class values ``uint8 (N, rows, cols)`` (the arg-max logit's ``values[k]``) of features
    ``(N, C, h, w)`` (and, for a spectral head, the pixels' bands ``(N, S, rows, cols)``)."""
    lut = np.asarray(values, dtype=np.uint8)
    out = []
    head.eval()
    with torch.inference_mode():
        for i in range(0, features.shape[0], batch_size):
            sp = None if spectral is None else spectral[i:i + batch_size]
            out.append(call_head(head, features[i:i + batch_size], out_size, sp).argmax(1).numpy())
    return lut[np.concatenate(out)] if out else np.zeros((0, *out_size), np.uint8)


def call_head(head: SpectralInput, features: Tensor, out_size: tuple[int, int],
              spectral: Tensor | None) -> Tensor:
    """``head(features, out_size)``, with the spectral input for a spectral head (refused for another)."""
    if getattr(head, "spectral", 0):
        return head(features, out_size, spectral=spectral)
    if spectral is not None:
        raise ConfigError("spectral input given to a head that takes none (built with spectral=0)")
    return head(features, out_size)


def spectral_input(x1: Tensor | np.ndarray, x2: Tensor | np.ndarray | None = None) -> Tensor:
    """A head's per-pixel spectral input from raw band values ``(N, S, H, W)``: one date as it is, or two
    dates as ``[x1, x2, |x2 - x1|]`` (3S channels), float32."""
    a = torch.as_tensor(np.asarray(x1, dtype=np.float32)) if not torch.is_tensor(x1) else x1.float()
    if x2 is None:
        return a
    b = torch.as_tensor(np.asarray(x2, dtype=np.float32)) if not torch.is_tensor(x2) else x2.float()
    if a.shape != b.shape:
        raise ConfigError(f"the two dates' bands differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return torch.cat([a, b, (b - a).abs()], dim=1)


def tile_features(model: torch.nn.Module, spec: CheckpointSpec, tiles_pixels: Tensor | np.ndarray,
                  batch_size: int = 32) -> Tensor:
    """Dense patch features ``float32 (N, C, H/p, W/p)`` of pixel tiles ``(N, bands, H, W)`` scaled to [0, 1].

    Pixels are normalised with ``spec.mean`` / ``spec.std`` (a
    :class:`~geo_dino.models.backbone.CheckpointSpec`);
    the backbone is frozen (eval mode, ``torch.inference_mode``). Returns a CPU tensor that is a plain
    (non-inference) tensor, so it can feed training.
    """
    from geo_dino.models.backbone import extract

    x = torch.as_tensor(np.asarray(tiles_pixels, dtype=np.float32) if not torch.is_tensor(tiles_pixels)
                        else tiles_pixels.float())
    if x.ndim != 4:
        raise ConfigError(f"tiles must be (N, bands, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != len(spec.mean) or len(spec.mean) != len(spec.std):
        raise ConfigError(f"tiles have {x.shape[1]} bands but the checkpoint's mean/std have "
                          f"{len(spec.mean)}/{len(spec.std)}; select the bands the backbone was trained on")
    if batch_size < 1:
        raise ConfigError(f"batch_size {batch_size} must be positive")
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, x.shape[0], batch_size):
            out.append(extract(model, (x[i:i + batch_size] - mean) / std).dense.float())
    if not out:
        raise ConfigError("no tiles given")
    return torch.cat(out).clone()  # clone outside inference mode: usable by autograd


# --------------------------------------------------------------------------------------------- training


SIAMESE_MODES = ("diff", "concat", "concat+diff")


def siamese_features(f1: Tensor, f2: Tensor, mode: str = "concat+diff") -> Tensor:
    """Change-detection input from two dates' patch features ``(N, C, h, w)`` of the same backbone and grid:
    ``diff`` = ``|f1 − f2|`` (C channels), ``concat`` = ``[f1, f2]`` (2C), ``concat+diff`` =
    ``[f1, f2, |f1 − f2|]`` (3C). A :class:`LinearHead` on it gives change logits (classes from the change
    labels' table)."""
    if mode not in SIAMESE_MODES:
        raise ConfigError(f"siamese mode {mode!r}: choose one of {list(SIAMESE_MODES)}")
    if tuple(f1.shape) != tuple(f2.shape):
        raise ConfigError(f"the two dates' features differ in shape: {tuple(f1.shape)} vs {tuple(f2.shape)}; "
                          "both dates must lie on one grid and go through the same backbone")
    diff = (f1 - f2).abs()
    if mode == "diff":
        return diff
    if mode == "concat":
        return torch.cat([f1, f2], dim=1)
    return torch.cat([f1, f2, diff], dim=1)


def combine_dates(f1: Tensor, f2: Tensor, mode: str, n_layers: int) -> Tensor:
    """Two dates' features ``(N, L·C, h, w)`` → the change head's input, :func:`siamese_features` per
    layer."""
    import torch

    parts1, parts2 = f1.chunk(max(n_layers, 1), dim=1), f2.chunk(max(n_layers, 1), dim=1)
    return torch.cat([siamese_features(a, b, mode) for a, b in zip(parts1, parts2, strict=True)], dim=1)


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return obj


SIAMESE_FACTOR = {"diff": 1, "concat": 2, "concat+diff": 3}


def head_inputs(task: str = "segmentation", layers: Sequence[int] = (), siamese: str | None = None,
                positive_class: int | None = None,
                bands: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> dict[str, Any]:
    """How a head's input is made from backbone features (stored in head files, read by the pipeline).

    ``task``: ``segmentation`` (one date) or ``change`` (two dates, combined by :func:`siamese_features` with
    mode ``siamese``); ``layers``: 0-based backbone blocks whose dense features are concatenated, in this
    order (empty: the last block's normed output, :attr:`~geo_dino.models.backbone.Features.dense`);
    ``positive_class``: for change heads, the class value that means "changed" (its probability is the change
    probability); ``bands``: the identity of the bands the head was trained on, ``{"backbone": [...],
    "spectral": [...]}``, each a list of ``{"index": 1-based band, "description": ...}`` (a run refuses a
    head whose bands differ).
    """
    if task not in ("segmentation", "change"):
        raise ConfigError(f"task {task!r}: choose 'segmentation' or 'change'")
    if (task == "change") != (siamese is not None):
        raise ConfigError("a change head needs a siamese mode, a segmentation head none")
    if siamese is not None and siamese not in SIAMESE_MODES:
        raise ConfigError(f"siamese mode {siamese!r}: choose one of {list(SIAMESE_MODES)}")
    out: dict[str, Any] = {"task": task, "layers": [int(i) for i in layers], "siamese": siamese,
                           "positive_class": None if positive_class is None else int(positive_class)}
    if bands is not None:
        out["bands"] = {k: [{"index": int(b["index"]), "description": str(b["description"])} for b in v]
                        for k, v in bands.items()}
    return out


def band_identity(bands: Sequence[int], names: Sequence[str]) -> list[dict[str, Any]]:
    """``[{"index", "description"}]`` of selected 1-based bands and their descriptions."""
    return [{"index": int(b), "description": str(n)} for b, n in zip(bands, names, strict=True)]


def input_channels(embed_dim: int, inputs: Mapping[str, Any]) -> int:
    """Channels of a head's input: ``embed_dim`` × layers × the siamese factor."""
    siamese = inputs.get("siamese")
    factor = SIAMESE_FACTOR.get(siamese, 1) if siamese is not None else 1
    return int(embed_dim) * max(len(inputs.get("layers") or ()), 1) * factor


def save_head(path: str | Path, head: SpectralInput, table: ClassTable, *, backbone_spec: Any,
              preprocessing: Any, metrics: Mapping[str, Any] | None, inputs: Mapping[str, Any] | None = None,
              lineage: Mapping[str, Any] | None = None) -> Path:
    """Write a head's weights and metadata to a ``.safetensors`` file (atomically) and return its path.

    ``head``: a :class:`LinearHead` or :class:`~geo_dino.models.dpt_head.DPTHead`; ``backbone_spec``: the
    :class:`~geo_dino.models.backbone.CheckpointSpec` the features came from; ``preprocessing``: a
    :class:`~geo_dino.inputs.preprocess.Preprocessor` or a JSON-able dict (the pixels' scaling and mean/std: a
    run with this head uses them); ``metrics``: e.g. :attr:`TrainResult.metrics`; ``inputs``:
    :func:`head_inputs` (default: one date, the last block); ``lineage``: JSON-able training record (labels
    and their sha256, rasters, split, training settings).
    """
    from safetensors.torch import save_file

    p = Path(path)
    if p.suffix != ".safetensors":
        raise ConfigError(f"{p}: a head file is written as .safetensors")
    if head.n_classes != len(table.values):
        raise ConfigError(f"the head has {head.n_classes} classes but the table {len(table.values)}")
    inputs = dict(inputs) if inputs is not None else head_inputs()
    spec = _jsonable(backbone_spec)
    backbone = {k: spec.get(k) for k in ("arch", "source", "sha256", "seed", "patch_size", "embed_dim",
                                         "in_chans", "mean", "std", "bands")}
    if (backbone["embed_dim"] is not None
            and input_channels(backbone["embed_dim"], inputs) != head.in_channels):
        raise ConfigError(f"the head takes {head.in_channels} channels "
                          f"but the backbone's {backbone['embed_dim']} "
                          f"with inputs {inputs} give {input_channels(backbone['embed_dim'], inputs)}")
    meta = {
        "format": HEAD_FORMAT,
        "head": json.dumps(head.config()),
        "inputs": json.dumps(inputs),
        "class_table": json.dumps(table.to_dict()),
        "backbone": json.dumps(backbone),
        "preprocessing": json.dumps(_jsonable(preprocessing)),
        "metrics": json.dumps(dict(metrics) if metrics is not None else None),
        "lineage": json.dumps(dict(lineage) if lineage is not None else None),
        "n_classes": str(head.n_classes),
    }
    tensors = {k: v.detach().contiguous().clone() for k, v in head.state_dict().items()}
    from geo_dino.files import atomic_write

    return atomic_write(p, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_head(path: str | Path) -> tuple[SpectralInput, ClassTable, dict[str, Any]]:
    """``(head in eval mode, ClassTable, metadata)`` of a :func:`save_head` file. Never executes code.

    Raises :class:`~geo_dino.errors.CheckpointError` for a missing file, a file that is not safetensors,
    missing or unreadable metadata, or weights that do not match the head's config or the class table."""
    from safetensors import SafetensorError, safe_open

    from geo_dino.inputs.labels import ClassTable

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"head file not found: {p}")
    with p.open("rb") as fh:
        magic = fh.read(2)
    if magic in (b"\x80\x02", b"PK"):
        raise CheckpointError(f"{p}: a pickle/zip file; head files are safetensors only (refused)")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{p}: not a valid safetensors file: {exc}") from None
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{p}: metadata {missing} missing; not a geo_dino head file (write heads with "
                              "seg_heads.save_head)")
    if meta["format"] != HEAD_FORMAT:
        raise CheckpointError(f"{p}: format {meta['format']!r}, this version reads {HEAD_FORMAT!r}")
    try:
        parsed = {k: json.loads(meta[k]) for k in ("head", "inputs", "class_table", "backbone",
                                                   "preprocessing", "metrics", "lineage")}
        n_classes = int(meta["n_classes"])
    except ValueError as exc:
        raise CheckpointError(f"{p}: unreadable metadata: {exc}") from None
    try:
        table = ClassTable.from_dict(parsed["class_table"])
        head = build_head(parsed["head"])
    except ConfigError as exc:
        raise CheckpointError(f"{p}: invalid metadata: {exc}") from None
    k = len(table.values)
    if head.n_classes != k or n_classes != k:
        raise CheckpointError(f"{p}: the head's {head.n_classes} outputs (n_classes {n_classes}) "
                              f"do not match the class table's {k} classes")
    try:
        head.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{p}: weights do not match the head config {parsed['head']}: {exc}") from None
    head.eval()
    parsed["format"] = meta["format"]
    parsed["n_classes"] = k
    parsed["embed_dim"] = head.embed_dim
    return head, table, parsed
